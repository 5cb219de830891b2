// The rules policy's decisions: first match, each way a rule matches, each constraint, the
// execution caps (exact under 16 threads, durable across a store reopen), reload.
#include "broker/server/policy/rules_policy.h"

#include <atomic>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/server/metrics/metrics.h"
#include "rules_test_env.h"

namespace mandate::broker::policy {
namespace {

using testing::kWednesday10am;
using testing::RulesPolicyTest;

constexpr char kBot[] = "spiffe://example.org/agent/bot";

PolicyTask MakeTask(std::string id) {
  PolicyTask task;
  task.id = std::move(id);
  return task;
}

PolicyDecision MustDecide(RulesPolicy& policy, const PolicyInput& input) {
  absl::StatusOr<PolicyDecision> decision =
      policy.Check(input, std::chrono::steady_clock::now() + std::chrono::seconds(30));
  EXPECT_TRUE(decision.ok()) << decision.status();
  if (decision.ok()) return *decision;
  PolicyDecision failed;
  failed.reason = "error";
  return failed;
}

TEST_F(RulesPolicyTest, FirstMatchingRuleDecides) {
  const std::string deny_first = R"(
[[rule]]
name = "no-bot"
spiffe_id = "spiffe://example.org/agent/bot"
effect = "deny"
reason = "the bot is retired"

[[rule]]
name = "agents"
spiffe_id = "spiffe://example.org/agent/*"
effect = "allow"
)";
  auto policy = Load(deny_first);
  ASSERT_NE(policy, nullptr);
  PolicyDecision bot = MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot));
  EXPECT_FALSE(bot.allow);
  EXPECT_EQ(bot.reason, "the bot is retired");
  PolicyDecision other =
      MustDecide(*policy, Input(IssuanceKind::kJwtSvid, "spiffe://example.org/agent/other"));
  EXPECT_TRUE(other.allow);
  EXPECT_EQ(other.reason, "allowed by rule 'agents'");

  // The same two rules the other way round: the broad allow now shadows the deny.
  const std::string allow_first = R"(
[[rule]]
name = "agents"
spiffe_id = "spiffe://example.org/agent/*"
effect = "allow"

[[rule]]
name = "no-bot"
spiffe_id = "spiffe://example.org/agent/bot"
effect = "deny"
)";
  policy = Load(allow_first);
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
}

TEST_F(RulesPolicyTest, DefaultDecidesWhenNothingMatches) {
  auto deny = Load(
      "[[rule]]\nname = \"x\"\nspiffe_id = \"spiffe://example.org/x\"\n"
      "effect = \"allow\"\n");
  ASSERT_NE(deny, nullptr);
  PolicyDecision decision = MustDecide(*deny, Input(IssuanceKind::kX509Svid, kBot));
  EXPECT_FALSE(decision.allow);
  EXPECT_EQ(decision.reason, "no rule matched; default deny");

  auto allow = Load("default = \"allow\"\n");
  ASSERT_NE(allow, nullptr);
  EXPECT_TRUE(MustDecide(*allow, Input(IssuanceKind::kX509Svid, kBot)).allow);

  auto empty = Load("");
  ASSERT_NE(empty, nullptr);
  EXPECT_FALSE(MustDecide(*empty, Input(IssuanceKind::kX509Svid, kBot)).allow);
}

TEST_F(RulesPolicyTest, DenyWithoutReasonNamesTheRule) {
  auto policy = Load("default = \"allow\"\n[[rule]]\nname = \"block-all\"\neffect = \"deny\"\n");
  ASSERT_NE(policy, nullptr);
  PolicyDecision decision = MustDecide(*policy, Input(IssuanceKind::kTask, kBot));
  EXPECT_FALSE(decision.allow);
  EXPECT_EQ(decision.reason, "denied by rule 'block-all'");
}

TEST_F(RulesPolicyTest, SelectorsMustAllBePresent) {
  auto policy = Load(R"(
[[rule]]
name = "research-ns"
selectors = ["k8s:ns:research", "unix:uid:1000"]
effect = "allow"
)");
  ASSERT_NE(policy, nullptr);
  PolicyInput input = Input(IssuanceKind::kX509Svid, kBot);
  input.selectors = {"unix:uid:1000", "k8s:ns:research", "unix:gid:50"};
  EXPECT_TRUE(MustDecide(*policy, input).allow);
  input.selectors = {"k8s:ns:research"};
  EXPECT_FALSE(MustDecide(*policy, input).allow);
  input.selectors = {"k8s:ns:research-2", "unix:uid:1000"};  // no prefix matching
  EXPECT_FALSE(MustDecide(*policy, input).allow);
  input.selectors = {};
  EXPECT_FALSE(MustDecide(*policy, input).allow);
}

