// TaskRegistry: validation of declarations, scope grants, lifetimes, ownership and ending.
#include "broker/server/tasks/task_registry.h"

#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/util/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

constexpr char kAgent[] = "spiffe://example.org/agent/bot";
constexpr char kOtherAgent[] = "spiffe://example.org/agent/other";
constexpr int64_t kNow = 1700000000;

TaskRequest ValidRequest() {
  TaskRequest request;
  request.purpose = "triage ticket #42";
  request.scopes = {"tickets:read"};
  request.audiences = {"https://tickets.example.org"};
  return request;
}

class TaskRegistryTest : public ::testing::Test {
 protected:
  TaskRegistryTest() : store_(testing::OpenStore(dir_)), clock_(kNow) {}

  TaskRegistry MakeRegistry(TaskLimits limits = {}) {
    return TaskRegistry(*store_, *audit_, clock_, limits);
  }

  // The status code and message of declaring `request` with a broad entitlement.
  absl::Status DeclareStatus(const TaskRequest& request) {
    return registry_.Declare(kAgent, entitled_, request).status();
  }

  testing::TempDir dir_;
  std::unique_ptr<store::SqliteStore> store_;
  FakeClock clock_;
  std::unique_ptr<AuditLog> audit_ = testing::OpenAuditLog(*store_, clock_);
  TaskRegistry registry_{*store_, *audit_, clock_, TaskLimits{}};
  std::vector<std::string> entitled_ = {"tickets:read", "tickets:write", "repo:read"};
};

// ---- Declaring ----

TEST_F(TaskRegistryTest, DeclarationsRefusalsAndEndingsAreAudited) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  TaskRequest nothing_granted = ValidRequest();
  nothing_granted.scopes = {"admin:all"};
  ASSERT_FALSE(registry_.Declare(kAgent, entitled_, nothing_granted).ok());
  ASSERT_TRUE(registry_.End(kAgent, task->id).ok());
  auto records = std::move(store_->ListAuditRecords({})).value();
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].event, "task_declared");
  EXPECT_EQ(records[0].outcome, "ok");
  EXPECT_EQ(records[0].spiffe_id, kAgent);
  EXPECT_EQ(records[0].task_id, task->id);
  EXPECT_NE(records[0].detail.find("triage ticket #42"), std::string::npos);
  EXPECT_EQ(records[1].event, "task_declared");
  EXPECT_EQ(records[1].outcome, "denied");
  EXPECT_NE(records[1].detail.find("admin:all"), std::string::npos);
  EXPECT_EQ(records[2].event, "task_ended");
  EXPECT_EQ(records[2].task_id, task->id);
}

TEST_F(TaskRegistryTest, DeclareStoresActiveTaskOwnedByCaller) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->spiffe_id, kAgent);
  EXPECT_EQ(task->status, "active");
  EXPECT_EQ(task->purpose, "triage ticket #42");
  EXPECT_THAT(task->audiences, ElementsAre("https://tickets.example.org"));
  EXPECT_EQ(task->created_at, kNow);
  EXPECT_EQ(task->ended_at, 0);
  // Durable: the store holds exactly what was returned.
  absl::StatusOr<store::Task> stored = store_->GetTask(task->id);
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(*stored, *task);
}

TEST_F(TaskRegistryTest, TaskIdIsTaskPrefixPlus128RandomBitsInBase64Url) {
  std::set<std::string> ids;
  for (int i = 0; i < 20; ++i) {
    absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
    ASSERT_TRUE(task.ok()) << task.status();
    EXPECT_THAT(task->id, MatchesRegex("task_[A-Za-z0-9_-]{22}"));
    ids.insert(task->id);
  }
  EXPECT_EQ(ids.size(), 20u);
}

TEST_F(TaskRegistryTest, GrantedScopesAreRequestedWithinEntitlementInRequestOrder) {
  TaskRequest request = ValidRequest();
  request.scopes = {"tickets:write", "admin:all", "repo:read", "tickets:write", "tickets:read"};
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, request);
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_THAT(task->scopes, ElementsAre("tickets:write", "repo:read", "tickets:read"));
  EXPECT_THAT(store_->GetTask(task->id)->scopes,
              ElementsAre("tickets:write", "repo:read", "tickets:read"));
}

TEST_F(TaskRegistryTest, AudiencesKeepRequestOrderWithoutDuplicates) {
  TaskRequest request = ValidRequest();
  request.audiences = {"https://b.example", "https://a.example", "https://b.example"};
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, request);
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_THAT(task->audiences, ElementsAre("https://b.example", "https://a.example"));
}

TEST_F(TaskRegistryTest, DeclareRefusesWhenNoRequestedScopeIsEntitled) {
  TaskRequest request = ValidRequest();
  request.scopes = {"admin:all", "billing:write"};
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, request);
  EXPECT_EQ(task.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(task.status().message(),
            "none of the requested scopes is granted to spiffe://example.org/agent/bot");
  EXPECT_TRUE(store_->ListTasks("", false)->empty());
}

