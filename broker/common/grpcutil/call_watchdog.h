// Cancels server calls that outlive their time budget.
//
// The synchronous gRPC API has no server-side deadline for a blocking Read(), so a client that
// opens a stream and never sends would hold a server thread forever. Handlers register their
// context with a budget; the watchdog's thread calls TryCancel() when it runs out, which makes
// the blocked Read() return false.
//
// Thread-safety: all methods may be called concurrently.
#ifndef MANDATE_BROKER_COMMON_GRPCUTIL_CALL_WATCHDOG_H_
#define MANDATE_BROKER_COMMON_GRPCUTIL_CALL_WATCHDOG_H_

#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>
#include <thread>

namespace grpc {
class ServerContext;
}

namespace mandate::grpcutil {

class CallWatchdog {
 public:
  CallWatchdog();
  ~CallWatchdog();
  CallWatchdog(const CallWatchdog&) = delete;
  CallWatchdog& operator=(const CallWatchdog&) = delete;

  // Cancels `context` after `budget` unless the returned guard is destroyed first. The context
  // must outlive the guard.
  class Guard {
   public:
    Guard(Guard&& other) noexcept : owner_(other.owner_), id_(other.id_) { other.owner_ = nullptr; }
    ~Guard();

   private:
    friend class CallWatchdog;
    Guard(CallWatchdog* owner, uint64_t id) : owner_(owner), id_(id) {}
    CallWatchdog* owner_;
    uint64_t id_;
  };
  [[nodiscard]] Guard Watch(grpc::ServerContext* context, std::chrono::milliseconds budget);

 private:
  using Clock = std::chrono::steady_clock;
  struct Watched {
    Clock::time_point deadline;
    grpc::ServerContext* context;
  };
  void Run();
  void Forget(uint64_t id);

  std::mutex mu_;
  std::condition_variable changed_;
  std::map<uint64_t, Watched> watched_;  // GUARDED_BY(mu_)
  uint64_t next_id_ = 1;                 // GUARDED_BY(mu_)
  bool stopping_ = false;                // GUARDED_BY(mu_)
  std::thread thread_;
};

}  // namespace mandate::grpcutil

#endif  // MANDATE_BROKER_COMMON_GRPCUTIL_CALL_WATCHDOG_H_
