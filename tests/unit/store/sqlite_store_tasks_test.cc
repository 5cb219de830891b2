// SqliteStore tasks: create/get/end/list, ordered deduplicated lists, durability across reopen,
// and schema migration 4 (tasks) on new and existing databases.
#include <atomic>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/sqlite_migrations.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::mandate::store::test_util::MakeEntry;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

constexpr char kAgent[] = "spiffe://example.org/agent/bot";
constexpr char kOtherAgent[] = "spiffe://example.org/agent/other";
constexpr char kNode[] = "spiffe://example.org/node/join/web-1";

Task MakeTask(std::string id, std::string spiffe_id = kAgent, int64_t created_at = 1700000000) {
  Task task;
  task.id = std::move(id);
  task.spiffe_id = std::move(spiffe_id);
  task.purpose = "triage ticket #42";
  task.scopes = {"tickets:write", "tickets:read"};
  task.audiences = {"https://tickets.example.org", "https://audit.example.org"};
  task.status = "active";
  task.created_at = created_at;
  task.expires_at = created_at + 900;
  return task;
}

std::vector<std::string> Ids(const std::vector<Task>& tasks) {
  std::vector<std::string> ids;
  for (const Task& task : tasks) ids.push_back(task.id);
  return ids;
}

class SqliteStoreTasksTest : public test_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    store_ = OpenStore();
    ASSERT_NE(store_, nullptr);
  }
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(SqliteStoreTasksTest, CreateThenGetRoundTripsEveryField) {
  Task task = MakeTask("task_a");
  task.ended_at = 0;
  ASSERT_TRUE(store_->CreateTask(task).ok());
  absl::StatusOr<Task> got = store_->GetTask("task_a");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, task);
}

TEST_F(SqliteStoreTasksTest, ScopesAndAudiencesKeepRequestOrderWithoutDuplicates) {
  Task task = MakeTask("task_a");
  task.scopes = {"z:write", "a:read", "z:write", "m:list", "a:read"};
  task.audiences = {"https://b", "https://a", "https://b"};
  ASSERT_TRUE(store_->CreateTask(task).ok());
  absl::StatusOr<Task> got = store_->GetTask("task_a");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(got->scopes, ElementsAre("z:write", "a:read", "m:list"));
  EXPECT_THAT(got->audiences, ElementsAre("https://b", "https://a"));
}

TEST_F(SqliteStoreTasksTest, PurposeWithSqlAndControlBytesIsStoredVerbatim) {
  Task task = MakeTask("task_'; DROP TABLE tasks; --");
  task.purpose = std::string("quote ' \" \\ nul \0 end", 22);
  ASSERT_TRUE(store_->CreateTask(task).ok());
  absl::StatusOr<Task> got = store_->GetTask(task.id);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->purpose, task.purpose);
}

TEST_F(SqliteStoreTasksTest, CreateRejectsEmptyRequiredFields) {
  Task no_id = MakeTask("");
  EXPECT_EQ(store_->CreateTask(no_id).code(), absl::StatusCode::kInvalidArgument);
  Task no_owner = MakeTask("task_a", "");
  EXPECT_EQ(store_->CreateTask(no_owner).code(), absl::StatusCode::kInvalidArgument);
  Task no_status = MakeTask("task_a");
  no_status.status = "";
  EXPECT_EQ(store_->CreateTask(no_status).code(), absl::StatusCode::kInvalidArgument);
  Task empty_scope = MakeTask("task_a");
  empty_scope.scopes = {"a", ""};
  EXPECT_EQ(store_->CreateTask(empty_scope).code(), absl::StatusCode::kInvalidArgument);
  Task empty_audience = MakeTask("task_a");
  empty_audience.audiences = {""};
  EXPECT_EQ(store_->CreateTask(empty_audience).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->GetTask("task_a").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTasksTest, CreateRefusesDuplicateIdAndKeepsTheOriginal) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_a")).ok());
  Task second = MakeTask("task_a", kOtherAgent);
  second.scopes = {"other:scope"};
  absl::Status status = store_->CreateTask(second);
  EXPECT_EQ(status.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(status.message(), HasSubstr("task_a"));
  absl::StatusOr<Task> got = store_->GetTask("task_a");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->spiffe_id, kAgent);
  EXPECT_THAT(got->scopes, ElementsAre("tickets:write", "tickets:read"));
}

TEST_F(SqliteStoreTasksTest, GetUnknownTaskIsNotFound) {
  EXPECT_EQ(store_->GetTask("task_missing").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTasksTest, EndSetsStatusAndEndedAtAndReturnsTheTask) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_a")).ok());
  absl::StatusOr<Task> ended = store_->EndTask("task_a", 1700000100);
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_EQ(ended->status, "ended");
  EXPECT_EQ(ended->ended_at, 1700000100);
  EXPECT_THAT(ended->scopes, ElementsAre("tickets:write", "tickets:read"));
  absl::StatusOr<Task> got = store_->GetTask("task_a");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, *ended);
}

