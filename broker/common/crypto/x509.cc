#include "broker/common/crypto/x509.h"

#include <arpa/inet.h>
#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <cctype>
#include <ctime>
#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "broker/common/crypto/openssl_free.h"
#include "broker/common/util/status_macros.h"

namespace mandate::crypto {
namespace {

using BioPtr = std::unique_ptr<BIO, OpenSslFree<BIO_free>>;
using BignumPtr = std::unique_ptr<BIGNUM, OpenSslFree<BN_free>>;
using Asn1IntegerPtr = std::unique_ptr<ASN1_INTEGER, OpenSslFree<ASN1_INTEGER_free>>;
using Asn1OctetStringPtr = std::unique_ptr<ASN1_OCTET_STRING, OpenSslFree<ASN1_OCTET_STRING_free>>;
using Asn1BitStringPtr = std::unique_ptr<ASN1_BIT_STRING, OpenSslFree<ASN1_BIT_STRING_free>>;
using GeneralNamePtr = std::unique_ptr<GENERAL_NAME, OpenSslFree<GENERAL_NAME_free>>;
using GeneralNamesPtr = std::unique_ptr<GENERAL_NAMES, OpenSslFree<GENERAL_NAMES_free>>;
using BasicConstraintsPtr = std::unique_ptr<BASIC_CONSTRAINTS, OpenSslFree<BASIC_CONSTRAINTS_free>>;
using AuthorityKeyIdPtr = std::unique_ptr<AUTHORITY_KEYID, OpenSslFree<AUTHORITY_KEYID_free>>;
using ExtendedKeyUsagePtr =
    std::unique_ptr<EXTENDED_KEY_USAGE, OpenSslFree<EXTENDED_KEY_USAGE_free>>;
using X509NamePtr = std::unique_ptr<X509_NAME, OpenSslFree<X509_NAME_free>>;
using X509ReqPtr = std::unique_ptr<X509_REQ, OpenSslFree<X509_REQ_free>>;
using X509StorePtr = std::unique_ptr<X509_STORE, OpenSslFree<X509_STORE_free>>;
using X509StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, OpenSslFree<X509_STORE_CTX_free>>;

struct X509StackFree {  // Frees the stack only; the certificates belong to Certificate values.
  void operator()(STACK_OF(X509) * s) const { sk_X509_free(s); }
};
using X509StackPtr = std::unique_ptr<STACK_OF(X509), X509StackFree>;
struct X509StackPopFree {  // Frees the stack and drops one reference per certificate.
  void operator()(STACK_OF(X509) * s) const { sk_X509_pop_free(s, X509_free); }
};
using OwningX509StackPtr = std::unique_ptr<STACK_OF(X509), X509StackPopFree>;
struct ExtensionStackPopFree {
  void operator()(STACK_OF(X509_EXTENSION) * s) const {
    sk_X509_EXTENSION_pop_free(s, X509_EXTENSION_free);
  }
};
using ExtensionStackPtr = std::unique_ptr<STACK_OF(X509_EXTENSION), ExtensionStackPopFree>;

constexpr absl::string_view kSpiffeScheme = "spiffe://";
constexpr size_t kMaxSpiffeIdBytes = 2048;
constexpr int kMinRsaBits = 2048;
// Caps the work a hostile CSR can cause and the size of issued certificates.
constexpr int kMaxRsaBits = 8192;

absl::Status OpenSslError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", OpenSslErrors()));
}

const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

std::string BioContents(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string();
}

std::string Asn1StringBytes(const ASN1_STRING* s) {
  if (s == nullptr || ASN1_STRING_length(s) <= 0) return {};
  return std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)),
                     static_cast<size_t>(ASN1_STRING_length(s)));
}

absl::StatusOr<int64_t> Asn1TimeToUnix(const ASN1_TIME* t, absl::string_view which) {
  struct tm tm {};
  if (t == nullptr || ASN1_TIME_to_tm(t, &tm) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("certificate ", which, " time is malformed"));
  }
  return static_cast<int64_t>(timegm(&tm));
}

// The one acceptance policy for keys that end up in X509-SVIDs or sign Mandate certificates.
absl::Status CheckAcceptedKey(EVP_PKEY* key, absl::string_view what) {
  switch (PublicKey::FromEvp(key).type()) {
    case KeyType::kEcP256:
    case KeyType::kEcP384:
      return absl::OkStatus();
    case KeyType::kRsa: {
      int bits = EVP_PKEY_get_bits(key);
      if (bits < kMinRsaBits || bits > kMaxRsaBits) {
        return absl::InvalidArgumentError(absl::StrCat(what, " is a ", bits, "-bit RSA key; ",
                                                       kMinRsaBits, " to ", kMaxRsaBits,
                                                       " bits are accepted"));
      }
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(what, " type is not accepted (P-256, P-384 or RSA only)"));
  }
}