TEST_F(TaskRegistryTest, DeclareWithEmptyEntitlementIsRefused) {
  EXPECT_EQ(registry_.Declare(kAgent, {}, ValidRequest()).status().code(),
            absl::StatusCode::kPermissionDenied);
}

// ---- Lifetimes ----

TEST_F(TaskRegistryTest, ZeroTtlGetsTheDefaultFifteenMinutes) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->expires_at, kNow + 900);
}

TEST_F(TaskRegistryTest, RequestedTtlWithinMaximumIsKept) {
  TaskRequest request = ValidRequest();
  request.ttl_seconds = 3600;
  EXPECT_EQ(registry_.Declare(kAgent, entitled_, request)->expires_at, kNow + 3600);
}

TEST_F(TaskRegistryTest, TtlIsCappedAtEightHoursByDefault) {
  TaskRequest request = ValidRequest();
  request.ttl_seconds = 30 * 24 * 3600;
  EXPECT_EQ(registry_.Declare(kAgent, entitled_, request)->expires_at, kNow + 8 * 3600);
}

TEST_F(TaskRegistryTest, ConfiguredMaximumCapsRequestedAndDefaultTtl) {
  TaskRegistry registry = MakeRegistry({.default_ttl_seconds = 900, .max_ttl_seconds = 600});
  TaskRequest request = ValidRequest();
  request.ttl_seconds = 601;
  EXPECT_EQ(registry.Declare(kAgent, entitled_, request)->expires_at, kNow + 600);
  request.ttl_seconds = 0;
  EXPECT_EQ(registry.Declare(kAgent, entitled_, request)->expires_at, kNow + 600);
}

TEST_F(TaskRegistryTest, HugeTtlDoesNotOverflow) {
  TaskRequest request = ValidRequest();
  request.ttl_seconds = INT64_MAX;
  EXPECT_EQ(registry_.Declare(kAgent, entitled_, request)->expires_at, kNow + 8 * 3600);
}

TEST_F(TaskRegistryTest, TaskIsUsableUntilTheSecondBeforeItsDeadline) {
  TaskRequest request = ValidRequest();
  request.ttl_seconds = 60;
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, request);
  ASSERT_TRUE(task.ok()) << task.status();
  clock_.Set(kNow + 59);
  EXPECT_TRUE(registry_.GetUsable(kAgent, task->id).ok());
  clock_.Set(kNow + 60);
  absl::StatusOr<store::Task> expired = registry_.GetUsable(kAgent, task->id);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(expired.status().message(), "task expired");
}

// ---- Ownership and ending ----

TEST_F(TaskRegistryTest, GetUsableReturnsTheCallersTask) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  absl::StatusOr<store::Task> usable = registry_.GetUsable(kAgent, task->id);
  ASSERT_TRUE(usable.ok()) << usable.status();
  EXPECT_EQ(*usable, *task);
}

TEST_F(TaskRegistryTest, AnotherIdentitysTaskLooksExactlyLikeAnUnknownOne) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  absl::Status foreign = registry_.GetUsable(kOtherAgent, task->id).status();
  absl::Status unknown = registry_.GetUsable(kOtherAgent, "task_AAAAAAAAAAAAAAAAAAAAAA").status();
  EXPECT_EQ(foreign.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(foreign, unknown);
  EXPECT_EQ(registry_.End(kOtherAgent, task->id).status(), unknown);
  // The foreign End changed nothing.
  EXPECT_EQ(store_->GetTask(task->id)->status, "active");
}

TEST_F(TaskRegistryTest, EndedTaskIsNoLongerUsable) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  clock_.Advance(30);
  absl::StatusOr<store::Task> ended = registry_.End(kAgent, task->id);
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_EQ(ended->status, "ended");
  EXPECT_EQ(ended->ended_at, kNow + 30);
  absl::StatusOr<store::Task> usable = registry_.GetUsable(kAgent, task->id);
  EXPECT_EQ(usable.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(usable.status().message(), "task ended");
}

TEST_F(TaskRegistryTest, EndingTwiceIsFailedPrecondition) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  ASSERT_TRUE(registry_.End(kAgent, task->id).ok());
  absl::Status again = registry_.End(kAgent, task->id).status();
  EXPECT_EQ(again.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(again.message(), "task ended");
}

TEST_F(TaskRegistryTest, ExpiredTaskCanStillBeEnded) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  clock_.Advance(10000);
  absl::StatusOr<store::Task> ended = registry_.End(kAgent, task->id);
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_EQ(ended->status, "ended");
}

