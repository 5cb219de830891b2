#include "broker/server/metrics/metrics.h"

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <string>

namespace mandate::broker::metrics {
namespace {

size_t KindIndex(policy::IssuanceKind kind) { return static_cast<size_t>(kind); }

// Hook latencies from a fraction of a millisecond (built-in rules) to past the default 500 ms
// timeout.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5};
  return *buckets;
}

}  // namespace

BrokerMetrics::BrokerMetrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& issuances = prometheus::BuildCounter()
                        .Name("mandate_issuances_total")
                        .Help("Issuance requests by kind and outcome (issued, denied, error).")
                        .Register(*registry_);
  auto& decisions =
      prometheus::BuildCounter()
          .Name("mandate_policy_decisions_total")
          .Help(
              "Policy decisions by kind and outcome (allow, deny, error = a hook could not "
              "decide; the request was denied).")
          .Register(*registry_);
  static constexpr const char* kIssuanceOutcomes[] = {"issued", "denied", "error"};
  static constexpr const char* kPolicyOutcomes[] = {"allow", "deny", "error"};
  for (policy::IssuanceKind kind : policy::kAllIssuanceKinds) {
    const std::string name(policy::IssuanceKindName(kind));
    for (size_t o = 0; o < 3; ++o) {
      issuances_[KindIndex(kind)][o] =
          &issuances.Add({{"kind", name}, {"outcome", kIssuanceOutcomes[o]}});
      decisions_[KindIndex(kind)][o] =
          &decisions.Add({{"kind", name}, {"outcome", kPolicyOutcomes[o]}});
    }
  }
  hook_latency_ = &prometheus::BuildHistogram()
                       .Name("mandate_policy_hook_duration_seconds")
                       .Help("Time a policy hook took to answer or fail.")
                       .Register(*registry_);
  caps_crossed_ = &prometheus::BuildCounter()
                       .Name("mandate_policy_caps_crossed_total")
                       .Help("Requests denied because an execution cap was reached.")
                       .Register(*registry_);
  approvals_pending_ = &prometheus::BuildGauge()
                            .Name("mandate_approvals_pending")
                            .Help("Task declarations waiting for a human decision.")
                            .Register(*registry_)
                            .Add({});
  unrecorded_refusals_ =
      &prometheus::BuildCounter()
           .Name("mandate_audit_refusals_unrecorded_total")
           .Help(
               "Refusals of callers that proved nothing, past their audit budget: counted, "
               "not recorded.")
           .Register(*registry_)
           .Add({});
}

BrokerMetrics::~BrokerMetrics() = default;

void BrokerMetrics::CountUnrecordedRefusal() { unrecorded_refusals_->Increment(); }

void BrokerMetrics::CountIssuance(policy::IssuanceKind kind, IssuanceOutcome outcome, double n) {
  issuances_[KindIndex(kind)][static_cast<size_t>(outcome)]->Increment(n);
}

void BrokerMetrics::CountPolicyDecision(policy::IssuanceKind kind, PolicyOutcome outcome) {
  decisions_[KindIndex(kind)][static_cast<size_t>(outcome)]->Increment();
}

size_t BrokerMetrics::RegisterHook(std::string_view hook) {
  hook_histograms_.push_back(&hook_latency_->Add({{"hook", std::string(hook)}}, LatencyBuckets()));
  return hook_histograms_.size() - 1;
}

void BrokerMetrics::ObserveHookLatency(size_t hook_id, double seconds) {
  if (hook_id < hook_histograms_.size()) hook_histograms_[hook_id]->Observe(seconds);
}

void BrokerMetrics::CountCapCrossed(std::string_view cap) {
  caps_crossed_->Add({{"cap", std::string(cap)}}).Increment();
}

void BrokerMetrics::SetApprovalsPending(double n) { approvals_pending_->Set(n); }

std::string BrokerMetrics::Render() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

}  // namespace mandate::broker::metrics
