#include "broker/common/spiffe/selector.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "broker/common/spiffe/spiffe_id.h"

namespace mandate::spiffe {
namespace {

constexpr size_t kMaxQuotedBytes = 128;
constexpr size_t kMaxNameBytes = 256;         // user, group names
constexpr size_t kMaxPathBytes = 4096;        // PATH_MAX
constexpr size_t kMaxUnitNameBytes = 255;     // systemd's UNIT_NAME_MAX - 1
constexpr size_t kMaxManufacturerBytes = 64;  // generous for "id:XXXXXXXX" style values
constexpr int kMaxPcrIndex = 23;

std::string Quote(absl::string_view input) {
  if (input.size() > kMaxQuotedBytes) {
    return absl::StrCat("\"", absl::CHexEscape(input.substr(0, kMaxQuotedBytes)), "\"...");
  }
  return absl::StrCat("\"", absl::CHexEscape(input), "\"");
}

// Returns the rule broken by `text` as a uint32 decimal, or "" when it is one.
std::string DecimalUint32Problem(absl::string_view text) {
  if (text.empty()) {
    return "must be a decimal number";
  }
  for (char c : text) {
    if (c < '0' || c > '9') {
      return "must be a decimal number";
    }
  }
  if (text.size() > 1 && text.front() == '0') {
    return "must not have leading zeros";
  }
  uint64_t value = 0;
  for (char c : text) {
    value = value * 10 + static_cast<uint64_t>(c - '0');
    if (value > UINT32_MAX) {
      return "must fit in 32 bits (at most 4294967295)";
    }
  }
  return "";
}

bool IsLowerHex(absl::string_view text, size_t length) {
  return text.size() == length && std::all_of(text.begin(), text.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

std::string NameProblem(absl::string_view name) {
  if (name.empty()) {
    return "must not be empty";
  }
  if (name.size() > kMaxNameBytes) {
    return absl::StrCat("must be at most ", kMaxNameBytes, " bytes");
  }
  for (char c : name) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(c)) || c == ':') {
      return "must be printable ASCII without spaces or ':'";
    }
  }
  return "";
}

// Kernel-reported executable paths are canonical, so only canonical paths can ever match.
std::string PathProblem(absl::string_view path) {
  if (path.empty() || path.front() != '/') {
    return "must be an absolute path (starting with '/')";
  }
  if (path.size() > kMaxPathBytes) {
    return absl::StrCat("must be at most ", kMaxPathBytes, " bytes");
  }
  for (char c : path) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return "must not contain control characters";
    }
  }
  if (path.size() > 1 && path.back() == '/') {
    return "must not end with '/'";
  }
  if (absl::StrContains(path, "//")) {
    return "must not contain '//'";
  }
  for (absl::string_view segment : {absl::string_view("/./"), absl::string_view("/../")}) {
    if (absl::StrContains(path, segment)) {
      return "must not contain '.' or '..' segments";
    }
  }
  if (absl::EndsWith(path, "/.") || absl::EndsWith(path, "/..")) {
    return "must not contain '.' or '..' segments";
  }
  return "";
}

std::string UnitProblem(absl::string_view unit) {
  if (unit.size() > kMaxUnitNameBytes) {
    return absl::StrCat("must be at most ", kMaxUnitNameBytes, " bytes");
  }
  for (char c : unit) {
    bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == ':' || c == '_' ||
              c == '.' || c == '-' || c == '@' || c == '\\';
    if (!ok) {
      return "must contain only [a-zA-Z0-9:_.@\\-]";
    }
  }
  constexpr absl::string_view kSuffix = ".service";
  if (!absl::EndsWith(unit, kSuffix) || unit.size() == kSuffix.size()) {
    return "must name a .service unit (other unit types are never reported)";
  }
  return "";
}

