// TPM node attestation end to end, in process: the agent half on a real (software) TPM answers
// the broker half's challenges directly, with a real SQLite store behind the broker.
#include <tss2/tss2_mu.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "attestors/node/tpm/agent/tpm_agent_attestor.h"
#include "attestors/node/tpm/server/tpm_credential.h"
#include "attestors/node/tpm/server/tpm_server_attestor.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/store/sqlite_store.h"
#include "broker/common/util/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "mandate/node/v1/tpm.pb.h"
#include "tests/tpm/swtpm_fixture.h"

namespace mandate::attestors {
namespace {

using ::mandate::testing::Swtpm;
using ::mandate::testing::SwtpmOptions;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::StartsWith;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class TpmEndToEndTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MANDATE_REQUIRE_SWTPM();
    absl::StatusOr<crypto::PrivateKey> key = crypto::PrivateKey::GenerateP256();
    ASSERT_TRUE(key.ok()) << key.status();
    csr_spki_der_ = key->public_key().SpkiDer();
  }

  // Starts `tpm_` (and the broker trusting its CA) with `options`.
  void StartTpm(const SwtpmOptions& options = {}) {
    absl::StatusOr<std::unique_ptr<Swtpm>> tpm = Swtpm::Start(options);
    ASSERT_TRUE(tpm.ok()) << tpm.status();
    tpm_ = std::move(*tpm);
    absl::StatusOr<std::unique_ptr<store::SqliteStore>> store =
        store::SqliteStore::Open(tpm_->dir() + "/store.db");
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    absl::StatusOr<std::vector<crypto::Certificate>> cas =
        crypto::Certificate::ParsePemChain(ReadFile(tpm_->ek_ca_bundle_path()));
    ASSERT_TRUE(cas.ok()) << cas.status();
    ASSERT_EQ(cas->size(), 2u);  // root + issuer
    TpmServerOptions server_options;
    server_options.ek_ca_certificates = std::move(*cas);
    absl::StatusOr<spiffe::TrustDomain> td = spiffe::TrustDomain::Parse("example.org");
    ASSERT_TRUE(td.ok()) << td.status();
    server_ =
        std::make_unique<TpmServerAttestor>(std::move(server_options), *store_, Clock::Real(), *td);
  }

  std::unique_ptr<TpmAgentAttestor> MakeAgent(const Swtpm& tpm) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<std::unique_ptr<TpmAgentAttestor>> agent = TpmAgentAttestor::Create(tpm.tcti());
    std::printf("[ timing ] TpmAgentAttestor::Create: %.1f ms\n",
                std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                    .count());
    EXPECT_TRUE(agent.ok()) << agent.status();
    return agent.ok() ? std::move(*agent) : nullptr;
  }

  // One whole exchange; `recorded_answer` receives the agent's answer; `replace_answer`, when
  // set, is sent instead of it.
  absl::StatusOr<NodeAttestationResult> Attest(TpmAgentAttestor& agent,
                                               std::string* recorded_answer = nullptr,
                                               const std::string* replace_answer = nullptr,
                                               std::string_view server_csr_spki = {}) {
    absl::StatusOr<std::string> payload = agent.Payload(csr_spki_der_);
    if (!payload.ok()) return payload.status();
    int challenges = 0;
    auto answer = [&](std::string_view challenge) -> absl::StatusOr<std::string> {
      ++challenges;
      absl::StatusOr<std::string> a = agent.AnswerChallenge(challenge);
      if (a.ok() && recorded_answer != nullptr) *recorded_answer = *a;
      if (a.ok() && replace_answer != nullptr) return *replace_answer;
      return a;
    };
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<NodeAttestationResult> result = server_->Attest(
        {*payload, server_csr_spki.empty() ? std::string_view(csr_spki_der_) : server_csr_spki},
        answer);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("[ timing ] TPM attestation (%d challenge, agent + broker): %.1f ms -> %s\n",
                challenges, ms, result.ok() ? "admitted" : result.status().ToString().c_str());
    return result;
  }

  void ExpectAdmitted(TpmAgentAttestor& agent) {
    absl::StatusOr<std::string> ek_hash = agent.EkHashHex();
    ASSERT_TRUE(ek_hash.ok()) << ek_hash.status();
    absl::StatusOr<NodeAttestationResult> result = Attest(agent);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->node_spiffe_id, "spiffe://example.org/node/tpm/" + *ek_hash);
    EXPECT_THAT(result->selectors, Contains("tpm:ek_hash:" + *ek_hash));
    EXPECT_THAT(result->selectors, Contains(StartsWith("tpm:pcr:sha256:0:")));
    EXPECT_THAT(result->selectors, Contains(StartsWith("tpm:pcr:sha256:7:")));
    EXPECT_THAT(result->selectors, Contains(StartsWith("tpm:ek_ca:")));
  }

  std::string csr_spki_der_;
  std::unique_ptr<Swtpm> tpm_;
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<TpmServerAttestor> server_;
};

