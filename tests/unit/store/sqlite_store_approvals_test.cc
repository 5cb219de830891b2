// SqliteStore approvals (schema migration 8): a task and its approval stored together, the
// decision as a compare-and-set across threads and processes, expiry, the moved task deadline,
// and the shared rules of approval_rules.h.
#include <atomic>
#include <filesystem>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/approval_rules.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kAgent[] = "spiffe://example.org/agent/bot";
constexpr int64_t kT0 = 1700000000;
constexpr int64_t kTaskLifetime = 900;
constexpr int64_t kApprovalTtl = 600;

// A valid approval id: "appr_" + 21 base64url characters + one whose low 4 bits are zero.
std::string ApprovalId(char c) { return std::string("appr_") + std::string(21, c) + "A"; }

struct Pair {
  Task task;
  Approval approval;
};

Pair MakePending(const std::string& task_id, char id_char, int64_t created_at = kT0) {
  Pair p;
  p.approval.id = ApprovalId(id_char);
  p.approval.task_id = task_id;
  p.approval.spiffe_id = kAgent;
  p.approval.input_document = R"({"kind":"task","task":{"purpose":"rotate keys"}})";
  p.approval.status = "pending";
  p.approval.created_at = created_at;
  p.approval.expires_at = created_at + kApprovalTtl;
  p.task.id = task_id;
  p.task.spiffe_id = kAgent;
  p.task.purpose = "rotate keys";
  p.task.scopes = {"keys:rotate"};
  p.task.audiences = {"https://kms.example.org"};
  p.task.status = "pending_approval";
  p.task.created_at = created_at;
  p.task.expires_at = created_at + kTaskLifetime;
  p.task.approval_id = p.approval.id;
  return p;
}

class SqliteStoreApprovalsTest : public test_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    store_ = OpenStore();
    ASSERT_NE(store_, nullptr);
  }
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(SqliteStoreApprovalsTest, CreateStoresTaskAndApprovalTogether) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  absl::StatusOr<Task> task = store_->GetTask("task_a");
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(*task, p.task);
  absl::StatusOr<Approval> approval = store_->GetApproval(p.approval.id);
  ASSERT_TRUE(approval.ok()) << approval.status();
  EXPECT_EQ(*approval, p.approval);
}

