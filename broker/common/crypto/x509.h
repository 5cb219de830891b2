// X.509 for Mandate: the CA certificate, PKCS#10 CSRs, X509-SVID issuance and chain verification.
//
// This module owns every X.509 operation in Mandate. It does not depend on the SPIFFE module:
// SPIFFE IDs come in as strings the caller has already validated with the SPIFFE module, and the
// only SPIFFE-specific checks here are the structural X509-SVID rules (exactly one URI SAN with
// the `spiffe://` scheme, leaf CA:FALSE, key usage). Callers that need the ID's full syntax
// checked parse `VerifiedSvid::spiffe_id` with the SPIFFE module.
//
// Profiles produced (checked by `openssl verify -x509_strict` in the tests):
//   CA:   v3, subject `O=Mandate, CN=<common_name>`, basicConstraints critical CA:TRUE with
//         pathlen:0 (the Mandate CA signs X509-SVIDs directly and never issues sub-CAs; a
//         rotated CA is a new self-signed root, not an intermediate), keyUsage critical
//         keyCertSign+cRLSign+digitalSignature, SKI, URI SAN = the trust domain ID.
//   Leaf: v3, subject `O=Mandate` (non-empty, so the SAN may stay non-critical as RFC 5280
//         allows; Go's crypto/x509 and OpenSSL both accept this, and SPIRE also uses a
//         non-empty subject), one URI SAN (the SPIFFE ID) plus optional DNS/IP SANs,
//         basicConstraints critical CA:FALSE, keyUsage critical digitalSignature only,
//         EKU serverAuth+clientAuth (serverAuth only with `server_only`), SKI and AKI,
//         validity clamped into the CA's validity.
// Both use random 128-bit positive serial numbers and are signed with SHA-256 (ECDSA-SHA256
// for the default P-256 CA key).
//
// Thread-safety: Certificate is an immutable, reference-counted value; const methods may be
// called concurrently from any thread (every Certificate is built by parsing DER, so OpenSSL's
// cached encoding and extension data are complete before it is shared). The free functions
// keep no state and are safe to call concurrently.
//
// Failure behaviour: nothing here throws or aborts on input; every parse or policy failure is
// an absl::Status whose message names the broken rule. Malformed input is InvalidArgument;
// a chain that does not verify is Unauthenticated; OpenSSL allocation or signing failures are
// Internal.
#ifndef MANDATE_BROKER_COMMON_CRYPTO_X509_H_
#define MANDATE_BROKER_COMMON_CRYPTO_X509_H_

#include <openssl/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/common/crypto/keys.h"

namespace mandate::crypto {

struct X509Deleter {
  void operator()(X509* cert) const;
};
using X509Ptr = std::unique_ptr<X509, X509Deleter>;

class Certificate {
 public:
  // Parses one DER certificate. Rejects trailing bytes and certificates whose public key or
  // validity times OpenSSL cannot decode.
  static absl::StatusOr<Certificate> FromDer(std::string_view der);
  // Parses every "CERTIFICATE" PEM block in `pem`, in order. Other PEM block types are skipped;
  // an input with no certificate is an error.
  static absl::StatusOr<std::vector<Certificate>> ParsePemChain(std::string_view pem);
  // Parses certificates concatenated as DER (how the SPIFFE Workload API carries chains and
  // bundles). Rejects empty input and any bytes that are not a whole certificate.
  static absl::StatusOr<std::vector<Certificate>> ParseDerChain(std::string_view concatenated_der);
  // Copies `cert` (for example a TLS peer certificate) by encoding it and parsing the DER
  // again, so the result shares no mutable OpenSSL state with the caller's object and passes
  // the same checks as FromDer. `cert` must not be null.
  static absl::StatusOr<Certificate> FromX509(const X509* cert);

  // Copies share the underlying X509 (reference-counted). A moved-from Certificate may only be
  // assigned to or destroyed.
  Certificate(const Certificate& other);
  Certificate& operator=(const Certificate& other);
  Certificate(Certificate&&) noexcept = default;
  Certificate& operator=(Certificate&&) noexcept = default;
  ~Certificate() = default;

  std::string Der() const;
  std::string Pem() const;
  PublicKey public_key() const;
  // URI subjectAltNames in certificate order; empty when there is no SAN extension (or it is
  // malformed — verification reports that case precisely).
  std::vector<std::string> UriSans() const;
  std::vector<std::string> DnsSans() const;
  // IP SANs in text form ("127.0.0.1", "::1").
  std::vector<std::string> IpSans() const;
  // Lowercase hex of the serial number's magnitude ("-" prefixed if negative).
  std::string SerialHex() const;
  // Validity bounds, Unix seconds.
  int64_t not_before() const { return not_before_; }
  int64_t not_after() const { return not_after_; }
  // True when basicConstraints says CA:TRUE.
  bool is_ca() const;
  // True when the two certificates have the same DER encoding.
  bool Equals(const Certificate& other) const;

  // Borrowed pointer, valid as long as this object (or a copy) lives. Callers must not modify
  // the certificate: it is shared between copies and threads.
  X509* x509() const { return cert_.get(); }

