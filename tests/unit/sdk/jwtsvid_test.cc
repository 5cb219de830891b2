#include "mandate/jwtsvid.h"

#include <string>
#include <vector>

#include "broker/common/jose/jose.h"
#include "gtest/gtest.h"
#include "mandate/bundle.h"
#include "nlohmann/json.hpp"
#include "tests/unit/sdk/test_pki.h"

namespace mandate {
namespace {

using nlohmann::json;
using testing::kNow;

class JwtSvidTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto key = crypto::PrivateKey::GenerateP256();
    ASSERT_TRUE(key.ok());
    key_ = std::make_unique<crypto::PrivateKey>(*std::move(key));
    auto bundle = JwtBundle::FromJwks("example.org", testing::MakeJwks(*key_, "k1"));
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    ASSERT_TRUE(bundles_.AddJwtBundle(*bundle).ok());
  }

  json Header() const { return json{{"alg", "ES256"}, {"kid", "k1"}, {"typ", "JWT"}}; }
  json Payload() const {
    return json{{"sub", "spiffe://example.org/agent/bot"},
                {"aud", json::array({"api"})},
                {"exp", kNow + 300},
                {"iat", kNow}};
  }
  std::string Sign(const json& header, const json& payload) const {
    return testing::SignEs256(*key_, header, payload);
  }

  std::unique_ptr<crypto::PrivateKey> key_;
  BundleSet bundles_;
};

TEST_F(JwtSvidTest, ValidTokenVerifies) {
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), Payload()), bundles_, {"api"}, kNow);
  ASSERT_TRUE(svid.ok()) << svid.status();
  EXPECT_EQ(svid->spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_EQ(svid->audience, std::vector<std::string>{"api"});
  EXPECT_EQ(svid->expiry, kNow + 300);
  json claims = json::parse(svid->claims_json);
  EXPECT_EQ(claims["iat"], kNow);
}

TEST_F(JwtSvidTest, StringAudienceAndTypJoseAndNoTypAccepted) {
  json payload = Payload();
  payload["aud"] = "api";
  json header = Header();
  header["typ"] = "JOSE";
  EXPECT_TRUE(ParseAndValidateJwtSvid(Sign(header, payload), bundles_, {"api"}, kNow).ok());
  header.erase("typ");
  EXPECT_TRUE(ParseAndValidateJwtSvid(Sign(header, payload), bundles_, {"api"}, kNow).ok());
}

TEST_F(JwtSvidTest, WrongAudienceRefused) {
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), Payload()), bundles_, {"other"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_NE(svid.status().message().find("other"), std::string::npos);
}

TEST_F(JwtSvidTest, EveryExpectedAudienceMustBePresent) {
  std::string token = Sign(Header(), Payload());  // aud = ["api"]
  EXPECT_FALSE(ParseAndValidateJwtSvid(token, bundles_, {"api", "db"}, kNow).ok());
  json payload = Payload();
  payload["aud"] = json::array({"api", "db", "cache"});
  EXPECT_TRUE(ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api", "db"}, kNow).ok());
}

TEST_F(JwtSvidTest, EmptyExpectedAudiencesRefused) {
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), Payload()), bundles_, {}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JwtSvidTest, ExpiredTokenRefused) {
  json payload = Payload();
  payload["exp"] = kNow - kJwtSvidLeewaySeconds - 1;
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(JwtSvidTest, ExpiryWithinLeewayAccepted) {
  json payload = Payload();
  payload["exp"] = kNow - kJwtSvidLeewaySeconds / 2;
  EXPECT_TRUE(ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow).ok());
}

TEST_F(JwtSvidTest, MissingExpRefused) {
  json payload = Payload();
  payload.erase("exp");
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JwtSvidTest, MissingAudRefused) {
  json payload = Payload();
  payload.erase("aud");
  EXPECT_FALSE(ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow).ok());
}

