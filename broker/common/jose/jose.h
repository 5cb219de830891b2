// JOSE for Mandate: compact JWS signing and verification, JWK import/export, RFC 7638
// thumbprints, JWKS documents, base64url and JWT time/audience checks. This is the only JWS code
// in Mandate (DESIGN.md §8): every JWT-SVID, task token, DPoP proof and status list goes through
// it.
//
// Design rules, because every input here may be attacker-controlled:
// - Errors are values (absl::Status / StatusOr); no exception leaves this module and nothing
//   attacker-controlled reaches an assert.
// - Parsing is strict: canonical base64url without padding, JSON objects only, a closed set of
//   asymmetric algorithms ("none" and HMAC are refused), no `crit` / `b64` extensions, size caps.
// - Parsing and verifying are separate steps (ParseCompact, then VerifySignature with a key the
//   caller chose), and the algorithm is bound to the key type so a token cannot pick a weaker
//   interpretation of the verifier's key (no "alg confusion").
//
// Error codes:
// - InvalidArgument: malformed input (bad base64url, bad JSON, wrong member types, bad JWK).
// - Unimplemented: well-formed input this module does not accept (unknown kty or curve, RSA
//   modulus below 2048 bits); JwkSet skips JWKS entries that fail this way.
// - Unauthenticated: every failure of VerifySignature (wrong key type for the alg, wrong signature
//   length, signature mismatch) and expired / not-yet-valid tokens in CheckTimeClaims, so a
//   server can map one code to HTTP 401.
// - Internal: OpenSSL failed on valid input (allocation, etc.).
//
// Thread-safety: all free functions are reentrant; JwsSigner and JwkSet are immutable after
// creation and their const methods may be called concurrently.
#ifndef MANDATE_BROKER_COMMON_JOSE_JOSE_H_
#define MANDATE_BROKER_COMMON_JOSE_JOSE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/common/crypto/keys.h"
#include "nlohmann/json.hpp"

