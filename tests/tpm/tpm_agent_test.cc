// The agent half of TPM attestation against a real (software) TPM.
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <tss2/tss2_mu.h>

#include <filesystem>
#include <string>

#include "attestors/node/tpm/agent/tpm_agent_attestor.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "mandate/node/v1/tpm.pb.h"
#include "tests/tpm/swtpm_fixture.h"

namespace mandate::attestors {
namespace {

using ::mandate::testing::Swtpm;
using ::mandate::testing::SwtpmOptions;
using ::mandate::testing::SwtpmTest;
using ::testing::HasSubstr;

constexpr std::string_view kCsrSpki = "not parsed by the agent: any bytes bind";

TPM2B_PUBLIC Unmarshal(const std::string& bytes) {
  TPM2B_PUBLIC pub{};
  size_t off = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_PUBLIC_Unmarshal(reinterpret_cast<const uint8_t*>(bytes.data()),
                                           bytes.size(), &off, &pub),
            TSS2_RC_SUCCESS);
  EXPECT_EQ(off, bytes.size());
  return pub;
}

node::v1::TpmAttestationPayload PayloadOf(TpmAgentAttestor& agent) {
  absl::StatusOr<std::string> bytes = agent.Payload(kCsrSpki);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  node::v1::TpmAttestationPayload payload;
  EXPECT_TRUE(payload.ParseFromString(bytes.value_or("")));
  return payload;
}

std::string MarshalledIdObject(size_t size) {
  TPM2B_ID_OBJECT obj{};
  obj.size = size;
  for (size_t i = 0; i < size; ++i) obj.credential[i] = static_cast<uint8_t>(i * 7 + 1);
  uint8_t buf[sizeof(obj)];
  size_t off = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_ID_OBJECT_Marshal(&obj, buf, sizeof(buf), &off), TSS2_RC_SUCCESS);
  return std::string(reinterpret_cast<char*>(buf), off);
}

std::string MarshalledSecret(size_t size) {
  TPM2B_ENCRYPTED_SECRET s{};
  s.size = size;
  for (size_t i = 0; i < size; ++i) s.secret[i] = static_cast<uint8_t>(i * 13 + 5);
  uint8_t buf[sizeof(s)];
  size_t off = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_ENCRYPTED_SECRET_Marshal(&s, buf, sizeof(buf), &off), TSS2_RC_SUCCESS);
  return std::string(reinterpret_cast<char*>(buf), off);
}

// A well-formed challenge whose credential no TPM can activate.
node::v1::TpmChallenge BogusChallenge() {
  node::v1::TpmChallenge c;
  c.set_session_id(std::string(16, 's'));
  c.set_credential_blob(MarshalledIdObject(68));
  c.set_encrypted_secret(MarshalledSecret(256));
  c.set_nonce(std::string(32, 'n'));
  for (uint32_t i = 0; i < 8; ++i) c.add_pcr_indices_sha256(i);
  return c;
}

absl::Status Answer(TpmAgentAttestor& agent, const node::v1::TpmChallenge& c) {
  return agent.AnswerChallenge(c.SerializeAsString()).status();
}

std::string CertKeyHashHex(const std::string& der) {
  absl::StatusOr<crypto::Certificate> cert = crypto::Certificate::FromDer(der);
  EXPECT_TRUE(cert.ok()) << cert.status();
  if (!cert.ok()) return "";
  return crypto::HexEncode(crypto::Sha256(cert->public_key().SpkiDer()));
}

class TpmAgentTest : public SwtpmTest {
 protected:
  std::unique_ptr<TpmAgentAttestor> MakeAgent() {
    absl::StatusOr<std::unique_ptr<TpmAgentAttestor>> agent =
        TpmAgentAttestor::Create(swtpm_->tcti());
    EXPECT_TRUE(agent.ok()) << agent.status();
    return agent.ok() ? std::move(*agent) : nullptr;
  }
};

TEST_F(TpmAgentTest, CreateSucceedsAndReportsTpmName) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  EXPECT_EQ(agent->name(), "tpm");
  EXPECT_TRUE(agent->CanReattest());
}

TEST(TpmAgentCreateTest, CreateFailsUnavailableForMissingSocket) {
  absl::StatusOr<std::unique_ptr<TpmAgentAttestor>> agent =
      TpmAgentAttestor::Create("swtpm:path=/nonexistent/mandate-test/tpm.sock");
  ASSERT_FALSE(agent.ok());
  EXPECT_EQ(agent.status().code(), absl::StatusCode::kUnavailable) << agent.status();
}

