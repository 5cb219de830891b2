// gRPC adapter for mandate.node.v1.NodeApi: attestation, the sync stream and SVID signing for
// node agents. Thin: the decisions live in the attestors, the issuer and the registry.
#ifndef MANDATE_BROKER_SERVER_NODE_SERVICE_H_
#define MANDATE_BROKER_SERVER_NODE_SERVICE_H_

#include <map>
#include <memory>
#include <string>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "attestors/node/node_attestor.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/grpcutil/call_watchdog.h"
#include "broker/common/store/store.h"
#include "broker/server/entry_registry.h"
#include "broker/server/issuer.h"
#include "broker/server/tasks/task_registry.h"
#include "broker/server/token_endpoint.h"
#include "broker/server/trust_authority.h"
#include "mandate/node/v1/node.grpc.pb.h"

namespace mandate::broker {

// Task calls on behalf of a node's workloads: the broker checks the entry is assigned to the
// calling node, and the task belongs to the entry's SPIFFE ID.
struct NodeTaskSupport {
  TaskRegistry* registry = nullptr;
  // Remembers DPoP proofs accepted for task tokens (shared with the HTTP /token endpoint so a
  // proof is accepted once whichever path carries it).
  dpop::ReplayCache* replay_cache = nullptr;
  // `iss` of tokens; the DPoP htu is issuer_url + "/token".
  std::string issuer_url;
  // Proofs with iat before this are refused: the replay cache forgets everything on restart.
  int64_t started_at = 0;
  // Accepted proof iat window (--dpop-proof-max-age / --dpop-proof-max-future).
  int64_t proof_max_age_seconds = 60;
  int64_t proof_max_future_seconds = 5;
  // Non-null (--dpop-nonce): proofs must carry one of its nonces, as at POST /token. Borrowed.
  DpopNonceSource* nonces = nullptr;
};

class NodeService final : public mandate::node::v1::NodeApi::Service {
 public:
  // All references (and the pointers in `tasks`) must outlive the service. `attestors` maps
  // attestor name -> broker half.
  NodeService(const TrustAuthority& authority, store::Store& store, EntryRegistry& entries,
              const Issuer& issuer, const Clock& clock,
              std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> attestors,
              NodeTaskSupport tasks);

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
  // Verifies the workload's DPoP proof with the rules of POST /token (VerifyTokenRequestProof:
  // htm POST, htu <issuer_url>/token, the shared replay cache charged to the entry's SPIFFE ID,
  // the nonce under --dpop-nonce) before anything else about the task, so a refused call never
  // mints. With --dpop-nonce every answer carries the current nonce in the `dpop-nonce` trailing
  // metadata; a proof without it is refused FAILED_PRECONDITION "use_dpop_nonce: ...".
  grpc::Status FetchTaskToken(grpc::ServerContext* context,
                              const mandate::node::v1::NodeFetchTaskTokenRequest* request,
                              mandate::workload::v1::FetchTaskTokenResponse* response) override;

  // Stops open Sync streams promptly (called before server shutdown).
  void Shutdown();

 private:
  struct AuthenticatedNode {
    store::AttestedNode node;
    std::string presented_serial;
    int64_t presented_not_after = 0;
  };
  // Identifies the calling node from its mTLS client certificate and checks it is attested,
  // not banned, and presenting its current SVID (or the one it renewed from, until the new one
  // is first used).
  absl::StatusOr<AuthenticatedNode> AuthenticateNode(grpc::ServerContext* context) const;
  // Re-checks a node during a long-lived stream: PermissionDenied when it was evicted, banned or
  // its certificate superseded or expired; Unavailable when the store cannot tell.
  absl::Status RecheckNode(const AuthenticatedNode& caller) const;
  // AuthenticateNode + the entry `entry_id` assigned to that node.
  absl::StatusOr<store::RegistrationEntry> AuthorizeEntryCall(grpc::ServerContext* context,
                                                              const std::string& entry_id) const;
  void FillTask(const store::Task& task, mandate::workload::v1::Task* out) const;
  absl::Status RecordNode(const attestors::NodeAttestationResult& result, std::string_view attestor,
                          const crypto::Certificate& svid) const;

  const TrustAuthority& authority_;
  store::Store& store_;
  EntryRegistry& entries_;
  const Issuer& issuer_;
  const Clock& clock_;
  const std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> attestors_;
  const NodeTaskSupport tasks_;
  std::atomic<bool> shutting_down_{false};

  // Node certificates whose chain and SPIFFE ID were verified, by their exact PEM, until they
  // expire: parsing and chain-verifying the client certificate on every call cost more than the
  // work most calls do (OpenSSL 3 decodes the key through its provider machinery each time).
  // Attestation state (eviction, bans, the current serial) is still read on every call. The
  // trust roots never change while the broker runs; a CA rotation must clear this cache.
  struct VerifiedPeer {
    std::string spiffe_id;
    std::string serial;
    int64_t not_after = 0;
  };
  static constexpr size_t kMaxVerifiedPeers = 4096;
  mutable absl::Mutex peers_mu_;
  // Transparent, so a call looks its certificate up without copying the PEM.
  struct PemHash {
    using is_transparent = void;
    size_t operator()(std::string_view pem) const { return std::hash<std::string_view>()(pem); }
  };
  mutable std::unordered_map<std::string, VerifiedPeer, PemHash, std::equal_to<>> verified_peers_
      ABSL_GUARDED_BY(peers_mu_);
  // Attestation streams must finish within this budget; silent clients are cut off.
  grpcutil::CallWatchdog attest_watchdog_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_NODE_SERVICE_H_
