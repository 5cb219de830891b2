#include "broker/agent/tasks_service.h"

#include <grpcpp/grpcpp.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "broker/common/grpcutil/status.h"
#include "broker/common/util/status_macros.h"
#include "mandate/node/v1/node.pb.h"

namespace mandate::agent {
namespace {

namespace nodepb = mandate::node::v1;
namespace workloadpb = mandate::workload::v1;
using grpcutil::ToGrpcStatus;

// A broker that predates Task.token_endpoint leaves it empty: fill it from the issuer URL the
// agent learnt at sync, so the SDK always knows the htu to sign for.
grpc::Status WithTokenEndpoint(const absl::Status& status, const Snapshot& snapshot,
                               workloadpb::Task* task) {
  if (status.ok() && task->token_endpoint().empty() && !snapshot.issuer_url.empty()) {
    std::string_view issuer = snapshot.issuer_url;
    if (issuer.ends_with('/')) issuer.remove_suffix(1);
    task->set_token_endpoint(std::string(issuer) + "/token");
  }
  return ToGrpcStatus(status);
}

}  // namespace

absl::StatusOr<const AssignedEntry*> ChooseEntry(const Snapshot& snapshot,
                                                 const spiffe::SelectorSet& caller,
                                                 const std::string& spiffe_id) {
  std::vector<const AssignedEntry*> matches = Agent::Match(snapshot, caller);
  if (matches.empty()) return absl::PermissionDeniedError("no identity issued");
  if (!spiffe_id.empty()) {
    for (const AssignedEntry* entry : matches) {
      if (entry->spiffe_id == spiffe_id) return entry;
    }
    return absl::PermissionDeniedError(absl::StrCat("this process has no identity ", spiffe_id));
  }
  std::set<std::string> ids;
  for (const AssignedEntry* entry : matches) ids.insert(entry->spiffe_id);
  if (ids.size() > 1) {
    return absl::InvalidArgumentError(
        "this process has several identities; name the one to act as (spiffe_id)");
  }
  // Several entries with one SPIFFE ID are the same identity to the broker's task rules.
  return matches.front();
}

absl::StatusOr<TasksService::Forward> TasksService::EntryFor(grpc::ServerContext* context,
                                                             const std::string& spiffe_id) const {
  auto admitted = identifier_.IdentifyWithin(context, calls_);
  if (!admitted.ok()) return admitted.status();
  auto snapshot = agent_.Current();
  if (!snapshot->serving) {
    return absl::UnavailableError("agent is not synchronised with the broker; retry shortly");
  }
  ASSIGN_OR_RETURN(const AssignedEntry* entry,
                   ChooseEntry(*snapshot, admitted->caller.selectors, spiffe_id));
  return Forward{std::move(admitted->slot), entry->id};
}

grpc::Status TasksService::DeclareTask(grpc::ServerContext* context,
                                       const workloadpb::DeclareTaskRequest* request,
                                       workloadpb::Task* response) {
  auto entry = EntryFor(context, request->spiffe_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  nodepb::NodeDeclareTaskRequest forward;
  forward.set_entry_id(entry->entry_id);
  forward.set_purpose(request->purpose());
  *forward.mutable_scopes() = request->scopes();
  *forward.mutable_audiences() = request->audiences();
  forward.set_ttl_seconds(request->ttl_seconds());
  return WithTokenEndpoint(agent_.broker().DeclareTask(forward, response), *agent_.Current(),
                           response);
}

grpc::Status TasksService::GetTask(grpc::ServerContext* context,
                                   const workloadpb::GetTaskRequest* request,
                                   workloadpb::Task* response) {
  auto entry = EntryFor(context, request->spiffe_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  nodepb::NodeGetTaskRequest forward;
  forward.set_entry_id(entry->entry_id);
  forward.set_task_id(request->task_id());
  return WithTokenEndpoint(agent_.broker().GetTask(forward, response), *agent_.Current(), response);
}

grpc::Status TasksService::EndTask(grpc::ServerContext* context,
                                   const workloadpb::EndTaskRequest* request,
                                   workloadpb::Task* response) {
  auto entry = EntryFor(context, request->spiffe_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  nodepb::NodeEndTaskRequest forward;
  forward.set_entry_id(entry->entry_id);
  forward.set_task_id(request->task_id());
  return WithTokenEndpoint(agent_.broker().EndTask(forward, response), *agent_.Current(), response);
}

grpc::Status TasksService::FetchTaskToken(grpc::ServerContext* context,
                                          const workloadpb::FetchTaskTokenRequest* request,
                                          workloadpb::FetchTaskTokenResponse* response) {
  auto entry = EntryFor(context, request->spiffe_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  nodepb::NodeFetchTaskTokenRequest forward;
  forward.set_entry_id(entry->entry_id);
  forward.set_task_id(request->task_id());
  forward.set_audience(request->audience());
  *forward.mutable_scopes() = request->scopes();
  forward.set_dpop_proof(request->dpop_proof());
  // The broker's nonce (--dpop-nonce, RFC 9449 §8 over gRPC) and retry delay go back to the
  // workload: only the workload holds the proof key, so it signs any retry itself.
  TaskTokenHints hints;
  absl::Status status = agent_.broker().FetchTaskToken(forward, response, &hints);
  if (!hints.dpop_nonce.empty()) context->AddTrailingMetadata("dpop-nonce", hints.dpop_nonce);
  if (!hints.retry_after.empty()) context->AddTrailingMetadata("retry-after", hints.retry_after);
  return ToGrpcStatus(status);
}

}  // namespace mandate::agent
