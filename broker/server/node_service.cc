#include "broker/server/node_service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/grpcutil/status.h"
#include "broker/common/log/log.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/entry_proto.h"
#include "broker/server/exchange/task_token_exchange.h"

namespace mandate::broker {
namespace {

namespace nodepb = mandate::node::v1;
namespace workloadpb = mandate::workload::v1;
using grpcutil::ToGrpcStatus;

std::string PeerAddress(const grpc::ServerContext* context) { return context->peer(); }

grpc::Status TasksDisabled() {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "tasks are not enabled on this broker");
}

// A pipeline refusal as a gRPC status, with the retry hint in trailing metadata.
grpc::Status Refused(grpc::ServerContext* context, const issuance::Refusal& refusal) {
  if (refusal.retry_after_seconds > 0) {
    context->AddTrailingMetadata("retry-after", std::to_string(refusal.retry_after_seconds));
  }
  return ToGrpcStatus(refusal.status);
}

}  // namespace

NodeService::NodeService(
    const TrustAuthority& authority, EntryRegistry& entries, const NodeAuthenticator& nodes,
    const issuance::IssuancePipeline& pipeline, TaskRegistry* tasks,
    std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> attestors,
    std::string issuer_url)
    : authority_(authority),
      entries_(entries),
      nodes_(nodes),
      pipeline_(pipeline),
      tasks_(tasks),
      attestors_(std::move(attestors)),
      issuer_url_(std::move(issuer_url)) {}

void NodeService::Shutdown() {
  shutting_down_ = true;
  entries_.NotifyNodeChanged();
}

std::string NodeService::ClientPem(const grpc::ServerContext* context) {
  auto auth = context->auth_context();
  std::vector<grpc::string_ref> pems =
      auth ? auth->FindPropertyValues("x509_pem_cert") : std::vector<grpc::string_ref>{};
  if (pems.empty()) return "";
  return std::string(pems[0].data(), pems[0].size());
}

grpc::Status NodeService::Attest(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<nodepb::AttestResponse, nodepb::AttestRequest>* stream) {
  // Longer than any attestor's own session limit (TPM: 60 s), short enough to free the thread
  // of a client that went silent.
  auto watch = attest_watchdog_.Watch(context, std::chrono::seconds(90));
  // Malformed attestations are refused (and audited) by the pipeline like any other refusal.
  auto malformed = [&](std::string why) {
    return Refused(
        context, pipeline_.RefuseRequest(policy::IssuanceKind::kNodeSvid,
                                         issuance::StatusRefusal(issuance::Step::kRequest,
                                                                 absl::InvalidArgumentError(why))));
  };
  nodepb::AttestRequest first;
  if (!stream->Read(&first) || !first.has_params()) {
    return malformed("attestation must start with AttestParams");
  }
  const nodepb::AttestParams& params = first.params();
  auto it = attestors_.find(params.attestor());
  if (it == attestors_.end()) {
    return malformed(absl::StrCat("node attestor '", log::EscapeForLog(params.attestor()),
                                  "' is not enabled on this broker"));
  }
  // Check the CSR before the attestor spends single-use evidence such as a join token.
  auto csr = crypto::ParseAndVerifyCsrDer(params.csr());
  if (!csr.ok()) return malformed(absl::StrCat("invalid CSR: ", csr.status().message()));
  const std::string csr_spki = csr->key.SpkiDer();
  attestors::ServerNodeAttestor::ChallengeFn challenge =
      [stream](std::string_view data) -> absl::StatusOr<std::string> {
    nodepb::AttestResponse response;
    response.set_challenge(std::string(data));
    nodepb::AttestRequest answer;
    if (!stream->Write(response) || !stream->Read(&answer) || !answer.has_challenge_response()) {
      return absl::AbortedError("agent did not answer the attestation challenge");
    }
    return answer.challenge_response();
  };
  issuance::NodeSvidRequest issue{
      .attestor = it->first,
      .attestation = it->second->Attest({params.payload(), csr_spki}, challenge),
      .csr_der = params.csr(),
      .peer = PeerAddress(context)};
  auto svid = pipeline_.IssueNodeSvid(issue);
  if (!svid.ok()) return Refused(context, svid.refusal());
  spdlog::info("node attested node={} attestor={} peer={}", svid->node_id, it->first,
               PeerAddress(context));

  nodepb::AttestResponse response;
  nodepb::AttestResult* out = response.mutable_result();
  out->set_spiffe_id(svid->node_id);
  out->set_svid_chain(svid->certificate.Der());
  out->set_bundle(authority_.bundle_der());
  if (!stream->Write(response)) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "agent went away");
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::RenewAgentSvid(grpc::ServerContext* context,
                                         const nodepb::RenewAgentSvidRequest* request,
                                         nodepb::RenewAgentSvidResponse* response) {
  auto svid = pipeline_.IssueNodeSvid(
      {.client_pem = ClientPem(context), .csr_der = request->csr(), .peer = PeerAddress(context)});
  if (!svid.ok()) return Refused(context, svid.refusal());
  response->set_svid_chain(svid->certificate.Der());
  return grpc::Status::OK;
}

