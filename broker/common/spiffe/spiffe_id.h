// SPIFFE trust domains and SPIFFE IDs, validated exactly as the SPIFFE-ID standard requires.
//
// Both types can only be obtained through their validating factories, so holding a TrustDomain or
// a SpiffeId means holding a well-formed one. They are small immutable values: copyable, movable,
// hashable (absl::Hash and std::hash), ordered by their string form, and safe to share between
// threads once constructed.
//
// The rules enforced (research/spiffe-spire.md, "SVID and ID rules"):
//   - the scheme is exactly "spiffe://" (lowercase);
//   - the trust domain is 1..255 bytes of [a-z0-9._-] (no uppercase, no port, no userinfo);
//   - the path is empty or a sequence of "/segment", each segment 1+ bytes of [a-zA-Z0-9._-],
//     never "." or "..", with no trailing "/";
//   - no percent-encoding, query or fragment anywhere;
//   - the whole ID is at most 2048 bytes.
// Every refusal is an InvalidArgument status whose message names the rule that was broken.
#ifndef MANDATE_BROKER_COMMON_SPIFFE_SPIFFE_ID_H_
#define MANDATE_BROKER_COMMON_SPIFFE_SPIFFE_ID_H_

#include <compare>
#include <cstddef>
#include <functional>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::spiffe {

// Longest SPIFFE ID accepted, in bytes (the limit SPIFFE asks validators to accept).
inline constexpr size_t kMaxSpiffeIdBytes = 2048;
// Longest trust domain name accepted, in bytes.
inline constexpr size_t kMaxTrustDomainBytes = 255;
// The scheme prefix every SPIFFE ID starts with.
inline constexpr std::string_view kSpiffeScheme = "spiffe://";

// A SPIFFE trust domain name such as "example.org".
class TrustDomain {
 public:
  // Parses a bare trust domain name ("example.org"). A full ID ("spiffe://example.org") is
  // refused with a message saying so, so that a configuration mistake is reported rather than
  // guessed at. Fails with InvalidArgument naming the broken rule.
  static absl::StatusOr<TrustDomain> Parse(std::string_view name);

  // The bare name, e.g. "example.org".
  const std::string& name() const { return name_; }
  // The trust domain's own SPIFFE ID string, e.g. "spiffe://example.org".
  std::string IdString() const;

  friend bool operator==(const TrustDomain& a, const TrustDomain& b) { return a.name_ == b.name_; }
  friend std::strong_ordering operator<=>(const TrustDomain& a, const TrustDomain& b) {
    return a.name_ <=> b.name_;
  }
  template <typename H>
  friend H AbslHashValue(H h, const TrustDomain& td) {
    return H::combine(std::move(h), td.name_);
  }
  friend std::ostream& operator<<(std::ostream& os, const TrustDomain& td) {
    return os << td.name_;
  }

 private:
  friend class SpiffeId;
  explicit TrustDomain(std::string name) : name_(std::move(name)) {}
  std::string name_;
};

// A SPIFFE ID: "spiffe://<trust domain><path>", where the path may be empty.
class SpiffeId {
 public:
  // Parses and validates a complete SPIFFE ID string. Fails with InvalidArgument naming the
  // broken rule (e.g. "path segment '..' is not allowed").
  static absl::StatusOr<SpiffeId> Parse(std::string_view id);
  // Builds the ID "spiffe://<td><path>". `path` must be empty or start with "/" and obey the path
  // rules above; fails with InvalidArgument otherwise.
  static absl::StatusOr<SpiffeId> FromPath(const TrustDomain& trust_domain, std::string_view path);

  const TrustDomain& trust_domain() const { return trust_domain_; }
  // The path, e.g. "/agent/research-bot", or "" for a trust domain's own ID. The view points into
  // this object and is valid while it lives.
  std::string_view path() const { return std::string_view(str_).substr(path_offset_); }
  // The whole ID string, e.g. "spiffe://example.org/agent/research-bot".
  const std::string& str() const { return str_; }
  // True when this ID belongs to `trust_domain`.
  bool MemberOf(const TrustDomain& trust_domain) const { return trust_domain_ == trust_domain; }

  friend bool operator==(const SpiffeId& a, const SpiffeId& b) { return a.str_ == b.str_; }
  friend std::strong_ordering operator<=>(const SpiffeId& a, const SpiffeId& b) {
    return a.str_ <=> b.str_;
  }
  template <typename H>
  friend H AbslHashValue(H h, const SpiffeId& id) {
    return H::combine(std::move(h), id.str_);
  }
  friend std::ostream& operator<<(std::ostream& os, const SpiffeId& id) { return os << id.str_; }

 private:
  SpiffeId(TrustDomain trust_domain, std::string str, size_t path_offset)
      : trust_domain_(std::move(trust_domain)), str_(std::move(str)), path_offset_(path_offset) {}

  TrustDomain trust_domain_;
  std::string str_;
  // Index in str_ where the path starts (str_.size() when the path is empty). An offset rather
  // than a string_view so that copies and moves stay valid.
  size_t path_offset_;
};

// Returns OK when `segment` is one valid SPIFFE ID path segment: non-empty, [a-zA-Z0-9._-] only,
// and neither "." nor "..". Otherwise InvalidArgument naming the rule.
absl::Status ValidatePathSegment(std::string_view segment);

// --- Reserved identities (DESIGN.md §10) ---
// The broker's own identity is spiffe://<td>/broker and node agents live under /node/...; these
// paths are never granted to workloads, so `entry create` refuses them.

// True when `id`'s path is "/broker", "/node", or starts with "/node/".
bool IsReservedPath(const SpiffeId& id);
// spiffe://<td>/broker: the identity in the broker's server certificate, which agents pin.
SpiffeId BrokerId(const TrustDomain& trust_domain);
// spiffe://<td>/node/join/<name>: a node attested with a join token. `name` must be a single valid
// path segment (see ValidatePathSegment); fails with InvalidArgument otherwise.
absl::StatusOr<SpiffeId> JoinNodeId(const TrustDomain& trust_domain, std::string_view name);

}  // namespace mandate::spiffe

template <>
struct std::hash<mandate::spiffe::TrustDomain> {
  size_t operator()(const mandate::spiffe::TrustDomain& td) const {
    return std::hash<std::string>()(td.name());
  }
};

template <>
struct std::hash<mandate::spiffe::SpiffeId> {
  size_t operator()(const mandate::spiffe::SpiffeId& id) const {
    return std::hash<std::string>()(id.str());
  }
};

#endif  // MANDATE_BROKER_COMMON_SPIFFE_SPIFFE_ID_H_
