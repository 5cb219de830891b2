// Join tokens and attested nodes in SqliteStore.
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::mandate::store::test_util::TokenHash;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kNode[] = "spiffe://example.org/node/join/web-1";

class SqliteStoreTokensNodesTest : public test_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    store_ = OpenStore();
    ASSERT_NE(store_, nullptr);
  }
  void TearDown() override {
    store_.reset();
    SqliteStoreFixture::TearDown();
  }

  JoinToken Token(char hash_digit, int64_t expires_at) {
    return JoinToken{TokenHash(hash_digit), kNode, 1000, expires_at};
  }

  AttestedNode Node(std::string id) {
    AttestedNode node;
    node.spiffe_id = std::move(id);
    node.attestor = "join_token";
    node.selectors = {"join:name:web-1"};
    node.cert_serial = "0a1b";
    node.cert_expires_at = 5000;
    node.created_at = 1000;
    node.updated_at = 1000;
    return node;
  }

  std::unique_ptr<SqliteStore> store_;
};

// ---- Join tokens ----

TEST_F(SqliteStoreTokensNodesTest, ConsumeReturnsTokenOnceThenNotFound) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 2000)).ok());
  absl::StatusOr<JoinToken> first = store_->ConsumeJoinToken(TokenHash('a'), 1500);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(*first, Token('a', 2000));
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('a'), 1500).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTokensNodesTest, ConsumeUnknownTokenIsNotFound) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 2000)).ok());
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('b'), 1500).status().code(),
            absl::StatusCode::kNotFound);
  // The other token is untouched.
  EXPECT_TRUE(store_->ConsumeJoinToken(TokenHash('a'), 1500).ok());
}

TEST_F(SqliteStoreTokensNodesTest, ConsumeExpiredTokenFailsPreconditionThenNotFound) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 2000)).ok());
  absl::StatusOr<JoinToken> expired = store_->ConsumeJoinToken(TokenHash('a'), 2500);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(expired.status().message(), "join token expired");
  // Deleted all the same: a retry, even at a time it would have been valid, cannot use it.
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('a'), 1500).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTokensNodesTest, TokenIsExpiredAtExactlyExpiresAt) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 2000)).ok());
  ASSERT_TRUE(store_->CreateJoinToken(Token('b', 2000)).ok());
  EXPECT_TRUE(store_->ConsumeJoinToken(TokenHash('a'), 1999).ok());
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('b'), 2000).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(SqliteStoreTokensNodesTest, TokenHashIsCaseInsensitive) {
  JoinToken token = Token('a', 2000);
  token.token_hash = TokenHash('A');
  ASSERT_TRUE(store_->CreateJoinToken(token).ok());
  absl::StatusOr<JoinToken> consumed = store_->ConsumeJoinToken(TokenHash('a'), 1500);
  ASSERT_TRUE(consumed.ok()) << consumed.status();
  EXPECT_EQ(consumed->token_hash, TokenHash('a'));
}

TEST_F(SqliteStoreTokensNodesTest, CreateDuplicateTokenIsAlreadyExists) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 2000)).ok());
  absl::Status dup = store_->CreateJoinToken(Token('a', 3000));
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists);
  // The first token keeps its expiry.
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('a'), 1500)->expires_at, 2000);
}

TEST_F(SqliteStoreTokensNodesTest, CreateRejectsSomethingThatIsNotAHash) {
  JoinToken raw = Token('a', 2000);
  raw.token_hash = "my-secret-join-token";
  absl::Status status = store_->CreateJoinToken(raw);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("64 hex digits"));
  raw.token_hash = std::string(63, 'a') + "g";
  EXPECT_EQ(store_->CreateJoinToken(raw).code(), absl::StatusCode::kInvalidArgument);
  JoinToken no_node = Token('a', 2000);
  no_node.node_spiffe_id.clear();
  EXPECT_EQ(store_->CreateJoinToken(no_node).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SqliteStoreTokensNodesTest, PruneRemovesOnlyExpiredTokens) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 1000)).ok());
  ASSERT_TRUE(store_->CreateJoinToken(Token('b', 2000)).ok());
  ASSERT_TRUE(store_->CreateJoinToken(Token('c', 2001)).ok());
  ASSERT_TRUE(store_->PruneExpiredJoinTokens(2000).ok());
  // A pruned token is simply unknown; the live one still works.
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('a'), 0).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->ConsumeJoinToken(TokenHash('b'), 0).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(store_->ConsumeJoinToken(TokenHash('c'), 2000).ok());
}

