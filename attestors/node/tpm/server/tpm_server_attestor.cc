#include "attestors/node/tpm/server/tpm_server_attestor.h"

#include <openssl/objects.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "attestors/node/tpm/server/tpm_credential.h"
#include "broker/common/crypto/openssl_free.h"
#include "broker/common/util/status_macros.h"
#include "mandate/node/v1/tpm.pb.h"

namespace mandate::attestors {
namespace {

template <auto Fn>
using Deleter = crypto::OpenSslFree<Fn>;
using X509StorePtr = std::unique_ptr<X509_STORE, Deleter<X509_STORE_free>>;
using X509StoreCtxPtr = std::unique_ptr<X509_STORE_CTX, Deleter<X509_STORE_CTX_free>>;
using GeneralNamesPtr = std::unique_ptr<GENERAL_NAMES, Deleter<GENERAL_NAMES_free>>;
using Asn1ObjectPtr = std::unique_ptr<ASN1_OBJECT, Deleter<ASN1_OBJECT_free>>;
struct X509StackDeleter {
  // The stack borrows its certificates from the options (sk_X509_free does not free elements).
  void operator()(STACK_OF(X509) * stack) const { sk_X509_free(stack); }
};
using X509StackPtr = std::unique_ptr<STACK_OF(X509), X509StackDeleter>;

// Upper bounds far above any real structure, checked before parsing.
constexpr size_t kMaxPayloadBytes = 16 * 1024;
constexpr size_t kMaxResponseBytes = 16 * 1024;
constexpr size_t kMaxEkCertificateBytes = 8 * 1024;
constexpr size_t kSessionIdBytes = 16;
constexpr size_t kNonceBytes = 32;
constexpr size_t kSecretBytes = 32;
// TCG EK Credential Profile: TPM manufacturer attribute in the SAN directoryName.
constexpr const char* kTpmManufacturerOid = "2.23.133.2.1";

bool IsHex64(std::string_view text) {
  return text.size() == 64 &&
         std::all_of(text.begin(), text.end(), [](char c) { return absl::ascii_isxdigit(c); });
}

TpmServerOptions Normalize(TpmServerOptions options) {
  for (std::string& hash : options.ek_hash_allowlist) hash = absl::AsciiStrToLower(hash);
  std::sort(options.pcr_indices.begin(), options.pcr_indices.end());
  return options;
}

bool HasEkCertificateEku(const crypto::Certificate& cert) {
  auto* ekus = static_cast<EXTENDED_KEY_USAGE*>(
      X509_get_ext_d2i(cert.x509(), NID_ext_key_usage, nullptr, nullptr));
  if (ekus == nullptr) return false;
  Asn1ObjectPtr wanted(OBJ_txt2obj("2.23.133.8.1", /*no_name=*/1));
  bool found = false;
  for (int i = 0; wanted && i < sk_ASN1_OBJECT_num(ekus); ++i) {
    if (OBJ_cmp(sk_ASN1_OBJECT_value(ekus, i), wanted.get()) == 0) found = true;
  }
  EXTENDED_KEY_USAGE_free(ekus);
  return found;
}

// Verifies `ek_cert` up to a self-signed certificate of `configured`; returns the certificate
// that issued `ek_cert`.
absl::StatusOr<crypto::Certificate> VerifyEkCertificate(
    const crypto::Certificate& ek_cert, const std::vector<crypto::Certificate>& configured,
    int64_t now) {
  // Only an EK certificate vouches for a TPM: a CA that also signs ordinary software keys must
  // not make those keys pass as EKs. TCG EK Credential Profile: not a CA, and the EKU
  // tcg-kp-EKCertificate (2.23.133.8.1).
  if (ek_cert.is_ca()) {
    return absl::PermissionDeniedError("EK certificate is a CA certificate");
  }
  if (!HasEkCertificateEku(ek_cert)) {
    return absl::PermissionDeniedError(
        "EK certificate lacks the TCG EK certificate extended key usage (2.23.133.8.1)");
  }
  X509StorePtr store(X509_STORE_new());
  X509StackPtr intermediates(sk_X509_new_null());
  if (!store || !intermediates) return absl::InternalError("X509_STORE_new failed");
  for (const crypto::Certificate& cert : configured) {
    if (X509_self_signed(cert.x509(), /*verify_signature=*/1) == 1) {
      if (X509_STORE_add_cert(store.get(), cert.x509()) != 1) {
        return absl::InternalError(absl::StrCat("adding EK CA: ", crypto::OpenSslErrors()));
      }
    } else if (sk_X509_push(intermediates.get(), cert.x509()) <= 0) {
      return absl::InternalError("adding EK intermediate failed");
    }
  }
  crypto::OpenSslErrors();  // X509_self_signed may leave errors for non-self-signed certs
  X509StoreCtxPtr ctx(X509_STORE_CTX_new());
  if (!ctx ||
      X509_STORE_CTX_init(ctx.get(), store.get(), ek_cert.x509(), intermediates.get()) != 1) {
    return absl::InternalError("X509_STORE_CTX_init failed");
  }
  X509_STORE_CTX_set_time(ctx.get(), 0, static_cast<time_t>(now));
  if (X509_verify_cert(ctx.get()) != 1) {
    int error = X509_STORE_CTX_get_error(ctx.get());
    crypto::OpenSslErrors();
    return absl::PermissionDeniedError(
        absl::StrCat("untrusted EK CA: ", X509_verify_cert_error_string(error)));
  }
  STACK_OF(X509)* chain = X509_STORE_CTX_get0_chain(ctx.get());
  if (chain == nullptr || sk_X509_num(chain) < 2) {
    return absl::PermissionDeniedError("untrusted EK CA: the EK certificate is itself a root");
  }
  auto issuer = crypto::Certificate::FromX509(sk_X509_value(chain, 1));
  if (!issuer.ok()) return absl::InternalError("copying the EK issuer certificate failed");
  return issuer;
}

// The TCG manufacturer attribute as "id:XXXXXXXX" (uppercase hex), or nullopt.
std::optional<std::string> TpmManufacturer(const crypto::Certificate& ek_cert) {
  GeneralNamesPtr names(static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(ek_cert.x509(), NID_subject_alt_name, nullptr, nullptr)));
  Asn1ObjectPtr oid(OBJ_txt2obj(kTpmManufacturerOid, /*no_name=*/1));
  if (!names || !oid) return std::nullopt;
  for (int i = 0; i < sk_GENERAL_NAME_num(names.get()); ++i) {
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names.get(), i);
    if (name->type != GEN_DIRNAME) continue;
    X509_NAME* dir = name->d.directoryName;
    for (int j = 0; j < X509_NAME_entry_count(dir); ++j) {
      X509_NAME_ENTRY* entry = X509_NAME_get_entry(dir, j);
      if (OBJ_cmp(X509_NAME_ENTRY_get_object(entry), oid.get()) != 0) continue;
      const ASN1_STRING* data = X509_NAME_ENTRY_get_data(entry);
      std::string_view value(reinterpret_cast<const char*>(ASN1_STRING_get0_data(data)),
                             static_cast<size_t>(ASN1_STRING_length(data)));
      if (value.size() != 11 || !value.starts_with("id:") ||
          !std::all_of(value.begin() + 3, value.end(),
                       [](char c) { return absl::ascii_isxdigit(c); })) {
        return std::nullopt;
      }
      return absl::StrCat(
          "id:", absl::AsciiStrToUpper(absl::string_view(value.data() + 3, value.size() - 3)));
    }
  }
  return std::nullopt;
}