TEST_F(TaskRegistryTest, TaskWithAnyOtherStatusIsNotUsable) {
  store::Task pending;
  pending.id = "task_pending";
  pending.spiffe_id = kAgent;
  pending.purpose = "wait for a human";
  pending.scopes = {"tickets:read"};
  pending.audiences = {"https://tickets.example.org"};
  pending.status = "revoked";  // a status this code does not know yet
  pending.created_at = kNow;
  pending.expires_at = kNow + 900;
  ASSERT_TRUE(store_->CreateTask(pending).ok());
  absl::Status status = registry_.GetUsable(kAgent, "task_pending").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(status.message(), "task is revoked");
}

TEST_F(TaskRegistryTest, TasksSurviveANewRegistryOnTheSameStore) {
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, ValidRequest());
  ASSERT_TRUE(task.ok()) << task.status();
  TaskRegistry fresh = MakeRegistry();
  EXPECT_TRUE(fresh.GetUsable(kAgent, task->id).ok());
}

// ---- Validation: each rule ----

void ExpectInvalid(const absl::Status& status, const std::string& message_part) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr(message_part));
}

TEST_F(TaskRegistryTest, EmptyPurposeIsRefused) {
  TaskRequest request = ValidRequest();
  request.purpose = "";
  ExpectInvalid(DeclareStatus(request), "task purpose is empty");
}

TEST_F(TaskRegistryTest, PurposeLongerThanLimitIsRefused) {
  TaskRequest request = ValidRequest();
  request.purpose = std::string(512, 'p');
  EXPECT_TRUE(DeclareStatus(request).ok());
  request.purpose = std::string(513, 'p');
  ExpectInvalid(DeclareStatus(request), "at most 512");
}

TEST_F(TaskRegistryTest, PurposeWithNewlineIsRefused) {
  TaskRequest request = ValidRequest();
  request.purpose = "fix bug\nAPPROVED BY ADMIN";
  ExpectInvalid(DeclareStatus(request), "control character at byte 7");
}

TEST_F(TaskRegistryTest, PurposeWithOtherControlCharactersIsRefused) {
  for (std::string bad : {std::string("a\rb"), std::string("a\x1b[31mred"), std::string("a\x7f"),
                          std::string("nul\0x", 5), std::string("c1 \xc2\x85 nel")}) {
    TaskRequest request = ValidRequest();
    request.purpose = bad;
    ExpectInvalid(DeclareStatus(request), "control character");
  }
}

TEST_F(TaskRegistryTest, PurposeMayHoldTabsAndNonAsciiText) {
  TaskRequest request = ValidRequest();
  request.purpose = "r\xc3\xa9sum\xc3\xa9\tr\xc3\xa9vision \xe2\x9c\x93";
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, request);
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->purpose, request.purpose);
}

TEST_F(TaskRegistryTest, PurposeThatIsNotUtf8IsRefused) {
  for (std::string bad :
       {std::string("bad \xff byte"), std::string("truncated \xe2\x9c"),
        std::string("overlong \xc0\xaf"), std::string("surrogate \xed\xa0\x80")}) {
    TaskRequest request = ValidRequest();
    request.purpose = bad;
    ExpectInvalid(DeclareStatus(request), "not valid UTF-8");
  }
}

TEST_F(TaskRegistryTest, PurposeWithBidiOverrideIsRefused) {
  TaskRequest request = ValidRequest();
  request.purpose =
      "read \xe2\x80\xae"
      "etirw";  // U+202E RIGHT-TO-LEFT OVERRIDE
  ExpectInvalid(DeclareStatus(request), "bidirectional");
}

TEST_F(TaskRegistryTest, RequestWithoutScopesIsRefused) {
  TaskRequest request = ValidRequest();
  request.scopes = {};
  ExpectInvalid(DeclareStatus(request), "task requests no scope");
}

TEST_F(TaskRegistryTest, ScopeThatIsNotAScopeTokenIsRefused) {
  for (std::string bad : {std::string(""), std::string("tickets read"), std::string("a\"b"),
                          std::string("a\\b"), std::string("caf\xc3\xa9"), std::string("a\tb")}) {
    TaskRequest request = ValidRequest();
    request.scopes = {"tickets:read", bad};
    ExpectInvalid(DeclareStatus(request), "task scope #2 is not an RFC 6749 scope-token");
  }
}

TEST_F(TaskRegistryTest, ScopeTokenMayUseEveryAllowedCharacter) {
  std::string every;
  for (int c = 0x21; c <= 0x7e; ++c) {
    if (c != '"' && c != '\\') every.push_back(static_cast<char>(c));
  }
  entitled_.push_back(every);
  TaskRequest request = ValidRequest();
  request.scopes = {every};
  absl::StatusOr<store::Task> task = registry_.Declare(kAgent, entitled_, request);
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_THAT(task->scopes, ElementsAre(every));
}

