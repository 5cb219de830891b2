// Node attestation: how a node agent proves which machine it runs on (DESIGN.md §3, §9).
//
// Each attestor has two halves with a shared name: the agent half produces evidence and answers
// challenges; the broker half checks the evidence, may issue challenges over the same stream,
// and decides the node's SPIFFE ID and selectors. The broker's node API drives the exchange and
// knows nothing attestor-specific, so adding TPM attestation means adding a pair of classes.
#ifndef MANDATE_ATTESTORS_NODE_NODE_ATTESTOR_H_
#define MANDATE_ATTESTORS_NODE_NODE_ATTESTOR_H_

#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace mandate::attestors {

struct NodeAttestationResult {
  std::string node_spiffe_id;
  std::vector<std::string> selectors;  // "type:value"
};

// What the agent sent to start attestation.
struct NodeAttestationRequest {
  std::string_view payload;
  // DER SubjectPublicKeyInfo of the key the agent's SVID will certify. Attestors that can bind
  // the key to their evidence (the TPM quote covers it) must do so.
  std::string_view csr_spki_der;
};

// Broker half. Thread-safe: Attest may run concurrently for different agents.
class ServerNodeAttestor {
 public:
  // Sends `challenge` to the agent and returns its answer, or an error if the stream broke.
  using ChallengeFn = std::function<absl::StatusOr<std::string>(std::string_view challenge)>;

  virtual ~ServerNodeAttestor() = default;
  virtual std::string_view name() const = 0;
  // Checks `payload` (and any challenge answers). On refusal returns PermissionDenied with the
  // specific reason, which the broker logs; the agent sees the reason too.
  virtual absl::StatusOr<NodeAttestationResult> Attest(const NodeAttestationRequest& request,
                                                       const ChallengeFn& challenge) = 0;
};

// Agent half. Called from one thread at a time.
class AgentNodeAttestor {
 public:
  virtual ~AgentNodeAttestor() = default;
  virtual std::string_view name() const = 0;
  // The first message. `csr_spki_der` is the public key the agent asks the broker to certify.
  virtual absl::StatusOr<std::string> Payload(std::string_view csr_spki_der) = 0;
  virtual absl::StatusOr<std::string> AnswerChallenge(std::string_view challenge) = 0;
  // True when the attestor can attest again at any time without operator help (TPM), so the
  // agent re-attests on restart and to renew instead of keeping its SVID on disk.
  virtual bool CanReattest() const { return false; }
};

}  // namespace mandate::attestors

#endif  // MANDATE_ATTESTORS_NODE_NODE_ATTESTOR_H_
