#include "attestors/node/tpm/agent/tpm_agent_attestor.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_tctildr.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "attestors/node/tpm/tcg_ek_template.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/util/status_macros.h"
#include "mandate/node/v1/tpm.pb.h"

namespace mandate::attestors {
namespace {

// TCG EK Credential Profile: NV indices of EK certificates and the conventional persistent
// handles of EKs provisioned by the platform (0x81010016 is where swtpm_setup puts its P-384 EK).
constexpr TPM2_HANDLE kRsaEkCertIndex = 0x01c00002;
constexpr TPM2_HANDLE kEccP256EkCertIndex = 0x01c0000a;
constexpr TPM2_HANDLE kEccP384EkCertIndex = 0x01c00016;
constexpr TPM2_HANDLE kRsaEkPersistent = 0x81010001;
constexpr TPM2_HANDLE kEccP256EkPersistent = 0x81010002;
constexpr TPM2_HANDLE kEccP384EkPersistent = 0x81010016;

// EK Credential Profile policy digests. PolicyA = PolicySecret(TPM_RH_ENDORSEMENT); the high-range
// templates use PolicyB = PolicyOR(PolicyA, PolicyC) with PolicyC = PolicyAuthorizeNV(0x01c07f01).
constexpr std::array<uint8_t, 48> kPolicyASha384 = {
    0x8B, 0xBF, 0x22, 0x66, 0x53, 0x7C, 0x17, 0x1C, 0xB5, 0x6E, 0x40, 0x3C, 0x4D, 0xC1, 0xD4, 0xB6,
    0x4F, 0x43, 0x26, 0x11, 0xDC, 0x38, 0x6E, 0x6F, 0x53, 0x20, 0x50, 0xC3, 0x27, 0x8C, 0x93, 0x0E,
    0x14, 0x3E, 0x8B, 0xB1, 0x13, 0x38, 0x24, 0xCC, 0xB4, 0x31, 0x05, 0x38, 0x71, 0xC6, 0xDB, 0x53};
constexpr std::array<uint8_t, 48> kPolicyCSha384 = {
    0xD6, 0x03, 0x2C, 0xE6, 0x1F, 0x2F, 0xB3, 0xC2, 0x40, 0xEB, 0x3C, 0xF6, 0xA3, 0x32, 0x37, 0xEF,
    0x2B, 0x6A, 0x16, 0xF4, 0x29, 0x3C, 0x22, 0xB4, 0x55, 0xE2, 0x61, 0xCF, 0xFD, 0x21, 0x7A, 0xD5,
    0xB4, 0x94, 0x7C, 0x2D, 0x73, 0xE6, 0x30, 0x05, 0xEE, 0xD2, 0xDC, 0x2B, 0x35, 0x93, 0xD1, 0x65};

constexpr std::string_view kActivationProofLabel = "mandate-tpm-v1";
constexpr size_t kPcrReadBatch = 8;  // TPM2_PCR_Read returns at most 8 digests per call
constexpr int kQuoteAttempts = 3;    // retries when a PCR is extended between Quote and PCR_Read

struct EsysFree {
  void operator()(void* p) const { Esys_Free(p); }
};
template <typename T>
using EsysPtr = std::unique_ptr<T, EsysFree>;

absl::Status TpmError(TSS2_RC rc, std::string_view what) {
  return absl::InternalError(
      absl::StrFormat("TPM: %s failed: 0x%x %s", what, rc, Tss2_RC_Decode(rc)));
}

std::string Bytes(const uint8_t* data, size_t size) {
  return std::string(reinterpret_cast<const char*>(data), size);
}

// A transient ESYS object or session, flushed when it goes out of scope. swtpm has no resource
// manager, so a leaked handle would stay in the TPM until it restarts.
class ScopedHandle {
 public:
  explicit ScopedHandle(ESYS_CONTEXT* esys) : esys_(esys) {}
  ~ScopedHandle() { Reset(); }
  ScopedHandle(const ScopedHandle&) = delete;
  ScopedHandle& operator=(const ScopedHandle&) = delete;

  ESYS_TR* out() { return &handle_; }
  ESYS_TR get() const { return handle_; }
  void Reset() {
    if (handle_ != ESYS_TR_NONE) {
      Esys_FlushContext(esys_, handle_);
      handle_ = ESYS_TR_NONE;
    }
  }

