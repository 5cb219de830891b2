// Tests of the broker half of TPM node attestation. The agent is played in software: the test
// holds the EK's private key (so it can invert MakeCredential, i.e. do ActivateCredential) and an
// ECC P-256 "AK" private key (so it can sign TPMS_ATTEST structures like a TPM would).
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdlib.h>
#include <tss2/tss2_mu.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "attestors/node/tpm/server/tpm_credential.h"
#include "attestors/node/tpm/server/tpm_server_attestor.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/selector.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "mandate/node/v1/tpm.pb.h"

namespace mandate::attestors {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

template <auto Fn>
struct Deleter {
  template <typename T>
  void operator()(T* p) const {
    Fn(p);
  }
};
using PkeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX_free>>;
using X509Ptr = std::unique_ptr<X509, Deleter<X509_free>>;
using CipherCtxPtr = std::unique_ptr<EVP_CIPHER_CTX, Deleter<EVP_CIPHER_CTX_free>>;
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, Deleter<EVP_MD_CTX_free>>;
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, Deleter<ECDSA_SIG_free>>;

std::string Bytes(const uint8_t* p, size_t n) {
  return std::string(reinterpret_cast<const char*>(p), n);
}

PkeyPtr Generate(const char* type, const char* param) {
  if (std::strcmp(type, "RSA") == 0)
    return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{2048}));
  return PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", param));
}

crypto::PublicKey Pub(EVP_PKEY* key) {
  // Round-trip through SPKI so the PublicKey holds no private part.
  unsigned char* der = nullptr;
  int len = i2d_PUBKEY(key, &der);
  std::string spki(reinterpret_cast<char*>(der), len);
  OPENSSL_free(der);
  return *crypto::PublicKey::FromSpkiDer(spki);
}

std::string MarshalPublic(const TPMT_PUBLIC& area) {
  TPM2B_PUBLIC pub{};
  pub.publicArea = area;
  std::string out(sizeof(TPM2B_PUBLIC), '\0');
  size_t offset = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_PUBLIC_Marshal(&pub, reinterpret_cast<uint8_t*>(out.data()), out.size(),
                                         &offset),
            TSS2_RC_SUCCESS);
  out.resize(offset);
  return out;
}

std::string BnParam(EVP_PKEY* key, const char* name, size_t len) {
  BIGNUM* bn = nullptr;
  EXPECT_EQ(EVP_PKEY_get_bn_param(key, name, &bn), 1);
  std::string out(len, '\0');
  BN_bn2binpad(bn, reinterpret_cast<unsigned char*>(out.data()), len);
  BN_free(bn);
  return out;
}

// A TPM-like AK template (attributes 0x00050072, ECDSA-SHA256) for the P-256 key `key`.
TPMT_PUBLIC AkArea(EVP_PKEY* key) {
  TPMT_PUBLIC p{};
  p.type = TPM2_ALG_ECC;
  p.nameAlg = TPM2_ALG_SHA256;
  p.objectAttributes = TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN | TPMA_OBJECT_USERWITHAUTH |
                       TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_SIGN_ENCRYPT;
  p.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
  p.parameters.eccDetail.scheme.scheme = TPM2_ALG_ECDSA;
  p.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA256;
  p.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
  p.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  std::string x = BnParam(key, OSSL_PKEY_PARAM_EC_PUB_X, 32);
  std::string y = BnParam(key, OSSL_PKEY_PARAM_EC_PUB_Y, 32);
  p.unique.ecc.x.size = 32;
  std::memcpy(p.unique.ecc.x.buffer, x.data(), 32);
  p.unique.ecc.y.size = 32;
  std::memcpy(p.unique.ecc.y.buffer, y.data(), 32);
  return p;
}

std::string AesCfbDecrypt(std::string_view key, std::string_view in) {
  CipherCtxPtr ctx(EVP_CIPHER_CTX_new());
  const unsigned char iv[16] = {0};
  std::string out(in.size(), '\0');
  int l1 = 0, l2 = 0;
  EXPECT_EQ(
      EVP_DecryptInit_ex(ctx.get(), key.size() == 16 ? EVP_aes_128_cfb128() : EVP_aes_256_cfb128(),
                         nullptr, reinterpret_cast<const unsigned char*>(key.data()), iv),
      1);
  EXPECT_EQ(EVP_DecryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &l1,
                              reinterpret_cast<const unsigned char*>(in.data()), in.size()),
            1);
  EXPECT_EQ(EVP_DecryptFinal_ex(ctx.get(), reinterpret_cast<unsigned char*>(out.data()) + l1, &l2),
            1);
  return out;
}

std::string HmacOf(const EVP_MD* md, std::string_view key, std::string_view data) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  size_t len = 0;
  EVP_Q_mac(nullptr, "HMAC", nullptr, EVP_MD_get0_name(md), nullptr, key.data(), key.size(),
            reinterpret_cast<const unsigned char*>(data.data()), data.size(), mac, sizeof mac,
            &len);
  return std::string(reinterpret_cast<char*>(mac), len);
}

