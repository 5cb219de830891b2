#include "broker/common/spiffe/spiffe_id.h"

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "broker/common/util/status_macros.h"

namespace mandate::spiffe {
namespace {

// Debian's abseil is built with its own absl::string_view (not an alias of std::string_view), so
// the public std::string_view arguments are converted once at the API boundary.
absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }

constexpr absl::string_view kScheme = "spiffe://";

// Inputs are quoted in messages but never at full length: an ID may be 2 KiB of attacker data.
constexpr size_t kMaxQuotedBytes = 96;

std::string Quote(absl::string_view input) {
  if (input.size() > kMaxQuotedBytes) {
    return absl::StrCat("\"", absl::CHexEscape(input.substr(0, kMaxQuotedBytes)), "\"...");
  }
  return absl::StrCat("\"", absl::CHexEscape(input), "\"");
}

std::string DescribeChar(char c) {
  if (absl::ascii_isgraph(static_cast<unsigned char>(c))) {
    return absl::StrCat("'", std::string(1, c), "'");
  }
  return absl::StrFormat("byte 0x%02x", static_cast<unsigned char>(c));
}

bool IsTrustDomainChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

bool IsPathSegmentChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
         c == '_' || c == '-';
}

// Returns the rule broken by trust domain `name`, or "" when it is valid.
std::string TrustDomainProblem(absl::string_view name) {
  if (name.empty()) {
    return "trust domain is empty";
  }
  if (name.size() > kMaxTrustDomainBytes) {
    return absl::StrCat("trust domain is ", name.size(), " bytes long; the limit is ",
                        kMaxTrustDomainBytes);
  }
  for (char c : name) {
    if (IsTrustDomainChar(c)) {
      continue;
    }
    if (c >= 'A' && c <= 'Z') {
      return "trust domain must be lowercase (characters [a-z0-9._-])";
    }
    switch (c) {
      case ':':
        return "trust domain must not include a port";
      case '@':
        return "trust domain must not include userinfo";
      case '%':
        return "percent-encoding is not allowed";
      case '?':
        return "a query is not allowed";
      case '#':
        return "a fragment is not allowed";
      default:
        return absl::StrCat("trust domain contains ", DescribeChar(c),
                            "; only [a-z0-9._-] are allowed");
    }
  }
  return "";
}

// Returns the rule broken by path segment `segment`, or "" when it is valid.
std::string SegmentProblem(absl::string_view segment) {
  if (segment.empty()) {
    return "path must not contain empty segments";
  }
  if (segment == "." || segment == "..") {
    return absl::StrCat("path segment '", segment, "' is not allowed");
  }
  for (char c : segment) {
    if (IsPathSegmentChar(c)) {
      continue;
    }
    switch (c) {
      case '%':
        return "percent-encoding is not allowed";
      case '?':
        return "a query is not allowed";
      case '#':
        return "a fragment is not allowed";
      default:
        return absl::StrCat("path segment contains ", DescribeChar(c),
                            "; only [a-zA-Z0-9._-] are allowed");
    }
  }
  return "";
}

// Returns the rule broken by `path` (empty, or "/seg/seg..."), or "" when it is valid.
std::string PathProblem(absl::string_view path) {
  if (path.empty()) {
    return "";
  }
  if (path.front() != '/') {
    return "path must start with '/'";
  }
  if (path.back() == '/') {
    return "path must not end with '/'";
  }
  absl::string_view rest = path.substr(1);
  while (true) {
    size_t slash = rest.find('/');
    absl::string_view segment = rest.substr(0, slash);
    std::string problem = SegmentProblem(segment);
    if (!problem.empty()) {
      return problem;
    }
    if (slash == absl::string_view::npos) {
      return "";
    }
    rest = rest.substr(slash + 1);
  }
}

absl::Status InvalidId(absl::string_view id, absl::string_view rule) {
  return absl::InvalidArgumentError(absl::StrCat("invalid SPIFFE ID ", Quote(id), ": ", rule));
}

}  // namespace