 private:
  ESYS_CONTEXT* esys_;
  ESYS_TR handle_ = ESYS_TR_NONE;
};

TPM2B_PUBLIC EkTemplate(TpmEkType type) {
  TPM2B_PUBLIC t{};
  switch (type) {
    case TpmEkType::kRsa2048:
      t.publicArea = tpm::TcgEkPublicArea(tpm::TcgEkTemplate::kRsa2048L1);
      break;
    case TpmEkType::kEccP256:
      t.publicArea = tpm::TcgEkPublicArea(tpm::TcgEkTemplate::kEccP256L2);
      break;
    case TpmEkType::kEccP384:
      t.publicArea = tpm::TcgEkPublicArea(tpm::TcgEkTemplate::kEccP384H3);
      break;
  }
  return t;
}

// A restricted signing key: it signs only digests the TPM computed itself (quotes), so a quote's
// TPM_GENERATED magic proves the TPM produced it.
TPM2B_PUBLIC AkTemplate(bool ecc) {
  TPM2B_PUBLIC t{};
  TPMT_PUBLIC& p = t.publicArea;
  p.nameAlg = TPM2_ALG_SHA256;
  p.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                       TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN_ENCRYPT;
  if (ecc) {
    p.type = TPM2_ALG_ECC;
    p.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
    p.parameters.eccDetail.scheme.scheme = TPM2_ALG_ECDSA;
    p.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
    p.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
    p.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  } else {
    p.type = TPM2_ALG_RSA;
    p.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL;
    p.parameters.rsaDetail.scheme.scheme = TPM2_ALG_RSASSA;
    p.parameters.rsaDetail.scheme.details.rsassa.hashAlg = TPM2_ALG_SHA256;
    p.parameters.rsaDetail.keyBits = 2048;
  }
  return t;
}

absl::StatusOr<std::string> MarshalPublic(const TPM2B_PUBLIC& pub) {
  std::vector<uint8_t> buf(sizeof(TPM2B_PUBLIC));
  size_t off = 0;
  TSS2_RC rc = Tss2_MU_TPM2B_PUBLIC_Marshal(&pub, buf.data(), buf.size(), &off);
  if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "marshalling TPM2B_PUBLIC");
  return Bytes(buf.data(), off);
}

// True when `actual` is the key `expected_template` describes: everything but `unique` equal.
bool MatchesTemplate(const TPMT_PUBLIC& actual, const TPM2B_PUBLIC& expected_template) {
  TPM2B_PUBLIC a{};
  a.publicArea = actual;
  a.publicArea.unique = expected_template.publicArea.unique;
  absl::StatusOr<std::string> lhs = MarshalPublic(a);
  absl::StatusOr<std::string> rhs = MarshalPublic(expected_template);
  return lhs.ok() && rhs.ok() && *lhs == *rhs;
}

// Handles of type `first >> 24` at or above `first`, below `first + count`.
absl::StatusOr<std::vector<TPM2_HANDLE>> ListHandles(ESYS_CONTEXT* esys, TPM2_HANDLE first,
                                                     uint32_t count) {
  std::vector<TPM2_HANDLE> out;
  TPM2_HANDLE next = first;
  TPMI_YES_NO more = TPM2_YES;
  while (more == TPM2_YES) {
    TPMS_CAPABILITY_DATA* raw = nullptr;
    TSS2_RC rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                    TPM2_CAP_HANDLES, next, TPM2_MAX_CAP_HANDLES, &more, &raw);
    EsysPtr<TPMS_CAPABILITY_DATA> data(raw);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "GetCapability(handles)");
    const TPML_HANDLE& handles = data->data.handles;
    if (handles.count == 0) break;
    for (uint32_t i = 0; i < handles.count; ++i) {
      if (handles.handle[i] >= first && handles.handle[i] - first < count) {
        out.push_back(handles.handle[i]);
      }
    }
    TPM2_HANDLE last = handles.handle[handles.count - 1];
    if (last - first >= count) break;
    next = last + 1;
  }
  return out;
}

bool Contains(const std::vector<TPM2_HANDLE>& handles, TPM2_HANDLE h) {
  return std::find(handles.begin(), handles.end(), h) != handles.end();
}

// Some TPMs pad the certificate NV index; keep exactly one DER element.
void TrimToDerElement(std::string& der) {
  if (der.size() < 2 || static_cast<uint8_t>(der[0]) != 0x30) return;
  size_t len_byte = static_cast<uint8_t>(der[1]);
  size_t header = 2;
  size_t length = 0;
  if (len_byte < 0x80) {
    length = len_byte;
  } else {
    size_t n = len_byte & 0x7f;
    if (n == 0 || n > 4 || der.size() < 2 + n) return;
    for (size_t i = 0; i < n; ++i) length = (length << 8) | static_cast<uint8_t>(der[2 + i]);
    header += n;
  }
  if (header + length <= der.size()) der.resize(header + length);
}