// TPM2_ActivateCredential in software: recovers the seed with the EK private key, checks the
// outer HMAC and decrypts the secret. Returns nullopt (with a test failure) on any mismatch.
std::optional<std::string> ActivateCredential(EVP_PKEY* ek_private, const TPMT_PUBLIC& ek_area,
                                              std::string_view ak_name,
                                              const TPM2B_ID_OBJECT& id_object,
                                              const TPM2B_ENCRYPTED_SECRET& encrypted,
                                              std::string* failure = nullptr) {
  auto fail = [failure](const char* why) {
    if (failure != nullptr) {
      *failure = why;
    } else {
      ADD_FAILURE() << why;
    }
  };
  const EVP_MD* md = ek_area.nameAlg == TPM2_ALG_SHA384 ? EVP_sha384() : EVP_sha256();
  const size_t hash_len = EVP_MD_get_size(md);
  std::string seed;
  if (ek_area.type == TPM2_ALG_RSA) {
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new(ek_private, nullptr));
    EXPECT_EQ(EVP_PKEY_decrypt_init(ctx.get()), 1);
    EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING);
    EVP_PKEY_CTX_set_rsa_oaep_md(ctx.get(), md);
    EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), md);
    EVP_PKEY_CTX_set0_rsa_oaep_label(ctx.get(), OPENSSL_memdup("IDENTITY", 9), 9);
    seed.resize(512);
    size_t len = seed.size();
    if (EVP_PKEY_decrypt(ctx.get(), reinterpret_cast<unsigned char*>(seed.data()), &len,
                         encrypted.secret, encrypted.size) != 1) {
      fail("OAEP decryption of the seed failed");
      return std::nullopt;
    }
    seed.resize(len);
  } else {
    TPMS_ECC_POINT point{};
    size_t offset = 0;
    EXPECT_EQ(Tss2_MU_TPMS_ECC_POINT_Unmarshal(encrypted.secret, encrypted.size, &offset, &point),
              TSS2_RC_SUCCESS);
    // A TPM reads TPM2B_ECC_PARAMETERs shorter than the curve (tpm2-tools' software
    // makecredential drops leading zero bytes of the ephemeral point, 1 time in 128 for P-256)
    // as big-endian numbers: padded to full size for the point, but as received (`point`) in
    // the KDF's party info.
    const uint16_t coordinate =
        ek_area.parameters.eccDetail.curveID == TPM2_ECC_NIST_P384 ? 48 : 32;
    auto padded = [coordinate](TPM2B_ECC_PARAMETER p) {
      if (p.size < coordinate) {
        const uint16_t shift = coordinate - p.size;
        std::memmove(p.buffer + shift, p.buffer, p.size);
        std::memset(p.buffer, 0, shift);
        p.size = coordinate;
      }
      return p;
    };
    TPMT_PUBLIC eph_area = ek_area;
    eph_area.unique.ecc.x = padded(point.x);
    eph_area.unique.ecc.y = padded(point.y);
    auto eph = attestors::tpm::PublicKeyFromTpm(eph_area);
    EXPECT_TRUE(eph.ok()) << eph.status();
    PkeyCtxPtr ctx(EVP_PKEY_CTX_new(ek_private, nullptr));
    std::string z(coordinate, '\0');
    size_t z_len = z.size();
    EXPECT_EQ(EVP_PKEY_derive_init(ctx.get()), 1);
    EXPECT_EQ(EVP_PKEY_derive_set_peer(ctx.get(), eph->evp()), 1);
    EXPECT_EQ(EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(z.data()), &z_len), 1);
    auto derived = attestors::tpm::Kdfe(
        ek_area.nameAlg, z, "IDENTITY", Bytes(point.x.buffer, point.x.size),
        Bytes(ek_area.unique.ecc.x.buffer, ek_area.unique.ecc.x.size), hash_len * 8);
    EXPECT_TRUE(derived.ok());
    seed = *derived;
  }
  auto sym_key = attestors::tpm::Kdfa(ek_area.nameAlg, seed, "STORAGE", ak_name, "",
                                      ek_area.parameters.asymDetail.symmetric.keyBits.aes);
  auto hmac_key = attestors::tpm::Kdfa(ek_area.nameAlg, seed, "INTEGRITY", "", "", hash_len * 8);
  EXPECT_TRUE(sym_key.ok() && hmac_key.ok());
  std::string blob = Bytes(id_object.credential, id_object.size);
  size_t hmac_len = (static_cast<uint8_t>(blob[0]) << 8) | static_cast<uint8_t>(blob[1]);
  if (hmac_len != hash_len || blob.size() < 2 + hmac_len + 2) {
    fail("credential blob has the wrong layout");
    return std::nullopt;
  }
  std::string outer_hmac = blob.substr(2, hmac_len);
  std::string enc_identity = blob.substr(2 + hmac_len);
  if (HmacOf(md, *hmac_key, enc_identity + std::string(ak_name)) != outer_hmac) {
    fail("outer HMAC does not verify");
    return std::nullopt;
  }
  std::string plain = AesCfbDecrypt(*sym_key, enc_identity);
  size_t secret_len = (static_cast<uint8_t>(plain[0]) << 8) | static_cast<uint8_t>(plain[1]);
  if (secret_len + 2 != plain.size()) {
    fail("decrypted identity has the wrong size");
    return std::nullopt;
  }
  return plain.substr(2);
}

std::optional<std::string> ActivateMade(EVP_PKEY* ek_private, const TPMT_PUBLIC& ek_area,
                                        std::string_view ak_name,
                                        const attestors::tpm::MadeCredential& made) {
  TPM2B_ID_OBJECT id_object{};
  TPM2B_ENCRYPTED_SECRET encrypted{};
  size_t offset = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_ID_OBJECT_Unmarshal(
                reinterpret_cast<const uint8_t*>(made.credential_blob.data()),
                made.credential_blob.size(), &offset, &id_object),
            TSS2_RC_SUCCESS);
  EXPECT_EQ(offset, made.credential_blob.size());
  offset = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal(
                reinterpret_cast<const uint8_t*>(made.encrypted_secret.data()),
                made.encrypted_secret.size(), &offset, &encrypted),
            TSS2_RC_SUCCESS);
  EXPECT_EQ(offset, made.encrypted_secret.size());
  return ActivateCredential(ek_private, ek_area, ak_name, id_object, encrypted);
}

// ---------------------------------------------------------------- certificates

struct CertSpec {
  const char* common_name = nullptr;  // nullptr: empty subject (as TCG EK certificates)
  bool ca = false;
  const char* manufacturer = nullptr;  // TPM manufacturer attribute in a directoryName SAN
  bool ek_eku = true;                  // tcg-kp-EKCertificate on non-CA certificates
};

X509Ptr MakeCert(EVP_PKEY* subject_key, X509* issuer, EVP_PKEY* issuer_key, const CertSpec& spec) {
  X509Ptr cert(X509_new());
  X509_set_version(cert.get(), 2);
  static long serial = 1;
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial++);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600L * 24 * 365);
  X509_NAME* subject = X509_get_subject_name(cert.get());
  if (spec.common_name != nullptr) {
    X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                               reinterpret_cast<const unsigned char*>(spec.common_name), -1, -1, 0);
  }
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : subject);
  X509_set_pubkey(cert.get(), subject_key);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
  auto add = [&](int nid, const char* value) {
    X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
    ASSERT_NE(ext, nullptr) << value;
    X509_add_ext(cert.get(), ext, -1);
    X509_EXTENSION_free(ext);
  };
  if (spec.ca) {
    add(NID_basic_constraints, "critical,CA:TRUE");
    add(NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    add(NID_basic_constraints, "critical,CA:FALSE");
    add(NID_key_usage, "critical,keyEncipherment");
    add(NID_ext_key_usage, spec.ek_eku ? "2.23.133.8.1" : "clientAuth");
  }
  add(NID_subject_key_identifier, "hash");
  if (issuer != nullptr) add(NID_authority_key_identifier, "keyid:always");
  if (spec.manufacturer != nullptr) {
    X509_NAME* dir = X509_NAME_new();
    ASN1_OBJECT* oid = OBJ_txt2obj("2.23.133.2.1", 1);
    X509_NAME_add_entry_by_OBJ(dir, oid, MBSTRING_UTF8,
                               reinterpret_cast<const unsigned char*>(spec.manufacturer), -1, -1,
                               0);
    ASN1_OBJECT_free(oid);
    GENERAL_NAME* name = GENERAL_NAME_new();
    name->type = GEN_DIRNAME;
    name->d.directoryName = dir;
    GENERAL_NAMES* names = sk_GENERAL_NAME_new_null();
    sk_GENERAL_NAME_push(names, name);
    // Critical, as TCG requires when the subject is empty.
    X509_add1_ext_i2d(cert.get(), NID_subject_alt_name, names, 1, X509V3_ADD_DEFAULT);
    GENERAL_NAMES_free(names);
  }
  EXPECT_GT(X509_sign(cert.get(), issuer_key ? issuer_key : subject_key, EVP_sha256()), 0);
  return cert;
}

