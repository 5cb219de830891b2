// The SPIFFE Workload API on the agent's Unix socket. Every call first identifies the caller:
// the security header, the peer credentials taken at accept time, the unix process attestor,
// and a check afterwards that the process is still the one that connected (pid reuse must not
// hand one process another's identity).
#ifndef MANDATE_BROKER_AGENT_WORKLOAD_SERVICE_H_
#define MANDATE_BROKER_AGENT_WORKLOAD_SERVICE_H_

#include <atomic>

#include "absl/status/statusor.h"
#include "attestors/workload/unix/unix_attestor.h"
#include "broker/agent/agent.h"
#include "broker/common/grpcutil/uds_listener.h"
#include "spiffe/workload.grpc.pb.h"

namespace mandate::agent {

class WorkloadService final : public SpiffeWorkloadAPI::Service {
 public:
  // `agent` and `attestor` must outlive the service; set_listener must be called before the
  // first connection is accepted.
  WorkloadService(Agent& agent, const unix_attestor::UnixAttestor& attestor)
      : agent_(agent), attestor_(attestor) {}
  void set_listener(const grpcutil::UdsListener* listener) { listener_.store(listener); }
  // Ends open streams promptly.
  void Shutdown() { shutting_down_ = true; }

  grpc::Status FetchX509SVID(grpc::ServerContext* context, const X509SVIDRequest* request,
                             grpc::ServerWriter<X509SVIDResponse>* writer) override;
  grpc::Status FetchX509Bundles(grpc::ServerContext* context, const X509BundlesRequest* request,
                                grpc::ServerWriter<X509BundlesResponse>* writer) override;
  grpc::Status FetchJWTSVID(grpc::ServerContext* context, const JWTSVIDRequest* request,
                            JWTSVIDResponse* response) override;
  grpc::Status FetchJWTBundles(grpc::ServerContext* context, const JWTBundlesRequest* request,
                               grpc::ServerWriter<JWTBundlesResponse>* writer) override;
  grpc::Status ValidateJWTSVID(grpc::ServerContext* context, const ValidateJWTSVIDRequest* request,
                               ValidateJWTSVIDResponse* response) override;

 private:
  struct Caller {
    int pid = 0;
    uint32_t uid = 0;
    spiffe::SelectorSet selectors;
  };
  // Checks the header and attests the calling process.
  absl::StatusOr<Caller> IdentifyCaller(grpc::ServerContext* context) const;
  // Runs `build` on every new snapshot and writes what it returns when it differs from the last
  // message sent, until the client goes away. `build` returns an error to end the stream.
  template <typename Message, typename Build>
  grpc::Status StreamUpdates(grpc::ServerContext* context, grpc::ServerWriter<Message>* writer,
                             Build build);

  Agent& agent_;
  const unix_attestor::UnixAttestor& attestor_;
  std::atomic<const grpcutil::UdsListener*> listener_{nullptr};
  std::atomic<bool> shutting_down_{false};
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_WORKLOAD_SERVICE_H_
