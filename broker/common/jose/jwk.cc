// JWK import/export (RFC 7517, 7518 §6, 8037) and RFC 7638 thumbprints.
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/params.h>

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "broker/common/jose/internal.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"

namespace mandate::jose {
namespace {

using internal::BnPtr;
using internal::PkeyCtxPtr;
using nlohmann::json;

// Bounds on imported RSA keys: below 2048 bits is too weak (NIST SP 800-131A); above 8192 bits
// an attacker-chosen key (a DPoP proof carries its own) would only make verification slow.
constexpr int kMinRsaBits = 2048;
constexpr int kMaxRsaBits = 8192;
constexpr size_t kMaxRsaExponentBytes = 8;

struct ParamBldDeleter {
  void operator()(OSSL_PARAM_BLD* bld) const { OSSL_PARAM_BLD_free(bld); }
};
struct ParamDeleter {
  void operator()(OSSL_PARAM* params) const { OSSL_PARAM_free(params); }
};

// The members that only a private (or symmetric) JWK has: RFC 7518 §6.2.2, §6.3.2, §6.4.1.
constexpr std::string_view kPrivateMembers[] = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"};

// The base64url-decoded value of the string member `name`, which must be present.
absl::StatusOr<std::string> DecodeMember(const json& jwk, std::string_view kty, const char* name) {
  auto it = jwk.find(name);
  if (it == jwk.end() || !it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(internal::Sv(kty), " JWK member '", name, "' is missing or not a string"));
  }
  auto decoded = Base64UrlDecode(it->get_ref<const std::string&>());
  if (!decoded.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(internal::Sv(kty), " JWK member '", name, "': ", decoded.status().message()));
  }
  return *std::move(decoded);
}

absl::StatusOr<std::string> StringMember(const json& jwk, std::string_view what, const char* name) {
  auto it = jwk.find(name);
  if (it == jwk.end() || !it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(internal::Sv(what), " member '", name, "' is missing or not a string"));
  }
  return it->get<std::string>();
}

// Runs EVP_PKEY_fromdata for a public key of `type` ("EC", "RSA"). OpenSSL validates what it
// can on import (for EC: the point decodes and lies on the curve).
absl::StatusOr<crypto::PublicKey> FromData(const char* type, OSSL_PARAM* params,
                                           std::string_view what) {
  PkeyCtxPtr ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  if (!ctx || EVP_PKEY_fromdata_init(ctx.get()) <= 0) {
    return absl::InternalError(
        absl::StrCat("EVP_PKEY_fromdata_init(", type, ") failed: ", crypto::OpenSslErrors()));
  }
  EVP_PKEY* raw = nullptr;
  if (EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) <= 0 || raw == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(internal::Sv(what), " is not a valid public key: ", crypto::OpenSslErrors()));
  }
  crypto::EvpPkeyPtr owned(raw);
  return crypto::PublicKey::FromEvp(raw);  // takes its own reference; `owned` drops ours
}

absl::StatusOr<crypto::PublicKey> EcFromJwk(const json& jwk) {
  ASSIGN_OR_RETURN(std::string crv, StringMember(jwk, "EC JWK", "crv"));
  const char* group;
  size_t size;
  if (crv == "P-256") {
    group = "prime256v1";
    size = 32;
  } else if (crv == "P-384") {
    group = "secp384r1";
    size = 48;
  } else {
    return absl::UnimplementedError(
        absl::StrCat("unsupported EC JWK curve ", internal::QuoteForError(crv)));
  }
  ASSIGN_OR_RETURN(std::string x, DecodeMember(jwk, "EC", "x"));
  ASSIGN_OR_RETURN(std::string y, DecodeMember(jwk, "EC", "y"));
  // RFC 7518 §6.2.1.2/3: each coordinate is exactly the full coordinate size.
  if (x.size() != size || y.size() != size) {
    return absl::InvalidArgumentError(absl::StrCat("EC ", crv, " JWK coordinates must be ", size,
                                                   " bytes each, got x=", x.size(),
                                                   " y=", y.size()));
  }
  std::string point;
  point.reserve(1 + 2 * size);
  point.push_back('\x04');  // SEC 1 uncompressed point: 04 || x || y
  point += x;
  point += y;
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, const_cast<char*>(group), 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size()),
      OSSL_PARAM_construct_end()};
  ASSIGN_OR_RETURN(crypto::PublicKey key, FromData("EC", params, absl::StrCat("EC ", crv, " JWK")));
  // Import already refuses points off the curve; the quick public check also refuses the point
  // at infinity and out-of-range coordinates, whatever the OpenSSL version does on import.
  PkeyCtxPtr check(EVP_PKEY_CTX_new_from_pkey(nullptr, key.evp(), nullptr));
  if (!check) return absl::InternalError("EVP_PKEY_CTX_new_from_pkey failed");
  if (EVP_PKEY_public_check_quick(check.get()) != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "EC ", crv, " JWK point is not a valid public key: ", crypto::OpenSslErrors()));
  }
  return key;
}