absl::StatusOr<std::string> ReadNvIndex(ESYS_CONTEXT* esys, TPM2_HANDLE index) {
  ESYS_TR nv = ESYS_TR_NONE;
  TSS2_RC rc = Esys_TR_FromTPMPublic(esys, index, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &nv);
  if (rc != TSS2_RC_SUCCESS) {
    return TpmError(rc, absl::StrFormat("opening NV index 0x%08x", index));
  }
  // An NV ESYS_TR is metadata only (no TPM slot), so it is closed, not flushed.
  auto close_nv = [esys, &nv] { Esys_TR_Close(esys, &nv); };
  TPM2B_NV_PUBLIC* raw_pub = nullptr;
  TPM2B_NAME* raw_name = nullptr;
  rc = Esys_NV_ReadPublic(esys, nv, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &raw_pub, &raw_name);
  EsysPtr<TPM2B_NV_PUBLIC> nv_pub(raw_pub);
  EsysPtr<TPM2B_NAME> nv_name(raw_name);
  if (rc != TSS2_RC_SUCCESS) {
    close_nv();
    return TpmError(rc, absl::StrFormat("NV_ReadPublic(0x%08x)", index));
  }
  const size_t size = nv_pub->nvPublic.dataSize;

  size_t chunk = 512;  // conservative default; most TPMs allow 1024 (TPM2_PT_NV_BUFFER_MAX)
  {
    TPMI_YES_NO more = TPM2_NO;
    TPMS_CAPABILITY_DATA* raw_cap = nullptr;
    rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_TPM_PROPERTIES,
                            TPM2_PT_NV_BUFFER_MAX, 1, &more, &raw_cap);
    EsysPtr<TPMS_CAPABILITY_DATA> cap(raw_cap);
    if (rc == TSS2_RC_SUCCESS && cap->data.tpmProperties.count == 1 &&
        cap->data.tpmProperties.tpmProperty[0].property == TPM2_PT_NV_BUFFER_MAX &&
        cap->data.tpmProperties.tpmProperty[0].value > 0) {
      chunk = std::min<size_t>(cap->data.tpmProperties.tpmProperty[0].value,
                               sizeof(TPM2B_MAX_NV_BUFFER::buffer));
    }
  }

  std::string out;
  while (out.size() < size) {
    uint16_t n = static_cast<uint16_t>(std::min(size - out.size(), chunk));
    TPM2B_MAX_NV_BUFFER* raw_data = nullptr;
    // EK certificate indices are AUTHREAD with an empty auth: the index authorizes its own read.
    rc = Esys_NV_Read(esys, nv, nv, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, n,
                      static_cast<uint16_t>(out.size()), &raw_data);
    EsysPtr<TPM2B_MAX_NV_BUFFER> data(raw_data);
    if (rc != TSS2_RC_SUCCESS) {
      close_nv();
      return TpmError(rc, absl::StrFormat("NV_Read(0x%08x, offset %d)", index, out.size()));
    }
    if (data->size == 0) break;
    out.append(reinterpret_cast<const char*>(data->buffer), data->size);
  }
  close_nv();
  return out;
}

// OpenSSL public key of a TPM RSA or ECC public area.
absl::StatusOr<crypto::PublicKey> PublicKeyFromTpm(const TPMT_PUBLIC& p) {
  std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(OSSL_PARAM_BLD_new(),
                                                                      OSSL_PARAM_BLD_free);
  std::unique_ptr<BIGNUM, decltype(&BN_free)> n(nullptr, BN_free), e(nullptr, BN_free);
  if (!bld) return absl::InternalError("OSSL_PARAM_BLD_new failed");
  const char* type = nullptr;
  std::vector<uint8_t> point;
  if (p.type == TPM2_ALG_RSA) {
    type = "RSA";
    n.reset(BN_bin2bn(p.unique.rsa.buffer, p.unique.rsa.size, nullptr));
    e.reset(BN_new());
    uint32_t exponent = p.parameters.rsaDetail.exponent ? p.parameters.rsaDetail.exponent : 65537;
    if (!n || !e || BN_set_word(e.get(), exponent) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
      return absl::InternalError("building RSA key parameters failed");
    }
  } else if (p.type == TPM2_ALG_ECC) {
    type = "EC";
    const char* group = nullptr;
    switch (p.parameters.eccDetail.curveID) {
      case TPM2_ECC_NIST_P256:
        group = "P-256";
        break;
      case TPM2_ECC_NIST_P384:
        group = "P-384";
        break;
      case TPM2_ECC_NIST_P521:
        group = "P-521";
        break;
      default:
        return absl::UnimplementedError(
            absl::StrFormat("TPM ECC curve 0x%x is not supported", p.parameters.eccDetail.curveID));
    }
    point.push_back(0x04);  // uncompressed SEC1 point
    point.insert(point.end(), p.unique.ecc.x.buffer, p.unique.ecc.x.buffer + p.unique.ecc.x.size);
    point.insert(point.end(), p.unique.ecc.y.buffer, p.unique.ecc.y.buffer + p.unique.ecc.y.size);
    if (OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                         point.size()) != 1) {
      return absl::InternalError("building EC key parameters failed");
    }
  } else {
    return absl::UnimplementedError(absl::StrFormat("TPM key type 0x%x is not supported", p.type));
  }
  std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(OSSL_PARAM_BLD_to_param(bld.get()),
                                                                 OSSL_PARAM_free);
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr), EVP_PKEY_CTX_free);
  EVP_PKEY* pkey = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &pkey, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    return absl::InternalError("TPM public key is not a valid OpenSSL key");
  }
  crypto::PublicKey key = crypto::PublicKey::FromEvp(pkey);
  EVP_PKEY_free(pkey);
  return key;
}

