#include "mandate/bundle.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/jose/jose.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/status_macros.h"
#include "sdk/src/pem.h"

namespace mandate {

absl::StatusOr<std::string> NormalizeTrustDomain(std::string_view trust_domain) {
  std::string_view name = trust_domain;
  if (name.starts_with(spiffe::kSpiffeScheme)) {
    // A trust domain ID: exactly "spiffe://<td>" with no path.
    ASSIGN_OR_RETURN(spiffe::SpiffeId id, spiffe::SpiffeId::Parse(name));
    if (!id.path().empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", std::string(trust_domain), "' is a SPIFFE ID with a path, not a trust domain"));
    }
    return id.trust_domain().name();
  }
  ASSIGN_OR_RETURN(spiffe::TrustDomain td, spiffe::TrustDomain::Parse(name));
  return td.name();
}

absl::StatusOr<X509Bundle> X509Bundle::FromPem(std::string_view trust_domain,
                                               std::string_view pem) {
  X509Bundle bundle;
  ASSIGN_OR_RETURN(bundle.trust_domain, NormalizeTrustDomain(trust_domain));
  auto certs = crypto::Certificate::ParsePemChain(pem);
  if (!certs.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "X.509 bundle for trust domain '", bundle.trust_domain, "': ", certs.status().message()));
  }
  for (const crypto::Certificate& cert : *certs) {
    bundle.ca_der.push_back(cert.Der());
  }
  return bundle;
}

std::string X509Bundle::Pem() const {
  std::string out;
  for (const std::string& der : ca_der) {
    out += sdk_internal::PemEncode("CERTIFICATE", der);
  }
  return out;
}

absl::StatusOr<JwtBundle> JwtBundle::FromJwks(std::string_view trust_domain,
                                              std::string_view jwks_json) {
  JwtBundle bundle;
  ASSIGN_OR_RETURN(bundle.trust_domain, NormalizeTrustDomain(trust_domain));
  auto set = jose::JwkSet::Parse(jwks_json);
  if (!set.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "JWT bundle for trust domain '", bundle.trust_domain, "': ", set.status().message()));
  }
  bundle.jwks_json = std::string(jwks_json);
  return bundle;
}

absl::Status BundleSet::AddX509Bundle(X509Bundle bundle) {
  ASSIGN_OR_RETURN(bundle.trust_domain, NormalizeTrustDomain(bundle.trust_domain));
  std::string key = bundle.trust_domain;
  x509_bundles_.insert_or_assign(std::move(key), std::move(bundle));
  return absl::OkStatus();
}

absl::Status BundleSet::AddJwtBundle(JwtBundle bundle) {
  ASSIGN_OR_RETURN(bundle.trust_domain, NormalizeTrustDomain(bundle.trust_domain));
  std::string key = bundle.trust_domain;
  jwt_bundles_.insert_or_assign(std::move(key), std::move(bundle));
  return absl::OkStatus();
}

absl::StatusOr<X509Bundle> BundleSet::GetX509BundleForTrustDomain(
    std::string_view trust_domain) const {
  auto it = x509_bundles_.find(trust_domain);
  if (it == x509_bundles_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no X.509 bundle for trust domain '", std::string(trust_domain), "'"));
  }
  return it->second;
}

absl::StatusOr<JwtBundle> BundleSet::GetJwtBundleForTrustDomain(
    std::string_view trust_domain) const {
  auto it = jwt_bundles_.find(trust_domain);
  if (it == jwt_bundles_.end()) {
    return absl::NotFoundError(
        absl::StrCat("no JWT bundle for trust domain '", std::string(trust_domain), "'"));
  }
  return it->second;
}

}  // namespace mandate
