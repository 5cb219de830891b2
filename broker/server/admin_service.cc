#include "broker/server/admin_service.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "attestors/node/join_token/join_token_attestor.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/grpcutil/status.h"
#include "broker/common/log/log.h"
#include "broker/common/registration/entry_rules.h"
#include "broker/common/spiffe/selector.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/store/approval_rules.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/approvals/approval_registry.h"
#include "broker/server/audit/audit_checkpoint.h"
#include "broker/server/audit/audit_detail.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/entry_proto.h"
#include "broker/server/tasks/task_registry.h"

namespace mandate::broker {
namespace {

namespace adminpb = mandate::admin::v1;
namespace commonpb = mandate::common::v1;
using grpcutil::ToGrpcStatus;

void ToProto(const store::RegistrationEntry& entry, commonpb::Entry* out) {
  EntryToProto(entry, out);
}

void ToProto(const store::AttestedNode& node, commonpb::Node* out) {
  out->set_spiffe_id(node.spiffe_id);
  out->set_attestor(node.attestor);
  for (const auto& s : node.selectors) out->add_selectors(s);
  out->set_cert_serial(node.cert_serial);
  out->set_cert_expires_at(node.cert_expires_at);
  out->set_created_at(node.created_at);
  out->set_updated_at(node.updated_at);
  out->set_banned(node.banned);
}

absl::StatusOr<std::string> NewEntryId() {
  ASSIGN_OR_RETURN(std::string r, crypto::RandomBytes(16));
  r[6] = static_cast<char>((r[6] & 0x0f) | 0x40);  // UUID version 4
  r[8] = static_cast<char>((r[8] & 0x3f) | 0x80);  // RFC 4122 variant
  std::string h = crypto::HexEncode(r);
  return absl::StrCat(h.substr(0, 8), "-", h.substr(8, 4), "-", h.substr(12, 4), "-",
                      h.substr(16, 4), "-", h.substr(20));
}

}  // namespace

absl::Status AdminService::ValidateEntry(const commonpb::Entry& entry) const {
  return registration::ValidateEntry(entry, &authority_.trust_domain(),
                                     limits_.max_svid_ttl_seconds);
}

grpc::Status AdminService::Audited(AuditEvent event) {
  absl::Status status = audit_.Record(std::move(event));
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      absl::StrCat("the change was applied, but its audit record could not be "
                                   "stored: ",
                                   status.message()));
}

grpc::Status AdminService::CreateJoinToken(grpc::ServerContext*,
                                           const adminpb::CreateJoinTokenRequest* request,
                                           adminpb::CreateJoinTokenResponse* response) {
  const spiffe::TrustDomain& td = authority_.trust_domain();
  auto id = spiffe::SpiffeId::Parse(request->spiffe_id());
  if (!id.ok()) {
    return ToGrpcStatus(
        absl::InvalidArgumentError(absl::StrCat("--spiffe-id: ", id.status().message())));
  }
  constexpr std::string_view kPrefix = "/node/join/";
  std::string_view path = id->path();
  if (!id->MemberOf(td) || !path.starts_with(kPrefix) ||
      path.substr(kPrefix.size()).find('/') != std::string_view::npos) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("--spiffe-id must look like ", td.IdString(),
                                     "/node/join/<name> (one path segment for the name)"));
  }
  int64_t ttl =
      request->ttl_seconds() == 0 ? limits_.default_join_token_ttl_seconds : request->ttl_seconds();
  if (ttl <= 0 || ttl > limits_.max_join_token_ttl_seconds) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("--ttl must be between 1 and ",
                                     limits_.max_join_token_ttl_seconds, " seconds"));
  }
  auto token = attestors::GenerateJoinToken();
  if (!token.ok()) return ToGrpcStatus(token.status());
  store::JoinToken record;
  record.token_hash = token->token_hash;
  record.node_spiffe_id = id->str();
  record.created_at = clock_.NowSeconds();
  record.expires_at = record.created_at + ttl;
  if (auto s = store_.CreateJoinToken(record); !s.ok()) return ToGrpcStatus(s);
  spdlog::info("join token created node={} expires_at={} token_sha256_prefix={}", id->str(),
               record.expires_at, record.token_hash.substr(0, 12));
  if (grpc::Status s = Audited(
          {.event = "join_token_created",
           .outcome = "ok",
           .spiffe_id = id->str(),
           .detail = AuditDetail({{"expires_at", record.expires_at},
                                  {"token_sha256_prefix", record.token_hash.substr(0, 12)}})});
      !s.ok()) {
    return s;  // the token is not handed out: it exists, but nobody learns it
  }
  response->set_token(token->token);
  response->set_spiffe_id(id->str());
  response->set_expires_at(record.expires_at);
  return grpc::Status::OK;
}

