#include "broker/agent/caller_identity.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <string_view>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "broker/common/util/status_macros.h"

namespace mandate::agent {
namespace {

absl::Status Refuse(const grpcutil::PeerCredentials& peer, const std::string& reason) {
  spdlog::warn("workload API refused caller pid={} uid={}: {}", peer.pid, peer.uid, reason);
  return absl::PermissionDeniedError(reason);
}

}  // namespace

grpcutil::UdsListener::ExecutableReader CallerIdentifier::ExecutableReader() const {
  return [this](pid_t pid) -> absl::StatusOr<grpcutil::FileId> {
    auto exe = attestor_.ReadExecutable(pid);
    if (!exe.ok()) return exe.status();
    return grpcutil::FileId{exe->device, exe->inode};
  };
}

absl::StatusOr<grpcutil::PeerCredentials> CallerIdentifier::PeerFor(
    grpc::ServerContext* context) const {
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
  return peer;
}

absl::StatusOr<Caller> CallerIdentifier::Identify(grpc::ServerContext* context) const {
  ASSIGN_OR_RETURN(grpcutil::PeerCredentials peer, PeerFor(context));
  return IdentifyPeer(peer);
}

absl::StatusOr<CallerIdentifier::Admitted> CallerIdentifier::IdentifyWithin(
    grpc::ServerContext* context, StreamLimiter& limiter) const {
  ASSIGN_OR_RETURN(grpcutil::PeerCredentials peer, PeerFor(context));
  std::optional<StreamLimiter::Slot> slot = limiter.Acquire(peer.uid);
  if (!slot.has_value()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("too many Workload API calls in flight (at most ", limiter.max_per_uid(),
                     " per uid and ", limiter.max_total(), " in all); retry shortly"));
  }
  ASSIGN_OR_RETURN(Caller caller, IdentifyPeer(peer));
  return Admitted{std::move(caller), std::move(*slot)};
}

absl::StatusOr<Caller> CallerIdentifier::IdentifyPeer(const grpcutil::PeerCredentials& peer) const {
  // Without a pidfd nothing pins the pid to the process that connected.
  if (peer.pidfd < 0) {
    return Refuse(peer, "caller process exited before it could be identified");
  }
  // The pidfd pins the process: if it is alive after attestation (checked below), the pid named
  // it throughout, so no start-time comparisons are needed around the /proc reads.
  auto attested = attestor_.AttestPinned(peer.pid, hash_need_);
  if (!attested.ok()) {
    return Refuse(peer, absl::StrCat("cannot attest caller: ", attested.status().message()));
  }
  // What the process runs once the reads are done: with the check against the image attested
  // above, the process ran the pinned image at accept, during attestation and after it.
  absl::StatusOr<unix_attestor::ExecutableFile> running_after;
  if (peer.exe_pinned) running_after = attestor_.ReadExecutable(peer.pid);
  // What /proc showed must belong to the process that connected: it is still alive (so its pid
  // was not reused) and still runs as the user the kernel recorded at connect().
  if (!grpcutil::PidfdAlive(peer.pidfd)) {
    return Refuse(peer, "caller exited during attestation");
  }
  if (attested->identity.uid != peer.uid || attested->identity.gid != peer.gid) {
    return Refuse(peer, "caller changed user or group after connecting");
  }
  std::vector<spiffe::Selector> selectors = std::move(attested->selectors);
  if (peer.exe_pinned) {
    const unix_attestor::ProcessIdentity& id = attested->identity;
    const unix_attestor::ExecutableFile pinned{peer.exe.device, peer.exe.inode};
    bool attested_pinned =
        id.exe_known && unix_attestor::ExecutableFile{id.exe_device, id.exe_inode} == pinned;
    if (!attested_pinned || !running_after.ok() || !(*running_after == pinned)) {
      // Another program now runs under the pid that connected: whoever speaks on this
      // connection may not be it (a child relaying over an inherited socket).
      return Refuse(peer,
                    "caller runs another executable than when it connected (exec after connect)");
    }
  } else {
    // Nothing ties the image described now to the one that connected: claim nothing about it.
    std::erase_if(selectors, [](const spiffe::Selector& s) {
      return s.type == "unix" &&
             (absl::StartsWith(s.value, "path:") || absl::StartsWith(s.value, "sha256:"));
    });
  }
  if (spdlog::should_log(spdlog::level::debug) && !attested->notes.empty()) {
    spdlog::debug("caller pid={} uid={} attested with notes: {}", peer.pid, peer.uid,
                  absl::StrJoin(attested->notes, "; "));
  }
  Caller caller;
  caller.pid = peer.pid;
  caller.uid = peer.uid;
  caller.selectors = spiffe::SelectorSet(selectors);
  return caller;
}

}  // namespace mandate::agent
