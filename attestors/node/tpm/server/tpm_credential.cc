#include "attestors/node/tpm/server/tpm_credential.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/param_build.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <tss2/tss2_mu.h>

#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "attestors/node/tpm/tcg_ek_template.h"
#include "broker/common/crypto/openssl_free.h"
#include "broker/common/util/status_macros.h"

namespace mandate::attestors::tpm {
namespace {

template <auto Fn>
using Deleter = crypto::OpenSslFree<Fn>;
using BnPtr = std::unique_ptr<BIGNUM, Deleter<BN_free>>;
using ParamBldPtr = std::unique_ptr<OSSL_PARAM_BLD, Deleter<OSSL_PARAM_BLD_free>>;
using ParamPtr = std::unique_ptr<OSSL_PARAM, Deleter<OSSL_PARAM_free>>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX_free>>;
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX_free>>;
using KdfPtr = std::unique_ptr<EVP_KDF, Deleter<EVP_KDF_free>>;
using KdfCtxPtr = std::unique_ptr<EVP_KDF_CTX, Deleter<EVP_KDF_CTX_free>>;
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, Deleter<EVP_CIPHER_CTX_free>>;
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, Deleter<ECDSA_SIG_free>>;

// This abseil's string_view is its own type; StrCat needs it spelled out.
absl::string_view Sv(std::string_view v) { return absl::string_view(v.data(), v.size()); }

std::string_view View(const uint8_t* data, size_t size) {
  return std::string_view(reinterpret_cast<const char*>(data), size);
}

absl::Status OpenSslError(std::string_view what) {
  return absl::InternalError(absl::StrCat(Sv(what), ": ", crypto::OpenSslErrors()));
}

// Only the hashes a TPM object or KDF here may use; anything else is refused by the callers.
const EVP_MD* DigestFor(TPMI_ALG_HASH alg) {
  switch (alg) {
    case TPM2_ALG_SHA256:
      return EVP_sha256();
    case TPM2_ALG_SHA384:
      return EVP_sha384();
    case TPM2_ALG_SHA512:
      return EVP_sha512();
    default:
      return nullptr;
  }
}

std::string Tpm2b(std::string_view data) {
  std::string out;
  out.push_back(static_cast<char>(data.size() >> 8));
  out.push_back(static_cast<char>(data.size() & 0xff));
  out.append(data);
  return out;
}

absl::StatusOr<std::string> BnBytes(const BIGNUM* bn, size_t len) {
  std::string out(len, '\0');
  if (BN_bn2binpad(bn, reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(len)) !=
      static_cast<int>(len)) {
    return absl::InternalError("big number does not fit its field");
  }
  return out;
}

absl::StatusOr<std::string> GetBnParam(EVP_PKEY* key, const char* name, size_t len) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(key, name, &raw) != 1) {
    return OpenSslError(absl::StrCat("reading key parameter ", name));
  }
  BnPtr bn(raw);
  return BnBytes(bn.get(), len);
}

template <typename T>
absl::Status CopyInto(std::string_view bytes, T& tpm2b) {
  if (bytes.size() > sizeof(tpm2b.buffer)) {
    return absl::InternalError("value does not fit its TPM2B");
  }
  tpm2b.size = static_cast<UINT16>(bytes.size());
  std::memcpy(tpm2b.buffer, bytes.data(), bytes.size());
  return absl::OkStatus();
}

absl::StatusOr<std::string> Hmac(TPMI_ALG_HASH alg, std::string_view key, std::string_view data) {
  const EVP_MD* md = DigestFor(alg);
  if (md == nullptr) return absl::InternalError("unsupported HMAC hash");
  unsigned char mac[EVP_MAX_MD_SIZE];
  size_t mac_len = 0;
  if (EVP_Q_mac(nullptr, "HMAC", nullptr, EVP_MD_get0_name(md), nullptr, key.data(), key.size(),
                reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, sizeof mac,
                &mac_len) == nullptr) {
    return OpenSslError("HMAC");
  }
  return std::string(reinterpret_cast<char*>(mac), mac_len);
}

}  // namespace

