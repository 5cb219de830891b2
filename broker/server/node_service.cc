#include "broker/server/node_service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "broker/common/grpcutil/status.h"
#include "broker/common/log/log.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/token_endpoint.h"

namespace mandate::broker {
namespace {

namespace nodepb = mandate::node::v1;
namespace workloadpb = mandate::workload::v1;
using grpcutil::ToGrpcStatus;

std::string PeerAddress(const grpc::ServerContext* context) { return context->peer(); }

// A store that cannot answer says nothing about the node: the caller should retry, so every
// store error (whatever SQLite's code) reaches it as UNAVAILABLE, never as a verdict.
grpc::Status StoreUnavailable(const absl::Status& status) {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      absl::StrCat("the store cannot answer: ", status.message()));
}

grpc::Status TasksDisabled() {
  return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "tasks are not enabled on this broker");
}

}  // namespace

NodeService::NodeService(
    const TrustAuthority& authority, store::Store& store, EntryRegistry& entries,
    const Issuer& issuer, const Clock& clock,
    std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> attestors,
    NodeTaskSupport tasks)
    : authority_(authority),
      store_(store),
      entries_(entries),
      issuer_(issuer),
      clock_(clock),
      attestors_(std::move(attestors)),
      tasks_(std::move(tasks)) {}

void NodeService::Shutdown() {
  shutting_down_ = true;
  entries_.NotifyNodeChanged();
}

absl::StatusOr<NodeService::AuthenticatedNode> NodeService::AuthenticateNode(
    grpc::ServerContext* context) const {
  auto auth = context->auth_context();
  std::vector<grpc::string_ref> pems =
      auth ? auth->FindPropertyValues("x509_pem_cert") : std::vector<grpc::string_ref>{};
  if (pems.empty()) {
    return absl::UnauthenticatedError("this call needs the agent's X509-SVID (mTLS)");
  }
  const std::string_view pem(pems[0].data(), pems[0].size());
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

absl::Status NodeService::RecheckNode(const AuthenticatedNode& caller) const {
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

absl::Status NodeService::RecordNode(const attestors::NodeAttestationResult& result,
                                     std::string_view attestor,
                                     const crypto::Certificate& svid) const {
  store::AttestedNode node;
  node.spiffe_id = result.node_spiffe_id;
  node.attestor = std::string(attestor);
  node.selectors = result.selectors;
  node.cert_serial = svid.SerialHex();
  node.cert_expires_at = svid.not_after();
  node.created_at = clock_.NowSeconds();
  node.updated_at = node.created_at;
  // A node that attests again (a TPM node restarting or renewing) keeps its running connections
  // valid until it uses the new SVID, exactly as after a renewal.
  if (auto existing = store_.GetNode(node.spiffe_id); existing.ok()) {
    node.previous_cert_serial = existing->cert_serial;
  } else if (!absl::IsNotFound(existing.status())) {
    return existing.status();
  }
  return store_.UpsertNode(node);
}

grpc::Status NodeService::Attest(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<nodepb::AttestResponse, nodepb::AttestRequest>* stream) {
  // Longer than any attestor's own session limit (TPM: 60 s), short enough to free the thread
  // of a client that went silent.
  auto watch = attest_watchdog_.Watch(context, std::chrono::seconds(90));
  nodepb::AttestRequest first;
  if (!stream->Read(&first) || !first.has_params()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "attestation must start with AttestParams");
  }
  const nodepb::AttestParams& params = first.params();
  auto it = attestors_.find(params.attestor());
  if (it == attestors_.end()) {
    spdlog::warn("attestation refused peer={} attestor=\"{}\": attestor not enabled",
                 PeerAddress(context), log::EscapeForLog(params.attestor()));
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("node attestor '", log::EscapeForLog(params.attestor()),
                                     "' is not enabled on this broker"));
  }
  // Check the CSR before the attestor spends single-use evidence such as a join token.
  auto csr = crypto::ParseAndVerifyCsrDer(params.csr());
  if (!csr.ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("invalid CSR: ", csr.status().message()));
  }
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
  auto result = it->second->Attest({params.payload(), csr_spki}, challenge);
  if (!result.ok()) {
    spdlog::warn("attestation refused peer={} attestor={}: {}", PeerAddress(context), it->first,
                 std::string(result.status().message()));
    return ToGrpcStatus(result.status());
  }
  auto banned = store_.IsNodeBanned(result->node_spiffe_id);
  if (!banned.ok()) return StoreUnavailable(banned.status());
  if (*banned) {
    spdlog::warn("attestation refused peer={} node={}: node is banned", PeerAddress(context),
                 result->node_spiffe_id);
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                        absl::StrCat("node ", result->node_spiffe_id, " is banned"));
  }
  auto svid = issuer_.IssueNodeSvid(result->node_spiffe_id, params.csr());
  if (!svid.ok()) return ToGrpcStatus(svid.status());
  if (auto s = RecordNode(*result, it->first, *svid); !s.ok()) return StoreUnavailable(s);
  entries_.NotifyNodeChanged();
  spdlog::info("node attested node={} attestor={} peer={}", result->node_spiffe_id, it->first,
               PeerAddress(context));

  nodepb::AttestResponse response;
  nodepb::AttestResult* out = response.mutable_result();
  out->set_spiffe_id(result->node_spiffe_id);
  out->set_svid_chain(svid->Der());
  out->set_bundle(authority_.bundle_der());
  if (!stream->Write(response)) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "agent went away");
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::RenewAgentSvid(grpc::ServerContext* context,
                                         const nodepb::RenewAgentSvidRequest* request,
                                         nodepb::RenewAgentSvidResponse* response) {
  auto caller = AuthenticateNode(context);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  store::AttestedNode& node = caller->node;
  auto svid = issuer_.IssueNodeSvid(node.spiffe_id, request->csr());
  if (!svid.ok()) return ToGrpcStatus(svid.status());
  // Keep accepting the SVID the node renews from until it uses the new one: if this answer is
  // lost, the node can still call (and renew again) with the certificate it has.
  node.previous_cert_serial = caller->presented_serial;
  node.cert_serial = svid->SerialHex();
  node.cert_expires_at = svid->not_after();
  node.updated_at = clock_.NowSeconds();
  if (auto s = store_.UpsertNode(node); !s.ok()) return ToGrpcStatus(s);
  response->set_svid_chain(svid->Der());
  return grpc::Status::OK;
}

