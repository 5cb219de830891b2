// The hooks a broker was started with (--policy-file, --policy-grpc, --policy-webhook), asked
// in turn: every hook asked about a kind must allow it. The chain merges their answers (the
// smallest ttl_max, the intersection of scopes, approval if any asks for it) and turns a hook
// that could not decide into a denial - fail closed - while telling the two apart.
//
// One deadline (now + timeout) bounds the whole decision, however many hooks there are, so a
// slow hook never holds a broker thread past it. Hooks are asked in the order given; the broker
// puts built-in rules last, so an execution cap is only counted once every other hook allowed.
//
// Ownership: owns its hooks. Thread-safety: Decide may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_POLICY_POLICY_CHAIN_H_
#define MANDATE_BROKER_SERVER_POLICY_POLICY_CHAIN_H_

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "broker/server/metrics/metrics.h"
#include "broker/server/policy/policy_hook.h"

namespace mandate::broker::policy {

struct HookBinding {
  std::shared_ptr<PolicyHook> hook;
  // The kinds this hook is asked about; empty = every kind. A kind it is not asked about never
  // waits on it, so a dead webhook for task tokens cannot stop node attestation.
  std::set<IssuanceKind> kinds;
};

struct ChainDecision {
  enum class Outcome { kAllow, kDeny, kError };
  Outcome outcome = Outcome::kAllow;
  // The merged answer when allowed (reason empty); on kDeny the denying hook's reason, on
  // kError what went wrong with which hook (safe to show: never the hook's raw answer).
  PolicyDecision decision;
  std::string hook;  // the hook that denied or failed
  // True when no hook was asked (none configured for this kind).
  bool unasked = true;
};

class PolicyChain {
 public:
  PolicyChain(std::vector<HookBinding> hooks, std::chrono::milliseconds timeout,
              metrics::BrokerMetrics* metrics);

  // Asks every hook bound to input.kind. Counts the decision in the metrics (allow/deny/error).
  ChainDecision Decide(const PolicyInput& input) const {
    return Decide(input, std::chrono::steady_clock::now() + timeout_);
  }
  // The same within a deadline the caller chose (a batch's decisions share one).
  ChainDecision Decide(const PolicyInput& input,
                       std::chrono::steady_clock::time_point deadline) const;

  bool empty() const { return hooks_.empty(); }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  const std::vector<HookBinding> hooks_;
  std::vector<size_t> latency_ids_;  // per hook, for metrics_
  const std::chrono::milliseconds timeout_;
  metrics::BrokerMetrics* const metrics_;  // may be null
};

}  // namespace mandate::broker::policy

#endif  // MANDATE_BROKER_SERVER_POLICY_POLICY_CHAIN_H_