TEST_F(RulesPolicyTest, KindsLimitWhatARuleMatches) {
  auto policy = Load(R"(
[[rule]]
name = "svids-only"
spiffe_id = "spiffe://example.org/agent/**"
kinds = ["x509_svid", "jwt_svid"]
effect = "allow"
)");
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kX509Svid, kBot)).allow);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
  EXPECT_FALSE(MustDecide(*policy, Input(IssuanceKind::kTask, kBot)).allow);
  EXPECT_FALSE(MustDecide(*policy, Input(IssuanceKind::kTaskToken, kBot)).allow);
  EXPECT_FALSE(MustDecide(*policy, Input(IssuanceKind::kTokenExchange, kBot)).allow);
}

TEST_F(RulesPolicyTest, SpiffeIdGlobsInRules) {
  auto policy = Load(R"(
[[rule]]
name = "direct-children"
spiffe_id = "spiffe://example.org/agent/*"
effect = "allow"
reason = "child"

[[rule]]
name = "deeper"
spiffe_id = "spiffe://example.org/agent/**"
effect = "deny"
)");
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
  PolicyDecision deep =
      MustDecide(*policy, Input(IssuanceKind::kJwtSvid, "spiffe://example.org/agent/a/b"));
  EXPECT_FALSE(deep.allow);
  EXPECT_EQ(deep.reason, "denied by rule 'deeper'");
  PolicyDecision outside =
      MustDecide(*policy, Input(IssuanceKind::kJwtSvid, "spiffe://example.org/agent"));
  EXPECT_EQ(outside.reason, "no rule matched; default deny");
}

TEST_F(RulesPolicyTest, AudienceOutsideTheRuleDeniesNamingIt) {
  auto policy = Load(R"(
[[rule]]
name = "docs-api"
effect = "allow"
audiences = ["https://docs.example.org/**", "spiffe://example.org/service/search"]
)");
  ASSERT_NE(policy, nullptr);
  PolicyInput input = Input(IssuanceKind::kJwtSvid, kBot);
  input.audience = {"https://docs.example.org/v1", "spiffe://example.org/service/search"};
  EXPECT_TRUE(MustDecide(*policy, input).allow);
  input.audience.push_back("https://payments.example.org");
  PolicyDecision decision = MustDecide(*policy, input);
  EXPECT_FALSE(decision.allow);
  EXPECT_EQ(decision.reason,
            "rule 'docs-api': audience 'https://payments.example.org' is not allowed");
  input.audience = {};  // nothing asked for, nothing to refuse
  EXPECT_TRUE(MustDecide(*policy, input).allow);
}

TEST_F(RulesPolicyTest, ScopesOutsideTheRuleAreNarrowedAway) {
  auto policy = Load(R"(
[[rule]]
name = "read-only"
effect = "allow"
scopes = ["docs:read", "tickets:*"]
)");
  ASSERT_NE(policy, nullptr);
  PolicyInput input = Input(IssuanceKind::kTaskToken, kBot);
  input.task = MakeTask("task_1");
  input.scopes = {"docs:read", "docs:write", "tickets:read", "tickets/admin:all"};
  PolicyDecision decision = MustDecide(*policy, input);
  EXPECT_TRUE(decision.allow);
  ASSERT_TRUE(decision.scopes.has_value());
  EXPECT_EQ(*decision.scopes, (std::vector<std::string>{"docs:read", "tickets:read"}));

  input.scopes = {"docs:write"};
  decision = MustDecide(*policy, input);
  EXPECT_FALSE(decision.allow);
  EXPECT_EQ(decision.reason, "rule 'read-only': none of the requested scopes is allowed");

  input.scopes = {};
  decision = MustDecide(*policy, input);
  EXPECT_TRUE(decision.allow);
  EXPECT_EQ(decision.scopes, std::vector<std::string>{});
}

