// AuditCheckpointer and VerifyAuditCheckpoint: checkpoints sign the stored chain head, and a chain
// that was cut or recomputed after a checkpoint no longer verifies against it.
#include "broker/server/audit/audit_checkpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <string>

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
    checkpointer_ = std::make_unique<AuditCheckpointer>(
        *store_, "test-broker", "https://broker.example.org",
        [this](std::string_view typ, std::string_view payload) {
          return authority_->SignJws(typ, payload);
        },
        clock_);
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
  AuditCheckpointer again(
      *store_, "test-broker", "https://broker.example.org",
      [this](std::string_view typ, std::string_view payload) {
        return authority_->SignJws(typ, payload);
      },
      clock_);
  auto repeated = again.CheckpointNow();
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

}  // namespace
}  // namespace mandate::broker
