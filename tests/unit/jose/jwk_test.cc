#include <set>
#include <string>

#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/jose/test_keys.h"

namespace mandate::jose {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// RFC 7638 §3.1 example key; its thumbprint is given in the RFC.
const json& Rfc7638RsaJwk() {
  static const json* jwk = new json{
      {"kty", "RSA"},
      {"n",
       "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_"
       "BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-"
       "65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyr"
       "dkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-"
       "kEgU8awapJzKnqDKgw"},
      {"e", "AQAB"},
      {"alg", "RS256"},
      {"kid", "2011-04-29"}};
  return *jwk;
}
constexpr char kRfc7638Thumbprint[] = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";

// RFC 9449 §4.1 example DPoP key; its jkt is given in RFC 9449 §6.1.
const json& Rfc9449EcJwk() {
  static const json* jwk = new json{{"kty", "EC"},
                                    {"x", "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs"},
                                    {"y", "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"},
                                    {"crv", "P-256"}};
  return *jwk;
}
constexpr char kRfc9449Jkt[] = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";

std::set<std::string> MemberNames(const json& object) {
  std::set<std::string> names;
  for (auto it = object.begin(); it != object.end(); ++it) names.insert(it.key());
  return names;
}

// ---------------------------------------------------------------------------- thumbprints

TEST(JwkThumbprintTest, MatchesRfc7638Example) {
  auto thumbprint = JwkThumbprint(Rfc7638RsaJwk());
  ASSERT_TRUE(thumbprint.ok()) << thumbprint.status();
  EXPECT_EQ(*thumbprint, kRfc7638Thumbprint);
}

TEST(JwkThumbprintTest, MatchesRfc9449DpopJkt) {
  auto thumbprint = JwkThumbprint(Rfc9449EcJwk());
  ASSERT_TRUE(thumbprint.ok()) << thumbprint.status();
  EXPECT_EQ(*thumbprint, kRfc9449Jkt);
}

TEST(JwkThumbprintTest, PublicKeyOverloadMatchesJwkOverload) {
  for (const json* jwk : {&Rfc7638RsaJwk(), &Rfc9449EcJwk()}) {
    auto key = PublicKeyFromJwk(*jwk);
    ASSERT_TRUE(key.ok()) << key.status();
    auto from_key = JwkThumbprint(*key);
    ASSERT_TRUE(from_key.ok()) << from_key.status();
    EXPECT_EQ(*from_key, *JwkThumbprint(*jwk));
  }
}

TEST(JwkThumbprintTest, IgnoresNonRequiredMembers) {
  json jwk = Rfc9449EcJwk();
  jwk["kid"] = "some-kid";
  jwk["use"] = "sig";
  jwk["alg"] = "ES256";
  EXPECT_EQ(*JwkThumbprint(jwk), kRfc9449Jkt);
}

TEST(JwkThumbprintTest, OkpThumbprintCoversCrvKtyX) {
  auto key = test_keys::GenerateEd25519().public_key();
  auto jwk = PublicKeyToJwk(key);
  ASSERT_TRUE(jwk.ok());
  json other = *jwk;
  other["x"] = Base64UrlEncode(std::string(32, 'a'));
  EXPECT_NE(*JwkThumbprint(*jwk), *JwkThumbprint(other));
  EXPECT_EQ(*JwkThumbprint(*jwk), *JwkThumbprint(key));
}

TEST(JwkThumbprintTest, RejectsMissingOrNonStringRequiredMember) {
  json missing_y = Rfc9449EcJwk();
  missing_y.erase("y");
  EXPECT_EQ(JwkThumbprint(missing_y).status().code(), absl::StatusCode::kInvalidArgument);
  json numeric_e = Rfc7638RsaJwk();
  numeric_e["e"] = 65537;
  EXPECT_EQ(JwkThumbprint(numeric_e).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(JwkThumbprint(json::array()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwkThumbprintTest, RejectsUnsupportedKty) {
  EXPECT_EQ(JwkThumbprint(json{{"kty", "oct"}, {"k", "AAAA"}}).status().code(),
            absl::StatusCode::kUnimplemented);
}

// ---------------------------------------------------------------------------- import/export

TEST(PublicKeyFromJwkTest, ImportsRfc7638RsaKeyAndExportsItBackExactly) {
  auto key = PublicKeyFromJwk(Rfc7638RsaJwk());
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(key->type(), crypto::KeyType::kRsa);
  auto exported = PublicKeyToJwk(*key);
  ASSERT_TRUE(exported.ok());
  EXPECT_EQ(MemberNames(*exported), (std::set<std::string>{"kty", "n", "e"}));
  EXPECT_EQ((*exported)["n"], Rfc7638RsaJwk()["n"]);
  EXPECT_EQ((*exported)["e"], "AQAB");
}

TEST(PublicKeyFromJwkTest, ImportsRfc9449EcKeyAndExportsItBackExactly) {
  auto key = PublicKeyFromJwk(Rfc9449EcJwk());
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(key->type(), crypto::KeyType::kEcP256);
  auto exported = PublicKeyToJwk(*key);
  ASSERT_TRUE(exported.ok());
  EXPECT_EQ(*exported, Rfc9449EcJwk());
}

TEST(PublicKeyFromJwkTest, RoundTripsEverySupportedKeyType) {
  struct Case {
    crypto::PrivateKey key;
    std::set<std::string> members;
  };
  Case cases[] = {{test_keys::GenerateEc("P-256"), {"kty", "crv", "x", "y"}},
                  {test_keys::GenerateEc("P-384"), {"kty", "crv", "x", "y"}},
                  {test_keys::GenerateRsa(2048), {"kty", "n", "e"}},
                  {test_keys::GenerateEd25519(), {"kty", "crv", "x"}}};
  for (const Case& c : cases) {
    crypto::PublicKey pub = c.key.public_key();
    auto jwk = PublicKeyToJwk(pub);
    ASSERT_TRUE(jwk.ok()) << jwk.status();
    EXPECT_EQ(MemberNames(*jwk), c.members) << jwk->dump();
    auto back = PublicKeyFromJwk(*jwk);
    ASSERT_TRUE(back.ok()) << back.status() << " for " << jwk->dump();
    EXPECT_TRUE(back->Equals(pub)) << jwk->dump();
    EXPECT_EQ(back->type(), pub.type());
  }
}

TEST(PublicKeyToJwkTest, EcCoordinatesAreFixedWidthEvenWithLeadingZeroBytes) {
  // About 1 key in 128 has a coordinate with a leading zero byte; a minimal big-endian export
  // would then emit 31 bytes, which RFC 7518 §6.2.1.2 forbids (and this module would refuse).
  bool saw_leading_zero = false;
  for (int i = 0; i < 3000 && !saw_leading_zero; ++i) {
    auto key = crypto::PrivateKey::GenerateP256();
    ASSERT_TRUE(key.ok());
    auto jwk = PublicKeyToJwk(key->public_key());
    ASSERT_TRUE(jwk.ok());
    for (const char* member : {"x", "y"}) {
      auto coordinate = Base64UrlDecode((*jwk)[member].get<std::string>());
      ASSERT_TRUE(coordinate.ok());
      ASSERT_EQ(coordinate->size(), 32u) << jwk->dump();
      if ((*coordinate)[0] == '\0') saw_leading_zero = true;
    }
    if (saw_leading_zero) {
      auto back = PublicKeyFromJwk(*jwk);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_TRUE(back->Equals(key->public_key()));
    }
  }
  EXPECT_TRUE(saw_leading_zero) << "no key with a leading zero coordinate in 3000 tries";
}

TEST(PublicKeyFromJwkTest, RejectsEveryPrivateMember) {
  for (const char* member : {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}) {
    json jwk = Rfc9449EcJwk();
    jwk[member] = "AAAA";
    auto key = PublicKeyFromJwk(jwk);
    ASSERT_FALSE(key.ok()) << member;
    EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(key.status().message(), HasSubstr(std::string("'") + member + "'"));
  }
}

TEST(PublicKeyFromJwkTest, RejectsRealPrivateEcJwk) {
  // A complete private JWK, as a careless client might put into a DPoP header.
  auto priv = test_keys::GenerateEc("P-256");
  json jwk = *PublicKeyToJwk(priv.public_key());
  jwk["d"] = Base64UrlEncode(std::string(32, '\x01'));
  EXPECT_THAT(PublicKeyFromJwk(jwk).status().message(), HasSubstr("private key member 'd'"));
}

TEST(PublicKeyFromJwkTest, RejectsOffCurvePoint) {
  json jwk = Rfc9449EcJwk();
  std::string y = *Base64UrlDecode(jwk["y"].get<std::string>());
  y[31] ^= 0x01;
  jwk["y"] = Base64UrlEncode(y);
  auto key = PublicKeyFromJwk(jwk);
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(key.status().message(), HasSubstr("not a valid public key"));

  json zeros = Rfc9449EcJwk();
  zeros["x"] = Base64UrlEncode(std::string(32, '\0'));
  zeros["y"] = Base64UrlEncode(std::string(32, '\0'));
  EXPECT_EQ(PublicKeyFromJwk(zeros).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PublicKeyFromJwkTest, RejectsP256PointLabelledP384) {
  json jwk = Rfc9449EcJwk();
  jwk["crv"] = "P-384";
  auto key = PublicKeyFromJwk(jwk);
  ASSERT_FALSE(key.ok());
  EXPECT_THAT(key.status().message(), HasSubstr("must be 48 bytes"));
}

TEST(PublicKeyFromJwkTest, RejectsWrongCoordinateLengths) {
  json shorter = Rfc9449EcJwk();
  shorter["x"] = Base64UrlEncode(std::string(31, '\x05'));
  EXPECT_THAT(PublicKeyFromJwk(shorter).status().message(), HasSubstr("must be 32 bytes"));
  json longer = Rfc9449EcJwk();
  longer["y"] =
      Base64UrlEncode(std::string(1, '\0') + *Base64UrlDecode(longer["y"].get<std::string>()));
  EXPECT_THAT(PublicKeyFromJwk(longer).status().message(), HasSubstr("must be 32 bytes"));
}

TEST(PublicKeyFromJwkTest, RejectsMalformedMembers) {
  json padded = Rfc9449EcJwk();
  padded["x"] = padded["x"].get<std::string>() + "=";
  EXPECT_THAT(PublicKeyFromJwk(padded).status().message(), HasSubstr("member 'x'"));
  json numeric = Rfc9449EcJwk();
  numeric["y"] = 5;
  EXPECT_THAT(PublicKeyFromJwk(numeric).status().message(), HasSubstr("'y' is missing"));
  json no_kty = Rfc9449EcJwk();
  no_kty.erase("kty");
  EXPECT_THAT(PublicKeyFromJwk(no_kty).status().message(), HasSubstr("'kty'"));
  EXPECT_EQ(PublicKeyFromJwk(json::array()).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PublicKeyFromJwk(json("EC")).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PublicKeyFromJwkTest, UnsupportedKeyTypesAreUnimplemented) {
  json p521 = Rfc9449EcJwk();
  p521["crv"] = "P-521";
  EXPECT_EQ(PublicKeyFromJwk(p521).status().code(), absl::StatusCode::kUnimplemented);
  json x25519 = {{"kty", "OKP"}, {"crv", "X25519"}, {"x", Base64UrlEncode(std::string(32, 'a'))}};
  EXPECT_EQ(PublicKeyFromJwk(x25519).status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(PublicKeyFromJwk(json{{"kty", "oct"}}).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST(PublicKeyFromJwkTest, RejectsRsaBelow2048Bits) {
  auto small = test_keys::GenerateRsa(1024);
  auto jwk = PublicKeyToJwk(small.public_key());
  ASSERT_TRUE(jwk.ok());
  auto key = PublicKeyFromJwk(*jwk);
  ASSERT_FALSE(key.ok());
  EXPECT_EQ(key.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(key.status().message(), HasSubstr("1024 bits"));
}

TEST(PublicKeyFromJwkTest, RejectsNonMinimalOrInvalidRsaIntegers) {
  std::string n = *Base64UrlDecode(Rfc7638RsaJwk()["n"].get<std::string>());
  json leading_zero = Rfc7638RsaJwk();
  leading_zero["n"] = Base64UrlEncode(std::string(1, '\0') + n);
  EXPECT_THAT(PublicKeyFromJwk(leading_zero).status().message(), HasSubstr("leading zero"));

  json even_e = Rfc7638RsaJwk();
  even_e["e"] = Base64UrlEncode(std::string("\x01\x00\x00", 3));
  EXPECT_THAT(PublicKeyFromJwk(even_e).status().message(), HasSubstr("exponent"));
  json e_one = Rfc7638RsaJwk();
  e_one["e"] = Base64UrlEncode(std::string("\x01", 1));
  EXPECT_THAT(PublicKeyFromJwk(e_one).status().message(), HasSubstr("exponent"));

  json even_n = Rfc7638RsaJwk();
  n.back() = static_cast<char>(n.back() & ~1);
  even_n["n"] = Base64UrlEncode(n);
  EXPECT_THAT(PublicKeyFromJwk(even_n).status().message(), HasSubstr("even"));
}

TEST(PublicKeyFromJwkTest, RejectsEd25519KeyOfWrongLength) {
  json jwk = {{"kty", "OKP"}, {"crv", "Ed25519"}, {"x", Base64UrlEncode(std::string(31, 'a'))}};
  EXPECT_THAT(PublicKeyFromJwk(jwk).status().message(), HasSubstr("32 bytes"));
}

// ---------------------------------------------------------------------------- JWKS

std::string JwksWith(const json& keys) { return json{{"keys", keys}}.dump(); }

TEST(JwkSetTest, ParsesKeysWithKidUseAlgAndX5c) {
  json ec = Rfc9449EcJwk();
  ec["kid"] = "ec-1";
  ec["use"] = "jwt-svid";
  ec["alg"] = "ES256";
  json rsa = Rfc7638RsaJwk();
  rsa["use"] = "x509-svid";
  rsa["x5c"] = {"MIIB", "MIIC"};
  auto set = JwkSet::Parse(JwksWith({ec, rsa}));
  ASSERT_TRUE(set.ok()) << set.status();
  ASSERT_EQ(set->size(), 2u);
  EXPECT_EQ(set->skipped(), 0u);
  const JwkSetKey* found = set->FindByKid("ec-1");
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(found->use, "jwt-svid");
  EXPECT_EQ(found->alg, "ES256");
  EXPECT_EQ(found->key.type(), crypto::KeyType::kEcP256);
  const JwkSetKey* rsa_key = set->FindByKid("2011-04-29");
  ASSERT_NE(rsa_key, nullptr);
  EXPECT_EQ(rsa_key->x5c, (std::vector<std::string>{"MIIB", "MIIC"}));
  size_t iterated = 0;
  for (const JwkSetKey& key : *set) {
    EXPECT_FALSE(key.kid.empty());
    ++iterated;
  }
  EXPECT_EQ(iterated, 2u);
}

TEST(JwkSetTest, FindByKidFiltersOnUseButAcceptsKeysWithoutUse) {
  json svid = Rfc9449EcJwk();
  svid["kid"] = "same";
  svid["use"] = "x509-svid";
  json jwt = Rfc7638RsaJwk();
  jwt["kid"] = "same";
  jwt["use"] = "jwt-svid";
  json unrestricted = Rfc9449EcJwk();
  unrestricted["kid"] = "free";
  auto set = JwkSet::Parse(JwksWith({svid, jwt, unrestricted}));
  ASSERT_TRUE(set.ok()) << set.status();
  const JwkSetKey* found = set->FindByKid("same", "jwt-svid");
  ASSERT_NE(found, nullptr);
  EXPECT_EQ(found->key.type(), crypto::KeyType::kRsa);
  EXPECT_EQ(set->FindByKid("same")->key.type(), crypto::KeyType::kEcP256);  // first match
  EXPECT_EQ(set->FindByKid("same", "enc"), nullptr);
  EXPECT_NE(set->FindByKid("free", "sig"), nullptr);
  EXPECT_EQ(set->FindByKid("missing"), nullptr);
}

TEST(JwkSetTest, SkipsUnsupportedKeyTypes) {
  json oct = {{"kty", "oct"}, {"kid", "hmac"}};
  json p521 = {{"kty", "EC"}, {"crv", "P-521"}, {"kid", "big"}, {"x", "AA"}, {"y", "AA"}};
  json ec = Rfc9449EcJwk();
  ec["kid"] = "ok";
  auto set = JwkSet::Parse(JwksWith({oct, p521, ec}));
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_EQ(set->size(), 1u);
  EXPECT_EQ(set->skipped(), 2u);
  EXPECT_NE(set->FindByKid("ok"), nullptr);
  EXPECT_EQ(set->FindByKid("hmac"), nullptr);
}

TEST(JwkSetTest, AcceptsEmptyKeyArray) {
  auto set = JwkSet::Parse(R"({"keys": []})");
  ASSERT_TRUE(set.ok());
  EXPECT_TRUE(set->empty());
}

TEST(JwkSetTest, RejectsMalformedDocuments) {
  json off_curve = Rfc9449EcJwk();
  off_curve["x"] = Base64UrlEncode(std::string(32, '\x07'));
  json with_private = Rfc9449EcJwk();
  with_private["d"] = "AAAA";
  json numeric_kid = Rfc9449EcJwk();
  numeric_kid["kid"] = 7;
  json bad_x5c = Rfc9449EcJwk();
  bad_x5c["x5c"] = "MIIB";
  for (const std::string& doc :
       {std::string("not json"), std::string("[]"), std::string(R"({"keys": {}})"),
        std::string(R"({"key": []})"), std::string(R"({"keys": [1]})"),
        std::string(R"({"keys": []} trailing)"), JwksWith({off_curve}), JwksWith({with_private}),
        JwksWith({numeric_kid}), JwksWith({bad_x5c})}) {
    auto set = JwkSet::Parse(doc);
    EXPECT_FALSE(set.ok()) << doc;
    EXPECT_EQ(set.status().code(), absl::StatusCode::kInvalidArgument) << doc;
  }
}

}  // namespace
}  // namespace mandate::jose
