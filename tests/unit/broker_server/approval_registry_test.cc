// Human approval of task declarations: TaskRegistry::DeclarePendingApproval and GetUsable's
// answers while pending, after approval, denial and expiry; ApprovalRegistry's listing,
// decisions, expiry sweep, audit records and the pending gauge.
#include "broker/server/approvals/approval_registry.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/approval_rules.h"
#include "broker/common/util/clock.h"
#include "broker/server/metrics/metrics.h"
#include "broker/server/tasks/task_registry.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using ::testing::HasSubstr;
using ::testing::MatchesRegex;
using ::testing::StartsWith;

constexpr char kAgent[] = "spiffe://example.org/agent/bot";
constexpr char kOtherAgent[] = "spiffe://example.org/agent/other";
constexpr char kOperator[] = "uid:1000";
constexpr int64_t kNow = 1700000000;
constexpr int64_t kApprovalTtl = 300;
constexpr char kInput[] =
    R"({"kind":"task","spiffe_id":"spiffe://example.org/agent/bot","task":{"purpose":"deploy"}})";

TaskRequest Request(int64_t ttl = 600) {
  TaskRequest request;
  request.purpose = "deploy release 7";
  request.scopes = {"deploy:prod"};
  request.audiences = {"https://deploy.example.org"};
  request.ttl_seconds = ttl;
  return request;
}

class ApprovalTest : public ::testing::Test {
 protected:
  ApprovalTest() : store_(testing::OpenStore(dir_)), clock_(kNow) {}

  store::Task DeclarePending(int64_t ttl = 600) {
    absl::StatusOr<store::Task> task =
        tasks_.DeclarePendingApproval(kAgent, entitled_, Request(ttl), kInput);
    EXPECT_TRUE(task.ok()) << task.status();
    return task.ok() ? *task : store::Task{};
  }

  std::string PendingGauge() {
    std::string text = metrics_.Render();
    size_t at = text.find("\nmandate_approvals_pending ");
    if (at == std::string::npos) return "absent";
    size_t start = at + std::string("\nmandate_approvals_pending ").size();
    return text.substr(start, text.find('\n', start) - start);
  }

  std::vector<store::AuditRecord> Audit(std::string_view event) {
    std::vector<store::AuditRecord> out;
    std::vector<store::AuditRecord> all = std::move(store_->ListAuditRecords({})).value();
    for (store::AuditRecord& r : all) {
      if (r.event == event) out.push_back(std::move(r));
    }
    return out;
  }

  testing::TempDir dir_;
  std::unique_ptr<store::SqliteStore> store_;
  FakeClock clock_;
  std::unique_ptr<AuditLog> audit_ = testing::OpenAuditLog(*store_, clock_);
  metrics::BrokerMetrics metrics_;
  std::unique_ptr<ApprovalRegistry> approvals_ =
      std::move(ApprovalRegistry::Create(*store_, *audit_, clock_, &metrics_,
                                         {.ttl_seconds = kApprovalTtl}))
          .value();
  TaskRegistry tasks_{*store_, *audit_, clock_, TaskLimits{}, approvals_.get()};
  std::vector<std::string> entitled_ = {"deploy:prod"};
};

// ---- Declaring ----

TEST_F(ApprovalTest, PendingDeclarationStoresTaskAndApprovalAndIsAudited) {
  store::Task task = DeclarePending();
  EXPECT_EQ(task.status, "pending_approval");
  EXPECT_THAT(task.approval_id, MatchesRegex("appr_[A-Za-z0-9_-]{22}"));
  EXPECT_TRUE(store::IsApprovalId(task.approval_id));
  EXPECT_EQ(*store_->GetTask(task.id), task);
  store::Approval approval = *store_->GetApproval(task.approval_id);
  EXPECT_EQ(approval.task_id, task.id);
  EXPECT_EQ(approval.spiffe_id, kAgent);
  EXPECT_EQ(approval.input_document, kInput);
  EXPECT_EQ(approval.status, "pending");
  EXPECT_EQ(approval.expires_at, kNow + kApprovalTtl);

  std::vector<store::AuditRecord> declared = Audit("task_declared");
  ASSERT_EQ(declared.size(), 1u);
  EXPECT_EQ(declared[0].outcome, "pending_approval");
  EXPECT_EQ(declared[0].task_id, task.id);
  EXPECT_THAT(declared[0].detail, HasSubstr(task.approval_id));
  EXPECT_EQ(PendingGauge(), "1");
}

