// Opening SqliteStore: file mode, schema migrations and version checks, durability across
// reopen and kill -9, and concurrent use.
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <fstream>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "broker/common/store/sqlite_migrations.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::mandate::store::test_util::MakeEntry;
using ::mandate::store::test_util::TokenHash;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kNode[] = "spiffe://example.org/node/join/web-1";

class SqliteStoreOpenTest : public test_util::SqliteStoreFixture {
 protected:
  mode_t FileMode(const std::string& path) {
    struct stat st;
    EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
    return st.st_mode & 0777;
  }
};

// ---- Files and modes ----

TEST_F(SqliteStoreOpenTest, OpenCreatesDatabaseFileWithMode0600) {
  mode_t old_umask = ::umask(0);  // Even a permissive umask must not widen the mode.
  std::unique_ptr<SqliteStore> store = OpenStore();
  ::umask(old_umask);
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(FileMode(path_), 0600);
  // The WAL file, which holds recent commits, gets the same mode.
  ASSERT_TRUE(store->CreateEntry(MakeEntry("e1", kNode, {"unix:uid:1"})).ok());
  EXPECT_EQ(FileMode(path_ + "-wal"), 0600);
}

TEST_F(SqliteStoreOpenTest, OpenTightensExistingWorldReadableFile) {
  { std::ofstream create(path_); }
  ASSERT_EQ(::chmod(path_.c_str(), 0644), 0);
  ASSERT_NE(OpenStore(), nullptr);
  EXPECT_EQ(FileMode(path_), 0600);
}

TEST_F(SqliteStoreOpenTest, OpenFailsWhenDirectoryIsMissing) {
  absl::StatusOr<std::unique_ptr<SqliteStore>> store =
      SqliteStore::Open(dir_ + "/no-such-dir/broker.db");
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr("no-such-dir"));
}

TEST_F(SqliteStoreOpenTest, OpenRejectsEmptyPath) {
  EXPECT_EQ(SqliteStore::Open("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SqliteStoreOpenTest, OpenRejectsFileThatIsNotADatabase) {
  {
    std::ofstream garbage(path_);
    garbage << std::string(4096, 'x');
  }
  absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open(path_);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(store.status().message(), HasSubstr("not a database"));
}

TEST_F(SqliteStoreOpenTest, OpenRefusesDatabaseOfAnotherApplication) {
  ExecRaw("CREATE TABLE unrelated (x INTEGER)");
  absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open(path_);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr("not a Mandate store"));
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM sqlite_schema WHERE name = 'join_tokens'"), 0);

  ExecRaw("PRAGMA user_version = 1");
  store = SqliteStore::Open(path_);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr("not a Mandate store"));

  ExecRaw("PRAGMA application_id = 1234");
  store = SqliteStore::Open(path_);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(), HasSubstr("another application"));
}

// ---- Schema versions and migrations ----

TEST_F(SqliteStoreOpenTest, NewStoreIsAtLatestSchemaVersionWithHistory) {
  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_GE(SqliteStore::LatestSchemaVersion(), 1);
  EXPECT_EQ(*store->SchemaVersion(), SqliteStore::LatestSchemaVersion());
  store.reset();
  EXPECT_EQ(QueryRawInt("PRAGMA user_version"), SqliteStore::LatestSchemaVersion());
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM schema_migrations"),
            SqliteStore::LatestSchemaVersion());
  EXPECT_EQ(QueryRawInt("PRAGMA application_id"), SqliteStore::kApplicationId);
}

TEST_F(SqliteStoreOpenTest, StoreRunsInWalModeWithForeignKeys) {
  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  // journal_mode=WAL is persistent in the file: a fresh connection sees it.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &stmt, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(stmt), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0)), "wal");
  sqlite3_finalize(stmt);
  sqlite3_close(db);
}

// synchronous is a per-connection setting (not kept in the file), so it is asserted on the
// store's own connections: kill -9 tests pass without it, only power loss would show it.
TEST_F(SqliteStoreOpenTest, EveryConnectionOfTheStoreRunsWithSynchronousFull) {
  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<std::vector<int64_t>> modes = store->SynchronousModesForTesting();
  ASSERT_TRUE(modes.ok()) << modes.status();
  constexpr int64_t kFull = 2;  // PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA
  EXPECT_THAT(*modes, ElementsAre(kFull, kFull)) << "main and audit connections";
}

TEST_F(SqliteStoreOpenTest, ReopenDoesNotReapplyMigrations) {
  ASSERT_NE(OpenStore(), nullptr);
  ASSERT_NE(OpenStore(), nullptr);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM schema_migrations"),
            SqliteStore::LatestSchemaVersion());
}