TEST_F(TpmAgentTest, RsaEkChosenWhenItsCertificateExists) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  EXPECT_EQ(agent->ek_type(), TpmEkType::kRsa2048);
  node::v1::TpmAttestationPayload payload = PayloadOf(*agent);
  TPM2B_PUBLIC ek = Unmarshal(payload.ek_public());
  EXPECT_EQ(ek.publicArea.type, TPM2_ALG_RSA);
  EXPECT_EQ(ek.publicArea.parameters.rsaDetail.keyBits, 2048);
}

TEST_F(TpmAgentTest, PayloadEkCertificateKeyEqualsEkPublic) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  node::v1::TpmAttestationPayload payload = PayloadOf(*agent);
  ASSERT_FALSE(payload.ek_certificate().empty());
  absl::StatusOr<crypto::Certificate> cert = crypto::Certificate::FromDer(payload.ek_certificate());
  ASSERT_TRUE(cert.ok()) << cert.status();

  // The RSA modulus in the certificate is the one in the marshalled EK public area.
  TPM2B_PUBLIC ek = Unmarshal(payload.ek_public());
  ASSERT_EQ(ek.publicArea.type, TPM2_ALG_RSA);
  BIGNUM* n = nullptr;
  ASSERT_EQ(EVP_PKEY_get_bn_param(cert->public_key().evp(), OSSL_PKEY_PARAM_RSA_N, &n), 1);
  std::string cert_modulus(BN_num_bytes(n), '\0');
  BN_bn2bin(n, reinterpret_cast<uint8_t*>(cert_modulus.data()));
  BN_free(n);
  EXPECT_EQ(cert_modulus,
            std::string(reinterpret_cast<const char*>(ek.publicArea.unique.rsa.buffer),
                        ek.publicArea.unique.rsa.size));
  // And EkHashHex is the hash of the certified key.
  absl::StatusOr<std::string> hash = agent->EkHashHex();
  ASSERT_TRUE(hash.ok()) << hash.status();
  EXPECT_EQ(*hash, CertKeyHashHex(payload.ek_certificate()));
}

TEST_F(TpmAgentTest, PayloadAkIsRestrictedSigningKey) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  TPM2B_PUBLIC ak = Unmarshal(PayloadOf(*agent).ak_public());
  const TPMA_OBJECT attrs = ak.publicArea.objectAttributes;
  EXPECT_TRUE(attrs & TPMA_OBJECT_RESTRICTED);
  EXPECT_TRUE(attrs & TPMA_OBJECT_SIGN_ENCRYPT);
  EXPECT_TRUE(attrs & TPMA_OBJECT_FIXEDTPM);
  EXPECT_TRUE(attrs & TPMA_OBJECT_FIXEDPARENT);
  EXPECT_TRUE(attrs & TPMA_OBJECT_SENSITIVEDATAORIGIN);
  EXPECT_FALSE(attrs & TPMA_OBJECT_DECRYPT);
  EXPECT_EQ(ak.publicArea.nameAlg, TPM2_ALG_SHA256);
  if (ak.publicArea.type == TPM2_ALG_ECC) {
    EXPECT_EQ(ak.publicArea.parameters.eccDetail.scheme.scheme, TPM2_ALG_ECDSA);
    EXPECT_EQ(ak.publicArea.parameters.eccDetail.scheme.details.ecdsa.hashAlg, TPM2_ALG_SHA256);
  } else {
    ASSERT_EQ(ak.publicArea.type, TPM2_ALG_RSA);
    EXPECT_EQ(ak.publicArea.parameters.rsaDetail.scheme.scheme, TPM2_ALG_RSASSA);
  }
}

TEST_F(TpmAgentTest, EkHashHexStableAcrossCreates) {
  std::string first;
  {
    auto agent = MakeAgent();
    ASSERT_NE(agent, nullptr);
    absl::StatusOr<std::string> hash = agent->EkHashHex();
    ASSERT_TRUE(hash.ok()) << hash.status();
    first = *hash;
  }
  // The first agent flushed its handles: a second one on the same TPM (no resource manager)
  // can load its own.
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<std::string> second = agent->EkHashHex();
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(first, *second);
  EXPECT_EQ(first.size(), 64u);
  EXPECT_EQ(first.find_first_not_of("0123456789abcdef"), std::string::npos);
}

