// AuditCheckpointer and VerifyAuditCheckpoint: checkpoints sign the stored chain head, and a chain
// that was cut or recomputed after a checkpoint no longer verifies against it.
#include "broker/server/audit/audit_checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/common/jose/jose.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/trust_authority.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

constexpr int64_t kNow = 1'800'000'000;

class AuditCheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = testing::OpenStore(dir_);
    authority_ = std::move(TrustAuthority::LoadOrCreate(
                               {.data_dir = dir_.path(),
                                .trust_domain = *spiffe::TrustDomain::Parse("example.org")},
                               clock_))
                     .value();
    log_ = testing::OpenAuditLog(*store_, clock_);
    checkpointer_ = MakeCheckpointer(*log_);
  }

  std::unique_ptr<AuditCheckpointer> MakeCheckpointer(AuditLog& log) {
    return std::make_unique<AuditCheckpointer>(
        *store_, log, "https://broker.example.org",
        [this](std::string_view typ, std::string_view payload) {
          return authority_->SignJws(typ, payload);
        },
        authority_->jwt_public_key(), clock_);
  }

  // The broker stops: its checkpointer signs the final head (as at shutdown), then the log goes.
  void Stop() {
    checkpointer_.reset();
    log_.reset();
  }
  // The broker starts again on the same store: the log reads the stored head afresh.
  void Start() {
    log_ = testing::OpenAuditLog(*store_, clock_);
    checkpointer_ = MakeCheckpointer(*log_);
  }

  void RecordN(int n) {
    for (int i = 0; i < n; ++i) {
      ASSERT_TRUE(log_->Record({.event = "jwt_svid",
                                .outcome = "issued",
                                .credential_id = absl::StrCat("jti-", next_++)})
                      .ok());
    }
  }

  void ExecRaw(const std::string& sql) { testing::ExecRawSql(dir_, sql); }

  absl::Status VerifyNewest() {
    auto checkpoints = store_->ListAuditCheckpoints("test-broker", 1);
    EXPECT_TRUE(checkpoints.ok() && !checkpoints->empty());
    return VerifyAuditCheckpoint(*store_, checkpoints->front(), authority_->jwt_public_key());
  }

  TempDir dir_;
  FakeClock clock_{kNow};
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<TrustAuthority> authority_;
  std::unique_ptr<AuditLog> log_;
  std::unique_ptr<AuditCheckpointer> checkpointer_;
  int next_ = 1;
};

TEST_F(AuditCheckpointTest, SignsTheStoredHeadOnlyWhenTheChainGrew) {
  auto none = checkpointer_->CheckpointNow();
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->has_value()) << "an empty chain has nothing to checkpoint";

  RecordN(3);
  auto first = checkpointer_->CheckpointNow();
  ASSERT_TRUE(first.ok() && first->has_value()) << first.status();
  const store::AuditCheckpoint& c = **first;
  EXPECT_EQ(c.chain_id, "test-broker");
  EXPECT_EQ(c.seq, 3);
  EXPECT_EQ(c.hash, store_->LastAuditRecord("test-broker")->hash);
  EXPECT_EQ(c.time, kNow);
  auto jws = jose::ParseCompact(c.jws);
  ASSERT_TRUE(jws.ok());
  EXPECT_TRUE(jose::VerifySignature(*jws, authority_->jwt_public_key()).ok());
  EXPECT_EQ(jws->header["typ"], "audit-checkpoint+jwt");
  EXPECT_EQ(jws->header["kid"], authority_->jwt_key_id());
  EXPECT_EQ(jws->payload["iss"], "https://broker.example.org");
  EXPECT_EQ(jws->payload["seq"], 3);
  EXPECT_EQ(jws->payload["hash"], c.hash);

  EXPECT_FALSE(checkpointer_->CheckpointNow()->has_value()) << "unchanged head";
  RecordN(2);
  EXPECT_EQ((*checkpointer_->CheckpointNow())->seq, 5);
  EXPECT_EQ(store_->ListAuditCheckpoints("test-broker", 10)->size(), 2u);
  EXPECT_TRUE(VerifyNewest().ok()) << VerifyNewest();
}

TEST_F(AuditCheckpointTest, ARestartedCheckpointerDoesNotRepeatTheLastCheckpoint) {
  RecordN(2);
  ASSERT_TRUE(checkpointer_->CheckpointNow()->has_value());
  std::unique_ptr<AuditCheckpointer> again = MakeCheckpointer(*log_);
  auto repeated = again->CheckpointNow();
  ASSERT_TRUE(repeated.ok()) << repeated.status();
  EXPECT_FALSE(repeated->has_value());
}

