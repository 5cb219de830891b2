// Parsers for the /proc files the unix process attestor reads. Pure functions over file contents,
// so they can be tested without a process; every malformed input yields an error status (never an
// exception or a crash), because a fake or hostile /proc tree must not take the agent down.
#ifndef MANDATE_ATTESTORS_WORKLOAD_UNIX_PROC_PARSING_H_
#define MANDATE_ATTESTORS_WORKLOAD_UNIX_PROC_PARSING_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace mandate::unix_attestor {

// Field 22 (starttime, in clock ticks since boot) of /proc/<pid>/stat. Field 2 (comm) is wrapped
// in parentheses and may itself contain spaces and ')', so fields are counted from the LAST ')'.
// Fails with InvalidArgument when the content is malformed.
absl::StatusOr<uint64_t> ParseStatStartTime(std::string_view stat_content);

// The ids /proc/<pid>/status reports.
struct StatusIds {
  uint32_t real_uid = 0;
  uint32_t effective_uid = 0;
  uint32_t real_gid = 0;
  uint32_t effective_gid = 0;
  std::vector<uint32_t> supplementary_gids;  // the "Groups:" line, in kernel order (may be empty)
};

// Parses the "Uid:", "Gid:" and "Groups:" lines of /proc/<pid>/status. Each must appear exactly
// once with decimal uint32 values ("Uid:"/"Gid:" carry real, effective, saved and filesystem ids;
// at least the first two are required). Fails with InvalidArgument when malformed.
absl::StatusOr<StatusIds> ParseStatusIds(std::string_view status_content);

// The systemd units named by a process's cgroup path. Empty strings mean "none".
struct SystemdUnits {
  // A unit of the system manager, e.g. "nginx.service" or "user@1000.service".
  std::string unit;
  // A unit of the per-user manager the process runs under, e.g. "bar.service" for
  // ".../user@1000.service/app.slice/bar.service". Any user can give their own units any name, so
  // this is reported separately from `unit` and must never be mistaken for a system unit.
  std::string user_unit;
};

// Finds the systemd units in /proc/<pid>/cgroup content. Uses the cgroup v2 line ("0::<path>"),
// or, on a pure cgroup v1 host, the "name=systemd" hierarchy. Only ".service" units are reported:
// a unit is the first ".service" component reached from the root through ".slice" components only
// (so cgroups that a container or a delegated service created below a non-slice component cannot
// pose as system units); scopes (sessions, containers, transient runs) are not units an operator
// registers, so a process in a scope yields no unit. Components escaped by systemd with a leading
// '_' are unescaped. Returns empty units when no unit is named; InvalidArgument when malformed.
absl::StatusOr<SystemdUnits> ParseSystemdUnits(std::string_view cgroup_content);

}  // namespace mandate::unix_attestor

#endif  // MANDATE_ATTESTORS_WORKLOAD_UNIX_PROC_PARSING_H_