std::string ManufacturerProblem(absl::string_view id) {
  if (id.empty() || id.size() > kMaxManufacturerBytes) {
    return absl::StrCat("must be 1 to ", kMaxManufacturerBytes, " bytes");
  }
  for (char c : id) {
    bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
              c == ':' || c == '-';
    if (!ok) {
      return "must contain only [A-Za-z0-9._:-]";
    }
  }
  return "";
}

// "sha256:<index>:<hex>"
std::string PcrProblem(absl::string_view rest) {
  constexpr absl::string_view kBank = "sha256:";
  if (!absl::StartsWith(rest, kBank)) {
    return "must be sha256:<index 0-23>:<64 lowercase hex>";
  }
  rest.remove_prefix(kBank.size());
  size_t colon = rest.find(':');
  if (colon == absl::string_view::npos) {
    return "must be sha256:<index 0-23>:<64 lowercase hex>";
  }
  absl::string_view index = rest.substr(0, colon);
  std::string problem = DecimalUint32Problem(index);
  if (!problem.empty()) {
    return absl::StrCat("index ", problem);
  }
  int index_value = 0;
  for (char c : index.substr(0, 3)) {
    index_value = index_value * 10 + (c - '0');
  }
  if (index.size() > 2 || index_value > kMaxPcrIndex) {
    return absl::StrCat("index must be between 0 and ", kMaxPcrIndex);
  }
  if (!IsLowerHex(rest.substr(colon + 1), 64)) {
    return "digest must be 64 lowercase hex characters";
  }
  return "";
}

// Returns the rule broken by the `key:rest` value of a known selector type, or "" if valid.
// `key` names the field in messages ("uid must be a decimal number").
std::string UnixProblem(absl::string_view key, absl::string_view rest) {
  if (key == "uid" || key == "gid" || key == "supplementary_gid") {
    std::string problem = DecimalUint32Problem(rest);
    return problem.empty() ? "" : absl::StrCat(key, " ", problem);
  }
  if (key == "user" || key == "group") {
    std::string problem = NameProblem(rest);
    return problem.empty() ? "" : absl::StrCat(key, " name ", problem);
  }
  if (key == "path") {
    std::string problem = PathProblem(rest);
    return problem.empty() ? "" : absl::StrCat("path ", problem);
  }
  if (key == "sha256") {
    return IsLowerHex(rest, 64) ? "" : "sha256 must be 64 lowercase hex characters";
  }
  return absl::StrCat("unknown unix selector key ", Quote(key),
                      "; known keys are uid, gid, user, group, supplementary_gid, path, sha256");
}

std::string SystemdProblem(absl::string_view key, absl::string_view rest) {
  if (key == "unit" || key == "user_unit") {
    std::string problem = UnitProblem(rest);
    return problem.empty() ? "" : absl::StrCat(key, " ", problem);
  }
  return absl::StrCat("unknown systemd selector key ", Quote(key),
                      "; known keys are unit, user_unit");
}

std::string JoinProblem(absl::string_view key, absl::string_view rest) {
  if (key == "name") {
    absl::Status status = ValidatePathSegment(std::string_view(rest.data(), rest.size()));
    return status.ok() ? ""
                       : "name must be a single SPIFFE ID path segment ([a-zA-Z0-9._-], not "
                         "'.' or '..')";
  }
  return absl::StrCat("unknown join selector key ", Quote(key), "; the known key is name");
}

std::string TpmProblem(absl::string_view key, absl::string_view rest) {
  if (key == "ek_hash" || key == "ek_ca") {
    return IsLowerHex(rest, 64) ? "" : absl::StrCat(key, " must be 64 lowercase hex characters");
  }
  if (key == "manufacturer") {
    std::string problem = ManufacturerProblem(rest);
    return problem.empty() ? "" : absl::StrCat("manufacturer ", problem);
  }
  if (key == "pcr") {
    std::string problem = PcrProblem(rest);
    return problem.empty() ? "" : absl::StrCat("pcr ", problem);
  }
  return absl::StrCat("unknown tpm selector key ", Quote(key),
                      "; known keys are ek_hash, ek_ca, manufacturer, pcr");
}