absl::StatusOr<TPMT_PUBLIC> UnmarshalPublic(std::string_view tpm2b_public, std::string_view what) {
  TPM2B_PUBLIC pub{};
  size_t offset = 0;
  if (tpm2b_public.size() > sizeof(TPM2B_PUBLIC) ||
      Tss2_MU_TPM2B_PUBLIC_Unmarshal(reinterpret_cast<const uint8_t*>(tpm2b_public.data()),
                                     tpm2b_public.size(), &offset, &pub) != TSS2_RC_SUCCESS) {
    return absl::PermissionDeniedError(absl::StrCat(Sv(what), " is not a TPM2B_PUBLIC"));
  }
  if (offset != tpm2b_public.size()) {
    return absl::PermissionDeniedError(absl::StrCat(Sv(what), " has trailing bytes"));
  }
  // libtss2-mu accepts an outer size smaller than the structure; insist it is exact, so one
  // public area has exactly one accepted encoding.
  const auto* bytes = reinterpret_cast<const uint8_t*>(tpm2b_public.data());
  size_t declared = static_cast<size_t>(bytes[0]) << 8 | bytes[1];
  if (declared == 0 || declared + 2 != tpm2b_public.size()) {
    return absl::PermissionDeniedError(
        absl::StrCat(Sv(what), " size field disagrees with its contents"));
  }
  return pub.publicArea;
}

absl::StatusOr<crypto::PublicKey> PublicKeyFromTpm(const TPMT_PUBLIC& area) {
  ParamBldPtr bld(OSSL_PARAM_BLD_new());
  if (!bld) return OpenSslError("OSSL_PARAM_BLD_new");
  const char* type = nullptr;
  BnPtr n, e;
  std::string point;
  if (area.type == TPM2_ALG_RSA) {
    type = "RSA";
    if (area.unique.rsa.size == 0) return absl::PermissionDeniedError("RSA key has no modulus");
    n.reset(BN_bin2bn(area.unique.rsa.buffer, area.unique.rsa.size, nullptr));
    e.reset(BN_new());
    UINT32 exponent = area.parameters.rsaDetail.exponent;
    if (!n || !e || BN_set_word(e.get(), exponent == 0 ? 65537 : exponent) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) != 1) {
      return OpenSslError("building RSA key");
    }
  } else if (area.type == TPM2_ALG_ECC) {
    type = "EC";
    const char* group = nullptr;
    size_t coordinate = 0;
    switch (area.parameters.eccDetail.curveID) {
      case TPM2_ECC_NIST_P256:
        group = "P-256";
        coordinate = 32;
        break;
      case TPM2_ECC_NIST_P384:
        group = "P-384";
        coordinate = 48;
        break;
      default:
        return absl::PermissionDeniedError(absl::StrFormat(
            "ECC curve 0x%04x not supported (P-256 or P-384)", area.parameters.eccDetail.curveID));
    }
    if (area.unique.ecc.x.size != coordinate || area.unique.ecc.y.size != coordinate) {
      return absl::PermissionDeniedError("ECC point coordinates have the wrong size");
    }
    point.push_back('\x04');
    point.append(View(area.unique.ecc.x.buffer, coordinate));
    point.append(View(area.unique.ecc.y.buffer, coordinate));
    if (OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(),
                                         point.size()) != 1) {
      return OpenSslError("building EC key");
    }
  } else {
    return absl::PermissionDeniedError(
        absl::StrFormat("key type 0x%04x not supported (RSA or ECC)", area.type));
  }
  ParamPtr params(OSSL_PARAM_BLD_to_param(bld.get()));
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* raw = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) != 1) {
    crypto::OpenSslErrors();  // clear the queue: an invalid point is the input's fault
    return absl::PermissionDeniedError("public key in the TPM structure is invalid");
  }
  crypto::EvpPkeyPtr key(raw);
  return crypto::PublicKey::FromEvp(key.get());
}