TEST_F(AuditCheckpointTest, StopSignsTheFinalHead) {
  checkpointer_->Start(std::chrono::seconds(3600));
  RecordN(4);
  checkpointer_->Stop();
  auto checkpoints = store_->ListAuditCheckpoints("test-broker", 10);
  ASSERT_EQ(checkpoints->size(), 1u);
  EXPECT_EQ(checkpoints->front().seq, 4);
}

TEST_F(AuditCheckpointTest, ACutTailIsFoundAgainstTheCheckpoint) {
  RecordN(5);
  ASSERT_TRUE(checkpointer_->CheckpointNow()->has_value());
  // The chain alone still links up after losing its last two records.
  ExecRaw("DELETE FROM audit_log WHERE seq > 3");
  EXPECT_TRUE(VerifyAuditChain(*store_, "test-broker")->status.ok());
  absl::Status status = VerifyNewest();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("has no record 5"));
}

TEST_F(AuditCheckpointTest, ARecomputedChainIsFoundAgainstTheCheckpoint) {
  RecordN(3);
  ASSERT_TRUE(checkpointer_->CheckpointNow()->has_value());
  // Rewrite record 2 and recompute every hash from there: the chain verifies on its own.
  store::AuditQuery all;
  all.chain_id = "test-broker";
  auto records = *store_->ListAuditRecords(all);
  records[1].spiffe_id = "spiffe://example.org/someone-else";
  for (size_t i = 1; i < records.size(); ++i) {
    records[i].prev_hash = records[i - 1].hash;
    records[i].hash = AuditRecordHash(records[i]);
    ExecRaw(absl::StrCat("UPDATE audit_log SET spiffe_id = '", records[i].spiffe_id,
                         "', prev_hash = '", records[i].prev_hash, "', hash = '", records[i].hash,
                         "' WHERE seq = ", records[i].seq));
  }
  EXPECT_TRUE(VerifyAuditChain(*store_, "test-broker")->status.ok());
  absl::Status status = VerifyNewest();
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("hash differs from the signed checkpoint"));
}

TEST_F(AuditCheckpointTest, ACheckpointNotSignedByTheBrokerIsRefused) {
  RecordN(1);
  auto checkpoint = **checkpointer_->CheckpointNow();
  auto other_key = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(other_key.ok());
  EXPECT_TRUE(
      absl::IsUnauthenticated(VerifyAuditCheckpoint(*store_, checkpoint, other_key->public_key())));
  // A stored row that claims another seq than its signed payload.
  store::AuditCheckpoint moved = checkpoint;
  moved.seq = 2;
  EXPECT_TRUE(
      absl::IsInvalidArgument(VerifyAuditCheckpoint(*store_, moved, authority_->jwt_public_key())));
  store::AuditCheckpoint garbage = checkpoint;
  garbage.jws = "not a jws";
  EXPECT_FALSE(VerifyAuditCheckpoint(*store_, garbage, authority_->jwt_public_key()).ok());
}

// VerifyAuditStore: what `mandate audit verify` answers.
class AuditVerifyStoreTest : public AuditCheckpointTest {
 protected:
  absl::StatusOr<std::vector<AuditChainVerdict>> VerifyAll() {
    return VerifyAuditStore(*store_, *log_, authority_->jwt_public_key());
  }

  // The verdict for `chain`; fails the test when there is none.
  AuditChainVerdict VerdictFor(const std::string& chain) {
    auto verdicts = VerifyAll();
    EXPECT_TRUE(verdicts.ok()) << verdicts.status();
    if (!verdicts.ok()) return {};
    for (const AuditChainVerdict& v : *verdicts) {
      if (v.chain_id == chain) return v;
    }
    ADD_FAILURE() << "no verdict for chain " << chain;
    return {};
  }

  // A self-consistent chain of `n` invented records, appended straight to the store.
  void Fabricate(const std::string& chain, int n) {
    std::vector<store::AuditRecord> records;
    std::string prev;
    for (int i = 1; i <= n; ++i) {
      store::AuditRecord& r = records.emplace_back();
      r.chain_id = chain;
      r.seq = i;
      r.time = kNow;
      r.event = "jwt_svid";
      r.outcome = "issued";
      r.spiffe_id = "spiffe://example.org/invented";
      r.credential_id = absl::StrCat("forged-", i);
      r.detail = "{}";
      r.prev_hash = prev;
      r.hash = AuditRecordHash(r);
      prev = r.hash;
    }
    ASSERT_TRUE(store_->AppendAuditRecords(records).ok());
  }
};

