#include "broker/server/issuance/minter.h"

#include <gtest/gtest.h>

#include <functional>

#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using testing::TempDir;

constexpr int64_t kNow = 1'800'000'000;
constexpr char kNode[] = "spiffe://example.org/node/join/n1";
constexpr char kBot[] = "spiffe://example.org/agent/bot";

class MinterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto authority = TrustAuthority::LoadOrCreate(
        {.data_dir = dir_.path(), .trust_domain = *spiffe::TrustDomain::Parse("example.org")},
        clock_);
    ASSERT_TRUE(authority.ok()) << authority.status();
    authority_ = std::move(*authority);
    IssuerDefaults defaults;
    defaults.issuer_url = "https://broker.example.org";
    minter_ = std::make_unique<Minter>(*authority_, clock_, defaults);
  }

  static crypto::PublicKey Key() { return crypto::PrivateKey::GenerateP256()->public_key(); }

  TempDir dir_;
  FakeClock clock_{kNow};
  std::unique_ptr<TrustAuthority> authority_;
  std::unique_ptr<Minter> minter_;
};

TEST_F(MinterTest, X509SvidNamesTheGivenIdentity) {
  auto svid = minter_->X509Svid(Key(), kBot, 3600);
  ASSERT_TRUE(svid.ok()) << svid.status();
  auto cert = crypto::Certificate::FromDer(svid->der);
  ASSERT_TRUE(cert.ok()) << cert.status();
  EXPECT_EQ(svid->serial_hex, cert->SerialHex());
  EXPECT_EQ(svid->not_before, cert->not_before());
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{kBot});
  EXPECT_EQ(svid->not_after, kNow + 3600);
  auto verified = crypto::VerifyX509SvidChain({*cert}, authority_->x509_roots(), kNow);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(MinterTest, JwtSvidHeaderAndClaimsFollowTheSpiffeProfile) {
  auto jwt = minter_->JwtSvid(kBot, {"https://api.example.org", "b"}, 120);
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  auto parsed = jose::ParseCompact(jwt->token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header.size(), 3u);  // alg, kid, typ and nothing else
  EXPECT_EQ(parsed->header["alg"], "ES256");
  EXPECT_EQ(parsed->header["typ"], "JWT");
  EXPECT_EQ(parsed->header["kid"], authority_->jwt_key_id());
  EXPECT_EQ(parsed->payload["sub"], kBot);
  EXPECT_EQ(parsed->payload["aud"], nlohmann::json({"https://api.example.org", "b"}));
  EXPECT_EQ(parsed->payload["iat"], kNow);
  EXPECT_EQ(parsed->payload["exp"], kNow + 120);
  EXPECT_EQ(parsed->payload["jti"], jwt->jti);
  auto set = jose::JwkSet::Parse(authority_->oidc_jwks());
  EXPECT_TRUE(jose::VerifySignature(*parsed, set->FindByKid(authority_->jwt_key_id())->key).ok());
  // Every token gets a fresh jti.
  auto again = minter_->JwtSvid(kBot, {"b"}, 120);
  EXPECT_NE(again->jti, jwt->jti);
}

TaskTokenGrant Grant() {
  TaskTokenGrant grant;
  grant.spiffe_id = "spiffe://example.org/agent/bot";
  grant.task_id = "task_abc";
  grant.task_purpose = "triage \"ticket\" 42";
  grant.task_expires_at = kNow + 3600;
  grant.audience = "https://api.example.org";
  grant.scopes = {"tickets:read", "tickets:write"};
  grant.jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";
  return grant;
}

TEST_F(MinterTest, TaskTokenFollowsTheRfc9068ProfileAndIsDpopBound) {
  auto token = minter_->TaskToken(Grant());
  ASSERT_TRUE(token.ok()) << token.status();
  auto parsed = jose::ParseCompact(token->token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header["typ"], "at+jwt");
  EXPECT_EQ(parsed->header["alg"], "ES256");
  EXPECT_EQ(parsed->header["kid"], authority_->jwt_key_id());
  const auto& claims = parsed->payload;
  EXPECT_EQ(claims["iss"], "https://broker.example.org");
  EXPECT_EQ(claims["sub"], "spiffe://example.org/agent/bot");
  EXPECT_EQ(claims["client_id"], "spiffe://example.org/agent/bot");
  EXPECT_EQ(claims["aud"], "https://api.example.org");
  EXPECT_EQ(claims["scope"], "tickets:read tickets:write");
  EXPECT_EQ(claims["cnf"]["jkt"], "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I");
  EXPECT_EQ(claims["task"]["id"], "task_abc");
  EXPECT_EQ(claims["task"]["purpose"], "triage \"ticket\" 42");
  EXPECT_EQ(claims["iat"], kNow);
  EXPECT_EQ(claims["exp"], kNow + 300);  // default 5 min
  EXPECT_EQ(claims["jti"], token->jti);
  auto set = jose::JwkSet::Parse(authority_->oidc_jwks());
  EXPECT_TRUE(jose::VerifySignature(*parsed, set->FindByKid(authority_->jwt_key_id())->key).ok());
}

TEST_F(MinterTest, TaskTokenNeverOutlivesItsTask) {
  auto grant = Grant();
  grant.task_expires_at = kNow + 42;
  auto token = minter_->TaskToken(grant);
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(token->expires_at, kNow + 42);
  grant.task_expires_at = kNow;
  EXPECT_EQ(minter_->TaskToken(grant).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(MinterTest, TaskTokenNeedsAudienceScopesAndKey) {
  for (auto mutate : std::vector<std::function<void(TaskTokenGrant&)>>{
           [](TaskTokenGrant& g) { g.audience.clear(); },
           [](TaskTokenGrant& g) { g.scopes.clear(); }, [](TaskTokenGrant& g) { g.jkt.clear(); }}) {
    auto grant = Grant();
    mutate(grant);
    EXPECT_EQ(minter_->TaskToken(grant).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(MinterTest, ADelegatedTokenNamesTheUserAndNestsTheActorChain) {
  auto grant = Grant();
  grant.subject = "alice@example.com";
  grant.spiffe_id = "spiffe://example.org/agent/sub";  // the current actor
  grant.actor_chain = {"spiffe://example.org/agent/sub", "spiffe://example.org/agent/bot"};
  auto token = minter_->TaskToken(grant);
  ASSERT_TRUE(token.ok()) << token.status();
  auto claims = jose::ParseCompact(token->token)->payload;
  EXPECT_EQ(claims["sub"], "alice@example.com");
  EXPECT_EQ(claims["client_id"], "spiffe://example.org/agent/sub");
  // RFC 8693 §4.1: the current actor outermost.
  EXPECT_EQ(claims["act"], nlohmann::json::parse(R"({"sub":"spiffe://example.org/agent/sub",
      "act":{"sub":"spiffe://example.org/agent/bot"}})"));
}

TEST_F(MinterTest, NodeSvidNamesTheNode) {
  auto cert = minter_->NodeSvid(Key(), kNode, 3600);
  ASSERT_TRUE(cert.ok());
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{kNode});
  EXPECT_EQ(cert->not_after(), kNow + 3600);
}

}  // namespace
}  // namespace mandate::broker