TEST_F(SqliteStoreOpenTest, OpenRefusesNewerSchemaVersion) {
  ASSERT_NE(OpenStore(), nullptr);
  const int newer = SqliteStore::LatestSchemaVersion() + 1;
  ExecRaw(absl::StrCat("PRAGMA user_version = ", newer));
  absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open(path_);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(store.status().message(),
              HasSubstr(absl::StrCat("schema version ", newer, ", newer than")));
  // Nothing was changed by the refused open.
  EXPECT_EQ(QueryRawInt("PRAGMA user_version"), newer);
}

// The migration list this build ships, plus extra steps for the tests below.
std::vector<SqliteMigration> ShippedMigrationsPlus(std::vector<SqliteMigration> extra) {
  std::span<const SqliteMigration> shipped = SqliteSchemaMigrations();
  std::vector<SqliteMigration> all(shipped.begin(), shipped.end());
  all.insert(all.end(), extra.begin(), extra.end());
  return all;
}

TEST_F(SqliteStoreOpenTest, FailedMigrationStepLeavesPreviousVersionIntact) {
  const int latest = SqliteStore::LatestSchemaVersion();
  std::vector<SqliteMigration> broken = ShippedMigrationsPlus(
      {{latest + 1, "half-broken step",
        "CREATE TABLE added_by_broken_step (x INTEGER); INSERT INTO no_such_table VALUES (1);"}});
  absl::StatusOr<std::unique_ptr<SqliteStore>> store =
      SqliteStore::OpenWithMigrationsForTesting(path_, broken);
  EXPECT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr("no_such_table"));
  EXPECT_THAT(store.status().message(), HasSubstr("half-broken step"));

  // The shipped steps were committed; the broken one left no trace.
  EXPECT_EQ(QueryRawInt("PRAGMA user_version"), latest);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM schema_migrations"), latest);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM sqlite_schema WHERE name = 'added_by_broken_step'"),
            0);
  std::unique_ptr<SqliteStore> reopened = OpenStore();
  ASSERT_NE(reopened, nullptr);
  EXPECT_EQ(*reopened->SchemaVersion(), latest);
}

TEST_F(SqliteStoreOpenTest, LaterMigrationAppliesToExistingDataThenOlderBuildRefusesIt) {
  const int latest = SqliteStore::LatestSchemaVersion();
  {
    std::unique_ptr<SqliteStore> store = OpenStore();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->CreateEntry(MakeEntry("e1", kNode, {"unix:uid:1"})).ok());
  }
  std::vector<SqliteMigration> upgraded =
      ShippedMigrationsPlus({{latest + 1, "add a table", "CREATE TABLE later_table (x INTEGER);"}});
  {
    absl::StatusOr<std::unique_ptr<SqliteStore>> store =
        SqliteStore::OpenWithMigrationsForTesting(path_, upgraded);
    ASSERT_TRUE(store.ok()) << store.status();
    EXPECT_EQ(*(*store)->SchemaVersion(), latest + 1);
    EXPECT_TRUE((*store)->GetEntry("e1").ok());
  }
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM schema_migrations"), latest + 1);
  // A build that only knows the shipped steps must not touch the upgraded database.
  EXPECT_EQ(SqliteStore::Open(path_).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(SqliteStoreOpenTest, MigrationListWithGapIsRejected) {
  std::vector<SqliteMigration> gap = ShippedMigrationsPlus(
      {{SqliteStore::LatestSchemaVersion() + 2, "skips a number", "SELECT 1;"}});
  absl::StatusOr<std::unique_ptr<SqliteStore>> store =
      SqliteStore::OpenWithMigrationsForTesting(path_, gap);
  EXPECT_EQ(store.status().code(), absl::StatusCode::kInternal);
}

// ---- Durability ----

// Writes one of everything through `store`.
void WriteSampleData(Store& store) {
  RegistrationEntry entry = MakeEntry("e1", kNode, {"unix:uid:1000", "unix:gid:1000"});
  ASSERT_TRUE(store.CreateEntry(entry).ok());
  ASSERT_TRUE(store.CreateEntry(MakeEntry("e2", kNode, {"unix:uid:1001"})).ok());
  ASSERT_TRUE(store.DeleteEntry("e2").ok());
  ASSERT_TRUE(store.CreateJoinToken(JoinToken{TokenHash('a'), kNode, 100, 2000}).ok());
  AttestedNode node;
  node.spiffe_id = kNode;
  node.attestor = "join_token";
  node.selectors = {"join:name:web-1"};
  node.cert_serial = "01";
  node.cert_expires_at = 3000;
  node.created_at = 100;
  node.updated_at = 100;
  ASSERT_TRUE(store.UpsertNode(node).ok());
  ASSERT_TRUE(store.SetNodeBanned(kNode, true).ok());
}

// Checks that everything WriteSampleData wrote is there.
void ExpectSampleData(Store& store) {
  absl::StatusOr<std::vector<RegistrationEntry>> entries = store.ListEntries();
  ASSERT_TRUE(entries.ok()) << entries.status();
  ASSERT_EQ(entries->size(), 1u);
  EXPECT_EQ((*entries)[0].id, "e1");
  EXPECT_THAT((*entries)[0].selectors, ElementsAre("unix:gid:1000", "unix:uid:1000"));
  EXPECT_THAT((*entries)[0].scopes, ElementsAre("tickets:read"));
  EXPECT_EQ((*entries)[0].revision, 1);
  EXPECT_EQ(*store.EntriesRevision(), 3);
  absl::StatusOr<AttestedNode> node = store.GetNode(kNode);
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_THAT(node->selectors, ElementsAre("join:name:web-1"));
  EXPECT_TRUE(node->banned);
  absl::StatusOr<JoinToken> token = store.ConsumeJoinToken(TokenHash('a'), 1000);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->node_spiffe_id, kNode);
}