using Ranges = std::vector<AuditSeqRange>;

// `n` invented records that continue this broker's chain, appended straight to the store.
void AppendForgedTail(store::Store& store, int n) {
  auto head = store.LastAuditRecord("test-broker");
  ASSERT_TRUE(head.ok()) << head.status();
  store::AuditRecord r = *head;
  std::vector<store::AuditRecord> records;
  for (int i = 0; i < n; ++i) {
    r.seq += 1;
    r.credential_id = absl::StrCat("forged-", r.seq);
    r.prev_hash = r.hash;
    r.hash = AuditRecordHash(r);
    records.push_back(r);
  }
  ASSERT_TRUE(store.AppendAuditRecords(records).ok());
}

TEST_F(AuditVerifyStoreTest, RecordsForgedWhileTheBrokerWasStoppedAreNotVouchedFor) {
  RecordN(3);
  Stop();  // signs record 3
  ASSERT_NO_FATAL_FAILURE(AppendForgedTail(*store_, 3));
  Start();
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(own.status.ok()) << own.status << ": they link up, so the chain is intact";
  EXPECT_EQ(own.records, 6);
  EXPECT_EQ(own.covered_seq, 6);
  EXPECT_EQ(own.not_vouched, (Ranges{{4, 6}}));

  RecordN(2);  // written by this process: vouched for
  own = VerdictFor("test-broker");
  EXPECT_EQ(own.covered_seq, 8);
  EXPECT_EQ(own.not_vouched, (Ranges{{4, 6}}));

  // This run's checkpoints do not launder them: they list them as unwitnessed, and the next run
  // (started cleanly from such a checkpoint) still reports them.
  auto checkpoint = checkpointer_->CheckpointNow();
  ASSERT_TRUE(checkpoint.ok() && checkpoint->has_value()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->seq, 8);
  EXPECT_EQ(jose::ParseCompact((*checkpoint)->jws)->payload["unwitnessed"],
            nlohmann::json::parse("[[4, 6]]"));
  EXPECT_EQ(VerdictFor("test-broker").not_vouched, (Ranges{{4, 6}}));
  Stop();
  Start();
  own = VerdictFor("test-broker");
  EXPECT_TRUE(own.status.ok()) << own.status;
  EXPECT_EQ(own.covered_seq, 8);
  EXPECT_EQ(own.not_vouched, (Ranges{{4, 6}}));

  // Deleting the checkpoints that list them only widens the range.
  ExecRaw("DELETE FROM audit_checkpoints WHERE seq > 3");
  Stop();
  Start();
  own = VerdictFor("test-broker");
  EXPECT_TRUE(own.status.ok()) << own.status;
  EXPECT_EQ(own.not_vouched, (Ranges{{4, 8}}));
}

TEST_F(AuditVerifyStoreTest, AfterACleanStopEverythingIsVouchedFor) {
  RecordN(3);
  Stop();
  Start();
  RecordN(2);
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(own.status.ok()) << own.status;
  EXPECT_EQ(own.covered_seq, 5);
  EXPECT_TRUE(own.not_vouched.empty());
}

TEST_F(AuditVerifyStoreTest, RecordsPastTheLastCheckpointOfAKilledRunAreNotVouchedFor) {
  RecordN(2);
  checkpointer_.reset();  // signs record 2; the records below get no checkpoint, as after kill -9
  RecordN(3);
  log_.reset();
  Start();
  RecordN(1);
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(own.status.ok()) << own.status;
  EXPECT_EQ(own.covered_seq, 6);
  EXPECT_EQ(own.not_vouched, (Ranges{{3, 5}}));
}

TEST_F(AuditVerifyStoreTest, TheCheckpointerDoesNotSignRecordsAddedBehindTheBrokersBack) {
  RecordN(2);
  ASSERT_NO_FATAL_FAILURE(AppendForgedTail(*store_, 1));
  auto checkpoint = checkpointer_->CheckpointNow();
  EXPECT_TRUE(absl::IsDataLoss(checkpoint.status())) << checkpoint.status();
  EXPECT_TRUE(store_->ListAuditCheckpoints("test-broker", 10)->empty());
}

