#include "attestors/workload/unix/proc_parsing.h"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

namespace mandate::unix_attestor {
namespace {

// Debian's abseil has its own absl::string_view (not an alias of std::string_view): the public
// std::string_view arguments are converted once on entry.

// Strict unsigned decimal: digits only, no sign, no whitespace, no overflow.
std::optional<uint64_t> ParseDecimal(absl::string_view text, uint64_t max) {
  if (text.empty() || text.size() > 20) {
    return std::nullopt;
  }
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') {
      return std::nullopt;
    }
    uint64_t digit = static_cast<uint64_t>(c - '0');
    if (value > (max - digit) / 10) {
      return std::nullopt;
    }
    value = value * 10 + digit;
  }
  return value;
}

std::vector<absl::string_view> Fields(absl::string_view text) {
  return absl::StrSplit(text, absl::ByAnyChar(" \t"), absl::SkipEmpty());
}

// Parses the values of an "Uid:"/"Gid:"/"Groups:" line into `out`.
absl::Status ParseIdList(absl::string_view name, absl::string_view rest,
                         std::vector<uint32_t>& out) {
  for (absl::string_view field : Fields(rest)) {
    std::optional<uint64_t> value = ParseDecimal(field, UINT32_MAX);
    if (!value.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("status line \"", name, "\" holds a value that is not a uint32"));
    }
    out.push_back(static_cast<uint32_t>(*value));
  }
  return absl::OkStatus();
}

bool IsServiceName(absl::string_view component) {
  constexpr absl::string_view kSuffix = ".service";
  return component.size() > kSuffix.size() && absl::EndsWith(component, kSuffix);
}

// systemd's cg_unescape(): a component that could clash with a kernel file name is prefixed '_'.
absl::string_view Unescape(absl::string_view component) {
  if (!component.empty() && component.front() == '_') {
    component.remove_prefix(1);
  }
  return component;
}

// Skips ".slice" components from `index`, then returns the unit there if it is a service.
std::string ServiceAfterSlices(const std::vector<absl::string_view>& components, size_t& index) {
  while (index < components.size() && absl::EndsWith(Unescape(components[index]), ".slice")) {
    ++index;
  }
  if (index < components.size() && IsServiceName(Unescape(components[index]))) {
    return std::string(Unescape(components[index]));
  }
  return "";
}

// True for "user@<uid>.service", the system unit that runs a per-user systemd manager.
bool IsUserManagerUnit(absl::string_view unit) {
  if (!absl::ConsumePrefix(&unit, "user@") || !absl::ConsumeSuffix(&unit, ".service")) {
    return false;
  }
  return ParseDecimal(unit, UINT32_MAX).has_value();
}

}  // namespace

absl::StatusOr<uint64_t> ParseStatStartTime(std::string_view stat_content_in) {
  absl::string_view stat_content(stat_content_in.data(), stat_content_in.size());
  size_t close = stat_content.rfind(')');
  if (close == absl::string_view::npos || stat_content.find('(') > close) {
    return absl::InvalidArgumentError("stat content has no parenthesised command name");
  }
  // After ")": field 3 (state) onwards; starttime is field 22, i.e. the 20th of these.
  std::vector<absl::string_view> fields = Fields(stat_content.substr(close + 1));
  constexpr size_t kStartTimeIndex = 22 - 3;
  if (fields.size() <= kStartTimeIndex) {
    return absl::InvalidArgumentError(
        absl::StrCat("stat content has ", fields.size() + 2, " fields; starttime is field 22"));
  }
  absl::string_view start_time = fields[kStartTimeIndex];
  if (!start_time.empty() && start_time.back() == '\n') {
    start_time.remove_suffix(1);
  }
  std::optional<uint64_t> value = ParseDecimal(start_time, UINT64_MAX);
  if (!value.has_value()) {
    return absl::InvalidArgumentError("stat field 22 (starttime) is not a decimal number");
  }
  return *value;
}

absl::StatusOr<StatusIds> ParseStatusIds(std::string_view status_content_in) {
  absl::string_view status_content(status_content_in.data(), status_content_in.size());
  std::optional<std::vector<uint32_t>> uids, gids, groups;
  for (absl::string_view line : absl::StrSplit(status_content, '\n')) {
    std::optional<std::vector<uint32_t>>* target = nullptr;
    absl::string_view name;
    if (absl::StartsWith(line, "Uid:")) {
      target = &uids;
      name = "Uid:";
    } else if (absl::StartsWith(line, "Gid:")) {
      target = &gids;
      name = "Gid:";
    } else if (absl::StartsWith(line, "Groups:")) {
      target = &groups;
      name = "Groups:";
    } else {
      continue;
    }
    if (target->has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("status has more than one \"", name, "\" line"));
    }
    std::vector<uint32_t> values;
    absl::Status status = ParseIdList(name, line.substr(name.size()), values);
    if (!status.ok()) {
      return status;
    }
    *target = std::move(values);
  }
  if (!uids.has_value() || uids->size() < 2) {
    return absl::InvalidArgumentError("status has no \"Uid:\" line with real and effective uid");
  }
  if (!gids.has_value() || gids->size() < 2) {
    return absl::InvalidArgumentError("status has no \"Gid:\" line with real and effective gid");
  }
  StatusIds ids;
  ids.real_uid = (*uids)[0];
  ids.effective_uid = (*uids)[1];
  ids.real_gid = (*gids)[0];
  ids.effective_gid = (*gids)[1];
  // Kernels without supplementary groups support still print "Groups:"; treat absence as none.
  if (groups.has_value()) {
    ids.supplementary_gids = std::move(*groups);
  }
  return ids;
}

absl::StatusOr<SystemdUnits> ParseSystemdUnits(std::string_view cgroup_content_in) {
  absl::string_view cgroup_content(cgroup_content_in.data(), cgroup_content_in.size());
  std::optional<absl::string_view> unified_path, v1_systemd_path;
  for (absl::string_view line : absl::StrSplit(cgroup_content, '\n', absl::SkipEmpty())) {
    // hierarchy-ID:controller-list:cgroup-path (the path itself may contain ':').
    std::vector<absl::string_view> parts = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (parts.size() != 3) {
      return absl::InvalidArgumentError("cgroup line does not have the form id:controllers:path");
    }
    if (parts[0] == "0" && parts[1].empty()) {
      if (unified_path.has_value()) {
        return absl::InvalidArgumentError("cgroup content has more than one cgroup v2 line");
      }
      unified_path = parts[2];
      continue;
    }
    for (absl::string_view controller : absl::StrSplit(parts[1], ',')) {
      if (controller == "name=systemd") {
        v1_systemd_path = parts[2];
      }
    }
  }
  std::optional<absl::string_view> path = unified_path.has_value() ? unified_path : v1_systemd_path;
  SystemdUnits units;
  if (!path.has_value()) {
    return units;
  }
  if (path->empty() || path->front() != '/') {
    return absl::InvalidArgumentError("cgroup path is not absolute");
  }
  std::vector<absl::string_view> components = absl::StrSplit(*path, '/', absl::SkipEmpty());
  size_t index = 0;
  units.unit = ServiceAfterSlices(components, index);
  if (!units.unit.empty() && IsUserManagerUnit(units.unit)) {
    ++index;
    units.user_unit = ServiceAfterSlices(components, index);
  }
  return units;
}

}  // namespace mandate::unix_attestor
