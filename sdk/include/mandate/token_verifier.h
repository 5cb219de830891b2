// Task token verification for upstream services (resource servers): the checks an API runs on
// every request that carries a Mandate task token (docs/token-profiles.md).
//
// A task token is an RFC 9068 JWT access token bound to a key by RFC 9449 DPoP, so a request
// carries two things: `Authorization: DPoP <token>` and `DPoP: <proof>`. TokenVerifier::Verify
// accepts the request only when all of these hold, checked in this order:
//   1. exactly one Authorization header, scheme "DPoP" (case-insensitive), one space, a token68;
//   2. the token: at most 16 KiB, compact JWS, header `typ` "at+jwt" (or "application/at+jwt"),
//      `alg` in TokenVerifierOptions::algorithms, `kid` naming a signing key (`use` "sig" or
//      absent) of the issuer's JWKS, a valid signature, `iss` equal to the expected issuer, `aud`
//      containing the expected audience, `exp` (required), `nbf` and `iat` (required) within the
//      clock skew, `sub`, `client_id` and `jti` non-empty strings, `cnf.jkt` present (a token
//      that is not DPoP-bound is refused), `scope` a string when present, `task.id` a non-empty
//      string, and `act` (RFC 8693 delegation) a well-formed chain of at most 16 actors;
//   3. the proof: exactly one DPoP header, a valid RFC 9449 proof signed by the key whose
//      thumbprint is the token's `cnf.jkt`, `htm` and `htu` matching the request, `iat` within
//      [now - proof_max_age_seconds, now + proof_max_future_seconds] and later than
//      creation + proof_max_future_seconds (a proof the previous instance may have accepted is
//      refused, so for that long after creation every proof is), `ath` the hash of this token,
//      and `jti` never seen before (replay cache; each client_id has its own share of it).
//
// Errors carry their OAuth classification (see OAuthErrorCode) so a service answers with the
// right HTTP status and WWW-Authenticate challenge without parsing messages:
//   - Unauthenticated, "invalid_token": the token is refused (including a token sent with the
//     Bearer scheme: task tokens are always DPoP-bound, RFC 9449 §7.2);
//   - Unauthenticated, "invalid_dpop_proof": the proof is missing, malformed, replayed or does not
//     match the request or the token;
//   - InvalidArgument, "invalid_request": a malformed request (several Authorization headers, an
//     Authorization value that is not "DPoP <token68>", a request URL that is not absolute);
//   - Unauthenticated, no code: no credentials at all (no Authorization header, or another
//     scheme such as Basic); RFC 6750 §3.1 says to answer with a bare challenge then;
//   - Unavailable, no code: the issuer's keys could not be fetched and the token's key is not
//     known, so the token is refused (fail closed); answer 503.
//   - Unavailable, "temporarily_unavailable": the proof could not be remembered for replay
//     detection (the replay cache is full, or this client's share of it is used up), so it is
//     refused (fail closed) although nothing is wrong with it; answer 503, the client may retry.
// Messages never contain the token or the proof.
//
// Keys: Create fetches `<issuer>/.well-known/openid-configuration` (RFC 8414 / OIDC discovery),
// whose `issuer` must equal TokenVerifierOptions::issuer exactly, then the JWKS at its
// `jwks_uri`. Nothing is fetched before the first Verify (lazy), so a service may start before
// the broker. The JWKS is fetched again when a token names an unknown `kid` (key rotation) and
// when the keys are older than jwks_max_age_seconds, in both cases at most once per
// jwks_refresh_min_interval_seconds, one fetch at a time (concurrent callers wait for it and use
// its result). When a re-fetch fails the previous keys stay in use for at most
// jwks_max_stale_seconds after their last successful fetch; after that every token is refused
// until a fetch succeeds.
//
// Thread-safety: a TokenVerifier is safe to use from any number of threads at once.
#ifndef MANDATE_SDK_INCLUDE_MANDATE_TOKEN_VERIFIER_H_
#define MANDATE_SDK_INCLUDE_MANDATE_TOKEN_VERIFIER_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate {

struct TokenVerifierOptions {
  // The broker's issuer URL (its --issuer-url), compared exactly with the token's `iss` and the
  // discovery document's `issuer`. Required. Create fetches discovery from
  // issuer + "/.well-known/openid-configuration".
  std::string issuer;
  // This service's audience: the token's `aud` must be or contain it. Required.
  std::string audience;
  // JWS algorithms accepted for the token. Non-empty; "none" and HMAC (HS*) are refused at
  // creation, since a verifier must never accept a token signed with a shared or no key.
  std::vector<std::string> algorithms = {"ES256"};
  // Leeway for the token's `exp`, `nbf` and `iat`, for clocks that disagree a little.
  int64_t clock_skew_seconds = 30;
  // Accepted age of a DPoP proof's `iat`, backwards and forwards (DESIGN.md §10 defaults).
  int64_t proof_max_age_seconds = 60;
  int64_t proof_max_future_seconds = 5;
  // Seconds since the Unix epoch. Empty: the system clock. Tests inject a fixed or fake time.
  std::function<int64_t()> clock;
  // Most proofs remembered for replay detection, each for proof_max_age_seconds, at most
  // 40 bytes each (plus a small counter per client): the default takes at most about 40 MiB.
  // Each client (the token's client_id) may hold replay_cache_entries_per_client of them; a
  // client over its share, or any client while the cache is full, is refused with a
  // "temporarily_unavailable" 503 (fail closed). Size it for the peak request rate times the
  // proof lifetime.
  size_t replay_cache_entries = size_t{1} << 20;
  // 0: replay_cache_entries / 8, so eight clients at full share are needed to fill the cache.
  size_t replay_cache_entries_per_client = 0;
  // An unknown `kid` triggers a JWKS fetch at most this often, so a flood of forged tokens
  // cannot make the service hammer the broker.
  int64_t jwks_refresh_min_interval_seconds = 30;
  // Keys older than this are fetched again on the next Verify, so removed keys stop verifying.
  int64_t jwks_max_age_seconds = 300;
  // How long after the last successful fetch the keys keep being used while re-fetches fail.
  int64_t jwks_max_stale_seconds = 24 * 3600;
  // PEM file of root certificates for an https issuer / jwks_uri. Empty: the system roots.
  std::string ca_file;
  // Plain http is accepted for loopback hosts only (development), unless this is set.
  bool allow_insecure_http = false;
  // Connect and read timeout of each discovery / JWKS request.
  int http_timeout_ms = 2000;
};

// The parts of an HTTP request that Verify needs. Views and copies the caller owns.
struct HttpRequestView {
  // The request method, e.g. "GET" (compared case-sensitively with the proof's `htm`).
  std::string_view method;
  // The absolute URL the client addressed, e.g. "https://api.example.org/v1/items" (compared
  // with the proof's `htu`; query and fragment are ignored). Behind a reverse proxy this is the
  // externally visible URL, not the one the service listens on.
  std::string_view url;
  // Every Authorization header value of the request, in order.
  std::vector<std::string> authorization;
  // Every DPoP header value of the request, in order.
  std::vector<std::string> dpop;
};

// A task token whose token and proof checks all passed. Only TokenVerifier::Verify creates one,
// so holding it means the checks happened.
class VerifiedTaskToken {
 public:
  const std::string& issuer() const { return issuer_; }
  // The agent's SPIFFE ID, or the user's `sub` for a delegated token.
  const std::string& subject() const { return subject_; }
  // The agent's SPIFFE ID.
  const std::string& client_id() const { return client_id_; }
  const std::vector<std::string>& audience() const { return audience_; }
  const std::vector<std::string>& scopes() const { return scopes_; }
  const std::string& task_id() const { return task_id_; }
  const std::string& task_purpose() const { return task_purpose_; }
  const std::string& jti() const { return jti_; }
  // RFC 7638 thumbprint of the key the request was proven with (`cnf.jkt`).
  const std::string& jkt() const { return jkt_; }
  int64_t issued_at() const { return issued_at_; }
  int64_t expires_at() const { return expires_at_; }
  // The `act` chain's `sub` values, outermost (the current actor) first; empty when the token
  // is not delegated.
  const std::vector<std::string>& actor_chain() const { return actor_chain_; }
  // The whole payload as JSON object text, for claims this class has no accessor for.
  const std::string& claims_json() const { return claims_json_; }