TEST_F(SqliteStoreTokensNodesTest, ConcurrentConsumersGetTheTokenExactlyOnce) {
  ASSERT_TRUE(store_->CreateJoinToken(Token('a', 2000)).ok());
  std::atomic<int> successes = 0, not_found = 0, other = 0;
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      absl::StatusOr<JoinToken> result = store_->ConsumeJoinToken(TokenHash('a'), 1500);
      if (result.ok()) {
        ++successes;
      } else if (absl::IsNotFound(result.status())) {
        ++not_found;
      } else {
        ++other;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(successes, 1);
  EXPECT_EQ(not_found, 7);
  EXPECT_EQ(other, 0);
}

// ---- Attested nodes ----

TEST_F(SqliteStoreTokensNodesTest, UpsertInsertsNewNode) {
  AttestedNode node = Node(kNode);
  node.selectors = {"join:name:web-1", "join:name:alias"};
  ASSERT_TRUE(store_->UpsertNode(node).ok());
  absl::StatusOr<AttestedNode> got = store_->GetNode(kNode);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->spiffe_id, kNode);
  EXPECT_EQ(got->attestor, "join_token");
  EXPECT_THAT(got->selectors, ElementsAre("join:name:alias", "join:name:web-1"));
  EXPECT_EQ(got->cert_serial, "0a1b");
  EXPECT_EQ(got->cert_expires_at, 5000);
  EXPECT_EQ(got->created_at, 1000);
  EXPECT_EQ(got->updated_at, 1000);
  EXPECT_FALSE(got->banned);
}

TEST_F(SqliteStoreTokensNodesTest, UpsertUpdatesButKeepsCreatedAtAndBanned) {
  ASSERT_TRUE(store_->UpsertNode(Node(kNode)).ok());
  ASSERT_TRUE(store_->SetNodeBanned(kNode, true).ok());

  AttestedNode update = Node(kNode);
  update.attestor = "tpm";
  update.selectors = {"tpm:ek_hash:ab"};
  update.cert_serial = "ffff";
  update.cert_expires_at = 9000;
  update.created_at = 7000;
  update.updated_at = 7000;
  update.banned = false;
  ASSERT_TRUE(store_->UpsertNode(update).ok());

  absl::StatusOr<AttestedNode> got = store_->GetNode(kNode);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->attestor, "tpm");
  EXPECT_THAT(got->selectors, ElementsAre("tpm:ek_hash:ab"));  // Replaced, not merged.
  EXPECT_EQ(got->cert_serial, "ffff");
  EXPECT_EQ(got->cert_expires_at, 9000);
  EXPECT_EQ(got->updated_at, 7000);
  EXPECT_EQ(got->created_at, 1000);
  EXPECT_TRUE(got->banned);
}

