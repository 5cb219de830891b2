#include "attestors/workload/unix/hash_budget.h"

#include <algorithm>
#include <chrono>
#include <utility>

namespace mandate::unix_attestor {

HashBudget::HashBudget(uint64_t burst_bytes, uint64_t refill_bytes_per_second,
                       size_t max_tracked_uids, NowMillis now)
    : burst_bytes_(burst_bytes),
      refill_bytes_per_second_(refill_bytes_per_second),
      max_tracked_uids_(std::max<size_t>(1, max_tracked_uids)),
      now_(now ? std::move(now) : [] {
        return std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
            .count();
      }) {}

void HashBudget::RefillLocked(Bucket& bucket, int64_t now_ms) const {
  if (now_ms <= bucket.updated_ms) return;
  uint64_t elapsed_ms = static_cast<uint64_t>(now_ms - bucket.updated_ms);
  uint64_t missing = burst_bytes_ - bucket.tokens;
  // Past full_after_ms the bucket is full; below it elapsed * rate stays far from overflow.
  uint64_t full_after_ms =
      refill_bytes_per_second_ == 0 ? UINT64_MAX : (missing * 1000) / refill_bytes_per_second_ + 1;
  if (elapsed_ms >= full_after_ms) {
    bucket.tokens = burst_bytes_;
  } else {
    bucket.tokens += std::min(missing, elapsed_ms * refill_bytes_per_second_ / 1000);
  }
  bucket.updated_ms = now_ms;
}

bool HashBudget::TryConsume(uint32_t uid, uint64_t bytes) {
  if (burst_bytes_ == 0) return true;
  if (bytes > burst_bytes_) return false;
  int64_t now_ms = now_();
  absl::MutexLock lock(&mu_);
  auto it = buckets_.find(uid);
  if (it == buckets_.end()) {
    if (buckets_.size() >= max_tracked_uids_) {
      // A full bucket is the same as no bucket: forget those to make room.
      absl::erase_if(buckets_, [&](auto& kv) {
        RefillLocked(kv.second, now_ms);
        return kv.second.tokens == burst_bytes_;
      });
      if (buckets_.size() >= max_tracked_uids_) return false;
    }
    it = buckets_.emplace(uid, Bucket{burst_bytes_, now_ms}).first;
  } else {
    RefillLocked(it->second, now_ms);
  }
  if (it->second.tokens < bytes) return false;
  it->second.tokens -= bytes;
  return true;
}

}  // namespace mandate::unix_attestor
