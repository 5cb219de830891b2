// Agent half of TPM 2.0 node attestation (DESIGN.md §3, §10; protocol in
// proto/mandate/node/v1/tpm.proto).
//
// The agent proves three things to the broker in one round trip:
//   1. it holds the TPM whose endorsement key (EK) the manufacturer certified: only that TPM can
//      ActivateCredential the secret the broker encrypted to the EK;
//   2. the attestation key (AK) lives in the same TPM: the credential is bound to the AK's name;
//   3. the quoted PCR values and the agent's node key are current: the AK quotes them with
//      qualifying data SHA-256(broker nonce || CSR SubjectPublicKeyInfo DER).
//
// Only this module (with the broker half) touches tpm2-tss; the header keeps ESAPI types out.
#ifndef MANDATE_ATTESTORS_NODE_TPM_AGENT_TPM_AGENT_ATTESTOR_H_
#define MANDATE_ATTESTORS_NODE_TPM_AGENT_TPM_AGENT_ATTESTOR_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "attestors/node/node_attestor.h"

namespace mandate::attestors {

// Limits on what a challenge may ask for; larger values are refused before touching the TPM.
inline constexpr size_t kTpmAgentMaxPcrIndex = 23;
inline constexpr size_t kTpmAgentMaxSessionIdBytes = 64;
inline constexpr size_t kTpmAgentMinNonceBytes = 16;
inline constexpr size_t kTpmAgentMaxNonceBytes = 64;

// Which endorsement key the agent uses; chosen once in Create().
enum class TpmEkType {
  kRsa2048,  // TCG template L-1, certificate at NV 0x01c00002
  kEccP256,  // TCG template L-2, certificate at NV 0x01c0000a
  kEccP384,  // TCG template H-3, certificate at NV 0x01c00016 (swtpm's ECC EK)
};

// Owns one TCTI connection and ESYS context, with the EK and AK loaded for the object's lifetime
// (swtpm has no resource manager, so the object holds at most two transient objects and flushes
// every policy session it starts before returning). Not thread-safe: one thread at a time, as
// AgentNodeAttestor requires. Over a resource-manager-less TCTI (swtpm) only one attestor should
// be alive per TPM at a time.
class TpmAgentAttestor final : public AgentNodeAttestor {
 public:
  // `tcti`: a tss2 TCTI configuration such as "swtpm:path=/run/swtpm.sock" or
  // "device:/dev/tpmrm0". Opens the TCTI and ESYS context, sends Startup(CLEAR) (tolerating an
  // already started TPM), picks the EK (RSA when its certificate NV index exists, else the ECC EK
  // whose certificate exists, else RSA without a certificate), reads the EK certificate (absent ->
  // empty), and creates the AK: a restricted signing primary in the endorsement hierarchy (ECDSA
  // P-256/SHA-256, or RSASSA-2048/SHA-256 where the TPM lacks P-256).
  // Fails with Unavailable when the TPM cannot be reached, Internal for other TPM errors (the
  // message carries the Tss2_RC_Decode text).
  static absl::StatusOr<std::unique_ptr<TpmAgentAttestor>> Create(const std::string& tcti);

  // Flushes every transient handle, then finalizes ESYS and the TCTI.
  ~TpmAgentAttestor() override;
  TpmAgentAttestor(const TpmAgentAttestor&) = delete;
  TpmAgentAttestor& operator=(const TpmAgentAttestor&) = delete;

  std::string_view name() const override { return "tpm"; }  // = the broker half's name

  // Serialized TpmAttestationPayload (EK certificate, EK public, AK public). Remembers
  // `csr_spki_der`: the next AnswerChallenge binds it into the quote.
  absl::StatusOr<std::string> Payload(std::string_view csr_spki_der) override;

  // Serialized TpmChallenge -> serialized TpmChallengeResponse: recovers the broker's secret with
  // ActivateCredential, proves it with an HMAC, quotes the requested sha256-bank PCRs and returns
  // their values. Refuses (InvalidArgument) malformed challenges: bad protobuf, sizes out of
  // range, PCR indices above 23, unsorted or repeated indices; FailedPrecondition before Payload().
  absl::StatusOr<std::string> AnswerChallenge(std::string_view challenge) override;

  bool CanReattest() const override { return true; }

  // Lowercase hex SHA-256 of the EK's SubjectPublicKeyInfo DER: the node ID suffix
  // (spiffe://<td>/node/tpm/<hash>) and the value operators put in an EK allowlist.
  absl::StatusOr<std::string> EkHashHex() const;

  TpmEkType ek_type() const;

  // Opaque ESAPI state; defined in the .cc so that tss2 headers stay out of this one.
  struct State;

 private:
  explicit TpmAgentAttestor(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace mandate::attestors

#endif  // MANDATE_ATTESTORS_NODE_TPM_AGENT_TPM_AGENT_ATTESTOR_H_