TEST_F(RulesPolicyTest, TaskDeclarationsAreCheckedOnTheTasksOwnAudiencesAndScopes) {
  auto policy = Load(R"(
[[rule]]
name = "tasks"
kinds = ["task"]
effect = "allow"
audiences = ["https://docs.example.org"]
scopes = ["docs:*"]
)");
  ASSERT_NE(policy, nullptr);
  PolicyInput input = Input(IssuanceKind::kTask, kBot);
  input.task = MakeTask("");
  input.task->audiences = {"https://docs.example.org"};
  input.task->scopes = {"docs:read", "mail:send"};
  input.scopes = {"docs:read"};  // the same scope in both lists is kept once
  PolicyDecision decision = MustDecide(*policy, input);
  EXPECT_TRUE(decision.allow);
  EXPECT_EQ(decision.scopes, std::vector<std::string>{"docs:read"});
  input.task->audiences.push_back("https://mail.example.org");
  EXPECT_FALSE(MustDecide(*policy, input).allow);
}

TEST_F(RulesPolicyTest, LongAudiencesAreCutInReasonsAtACharacterBoundary) {
  auto policy = Load("[[rule]]\nname = \"a\"\neffect = \"allow\"\naudiences = [\"x\"]\n");
  ASSERT_NE(policy, nullptr);
  PolicyInput input = Input(IssuanceKind::kJwtSvid, kBot);
  std::string audience = "a";
  while (audience.size() < 400) audience += "\xC3\xA9";  // 'e' with acute: two bytes
  input.audience = {audience};
  PolicyDecision decision = MustDecide(*policy, input);
  EXPECT_FALSE(decision.allow);
  // 'a' then 99 whole two-byte characters, not 99.5.
  EXPECT_EQ(decision.reason,
            "rule 'a': audience '" + audience.substr(0, 199) + "...' is not allowed");
}

TEST_F(RulesPolicyTest, TtlMaxAndApproval) {
  auto policy = Load(R"(
[[rule]]
name = "payments"
effect = "allow"
ttl_max = 300
require_approval = true
)");
  ASSERT_NE(policy, nullptr);
  PolicyDecision task = MustDecide(*policy, Input(IssuanceKind::kTask, kBot));
  EXPECT_TRUE(task.allow);
  EXPECT_EQ(task.ttl_max, 300);
  EXPECT_TRUE(task.require_approval);
  // Approval is of the task: its tokens (and the agent's SVIDs) are not held again.
  PolicyInput token = Input(IssuanceKind::kTaskToken, kBot);
  token.task = MakeTask("task_1");
  PolicyDecision decision = MustDecide(*policy, token);
  EXPECT_TRUE(decision.allow);
  EXPECT_FALSE(decision.require_approval);
  EXPECT_EQ(decision.ttl_max, 300);
  EXPECT_FALSE(MustDecide(*policy, Input(IssuanceKind::kX509Svid, kBot)).require_approval);

  auto plain = Load("[[rule]]\nname = \"p\"\neffect = \"allow\"\n");
  ASSERT_NE(plain, nullptr);
  PolicyDecision unconstrained = MustDecide(*plain, Input(IssuanceKind::kTask, kBot));
  EXPECT_FALSE(unconstrained.ttl_max.has_value());
  EXPECT_FALSE(unconstrained.scopes.has_value());
  EXPECT_FALSE(unconstrained.require_approval);
}

TEST_F(RulesPolicyTest, TimeWindowInUtc) {
  auto policy = Load(R"(
[[rule]]
name = "office-hours"
effect = "allow"
time_window = { days = ["mon", "tue", "wed", "thu", "fri"], start = "08:00", end = "18:00" }
)");
  ASSERT_NE(policy, nullptr);
  const PolicyInput input = Input(IssuanceKind::kJwtSvid, kBot);
  EXPECT_TRUE(MustDecide(*policy, input).allow);  // Wednesday 10:00
  clock_.Set(kWednesday10am - 2 * 3600 - 1);      // 07:59:59
  PolicyDecision early = MustDecide(*policy, input);
  EXPECT_FALSE(early.allow);
  EXPECT_EQ(early.reason,
            "rule 'office-hours': outside its time window (mon,tue,wed,thu,fri 08:00-18:00 UTC)");
  clock_.Set(kWednesday10am - 2 * 3600);  // 08:00:00: start is inside
  EXPECT_TRUE(MustDecide(*policy, input).allow);
  clock_.Set(kWednesday10am + 8 * 3600 - 1);  // 17:59:59
  EXPECT_TRUE(MustDecide(*policy, input).allow);
  clock_.Set(kWednesday10am + 8 * 3600);  // 18:00:00: end is outside
  EXPECT_FALSE(MustDecide(*policy, input).allow);
  clock_.Set(kWednesday10am + 3 * 86400);  // Saturday 10:00
  EXPECT_FALSE(MustDecide(*policy, input).allow);
}

