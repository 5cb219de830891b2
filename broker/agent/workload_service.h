// The SPIFFE Workload API on the agent's Unix socket. Every call first identifies the caller
// (CallerIdentifier).
#ifndef MANDATE_BROKER_AGENT_WORKLOAD_SERVICE_H_
#define MANDATE_BROKER_AGENT_WORKLOAD_SERVICE_H_

#include <atomic>

#include "absl/status/statusor.h"
#include "broker/agent/agent.h"
#include "broker/agent/caller_identity.h"
#include "broker/agent/stream_limiter.h"
#include "spiffe/workload.grpc.pb.h"

namespace mandate::agent {

class WorkloadService final : public SpiffeWorkloadAPI::Service {
 public:
  // `agent`, `identifier`, `streams` and `unary` must outlive the service. Watch streams past
  // the limits of `streams`, and unary calls past those of `unary`, are refused with
  // RESOURCE_EXHAUSTED.
  WorkloadService(Agent& agent, const CallerIdentifier& identifier, StreamLimiter& streams,
                  StreamLimiter& unary)
      : agent_(agent), identifier_(identifier), streams_(streams), unary_(unary) {}
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
  // Identifies the caller, takes a stream slot for it, and then, on every new snapshot,
  // identifies the caller again and runs `build(snapshot, caller, message)`, writing what it
  // returns when it differs from the last message sent, until the client goes away. `build` (or
  // a failed identification) returns an error to end the stream.
  template <typename Message, typename Build>
  grpc::Status StreamUpdates(grpc::ServerContext* context, grpc::ServerWriter<Message>* writer,
                             Build build);

  Agent& agent_;
  const CallerIdentifier& identifier_;
  StreamLimiter& streams_;
  StreamLimiter& unary_;
  std::atomic<bool> shutting_down_{false};
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_WORKLOAD_SERVICE_H_
