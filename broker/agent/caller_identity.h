// Identifies the process calling the agent's Unix socket, for every workload-facing service
// (SPIFFE Workload API, Mandate Tasks): the security header, the peer credentials taken at accept
// time, the unix process attestor, and a check afterwards that the process is still the one that
// connected (pid reuse must not hand one process another's identity).
//
// Thread-safety: Identify may be called concurrently; set_listener is atomic.
#ifndef MANDATE_BROKER_AGENT_CALLER_IDENTITY_H_
#define MANDATE_BROKER_AGENT_CALLER_IDENTITY_H_

#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"
#include "attestors/workload/unix/unix_attestor.h"
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
  // connection is accepted (until then every call is Unavailable).
  explicit CallerIdentifier(const unix_attestor::UnixAttestor& attestor) : attestor_(attestor) {}
  void set_listener(const grpcutil::UdsListener* listener) { listener_.store(listener); }

  // Checks the header and attests the calling process. InvalidArgument for a missing or wrong
  // security header; PermissionDenied when the process cannot be identified reliably.
  absl::StatusOr<Caller> Identify(grpc::ServerContext* context) const;

 private:
  const unix_attestor::UnixAttestor& attestor_;
  std::atomic<const grpcutil::UdsListener*> listener_{nullptr};
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_CALLER_IDENTITY_H_
