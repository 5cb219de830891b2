// SVIDs as the Workload API hands them to a workload: plain values, no OpenSSL types, so that
// including this header costs nothing.
//
// Secret handling: X509Svid::private_key_pkcs8_der is the workload's private key. It is kept as
// bytes because the workload must hand it to its TLS stack; do not log it.
#ifndef MANDATE_SDK_INCLUDE_MANDATE_SVID_H_
#define MANDATE_SDK_INCLUDE_MANDATE_SVID_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "mandate/bundle.h"

namespace mandate {

struct X509Svid {
  std::string spiffe_id;
  std::vector<std::string> chain_der;  // DER certificates, leaf first
  std::string private_key_pkcs8_der;   // secret
  std::string hint;                    // operator-chosen label; may be empty
  // Unix seconds of the leaf's notAfter (0 when unknown).
  int64_t expires_at = 0;

  // The chain as concatenated PEM "CERTIFICATE" blocks, leaf first.
  std::string ChainPem() const;
  // The private key as a PEM "PRIVATE KEY" (PKCS#8) block. Secret.
  std::string KeyPem() const;
};

struct JwtSvid {
  std::string spiffe_id;
  std::string token;  // compact JWS
  std::string hint;
  // The token's `exp` (Unix seconds), read without verifying the signature: the agent that
  // handed it out is trusted for this; recipients must verify the token themselves.
  int64_t expiry = 0;
};

// One snapshot of the FetchX509SVID stream.
struct X509Context {
  // The first SVID is the default one (SPIFFE Workload API).
  std::vector<X509Svid> svids;
  // The bundles of the SVIDs' own trust domains and the federated ones, keyed by bare trust
  // domain name.
  std::map<std::string, X509Bundle> bundles;

  // A BundleSet holding `bundles`, ready for VerifyX509Svid.
  BundleSet Bundles() const;
};

}  // namespace mandate

#endif  // MANDATE_SDK_INCLUDE_MANDATE_SVID_H_