TEST_F(ApprovalTest, PendingDeclarationChecksLikeDeclareAndStoresNothingWhenRefused) {
  TaskRequest bad = Request();
  bad.purpose = "evil \u202e txt";
  EXPECT_EQ(tasks_.DeclarePendingApproval(kAgent, entitled_, bad, kInput).status().code(),
            absl::StatusCode::kInvalidArgument);
  TaskRequest not_entitled = Request();
  not_entitled.scopes = {"admin:all"};
  EXPECT_EQ(tasks_.DeclarePendingApproval(kAgent, entitled_, not_entitled, kInput).status().code(),
            absl::StatusCode::kPermissionDenied);
  for (const char* document : {"", "[]", "not json", "\"text\""}) {
    EXPECT_EQ(tasks_.DeclarePendingApproval(kAgent, entitled_, Request(), document).status().code(),
              absl::StatusCode::kInvalidArgument)
        << document;
  }
  EXPECT_TRUE(store_->ListApprovals("")->empty());
  EXPECT_TRUE(store_->ListTasks("", false)->empty());
}

TEST_F(ApprovalTest, WithoutAnApprovalRegistryPendingDeclarationsAreRefused) {
  TaskRegistry plain(*store_, *audit_, clock_, TaskLimits{});
  absl::Status status = plain.DeclarePendingApproval(kAgent, entitled_, Request(), kInput).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(store_->ListTasks("", false)->empty());
}

// ---- What the agent is told ----

TEST_F(ApprovalTest, PendingTaskAnswersAuthorizationPending) {
  store::Task task = DeclarePending();
  absl::Status status = tasks_.GetUsable(kAgent, task.id).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(status.message()), StartsWith("authorization_pending"));
  EXPECT_THAT(status.message(), HasSubstr(task.approval_id));
  // Another identity still learns nothing about it.
  EXPECT_EQ(tasks_.GetUsable(kOtherAgent, task.id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ApprovalTest, ApprovedTaskIsUsableForItsWholeLifetimeFromTheApproval) {
  store::Task task = DeclarePending(/*ttl=*/600);
  clock_.Set(kNow + 250);  // the human took 250 s
  absl::StatusOr<store::DecidedApproval> decided =
      approvals_->Decide(task.approval_id, true, kOperator, "ok for release 7");
  ASSERT_TRUE(decided.ok()) << decided.status();
  EXPECT_EQ(decided->task.expires_at, kNow + 250 + 600);
  absl::StatusOr<store::Task> usable = tasks_.GetUsable(kAgent, task.id);
  ASSERT_TRUE(usable.ok()) << usable.status();
  EXPECT_EQ(usable->status, "active");
  EXPECT_EQ(usable->approval_id, task.approval_id);
  clock_.Set(kNow + 250 + 599);
  EXPECT_TRUE(tasks_.GetUsable(kAgent, task.id).ok()) << "declared lifetime not eaten by the wait";
  clock_.Set(kNow + 250 + 600);
  EXPECT_EQ(tasks_.GetUsable(kAgent, task.id).status().message(), "task expired");
  EXPECT_EQ(PendingGauge(), "0");
}

TEST_F(ApprovalTest, DeniedTaskSaysSoWithTheEscapedReason) {
  store::Task task = DeclarePending();
  ASSERT_TRUE(approvals_->Decide(task.approval_id, false, kOperator, "not \"now\"\tplease").ok());
  absl::Status status = tasks_.GetUsable(kAgent, task.id).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(status.message(), R"(task approval denied: not \"now\"\tplease)");
  store::Task other = [&] {
    store::Task t = DeclarePending();
    EXPECT_TRUE(approvals_->Decide(t.approval_id, false, kOperator, "").ok());
    return t;
  }();
  EXPECT_EQ(tasks_.GetUsable(kAgent, other.id).status().message(),
            "task approval denied: no reason given");
  // A denied task cannot be ended either (it never ran).
  EXPECT_EQ(tasks_.End(kAgent, task.id).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(ApprovalTest, UndecidedApprovalExpiresBeforeAndAfterTheSweep) {
  store::Task task = DeclarePending();
  clock_.Set(kNow + kApprovalTtl);
  // Not swept yet: the deadline alone decides.
  EXPECT_EQ(tasks_.GetUsable(kAgent, task.id).status().message(), "task approval expired");
  EXPECT_EQ(approvals_->Decide(task.approval_id, true, kOperator, "").status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::StatusOr<size_t> swept = approvals_->ExpireDue();
  ASSERT_TRUE(swept.ok()) << swept.status();
  EXPECT_EQ(*swept, 1u);
  EXPECT_EQ(store_->GetTask(task.id)->status, "denied");
  EXPECT_EQ(tasks_.GetUsable(kAgent, task.id).status().message(), "task approval expired");
  std::vector<store::AuditRecord> records = Audit("approval");
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].outcome, "expired");
  EXPECT_EQ(records[0].task_id, task.id);
  EXPECT_EQ(PendingGauge(), "0");
  EXPECT_EQ(*approvals_->ExpireDue(), 0u) << "expired once";
}

// ---- The operator's side ----

TEST_F(ApprovalTest, DecisionIsAuditedWithOperatorAndReason) {
  store::Task task = DeclarePending();
  ASSERT_TRUE(approvals_->Decide(task.approval_id, true, kOperator, "change CHG-12").ok());
  std::vector<store::AuditRecord> records = Audit("approval");
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].outcome, "approved");
  EXPECT_EQ(records[0].spiffe_id, kAgent);
  EXPECT_EQ(records[0].task_id, task.id);
  nlohmann::json detail = nlohmann::json::parse(records[0].detail);
  EXPECT_EQ(detail["approval_id"], task.approval_id);
  EXPECT_EQ(detail["decided_by"], kOperator);
  EXPECT_EQ(detail["reason"], "change CHG-12");
  EXPECT_EQ(detail["task_expires_at"], kNow + 600);
}