absl::StatusOr<TPML_PCR_SELECTION> PcrSelection(const uint32_t* indices, size_t count) {
  TPML_PCR_SELECTION sel{};
  sel.count = 1;
  sel.pcrSelections[0].hash = TPM2_ALG_SHA256;
  sel.pcrSelections[0].sizeofSelect = 3;
  for (size_t i = 0; i < count; ++i) {
    if (indices[i] > kTpmAgentMaxPcrIndex) {
      return absl::InvalidArgumentError(absl::StrFormat("PCR index %d is above 23", indices[i]));
    }
    sel.pcrSelections[0].pcrSelect[indices[i] / 8] |= static_cast<uint8_t>(1u << (indices[i] % 8));
  }
  return sel;
}

}  // namespace

struct TpmAgentAttestor::State {
  TSS2_TCTI_CONTEXT* tcti = nullptr;
  ESYS_CONTEXT* esys = nullptr;
  ESYS_TR ek = ESYS_TR_NONE;
  bool ek_persistent = false;  // a persistent EK is closed, never flushed (it would be evicted)
  ESYS_TR ak = ESYS_TR_NONE;
  TpmEkType ek_type = TpmEkType::kRsa2048;
  TPMT_PUBLIC ek_public_area{};
  std::string ek_certificate;
  std::string ek_public;  // marshalled TPM2B_PUBLIC
  std::string ak_public;  // marshalled TPM2B_PUBLIC
  std::string ak_name;    // nameAlg || H(TPMT_PUBLIC), as the TPM computes it
  std::optional<std::string> csr_spki_der;

  State() = default;
  State(const State&) = delete;
  State& operator=(const State&) = delete;
  ~State() {
    if (esys != nullptr) {
      if (ak != ESYS_TR_NONE) Esys_FlushContext(esys, ak);
      if (ek != ESYS_TR_NONE) {
        if (ek_persistent) {
          Esys_TR_Close(esys, &ek);
        } else {
          Esys_FlushContext(esys, ek);
        }
      }
      Esys_Finalize(&esys);
    }
    if (tcti != nullptr) Tss2_TctiLdr_Finalize(&tcti);
  }

