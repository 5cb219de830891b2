// TPM 2.0 structure checks and crypto the broker does in software (no TPM, no ESAPI): EK public
// areas rebuilt from TCG templates, attestation-key (AK) policy, object names, KDFa/KDFe,
// TPM2_MakeCredential, and quote verification. See research/tpm-attestation.md for the protocol.
//
// Everything here is a pure function of its arguments and safe to call concurrently. Nothing
// throws or aborts on input: every TSS2 unmarshal is bounds-checked by libtss2-mu and every
// OpenSSL object is owned by a smart pointer. Malformed or unacceptable input is
// PermissionDenied with the specific reason (these are attestation refusals); OpenSSL failures
// on well-formed input are Internal.
#ifndef MANDATE_ATTESTORS_NODE_TPM_SERVER_TPM_CREDENTIAL_H_
#define MANDATE_ATTESTORS_NODE_TPM_SERVER_TPM_CREDENTIAL_H_

#include <tss2/tss2_tpm2_types.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/common/crypto/keys.h"

namespace mandate::attestors::tpm {

// The label of the activation proof: HMAC-SHA256(secret, kActivationProofLabel || session_id ||
// nonce || AK name).
inline constexpr std::string_view kActivationProofLabel = "mandate-tpm-v1";

// Unmarshals a TPM2B_PUBLIC, refusing trailing bytes and a size field that disagrees with the
// structure. `what` names the object in errors ("EK public", "AK public").
absl::StatusOr<TPMT_PUBLIC> UnmarshalPublic(std::string_view tpm2b_public, std::string_view what);

// The OpenSSL public key of an RSA or ECC (P-256/P-384) public area. Exponent 0 means 65537.
absl::StatusOr<crypto::PublicKey> PublicKeyFromTpm(const TPMT_PUBLIC& area);

// The EK public area the broker uses for MakeCredential: the TCG EK Credential Profile template
// for the key's type, with the key itself in `unique`. Only the nameAlg and symmetric fields of
// the template matter to MakeCredential, and they come from here, never from the agent.
//   RSA-2048 (e = 65537)  -> template L-1: SHA-256, AES-128-CFB
//   ECC P-256             -> template L-2: SHA-256, AES-128-CFB
//   ECC P-384             -> template H-3: SHA-384, AES-256-CFB
// Other keys are refused ("EK key type not supported: ...").
absl::StatusOr<TPMT_PUBLIC> EkPublicAreaFromKey(const crypto::PublicKey& key);

// Checks that `ak` is a TPM-resident, TPM-generated restricted signing key Mandate accepts:
// fixedTPM, fixedParent, sensitiveDataOrigin, restricted, sign, not decrypt; nameAlg SHA-256;
// scheme RSASSA-SHA256 (RSA 2048/3072/4096) or ECDSA-SHA256 (P-256/P-384). Returns its public
// key. Reasons: "AK not restricted", "AK not fixedTPM", "AK can decrypt", ...
absl::StatusOr<crypto::PublicKey> CheckAttestationKey(const TPMT_PUBLIC& ak);

// The TPM name of a public area: BE16(nameAlg) || H_nameAlg(Marshal(TPMT_PUBLIC)).
absl::StatusOr<std::string> TpmName(const TPMT_PUBLIC& area);

// KDFa (TPM 2.0 Part 1 §11.4.10.2, SP800-108 counter mode HMAC): `bits` bits.
// `label` excludes the terminating NUL (the KDF adds it). `hash_alg` is TPM2_ALG_SHA256/384/512.
absl::StatusOr<std::string> Kdfa(TPMI_ALG_HASH hash_alg, std::string_view key,
                                 std::string_view label, std::string_view context_u,
                                 std::string_view context_v, size_t bits);
// KDFe (Part 1 §11.4.10.3, SP800-56A concatenation KDF): `bits` bits from the shared secret `z`.
absl::StatusOr<std::string> Kdfe(TPMI_ALG_HASH hash_alg, std::string_view z, std::string_view label,
                                 std::string_view party_u, std::string_view party_v, size_t bits);

struct MadeCredential {
  std::string credential_blob;   // marshalled TPM2B_ID_OBJECT
  std::string encrypted_secret;  // marshalled TPM2B_ENCRYPTED_SECRET
};

// Software TPM2_MakeCredential (Part 1 §24, Part 3 §12.6) for the EK public area `ek` (use
// EkPublicAreaFromKey), the AK's name and a secret of 1..64 bytes. RSA EK: random seed sealed
// with RSA-OAEP (hash = EK nameAlg, label "IDENTITY\0"). ECC EK: ephemeral ECDH, seed =
// KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, EK.x). Then symKey = KDFa(seed, "STORAGE", name),
// hmacKey = KDFa(seed, "INTEGRITY"), encIdentity = AES-CFB(symKey, IV 0, TPM2B(secret)),
// blob = TPM2B(HMAC(hmacKey, encIdentity || name)) || encIdentity.
absl::StatusOr<MadeCredential> MakeCredential(const TPMT_PUBLIC& ek, std::string_view ak_name,
                                              std::string_view secret);

// HMAC-SHA256(secret, kActivationProofLabel || session_id || nonce || ak_name).
absl::StatusOr<std::string> ActivationProof(std::string_view secret, std::string_view session_id,
                                            std::string_view nonce, std::string_view ak_name);

// What a verified quote says.
struct VerifiedQuote {
  uint32_t reset_count = 0;
  uint32_t restart_count = 0;
  uint64_t clock = 0;
};

// The sha256-bank PCR selection for `pcr_indices` (each 0..23), as the TPM echoes it.
absl::StatusOr<TPML_PCR_SELECTION> Sha256PcrSelection(const std::vector<uint32_t>& pcr_indices);

// Verifies a TPM2_Quote: `quote` is a marshalled TPM2B_ATTEST, `signature` a marshalled
// TPMT_SIGNATURE by the AK `ak` (already checked with CheckAttestationKey). Checks, in order:
// the signature over the attest bytes ("quote signature does not verify"), magic
// TPM_GENERATED_VALUE ("quote not generated by a TPM"), type TPM_ST_ATTEST_QUOTE ("attestation
// is not a quote"), extraData == `qualifying_data` ("quote not over this nonce and key"), the
// PCR selection equals the sha256 selection of `pcr_indices` ("quote PCR selection differs"),
// pcrDigest == SHA-256(pcr_values concatenated) ("PCR values do not match the quote").
// `pcr_values` are in `pcr_indices` order. clockInfo.safe is deliberately not required: quotes
// are ordered by resetCount/restartCount (kept in NV), never by Clock.
absl::StatusOr<VerifiedQuote> VerifyQuote(const TPMT_PUBLIC& ak, std::string_view quote,
                                          std::string_view signature,
                                          std::string_view qualifying_data,
                                          const std::vector<uint32_t>& pcr_indices,
                                          const std::vector<std::string>& pcr_values);

}  // namespace mandate::attestors::tpm

#endif  // MANDATE_ATTESTORS_NODE_TPM_SERVER_TPM_CREDENTIAL_H_
