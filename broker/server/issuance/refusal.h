// How the issuance pipeline says no: which step refused, why, and how each transport renders
// it. One value serves both the gRPC node API (status code + message) and POST /token (OAuth
// error code + HTTP status), so the two give the same answer for the same request.
#ifndef MANDATE_BROKER_SERVER_ISSUANCE_REFUSAL_H_
#define MANDATE_BROKER_SERVER_ISSUANCE_REFUSAL_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "absl/status/status.h"

namespace mandate::broker::issuance {

// The pipeline's steps, in order. Refusals name theirs in the audit log ("step").
enum class Step {
  kRequest,       // the request is malformed
  kAuthenticate,  // the caller (or the token it presents) is not who it must be
  kAuthorize,     // the caller may not have this (entry not its own, task not usable, ...)
  kProof,         // the DPoP proof
  kPolicy,        // the policy hook denied, or could not decide
  kMint,          // signing failed
  kRecord,        // the record could not be stored: nothing is returned
};
std::string_view StepName(Step step);

struct Refusal {
  Step step = Step::kRequest;
  // The reason, safe to show the caller and to audit (never raw attacker bytes), with the gRPC
  // code the node API answers. For task tokens the message is "<oauth_error>: <description>".
  absl::Status status;
  // For POST /token (RFC 6749 §5.2, RFC 8693, RFC 9449, RFC 8628 §3.5): the error code, the
  // description, the HTTP status.
  std::string oauth_error;
  std::string description;
  int http_status = 400;
  // > 0: the caller may retry after this many seconds (Retry-After / "retry-after" trailer).
  int64_t retry_after_seconds = 0;
  // The caller needs a fresh DPoP nonce (use_dpop_nonce).
  bool send_nonce = false;
  // The policy hook could not decide (counted and audited apart from a denial).
  bool policy_error = false;
  std::string policy_hook;  // the hook that denied or failed (kPolicy)
  // The caller's SPIFFE ID when the refusing step had established it (for the audit record).
  std::string spiffe_id;
};

// A refusal for a request with an OAuth rendering: status = code + "<error>: <description>".
Refusal OAuthRefusal(Step step, std::string oauth_error, absl::StatusCode code,
                     std::string description, int http_status = 400);
// A refusal from a status (kinds without an OAuth rendering).
Refusal StatusRefusal(Step step, absl::Status status);

// A value or the refusal that stopped it.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}            // NOLINT: implicit, like StatusOr
  Result(Refusal refusal) : v_(std::move(refusal)) {}  // NOLINT
  bool ok() const { return v_.index() == 0; }
  T& value() { return std::get<0>(v_); }
  const T& value() const { return std::get<0>(v_); }
  T& operator*() { return value(); }
  const T& operator*() const { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  const Refusal& refusal() const { return std::get<1>(v_); }
  Refusal& refusal() { return std::get<1>(v_); }

 private:
  std::variant<T, Refusal> v_;
};

}  // namespace mandate::broker::issuance

#endif  // MANDATE_BROKER_SERVER_ISSUANCE_REFUSAL_H_
