// Join-token node attestation: the operator runs `mandate token generate --spiffe-id
// spiffe://<td>/node/join/<name>`, and the node presents the token once. The broker stores only
// the token's SHA-256, consumes it atomically (single use), and refuses expired tokens.
#ifndef MANDATE_ATTESTORS_NODE_JOIN_TOKEN_JOIN_TOKEN_ATTESTOR_H_
#define MANDATE_ATTESTORS_NODE_JOIN_TOKEN_JOIN_TOKEN_ATTESTOR_H_

#include <string>

#include "attestors/node/node_attestor.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"

namespace mandate::attestors {

inline constexpr std::string_view kJoinTokenAttestorName = "join_token";

// Creates a fresh random token (URL-safe text, 256 bits) and its stored hash.
struct NewJoinToken {
  std::string token;
  std::string token_hash;  // hex sha256(token)
};
absl::StatusOr<NewJoinToken> GenerateJoinToken();
std::string HashJoinToken(std::string_view token);

// Broker half. `store` and `clock` must outlive it. Thread-safe.
class JoinTokenServerAttestor final : public ServerNodeAttestor {
 public:
  JoinTokenServerAttestor(store::Store& store, const Clock& clock, spiffe::TrustDomain td)
      : store_(store), clock_(clock), trust_domain_(std::move(td)) {}
  std::string_view name() const override { return kJoinTokenAttestorName; }
  absl::StatusOr<NodeAttestationResult> Attest(const NodeAttestationRequest& request,
                                               const ChallengeFn& challenge) override;

 private:
  store::Store& store_;
  const Clock& clock_;
  const spiffe::TrustDomain trust_domain_;
};

// Agent half: presents the token.
class JoinTokenAgentAttestor final : public AgentNodeAttestor {
 public:
  explicit JoinTokenAgentAttestor(std::string token) : token_(std::move(token)) {}
  std::string_view name() const override { return kJoinTokenAttestorName; }
  absl::StatusOr<std::string> Payload(std::string_view) override { return token_; }
  absl::StatusOr<std::string> AnswerChallenge(std::string_view) override {
    return absl::FailedPreconditionError("join token attestation has no challenges");
  }

 private:
  std::string token_;
};

}  // namespace mandate::attestors

#endif  // MANDATE_ATTESTORS_NODE_JOIN_TOKEN_JOIN_TOKEN_ATTESTOR_H_