TEST_F(AuditVerifyStoreTest, AnUntouchedStorePasses) {
  auto empty = VerifyAll();
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->empty()) << "a broker that wrote nothing has no chain to show";

  RecordN(3);
  ASSERT_TRUE(checkpointer_->CheckpointNow()->has_value());
  RecordN(2);  // not checkpointed yet: the running broker's head vouches for them
  auto verdicts = VerifyAll();
  ASSERT_TRUE(verdicts.ok()) << verdicts.status();
  ASSERT_EQ(verdicts->size(), 1u);
  const AuditChainVerdict& v = verdicts->front();
  EXPECT_TRUE(v.status.ok()) << v.status;
  EXPECT_TRUE(v.this_broker);
  EXPECT_FALSE(v.unverified);
  EXPECT_EQ(v.records, 5);
  EXPECT_EQ(v.checkpoints, 1);
  EXPECT_EQ(v.checkpointed_seq, 3);
  EXPECT_EQ(v.covered_seq, 5);
  EXPECT_TRUE(v.not_vouched.empty());
}

TEST_F(AuditVerifyStoreTest, AFabricatedChainUnderANewIdIsUnverified) {
  RecordN(2);
  ASSERT_NO_FATAL_FAILURE(Fabricate("broker-forged", 4));
  // It links up on its own: only the missing checkpoint gives it away.
  EXPECT_TRUE(VerifyAuditChain(*store_, "broker-forged")->status.ok());
  AuditChainVerdict forged = VerdictFor("broker-forged");
  EXPECT_TRUE(absl::IsFailedPrecondition(forged.status)) << forged.status;
  EXPECT_TRUE(forged.unverified);
  EXPECT_FALSE(forged.this_broker);
  EXPECT_EQ(forged.records, 4);
  EXPECT_EQ(forged.covered_seq, 0);
  EXPECT_THAT(forged.status.message(), HasSubstr("broker-forged"));
  EXPECT_THAT(forged.status.message(),
              HasSubstr("no checkpoint signed by a key this broker knows"));
  EXPECT_TRUE(VerdictFor("test-broker").status.ok());
}

TEST_F(AuditVerifyStoreTest, AFabricatedChainWithACheckpointOfAnotherKeyIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Fabricate("broker-forged", 2));
  auto forger = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(forger.ok());
  auto last = store_->LastAuditRecord("broker-forged");
  ASSERT_TRUE(last.ok());
  nlohmann::json payload = {{"iss", "https://broker.example.org"},
                            {"chain_id", "broker-forged"},
                            {"seq", 2},
                            {"hash", last->hash},
                            {"iat", kNow}};
  auto signer = jose::JwsSigner::Create(std::move(*forger), "forger");
  ASSERT_TRUE(signer.ok()) << signer.status();
  auto jws = signer->Sign({{"typ", kAuditCheckpointType}}, payload);
  ASSERT_TRUE(jws.ok()) << jws.status();
  ASSERT_TRUE(store_
                  ->AddAuditCheckpoint({.chain_id = "broker-forged",
                                        .seq = 2,
                                        .hash = last->hash,
                                        .time = kNow,
                                        .jws = *jws})
                  .ok());
  AuditChainVerdict forged = VerdictFor("broker-forged");
  EXPECT_FALSE(forged.status.ok());
  EXPECT_EQ(forged.covered_seq, 0);
}

TEST_F(AuditVerifyStoreTest, AnotherBrokersChainCheckpointedWithAKnownKeyPasses) {
  auto other_log = AuditLog::Open(*store_, "other-broker", clock_);
  ASSERT_TRUE(other_log.ok());
  ASSERT_TRUE((*other_log)->Record({.event = "jwt_svid", .outcome = "issued"}).ok());
  ASSERT_TRUE((*other_log)->Record({.event = "jwt_svid", .outcome = "issued"}).ok());
  std::unique_ptr<AuditCheckpointer> other_checkpointer = MakeCheckpointer(**other_log);
  ASSERT_TRUE(other_checkpointer->CheckpointNow()->has_value());
  ASSERT_TRUE((*other_log)->Record({.event = "jwt_svid", .outcome = "issued"}).ok());
  AuditChainVerdict other = VerdictFor("other-broker");
  EXPECT_TRUE(other.status.ok()) << other.status;
  EXPECT_FALSE(other.this_broker);
  EXPECT_EQ(other.records, 3);
  EXPECT_EQ(other.covered_seq, 2) << "a checkpoint of a prefix covers the chain";
}

TEST_F(AuditVerifyStoreTest, ThisBrokersDeletedChainFails) {
  RecordN(3);
  ExecRaw("DELETE FROM audit_log WHERE chain_id = 'test-broker'");
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(absl::IsDataLoss(own.status)) << own.status;
  EXPECT_TRUE(own.this_broker);
  EXPECT_THAT(own.status.message(), HasSubstr("test-broker of this broker is missing"));
}