TEST_F(TaskRegistryTest, OverlongScopeIsRefused) {
  TaskRequest request = ValidRequest();
  request.scopes = {std::string(kMaxTaskScopeBytes + 1, 's')};
  ExpectInvalid(DeclareStatus(request), "task scope #1 is 513 bytes long");
}

TEST_F(TaskRegistryTest, TooManyScopesAreRefused) {
  TaskRegistry registry = MakeRegistry({.max_scopes = 2});
  TaskRequest request = ValidRequest();
  request.scopes = {"tickets:read", "tickets:write"};
  EXPECT_TRUE(registry.Declare(kAgent, entitled_, request).ok());
  request.scopes.push_back("repo:read");
  ExpectInvalid(registry.Declare(kAgent, entitled_, request).status(),
                "task requests 3 scopes; at most 2");
}

TEST_F(TaskRegistryTest, RequestWithoutAudienceIsRefused) {
  TaskRequest request = ValidRequest();
  request.audiences = {};
  ExpectInvalid(DeclareStatus(request), "task names no audience");
}

TEST_F(TaskRegistryTest, TooManyAudiencesAreRefused) {
  TaskRegistry registry = MakeRegistry({.max_audiences = 1});
  TaskRequest request = ValidRequest();
  request.audiences = {"https://a", "https://b"};
  ExpectInvalid(registry.Declare(kAgent, entitled_, request).status(),
                "task names 2 audiences; at most 1");
}

TEST_F(TaskRegistryTest, EmptyAudienceIsRefused) {
  TaskRequest request = ValidRequest();
  request.audiences = {"https://a", ""};
  ExpectInvalid(DeclareStatus(request), "task audience #2 is empty");
}

TEST_F(TaskRegistryTest, AudienceLongerThan512BytesIsRefused) {
  TaskRequest request = ValidRequest();
  request.audiences = {std::string(512, 'a')};
  EXPECT_TRUE(DeclareStatus(request).ok());
  request.audiences = {std::string(513, 'a')};
  ExpectInvalid(DeclareStatus(request), "task audience #1 is 513 bytes long");
}

TEST_F(TaskRegistryTest, AudienceWithControlCharacterOrBadUtf8IsRefused) {
  TaskRequest request = ValidRequest();
  request.audiences = {"https://a\n.example"};
  ExpectInvalid(DeclareStatus(request), "task audience #1 holds a control character");
  request.audiences = {"https://\xff.example"};
  ExpectInvalid(DeclareStatus(request), "task audience #1 is not valid UTF-8");
}

TEST_F(TaskRegistryTest, NegativeTtlIsRefused) {
  TaskRequest request = ValidRequest();
  request.ttl_seconds = -1;
  ExpectInvalid(DeclareStatus(request), "task ttl is negative");
}

TEST_F(TaskRegistryTest, RefusedDeclarationStoresNothing) {
  TaskRequest request = ValidRequest();
  request.purpose = "";
  ASSERT_FALSE(DeclareStatus(request).ok());
  EXPECT_TRUE(store_->ListTasks("", false)->empty());
}

store::Task TaskWith(std::vector<std::string> scopes, std::vector<std::string> audiences) {
  store::Task task;
  task.id = "task_x";
  task.scopes = std::move(scopes);
  task.audiences = std::move(audiences);
  return task;
}

TEST(TokenScopesForTaskTest, EmptyRequestGrantsAllTaskScopes) {
  auto granted = TokenScopesForTask(TaskWith({"a", "b"}, {"aud"}), "aud", {});
  ASSERT_TRUE(granted.ok()) << granted.status();
  EXPECT_THAT(*granted, ElementsAre("a", "b"));
}

TEST(TokenScopesForTaskTest, SubsetIsGrantedInTaskOrderWithoutDuplicates) {
  auto granted = TokenScopesForTask(TaskWith({"a", "b", "c"}, {"x", "y"}), "y", {"c", "a", "c"});
  ASSERT_TRUE(granted.ok()) << granted.status();
  EXPECT_THAT(*granted, ElementsAre("a", "c"));
}

TEST(TokenScopesForTaskTest, RefusesAudienceOutsideTheTask) {
  auto granted = TokenScopesForTask(TaskWith({"a"}, {"aud"}), "other", {});
  EXPECT_EQ(granted.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(granted.status().message(), HasSubstr("audience outside the task"));
}

TEST(TokenScopesForTaskTest, RefusesScopeOutsideTheTaskNamingItsPosition) {
  auto granted = TokenScopesForTask(TaskWith({"a", "b"}, {"aud"}), "aud", {"a", "admin"});
  EXPECT_EQ(granted.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(granted.status().message(), HasSubstr("scope outside the task (scope 2)"));
  EXPECT_THAT(granted.status().message(), ::testing::Not(HasSubstr("admin")));
}

}  // namespace
}  // namespace mandate::broker
