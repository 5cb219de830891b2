#include "mandate/x509svid.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/clock.h"
#include "broker/common/util/status_macros.h"

namespace mandate {

absl::StatusOr<VerifiedX509Svid> VerifyX509Svid(const std::vector<std::string>& chain_der,
                                                const X509BundleSource& bundles, int64_t now) {
  if (chain_der.empty()) {
    return absl::InvalidArgumentError("X509-SVID chain is empty");
  }
  std::vector<crypto::Certificate> chain;
  chain.reserve(chain_der.size());
  for (size_t i = 0; i < chain_der.size(); ++i) {
    auto cert = crypto::Certificate::FromDer(chain_der[i]);
    if (!cert.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("certificate ", i, " of the X509-SVID chain: ", cert.status().message()));
    }
    chain.push_back(*std::move(cert));
  }

  // The trust domain comes from the leaf itself; the chain check below proves the leaf is
  // genuine, and using any other bundle would let one trust domain vouch for another's IDs.
  std::vector<std::string> uris = chain.front().UriSans();
  if (uris.size() != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("X509-SVID leaf must have exactly one URI SAN, it has ", uris.size()));
  }
  auto id = spiffe::SpiffeId::Parse(uris.front());
  if (!id.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "X509-SVID leaf URI SAN '", uris.front(), "' is not a SPIFFE ID: ", id.status().message()));
  }
  const std::string& td = id->trust_domain().name();
  auto bundle = bundles.GetX509BundleForTrustDomain(td);
  if (!bundle.ok()) {
    return absl::NotFoundError(absl::StrCat("no X.509 bundle for trust domain '", td,
                                            "' of X509-SVID ", id->str(), ": ",
                                            bundle.status().message()));
  }
  std::vector<crypto::Certificate> roots;
  for (const std::string& der : bundle->ca_der) {
    auto root = crypto::Certificate::FromDer(der);
    if (!root.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("X.509 bundle of trust domain '", td, "': ", root.status().message()));
    }
    roots.push_back(*std::move(root));
  }
  if (roots.empty()) {
    return absl::NotFoundError(
        absl::StrCat("the X.509 bundle of trust domain '", td, "' holds no CA certificate"));
  }
  if (now == 0) {
    now = Clock::Real().NowSeconds();
  }
  ASSIGN_OR_RETURN(crypto::VerifiedSvid verified, crypto::VerifyX509SvidChain(chain, roots, now));
  if (verified.spiffe_id != id->str()) {
    // Cannot happen with a consistent crypto module; refuse rather than guess.
    return absl::InternalError("verified SPIFFE ID differs from the leaf's URI SAN");
  }
  VerifiedX509Svid out;
  out.spiffe_id = std::move(verified.spiffe_id);
  for (const crypto::Certificate& cert : verified.chain) {
    out.verified_chain_der.push_back(cert.Der());
  }
  return out;
}

}  // namespace mandate
