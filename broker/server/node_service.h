// gRPC adapter for mandate.node.v1.NodeApi: attestation, the sync stream, SVID signing and task
// calls for node agents. Thin: every issuance goes through the issuance pipeline (which
// authenticates the calling node, decides, mints and records); this class only translates.
#ifndef MANDATE_BROKER_SERVER_NODE_SERVICE_H_
#define MANDATE_BROKER_SERVER_NODE_SERVICE_H_

#include <atomic>
#include <map>
#include <string>

#include "attestors/node/node_attestor.h"
#include "broker/common/grpcutil/call_watchdog.h"
#include "broker/server/entry_registry.h"
#include "broker/server/issuance/pipeline.h"
#include "broker/server/node_auth/node_authenticator.h"
#include "broker/server/tasks/task_registry.h"
#include "broker/server/trust_authority.h"
#include "mandate/node/v1/node.grpc.pb.h"

namespace mandate::broker {

class NodeService final : public mandate::node::v1::NodeApi::Service {
 public:
  // All references must outlive the service. `attestors` maps attestor name -> broker half.
  // `tasks` may be null (tasks disabled). `issuer_url` is sent to agents in Sync.
  NodeService(const TrustAuthority& authority, EntryRegistry& entries,
              const NodeAuthenticator& nodes, const issuance::IssuancePipeline& pipeline,
              TaskRegistry* tasks,
              std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> attestors,
              std::string issuer_url);

  grpc::Status Attest(grpc::ServerContext* context,
                      grpc::ServerReaderWriter<mandate::node::v1::AttestResponse,
                                               mandate::node::v1::AttestRequest>* stream) override;
  grpc::Status RenewAgentSvid(grpc::ServerContext* context,
                              const mandate::node::v1::RenewAgentSvidRequest* request,
                              mandate::node::v1::RenewAgentSvidResponse* response) override;
  grpc::Status Sync(grpc::ServerContext* context, const mandate::node::v1::SyncRequest* request,
                    grpc::ServerWriter<mandate::node::v1::SyncResponse>* writer) override;
  grpc::Status SignX509Svids(grpc::ServerContext* context,
                             const mandate::node::v1::SignX509SvidsRequest* request,
                             mandate::node::v1::SignX509SvidsResponse* response) override;
  grpc::Status MintJwtSvid(grpc::ServerContext* context,
                           const mandate::node::v1::MintJwtSvidRequest* request,
                           mandate::node::v1::MintJwtSvidResponse* response) override;

  grpc::Status DeclareTask(grpc::ServerContext* context,
                           const mandate::node::v1::NodeDeclareTaskRequest* request,
                           mandate::workload::v1::Task* response) override;
  grpc::Status GetTask(grpc::ServerContext* context,
                       const mandate::node::v1::NodeGetTaskRequest* request,
                       mandate::workload::v1::Task* response) override;
  grpc::Status EndTask(grpc::ServerContext* context,
                       const mandate::node::v1::NodeEndTaskRequest* request,
                       mandate::workload::v1::Task* response) override;
  // The task-token exchange shared with POST /token (exchange/task_token_exchange.h): the same
  // checks in the same order and the same refusals, as "<oauth error>: <description>". With
  // --dpop-nonce every answer carries the current nonce in the `dpop-nonce` trailing metadata;
  // a proof without it is refused FAILED_PRECONDITION "use_dpop_nonce: ...".
  grpc::Status FetchTaskToken(grpc::ServerContext* context,
                              const mandate::node::v1::NodeFetchTaskTokenRequest* request,
                              mandate::workload::v1::FetchTaskTokenResponse* response) override;

  // Stops open Sync streams promptly (called before server shutdown).
  void Shutdown();

 private:
  // The calling node's client certificate as the TLS layer verified it ("" when none).
  static std::string ClientPem(const grpc::ServerContext* context);
  // The calling node, authenticated, and the entry `entry_id` assigned to it.
  absl::StatusOr<store::RegistrationEntry> AuthorizeEntryCall(grpc::ServerContext* context,
                                                              const std::string& entry_id) const;
  void FillTask(const store::Task& task, mandate::workload::v1::Task* out) const;

  const TrustAuthority& authority_;
  EntryRegistry& entries_;
  const NodeAuthenticator& nodes_;
  const issuance::IssuancePipeline& pipeline_;
  TaskRegistry* const tasks_;
  const std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> attestors_;
  const std::string issuer_url_;
  std::atomic<bool> shutting_down_{false};
  // Attestation streams must finish within this budget; silent clients are cut off.
  grpcutil::CallWatchdog attest_watchdog_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_NODE_SERVICE_H_
