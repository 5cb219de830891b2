#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/jose/test_keys.h"

namespace mandate::jose {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

// Keys are generated once per test binary: RSA generation is slow in a Debug build.
struct Keys {
  crypto::PrivateKey p256 = test_keys::GenerateEc("P-256");
  crypto::PrivateKey p384 = test_keys::GenerateEc("P-384");
  crypto::PrivateKey rsa = test_keys::GenerateRsa(2048);
  crypto::PrivateKey ed25519 = test_keys::GenerateEd25519();
};
const Keys& K() {
  static const Keys* keys = new Keys();
  return *keys;
}

const json kClaims = {{"sub", "spiffe://example.org/agent"},
                      {"aud", "https://api.example"},
                      {"exp", 1700000300},
                      {"iat", 1700000000}};

JwsSigner SignerFor(const crypto::PrivateKey& key, std::string kid = "") {
  auto pem = key.ExportPemSecret();
  auto copy = crypto::PrivateKey::FromPem(pem);
  EXPECT_TRUE(copy.ok());
  auto signer = JwsSigner::Create(*std::move(copy), std::move(kid));
  EXPECT_TRUE(signer.ok()) << signer.status();
  return *std::move(signer);
}

std::string Sign(const crypto::PrivateKey& key, const json& header = json::object(),
                 const json& payload = kClaims) {
  auto token = SignerFor(key).Sign(header, payload);
  EXPECT_TRUE(token.ok()) << token.status();
  return token.ok() ? *token : std::string();
}

// The three parts of a compact JWS.
std::vector<std::string> Parts(const std::string& token) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t dot; (dot = token.find('.', start)) != std::string::npos; start = dot + 1) {
    parts.push_back(token.substr(start, dot - start));
  }
  parts.push_back(token.substr(start));
  return parts;
}

// A token with the given header and payload JSON and an arbitrary (non-empty) signature.
std::string Unsigned(std::string_view header, std::string_view payload = "{}") {
  return Base64UrlEncode(header) + "." + Base64UrlEncode(payload) + "." +
         Base64UrlEncode(std::string(64, '\x01'));
}

absl::Status ParseAndVerify(std::string_view token, const crypto::PublicKey& key) {
  auto parsed = ParseCompact(token);
  if (!parsed.ok()) return parsed.status();
  return VerifySignature(*parsed, key);
}

// ---------------------------------------------------------------------------- algorithms

TEST(AlgorithmTest, NamesRoundTrip) {
  for (Algorithm alg : {Algorithm::kES256, Algorithm::kES384, Algorithm::kRS256, Algorithm::kPS256,
                        Algorithm::kEdDSA}) {
    auto back = AlgorithmFromName(AlgorithmName(alg));
    ASSERT_TRUE(back.ok()) << AlgorithmName(alg);
    EXPECT_EQ(*back, alg);
  }
  EXPECT_EQ(AlgorithmName(Algorithm::kEdDSA), "EdDSA");
}

