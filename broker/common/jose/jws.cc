// Compact JWS (RFC 7515) signing, parsing and verification on OpenSSL 3 EVP.
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rsa.h>

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
using nlohmann::json;

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;

struct EcdsaSigDeleter {
  void operator()(ECDSA_SIG* sig) const { ECDSA_SIG_free(sig); }
};
using EcdsaSigPtr = std::unique_ptr<ECDSA_SIG, EcdsaSigDeleter>;

// How an algorithm drives EVP_DigestSign/Verify.
struct Scheme {
  const char* digest;  // nullptr for EdDSA (Ed25519 hashes internally)
  bool pss;            // RSASSA-PSS, MGF1 with the same digest, salt = digest length
  size_t ecdsa_width;  // bytes per r and s in the JOSE form; 0 when not ECDSA
};

Scheme SchemeFor(Algorithm alg) {
  switch (alg) {
    case Algorithm::kES256:
      return {"SHA256", false, 32};
    case Algorithm::kES384:
      return {"SHA384", false, 48};
    case Algorithm::kRS256:
      return {"SHA256", false, 0};
    case Algorithm::kPS256:
      return {"SHA256", true, 0};
    case Algorithm::kEdDSA:
      break;
  }
  return {nullptr, false, 0};
}

// Sets up `ctx` for signing (sign=true) or verifying with `key` under `scheme`.
bool InitContext(EVP_MD_CTX* ctx, EVP_PKEY* key, const Scheme& scheme, bool sign) {
  EVP_PKEY_CTX* pctx = nullptr;  // owned by ctx
  const int rc =
      sign ? EVP_DigestSignInit_ex(ctx, &pctx, scheme.digest, nullptr, nullptr, key, nullptr)
           : EVP_DigestVerifyInit_ex(ctx, &pctx, scheme.digest, nullptr, nullptr, key, nullptr);
  if (rc <= 0) return false;
  if (scheme.pss) {
    // RFC 7518 §3.5: MGF1 with the same hash, salt as long as the hash output. A fixed salt
    // length (not "auto") on verify too, so only exactly this parameter set verifies.
    if (EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PSS_PADDING) <= 0 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx, RSA_PSS_SALTLEN_DIGEST) <= 0 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md_name(pctx, scheme.digest, nullptr) <= 0) {
      return false;
    }
  }
  return true;
}

// OpenSSL's DER ECDSA-Sig-Value -> JOSE r||s, each left-padded to `width` bytes.
absl::StatusOr<std::string> DerToRawEcdsa(std::string_view der, size_t width) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  const auto* end = p + der.size();
  EcdsaSigPtr sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size())));
  if (!sig || p != end) return absl::InternalError("OpenSSL produced a malformed ECDSA signature");
  std::string raw(2 * width, '\0');
  auto* out = reinterpret_cast<unsigned char*>(raw.data());
  const int w = static_cast<int>(width);
  if (BN_bn2binpad(ECDSA_SIG_get0_r(sig.get()), out, w) != w ||
      BN_bn2binpad(ECDSA_SIG_get0_s(sig.get()), out + width, w) != w) {
    return absl::InternalError("ECDSA signature component wider than the curve");
  }
  return raw;
}

// JOSE r||s -> DER for OpenSSL. The caller has checked raw.size() == 2 * width.
absl::StatusOr<std::string> RawToDerEcdsa(std::string_view raw, size_t width) {
  const auto* in = reinterpret_cast<const unsigned char*>(raw.data());
  const int w = static_cast<int>(width);
  BnPtr r(BN_bin2bn(in, w, nullptr));
  BnPtr s(BN_bin2bn(in + width, w, nullptr));
  EcdsaSigPtr sig(ECDSA_SIG_new());
  if (!r || !s || !sig || ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) {
    return absl::InternalError("cannot build ECDSA signature");
  }
  r.release();  // now owned by sig
  s.release();
  unsigned char* der = nullptr;
  const int len = i2d_ECDSA_SIG(sig.get(), &der);
  if (len <= 0 || der == nullptr) return absl::InternalError("cannot encode ECDSA signature");
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

absl::StatusOr<std::string> SignBytes(EVP_PKEY* key, Algorithm alg, std::string_view data) {
  const Scheme scheme = SchemeFor(alg);
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx) return absl::InternalError("EVP_MD_CTX_new failed");
  if (!InitContext(ctx.get(), key, scheme, /*sign=*/true)) {
    return absl::InternalError(absl::StrCat("JWS sign init failed: ", crypto::OpenSslErrors()));
  }
  const auto* in = reinterpret_cast<const unsigned char*>(data.data());
  size_t len = 0;
  if (EVP_DigestSign(ctx.get(), nullptr, &len, in, data.size()) <= 0) {
    return absl::InternalError(absl::StrCat("JWS sign failed: ", crypto::OpenSslErrors()));
  }
  std::string sig(len, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, in,
                     data.size()) <= 0) {
    return absl::InternalError(absl::StrCat("JWS sign failed: ", crypto::OpenSslErrors()));
  }
  sig.resize(len);
  if (scheme.ecdsa_width > 0) return DerToRawEcdsa(sig, scheme.ecdsa_width);
  return sig;
}

