// Process-wide runtime settings for Mandate's long-running programs (broker, agent, benchmark).
#ifndef MANDATE_BROKER_COMMON_UTIL_RUNTIME_H_
#define MANDATE_BROKER_COMMON_UTIL_RUNTIME_H_

#include "absl/synchronization/mutex.h"

namespace mandate {

// Call first thing in main(). In optimised builds (NDEBUG) it turns off absl::Mutex deadlock
// detection: Debian's abseil is compiled with it on, which makes every lock and unlock update a
// process-wide lock graph under one global lock. Profiles of the agent and broker under load
// showed that bookkeeping, and cores idling while threads queued on it. Debug builds (the tests)
// keep detection, which is where it catches lock-order mistakes.
inline void SetUpRuntime() {
#ifdef NDEBUG
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
#endif
}

}  // namespace mandate

#endif  // MANDATE_BROKER_COMMON_UTIL_RUNTIME_H_