grpc::Status NodeService::Sync(grpc::ServerContext* context, const nodepb::SyncRequest*,
                               grpc::ServerWriter<nodepb::SyncResponse>* writer) {
  auto caller = nodes_.Authenticate(ClientPem(context));
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  const std::string node_id = caller->node.spiffe_id;
  uint64_t generation = entries_.generation();
  std::string last_sent;
  while (!context->IsCancelled() && !shutting_down_) {
    nodepb::SyncResponse snapshot;
    snapshot.set_revision(static_cast<int64_t>(generation));
    snapshot.set_trust_domain(authority_.trust_domain().name());
    snapshot.set_x509_bundle(authority_.bundle_der());
    snapshot.set_jwt_bundle(authority_.jwt_bundle_jwks());
    snapshot.set_issuer_url(issuer_url_);
    for (const auto& entry : entries_.ForParent(node_id)) {
      EntryToProto(entry, snapshot.add_entries());
    }
    // Only nodes whose view changed get a message: a change elsewhere wakes every stream, but
    // re-sending an identical snapshot would make every agent republish to its workloads.
    snapshot.set_revision(0);
    std::string serialized = snapshot.SerializeAsString();
    if (serialized != last_sent) {
      snapshot.set_revision(static_cast<int64_t>(generation));
      if (!writer->Write(snapshot)) break;
      last_sent = std::move(serialized);
    }
    // Wake at once on any change; the timeout only bounds how long a cancelled stream lingers.
    uint64_t next = generation;
    while (next == generation && !context->IsCancelled() && !shutting_down_) {
      next = entries_.WaitForChange(generation, std::chrono::milliseconds(500));
    }
    generation = next;
    // Evicted or banned nodes lose their stream as soon as it happens.
    if (auto s = nodes_.Recheck(*caller); !s.ok()) return ToGrpcStatus(s);
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::SignX509Svids(grpc::ServerContext* context,
                                        const nodepb::SignX509SvidsRequest* request,
                                        nodepb::SignX509SvidsResponse* response) {
  issuance::X509SvidRequest issue{.client_pem = ClientPem(context)};
  issue.items.reserve(request->requests_size());
  for (const auto& req : request->requests()) issue.items.push_back({req.entry_id(), req.csr()});
  auto svids = pipeline_.IssueX509Svids(issue);
  if (!svids.ok()) return Refused(context, svids.refusal());
  for (issuance::IssuedX509Svid& svid : *svids) {
    auto* out = response->add_svids();
    out->set_entry_id(std::move(svid.entry_id));
    out->set_spiffe_id(std::move(svid.spiffe_id));
    out->set_svid_chain(std::move(svid.certificate.der));
    out->set_expires_at(svid.certificate.not_after);
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::MintJwtSvid(grpc::ServerContext* context,
                                      const nodepb::MintJwtSvidRequest* request,
                                      nodepb::MintJwtSvidResponse* response) {
  auto jwt = pipeline_.IssueJwtSvid({.client_pem = ClientPem(context),
                                     .entry_id = request->entry_id(),
                                     .audiences = std::vector<std::string>(
                                         request->audience().begin(), request->audience().end())});
  if (!jwt.ok()) return Refused(context, jwt.refusal());
  response->set_spiffe_id(jwt->spiffe_id);
  response->set_token(jwt->token);
  response->set_expires_at(jwt->expires_at);
  return grpc::Status::OK;
}

absl::StatusOr<store::RegistrationEntry> NodeService::AuthorizeEntryCall(
    grpc::ServerContext* context, const std::string& entry_id) const {
  ASSIGN_OR_RETURN(AuthenticatedNode caller, nodes_.Authenticate(ClientPem(context)));
  return pipeline_.AuthorizeEntry(caller.node.spiffe_id, entry_id);
}

void NodeService::FillTask(const store::Task& task, workloadpb::Task* out) const {
  out->set_id(task.id);
  out->set_spiffe_id(task.spiffe_id);
  out->set_purpose(task.purpose);
  for (const auto& s : task.scopes) out->add_scopes(s);
  for (const auto& a : task.audiences) out->add_audiences(a);
  out->set_status(task.status);
  out->set_approval_id(task.approval_id);
  out->set_created_at(task.created_at);
  out->set_expires_at(task.expires_at);
  out->set_token_endpoint(TokenEndpointUrl(issuer_url_));
}

grpc::Status NodeService::DeclareTask(grpc::ServerContext* context,
                                      const nodepb::NodeDeclareTaskRequest* request,
                                      workloadpb::Task* response) {
  if (tasks_ == nullptr) return TasksDisabled();
  issuance::TaskDeclarationRequest issue{.client_pem = ClientPem(context),
                                         .entry_id = request->entry_id()};
  issue.task.purpose = request->purpose();
  issue.task.scopes.assign(request->scopes().begin(), request->scopes().end());
  issue.task.audiences.assign(request->audiences().begin(), request->audiences().end());
  issue.task.ttl_seconds = request->ttl_seconds();
  auto declared = pipeline_.DeclareTask(issue);
  if (!declared.ok()) return Refused(context, declared.refusal());
  FillTask(declared->task, response);
  return grpc::Status::OK;
}

grpc::Status NodeService::GetTask(grpc::ServerContext* context,
                                  const nodepb::NodeGetTaskRequest* request,
                                  workloadpb::Task* response) {
  if (tasks_ == nullptr) return TasksDisabled();
  auto entry = AuthorizeEntryCall(context, request->entry_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  auto task = tasks_->GetUsable(entry->spiffe_id, request->task_id());
  if (!task.ok()) return ToGrpcStatus(task.status());
  FillTask(*task, response);
  return grpc::Status::OK;
}

grpc::Status NodeService::EndTask(grpc::ServerContext* context,
                                  const nodepb::NodeEndTaskRequest* request,
                                  workloadpb::Task* response) {
  if (tasks_ == nullptr) return TasksDisabled();
  auto entry = AuthorizeEntryCall(context, request->entry_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  auto task = tasks_->End(entry->spiffe_id, request->task_id());
  if (!task.ok()) return ToGrpcStatus(task.status());
  spdlog::info("task ended task={} spiffe_id={}", task->id, task->spiffe_id);
  FillTask(*task, response);
  return grpc::Status::OK;
}

grpc::Status NodeService::FetchTaskToken(grpc::ServerContext* context,
                                         const nodepb::NodeFetchTaskTokenRequest* request,
                                         workloadpb::FetchTaskTokenResponse* response) {
  const TaskTokenExchange* exchange = pipeline_.exchange();
  if (tasks_ == nullptr || exchange == nullptr) return TasksDisabled();
  // RFC 9449 §8 over gRPC: the nonce travels in trailing metadata, on refusals and successes
  // alike, so the workload's SDK can sign its next proof (or retry this one) with it.
  if (std::string nonce = exchange->CurrentNonce(); !nonce.empty()) {
    context->AddTrailingMetadata("dpop-nonce", nonce);
  }
  issuance::TaskTokenRequest issue{.client_pem = ClientPem(context)};
  issue.ask.entry_id = request->entry_id();
  issue.ask.task_id = request->task_id();
  issue.ask.audience = request->audience();
  if (request->audience().empty()) issue.ask.audience.reset();
  issue.ask.scopes.assign(request->scopes().begin(), request->scopes().end());
  issue.ask.dpop_proof = request->dpop_proof();
  auto token = pipeline_.IssueTaskToken(issue);
  if (!token.ok()) return Refused(context, token.refusal());
  response->set_access_token(token->token.token);
  response->set_token_type("DPoP");
  response->set_expires_in(token->expires_in);
  for (const auto& s : token->scopes) response->add_scopes(s);
  response->set_jkt(token->jkt);
  return grpc::Status::OK;
}

}  // namespace mandate::broker