// Writes an EC key's algorithm identifier and encoded point straight into `spki` and returns
// true; returns false, changing nothing, for other key types. X509_set_pubkey and
// X509_REQ_set_pubkey encode the key and decode it again through OpenSSL 3's encoder and decoder
// lookups, which profiles showed costing more than the signature over the certificate or CSR.
absl::StatusOr<bool> SetEcSubjectPublicKeyInfo(X509_PUBKEY* spki, EVP_PKEY* key) {
  int curve = NID_undef;
  switch (PublicKey::FromEvp(key).type()) {
    case KeyType::kEcP256:
      curve = NID_X9_62_prime256v1;
      break;
    case KeyType::kEcP384:
      curve = NID_secp384r1;
      break;
    default:
      return false;
  }
  size_t len = 0;
  if (spki == nullptr ||
      EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0, &len) !=
          1 ||
      len == 0) {
    return OpenSslError("cannot read the EC public point");
  }
  auto* point = static_cast<unsigned char*>(OPENSSL_malloc(len));
  if (point == nullptr ||
      EVP_PKEY_get_octet_string_param(key, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point, len, &len) !=
          1 ||
      // X509_PUBKEY_set0_param takes ownership of `point` only on success.
      X509_PUBKEY_set0_param(spki, OBJ_nid2obj(NID_X9_62_id_ecPublicKey), V_ASN1_OBJECT,
                             OBJ_nid2obj(curve), point, static_cast<int>(len)) != 1) {
    OPENSSL_free(point);
    return OpenSslError("cannot set the subject public key");
  }
  return true;
}

// Ed25519 signs without a separate digest; everything else here uses SHA-256.
const EVP_MD* SigningDigest(EVP_PKEY* key) {
  return EVP_PKEY_is_a(key, "ED25519") ? nullptr : EVP_sha256();
}

absl::Status CheckSpiffeIdShape(absl::string_view id) {
  if (!absl::StartsWith(id, kSpiffeScheme) || id.size() == kSpiffeScheme.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", id, "' is not a SPIFFE ID (needs the spiffe:// scheme)"));
  }
  if (id.size() > kMaxSpiffeIdBytes) {
    return absl::InvalidArgumentError("SPIFFE ID is longer than 2048 bytes");
  }
  for (char c : id) {
    if (c <= 0x20 || c >= 0x7f) {
      return absl::InvalidArgumentError(
          "SPIFFE ID contains a space, control or non-ASCII character");
    }
  }
  return absl::OkStatus();
}

absl::Status CheckDnsName(absl::string_view name) {
  if (name.empty() || name.size() > 253) {
    return absl::InvalidArgumentError(absl::StrCat("DNS SAN '", name, "' has an invalid length"));
  }
  std::vector<absl::string_view> labels = absl::StrSplit(name, '.');
  for (size_t i = 0; i < labels.size(); ++i) {
    absl::string_view label = labels[i];
    if (label == "*" && i == 0 && labels.size() > 1) continue;
    if (label.empty() || label.size() > 63) {
      return absl::InvalidArgumentError(
          absl::StrCat("DNS SAN '", name, "' has an empty or over-long label"));
    }
    for (char c : label) {
      if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-') {
        return absl::InvalidArgumentError(
            absl::StrCat("DNS SAN '", name, "' contains a character other than a-z 0-9 - ."));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status AddIa5Name(GENERAL_NAMES* names, int type, std::string_view value) {
  GeneralNamePtr name(GENERAL_NAME_new());
  ASN1_IA5STRING* s = ASN1_IA5STRING_new();
  if (!name || s == nullptr ||
      ASN1_STRING_set(s, value.data(), static_cast<int>(value.size())) != 1) {
    ASN1_IA5STRING_free(s);
    return OpenSslError("cannot build subjectAltName");
  }
  GENERAL_NAME_set0_value(name.get(), type, s);
  if (sk_GENERAL_NAME_push(names, name.get()) <= 0) return OpenSslError("cannot build SAN list");
  name.release();
  return absl::OkStatus();
}

absl::Status AddIpName(GENERAL_NAMES* names, const std::string& ip) {
  ASN1_OCTET_STRING* octets = a2i_IPADDRESS(ip.c_str());
  if (octets == nullptr) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("IP SAN '", ip, "' is not an IP address"));
  }
  GeneralNamePtr name(GENERAL_NAME_new());
  if (!name) {
    ASN1_OCTET_STRING_free(octets);
    return OpenSslError("cannot build subjectAltName");
  }
  GENERAL_NAME_set0_value(name.get(), GEN_IPADD, octets);
  if (sk_GENERAL_NAME_push(names, name.get()) <= 0) return OpenSslError("cannot build SAN list");
  name.release();
  return absl::OkStatus();
}

// The certificate's single SAN extension; null when absent. Errors when duplicated or malformed.
absl::StatusOr<GeneralNamesPtr> SubjectAltNames(X509* cert) {
  int crit = 0;
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, &crit, nullptr));
  if (names != nullptr) return GeneralNamesPtr(names);
  ERR_clear_error();
  if (crit == -1) return GeneralNamesPtr();
  if (crit == -2) {
    return absl::InvalidArgumentError("certificate has more than one subjectAltName extension");
  }
  return absl::InvalidArgumentError("certificate subjectAltName extension is malformed");
}