TEST_F(ApprovalTest, DecideValidatesOperatorInput) {
  store::Task task = DeclarePending();
  EXPECT_EQ(approvals_->Decide("appr_nope", true, kOperator, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      approvals_->Decide("appr_" + std::string(21, 'Q') + "A", true, kOperator, "").status().code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(approvals_->Decide(task.approval_id, true, "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(approvals_->Decide(task.approval_id, true, kOperator, "line\nbreak").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(approvals_->Decide(task.approval_id, true, kOperator, "bad \xff utf8").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(approvals_->Get(task.approval_id)->status, "pending") << "refusals change nothing";
  EXPECT_TRUE(Audit("approval").empty());
}

TEST_F(ApprovalTest, ConcurrentDecisionsHaveOneWinnerAndOneAuditRecord) {
  store::Task task = DeclarePending();
  std::atomic<int> wins = 0;
  std::vector<std::thread> threads;
  for (int i = 0; i < 6; ++i) {
    threads.emplace_back([&, i] {
      if (approvals_->Decide(task.approval_id, i % 2 == 0, "uid:" + std::to_string(i), "").ok()) {
        ++wins;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wins.load(), 1);
  EXPECT_EQ(Audit("approval").size(), 1u);
}

TEST_F(ApprovalTest, ListShowsEffectiveStatusesAndFilters) {
  store::Task first = DeclarePending();
  clock_.Set(kNow + 10);
  store::Task second = DeclarePending();
  clock_.Set(kNow + 20);
  store::Task third = DeclarePending();
  ASSERT_TRUE(approvals_->Decide(third.approval_id, false, kOperator, "no").ok());
  EXPECT_EQ(PendingGauge(), "2");
  clock_.Set(kNow + kApprovalTtl);  // the first one's deadline
  absl::StatusOr<std::vector<store::Approval>> pending = approvals_->List("pending");
  ASSERT_TRUE(pending.ok()) << pending.status();
  ASSERT_EQ(pending->size(), 1u);
  EXPECT_EQ((*pending)[0].id, second.approval_id);
  std::vector<store::Approval> all = *approvals_->List("");
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].status, "expired");
  EXPECT_EQ(all[1].status, "pending");
  EXPECT_EQ(all[2].status, "denied");
  EXPECT_EQ(approvals_->List("expired")->size(), 1u);
  EXPECT_EQ(approvals_->List("bogus").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(approvals_->Get(first.approval_id)->status, "expired");
  EXPECT_EQ(approvals_->Get("appr_" + std::string(21, 'Q') + "A").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(PendingGauge(), "1");
}

TEST_F(ApprovalTest, SweeperThreadExpiresAndStops) {
  store::Task task = DeclarePending();
  clock_.Set(kNow + kApprovalTtl + 1);
  approvals_->Start(std::chrono::seconds(1));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (store_->GetApproval(task.approval_id)->status != "expired" &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(store_->GetApproval(task.approval_id)->status, "expired");
  approvals_->Stop();
  approvals_->Stop();  // idempotent
}

TEST_F(ApprovalTest, TtlOutOfRangeIsRefused) {
  for (int64_t ttl : {int64_t{0}, int64_t{-5}, kMaxApprovalTtlSeconds + 1}) {
    EXPECT_EQ(ApprovalRegistry::Create(*store_, *audit_, clock_, nullptr, {.ttl_seconds = ttl})
                  .status()
                  .code(),
              absl::StatusCode::kInvalidArgument)
        << ttl;
  }
}

}  // namespace
}  // namespace mandate::broker
