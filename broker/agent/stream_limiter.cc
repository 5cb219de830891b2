#include "broker/agent/stream_limiter.h"

namespace mandate::agent {

std::optional<StreamLimiter::Slot> StreamLimiter::Acquire(uint32_t uid) {
  absl::MutexLock lock(&mu_);
  if (open_ >= max_total_) return std::nullopt;
  size_t& mine = per_uid_[uid];
  if (mine >= max_per_uid_) {
    if (mine == 0) per_uid_.erase(uid);
    return std::nullopt;
  }
  ++mine;
  ++open_;
  return Slot(this, uid);
}

void StreamLimiter::Release(uint32_t uid) {
  absl::MutexLock lock(&mu_);
  --open_;
  auto it = per_uid_.find(uid);
  if (it != per_uid_.end() && --it->second == 0) per_uid_.erase(it);
}

size_t StreamLimiter::open() const {
  absl::MutexLock lock(&mu_);
  return open_;
}

}  // namespace mandate::agent
