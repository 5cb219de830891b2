// Verification of user tokens from trusted issuers (DESIGN.md §5, §10 "Delegation"): the subject
// tokens of a delegation whose root is a person. The exchange (delegation/) depends on this
// interface alone; TrustedIssuers (trusted_issuers.h) implements it over the issuers an operator
// added with `mandate issuer add`.
#ifndef MANDATE_BROKER_SERVER_DELEGATION_USER_TOKEN_VERIFIER_H_
#define MANDATE_BROKER_SERVER_DELEGATION_USER_TOKEN_VERIFIER_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace mandate::broker::delegation {

// What a verified user token says, as far as delegation needs it.
struct VerifiedUserToken {
  std::string issuer;   // `iss`: one of the trusted issuers
  std::string subject;  // `sub`: non-empty
  // `scope` split on spaces (deduplicated, in token order). A token without `scope` grants
  // nothing: `scopes` is empty then.
  std::vector<std::string> scopes;
  int64_t expires_at = 0;                  // `exp`
  std::optional<std::string> may_act_sub;  // `may_act.sub` when the token names its actor
  std::string token_hash;                  // lowercase hex SHA-256 of the compact token
};

// Thread-safety: Verify may be called concurrently.
class UserTokenVerifier {
 public:
  virtual ~UserTokenVerifier() = default;

  // Verifies `token` strictly: compact JWS; `alg` one of ES256, ES384, RS256, PS256, EdDSA and
  // matching the key; signed by a key of the trusted issuer named by its `iss` (by `kid` when
  // the header has one); `aud` contains `audience` (the broker's issuer URL); `exp` in the
  // future, `nbf` and `iat` not in the future, each within a small skew; `sub` a non-empty
  // string; size and nesting within the JSON caps.
  // InvalidArgument (RFC 8693 invalid_request) for any failure, with a message that says what
  // is wrong and never echoes the token.
  virtual absl::StatusOr<VerifiedUserToken> Verify(std::string_view token,
                                                   std::string_view audience) const = 0;
};

}  // namespace mandate::broker::delegation

#endif  // MANDATE_BROKER_SERVER_DELEGATION_USER_TOKEN_VERIFIER_H_
