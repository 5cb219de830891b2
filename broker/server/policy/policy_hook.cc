#include "broker/server/policy/policy_hook.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace mandate::broker::policy {

std::string_view IssuanceKindName(IssuanceKind kind) {
  switch (kind) {
    case IssuanceKind::kNodeSvid:
      return "node_svid";
    case IssuanceKind::kX509Svid:
      return "x509_svid";
    case IssuanceKind::kJwtSvid:
      return "jwt_svid";
    case IssuanceKind::kTask:
      return "task";
    case IssuanceKind::kTaskToken:
      return "task_token";
    case IssuanceKind::kTokenExchange:
      return "token_exchange";
  }
  return "unknown";
}

absl::StatusOr<IssuanceKind> ParseIssuanceKind(std::string_view name) {
  for (IssuanceKind kind : kAllIssuanceKinds) {
    if (IssuanceKindName(kind) == name) return kind;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown issuance kind; expected one of node_svid, x509_svid, jwt_svid, task, "
                   "task_token, token_exchange"));
}

nlohmann::json PolicyInputJson(const PolicyInput& input) {
  nlohmann::json doc = {
      {"kind", IssuanceKindName(input.kind)},
      {"spiffe_id", input.spiffe_id},
      {"node_id", input.node_id},
      {"selectors", input.selectors},
      {"audience", input.audience},
      {"scopes", input.scopes},
      {"ttl", input.ttl_seconds},
      {"subject", input.subject},
      {"actor_chain", input.actor_chain},
      {"time", absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixSeconds(input.time),
                                absl::UTCTimeZone())},
  };
  if (input.task.has_value()) {
    doc["task"] = {{"id", input.task->id},
                   {"purpose", input.task->purpose},
                   {"scopes", input.task->scopes},
                   {"audiences", input.task->audiences}};
  }
  return doc;
}

absl::StatusOr<PolicyDecision> ParsePolicyDecision(const nlohmann::json& answer) {
  if (!answer.is_object()) return absl::InvalidArgumentError("the answer is not a JSON object");
  PolicyDecision decision;
  auto allow = answer.find("allow");
  if (allow == answer.end() || !allow->is_boolean()) {
    return absl::InvalidArgumentError("the answer has no boolean \"allow\"");
  }
  decision.allow = allow->get<bool>();
  if (auto it = answer.find("reason"); it != answer.end() && !it->is_null()) {
    if (!it->is_string()) return absl::InvalidArgumentError("\"reason\" is not a string");
    decision.reason = it->get<std::string>();
  }
  if (auto it = answer.find("ttl_max"); it != answer.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
      return absl::InvalidArgumentError("\"ttl_max\" is not a positive integer");
    }
    decision.ttl_max = it->get<int64_t>();
  }
  if (auto it = answer.find("scopes"); it != answer.end() && !it->is_null()) {
    if (!it->is_array()) return absl::InvalidArgumentError("\"scopes\" is not an array");
    std::vector<std::string> scopes;
    for (const auto& s : *it) {
      if (!s.is_string()) return absl::InvalidArgumentError("\"scopes\" holds a non-string");
      scopes.push_back(s.get<std::string>());
    }
    decision.scopes = std::move(scopes);
  }
  if (auto it = answer.find("require_approval"); it != answer.end() && !it->is_null()) {
    if (!it->is_boolean()) {
      return absl::InvalidArgumentError("\"require_approval\" is not a boolean");
    }
    decision.require_approval = it->get<bool>();
  }
  return decision;
}

}  // namespace mandate::broker::policy