TEST(TpmAgentEccTest, EccEkUsedWhenRsaCertificateIsAbsent) {
  MANDATE_REQUIRE_SWTPM();
  absl::StatusOr<std::unique_ptr<Swtpm>> tpm = Swtpm::Start({.without_rsa_ek_cert = true});
  ASSERT_TRUE(tpm.ok()) << tpm.status();
  absl::StatusOr<std::unique_ptr<TpmAgentAttestor>> agent =
      TpmAgentAttestor::Create((*tpm)->tcti());
  ASSERT_TRUE(agent.ok()) << agent.status();
  EXPECT_EQ((*agent)->ek_type(), TpmEkType::kEccP384);
  node::v1::TpmAttestationPayload payload = PayloadOf(**agent);
  TPM2B_PUBLIC ek = Unmarshal(payload.ek_public());
  EXPECT_EQ(ek.publicArea.type, TPM2_ALG_ECC);
  EXPECT_EQ(ek.publicArea.parameters.eccDetail.curveID, TPM2_ECC_NIST_P384);
  EXPECT_EQ(ek.publicArea.nameAlg, TPM2_ALG_SHA384);
  ASSERT_FALSE(payload.ek_certificate().empty());
  absl::StatusOr<std::string> hash = (*agent)->EkHashHex();
  ASSERT_TRUE(hash.ok()) << hash.status();
  EXPECT_EQ(*hash, CertKeyHashHex(payload.ek_certificate()));
}

TEST_F(TpmAgentTest, AnswerChallengeBeforePayloadFails) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  EXPECT_EQ(Answer(*agent, BogusChallenge()).code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(TpmAgentTest, AnswerChallengeRefusesMalformedChallenges) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  PayloadOf(*agent);

  absl::Status s = agent->AnswerChallenge("\xff\xff\xff garbage").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("protobuf"));

  struct Case {
    std::string what;
    std::function<void(node::v1::TpmChallenge&)> mutate;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"empty session", [](auto& c) { c.clear_session_id(); }, "session_id"},
      {"long session", [](auto& c) { c.set_session_id(std::string(65, 's')); }, "session_id"},
      {"short nonce", [](auto& c) { c.set_nonce(std::string(8, 'n')); }, "nonce"},
      {"long nonce", [](auto& c) { c.set_nonce(std::string(65, 'n')); }, "nonce"},
      {"pcr 24", [](auto& c) { c.add_pcr_indices_sha256(24); }, "above 23"},
      {"too many pcrs",
       [](auto& c) {
         c.clear_pcr_indices_sha256();
         for (uint32_t i = 0; i < 25; ++i) c.add_pcr_indices_sha256(i % 24);
       },
       "at most 24"},
      {"repeated pcr", [](auto& c) { c.add_pcr_indices_sha256(7); }, "ascending"},
      {"descending pcrs",
       [](auto& c) {
         c.clear_pcr_indices_sha256();
         c.add_pcr_indices_sha256(3);
         c.add_pcr_indices_sha256(1);
       },
       "ascending"},
      {"trailing bytes after blob",
       [](auto& c) { c.set_credential_blob(MarshalledIdObject(68) + "x"); }, "TPM2B_ID_OBJECT"},
      {"empty blob", [](auto& c) { c.clear_credential_blob(); }, "TPM2B_ID_OBJECT"},
      {"blob size beyond data",
       [](auto& c) { c.set_credential_blob(std::string("\x00\x50\x01\x02", 4)); },
       "TPM2B_ID_OBJECT"},
      {"empty secret", [](auto& c) { c.clear_encrypted_secret(); }, "TPM2B_ENCRYPTED_SECRET"},
  };
  for (const Case& c : cases) {
    node::v1::TpmChallenge challenge = BogusChallenge();
    c.mutate(challenge);
    absl::Status status = Answer(*agent, challenge);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.what << ": " << status;
    EXPECT_THAT(status.message(), HasSubstr(c.message)) << c.what;
  }
}

// Random bytes in the well-formed wrapper: the TPM cannot activate them. (libtpms answers this
// garbage RSA secret with TPM_RC_FAILURE and stops accepting commands, so the session-leak check
// with a properly made credential for another AK lives in tpm_end_to_end_test.)
TEST_F(TpmAgentTest, UnactivatableCredentialRefusedAsInvalidArgument) {
  auto agent = MakeAgent();
  ASSERT_NE(agent, nullptr);
  PayloadOf(*agent);
  absl::Status status = Answer(*agent, BogusChallenge());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(status.message(), HasSubstr("ActivateCredential")) << status;
}

}  // namespace
}  // namespace mandate::attestors
