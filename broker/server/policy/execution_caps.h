// How the rules policy's execution caps map onto the store's counters (Store::
// IncrementCounterBelow): the key of each counter and how long it must be kept. Kept here, not
// in a store implementation, so that every store (SQLite today, PostgreSQL later) and every
// broker sharing one counts the same windows under the same keys.
#ifndef MANDATE_BROKER_SERVER_POLICY_EXECUTION_CAPS_H_
#define MANDATE_BROKER_SERVER_POLICY_EXECUTION_CAPS_H_

#include <cstdint>
#include <string>
#include <string_view>

namespace mandate::broker::policy::caps {

// `max_issuances_per_minute` counts in fixed windows [start, start + 60) of Unix time.
inline constexpr int64_t kWindowSeconds = 60;

// The start of the window holding `now` (floor division, also right before 1970).
inline int64_t WindowStart(int64_t now) {
  int64_t q = now / kWindowSeconds;
  if (now % kWindowSeconds < 0) --q;
  return q * kWindowSeconds;
}

// The counter of issuances allowed by rule `rule` for `spiffe_id` in the window starting at
// `window_start`; it may be pruned once the window is over (expires_at = start + 60). The rule
// is part of the key so that two rules with caps count apart. Rule names have no '/' and the
// window is digits, so the free-form SPIFFE ID, last, cannot make two keys collide.
std::string IssuancesPerMinuteKey(std::string_view rule, std::string_view spiffe_id,
                                  int64_t window_start);

// `max_tokens_per_task` counts task tokens per task, whatever rule allowed them (the cap is a
// property of the task), so renaming a rule or reloading the file does not reset it.
std::string TokensPerTaskKey(std::string_view task_id);

// A task counter is kept this long after the last token it counted. Tasks live at most
// --max-task-ttl (8 hours by default), so a counter outlives the task it counts; the policy
// input does not carry the task's deadline, which would be the exact bound.
inline constexpr int64_t kTaskCounterRetentionSeconds = 7 * 24 * 3600;

}  // namespace mandate::broker::policy::caps

#endif  // MANDATE_BROKER_SERVER_POLICY_EXECUTION_CAPS_H_
