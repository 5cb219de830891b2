#include "mandate/x509svid.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "mandate/bundle.h"
#include "mandate/svid.h"
#include "tests/unit/sdk/test_pki.h"

namespace mandate {
namespace {

using testing::kNow;

class X509SvidTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ca_ = std::make_unique<testing::TestCa>(testing::MakeCa("example.org"));
    leaf_ = std::make_unique<testing::TestLeaf>(
        testing::MakeLeaf(*ca_, "spiffe://example.org/agent/bot", kNow - 60, kNow + 3600));
    X509Bundle bundle{"example.org", {ca_->cert.Der()}};
    ASSERT_TRUE(bundles_.AddX509Bundle(bundle).ok());
  }

  std::unique_ptr<testing::TestCa> ca_;
  std::unique_ptr<testing::TestLeaf> leaf_;
  BundleSet bundles_;
};

TEST_F(X509SvidTest, ValidChainVerifies) {
  auto verified = VerifyX509Svid({leaf_->cert.Der()}, bundles_, kNow);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->spiffe_id, "spiffe://example.org/agent/bot");
  ASSERT_EQ(verified->verified_chain_der.size(), 2u);
  EXPECT_EQ(verified->verified_chain_der.back(), ca_->cert.Der());
}

TEST_F(X509SvidTest, ChainFromAnotherCaRefused) {
  testing::TestCa other = testing::MakeCa("example.org");
  testing::TestLeaf forged =
      testing::MakeLeaf(other, "spiffe://example.org/agent/bot", kNow - 60, kNow + 3600);
  auto verified = VerifyX509Svid({forged.cert.Der()}, bundles_, kNow);
  EXPECT_EQ(verified.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(X509SvidTest, ExpiredLeafRefused) {
  auto verified = VerifyX509Svid({leaf_->cert.Der()}, bundles_, kNow + 7200);
  EXPECT_EQ(verified.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(verified.status().message().find("expired"), std::string::npos) << verified.status();
}

TEST_F(X509SvidTest, TrustDomainWithoutBundleRefused) {
  testing::TestCa other = testing::MakeCa("other.org");
  testing::TestLeaf leaf =
      testing::MakeLeaf(other, "spiffe://other.org/agent/bot", kNow - 60, kNow + 3600);
  auto verified = VerifyX509Svid({leaf.cert.Der()}, bundles_, kNow);
  EXPECT_EQ(verified.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(verified.status().message().find("other.org"), std::string::npos);
}

TEST_F(X509SvidTest, BundleOfAnotherTrustDomainDoesNotVouch) {
  // other.org's leaf signed by example.org's CA: the bundle looked up is other.org's.
  testing::TestCa other = testing::MakeCa("other.org");
  ASSERT_TRUE(bundles_.AddX509Bundle(X509Bundle{"other.org", {other.cert.Der()}}).ok());
  testing::TestLeaf leaf =
      testing::MakeLeaf(*ca_, "spiffe://other.org/agent/bot", kNow - 60, kNow + 3600);
  EXPECT_FALSE(VerifyX509Svid({leaf.cert.Der()}, bundles_, kNow).ok());
}

TEST_F(X509SvidTest, EmptyOrGarbageChainRefused) {
  EXPECT_EQ(VerifyX509Svid({}, bundles_, kNow).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(VerifyX509Svid({"not a certificate"}, bundles_, kNow).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(X509SvidTest, CaCertificateAsLeafRefused) {
  EXPECT_FALSE(VerifyX509Svid({ca_->cert.Der()}, bundles_, kNow).ok());
}

TEST(X509BundleTest, PemRoundTrip) {
  testing::TestCa ca = testing::MakeCa("example.org");
  auto bundle = X509Bundle::FromPem("spiffe://example.org", ca.cert.Pem());
  ASSERT_TRUE(bundle.ok()) << bundle.status();
  EXPECT_EQ(bundle->trust_domain, "example.org");
  ASSERT_EQ(bundle->ca_der.size(), 1u);
  EXPECT_EQ(bundle->ca_der[0], ca.cert.Der());
  EXPECT_EQ(bundle->Pem(), ca.cert.Pem());
  EXPECT_FALSE(X509Bundle::FromPem("example.org", "no pem here").ok());
  EXPECT_FALSE(X509Bundle::FromPem("spiffe://example.org/path", ca.cert.Pem()).ok());
}

TEST(X509SvidPemTest, ChainAndKeyPemParseBack) {
  testing::TestCa ca = testing::MakeCa("example.org");
  testing::TestLeaf leaf = testing::MakeLeaf(ca, "spiffe://example.org/a", kNow - 60, kNow + 3600);
  X509Svid svid;
  svid.chain_der = {leaf.cert.Der(), ca.cert.Der()};
  svid.private_key_pkcs8_der = leaf.key.ExportPkcs8DerSecret();
  auto chain = crypto::Certificate::ParsePemChain(svid.ChainPem());
  ASSERT_TRUE(chain.ok()) << chain.status();
  ASSERT_EQ(chain->size(), 2u);
  EXPECT_EQ((*chain)[0].Der(), leaf.cert.Der());
  auto key = crypto::PrivateKey::FromPem(svid.KeyPem());
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_TRUE(key->public_key().Equals(leaf.key.public_key()));
}

TEST(BundleSetTest, LookupNormalisesAndReplaces) {
  testing::TestCa a = testing::MakeCa("example.org");
  testing::TestCa b = testing::MakeCa("example.org");
  BundleSet set;
  ASSERT_TRUE(set.AddX509Bundle(X509Bundle{"spiffe://example.org", {a.cert.Der()}}).ok());
  ASSERT_TRUE(set.AddX509Bundle(X509Bundle{"example.org", {b.cert.Der()}}).ok());
  auto got = set.GetX509BundleForTrustDomain("example.org");
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->ca_der[0], b.cert.Der());
  EXPECT_EQ(set.GetX509BundleForTrustDomain("other.org").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(set.GetJwtBundleForTrustDomain("example.org").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(set.AddX509Bundle(X509Bundle{"Bad_TD!", {}}).ok());
}

}  // namespace
}  // namespace mandate