grpc::Status AdminService::CreateEntry(grpc::ServerContext*,
                                       const adminpb::CreateEntryRequest* request,
                                       commonpb::Entry* response) {
  const commonpb::Entry& in = request->entry();
  if (auto s = ValidateEntry(in); !s.ok()) return ToGrpcStatus(s);
  store::RegistrationEntry entry;
  auto id = NewEntryId();
  if (!id.ok()) return ToGrpcStatus(id.status());
  entry.id = *id;
  entry.spiffe_id = in.spiffe_id();
  entry.parent_id = in.parent_id();
  entry.selectors.assign(in.selectors().begin(), in.selectors().end());
  entry.scopes.assign(in.scopes().begin(), in.scopes().end());
  entry.x509_ttl_s = in.x509_ttl_seconds();
  entry.jwt_ttl_s = in.jwt_ttl_seconds();
  entry.token_ttl_s = in.token_ttl_seconds();
  entry.created_at = clock_.NowSeconds();
  auto stored = entries_.Create(std::move(entry));
  if (!stored.ok()) return ToGrpcStatus(stored.status());
  spdlog::info("entry created id={} spiffe_id={} parent_id={}", stored->id, stored->spiffe_id,
               stored->parent_id);
  if (grpc::Status s = Audited({.event = "entry_created",
                                .outcome = "ok",
                                .spiffe_id = stored->spiffe_id,
                                .node_id = stored->parent_id,
                                .detail = AuditDetail({{"entry_id", stored->id},
                                                       {"selectors", stored->selectors},
                                                       {"scopes", stored->scopes}})});
      !s.ok()) {
    return s;
  }
  ToProto(*stored, response);
  return grpc::Status::OK;
}

grpc::Status AdminService::ListEntries(grpc::ServerContext*, const adminpb::ListEntriesRequest*,
                                       adminpb::ListEntriesResponse* response) {
  for (const auto& entry : entries_.List()) ToProto(entry, response->add_entries());
  return grpc::Status::OK;
}

grpc::Status AdminService::GetEntry(grpc::ServerContext*, const adminpb::GetEntryRequest* request,
                                    commonpb::Entry* response) {
  auto entry = entries_.Get(request->id());
  if (!entry.ok()) return ToGrpcStatus(entry.status());
  ToProto(*entry, response);
  return grpc::Status::OK;
}

grpc::Status AdminService::DeleteEntry(grpc::ServerContext*,
                                       const adminpb::DeleteEntryRequest* request,
                                       adminpb::DeleteEntryResponse*) {
  if (auto s = entries_.Delete(request->id()); !s.ok()) return ToGrpcStatus(s);
  spdlog::info("entry deleted id={}", log::EscapeForLog(request->id()));
  return Audited({.event = "entry_deleted",
                  .outcome = "ok",
                  .detail = AuditDetail({{"entry_id", request->id()}})});
}

grpc::Status AdminService::ListAgents(grpc::ServerContext*, const adminpb::ListAgentsRequest*,
                                      adminpb::ListAgentsResponse* response) {
  auto nodes = store_.ListNodes();
  if (!nodes.ok()) return ToGrpcStatus(nodes.status());
  for (const auto& node : *nodes) ToProto(node, response->add_agents());
  return grpc::Status::OK;
}

