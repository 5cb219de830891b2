#include "broker/server/node_auth/node_authenticator.h"

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/spiffe_id.h"

namespace mandate::broker {

absl::StatusOr<AuthenticatedNode> NodeAuthenticator::Authenticate(std::string_view pem) const {
  if (pem.empty()) {
    return absl::UnauthenticatedError("this call needs the agent's X509-SVID (mTLS)");
  }
  const int64_t now = clock_.NowSeconds();
  VerifiedPeer peer;
  bool cached = false;
  {
    absl::MutexLock lock(&peers_mu_);
    auto it = verified_peers_.find(pem);
    if (it != verified_peers_.end() && now < it->second.not_after) {
      peer = it->second;
      cached = true;
    }
  }
  if (!cached) {
    auto chain = crypto::Certificate::ParsePemChain(pem);
    if (!chain.ok() || chain->empty()) {
      return absl::UnauthenticatedError("unreadable client certificate");
    }
    auto verified = crypto::VerifyX509SvidChain(*chain, authority_.x509_roots(), now);
    if (!verified.ok()) {
      return absl::UnauthenticatedError(
          absl::StrCat("client certificate rejected: ", verified.status().message()));
    }
    auto id = spiffe::SpiffeId::Parse(verified->spiffe_id);
    if (!id.ok() || !id->MemberOf(authority_.trust_domain()) || !id->path().starts_with("/node/")) {
      return absl::PermissionDeniedError("client certificate is not a node agent SVID");
    }
    peer = {verified->spiffe_id, chain->front().SerialHex(), chain->front().not_after()};
    absl::MutexLock lock(&peers_mu_);
    if (verified_peers_.size() >= kMaxVerifiedPeers) {
      std::erase_if(verified_peers_, [now](const auto& p) { return p.second.not_after <= now; });
      if (verified_peers_.size() >= kMaxVerifiedPeers) verified_peers_.clear();
    }
    verified_peers_.emplace(std::string(pem), peer);
  }
  auto node = store_.GetNode(peer.spiffe_id);
  if (absl::IsNotFound(node.status())) {
    // PermissionDenied (not Unauthenticated): the agent must stop serving, not just reconnect.
    return absl::PermissionDeniedError(
        absl::StrCat("node ", peer.spiffe_id, " is not attested (evicted?); re-attest"));
  }
  if (!node.ok()) return absl::UnavailableError(std::string(node.status().message()));
  if (node->banned) {
    return absl::PermissionDeniedError(absl::StrCat("node ", node->spiffe_id, " is banned"));
  }
  AuthenticatedNode out;
  out.presented_serial = peer.serial;
  out.presented_not_after = peer.not_after;
  bool current = node->cert_serial == out.presented_serial;
  bool previous =
      !node->previous_cert_serial.empty() && node->previous_cert_serial == out.presented_serial;
  if (!current && !previous) {
    return absl::UnauthenticatedError("node SVID was superseded; use the current one");
  }
  if (current && !node->previous_cert_serial.empty()) {
    // The node has its renewed SVID: the one it renewed from is no longer needed. A conditional
    // update, so a concurrent re-attestation or eviction is never overwritten.
    if (auto s = store_.ConfirmNodeCertSerial(node->spiffe_id, out.presented_serial); !s.ok()) {
      return absl::UnavailableError(std::string(s.message()));
    }
    node->previous_cert_serial.clear();
  }
  out.node = std::move(*node);
  return out;
}

absl::Status NodeAuthenticator::Recheck(const AuthenticatedNode& caller) const {
  auto node = store_.GetNode(caller.node.spiffe_id);
  if (absl::IsNotFound(node.status())) {
    return absl::PermissionDeniedError(
        absl::StrCat("node ", caller.node.spiffe_id, " was evicted"));
  }
  if (!node.ok()) return absl::UnavailableError(std::string(node.status().message()));
  if (node->banned) {
    return absl::PermissionDeniedError(absl::StrCat("node ", node->spiffe_id, " is banned"));
  }
  if (node->cert_serial != caller.presented_serial &&
      node->previous_cert_serial != caller.presented_serial) {
    return absl::UnauthenticatedError("node SVID was superseded; reconnect with the current one");
  }
  if (caller.presented_not_after <= clock_.NowSeconds()) {
    return absl::UnauthenticatedError("node SVID expired; reconnect with a renewed one");
  }
  return absl::OkStatus();
}

}  // namespace mandate::broker