std::vector<std::string> NamesOfType(const GENERAL_NAMES* names, int type) {
  std::vector<std::string> out;
  if (names == nullptr) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, i);
    int name_type = 0;
    const void* value = GENERAL_NAME_get0_value(name, &name_type);
    if (name_type != type) continue;
    const auto* s = static_cast<const ASN1_STRING*>(value);
    if (type != GEN_IPADD) {
      out.push_back(Asn1StringBytes(s));
      continue;
    }
    std::string raw = Asn1StringBytes(s);
    char text[INET6_ADDRSTRLEN] = {0};
    int family = raw.size() == 4 ? AF_INET : raw.size() == 16 ? AF_INET6 : 0;
    if (family != 0 && inet_ntop(family, raw.data(), text, sizeof(text)) != nullptr) {
      out.emplace_back(text);
    } else {
      out.push_back(absl::StrCat("<malformed IP SAN: ", HexEncode(raw), ">"));
    }
  }
  return out;
}

std::vector<std::string> SansOfType(X509* cert, int type) {
  auto names = SubjectAltNames(cert);
  if (!names.ok()) return {};
  return NamesOfType(names->get(), type);
}

// Lowercase hex of the serial number; empty if it cannot be read.
std::string SerialHexOf(const X509* cert) {
  BignumPtr serial(ASN1_INTEGER_to_BN(X509_get0_serialNumber(cert), nullptr));
  if (!serial) return {};
  char* hex = BN_bn2hex(serial.get());
  if (hex == nullptr) return {};
  std::string out = absl::AsciiStrToLower(hex);
  OPENSSL_free(hex);
  return out;
}

absl::StatusOr<BignumPtr> RandomSerial() {
  // TimeOrderedId: 80 random bits (CA/B Forum asks for at least 64) behind a millisecond time
  // prefix, read as an unsigned number: positive, at most 17 DER content bytes (well under RFC
  // 5280's 20), unpredictable to anyone requesting certificates, and in issuance order.
  for (int attempt = 0; attempt < 4; ++attempt) {
    ASSIGN_OR_RETURN(std::string bytes, TimeOrderedId());
    BignumPtr serial(BN_bin2bn(Bytes(bytes), static_cast<int>(bytes.size()), nullptr));
    if (!serial) return OpenSslError("BN_bin2bn");
    if (!BN_is_zero(serial.get())) return serial;
  }
  return absl::InternalError("random number generator keeps returning zero");
}

absl::Status SetRandomSerial(X509* cert) {
  ASSIGN_OR_RETURN(BignumPtr serial, RandomSerial());
  Asn1IntegerPtr integer(BN_to_ASN1_INTEGER(serial.get(), nullptr));
  if (!integer || X509_set_serialNumber(cert, integer.get()) != 1) {
    return OpenSslError("cannot set serial number");
  }
  return absl::OkStatus();
}

absl::Status SetValidity(X509* cert, int64_t not_before, int64_t not_after) {
  if (ASN1_TIME_set(X509_getm_notBefore(cert), static_cast<time_t>(not_before)) == nullptr ||
      ASN1_TIME_set(X509_getm_notAfter(cert), static_cast<time_t>(not_after)) == nullptr) {
    return OpenSslError("cannot set validity");
  }
  return absl::OkStatus();
}

absl::StatusOr<X509NamePtr> MandateName(std::string_view common_name) {
  X509NamePtr name(X509_NAME_new());
  if (!name || X509_NAME_add_entry_by_NID(name.get(), NID_organizationName, MBSTRING_UTF8,
                                          Bytes("Mandate"), -1, -1, 0) != 1) {
    return OpenSslError("cannot build subject name");
  }
  if (!common_name.empty() &&
      X509_NAME_add_entry_by_NID(name.get(), NID_commonName, MBSTRING_UTF8, Bytes(common_name),
                                 static_cast<int>(common_name.size()), -1, 0) != 1) {
    return OpenSslError("cannot build subject name");
  }
  return name;
}

absl::Status AddBasicConstraints(X509* cert, bool is_ca) {
  BasicConstraintsPtr bc(BASIC_CONSTRAINTS_new());
  if (!bc) return OpenSslError("BASIC_CONSTRAINTS_new");
  if (is_ca) {
    bc->ca = 0xff;
    bc->pathlen = ASN1_INTEGER_new();
    if (bc->pathlen == nullptr || ASN1_INTEGER_set(bc->pathlen, 0) != 1) {
      return OpenSslError("cannot set pathlen");
    }
  }
  if (X509_add1_ext_i2d(cert, NID_basic_constraints, bc.get(), 1, X509V3_ADD_DEFAULT) != 1) {
    return OpenSslError("cannot add basicConstraints");
  }
  return absl::OkStatus();
}

// `bits` are RFC 5280 KeyUsage bit numbers (0 = digitalSignature, 5 = keyCertSign, 6 = cRLSign).
absl::Status AddKeyUsage(X509* cert, std::initializer_list<int> bits) {
  Asn1BitStringPtr usage(ASN1_BIT_STRING_new());
  if (!usage) return OpenSslError("ASN1_BIT_STRING_new");
  for (int bit : bits) {
    if (ASN1_BIT_STRING_set_bit(usage.get(), bit, 1) != 1) return OpenSslError("keyUsage bit");
  }
  if (X509_add1_ext_i2d(cert, NID_key_usage, usage.get(), 1, X509V3_ADD_DEFAULT) != 1) {
    return OpenSslError("cannot add keyUsage");
  }
  return absl::OkStatus();
}

// RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits of `cert`.
absl::StatusOr<Asn1OctetStringPtr> KeyIdentifierOf(const X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_pubkey_digest(cert, EVP_sha1(), md, &len) != 1) return OpenSslError("key identifier");
  Asn1OctetStringPtr id(ASN1_OCTET_STRING_new());
  if (!id || ASN1_OCTET_STRING_set(id.get(), md, static_cast<int>(len)) != 1) {
    return OpenSslError("key identifier");
  }
  return id;
}

absl::Status AddSubjectKeyId(X509* cert) {
  ASSIGN_OR_RETURN(Asn1OctetStringPtr id, KeyIdentifierOf(cert));
  if (X509_add1_ext_i2d(cert, NID_subject_key_identifier, id.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    return OpenSslError("cannot add subjectKeyIdentifier");
  }
  return absl::OkStatus();
}

absl::Status AddAuthorityKeyId(X509* cert, X509* issuer) {
  AuthorityKeyIdPtr akid(AUTHORITY_KEYID_new());
  if (!akid) return OpenSslError("AUTHORITY_KEYID_new");
  if (const ASN1_OCTET_STRING* ski = X509_get0_subject_key_id(issuer); ski != nullptr) {
    akid->keyid = ASN1_OCTET_STRING_dup(ski);
    if (akid->keyid == nullptr) return OpenSslError("ASN1_OCTET_STRING_dup");
  } else {
    ASSIGN_OR_RETURN(Asn1OctetStringPtr id, KeyIdentifierOf(issuer));
    akid->keyid = id.release();
  }
  if (X509_add1_ext_i2d(cert, NID_authority_key_identifier, akid.get(), 0, X509V3_ADD_DEFAULT) !=
      1) {
    return OpenSslError("cannot add authorityKeyIdentifier");
  }
  return absl::OkStatus();
}

absl::Status AddExtendedKeyUsage(X509* cert, bool server_only) {
  ExtendedKeyUsagePtr eku(sk_ASN1_OBJECT_new_null());
  if (!eku || sk_ASN1_OBJECT_push(eku.get(), OBJ_nid2obj(NID_server_auth)) <= 0 ||
      (!server_only && sk_ASN1_OBJECT_push(eku.get(), OBJ_nid2obj(NID_client_auth)) <= 0)) {
    return OpenSslError("cannot build extendedKeyUsage");
  }
  if (X509_add1_ext_i2d(cert, NID_ext_key_usage, eku.get(), 0, X509V3_ADD_DEFAULT) != 1) {
    return OpenSslError("cannot add extendedKeyUsage");
  }
  return absl::OkStatus();
}

absl::StatusOr<GeneralNamesPtr> BuildSans(std::string_view uri,
                                          const std::vector<std::string>& dns_sans,
                                          const std::vector<std::string>& ip_sans) {
  GeneralNamesPtr names(sk_GENERAL_NAME_new_null());
  if (!names) return OpenSslError("sk_GENERAL_NAME_new_null");
  RETURN_IF_ERROR(AddIa5Name(names.get(), GEN_URI, uri));
  for (const std::string& dns : dns_sans) {
    RETURN_IF_ERROR(CheckDnsName(dns));
    RETURN_IF_ERROR(AddIa5Name(names.get(), GEN_DNS, dns));
  }
  for (const std::string& ip : ip_sans) RETURN_IF_ERROR(AddIpName(names.get(), ip));
  return names;
}

absl::Status AddSans(X509* cert, const GENERAL_NAMES* names) {
  // The subject is never empty here, so RFC 5280 lets the SAN be non-critical.
  if (X509_add1_ext_i2d(cert, NID_subject_alt_name, const_cast<GENERAL_NAMES*>(names), 0,
                        X509V3_ADD_DEFAULT) != 1) {
    return OpenSslError("cannot add subjectAltName");
  }
  return absl::OkStatus();
}

// Signs `cert` and re-parses the result, so the returned Certificate carries its final
// encoding (no lazy re-encoding later, which would not be thread-safe) and is checked to decode.
absl::StatusOr<Certificate> SignAndSeal(X509* cert, const PrivateKey& signer) {
  if (X509_sign(cert, signer.evp(), SigningDigest(signer.evp())) <= 0) {
    return OpenSslError("signing certificate failed");
  }
  unsigned char* der = nullptr;
  int len = i2d_X509(cert, &der);
  if (len <= 0) return OpenSslError("encoding certificate failed");
  std::string encoded(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return Certificate::FromDer(encoded);
}

std::string VerifyErrorText(int error) {
  const char* text = X509_verify_cert_error_string(error);
  return text != nullptr ? text : absl::StrCat("verification error ", error);
}

absl::Status CheckSvidLeaf(X509* leaf, std::string* spiffe_id) {
  uint32_t flags = X509_get_extension_flags(leaf);
  if ((flags & EXFLAG_INVALID) != 0) {
    return absl::UnauthenticatedError("leaf has malformed or duplicate extensions");
  }
  if ((flags & EXFLAG_CA) != 0) {
    return absl::UnauthenticatedError(
        "leaf is a CA certificate (basicConstraints CA:TRUE); X509-SVID leaves must be CA:FALSE");
  }
  if ((flags & EXFLAG_KUSAGE) == 0) {
    return absl::UnauthenticatedError(
        "leaf has no keyUsage extension; X509-SVIDs need digitalSignature");
  }
  uint32_t usage = X509_get_key_usage(leaf);
  if ((usage & KU_DIGITAL_SIGNATURE) == 0) {
    return absl::UnauthenticatedError("leaf keyUsage lacks digitalSignature");
  }
  if ((usage & KU_KEY_CERT_SIGN) != 0) {
    return absl::UnauthenticatedError("leaf keyUsage has keyCertSign; X509-SVID leaves must not");
  }
  if ((usage & KU_CRL_SIGN) != 0) {
    return absl::UnauthenticatedError("leaf keyUsage has cRLSign; X509-SVID leaves must not");
  }
  auto names = SubjectAltNames(leaf);
  if (!names.ok()) {
    return absl::UnauthenticatedError(absl::StrCat("leaf: ", names.status().message()));
  }
  std::vector<std::string> uris = NamesOfType(names->get(), GEN_URI);
  if (uris.empty()) {
    return absl::UnauthenticatedError("leaf has no URI SAN, X509-SVIDs need exactly one");
  }
  if (uris.size() != 1) {
    return absl::UnauthenticatedError(
        absl::StrCat("leaf has ", uris.size(), " URI SANs, X509-SVIDs need exactly one"));
  }
  if (absl::Status shape = CheckSpiffeIdShape(uris[0]); !shape.ok()) {
    return absl::UnauthenticatedError(absl::StrCat("leaf URI SAN: ", shape.message()));
  }
  *spiffe_id = std::move(uris[0]);
  return absl::OkStatus();
}

}  // namespace

void X509Deleter::operator()(X509* cert) const { X509_free(cert); }

// ---------------------------------------------------------------------------- Certificate

absl::StatusOr<Certificate> Certificate::Adopt(X509Ptr cert) {
  if (X509_get0_pubkey(cert.get()) == nullptr) {
    ERR_clear_error();
    return absl::InvalidArgumentError("certificate public key cannot be decoded");
  }
  ASSIGN_OR_RETURN(int64_t not_before,
                   Asn1TimeToUnix(X509_get0_notBefore(cert.get()), "notBefore"));
  ASSIGN_OR_RETURN(int64_t not_after, Asn1TimeToUnix(X509_get0_notAfter(cert.get()), "notAfter"));
  // Fills OpenSSL's extension cache now, before the certificate can be shared.
  X509_get_extension_flags(cert.get());
  ERR_clear_error();
  return Certificate(std::move(cert), not_before, not_after);
}

absl::StatusOr<Certificate> Certificate::FromDer(std::string_view der) {
  const unsigned char* p = Bytes(der);
  const unsigned char* end = p + der.size();
  X509* raw = d2i_X509(nullptr, &p, static_cast<long>(der.size()));
  if (raw == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("invalid DER certificate: ", OpenSslErrors()));
  }
  X509Ptr cert(raw);
  if (p != end) return absl::InvalidArgumentError("trailing bytes after DER certificate");
  return Adopt(std::move(cert));
}