absl::Status SignatureMismatch() {
  return absl::UnauthenticatedError("JWS signature verification failed");
}

}  // namespace

// ---------------------------------------------------------------------------- algorithms

absl::StatusOr<Algorithm> AlgorithmFromName(std::string_view name) {
  if (name == "ES256") return Algorithm::kES256;
  if (name == "ES384") return Algorithm::kES384;
  if (name == "RS256") return Algorithm::kRS256;
  if (name == "PS256") return Algorithm::kPS256;
  if (name == "EdDSA") return Algorithm::kEdDSA;
  if (name == "none") {
    return absl::InvalidArgumentError("JWS alg 'none' (unsecured JWS) is not accepted");
  }
  if (name == "HS256" || name == "HS384" || name == "HS512") {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS alg '", internal::Sv(name),
                     "' (HMAC) is not accepted: only asymmetric algorithms are"));
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported JWS alg ",
                                                 internal::QuoteForError(name),
                                                 " (accepted: ES256, ES384, RS256, PS256, EdDSA)"));
}

std::string_view AlgorithmName(Algorithm alg) {
  switch (alg) {
    case Algorithm::kES256:
      return "ES256";
    case Algorithm::kES384:
      return "ES384";
    case Algorithm::kRS256:
      return "RS256";
    case Algorithm::kPS256:
      return "PS256";
    case Algorithm::kEdDSA:
      return "EdDSA";
  }
  return "unknown";
}

absl::StatusOr<Algorithm> AlgorithmForKey(const crypto::PublicKey& key) {
  switch (key.type()) {
    case crypto::KeyType::kEcP256:
      return Algorithm::kES256;
    case crypto::KeyType::kEcP384:
      return Algorithm::kES384;
    case crypto::KeyType::kRsa:
      return Algorithm::kRS256;
    case crypto::KeyType::kEd25519:
      return Algorithm::kEdDSA;
    case crypto::KeyType::kOther:
      break;
  }
  return absl::UnimplementedError(
      "key type has no JWS algorithm (need P-256, P-384, RSA or Ed25519)");
}

absl::Status CheckKeyMatchesAlgorithm(const crypto::PublicKey& key, Algorithm alg) {
  const crypto::KeyType type = key.type();
  if (internal::KeyTypeMatches(type, alg)) return absl::OkStatus();
  return absl::UnauthenticatedError(
      absl::StrCat("JWS alg ", internal::Sv(AlgorithmName(alg)), " cannot be used with a ",
                   internal::Sv(internal::KeyTypeName(type)), " key"));
}

// ---------------------------------------------------------------------------- signing

absl::StatusOr<std::string> SignCompact(const crypto::PrivateKey& key, Algorithm alg,
                                        std::string_view header_json,
                                        std::string_view payload_json) {
  if (!internal::KeyTypeMatches(key.type(), alg)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot sign ", internal::Sv(AlgorithmName(alg)), " with a ",
                     internal::Sv(internal::KeyTypeName(key.type())), " key"));
  }
  std::string token = Base64UrlEncode(header_json);
  token.push_back('.');
  token += Base64UrlEncode(payload_json);
  ASSIGN_OR_RETURN(std::string signature, SignBytes(key.evp(), alg, token));
  token.push_back('.');
  token += Base64UrlEncode(signature);
  return token;
}

absl::StatusOr<JwsSigner> JwsSigner::Create(crypto::PrivateKey key, std::string kid) {
  ASSIGN_OR_RETURN(Algorithm alg, AlgorithmForKey(key.public_key()));
  return JwsSigner(std::move(key), std::move(kid), alg);
}

absl::StatusOr<std::string> JwsSigner::Sign(const json& protected_header,
                                            const json& payload) const {
  if (!protected_header.is_object()) {
    return absl::InvalidArgumentError("JWS protected header must be a JSON object");
  }
  if (!payload.is_object()) return absl::InvalidArgumentError("JWS payload must be a JSON object");
  if (protected_header.contains("crit") || protected_header.contains("b64")) {
    return absl::InvalidArgumentError("JWS header must not contain 'crit' or 'b64'");
  }
  json header = protected_header;
  const std::string_view alg_name = AlgorithmName(alg_);
  if (auto it = header.find("alg"); it != header.end()) {
    if (!it->is_string() || it->get_ref<const std::string&>() != alg_name) {
      return absl::InvalidArgumentError(
          absl::StrCat("JWS header alg ",
                       it->is_string() ? internal::QuoteForError(it->get_ref<const std::string&>())
                                       : absl::StrCat("of type ", it->type_name()),
                       " does not match the signing key's ", internal::Sv(alg_name)));
    }
  } else {
    header["alg"] = alg_name;
  }
  if (!kid_.empty() && !header.contains("kid")) header["kid"] = kid_;
  ASSIGN_OR_RETURN(std::string header_json, internal::DumpCompact(header));
  ASSIGN_OR_RETURN(std::string payload_json, internal::DumpCompact(payload));
  return SignCompact(key_, alg_, header_json, payload_json);
}