TEST_F(TpmEndToEndTest, RsaEkTpmAdmittedWithEkHashNodeId) {
  StartTpm();
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  ASSERT_EQ(agent->ek_type(), TpmEkType::kRsa2048);
  ExpectAdmitted(*agent);
}

TEST_F(TpmEndToEndTest, EccEkTpmAdmittedWithEkHashNodeId) {
  StartTpm({.without_rsa_ek_cert = true});
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  ASSERT_EQ(agent->ek_type(), TpmEkType::kEccP384);
  ExpectAdmitted(*agent);
}

// Without persisted EKs the agent derives them from the TCG templates (L-1, H-3); the result
// must be the certified key, or the broker would refuse.
TEST_F(TpmEndToEndTest, TemplateDerivedEksAdmitted) {
  for (bool ecc : {false, true}) {
    SCOPED_TRACE(ecc ? "ECC EK" : "RSA EK");
    StartTpm({.without_rsa_ek_cert = ecc, .without_persistent_eks = true});
    auto agent = MakeAgent(*tpm_);
    ASSERT_NE(agent, nullptr);
    EXPECT_EQ(agent->ek_type(), ecc ? TpmEkType::kEccP384 : TpmEkType::kRsa2048);
    ExpectAdmitted(*agent);
    agent.reset();
    server_.reset();
    store_.reset();
    tpm_.reset();
  }
}

TEST_F(TpmEndToEndTest, ReattestationAdmittedAgainWithSameNodeId) {
  StartTpm();
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<NodeAttestationResult> first = Attest(*agent);
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<NodeAttestationResult> second = Attest(*agent);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(first->node_spiffe_id, second->node_spiffe_id);
}

TEST_F(TpmEndToEndTest, TpmFromAnotherCaRefused) {
  StartTpm();
  absl::StatusOr<std::unique_ptr<Swtpm>> other = Swtpm::Start();  // fresh, different CA
  ASSERT_TRUE(other.ok()) << other.status();
  auto agent = MakeAgent(**other);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<NodeAttestationResult> result = Attest(*agent);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied) << result.status();
}

TEST_F(TpmEndToEndTest, TpmFromSameCaAdmittedWithItsOwnNodeId) {
  StartTpm();
  absl::StatusOr<std::unique_ptr<Swtpm>> sibling = Swtpm::Start({.same_ca_as = tpm_.get()});
  ASSERT_TRUE(sibling.ok()) << sibling.status();
  std::string first_hash;
  {
    auto agent = MakeAgent(*tpm_);
    ASSERT_NE(agent, nullptr);
    first_hash = agent->EkHashHex().value_or("");
  }
  auto agent = MakeAgent(**sibling);
  ASSERT_NE(agent, nullptr);
  ExpectAdmitted(*agent);
  EXPECT_NE(agent->EkHashHex().value_or(""), first_hash);
}