crypto::Certificate ToCert(X509* x509) { return *crypto::Certificate::FromX509(x509); }

// ---------------------------------------------------------------- quotes

std::string Sha256(std::string_view data) { return crypto::Sha256(data); }

std::string PcrValue(uint32_t index) { return Sha256("pcr" + std::to_string(index)); }

// A TPM-like quote signed by `ak_key`; returns {marshalled TPM2B_ATTEST, marshalled
// TPMT_SIGNATURE}.
struct QuoteSpec {
  std::string extra_data;
  std::vector<uint32_t> pcrs;
  std::vector<std::string> pcr_values;
  uint32_t magic = TPM2_GENERATED_VALUE;
  TPM2_ST type = TPM2_ST_ATTEST_QUOTE;
  uint32_t reset_count = 3;
  uint32_t restart_count = 0;
  uint8_t safe = 1;
  bool corrupt_signature = false;
  bool owner_hierarchy = false;  // AK created under the owner hierarchy instead
};

std::pair<std::string, std::string> BuildQuote(EVP_PKEY* ak_key, std::string_view ak_name,
                                               const QuoteSpec& spec) {
  TPMS_ATTEST attest{};
  attest.magic = spec.magic;
  attest.type = spec.type;
  // As a TPM reports a primary key of the endorsement hierarchy: nameAlg || H(TPM_RH_ENDORSEMENT
  // || Name), unless the spec asks for another hierarchy.
  std::string hierarchy = spec.owner_hierarchy ? std::string("\x40\x00\x00\x01", 4)
                                               : std::string("\x40\x00\x00\x0b", 4);
  std::string qualified = std::string("\x00\x0b", 2) + Sha256(hierarchy + std::string(ak_name));
  attest.qualifiedSigner.size = qualified.size();
  std::memcpy(attest.qualifiedSigner.name, qualified.data(), qualified.size());
  attest.extraData.size = spec.extra_data.size();
  std::memcpy(attest.extraData.buffer, spec.extra_data.data(), spec.extra_data.size());
  attest.clockInfo.clock = 123456;
  attest.clockInfo.resetCount = spec.reset_count;
  attest.clockInfo.restartCount = spec.restart_count;
  attest.clockInfo.safe = spec.safe;
  attest.firmwareVersion = 0x2000000000001;
  if (spec.type == TPM2_ST_ATTEST_QUOTE) {
    auto selection = attestors::tpm::Sha256PcrSelection(spec.pcrs);
    EXPECT_TRUE(selection.ok());
    attest.attested.quote.pcrSelect = *selection;
    std::string concatenated;
    for (const std::string& v : spec.pcr_values) concatenated += v;
    std::string digest = Sha256(concatenated);
    attest.attested.quote.pcrDigest.size = 32;
    std::memcpy(attest.attested.quote.pcrDigest.buffer, digest.data(), 32);
  } else {
    attest.attested.certify.name.size = ak_name.size();
    std::memcpy(attest.attested.certify.name.name, ak_name.data(), ak_name.size());
  }
  TPM2B_ATTEST blob{};
  size_t offset = 0;
  EXPECT_EQ(Tss2_MU_TPMS_ATTEST_Marshal(&attest, blob.attestationData, sizeof blob.attestationData,
                                        &offset),
            TSS2_RC_SUCCESS);
  blob.size = offset;

  MdCtxPtr mctx(EVP_MD_CTX_new());
  EXPECT_EQ(EVP_DigestSignInit(mctx.get(), nullptr, EVP_sha256(), nullptr, ak_key), 1);
  std::string der(128, '\0');
  size_t der_len = der.size();
  EXPECT_EQ(EVP_DigestSign(mctx.get(), reinterpret_cast<unsigned char*>(der.data()), &der_len,
                           blob.attestationData, blob.size),
            1);
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  EcdsaSigPtr ecdsa(d2i_ECDSA_SIG(nullptr, &p, der_len));
  TPMT_SIGNATURE sig{};
  sig.sigAlg = TPM2_ALG_ECDSA;
  sig.signature.ecdsa.hash = TPM2_ALG_SHA256;
  sig.signature.ecdsa.signatureR.size = 32;
  BN_bn2binpad(ECDSA_SIG_get0_r(ecdsa.get()), sig.signature.ecdsa.signatureR.buffer, 32);
  sig.signature.ecdsa.signatureS.size = 32;
  BN_bn2binpad(ECDSA_SIG_get0_s(ecdsa.get()), sig.signature.ecdsa.signatureS.buffer, 32);
  if (spec.corrupt_signature) sig.signature.ecdsa.signatureS.buffer[31] ^= 0x01;

  std::string quote(sizeof(TPM2B_ATTEST), '\0');
  offset = 0;
  EXPECT_EQ(Tss2_MU_TPM2B_ATTEST_Marshal(&blob, reinterpret_cast<uint8_t*>(quote.data()),
                                         quote.size(), &offset),
            TSS2_RC_SUCCESS);
  quote.resize(offset);
  std::string signature(sizeof(TPMT_SIGNATURE), '\0');
  offset = 0;
  EXPECT_EQ(Tss2_MU_TPMT_SIGNATURE_Marshal(&sig, reinterpret_cast<uint8_t*>(signature.data()),
                                           signature.size(), &offset),
            TSS2_RC_SUCCESS);
  signature.resize(offset);
  return {quote, signature};
}

// ---------------------------------------------------------------- fixture

// How the software agent misbehaves.
struct AgentBehavior {
  std::optional<std::string> nonce_override = std::nullopt;
  std::optional<std::string> csr_override = std::nullopt;
  std::optional<std::vector<uint32_t>> quoted_pcrs = std::nullopt;
  bool corrupt_pcr_value = false;
  uint32_t magic = TPM2_GENERATED_VALUE;
  TPM2_ST type = TPM2_ST_ATTEST_QUOTE;
  bool corrupt_signature = false;
  uint32_t reset_count = 3;
  uint32_t restart_count = 0;
  uint8_t safe = 1;
  bool wrong_proof = false;
  bool owner_hierarchy = false;
  int64_t delay_seconds = 0;
  std::optional<std::string> replay_response = std::nullopt;  // sent instead of a fresh answer
};

class TpmServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ek_rsa_ = Generate("RSA", nullptr).release();
    other_rsa_ = Generate("RSA", nullptr).release();
    ak_key_ = Generate("EC", "P-256").release();
    root_key_ = Generate("EC", "P-256").release();
    other_root_key_ = Generate("EC", "P-256").release();
  }
  static void TearDownTestSuite() {
    for (EVP_PKEY* k : {ek_rsa_, other_rsa_, ak_key_, root_key_, other_root_key_}) EVP_PKEY_free(k);
  }

  void SetUp() override {
    char tmpl[] = "/tmp/tpm_server_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto store = store::SqliteStore::Open(dir_ + "/store.db");
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(*store);
    root_ = MakeCert(root_key_, nullptr, nullptr, {.common_name = "EK Root", .ca = true});
    ek_cert_ = MakeCert(ek_rsa_, root_.get(), root_key_, {.manufacturer = "id:00001014"});
    csr_spki_ = Pub(root_key_).SpkiDer();  // any key will do as "the agent's CSR key"
    ak_area_ = AkArea(ak_key_);
    ak_name_ = *attestors::tpm::TpmName(ak_area_);
    ek_area_ = *attestors::tpm::EkPublicAreaFromKey(Pub(ek_rsa_));
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  TpmServerOptions Options() {
    TpmServerOptions options;
    options.ek_ca_certificates.push_back(ToCert(root_.get()));
    return options;
  }

  std::string Payload(X509* ek_cert, const TPMT_PUBLIC& ek_area, const TPMT_PUBLIC& ak_area) {
    node::v1::TpmAttestationPayload payload;
    if (ek_cert != nullptr) payload.set_ek_certificate(ToCert(ek_cert).Der());
    payload.set_ek_public(MarshalPublic(ek_area));
    payload.set_ak_public(MarshalPublic(ak_area));
    return payload.SerializeAsString();
  }
  std::string GoodPayload() { return Payload(ek_cert_.get(), ek_area_, ak_area_); }

  // The software agent: activates the credential with the EK private key and quotes with the AK.
  ServerNodeAttestor::ChallengeFn Agent(AgentBehavior behavior, std::string* sent = nullptr) {
    return [this, behavior, sent](std::string_view wire) -> absl::StatusOr<std::string> {
      node::v1::TpmChallenge challenge;
      EXPECT_TRUE(challenge.ParseFromArray(wire.data(), wire.size()));
      EXPECT_EQ(challenge.session_id().size(), 16u);
      EXPECT_EQ(challenge.nonce().size(), 32u);
      clock_.Advance(behavior.delay_seconds);
      if (behavior.replay_response) return *behavior.replay_response;
      attestors::tpm::MadeCredential made{challenge.credential_blob(),
                                          challenge.encrypted_secret()};
      std::optional<std::string> secret = ActivateMade(ek_rsa_, ek_area_, ak_name_, made);
      if (!secret) return absl::InternalError("activation failed");
      node::v1::TpmChallengeResponse response;
      response.set_session_id(challenge.session_id());
      std::string proof = *attestors::tpm::ActivationProof(*secret, challenge.session_id(),
                                                           challenge.nonce(), ak_name_);
      if (behavior.wrong_proof) proof[0] ^= 1;
      response.set_activation_proof(proof);
      std::vector<uint32_t> requested(challenge.pcr_indices_sha256().begin(),
                                      challenge.pcr_indices_sha256().end());
      QuoteSpec spec;
      spec.pcrs = behavior.quoted_pcrs.value_or(requested);
      for (uint32_t i : spec.pcrs) spec.pcr_values.push_back(PcrValue(i));
      spec.extra_data = Sha256(behavior.nonce_override.value_or(challenge.nonce()) +
                               behavior.csr_override.value_or(csr_spki_));
      spec.magic = behavior.magic;
      spec.type = behavior.type;
      spec.corrupt_signature = behavior.corrupt_signature;
      spec.reset_count = behavior.reset_count;
      spec.restart_count = behavior.restart_count;
      spec.safe = behavior.safe;
      spec.owner_hierarchy = behavior.owner_hierarchy;
      auto [quote, signature] = BuildQuote(ak_key_, ak_name_, spec);
      response.set_quote(quote);
      response.set_quote_signature(signature);
      for (std::string value : spec.pcr_values) {
        if (behavior.corrupt_pcr_value && response.pcr_values_sha256_size() == 2) value[0] ^= 1;
        response.add_pcr_values_sha256(value);
      }
      std::string out = response.SerializeAsString();
      if (sent != nullptr) *sent = out;
      return out;
    };
  }

  absl::StatusOr<NodeAttestationResult> Attest(const TpmServerOptions& options,
                                               const std::string& payload,
                                               const AgentBehavior& behavior,
                                               std::string* sent = nullptr) {
    TpmServerAttestor attestor(options, *store_, clock_,
                               *spiffe::TrustDomain::Parse("example.org"));
    return attestor.Attest({payload, csr_spki_}, Agent(behavior, sent));
  }

  void ExpectRefused(const AgentBehavior& behavior, std::string_view reason) {
    auto result = Attest(Options(), GoodPayload(), behavior);
    ASSERT_FALSE(result.ok());
    EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(std::string(reason)));
  }

  static EVP_PKEY* ek_rsa_;
  static EVP_PKEY* other_rsa_;
  static EVP_PKEY* ak_key_;
  static EVP_PKEY* root_key_;
  static EVP_PKEY* other_root_key_;
  std::string dir_;
  std::unique_ptr<store::SqliteStore> store_;
  FakeClock clock_{static_cast<int64_t>(std::time(nullptr))};
  X509Ptr root_;
  X509Ptr ek_cert_;
  std::string csr_spki_;
  TPMT_PUBLIC ak_area_{};
  std::string ak_name_;
  TPMT_PUBLIC ek_area_{};
};
EVP_PKEY* TpmServerTest::ek_rsa_ = nullptr;
EVP_PKEY* TpmServerTest::other_rsa_ = nullptr;
EVP_PKEY* TpmServerTest::ak_key_ = nullptr;
EVP_PKEY* TpmServerTest::root_key_ = nullptr;
EVP_PKEY* TpmServerTest::other_root_key_ = nullptr;

// ---------------------------------------------------------------- MakeCredential

