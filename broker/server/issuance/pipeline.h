// The one issuance pipeline (DESIGN.md §5, §9): every credential the broker mints, of every
// kind, goes through IssuancePipeline::Issue and its steps, in this order:
//
//   authorise -> policy -> narrow -> mint -> record -> respond
//
//   authorise  the caller is who it must be (node mTLS SVID, attestation, JWT-SVID) and may
//              have this (entry assigned to its node, task usable, DPoP proof; the task-token
//              checks are the exchange's, exchange/task_token_exchange.h)
//   policy     the policy hooks (policy/policy_chain.h) see one input document per request
//   narrow     the hook's ttl_max caps the lifetime, its scopes intersect the grant (never widen)
//   mint       one minter per kind signs exactly what is left (issuance/minter.h)
//   record     the audit record (durable, group-committed) and the state the kind changes
//   respond    only a recorded credential is returned
//
// Every refusal at any step is audited here, once, with the kind, the step and the reason, and
// counted in /metrics; a credential whose record could not be stored is not returned
// (Unavailable): nothing leaves the broker without a record. Refusals of callers that proved
// nothing (malformed requests, bad tokens, failed attestations) are audited within a budget
// (kAnonymousAuditPerSecond); past it they are counted (mandate_audit_refusals_unrecorded_total)
// and summarised in the log, so garbage cannot fill the disk or the audit commit queue.
//
// Ownership: borrows everything passed to the constructor; all must outlive the pipeline.
// Thread-safety: Issue may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_ISSUANCE_PIPELINE_H_
#define MANDATE_BROKER_SERVER_ISSUANCE_PIPELINE_H_

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "attestors/node/node_attestor.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/entry_registry.h"
#include "broker/server/exchange/task_token_exchange.h"
#include "broker/server/issuance/minter.h"
#include "broker/server/issuance/refusal.h"
#include "broker/server/metrics/metrics.h"
#include "broker/server/node_auth/node_authenticator.h"
#include "broker/server/policy/policy_chain.h"
#include "broker/server/tasks/task_registry.h"

namespace mandate::broker::issuance {

// ---- Requests: one per kind, as the transports received them ----

// A node agent's own SVID: after attestation (`attestation` holds the attestor's verdict, which
// may be a refusal to audit) or on renewal (`client_pem` is the SVID it calls with).
struct NodeSvidRequest {
  std::string attestor;  // set for attestation; empty for renewal
  absl::StatusOr<attestors::NodeAttestationResult> attestation = absl::UnknownError("unset");
  std::string client_pem;  // renewal: the calling node's client certificate
  std::string csr_der;
  std::string peer;  // the transport's peer address, for logs
};

struct X509SvidItem {
  std::string entry_id;
  std::string csr_der;
};
// Workload X509-SVIDs for entries of the calling node (one audit commit for the batch).
struct X509SvidRequest {
  std::string client_pem;
  std::vector<X509SvidItem> items;
};

struct JwtSvidRequest {
  std::string client_pem;
  std::string entry_id;
  std::vector<std::string> audiences;
};

struct TaskDeclarationRequest {
  std::string client_pem;
  std::string entry_id;
  TaskRequest task;
};

// A task token: the exchange's ask (ask.node_id is filled from client_pem on the node path).
struct TaskTokenRequest {
  std::string client_pem;  // node API; empty at POST /token
  TaskTokenAsk ask;
};

// A delegated token (RFC 8693 token exchange with a user or delegated subject token; DESIGN.md
// §5, §10 "Delegation"). The actor is the caller: on the node API (the Workload API's
// ExchangeToken relayed by the agent) the attested workload of `entry_id` on the calling node;
// at POST /token the JWT-SVID in `actor_token`.
struct TokenExchangeRequest {
  std::string client_pem;        // node API: the calling node's client certificate; empty at /token
  std::string entry_id;          // node API: the actor's registration entry
  std::string actor_token;       // /token: the actor's JWT-SVID (aud = the issuer URL)
  std::string actor_token_type;  // /token: urn:ietf:params:oauth:token-type:jwt
  std::string subject_token;     // a trusted issuer's user token, or a broker delegable token
  std::string subject_token_type;  // ...:access_token, ...:jwt or ...:id_token
  std::string task_id;             // the actor's task (required)
  // Absent: the task's only audience. The broker's issuer URL asks for a delegable token (one a
  // sub-agent may exchange again); any other value mints for that resource (never exchangeable).
  std::optional<std::string> audience;
  std::vector<std::string> scopes;   // empty: all that the intersection leaves
  std::optional<std::string> actor;  // `actor` extension parameter: written as may_act.sub
  std::string dpop_proof;            // the actor's proof; the token is bound to its key
};
using IssuanceRequest =
    std::variant<NodeSvidRequest, X509SvidRequest, JwtSvidRequest, TaskDeclarationRequest,
                 TaskTokenRequest, TokenExchangeRequest>;

policy::IssuanceKind KindOf(const IssuanceRequest& request);

// ---- Results ----

struct IssuedNodeSvid {
  std::string node_id;
  crypto::Certificate certificate;
};

struct IssuedX509Svid {
  std::string entry_id;
  std::string spiffe_id;
  crypto::IssuedCertificate certificate;  // DER, serial, validity
};

struct DeclaredTask {
  store::Task task;  // as stored ("active", or "pending_approval" with approval_id)
};

struct IssuedTaskTokenResult {
  IssuedTaskToken token;
  std::vector<std::string> scopes;  // granted
  bool scopes_requested = false;    // the request named scopes (RFC 6749 §5.1 `scope` rule)
  std::vector<std::string> requested_scopes;
  std::string jkt;
  int64_t expires_in = 0;  // seconds from now
};

// A delegated token (token_exchange).
struct DelegatedToken : IssuedTaskTokenResult {};

// The alternatives are in the order of IssuanceRequest's.
using Issued = std::variant<IssuedNodeSvid, std::vector<IssuedX509Svid>, IssuedJwtSvid,
                            DeclaredTask, IssuedTaskTokenResult, DelegatedToken>;

struct PipelineDeps {
  const Minter* minter = nullptr;
  const NodeAuthenticator* nodes = nullptr;
  EntryRegistry* entries = nullptr;
  TaskRegistry* tasks = nullptr;                // null: tasks are disabled
  const TaskTokenExchange* exchange = nullptr;  // null: task tokens are disabled
  const policy::PolicyChain* policy = nullptr;  // null or empty: no hook
  AuditLog* audit = nullptr;
  store::Store* store = nullptr;
  metrics::BrokerMetrics* metrics = nullptr;  // may be null
  const Clock* clock = nullptr;
};

class IssuancePipeline {
 public:
  explicit IssuancePipeline(PipelineDeps deps);