absl::StatusOr<TPMT_PUBLIC> EkPublicAreaFromKey(const crypto::PublicKey& key) {
  EVP_PKEY* evp = key.evp();
  switch (key.type()) {
    case crypto::KeyType::kRsa: {
      if (EVP_PKEY_get_bits(evp) != 2048) {
        return absl::PermissionDeniedError(absl::StrCat(
            "EK key type not supported: RSA-", EVP_PKEY_get_bits(evp), " (RSA-2048 expected)"));
      }
      BIGNUM* raw_e = nullptr;
      if (EVP_PKEY_get_bn_param(evp, OSSL_PKEY_PARAM_RSA_E, &raw_e) != 1) {
        return OpenSslError("reading RSA exponent");
      }
      BnPtr e(raw_e);
      if (!BN_is_word(e.get(), 65537)) {
        return absl::PermissionDeniedError("EK key type not supported: RSA exponent is not 65537");
      }
      TPMT_PUBLIC p = TcgEkPublicArea(TcgEkTemplate::kRsa2048L1);
      ASSIGN_OR_RETURN(std::string modulus, GetBnParam(evp, OSSL_PKEY_PARAM_RSA_N, 256));
      RETURN_IF_ERROR(CopyInto(modulus, p.unique.rsa));
      return p;
    }
    case crypto::KeyType::kEcP256:
    case crypto::KeyType::kEcP384: {
      bool p384 = key.type() == crypto::KeyType::kEcP384;
      size_t coordinate = p384 ? 48 : 32;
      TPMT_PUBLIC p = TcgEkPublicArea(p384 ? TcgEkTemplate::kEccP384H3 : TcgEkTemplate::kEccP256L2);
      ASSIGN_OR_RETURN(std::string x, GetBnParam(evp, OSSL_PKEY_PARAM_EC_PUB_X, coordinate));
      ASSIGN_OR_RETURN(std::string y, GetBnParam(evp, OSSL_PKEY_PARAM_EC_PUB_Y, coordinate));
      RETURN_IF_ERROR(CopyInto(x, p.unique.ecc.x));
      RETURN_IF_ERROR(CopyInto(y, p.unique.ecc.y));
      return p;
    }
    default:
      return absl::PermissionDeniedError(
          "EK key type not supported (RSA-2048, ECC P-256 or ECC P-384 expected)");
  }
}

absl::StatusOr<crypto::PublicKey> CheckAttestationKey(const TPMT_PUBLIC& ak) {
  const TPMA_OBJECT attributes = ak.objectAttributes;
  struct Required {
    TPMA_OBJECT bit;
    const char* reason;
  };
  for (const Required& r : {Required{TPMA_OBJECT_FIXEDTPM, "AK not fixedTPM"},
                            Required{TPMA_OBJECT_FIXEDPARENT, "AK not fixedParent"},
                            Required{TPMA_OBJECT_SENSITIVEDATAORIGIN,
                                     "AK not sensitiveDataOrigin (not generated by the TPM)"},
                            Required{TPMA_OBJECT_RESTRICTED, "AK not restricted"},
                            Required{TPMA_OBJECT_SIGN_ENCRYPT, "AK not a signing key"}}) {
    if ((attributes & r.bit) == 0) return absl::PermissionDeniedError(r.reason);
  }
  if ((attributes & TPMA_OBJECT_DECRYPT) != 0) {
    return absl::PermissionDeniedError("AK can decrypt");
  }
  if (ak.nameAlg != TPM2_ALG_SHA256) {
    return absl::PermissionDeniedError(
        absl::StrFormat("AK name algorithm 0x%04x is not SHA-256", ak.nameAlg));
  }
  if (ak.type == TPM2_ALG_RSA) {
    const TPMS_RSA_PARMS& rsa = ak.parameters.rsaDetail;
    if (rsa.symmetric.algorithm != TPM2_ALG_NULL) {
      return absl::PermissionDeniedError("AK has a symmetric algorithm");
    }
    if (rsa.scheme.scheme != TPM2_ALG_RSASSA ||
        rsa.scheme.details.rsassa.hashAlg != TPM2_ALG_SHA256) {
      return absl::PermissionDeniedError("AK scheme is not RSASSA-SHA256");
    }
    if (rsa.keyBits != 2048 && rsa.keyBits != 3072 && rsa.keyBits != 4096) {
      return absl::PermissionDeniedError(
          absl::StrCat("AK RSA size ", rsa.keyBits, " not supported (2048, 3072 or 4096)"));
    }
    if (ak.unique.rsa.size != rsa.keyBits / 8) {
      return absl::PermissionDeniedError("AK modulus size differs from its keyBits");
    }
  } else if (ak.type == TPM2_ALG_ECC) {
    const TPMS_ECC_PARMS& ecc = ak.parameters.eccDetail;
    if (ecc.symmetric.algorithm != TPM2_ALG_NULL) {
      return absl::PermissionDeniedError("AK has a symmetric algorithm");
    }
    if (ecc.scheme.scheme != TPM2_ALG_ECDSA ||
        ecc.scheme.details.ecdsa.hashAlg != TPM2_ALG_SHA256) {
      return absl::PermissionDeniedError("AK scheme is not ECDSA-SHA256");
    }
    if (ecc.curveID != TPM2_ECC_NIST_P256 && ecc.curveID != TPM2_ECC_NIST_P384) {
      return absl::PermissionDeniedError("AK curve is not P-256 or P-384");
    }
    if (ecc.kdf.scheme != TPM2_ALG_NULL) {
      return absl::PermissionDeniedError("AK has a KDF scheme");
    }
  } else {
    return absl::PermissionDeniedError(
        absl::StrFormat("AK type 0x%04x not supported (RSA or ECC)", ak.type));
  }
  auto key = PublicKeyFromTpm(ak);
  if (!key.ok()) {
    return absl::PermissionDeniedError(absl::StrCat("AK public key: ", key.status().message()));
  }
  return key;
}