bool IsTypeChar(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; }

}  // namespace

std::string Selector::ToString() const { return absl::StrCat(type, ":", value); }

absl::StatusOr<Selector> Selector::Parse(std::string_view selector_in) {
  absl::string_view selector(selector_in.data(), selector_in.size());
  size_t colon = selector.find(':');
  if (colon == absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("selector ", Quote(selector), ": must have the form type:value"));
  }
  absl::string_view type = selector.substr(0, colon);
  absl::string_view value = selector.substr(colon + 1);
  if (type.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("selector ", Quote(selector), ": type must not be empty"));
  }
  if (!std::all_of(type.begin(), type.end(), IsTypeChar)) {
    return absl::InvalidArgumentError(
        absl::StrCat("selector ", Quote(selector), ": type must contain only [a-z0-9_]"));
  }
  if (value.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("selector ", Quote(selector), ": value must not be empty"));
  }
  return Selector{std::string(type), std::string(value)};
}

absl::Status ValidateSelector(const Selector& selector) {
  std::string text = selector.ToString();
  // Re-parse so that a hand-built Selector gets the same structural checks as a parsed one.
  absl::StatusOr<Selector> parsed = Selector::Parse(text);
  if (!parsed.ok()) {
    return parsed.status();
  }
  if (parsed->type != selector.type) {
    // Only possible when the struct's type contained ':'.
    return absl::InvalidArgumentError(
        absl::StrCat("selector ", Quote(text), ": type must contain only [a-z0-9_]"));
  }
  absl::string_view value = selector.value;
  size_t colon = value.find(':');
  absl::string_view key = value.substr(0, colon);
  absl::string_view rest = colon == absl::string_view::npos ? "" : value.substr(colon + 1);
  if (colon == absl::string_view::npos && (selector.type == "unix" || selector.type == "systemd" ||
                                           selector.type == "join" || selector.type == "tpm")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selector ", Quote(text), ": value must have the form key:value (e.g. unix:uid:1000)"));
  }
  std::string problem;
  if (selector.type == "unix") {
    problem = UnixProblem(key, rest);
  } else if (selector.type == "systemd") {
    problem = SystemdProblem(key, rest);
  } else if (selector.type == "join") {
    problem = JoinProblem(key, rest);
  } else if (selector.type == "tpm") {
    problem = TpmProblem(key, rest);
  } else {
    problem = absl::StrCat("unknown selector type ", Quote(selector.type),
                           "; known types are unix, systemd, join, tpm");
  }
  if (!problem.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("selector ", Quote(text), ": ", problem));
  }
  return absl::OkStatus();
}

SelectorSet::SelectorSet(std::vector<std::string> selectors) : selectors_(std::move(selectors)) {
  std::sort(selectors_.begin(), selectors_.end());
  selectors_.erase(std::unique(selectors_.begin(), selectors_.end()), selectors_.end());
}

SelectorSet::SelectorSet(const std::vector<Selector>& selectors) {
  selectors_.reserve(selectors.size());
  for (const Selector& selector : selectors) {
    selectors_.push_back(selector.ToString());
  }
  std::sort(selectors_.begin(), selectors_.end());
  selectors_.erase(std::unique(selectors_.begin(), selectors_.end()), selectors_.end());
}

bool SelectorSet::ContainsAll(const SelectorSet& required) const {
  if (required.empty()) {
    return false;  // An entry without selectors matches no one (see the class comment).
  }
  return std::includes(selectors_.begin(), selectors_.end(), required.selectors_.begin(),
                       required.selectors_.end());
}

bool SelectorSet::Contains(std::string_view selector) const {
  auto it = std::lower_bound(selectors_.begin(), selectors_.end(), selector);
  return it != selectors_.end() && *it == selector;
}

}  // namespace mandate::spiffe
