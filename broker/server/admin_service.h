// gRPC adapter for mandate.admin.v1.Admin, served on the broker's 0600 admin socket. Validates
// operator input strictly (refusals name the rule broken) before anything reaches the store.
// Every change (join token, entry create/delete, agent evict/ban) is audited once it is applied;
// when its record cannot be stored the caller gets UNAVAILABLE saying so.
#ifndef MANDATE_BROKER_SERVER_ADMIN_SERVICE_H_
#define MANDATE_BROKER_SERVER_ADMIN_SERVICE_H_

#include "broker/common/store/store.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/entry_registry.h"
#include "broker/server/trust_authority.h"
#include "mandate/admin/v1/admin.grpc.pb.h"

namespace mandate::broker {

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

  // Checks an entry from an operator; returns InvalidArgument naming the broken rule.
  absl::Status ValidateEntry(const mandate::common::v1::Entry& entry) const;

 private:
  // Records an applied change; OK, or UNAVAILABLE saying the change stands unaudited.
  grpc::Status Audited(AuditEvent event);

  const TrustAuthority& authority_;
  store::Store& store_;
  EntryRegistry& entries_;
  AuditLog& audit_;
  const Clock& clock_;
  const AdminLimits limits_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_ADMIN_SERVICE_H_