absl::StatusOr<std::string> TpmName(const TPMT_PUBLIC& area) {
  const EVP_MD* md = DigestFor(area.nameAlg);
  if (md == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrFormat("name algorithm 0x%04x not supported", area.nameAlg));
  }
  std::string marshalled(sizeof(TPMT_PUBLIC), '\0');
  size_t offset = 0;
  if (Tss2_MU_TPMT_PUBLIC_Marshal(&area, reinterpret_cast<uint8_t*>(marshalled.data()),
                                  marshalled.size(), &offset) != TSS2_RC_SUCCESS) {
    return absl::PermissionDeniedError("public area cannot be marshalled");
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_Digest(marshalled.data(), offset, digest, &digest_len, md, nullptr) != 1) {
    return OpenSslError("name digest");
  }
  std::string name;
  name.push_back(static_cast<char>(area.nameAlg >> 8));
  name.push_back(static_cast<char>(area.nameAlg & 0xff));
  name.append(reinterpret_cast<char*>(digest), digest_len);
  return name;
}

absl::StatusOr<std::string> Kdfa(TPMI_ALG_HASH hash_alg, std::string_view key,
                                 std::string_view label, std::string_view context_u,
                                 std::string_view context_v, size_t bits) {
  const EVP_MD* md = DigestFor(hash_alg);
  if (md == nullptr || bits == 0 || bits % 8 != 0) {
    return absl::InternalError("KDFa: unsupported hash or length");
  }
  std::string context = absl::StrCat(Sv(context_u), Sv(context_v));
  std::string out(bits / 8, '\0');
  KdfPtr kdf(EVP_KDF_fetch(nullptr, "KBKDF", nullptr));
  if (!kdf) return OpenSslError("KBKDF unavailable");
  KdfCtxPtr ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) return OpenSslError("EVP_KDF_CTX_new");
  // SP800-108 counter mode: K(i) = HMAC(key, [i]32 || label || 0x00 || context || [L]32).
  // KBKDF takes the label as SALT and inserts the 0x00 separator itself.
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_MODE, const_cast<char*>("COUNTER"), 0),
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_MAC, const_cast<char*>("HMAC"), 0),
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
                                       const_cast<char*>(EVP_MD_get0_name(md)), 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<char*>(key.data()),
                                        key.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_SALT, const_cast<char*>(label.data()),
                                        label.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, context.data(), context.size()),
      OSSL_PARAM_construct_end()};
  if (EVP_KDF_derive(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), out.size(), params) !=
      1) {
    return OpenSslError("KDFa");
  }
  return out;
}

absl::StatusOr<std::string> Kdfe(TPMI_ALG_HASH hash_alg, std::string_view z, std::string_view label,
                                 std::string_view party_u, std::string_view party_v, size_t bits) {
  const EVP_MD* md = DigestFor(hash_alg);
  if (md == nullptr || bits == 0 || bits % 8 != 0) {
    return absl::InternalError("KDFe: unsupported hash or length");
  }
  // K(i) = H([i]32 || Z || label || 0x00 || partyU || partyV): SSKDF's "other info" is
  // everything after Z, including the NUL that ends the label.
  std::string info = absl::StrCat(Sv(label), absl::string_view("\0", 1), Sv(party_u), Sv(party_v));
  std::string out(bits / 8, '\0');
  KdfPtr kdf(EVP_KDF_fetch(nullptr, "SSKDF", nullptr));
  if (!kdf) return OpenSslError("SSKDF unavailable");
  KdfCtxPtr ctx(EVP_KDF_CTX_new(kdf.get()));
  if (!ctx) return OpenSslError("EVP_KDF_CTX_new");
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST,
                                       const_cast<char*>(EVP_MD_get0_name(md)), 0),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, const_cast<char*>(z.data()), z.size()),
      OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, info.data(), info.size()),
      OSSL_PARAM_construct_end()};
  if (EVP_KDF_derive(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), out.size(), params) !=
      1) {
    return OpenSslError("KDFe");
  }
  return out;
}