TEST_F(SqliteStoreOpenTest, ReopenedStoreKeepsEverything) {
  {
    std::unique_ptr<SqliteStore> store = OpenStore();
    ASSERT_NE(store, nullptr);
    WriteSampleData(*store);
  }
  std::unique_ptr<SqliteStore> reopened = OpenStore();
  ASSERT_NE(reopened, nullptr);
  ExpectSampleData(*reopened);
  // The token consumed above stays consumed across another restart.
  reopened.reset();
  reopened = OpenStore();
  ASSERT_NE(reopened, nullptr);
  EXPECT_EQ(reopened->ConsumeJoinToken(TokenHash('a'), 1000).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreOpenTest, AcknowledgedWritesSurviveKillNine) {
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // The child writes, then dies without closing anything (no checkpoint, no cleanup).
    absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open(path_);
    if (!store.ok()) ::_exit(2);
    WriteSampleData(**store);
    if (::testing::Test::HasFailure()) ::_exit(3);
    ::kill(::getpid(), SIGKILL);
    ::_exit(4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
  ASSERT_EQ(WTERMSIG(status), SIGKILL);
  std::unique_ptr<SqliteStore> reopened = OpenStore();
  ASSERT_NE(reopened, nullptr);
  ExpectSampleData(*reopened);
}

// ---- Failure atomicity (faults injected with triggers) ----

TEST_F(SqliteStoreOpenTest, CreateEntryFailingHalfWayChangesNothingAndReportsSqliteMessage) {
  ASSERT_NE(OpenStore(), nullptr);
  // Fails the last statement of CreateEntry, after the entry row and the revision bump.
  ExecRaw(
      "CREATE TRIGGER inject_failure BEFORE INSERT ON registration_entry_scopes "
      "BEGIN SELECT RAISE(ABORT, 'injected scope failure'); END");
  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  absl::StatusOr<RegistrationEntry> created =
      store->CreateEntry(MakeEntry("e1", kNode, {"unix:uid:1"}));
  ASSERT_FALSE(created.ok());
  EXPECT_THAT(std::string(created.status().message()), HasSubstr("injected scope failure"));
  EXPECT_EQ(*store->EntriesRevision(), 0);
  EXPECT_EQ(store->GetEntry("e1").status().code(), absl::StatusCode::kNotFound);
  store.reset();
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM registration_entries"), 0);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM registration_entry_selectors"), 0);
}

TEST_F(SqliteStoreOpenTest, UpsertNodeFailingHalfWayKeepsPreviousRow) {
  {
    std::unique_ptr<SqliteStore> store = OpenStore();
    ASSERT_NE(store, nullptr);
    AttestedNode node;
    node.spiffe_id = kNode;
    node.attestor = "join_token";
    node.selectors = {"join:name:web-1"};
    node.cert_serial = "01";
    ASSERT_TRUE(store->UpsertNode(node).ok());
  }
  ExecRaw(
      "CREATE TRIGGER inject_failure BEFORE INSERT ON attested_node_selectors "
      "BEGIN SELECT RAISE(ABORT, 'injected selector failure'); END");
  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  AttestedNode update;
  update.spiffe_id = kNode;
  update.attestor = "tpm";
  update.selectors = {"tpm:ek_hash:ab"};
  update.cert_serial = "02";
  EXPECT_FALSE(store->UpsertNode(update).ok());
  absl::StatusOr<AttestedNode> node = store->GetNode(kNode);
  ASSERT_TRUE(node.ok()) << node.status();
  EXPECT_EQ(node->cert_serial, "01");
  EXPECT_EQ(node->attestor, "join_token");
  EXPECT_THAT(node->selectors, ElementsAre("join:name:web-1"));
}