TEST_F(SqliteStoreApprovalsTest, CreateRefusesMismatchedOrMalformedPairsAndStoresNothing) {
  auto refused = [&](Pair p, std::string_view why) {
    absl::Status status = store_->CreateTaskAwaitingApproval(p.task, p.approval);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << why << ": " << status;
  };
  Pair p = MakePending("task_a", 'a');
  p.approval.id = "appr_short";
  p.task.approval_id = p.approval.id;
  refused(p, "malformed id");
  p = MakePending("task_a", 'a');
  p.task.status = "active";
  refused(p, "task not pending_approval");
  p = MakePending("task_a", 'a');
  p.task.approval_id = ApprovalId('b');
  refused(p, "task names another approval");
  p = MakePending("task_a", 'a');
  p.approval.task_id = "task_other";
  refused(p, "approval names another task");
  p = MakePending("task_a", 'a');
  p.approval.spiffe_id = "spiffe://example.org/agent/other";
  refused(p, "different owner");
  p = MakePending("task_a", 'a');
  p.approval.status = "approved";
  refused(p, "already decided");
  p = MakePending("task_a", 'a');
  p.approval.decided_by = "uid:0";
  refused(p, "carries a decider");
  p = MakePending("task_a", 'a');
  p.approval.expires_at = p.approval.created_at;
  refused(p, "no time to decide");
  p = MakePending("task_a", 'a');
  p.approval.input_document = "";
  refused(p, "no input document");
  p = MakePending("task_a", 'a');
  p.task.scopes = {""};
  refused(p, "empty scope");
  EXPECT_EQ(store_->GetTask("task_a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(*store_->ListApprovals(""), IsEmpty());
}

TEST_F(SqliteStoreApprovalsTest, CreateTaskRefusesAPendingTaskWithoutItsApproval) {
  Pair p = MakePending("task_a", 'a');
  EXPECT_EQ(store_->CreateTask(p.task).code(), absl::StatusCode::kInvalidArgument);
  p.task.status = "active";
  EXPECT_EQ(store_->CreateTask(p.task).code(), absl::StatusCode::kInvalidArgument)
      << "an approval_id without an approval row";
  EXPECT_EQ(store_->GetTask("task_a").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreApprovalsTest, DuplicateApprovalIdRollsBackItsTask) {
  Pair first = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(first.task, first.approval).ok());
  Pair second = MakePending("task_b", 'a');  // same approval id, new task
  absl::Status status = store_->CreateTaskAwaitingApproval(second.task, second.approval);
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists) << status;
  EXPECT_EQ(store_->GetTask("task_b").status().code(), absl::StatusCode::kNotFound)
      << "the task insert must roll back with the approval";
  Pair third = MakePending("task_a", 'c');  // same task id
  EXPECT_EQ(store_->CreateTaskAwaitingApproval(third.task, third.approval).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(store_->GetApproval(third.approval.id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreApprovalsTest, ApproveActivatesTheTaskWithItsFullLifetimeFromNow) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  const int64_t now = kT0 + 500;  // a human took 500 s
  absl::StatusOr<DecidedApproval> decided =
      store_->DecideApproval(p.approval.id, true, "uid:1000", "looks fine", now);
  ASSERT_TRUE(decided.ok()) << decided.status();
  EXPECT_EQ(decided->approval.status, "approved");
  EXPECT_EQ(decided->approval.decided_at, now);
  EXPECT_EQ(decided->approval.decided_by, "uid:1000");
  EXPECT_EQ(decided->approval.reason, "looks fine");
  EXPECT_EQ(decided->task.status, "active");
  EXPECT_EQ(decided->task.expires_at, now + kTaskLifetime);
  EXPECT_EQ(decided->task.approval_id, p.approval.id);
  // As stored, not only as returned.
  EXPECT_EQ(*store_->GetTask("task_a"), decided->task);
  EXPECT_EQ(*store_->GetApproval(p.approval.id), decided->approval);
  // An approved task ends like any active one.
  EXPECT_TRUE(store_->EndTask("task_a", now + 10).ok());
}

TEST_F(SqliteStoreApprovalsTest, DenyDeniesTheTaskAndKeepsItsDeadline) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  absl::StatusOr<DecidedApproval> decided =
      store_->DecideApproval(p.approval.id, false, "uid:0", "not today", kT0 + 5);
  ASSERT_TRUE(decided.ok()) << decided.status();
  EXPECT_EQ(decided->approval.status, "denied");
  EXPECT_EQ(decided->task.status, "denied");
  EXPECT_EQ(store_->GetTask("task_a")->expires_at, kT0 + kTaskLifetime);
  EXPECT_EQ(store_->EndTask("task_a", kT0 + 6).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(SqliteStoreApprovalsTest, SecondDecisionIsRefusedAndChangesNothing) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  ASSERT_TRUE(store_->DecideApproval(p.approval.id, true, "uid:1000", "", kT0 + 1).ok());
  absl::StatusOr<DecidedApproval> again =
      store_->DecideApproval(p.approval.id, false, "uid:1001", "changed my mind", kT0 + 2);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr("already approved"));
  Approval stored = *store_->GetApproval(p.approval.id);
  EXPECT_EQ(stored.status, "approved");
  EXPECT_EQ(stored.decided_by, "uid:1000");
  EXPECT_EQ(store_->GetTask("task_a")->status, "active");
}

TEST_F(SqliteStoreApprovalsTest, DecisionAtOrAfterExpiryIsRefused) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  absl::StatusOr<DecidedApproval> late =
      store_->DecideApproval(p.approval.id, true, "uid:1000", "", p.approval.expires_at);
  EXPECT_EQ(late.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(late.status().message(), HasSubstr("expired"));
  EXPECT_EQ(store_->GetApproval(p.approval.id)->status, "pending") << "not swept yet";
  EXPECT_EQ(store_->GetTask("task_a")->status, "pending_approval");
  // One second earlier it is still decidable.
  EXPECT_TRUE(
      store_->DecideApproval(p.approval.id, true, "uid:1000", "", p.approval.expires_at - 1).ok());
}

TEST_F(SqliteStoreApprovalsTest, DecideValidatesItsInputAndKnowsUnknownIds) {
  EXPECT_EQ(store_->DecideApproval(ApprovalId('z'), true, "uid:0", "", kT0).status().code(),
            absl::StatusCode::kNotFound);
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  EXPECT_EQ(store_->DecideApproval(p.approval.id, true, "", "", kT0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_
                ->DecideApproval(p.approval.id, true, "uid:0",
                                 std::string(kMaxApprovalReasonBytes + 1, 'x'), kT0)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetApproval(p.approval.id)->status, "pending");
}

TEST_F(SqliteStoreApprovalsTest, ConcurrentDecidersOnOneStoreExactlyOneWins) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  std::atomic<int> wins = 0, refused = 0;
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      absl::StatusOr<DecidedApproval> r = store_->DecideApproval(
          p.approval.id, i % 2 == 0, "uid:" + std::to_string(i), "", kT0 + 1);
      if (r.ok()) {
        ++wins;
      } else if (absl::IsFailedPrecondition(r.status())) {
        ++refused;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(wins.load(), 1);
  EXPECT_EQ(refused.load(), 7);
  Approval stored = *store_->GetApproval(p.approval.id);
  Task task = *store_->GetTask("task_a");
  // The task follows the one decision that won.
  EXPECT_EQ(task.status, stored.status == "approved" ? "active" : "denied");
}

TEST_F(SqliteStoreApprovalsTest, ConcurrentDecidersInTwoConnectionsExactlyOneWins) {
  // Two stores on one file behave like two brokers (or processes) sharing the database: the
  // compare-and-set must hold in SQLite, not only under the store's own mutex.
  std::unique_ptr<SqliteStore> other = OpenStore();
  ASSERT_NE(other, nullptr);
  for (int round = 0; round < 10; ++round) {
    Pair p = MakePending("task_" + std::to_string(round), static_cast<char>('a' + round));
    ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
    absl::StatusOr<DecidedApproval> first, second;
    std::thread a([&] { first = store_->DecideApproval(p.approval.id, true, "uid:1", "", kT0); });
    std::thread b([&] { second = other->DecideApproval(p.approval.id, false, "uid:2", "", kT0); });
    a.join();
    b.join();
    ASSERT_NE(first.ok(), second.ok()) << first.status() << " / " << second.status();
    const absl::Status& loser = first.ok() ? second.status() : first.status();
    EXPECT_EQ(loser.code(), absl::StatusCode::kFailedPrecondition) << loser;
    const DecidedApproval& winner = first.ok() ? *first : *second;
    EXPECT_EQ(store_->GetApproval(p.approval.id)->decided_by, winner.approval.decided_by);
    EXPECT_EQ(other->GetTask(p.task.id)->status, winner.task.status);
  }
}

TEST_F(SqliteStoreApprovalsTest, ExpireSweepsOnlyPendingApprovalsPastTheirDeadline) {
  Pair early = MakePending("task_early", 'a', kT0);
  Pair late = MakePending("task_late", 'b', kT0 + 300);
  Pair decided = MakePending("task_decided", 'c', kT0);
  for (const Pair* p : {&early, &late, &decided}) {
    ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p->task, p->approval).ok());
  }
  ASSERT_TRUE(store_->DecideApproval(decided.approval.id, true, "uid:0", "", kT0 + 1).ok());

  const int64_t now = kT0 + kApprovalTtl;  // early's deadline, exactly
  absl::StatusOr<std::vector<Approval>> expired = store_->ExpireApprovals(now);
  ASSERT_TRUE(expired.ok()) << expired.status();
  ASSERT_EQ(expired->size(), 1u);
  EXPECT_EQ((*expired)[0].id, early.approval.id);
  EXPECT_EQ((*expired)[0].status, "expired");
  EXPECT_EQ((*expired)[0].decided_at, now);
  EXPECT_EQ(store_->GetTask("task_early")->status, "denied");
  EXPECT_EQ(store_->GetTask("task_late")->status, "pending_approval");
  EXPECT_EQ(store_->GetApproval(decided.approval.id)->status, "approved");
  EXPECT_EQ(store_->GetTask("task_decided")->status, "active");
  // A second sweep finds nothing new: each expiry is reported once.
  EXPECT_THAT(*store_->ExpireApprovals(now), IsEmpty());
  // An expired approval cannot be decided.
  absl::StatusOr<DecidedApproval> r =
      store_->DecideApproval(early.approval.id, true, "uid:0", "", now - 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("expired"));
}

TEST_F(SqliteStoreApprovalsTest, ListFiltersByStatusInCreationOrder) {
  Pair a = MakePending("task_a", 'a', kT0 + 2);
  Pair b = MakePending("task_b", 'b', kT0 + 1);
  Pair c = MakePending("task_c", 'c', kT0 + 3);
  for (const Pair* p : {&a, &b, &c}) {
    ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p->task, p->approval).ok());
  }
  ASSERT_TRUE(store_->DecideApproval(c.approval.id, false, "uid:0", "no", kT0 + 4).ok());
  auto ids = [](const std::vector<Approval>& list) {
    std::vector<std::string> out;
    for (const Approval& x : list) out.push_back(x.task_id);
    return out;
  };
  EXPECT_THAT(ids(*store_->ListApprovals("")), ElementsAre("task_b", "task_a", "task_c"));
  EXPECT_THAT(ids(*store_->ListApprovals("pending")), ElementsAre("task_b", "task_a"));
  EXPECT_THAT(ids(*store_->ListApprovals("denied")), ElementsAre("task_c"));
  EXPECT_THAT(*store_->ListApprovals("approved"), IsEmpty());
}

