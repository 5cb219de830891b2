// Caps on concurrent calls, per caller uid and in all. The agent keeps two: one for the Workload
// API's long-lived watch streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) and one for
// unary calls (FetchJWTSVID, ValidateJWTSVID and the Tasks API, which the agent forwards to the
// broker and may wait on for up to its 15 s deadline). Each such call holds a gRPC handler thread
// for its whole life, so without caps one workload made the agent run thousands of threads, or
// used up the handler thread quota so that gRPC refused every uid; with them, calls past the
// caps are refused with RESOURCE_EXHAUSTED and the threads (and memory) they hold stay bounded,
// with a share kept for every other uid.
//
// Thread-safe: Acquire may be called concurrently; a Slot may be released on any thread.
#ifndef MANDATE_BROKER_AGENT_STREAM_LIMITER_H_
#define MANDATE_BROKER_AGENT_STREAM_LIMITER_H_

#include <cstddef>
#include <cstdint>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace mandate::agent {

class StreamLimiter {
 public:
  StreamLimiter(size_t max_total, size_t max_per_uid)
      : max_total_(max_total), max_per_uid_(max_per_uid) {}
  StreamLimiter(const StreamLimiter&) = delete;
  StreamLimiter& operator=(const StreamLimiter&) = delete;

  // One call in flight; releases its place when destroyed. The limiter must outlive it.
  class Slot {
   public:
    Slot(Slot&& other) noexcept : owner_(other.owner_), uid_(other.uid_) { other.owner_ = nullptr; }
    Slot& operator=(Slot&&) = delete;
    ~Slot() {
      if (owner_ != nullptr) owner_->Release(uid_);
    }

   private:
    friend class StreamLimiter;
    Slot(StreamLimiter* owner, uint32_t uid) : owner_(owner), uid_(uid) {}
    StreamLimiter* owner_;
    uint32_t uid_;
  };

  // A place for one more call of `uid`, or nullopt when `uid` or everyone together is at the
  // cap.
  std::optional<Slot> Acquire(uint32_t uid) ABSL_LOCKS_EXCLUDED(mu_);
  size_t open() const ABSL_LOCKS_EXCLUDED(mu_);
  size_t max_total() const { return max_total_; }
  size_t max_per_uid() const { return max_per_uid_; }

 private:
  void Release(uint32_t uid) ABSL_LOCKS_EXCLUDED(mu_);

  const size_t max_total_;
  const size_t max_per_uid_;
  mutable absl::Mutex mu_;
  size_t open_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_map<uint32_t, size_t> per_uid_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_STREAM_LIMITER_H_
