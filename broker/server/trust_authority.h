// The broker's signing material: the X.509 CA and the JWT signing key of one trust domain.
//
// Keys are created on first start in the data dir (files of mode 0600) and reused after, so a
// restart keeps every issued credential verifiable. The authority signs but never hands out key
// bytes; the documents it publishes (bundle PEM, OIDC JWKS, SPIFFE bundle) are built once at
// load time, because they only change when keys change.
//
// Thread-safety: immutable after LoadOrCreate; every method may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_TRUST_AUTHORITY_H_
#define MANDATE_BROKER_SERVER_TRUST_AUTHORITY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/clock.h"

namespace mandate::broker {

class TrustAuthority {
 public:
  struct Options {
    std::string data_dir;
    spiffe::TrustDomain trust_domain;
    int64_t ca_ttl_seconds = 365 * 24 * 3600;
    int64_t bundle_refresh_hint_seconds = 300;
  };

  // Loads ca.key, ca.pem and jwt.key from the data dir, creating what is missing. Writes
  // bundle.pem (the trust bundle agents bootstrap from) every time.
  static absl::StatusOr<std::unique_ptr<TrustAuthority>> LoadOrCreate(const Options& options,
                                                                      const Clock& clock);

  const spiffe::TrustDomain& trust_domain() const { return trust_domain_; }
  const crypto::Certificate& ca_certificate() const { return ca_cert_; }
  std::vector<crypto::Certificate> x509_roots() const { return {ca_cert_}; }

  // Signs an X509-SVID for `spiffe_id` over `subject_key`, valid [now, now + ttl].
  absl::StatusOr<crypto::Certificate> SignX509Svid(const crypto::PublicKey& subject_key,
                                                   const std::string& spiffe_id,
                                                   int64_t ttl_seconds) const;
  // The same certificate, returned encoded only (no re-parse): for issuance, which hands on DER.
  absl::StatusOr<crypto::IssuedCertificate> SignX509SvidDer(const crypto::PublicKey& subject_key,
                                                            const std::string& spiffe_id,
                                                            int64_t ttl_seconds) const;
  // The broker's own TLS certificate (spiffe://<td>/broker, DNS:localhost, IP:127.0.0.1).
  absl::StatusOr<crypto::Certificate> SignServerCertificate(const crypto::PublicKey& key,
                                                            int64_t ttl_seconds) const;

  // Signs a compact JWS with the JWT key (ES256); `header_json` must not set alg/kid: they are
  // added here. The payload is taken as already-serialised JSON.
  absl::StatusOr<std::string> SignJws(std::string_view typ, std::string_view payload_json) const;

  const std::string& jwt_key_id() const { return jwt_kid_; }
  // The public half of the JWT key, for checking tokens this broker signed (JWT-SVIDs presented
  // back at /token).
  const crypto::PublicKey& jwt_public_key() const { return jwt_public_key_; }
  // PEM of the CA certificates (what bundle.pem holds).
  const std::string& bundle_pem() const { return bundle_pem_; }
  // Concatenated DER CA certificates (the Workload API's bundle form).
  const std::string& bundle_der() const { return bundle_der_; }
  // OIDC JWKS: the JWT signing keys with use=sig, alg, kid.
  const std::string& oidc_jwks() const { return oidc_jwks_; }
  // SPIFFE bundle JWKS: x509-svid keys (x5c) and jwt-svid keys (kid), spiffe_sequence and
  // spiffe_refresh_hint.
  const std::string& spiffe_bundle_jwks() const { return spiffe_bundle_; }
  // Only the JWT-SVID signing keys, as a JWKS: the SPIFFE Workload API's FetchJWTBundles form,
  // which must not carry keys with other uses (X.509 CA entries have no `kid`, and spec-following
  // clients such as go-spiffe reject a JWT bundle containing them).
  const std::string& jwt_bundle_jwks() const { return jwt_bundle_; }

 private:
  TrustAuthority(spiffe::TrustDomain td, const Clock& clock, crypto::PrivateKey ca_key,
                 crypto::Certificate ca_cert, crypto::PrivateKey jwt_key)
      : trust_domain_(std::move(td)),
        clock_(clock),
        ca_key_(std::move(ca_key)),
        ca_cert_(std::move(ca_cert)),
        jwt_key_(std::move(jwt_key)),
        jwt_public_key_(jwt_key_.public_key()) {}
  absl::Status BuildDocuments(int64_t refresh_hint);

  const spiffe::TrustDomain trust_domain_;
  const Clock& clock_;
  const crypto::PrivateKey ca_key_;
  const crypto::Certificate ca_cert_;
  const crypto::PrivateKey jwt_key_;
  const crypto::PublicKey jwt_public_key_;
  std::string jwt_kid_;
  std::string bundle_pem_;
  std::string bundle_der_;
  std::string oidc_jwks_;
  std::string spiffe_bundle_;
  std::string jwt_bundle_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_TRUST_AUTHORITY_H_