grpc::Status AdminService::EvictAgent(grpc::ServerContext*, const adminpb::AgentRequest* request,
                                      adminpb::AgentResponse*) {
  absl::Status deleted = store_.DeleteNode(request->spiffe_id());
  // Evicting a TPM node is also the operator's override after a TPM clear: its boot counters
  // start afresh at the next attestation (even when no node row exists any more, e.g. after an
  // attestation that failed once its counters were recorded).
  constexpr std::string_view kTpmPrefix = "/node/tpm/";
  bool reset_counters = false;
  if (auto id = spiffe::SpiffeId::Parse(request->spiffe_id());
      id.ok() && id->path().starts_with(kTpmPrefix)) {
    if (auto s = store_.ResetTpmCounters(id->path().substr(kTpmPrefix.size())); !s.ok()) {
      return ToGrpcStatus(s);
    }
    reset_counters = true;
  }
  if (!deleted.ok() && !(absl::IsNotFound(deleted) && reset_counters)) {
    return ToGrpcStatus(deleted);
  }
  entries_.NotifyNodeChanged();
  spdlog::info("agent evicted node={}", log::EscapeForLog(request->spiffe_id()));
  return Audited({.event = "agent_evicted",
                  .outcome = "ok",
                  .spiffe_id = request->spiffe_id(),
                  .node_id = request->spiffe_id()});
}

grpc::Status AdminService::BanAgent(grpc::ServerContext*, const adminpb::AgentRequest* request,
                                    adminpb::AgentResponse*) {
  if (auto s = store_.SetNodeBanned(request->spiffe_id(), true); !s.ok()) {
    return ToGrpcStatus(s);
  }
  entries_.NotifyNodeChanged();
  spdlog::info("agent banned node={}", log::EscapeForLog(request->spiffe_id()));
  return Audited({.event = "agent_banned",
                  .outcome = "ok",
                  .spiffe_id = request->spiffe_id(),
                  .node_id = request->spiffe_id()});
}

grpc::Status AdminService::GetBundle(grpc::ServerContext*, const adminpb::GetBundleRequest*,
                                     adminpb::GetBundleResponse* response) {
  response->set_trust_domain(authority_.trust_domain().name());
  response->set_x509_pem(authority_.bundle_pem());
  response->set_jwks(authority_.spiffe_bundle_jwks());
  return grpc::Status::OK;
}

grpc::Status AdminService::ListAudit(grpc::ServerContext*, const adminpb::ListAuditRequest* request,
                                     adminpb::ListAuditResponse* response) {
  store::AuditQuery query;
  query.since = request->since();
  query.spiffe_id = request->spiffe_id();
  query.task_id = request->task_id();
  query.credential_id = request->credential_id();
  query.chain_id = request->chain_id();
  query.after_seq = request->after_seq();
  if (request->limit() != 0) query.limit = request->limit();
  auto records = store_.ListAuditRecords(query);
  if (!records.ok()) return ToGrpcStatus(records.status());
  for (store::AuditRecord& r : *records) {
    adminpb::AuditRecord* out = response->add_records();
    out->set_chain_id(std::move(r.chain_id));
    out->set_seq(r.seq);
    out->set_time(r.time);
    out->set_event(std::move(r.event));
    out->set_outcome(std::move(r.outcome));
    out->set_spiffe_id(std::move(r.spiffe_id));
    out->set_node_id(std::move(r.node_id));
    out->set_task_id(std::move(r.task_id));
    out->set_credential_id(std::move(r.credential_id));
    out->set_detail(std::move(r.detail));
    out->set_prev_hash(std::move(r.prev_hash));
    out->set_hash(std::move(r.hash));
  }
  return grpc::Status::OK;
}