TEST_F(SqliteStoreOpenTest, WriteBlockedByAnotherConnectionPastBusyTimeoutIsUnavailable) {
  absl::StatusOr<std::unique_ptr<SqliteStore>> opened =
      SqliteStore::Open(path_, SqliteStoreOptions{.busy_timeout_ms = 100});
  ASSERT_TRUE(opened.ok()) << opened.status();
  SqliteStore* store = opened->get();
  sqlite3* other = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &other), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);
  absl::StatusOr<RegistrationEntry> created =
      store->CreateEntry(MakeEntry("e1", kNode, {"unix:uid:1"}));
  EXPECT_EQ(created.status().code(), absl::StatusCode::kUnavailable);
  sqlite3_exec(other, "ROLLBACK", nullptr, nullptr, nullptr);
  sqlite3_close(other);
  // Once the lock is gone the same write succeeds.
  EXPECT_TRUE(store->CreateEntry(MakeEntry("e1", kNode, {"unix:uid:1"})).ok());
}

// ---- Concurrency ----

TEST_F(SqliteStoreOpenTest, ConcurrentCreatesFromManyThreadsAllSucceed) {
  std::unique_ptr<SqliteStore> store = OpenStore();
  ASSERT_NE(store, nullptr);
  constexpr int kThreads = 8;
  constexpr int kPerThread = 25;
  std::atomic<int> failures = 0;
  std::atomic<bool> writers_done = false;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        std::string id = absl::StrCat("t", t, "-", i);
        if (!store->CreateEntry(MakeEntry(id, absl::StrCat(kNode, t), {absl::StrCat("x:", i)}))
                 .ok()) {
          ++failures;
        }
      }
    });
  }
  // Readers run alongside and must never see an error.
  std::thread reader([&] {
    while (!writers_done) {
      if (!store->ListEntries().ok() || !store->EntriesRevision().ok() ||
          !store->ListEntriesByParent(absl::StrCat(kNode, 0)).ok()) {
        ++failures;
      }
    }
  });
  for (std::thread& thread : threads) thread.join();
  writers_done = true;
  reader.join();

  EXPECT_EQ(failures, 0);
  absl::StatusOr<std::vector<RegistrationEntry>> all = store->ListEntries();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), static_cast<size_t>(kThreads * kPerThread));
  EXPECT_EQ(*store->EntriesRevision(), kThreads * kPerThread);
  std::set<int64_t> revisions;
  for (const RegistrationEntry& entry : *all) revisions.insert(entry.revision);
  EXPECT_EQ(revisions.size(), static_cast<size_t>(kThreads * kPerThread));
  EXPECT_EQ(*revisions.begin(), 1);
  EXPECT_EQ(*revisions.rbegin(), kThreads * kPerThread);
}

TEST_F(SqliteStoreOpenTest, TwoOpenInstancesOnOneFileShareStateUnderConcurrentWrites) {
  std::unique_ptr<SqliteStore> first = OpenStore();
  std::unique_ptr<SqliteStore> second = OpenStore();
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  std::atomic<int> failures = 0;
  std::array<SqliteStore*, 2> stores = {first.get(), second.get()};
  std::vector<std::thread> threads;
  for (int s = 0; s < 2; ++s) {
    threads.emplace_back([&, s] {
      for (int i = 0; i < 20; ++i) {
        if (!stores[s]
                 ->CreateEntry(MakeEntry(absl::StrCat("s", s, "-", i), kNode,
                                         {absl::StrCat("x:", s, ":", i)}))
                 .ok()) {
          ++failures;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(first->ListEntries()->size(), 40u);
  EXPECT_EQ(second->ListEntries()->size(), 40u);
  EXPECT_EQ(*second->EntriesRevision(), 40);
  // A duplicate across instances is still refused.
  EXPECT_EQ(second->CreateEntry(MakeEntry("s0-0", kNode, {"y:1"})).status().code(),
            absl::StatusCode::kAlreadyExists);
}

}  // namespace
}  // namespace mandate::store
