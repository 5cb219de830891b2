// Cross-checks our JWS against cpp-jwt, an independent implementation (research/foundations.md
// §2: fit for tests only). cpp-jwt is used in this file and nowhere else in Mandate.
#include <chrono>
#include <jwt/jwt.hpp>
#include <ostream>
#include <string>
#include <system_error>

#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/jose/test_keys.h"

namespace mandate::jose {
namespace {

using json = nlohmann::json;

int64_t NowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

struct InteropCase {
  const char* alg;
  crypto::PrivateKey (*generate)();
};

void PrintTo(const InteropCase& c, std::ostream* os) { *os << c.alg; }

class CppJwtInteropTest : public ::testing::TestWithParam<InteropCase> {};

TEST_P(CppJwtInteropTest, OurJwtVerifiesInCppJwt) {
  crypto::PrivateKey key = GetParam().generate();
  const std::string public_pem = key.public_key().ToPem();
  auto signer = JwsSigner::Create(std::move(key), "kid-1");
  ASSERT_TRUE(signer.ok()) << signer.status();
  ASSERT_EQ(AlgorithmName(signer->algorithm()), GetParam().alg);
  const int64_t now = NowSeconds();
  auto token = signer->Sign(json{{"typ", "JWT"}}, json{{"sub", "spiffe://example.org/agent"},
                                                       {"aud", "https://api.example"},
                                                       {"iat", now},
                                                       {"exp", now + 300}});
  ASSERT_TRUE(token.ok()) << token.status();

  std::error_code ec;
  auto decoded = jwt::decode(*token, jwt::params::algorithms({GetParam().alg}), ec,
                             jwt::params::secret(public_pem), jwt::params::verify(true));
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(decoded.payload().get_claim_value<std::string>("sub"), "spiffe://example.org/agent");
  EXPECT_EQ(decoded.header().create_json_obj()["kid"], "kid-1");

  // The cross-check is only meaningful if cpp-jwt really verifies: a tampered signature fails.
  std::string tampered = *token;
  char& last_sig_char = tampered[tampered.size() - 5];
  last_sig_char = last_sig_char == 'A' ? 'B' : 'A';
  std::error_code tampered_ec;
  jwt::decode(tampered, jwt::params::algorithms({GetParam().alg}), tampered_ec,
              jwt::params::secret(public_pem), jwt::params::verify(true));
  EXPECT_TRUE(tampered_ec);
}

TEST_P(CppJwtInteropTest, CppJwtTokenVerifiesInOurs) {
  crypto::PrivateKey key = GetParam().generate();
  const std::string private_pem = key.ExportPemSecret();
  const int64_t now = NowSeconds();
  jwt::jwt_object obj{jwt::params::algorithm(GetParam().alg), jwt::params::secret(private_pem),
                      jwt::params::payload({{"sub", "spiffe://example.org/svc"}})};
  obj.add_claim("exp", now + 300);
  std::error_code ec;
  const std::string token = obj.signature(ec);
  ASSERT_FALSE(ec) << ec.message();

  auto parsed = ParseCompact(token);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(AlgorithmName(parsed->alg), GetParam().alg);
  EXPECT_EQ(parsed->payload["sub"], "spiffe://example.org/svc");
  EXPECT_TRUE(CheckTimeClaims(parsed->payload, now, 0, /*require_exp=*/true).ok());
  absl::Status verified = VerifySignature(*parsed, key.public_key());
  EXPECT_TRUE(verified.ok()) << verified;

  // A key of the same type that did not sign it is refused.
  crypto::PrivateKey other = GetParam().generate();
  EXPECT_EQ(VerifySignature(*parsed, other.public_key()).code(),
            absl::StatusCode::kUnauthenticated);
}

INSTANTIATE_TEST_SUITE_P(
    Algorithms, CppJwtInteropTest,
    ::testing::Values(InteropCase{"ES256", [] { return test_keys::GenerateEc("P-256"); }},
                      InteropCase{"ES384", [] { return test_keys::GenerateEc("P-384"); }},
                      InteropCase{"RS256", [] { return test_keys::GenerateRsa(2048); }}),
    [](const ::testing::TestParamInfo<InteropCase>& info) { return std::string(info.param.alg); });

TEST(CppJwtInteropTest, Es256SignatureFromCppJwtIsRaw64Bytes) {
  crypto::PrivateKey key = test_keys::GenerateEc("P-256");
  jwt::jwt_object obj{jwt::params::algorithm("ES256"), jwt::params::secret(key.ExportPemSecret()),
                      jwt::params::payload({{"sub", "x"}})};
  std::error_code ec;
  const std::string token = obj.signature(ec);
  ASSERT_FALSE(ec) << ec.message();
  auto parsed = ParseCompact(token);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->signature.size(), 64u);
}

}  // namespace
}  // namespace mandate::jose
