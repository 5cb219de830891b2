// The policy hook (DESIGN.md §5): one question asked before every credential the broker mints -
// "may this caller have this credential, with these attributes, now?" - and its answer.
//
// The shape follows Envoy's ext_authz: a hook that could not decide (down, slow past its
// deadline, an unreadable answer) returns an error status, kept apart from a hook that decided
// to deny. The caller (the issuance pipeline) fails closed on both, but counts, logs and audits
// them apart, so an operator can tell "policy said no" from "policy is broken".
//
// The input document is the same for every kind of issuance and every implementation: built-in
// rules read the struct, the webhook receives PolicyInputJson() as OPA's `input`, the gRPC hook
// the same fields in mandate.policy.v1.CheckRequest.
//
// Thread-safety: PolicyHook implementations must allow concurrent Check calls.
#ifndef MANDATE_BROKER_SERVER_POLICY_POLICY_HOOK_H_
#define MANDATE_BROKER_SERVER_POLICY_POLICY_HOOK_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace mandate::broker::policy {

// Every kind of credential (or grant) the broker issues. The names are part of the policy
// contract: rules files, webhooks and gRPC hooks see them as strings.
enum class IssuanceKind {
  kNodeSvid,       // "node_svid": a node agent's own X509-SVID (attestation and renewal)
  kX509Svid,       // "x509_svid": a workload X509-SVID
  kJwtSvid,        // "jwt_svid"
  kTask,           // "task": a task declaration
  kTaskToken,      // "task_token": a DPoP-bound access token for a task
  kTokenExchange,  // "token_exchange": a delegated token (RFC 8693 with a user subject)
};
inline constexpr IssuanceKind kAllIssuanceKinds[] = {
    IssuanceKind::kNodeSvid, IssuanceKind::kX509Svid,  IssuanceKind::kJwtSvid,
    IssuanceKind::kTask,     IssuanceKind::kTaskToken, IssuanceKind::kTokenExchange};

std::string_view IssuanceKindName(IssuanceKind kind);
// The kind named `name`; InvalidArgument listing the valid names otherwise.
absl::StatusOr<IssuanceKind> ParseIssuanceKind(std::string_view name);

// The task a request is made under (for kind "task": the declaration being decided).
struct PolicyTask {
  std::string id;       // empty for a declaration not yet stored
  std::string purpose;  // agent-controlled text: data, never interpreted
  std::vector<std::string> scopes;
  std::vector<std::string> audiences;
};

// What is asked for, by whom, when. Every field is filled as far as the kind has it; absent
// ones are empty.
struct PolicyInput {
  IssuanceKind kind = IssuanceKind::kX509Svid;
  std::string spiffe_id;               // the identity the credential is for
  std::string node_id;                 // the node agent making (or relaying) the request
  std::vector<std::string> selectors;  // "type:value": the entry's (workloads) or node's
  std::vector<std::string> audience;
  std::vector<std::string> scopes;  // requested, after the broker's own narrowing
  int64_t ttl_seconds = 0;          // the lifetime the broker would grant without the hook
  std::optional<PolicyTask> task;
  std::string subject;                   // the user, when delegated (token_exchange)
  std::vector<std::string> actor_chain;  // current actor first (token_exchange)
  int64_t time = 0;                      // Unix seconds; RFC 3339 in the JSON document
};

// The input document: {"kind", "spiffe_id", "node_id", "selectors", "audience", "scopes",
// "ttl", "task" (object, only when there is one), "subject", "actor_chain", "time" (RFC 3339
// UTC)}. Empty strings and arrays are present, not omitted, so rules can test them.
nlohmann::json PolicyInputJson(const PolicyInput& input);

// A hook's answer.
struct PolicyDecision {
  bool allow = false;
  std::string reason;  // why; shown to the caller on a denial and written to the audit log
  // Set: the credential lives at most this long (the broker caps, never extends).
  std::optional<int64_t> ttl_max;
  // Set: the credential carries at most these scopes (the broker intersects with what it would
  // grant; scopes here that were not asked for are ignored, never added).
  std::optional<std::vector<std::string>> scopes;
  // A human must approve first. Honoured for task declarations; for any other kind it denies.
  bool require_approval = false;
};

// Parses an answer object {"allow": bool, "reason"?: string, "ttl_max"?: int > 0,
// "scopes"?: [string], "require_approval"?: bool}: the webhook's `result` and the rules
// engine's output share it. InvalidArgument (the hook is broken: an error, not a denial) for
// anything else, including "allow" missing or not a boolean, or a wrong type for any field.
// Unknown members are ignored (a newer hook may say more).
absl::StatusOr<PolicyDecision> ParsePolicyDecision(const nlohmann::json& answer);

class PolicyHook {
 public:
  virtual ~PolicyHook() = default;

  // A short name for logs, metrics and the audit log ("rules", "grpc", "webhook").
  virtual std::string_view name() const = 0;

  // Decides `input`, returning by `deadline` at the latest. A decision (allow or deny) is an OK
  // status; an error status means the hook could not decide (DeadlineExceeded on timeout,
  // Unavailable when unreachable, InvalidArgument for a malformed answer) and the caller denies.
  virtual absl::StatusOr<PolicyDecision> Check(const PolicyInput& input,
                                               std::chrono::steady_clock::time_point deadline) = 0;
};

}  // namespace mandate::broker::policy

#endif  // MANDATE_BROKER_SERVER_POLICY_POLICY_HOOK_H_
