// A per-uid budget of bytes the unix attestor may hash, refilled over time (a token bucket per
// effective uid).
//
// Hashing an executable costs CPU in proportion to its size, and a caller decides what it runs:
// touching a large binary between calls (new ctime, so no cache hit) made the agent hash it on
// every call. The budget caps what one uid can make the agent hash: `burst_bytes` at once, then
// `refill_bytes_per_second`. A uid over its budget gets no unix:sha256 selector (the attestor
// omits it with a note), so the limit can only make fewer entries match, never more.
//
// Memory is bounded: at most `max_tracked_uids` buckets are kept; when that many exist, buckets
// that have refilled completely (indistinguishable from a fresh one) are dropped, and if none has,
// the new uid is refused until one does.
//
// Thread-safe: TryConsume may be called concurrently.
#ifndef MANDATE_ATTESTORS_WORKLOAD_UNIX_HASH_BUDGET_H_
#define MANDATE_ATTESTORS_WORKLOAD_UNIX_HASH_BUDGET_H_

#include <cstddef>
#include <cstdint>
#include <functional>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace mandate::unix_attestor {

class HashBudget {
 public:
  // Milliseconds on a monotonic clock; injectable so tests need not sleep.
  using NowMillis = std::function<int64_t()>;

  // `now` may be empty (std::chrono::steady_clock). A zero `burst_bytes` disables the limit.
  HashBudget(uint64_t burst_bytes, uint64_t refill_bytes_per_second, size_t max_tracked_uids,
             NowMillis now = nullptr);
  HashBudget(const HashBudget&) = delete;
  HashBudget& operator=(const HashBudget&) = delete;

  // Takes `bytes` from `uid`'s budget and returns true, or returns false (taking nothing) when
  // the budget holds less than `bytes`.
  bool TryConsume(uint32_t uid, uint64_t bytes) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Bucket {
    uint64_t tokens = 0;
    int64_t updated_ms = 0;
  };
  // Tops `bucket` up for the time elapsed since it was last updated.
  void RefillLocked(Bucket& bucket, int64_t now_ms) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const uint64_t burst_bytes_;
  const uint64_t refill_bytes_per_second_;
  const size_t max_tracked_uids_;
  const NowMillis now_;
  absl::Mutex mu_;
  absl::flat_hash_map<uint32_t, Bucket> buckets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mandate::unix_attestor

#endif  // MANDATE_ATTESTORS_WORKLOAD_UNIX_HASH_BUDGET_H_