absl::StatusOr<crypto::PublicKey> RsaFromJwk(const json& jwk) {
  ASSIGN_OR_RETURN(std::string n, DecodeMember(jwk, "RSA", "n"));
  ASSIGN_OR_RETURN(std::string e, DecodeMember(jwk, "RSA", "e"));
  // RFC 7518 §6.3.1: Base64urlUInt uses the minimum number of octets. A leading zero would also
  // give the same key a second RFC 7638 thumbprint.
  if (n.empty() || n[0] == '\0') {
    return absl::InvalidArgumentError("RSA JWK 'n' is empty or has a leading zero octet");
  }
  if (e.empty() || e[0] == '\0') {
    return absl::InvalidArgumentError("RSA JWK 'e' is empty or has a leading zero octet");
  }
  if (e.size() > kMaxRsaExponentBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("RSA JWK 'e' is ", e.size(), " bytes, more than ", kMaxRsaExponentBytes));
  }
  BnPtr bn_n(BN_bin2bn(reinterpret_cast<const unsigned char*>(n.data()), static_cast<int>(n.size()),
                       nullptr));
  BnPtr bn_e(BN_bin2bn(reinterpret_cast<const unsigned char*>(e.data()), static_cast<int>(e.size()),
                       nullptr));
  if (!bn_n || !bn_e) return absl::InternalError("BN_bin2bn failed");
  const int bits = BN_num_bits(bn_n.get());
  if (bits < kMinRsaBits || bits > kMaxRsaBits) {
    return absl::UnimplementedError(absl::StrCat("RSA JWK modulus of ", bits,
                                                 " bits is outside the accepted range ",
                                                 kMinRsaBits, "..", kMaxRsaBits));
  }
  if (!BN_is_odd(bn_n.get())) return absl::InvalidArgumentError("RSA JWK modulus is even");
  if (!BN_is_odd(bn_e.get()) || BN_is_one(bn_e.get())) {
    return absl::InvalidArgumentError("RSA JWK exponent must be odd and at least 3");
  }
  std::unique_ptr<OSSL_PARAM_BLD, ParamBldDeleter> bld(OSSL_PARAM_BLD_new());
  if (!bld || OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get()) != 1) {
    return absl::InternalError("OSSL_PARAM_BLD failed");
  }
  std::unique_ptr<OSSL_PARAM, ParamDeleter> params(OSSL_PARAM_BLD_to_param(bld.get()));
  if (!params) return absl::InternalError("OSSL_PARAM_BLD_to_param failed");
  return FromData("RSA", params.get(), "RSA JWK");
}

absl::StatusOr<crypto::PublicKey> OkpFromJwk(const json& jwk) {
  ASSIGN_OR_RETURN(std::string crv, StringMember(jwk, "OKP JWK", "crv"));
  if (crv != "Ed25519") {
    return absl::UnimplementedError(
        absl::StrCat("unsupported OKP JWK curve ", internal::QuoteForError(crv)));
  }
  ASSIGN_OR_RETURN(std::string x, DecodeMember(jwk, "OKP", "x"));
  if (x.size() != 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("Ed25519 JWK 'x' must be 32 bytes, got ", x.size()));
  }
  EVP_PKEY* raw = EVP_PKEY_new_raw_public_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(x.data()), x.size());
  if (raw == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("Ed25519 JWK is not a valid public key: ", crypto::OpenSslErrors()));
  }
  crypto::EvpPkeyPtr owned(raw);
  return crypto::PublicKey::FromEvp(raw);
}

// A BIGNUM parameter of `key` as big-endian bytes: `pad` bytes wide, or minimal when pad == 0.
absl::StatusOr<std::string> BnParam(const crypto::PublicKey& key, const char* name, int pad) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(key.evp(), name, &raw) != 1 || raw == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot read key parameter ", name, ": ", crypto::OpenSslErrors()));
  }
  BnPtr bn(raw);
  const int len = pad > 0 ? pad : BN_num_bytes(bn.get());
  std::string out(static_cast<size_t>(len), '\0');
  auto* buf = reinterpret_cast<unsigned char*>(out.data());
  if (pad > 0 ? BN_bn2binpad(bn.get(), buf, pad) != pad : BN_bn2bin(bn.get(), buf) != len) {
    return absl::InternalError(absl::StrCat("key parameter ", name, " does not fit"));
  }
  return out;
}

}  // namespace