  // The one entry point. The result holds the alternative of Issued matching the request's.
  Result<Issued> Issue(const IssuanceRequest& request) const;

  // Typed conveniences over Issue.
  Result<IssuedNodeSvid> IssueNodeSvid(const NodeSvidRequest& request) const;
  Result<std::vector<IssuedX509Svid>> IssueX509Svids(const X509SvidRequest& request) const;
  Result<IssuedJwtSvid> IssueJwtSvid(const JwtSvidRequest& request) const;
  Result<DeclaredTask> DeclareTask(const TaskDeclarationRequest& request) const;
  Result<IssuedTaskTokenResult> IssueTaskToken(const TaskTokenRequest& request) const;
  Result<DelegatedToken> IssueDelegatedToken(const TokenExchangeRequest& request) const;

  // The registration entry `entry_id` if it is assigned to node `node_id`; PermissionDenied
  // otherwise (the same answer for an absent entry, so a node cannot probe other nodes'
  // entries). For node API calls that act on an entry without issuing (GetTask, EndTask).
  absl::StatusOr<store::RegistrationEntry> AuthorizeEntry(const std::string& node_id,
                                                          std::string_view entry_id) const;

  const TaskTokenExchange* exchange() const { return deps_.exchange; }

  // Audits and counts a refusal a transport made before the request could be built (a
  // malformed /token request), so that it is recorded like every other: here, once.
  Refusal RefuseRequest(policy::IssuanceKind kind, Refusal refusal) const {
    return Refuse(Subject{.kind = kind}, std::move(refusal));
  }

 private:
  // Who a refusal concerns, for its audit record.
  struct Subject {
    policy::IssuanceKind kind;
    std::string spiffe_id = {};
    std::string node_id = {};
    std::string task_id = {};  // resolved: the task the caller owns
    std::string entry_id = {};
    std::string claimed_task_id = {};  // as the caller sent it (detail only)
  };
  Result<Issued> Run(const NodeSvidRequest& request) const;
  Result<Issued> Run(const X509SvidRequest& request) const;
  Result<Issued> Run(const JwtSvidRequest& request) const;
  Result<Issued> Run(const TaskDeclarationRequest& request) const;
  Result<Issued> Run(const TaskTokenRequest& request) const;
  Result<Issued> Run(const TokenExchangeRequest& request) const;

  // The policy step: the chain's decision, or the refusal it amounts to. `oauth` renders denials
  // as OAuth errors (task tokens).
  // `deadline` (default: now + the chain's timeout) bounds a whole batch's decisions.
  Result<policy::PolicyDecision> Decide(
      const policy::PolicyInput& input, bool oauth,
      std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt) const;
  // One unit of the audit budget for refusals of callers that proved nothing (Refuse).
  bool TakeAnonymousAuditBudget() const;
  // Audits and counts a refusal; returns it for the caller to hand back.
  Refusal Refuse(const Subject& subject, Refusal refusal) const;
  // A refusal for a store or audit failure at the record step.
  Refusal RecordFailed(const Subject& subject, const absl::Status& status) const;
  absl::StatusOr<AuthenticatedNode> AuthenticateCaller(std::string_view client_pem) const;
  void Count(policy::IssuanceKind kind, metrics::IssuanceOutcome outcome, double n = 1) const;

  PipelineDeps deps_;

  // Refusals of callers that proved nothing are audited up to this rate (burst: the bucket).
  static constexpr double kAnonymousAuditPerSecond = 100;
  static constexpr double kAnonymousAuditBurst = 200;
  mutable absl::Mutex anonymous_mu_;
  mutable double anonymous_budget_ ABSL_GUARDED_BY(anonymous_mu_) = kAnonymousAuditBurst;
  mutable std::chrono::steady_clock::time_point anonymous_refilled_at_
      ABSL_GUARDED_BY(anonymous_mu_) = std::chrono::steady_clock::now();
  mutable std::chrono::steady_clock::time_point anonymous_reported_at_
      ABSL_GUARDED_BY(anonymous_mu_);
  mutable int64_t anonymous_unrecorded_ ABSL_GUARDED_BY(anonymous_mu_) = 0;
};

}  // namespace mandate::broker::issuance

#endif  // MANDATE_BROKER_SERVER_ISSUANCE_PIPELINE_H_
