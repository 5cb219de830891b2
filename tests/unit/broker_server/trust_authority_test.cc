#include "broker/server/trust_authority.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using testing::TempDir;

TrustAuthority::Options OptionsFor(const TempDir& dir, const char* td = "example.org") {
  return TrustAuthority::Options{.data_dir = dir.path(),
                                 .trust_domain = *spiffe::TrustDomain::Parse(td)};
}

TEST(TrustAuthorityTest, CreatesKeysWithPrivateModesAndWritesBundle) {
  TempDir dir;
  FakeClock clock(1'800'000'000);
  auto authority = TrustAuthority::LoadOrCreate(OptionsFor(dir), clock);
  ASSERT_TRUE(authority.ok()) << authority.status();
  for (const char* name : {"/ca.key", "/jwt.key"}) {
    struct stat st {};
    ASSERT_EQ(::stat((dir.path() + name).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << name;
  }
  auto bundle = crypto::ReadFile(dir.path() + "/bundle.pem");
  ASSERT_TRUE(bundle.ok());
  EXPECT_EQ(*bundle, (*authority)->bundle_pem());
  EXPECT_EQ((*authority)->ca_certificate().UriSans(),
            std::vector<std::string>{"spiffe://example.org"});
}

TEST(TrustAuthorityTest, RestartReusesTheSameKeysAndCa) {
  TempDir dir;
  FakeClock clock(1'800'000'000);
  auto first = TrustAuthority::LoadOrCreate(OptionsFor(dir), clock);
  ASSERT_TRUE(first.ok());
  auto second = TrustAuthority::LoadOrCreate(OptionsFor(dir), clock);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*first)->jwt_key_id(), (*second)->jwt_key_id());
  EXPECT_EQ((*first)->bundle_der(), (*second)->bundle_der());
  EXPECT_EQ((*first)->oidc_jwks(), (*second)->oidc_jwks());
}

TEST(TrustAuthorityTest, RefusesDataDirOfAnotherTrustDomain) {
  TempDir dir;
  FakeClock clock(1'800'000'000);
  ASSERT_TRUE(TrustAuthority::LoadOrCreate(OptionsFor(dir), clock).ok());
  auto other = TrustAuthority::LoadOrCreate(OptionsFor(dir, "other.org"), clock);
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.status().message().find("another trust domain"), std::string::npos);
}

TEST(TrustAuthorityTest, RefusesKeyFileReadableByOthers) {
  TempDir dir;
  FakeClock clock(1'800'000'000);
  ASSERT_TRUE(TrustAuthority::LoadOrCreate(OptionsFor(dir), clock).ok());
  ASSERT_EQ(::chmod((dir.path() + "/jwt.key").c_str(), 0644), 0);
  auto again = TrustAuthority::LoadOrCreate(OptionsFor(dir), clock);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(TrustAuthorityTest, PublishedDocumentsDescribeTheSigningKey) {
  TempDir dir;
  FakeClock clock(1'800'000'000);
  auto authority = TrustAuthority::LoadOrCreate(OptionsFor(dir), clock);
  ASSERT_TRUE(authority.ok());
  auto oidc = nlohmann::json::parse((*authority)->oidc_jwks());
  ASSERT_EQ(oidc["keys"].size(), 1u);
  EXPECT_EQ(oidc["keys"][0]["use"], "sig");
  EXPECT_EQ(oidc["keys"][0]["alg"], "ES256");
  EXPECT_EQ(oidc["keys"][0]["kid"], (*authority)->jwt_key_id());
  EXPECT_FALSE(oidc["keys"][0].contains("d"));

  auto bundle = nlohmann::json::parse((*authority)->spiffe_bundle_jwks());
  ASSERT_EQ(bundle["keys"].size(), 2u);
  EXPECT_EQ(bundle["keys"][0]["use"], "x509-svid");
  EXPECT_FALSE(bundle["keys"][0].contains("kid"));
  EXPECT_EQ(bundle["keys"][0]["x5c"].size(), 1u);
  EXPECT_EQ(bundle["keys"][1]["use"], "jwt-svid");
  EXPECT_EQ(bundle["keys"][1]["kid"], (*authority)->jwt_key_id());
  EXPECT_TRUE(bundle.contains("spiffe_sequence"));
  EXPECT_TRUE(bundle.contains("spiffe_refresh_hint"));

  // The Workload API's JWT bundle holds the JWT-SVID keys only, each with a kid.
  auto jwt_bundle = nlohmann::json::parse((*authority)->jwt_bundle_jwks());
  ASSERT_EQ(jwt_bundle["keys"].size(), 1u);
  EXPECT_EQ(jwt_bundle["keys"][0]["use"], "jwt-svid");
  EXPECT_EQ(jwt_bundle["keys"][0]["kid"], (*authority)->jwt_key_id());

  // A token signed by the authority verifies with the published key.
  auto token = (*authority)->SignJws("JWT", R"({"sub":"spiffe://example.org/x"})");
  ASSERT_TRUE(token.ok());
  auto set = jose::JwkSet::Parse((*authority)->oidc_jwks());
  ASSERT_TRUE(set.ok());
  auto parsed = jose::ParseCompact(*token);
  ASSERT_TRUE(parsed.ok());
  const jose::JwkSetKey* key = set->FindByKid(parsed->header["kid"].get<std::string>());
  ASSERT_NE(key, nullptr);
  EXPECT_TRUE(jose::VerifySignature(*parsed, key->key).ok());
}

TEST(TrustAuthorityTest, ServerCertificateNamesTheBroker) {
  TempDir dir;
  FakeClock clock(1'800'000'000);
  auto authority = TrustAuthority::LoadOrCreate(OptionsFor(dir), clock);
  ASSERT_TRUE(authority.ok());
  auto key = crypto::PrivateKey::GenerateP256();
  auto cert = (*authority)->SignServerCertificate(key->public_key(), 3600);
  ASSERT_TRUE(cert.ok()) << cert.status();
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{"spiffe://example.org/broker"});
  EXPECT_EQ(cert->DnsSans(), std::vector<std::string>{"localhost"});
}

}  // namespace
}  // namespace mandate::broker