grpc::Status NodeService::Sync(grpc::ServerContext* context, const nodepb::SyncRequest*,
                               grpc::ServerWriter<nodepb::SyncResponse>* writer) {
  auto caller = AuthenticateNode(context);
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
    snapshot.set_issuer_url(tasks_.issuer_url);
    for (const auto& entry : entries_.ForParent(node_id)) {
      auto* e = snapshot.add_entries();
      e->set_id(entry.id);
      e->set_spiffe_id(entry.spiffe_id);
      e->set_parent_id(entry.parent_id);
      for (const auto& s : entry.selectors) e->add_selectors(s);
      for (const auto& s : entry.scopes) e->add_scopes(s);
      e->set_x509_ttl_seconds(entry.x509_ttl_s);
      e->set_jwt_ttl_seconds(entry.jwt_ttl_s);
      e->set_token_ttl_seconds(entry.token_ttl_s);
      e->set_created_at(entry.created_at);
      e->set_revision(entry.revision);
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
    if (auto s = RecheckNode(*caller); !s.ok()) return ToGrpcStatus(s);
  }
  return grpc::Status::OK;
}

grpc::Status NodeService::SignX509Svids(grpc::ServerContext* context,
                                        const nodepb::SignX509SvidsRequest* request,
                                        nodepb::SignX509SvidsResponse* response) {
  auto caller = AuthenticateNode(context);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  const store::AttestedNode* node = &caller->node;
  if (request->requests_size() > 1000) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "at most 1000 CSRs per call");
  }
  std::vector<X509SvidRequest> requests;
  requests.reserve(request->requests_size());
  for (const auto& req : request->requests()) requests.push_back({req.entry_id(), req.csr()});
  // One audit commit for the whole batch: a node signing thousands of SVIDs at start waits for
  // a few fsyncs, not one per SVID.
  auto svids = issuer_.IssueX509Svids(node->spiffe_id, requests);
  if (!svids.ok()) return ToGrpcStatus(svids.status());
  for (IssuedX509Svid& svid : *svids) {
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
  auto caller = AuthenticateNode(context);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  const store::AttestedNode* node = &caller->node;
  std::vector<std::string> audiences(request->audience().begin(), request->audience().end());
  auto jwt = issuer_.IssueJwtSvid(node->spiffe_id, request->entry_id(), audiences);
  if (!jwt.ok()) return ToGrpcStatus(jwt.status());
  response->set_spiffe_id(jwt->spiffe_id);
  response->set_token(jwt->token);
  response->set_expires_at(jwt->expires_at);
  return grpc::Status::OK;
}

absl::StatusOr<store::RegistrationEntry> NodeService::AuthorizeEntryCall(
    grpc::ServerContext* context, const std::string& entry_id) const {
  ASSIGN_OR_RETURN(AuthenticatedNode caller, AuthenticateNode(context));
  return issuer_.AuthorizedEntry(caller.node.spiffe_id, entry_id);
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
  out->set_token_endpoint(TokenEndpointUrl(tasks_.issuer_url));
}