absl::StatusOr<std::vector<Certificate>> Certificate::ParsePemChain(std::string_view pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return OpenSslError("BIO_new_mem_buf");
  std::vector<Certificate> chain;
  for (;;) {
    X509* raw = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr);
    if (raw == nullptr) break;
    ASSIGN_OR_RETURN(Certificate cert, Adopt(X509Ptr(raw)));
    chain.push_back(std::move(cert));
  }
  // Running out of PEM blocks ends the loop with "no start line"; anything else is corruption.
  unsigned long err = ERR_peek_last_error();
  if (err != 0 &&
      !(ERR_GET_LIB(err) == ERR_LIB_PEM && ERR_GET_REASON(err) == PEM_R_NO_START_LINE)) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid PEM certificate #", chain.size() + 1, ": ", OpenSslErrors()));
  }
  ERR_clear_error();
  if (chain.empty()) return absl::InvalidArgumentError("no PEM CERTIFICATE block found");
  return chain;
}

absl::StatusOr<std::vector<Certificate>> Certificate::ParseDerChain(
    std::string_view concatenated_der) {
  if (concatenated_der.empty()) return absl::InvalidArgumentError("empty DER certificate chain");
  std::vector<Certificate> chain;
  const unsigned char* p = Bytes(concatenated_der);
  const unsigned char* end = p + concatenated_der.size();
  while (p < end) {
    X509* raw = d2i_X509(nullptr, &p, static_cast<long>(end - p));
    if (raw == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("invalid DER certificate #", chain.size() + 1,
                                                     " in chain: ", OpenSslErrors()));
    }
    ASSIGN_OR_RETURN(Certificate cert, Adopt(X509Ptr(raw)));
    chain.push_back(std::move(cert));
  }
  return chain;
}