TEST(AlgorithmTest, RefusesNoneHmacAndUnknownNames) {
  EXPECT_THAT(AlgorithmFromName("none").status().message(), HasSubstr("'none'"));
  for (const char* hmac : {"HS256", "HS384", "HS512"}) {
    auto alg = AlgorithmFromName(hmac);
    ASSERT_FALSE(alg.ok()) << hmac;
    EXPECT_THAT(alg.status().message(), HasSubstr("HMAC"));
  }
  for (const char* unknown : {"es256", "ES512", "RS512", "", "NONE", "EdDSA "}) {
    auto alg = AlgorithmFromName(unknown);
    ASSERT_FALSE(alg.ok()) << unknown;
    EXPECT_EQ(alg.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(AlgorithmTest, AlgorithmForKeyFollowsKeyType) {
  EXPECT_EQ(*AlgorithmForKey(K().p256.public_key()), Algorithm::kES256);
  EXPECT_EQ(*AlgorithmForKey(K().p384.public_key()), Algorithm::kES384);
  EXPECT_EQ(*AlgorithmForKey(K().rsa.public_key()), Algorithm::kRS256);
  EXPECT_EQ(*AlgorithmForKey(K().ed25519.public_key()), Algorithm::kEdDSA);
}

// ---------------------------------------------------------------------------- signing

TEST(JwsSignerTest, Es256SignatureIsRaw64ByteRSEvenWithLeadingZeroBytes) {
  // r or s starts with a zero byte in about 1 signature in 128; a minimal-length conversion from
  // DER would then emit 63 bytes. Keep signing until that case has been seen and verified.
  const JwsSigner signer = SignerFor(K().p256);
  bool saw_leading_zero = false;
  for (int i = 0; i < 5000 && !saw_leading_zero; ++i) {
    auto token = signer.Sign(json::object(), json{{"i", i}});
    ASSERT_TRUE(token.ok());
    auto parsed = ParseCompact(*token);
    ASSERT_TRUE(parsed.ok());
    ASSERT_EQ(parsed->signature.size(), 64u);
    if (parsed->signature[0] == '\0' || parsed->signature[32] == '\0') {
      saw_leading_zero = true;
      EXPECT_TRUE(VerifySignature(*parsed, K().p256.public_key()).ok());
    }
  }
  EXPECT_TRUE(saw_leading_zero) << "no signature with a leading zero byte in 5000 tries";
}

TEST(JwsSignerTest, Es384SignatureIsRaw96ByteRS) {
  auto parts = Parts(Sign(K().p384));
  EXPECT_EQ(Base64UrlDecode(parts[2])->size(), 96u);
}

TEST(JwsSignerTest, SignVerifyRoundTripForEveryKeyType) {
  for (const crypto::PrivateKey* key : {&K().p256, &K().p384, &K().rsa, &K().ed25519}) {
    std::string token = Sign(*key, json{{"typ", "JWT"}});
    auto parsed = ParseCompact(token);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->alg, *AlgorithmForKey(key->public_key()));
    EXPECT_EQ(parsed->header["typ"], "JWT");
    EXPECT_EQ(parsed->payload, kClaims);
    EXPECT_TRUE(VerifySignature(*parsed, key->public_key()).ok())
        << AlgorithmName(parsed->alg) << ": " << VerifySignature(*parsed, key->public_key());
  }
}

TEST(JwsSignerTest, SetsAlgAndKidInTheHeader) {
  auto token = SignerFor(K().p256, "key-1").Sign(json{{"typ", "at+jwt"}}, kClaims);
  ASSERT_TRUE(token.ok());
  auto parsed = ParseCompact(*token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header, (json{{"alg", "ES256"}, {"kid", "key-1"}, {"typ", "at+jwt"}}));
  // Compact serialisation: the header bytes are exactly dump() of the header.
  EXPECT_EQ(*Base64UrlDecode(Parts(*token)[0]), R"({"alg":"ES256","kid":"key-1","typ":"at+jwt"})");
}

TEST(JwsSignerTest, KeepsCallerKidAndOmitsEmptyKid) {
  auto token = SignerFor(K().p256, "key-1").Sign(json{{"kid", "override"}}, kClaims);
  EXPECT_EQ(ParseCompact(*token)->header["kid"], "override");
  auto no_kid = SignerFor(K().p256).Sign(json::object(), kClaims);
  EXPECT_FALSE(ParseCompact(*no_kid)->header.contains("kid"));
}

TEST(JwsSignerTest, RefusesHeaderAlgThatDiffersFromKey) {
  auto signer = SignerFor(K().p256);
  EXPECT_TRUE(signer.Sign(json{{"alg", "ES256"}}, kClaims).ok());
  for (const json& alg : {json("RS256"), json("none"), json("HS256"), json(1)}) {
    auto token = signer.Sign(json{{"alg", alg}}, kClaims);
    ASSERT_FALSE(token.ok()) << alg.dump();
    EXPECT_THAT(token.status().message(), HasSubstr("does not match"));
  }
}

TEST(JwsSignerTest, RefusesNonObjectsCritB64AndInvalidUtf8) {
  auto signer = SignerFor(K().p256);
  EXPECT_FALSE(signer.Sign(json::array(), kClaims).ok());
  EXPECT_FALSE(signer.Sign(json::object(), json("claims")).ok());
  EXPECT_FALSE(signer.Sign(json{{"crit", {"exp"}}}, kClaims).ok());
  EXPECT_FALSE(signer.Sign(json{{"b64", false}}, kClaims).ok());
  auto bad_utf8 = signer.Sign(json::object(), json{{"sub", "\xff\xfe"}});
  ASSERT_FALSE(bad_utf8.ok());
  EXPECT_EQ(bad_utf8.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JwsSignerTest, CreateDerivesAlgorithmFromKeyAndKeepsKid) {
  auto signer = SignerFor(K().ed25519, "ed");
  EXPECT_EQ(signer.algorithm(), Algorithm::kEdDSA);
  EXPECT_EQ(signer.kid(), "ed");
  EXPECT_TRUE(signer.public_key().Equals(K().ed25519.public_key()));
}

TEST(SignCompactTest, UsesSerialisedStringsByteForByte) {
  const std::string header = R"({"typ":"dpop+jwt","alg":"ES256"})";  // caller's member order
  const std::string payload = R"({"htm":"POST","iat":1})";
  auto token = SignCompact(K().p256, Algorithm::kES256, header, payload);
  ASSERT_TRUE(token.ok()) << token.status();
  auto parts = Parts(*token);
  EXPECT_EQ(*Base64UrlDecode(parts[0]), header);
  EXPECT_EQ(*Base64UrlDecode(parts[1]), payload);
  EXPECT_TRUE(ParseAndVerify(*token, K().p256.public_key()).ok());
}

TEST(SignCompactTest, RefusesAlgorithmThatDoesNotFitTheKey) {
  struct Case {
    const crypto::PrivateKey* key;
    Algorithm alg;
  };
  for (const Case& c :
       {Case{&K().p256, Algorithm::kES384}, Case{&K().p384, Algorithm::kES256},
        Case{&K().rsa, Algorithm::kES256}, Case{&K().p256, Algorithm::kRS256},
        Case{&K().ed25519, Algorithm::kES256}, Case{&K().p256, Algorithm::kEdDSA}}) {
    auto token = SignCompact(*c.key, c.alg, R"({"alg":"x"})", "{}");
    ASSERT_FALSE(token.ok()) << AlgorithmName(c.alg);
    EXPECT_EQ(token.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(SignCompactTest, Ps256RoundTripAndIsNotInterchangeableWithRs256) {
  auto ps = SignCompact(K().rsa, Algorithm::kPS256, R"({"alg":"PS256"})", kClaims.dump());
  ASSERT_TRUE(ps.ok()) << ps.status();
  EXPECT_TRUE(ParseAndVerify(*ps, K().rsa.public_key()).ok());
  // A PSS signature under a header claiming RS256 (and vice versa) must not verify.
  auto pss_as_pkcs1 = SignCompact(K().rsa, Algorithm::kPS256, R"({"alg":"RS256"})", "{}");
  EXPECT_EQ(ParseAndVerify(*pss_as_pkcs1, K().rsa.public_key()).code(),
            absl::StatusCode::kUnauthenticated);
  auto pkcs1_as_pss = SignCompact(K().rsa, Algorithm::kRS256, R"({"alg":"PS256"})", "{}");
  EXPECT_EQ(ParseAndVerify(*pkcs1_as_pss, K().rsa.public_key()).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(JwsSignerTest, SignsConcurrentlyFromManyThreads) {
  const JwsSigner signer = SignerFor(K().p256, "shared");
  const crypto::PublicKey pub = K().p256.public_key();
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        auto token = signer.Sign(json::object(), json{{"t", t}, {"i", i}});
        if (!token.ok() || !ParseAndVerify(*token, pub).ok()) ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
}

// ---------------------------------------------------------------------------- verification

TEST(VerifySignatureTest, VerifiesRfc9449ExampleDpopProofWithItsEmbeddedJwk) {
  // RFC 9449 §4.1: a proof signed by another implementation, verified with the header's key.
  const std::string proof =
      "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0Vj"
      "NoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5"
      "VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVC"
      "IsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP"
      "4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
  auto parsed = ParseCompact(proof);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->header["typ"], "dpop+jwt");
  EXPECT_EQ(parsed->payload["htu"], "https://server.example.com/token");
  auto key = PublicKeyFromJwk(parsed->header["jwk"]);
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_TRUE(VerifySignature(*parsed, *key).ok()) << VerifySignature(*parsed, *key);
  EXPECT_EQ(*JwkThumbprint(parsed->header["jwk"]), "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I");
}

TEST(VerifySignatureTest, RejectsSignatureFromAnotherKeyOfTheSameType) {
  auto other = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(other.ok());
  absl::Status status = ParseAndVerify(Sign(K().p256), other->public_key());
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(status.message(), "JWS signature verification failed");
}

TEST(VerifySignatureTest, RejectsDerEncodedEcdsaSignature) {
  std::string token = Sign(K().p256);
  auto parts = Parts(token);
  const std::string signing_input = parts[0] + "." + parts[1];
  // What a naive implementation would send: OpenSSL's DER ECDSA-Sig-Value, unconverted.
  auto der = K().p256.SignDer(signing_input);
  ASSERT_TRUE(der.ok());
  ASSERT_TRUE(K().p256.public_key().VerifyDer(signing_input, *der));  // it is a valid signature
  absl::Status status =
      ParseAndVerify(signing_input + "." + Base64UrlEncode(*der), K().p256.public_key());
  EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(status.message(), HasSubstr("must be 64 bytes"));
}

TEST(VerifySignatureTest, FlippingAnyBitOfTheSignatureRejects) {
  for (const crypto::PrivateKey* key : {&K().p256, &K().ed25519, &K().rsa}) {
    auto parsed = ParseCompact(Sign(*key));
    ASSERT_TRUE(parsed.ok());
    ASSERT_TRUE(VerifySignature(*parsed, key->public_key()).ok());
    for (size_t bit = 0; bit < parsed->signature.size() * 8; ++bit) {
      ParsedJws tampered = *parsed;
      tampered.signature[bit / 8] ^= static_cast<char>(1 << (bit % 8));
      ASSERT_EQ(VerifySignature(tampered, key->public_key()).code(),
                absl::StatusCode::kUnauthenticated)
          << AlgorithmName(parsed->alg) << " bit " << bit;
    }
  }
}

TEST(VerifySignatureTest, ChangingAnyCharacterOfTheTokenRejects) {
  const std::string token = Sign(K().p256, json{{"typ", "JWT"}});
  const crypto::PublicKey pub = K().p256.public_key();
  static constexpr std::string_view kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  for (size_t i = 0; i < token.size(); ++i) {
    if (token[i] == '.') continue;
    std::string tampered = token;
    // The next alphabet character: changes the low bit of this 6-bit group.
    tampered[i] = kAlphabet[(kAlphabet.find(token[i]) ^ 1)];
    EXPECT_FALSE(ParseAndVerify(tampered, pub).ok()) << "position " << i;
  }
}

TEST(VerifySignatureTest, RejectsEveryAlgorithmKeyTypeMismatch) {
  struct Case {
    const crypto::PrivateKey* signer;
    const crypto::PrivateKey* verifier;
  };
  const Case cases[] = {
      {&K().p256, &K().p384},     // ES256 header, P-384 key
      {&K().p384, &K().p256},     // ES384 header, P-256 key
      {&K().p256, &K().rsa},      // ES256 header, RSA key
      {&K().rsa, &K().p256},      // RS256 header, EC key
      {&K().ed25519, &K().p256},  // EdDSA header, EC key
      {&K().p256, &K().ed25519},  // ES256 header, Ed25519 key
  };
  for (const Case& c : cases) {
    absl::Status status = ParseAndVerify(Sign(*c.signer), c.verifier->public_key());
    EXPECT_EQ(status.code(), absl::StatusCode::kUnauthenticated);
    EXPECT_THAT(status.message(), HasSubstr("cannot be used with"));
  }
  // RS256 and PS256 may only use RSA keys.
  ParsedJws ps = *ParseCompact(Unsigned(R"({"alg":"PS256"})"));
  EXPECT_THAT(VerifySignature(ps, K().p256.public_key()).message(),
              HasSubstr("cannot be used with"));
}

TEST(VerifySignatureTest, RejectsHeaderThatRelabelsTheAlgorithm) {
  // A genuine ES256 signature whose header claims ES384: the verifier's P-256 key must not be
  // used for an ES384 check, nor an ES384 signature accepted from a 64-byte value.
  auto token = SignCompact(K().p256, Algorithm::kES256, R"({"alg":"ES384"})", "{}");
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(ParseAndVerify(*token, K().p256.public_key()).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(VerifySignatureTest, RejectsRsaSignatureOfWrongLength) {
  auto parsed = ParseCompact(Sign(K().rsa));
  ASSERT_TRUE(parsed.ok());
  parsed->signature.pop_back();
  EXPECT_THAT(VerifySignature(*parsed, K().rsa.public_key()).message(),
              HasSubstr("must be 256 bytes"));
  parsed->signature = std::string(1, '\0') + parsed->signature + "x";
  EXPECT_EQ(VerifySignature(*parsed, K().rsa.public_key()).code(),
            absl::StatusCode::kUnauthenticated);
}

TEST(VerifySignatureTest, RejectsZeroEcdsaSignature) {
  ParsedJws parsed = *ParseCompact(Unsigned(R"({"alg":"ES256"})"));
  parsed.signature = std::string(64, '\0');
  EXPECT_EQ(VerifySignature(parsed, K().p256.public_key()).code(),
            absl::StatusCode::kUnauthenticated);
}

// ---------------------------------------------------------------------------- parsing

TEST(ParseCompactTest, RejectsAlgNoneAndHmac) {
  auto none = ParseCompact(Unsigned(R"({"alg":"none"})"));
  ASSERT_FALSE(none.ok());
  EXPECT_THAT(none.status().message(), HasSubstr("'none'"));
  // The unsecured form (empty signature) is refused too.
  EXPECT_FALSE(
      ParseCompact(Base64UrlEncode(R"({"alg":"none"})") + "." + Base64UrlEncode("{}") + ".").ok());
  for (const char* hmac : {"HS256", "HS384", "HS512"}) {
    auto parsed = ParseCompact(Unsigned(std::string(R"({"alg":")") + hmac + R"("})"));
    ASSERT_FALSE(parsed.ok()) << hmac;
    EXPECT_THAT(parsed.status().message(), HasSubstr("HMAC"));
  }
}

TEST(ParseCompactTest, RejectsCritAndB64Headers) {
  auto crit = ParseCompact(Unsigned(R"({"alg":"ES256","crit":["exp"],"exp":1})"));
  ASSERT_FALSE(crit.ok());
  EXPECT_THAT(crit.status().message(), HasSubstr("'crit'"));
  auto empty_crit = ParseCompact(Unsigned(R"({"alg":"ES256","crit":[]})"));
  EXPECT_FALSE(empty_crit.ok());
  auto b64 = ParseCompact(Unsigned(R"({"alg":"ES256","b64":false,"crit":["b64"]})"));
  EXPECT_FALSE(b64.ok());
  EXPECT_FALSE(ParseCompact(Unsigned(R"({"alg":"ES256","b64":true})")).ok());
}

TEST(ParseCompactTest, RejectsMissingOrNonStringAlg) {
  EXPECT_THAT(ParseCompact(Unsigned(R"({"typ":"JWT"})")).status().message(), HasSubstr("'alg'"));
  EXPECT_THAT(ParseCompact(Unsigned(R"({"alg":123})")).status().message(), HasSubstr("'alg'"));
  EXPECT_THAT(ParseCompact(Unsigned(R"({"alg":["ES256"]})")).status().message(),
              HasSubstr("'alg'"));
}

TEST(ParseCompactTest, RejectsNonObjectOrInvalidJson) {
  for (const char* header : {"[]", "\"ES256\"", "null", "{", R"({"alg":"ES256"} x)",
                             R"({"alg":"ES256" /* c */})", R"({"alg":"ES256",})"}) {
    EXPECT_FALSE(ParseCompact(Unsigned(header)).ok()) << header;
  }
  for (const char* payload : {"[]", "42", "", "{", "{\"a\":\"\xff\"}"}) {
    auto parsed = ParseCompact(Unsigned(R"({"alg":"ES256"})", payload));
    ASSERT_FALSE(parsed.ok()) << payload;
    EXPECT_THAT(parsed.status().message(), HasSubstr("payload"));
  }
}

TEST(ParseCompactTest, RequiresExactlyThreeParts) {
  const std::string token = Sign(K().p256);
  auto parts = Parts(token);
  for (const std::string& bad :
       {parts[0] + "." + parts[1], parts[0], token + ".", token + "." + parts[2], std::string(""),
        std::string(".."), parts[0] + ".." + parts[2]}) {
    EXPECT_FALSE(ParseCompact(bad).ok()) << bad;
  }
}

TEST(ParseCompactTest, RejectsNonStrictBase64UrlInAnyPart) {
  const std::string token = Sign(K().p256);
  auto parts = Parts(token);
  EXPECT_THAT(ParseCompact(parts[0] + "=." + parts[1] + "." + parts[2]).status().message(),
              HasSubstr("JWS header"));
  EXPECT_THAT(ParseCompact(parts[0] + ". " + parts[1] + "." + parts[2]).status().message(),
              HasSubstr("JWS payload"));
  EXPECT_THAT(ParseCompact(parts[0] + "." + parts[1] + "." + parts[2] + "\n").status().message(),
              HasSubstr("JWS signature"));
}

TEST(ParseCompactTest, EnforcesSizeCap) {
  std::string big_payload = json{{"pad", std::string(20000, 'a')}}.dump();
  auto token = SignCompact(K().p256, Algorithm::kES256, R"({"alg":"ES256"})", big_payload);
  ASSERT_TRUE(token.ok());
  auto parsed = ParseCompact(*token);
  ASSERT_FALSE(parsed.ok());
  EXPECT_THAT(parsed.status().message(), HasSubstr("16384-byte limit"));
  EXPECT_TRUE(ParseCompact(*token, token->size()).ok());
  EXPECT_FALSE(ParseCompact(*token, token->size() - 1).ok());
}

TEST(ParseCompactTest, KeepsSigningInputExactlyAsReceived) {
  const std::string token = Sign(K().p256);
  auto parsed = ParseCompact(token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->signing_input, token.substr(0, token.rfind('.')));
  EXPECT_EQ(parsed->signature.size(), 64u);
}

// ---------------------------------------------------------------------------- duplicate names

TEST(ParseStrictJsonTest, RefusesDuplicateMemberNamesAtAnyDepth) {
  for (const char* text : {
           R"({"alg":"ES256","alg":"none"})",
           R"({"a":1,"b":2,"a":1})",
           R"({"cnf":{"jkt":"one","jkt":"two"}})",
           R"({"keys":[{"kid":"k"},{"kty":"EC","kty":"RSA"}]})",
           R"({"aud":"x","nested":{"aud":"y"},"aud":"z"})",
           // The same name spelt with an escape is the same name once decoded.
           R"({"sub":"a","\u0073ub":"b"})",
       }) {
    auto parsed = ParseStrictJson(text);
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(parsed.status().message(), HasSubstr("duplicate member name")) << text;
  }
}

TEST(ParseStrictJsonTest, AcceptsDistinctNamesAndRefusesInvalidJson) {
  // The same name in sibling or nested objects is not a duplicate.
  auto parsed = ParseStrictJson(R"({"a":{"a":1},"b":[{"a":2},{"a":3}],"c":"a"})");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ((*parsed)["b"][1]["a"], 3);
  EXPECT_TRUE(ParseStrictJson("[1,2]").ok());
  EXPECT_TRUE(ParseStrictJson("\"text\"").ok());
  for (const char* text :
       {"", "{", R"({"a":1} {"a":2})", R"({"a":1 /* c */})", "{\"a\":\"\xff\"}", R"({"a":1,})"}) {
    auto refused = ParseStrictJson(text);
    ASSERT_FALSE(refused.ok()) << text;
    EXPECT_EQ(refused.status().message(), "not valid JSON") << text;
  }
}

TEST(ParseStrictJsonTest, DeepNestingIsParsedWithoutRecursion) {
  std::string deep = std::string(100000, '[') + std::string(100000, ']');
  EXPECT_TRUE(ParseStrictJson(deep).ok());
  std::string objects;
  for (int i = 0; i < 20000; ++i) objects += R"({"a":)";
  objects += "1" + std::string(20000, '}');
  EXPECT_TRUE(ParseStrictJson(objects).ok());
}

// A validly signed token whose header or claims repeat a name is refused before anyone reads
// either value (RFC 7515 §4: refuse, rather than keep the last one).
TEST(ParseCompactTest, RefusesSignedTokensWithDuplicateHeaderOrClaimNames) {
  struct Case {
    const char* header;
    const char* payload;
    const char* part;
  };
  for (const Case& c : {
           Case{R"({"alg":"ES256","alg":"ES256"})", R"({"sub":"a"})", "JWS header"},
           Case{R"({"alg":"ES256","typ":"JWT","typ":"at+jwt"})", R"({"sub":"a"})", "JWS header"},
           Case{R"({"alg":"ES256","kid":"a","kid":"b"})", R"({"sub":"a"})", "JWS header"},
           Case{R"({"alg":"ES256"})", R"({"aud":"a","aud":"b"})", "JWS payload"},
           Case{R"({"alg":"ES256"})", R"({"sub":"a","jti":"1","jti":"2"})", "JWS payload"},
           Case{R"({"alg":"ES256"})", R"({"cnf":{"jkt":"a","jkt":"b"}})", "JWS payload"},
           Case{R"({"alg":"ES256"})", R"({"cnf":{"jkt":"a"},"cnf":{"jkt":"b"}})", "JWS payload"},
       }) {
    auto token = SignCompact(K().p256, Algorithm::kES256, c.header, c.payload);
    ASSERT_TRUE(token.ok());
    auto parsed = ParseCompact(*token);
    ASSERT_FALSE(parsed.ok()) << c.header << " " << c.payload;
    EXPECT_THAT(parsed.status().message(), HasSubstr(c.part));
    EXPECT_THAT(parsed.status().message(), HasSubstr("duplicate member name"));
  }
}

TEST(JwkSetTest, RefusesDuplicateMemberNames) {
  auto jwk = PublicKeyToJwk(K().p256.public_key());
  ASSERT_TRUE(jwk.ok());
  std::string key = jwk->dump();
  key.insert(1, R"("kid":"a","kid":"b",)");
  auto set = JwkSet::Parse(absl::StrCat(R"({"keys":[)", key, "]}"));
  ASSERT_FALSE(set.ok());
  EXPECT_THAT(set.status().message(), HasSubstr("duplicate member name"));
  auto doubled = JwkSet::Parse(R"({"keys":[],"keys":[]})");
  EXPECT_FALSE(doubled.ok());
}

}  // namespace
}  // namespace mandate::jose