// ---------------------------------------------------------------------------- parsing

absl::StatusOr<ParsedJws> ParseCompact(std::string_view token, size_t max_len) {
  if (token.size() > max_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS is ", token.size(), " bytes, over the ", max_len, "-byte limit"));
  }
  const size_t dot1 = token.find('.');
  const size_t dot2 = dot1 == std::string_view::npos ? dot1 : token.find('.', dot1 + 1);
  if (dot2 == std::string_view::npos || token.find('.', dot2 + 1) != std::string_view::npos) {
    return absl::InvalidArgumentError("compact JWS must have exactly three dot-separated parts");
  }
  auto header_bytes = Base64UrlDecode(token.substr(0, dot1));
  if (!header_bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS header: ", header_bytes.status().message()));
  }
  auto payload_bytes = Base64UrlDecode(token.substr(dot1 + 1, dot2 - dot1 - 1));
  if (!payload_bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS payload: ", payload_bytes.status().message()));
  }
  auto signature = Base64UrlDecode(token.substr(dot2 + 1));
  if (!signature.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWS signature: ", signature.status().message()));
  }
  if (signature->empty()) return absl::InvalidArgumentError("JWS signature is empty");

  ParsedJws out;
  absl::StatusOr<json> header = ParseStrictJson(*header_bytes);
  if (!header.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWS header: ", header.status().message()));
  }
  out.header = *std::move(header);
  if (!out.header.is_object()) return absl::InvalidArgumentError("JWS header is not a JSON object");
  auto alg_it = out.header.find("alg");
  if (alg_it == out.header.end() || !alg_it->is_string()) {
    return absl::InvalidArgumentError("JWS header 'alg' is missing or not a string");
  }
  ASSIGN_OR_RETURN(out.alg, AlgorithmFromName(alg_it->get_ref<const std::string&>()));
  // RFC 7515 §4.1.11: a recipient that does not understand a listed extension must reject the
  // JWS; we implement none, so any "crit" is refused. "b64" (RFC 7797) would change what the
  // signature covers.
  if (out.header.contains("crit")) {
    return absl::InvalidArgumentError("JWS header 'crit' is not supported");
  }
  if (out.header.contains("b64")) {
    return absl::InvalidArgumentError("JWS header 'b64' (unencoded payload) is not supported");
  }
  absl::StatusOr<json> payload = ParseStrictJson(*payload_bytes);
  if (!payload.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWS payload: ", payload.status().message()));
  }
  out.payload = *std::move(payload);
  if (!out.payload.is_object()) {
    return absl::InvalidArgumentError("JWS payload is not a JSON object");
  }
  out.signing_input = std::string(token.substr(0, dot2));
  out.signature = *std::move(signature);
  return out;
}

// ---------------------------------------------------------------------------- verification

absl::Status VerifySignature(const ParsedJws& jws, const crypto::PublicKey& key) {
  RETURN_IF_ERROR(CheckKeyMatchesAlgorithm(key, jws.alg));
  const Scheme scheme = SchemeFor(jws.alg);
  std::string der;  // ECDSA only
  std::string_view signature = jws.signature;
  if (scheme.ecdsa_width > 0) {
    if (signature.size() != 2 * scheme.ecdsa_width) {
      return absl::UnauthenticatedError(absl::StrCat(internal::Sv(AlgorithmName(jws.alg)),
                                                     " signature must be ", 2 * scheme.ecdsa_width,
                                                     " bytes (raw r||s), got ", signature.size()));
    }
    auto converted = RawToDerEcdsa(signature, scheme.ecdsa_width);
    if (!converted.ok()) return converted.status();
    der = *std::move(converted);
    signature = der;
  } else {
    const size_t expected =
        jws.alg == Algorithm::kEdDSA ? 64 : static_cast<size_t>(EVP_PKEY_get_size(key.evp()));
    if (signature.size() != expected) {
      return absl::UnauthenticatedError(absl::StrCat(internal::Sv(AlgorithmName(jws.alg)),
                                                     " signature must be ", expected,
                                                     " bytes, got ", signature.size()));
    }
  }
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx) return absl::InternalError("EVP_MD_CTX_new failed");
  if (!InitContext(ctx.get(), key.evp(), scheme, /*sign=*/false)) {
    return absl::InternalError(absl::StrCat("JWS verify init failed: ", crypto::OpenSslErrors()));
  }
  const int rc = EVP_DigestVerify(
      ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
      reinterpret_cast<const unsigned char*>(jws.signing_input.data()), jws.signing_input.size());
  if (rc != 1) {
    // Drop OpenSSL's reason for the mismatch: it is the expected outcome for a bad token and
    // would otherwise linger in this thread's error queue.
    ERR_clear_error();
    return SignatureMismatch();
  }
  return absl::OkStatus();
}

}  // namespace mandate::jose