absl::StatusOr<Certificate> Certificate::FromX509(const X509* cert) {
  unsigned char* der = nullptr;
  int len = i2d_X509(cert, &der);
  if (len <= 0) return OpenSslError("encoding certificate failed");
  std::string encoded(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return FromDer(encoded);
}

Certificate::Certificate(const Certificate& other)
    : not_before_(other.not_before_), not_after_(other.not_after_) {
  X509_up_ref(other.cert_.get());
  cert_.reset(other.cert_.get());
}

Certificate& Certificate::operator=(const Certificate& other) {
  if (this != &other) {
    X509_up_ref(other.cert_.get());
    cert_.reset(other.cert_.get());
    not_before_ = other.not_before_;
    not_after_ = other.not_after_;
  }
  return *this;
}

std::string Certificate::Der() const {
  unsigned char* der = nullptr;
  int len = i2d_X509(cert_.get(), &der);
  if (len <= 0) return {};
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

std::string Certificate::Pem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert_.get()) != 1) return {};
  return BioContents(bio.get());
}

PublicKey Certificate::public_key() const {
  // Adopt() checked that the key decodes, so this is never null.
  return PublicKey::FromEvp(X509_get0_pubkey(cert_.get()));
}

std::vector<std::string> Certificate::UriSans() const { return SansOfType(cert_.get(), GEN_URI); }
std::vector<std::string> Certificate::DnsSans() const { return SansOfType(cert_.get(), GEN_DNS); }
std::vector<std::string> Certificate::IpSans() const { return SansOfType(cert_.get(), GEN_IPADD); }

std::string Certificate::SerialHex() const { return SerialHexOf(cert_.get()); }

bool Certificate::is_ca() const { return (X509_get_extension_flags(cert_.get()) & EXFLAG_CA) != 0; }

bool Certificate::Equals(const Certificate& other) const { return Der() == other.Der(); }

absl::StatusOr<std::string> RandomSerialHex() {
  ASSIGN_OR_RETURN(BignumPtr serial, RandomSerial());
  char* hex = BN_bn2hex(serial.get());
  if (hex == nullptr) return OpenSslError("BN_bn2hex");
  std::string out = absl::AsciiStrToLower(hex);
  OPENSSL_free(hex);
  return out;
}

// ---------------------------------------------------------------------------- CA

absl::StatusOr<Certificate> CreateSelfSignedCa(const PrivateKey& key, const CaOptions& options) {
  RETURN_IF_ERROR(CheckAcceptedKey(key.evp(), "CA key"));
  RETURN_IF_ERROR(CheckSpiffeIdShape(options.trust_domain_id));
  if (options.trust_domain_id.find('/', kSpiffeScheme.size()) != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("trust domain ID '", options.trust_domain_id, "' must not have a path"));
  }
  // A non-empty CN keeps the CA's subject distinct from its leaves' (O=Mandate), so a leaf can
  // never look self-issued.
  if (options.common_name.empty() || options.common_name.size() > 64) {
    return absl::InvalidArgumentError("CA common name must be 1 to 64 bytes");
  }
  if (options.not_after <= options.not_before) {
    return absl::InvalidArgumentError("CA not_after must be after not_before");
  }
  X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1) return OpenSslError("X509_new");
  RETURN_IF_ERROR(SetRandomSerial(cert.get()));
  ASSIGN_OR_RETURN(X509NamePtr name, MandateName(options.common_name));
  if (X509_set_subject_name(cert.get(), name.get()) != 1 ||
      X509_set_issuer_name(cert.get(), name.get()) != 1 ||
      X509_set_pubkey(cert.get(), key.evp()) != 1) {
    return OpenSslError("cannot fill CA certificate");
  }
  RETURN_IF_ERROR(SetValidity(cert.get(), options.not_before, options.not_after));
  RETURN_IF_ERROR(AddBasicConstraints(cert.get(), /*is_ca=*/true));
  RETURN_IF_ERROR(AddKeyUsage(cert.get(), {0, 5, 6}));
  RETURN_IF_ERROR(AddSubjectKeyId(cert.get()));
  ASSIGN_OR_RETURN(GeneralNamesPtr sans, BuildSans(options.trust_domain_id, {}, {}));
  RETURN_IF_ERROR(AddSans(cert.get(), sans.get()));
  return SignAndSeal(cert.get(), key);
}

// ---------------------------------------------------------------------------- CSR