TEST_F(TpmEndToEndTest, ReplayedResponseRefused) {
  StartTpm();
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  std::string recorded;
  absl::StatusOr<NodeAttestationResult> first = Attest(*agent, &recorded);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_FALSE(recorded.empty());
  absl::StatusOr<NodeAttestationResult> replayed = Attest(*agent, nullptr, &recorded);
  ASSERT_FALSE(replayed.ok());
  EXPECT_EQ(replayed.status().code(), absl::StatusCode::kPermissionDenied) << replayed.status();
}

// The quote binds the agent's CSR key: a broker told of another key refuses the evidence.
TEST_F(TpmEndToEndTest, QuoteForAnotherCsrKeyRefused) {
  StartTpm();
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  absl::StatusOr<crypto::PrivateKey> other = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(other.ok());
  const std::string other_spki = other->public_key().SpkiDer();
  absl::StatusOr<NodeAttestationResult> result = Attest(*agent, nullptr, nullptr, other_spki);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied) << result.status();
}

// A credential made for another AK name fails ActivateCredential (integrity check) without
// leaking the policy session: swtpm has no resource manager and three session slots, so a leak
// would turn the fourth refusal into "out of session memory" and break the final attestation.
TEST_F(TpmEndToEndTest, CredentialForAnotherAkRefusedWithoutLeakingSessions) {
  for (bool ecc : {false, true}) {
    SCOPED_TRACE(ecc ? "ECC EK" : "RSA EK");
    StartTpm({.without_rsa_ek_cert = ecc});
    auto agent = MakeAgent(*tpm_);
    ASSERT_NE(agent, nullptr);
    absl::StatusOr<std::string> payload_bytes = agent->Payload(csr_spki_der_);
    ASSERT_TRUE(payload_bytes.ok()) << payload_bytes.status();
    node::v1::TpmAttestationPayload payload;
    ASSERT_TRUE(payload.ParseFromString(*payload_bytes));
    absl::StatusOr<TPMT_PUBLIC> ek = tpm::UnmarshalPublic(payload.ek_public(), "EK public");
    ASSERT_TRUE(ek.ok()) << ek.status();
    const std::string wrong_ak_name = std::string("\x00\x0b", 2) + crypto::Sha256("another AK");
    for (int i = 0; i < 6; ++i) {
      absl::StatusOr<tpm::MadeCredential> made =
          tpm::MakeCredential(*ek, wrong_ak_name, std::string(32, 'k'));
      ASSERT_TRUE(made.ok()) << made.status();
      node::v1::TpmChallenge challenge;
      challenge.set_session_id(std::string(16, 's'));
      challenge.set_credential_blob(made->credential_blob);
      challenge.set_encrypted_secret(made->encrypted_secret);
      challenge.set_nonce(std::string(32, 'n'));
      challenge.add_pcr_indices_sha256(0);
      absl::Status status = agent->AnswerChallenge(challenge.SerializeAsString()).status();
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
      EXPECT_THAT(status.message(), HasSubstr("ActivateCredential")) << status;
    }
    ExpectAdmitted(*agent);
    agent.reset();
    server_.reset();
    store_.reset();
    tpm_.reset();
  }
}

}  // namespace
}  // namespace mandate::attestors

