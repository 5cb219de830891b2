#include "broker/server/policy/policy_chain.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "broker/common/log/log.h"

namespace mandate::broker::policy {
namespace {

// Keeps the scopes of `current` that `narrower` also lists (order of `current`).
std::vector<std::string> Intersect(const std::vector<std::string>& current,
                                   const std::vector<std::string>& narrower) {
  std::vector<std::string> out;
  for (const auto& s : current) {
    if (std::find(narrower.begin(), narrower.end(), s) != narrower.end()) out.push_back(s);
  }
  return out;
}

// At most kMaxReasonBytes of a hook's reason (cut at a character boundary), with control
// characters replaced: it is shown to callers, logged and audited. (Both hooks' answers are
// valid UTF-8: JSON and protobuf strings are checked when parsed.)
constexpr size_t kMaxReasonBytes = 512;
std::string BoundedReason(std::string_view reason) {
  size_t end = std::min(reason.size(), kMaxReasonBytes);
  while (end < reason.size() && end > 0 &&
         (static_cast<unsigned char>(reason[end]) & 0xC0) == 0x80) {
    --end;
  }
  std::string out(reason.substr(0, end));
  for (char& c : out) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7F) c = ' ';
  }
  if (end < reason.size()) out += "...";
  return out;
}

}  // namespace

PolicyChain::PolicyChain(std::vector<HookBinding> hooks, std::chrono::milliseconds timeout,
                         metrics::BrokerMetrics* metrics)
    : hooks_(std::move(hooks)), timeout_(timeout), metrics_(metrics) {
  if (metrics_ != nullptr) {
    for (const HookBinding& binding : hooks_) {
      latency_ids_.push_back(metrics_->RegisterHook(binding.hook->name()));
    }
  }
}

ChainDecision PolicyChain::Decide(const PolicyInput& input,
                                  std::chrono::steady_clock::time_point deadline) const {
  ChainDecision result;
  result.decision.allow = true;
  for (size_t i = 0; i < hooks_.size(); ++i) {
    const HookBinding& binding = hooks_[i];
    if (!binding.kinds.empty() && !binding.kinds.contains(input.kind)) continue;
    result.unasked = false;
    const std::string_view name = binding.hook->name();
    const auto started = std::chrono::steady_clock::now();
    absl::StatusOr<PolicyDecision> answer = binding.hook->Check(input, deadline);
    if (metrics_ != nullptr) {
      metrics_->ObserveHookLatency(
          latency_ids_[i],
          std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    }
    if (!answer.ok()) {
      result.outcome = ChainDecision::Outcome::kError;
      result.hook = std::string(name);
      result.decision = PolicyDecision{};
      result.decision.reason = absl::StrCat(
          "policy hook ", std::string(name),
          " could not decide: ", log::EscapeForLog(std::string(answer.status().message())));
      spdlog::error("policy error kind={} spiffe_id={} hook={}: {}", IssuanceKindName(input.kind),
                    input.spiffe_id, name, log::EscapeForLog(answer.status().ToString()));
      break;
    }
    if (!answer->allow) {
      result.outcome = ChainDecision::Outcome::kDeny;
      result.hook = std::string(name);
      result.decision = PolicyDecision{};
      // The hook's words go to the caller, the audit log and logs: bounded and escaped.
      result.decision.reason = answer->reason.empty()
                                   ? absl::StrCat("denied by policy (", std::string(name), ")")
                                   : BoundedReason(answer->reason);
      break;
    }
    PolicyDecision& merged = result.decision;
    if (answer->ttl_max.has_value()) {
      merged.ttl_max = merged.ttl_max.has_value() ? std::min(*merged.ttl_max, *answer->ttl_max)
                                                  : *answer->ttl_max;
    }
    if (answer->scopes.has_value()) {
      merged.scopes =
          merged.scopes.has_value() ? Intersect(*merged.scopes, *answer->scopes) : *answer->scopes;
    }
    merged.require_approval = merged.require_approval || answer->require_approval;
  }
  if (metrics_ != nullptr && !result.unasked) {
    metrics_->CountPolicyDecision(input.kind, result.outcome == ChainDecision::Outcome::kAllow
                                                  ? metrics::PolicyOutcome::kAllow
                                              : result.outcome == ChainDecision::Outcome::kDeny
                                                  ? metrics::PolicyOutcome::kDeny
                                                  : metrics::PolicyOutcome::kError);
  }
  return result;
}

}  // namespace mandate::broker::policy