absl::StatusOr<MadeCredential> MakeCredential(const TPMT_PUBLIC& ek, std::string_view ak_name,
                                              std::string_view secret) {
  const EVP_MD* md = DigestFor(ek.nameAlg);
  if (md == nullptr) return absl::InvalidArgumentError("EK name algorithm not supported");
  if (secret.empty() || secret.size() > sizeof(TPMU_HA)) {
    return absl::InvalidArgumentError("credential secret must be 1 to 64 bytes");
  }
  if (ak_name.size() < 2 || ak_name.size() > sizeof(TPMU_NAME)) {
    return absl::InvalidArgumentError("AK name has an invalid size");
  }
  const TPMT_SYM_DEF_OBJECT& sym = ek.parameters.asymDetail.symmetric;
  if (sym.algorithm != TPM2_ALG_AES || sym.mode.aes != TPM2_ALG_CFB ||
      (sym.keyBits.aes != 128 && sym.keyBits.aes != 256)) {
    return absl::InvalidArgumentError("EK symmetric algorithm must be AES-128/256-CFB");
  }
  const size_t hash_len = static_cast<size_t>(EVP_MD_get_size(md));
  ASSIGN_OR_RETURN(crypto::PublicKey ek_key, PublicKeyFromTpm(ek));

  std::string seed;
  TPM2B_ENCRYPTED_SECRET encrypted{};
  if (ek.type == TPM2_ALG_RSA) {
    ASSIGN_OR_RETURN(seed, crypto::RandomBytes(hash_len));
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new(ek_key.evp(), nullptr));
    // OAEP label "IDENTITY\0": the TPM's label includes the terminating NUL (Part 1 §B.10.3).
    // set0 takes ownership of the label on success only.
    unsigned char* label = static_cast<unsigned char*>(OPENSSL_memdup("IDENTITY", 9));
    if (!ctx || label == nullptr || EVP_PKEY_encrypt_init(ctx.get()) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_oaep_md(ctx.get(), md) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), md) != 1) {
      OPENSSL_free(label);
      return OpenSslError("RSA-OAEP setup");
    }
    if (EVP_PKEY_CTX_set0_rsa_oaep_label(ctx.get(), label, 9) != 1) {
      OPENSSL_free(label);
      return OpenSslError("RSA-OAEP label");
    }
    size_t out_len = sizeof encrypted.secret;
    if (EVP_PKEY_encrypt(ctx.get(), encrypted.secret, &out_len,
                         reinterpret_cast<const unsigned char*>(seed.data()), seed.size()) != 1) {
      return OpenSslError("RSA-OAEP encrypt");
    }
    encrypted.size = static_cast<UINT16>(out_len);
  } else if (ek.type == TPM2_ALG_ECC) {
    bool p384 = ek.parameters.eccDetail.curveID == TPM2_ECC_NIST_P384;
    size_t coordinate = p384 ? 48 : 32;
    EVP_PKEY* raw_eph = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", p384 ? "P-384" : "P-256");
    if (raw_eph == nullptr) return OpenSslError("ephemeral EC key");
    crypto::EvpPkeyPtr ephemeral(raw_eph);
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new(ephemeral.get(), nullptr));
    std::string z(coordinate, '\0');
    size_t z_len = z.size();
    if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
        EVP_PKEY_derive_set_peer(ctx.get(), ek_key.evp()) != 1 ||
        EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(z.data()), &z_len) != 1 ||
        z_len != coordinate) {
      return OpenSslError("ECDH with the EK");
    }
    ASSIGN_OR_RETURN(std::string eph_x,
                     GetBnParam(ephemeral.get(), OSSL_PKEY_PARAM_EC_PUB_X, coordinate));
    ASSIGN_OR_RETURN(std::string eph_y,
                     GetBnParam(ephemeral.get(), OSSL_PKEY_PARAM_EC_PUB_Y, coordinate));
    ASSIGN_OR_RETURN(seed, Kdfe(ek.nameAlg, z, "IDENTITY", eph_x,
                                View(ek.unique.ecc.x.buffer, ek.unique.ecc.x.size), hash_len * 8));
    OPENSSL_cleanse(z.data(), z.size());
    TPMS_ECC_POINT point{};
    RETURN_IF_ERROR(CopyInto(eph_x, point.x));
    RETURN_IF_ERROR(CopyInto(eph_y, point.y));
    size_t offset = 0;
    if (Tss2_MU_TPMS_ECC_POINT_Marshal(&point, encrypted.secret, sizeof encrypted.secret,
                                       &offset) != TSS2_RC_SUCCESS) {
      return absl::InternalError("marshalling the ephemeral point");
    }
    encrypted.size = static_cast<UINT16>(offset);
  } else {
    return absl::InvalidArgumentError("EK must be RSA or ECC");
  }

  ASSIGN_OR_RETURN(std::string sym_key,
                   Kdfa(ek.nameAlg, seed, "STORAGE", ak_name, "", sym.keyBits.aes));
  ASSIGN_OR_RETURN(std::string hmac_key, Kdfa(ek.nameAlg, seed, "INTEGRITY", "", "", hash_len * 8));
  OPENSSL_cleanse(seed.data(), seed.size());

  std::string plain = Tpm2b(secret);
  std::string enc_identity(plain.size(), '\0');
  CipherCtxPtr cctx(EVP_CIPHER_CTX_new());
  const unsigned char iv[16] = {0};
  int len1 = 0, len2 = 0;
  if (!cctx ||
      EVP_EncryptInit_ex(
          cctx.get(), sym.keyBits.aes == 128 ? EVP_aes_128_cfb128() : EVP_aes_256_cfb128(), nullptr,
          reinterpret_cast<const unsigned char*>(sym_key.data()), iv) != 1 ||
      EVP_EncryptUpdate(cctx.get(), reinterpret_cast<unsigned char*>(enc_identity.data()), &len1,
                        reinterpret_cast<const unsigned char*>(plain.data()),
                        static_cast<int>(plain.size())) != 1 ||
      EVP_EncryptFinal_ex(cctx.get(), reinterpret_cast<unsigned char*>(enc_identity.data()) + len1,
                          &len2) != 1 ||
      static_cast<size_t>(len1 + len2) != plain.size()) {
    return OpenSslError("AES-CFB");
  }
  OPENSSL_cleanse(plain.data(), plain.size());
  OPENSSL_cleanse(sym_key.data(), sym_key.size());
  ASSIGN_OR_RETURN(std::string outer_hmac,
                   Hmac(ek.nameAlg, hmac_key, absl::StrCat(enc_identity, Sv(ak_name))));
  OPENSSL_cleanse(hmac_key.data(), hmac_key.size());

  TPM2B_ID_OBJECT id_object{};
  const std::string id_bytes = absl::StrCat(Tpm2b(outer_hmac), enc_identity);
  if (id_bytes.size() > sizeof id_object.credential) {
    return absl::InternalError("credential does not fit TPM2B_ID_OBJECT");
  }
  id_object.size = static_cast<UINT16>(id_bytes.size());
  std::memcpy(id_object.credential, id_bytes.data(), id_bytes.size());
  MadeCredential out;
  out.credential_blob.resize(sizeof(TPM2B_ID_OBJECT));
  size_t offset = 0;
  if (Tss2_MU_TPM2B_ID_OBJECT_Marshal(&id_object,
                                      reinterpret_cast<uint8_t*>(out.credential_blob.data()),
                                      out.credential_blob.size(), &offset) != TSS2_RC_SUCCESS) {
    return absl::InternalError("marshalling TPM2B_ID_OBJECT");
  }
  out.credential_blob.resize(offset);
  out.encrypted_secret.resize(sizeof(TPM2B_ENCRYPTED_SECRET));
  offset = 0;
  if (Tss2_MU_TPM2B_ENCRYPTED_SECRET_Marshal(
          &encrypted, reinterpret_cast<uint8_t*>(out.encrypted_secret.data()),
          out.encrypted_secret.size(), &offset) != TSS2_RC_SUCCESS) {
    return absl::InternalError("marshalling TPM2B_ENCRYPTED_SECRET");
  }
  out.encrypted_secret.resize(offset);
  return out;
}

