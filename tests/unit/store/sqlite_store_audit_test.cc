// SqliteStore audit log: batched appends (all or nothing), chain heads, filtered listing, several
// chains in one store, durability across reopen, and migration 5 on an existing database.
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/sqlite_migrations.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

AuditRecord MakeRecord(std::string chain, int64_t seq, int64_t time = 1700000000) {
  AuditRecord r;
  r.chain_id = std::move(chain);
  r.seq = seq;
  r.time = time;
  r.event = "jwt_svid";
  r.outcome = "issued";
  r.spiffe_id = "spiffe://example.org/agent/bot";
  r.node_id = "spiffe://example.org/node/join/web-1";
  r.credential_id = "jti-" + std::to_string(seq);
  r.detail = R"({"aud":["x"]})";
  r.prev_hash = seq == 1 ? "" : "h" + std::to_string(seq - 1);
  r.hash = "h" + std::to_string(seq);
  return r;
}

std::vector<int64_t> Seqs(const std::vector<AuditRecord>& records) {
  std::vector<int64_t> out;
  for (const auto& r : records) out.push_back(r.seq);
  return out;
}

class SqliteStoreAuditTest : public test_util::SqliteStoreFixture {};

TEST_F(SqliteStoreAuditTest, EmptyChainHasNoLastRecord) {
  auto store = OpenStore();
  EXPECT_TRUE(absl::IsNotFound(store->LastAuditRecord("b1").status()));
  EXPECT_THAT(*store->ListAuditChains(), IsEmpty());
  EXPECT_THAT(*store->ListAuditRecords({}), IsEmpty());
}

TEST_F(SqliteStoreAuditTest, AppendsABatchAndReadsItBackInOrder) {
  auto store = OpenStore();
  std::vector<AuditRecord> batch = {MakeRecord("b1", 1), MakeRecord("b1", 2), MakeRecord("b1", 3)};
  batch[1].task_id = "task_1";
  ASSERT_TRUE(store->AppendAuditRecords(batch).ok());
  auto all = store->ListAuditRecords({});
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(*all, batch);
  auto last = store->LastAuditRecord("b1");
  ASSERT_TRUE(last.ok());
  EXPECT_EQ(*last, batch[2]);
}

TEST_F(SqliteStoreAuditTest, ABatchWithADuplicateSeqWritesNothing) {
  auto store = OpenStore();
  ASSERT_TRUE(store->AppendAuditRecords({MakeRecord("b1", 1)}).ok());
  absl::Status status = store->AppendAuditRecords({MakeRecord("b1", 2), MakeRecord("b1", 1)});
  EXPECT_TRUE(absl::IsAlreadyExists(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("another writer"));
  EXPECT_THAT(Seqs(*store->ListAuditRecords({})), ElementsAre(1));
}

TEST_F(SqliteStoreAuditTest, RefusesRecordsMissingRequiredFields) {
  auto store = OpenStore();
  for (auto mutate : std::vector<void (*)(AuditRecord&)>{
           [](AuditRecord& r) { r.chain_id.clear(); }, [](AuditRecord& r) { r.event.clear(); },
           [](AuditRecord& r) { r.outcome.clear(); }, [](AuditRecord& r) { r.hash.clear(); },
           [](AuditRecord& r) { r.seq = 0; }}) {
    AuditRecord bad = MakeRecord("b1", 2);
    mutate(bad);
    EXPECT_TRUE(absl::IsInvalidArgument(store->AppendAuditRecords({MakeRecord("b1", 1), bad})));
  }
  EXPECT_THAT(*store->ListAuditRecords({}), IsEmpty());
}

TEST_F(SqliteStoreAuditTest, FiltersAndPages) {
  auto store = OpenStore();
  std::vector<AuditRecord> batch;
  for (int64_t i = 1; i <= 6; ++i) batch.push_back(MakeRecord("b1", i, 1700000000 + i));
  batch[2].spiffe_id = "spiffe://example.org/agent/other";
  batch[3].task_id = "task_9";
  ASSERT_TRUE(store->AppendAuditRecords(batch).ok());
  ASSERT_TRUE(store->AppendAuditRecords({MakeRecord("b2", 1, 1700000100)}).ok());

  AuditQuery q;
  q.chain_id = "b1";
  q.after_seq = 2;
  q.limit = 2;
  EXPECT_THAT(Seqs(*store->ListAuditRecords(q)), ElementsAre(3, 4));

  q = {};
  q.since = 1700000005;
  auto since = *store->ListAuditRecords(q);
  ASSERT_EQ(since.size(), 3u);
  EXPECT_EQ(since[2].chain_id, "b2");

  q = {};
  q.spiffe_id = "spiffe://example.org/agent/other";
  EXPECT_THAT(Seqs(*store->ListAuditRecords(q)), ElementsAre(3));
  q = {};
  q.task_id = "task_9";
  EXPECT_THAT(Seqs(*store->ListAuditRecords(q)), ElementsAre(4));
  q = {};
  q.credential_id = "jti-5";
  EXPECT_THAT(Seqs(*store->ListAuditRecords(q)), ElementsAre(5));
}

TEST_F(SqliteStoreAuditTest, LimitOutOfRangeIsRefused) {
  auto store = OpenStore();
  AuditQuery q;
  q.limit = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(store->ListAuditRecords(q).status()));
  q.limit = 10001;
  EXPECT_TRUE(absl::IsInvalidArgument(store->ListAuditRecords(q).status()));
}

