// The broker's rules for tasks agents declare (DESIGN.md §5, §10): what a declaration may hold,
// which scopes it is granted, how long it lives, and who may use or end it.
//
// A task belongs to the SPIFFE ID of the caller that declared it. Its granted scopes are the
// requested ones that the caller's registration entry is entitled to (`--scope`), in the order
// asked for; requested scopes outside the entitlement are dropped silently rather than refusing
// the whole task, because an agent often asks for a superset and the answer (which shows the
// granted scopes) tells it what it got. Only when nothing at all is granted is the declaration
// refused. The policy hook, when it exists, narrows the grant further; revocation will add the
// status "revoked" (store.h): code here treats any status other than "active" as unusable, so
// new statuses need no change to be refused.
//
// A declaration the policy hook sends to a human (`require_approval`) is stored with
// DeclarePendingApproval (the pipeline: Prepare, then CreatePendingApproval): status
// "pending_approval" until an operator decides (ApprovalRegistry,
// approvals/approval_registry.h), then "active" - for its whole declared lifetime, counted from
// the approval - or "denied". GetUsable says which, with messages the transports map: one that
// starts with "authorization_pending" means "ask again later" (/token answers RFC 8628's
// authorization_pending, the Workload API FAILED_PRECONDITION).
//
// Declarations (granted or refused) and endings are audited (audit/audit_log.h); a declaration
// whose record cannot be stored is answered Unavailable.
//
// Ownership: the registry borrows the store, the audit log and the clock, which must outlive it.
// Thread-safety: every method may be called concurrently; the registry keeps no state of its own
// beyond its immutable limits, and each store call is atomic.
#ifndef MANDATE_BROKER_SERVER_TASKS_TASK_REGISTRY_H_
#define MANDATE_BROKER_SERVER_TASKS_TASK_REGISTRY_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/common/registration/entry_rules.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"
#include "broker/server/audit/audit_log.h"

namespace mandate::broker {

class ApprovalRegistry;

// The prefix of GetUsable's answer for a task still awaiting approval.
inline constexpr std::string_view kAuthorizationPending = "authorization_pending";

struct TaskLimits {
  // A request with ttl 0 gets this lifetime (15 minutes), capped like any other by max_ttl.
  int64_t default_ttl_seconds = 900;
  // --max-task-ttl: no task outlives this (8 hours).
  int64_t max_ttl_seconds = 8 * 3600;
  size_t max_scopes = 32;
  size_t max_audiences = 16;
  size_t max_purpose_bytes = 512;
};

// Everything here is agent-controlled and validated by TaskRegistry::Declare.
struct TaskRequest {
  std::string purpose;
  std::vector<std::string> scopes;
  std::vector<std::string> audiences;
  int64_t ttl_seconds = 0;  // 0 = TaskLimits::default_ttl_seconds.
};

// RFC 6749 §3.3 scope-token: the one definition (broker/common/registration) used for entry
// entitlements, task declarations and token requests.
using registration::IsScopeToken;

// Longest accepted scope or audience, in bytes. Scopes are only stored when an entry grants them,
// but the request is checked before the intersection, so this bounds the work done on it.
inline constexpr size_t kMaxTaskScopeBytes = 512;
inline constexpr size_t kMaxTaskAudienceBytes = 512;

// What a token request for `task` may be granted: `audience` must be one of the task's audiences
// (InvalidArgument "audience outside the task"), and `requested_scopes` a subset of the task's
// scopes (InvalidArgument "scope outside the task"; messages name the position, never the bytes).
// An empty request means all of the task's scopes. Returns the scopes to grant, in the task's
// order, without duplicates.
absl::StatusOr<std::vector<std::string>> TokenScopesForTask(
    const store::Task& task, std::string_view audience,
    const std::vector<std::string>& requested_scopes);

class TaskRegistry {
 public:
  // `approvals` (borrowed, may be null: then DeclarePendingApproval is refused) opens the
  // approvals of tasks declared with DeclarePendingApproval.
  TaskRegistry(store::Store& store, AuditLog& audit, const Clock& clock, TaskLimits limits,
               ApprovalRegistry* approvals = nullptr);

  TaskRegistry(const TaskRegistry&) = delete;
  TaskRegistry& operator=(const TaskRegistry&) = delete;