  // True when `scope` is one of scopes() (exact, case-sensitive).
  bool HasScope(std::string_view scope) const;

 private:
  friend class TokenVerifier;
  VerifiedTaskToken() = default;

  std::string issuer_;
  std::string subject_;
  std::string client_id_;
  std::vector<std::string> audience_;
  std::vector<std::string> scopes_;
  std::string task_id_;
  std::string task_purpose_;
  std::string jti_;
  std::string jkt_;
  int64_t issued_at_ = 0;
  int64_t expires_at_ = 0;
  std::vector<std::string> actor_chain_;
  std::string claims_json_;
};

class TokenVerifier {
 public:
  // A verifier that fetches the issuer's keys by discovery (see the file comment). Nothing is
  // fetched here. InvalidArgument for unusable options: empty issuer or audience, an issuer that
  // is not an absolute http(s) URL without query or fragment, plain http to a non-loopback host
  // without allow_insecure_http, an empty or refused algorithm list, negative durations.
  static absl::StatusOr<std::unique_ptr<TokenVerifier>> Create(TokenVerifierOptions options);

  // A verifier with a fixed JWKS document (e.g. from `mandate bundle show --format jwks` or a
  // file) that never touches the network; a token with another `kid` is refused. The issuer is
  // only compared with `iss`, so it need not be a URL. InvalidArgument for unusable options or a
  // malformed JWKS.
  static absl::StatusOr<std::unique_ptr<TokenVerifier>> CreateWithJwks(TokenVerifierOptions options,
                                                                       std::string_view jwks_json);

  TokenVerifier(const TokenVerifier&) = delete;
  TokenVerifier& operator=(const TokenVerifier&) = delete;
  ~TokenVerifier();

  // Verifies the task token and DPoP proof of `request` (see the file comment). May block for up
  // to a few http_timeout_ms while keys are fetched. A proof is accepted once: calling Verify
  // twice for the same request refuses the second call as a replay.
  absl::StatusOr<VerifiedTaskToken> Verify(const HttpRequestView& request) const;

  const TokenVerifierOptions& options() const;

 private:
  class Impl;
  explicit TokenVerifier(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The OAuth error code a Verify (or RequireScope) error carries: "invalid_token",
// "invalid_dpop_proof", "invalid_request", "insufficient_scope" or "temporarily_unavailable".
// Empty for OK, for the no-credentials case and when the issuer's keys are unavailable.
std::string OAuthErrorCode(const absl::Status& status);

// OK when `token` carries `scope`; otherwise PermissionDenied classified "insufficient_scope"
// (answer 403 with the challenge below, which then names the scope, RFC 6750 §3.1).
absl::Status RequireScope(const VerifiedTaskToken& token, std::string_view scope);

// The HTTP status to answer a Verify or RequireScope error with: 400 invalid_request, 401 for
// invalid_token, invalid_dpop_proof and missing credentials, 403 insufficient_scope, 503 for
// temporarily_unavailable and when keys are unavailable, 500 otherwise.
int HttpStatusForError(const absl::Status& status);

// The WWW-Authenticate header value for a Verify or RequireScope error (RFC 9449 §7.1, RFC 6750
// §3), e.g. `DPoP error="invalid_token", error_description="token expired", algs="ES256"`.
// Without an OAuth code it is the bare challenge `DPoP algs="ES256"`. The description is the
// status message reduced to the characters RFC 6750 allows and cut to 200 of them.
std::string WwwAuthenticateChallenge(const absl::Status& status,
                                     const std::vector<std::string>& algorithms = {"ES256"});

}  // namespace mandate

#endif  // MANDATE_SDK_INCLUDE_MANDATE_TOKEN_VERIFIER_H_
