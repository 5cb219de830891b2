// X509-SVID verification against trust bundles (go-spiffe's x509svid.Verify).
//
// Thread-safety: pure functions; safe to call concurrently (the bundle source must be too).
#ifndef MANDATE_SDK_INCLUDE_MANDATE_X509SVID_H_
#define MANDATE_SDK_INCLUDE_MANDATE_X509SVID_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "mandate/bundle.h"

namespace mandate {

// The result of a successful verification; only VerifyX509Svid produces one.
struct VerifiedX509Svid {
  std::string spiffe_id;
  // The verified path as DER, leaf first, ending with the trust anchor from the bundle.
  std::vector<std::string> verified_chain_der;
};

// Verifies an X509-SVID chain (DER certificates, leaf first, then intermediates) presented by a
// peer. The trust domain is taken from the leaf's URI SAN, which must be a valid SPIFFE ID; its
// bundle is looked up in `bundles` and the chain is path-validated against it at `now` (Unix
// seconds; 0 = the current time) with the SPIFFE leaf rules (one URI SAN, CA:FALSE, key usage).
// Errors: InvalidArgument for an empty or unparsable chain or a leaf without a valid SPIFFE ID;
// NotFound (message names the trust domain) when there is no bundle for it; Unauthenticated when
// the chain does not verify (message names the broken rule, e.g. an expired certificate).
absl::StatusOr<VerifiedX509Svid> VerifyX509Svid(const std::vector<std::string>& chain_der,
                                                const X509BundleSource& bundles, int64_t now = 0);

}  // namespace mandate

#endif  // MANDATE_SDK_INCLUDE_MANDATE_X509SVID_H_
