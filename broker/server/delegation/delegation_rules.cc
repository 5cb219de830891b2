#include "broker/server/delegation/delegation_rules.h"

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace mandate::broker::delegation {
namespace {

// Keeps the members of `current` that are also in `bound`, preserving order.
std::vector<std::string> Keep(const std::vector<std::string>& current,
                              const std::vector<std::string>& bound) {
  absl::flat_hash_set<std::string> allowed(bound.begin(), bound.end());
  std::vector<std::string> out;
  for (const std::string& s : current) {
    if (allowed.contains(s)) out.push_back(s);
  }
  return out;
}

absl::Status Emptied(std::string_view by) {
  return absl::InvalidArgumentError(
      absl::StrCat("no requested scope is allowed by ", std::string(by)));
}

}  // namespace

absl::StatusOr<std::vector<std::string>> IntersectScopes(const ScopeBounds& bounds) {
  // A user token without scope grants nothing, whatever else allows.
  if (bounds.user.empty()) {
    return absl::InvalidArgumentError("the subject token grants no scope");
  }
  std::vector<std::string> result;
  absl::flat_hash_set<std::string> seen;
  for (const std::string& s : bounds.requested.empty() ? bounds.user : bounds.requested) {
    if (seen.insert(s).second) result.push_back(s);
  }
  result = Keep(result, bounds.user);
  if (result.empty()) return Emptied("the subject token's scope");
  result = Keep(result, bounds.entitlements);
  if (result.empty()) return Emptied("the actor's entitlements");
  result = Keep(result, bounds.task);
  if (result.empty()) return Emptied("the task's scopes");
  for (const ChainLink& link : bounds.earlier_links) {
    result = Keep(result, link.scopes);
    if (result.empty()) return Emptied(absl::StrCat("the earlier link of ", link.actor));
  }
  if (bounds.policy.has_value()) {
    result = Keep(result, *bounds.policy);
    if (result.empty()) return Emptied("policy");
  }
  return result;
}

absl::StatusOr<int64_t> DelegatedExpiry(int64_t now, int64_t broker_ttl, int64_t subject_exp,
                                        int64_t task_deadline,
                                        const std::vector<ChainLink>& earlier_links) {
  int64_t exp = std::min({now + broker_ttl, subject_exp, task_deadline});
  for (const ChainLink& link : earlier_links) exp = std::min(exp, link.expires_at);
  if (exp <= now) {
    return absl::FailedPreconditionError("the delegation has no lifetime left");
  }
  return exp;
}

int EffectiveMaxDepth(int broker_max_depth, std::optional<int> policy_max_depth) {
  if (policy_max_depth.has_value() && *policy_max_depth < broker_max_depth) {
    return std::max(*policy_max_depth, 0);
  }
  return broker_max_depth;
}

absl::Status CheckChainExtension(std::string_view actor,
                                 const std::vector<std::string>& earlier_actors,
                                 const std::optional<std::string>& may_act_sub, int max_depth) {
  if (may_act_sub.has_value() && *may_act_sub != actor) {
    return absl::FailedPreconditionError("the subject token names a different actor (may_act)");
  }
  if (std::find(earlier_actors.begin(), earlier_actors.end(), actor) != earlier_actors.end()) {
    return absl::FailedPreconditionError("the actor already appears in the delegation chain");
  }
  if (static_cast<int64_t>(earlier_actors.size()) + 1 > max_depth) {
    return absl::FailedPreconditionError(
        absl::StrCat("the delegation chain would exceed the maximum depth of ", max_depth));
  }
  return absl::OkStatus();
}

std::vector<std::string> BuildActorChain(std::string_view actor,
                                         const std::vector<std::string>& earlier_actors) {
  std::vector<std::string> chain;
  chain.reserve(earlier_actors.size() + 1);
  chain.emplace_back(actor);
  chain.insert(chain.end(), earlier_actors.rbegin(), earlier_actors.rend());
  return chain;
}

}  // namespace mandate::broker::delegation
