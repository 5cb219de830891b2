// The task-token exchange (DESIGN.md §4, §6): the checks that make a request for a task token
// grantable, shared by POST /token and the node API's FetchTaskToken so that both run the same
// checks in the same order, with the same TTL rule and the same refusals.
//
// Order (cheap and caller-specific first; the proof last, so a proof is only spent on a request
// that is otherwise grantable):
//   1. request shape     task_id present, scopes well-formed              -> invalid_request/_scope
//   2. the caller        /token: the JWT-SVID presented as subject_token   -> invalid_request
//                        node API: the entry is assigned to calling node   -> invalid_grant
//   3. the task          the caller's, active, not expired, approved      -> invalid_grant /
//                                                                            authorization_pending
//   4. audience, scopes  within the task                                   -> invalid_target/_scope
//   5. the DPoP proof    htm POST, htu <issuer>/token, fresh, not replayed,
//                        the nonce under --dpop-nonce                      -> invalid_dpop_proof /
//                                                                            use_dpop_nonce / 503
// The policy hook, narrowing, minting and the record follow in the issuance pipeline.
//
// At POST /token the identity must also still run on an attested node that is not banned (the
// node API checks the calling node on every call).
//
// TTL rule (both paths): the smallest --token-ttl set on any entry issuing the SPIFFE ID (the
// broker's default when none sets one), then capped by the policy and by the task's deadline.
//
// Ownership: borrows everything given to the constructor. Thread-safety: Authorize may be
// called concurrently.
#ifndef MANDATE_BROKER_SERVER_EXCHANGE_TASK_TOKEN_EXCHANGE_H_
#define MANDATE_BROKER_SERVER_EXCHANGE_TASK_TOKEN_EXCHANGE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/util/clock.h"
#include "broker/server/entry_registry.h"
#include "broker/server/issuance/refusal.h"
#include "broker/server/tasks/task_registry.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {

inline constexpr char kTokenExchangeGrantType[] = "urn:ietf:params:oauth:grant-type:token-exchange";
inline constexpr char kJwtTokenType[] = "urn:ietf:params:oauth:token-type:jwt";
inline constexpr char kAccessTokenType[] = "urn:ietf:params:oauth:token-type:access_token";

// The token endpoint URL for an issuer URL: "<issuer>/token" (a trailing slash is dropped).
std::string TokenEndpointUrl(std::string_view issuer_url);

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

// The DPoP rules for a token-request proof (htm POST, htu the token endpoint).
struct TokenProofPolicy {
  std::string token_endpoint_url = {};  // the htu; TokenEndpointUrl(issuer_url)
  // When this broker started: proofs its previous instance may have accepted are refused
  // (dpop::FirstAcceptableIat). 0 when the broker knows it has no previous instance.
  int64_t started_at = 0;
  int64_t max_age_seconds = 60;
  int64_t max_future_seconds = 5;
  dpop::ReplayCache* replay_cache = nullptr;  // required; borrowed
  DpopNonceSource* nonces = nullptr;          // set: a current nonce is required (--dpop-nonce)
};

// Verifies a token-request proof made on behalf of `owner`, the authenticated SPIFFE ID asking
// for the token (charged in the replay cache, so one identity cannot use up the others' share).
// Error codes as dpop::VerifyProof.
absl::StatusOr<dpop::VerifiedProof> VerifyTokenRequestProof(const TokenProofPolicy& policy,
                                                            const Clock& clock,
                                                            std::string_view proof,
                                                            std::string_view owner);

// Seconds until proofs are accepted after a restart (0 when they already are).
int64_t SecondsUntilProofsAccepted(const TokenProofPolicy& policy, const Clock& clock);

// A task-token request as either transport received it. Exactly one caller form is set.
struct TaskTokenAsk {
  // Node API: the calling node (authenticated by its mTLS SVID) and the entry it asks for.
  std::string node_id;
  std::string entry_id;
  // POST /token: the JWT-SVID presented as subject_token.
  std::string subject_token;

  std::string task_id;
  std::optional<std::string> audience;  // absent: the task's only audience
  std::vector<std::string> scopes;      // empty: all of the task's
  std::string dpop_proof;
};

// A request that passed every check of the exchange.
struct AuthorizedTaskToken {
  std::string spiffe_id;
  // The policy context. Node API: the calling node and its entry's selectors. POST /token (a
  // JWT-SVID names no node): the selectors every entry issuing the SPIFFE ID has, and their
  // parent node when they all share one (empty otherwise). For an identity registered once, the
  // same on both paths.
  std::string node_id;
  std::vector<std::string> selectors;
  store::Task task;
  std::string audience;
  std::vector<std::string> scopes;  // the task's, narrowed to the request (task order)
  bool scopes_requested = false;    // the request named scopes
  std::string jkt;
  int64_t ttl_seconds = 0;  // the TTL rule above, before policy and the task's deadline
};

struct ExchangeOptions {
  std::string issuer_url;
  int64_t default_token_ttl_seconds = 300;
  TokenProofPolicy proof;  // token_endpoint_url is derived from issuer_url when empty
};

class TaskTokenExchange {
 public:
  TaskTokenExchange(const TrustAuthority& authority, const EntryRegistry& entries,
                    const TaskRegistry& tasks, store::Store& store, const Clock& clock,
                    ExchangeOptions options);

  issuance::Result<AuthorizedTaskToken> Authorize(const TaskTokenAsk& ask) const;

  // The nonce to hand out with every answer ("" without --dpop-nonce).
  std::string CurrentNonce() const;
  const std::string& token_endpoint_url() const { return options_.proof.token_endpoint_url; }
  const std::string& issuer_url() const { return options_.issuer_url; }

 private:
  // The SPIFFE ID a JWT-SVID proves, after checking it is one this broker signed for its own
  // issuer URL and that an entry still issues that ID.
  absl::StatusOr<std::string> AuthenticateSubject(std::string_view jwt_svid) const;
  // Steps 2 (registration) to 5 for a caller whose SPIFFE ID is known (`out.spiffe_id`);
  // `calling_entry` is the node API's entry.
  issuance::Result<AuthorizedTaskToken> AuthorizeKnownCaller(
      const TaskTokenAsk& ask, const std::optional<store::RegistrationEntry>& calling_entry,
      AuthorizedTaskToken& out) const;

  const TrustAuthority& authority_;
  const EntryRegistry& entries_;
  const TaskRegistry& tasks_;
  store::Store& store_;
  const Clock& clock_;
  ExchangeOptions options_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_EXCHANGE_TASK_TOKEN_EXCHANGE_H_