  // Starts a policy session satisfying the EK's authPolicy. PolicySecret(TPM_RH_ENDORSEMENT) with
  // the (empty) endorsement password is PolicyA; the H-3 EK's policy is PolicyOR(PolicyA,
  // PolicyC) computed with SHA-384, so its session must use SHA-384 and finish with PolicyOR.
  absl::Status StartEkPolicySession(ScopedHandle& session) {
    const bool sha384 = ek_type == TpmEkType::kEccP384;
    TPMT_SYM_DEF symmetric{};
    symmetric.algorithm = TPM2_ALG_NULL;
    TSS2_RC rc = Esys_StartAuthSession(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                       ESYS_TR_NONE, nullptr, TPM2_SE_POLICY, &symmetric,
                                       sha384 ? TPM2_ALG_SHA384 : TPM2_ALG_SHA256, session.out());
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "StartAuthSession(policy)");
    rc = Esys_PolicySecret(esys, ESYS_TR_RH_ENDORSEMENT, session.get(), ESYS_TR_PASSWORD,
                           ESYS_TR_NONE, ESYS_TR_NONE, nullptr, nullptr, nullptr, 0, nullptr,
                           nullptr);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "PolicySecret(endorsement)");
    if (sha384) {
      TPML_DIGEST branches{};
      branches.count = 2;
      branches.digests[0].size = kPolicyASha384.size();
      std::memcpy(branches.digests[0].buffer, kPolicyASha384.data(), kPolicyASha384.size());
      branches.digests[1].size = kPolicyCSha384.size();
      std::memcpy(branches.digests[1].buffer, kPolicyCSha384.data(), kPolicyCSha384.size());
      rc = Esys_PolicyOR(esys, session.get(), ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &branches);
      if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "PolicyOR(PolicyA, PolicyC)");
    }
    return absl::OkStatus();
  }

  absl::Status LoadEk(const std::vector<TPM2_HANDLE>& persistent_handles) {
    const TPM2B_PUBLIC tmpl = EkTemplate(ek_type);
    TPM2_HANDLE persistent = ek_type == TpmEkType::kRsa2048   ? kRsaEkPersistent
                             : ek_type == TpmEkType::kEccP256 ? kEccP256EkPersistent
                                                              : kEccP384EkPersistent;
    // A provisioned EK avoids regenerating it (an RSA primary takes seconds on real TPMs). It is
    // used only if it was made from the standard template; otherwise the EK is recreated.
    if (Contains(persistent_handles, persistent)) {
      ESYS_TR handle = ESYS_TR_NONE;
      TSS2_RC rc = Esys_TR_FromTPMPublic(esys, persistent, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                                         &handle);
      if (rc == TSS2_RC_SUCCESS) {
        TPM2B_PUBLIC* raw_pub = nullptr;
        rc = Esys_ReadPublic(esys, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &raw_pub,
                             nullptr, nullptr);
        EsysPtr<TPM2B_PUBLIC> pub(raw_pub);
        if (rc == TSS2_RC_SUCCESS && MatchesTemplate(pub->publicArea, tmpl)) {
          ek = handle;
          ek_persistent = true;
          ek_public_area = pub->publicArea;
          ASSIGN_OR_RETURN(ek_public, MarshalPublic(*pub));
          return absl::OkStatus();
        }
        Esys_TR_Close(esys, &handle);
      }
    }
    TPM2B_SENSITIVE_CREATE sensitive{};
    TPM2B_DATA outside_info{};
    TPML_PCR_SELECTION creation_pcrs{};
    TPM2B_PUBLIC* raw_pub = nullptr;
    TSS2_RC rc = Esys_CreatePrimary(esys, ESYS_TR_RH_ENDORSEMENT, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                                    ESYS_TR_NONE, &sensitive, &tmpl, &outside_info, &creation_pcrs,
                                    &ek, &raw_pub, nullptr, nullptr, nullptr);
    EsysPtr<TPM2B_PUBLIC> pub(raw_pub);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "CreatePrimary(EK)");
    ek_public_area = pub->publicArea;
    ASSIGN_OR_RETURN(ek_public, MarshalPublic(*pub));
    return absl::OkStatus();
  }

  // The AK is a primary in the endorsement hierarchy: libtpms reports real resetCount and
  // restartCount only in quotes by endorsement-hierarchy keys, and the broker checks they never
  // go backwards. ECDSA P-256 first (fast to derive), RSA-2048 for TPMs without P-256.
  absl::Status CreateAk() {
    TPM2B_SENSITIVE_CREATE sensitive{};
    TPM2B_DATA outside_info{};
    TPML_PCR_SELECTION creation_pcrs{};
    TSS2_RC rc = TSS2_RC_SUCCESS;
    EsysPtr<TPM2B_PUBLIC> pub;
    for (bool ecc : {true, false}) {
      const TPM2B_PUBLIC tmpl = AkTemplate(ecc);
      TPM2B_PUBLIC* raw_pub = nullptr;
      rc = Esys_CreatePrimary(esys, ESYS_TR_RH_ENDORSEMENT, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                              ESYS_TR_NONE, &sensitive, &tmpl, &outside_info, &creation_pcrs, &ak,
                              &raw_pub, nullptr, nullptr, nullptr);
      pub.reset(raw_pub);
      if (rc == TSS2_RC_SUCCESS) break;
    }
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "CreatePrimary(AK)");
    ASSIGN_OR_RETURN(ak_public, MarshalPublic(*pub));
    TPM2B_NAME* raw_name = nullptr;
    rc = Esys_TR_GetName(esys, ak, &raw_name);
    EsysPtr<TPM2B_NAME> name(raw_name);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "TR_GetName(AK)");
    ak_name = Bytes(name->name, name->size);
    return absl::OkStatus();
  }

  // Reads the sha256-bank PCRs `indices` (ascending), at most eight per PCR_Read.
  absl::StatusOr<std::vector<std::string>> ReadPcrs(const std::vector<uint32_t>& indices) {
    std::vector<std::string> values;
    for (size_t start = 0; start < indices.size(); start += kPcrReadBatch) {
      size_t count = std::min(kPcrReadBatch, indices.size() - start);
      ASSIGN_OR_RETURN(TPML_PCR_SELECTION sel, PcrSelection(indices.data() + start, count));
      uint32_t update_counter = 0;
      TPML_PCR_SELECTION* raw_sel_out = nullptr;
      TPML_DIGEST* raw_digests = nullptr;
      TSS2_RC rc = Esys_PCR_Read(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, &sel,
                                 &update_counter, &raw_sel_out, &raw_digests);
      EsysPtr<TPML_PCR_SELECTION> sel_out(raw_sel_out);
      EsysPtr<TPML_DIGEST> digests(raw_digests);
      if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "PCR_Read");
      // A TPM without an active sha256 bank returns an empty selection instead of failing.
      if (sel_out->count != 1 || sel_out->pcrSelections[0].hash != TPM2_ALG_SHA256 ||
          std::memcmp(sel_out->pcrSelections[0].pcrSelect, sel.pcrSelections[0].pcrSelect, 3) !=
              0 ||
          digests->count != count) {
        return absl::FailedPreconditionError(
            "TPM did not return the requested sha256 PCRs (is the sha256 bank active?)");
      }
      for (uint32_t i = 0; i < digests->count; ++i) {
        if (digests->digests[i].size != 32) {
          return absl::InternalError("TPM returned a sha256 PCR value that is not 32 bytes");
        }
        values.push_back(Bytes(digests->digests[i].buffer, digests->digests[i].size));
      }
    }
    return values;
  }
};