absl::StatusOr<std::string> CreateCsrDer(const PrivateKey& key, std::string_view spiffe_id) {
  X509ReqPtr req(X509_REQ_new());
  if (!req || X509_REQ_set_version(req.get(), X509_REQ_VERSION_1) != 1) {
    return OpenSslError("cannot build CSR");
  }
  ASSIGN_OR_RETURN(bool set,
                   SetEcSubjectPublicKeyInfo(X509_REQ_get_X509_PUBKEY(req.get()), key.evp()));
  if (!set && X509_REQ_set_pubkey(req.get(), key.evp()) != 1)
    return OpenSslError("cannot build CSR");
  if (!spiffe_id.empty()) {
    RETURN_IF_ERROR(CheckSpiffeIdShape(absl::string_view(spiffe_id.data(), spiffe_id.size())));
    ASSIGN_OR_RETURN(GeneralNamesPtr sans, BuildSans(spiffe_id, {}, {}));
    ExtensionStackPtr extensions(sk_X509_EXTENSION_new_null());
    X509_EXTENSION* san = X509V3_EXT_i2d(NID_subject_alt_name, 0, sans.get());
    if (!extensions || san == nullptr) {
      X509_EXTENSION_free(san);
      return OpenSslError("cannot build CSR extension");
    }
    if (sk_X509_EXTENSION_push(extensions.get(), san) <= 0) {
      X509_EXTENSION_free(san);
      return OpenSslError("cannot build CSR extension");
    }
    if (X509_REQ_add_extensions(req.get(), extensions.get()) != 1) {
      return OpenSslError("cannot add CSR extension request");
    }
  }
  if (X509_REQ_sign(req.get(), key.evp(), SigningDigest(key.evp())) <= 0) {
    return OpenSslError("signing CSR failed");
  }
  unsigned char* der = nullptr;
  int len = i2d_X509_REQ(req.get(), &der);
  if (len <= 0) return OpenSslError("encoding CSR failed");
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

absl::StatusOr<ParsedCsr> ParseAndVerifyCsrDer(std::string_view der) {
  if (der.size() > kMaxCsrDerBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("CSR is ", der.size(), " bytes; at most ", kMaxCsrDerBytes, " are accepted"));
  }
  const unsigned char* p = Bytes(der);
  const unsigned char* end = p + der.size();
  X509_REQ* raw = d2i_X509_REQ(nullptr, &p, static_cast<long>(der.size()));
  if (raw == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("invalid DER CSR: ", OpenSslErrors()));
  }
  X509ReqPtr req(raw);
  if (p != end) return absl::InvalidArgumentError("trailing bytes after DER CSR");
  EVP_PKEY* key = X509_REQ_get0_pubkey(req.get());
  if (key == nullptr) {
    ERR_clear_error();
    return absl::InvalidArgumentError("CSR public key cannot be decoded");
  }
  RETURN_IF_ERROR(CheckAcceptedKey(key, "CSR key"));
  if (X509_REQ_verify(req.get(), key) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError("CSR signature does not verify with the CSR's public key");
  }

  ParsedCsr parsed{PublicKey::FromEvp(key), {}};
  int ext_req_attrs = 0;
  for (int i = -1; (i = X509_REQ_get_attr_by_NID(req.get(), NID_ext_req, i)) >= 0;) ++ext_req_attrs;
  if (ext_req_attrs == 0) return parsed;
  if (ext_req_attrs > 1) {
    return absl::InvalidArgumentError("CSR has more than one extensionRequest attribute");
  }
  ExtensionStackPtr extensions(X509_REQ_get_extensions(req.get()));
  if (!extensions) {
    ERR_clear_error();
    return absl::InvalidArgumentError("CSR extensionRequest attribute is malformed");
  }
  bool seen_san = false;
  for (int i = 0; i < sk_X509_EXTENSION_num(extensions.get()); ++i) {
    X509_EXTENSION* ext = sk_X509_EXTENSION_value(extensions.get(), i);
    if (OBJ_obj2nid(X509_EXTENSION_get_object(ext)) != NID_subject_alt_name) continue;
    if (seen_san) {
      return absl::InvalidArgumentError("CSR requests more than one subjectAltName extension");
    }
    seen_san = true;
    GeneralNamesPtr names(static_cast<GENERAL_NAMES*>(X509V3_EXT_d2i(ext)));
    if (!names) {
      ERR_clear_error();
      return absl::InvalidArgumentError("CSR subjectAltName extension is malformed");
    }
    parsed.uri_sans = NamesOfType(names.get(), GEN_URI);
  }
  return parsed;
}

// ---------------------------------------------------------------------------- X509-SVID

namespace {

// The unsigned leaf SignLeaf and SignLeafDer sign, after their shared checks.
absl::StatusOr<X509Ptr> BuildLeaf(const Certificate& ca_cert, const PrivateKey& ca_key,
                                  const PublicKey& subject_key, const LeafOptions& options) {
  if (!ca_cert.is_ca()) {
    return absl::InvalidArgumentError("issuing certificate is not a CA (basicConstraints)");
  }
  if (X509_check_private_key(ca_cert.x509(), ca_key.evp()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError("CA private key does not match the CA certificate");
  }
  RETURN_IF_ERROR(CheckAcceptedKey(subject_key.evp(), "subject key"));
  RETURN_IF_ERROR(CheckSpiffeIdShape(options.spiffe_id));
  // A leaf outside its issuer's validity could never verify; clamp rather than issue it.
  int64_t not_before = std::max(options.not_before, ca_cert.not_before());
  int64_t not_after = std::min(options.not_after, ca_cert.not_after());
  if (not_after <= not_before) {
    return absl::InvalidArgumentError(
        absl::StrCat("leaf validity is empty after clamping to the CA's validity (not_before ",
                     not_before, ", not_after ", not_after, ")"));
  }

  X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1) return OpenSslError("X509_new");
  RETURN_IF_ERROR(SetRandomSerial(cert.get()));
  ASSIGN_OR_RETURN(X509NamePtr subject, MandateName(""));
  if (X509_set_subject_name(cert.get(), subject.get()) != 1 ||
      X509_set_issuer_name(cert.get(), X509_get_subject_name(ca_cert.x509())) != 1) {
    return OpenSslError("cannot fill leaf certificate");
  }
  ASSIGN_OR_RETURN(bool set,
                   SetEcSubjectPublicKeyInfo(X509_get_X509_PUBKEY(cert.get()), subject_key.evp()));
  if (!set && X509_set_pubkey(cert.get(), subject_key.evp()) != 1) {
    return OpenSslError("X509_set_pubkey");
  }
  RETURN_IF_ERROR(SetValidity(cert.get(), not_before, not_after));
  RETURN_IF_ERROR(AddBasicConstraints(cert.get(), /*is_ca=*/false));
  RETURN_IF_ERROR(AddKeyUsage(cert.get(), {0}));
  RETURN_IF_ERROR(AddExtendedKeyUsage(cert.get(), options.server_only));
  RETURN_IF_ERROR(AddSubjectKeyId(cert.get()));
  RETURN_IF_ERROR(AddAuthorityKeyId(cert.get(), ca_cert.x509()));
  ASSIGN_OR_RETURN(GeneralNamesPtr sans,
                   BuildSans(options.spiffe_id, options.dns_sans, options.ip_sans));
  RETURN_IF_ERROR(AddSans(cert.get(), sans.get()));
  return cert;
}

}  // namespace