absl::StatusOr<TrustDomain> TrustDomain::Parse(std::string_view name_in) {
  absl::string_view name = ToAbsl(name_in);
  if (absl::StartsWithIgnoreCase(name, kScheme)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid trust domain ", Quote(name),
        ": give the bare trust domain name (e.g. \"example.org\"), not a spiffe:// URI"));
  }
  std::string problem = TrustDomainProblem(name);
  if (!problem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid trust domain ", Quote(name), ": ", problem));
  }
  return TrustDomain(std::string(name));
}

std::string TrustDomain::IdString() const { return absl::StrCat(kScheme, name_); }

absl::StatusOr<SpiffeId> SpiffeId::Parse(std::string_view id_in) {
  absl::string_view id = ToAbsl(id_in);
  if (id.empty()) {
    return absl::InvalidArgumentError("invalid SPIFFE ID: it is empty");
  }
  if (id.size() > kMaxSpiffeIdBytes) {
    return InvalidId(
        id, absl::StrCat("it is ", id.size(), " bytes long; the limit is ", kMaxSpiffeIdBytes));
  }
  if (!absl::StartsWith(id, kScheme)) {
    if (absl::StartsWithIgnoreCase(id, kScheme)) {
      return InvalidId(id, "the scheme must be lowercase \"spiffe://\"");
    }
    return InvalidId(id, "it must start with \"spiffe://\"");
  }
  absl::string_view rest = id.substr(kScheme.size());
  size_t slash = rest.find('/');
  absl::string_view td_name = rest.substr(0, slash);
  std::string problem = TrustDomainProblem(td_name);
  if (!problem.empty()) {
    return InvalidId(id, problem);
  }
  absl::string_view path = slash == absl::string_view::npos ? "" : rest.substr(slash);
  problem = PathProblem(path);
  if (!problem.empty()) {
    return InvalidId(id, problem);
  }
  size_t path_offset = kScheme.size() + td_name.size();
  return SpiffeId(TrustDomain(std::string(td_name)), std::string(id), path_offset);
}

absl::StatusOr<SpiffeId> SpiffeId::FromPath(const TrustDomain& trust_domain,
                                            std::string_view path_in) {
  absl::string_view path = ToAbsl(path_in);
  std::string id = absl::StrCat(kScheme, trust_domain.name(), path);
  if (id.size() > kMaxSpiffeIdBytes) {
    return InvalidId(
        id, absl::StrCat("it is ", id.size(), " bytes long; the limit is ", kMaxSpiffeIdBytes));
  }
  std::string problem = PathProblem(path);
  if (!problem.empty()) {
    return InvalidId(id, problem);
  }
  size_t path_offset = kScheme.size() + trust_domain.name().size();
  return SpiffeId(trust_domain, std::move(id), path_offset);
}

absl::Status ValidatePathSegment(std::string_view segment_in) {
  absl::string_view segment = ToAbsl(segment_in);
  std::string problem = SegmentProblem(segment);
  if (!problem.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid SPIFFE ID path segment ", Quote(segment), ": ", problem));
  }
  return absl::OkStatus();
}

bool IsReservedPath(const SpiffeId& id) {
  absl::string_view path = ToAbsl(id.path());
  return path == "/broker" || path == "/node" || absl::StartsWith(path, "/node/");
}

SpiffeId BrokerId(const TrustDomain& trust_domain) {
  // "/broker" always passes the path rules and a valid trust domain is at most 255 bytes, so
  // FromPath cannot fail here and dereferencing its result is safe.
  return *SpiffeId::FromPath(trust_domain, "/broker");
}

absl::StatusOr<SpiffeId> JoinNodeId(const TrustDomain& trust_domain, std::string_view name_in) {
  absl::string_view name = ToAbsl(name_in);
  RETURN_IF_ERROR(ValidatePathSegment(name_in));
  return SpiffeId::FromPath(trust_domain, absl::StrCat("/node/join/", name));
}

}  // namespace mandate::spiffe
