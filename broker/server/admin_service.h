// gRPC adapter for mandate.admin.v1.Admin, served on the broker's 0600 admin socket. Validates
// operator input strictly (refusals name the rule broken) before anything reaches the store.
// Every change (join token, entry create/delete, agent evict/ban) is audited once it is applied;
// when its record cannot be stored the caller gets UNAVAILABLE saying so.
#ifndef MANDATE_BROKER_SERVER_ADMIN_SERVICE_H_
#define MANDATE_BROKER_SERVER_ADMIN_SERVICE_H_

#include <functional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/store/store.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/entry_registry.h"
#include "broker/server/trust_authority.h"
#include "mandate/admin/v1/admin.grpc.pb.h"

namespace mandate::broker {

class ApprovalRegistry;

struct AdminLimits {
  int64_t default_join_token_ttl_seconds = 600;
  int64_t max_join_token_ttl_seconds = 7 * 24 * 3600;
  int64_t max_svid_ttl_seconds = 30 * 24 * 3600;
};

class AdminService final : public mandate::admin::v1::Admin::Service {
 public:
  // All references must outlive the service.
  AdminService(const TrustAuthority& authority, store::Store& store, EntryRegistry& entries,
               AuditLog& audit, const Clock& clock, AdminLimits limits = {})
      : authority_(authority),
        store_(store),
        entries_(entries),
        audit_(audit),
        clock_(clock),
        limits_(limits) {}

  grpc::Status CreateJoinToken(grpc::ServerContext*,
                               const mandate::admin::v1::CreateJoinTokenRequest*,
                               mandate::admin::v1::CreateJoinTokenResponse*) override;
  grpc::Status CreateEntry(grpc::ServerContext*, const mandate::admin::v1::CreateEntryRequest*,
                           mandate::common::v1::Entry*) override;
  grpc::Status ListEntries(grpc::ServerContext*, const mandate::admin::v1::ListEntriesRequest*,
                           mandate::admin::v1::ListEntriesResponse*) override;
  grpc::Status GetEntry(grpc::ServerContext*, const mandate::admin::v1::GetEntryRequest*,
                        mandate::common::v1::Entry*) override;
  grpc::Status DeleteEntry(grpc::ServerContext*, const mandate::admin::v1::DeleteEntryRequest*,
                           mandate::admin::v1::DeleteEntryResponse*) override;
  grpc::Status ListAgents(grpc::ServerContext*, const mandate::admin::v1::ListAgentsRequest*,
                          mandate::admin::v1::ListAgentsResponse*) override;
  grpc::Status EvictAgent(grpc::ServerContext*, const mandate::admin::v1::AgentRequest*,
                          mandate::admin::v1::AgentResponse*) override;
  grpc::Status BanAgent(grpc::ServerContext*, const mandate::admin::v1::AgentRequest*,
                        mandate::admin::v1::AgentResponse*) override;
  grpc::Status GetBundle(grpc::ServerContext*, const mandate::admin::v1::GetBundleRequest*,
                         mandate::admin::v1::GetBundleResponse*) override;
  grpc::Status ListAudit(grpc::ServerContext*, const mandate::admin::v1::ListAuditRequest*,
                         mandate::admin::v1::ListAuditResponse*) override;
  // Recomputes every chain in the store (several brokers may share it) and says which are
  // vouched for: VerifyAuditStore (this broker's chain against its in-memory head, the others
  // against checkpoints signed with the broker's key).
  grpc::Status VerifyAudit(grpc::ServerContext*, const mandate::admin::v1::VerifyAuditRequest*,
                           mandate::admin::v1::VerifyAuditResponse*) override;

  // Approvals: list, show, decide. FAILED_PRECONDITION when approvals are not enabled
  // (EnableApprovals); a decision needs the caller's identity (SetCallerIdentifier).
  grpc::Status ListApprovals(grpc::ServerContext*, const mandate::admin::v1::ListApprovalsRequest*,
                             mandate::admin::v1::ListApprovalsResponse*) override;
  grpc::Status GetApproval(grpc::ServerContext*, const mandate::admin::v1::GetApprovalRequest*,
                           mandate::admin::v1::Approval*) override;
  grpc::Status DecideApproval(grpc::ServerContext*,
                              const mandate::admin::v1::DecideApprovalRequest*,
                              mandate::admin::v1::Approval*) override;
  // Calls the reloader (SetPolicyReloader); FAILED_PRECONDITION("no --policy-file ...") without
  // one. Audited as "policy_reloaded" (outcome "ok" or "error") with the operator.
  grpc::Status ReloadPolicy(grpc::ServerContext*, const mandate::admin::v1::ReloadPolicyRequest*,
                            mandate::admin::v1::ReloadPolicyResponse*) override;

  // Who is calling, as recorded in decisions: e.g. "uid:1000" from the admin socket's peer
  // credentials. Receives the call's context (null in unit tests that call handlers directly).
  using CallerIdentifier = std::function<absl::StatusOr<std::string>(const grpc::ServerContext*)>;

  // Wiring, done by main() before or while serving (each setter is thread-safe; a call arriving
  // before a setter ran sees the feature as absent and is refused, never half-served).
  // `approvals` is borrowed and must outlive the service; null disables approvals.
  void EnableApprovals(ApprovalRegistry* approvals);
  void SetPolicyReloader(std::function<absl::Status()> reload);
  void SetCallerIdentifier(CallerIdentifier identify);

  // Checks an entry from an operator; returns InvalidArgument naming the broken rule.
  absl::Status ValidateEntry(const mandate::common::v1::Entry& entry) const;

 private:
  // Records an applied change; OK, or UNAVAILABLE saying the change stands unaudited.
  grpc::Status Audited(AuditEvent event);
  // The approval registry, or FAILED_PRECONDITION when approvals are not enabled.
  absl::StatusOr<ApprovalRegistry*> Approvals();
  // The caller's identity; UNAUTHENTICATED-style FailedPrecondition when it cannot be told.
  absl::StatusOr<std::string> CallerOf(const grpc::ServerContext* context);
  // The approval with its task, for answers.
  void FillApproval(const store::Approval& approval, mandate::admin::v1::Approval* out);

  const TrustAuthority& authority_;
  store::Store& store_;
  EntryRegistry& entries_;
  AuditLog& audit_;
  const Clock& clock_;
  const AdminLimits limits_;

  absl::Mutex wiring_mu_;
  ApprovalRegistry* approvals_ ABSL_GUARDED_BY(wiring_mu_) = nullptr;
  std::function<absl::Status()> reload_policy_ ABSL_GUARDED_BY(wiring_mu_);
  CallerIdentifier identify_ ABSL_GUARDED_BY(wiring_mu_);
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_ADMIN_SERVICE_H_