TEST_F(RulesPolicyTest, TimeWindowPastMidnightBelongsToTheDayItStarts) {
  auto policy = Load(R"(
[[rule]]
name = "nightly-batch"
effect = "allow"
[rule.time_window]
days = ["wed"]
start = "22:00"
end = "06:00"
)");
  ASSERT_NE(policy, nullptr);
  const PolicyInput input = Input(IssuanceKind::kJwtSvid, kBot);
  clock_.Set(kWednesday10am + 13 * 3600 + 1800);  // Wednesday 23:30
  EXPECT_TRUE(MustDecide(*policy, input).allow);
  clock_.Set(kWednesday10am + 16 * 3600);  // Thursday 02:00
  EXPECT_TRUE(MustDecide(*policy, input).allow);
  clock_.Set(kWednesday10am + 21 * 3600);  // Thursday 07:00
  EXPECT_FALSE(MustDecide(*policy, input).allow);
  clock_.Set(kWednesday10am - 8 * 3600);  // Wednesday 02:00 (Tuesday's night is not in)
  EXPECT_FALSE(MustDecide(*policy, input).allow);
}

constexpr char kTokenCap[] = R"(
[[rule]]
name = "payments-tokens"
spiffe_id = "spiffe://example.org/agent/payments"
kinds = ["task_token"]
effect = "allow"
max_tokens_per_task = 3
)";

PolicyInput TaskToken(std::string task_id) {
  PolicyInput input;
  input.kind = IssuanceKind::kTaskToken;
  input.spiffe_id = "spiffe://example.org/agent/payments";
  input.task = MakeTask(std::move(task_id));
  return input;
}

TEST_F(RulesPolicyTest, TokensPerTaskCapDeniesNamingTheCapAndCountsTheMetric) {
  metrics::BrokerMetrics metrics;
  metrics_ = &metrics;
  auto policy = Load(kTokenCap);
  ASSERT_NE(policy, nullptr);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(MustDecide(*policy, TaskToken("task_a")).allow) << i;
  PolicyDecision fourth = MustDecide(*policy, TaskToken("task_a"));
  EXPECT_FALSE(fourth.allow);
  EXPECT_EQ(fourth.reason, "execution cap: at most 3 tokens per task (rule 'payments-tokens')");
  EXPECT_TRUE(MustDecide(*policy, TaskToken("task_b")).allow);  // each task has its own count
  EXPECT_NE(metrics.Render().find("mandate_policy_caps_crossed_total{cap=\"tokens_per_task\"} 1"),
            std::string::npos)
      << metrics.Render();
}

TEST_F(RulesPolicyTest, CapsCountOnlyWhatTheRestOfTheRuleAllowed) {
  auto policy = Load(R"(
[[rule]]
name = "t"
kinds = ["task_token"]
effect = "allow"
audiences = ["https://api.example.org"]
max_tokens_per_task = 1
)");
  ASSERT_NE(policy, nullptr);
  PolicyInput bad = TaskToken("task_a");
  bad.audience = {"https://elsewhere.example.org"};
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(MustDecide(*policy, bad).allow);
  PolicyInput good = TaskToken("task_a");
  good.audience = {"https://api.example.org"};
  EXPECT_TRUE(MustDecide(*policy, good).allow);
  EXPECT_FALSE(MustDecide(*policy, good).allow);
}

TEST_F(RulesPolicyTest, IssuancesPerMinuteCountsAcrossKindsInFixedWindows) {
  auto policy = Load(R"(
[[rule]]
name = "throttled"
spiffe_id = "spiffe://example.org/agent/**"
kinds = ["x509_svid", "jwt_svid"]
effect = "allow"
max_issuances_per_minute = 2
)");
  ASSERT_NE(policy, nullptr);
  clock_.Set(kWednesday10am + 59);  // the last second of a window
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kX509Svid, kBot)).allow);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
  PolicyDecision third = MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot));
  EXPECT_FALSE(third.allow);
  EXPECT_EQ(third.reason, "execution cap: at most 2 issuances per minute (rule 'throttled')");
  // Another SPIFFE ID has its own count.
  EXPECT_TRUE(
      MustDecide(*policy, Input(IssuanceKind::kJwtSvid, "spiffe://example.org/agent/other")).allow);
  clock_.Advance(1);  // a new window
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
}