absl::StatusOr<std::string> ActivationProof(std::string_view secret, std::string_view session_id,
                                            std::string_view nonce, std::string_view ak_name) {
  return Hmac(TPM2_ALG_SHA256, secret,
              absl::StrCat(Sv(kActivationProofLabel), Sv(session_id), Sv(nonce), Sv(ak_name)));
}

absl::StatusOr<TPML_PCR_SELECTION> Sha256PcrSelection(const std::vector<uint32_t>& pcr_indices) {
  TPML_PCR_SELECTION selection{};
  selection.count = 1;
  selection.pcrSelections[0].hash = TPM2_ALG_SHA256;
  selection.pcrSelections[0].sizeofSelect = 3;
  for (uint32_t index : pcr_indices) {
    if (index > 23) {
      return absl::InvalidArgumentError(absl::StrCat("PCR index ", index, " is not in 0..23"));
    }
    selection.pcrSelections[0].pcrSelect[index / 8] |= static_cast<BYTE>(1u << (index % 8));
  }
  return selection;
}

absl::StatusOr<VerifiedQuote> VerifyQuote(const TPMT_PUBLIC& ak, std::string_view quote,
                                          std::string_view signature,
                                          std::string_view qualifying_data,
                                          const std::vector<uint32_t>& pcr_indices,
                                          const std::vector<std::string>& pcr_values) {
  TPM2B_ATTEST attest_blob{};
  size_t offset = 0;
  if (quote.size() > sizeof(TPM2B_ATTEST) ||
      Tss2_MU_TPM2B_ATTEST_Unmarshal(reinterpret_cast<const uint8_t*>(quote.data()), quote.size(),
                                     &offset, &attest_blob) != TSS2_RC_SUCCESS ||
      offset != quote.size()) {
    return absl::PermissionDeniedError("quote is not a TPM2B_ATTEST");
  }
  TPMT_SIGNATURE sig{};
  offset = 0;
  if (signature.size() > sizeof(TPMT_SIGNATURE) ||
      Tss2_MU_TPMT_SIGNATURE_Unmarshal(reinterpret_cast<const uint8_t*>(signature.data()),
                                       signature.size(), &offset, &sig) != TSS2_RC_SUCCESS ||
      offset != signature.size()) {
    return absl::PermissionDeniedError("quote signature is not a TPMT_SIGNATURE");
  }

  // 1. The AK's signature over the attest bytes, with the AK's own (checked) scheme.
  ASSIGN_OR_RETURN(crypto::PublicKey ak_key, CheckAttestationKey(ak));
  std::string_view attest_bytes = View(attest_blob.attestationData, attest_blob.size);
  std::string der_signature;
  if (ak.type == TPM2_ALG_RSA) {
    if (sig.sigAlg != TPM2_ALG_RSASSA || sig.signature.rsassa.hash != TPM2_ALG_SHA256) {
      return absl::PermissionDeniedError("quote signature algorithm does not match the AK");
    }
    MdCtxPtr mctx(EVP_MD_CTX_new());
    EVP_PKEY_CTX* pctx = nullptr;  // owned by mctx
    if (!mctx ||
        EVP_DigestVerifyInit(mctx.get(), &pctx, EVP_sha256(), nullptr, ak_key.evp()) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) != 1) {
      return OpenSslError("RSA verify setup");
    }
    if (EVP_DigestVerify(mctx.get(), sig.signature.rsassa.sig.buffer, sig.signature.rsassa.sig.size,
                         reinterpret_cast<const unsigned char*>(attest_bytes.data()),
                         attest_bytes.size()) != 1) {
      crypto::OpenSslErrors();
      return absl::PermissionDeniedError("quote signature does not verify");
    }
  } else {
    if (sig.sigAlg != TPM2_ALG_ECDSA || sig.signature.ecdsa.hash != TPM2_ALG_SHA256) {
      return absl::PermissionDeniedError("quote signature algorithm does not match the AK");
    }
    EcdsaSigPtr ecdsa(ECDSA_SIG_new());
    BnPtr r(BN_bin2bn(sig.signature.ecdsa.signatureR.buffer, sig.signature.ecdsa.signatureR.size,
                      nullptr));
    BnPtr s(BN_bin2bn(sig.signature.ecdsa.signatureS.buffer, sig.signature.ecdsa.signatureS.size,
                      nullptr));
    if (!ecdsa || !r || !s || ECDSA_SIG_set0(ecdsa.get(), r.get(), s.get()) != 1) {
      return OpenSslError("ECDSA signature");
    }
    r.release();  // now owned by `ecdsa`
    s.release();
    unsigned char* der = nullptr;
    int der_len = i2d_ECDSA_SIG(ecdsa.get(), &der);
    if (der_len <= 0) return OpenSslError("encoding ECDSA signature");
    der_signature.assign(reinterpret_cast<char*>(der), static_cast<size_t>(der_len));
    OPENSSL_free(der);
    if (!ak_key.VerifyDer(attest_bytes, der_signature, "SHA256")) {
      crypto::OpenSslErrors();
      return absl::PermissionDeniedError("quote signature does not verify");
    }
  }

  // 2. What the TPM attested.
  TPMS_ATTEST attest{};
  offset = 0;
  if (Tss2_MU_TPMS_ATTEST_Unmarshal(attest_blob.attestationData, attest_blob.size, &offset,
                                    &attest) != TSS2_RC_SUCCESS ||
      offset != attest_blob.size) {
    return absl::PermissionDeniedError("quote attestation structure is malformed");
  }
  // A restricted key refuses to sign outside data starting with TPM_GENERATED_VALUE, so the
  // magic proves the TPM produced this structure.
  if (attest.magic != TPM2_GENERATED_VALUE) {
    return absl::PermissionDeniedError("quote not generated by a TPM (bad magic)");
  }
  if (attest.type != TPM2_ST_ATTEST_QUOTE) {
    return absl::PermissionDeniedError("attestation is not a quote");
  }
  if (attest.extraData.size != qualifying_data.size() ||
      !crypto::ConstantTimeEquals(View(attest.extraData.buffer, attest.extraData.size),
                                  qualifying_data)) {
    return absl::PermissionDeniedError("quote not over this nonce and key");
  }
  // The AK must be a primary key of the endorsement hierarchy: only there does the TPM report
  // its true resetCount/restartCount (for other hierarchies they are obfuscated), so otherwise
  // the counter check below would mean nothing. The qualified name of a primary object is
  // nameAlg || H(hierarchy handle || Name).
  {
    ASSIGN_OR_RETURN(std::string ak_name, TpmName(ak));
    static constexpr char kEndorsementHandle[] = {'\x40', '\x00', '\x00', '\x0b'};
    std::string expected =
        std::string("\x00\x0b", 2) + crypto::Sha256(std::string(kEndorsementHandle, 4) + ak_name);
    if (attest.qualifiedSigner.size != expected.size() ||
        !crypto::ConstantTimeEquals(View(attest.qualifiedSigner.name, attest.qualifiedSigner.size),
                                    expected)) {
      return absl::PermissionDeniedError(
          "AK is not a primary key of the endorsement hierarchy (its quote counters would not "
          "be meaningful)");
    }
  }

  // 3. PCR selection: compare as bitmaps so a TPM echoing a longer sizeofSelect still matches;
  //    an inactive bank comes back as an empty selection and is refused here.
  ASSIGN_OR_RETURN(TPML_PCR_SELECTION wanted, Sha256PcrSelection(pcr_indices));
  const TPML_PCR_SELECTION& got = attest.attested.quote.pcrSelect;
  bool same_selection = got.count == 1 && got.pcrSelections[0].hash == TPM2_ALG_SHA256 &&
                        got.pcrSelections[0].sizeofSelect <= TPM2_PCR_SELECT_MAX;
  for (size_t i = 0; same_selection && i < TPM2_PCR_SELECT_MAX; ++i) {
    BYTE got_byte = i < got.pcrSelections[0].sizeofSelect ? got.pcrSelections[0].pcrSelect[i] : 0;
    BYTE want_byte = i < 3 ? wanted.pcrSelections[0].pcrSelect[i] : 0;
    same_selection = got_byte == want_byte;
  }
  if (!same_selection) return absl::PermissionDeniedError("quote PCR selection differs");

  // 4. The PCR values the agent read must be the ones the TPM digested (in index order).
  if (pcr_values.size() != pcr_indices.size()) {
    return absl::PermissionDeniedError("PCR values do not match the quote (wrong count)");
  }
  MdCtxPtr hctx(EVP_MD_CTX_new());
  if (!hctx || EVP_DigestInit_ex(hctx.get(), EVP_sha256(), nullptr) != 1) {
    return OpenSslError("SHA-256");
  }
  for (const std::string& value : pcr_values) {
    if (value.size() != 32) {
      return absl::PermissionDeniedError("PCR values do not match the quote (not 32 bytes)");
    }
    if (EVP_DigestUpdate(hctx.get(), value.data(), value.size()) != 1) {
      return OpenSslError("SHA-256");
    }
  }
  unsigned char digest[32];
  unsigned int digest_len = 0;
  if (EVP_DigestFinal_ex(hctx.get(), digest, &digest_len) != 1) return OpenSslError("SHA-256");
  const TPM2B_DIGEST& pcr_digest = attest.attested.quote.pcrDigest;
  if (pcr_digest.size != 32 || CRYPTO_memcmp(pcr_digest.buffer, digest, 32) != 0) {
    return absl::PermissionDeniedError("PCR values do not match the quote");
  }

  // 5. clockInfo.safe is not required: it only says the TPM's Clock may have gone backwards
  //    after a disorderly shutdown, and Mandate orders quotes by resetCount/restartCount (kept in
  //    NV), never by Clock. Refusing unsafe clocks would lock nodes out after every power loss.
  VerifiedQuote out;
  out.reset_count = attest.clockInfo.resetCount;
  out.restart_count = attest.clockInfo.restartCount;
  out.clock = attest.clockInfo.clock;
  return out;
}

}  // namespace mandate::attestors::tpm
