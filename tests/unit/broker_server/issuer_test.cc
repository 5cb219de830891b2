#include "broker/server/issuer.h"

#include <gtest/gtest.h>

#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using testing::OpenStore;
using testing::TempDir;

constexpr int64_t kNow = 1'800'000'000;
constexpr char kNode[] = "spiffe://example.org/node/join/n1";
constexpr char kOtherNode[] = "spiffe://example.org/node/join/n2";

class IssuerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = OpenStore(dir_);
    auto authority = TrustAuthority::LoadOrCreate(
        {.data_dir = dir_.path(), .trust_domain = *spiffe::TrustDomain::Parse("example.org")},
        clock_);
    ASSERT_TRUE(authority.ok()) << authority.status();
    authority_ = std::move(*authority);
    registry_ = std::move(EntryRegistry::Load(*store_)).value();
    store::RegistrationEntry entry;
    entry.id = "e1";
    entry.spiffe_id = "spiffe://example.org/agent/bot";
    entry.parent_id = kNode;
    entry.selectors = {"unix:uid:1000"};
    entry.jwt_ttl_s = 120;
    ASSERT_TRUE(registry_->Create(entry).ok());
    issuer_ = std::make_unique<Issuer>(*authority_, *registry_, clock_, IssuerDefaults{});
  }

  std::string Csr(const std::string& id) {
    auto key = crypto::PrivateKey::GenerateP256();
    return *crypto::CreateCsrDer(*key, id);
  }

  TempDir dir_;
  FakeClock clock_{kNow};
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<TrustAuthority> authority_;
  std::unique_ptr<EntryRegistry> registry_;
  std::unique_ptr<Issuer> issuer_;
};

TEST_F(IssuerTest, X509SvidCarriesTheEntryIdNotTheCsrSan) {
  auto svid = issuer_->IssueX509Svid(kNode, "e1", Csr("spiffe://example.org/agent/admin"));
  ASSERT_TRUE(svid.ok()) << svid.status();
  EXPECT_EQ(svid->certificate.UriSans(),
            std::vector<std::string>{"spiffe://example.org/agent/bot"});
  EXPECT_EQ(svid->certificate.not_after(), kNow + 3600);
  auto verified = crypto::VerifyX509SvidChain({svid->certificate}, authority_->x509_roots(), kNow);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(IssuerTest, EntryOfAnotherNodeIsRefusedLikeAnUnknownOne) {
  auto other = issuer_->IssueX509Svid(kOtherNode, "e1", Csr(""));
  auto unknown = issuer_->IssueX509Svid(kNode, "nope", Csr(""));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(issuer_->IssueJwtSvid(kOtherNode, "e1", {"a"}).status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(IssuerTest, MalformedCsrIsInvalidArgument) {
  std::string csr = Csr("");
  csr[csr.size() - 3] ^= 0x01;
  EXPECT_EQ(issuer_->IssueX509Svid(kNode, "e1", csr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueX509Svid(kNode, "e1", "garbage").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(IssuerTest, JwtSvidHeaderAndClaimsFollowTheSpiffeProfile) {
  auto jwt = issuer_->IssueJwtSvid(kNode, "e1", {"https://api.example.org", "b"});
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  auto parsed = jose::ParseCompact(jwt->token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header.size(), 3u);  // alg, kid, typ and nothing else
  EXPECT_EQ(parsed->header["alg"], "ES256");
  EXPECT_EQ(parsed->header["typ"], "JWT");
  EXPECT_EQ(parsed->header["kid"], authority_->jwt_key_id());
  EXPECT_EQ(parsed->payload["sub"], "spiffe://example.org/agent/bot");
  EXPECT_EQ(parsed->payload["aud"], nlohmann::json({"https://api.example.org", "b"}));
  EXPECT_EQ(parsed->payload["iat"], kNow);
  EXPECT_EQ(parsed->payload["exp"], kNow + 120);  // the entry's TTL
  EXPECT_EQ(parsed->payload["jti"], jwt->jti);
  auto set = jose::JwkSet::Parse(authority_->oidc_jwks());
  EXPECT_TRUE(jose::VerifySignature(*parsed, set->FindByKid(authority_->jwt_key_id())->key).ok());
  // Every token gets a fresh jti.
  auto again = issuer_->IssueJwtSvid(kNode, "e1", {"b"});
  EXPECT_NE(again->jti, jwt->jti);
}

TEST_F(IssuerTest, JwtSvidAudienceIsRequiredAndBounded) {
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", {""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", std::vector<std::string>(17, "a")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", {std::string(513, 'a')}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(IssuerTest, NodeSvidNamesTheNode) {
  auto cert = issuer_->IssueNodeSvid(kNode, Csr(""));
  ASSERT_TRUE(cert.ok());
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{kNode});
}

}  // namespace
}  // namespace mandate::broker