namespace mandate::jose {

// ---------------------------------------------------------------------------- JSON

// Parses untrusted JSON text (RFC 8259) strictly: one value and nothing after it, no comments,
// valid UTF-8, and no object (at any depth) with two members of the same name. RFC 7515 §4 and
// RFC 7519 §4 let a parser either refuse duplicate names or keep the last one; keeping the last
// one lets two parsers of the same token disagree about its claims, so every JOSE header,
// payload and JWK set in Mandate is parsed here and duplicates are refused. InvalidArgument "not
// valid JSON" or "a JSON object has a duplicate member name".
absl::StatusOr<nlohmann::json> ParseStrictJson(std::string_view text);

// ---------------------------------------------------------------------------- base64url

// RFC 4648 §5 base64url without padding (RFC 7515 §2).
std::string Base64UrlEncode(std::string_view bytes);

// Strict inverse of Base64UrlEncode: only `A-Za-z0-9-_`, no padding, no whitespace, length not
// ≡ 1 (mod 4), and the unused low bits of the last character must be zero, so every byte string
// has exactly one accepted encoding (no malleable tokens). InvalidArgument otherwise.
absl::StatusOr<std::string> Base64UrlDecode(std::string_view encoded);

// ---------------------------------------------------------------------------- algorithms

// The JWS algorithms Mandate signs and verifies. Deliberately closed: "none" and HMAC (HS*) are
// not representable, so no code path can accept them.
enum class Algorithm { kES256, kES384, kRS256, kPS256, kEdDSA };

// Maps a JWS "alg" value (case-sensitive) to an Algorithm. "none", HS256/384/512 and anything
// unknown are refused with InvalidArgument naming the value.
absl::StatusOr<Algorithm> AlgorithmFromName(std::string_view name);
// The registered "alg" name ("ES256", ..., "EdDSA").
std::string_view AlgorithmName(Algorithm alg);

// The algorithm Mandate uses for a key: P-256 -> ES256, P-384 -> ES384, RSA -> RS256,
// Ed25519 -> EdDSA. Unimplemented for any other key.
absl::StatusOr<Algorithm> AlgorithmForKey(const crypto::PublicKey& key);
// OK when `key` is the one key type `alg` may be used with (ES256: P-256, ES384: P-384,
// RS256/PS256: RSA, EdDSA: Ed25519); Unauthenticated naming both otherwise.
absl::Status CheckKeyMatchesAlgorithm(const crypto::PublicKey& key, Algorithm alg);

// ---------------------------------------------------------------------------- JWK

// Imports a public JWK (RFC 7517/7518/8037):
// - EC: crv P-256 or P-384, x and y of exactly the coordinate length; the point must be on the
//   curve (checked by OpenSSL on import).
// - RSA: n and e in minimal big-endian form (no leading zero octet); n of 2048..8192 bits and
//   odd; e odd, >= 3, at most 64 bits.
// - OKP: crv Ed25519, x of 32 bytes.
// A JWK carrying any private member (d, p, q, dp, dq, qi, oth, k) is refused, so a DPoP proof
// cannot smuggle a private key. Other members (alg, use, kid, ...) are ignored here.
absl::StatusOr<crypto::PublicKey> PublicKeyFromJwk(const nlohmann::json& jwk);

// Exports the required public members only (EC: kty crv x y; RSA: kty n e; OKP: kty crv x).
// Callers add kid/use/alg themselves. Unimplemented for unsupported key types.
absl::StatusOr<nlohmann::json> PublicKeyToJwk(const crypto::PublicKey& key);

// RFC 7638 JWK thumbprint: the required members (EC: crv kty x y; RSA: e kty n; OKP: crv kty x)
// serialised in lexicographic order without whitespace, SHA-256, base64url. The members must be
// present and strings; the key itself is not validated (import it first when it matters).
absl::StatusOr<std::string> JwkThumbprint(const nlohmann::json& jwk);
absl::StatusOr<std::string> JwkThumbprint(const crypto::PublicKey& key);

// ---------------------------------------------------------------------------- signing

// Signs `base64url(header_json) . base64url(payload_json)` and returns the compact JWS. The
// strings are used byte for byte (the fast path for callers that serialise themselves): they
// must be JSON objects whose header carries "alg" equal to `alg`; this is not re-checked.
// InvalidArgument when `key` is not the key type `alg` requires.
absl::StatusOr<std::string> SignCompact(const crypto::PrivateKey& key, Algorithm alg,
                                        std::string_view header_json,
                                        std::string_view payload_json);

// A private key with its JWS algorithm (derived from the key) and key id.
// Immutable; Sign may be called concurrently from any number of threads.
class JwsSigner {
 public:
  // Takes ownership of `key`. `kid` may be empty (then no kid is added to headers).
  // Unimplemented when the key type has no JWS algorithm here.
  static absl::StatusOr<JwsSigner> Create(crypto::PrivateKey key, std::string kid);

  JwsSigner(JwsSigner&&) noexcept = default;
  JwsSigner& operator=(JwsSigner&&) noexcept = default;

  // Returns the compact JWS of `payload` under `protected_header` plus "alg" (and "kid" when
  // this signer has one and the header has none). Both must be JSON objects. Refused with
  // InvalidArgument: a header whose "alg" differs from the key's, a header with "crit" or "b64"
  // (ParseCompact would refuse the token), and strings that are not valid UTF-8.
  absl::StatusOr<std::string> Sign(const nlohmann::json& protected_header,
                                   const nlohmann::json& payload) const;

  Algorithm algorithm() const { return alg_; }
  const std::string& kid() const { return kid_; }
  crypto::PublicKey public_key() const { return key_.public_key(); }
  const crypto::PrivateKey& private_key() const { return key_; }

 private:
  JwsSigner(crypto::PrivateKey key, std::string kid, Algorithm alg)
      : key_(std::move(key)), kid_(std::move(kid)), alg_(alg) {}