TpmAgentAttestor::TpmAgentAttestor(std::unique_ptr<State> state) : state_(std::move(state)) {}
TpmAgentAttestor::~TpmAgentAttestor() = default;

absl::StatusOr<std::unique_ptr<TpmAgentAttestor>> TpmAgentAttestor::Create(
    const std::string& tcti) {
  auto state = std::make_unique<State>();
  TSS2_RC rc = Tss2_TctiLdr_Initialize(tcti.c_str(), &state->tcti);
  if (rc != TSS2_RC_SUCCESS) {
    state->tcti = nullptr;
    return absl::UnavailableError(
        absl::StrFormat("TPM: cannot open TCTI '%s': 0x%x %s", tcti, rc, Tss2_RC_Decode(rc)));
  }
  rc = Esys_Initialize(&state->esys, state->tcti, nullptr);
  if (rc != TSS2_RC_SUCCESS) {
    state->esys = nullptr;
    return TpmError(rc, "Esys_Initialize");
  }
  rc = Esys_Startup(state->esys, TPM2_SU_CLEAR);
  if (rc != TSS2_RC_SUCCESS && rc != TPM2_RC_INITIALIZE) return TpmError(rc, "Startup(CLEAR)");

  ASSIGN_OR_RETURN(std::vector<TPM2_HANDLE> nv_indices,
                   ListHandles(state->esys, kRsaEkCertIndex & 0xffff0000u, 0x100));
  ASSIGN_OR_RETURN(std::vector<TPM2_HANDLE> persistent,
                   ListHandles(state->esys, 0x81010000u, 0x100));
  std::optional<TPM2_HANDLE> cert_index;
  if (Contains(nv_indices, kRsaEkCertIndex)) {
    state->ek_type = TpmEkType::kRsa2048;
    cert_index = kRsaEkCertIndex;
  } else if (Contains(nv_indices, kEccP256EkCertIndex)) {
    state->ek_type = TpmEkType::kEccP256;
    cert_index = kEccP256EkCertIndex;
  } else if (Contains(nv_indices, kEccP384EkCertIndex)) {
    state->ek_type = TpmEkType::kEccP384;
    cert_index = kEccP384EkCertIndex;
  } else {
    // No certificate at all: the broker can only admit this TPM by EK hash allowlist, and every
    // TPM 2.0 supports the RSA EK.
    state->ek_type = TpmEkType::kRsa2048;
  }
  if (cert_index.has_value()) {
    ASSIGN_OR_RETURN(state->ek_certificate, ReadNvIndex(state->esys, *cert_index));
    TrimToDerElement(state->ek_certificate);
  }
  RETURN_IF_ERROR(state->LoadEk(persistent));
  RETURN_IF_ERROR(state->CreateAk());
  return std::unique_ptr<TpmAgentAttestor>(new TpmAgentAttestor(std::move(state)));
}