TEST_F(SqliteStoreAuditTest, ChainsAreSeparateAndSurviveReopen) {
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->AppendAuditRecords({MakeRecord("b2", 1), MakeRecord("b2", 2)}).ok());
    ASSERT_TRUE(store->AppendAuditRecords({MakeRecord("b1", 1)}).ok());
  }
  auto store = OpenStore();
  EXPECT_THAT(*store->ListAuditChains(), ElementsAre("b1", "b2"));
  EXPECT_EQ(store->LastAuditRecord("b2")->seq, 2);
  EXPECT_EQ(store->LastAuditRecord("b1")->seq, 1);
}

TEST_F(SqliteStoreAuditTest, MigratesADatabaseFromBeforeTheAuditLog) {
  // A file at schema 4, as an older broker left it (built by the first four migrations, so
  // later migrations need no change here), then opened by this build.
  {
    auto old = SqliteStore::OpenWithMigrationsForTesting(path_, SqliteSchemaMigrations().first(4));
    ASSERT_TRUE(old.ok()) << old.status();
    EXPECT_EQ(*(*old)->SchemaVersion(), 4);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->SchemaVersion(), SqliteStore::LatestSchemaVersion());
  EXPECT_THAT(*store->ListAuditRecords({}), IsEmpty());
  EXPECT_TRUE(store->AppendAuditRecords({MakeRecord("b1", 1)}).ok());
}

AuditCheckpoint MakeCheckpoint(std::string chain, int64_t seq, int64_t time) {
  return {.chain_id = std::move(chain),
          .seq = seq,
          .hash = "h" + std::to_string(seq),
          .time = time,
          .jws = "header.payload.sig" + std::to_string(seq)};
}

TEST_F(SqliteStoreAuditTest, CheckpointsAreStoredOncePerSeqAndListedNewestFirst) {
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->AddAuditCheckpoint(MakeCheckpoint("b1", 10, 100)).ok());
    ASSERT_TRUE(store->AddAuditCheckpoint(MakeCheckpoint("b1", 20, 200)).ok());
    ASSERT_TRUE(store->AddAuditCheckpoint(MakeCheckpoint("b2", 5, 150)).ok());
    EXPECT_TRUE(absl::IsAlreadyExists(store->AddAuditCheckpoint(MakeCheckpoint("b1", 20, 300))));
    EXPECT_TRUE(absl::IsInvalidArgument(store->AddAuditCheckpoint(MakeCheckpoint("b1", 0, 1))));
    AuditCheckpoint no_jws = MakeCheckpoint("b1", 30, 1);
    no_jws.jws.clear();
    EXPECT_TRUE(absl::IsInvalidArgument(store->AddAuditCheckpoint(no_jws)));
  }
  auto store = OpenStore();  // durable across reopen
  auto all = store->ListAuditCheckpoints("", 10);
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0], MakeCheckpoint("b1", 20, 200));
  EXPECT_EQ((*all)[1].chain_id, "b2");
  auto b1 = *store->ListAuditCheckpoints("b1", 1);
  ASSERT_EQ(b1.size(), 1u);
  EXPECT_EQ(b1[0].seq, 20);
  EXPECT_TRUE(absl::IsInvalidArgument(store->ListAuditCheckpoints("", 0).status()));
}

}  // namespace
}  // namespace mandate::store