  crypto::PrivateKey key_;
  std::string kid_;
  Algorithm alg_;
};

// ---------------------------------------------------------------------------- parsing

// A syntactically valid compact JWS whose signature has NOT been checked yet. Nothing in it
// may be trusted before VerifySignature succeeds with a key the caller chose.
struct ParsedJws {
  nlohmann::json header;              // a JSON object with a supported "alg"
  nlohmann::json payload;             // a JSON object
  std::string signing_input;          // "<header b64>.<payload b64>", exactly as received
  std::string signature;              // decoded signature bytes (non-empty)
  Algorithm alg = Algorithm::kES256;  // from the header "alg"
};

inline constexpr size_t kDefaultMaxJwsLength = 16384;

// Parses a compact JWS: at most `max_len` bytes, exactly three dot-separated parts of strict
// base64url, header and payload JSON objects (strict JSON, no comments), header "alg" a string
// naming a supported algorithm, no "crit" (we implement no extensions, so RFC 7515 §4.1.11
// requires refusing it) and no "b64" (RFC 7797 unencoded payloads). Does NOT verify the
// signature. InvalidArgument on any failure.
absl::StatusOr<ParsedJws> ParseCompact(std::string_view token,
                                       size_t max_len = kDefaultMaxJwsLength);

// Verifies `jws.signature` over `jws.signing_input` with `key`. The key type must be the one
// jws.alg requires (CheckKeyMatchesAlgorithm); ECDSA signatures must be raw r||s of exactly
// 64 (ES256) or 96 (ES384) bytes (RFC 7518 §3.4), so DER signatures are refused; RSA
// signatures must be as long as the modulus; PS256 uses MGF1-SHA-256 and a 32-byte salt.
// Note: like OpenSSL, this accepts "high-s" ECDSA signatures, so (r, s) and (r, n-s) both
// verify: a signature is not a unique token identifier (use "jti").
// Every failure is Unauthenticated ("JWS signature verification failed" for a mismatch).
absl::Status VerifySignature(const ParsedJws& jws, const crypto::PublicKey& key);

// ---------------------------------------------------------------------------- JWKS

struct JwkSetKey {
  std::string kid;  // "" when the JWK has none
  std::string use;  // "" when the JWK has none
  std::string alg;  // "" when the JWK has none; not checked against the key type here
  crypto::PublicKey key;
  std::vector<std::string> x5c;  // standard base64 DER certificates, as published (unverified)
};

// A parsed JWKS document ({"keys": [...]}, RFC 7517 §5). Immutable after creation.
class JwkSet {
 public:
  // Fails (InvalidArgument) on a malformed document: not JSON, not an object, "keys" missing or
  // not an array, an entry that is not an object, kid/use/alg/x5c of the wrong type, a private
  // member, or a malformed key of a supported type. Entries whose key type, curve or size is
  // unsupported (PublicKeyFromJwk -> Unimplemented) are skipped and counted in skipped().
  static absl::StatusOr<JwkSet> Parse(std::string_view json);
  static absl::StatusOr<JwkSet> FromJson(const nlohmann::json& doc);

  // The first key whose kid equals `kid` and, when `use` is non-empty, whose "use" equals `use`
  // or is absent (RFC 7517 §4.2: a key without "use" is not restricted). nullptr when none.
  // The pointer is valid as long as this JwkSet lives.
  const JwkSetKey* FindByKid(std::string_view kid, std::string_view use = "") const;

  const std::vector<JwkSetKey>& keys() const { return keys_; }
  std::vector<JwkSetKey>::const_iterator begin() const { return keys_.begin(); }
  std::vector<JwkSetKey>::const_iterator end() const { return keys_.end(); }
  size_t size() const { return keys_.size(); }
  bool empty() const { return keys_.empty(); }
  // How many entries were skipped as unsupported.
  size_t skipped() const { return skipped_; }

 private:
  JwkSet() = default;
  std::vector<JwkSetKey> keys_;
  size_t skipped_ = 0;
};

// ---------------------------------------------------------------------------- JWT claims

// Checks the RFC 7519 time claims of `payload` against `now` (seconds since the epoch) with
// `leeway` seconds of clock skew allowed in each direction. No clock of its own: callers pass
// Clock::Now so tests control time.
// - exp, nbf, iat must be finite numbers when present (InvalidArgument otherwise);
// - exp is required when `require_exp` (InvalidArgument "token has no exp claim");
// - Unauthenticated "token expired" when now >= exp + leeway, "token not yet valid" when
//   nbf > now + leeway, "token issued in the future" when iat > now + leeway.
// InvalidArgument when `payload` is not an object or `leeway` is negative.
absl::Status CheckTimeClaims(const nlohmann::json& payload, int64_t now, int64_t leeway,
                             bool require_exp);

// True when the "aud" claim is the string `aud` or an array of strings containing it. A
// missing or malformed "aud" (wrong type, non-string array element) yields false.
bool AudienceContains(const nlohmann::json& payload, std::string_view aud);

}  // namespace mandate::jose

#endif  // MANDATE_BROKER_COMMON_JOSE_JOSE_H_