TEST_F(SqliteStoreApprovalsTest, ApprovalsSurviveReopen) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  ASSERT_TRUE(store_->DecideApproval(p.approval.id, true, "uid:7", "ok", kT0 + 9).ok());
  store_.reset();
  store_ = OpenStore();
  ASSERT_NE(store_, nullptr);
  Approval stored = *store_->GetApproval(p.approval.id);
  EXPECT_EQ(stored.status, "approved");
  EXPECT_EQ(stored.decided_by, "uid:7");
  EXPECT_EQ(store_->GetTask("task_a")->expires_at, kT0 + 9 + kTaskLifetime);
}

TEST_F(SqliteStoreApprovalsTest, MigrationKeepsOlderTasksWithoutApproval) {
  // A store at version 6 (before approvals) with a task, then opened by this build.
  store_.reset();
  std::filesystem::remove(path_);
  {
    auto migrations = SqliteSchemaMigrations().first(6);
    auto old = SqliteStore::OpenWithMigrationsForTesting(path_, migrations);
    ASSERT_TRUE(old.ok()) << old.status();
  }
  ExecRaw(
      "INSERT INTO tasks (id, spiffe_id, purpose, status, created_at, expires_at, ended_at) "
      "VALUES ('task_old', 'spiffe://example.org/agent/bot', 'p', 'active', 1, 2, 0)");
  store_ = OpenStore();
  ASSERT_NE(store_, nullptr);
  EXPECT_EQ(*store_->SchemaVersion(), SqliteStore::LatestSchemaVersion());
  absl::StatusOr<Task> task = store_->GetTask("task_old");
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->approval_id, "");
  EXPECT_THAT(*store_->ListApprovals(""), IsEmpty());
}

