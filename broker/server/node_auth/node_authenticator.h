// Who is calling the node API: the node agent proven by its mTLS client certificate (its
// X509-SVID from this broker's CA), checked against the store's record of attested nodes on
// every call. The one home for node authentication, used by every node API call.
//
// Ownership: borrows the authority, store and clock, which must outlive it.
// Thread-safety: all methods may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_NODE_AUTH_NODE_AUTHENTICATOR_H_
#define MANDATE_BROKER_SERVER_NODE_AUTH_NODE_AUTHENTICATOR_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {

struct AuthenticatedNode {
  store::AttestedNode node;
  std::string presented_serial;
  int64_t presented_not_after = 0;
};

class NodeAuthenticator {
 public:
  NodeAuthenticator(const TrustAuthority& authority, store::Store& store, const Clock& clock)
      : authority_(authority), store_(store), clock_(clock) {}

  // The node whose client certificate is `pem` (the first certificate of the chain the TLS
  // layer verified; empty when the peer sent none): its chain verifies to our roots, its SPIFFE
  // ID is a node ID of our trust domain, and the store knows it attested, is not banned and is
  // presenting its current SVID (or the one it renewed from, until the new one is first used).
  // Unauthenticated (reconnect with a good SVID), PermissionDenied (stop serving: evicted,
  // banned, not a node), Unavailable (the store could not tell).
  absl::StatusOr<AuthenticatedNode> Authenticate(std::string_view pem) const;

  // Re-checks a node during a long-lived stream: PermissionDenied when it was evicted, banned
  // or its certificate superseded or expired; Unavailable when the store cannot tell.
  absl::Status Recheck(const AuthenticatedNode& caller) const;

 private:
  const TrustAuthority& authority_;
  store::Store& store_;
  const Clock& clock_;

  // Node certificates whose chain and SPIFFE ID were verified, by their exact PEM, until they
  // expire: parsing and chain-verifying the client certificate on every call cost more than the
  // work most calls do (OpenSSL 3 decodes the key through its provider machinery each time).
  // Attestation state (eviction, bans, the current serial) is still read on every call. The
  // trust roots never change while the broker runs; a CA rotation must clear this cache.
  struct VerifiedPeer {
    std::string spiffe_id;
    std::string serial;
    int64_t not_after = 0;
  };
  static constexpr size_t kMaxVerifiedPeers = 4096;
  // Transparent, so a call looks its certificate up without copying the PEM.
  struct PemHash {
    using is_transparent = void;
    size_t operator()(std::string_view pem) const { return std::hash<std::string_view>()(pem); }
  };
  mutable absl::Mutex peers_mu_;
  mutable std::unordered_map<std::string, VerifiedPeer, PemHash, std::equal_to<>> verified_peers_
      ABSL_GUARDED_BY(peers_mu_);
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_NODE_AUTH_NODE_AUTHENTICATOR_H_