TEST_F(RulesPolicyTest, CapsAreExactUnderSixteenThreads) {
  auto policy = Load(R"(
[[rule]]
name = "capped"
effect = "allow"
max_tokens_per_task = 25
max_issuances_per_minute = 1000
)");
  ASSERT_NE(policy, nullptr);
  std::atomic<int> allowed{0}, denied{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 4; ++i) {
        absl::StatusOr<PolicyDecision> decision = policy->Check(TaskToken("task_x"), Later());
        if (!decision.ok()) {
          ++errors;
        } else if (decision->allow) {
          ++allowed;
        } else {
          ++denied;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(allowed.load(), 25);
  EXPECT_EQ(denied.load(), 64 - 25);
  EXPECT_EQ(errors.load(), 0);
}

TEST_F(RulesPolicyTest, CapsSurviveAStoreReopen) {
  auto policy = Load(kTokenCap);
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, TaskToken("task_a")).allow);
  EXPECT_TRUE(MustDecide(*policy, TaskToken("task_a")).allow);
  policy.reset();
  OpenStore();  // a broker restart: a new store on the same file, a new hook
  policy = Load(kTokenCap);
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, TaskToken("task_a")).allow);
  EXPECT_FALSE(MustDecide(*policy, TaskToken("task_a")).allow);
}

TEST_F(RulesPolicyTest, StoreErrorWhileCountingIsAnErrorNotADenial) {
  auto policy = Load(kTokenCap);
  ASSERT_NE(policy, nullptr);
  ExecRawSql("DROP TABLE policy_counters");
  absl::StatusOr<PolicyDecision> decision = policy->Check(TaskToken("task_a"), Later());
  EXPECT_FALSE(decision.ok());
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kUnavailable) << decision.status();
}