std::string_view AsView(const std::string& s) { return s; }

}  // namespace

absl::Status ValidateTpmServerOptions(const TpmServerOptions& options) {
  for (const std::string& hash : options.ek_hash_allowlist) {
    if (!IsHex64(hash)) {
      return absl::InvalidArgumentError(absl::StrCat("TPM EK hash \"", hash.substr(0, 80),
                                                     "\" is not 64 hex characters (sha256)"));
    }
  }
  if (options.pcr_indices.empty() || options.pcr_indices.size() > 24) {
    return absl::InvalidArgumentError("TPM PCR list must hold 1 to 24 indices");
  }
  std::vector<uint32_t> sorted = options.pcr_indices;
  std::sort(sorted.begin(), sorted.end());
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return absl::InvalidArgumentError("TPM PCR list repeats an index");
  }
  if (sorted.back() > 23) {
    return absl::InvalidArgumentError(
        absl::StrCat("TPM PCR index ", sorted.back(), " is not in 0..23"));
  }
  if (options.session_ttl_seconds < 1 || options.session_ttl_seconds > 600) {
    return absl::InvalidArgumentError("TPM session TTL must be 1 to 600 seconds");
  }
  return absl::OkStatus();
}

TpmServerAttestor::TpmServerAttestor(TpmServerOptions options, store::Store& store,
                                     const Clock& clock, spiffe::TrustDomain td)
    : options_(Normalize(std::move(options))),
      options_status_(ValidateTpmServerOptions(options_)),
      store_(store),
      clock_(clock),
      trust_domain_(std::move(td)) {}