TEST_F(AuditVerifyStoreTest, ThisBrokersDeletedChainFailsAfterARestartThroughItsCheckpoints) {
  RecordN(3);
  ASSERT_TRUE(checkpointer_->CheckpointNow()->has_value());
  Stop();
  ExecRaw("DELETE FROM audit_log WHERE chain_id = 'test-broker'");
  Start();  // the head is read afresh
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(absl::IsDataLoss(own.status)) << own.status;
  EXPECT_THAT(own.status.message(), HasSubstr("has no record 3"));
}

TEST_F(AuditVerifyStoreTest, AHeadCutBehindTheRunningBrokerFails) {
  RecordN(3);  // no checkpoint yet: only the in-memory head knows
  ExecRaw("DELETE FROM audit_log WHERE seq > 2");
  EXPECT_TRUE(VerifyAuditChain(*store_, "test-broker")->status.ok());
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(absl::IsDataLoss(own.status)) << own.status;
  EXPECT_THAT(own.status.message(), HasSubstr("ends at record 2 in the store, behind record 3"));
}

TEST_F(AuditVerifyStoreTest, ARewrittenHeadFails) {
  RecordN(2);
  auto head = store_->LastAuditRecord("test-broker");
  ASSERT_TRUE(head.ok());
  head->spiffe_id = "spiffe://example.org/someone-else";
  head->hash = AuditRecordHash(*head);
  ExecRaw(absl::StrCat("UPDATE audit_log SET spiffe_id = '", head->spiffe_id, "', hash = '",
                       head->hash, "' WHERE seq = 2"));
  EXPECT_TRUE(VerifyAuditChain(*store_, "test-broker")->status.ok());
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(absl::IsDataLoss(own.status)) << own.status;
  EXPECT_THAT(own.status.message(), HasSubstr("not the one this broker wrote"));
}

TEST_F(AuditVerifyStoreTest, RecordsAppendedBehindTheBrokersBackFail) {
  RecordN(2);
  auto head = store_->LastAuditRecord("test-broker");
  ASSERT_TRUE(head.ok());
  store::AuditRecord extra = *head;
  extra.seq = 3;
  extra.credential_id = "invented";
  extra.prev_hash = head->hash;
  extra.hash = AuditRecordHash(extra);
  ASSERT_TRUE(store_->AppendAuditRecords({extra}).ok());
  AuditChainVerdict own = VerdictFor("test-broker");
  EXPECT_TRUE(absl::IsDataLoss(own.status)) << own.status;
  EXPECT_THAT(own.status.message(), HasSubstr("past record 2"));
  // The broker's next record fails rather than continuing a chain it did not write.
  EXPECT_FALSE(log_->Record({.event = "jwt_svid", .outcome = "issued"}).ok());
  // The one after continues after the added record, but neither verify nor a checkpoint vouches
  // for it.
  ASSERT_TRUE(log_->Record({.event = "jwt_svid", .outcome = "issued"}).ok());
  own = VerdictFor("test-broker");
  EXPECT_TRUE(own.status.ok()) << own.status;
  EXPECT_EQ(own.covered_seq, 4);
  EXPECT_EQ(own.not_vouched, (std::vector<AuditSeqRange>{{3, 3}}));
  auto checkpoint = checkpointer_->CheckpointNow();
  ASSERT_TRUE(checkpoint.ok() && checkpoint->has_value()) << checkpoint.status();
  EXPECT_EQ(jose::ParseCompact((*checkpoint)->jws)->payload["unwitnessed"],
            nlohmann::json::parse("[[3, 3]]"));
  EXPECT_EQ(VerdictFor("test-broker").not_vouched, (std::vector<AuditSeqRange>{{3, 3}}));
}

TEST_F(AuditVerifyStoreTest, HeadChecksInterleaveWithConcurrentRecordsWithoutFalseAlarms) {
  std::atomic<bool> stop{false};
  std::atomic<int> written{0};
  std::vector<std::thread> writers;
  for (int t = 0; t < 4; ++t) {
    writers.emplace_back([&] {
      while (!stop) {
        ASSERT_TRUE(log_->Record({.event = "jwt_svid", .outcome = "issued"}).ok());
        ++written;
      }
    });
  }
  // The checks must overlap the writes: start them once every writer is under way.
  while (written < 8) std::this_thread::yield();
  for (int i = 0; i < 50; ++i) {
    absl::Status status = log_->CheckStoredHead();
    EXPECT_TRUE(status.ok()) << status;
  }
  stop = true;
  for (std::thread& w : writers) w.join();
  EXPECT_TRUE(VerdictFor("test-broker").status.ok());
}

}  // namespace
}  // namespace mandate::broker