absl::StatusOr<crypto::PublicKey> PublicKeyFromJwk(const json& jwk) {
  if (!jwk.is_object()) return absl::InvalidArgumentError("JWK is not a JSON object");
  for (std::string_view member : kPrivateMembers) {
    if (jwk.contains(member)) {
      return absl::InvalidArgumentError(absl::StrCat("JWK contains private key member '",
                                                     internal::Sv(member),
                                                     "'; only public keys are accepted"));
    }
  }
  ASSIGN_OR_RETURN(std::string kty, StringMember(jwk, "JWK", "kty"));
  if (kty == "EC") return EcFromJwk(jwk);
  if (kty == "RSA") return RsaFromJwk(jwk);
  if (kty == "OKP") return OkpFromJwk(jwk);
  return absl::UnimplementedError(
      absl::StrCat("unsupported JWK kty ", internal::QuoteForError(kty)));
}

absl::StatusOr<json> PublicKeyToJwk(const crypto::PublicKey& key) {
  json jwk = json::object();
  switch (key.type()) {
    case crypto::KeyType::kEcP256:
    case crypto::KeyType::kEcP384: {
      const bool p256 = key.type() == crypto::KeyType::kEcP256;
      const int size = p256 ? 32 : 48;
      // Read x and y as numbers rather than the encoded point: asking OpenSSL for an
      // uncompressed encoding would mean setting a parameter on a key other threads share.
      ASSIGN_OR_RETURN(std::string x, BnParam(key, OSSL_PKEY_PARAM_EC_PUB_X, size));
      ASSIGN_OR_RETURN(std::string y, BnParam(key, OSSL_PKEY_PARAM_EC_PUB_Y, size));
      jwk["kty"] = "EC";
      jwk["crv"] = p256 ? "P-256" : "P-384";
      jwk["x"] = Base64UrlEncode(x);
      jwk["y"] = Base64UrlEncode(y);
      return jwk;
    }
    case crypto::KeyType::kRsa: {
      ASSIGN_OR_RETURN(std::string n, BnParam(key, OSSL_PKEY_PARAM_RSA_N, 0));
      ASSIGN_OR_RETURN(std::string e, BnParam(key, OSSL_PKEY_PARAM_RSA_E, 0));
      jwk["kty"] = "RSA";
      jwk["n"] = Base64UrlEncode(n);
      jwk["e"] = Base64UrlEncode(e);
      return jwk;
    }
    case crypto::KeyType::kEd25519: {
      unsigned char x[32];
      size_t len = sizeof(x);
      if (EVP_PKEY_get_raw_public_key(key.evp(), x, &len) != 1 || len != sizeof(x)) {
        return absl::InternalError(
            absl::StrCat("cannot read Ed25519 public key: ", crypto::OpenSslErrors()));
      }
      jwk["kty"] = "OKP";
      jwk["crv"] = "Ed25519";
      jwk["x"] = Base64UrlEncode(std::string_view(reinterpret_cast<const char*>(x), len));
      return jwk;
    }
    case crypto::KeyType::kOther:
      break;
  }
  return absl::UnimplementedError("key type has no JWK representation here");
}

absl::StatusOr<std::string> JwkThumbprint(const json& jwk) {
  if (!jwk.is_object()) return absl::InvalidArgumentError("JWK is not a JSON object");
  ASSIGN_OR_RETURN(std::string kty, StringMember(jwk, "JWK", "kty"));
  const char* const* members;
  static constexpr const char* kEc[] = {"crv", "x", "y", nullptr};
  static constexpr const char* kRsa[] = {"e", "n", nullptr};
  static constexpr const char* kOkp[] = {"crv", "x", nullptr};
  if (kty == "EC") {
    members = kEc;
  } else if (kty == "RSA") {
    members = kRsa;
  } else if (kty == "OKP") {
    members = kOkp;
  } else {
    return absl::UnimplementedError(
        absl::StrCat("no RFC 7638 thumbprint for JWK kty ", internal::QuoteForError(kty)));
  }
  // nlohmann::json objects are std::map-backed, so dump() emits members in lexicographic order
  // with no whitespace: exactly the RFC 7638 §3.2 serialisation for these ASCII members.
  json required = json::object();
  required["kty"] = kty;
  for (const char* const* m = members; *m != nullptr; ++m) {
    ASSIGN_OR_RETURN(std::string value, StringMember(jwk, absl::StrCat(kty, " JWK"), *m));
    required[*m] = std::move(value);
  }
  ASSIGN_OR_RETURN(std::string canonical, internal::DumpCompact(required));
  return Base64UrlEncode(crypto::Sha256(canonical));
}

absl::StatusOr<std::string> JwkThumbprint(const crypto::PublicKey& key) {
  ASSIGN_OR_RETURN(json jwk, PublicKeyToJwk(key));
  return JwkThumbprint(jwk);
}

}  // namespace mandate::jose