class MakeCredentialCrossCheck : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tpm_makecred.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Runs `tpm2 makecredential -T none` for the PEM public key of `ek` and returns the two
  // structures from its output file (magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT,
  // TPM2B_ENCRYPTED_SECRET).
  bool Tpm2ToolsMakeCredential(EVP_PKEY* ek, const char* algorithm, std::string_view ak_name,
                               std::string_view secret, TPM2B_ID_OBJECT* id_object,
                               TPM2B_ENCRYPTED_SECRET* encrypted) {
    std::ofstream(dir_ + "/ek.pem") << Pub(ek).ToPem();
    std::ofstream(dir_ + "/secret.bin", std::ios::binary) << secret;
    std::string command = "tpm2 makecredential -T none -G " + std::string(algorithm) + " -u " +
                          dir_ + "/ek.pem -s " + dir_ + "/secret.bin -n " +
                          crypto::HexEncode(ak_name) + " -o " + dir_ + "/out.bin 2>/dev/null";
    if (std::system(command.c_str()) != 0) {
      ADD_FAILURE() << "tpm2 makecredential failed: " << command;
      return false;
    }
    auto out = crypto::ReadFile(dir_ + "/out.bin");
    EXPECT_TRUE(out.ok());
    const uint8_t* data = reinterpret_cast<const uint8_t*>(out->data());
    EXPECT_EQ(out->substr(0, 8), std::string("\xba\xdc\xc0\xde\x00\x00\x00\x01", 8));
    size_t offset = 8;
    EXPECT_EQ(Tss2_MU_TPM2B_ID_OBJECT_Unmarshal(data, out->size(), &offset, id_object),
              TSS2_RC_SUCCESS);
    EXPECT_EQ(Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal(data, out->size(), &offset, encrypted),
              TSS2_RC_SUCCESS);
    EXPECT_EQ(offset, out->size());
    return true;
  }

  // Both our blob and tpm2-tools' blob must activate to the secret with the EK private key:
  // same seed encryption (OAEP label / ECDH+KDFe), same KDFa, same AES-CFB and outer HMAC.
  void CrossCheck(EVP_PKEY* ek, const char* algorithm) {
    if (std::system("command -v tpm2 >/dev/null 2>&1") != 0) GTEST_SKIP() << "tpm2-tools missing";
    auto ek_area = attestors::tpm::EkPublicAreaFromKey(Pub(ek));
    ASSERT_TRUE(ek_area.ok()) << ek_area.status();
    std::string ak_name = std::string("\x00\x0b", 2) + Sha256("some AK");
    std::string secret = Sha256("the secret");

    auto ours = attestors::tpm::MakeCredential(*ek_area, ak_name, secret);
    ASSERT_TRUE(ours.ok()) << ours.status();
    EXPECT_EQ(ActivateMade(ek, *ek_area, ak_name, *ours), secret);

    TPM2B_ID_OBJECT id_object{};
    TPM2B_ENCRYPTED_SECRET encrypted{};
    ASSERT_TRUE(Tpm2ToolsMakeCredential(ek, algorithm, ak_name, secret, &id_object, &encrypted));
    EXPECT_EQ(ActivateCredential(ek, *ek_area, ak_name, id_object, encrypted), secret);
    // Same sizes as tpm2-tools for both structures. For ECC the encrypted secret is the
    // ephemeral point, whose coordinates an encoder may write without leading zero bytes (a
    // 1-in-128 chance per P-256 point), so its size may differ by up to one byte per coordinate.
    EXPECT_EQ(ours->credential_blob.size(), 2u + id_object.size);
    if (std::string(algorithm) == "rsa") {
      EXPECT_EQ(ours->encrypted_secret.size(), 2u + encrypted.size);
    } else {
      const long difference =
          static_cast<long>(ours->encrypted_secret.size()) - static_cast<long>(2u + encrypted.size);
      EXPECT_LE(std::labs(difference), 2)
          << "ours " << ours->encrypted_secret.size() << ", tpm2-tools " << 2u + encrypted.size;
    }

    // Bound to the AK name: another name fails the outer HMAC.
    std::string other_name = std::string("\x00\x0b", 2) + Sha256("another AK");
    std::string failure;
    EXPECT_EQ(ActivateCredential(ek, *ek_area, other_name, id_object, encrypted, &failure),
              std::nullopt);
    EXPECT_EQ(failure, "outer HMAC does not verify");
  }

  std::string dir_;
};

TEST_F(MakeCredentialCrossCheck, RsaEkMatchesTpm2ToolsSoftwareMakeCredential) {
  PkeyPtr ek = Generate("RSA", nullptr);
  CrossCheck(ek.get(), "rsa");
}

TEST_F(MakeCredentialCrossCheck, EccP256EkMatchesTpm2ToolsSoftwareMakeCredential) {
  PkeyPtr ek = Generate("EC", "P-256");
  CrossCheck(ek.get(), "ecc");
}

TEST(MakeCredential, EccP384EkUsesTemplateH3AndRoundTrips) {
  PkeyPtr ek = Generate("EC", "P-384");
  auto area = attestors::tpm::EkPublicAreaFromKey(Pub(ek.get()));
  ASSERT_TRUE(area.ok()) << area.status();
  EXPECT_EQ(area->nameAlg, TPM2_ALG_SHA384);
  EXPECT_EQ(area->parameters.eccDetail.symmetric.keyBits.aes, 256);
  EXPECT_EQ(area->objectAttributes, 0x000300f2u);
  std::string ak_name = std::string("\x00\x0b", 2) + Sha256("ak");
  auto made = attestors::tpm::MakeCredential(*area, ak_name, "0123456789abcdef0123456789abcdef");
  ASSERT_TRUE(made.ok()) << made.status();
  EXPECT_EQ(ActivateMade(ek.get(), *area, ak_name, *made), "0123456789abcdef0123456789abcdef");
}

TEST(MakeCredential, RsaEkTemplateIsL1) {
  PkeyPtr ek = Generate("RSA", nullptr);
  auto area = attestors::tpm::EkPublicAreaFromKey(Pub(ek.get()));
  ASSERT_TRUE(area.ok());
  EXPECT_EQ(area->objectAttributes, 0x000300b2u);
  EXPECT_EQ(area->nameAlg, TPM2_ALG_SHA256);
  EXPECT_EQ(area->parameters.rsaDetail.symmetric.keyBits.aes, 128);
  EXPECT_EQ(area->unique.rsa.size, 256);
  // The rebuilt area gives back the same key.
  EXPECT_TRUE(attestors::tpm::PublicKeyFromTpm(*area)->Equals(Pub(ek.get())));
}

