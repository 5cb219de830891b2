#include "broker/server/trust_authority.h"

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

using nlohmann::json;

absl::StatusOr<crypto::Certificate> LoadOrCreateCa(const std::string& path,
                                                   const crypto::PrivateKey& key,
                                                   const spiffe::TrustDomain& td, int64_t now,
                                                   int64_t ttl) {
  auto pem = crypto::ReadFile(path);
  if (pem.ok()) {
    ASSIGN_OR_RETURN(auto chain, crypto::Certificate::ParsePemChain(*pem));
    const crypto::Certificate& cert = chain.front();
    if (!cert.public_key().Equals(key.public_key())) {
      return absl::DataLossError(absl::StrCat(path, " does not match ca.key"));
    }
    auto sans = cert.UriSans();
    if (sans.size() != 1 || sans[0] != td.IdString()) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " belongs to another trust domain than ", td.IdString(),
                       "; use the data dir of that trust domain or a new one"));
    }
    if (cert.not_after() <= now) {
      return absl::FailedPreconditionError(absl::StrCat(path, " has expired"));
    }
    return cert;
  }
  if (!absl::IsNotFound(pem.status())) return pem.status();
  crypto::CaOptions options;
  options.trust_domain_id = td.IdString();
  options.not_before = now - 60;  // Tolerate small clock skew on verifiers.
  options.not_after = now + ttl;
  ASSIGN_OR_RETURN(crypto::Certificate cert, crypto::CreateSelfSignedCa(key, options));
  RETURN_IF_ERROR(crypto::WriteFileAtomic(path, cert.Pem(), 0644));
  return cert;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TrustAuthority>> TrustAuthority::LoadOrCreate(const Options& options,
                                                                             const Clock& clock) {
  const std::string& dir = options.data_dir;
  ASSIGN_OR_RETURN(crypto::PrivateKey ca_key, crypto::LoadOrCreateP256Key(dir + "/ca.key"));
  ASSIGN_OR_RETURN(crypto::Certificate ca_cert,
                   LoadOrCreateCa(dir + "/ca.pem", ca_key, options.trust_domain, clock.NowSeconds(),
                                  options.ca_ttl_seconds));
  ASSIGN_OR_RETURN(crypto::PrivateKey jwt_key, crypto::LoadOrCreateP256Key(dir + "/jwt.key"));
  std::unique_ptr<TrustAuthority> authority(new TrustAuthority(
      options.trust_domain, clock, std::move(ca_key), std::move(ca_cert), std::move(jwt_key)));
  RETURN_IF_ERROR(authority->BuildDocuments(options.bundle_refresh_hint_seconds));
  RETURN_IF_ERROR(crypto::WriteFileAtomic(dir + "/bundle.pem", authority->bundle_pem_, 0644));
  return authority;
}

absl::Status TrustAuthority::BuildDocuments(int64_t refresh_hint) {
  ASSIGN_OR_RETURN(jwt_kid_, jose::JwkThumbprint(jwt_key_.public_key()));
  ASSIGN_OR_RETURN(json jwk, jose::PublicKeyToJwk(jwt_key_.public_key()));
  bundle_pem_ = ca_cert_.Pem();
  bundle_der_ = ca_cert_.Der();

  json oidc_key = jwk;
  oidc_key["use"] = "sig";
  oidc_key["alg"] = "ES256";
  oidc_key["kid"] = jwt_kid_;
  oidc_jwks_ = json{{"keys", json::array({oidc_key})}}.dump();

  ASSIGN_OR_RETURN(json ca_jwk, jose::PublicKeyToJwk(ca_cert_.public_key()));
  ca_jwk["use"] = "x509-svid";
  ca_jwk["x5c"] = json::array({crypto::Base64Encode(ca_cert_.Der())});
  json jwt_svid_key = jwk;
  jwt_svid_key["use"] = "jwt-svid";
  jwt_svid_key["kid"] = jwt_kid_;
  spiffe_bundle_ = json{
      {"keys", json::array({ca_jwk, jwt_svid_key})},
      {"spiffe_sequence", 1},
      {"spiffe_refresh_hint",
       refresh_hint}}.dump();
  jwt_bundle_ = json{{"keys", json::array({jwt_svid_key})}}.dump();
  return absl::OkStatus();
}

namespace {

crypto::LeafOptions SvidLeafOptions(const std::string& spiffe_id, int64_t now, int64_t ttl) {
  crypto::LeafOptions leaf;
  leaf.spiffe_id = spiffe_id;
  leaf.not_before = now - 10;
  leaf.not_after = now + ttl;
  return leaf;
}

}  // namespace

absl::StatusOr<crypto::Certificate> TrustAuthority::SignX509Svid(
    const crypto::PublicKey& subject_key, const std::string& spiffe_id, int64_t ttl_seconds) const {
  return crypto::SignLeaf(ca_cert_, ca_key_, subject_key,
                          SvidLeafOptions(spiffe_id, clock_.NowSeconds(), ttl_seconds));
}

absl::StatusOr<crypto::IssuedCertificate> TrustAuthority::SignX509SvidDer(
    const crypto::PublicKey& subject_key, const std::string& spiffe_id, int64_t ttl_seconds) const {
  return crypto::SignLeafDer(ca_cert_, ca_key_, subject_key,
                             SvidLeafOptions(spiffe_id, clock_.NowSeconds(), ttl_seconds));
}

absl::StatusOr<crypto::Certificate> TrustAuthority::SignServerCertificate(
    const crypto::PublicKey& key, int64_t ttl_seconds) const {
  int64_t now = clock_.NowSeconds();
  crypto::LeafOptions leaf;
  leaf.spiffe_id = spiffe::BrokerId(trust_domain_).str();
  leaf.not_before = now - 60;
  leaf.not_after = now + ttl_seconds;
  leaf.dns_sans = {"localhost"};
  leaf.ip_sans = {"127.0.0.1", "::1"};
  leaf.server_only = true;
  return crypto::SignLeaf(ca_cert_, ca_key_, key, leaf);
}

absl::StatusOr<std::string> TrustAuthority::SignJws(std::string_view typ,
                                                    std::string_view payload_json) const {
  json header = {{"alg", "ES256"}, {"kid", jwt_kid_}, {"typ", std::string(typ)}};
  return jose::SignCompact(jwt_key_, jose::Algorithm::kES256, header.dump(), payload_json);
}

}  // namespace mandate::broker
