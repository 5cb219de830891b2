#include "broker/common/grpcutil/call_watchdog.h"

#include <grpcpp/server_context.h>

namespace mandate::grpcutil {

CallWatchdog::CallWatchdog() : thread_([this] { Run(); }) {}

CallWatchdog::~CallWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    changed_.notify_all();
  }
  thread_.join();
}

CallWatchdog::Guard::~Guard() {
  if (owner_ != nullptr) owner_->Forget(id_);
}

CallWatchdog::Guard CallWatchdog::Watch(grpc::ServerContext* context,
                                        std::chrono::milliseconds budget) {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t id = next_id_++;
  watched_[id] = Watched{Clock::now() + budget, context};
  changed_.notify_all();
  return Guard(this, id);
}

void CallWatchdog::Forget(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  watched_.erase(id);
}

void CallWatchdog::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    Clock::time_point next = Clock::now() + std::chrono::seconds(60);
    Clock::time_point now = Clock::now();
    for (auto it = watched_.begin(); it != watched_.end();) {
      if (it->second.deadline <= now) {
        // Cancelling under the lock keeps the context alive: its guard cannot be destroyed
        // (Forget needs the lock) while we touch it.
        it->second.context->TryCancel();
        it = watched_.erase(it);
      } else {
        next = std::min(next, it->second.deadline);
        ++it;
      }
    }
    changed_.wait_until(lock, next);
  }
}

}  // namespace mandate::grpcutil