TEST(MakeCredential, RefusesUnsupportedEkKeys) {
  PkeyPtr ed = PkeyPtr(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  auto area = attestors::tpm::EkPublicAreaFromKey(Pub(ed.get()));
  EXPECT_THAT(std::string(area.status().message()), HasSubstr("EK key type not supported"));
  PkeyPtr rsa3072(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", size_t{3072}));
  area = attestors::tpm::EkPublicAreaFromKey(Pub(rsa3072.get()));
  EXPECT_THAT(std::string(area.status().message()), HasSubstr("RSA-3072"));
}

// ---------------------------------------------------------------- AK checks

class AkCheck : public ::testing::Test {
 protected:
  void SetUp() override { key_ = Generate("EC", "P-256"); }
  std::string Refusal(const TPMT_PUBLIC& area) {
    // Through the wire form, as the attestor sees it.
    auto unmarshalled = attestors::tpm::UnmarshalPublic(MarshalPublic(area), "AK public");
    if (!unmarshalled.ok()) return std::string(unmarshalled.status().message());
    auto checked = attestors::tpm::CheckAttestationKey(*unmarshalled);
    if (checked.ok()) return "";
    EXPECT_EQ(checked.status().code(), absl::StatusCode::kPermissionDenied);
    return std::string(checked.status().message());
  }
  PkeyPtr key_;
};

TEST_F(AkCheck, TpmStyleRestrictedSigningKeyPasses) {
  EXPECT_EQ(Refusal(AkArea(key_.get())), "");
  TPMT_PUBLIC rsa{};
  rsa.type = TPM2_ALG_RSA;
  rsa.nameAlg = TPM2_ALG_SHA256;
  rsa.objectAttributes = 0x00050072;
  rsa.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL;
  rsa.parameters.rsaDetail.scheme.scheme = TPM2_ALG_RSASSA;
  rsa.parameters.rsaDetail.scheme.details.rsassa.hashAlg = TPM2_ALG_SHA256;
  rsa.parameters.rsaDetail.keyBits = 2048;
  PkeyPtr rsa_key = Generate("RSA", nullptr);
  std::string n = BnParam(rsa_key.get(), OSSL_PKEY_PARAM_RSA_N, 256);
  rsa.unique.rsa.size = 256;
  std::memcpy(rsa.unique.rsa.buffer, n.data(), 256);
  EXPECT_EQ(Refusal(rsa), "");
  rsa.parameters.rsaDetail.keyBits = 1024;
  rsa.unique.rsa.size = 128;
  EXPECT_THAT(Refusal(rsa), HasSubstr("AK RSA size 1024 not supported"));
}

TEST_F(AkCheck, EachMissingOrForbiddenAttributeIsRefusedWithItsReason) {
  struct Case {
    TPMA_OBJECT clear;
    TPMA_OBJECT set;
    const char* reason;
  };
  for (const Case& c : {Case{TPMA_OBJECT_RESTRICTED, 0, "AK not restricted"},
                        Case{TPMA_OBJECT_FIXEDTPM, 0, "AK not fixedTPM"},
                        Case{TPMA_OBJECT_FIXEDPARENT, 0, "AK not fixedParent"},
                        Case{TPMA_OBJECT_SENSITIVEDATAORIGIN, 0, "AK not sensitiveDataOrigin"},
                        Case{TPMA_OBJECT_SIGN_ENCRYPT, 0, "AK not a signing key"},
                        Case{0, TPMA_OBJECT_DECRYPT, "AK can decrypt"}}) {
    TPMT_PUBLIC area = AkArea(key_.get());
    area.objectAttributes = (area.objectAttributes & ~c.clear) | c.set;
    EXPECT_THAT(Refusal(area), HasSubstr(c.reason)) << c.reason;
  }
}

TEST_F(AkCheck, NullSchemeIsRefused) {
  TPMT_PUBLIC area = AkArea(key_.get());
  area.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
  EXPECT_THAT(Refusal(area), HasSubstr("AK scheme is not ECDSA-SHA256"));
}

TEST_F(AkCheck, Sha1NameAlgIsRefused) {
  TPMT_PUBLIC area = AkArea(key_.get());
  area.nameAlg = TPM2_ALG_SHA1;
  EXPECT_THAT(Refusal(area), HasSubstr("AK name algorithm 0x0004 is not SHA-256"));
}

TEST_F(AkCheck, Sha1SignatureHashIsRefused) {
  TPMT_PUBLIC area = AkArea(key_.get());
  area.parameters.eccDetail.scheme.details.ecdsa.hashAlg = TPM2_ALG_SHA1;
  EXPECT_THAT(Refusal(area), HasSubstr("AK scheme is not ECDSA-SHA256"));
}

TEST_F(AkCheck, PointNotOnCurveIsRefused) {
  TPMT_PUBLIC area = AkArea(key_.get());
  area.unique.ecc.y.buffer[31] ^= 1;
  EXPECT_THAT(Refusal(area), HasSubstr("invalid"));
}

TEST_F(AkCheck, MalformedAndTrailingBytesAreRefused) {
  std::string wire = MarshalPublic(AkArea(key_.get()));
  EXPECT_THAT(
      std::string(attestors::tpm::UnmarshalPublic(wire + "x", "AK public").status().message()),
      HasSubstr("AK public has trailing bytes"));
  EXPECT_THAT(
      std::string(
          attestors::tpm::UnmarshalPublic(wire.substr(0, 20), "AK public").status().message()),
      HasSubstr("AK public is not a TPM2B_PUBLIC"));
}

TEST_F(AkCheck, NameIsNameAlgThenSha256OfMarshalledPublicArea) {
  TPMT_PUBLIC area = AkArea(key_.get());
  std::string wire = MarshalPublic(area);
  auto name = attestors::tpm::TpmName(area);
  ASSERT_TRUE(name.ok());
  // TPM2B_PUBLIC = BE16 size || TPMT_PUBLIC.
  EXPECT_EQ(*name, std::string("\x00\x0b", 2) + Sha256(wire.substr(2)));
}

// ---------------------------------------------------------------- full exchange

TEST_F(TpmServerTest, GoodExchangeIssuesEkHashIdAndSelectors) {
  auto result = Attest(Options(), GoodPayload(), {});
  ASSERT_TRUE(result.ok()) << result.status();
  std::string ek_hash = crypto::HexEncode(Sha256(Pub(ek_rsa_).SpkiDer()));
  EXPECT_EQ(result->node_spiffe_id, "spiffe://example.org/node/tpm/" + ek_hash);
  EXPECT_THAT(result->selectors, Contains("tpm:ek_hash:" + ek_hash));
  EXPECT_THAT(result->selectors,
              Contains("tpm:ek_ca:" + crypto::HexEncode(Sha256(ToCert(root_.get()).Der()))));
  EXPECT_THAT(result->selectors, Contains("tpm:manufacturer:id:00001014"));
  for (uint32_t i = 0; i < 8; ++i) {
    EXPECT_THAT(result->selectors, Contains("tpm:pcr:sha256:" + std::to_string(i) + ":" +
                                            crypto::HexEncode(PcrValue(i))));
  }
  EXPECT_EQ(result->selectors.size(), 3u + 8u);
  for (const std::string& text : result->selectors) {
    auto selector = spiffe::Selector::Parse(text);
    ASSERT_TRUE(selector.ok()) << text;
    EXPECT_TRUE(spiffe::ValidateSelector(*selector).ok()) << text;
  }
}

TEST_F(TpmServerTest, ConfiguredPcrSubsetIsQuotedAndExposed) {
  TpmServerOptions options = Options();
  options.pcr_indices = {7, 0};
  auto result = Attest(options, GoodPayload(), {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->selectors, Contains("tpm:pcr:sha256:0:" + crypto::HexEncode(PcrValue(0))));
  EXPECT_THAT(result->selectors, Contains("tpm:pcr:sha256:7:" + crypto::HexEncode(PcrValue(7))));
  EXPECT_THAT(result->selectors, Not(Contains(StartsWith("tpm:pcr:sha256:1:"))));
}

TEST_F(TpmServerTest, RefusesWrongActivationAnswer) {
  ExpectRefused({.wrong_proof = true}, "wrong activation answer");
}

TEST_F(TpmServerTest, RefusesQuoteOverAnotherNonce) {
  ExpectRefused({.nonce_override = Sha256("old nonce")}, "quote not over this nonce and key");
}

TEST_F(TpmServerTest, RefusesQuoteBoundToAnotherCsrKey) {
  ExpectRefused({.csr_override = "another key"}, "quote not over this nonce and key");
}

TEST_F(TpmServerTest, RefusesDifferentPcrSelection) {
  ExpectRefused({.quoted_pcrs = std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6}},
                "quote PCR selection differs");
}

TEST_F(TpmServerTest, RefusesPcrValuesThatDoNotMatchTheDigest) {
  ExpectRefused({.corrupt_pcr_value = true}, "PCR values do not match the quote");
}

TEST_F(TpmServerTest, RefusesBadMagic) {
  ExpectRefused({.magic = 0xff544348}, "quote not generated by a TPM");
}

TEST_F(TpmServerTest, RefusesAttestationThatIsNotAQuote) {
  ExpectRefused({.type = TPM2_ST_ATTEST_CERTIFY}, "attestation is not a quote");
}

TEST_F(TpmServerTest, RefusesBadSignature) {
  ExpectRefused({.corrupt_signature = true}, "quote signature does not verify");
}

TEST_F(TpmServerTest, RefusesAkOutsideTheEndorsementHierarchy) {
  // Its quotes would carry obfuscated boot counters, so the monotonic check would mean nothing.
  ExpectRefused({.owner_hierarchy = true}, "endorsement hierarchy");
}

TEST_F(TpmServerTest, AcceptsUnsafeClockBecauseOnlyCountersOrderQuotes) {
  auto result = Attest(Options(), GoodPayload(), {.safe = 0});
  EXPECT_TRUE(result.ok()) << result.status();
}

TEST_F(TpmServerTest, RefusesCountersGoingBackwardsAndAcceptsEqualOrNewer) {
  ASSERT_TRUE(Attest(Options(), GoodPayload(), {.reset_count = 5, .restart_count = 2}).ok());
  ASSERT_TRUE(Attest(Options(), GoodPayload(), {.reset_count = 5, .restart_count = 2}).ok());
  ExpectRefused({.reset_count = 5, .restart_count = 1}, "counters going backwards");
  ExpectRefused({.reset_count = 4, .restart_count = 9}, "counters going backwards");
  EXPECT_TRUE(Attest(Options(), GoodPayload(), {.reset_count = 6, .restart_count = 0}).ok());
}

TEST_F(TpmServerTest, RefusesReplayedResponseFromEarlierSession) {
  std::string recorded;
  ASSERT_TRUE(Attest(Options(), GoodPayload(), {}, &recorded).ok());
  ExpectRefused({.replay_response = recorded}, "TPM challenge response is for another session");
}

TEST_F(TpmServerTest, RefusesAnswerAfterSessionTtl) {
  ExpectRefused({.delay_seconds = 61}, "TPM challenge answered too late");
  EXPECT_TRUE(Attest(Options(), GoodPayload(), {.delay_seconds = 60}).ok());
}

TEST_F(TpmServerTest, RefusesMalformedPayloadAndResponse) {
  auto result = Attest(Options(), "\xff\xff\xff", {});
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("payload malformed"));
  ExpectRefused({.replay_response = "\x0a\xff"}, "TPM challenge response malformed");
}

TEST_F(TpmServerTest, RefusesBadAkThroughAttest) {
  TPMT_PUBLIC ak = ak_area_;
  ak.objectAttributes &= ~TPMA_OBJECT_RESTRICTED;
  auto result = Attest(Options(), Payload(ek_cert_.get(), ek_area_, ak), {});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("AK not restricted"));
}