TEST_F(SqliteStoreTokensNodesTest, UpsertRejectsEmptyIdOrSelector) {
  EXPECT_EQ(store_->UpsertNode(Node("")).code(), absl::StatusCode::kInvalidArgument);
  AttestedNode node = Node(kNode);
  node.selectors.push_back("");
  EXPECT_EQ(store_->UpsertNode(node).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(store_->ListNodes()->empty());
}

TEST_F(SqliteStoreTokensNodesTest, GetUnknownNodeIsNotFound) {
  EXPECT_EQ(store_->GetNode(kNode).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreTokensNodesTest, ListNodesIsOrderedAndIncludesBanned) {
  ASSERT_TRUE(store_->UpsertNode(Node("spiffe://example.org/node/join/c")).ok());
  ASSERT_TRUE(store_->UpsertNode(Node("spiffe://example.org/node/join/a")).ok());
  AttestedNode b = Node("spiffe://example.org/node/join/b");
  b.selectors = {"join:name:b"};
  ASSERT_TRUE(store_->UpsertNode(b).ok());
  ASSERT_TRUE(store_->SetNodeBanned("spiffe://example.org/node/join/a", true).ok());
  absl::StatusOr<std::vector<AttestedNode>> nodes = store_->ListNodes();
  ASSERT_TRUE(nodes.ok()) << nodes.status();
  ASSERT_EQ(nodes->size(), 3u);
  EXPECT_EQ((*nodes)[0].spiffe_id, "spiffe://example.org/node/join/a");
  EXPECT_TRUE((*nodes)[0].banned);
  EXPECT_EQ((*nodes)[1].spiffe_id, "spiffe://example.org/node/join/b");
  EXPECT_THAT((*nodes)[1].selectors, ElementsAre("join:name:b"));
  EXPECT_EQ((*nodes)[2].spiffe_id, "spiffe://example.org/node/join/c");
  EXPECT_FALSE((*nodes)[2].banned);
}

TEST_F(SqliteStoreTokensNodesTest, BannedNodeRowStaysAndCanBeUnbanned) {
  ASSERT_TRUE(store_->UpsertNode(Node(kNode)).ok());
  EXPECT_FALSE(*store_->IsNodeBanned(kNode));
  ASSERT_TRUE(store_->SetNodeBanned(kNode, true).ok());
  EXPECT_TRUE(*store_->IsNodeBanned(kNode));
  EXPECT_TRUE(store_->GetNode(kNode).ok());
  ASSERT_TRUE(store_->SetNodeBanned(kNode, false).ok());
  EXPECT_FALSE(*store_->IsNodeBanned(kNode));
}

TEST_F(SqliteStoreTokensNodesTest, IsNodeBannedIsFalseForUnknownNode) {
  absl::StatusOr<bool> banned = store_->IsNodeBanned(kNode);
  ASSERT_TRUE(banned.ok()) << banned.status();
  EXPECT_FALSE(*banned);
}

TEST_F(SqliteStoreTokensNodesTest, SetNodeBannedOnUnknownNodeIsNotFound) {
  EXPECT_EQ(store_->SetNodeBanned(kNode, true).code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(*store_->IsNodeBanned(kNode));
}

TEST_F(SqliteStoreTokensNodesTest, DeleteNodeRemovesRowAndSelectors) {
  ASSERT_TRUE(store_->UpsertNode(Node(kNode)).ok());
  ASSERT_TRUE(store_->SetNodeBanned(kNode, true).ok());
  ASSERT_TRUE(store_->DeleteNode(kNode).ok());
  EXPECT_EQ(store_->GetNode(kNode).status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(*store_->IsNodeBanned(kNode));
  EXPECT_EQ(store_->DeleteNode(kNode).code(), absl::StatusCode::kNotFound);
  store_.reset();
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM attested_node_selectors"), 0);
}

}  // namespace
}  // namespace mandate::store

namespace mandate::store {
namespace {

TEST_F(SqliteStoreTokensNodesTest, PreviousCertSerialIsStoredAndCleared) {
  AttestedNode node = Node("spiffe://example.org/node/join/renewing");
  node.cert_serial = "02";
  node.previous_cert_serial = "01";
  ASSERT_TRUE(store_->UpsertNode(node).ok());
  auto loaded = store_->GetNode(node.spiffe_id);
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->previous_cert_serial, "01");
  node.previous_cert_serial.clear();
  ASSERT_TRUE(store_->UpsertNode(node).ok());
  EXPECT_EQ(store_->GetNode(node.spiffe_id)->previous_cert_serial, "");
}

}  // namespace
}  // namespace mandate::store

namespace mandate::store {
namespace {

TEST_F(SqliteStoreTokensNodesTest, TpmCountersOnlyMoveForward) {
  const std::string ek(64, 'a');
  ASSERT_TRUE(store_->AdvanceTpmCounters(ek, {3, 5}).ok());
  EXPECT_TRUE(store_->AdvanceTpmCounters(ek, {3, 5}).ok());  // same boot again
  EXPECT_TRUE(store_->AdvanceTpmCounters(ek, {3, 6}).ok());
  auto back = store_->AdvanceTpmCounters(ek, {3, 4});
  EXPECT_EQ(back.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(back.message().find("went backwards"), std::string::npos);
  EXPECT_EQ(store_->AdvanceTpmCounters(ek, {2, 99}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(store_->AdvanceTpmCounters(ek, {4, 0}).ok());  // a reboot resets restartCount
  // Another EK is independent; a reset is the operator's override after a TPM clear.
  EXPECT_TRUE(store_->AdvanceTpmCounters(std::string(64, 'b'), {0, 0}).ok());
  ASSERT_TRUE(store_->ResetTpmCounters(ek).ok());
  EXPECT_TRUE(store_->AdvanceTpmCounters(ek, {0, 0}).ok());
}

}  // namespace
}  // namespace mandate::store

namespace mandate::store {
namespace {

TEST_F(SqliteStoreTokensNodesTest, ConfirmNodeCertSerialClearsOnlyForTheCurrentSerial) {
  AttestedNode node = Node("spiffe://example.org/node/join/confirm");
  node.cert_serial = "02";
  node.previous_cert_serial = "01";
  ASSERT_TRUE(store_->UpsertNode(node).ok());
  ASSERT_TRUE(store_->ConfirmNodeCertSerial(node.spiffe_id, "01").ok());  // not current: no-op
  EXPECT_EQ(store_->GetNode(node.spiffe_id)->previous_cert_serial, "01");
  ASSERT_TRUE(store_->ConfirmNodeCertSerial(node.spiffe_id, "02").ok());
  EXPECT_EQ(store_->GetNode(node.spiffe_id)->previous_cert_serial, "");
  // Never re-creates an evicted node.
  ASSERT_TRUE(store_->DeleteNode(node.spiffe_id).ok());
  ASSERT_TRUE(store_->ConfirmNodeCertSerial(node.spiffe_id, "02").ok());
  EXPECT_EQ(store_->GetNode(node.spiffe_id).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mandate::store