TEST_F(JwtSvidTest, UnknownKidRefused) {
  json header = Header();
  header["kid"] = "k2";
  auto svid = ParseAndValidateJwtSvid(Sign(header, Payload()), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(svid.status().message().find("k2"), std::string::npos);
}

TEST_F(JwtSvidTest, MissingKidRefused) {
  json header = Header();
  header.erase("kid");
  auto svid = ParseAndValidateJwtSvid(Sign(header, Payload()), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JwtSvidTest, X509SvidBundleKeyNotUsedForJwt) {
  BundleSet bundles;
  ASSERT_TRUE(bundles
                  .AddJwtBundle(*JwtBundle::FromJwks("example.org",
                                                     testing::MakeJwks(*key_, "k1", "x509-svid")))
                  .ok());
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), Payload()), bundles, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(JwtSvidTest, TamperedPayloadRefused) {
  std::string token = Sign(Header(), Payload());
  json forged = Payload();
  forged["sub"] = "spiffe://example.org/agent/admin";
  size_t first = token.find('.');
  size_t second = token.find('.', first + 1);
  std::string tampered =
      token.substr(0, first + 1) + jose::Base64UrlEncode(forged.dump()) + token.substr(second);
  auto svid = ParseAndValidateJwtSvid(tampered, bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(JwtSvidTest, AlgNoneRefused) {
  std::string token = jose::Base64UrlEncode(R"({"alg":"none","kid":"k1"})") + "." +
                      jose::Base64UrlEncode(Payload().dump()) + ".";
  auto svid = ParseAndValidateJwtSvid(token, bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kInvalidArgument);
  // Also with a non-empty signature part.
  token += "c2ln";
  EXPECT_FALSE(ParseAndValidateJwtSvid(token, bundles_, {"api"}, kNow).ok());
}

TEST_F(JwtSvidTest, AccessTokenTypRefused) {
  json header = Header();
  header["typ"] = "at+jwt";
  auto svid = ParseAndValidateJwtSvid(Sign(header, Payload()), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(svid.status().message().find("typ"), std::string::npos);
}

TEST_F(JwtSvidTest, SubThatIsNotASpiffeIdRefused) {
  json payload = Payload();
  payload["sub"] = "user@example.org";
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kInvalidArgument);
  payload["sub"] = "spiffe://example.org/a/../b";
  EXPECT_FALSE(ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow).ok());
}

TEST_F(JwtSvidTest, SubInTrustDomainWithoutBundleRefused) {
  json payload = Payload();
  payload["sub"] = "spiffe://other.org/agent/bot";
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(svid.status().message().find("other.org"), std::string::npos);
}

TEST_F(JwtSvidTest, KeyOfAnotherTrustDomainDoesNotVouchForThisOne) {
  // other.org publishes its own key under the same kid; a token for other.org signed with
  // example.org's key must not verify.
  auto other_key = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(other_key.ok());
  ASSERT_TRUE(bundles_
                  .AddJwtBundle(*JwtBundle::FromJwks("spiffe://other.org",
                                                     testing::MakeJwks(*other_key, "k1")))
                  .ok());
  json payload = Payload();
  payload["sub"] = "spiffe://other.org/agent/bot";
  auto svid = ParseAndValidateJwtSvid(Sign(Header(), payload), bundles_, {"api"}, kNow);
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kUnauthenticated);
}

TEST_F(JwtSvidTest, GarbageTokensReturnErrors) {
  for (const char* token : {"", "a", "a.b", "a.b.c", "..", "eyJ9.e30.", "\xff\xfe.x.y"}) {
    EXPECT_FALSE(ParseAndValidateJwtSvid(token, bundles_, {"api"}, kNow).ok()) << token;
    EXPECT_FALSE(ParseInsecureJwtSvid(token).ok()) << token;
  }
}

TEST_F(JwtSvidTest, ParseInsecureSkipsSignatureButNotStructure) {
  std::string token = Sign(Header(), Payload());
  std::string bad_signature = token.substr(0, token.rfind('.') + 1) + "AAAA";
  auto svid = ParseInsecureJwtSvid(bad_signature);
  ASSERT_TRUE(svid.ok()) << svid.status();
  EXPECT_EQ(svid->spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_FALSE(ParseAndValidateJwtSvid(bad_signature, bundles_, {"api"}, kNow).ok());
  json header = Header();
  header["typ"] = "at+jwt";
  EXPECT_FALSE(ParseInsecureJwtSvid(Sign(header, Payload())).ok());
}

TEST(JwtBundleTest, FromJwksRefusesMalformedDocumentsAndTrustDomains) {
  EXPECT_FALSE(JwtBundle::FromJwks("example.org", "not json").ok());
  EXPECT_FALSE(JwtBundle::FromJwks("example.org", R"({"nokeys":[]})").ok());
  EXPECT_FALSE(JwtBundle::FromJwks("Example..org/x", R"({"keys":[]})").ok());
  auto bundle = JwtBundle::FromJwks("spiffe://example.org", R"({"keys":[]})");
  ASSERT_TRUE(bundle.ok()) << bundle.status();
  EXPECT_EQ(bundle->trust_domain, "example.org");
}

}  // namespace
}  // namespace mandate