TEST_F(TpmServerTest, ChallengeStreamErrorIsPassedThrough) {
  TpmServerAttestor attestor(Options(), *store_, clock_,
                             *spiffe::TrustDomain::Parse("example.org"));
  auto result = attestor.Attest({GoodPayload(), csr_spki_}, [](std::string_view) {
    return absl::StatusOr<std::string>(absl::UnavailableError("stream closed"));
  });
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(TpmServerTest, InvalidOptionsAreReportedAndAttestRefusesToRun) {
  TpmServerOptions options = Options();
  options.pcr_indices = {24};
  EXPECT_FALSE(ValidateTpmServerOptions(options).ok());
  EXPECT_EQ(Attest(options, GoodPayload(), {}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  options = Options();
  options.ek_hash_allowlist = {"abc"};
  EXPECT_FALSE(ValidateTpmServerOptions(options).ok());
  EXPECT_TRUE(ValidateTpmServerOptions(Options()).ok());
}

// ---------------------------------------------------------------- EK trust

TEST_F(TpmServerTest, RefusesEkCertificateFromAnotherCa) {
  X509Ptr other_root =
      MakeCert(other_root_key_, nullptr, nullptr, {.common_name = "EK Root", .ca = true});
  X509Ptr cert = MakeCert(ek_rsa_, other_root.get(), other_root_key_, {});
  auto result = Attest(Options(), Payload(cert.get(), ek_area_, ak_area_), {});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()), StartsWith("untrusted EK CA"));
}

TEST_F(TpmServerTest, RefusesEkPublicThatDiffersFromCertificateKey) {
  TPMT_PUBLIC other = *attestors::tpm::EkPublicAreaFromKey(Pub(other_rsa_));
  auto result = Attest(Options(), Payload(ek_cert_.get(), other, ak_area_), {});
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("EK public key does not match its certificate"));
}