TEST_F(RulesPolicyTest, PassedDeadlineIsAnErrorAndCountsNothing) {
  auto policy = Load(R"(
[[rule]]
name = "one"
effect = "allow"
max_tokens_per_task = 1
)");
  ASSERT_NE(policy, nullptr);
  absl::StatusOr<PolicyDecision> late =
      policy->Check(TaskToken("task_a"), std::chrono::steady_clock::now());
  EXPECT_EQ(late.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_TRUE(MustDecide(*policy, TaskToken("task_a")).allow);
  // A task token without a task cannot be counted: an error, not an allow.
  PolicyInput no_task = TaskToken("");
  EXPECT_EQ(policy->Check(no_task, Later()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(RulesPolicyTest, ExpiredWindowCountersArePruned) {
  auto policy = Load(R"(
[[rule]]
name = "r"
effect = "allow"
max_issuances_per_minute = 5
)");
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
  clock_.Advance(120);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir_ + "/mandate.db").c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT count(*) FROM policy_counters", -1, &stmt, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int64(stmt, 0), 1);  // the first window's counter is gone
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

TEST_F(RulesPolicyTest, ReloadSwapsInAGoodFileAndKeepsTheLastGoodOne) {
  auto policy = Load("[[rule]]\nname = \"a\"\neffect = \"allow\"\n");
  ASSERT_NE(policy, nullptr);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);

  Write("[[rule]]\nname = \"a\"\neffect = \"deny\"\nttl = 5\n");
  absl::Status status = policy->Reload();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find(path_ + ":4:1: rule[1].ttl: unknown key"), std::string::npos)
      << status;
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);  // still the old

  std::filesystem::remove(path_);
  EXPECT_EQ(policy->Reload().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);

  Write("[[rule]]\nname = \"a\"\neffect = \"deny\"\n[[rule]]\nname = \"b\"\neffect = \"deny\"\n");
  ASSERT_TRUE(policy->Reload().ok());
  EXPECT_EQ(policy->rule_count(), 2u);
  EXPECT_FALSE(MustDecide(*policy, Input(IssuanceKind::kJwtSvid, kBot)).allow);
}

TEST_F(RulesPolicyTest, ChecksDuringReloadsSeeOneWholeRuleSet) {
  // Two files that decide alike on every rule: a Check that mixed them would see a rule name
  // of one with the effect of the other.
  const std::string allow_file = "[[rule]]\nname = \"allow-all\"\neffect = \"allow\"\n";
  const std::string deny_file = "[[rule]]\nname = \"deny-all\"\neffect = \"deny\"\n";
  auto policy = Load(allow_file);
  ASSERT_NE(policy, nullptr);
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> checkers;
  for (int t = 0; t < 4; ++t) {
    checkers.emplace_back([&] {
      while (!stop.load()) {
        absl::StatusOr<PolicyDecision> d =
            policy->Check(Input(IssuanceKind::kJwtSvid, kBot), Later());
        if (!d.ok() || (d->allow ? d->reason != "allowed by rule 'allow-all'"
                                 : d->reason != "denied by rule 'deny-all'")) {
          ++bad;
        }
      }
    });
  }
  for (int i = 0; i < 50; ++i) {
    Write(i % 2 == 0 ? deny_file : allow_file);
    EXPECT_TRUE(policy->Reload().ok());
  }
  stop = true;
  for (std::thread& thread : checkers) thread.join();
  EXPECT_EQ(bad.load(), 0);
}

// Not a test of speed (nothing is asserted on time): prints what one Check costs on a
// 50-rule file where only the last rule matches, the costliest case without caps.
TEST_F(RulesPolicyTest, CostOfACheckOnFiftyRules) {
  std::string file = "default = \"deny\"\n";
  for (int i = 0; i < 49; ++i) {
    absl::StrAppend(&file, "[[rule]]\nname = \"team-", i, "\"\n");
    switch (i % 4) {
      case 0:
        absl::StrAppend(&file, "spiffe_id = \"spiffe://example.org/team-", i, "/**\"\n");
        break;
      case 1:
        absl::StrAppend(&file, "spiffe_id = \"spiffe://example.org/agent/team-", i, "-*\"\n");
        break;
      case 2:
        absl::StrAppend(&file, "spiffe_id = \"spiffe://example.org/**/team-", i, "\"\n");
        break;
      case 3:
        absl::StrAppend(&file, "spiffe_id = \"spiffe://example.org/agent/bot\"\n",
                        "selectors = [\"k8s:ns:team-", i, "\", \"unix:uid:1000\"]\n");
        break;
    }
    absl::StrAppend(&file, "kinds = [\"task_token\", \"jwt_svid\"]\neffect = \"allow\"\n",
                    "audiences = [\"https://team-", i, ".example.org/**\"]\n", "scopes = [\"team-",
                    i, ":*\"]\nttl_max = 600\n");
  }
  absl::StrAppend(&file,
                  "[[rule]]\nname = \"bot\"\nspiffe_id = \"spiffe://example.org/agent/*\"\n"
                  "selectors = [\"unix:uid:1000\"]\neffect = \"allow\"\n"
                  "audiences = [\"https://docs.example.org/**\"]\n"
                  "scopes = [\"docs:read\", \"tickets:*\"]\nttl_max = 300\n"
                  "time_window = { days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"], "
                  "start = \"06:00\", end = \"20:00\" }\n");
  auto policy = Load(file);
  ASSERT_NE(policy, nullptr);
  ASSERT_EQ(policy->rule_count(), 50u);
  PolicyInput input = Input(IssuanceKind::kTaskToken, kBot);
  input.selectors = {"unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/bot",
                     "unix:sha256:0f3a"};
  input.audience = {"https://docs.example.org/v2"};
  input.scopes = {"docs:read", "tickets:write"};
  input.task = MakeTask("task_1");
  const auto deadline = Later();
  ASSERT_TRUE(MustDecide(*policy, input).allow);
  constexpr int kRounds = 100000;
  const auto start = std::chrono::steady_clock::now();
  int allowed = 0;
  for (int i = 0; i < kRounds; ++i) allowed += policy->Check(input, deadline)->allow ? 1 : 0;
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(allowed, kRounds);
  std::printf("rules policy: %.0f ns per Check (50 rules, last matches)\n",
              std::chrono::duration<double, std::nano>(elapsed).count() / kRounds);
}

}  // namespace
}  // namespace mandate::broker::policy
