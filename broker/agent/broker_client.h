// The node agent's connection to the broker: TLS with the broker pinned by SPIFFE ID
// (spiffe://<td>/broker) rather than by host name, and mTLS with the agent's own X509-SVID once
// it has attested.
//
// Thread-safety: all methods may be called concurrently; SetIdentity swaps the channel
// atomically (calls in flight finish on the old one).
#ifndef MANDATE_BROKER_AGENT_BROKER_CLIENT_H_
#define MANDATE_BROKER_AGENT_BROKER_CLIENT_H_

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attestors/node/node_attestor.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/spiffe_id.h"

namespace grpc {
class Channel;
class ClientContext;
}  // namespace grpc

namespace mandate::node::v1 {
class SyncResponse;
class NodeDeclareTaskRequest;
class NodeGetTaskRequest;
class NodeEndTaskRequest;
class NodeFetchTaskTokenRequest;
}  // namespace mandate::node::v1

namespace mandate::workload::v1 {
class Task;
class FetchTaskTokenResponse;
}  // namespace mandate::workload::v1

namespace mandate::agent {

struct AttestationOutcome {
  std::string spiffe_id;
  std::vector<crypto::Certificate> svid_chain;
  std::vector<crypto::Certificate> bundle;
};

struct SignedSvid {
  std::string entry_id;
  std::string spiffe_id;
  std::vector<crypto::Certificate> chain;
};

struct MintedJwt {
  std::string spiffe_id;
  std::string token;
  int64_t expires_at = 0;
};

// The broker's trailing metadata on FetchTaskToken (empty strings when absent).
struct TaskTokenHints {
  std::string dpop_nonce;   // "dpop-nonce": its current DPoP nonce (--dpop-nonce)
  std::string retry_after;  // "retry-after": seconds until it accepts proofs after a restart
};

class BrokerClient {
 public:
  // `address` is host:port of the broker's agent listener; `trust_bundle_pem` the CA
  // certificates that authenticate the broker.
  BrokerClient(std::string address, std::string trust_bundle_pem, spiffe::TrustDomain td);
  ~BrokerClient();

  // Runs node attestation with `attestor` and asks for an SVID for the key in `csr_der`.
  absl::StatusOr<AttestationOutcome> Attest(attestors::AgentNodeAttestor& attestor,
                                            std::string_view csr_der);

  // Uses `chain` + `key` as the client certificate of every later call.
  absl::Status SetIdentity(const std::vector<crypto::Certificate>& chain,
                           const crypto::PrivateKey& key);
  // Replaces the CA certificates trusted for the broker (after a bundle update).
  void SetTrustBundle(std::string trust_bundle_pem);

  absl::StatusOr<std::vector<crypto::Certificate>> RenewAgentSvid(std::string_view csr_der);
  absl::StatusOr<std::vector<SignedSvid>> SignX509Svids(
      const std::vector<std::pair<std::string, std::string>>& entry_csrs);
  absl::StatusOr<MintedJwt> MintJwtSvid(const std::string& entry_id,
                                        const std::vector<std::string>& audiences);

  // Task calls forwarded for a workload; the broker's status (code and message) is returned
  // unchanged so the workload sees the broker's verdict.
  absl::Status DeclareTask(const mandate::node::v1::NodeDeclareTaskRequest& request,
                           mandate::workload::v1::Task* task);
  absl::Status GetTask(const mandate::node::v1::NodeGetTaskRequest& request,
                       mandate::workload::v1::Task* task);
  absl::Status EndTask(const mandate::node::v1::NodeEndTaskRequest& request,
                       mandate::workload::v1::Task* task);
  // `hints`, when non-null, receives what the broker said in trailing metadata, on refusals as
  // on success, for the agent to pass on to the workload.
  absl::Status FetchTaskToken(const mandate::node::v1::NodeFetchTaskTokenRequest& request,
                              mandate::workload::v1::FetchTaskTokenResponse* response,
                              TaskTokenHints* hints = nullptr);

  // Opens the sync stream and calls `on_snapshot` for every snapshot until the stream ends,
  // `stop` is set, or Cancel() is called. Returns the stream's final status.
  absl::Status RunSync(
      const std::function<void(const mandate::node::v1::SyncResponse&)>& on_snapshot,
      const std::atomic<bool>& stop);
  // Cancels a running RunSync (from another thread).
  void CancelSync();

 private:
  std::shared_ptr<grpc::Channel> Channel();
  std::shared_ptr<grpc::Channel> MakeChannel(const std::string& identity_key_pem,
                                             const std::string& identity_chain_pem);

  const std::string address_;
  const spiffe::TrustDomain trust_domain_;
  std::mutex mu_;
  std::string trust_bundle_pem_;                 // GUARDED_BY(mu_)
  std::string identity_key_pem_;                 // GUARDED_BY(mu_)
  std::string identity_chain_pem_;               // GUARDED_BY(mu_)
  std::shared_ptr<grpc::Channel> channel_;       // GUARDED_BY(mu_)
  grpc::ClientContext* sync_context_ = nullptr;  // GUARDED_BY(mu_)
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_BROKER_CLIENT_H_