grpc::Status AdminService::VerifyAudit(grpc::ServerContext*, const adminpb::VerifyAuditRequest*,
                                       adminpb::VerifyAuditResponse* response) {
  auto verdicts = VerifyAuditStore(store_, audit_, authority_.jwt_public_key());
  if (!verdicts.ok()) return ToGrpcStatus(verdicts.status());
  for (const AuditChainVerdict& verdict : *verdicts) {
    adminpb::AuditChainStatus* out = response->add_chains();
    out->set_chain_id(verdict.chain_id);
    out->set_records(verdict.records);
    out->set_head_hash(verdict.head_hash);
    out->set_intact(verdict.status.ok());
    out->set_problem(std::string(verdict.status.message()));
    out->set_checkpoints(verdict.checkpoints);
    out->set_checkpointed_seq(verdict.checkpointed_seq);
    out->set_this_broker(verdict.this_broker);
    out->set_covered_seq(verdict.covered_seq);
    out->set_unverified(verdict.unverified);
    for (const AuditSeqRange& range : verdict.not_vouched) {
      adminpb::AuditSeqRange* r = out->add_not_vouched();
      r->set_first(range.first);
      r->set_last(range.last);
    }
    if (!verdict.not_vouched.empty()) {
      spdlog::warn("audit verify: chain {}: {} range(s) of records not vouched for, from record {}",
                   verdict.chain_id, verdict.not_vouched.size(), verdict.not_vouched.front().first);
    }
    if (!verdict.status.ok()) {
      spdlog::warn("audit verify: {}", log::EscapeForLog(std::string(verdict.status.message())));
    }
  }
  return grpc::Status::OK;
}

// ---- Approvals and policy ----

void AdminService::EnableApprovals(ApprovalRegistry* approvals) {
  absl::MutexLock lock(&wiring_mu_);
  approvals_ = approvals;
}

void AdminService::SetPolicyReloader(std::function<absl::Status()> reload) {
  absl::MutexLock lock(&wiring_mu_);
  reload_policy_ = std::move(reload);
}

void AdminService::SetCallerIdentifier(CallerIdentifier identify) {
  absl::MutexLock lock(&wiring_mu_);
  identify_ = std::move(identify);
}

absl::StatusOr<ApprovalRegistry*> AdminService::Approvals() {
  absl::MutexLock lock(&wiring_mu_);
  if (approvals_ == nullptr) {
    return absl::FailedPreconditionError("approvals are not enabled on this broker");
  }
  return approvals_;
}

absl::StatusOr<std::string> AdminService::CallerOf(const grpc::ServerContext* context) {
  CallerIdentifier identify;
  {
    absl::MutexLock lock(&wiring_mu_);
    identify = identify_;
  }
  // A decision is only as accountable as its recorded decider: without one, refuse.
  if (!identify) {
    return absl::FailedPreconditionError("the broker cannot tell who is calling the admin API");
  }
  absl::StatusOr<std::string> who = identify(context);
  if (!who.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the broker cannot tell who is calling the admin API: ", who.status().message()));
  }
  if (who->empty()) {
    return absl::FailedPreconditionError("the broker cannot tell who is calling the admin API");
  }
  return who;
}

void AdminService::FillApproval(const store::Approval& approval, adminpb::Approval* out) {
  out->set_id(approval.id);
  out->set_task_id(approval.task_id);
  out->set_spiffe_id(approval.spiffe_id);
  out->set_input_document(approval.input_document);
  out->set_status(approval.status);
  out->set_created_at(approval.created_at);
  out->set_expires_at(approval.expires_at);
  out->set_decided_at(approval.decided_at);
  out->set_decided_by(approval.decided_by);
  out->set_reason(approval.reason);
  // The task is what approving grants; an operator must see it even if the input document is
  // unreadable. A task that cannot be read leaves these fields empty rather than failing the
  // listing (the approval itself is still worth showing).
  absl::StatusOr<store::Task> task = store_.GetTask(approval.task_id);
  if (!task.ok()) {
    spdlog::warn("approval {}: cannot read task {}: {}", approval.id, approval.task_id,
                 std::string(task.status().message()));
    return;
  }
  out->set_purpose(task->purpose);
  for (const std::string& scope : task->scopes) out->add_scopes(scope);
  for (const std::string& audience : task->audiences) out->add_audiences(audience);
  out->set_task_status(task->status);
  out->set_task_expires_at(task->expires_at);
  // Before the approval, the declared lifetime is expires_at - created_at; after it, the deadline
  // was moved by exactly that much (store::ApprovedTaskExpiry).
  const int64_t start =
      approval.status == store::kApprovalApproved ? approval.decided_at : task->created_at;
  out->set_task_ttl_seconds(std::max<int64_t>(0, task->expires_at - start));
}

