// The broker's OAuth token endpoint, `POST /token` (DESIGN.md §6): RFC 8693 token exchange of a
// workload's JWT-SVID for a DPoP-bound (RFC 9449) task token, scoped to a task the workload
// declared earlier.
//
// The request is form-encoded:
//   grant_type=urn:ietf:params:oauth:grant-type:token-exchange
//   subject_token=<JWT-SVID whose only audience is the broker's issuer URL>
//   subject_token_type=urn:ietf:params:oauth:token-type:jwt
//   task_id=<task of that SPIFFE ID>           (extension parameter)
//   audience=<one of the task's audiences>     (optional when the task has exactly one)
//   scope=<space-separated subset of the task's scopes>  (optional: all of them)
// with exactly one `DPoP` header: a proof for POST <issuer>/token whose key the token is bound to.
//
// Errors are RFC 6749 §5.2 JSON bodies with status 400: invalid_request (malformed request, or a
// subject_token that is not an acceptable JWT-SVID, as RFC 8693 §2.2.2 prescribes),
// unsupported_grant_type, invalid_grant (unknown, ended or expired task, or another identity's),
// invalid_target (audience outside the task), invalid_scope (scope outside the task),
// invalid_dpop_proof and use_dpop_nonce (RFC 9449 §5, §8). A full replay cache, or one whose
// share for the requesting SPIFFE ID is used up, answers 503 temporarily_unavailable (the proof
// is fine; retry later) and a store failure 500 server_error. Nothing is minted on any refusal.
//
// This class is transport-independent (HttpEndpoints adapts cpp-httplib to it) so every rule is
// unit-tested without sockets.
//
// Ownership: borrows everything passed to the constructor; all must outlive it.
// Thread-safety: Handle may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_TOKEN_ENDPOINT_H_
#define MANDATE_BROKER_SERVER_TOKEN_ENDPOINT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/util/clock.h"
#include "broker/server/entry_registry.h"
#include "broker/server/issuer.h"
#include "broker/server/tasks/task_registry.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {

inline constexpr char kTokenExchangeGrantType[] = "urn:ietf:params:oauth:grant-type:token-exchange";
inline constexpr char kJwtTokenType[] = "urn:ietf:params:oauth:token-type:jwt";
inline constexpr char kAccessTokenType[] = "urn:ietf:params:oauth:token-type:access_token";

// The token endpoint URL for an issuer URL: "<issuer>/token" (a trailing slash is dropped).
std::string TokenEndpointUrl(std::string_view issuer_url);

// Parses an application/x-www-form-urlencoded body (WHATWG URL §5.1): '&'-separated name=value
// pairs, '+' is a space, %XX escapes decoded. Empty pairs are skipped. InvalidArgument for a
// malformed escape, a NUL byte, more than `max_pairs` pairs, or a name or value that is not valid
// UTF-8 after decoding. Order and repetitions are kept.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseFormUrlEncoded(
    std::string_view body, size_t max_pairs = 64);

// Server-chosen DPoP nonces (RFC 9449 §8), for --dpop-nonce. A random nonce replaced every
// `rotate_seconds`; proofs carrying the current or the previous one are accepted, so a client
// that fetched a nonce just before a rotation is not bounced. In memory: after a restart clients
// get a use_dpop_nonce error once and retry with the new nonce.
// Thread-safe.
class DpopNonceSource {
 public:
  DpopNonceSource(const Clock& clock, int64_t rotate_seconds);

  // The nonce to hand out now (rotating first when due).
  std::string Current();
  // The nonces a proof may carry now: {current, previous} (previous absent before 1st rotation).
  std::vector<std::string> Accepted();

 private:
  void RotateIfDueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Clock& clock_;
  const int64_t rotate_seconds_;
  absl::Mutex mu_;
  std::string current_ ABSL_GUARDED_BY(mu_);
  std::string previous_ ABSL_GUARDED_BY(mu_);
  int64_t rotated_at_ ABSL_GUARDED_BY(mu_) = 0;
};