  // Declares and durably stores a task for `spiffe_id` (the authenticated caller), whose
  // registration entry grants `entitled_scopes`. Returns the task as stored: id "task_" + 22
  // base64url characters (128 random bits), status "active", granted scopes = requested ∩
  // entitled in request order (duplicates dropped), audiences in request order (duplicates
  // dropped), created_at = now, expires_at = now + min(ttl or default, max).
  //
  // InvalidArgument, naming the rule broken, when:
  //   - the purpose is empty, longer than max_purpose_bytes, not valid UTF-8, or holds a control
  //     character other than tab (C0, DEL, C1) or a Unicode bidirectional override/isolate -
  //     it is shown to humans approving and auditing the task, who must see what is there;
  //   - there is no scope, more than max_scopes, or one that is not an RFC 6749 scope-token
  //     (1*( %x21 / %x23-5B / %x5D-7E )) or is longer than kMaxTaskScopeBytes;
  //   - there is no audience, more than max_audiences, or one that is empty, longer than
  //     kMaxTaskAudienceBytes, not valid UTF-8 or holds a control character;
  //   - the ttl is negative.
  // Messages name offending elements by position, never echo their bytes.
  // PermissionDenied("none of the requested scopes is granted to <spiffe_id>") when the
  // intersection is empty. Store errors are passed through.
  absl::StatusOr<store::Task> Declare(const std::string& spiffe_id,
                                      const std::vector<std::string>& entitled_scopes,
                                      const TaskRequest& request);

  // Declare's checks and the task it would store (same id, times and grants), without storing
  // or auditing it: for the issuance pipeline, which asks the policy hook in between, then
  // stores it with Create and records it itself.
  absl::StatusOr<store::Task> Prepare(const std::string& spiffe_id,
                                      const std::vector<std::string>& entitled_scopes,
                                      const TaskRequest& request) const;
  // Stores a prepared task durably (store errors passed through).
  absl::Status Create(const store::Task& task);
  // Stores a prepared task (Prepare) that a human must approve first: status "pending_approval"
  // and a new approval (id in the returned task's approval_id) holding `input_document` - the
  // policy input document as JSON text, what the approver is shown - in one transaction; the
  // approval expires after the approval registry's --approval-ttl. Not audited: the caller
  // (the issuance pipeline) records "task_declared" with outcome "pending_approval" and the
  // approval id. The task's lifetime (expires_at - created_at) starts when it is approved.
  // InvalidArgument when `input_document` is not a JSON object; FailedPrecondition("approvals
  // are not enabled on this broker") without an approval registry; store errors passed through.
  absl::StatusOr<store::Task> CreatePendingApproval(const store::Task& prepared,
                                                    std::string input_document);
  // Declare for a declaration a human must approve first: Prepare + CreatePendingApproval,
  // audited as "task_declared" with outcome "pending_approval" and the approval id (refusals as
  // Declare's). Errors as theirs.
  absl::StatusOr<store::Task> DeclarePendingApproval(
      const std::string& spiffe_id, const std::vector<std::string>& entitled_scopes,
      const TaskRequest& request, std::string input_document);

  // The task `task_id` if it belongs to `spiffe_id` and is usable now (status "active" and
  // now < expires_at). NotFound("task not found") both for an unknown id and for another
  // identity's task, so a caller cannot probe for others' tasks. FailedPrecondition("task ended")
  // when ended, ("task expired") when past its deadline; for a task declared under an approval:
  // ("authorization_pending: task awaits approval appr_...") while the approval is open, ("task
  // approval denied: <reason, escaped>") when denied, ("task approval expired") when nobody
  // decided in time; ("task is <status>") for any other status.
  absl::StatusOr<store::Task> GetUsable(const std::string& spiffe_id,
                                        std::string_view task_id) const;

  // Ends the caller's task (an expired but not yet ended task may be ended) and returns it as
  // stored. NotFound as for GetUsable; FailedPrecondition("task ended") when already ended,
  // ("task is <status>") for any other status that is not "active".
  absl::StatusOr<store::Task> End(const std::string& spiffe_id, std::string_view task_id);

 private:
  // Prepare, auditing a refusal for want of granted scopes (as Declare always has).
  absl::StatusOr<store::Task> PrepareAudited(const std::string& spiffe_id,
                                             const std::vector<std::string>& entitled_scopes,
                                             const TaskRequest& request);
  // Why a task that is not "active" cannot be used, from its approval when it has one.
  absl::Status NotUsable(const store::Task& task, int64_t now) const;
  // The task if it exists and belongs to `spiffe_id`; NotFound("task not found") otherwise.
  absl::StatusOr<store::Task> GetOwned(const std::string& spiffe_id,
                                       std::string_view task_id) const;

  store::Store& store_;
  AuditLog& audit_;
  const Clock& clock_;
  const TaskLimits limits_;
  ApprovalRegistry* const approvals_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_TASKS_TASK_REGISTRY_H_
