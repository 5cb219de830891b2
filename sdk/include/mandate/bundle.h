// Trust bundles and the one-method sources verifiers read them from (go-spiffe's
// x509bundle.Source / jwtbundle.Source).
//
// Trust domains are named by their bare name ("example.org") everywhere in the SDK. Inputs that
// carry the trust domain ID form ("spiffe://example.org", as the Workload API's bundle maps do)
// are normalised to the bare name.
//
// Thread-safety: bundles are plain values. BundleSet is not synchronised: build it, then share
// it read-only (concurrent const calls are safe); guard it yourself if you keep modifying it.
#ifndef MANDATE_SDK_INCLUDE_MANDATE_BUNDLE_H_
#define MANDATE_SDK_INCLUDE_MANDATE_BUNDLE_H_

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate {

// The X.509 trust anchors of one trust domain.
struct X509Bundle {
  std::string trust_domain;         // bare name, e.g. "example.org"
  std::vector<std::string> ca_der;  // one DER certificate per element

  // Parses every CERTIFICATE block of `pem` (at least one). `trust_domain` may be a bare name or
  // a trust domain ID; it must be a valid trust domain. Errors are InvalidArgument.
  static absl::StatusOr<X509Bundle> FromPem(std::string_view trust_domain, std::string_view pem);
  // The CA certificates as concatenated PEM blocks.
  std::string Pem() const;
};

// The JWT signing keys of one trust domain, as a JWKS document (SPIFFE bundle format or plain
// RFC 7517 JWK Set).
struct JwtBundle {
  std::string trust_domain;  // bare name
  std::string jwks_json;

  // Checks that `jwks_json` is a JWK Set whose keys can be imported and that `trust_domain` is
  // valid. Errors are InvalidArgument.
  static absl::StatusOr<JwtBundle> FromJwks(std::string_view trust_domain,
                                            std::string_view jwks_json);
};

// Where X509-SVID verification finds the trust anchors of a trust domain.
class X509BundleSource {
 public:
  virtual ~X509BundleSource() = default;
  // `trust_domain` is a bare name. NotFound when the source has no bundle for it.
  virtual absl::StatusOr<X509Bundle> GetX509BundleForTrustDomain(
      std::string_view trust_domain) const = 0;
};

// Where JWT-SVID verification finds the signing keys of a trust domain.
class JwtBundleSource {
 public:
  virtual ~JwtBundleSource() = default;
  // `trust_domain` is a bare name. NotFound when the source has no bundle for it.
  virtual absl::StatusOr<JwtBundle> GetJwtBundleForTrustDomain(
      std::string_view trust_domain) const = 0;
};

// An in-memory set of bundles keyed by trust domain; implements both sources. Adding a bundle
// for a trust domain that already has one of the same kind replaces it (Workload API streams
// send complete snapshots).
class BundleSet final : public X509BundleSource, public JwtBundleSource {
 public:
  BundleSet() = default;

  // Normalises the bundle's trust domain (bare name) and stores it. InvalidArgument when the
  // trust domain is not valid.
  absl::Status AddX509Bundle(X509Bundle bundle);
  absl::Status AddJwtBundle(JwtBundle bundle);

  absl::StatusOr<X509Bundle> GetX509BundleForTrustDomain(
      std::string_view trust_domain) const override;
  absl::StatusOr<JwtBundle> GetJwtBundleForTrustDomain(
      std::string_view trust_domain) const override;

  // Keyed by bare trust domain name.
  const std::map<std::string, X509Bundle, std::less<>>& x509_bundles() const {
    return x509_bundles_;
  }
  const std::map<std::string, JwtBundle, std::less<>>& jwt_bundles() const { return jwt_bundles_; }

 private:
  std::map<std::string, X509Bundle, std::less<>> x509_bundles_;
  std::map<std::string, JwtBundle, std::less<>> jwt_bundles_;
};

// "spiffe://example.org" or "example.org" -> "example.org", validated. InvalidArgument otherwise.
absl::StatusOr<std::string> NormalizeTrustDomain(std::string_view trust_domain);

}  // namespace mandate

#endif  // MANDATE_SDK_INCLUDE_MANDATE_BUNDLE_H_
