// TPM 2.0 node attestation, broker half (DESIGN.md §3, §10 "TPM"; protocol in
// research/tpm-attestation.md, messages in proto/mandate/node/v1/tpm.proto).
//
// One Attest call is one whole exchange: the agent sends its EK (certificate or bare public key)
// and AK public areas; the broker checks the EK's trust and the AK's attributes, sends a
// MakeCredential challenge bound to the AK's name plus a fresh nonce, and accepts the answer
// only if the agent recovered the secret (proving EK and AK live in the same TPM) and returned a
// quote by that AK over SHA-256(nonce || the agent's CSR key) whose boot counters have not gone
// backwards for this EK. The session (id, secret, nonce) lives only on this call's stack, so it
// is single use by construction and is checked against `session_ttl_seconds`.
//
// Result: node ID `spiffe://<td>/node/tpm/<hex sha256 of EK SPKI DER>` and selectors
//   tpm:ek_hash:<hex>                   always
//   tpm:ek_ca:<hex sha256 of the DER of the CA certificate that issued the EK certificate>
//                                       when the agent sent an EK certificate
//   tpm:manufacturer:id:<8 uppercase hex digits>
//                                       the TPM manufacturer attribute (2.23.133.2.1) of the EK
//                                       certificate's directoryName SAN, in the TCG form
//                                       "id:XXXXXXXX" (e.g. id:00001014 for swtpm/IBM); left
//                                       out when absent or not in that form
//   tpm:pcr:sha256:<index>:<hex>        for each quoted PCR
//
// EK certificate verification: the configured EK CA bundles may hold roots and intermediates.
// Only self-signed certificates are trust anchors (no partial chains: a configured intermediate
// alone does not make an EK trusted); other configured certificates are offered as untrusted
// intermediates. No purpose is set (EK certificates carry EKU 2.23.133.8.1, which no OpenSSL
// purpose accepts). Critical extensions are NOT ignored: the SAN, which TCG marks critical when
// the subject is empty, is an extension OpenSSL handles; a certificate with a critical extension
// OpenSSL does not know is refused. Validity is checked at the injected clock's time.
//
// Thread-safety: Attest may run concurrently; the attestor holds only immutable options and
// references. `store` and `clock` must outlive it.
#ifndef MANDATE_ATTESTORS_NODE_TPM_SERVER_TPM_SERVER_ATTESTOR_H_
#define MANDATE_ATTESTORS_NODE_TPM_SERVER_TPM_SERVER_ATTESTOR_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "attestors/node/node_attestor.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"

namespace mandate::attestors {

inline constexpr std::string_view kTpmAttestorName = "tpm";

struct TpmServerOptions {
  // From --tpm-ek-ca PEM bundles: roots (self-signed) and intermediates.
  std::vector<crypto::Certificate> ek_ca_certificates;
  // --tpm-ek-hash: hex sha256 of EK SubjectPublicKeyInfo DER (for TPMs without a certificate).
  // Case-insensitive.
  std::vector<std::string> ek_hash_allowlist;
  // sha256-bank PCRs to quote and expose as selectors; 1..24 distinct indices in 0..23.
  std::vector<uint32_t> pcr_indices = {0, 1, 2, 3, 4, 5, 6, 7};
  // How long the agent has to answer the challenge; 1..600.
  int64_t session_ttl_seconds = 60;
};

// Checks `options` (hash syntax, PCR indices, TTL); for the broker's startup. Attest refuses to
// run (FailedPrecondition) with options that fail this.
absl::Status ValidateTpmServerOptions(const TpmServerOptions& options);

class TpmServerAttestor final : public ServerNodeAttestor {
 public:
  TpmServerAttestor(TpmServerOptions options, store::Store& store, const Clock& clock,
                    spiffe::TrustDomain td);
  std::string_view name() const override { return kTpmAttestorName; }
  // Refusals are PermissionDenied with the specific reason; a broken challenge stream or store
  // returns that error unchanged.
  absl::StatusOr<NodeAttestationResult> Attest(const NodeAttestationRequest& request,
                                               const ChallengeFn& challenge) override;

 private:
  const TpmServerOptions options_;  // PCR indices sorted, allowlist lowercased
  const absl::Status options_status_;
  store::Store& store_;
  const Clock& clock_;
  const spiffe::TrustDomain trust_domain_;
};

}  // namespace mandate::attestors

#endif  // MANDATE_ATTESTORS_NODE_TPM_SERVER_TPM_SERVER_ATTESTOR_H_