// The DPoP rules for a token-request proof (htm POST, htu the token endpoint), shared by
// POST /token and the node API's FetchTaskToken so that both paths enforce the same ones with
// one replay cache and one nonce source (a proof is accepted once, whichever path carries it).
struct TokenProofPolicy {
  std::string token_endpoint_url;  // the htu; TokenEndpointUrl(issuer_url)
  // When this broker started: proofs its previous instance may have accepted are refused
  // (dpop::FirstAcceptableIat).
  int64_t started_at = 0;
  int64_t max_age_seconds = 60;
  int64_t max_future_seconds = 5;
  dpop::ReplayCache* replay_cache = nullptr;  // required; borrowed
  DpopNonceSource* nonces = nullptr;          // set: a current nonce is required (--dpop-nonce)
};

// Verifies a token-request proof made on behalf of `owner`, the authenticated SPIFFE ID asking
// for the token (charged in the replay cache, so one identity cannot use up the others' share).
// Error codes as dpop::VerifyProof: Unauthenticated / AlreadyExists (invalid_dpop_proof),
// FailedPrecondition (use_dpop_nonce: hand out policy.nonces->Current()), ResourceExhausted and
// Unavailable (temporarily_unavailable; for Unavailable, SecondsUntilProofsAccepted says when to
// retry), InvalidArgument (our own URL is unusable).
absl::StatusOr<dpop::VerifiedProof> VerifyTokenRequestProof(const TokenProofPolicy& policy,
                                                            const Clock& clock,
                                                            std::string_view proof,
                                                            std::string_view owner);

// Seconds until proofs are accepted after a restart (0 when they already are).
int64_t SecondsUntilProofsAccepted(const TokenProofPolicy& policy, const Clock& clock);

struct TokenEndpointOptions {
  std::string issuer_url;
  // When the broker started: the replay cache starts empty, so proofs dated up to
  // started_at + proof_max_future_seconds are refused (dpop::FirstAcceptableIat). 0 when the
  // broker knows it has no previous instance (a new data directory).
  int64_t started_at = 0;
  int64_t proof_max_age_seconds = 60;
  int64_t proof_max_future_seconds = 5;
  // Non-null: proofs must carry a nonce from it (--dpop-nonce). Borrowed.
  DpopNonceSource* nonces = nullptr;
};

// A token request as the transport received it.
struct TokenRequest {
  std::string content_type;               // the Content-Type header ("" when absent)
  std::string body;                       // raw form body
  bool has_query = false;                 // the request URL had a query string
  std::vector<std::string> dpop_headers;  // every DPoP header value, in order
};

// What to send back. `body` is JSON; the transport adds Content-Type application/json and
// Cache-Control: no-store (RFC 6749 §5.1) to every answer.
struct TokenResponse {
  int status = 200;
  std::string body;
  std::string dpop_nonce;  // non-empty: send as the DPoP-Nonce header
};

class TokenEndpoint {
 public:
  TokenEndpoint(const TrustAuthority& authority, const EntryRegistry& entries,
                const TaskRegistry& tasks, const Issuer& issuer, dpop::ReplayCache& replay_cache,
                const Clock& clock, TokenEndpointOptions options);

  TokenEndpoint(const TokenEndpoint&) = delete;
  TokenEndpoint& operator=(const TokenEndpoint&) = delete;

  TokenResponse Handle(const TokenRequest& request) const;

  const std::string& url() const { return url_; }

 private:
  struct Refusal;
  struct Subject {
    std::string spiffe_id;
    int64_t token_ttl_seconds = 0;  // 0 = broker default
  };

  // The SPIFFE ID a JWT-SVID presented as subject_token proves, after checking it is one this
  // broker signed for its own issuer URL and that an entry still issues that ID.
  absl::StatusOr<Subject> AuthenticateSubject(std::string_view jwt_svid) const;

  const TrustAuthority& authority_;
  const EntryRegistry& entries_;
  const TaskRegistry& tasks_;
  const Issuer& issuer_;
  dpop::ReplayCache& replay_cache_;
  const Clock& clock_;
  const TokenEndpointOptions options_;
  const std::string url_;
  const TokenProofPolicy proof_policy_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_TOKEN_ENDPOINT_H_
