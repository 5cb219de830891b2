// Mandate's Tasks API (mandate.workload.v1.Tasks) on the agent's Unix socket, next to the SPIFFE
// Workload API: the caller is identified exactly as there (CallerIdentifier), the identity it
// acts as is chosen among the entries it matches, and the call is forwarded to the broker, which
// makes every decision (DESIGN.md §4, §10). The agent holds no task state and never sees the
// workload's DPoP private key: it forwards the proof the workload signed.
//
// Identity choice: the request's `spiffe_id` when set (PermissionDenied when the caller matches
// no entry with it); otherwise the caller's only matching identity; InvalidArgument when it
// matches several; PermissionDenied when it matches none.
//
// Thread-safety: all methods may be called concurrently.
#ifndef MANDATE_BROKER_AGENT_TASKS_SERVICE_H_
#define MANDATE_BROKER_AGENT_TASKS_SERVICE_H_

#include <string>

#include "absl/status/statusor.h"
#include "broker/agent/agent.h"
#include "broker/agent/caller_identity.h"
#include "broker/agent/stream_limiter.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"

namespace mandate::agent {

// The entry `caller` acts as in `snapshot` (see the file comment). The pointer points into
// `snapshot`.
absl::StatusOr<const AssignedEntry*> ChooseEntry(const Snapshot& snapshot,
                                                 const spiffe::SelectorSet& caller,
                                                 const std::string& spiffe_id);

class TasksService final : public mandate::workload::v1::Tasks::Service {
 public:
  // `agent`, `identifier` and `calls` must outlive the service. Every call holds a place in
  // `calls` for its uid until it returns (it may wait on the broker for up to 15 s); calls past
  // its limits are refused with RESOURCE_EXHAUSTED.
  TasksService(Agent& agent, const CallerIdentifier& identifier, StreamLimiter& calls)
      : agent_(agent), identifier_(identifier), calls_(calls) {}

  grpc::Status DeclareTask(grpc::ServerContext* context,
                           const mandate::workload::v1::DeclareTaskRequest* request,
                           mandate::workload::v1::Task* response) override;
  grpc::Status FetchTaskToken(grpc::ServerContext* context,
                              const mandate::workload::v1::FetchTaskTokenRequest* request,
                              mandate::workload::v1::FetchTaskTokenResponse* response) override;
  grpc::Status EndTask(grpc::ServerContext* context,
                       const mandate::workload::v1::EndTaskRequest* request,
                       mandate::workload::v1::Task* response) override;
  grpc::Status GetTask(grpc::ServerContext* context,
                       const mandate::workload::v1::GetTaskRequest* request,
                       mandate::workload::v1::Task* response) override;

 private:
  // The caller's place in `calls_` and the id of the entry it acts as.
  struct Forward {
    StreamLimiter::Slot slot;
    std::string entry_id;
  };
  // Identifies the caller within `calls_` and chooses its entry in the current snapshot.
  absl::StatusOr<Forward> EntryFor(grpc::ServerContext* context,
                                   const std::string& spiffe_id) const;

  Agent& agent_;
  const CallerIdentifier& identifier_;
  StreamLimiter& calls_;
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_TASKS_SERVICE_H_