TEST_F(TpmServerTest, AcceptsChainThroughConfiguredIntermediateAndNamesIt) {
  PkeyPtr intermediate_key = Generate("EC", "P-256");
  X509Ptr intermediate = MakeCert(intermediate_key.get(), root_.get(), root_key_,
                                  {.common_name = "EK Intermediate", .ca = true});
  X509Ptr cert = MakeCert(ek_rsa_, intermediate.get(), intermediate_key.get(),
                          {.manufacturer = "id:0000abcd"});
  TpmServerOptions options = Options();
  options.ek_ca_certificates.push_back(ToCert(intermediate.get()));
  auto result = Attest(options, Payload(cert.get(), ek_area_, ak_area_), {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->selectors,
              Contains("tpm:ek_ca:" + crypto::HexEncode(Sha256(ToCert(intermediate.get()).Der()))));
  // Canonical TCG form: uppercase hex.
  EXPECT_THAT(result->selectors, Contains("tpm:manufacturer:id:0000ABCD"));

  // The intermediate alone is not a trust anchor.
  TpmServerOptions intermediate_only;
  intermediate_only.ek_ca_certificates.push_back(ToCert(intermediate.get()));
  result = Attest(intermediate_only, Payload(cert.get(), ek_area_, ak_area_), {});
  EXPECT_THAT(std::string(result.status().message()), StartsWith("untrusted EK CA"));
}

TEST_F(TpmServerTest, AcceptsAllowlistedEkWithoutCertificate) {
  TpmServerOptions options;  // no CA at all
  options.ek_hash_allowlist = {
      absl::AsciiStrToUpper(crypto::HexEncode(Sha256(Pub(ek_rsa_).SpkiDer())))};
  auto result = Attest(options, Payload(nullptr, ek_area_, ak_area_), {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->selectors, Not(Contains(StartsWith("tpm:ek_ca:"))));
  EXPECT_THAT(result->selectors, Not(Contains(StartsWith("tpm:manufacturer:"))));
}

TEST_F(TpmServerTest, RefusesCertificateWithoutEkExtendedKeyUsage) {
  // A certificate from the trusted CA for an ordinary (non-TPM) key must not pass as an EK.
  X509Ptr cert = MakeCert(ek_rsa_, root_.get(), root_key_, {.ek_eku = false});
  auto result = Attest(Options(), Payload(cert.get(), ek_area_, ak_area_), {});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("2.23.133.8.1"));
}

TEST_F(TpmServerTest, RefusesCaCertificateAsEkCertificate) {
  X509Ptr cert = MakeCert(ek_rsa_, root_.get(), root_key_, {.common_name = "sub", .ca = true});
  auto result = Attest(Options(), Payload(cert.get(), ek_area_, ak_area_), {});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("CA certificate"));
}

TEST_F(TpmServerTest, AllowlistedEkIsAdmittedEvenWithAnUntrustedCertificate) {
  // --tpm-ek-hash alone admits that EK whatever certificate it carries, but nothing from the
  // unverified certificate becomes a selector.
  TpmServerOptions options;  // no CA at all
  options.ek_hash_allowlist = {crypto::HexEncode(Sha256(Pub(ek_rsa_).SpkiDer()))};
  auto result = Attest(options, Payload(ek_cert_.get(), ek_area_, ak_area_), {});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->selectors, Not(Contains(StartsWith("tpm:ek_ca:"))));
  EXPECT_THAT(result->selectors, Not(Contains(StartsWith("tpm:manufacturer:"))));
}

TEST_F(TpmServerTest, RefusesPublicAreaWhoseSizeFieldDisagrees) {
  std::string ak = MarshalPublic(ak_area_);
  ak[0] = 0;
  ak[1] = static_cast<char>(ak[1] - 4);  // a smaller declared size, which libtss2-mu tolerates
  auto result = tpm::UnmarshalPublic(ak, "AK public");
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("size field"));
}

TEST_F(TpmServerTest, RefusesUnknownEkWithoutCertificate) {
  TpmServerOptions options = Options();
  options.ek_hash_allowlist = {crypto::HexEncode(Sha256(Pub(other_rsa_).SpkiDer()))};
  auto result = Attest(options, Payload(nullptr, ek_area_, ak_area_), {});
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(result.status().message(),
            "EK not trusted: no EK certificate and EK hash not allowlisted");
}

TEST_F(TpmServerTest, AgentSentEkTemplateFieldsAreIgnored) {
  // The agent claims AES-256 and SHA-384 for its RSA EK; the broker still uses template L-1
  // (which is what the software agent activates with), so attestation succeeds.
  TPMT_PUBLIC lying = ek_area_;
  lying.nameAlg = TPM2_ALG_SHA384;
  lying.parameters.rsaDetail.symmetric.keyBits.aes = 256;
  auto result = Attest(Options(), Payload(ek_cert_.get(), lying, ak_area_), {});
  EXPECT_TRUE(result.ok()) << result.status();
}

}  // namespace
}  // namespace mandate::attestors

namespace mandate::attestors {
namespace {

// Every prefix and every single-byte corruption of the wire structures is refused as a value:
// nothing attacker-controlled reaches an assert, exception or out-of-bounds read (run under
// valgrind/ASan to see the latter).
TEST(TpmWireRobustness, TruncatedOrCorruptedStructuresAreRefused) {
  PkeyPtr ak_key = Generate("EC", "P-256");
  TPMT_PUBLIC ak = AkArea(ak_key.get());
  std::string ak_name = *attestors::tpm::TpmName(ak);
  QuoteSpec spec;
  spec.extra_data = Sha256("qualifying");
  spec.pcrs = {0, 1};
  spec.pcr_values = {PcrValue(0), PcrValue(1)};
  auto [quote, signature] = BuildQuote(ak_key.get(), ak_name, spec);
  ASSERT_TRUE(
      attestors::tpm::VerifyQuote(ak, quote, signature, spec.extra_data, spec.pcrs, spec.pcr_values)
          .ok());
  for (size_t n = 0; n < quote.size(); ++n) {
    EXPECT_FALSE(attestors::tpm::VerifyQuote(ak, quote.substr(0, n), signature, spec.extra_data,
                                             spec.pcrs, spec.pcr_values)
                     .ok());
  }
  for (size_t n = 0; n < signature.size(); ++n) {
    EXPECT_FALSE(attestors::tpm::VerifyQuote(ak, quote, signature.substr(0, n), spec.extra_data,
                                             spec.pcrs, spec.pcr_values)
                     .ok());
  }
  for (size_t i = 0; i < quote.size(); ++i) {
    std::string corrupted = quote;
    corrupted[i] ^= 0x80;
    EXPECT_FALSE(attestors::tpm::VerifyQuote(ak, corrupted, signature, spec.extra_data, spec.pcrs,
                                             spec.pcr_values)
                     .ok())
        << i;
  }
  std::string wire = MarshalPublic(ak);
  for (size_t n = 0; n < wire.size(); ++n) {
    EXPECT_FALSE(attestors::tpm::UnmarshalPublic(wire.substr(0, n), "AK public").ok());
  }
}

}  // namespace
}  // namespace mandate::attestors
