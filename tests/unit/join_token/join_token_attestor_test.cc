#include "attestors/node/join_token/join_token_attestor.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>

#include "broker/common/store/sqlite_store.h"

namespace mandate::attestors {
namespace {

class JoinTokenAttestorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "mandate-jt-XXXXXX").string();
    dir_ = ::mkdtemp(pattern.data());
    store_ = std::move(store::SqliteStore::Open(dir_ + "/db")).value();
    attestor_ = std::make_unique<JoinTokenServerAttestor>(
        *store_, clock_, *spiffe::TrustDomain::Parse("example.org"));
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string Issue(const std::string& node_id, int64_t ttl) {
    auto token = GenerateJoinToken();
    store::JoinToken record{token->token_hash, node_id, clock_.NowSeconds(),
                            clock_.NowSeconds() + ttl};
    EXPECT_TRUE(store_->CreateJoinToken(record).ok());
    return token->token;
  }

  absl::StatusOr<NodeAttestationResult> Attest(std::string_view token) {
    return attestor_->Attest({token, ""}, [](std::string_view) -> absl::StatusOr<std::string> {
      return absl::InternalError("no challenges expected");
    });
  }

  std::string dir_;
  FakeClock clock_{1'800'000'000};
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<JoinTokenServerAttestor> attestor_;
};

TEST_F(JoinTokenAttestorTest, TokenYieldsItsNodeIdAndNameSelector) {
  auto result = Attest(Issue("spiffe://example.org/node/join/web-1", 600));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->node_spiffe_id, "spiffe://example.org/node/join/web-1");
  EXPECT_EQ(result->selectors, std::vector<std::string>{"join:name:web-1"});
}

TEST_F(JoinTokenAttestorTest, TokenIsSingleUse) {
  std::string token = Issue("spiffe://example.org/node/join/web-1", 600);
  ASSERT_TRUE(Attest(token).ok());
  auto again = Attest(token);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(again.status().message(), "join token unknown or already used");
}

TEST_F(JoinTokenAttestorTest, ExpiredTokenIsRefusedAndSpent) {
  std::string token = Issue("spiffe://example.org/node/join/web-1", 60);
  clock_.Advance(61);
  auto expired = Attest(token);
  EXPECT_EQ(expired.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(expired.status().message(), "join token expired");
  EXPECT_EQ(Attest(token).status().message(), "join token unknown or already used");
}

TEST_F(JoinTokenAttestorTest, UnknownEmptyAndOversizedTokensAreRefused) {
  EXPECT_EQ(Attest("not-a-token").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Attest("").status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(Attest(std::string(10000, 'a')).status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(JoinTokenAttestorTest, TokenOfAnotherTrustDomainIsRefused) {
  auto result = Attest(Issue("spiffe://other.org/node/join/web-1", 600));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(JoinTokenAttestorTest, TokensAreRandomAndOnlyTheirHashIsStored) {
  auto a = GenerateJoinToken();
  auto b = GenerateJoinToken();
  EXPECT_NE(a->token, b->token);
  EXPECT_EQ(a->token.size(), 43u);  // 256 bits, base64url
  EXPECT_EQ(a->token_hash, HashJoinToken(a->token));
  EXPECT_EQ(a->token_hash.size(), 64u);
  EXPECT_EQ(a->token_hash.find(a->token), std::string::npos);
}

}  // namespace
}  // namespace mandate::attestors
