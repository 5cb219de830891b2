// The fleet example shipped in deploy/examples/policy.toml (and shown in docs/policy.md) loads
// and decides as the documentation says.
#include <filesystem>

#include "rules_test_env.h"

namespace mandate::broker::policy {
namespace {

using testing::kWednesday10am;
using testing::RulesPolicyTest;

class ExamplePolicyTest : public RulesPolicyTest {
 protected:
  void SetUp() override {
    RulesPolicyTest::SetUp();
    std::filesystem::copy_file(MANDATE_EXAMPLE_POLICY, path_);
    auto policy = RulesPolicy::Load(path_, *store_, clock_, nullptr);
    ASSERT_TRUE(policy.ok()) << policy.status();
    policy_ = std::move(policy).value();
  }
  void TearDown() override {
    policy_.reset();
    RulesPolicyTest::TearDown();
  }
  PolicyDecision Decide(const PolicyInput& input) {
    absl::StatusOr<PolicyDecision> decision = policy_->Check(input, Later());
    EXPECT_TRUE(decision.ok()) << decision.status();
    return decision.value_or(PolicyDecision());
  }
  static PolicyInput Research(IssuanceKind kind) {
    PolicyInput input = Input(kind, "spiffe://example.org/agent/research/summarizer");
    input.selectors = {"unix:uid:2001", "unix:gid:2001"};
    input.task.emplace();
    input.task->id = "task_r";
    return input;
  }
  static PolicyInput Payments(IssuanceKind kind, std::string task_id) {
    PolicyInput input = Input(kind, "spiffe://example.org/agent/payments");
    input.selectors = {"unix:uid:2002"};
    input.audience = {"https://payments.example.org/api"};
    input.scopes = {"payments:refund"};
    input.task.emplace();
    input.task->id = std::move(task_id);
    return input;
  }
  std::unique_ptr<RulesPolicy> policy_;
};

TEST_F(ExamplePolicyTest, ResearchAgentIsReadOnlyWithFiveMinuteTokens) {
  PolicyInput input = Research(IssuanceKind::kTaskToken);
  input.audience = {"https://docs.example.org"};
  input.scopes = {"docs:read", "docs:write", "tickets:read"};
  PolicyDecision decision = Decide(input);
  EXPECT_TRUE(decision.allow) << decision.reason;
  EXPECT_EQ(decision.ttl_max, 300);
  EXPECT_EQ(decision.scopes, (std::vector<std::string>{"docs:read", "tickets:read"}));
  EXPECT_FALSE(decision.require_approval);

  input.scopes = {"docs:write"};
  EXPECT_FALSE(Decide(input).allow);
  input.scopes = {"docs:read"};
  input.audience = {"https://payments.example.org/api"};
  EXPECT_EQ(Decide(input).reason,
            "rule 'research-read-only': audience 'https://payments.example.org/api' is not "
            "allowed");
  // Without its uid selector the rule does not match, and nothing else does.
  input = Research(IssuanceKind::kTaskToken);
  input.selectors = {"unix:uid:0"};
  EXPECT_EQ(Decide(input).reason, "no rule matched; default deny");
}

TEST_F(ExamplePolicyTest, PaymentsAgentNeedsApprovalAndGetsThreeTokensPerTask) {
  PolicyDecision task = Decide(Payments(IssuanceKind::kTask, ""));
  EXPECT_TRUE(task.allow) << task.reason;
  EXPECT_TRUE(task.require_approval);
  for (int i = 0; i < 3; ++i) {
    PolicyDecision token = Decide(Payments(IssuanceKind::kTaskToken, "task_p1"));
    EXPECT_TRUE(token.allow) << token.reason;
    EXPECT_FALSE(token.require_approval);
  }
  PolicyDecision fourth = Decide(Payments(IssuanceKind::kTaskToken, "task_p1"));
  EXPECT_FALSE(fourth.allow);
  EXPECT_EQ(fourth.reason, "execution cap: at most 3 tokens per task (rule 'payments-approved')");
  EXPECT_TRUE(Decide(Payments(IssuanceKind::kTaskToken, "task_p2")).allow);
  // Delegation is not granted; Saturday is outside the window.
  EXPECT_FALSE(Decide(Payments(IssuanceKind::kTokenExchange, "task_p2")).allow);
  clock_.Set(kWednesday10am + 3 * 86400);
  EXPECT_FALSE(Decide(Payments(IssuanceKind::kTask, "")).allow);
}

TEST_F(ExamplePolicyTest, FleetWideRules) {
  EXPECT_TRUE(Decide(Input(IssuanceKind::kNodeSvid, "spiffe://example.org/node/join/web-1")).allow);
  PolicyDecision retired =
      Decide(Input(IssuanceKind::kX509Svid, "spiffe://example.org/agent/crawler-v1"));
  EXPECT_FALSE(retired.allow);
  EXPECT_EQ(retired.reason, "crawler-v1 is retired; deploy crawler-v2");
  PolicyInput svid = Input(IssuanceKind::kJwtSvid, "spiffe://example.org/service/web");
  svid.audience = {"spiffe://example.org/service/db"};
  PolicyDecision allowed = Decide(svid);
  EXPECT_TRUE(allowed.allow);
  EXPECT_EQ(allowed.ttl_max, 3600);
  svid.audience = {"https://elsewhere.example.com"};
  EXPECT_FALSE(Decide(svid).allow);
}

}  // namespace
}  // namespace mandate::broker::policy