TpmEkType TpmAgentAttestor::ek_type() const { return state_->ek_type; }

absl::StatusOr<std::string> TpmAgentAttestor::EkHashHex() const {
  ASSIGN_OR_RETURN(crypto::PublicKey key, PublicKeyFromTpm(state_->ek_public_area));
  return crypto::HexEncode(crypto::Sha256(key.SpkiDer()));
}

absl::StatusOr<std::string> TpmAgentAttestor::Payload(std::string_view csr_spki_der) {
  if (csr_spki_der.empty()) {
    return absl::InvalidArgumentError("CSR SubjectPublicKeyInfo is empty");
  }
  mandate::node::v1::TpmAttestationPayload payload;
  payload.set_ek_certificate(state_->ek_certificate);
  payload.set_ek_public(state_->ek_public);
  payload.set_ak_public(state_->ak_public);
  std::string out;
  if (!payload.SerializeToString(&out)) {
    return absl::InternalError("serializing TpmAttestationPayload failed");
  }
  state_->csr_spki_der = std::string(csr_spki_der);
  return out;
}

absl::StatusOr<std::string> TpmAgentAttestor::AnswerChallenge(std::string_view challenge_bytes) {
  if (!state_->csr_spki_der.has_value()) {
    return absl::FailedPreconditionError("TPM challenge received before the payload was sent");
  }
  mandate::node::v1::TpmChallenge challenge;
  if (!challenge.ParseFromArray(challenge_bytes.data(), static_cast<int>(challenge_bytes.size()))) {
    return absl::InvalidArgumentError("TPM challenge is not a valid TpmChallenge protobuf");
  }
  if (challenge.session_id().empty() ||
      challenge.session_id().size() > kTpmAgentMaxSessionIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TPM challenge session_id is %d bytes; expected 1 to %d",
                        challenge.session_id().size(), kTpmAgentMaxSessionIdBytes));
  }
  if (challenge.nonce().size() < kTpmAgentMinNonceBytes ||
      challenge.nonce().size() > kTpmAgentMaxNonceBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TPM challenge nonce is %d bytes; expected %d to %d",
                        challenge.nonce().size(), kTpmAgentMinNonceBytes, kTpmAgentMaxNonceBytes));
  }
  std::vector<uint32_t> pcr_indices(challenge.pcr_indices_sha256().begin(),
                                    challenge.pcr_indices_sha256().end());
  if (pcr_indices.size() > kTpmAgentMaxPcrIndex + 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TPM challenge asks for %d PCRs; at most %d exist", pcr_indices.size(),
                        kTpmAgentMaxPcrIndex + 1));
  }
  for (size_t i = 0; i < pcr_indices.size(); ++i) {
    if (pcr_indices[i] > kTpmAgentMaxPcrIndex) {
      return absl::InvalidArgumentError(absl::StrFormat("TPM challenge PCR index %d is above %d",
                                                        pcr_indices[i], kTpmAgentMaxPcrIndex));
    }
    if (i > 0 && pcr_indices[i] <= pcr_indices[i - 1]) {
      return absl::InvalidArgumentError(
          "TPM challenge PCR indices must be strictly ascending (no repeats)");
    }
  }
  TPM2B_ID_OBJECT credential_blob{};
  {
    const auto& in = challenge.credential_blob();
    size_t off = 0;
    if (in.empty() ||
        Tss2_MU_TPM2B_ID_OBJECT_Unmarshal(reinterpret_cast<const uint8_t*>(in.data()), in.size(),
                                          &off, &credential_blob) != TSS2_RC_SUCCESS ||
        off != in.size()) {
      return absl::InvalidArgumentError(
          "TPM challenge credential_blob is not exactly one marshalled TPM2B_ID_OBJECT");
    }
  }
  TPM2B_ENCRYPTED_SECRET encrypted_secret{};
  {
    const auto& in = challenge.encrypted_secret();
    size_t off = 0;
    if (in.empty() ||
        Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal(reinterpret_cast<const uint8_t*>(in.data()),
                                                 in.size(), &off,
                                                 &encrypted_secret) != TSS2_RC_SUCCESS ||
        off != in.size()) {
      return absl::InvalidArgumentError(
          "TPM challenge encrypted_secret is not exactly one marshalled TPM2B_ENCRYPTED_SECRET");
    }
  }

  ESYS_CONTEXT* esys = state_->esys;
  mandate::node::v1::TpmChallengeResponse response;
  response.set_session_id(challenge.session_id());

  // 1. Recover the secret: only the TPM holding the EK can, and only for a credential bound to
  //    this AK's name.
  {
    ScopedHandle session(esys);
    RETURN_IF_ERROR(state_->StartEkPolicySession(session));
    TPM2B_DIGEST* raw_secret = nullptr;
    TSS2_RC rc =
        Esys_ActivateCredential(esys, state_->ak, state_->ek, ESYS_TR_PASSWORD, session.get(),
                                ESYS_TR_NONE, &credential_blob, &encrypted_secret, &raw_secret);
    EsysPtr<TPM2B_DIGEST> secret(raw_secret);
    if (rc != TSS2_RC_SUCCESS) {
      return absl::InvalidArgumentError(
          absl::StrFormat("TPM refused the challenge credential (not made for this EK and AK?): "
                          "ActivateCredential 0x%x %s",
                          rc, Tss2_RC_Decode(rc)));
    }
    std::string message = std::string(kActivationProofLabel) + challenge.session_id() +
                          challenge.nonce() + state_->ak_name;
    uint8_t mac[EVP_MAX_MD_SIZE];
    size_t mac_len = 0;
    const bool mac_ok = EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, secret->buffer,
                                  secret->size, reinterpret_cast<const uint8_t*>(message.data()),
                                  message.size(), mac, sizeof(mac), &mac_len) != nullptr;
    OPENSSL_cleanse(secret->buffer, sizeof(secret->buffer));
    if (!mac_ok) return absl::InternalError("HMAC-SHA256 of the activation proof failed");
    response.set_activation_proof(Bytes(mac, mac_len));
  }

  // 2. Quote the PCRs with qualifying data binding the broker's nonce and the agent's node key.
  const std::string qualifying =
      crypto::Sha256(absl::StrCat(challenge.nonce(), *state_->csr_spki_der));
  TPM2B_DATA qualifying_data{};
  qualifying_data.size = static_cast<uint16_t>(qualifying.size());
  std::memcpy(qualifying_data.buffer, qualifying.data(), qualifying.size());
  ASSIGN_OR_RETURN(TPML_PCR_SELECTION selection,
                   PcrSelection(pcr_indices.data(), pcr_indices.size()));
  TPMT_SIG_SCHEME scheme{};
  scheme.scheme = TPM2_ALG_NULL;  // the AK's own scheme

  for (int attempt = 1;; ++attempt) {
    TPM2B_ATTEST* raw_quoted = nullptr;
    TPMT_SIGNATURE* raw_signature = nullptr;
    TSS2_RC rc = Esys_Quote(esys, state_->ak, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                            &qualifying_data, &scheme, &selection, &raw_quoted, &raw_signature);
    EsysPtr<TPM2B_ATTEST> quoted(raw_quoted);
    EsysPtr<TPMT_SIGNATURE> signature(raw_signature);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "Quote");
    ASSIGN_OR_RETURN(std::vector<std::string> pcr_values, state_->ReadPcrs(pcr_indices));

    // A PCR extended between Quote and PCR_Read would make the broker refuse; check and retry.
    TPMS_ATTEST attest{};
    size_t off = 0;
    rc = Tss2_MU_TPMS_ATTEST_Unmarshal(quoted->attestationData, quoted->size, &off, &attest);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "unmarshalling the quote");
    const std::string digest = crypto::Sha256(absl::StrJoin(pcr_values, ""));
    const TPM2B_DIGEST& quoted_digest = attest.attested.quote.pcrDigest;
    if (Bytes(quoted_digest.buffer, quoted_digest.size) != digest) {
      if (attempt < kQuoteAttempts) continue;
      return absl::UnavailableError("PCRs kept changing between TPM Quote and PCR_Read");
    }

    std::vector<uint8_t> buf(std::max(sizeof(TPM2B_ATTEST), sizeof(TPMT_SIGNATURE)));
    off = 0;
    rc = Tss2_MU_TPM2B_ATTEST_Marshal(quoted.get(), buf.data(), buf.size(), &off);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "marshalling TPM2B_ATTEST");
    response.set_quote(Bytes(buf.data(), off));
    off = 0;
    rc = Tss2_MU_TPMT_SIGNATURE_Marshal(signature.get(), buf.data(), buf.size(), &off);
    if (rc != TSS2_RC_SUCCESS) return TpmError(rc, "marshalling TPMT_SIGNATURE");
    response.set_quote_signature(Bytes(buf.data(), off));
    for (std::string& value : pcr_values) response.add_pcr_values_sha256(std::move(value));
    break;
  }

  std::string out;
  if (!response.SerializeToString(&out)) {
    return absl::InternalError("serializing TpmChallengeResponse failed");
  }
  return out;
}

}  // namespace mandate::attestors
