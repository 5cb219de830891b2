// AuditLog: hash chain, group commit under concurrency, durability across restarts, fail-closed
// behaviour when the store refuses a batch, and VerifyAuditChain against tampering done directly
// on the database file.
#include "broker/server/audit/audit_log.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

constexpr int64_t kNow = 1'800'000'000;

AuditEvent Event(int i) {
  return {.event = "jwt_svid",
          .outcome = "issued",
          .spiffe_id = "spiffe://example.org/agent/bot",
          .node_id = "spiffe://example.org/node/join/n1",
          .credential_id = absl::StrCat("jti-", i),
          .detail = absl::StrCat(R"({"n":)", i, "}")};
}

class AuditLogTest : public ::testing::Test {
 protected:
  std::string DbPath() const { return dir_.path() + "/mandate.db"; }

  std::vector<store::AuditRecord> All(const std::string& chain = "test-broker") {
    store::AuditQuery q;
    q.chain_id = chain;
    q.limit = 10000;
    return std::move(store_->ListAuditRecords(q)).value();
  }

  void ExecRaw(const std::string& sql) { testing::ExecRawSql(dir_, sql); }

  absl::Status Verify(const std::string& chain = "test-broker") {
    auto report = VerifyAuditChain(*store_, chain);
    if (!report.ok()) return report.status();
    return report->status;
  }

  TempDir dir_;
  FakeClock clock_{kNow};
  std::unique_ptr<store::SqliteStore> store_ = testing::OpenStore(dir_);
};

TEST_F(AuditLogTest, RecordsAreNumberedChainedAndStamped) {
  auto log = testing::OpenAuditLog(*store_, clock_);
  ASSERT_TRUE(log->Record(Event(1)).ok());
  clock_.Advance(5);
  ASSERT_TRUE(log->Record(Event(2)).ok());
  auto records = All();
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].seq, 1);
  EXPECT_EQ(records[0].prev_hash, "");
  EXPECT_EQ(records[0].time, kNow);
  EXPECT_EQ(records[1].seq, 2);
  EXPECT_EQ(records[1].time, kNow + 5);
  EXPECT_EQ(records[1].prev_hash, records[0].hash);
  EXPECT_EQ(records[1].hash, AuditRecordHash(records[1]));
  EXPECT_EQ(records[1].hash.size(), 64u);
  EXPECT_EQ(records[1].credential_id, "jti-2");
  EXPECT_TRUE(Verify().ok());
}

TEST_F(AuditLogTest, EmptyDetailIsAnEmptyObject) {
  auto log = testing::OpenAuditLog(*store_, clock_);
  ASSERT_TRUE(log->Record({.event = "task_ended", .outcome = "ok"}).ok());
  EXPECT_EQ(All().at(0).detail, "{}");
}

TEST_F(AuditLogTest, TheHashCoversEveryField) {
  auto log = testing::OpenAuditLog(*store_, clock_);
  ASSERT_TRUE(log->Record(Event(1)).ok());
  const store::AuditRecord original = All().at(0);
  std::vector<void (*)(store::AuditRecord&)> edits = {
      [](store::AuditRecord& r) { r.chain_id += "x"; },
      [](store::AuditRecord& r) { r.seq += 1; },
      [](store::AuditRecord& r) { r.time += 1; },
      [](store::AuditRecord& r) { r.event += "x"; },
      [](store::AuditRecord& r) { r.outcome += "x"; },
      [](store::AuditRecord& r) { r.spiffe_id += "x"; },
      [](store::AuditRecord& r) { r.node_id += "x"; },
      [](store::AuditRecord& r) { r.task_id += "x"; },
      [](store::AuditRecord& r) { r.credential_id += "x"; },
      [](store::AuditRecord& r) { r.detail += "x"; },
      [](store::AuditRecord& r) { r.prev_hash += "x"; },
      // Moving bytes between neighbouring fields must change the hash too.
      [](store::AuditRecord& r) {
        r.spiffe_id += r.node_id.substr(0, 1);
        r.node_id.erase(0, 1);
      },
  };
  for (size_t i = 0; i < edits.size(); ++i) {
    store::AuditRecord edited = original;
    edits[i](edited);
    EXPECT_NE(AuditRecordHash(edited), original.hash) << "edit " << i;
  }
}

TEST_F(AuditLogTest, ConcurrentRecordsAreGroupCommittedWithoutGaps) {
  auto log = testing::OpenAuditLog(*store_, clock_);
  constexpr int kThreads = 16, kPerThread = 100;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        if (!log->Record(Event(t * kPerThread + i)).ok()) ++failures;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  auto records = All();
  ASSERT_EQ(records.size(), static_cast<size_t>(kThreads * kPerThread));
  std::set<std::string> jtis;
  for (const auto& r : records) jtis.insert(r.credential_id);
  EXPECT_EQ(jtis.size(), records.size()) << "every record stored exactly once";
  AuditLog::Stats stats = log->stats();
  EXPECT_EQ(stats.records, kThreads * kPerThread);
  // Sixteen writers waiting on one fsync at a time share transactions.
  EXPECT_LT(stats.batches, stats.records);
  EXPECT_TRUE(Verify().ok()) << Verify();
}

