#include "broker/server/policy/execution_caps.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace mandate::broker::policy::caps {
namespace {
absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }
}  // namespace

std::string IssuancesPerMinuteKey(std::string_view rule, std::string_view spiffe_id,
                                  int64_t window_start) {
  return absl::StrCat("issuances_per_minute/", AbslView(rule), "/", window_start, "/",
                      AbslView(spiffe_id));
}

std::string TokensPerTaskKey(std::string_view task_id) {
  return absl::StrCat("tokens_per_task/", AbslView(task_id));
}

}  // namespace mandate::broker::policy::caps
