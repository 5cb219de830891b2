// The open-file limit of Mandate's daemons.
#ifndef MANDATE_BROKER_COMMON_UTIL_FILE_LIMIT_H_
#define MANDATE_BROKER_COMMON_UTIL_FILE_LIMIT_H_

#include <sys/resource.h>

#include <cstdint>

namespace mandate {

// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft limit now in force.
// Every connection costs a daemon descriptors (the agent: a socket and a pidfd each), and the
// soft limit most services start with (1024) is far below what the kernel allows them (the hard
// limit, typically 524288 under systemd); the connection caps are derived from the result.
// Call early in main(), before threads open files. Never lowers a limit; an infinite hard limit
// is capped at 1 << 20 (the kernel's usual nr_open).
inline uint64_t RaiseFileLimit() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0) return 1024;
  rlim_t target = limit.rlim_max == RLIM_INFINITY ? rlim_t{1} << 20 : limit.rlim_max;
  if (limit.rlim_cur != RLIM_INFINITY && limit.rlim_cur < target) {
    rlimit raised = limit;
    raised.rlim_cur = target;
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) limit = raised;
  }
  return limit.rlim_cur == RLIM_INFINITY ? uint64_t{1} << 20 : limit.rlim_cur;
}

}  // namespace mandate

#endif  // MANDATE_BROKER_COMMON_UTIL_FILE_LIMIT_H_
