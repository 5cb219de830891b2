#include "broker/agent/caller_identity.h"

#include <grpcpp/grpcpp.h>

#include <string_view>

#include "absl/strings/str_cat.h"

namespace mandate::agent {

absl::StatusOr<Caller> CallerIdentifier::Identify(grpc::ServerContext* context) const {
  const auto& metadata = context->client_metadata();
  auto header = metadata.find("workload.spiffe.io");
  if (header == metadata.end()) {
    return absl::InvalidArgumentError("security header missing from request");
  }
  if (std::string_view(header->second.data(), header->second.size()) != "true") {
    return absl::InvalidArgumentError("security header workload.spiffe.io must be \"true\"");
  }
  const grpcutil::UdsListener* listener = listener_.load();
  if (listener == nullptr) return absl::UnavailableError("workload API is starting");
  auto peer = listener->PeerOf(*context);
  if (!peer.ok()) return absl::PermissionDeniedError(peer.status().message());
  // Without a pidfd nothing pins the pid to the process that connected.
  if (peer->pidfd < 0) {
    return absl::PermissionDeniedError("caller process exited before it could be identified");
  }
  // The pidfd pins the process: if it is alive after attestation (checked below), the pid named
  // it throughout, so no start-time comparisons are needed around the /proc reads.
  auto attested = attestor_.AttestPinned(peer->pid);
  if (!attested.ok()) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot attest caller: ", attested.status().message()));
  }
  // What /proc showed must belong to the process that connected: it is still alive (so its pid
  // was not reused) and still runs as the user the kernel recorded at connect().
  if (!grpcutil::PidfdAlive(peer->pidfd)) {
    return absl::PermissionDeniedError("caller exited during attestation");
  }
  if (attested->identity.uid != peer->uid || attested->identity.gid != peer->gid) {
    return absl::PermissionDeniedError("caller changed user or group after connecting");
  }
  Caller caller;
  caller.pid = peer->pid;
  caller.uid = peer->uid;
  caller.selectors = spiffe::SelectorSet(attested->selectors);
  return caller;
}

}  // namespace mandate::agent
