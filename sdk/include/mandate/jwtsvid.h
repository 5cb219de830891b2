// JWT-SVID validation (go-spiffe's jwtsvid.ParseAndValidate / ParseInsecure), per the SPIFFE
// JWT-SVID standard.
//
// ParseAndValidateJwtSvid accepts a token only when all of these hold:
//   - compact JWS of at most 16 KiB; header `typ` absent, "JWT" or "JOSE" (so RFC 9068 access
//     tokens `at+jwt` and DPoP proofs are refused); `alg` one of RS256/384/512, ES256/384/512,
//     PS256/384/512 that the JOSE module implements (never "none" or HMAC); no `crit`;
//   - `kid` present in the header;
//   - `sub` present and a valid SPIFFE ID; the key is the one with that `kid` (and `use`
//     "jwt-svid" when the key states a use) in the JWT bundle of `sub`'s trust domain;
//   - the signature verifies with that key;
//   - `exp` present and `now - kJwtSvidLeewaySeconds < exp`; `nbf` and `iat`, when present, not
//     more than the leeway in the future;
//   - `aud` present (string or array of strings) and containing EVERY expected audience - the
//     go-spiffe semantics (go-jose's Expected.Audience). Pass one audience, your own, in the
//     usual case. An empty `audiences` list is refused as a programming error (InvalidArgument),
//     so a verifier cannot accept tokens minted for anyone by accident.
//
// Errors: InvalidArgument for malformed tokens or arguments, NotFound when no bundle or key
// matches (message names the trust domain / kid), Unauthenticated for a bad signature, expiry or
// audience mismatch. Never throws.
//
// Thread-safety: pure functions; safe to call concurrently (the bundle source must be too).
#ifndef MANDATE_SDK_INCLUDE_MANDATE_JWTSVID_H_
#define MANDATE_SDK_INCLUDE_MANDATE_JWTSVID_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "mandate/bundle.h"

namespace mandate {

// Clock skew tolerated on `exp`, `nbf` and `iat` (go-spiffe inherits go-jose's 60 s default; the
// SPIFFE standard lets validators apply a small leeway).
inline constexpr int64_t kJwtSvidLeewaySeconds = 60;
// Longest token accepted, in bytes.
inline constexpr size_t kMaxJwtSvidBytes = 16384;

// A JWT-SVID whose signature, expiry and audience were checked. Only ParseAndValidateJwtSvid
// produces one, so holding it means the checks happened.
struct VerifiedJwtSvid {
  std::string spiffe_id;
  std::vector<std::string> audience;
  int64_t expiry = 0;       // `exp`, Unix seconds
  std::string claims_json;  // the whole payload as a JSON object text
};

// The claims of a JWT-SVID read WITHOUT any signature, expiry or audience check. For tools that
// display tokens; never base an access decision on it. A distinct type from VerifiedJwtSvid.
struct UnverifiedJwtSvid {
  std::string spiffe_id;
  std::vector<std::string> audience;
  int64_t expiry = 0;
  std::string claims_json;
};

// See the file comment. `now` is Unix seconds; 0 means the current time.
absl::StatusOr<VerifiedJwtSvid> ParseAndValidateJwtSvid(std::string_view token,
                                                        const JwtBundleSource& bundles,
                                                        const std::vector<std::string>& audiences,
                                                        int64_t now = 0);

// Parses the token's structure (header rules, `sub` a SPIFFE ID, `aud` and `exp` present) and
// returns its claims. NO signature, expiry or audience check.
absl::StatusOr<UnverifiedJwtSvid> ParseInsecureJwtSvid(std::string_view token);

}  // namespace mandate

#endif  // MANDATE_SDK_INCLUDE_MANDATE_JWTSVID_H_
