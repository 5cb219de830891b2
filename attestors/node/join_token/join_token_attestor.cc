#include "attestors/node/join_token/join_token_attestor.h"

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"

namespace mandate::attestors {

absl::StatusOr<NewJoinToken> GenerateJoinToken() {
  ASSIGN_OR_RETURN(std::string random, crypto::RandomBytes(32));
  NewJoinToken out;
  out.token = jose::Base64UrlEncode(random);
  out.token_hash = HashJoinToken(out.token);
  return out;
}

std::string HashJoinToken(std::string_view token) {
  return crypto::HexEncode(crypto::Sha256(token));
}

absl::StatusOr<NodeAttestationResult> JoinTokenServerAttestor::Attest(
    const NodeAttestationRequest& request, const ChallengeFn& /*challenge*/) {
  std::string_view payload = request.payload;
  if (payload.empty() || payload.size() > 256) {
    return absl::PermissionDeniedError("join token missing or malformed");
  }
  auto token = store_.ConsumeJoinToken(HashJoinToken(payload), clock_.NowSeconds());
  if (absl::IsNotFound(token.status())) {
    return absl::PermissionDeniedError("join token unknown or already used");
  }
  if (absl::IsFailedPrecondition(token.status())) {
    return absl::PermissionDeniedError("join token expired");
  }
  if (!token.ok()) return token.status();
  ASSIGN_OR_RETURN(spiffe::SpiffeId id, spiffe::SpiffeId::Parse(token->node_spiffe_id));
  if (!id.MemberOf(trust_domain_)) {
    return absl::PermissionDeniedError("join token was issued for another trust domain");
  }
  constexpr std::string_view kPrefix = "/node/join/";
  std::string_view path = id.path();
  if (!path.starts_with(kPrefix)) {
    return absl::InternalError("join token bound to a non-join node ID");
  }
  NodeAttestationResult result;
  result.node_spiffe_id = id.str();
  result.selectors = {"join:name:" + std::string(path.substr(kPrefix.size()))};
  return result;
}

}  // namespace mandate::attestors