 private:
  // The one constructor path: checks the key and validity decode and caches the extensions.
  static absl::StatusOr<Certificate> Adopt(X509Ptr cert);
  Certificate(X509Ptr cert, int64_t not_before, int64_t not_after)
      : cert_(std::move(cert)), not_before_(not_before), not_after_(not_after) {}
  X509Ptr cert_;
  int64_t not_before_;
  int64_t not_after_;
};

// A random, positive, non-zero 128-bit serial number as lowercase hex (up to 32 digits).
absl::StatusOr<std::string> RandomSerialHex();

// ---------------------------------------------------------------------------- CA

struct CaOptions {
  // "spiffe://example.org": the CA's URI SAN, per the SPIFFE X509-SVID spec for signing certs.
  std::string trust_domain_id;
  std::string common_name = "Mandate CA";
  int64_t not_before = 0;  // Unix seconds.
  int64_t not_after = 0;   // Unix seconds; must be after not_before.
};

// Creates the self-signed CA certificate for `key` (profile in the file comment). The key must
// be P-256, P-384 or RSA (2048..8192 bits).
absl::StatusOr<Certificate> CreateSelfSignedCa(const PrivateKey& key, const CaOptions& options);

// ---------------------------------------------------------------------------- CSR

// Maximum accepted DER CSR size; larger input is refused before parsing.
inline constexpr size_t kMaxCsrDerBytes = 16 * 1024;

// A PKCS#10 CSR for `key`, signed by it, with an empty subject. When `spiffe_id` is non-empty
// it is carried as a URI SAN in an extensionRequest attribute (informational: the broker
// decides the issued identity itself).
absl::StatusOr<std::string> CreateCsrDer(const PrivateKey& key, std::string_view spiffe_id);

struct ParsedCsr {
  PublicKey key;
  std::vector<std::string> uri_sans;
};

// Parses a DER CSR and checks its self-signature (proof that the requester holds the private
// key). Refuses input over kMaxCsrDerBytes, trailing bytes, a bad signature, more than one
// subjectAltName extension request, and keys other than P-256, P-384 or RSA 2048..8192 bits.
absl::StatusOr<ParsedCsr> ParseAndVerifyCsrDer(std::string_view der);

// ---------------------------------------------------------------------------- X509-SVID

struct LeafOptions {
  // Already validated by the SPIFFE module; this function only checks the `spiffe://` prefix.
  std::string spiffe_id;
  int64_t not_before = 0;  // Unix seconds; raised to the CA's not_before if earlier.
  int64_t not_after = 0;   // Unix seconds; lowered to the CA's not_after if later.
  // Extra SANs for TLS hostname checks (the broker's server certificate carries
  // DNS:localhost and IP:127.0.0.1 besides spiffe://<td>/broker).
  std::vector<std::string> dns_sans;
  std::vector<std::string> ip_sans;
  // EKU serverAuth only (instead of serverAuth+clientAuth).
  bool server_only = false;
};

// Issues an X509-SVID for `subject_key`, signed by the CA. Fails if `ca_key` does not match
// `ca_cert`, `ca_cert` is not a CA, the subject key type is not accepted (see
// ParseAndVerifyCsrDer), a SAN is malformed, or the clamped validity is empty.
absl::StatusOr<Certificate> SignLeaf(const Certificate& ca_cert, const PrivateKey& ca_key,
                                     const PublicKey& subject_key, const LeafOptions& options);

// A certificate as issued: its DER and what an issuer records about it, without an OpenSSL
// object. Parsing a certificate back costs more than signing it (OpenSSL 3 decodes its public
// key through the provider decoders), and an issuer only hands the DER on.
struct IssuedCertificate {
  std::string der;
  std::string serial_hex;  // lowercase hex, as Certificate::SerialHex
  int64_t not_before = 0;
  int64_t not_after = 0;
};

// SignLeaf, returning the encoded certificate only: the same checks, the same certificate.
absl::StatusOr<IssuedCertificate> SignLeafDer(const Certificate& ca_cert, const PrivateKey& ca_key,
                                              const PublicKey& subject_key,
                                              const LeafOptions& options);

struct VerifiedSvid {
  std::string spiffe_id;
  // The verified path: the leaf first, ending with the trust anchor from `roots`.
  std::vector<Certificate> chain;
};

// Verifies an X509-SVID chain (leaf first, then any intermediates) against `roots` at time
// `now` (Unix seconds): the SPIFFE leaf rules (exactly one URI SAN with the `spiffe://`
// scheme, CA:FALSE, keyUsage present with digitalSignature and without keyCertSign/cRLSign),
// then RFC 5280 path validation with OpenSSL. As in go-spiffe, every certificate in `roots` is
// a trust anchor even if it is not self-signed (X509_V_FLAG_PARTIAL_CHAIN); choosing the roots
// of the leaf's trust domain is the caller's job. EKU is not checked (go-spiffe does not
// either). Errors: InvalidArgument for an empty chain or no roots; Unauthenticated naming the
// broken rule otherwise (e.g. "certificate has expired (certificate 0 in the chain)").
absl::StatusOr<VerifiedSvid> VerifyX509SvidChain(const std::vector<Certificate>& chain,
                                                 const std::vector<Certificate>& roots,
                                                 int64_t now);

}  // namespace mandate::crypto

#endif  // MANDATE_BROKER_COMMON_CRYPTO_X509_H_
