// Pure rules of delegation (DESIGN.md §10 "Delegation", RFC 8693): what a delegated token may
// carry given the subject token, the actor and the task. No I/O, no clock, no keys: the exchange
// (token_exchange.h) gathers the facts and these functions decide. Thread-safe (no state).
#ifndef MANDATE_BROKER_SERVER_DELEGATION_DELEGATION_RULES_H_
#define MANDATE_BROKER_SERVER_DELEGATION_DELEGATION_RULES_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::broker::delegation {

// The default for `--max-delegation-depth`: the number of actors one chain may hold.
inline constexpr int kDefaultMaxDelegationDepth = 4;

// One earlier hop of the chain, as the subject token carried it.
struct ChainLink {
  std::string actor;                // the actor's SPIFFE ID (`act.sub`)
  std::vector<std::string> scopes;  // the scope that hop granted
  int64_t expires_at = 0;           // that hop's `exp`
};

// Every scope set that bounds the new token. A set that is nullopt does not bound (e.g. no policy
// narrowing); an empty set grants nothing.
struct ScopeBounds {
  std::vector<std::string> requested;     // empty: ask for everything the bounds allow
  std::vector<std::string> user;          // the user's `scope`; empty grants nothing
  std::vector<std::string> entitlements;  // the actor's entries' `scopes`
  std::vector<std::string> task;          // the task's declared scopes
  std::vector<ChainLink> earlier_links;   // every earlier hop
  std::optional<std::vector<std::string>> policy;
};

// requested ∩ user ∩ entitlements ∩ task ∩ every earlier link ∩ policy, in the order of the
// requested scopes (or the user's when none were requested), deduplicated. InvalidArgument with a
// message naming the first set that emptied the result (mapped to invalid_scope).
absl::StatusOr<std::vector<std::string>> IntersectScopes(const ScopeBounds& bounds);

// min(now + broker_ttl, subject exp, task deadline, every earlier link's exp). Never grows.
// FailedPrecondition when the result is not after `now` (nothing left to grant).
absl::StatusOr<int64_t> DelegatedExpiry(int64_t now, int64_t broker_ttl, int64_t subject_exp,
                                        int64_t task_deadline,
                                        const std::vector<ChainLink>& earlier_links);

// The depth cap in force: the broker's, lowered (never raised) by a policy's answer.
int EffectiveMaxDepth(int broker_max_depth, std::optional<int> policy_max_depth);

// Checks that `actor` may extend a chain of `earlier_actors` (oldest first): `may_act_sub`, when
// the subject token names one, must equal `actor`; `actor` must not already be in the chain; the
// new chain's length must not exceed `max_depth`. FailedPrecondition (invalid_grant) otherwise.
absl::Status CheckChainExtension(std::string_view actor,
                                 const std::vector<std::string>& earlier_actors,
                                 const std::optional<std::string>& may_act_sub, int max_depth);

// The `act` claim chain for the new token, outermost (current actor) first: `actor` followed by
// the earlier actors newest first.
std::vector<std::string> BuildActorChain(std::string_view actor,
                                         const std::vector<std::string>& earlier_actors);

}  // namespace mandate::broker::delegation

#endif  // MANDATE_BROKER_SERVER_DELEGATION_DELEGATION_RULES_H_
