// The TCG EK Credential Profile templates both halves of TPM attestation rely on: the agent
// creates its EK from them, and the broker rebuilds the EK public area from them (never
// trusting the agent's copy). One definition, so the two can never drift apart.
#ifndef MANDATE_ATTESTORS_NODE_TPM_TCG_EK_TEMPLATE_H_
#define MANDATE_ATTESTORS_NODE_TPM_TCG_EK_TEMPLATE_H_

#include <tss2/tss2_tpm2_types.h>

#include <array>
#include <cstdint>
#include <cstring>

namespace mandate::attestors::tpm {

// EK Credential Profile 2.x, B.3.3 / B.3.4: PolicyA = PolicySecret(TPM_RH_ENDORSEMENT) (SHA-256);
// PolicyB = PolicyOR(PolicyA, PolicyC) (SHA-384) for the high-range templates.
inline constexpr std::array<uint8_t, 32> kEkPolicyASha256 = {
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xB3, 0xF8, 0x1A, 0x90, 0xCC, 0x8D, 0x46, 0xA5, 0xD7, 0x24,
    0xFD, 0x52, 0xD7, 0x6E, 0x06, 0x52, 0x0B, 0x64, 0xF2, 0xA1, 0xDA, 0x1B, 0x33, 0x14, 0x69, 0xAA};
inline constexpr std::array<uint8_t, 48> kEkPolicyBSha384 = {
    0xB2, 0x6E, 0x7D, 0x28, 0xD1, 0x1A, 0x50, 0xBC, 0x53, 0xD8, 0x82, 0xBC, 0xF5, 0xFD, 0x3A, 0x1A,
    0x07, 0x41, 0x48, 0xBB, 0x35, 0xD3, 0xB4, 0xE4, 0xCB, 0x1C, 0x0A, 0xD9, 0xBD, 0xE4, 0x19, 0xCA,
    0xCB, 0x47, 0xBA, 0x09, 0x69, 0x96, 0x46, 0x15, 0x0F, 0x9F, 0xC0, 0x00, 0xF3, 0xF8, 0x0E, 0x12};

enum class TcgEkTemplate {
  kRsa2048L1,  // RSA-2048, SHA-256, AES-128-CFB, PolicyA
  kEccP256L2,  // ECC NIST P-256, SHA-256, AES-128-CFB, PolicyA
  kEccP384H3,  // ECC NIST P-384, SHA-384, AES-256-CFB, PolicyB, userWithAuth
};

// The template's public area. `unique` is zero-filled at the template's size (L-1: 256 bytes,
// L-2: 32+32) or empty (H-3), as TPM2_CreatePrimary expects; the broker overwrites it with the
// EK's key.
inline TPMT_PUBLIC TcgEkPublicArea(TcgEkTemplate kind) {
  TPMT_PUBLIC p{};
  p.nameAlg = TPM2_ALG_SHA256;
  p.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_ADMINWITHPOLICY |
                       TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT;
  p.authPolicy.size = kEkPolicyASha256.size();
  std::memcpy(p.authPolicy.buffer, kEkPolicyASha256.data(), kEkPolicyASha256.size());
  if (kind == TcgEkTemplate::kRsa2048L1) {
    p.type = TPM2_ALG_RSA;
    p.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_AES;
    p.parameters.rsaDetail.symmetric.keyBits.aes = 128;
    p.parameters.rsaDetail.symmetric.mode.aes = TPM2_ALG_CFB;
    p.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
    p.parameters.rsaDetail.keyBits = 2048;
    p.parameters.rsaDetail.exponent = 0;
    p.unique.rsa.size = 256;
    return p;
  }
  const bool p384 = kind == TcgEkTemplate::kEccP384H3;
  p.type = TPM2_ALG_ECC;
  p.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_AES;
  p.parameters.eccDetail.symmetric.keyBits.aes = p384 ? 256 : 128;
  p.parameters.eccDetail.symmetric.mode.aes = TPM2_ALG_CFB;
  p.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  p.parameters.eccDetail.curveID = p384 ? TPM2_ECC_NIST_P384 : TPM2_ECC_NIST_P256;
  p.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  if (p384) {
    p.nameAlg = TPM2_ALG_SHA384;
    p.objectAttributes |= TPMA_OBJECT_USERWITHAUTH;
    p.authPolicy.size = kEkPolicyBSha384.size();
    std::memcpy(p.authPolicy.buffer, kEkPolicyBSha384.data(), kEkPolicyBSha384.size());
  } else {
    p.unique.ecc.x.size = 32;
    p.unique.ecc.y.size = 32;
  }
  return p;
}

}  // namespace mandate::attestors::tpm

#endif  // MANDATE_ATTESTORS_NODE_TPM_TCG_EK_TEMPLATE_H_
