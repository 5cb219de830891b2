// The broker's Prometheus metrics for issuance and policy (names prefixed `mandate_`), rendered
// by GET /metrics beside the HTTP server's and audit log's counters. The only module that uses
// prometheus-cpp.
//
// Counters for the fixed label sets (kind x outcome) are created up front, so counting on the
// issuance path is one atomic add, with no label lookup or lock.
//
// Thread-safety: every method may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_METRICS_METRICS_H_
#define MANDATE_BROKER_SERVER_METRICS_METRICS_H_

#include <array>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "broker/server/policy/policy_hook.h"

namespace prometheus {
class Registry;
class Counter;
class Gauge;
class Histogram;
template <typename T>
class Family;
}  // namespace prometheus

namespace mandate::broker::metrics {

enum class IssuanceOutcome { kIssued, kDenied, kError };
enum class PolicyOutcome { kAllow, kDeny, kError };

class BrokerMetrics {
 public:
  BrokerMetrics();
  ~BrokerMetrics();
  BrokerMetrics(const BrokerMetrics&) = delete;
  BrokerMetrics& operator=(const BrokerMetrics&) = delete;

  // mandate_issuances_total{kind, outcome="issued|denied|error"}: one per request that reached
  // the issuance pipeline (a batch of X509-SVIDs counts each SVID).
  void CountIssuance(policy::IssuanceKind kind, IssuanceOutcome outcome, double n = 1);
  // mandate_policy_decisions_total{kind, outcome="allow|deny|error"}: one per decision (all
  // hooks together); errors are hooks that could not decide (fail closed).
  void CountPolicyDecision(policy::IssuanceKind kind, PolicyOutcome outcome);
  // mandate_policy_hook_duration_seconds{hook}: the time one hook took to answer (or fail).
  // RegisterHook (before serving; not thread-safe against itself) returns the id to observe
  // with, so the decision path does no label lookup and takes no family lock.
  size_t RegisterHook(std::string_view hook);
  void ObserveHookLatency(size_t hook_id, double seconds);
  // mandate_policy_caps_crossed_total{cap}: requests denied by an execution cap
  // ("tokens_per_task", "issuances_per_minute").
  void CountCapCrossed(std::string_view cap);
  // mandate_audit_refusals_unrecorded_total: refusals of callers that proved nothing, past the
  // audit budget for them (counted here instead of recorded).
  void CountUnrecordedRefusal();
  // mandate_approvals_pending: task declarations waiting for a human.
  void SetApprovalsPending(double n);

  // The Prometheus text exposition (0.0.4) of everything above.
  std::string Render() const;

 private:
  static constexpr size_t kKinds = std::size(policy::kAllIssuanceKinds);
  std::shared_ptr<prometheus::Registry> registry_;
  std::array<std::array<prometheus::Counter*, 3>, kKinds> issuances_{};
  std::array<std::array<prometheus::Counter*, 3>, kKinds> decisions_{};
  prometheus::Family<prometheus::Histogram>* hook_latency_ = nullptr;
  std::vector<prometheus::Histogram*> hook_histograms_;
  prometheus::Family<prometheus::Counter>* caps_crossed_ = nullptr;
  prometheus::Gauge* approvals_pending_ = nullptr;
  prometheus::Counter* unrecorded_refusals_ = nullptr;
};

}  // namespace mandate::broker::metrics

#endif  // MANDATE_BROKER_SERVER_METRICS_METRICS_H_