TEST_F(SqliteStoreTasksTest, EndTwiceIsFailedPreconditionAndKeepsFirstEndTime) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_a")).ok());
  ASSERT_TRUE(store_->EndTask("task_a", 1700000100).ok());
  absl::StatusOr<Task> again = store_->EndTask("task_a", 1700000200);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr("ended"));
  EXPECT_EQ(store_->GetTask("task_a")->ended_at, 1700000100);
}

TEST_F(SqliteStoreTasksTest, EndOnlyEndsActiveTasks) {
  Task revoked = MakeTask("task_r");
  revoked.status = "revoked";  // any status but "active"
  ASSERT_TRUE(store_->CreateTask(revoked).ok());
  EXPECT_EQ(store_->EndTask("task_r", 1700000100).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(store_->GetTask("task_r")->status, "revoked");
}

TEST_F(SqliteStoreTasksTest, EndUnknownTaskIsNotFound) {
  EXPECT_EQ(store_->EndTask("task_missing", 1).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTasksTest, ConcurrentEndsSucceedExactlyOnce) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_a")).ok());
  std::atomic<int> successes = 0;
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      if (store_->EndTask("task_a", 1700000100 + i).ok()) ++successes;
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(successes.load(), 1);
}

TEST_F(SqliteStoreTasksTest, ListFiltersByOwnerAndStatusOrderedByCreation) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_c", kAgent, 300)).ok());
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_a", kAgent, 100)).ok());
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_b", kOtherAgent, 200)).ok());
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_d", kAgent, 100)).ok());
  ASSERT_TRUE(store_->EndTask("task_d", 150).ok());

  absl::StatusOr<std::vector<Task>> all = store_->ListTasks("", false);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_THAT(Ids(*all), ElementsAre("task_a", "task_d", "task_b", "task_c"));
  EXPECT_THAT(Ids(*store_->ListTasks("", true)), ElementsAre("task_a", "task_b", "task_c"));
  EXPECT_THAT(Ids(*store_->ListTasks(kAgent, false)), ElementsAre("task_a", "task_d", "task_c"));
  EXPECT_THAT(Ids(*store_->ListTasks(kAgent, true)), ElementsAre("task_a", "task_c"));
  EXPECT_THAT(Ids(*store_->ListTasks("spiffe://example.org/nobody", false)), IsEmpty());
  // Listed tasks carry their lists too.
  EXPECT_THAT(all->front().scopes, ElementsAre("tickets:write", "tickets:read"));
  EXPECT_THAT(all->front().audiences,
              ElementsAre("https://tickets.example.org", "https://audit.example.org"));
}

TEST_F(SqliteStoreTasksTest, TasksSurviveReopen) {
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_a")).ok());
  ASSERT_TRUE(store_->CreateTask(MakeTask("task_b")).ok());
  ASSERT_TRUE(store_->EndTask("task_b", 1700000500).ok());
  store_.reset();
  std::unique_ptr<SqliteStore> reopened = OpenStore();
  ASSERT_NE(reopened, nullptr);
  absl::StatusOr<Task> a = reopened->GetTask("task_a");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a, MakeTask("task_a"));
  absl::StatusOr<Task> b = reopened->GetTask("task_b");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->status, "ended");
  EXPECT_EQ(b->ended_at, 1700000500);
}

// ---- Migration 4 ----

TEST_F(SqliteStoreTasksTest, NewStoreIsAtSchemaVersion4WithTaskTables) {
  EXPECT_GE(SqliteStore::LatestSchemaVersion(), 4);
  EXPECT_EQ(SqliteSchemaMigrations()[3].version, 4);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM schema_migrations WHERE version = 4"), 1);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN "
                        "('tasks', 'task_scopes', 'task_audiences')"),
            3);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM sqlite_schema WHERE type = 'index' AND "
                        "name = 'tasks_by_spiffe_id'"),
            1);
}

class SqliteStoreTaskMigrationTest : public test_util::SqliteStoreFixture {};

TEST_F(SqliteStoreTaskMigrationTest, ExistingVersion3DatabaseMigratesKeepingItsData) {
  std::span<const SqliteMigration> up_to_v3 = SqliteSchemaMigrations().first(3);
  {
    absl::StatusOr<std::unique_ptr<SqliteStore>> v3 =
        SqliteStore::OpenWithMigrationsForTesting(path_, up_to_v3);
    ASSERT_TRUE(v3.ok()) << v3.status();
    ASSERT_EQ(*(*v3)->SchemaVersion(), 3);
    ASSERT_TRUE((*v3)->CreateEntry(MakeEntry("e1", kNode, {"unix:uid:1000"})).ok());
  }
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM sqlite_schema WHERE name = 'tasks'"), 0);

  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->SchemaVersion(), SqliteStore::LatestSchemaVersion());
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM schema_migrations WHERE version = 4"), 1);
  absl::StatusOr<RegistrationEntry> entry = store->GetEntry("e1");
  ASSERT_TRUE(entry.ok()) << entry.status();
  EXPECT_THAT(entry->selectors, ElementsAre("unix:uid:1000"));
  ASSERT_TRUE(store->CreateTask(MakeTask("task_a")).ok());
  EXPECT_EQ(*store->GetTask("task_a"), MakeTask("task_a"));
}

}  // namespace
}  // namespace mandate::store