grpc::Status NodeService::DeclareTask(grpc::ServerContext* context,
                                      const nodepb::NodeDeclareTaskRequest* request,
                                      workloadpb::Task* response) {
  if (tasks_.registry == nullptr) return TasksDisabled();
  auto entry = AuthorizeEntryCall(context, request->entry_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  TaskRequest task_request;
  task_request.purpose = request->purpose();
  task_request.scopes.assign(request->scopes().begin(), request->scopes().end());
  task_request.audiences.assign(request->audiences().begin(), request->audiences().end());
  task_request.ttl_seconds = request->ttl_seconds();
  auto task = tasks_.registry->Declare(entry->spiffe_id, entry->scopes, task_request);
  if (!task.ok()) return ToGrpcStatus(task.status());
  spdlog::info("task declared task={} spiffe_id={} entry={} scopes={} expires_at={}", task->id,
               task->spiffe_id, entry->id, task->scopes.size(), task->expires_at);
  FillTask(*task, response);
  return grpc::Status::OK;
}

grpc::Status NodeService::GetTask(grpc::ServerContext* context,
                                  const nodepb::NodeGetTaskRequest* request,
                                  workloadpb::Task* response) {
  if (tasks_.registry == nullptr) return TasksDisabled();
  auto entry = AuthorizeEntryCall(context, request->entry_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  auto task = tasks_.registry->GetUsable(entry->spiffe_id, request->task_id());
  if (!task.ok()) return ToGrpcStatus(task.status());
  FillTask(*task, response);
  return grpc::Status::OK;
}

grpc::Status NodeService::EndTask(grpc::ServerContext* context,
                                  const nodepb::NodeEndTaskRequest* request,
                                  workloadpb::Task* response) {
  if (tasks_.registry == nullptr) return TasksDisabled();
  auto entry = AuthorizeEntryCall(context, request->entry_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  auto task = tasks_.registry->End(entry->spiffe_id, request->task_id());
  if (!task.ok()) return ToGrpcStatus(task.status());
  spdlog::info("task ended task={} spiffe_id={}", task->id, task->spiffe_id);
  FillTask(*task, response);
  return grpc::Status::OK;
}

grpc::Status NodeService::FetchTaskToken(grpc::ServerContext* context,
                                         const nodepb::NodeFetchTaskTokenRequest* request,
                                         workloadpb::FetchTaskTokenResponse* response) {
  if (tasks_.registry == nullptr || tasks_.replay_cache == nullptr) return TasksDisabled();
  auto entry = AuthorizeEntryCall(context, request->entry_id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  const TokenProofPolicy policy{.token_endpoint_url = TokenEndpointUrl(tasks_.issuer_url),
                                .started_at = tasks_.started_at,
                                .max_age_seconds = tasks_.proof_max_age_seconds,
                                .max_future_seconds = tasks_.proof_max_future_seconds,
                                .replay_cache = tasks_.replay_cache,
                                .nonces = tasks_.nonces};
  // RFC 9449 §8 over gRPC: the nonce travels in trailing metadata, on refusals and successes
  // alike, so the workload's SDK can sign its next proof (or retry this one) with it.
  if (tasks_.nonces != nullptr)
    context->AddTrailingMetadata("dpop-nonce", tasks_.nonces->Current());
  auto proof = VerifyTokenRequestProof(policy, clock_, request->dpop_proof(), entry->spiffe_id);
  if (!proof.ok()) {
    switch (proof.status().code()) {
      case absl::StatusCode::kFailedPrecondition:
        return ToGrpcStatus(absl::FailedPreconditionError(
            "use_dpop_nonce: the DPoP proof must carry the nonce sent in the dpop-nonce trailer"));
      case absl::StatusCode::kUnavailable:
        // Just restarted: say when proofs are accepted again so the SDK can retry then.
        context->AddTrailingMetadata(
            "retry-after",
            std::to_string(std::max<int64_t>(1, SecondsUntilProofsAccepted(policy, clock_))));
        [[fallthrough]];
      case absl::StatusCode::kResourceExhausted:
        // Nothing is wrong with the proof; the broker cannot accept it right now.
        return ToGrpcStatus(absl::UnavailableError(
            absl::StrCat("temporarily_unavailable: ", proof.status().message())));
      case absl::StatusCode::kInvalidArgument:
        return ToGrpcStatus(absl::InternalError("task token path misconfigured"));
      default:
        return ToGrpcStatus(absl::InvalidArgumentError(
            absl::StrCat("invalid DPoP proof: ", proof.status().message())));
    }
  }
  auto task = tasks_.registry->GetUsable(entry->spiffe_id, request->task_id());
  if (!task.ok()) return ToGrpcStatus(task.status());
  std::vector<std::string> requested(request->scopes().begin(), request->scopes().end());
  auto scopes = TokenScopesForTask(*task, request->audience(), requested);
  if (!scopes.ok()) return ToGrpcStatus(scopes.status());
  TaskTokenGrant grant;
  grant.spiffe_id = entry->spiffe_id;
  grant.task_id = task->id;
  grant.task_purpose = task->purpose;
  grant.task_expires_at = task->expires_at;
  grant.audience = request->audience();
  grant.scopes = *scopes;
  grant.jkt = proof->jkt;
  grant.ttl_seconds = entry->token_ttl_s;
  auto token = issuer_.IssueTaskToken(grant);
  if (!token.ok()) return ToGrpcStatus(token.status());
  response->set_access_token(token->token);
  response->set_token_type("DPoP");
  response->set_expires_in(std::max<int64_t>(0, token->expires_at - clock_.NowSeconds()));
  for (const auto& s : *scopes) response->add_scopes(s);
  response->set_jkt(proof->jkt);
  return grpc::Status::OK;
}

}  // namespace mandate::broker