namespace mandate::attestors {
namespace {

// The attacker holds a genuine EK certificate (and EK public) of a TPM it does not control, and
// answers with another TPM of the same, trusted, CA: the credential is sealed to the genuine EK,
// so no other TPM can recover the secret, and nothing is admitted.
TEST_F(TpmEndToEndTest, GenuineEkCertificateWithoutItsTpmRefused) {
  StartTpm();
  absl::StatusOr<std::unique_ptr<Swtpm>> attacker_tpm = Swtpm::Start({.same_ca_as = tpm_.get()});
  ASSERT_TRUE(attacker_tpm.ok()) << attacker_tpm.status();
  auto victim = MakeAgent(*tpm_);
  auto attacker = MakeAgent(**attacker_tpm);
  ASSERT_NE(victim, nullptr);
  ASSERT_NE(attacker, nullptr);

  node::v1::TpmAttestationPayload genuine, own;
  ASSERT_TRUE(genuine.ParseFromString(*victim->Payload(csr_spki_der_)));
  ASSERT_TRUE(own.ParseFromString(*attacker->Payload(csr_spki_der_)));
  node::v1::TpmAttestationPayload forged;
  forged.set_ek_certificate(genuine.ek_certificate());
  forged.set_ek_public(genuine.ek_public());
  forged.set_ak_public(own.ak_public());  // the attacker's TPM holds this AK
  std::string payload = forged.SerializeAsString();

  int answered = 0;
  auto result = server_->Attest({payload, csr_spki_der_},
                                [&](std::string_view challenge) -> absl::StatusOr<std::string> {
                                  ++answered;
                                  return attacker->AnswerChallenge(challenge);
                                });
  EXPECT_EQ(answered, 1);
  ASSERT_FALSE(result.ok());
  auto nodes = store_->ListNodes();
  ASSERT_TRUE(nodes.ok());
  EXPECT_TRUE(nodes->empty());
}

}  // namespace
}  // namespace mandate::attestors

namespace mandate::attestors {
namespace {

// The real TPM's quote with one byte changed: the AK signature no longer covers it.
TEST_F(TpmEndToEndTest, TamperedQuoteRefused) {
  StartTpm();
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  auto payload = agent->Payload(csr_spki_der_);
  ASSERT_TRUE(payload.ok());
  auto result = server_->Attest({*payload, csr_spki_der_},
                                [&](std::string_view challenge) -> absl::StatusOr<std::string> {
                                  auto answer = agent->AnswerChallenge(challenge);
                                  if (!answer.ok()) return answer;
                                  node::v1::TpmChallengeResponse response;
                                  if (!response.ParseFromString(*answer))
                                    return absl::InternalError("unparsable answer");
                                  std::string quote = response.quote();
                                  quote[quote.size() - 5] ^= 0x01;  // inside the PCR digest
                                  response.set_quote(quote);
                                  return response.SerializeAsString();
                                });
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied) << result.status();
}

// The real TPM's AK with `restricted` cleared in what the agent claims: a key that could sign
// arbitrary data (and so forge a quote) is refused before any challenge.
TEST_F(TpmEndToEndTest, AkWithoutRestrictedRefused) {
  StartTpm();
  auto agent = MakeAgent(*tpm_);
  ASSERT_NE(agent, nullptr);
  node::v1::TpmAttestationPayload payload;
  ASSERT_TRUE(payload.ParseFromString(*agent->Payload(csr_spki_der_)));
  TPM2B_PUBLIC ak{};
  size_t offset = 0;
  const std::string& in = payload.ak_public();
  ASSERT_EQ(Tss2_MU_TPM2B_PUBLIC_Unmarshal(reinterpret_cast<const uint8_t*>(in.data()), in.size(),
                                           &offset, &ak),
            TSS2_RC_SUCCESS);
  ASSERT_NE(ak.publicArea.objectAttributes & TPMA_OBJECT_RESTRICTED, 0u);
  ak.publicArea.objectAttributes &= ~TPMA_OBJECT_RESTRICTED;
  uint8_t out[sizeof(TPM2B_PUBLIC)];
  size_t out_len = 0;
  ak.size = 0;  // recomputed by the marshaller
  ASSERT_EQ(Tss2_MU_TPM2B_PUBLIC_Marshal(&ak, out, sizeof(out), &out_len), TSS2_RC_SUCCESS);
  payload.set_ak_public(std::string(reinterpret_cast<char*>(out), out_len));

  int challenges = 0;
  auto result = server_->Attest({payload.SerializeAsString(), csr_spki_der_},
                                [&](std::string_view c) -> absl::StatusOr<std::string> {
                                  ++challenges;
                                  return agent->AnswerChallenge(c);
                                });
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("restricted"));
  EXPECT_EQ(challenges, 0);
}

}  // namespace
}  // namespace mandate::attestors
