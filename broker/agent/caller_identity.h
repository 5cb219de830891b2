// Identifies the process calling the agent's Unix socket, for every workload-facing service
// (SPIFFE Workload API, Mandate Tasks): the security header, the peer credentials taken at accept
// time, the unix process attestor, and a check afterwards that the process is still the one that
// connected (pid reuse must not hand one process another's identity) and still runs the
// executable it ran when it connected (an exec after connect must not hand the connection to the
// exec'd program's identity while another process speaks over it).
//
// Thread-safety: Identify may be called concurrently; set_listener is atomic.
#ifndef MANDATE_BROKER_AGENT_CALLER_IDENTITY_H_
#define MANDATE_BROKER_AGENT_CALLER_IDENTITY_H_

#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"
#include "attestors/workload/unix/unix_attestor.h"
#include "broker/agent/stream_limiter.h"
#include "broker/common/grpcutil/uds_listener.h"
#include "broker/common/spiffe/selector.h"

namespace grpc {
class ServerContext;
}  // namespace grpc

namespace mandate::agent {

struct Caller {
  int pid = 0;
  uint32_t uid = 0;
  spiffe::SelectorSet selectors;
};

class CallerIdentifier {
 public:
  // `attestor` must outlive the identifier; set_listener must be called before the first
  // connection is accepted (until then every call is Unavailable). `hash_need` (may be empty:
  // always hash) tells the attestor whether any entry could use the caller's unix:sha256.
  explicit CallerIdentifier(const unix_attestor::UnixAttestor& attestor,
                            unix_attestor::HashNeed hash_need = nullptr)
      : attestor_(attestor), hash_need_(std::move(hash_need)) {}
  void set_listener(const grpcutil::UdsListener* listener) { listener_.store(listener); }

  // The listener options that pin what identification relies on at accept: the executable the
  // caller runs, read through the pidfd-pinned pid.
  grpcutil::UdsListener::ExecutableReader ExecutableReader() const;

  // Checks the header and attests the calling process. InvalidArgument for a missing or wrong
  // security header; PermissionDenied when the process cannot be identified reliably.
  absl::StatusOr<Caller> Identify(grpc::ServerContext* context) const;

  // A caller identified while it holds a place in a limiter (see IdentifyWithin).
  struct Admitted {
    Caller caller;
    StreamLimiter::Slot slot;
  };
  // As Identify, but first takes a place for the caller's uid in `limiter` (as soon as the
  // connection names the uid, before attestation, so attestation work is bounded too), held as
  // long as the result lives. ResourceExhausted when the uid or everyone is at the limiter's cap.
  absl::StatusOr<Admitted> IdentifyWithin(grpc::ServerContext* context,
                                          StreamLimiter& limiter) const;
  // Attests the process behind `peer` as Identify does once the connection is known. Refusals
  // (PermissionDenied) are logged with the reason:
  //   no pidfd (the process was gone at accept), the pidfd's process exited (its pid may now
  //   name another process), the uid or gid differs from SO_PEERCRED, the executable differs
  //   from the one pinned at accept (exec after connect).
  // Without a pinned executable the caller gets no unix:path or unix:sha256 selectors.
  absl::StatusOr<Caller> IdentifyPeer(const grpcutil::PeerCredentials& peer) const;

 private:
  // The header check and the connection's credentials, as Identify needs them.
  absl::StatusOr<grpcutil::PeerCredentials> PeerFor(grpc::ServerContext* context) const;

  const unix_attestor::UnixAttestor& attestor_;
  const unix_attestor::HashNeed hash_need_;
  std::atomic<const grpcutil::UdsListener*> listener_{nullptr};
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_CALLER_IDENTITY_H_