TEST_F(AuditLogTest, RecordAllStoresEverythingInOneCommitInOrder) {
  auto log = AuditLog::Open(*store_, "test-broker", clock_, {.max_batch = 2});
  ASSERT_TRUE(log.ok());
  std::vector<AuditEvent> events;
  for (int i = 1; i <= 5; ++i) events.push_back(Event(i));
  ASSERT_TRUE((*log)->RecordAll(std::move(events)).ok());
  auto records = All();
  ASSERT_EQ(records.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(records[i].seq, i + 1);
    EXPECT_EQ(records[i].credential_id, absl::StrCat("jti-", i + 1));
  }
  // Larger than max_batch, still one transaction: all or nothing.
  EXPECT_EQ((*log)->stats().batches, 1);
  EXPECT_EQ((*log)->stats().records, 5);
  EXPECT_TRUE(Verify().ok());
  EXPECT_TRUE((*log)->RecordAll({}).ok());
}

TEST_F(AuditLogTest, RecordAllBeyondTheBacklogBoundIsRefusedWhole) {
  auto log = AuditLog::Open(*store_, "test-broker", clock_, {.max_queued = 3});
  ASSERT_TRUE(log.ok());
  std::vector<AuditEvent> events;
  for (int i = 1; i <= 4; ++i) events.push_back(Event(i));
  EXPECT_TRUE(absl::IsUnavailable((*log)->RecordAll(std::move(events))));
  EXPECT_TRUE(All().empty());
  EXPECT_TRUE((*log)->Record(Event(5)).ok());
}

TEST_F(AuditLogTest, ARestartedLogContinuesTheChain) {
  {
    auto log = testing::OpenAuditLog(*store_, clock_);
    ASSERT_TRUE(log->Record(Event(1)).ok());
    ASSERT_TRUE(log->Record(Event(2)).ok());
  }
  store_.reset();
  store_ = testing::OpenStore(dir_);
  auto log = testing::OpenAuditLog(*store_, clock_);
  ASSERT_TRUE(log->Record(Event(3)).ok());
  auto records = All();
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[2].seq, 3);
  EXPECT_EQ(records[2].prev_hash, records[1].hash);
  EXPECT_TRUE(Verify().ok());
}

TEST_F(AuditLogTest, ARefusedBatchFailsItsCallersAndStoresNothing) {
  store_.reset();
  auto store = store::SqliteStore::Open(DbPath(), {.busy_timeout_ms = 50});
  ASSERT_TRUE(store.ok());
  store_ = std::move(*store);
  auto log = testing::OpenAuditLog(*store_, clock_);
  ASSERT_TRUE(log->Record(Event(1)).ok());

  // Another process holds the write lock past the busy timeout.
  sqlite3* other = nullptr;
  ASSERT_EQ(sqlite3_open(DbPath().c_str(), &other), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(other, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);
  absl::Status refused = log->Record(Event(2));
  EXPECT_TRUE(absl::IsUnavailable(refused)) << refused;
  EXPECT_THAT(refused.message(), HasSubstr("audit record not stored"));
  ASSERT_EQ(sqlite3_exec(other, "COMMIT", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(other);

  ASSERT_TRUE(log->Record(Event(3)).ok());
  auto records = All();
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].seq, 2);
  EXPECT_EQ(records[1].credential_id, "jti-3");
  EXPECT_EQ(log->stats().failed, 1);
  EXPECT_TRUE(Verify().ok());
}

TEST_F(AuditLogTest, AnotherWriterOnTheSameChainIsDetectedAndTheChainStaysIntact) {
  auto first = testing::OpenAuditLog(*store_, clock_);
  auto second = testing::OpenAuditLog(*store_, clock_);  // a misconfigured second broker
  ASSERT_TRUE(first->Record(Event(1)).ok());
  absl::Status collided = second->Record(Event(2));
  EXPECT_TRUE(absl::IsUnavailable(collided)) << collided;
  // The second writer re-reads the head and continues after the first one's record.
  ASSERT_TRUE(second->Record(Event(3)).ok());
  auto records = All();
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[1].credential_id, "jti-3");
  EXPECT_TRUE(Verify().ok());
}

TEST_F(AuditLogTest, AFullBacklogIsRefusedAtOnce) {
  auto log = AuditLog::Open(*store_, "test-broker", clock_, {.max_queued = 0});
  ASSERT_TRUE(log.ok());
  EXPECT_TRUE(absl::IsUnavailable((*log)->Record(Event(1))));
  EXPECT_TRUE(All().empty());
}