absl::StatusOr<Certificate> SignLeaf(const Certificate& ca_cert, const PrivateKey& ca_key,
                                     const PublicKey& subject_key, const LeafOptions& options) {
  ASSIGN_OR_RETURN(X509Ptr cert, BuildLeaf(ca_cert, ca_key, subject_key, options));
  return SignAndSeal(cert.get(), ca_key);
}

absl::StatusOr<IssuedCertificate> SignLeafDer(const Certificate& ca_cert, const PrivateKey& ca_key,
                                              const PublicKey& subject_key,
                                              const LeafOptions& options) {
  ASSIGN_OR_RETURN(X509Ptr cert, BuildLeaf(ca_cert, ca_key, subject_key, options));
  if (X509_sign(cert.get(), ca_key.evp(), SigningDigest(ca_key.evp())) <= 0) {
    return OpenSslError("signing certificate failed");
  }
  IssuedCertificate out;
  unsigned char* der = nullptr;
  int len = i2d_X509(cert.get(), &der);
  if (len <= 0) return OpenSslError("encoding certificate failed");
  out.der.assign(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  out.serial_hex = SerialHexOf(cert.get());
  if (out.serial_hex.empty()) return OpenSslError("reading the serial number");
  ASSIGN_OR_RETURN(out.not_before, Asn1TimeToUnix(X509_get0_notBefore(cert.get()), "notBefore"));
  ASSIGN_OR_RETURN(out.not_after, Asn1TimeToUnix(X509_get0_notAfter(cert.get()), "notAfter"));
  return out;
}

absl::StatusOr<VerifiedSvid> VerifyX509SvidChain(const std::vector<Certificate>& chain,
                                                 const std::vector<Certificate>& roots,
                                                 int64_t now) {
  if (chain.empty()) return absl::InvalidArgumentError("empty X509-SVID certificate chain");
  if (roots.empty()) return absl::InvalidArgumentError("no trust roots to verify against");
  VerifiedSvid verified;
  RETURN_IF_ERROR(CheckSvidLeaf(chain[0].x509(), &verified.spiffe_id));

  X509StorePtr store(X509_STORE_new());
  X509StackPtr untrusted(sk_X509_new_null());
  X509StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!store || !untrusted || !ctx) return OpenSslError("cannot set up chain verification");
  for (const Certificate& root : roots) {
    if (X509_STORE_add_cert(store.get(), root.x509()) != 1) {
      // The only expected failure is a duplicate root, which is harmless.
      ERR_clear_error();
    }
  }
  for (size_t i = 1; i < chain.size(); ++i) {
    if (sk_X509_push(untrusted.get(), chain[i].x509()) <= 0) return OpenSslError("sk_X509_push");
  }
  if (X509_STORE_CTX_init(ctx.get(), store.get(), chain[0].x509(), untrusted.get()) != 1) {
    return OpenSslError("X509_STORE_CTX_init");
  }
  X509_VERIFY_PARAM* param = X509_STORE_CTX_get0_param(ctx.get());
  X509_VERIFY_PARAM_set_time(param, static_cast<time_t>(now));
  X509_VERIFY_PARAM_set_flags(param, X509_V_FLAG_PARTIAL_CHAIN);
  int ok = X509_verify_cert(ctx.get());
  if (ok != 1) {
    int error = X509_STORE_CTX_get_error(ctx.get());
    int depth = X509_STORE_CTX_get_error_depth(ctx.get());
    ERR_clear_error();
    return absl::UnauthenticatedError(
        absl::StrCat("X509-SVID chain does not verify: ", VerifyErrorText(error), " (certificate ",
                     depth, " in the chain)"));
  }

  OwningX509StackPtr path(X509_STORE_CTX_get1_chain(ctx.get()));
  if (!path) return OpenSslError("X509_STORE_CTX_get1_chain");
  for (int i = 0; i < sk_X509_num(path.get()); ++i) {
    X509* link = sk_X509_value(path.get(), i);
    const Certificate* known = nullptr;
    for (const auto* list : {&chain, &roots}) {
      for (const Certificate& cert : *list) {
        if (cert.x509() == link) known = &cert;
      }
    }
    if (known != nullptr) {
      verified.chain.push_back(*known);
    } else {
      ASSIGN_OR_RETURN(Certificate copy, Certificate::FromX509(link));
      verified.chain.push_back(std::move(copy));
    }
  }
  return verified;
}

}  // namespace mandate::crypto
