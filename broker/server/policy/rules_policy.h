// The built-in policy hook: an ordered list of rules read from a TOML file (--policy-file).
// docs/policy.md is the reference for the file; in short, rules are tried in file order and the
// first whose spiffe_id glob, selectors and kinds all match decides (firewall style); an allow
// rule may still deny the request for falling outside its constraints (audiences, time window,
// execution caps) and may cap the TTL, narrow scopes or require approval. `default` decides
// when no rule matches (deny when absent).
//
// Execution caps (max_tokens_per_task, max_issuances_per_minute) are counted in the store, so
// they hold across threads, restarts and brokers sharing the store. A cap is counted only when
// everything else in the rule allowed; the counter is taken even if a later hook or the
// issuance itself then fails (a cap bounds what policy allowed, erring towards fewer
// credentials). A store error while counting is an error status: the hook could not decide.
//
// Thread-safety: Check and Reload may be called concurrently from any threads. Check takes the
// current rule set (immutable, compiled at load) by shared_ptr under a short reader lock, so a
// Reload never blocks it on file reads or parsing.
#ifndef MANDATE_BROKER_SERVER_POLICY_RULES_POLICY_H_
#define MANDATE_BROKER_SERVER_POLICY_RULES_POLICY_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/util/clock.h"
#include "broker/server/policy/policy_hook.h"

namespace mandate::store {
class Store;
}
namespace mandate::broker::metrics {
class BrokerMetrics;
}

namespace mandate::broker::policy {

class RulesPolicy final : public PolicyHook {
 public:
  // Reads and compiles the rules file at `path`. InvalidArgument "<path>:<line>:<col>: <key>:
  // <problem>" for a syntax error, an unknown key, a wrong type or an invalid value (glob,
  // kind, selector, time); other codes when the file cannot be read. `store` and `clock` must
  // outlive the hook; `metrics` may be null (caps crossed are then only logged).
  static absl::StatusOr<std::unique_ptr<RulesPolicy>> Load(std::string path, store::Store& store,
                                                           const Clock& clock,
                                                           metrics::BrokerMetrics* metrics);
  ~RulesPolicy() override;

  std::string_view name() const override { return "rules"; }

  // Never blocks on file I/O. Blocks on the store only for a rule with an execution cap
  // (DeadlineExceeded, without counting, when `deadline` has passed by then).
  absl::StatusOr<PolicyDecision> Check(const PolicyInput& input,
                                       std::chrono::steady_clock::time_point deadline) override;

  // Re-reads the file and, only if it compiles, replaces the rules in one step (a Check sees
  // the old set or the new one, never a mix). On error the last good rules stay in force and
  // the error (as Load's) is returned. Counters are kept: a cap does not restart on reload.
  absl::Status Reload();

  const std::string& path() const { return path_; }
  // How many rules are in force (for logs).
  size_t rule_count() const;

  struct RuleSet;  // compiled rules; defined in the .cc

 private:
  RulesPolicy(std::string path, store::Store& store, const Clock& clock,
              metrics::BrokerMetrics* metrics, std::shared_ptr<const RuleSet> rules);
  std::shared_ptr<const RuleSet> Current() const;
  // Counts one use of a cap; a denial when it is at its limit.
  absl::StatusOr<std::optional<PolicyDecision>> CountCap(
      std::string_view cap, const std::string& key, int64_t limit, int64_t expires_at,
      std::string reason, const std::string& rule, const PolicyInput& input,
      std::chrono::steady_clock::time_point deadline);
  void MaybePruneCounters(int64_t now);

  const std::string path_;
  store::Store& store_;
  const Clock& clock_;
  metrics::BrokerMetrics* const metrics_;

  mutable absl::Mutex mu_;
  std::shared_ptr<const RuleSet> rules_ ABSL_GUARDED_BY(mu_);  // never null
  absl::Mutex reload_mu_;  // serialises Reload (file read + compile happen outside mu_)
  // Expired counters are pruned at most once a minute, by the first Check that counts after.
  std::atomic<int64_t> next_prune_{0};
};

}  // namespace mandate::broker::policy

#endif  // MANDATE_BROKER_SERVER_POLICY_RULES_POLICY_H_