grpc::Status AdminService::ListApprovals(grpc::ServerContext*,
                                         const adminpb::ListApprovalsRequest* request,
                                         adminpb::ListApprovalsResponse* response) {
  absl::StatusOr<ApprovalRegistry*> approvals = Approvals();
  if (!approvals.ok()) return ToGrpcStatus(approvals.status());
  auto list = (*approvals)->List(request->status());
  if (!list.ok()) return ToGrpcStatus(list.status());
  for (const store::Approval& approval : *list) FillApproval(approval, response->add_approvals());
  return grpc::Status::OK;
}

grpc::Status AdminService::GetApproval(grpc::ServerContext*,
                                       const adminpb::GetApprovalRequest* request,
                                       adminpb::Approval* response) {
  absl::StatusOr<ApprovalRegistry*> approvals = Approvals();
  if (!approvals.ok()) return ToGrpcStatus(approvals.status());
  auto approval = (*approvals)->Get(request->id());
  if (!approval.ok()) return ToGrpcStatus(approval.status());
  FillApproval(*approval, response);
  return grpc::Status::OK;
}

grpc::Status AdminService::DecideApproval(grpc::ServerContext* context,
                                          const adminpb::DecideApprovalRequest* request,
                                          adminpb::Approval* response) {
  absl::StatusOr<ApprovalRegistry*> approvals = Approvals();
  if (!approvals.ok()) return ToGrpcStatus(approvals.status());
  absl::StatusOr<std::string> caller = CallerOf(context);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  auto decided =
      (*approvals)->Decide(request->id(), request->approve(), *caller, request->reason());
  if (!decided.ok()) return ToGrpcStatus(decided.status());
  FillApproval(decided->approval, response);
  return grpc::Status::OK;
}

grpc::Status AdminService::ReloadPolicy(grpc::ServerContext* context,
                                        const adminpb::ReloadPolicyRequest*,
                                        adminpb::ReloadPolicyResponse*) {
  std::function<absl::Status()> reload;
  {
    absl::MutexLock lock(&wiring_mu_);
    reload = reload_policy_;
  }
  if (!reload) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "no --policy-file: this broker has no policy rules file to reload");
  }
  absl::StatusOr<std::string> caller = CallerOf(context);
  const std::string who = caller.ok() ? *caller : "unknown";
  absl::Status reloaded = reload();
  if (reloaded.ok()) {
    spdlog::info("policy reloaded by {}", log::EscapeForLog(who));
  } else {
    spdlog::warn("policy reload by {} failed: {}", log::EscapeForLog(who),
                 log::EscapeForLog(std::string(reloaded.message())));
  }
  grpc::Status audited = Audited(
      {.event = "policy_reloaded",
       .outcome = reloaded.ok() ? "ok" : "error",
       .detail = AuditDetail({{"decided_by", who}, {"error", std::string(reloaded.message())}})});
  if (!reloaded.ok()) {
    return ToGrpcStatus(absl::Status(
        reloaded.code(), absl::StrCat("the policy was not reloaded (the rules in force stay): ",
                                      reloaded.message())));
  }
  return audited;
}

}  // namespace mandate::broker