TEST_F(AuditLogTest, RejectsABadChainId) {
  EXPECT_TRUE(absl::IsInvalidArgument(AuditLog::Open(*store_, "", clock_).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(AuditLog::Open(*store_, "a b", clock_).status()));
  EXPECT_TRUE(
      absl::IsInvalidArgument(AuditLog::Open(*store_, std::string(65, 'a'), clock_).status()));
}

class AuditTamperTest : public AuditLogTest {
 protected:
  void SetUp() override {
    auto log = testing::OpenAuditLog(*store_, clock_);
    for (int i = 1; i <= 5; ++i) ASSERT_TRUE(log->Record(Event(i)).ok());
    ASSERT_TRUE(Verify().ok());
  }
};

TEST_F(AuditTamperTest, AnAlteredFieldIsFound) {
  ExecRaw("UPDATE audit_log SET spiffe_id = 'spiffe://example.org/agent/other' WHERE seq = 3");
  absl::Status status = Verify();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("record 3 was altered"));
}

TEST_F(AuditTamperTest, ARemovedRecordIsFound) {
  ExecRaw("DELETE FROM audit_log WHERE seq = 2");
  absl::Status status = Verify();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("record 2 is missing"));
}

TEST_F(AuditTamperTest, ARewrittenRecordWithAFreshHashBreaksTheLink) {
  // Rewrite record 3 and recompute its own hash: record 4 no longer follows it.
  auto records = All();
  store::AuditRecord forged = records[2];
  forged.detail = R"({"n":999})";
  forged.hash = AuditRecordHash(forged);
  ExecRaw(absl::StrCat("UPDATE audit_log SET detail = '", forged.detail, "', hash = '", forged.hash,
                       "' WHERE seq = 3"));
  absl::Status status = Verify();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("record 4 does not follow record 3"));
  auto report = VerifyAuditChain(*store_, "test-broker");
  EXPECT_EQ(report->records, 3);
}

TEST(AuditChainIdTest, IsCreatedOnceAndKept) {
  TempDir dir;
  auto first = LoadOrCreateAuditChainId(dir.path());
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_THAT(*first, ::testing::StartsWith("broker-"));
  auto again = LoadOrCreateAuditChainId(dir.path());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *first);
  TempDir other;
  EXPECT_NE(*LoadOrCreateAuditChainId(other.path()), *first);
}

TEST(AuditChainIdTest, RefusesAFileThatIsNotAnId) {
  TempDir dir;
  ASSERT_TRUE(crypto::WriteFileAtomic(dir.path() + "/audit-chain-id", "not an id\n").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(LoadOrCreateAuditChainId(dir.path()).status()));
}

// The credential index row travels with its audit record: both stored in one transaction.
store::IssuedCredential IndexRow(int i) {
  return {.id = absl::StrCat("jti-", i),
          .kind = "jwt_svid",
          .spiffe_id = "spiffe://example.org/agent/bot",
          .issued_at = kNow,
          .expires_at = kNow + 300};
}

TEST_F(AuditLogTest, IndexRowsAreStoredWithTheirRecords) {
  auto log = testing::OpenAuditLog(*store_, clock_);
  AuditEvent with_row = Event(1);
  with_row.credential = IndexRow(1);
  std::vector<AuditEvent> events;
  events.push_back(std::move(with_row));
  events.push_back(Event(2));  // a record without a row (e.g. a refusal)
  ASSERT_TRUE(log->RecordAll(std::move(events)).ok());
  EXPECT_EQ(All().size(), 2u);
  auto row = store_->GetCredential("jti-1");
  ASSERT_TRUE(row.ok()) << row.status();
  EXPECT_EQ(*row, IndexRow(1));
  EXPECT_TRUE(absl::IsNotFound(store_->GetCredential("jti-2").status()));
  EXPECT_TRUE(Verify().ok());
}

TEST_F(AuditLogTest, ABatchWhoseRowCannotBeStoredStoresNothingAndTheChainGoesOn) {
  auto log = testing::OpenAuditLog(*store_, clock_);
  AuditEvent first = Event(1);
  first.credential = IndexRow(1);
  ASSERT_TRUE(log->Record(std::move(first)).ok());
  AuditEvent colliding = Event(2);
  colliding.credential = IndexRow(1);  // the same id again: refused
  absl::Status status = log->Record(std::move(colliding));
  EXPECT_TRUE(absl::IsUnavailable(status)) << status;
  EXPECT_EQ(All().size(), 1u);
  // The next record continues the chain from the last stored one.
  AuditEvent next = Event(3);
  next.credential = IndexRow(3);
  ASSERT_TRUE(log->Record(std::move(next)).ok());
  EXPECT_EQ(All().size(), 2u);
  EXPECT_TRUE(store_->GetCredential("jti-3").ok());
  EXPECT_TRUE(Verify().ok());
}

}  // namespace
}  // namespace mandate::broker