TEST_F(SqliteStoreApprovalsTest, DeletingATaskDeletesItsApproval) {
  Pair p = MakePending("task_a", 'a');
  ASSERT_TRUE(store_->CreateTaskAwaitingApproval(p.task, p.approval).ok());
  ExecRaw("PRAGMA foreign_keys=ON; DELETE FROM tasks WHERE id = 'task_a'");
  EXPECT_EQ(store_->GetApproval(p.approval.id).status().code(), absl::StatusCode::kNotFound);
}

// ---- approval_rules.h ----

TEST(ApprovalRulesTest, IdFormat) {
  EXPECT_TRUE(IsApprovalId(ApprovalId('a')));
  EXPECT_TRUE(IsApprovalId("appr_AAAAAAAAAAAAAAAAAAAAAA"));
  EXPECT_TRUE(IsApprovalId("appr_" + std::string(21, '-') + "w"));
  EXPECT_TRUE(IsApprovalId("appr_" + std::string(21, '_') + "g"));
  EXPECT_FALSE(IsApprovalId("appr_AAAAAAAAAAAAAAAAAAAAAB")) << "stray low bits";
  EXPECT_FALSE(IsApprovalId("appr_AAAAAAAAAAAAAAAAAAAAA")) << "21 characters";
  EXPECT_FALSE(IsApprovalId("appr_AAAAAAAAAAAAAAAAAAAAAAA")) << "23 characters";
  EXPECT_FALSE(IsApprovalId("task_AAAAAAAAAAAAAAAAAAAAAA"));
  EXPECT_FALSE(IsApprovalId("appr_AAAAAAAAAAAAAAAAAAAA+A"));
  EXPECT_FALSE(IsApprovalId("appr_AAAAAAAAAAAAAAAAAAAA=="));
  EXPECT_FALSE(IsApprovalId(""));
}

TEST(ApprovalRulesTest, ApprovedTaskKeepsItsDeclaredLifetime) {
  Task task;
  task.created_at = 100;
  task.expires_at = 1000;
  EXPECT_EQ(ApprovedTaskExpiry(task, 400), 1300);
  task.expires_at = 50;  // corrupt: no lifetime left, never a negative one
  EXPECT_EQ(ApprovedTaskExpiry(task, 400), 400);
  task.created_at = 0;
  task.expires_at = std::numeric_limits<int64_t>::max();
  EXPECT_EQ(ApprovedTaskExpiry(task, 10), std::numeric_limits<int64_t>::max()) << "saturates";
}

TEST(ApprovalRulesTest, EffectiveStatusAndOpenness) {
  Approval a;
  a.id = ApprovalId('a');
  a.status = "pending";
  a.expires_at = 100;
  EXPECT_TRUE(ApprovalIsOpen(a, 99));
  EXPECT_FALSE(ApprovalIsOpen(a, 100));
  EXPECT_EQ(EffectiveApprovalStatus(a, 99), "pending");
  EXPECT_EQ(EffectiveApprovalStatus(a, 100), "expired");
  EXPECT_THAT(CheckApprovalOpen(a, 100).message(), HasSubstr("expired"));
  a.status = "denied";
  EXPECT_EQ(EffectiveApprovalStatus(a, 0), "denied");
  EXPECT_THAT(CheckApprovalOpen(a, 0).message(), HasSubstr("already denied"));
}

}  // namespace
}  // namespace mandate::store
