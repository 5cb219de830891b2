// Every kind of broken rules file is refused with the file, the line and the key named, and
// nothing is loaded.
#include <string>
#include <vector>

#include "rules_test_env.h"

namespace mandate::broker::policy {
namespace {

using testing::RulesPolicyTest;

struct BrokenFile {
  std::string what;
  std::string text;
  int line;             // the line the error must name
  std::string key;      // the key path it must name ("" when none applies)
  std::string problem;  // a phrase of the message
};

constexpr char kHead[] = "[[rule]]\nname = \"r\"\neffect = \"allow\"\n";  // lines 1-3

std::vector<BrokenFile> BrokenFiles() {
  return {
      {"syntax error", "default = \"deny\"\n[[rule]\nname = \"r\"\n", 2, "", ""},
      {"unterminated string", "default = \"deny\n", 1, "", ""},
      {"unknown top-level key", "default = \"deny\"\nrules = []\n", 2, "rules", "unknown key"},
      {"unknown rule key", std::string(kHead) + "colour = \"blue\"\n", 4, "rule[1].colour",
       "unknown key"},
      {"unknown key in a later rule",
       std::string(kHead) + "[[rule]]\nname = \"s\"\neffect = \"deny\"\nspiffeid = \"x\"\n", 7,
       "rule[2].spiffeid", "unknown key"},
      {"unknown time_window key",
       std::string(kHead) +
           "[rule.time_window]\nstart = \"08:00\"\nend = \"09:00\"\nzone = \"CET\"\n",
       7, "rule[1].time_window.zone", "unknown key"},
      {"rule as a single table", "[rule]\nname = \"r\"\n", 1, "rule", "array of tables"},
      {"wrong type ttl_max", std::string(kHead) + "ttl_max = \"300\"\n", 4, "rule[1].ttl_max",
       "must be an integer, not a string"},
      {"float ttl_max", std::string(kHead) + "ttl_max = 300.0\n", 4, "rule[1].ttl_max",
       "must be an integer"},
      {"zero ttl_max", std::string(kHead) + "ttl_max = 0\n", 4, "rule[1].ttl_max", "from 1"},
      {"negative cap", std::string(kHead) + "max_issuances_per_minute = -1\n", 4,
       "rule[1].max_issuances_per_minute", "from 1"},
      {"wrong type require_approval", std::string(kHead) + "require_approval = \"yes\"\n", 4,
       "rule[1].require_approval", "true or false"},
      {"selectors not an array", std::string(kHead) + "selectors = \"unix:uid:0\"\n", 4,
       "rule[1].selectors", "array of strings"},
      {"selector element not a string", std::string(kHead) + "selectors = [\"unix:uid:0\", 7]\n", 4,
       "rule[1].selectors[2]", "must be a string"},
      {"selector without a type", std::string(kHead) + "selectors = [\"uid1000\"]\n", 4,
       "rule[1].selectors[1]", "type:value"},
      {"invalid spiffe_id glob", std::string(kHead) + "spiffe_id = \"spiffe://td/***\"\n", 4,
       "rule[1].spiffe_id", "invalid glob"},
      {"empty spiffe_id glob", std::string(kHead) + "spiffe_id = \"\"\n", 4, "rule[1].spiffe_id",
       "empty pattern"},
      {"invalid audience glob on its own line",
       std::string(kHead) + "audiences = [\n  \"https://a.example.org\",\n  \"https://***\",\n]\n",
       6, "rule[1].audiences[2]", "invalid glob"},
      {"invalid scope glob", std::string(kHead) + "scopes = [\"a\\u0001b\"]\n", 4,
       "rule[1].scopes[1]", "control character"},
      {"unknown kind", std::string(kHead) + "kinds = [\"jwt_svid\", \"jwt\"]\n", 4,
       "rule[1].kinds[2]", "unknown issuance kind"},
      {"empty kinds", std::string(kHead) + "kinds = []\n", 4, "rule[1].kinds", "at least one"},
      {"missing name", "[[rule]]\neffect = \"allow\"\n", 1, "rule[1]", "'name' is required"},
      {"bad name", "[[rule]]\nname = \"no spaces\"\neffect = \"allow\"\n", 2, "rule[1].name",
       "letters, digits"},
      {"duplicate name", std::string(kHead) + "[[rule]]\nname = \"r\"\neffect = \"deny\"\n", 5,
       "rule[2].name", "already used on line 1"},
      {"missing effect", "[[rule]]\nname = \"r\"\n", 1, "rule[1]", "'effect' is required"},
      {"bad effect", "[[rule]]\nname = \"r\"\neffect = \"permit\"\n", 3, "rule[1].effect",
       "\"allow\" or \"deny\""},
      {"bad default", "default = \"maybe\"\n", 1, "default", "\"allow\" or \"deny\""},
      {"deny rule with a constraint", "[[rule]]\nname = \"r\"\neffect = \"deny\"\nttl_max = 60\n",
       4, "rule[1].ttl_max", "only an allow rule"},
      {"approval without task kind",
       std::string(kHead) + "kinds = [\"jwt_svid\"]\nrequire_approval = true\n", 5,
       "rule[1].require_approval", "\"task\""},
      {"token cap without task_token kind",
       std::string(kHead) + "kinds = [\"task\"]\nmax_tokens_per_task = 3\n", 5,
       "rule[1].max_tokens_per_task", "\"task_token\""},
      {"time_window not a table", std::string(kHead) + "time_window = \"08:00-18:00\"\n", 4,
       "rule[1].time_window", "must be a table"},
      {"bad start time",
       std::string(kHead) + "time_window = { start = \"25:00\", end = \"26:00\" }\n", 4,
       "rule[1].time_window.start", "HH:MM"},
      {"start of 24:00",
       std::string(kHead) + "time_window = { start = \"24:00\", end = \"01:00\" }\n", 4,
       "rule[1].time_window.start", "HH:MM"},
      {"time without minutes",
       std::string(kHead) + "time_window = { start = \"8\", end = \"9:00\" }\n", 4,
       "rule[1].time_window.start", "HH:MM"},
      {"missing end", std::string(kHead) + "[rule.time_window]\nstart = \"08:00\"\n", 4,
       "rule[1].time_window.end", "is required"},
      {"empty window",
       std::string(kHead) + "time_window = { start = \"08:00\", end = \"08:00\" }\n", 4,
       "rule[1].time_window.end", "empty"},
      {"unknown day",
       std::string(kHead) + "[rule.time_window]\ndays = [\"mon\", \"Tuesday\"]\nstart = "
                            "\"08:00\"\nend = \"09:00\"\n",
       5, "rule[1].time_window.days[2]", "unknown day"},
      {"no days",
       std::string(kHead) + "time_window = { days = [], start = \"08:00\", end = \"09:00\" }\n", 4,
       "rule[1].time_window.days", "at least one day"},
  };
}

TEST_F(RulesPolicyTest, BrokenFilesAreRefusedNamingFileLineAndKey) {
  for (const BrokenFile& broken : BrokenFiles()) {
    SCOPED_TRACE(broken.what);
    absl::Status status = LoadError(broken.text);
    ASSERT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
    const std::string message(status.message());
    EXPECT_EQ(message.rfind(path_ + ":" + std::to_string(broken.line) + ":", 0), 0u) << message;
    if (!broken.key.empty()) {
      EXPECT_NE(message.find(": " + broken.key + ": "), std::string::npos) << message;
    }
    EXPECT_NE(message.find(broken.problem), std::string::npos) << message;
  }
}

TEST_F(RulesPolicyTest, UnreadableFileIsRefused) {
  absl::StatusOr<std::unique_ptr<RulesPolicy>> policy =
      RulesPolicy::Load(dir_ + "/absent.toml", *store_, clock_, nullptr);
  EXPECT_EQ(policy.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(policy.status().message().find("absent.toml"), std::string::npos);
}

}  // namespace
}  // namespace mandate::broker::policy