absl::StatusOr<NodeAttestationResult> TpmServerAttestor::Attest(
    const NodeAttestationRequest& request, const ChallengeFn& challenge) {
  if (!options_status_.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("TPM attestor misconfigured: ", options_status_.message()));
  }

  // ---- 1. Payload and EK trust.
  node::v1::TpmAttestationPayload payload;
  if (request.payload.size() > kMaxPayloadBytes ||
      !payload.ParseFromArray(request.payload.data(), static_cast<int>(request.payload.size()))) {
    return absl::PermissionDeniedError("TPM attestation payload malformed");
  }
  if (payload.ek_certificate().size() > kMaxEkCertificateBytes) {
    return absl::PermissionDeniedError("EK certificate too large");
  }
  ASSIGN_OR_RETURN(TPMT_PUBLIC ek_public_sent,
                   tpm::UnmarshalPublic(payload.ek_public(), "EK public"));
  auto ek_key_sent = tpm::PublicKeyFromTpm(ek_public_sent);
  if (!ek_key_sent.ok()) {
    return absl::PermissionDeniedError(absl::StrCat("EK public: ", ek_key_sent.status().message()));
  }

  std::optional<crypto::Certificate> ek_cert;
  std::optional<crypto::Certificate> ek_issuer;
  if (!payload.ek_certificate().empty()) {
    auto parsed = crypto::Certificate::FromDer(payload.ek_certificate());
    if (!parsed.ok()) {
      return absl::PermissionDeniedError(
          absl::StrCat("EK certificate malformed: ", parsed.status().message()));
    }
    ek_cert = *std::move(parsed);
    if (!ek_cert->public_key().Equals(*ek_key_sent)) {
      return absl::PermissionDeniedError("EK public key does not match its certificate");
    }
  }
  // The node ID hashes the key as the TPM reports it (uncompressed points), so it matches the
  // agent's EkHashHex and operators' allowlists whatever encoding the certificate uses; the
  // certificate's key was just shown to be the same key.
  const crypto::PublicKey ek_key = *ek_key_sent;
  const std::string ek_hash = crypto::HexEncode(crypto::Sha256(ek_key.SpkiDer()));
  const bool allowlisted =
      std::find(options_.ek_hash_allowlist.begin(), options_.ek_hash_allowlist.end(), ek_hash) !=
      options_.ek_hash_allowlist.end();
  if (!allowlisted) {
    if (!ek_cert) {
      return absl::PermissionDeniedError(
          "EK not trusted: no EK certificate and EK hash not allowlisted");
    }
    ASSIGN_OR_RETURN(
        ek_issuer, VerifyEkCertificate(*ek_cert, options_.ek_ca_certificates, clock_.NowSeconds()));
  }

  // ---- 2. The EK public area MakeCredential uses: TCG template + the trusted key.
  ASSIGN_OR_RETURN(TPMT_PUBLIC ek_area, tpm::EkPublicAreaFromKey(ek_key));

  // ---- 3. The AK.
  ASSIGN_OR_RETURN(TPMT_PUBLIC ak_area, tpm::UnmarshalPublic(payload.ak_public(), "AK public"));
  RETURN_IF_ERROR(tpm::CheckAttestationKey(ak_area).status());
  ASSIGN_OR_RETURN(std::string ak_name, tpm::TpmName(ak_area));

  // ---- 4. Challenge.
  ASSIGN_OR_RETURN(std::string secret, crypto::RandomBytes(kSecretBytes));
  ASSIGN_OR_RETURN(std::string nonce, crypto::RandomBytes(kNonceBytes));
  ASSIGN_OR_RETURN(std::string session_id, crypto::RandomBytes(kSessionIdBytes));
  ASSIGN_OR_RETURN(tpm::MadeCredential credential, tpm::MakeCredential(ek_area, ak_name, secret));
  node::v1::TpmChallenge challenge_message;
  challenge_message.set_session_id(session_id);
  challenge_message.set_credential_blob(credential.credential_blob);
  challenge_message.set_encrypted_secret(credential.encrypted_secret);
  challenge_message.set_nonce(nonce);
  for (uint32_t index : options_.pcr_indices) challenge_message.add_pcr_indices_sha256(index);
  const int64_t sent_at = clock_.NowSeconds();
  ASSIGN_OR_RETURN(std::string answer, challenge(challenge_message.SerializeAsString()));

  // ---- 5. The answer.
  node::v1::TpmChallengeResponse response;
  if (answer.size() > kMaxResponseBytes ||
      !response.ParseFromArray(answer.data(), static_cast<int>(answer.size()))) {
    return absl::PermissionDeniedError("TPM challenge response malformed");
  }
  if (response.session_id().size() != session_id.size() ||
      !crypto::ConstantTimeEquals(response.session_id(), session_id)) {
    return absl::PermissionDeniedError("TPM challenge response is for another session");
  }
  const int64_t now = clock_.NowSeconds();
  if (now < sent_at || now - sent_at > options_.session_ttl_seconds) {
    return absl::PermissionDeniedError(absl::StrCat(
        "TPM challenge answered too late (session lasts ", options_.session_ttl_seconds, " s)"));
  }
  ASSIGN_OR_RETURN(std::string expected_proof,
                   tpm::ActivationProof(secret, session_id, nonce, ak_name));
  if (response.activation_proof().size() != expected_proof.size() ||
      !crypto::ConstantTimeEquals(response.activation_proof(), expected_proof)) {
    return absl::PermissionDeniedError("wrong activation answer");
  }
  std::vector<std::string> pcr_values(response.pcr_values_sha256().begin(),
                                      response.pcr_values_sha256().end());
  const std::string qualifying_data = crypto::Sha256(absl::StrCat(
      nonce, absl::string_view(request.csr_spki_der.data(), request.csr_spki_der.size())));
  ASSIGN_OR_RETURN(tpm::VerifiedQuote quote,
                   tpm::VerifyQuote(ak_area, response.quote(), response.quote_signature(),
                                    qualifying_data, options_.pcr_indices, pcr_values));
  absl::Status advanced = store_.AdvanceTpmCounters(
      ek_hash, store::TpmCounters{quote.reset_count, quote.restart_count});
  if (absl::IsFailedPrecondition(advanced)) {
    return absl::PermissionDeniedError(
        absl::StrCat("counters going backwards: ", advanced.message()));
  }
  RETURN_IF_ERROR(advanced);

  // ---- 6. Identity.
  NodeAttestationResult result;
  result.node_spiffe_id = absl::StrCat("spiffe://", trust_domain_.name(), "/node/tpm/", ek_hash);
  result.selectors.push_back(absl::StrCat("tpm:ek_hash:", ek_hash));
  if (ek_issuer) {
    result.selectors.push_back(
        absl::StrCat("tpm:ek_ca:", crypto::HexEncode(crypto::Sha256(ek_issuer->Der()))));
  }
  // Certificate contents count only when its chain was verified (an allowlisted EK may present
  // any certificate).
  if (ek_cert && ek_issuer) {
    if (std::optional<std::string> manufacturer = TpmManufacturer(*ek_cert)) {
      result.selectors.push_back(absl::StrCat("tpm:manufacturer:", *manufacturer));
    }
  }
  for (size_t i = 0; i < options_.pcr_indices.size(); ++i) {
    result.selectors.push_back(absl::StrCat("tpm:pcr:sha256:", options_.pcr_indices[i], ":",
                                            crypto::HexEncode(AsView(pcr_values[i]))));
  }
  return result;
}

}  // namespace mandate::attestors
