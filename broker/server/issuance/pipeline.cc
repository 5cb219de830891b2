#include "broker/server/issuance/pipeline.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/log/log.h"
#include "broker/common/store/credential_index.h"
#include "broker/server/audit/audit_detail.h"

namespace mandate::broker::issuance {
namespace {

using policy::IssuanceKind;

constexpr size_t kMaxAudiences = 16;
constexpr size_t kMaxAudienceLength = 512;
constexpr size_t kMaxCsrsPerCall = 1000;
// IDs come from the caller: a refused one is recorded only up to the longest a real one can be,
// so a caller cannot grow the audit log by megabytes per call.
constexpr size_t kMaxRecordedIdBytes = 128;

std::string_view EventName(IssuanceKind kind) {
  switch (kind) {
    case IssuanceKind::kTask:
      return "task_declared";
    default:
      return policy::IssuanceKindName(kind);
  }
}

// At most kMaxRecordedIdBytes of `id`, cut at a UTF-8 character boundary.
std::string Clip(std::string_view id) {
  if (id.size() <= kMaxRecordedIdBytes) return std::string(id);
  size_t end = kMaxRecordedIdBytes;
  while (end > 0 && (static_cast<unsigned char>(id[end]) & 0xC0) == 0x80) --end;
  return std::string(id.substr(0, end));
}

// The credential index row of an issued workload credential, stored with its audit record.
store::IssuedCredential IndexRow(std::string_view kind, const std::string& id,
                                 const std::string& spiffe_id, const std::string& node_id,
                                 const std::string& task_id, int64_t issued_at,
                                 int64_t expires_at) {
  return {.id = id,
          .kind = std::string(kind),
          .spiffe_id = spiffe_id,
          .node_id = node_id,
          .task_id = task_id,
          .issued_at = issued_at,
          .expires_at = expires_at};
}

// A caller-supplied ID for an audit record's detail: clipped and escaped, so no byte of it can
// make the record unreadable (the record's columns only ever hold IDs the broker resolved).
std::string Claimed(std::string_view id) { return log::EscapeForLog(Clip(id)); }

absl::StatusOr<crypto::PublicKey> KeyFromCsr(std::string_view csr_der) {
  auto csr = crypto::ParseAndVerifyCsrDer(csr_der);
  if (!csr.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid CSR: ", csr.status().message()));
  }
  return csr->key;
}

// `ttl` capped by the decision's ttl_max.
int64_t CapTtl(int64_t ttl, const policy::PolicyDecision& decision) {
  return decision.ttl_max.has_value() ? std::min(ttl, *decision.ttl_max) : ttl;
}

// The scopes of `granted` that the decision leaves (all when it says nothing about scopes).
std::vector<std::string> NarrowScopes(const std::vector<std::string>& granted,
                                      const policy::PolicyDecision& decision) {
  if (!decision.scopes.has_value()) return granted;
  std::vector<std::string> out;
  for (const auto& s : granted) {
    if (std::find(decision.scopes->begin(), decision.scopes->end(), s) != decision.scopes->end()) {
      out.push_back(s);
    }
  }
  return out;
}

// What the audit record of an issuance says about the policy decision.
void AddPolicyDetail(nlohmann::json& detail, const policy::PolicyDecision& decision, bool asked) {
  if (!asked) return;
  nlohmann::json p = {{"decision", "allow"}};
  if (decision.ttl_max.has_value()) p["ttl_max"] = *decision.ttl_max;
  if (decision.scopes.has_value()) p["scopes"] = *decision.scopes;
  detail["policy"] = std::move(p);
}

}  // namespace

std::string_view StepName(Step step) {
  switch (step) {
    case Step::kRequest:
      return "request";
    case Step::kAuthenticate:
      return "authenticate";
    case Step::kAuthorize:
      return "authorize";
    case Step::kProof:
      return "proof";
    case Step::kPolicy:
      return "policy";
    case Step::kMint:
      return "mint";
    case Step::kRecord:
      return "record";
  }
  return "unknown";
}

Refusal OAuthRefusal(Step step, std::string oauth_error, absl::StatusCode code,
                     std::string description, int http_status) {
  Refusal r;
  r.step = step;
  r.status = absl::Status(code, absl::StrCat(oauth_error, ": ", description));
  r.oauth_error = std::move(oauth_error);
  r.description = std::move(description);
  r.http_status = http_status;
  return r;
}

Refusal StatusRefusal(Step step, absl::Status status) {
  Refusal r;
  r.step = step;
  r.description = std::string(status.message());
  r.oauth_error =
      status.code() == absl::StatusCode::kUnavailable ? "server_error" : "invalid_grant";
  r.http_status = status.code() == absl::StatusCode::kUnavailable ? 500 : 400;
  r.status = std::move(status);
  return r;
}

IssuanceKind KindOf(const IssuanceRequest& request) {
  static constexpr IssuanceKind kKinds[] = {IssuanceKind::kNodeSvid,  IssuanceKind::kX509Svid,
                                            IssuanceKind::kJwtSvid,   IssuanceKind::kTask,
                                            IssuanceKind::kTaskToken, IssuanceKind::kTokenExchange};
  return kKinds[request.index()];
}

IssuancePipeline::IssuancePipeline(PipelineDeps deps) : deps_(deps) {}

Result<Issued> IssuancePipeline::Issue(const IssuanceRequest& request) const {
  return std::visit([this](const auto& r) { return Run(r); }, request);
}

namespace {
template <typename T, typename Out = T>
Result<Out> Narrowed(Result<Issued> result) {
  if (!result.ok()) return std::move(result.refusal());
  return std::move(std::get<T>(result.value()));
}
}  // namespace

Result<IssuedNodeSvid> IssuancePipeline::IssueNodeSvid(const NodeSvidRequest& request) const {
  return Narrowed<IssuedNodeSvid>(Issue(request));
}
Result<std::vector<IssuedX509Svid>> IssuancePipeline::IssueX509Svids(
    const X509SvidRequest& request) const {
  return Narrowed<std::vector<IssuedX509Svid>>(Issue(request));
}
Result<IssuedJwtSvid> IssuancePipeline::IssueJwtSvid(const JwtSvidRequest& request) const {
  return Narrowed<IssuedJwtSvid>(Issue(request));
}
Result<DeclaredTask> IssuancePipeline::DeclareTask(const TaskDeclarationRequest& request) const {
  return Narrowed<DeclaredTask>(Issue(request));
}
Result<IssuedTaskTokenResult> IssuancePipeline::IssueTaskToken(
    const TaskTokenRequest& request) const {
  return Narrowed<IssuedTaskTokenResult>(Issue(request));
}
Result<DelegatedToken> IssuancePipeline::IssueDelegatedToken(
    const TokenExchangeRequest& request) const {
  return Narrowed<DelegatedToken>(Issue(request));
}

void IssuancePipeline::Count(IssuanceKind kind, metrics::IssuanceOutcome outcome, double n) const {
  if (deps_.metrics != nullptr) deps_.metrics->CountIssuance(kind, outcome, n);
}

namespace {
AuditEvent RefusalEvent(std::string_view event, const std::string& spiffe_id,
                        const std::string& node_id, const std::string& task_id,
                        const std::string& entry_id, const Refusal& refusal,
                        const std::string& claimed_task_id = "") {
  nlohmann::json detail = {{"step", StepName(refusal.step)},
                           {"reason", std::string(refusal.status.message())}};
  if (!entry_id.empty()) detail["entry_id"] = Claimed(entry_id);
  if (entry_id.size() > kMaxRecordedIdBytes) detail["entry_id_bytes"] = entry_id.size();
  if (task_id.empty() && !claimed_task_id.empty()) detail["task_id"] = Claimed(claimed_task_id);
  if (refusal.policy_error) detail["policy_error"] = true;
  if (!refusal.policy_hook.empty()) detail["hook"] = refusal.policy_hook;
  return {.event = std::string(event),
          .outcome = "denied",
          .spiffe_id = spiffe_id,
          .node_id = node_id,
          .task_id = task_id,
          .detail = AuditDetail(detail)};
}

metrics::IssuanceOutcome OutcomeOf(const Refusal& refusal) {
  return refusal.policy_error || refusal.step == Step::kMint || refusal.step == Step::kRecord
             ? metrics::IssuanceOutcome::kError
             : metrics::IssuanceOutcome::kDenied;
}
}  // namespace

bool IssuancePipeline::TakeAnonymousAuditBudget() const {
  absl::MutexLock lock(&anonymous_mu_);
  const auto now = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(now - anonymous_refilled_at_).count();
  anonymous_refilled_at_ = now;
  anonymous_budget_ =
      std::min(kAnonymousAuditBurst, anonymous_budget_ + elapsed * kAnonymousAuditPerSecond);
  if (anonymous_budget_ < 1) {
    ++anonymous_unrecorded_;
    if (now - anonymous_reported_at_ >= std::chrono::seconds(1)) {
      spdlog::warn(
          "{} refusals of callers that proved nothing were not audited in the last "
          "period (more than {}/s); see mandate_audit_refusals_unrecorded_total",
          anonymous_unrecorded_, kAnonymousAuditPerSecond);
      anonymous_unrecorded_ = 0;
      anonymous_reported_at_ = now;
    }
    return false;
  }
  anonymous_budget_ -= 1;
  return true;
}

Refusal IssuancePipeline::Refuse(const Subject& given, Refusal refusal) const {
  Subject subject = given;
  if (subject.spiffe_id.empty() && !refusal.spiffe_id.empty()) {
    subject.spiffe_id = refusal.spiffe_id;
  }
  spdlog::info("issuance refused kind={} step={} spiffe_id={} node={}: {}",
               policy::IssuanceKindName(subject.kind), StepName(refusal.step),
               log::EscapeForLog(subject.spiffe_id), log::EscapeForLog(Clip(subject.node_id)),
               log::EscapeForLog(std::string(refusal.status.message())));
  Count(subject.kind, OutcomeOf(refusal));
  // A caller that proved nothing (a malformed request, a bad token, failed attestation) is
  // audited within a budget, so that a flood of garbage cannot fill the disk or hold the commit
  // queue that real issuance waits on; past it the refusal is counted, not recorded.
  const bool anonymous = subject.node_id.empty() && subject.spiffe_id.empty() &&
                         (refusal.step == Step::kRequest || refusal.step == Step::kAuthenticate);
  if (anonymous && !TakeAnonymousAuditBudget()) {
    if (deps_.metrics != nullptr) deps_.metrics->CountUnrecordedRefusal();
    return refusal;
  }
  absl::Status audited = deps_.audit->Record(
      RefusalEvent(EventName(subject.kind), subject.spiffe_id, subject.node_id, subject.task_id,
                   subject.entry_id, refusal, subject.claimed_task_id));
  if (!audited.ok()) spdlog::error("refusal not audited: {}", std::string(audited.message()));
  return refusal;
}

Refusal IssuancePipeline::RecordFailed(const Subject& subject, const absl::Status& status) const {
  Refusal r =
      OAuthRefusal(Step::kRecord, "server_error", absl::StatusCode::kUnavailable,
                   absl::StrCat("the issuance could not be recorded: ", status.message()), 500);
  spdlog::error("issuance not recorded kind={} spiffe_id={}: {}",
                policy::IssuanceKindName(subject.kind), subject.spiffe_id,
                std::string(status.message()));
  Count(subject.kind, metrics::IssuanceOutcome::kError);
  // When the store (not the audit log) failed, the refusal can still be recorded.
  absl::Status audited =
      deps_.audit->Record(RefusalEvent(EventName(subject.kind), subject.spiffe_id, subject.node_id,
                                       subject.task_id, subject.entry_id, r));
  if (!audited.ok()) spdlog::debug("refusal not audited: {}", std::string(audited.message()));
  return r;
}

absl::StatusOr<AuthenticatedNode> IssuancePipeline::AuthenticateCaller(
    std::string_view client_pem) const {
  return deps_.nodes->Authenticate(client_pem);
}

absl::StatusOr<store::RegistrationEntry> IssuancePipeline::AuthorizeEntry(
    const std::string& node_id, std::string_view entry_id) const {
  return deps_.entries->GetAssigned(node_id, entry_id);
}

Result<policy::PolicyDecision> IssuancePipeline::Decide(
    const policy::PolicyInput& input, bool oauth,
    std::optional<std::chrono::steady_clock::time_point> deadline) const {
  if (deps_.policy == nullptr || deps_.policy->empty()) {
    return policy::PolicyDecision{.allow = true};
  }
  policy::ChainDecision d =
      deadline.has_value() ? deps_.policy->Decide(input, *deadline) : deps_.policy->Decide(input);
  if (d.outcome == policy::ChainDecision::Outcome::kAllow) {
    if (!d.decision.require_approval || input.kind == IssuanceKind::kTask) {
      return std::move(d.decision);
    }
    // Only a task declaration can wait for a human; anything else asked to is refused.
    const std::string why =
        "the policy requires approval; only a task declaration can wait for one";
    return oauth ? OAuthRefusal(Step::kPolicy, "invalid_grant", absl::StatusCode::kPermissionDenied,
                                why)
                 : StatusRefusal(Step::kPolicy, absl::PermissionDeniedError(why));
  }
  const bool error = d.outcome == policy::ChainDecision::Outcome::kError;
  // A hook that could not decide denies, but says so as a temporary condition (503 /
  // UNAVAILABLE), so clients retry later instead of treating an outage as a verdict.
  Refusal r = error ? OAuthRefusal(Step::kPolicy, "temporarily_unavailable",
                                   absl::StatusCode::kUnavailable, d.decision.reason, 503)
              : oauth
                  ? OAuthRefusal(Step::kPolicy, "invalid_grant",
                                 absl::StatusCode::kPermissionDenied, d.decision.reason)
                  : StatusRefusal(Step::kPolicy, absl::PermissionDeniedError(d.decision.reason));
  if (error && !oauth) r.status = absl::UnavailableError(d.decision.reason);
  r.policy_error = error;
  r.policy_hook = d.hook;
  return r;
}

namespace {
bool PolicyAsked(const policy::PolicyChain* chain) { return chain != nullptr && !chain->empty(); }
}  // namespace

// ---- node_svid ----

Result<Issued> IssuancePipeline::Run(const NodeSvidRequest& request) const {
  Subject subject{.kind = IssuanceKind::kNodeSvid};
  std::vector<std::string> selectors;
  std::string presented_serial;
  const bool attesting = !request.attestor.empty();
  if (attesting) {
    if (!request.attestation.ok()) {
      return Refuse(subject, StatusRefusal(Step::kAuthenticate, request.attestation.status()));
    }
    subject.node_id = subject.spiffe_id = request.attestation->node_spiffe_id;
    selectors = request.attestation->selectors;
    auto banned = deps_.store->IsNodeBanned(subject.node_id);
    if (!banned.ok()) {
      return Refuse(subject, StatusRefusal(Step::kAuthorize, absl::UnavailableError(absl::StrCat(
                                                                 "the store cannot answer: ",
                                                                 banned.status().message()))));
    }
    if (*banned) {
      return Refuse(subject,
                    StatusRefusal(Step::kAuthorize, absl::PermissionDeniedError(absl::StrCat(
                                                        "node ", subject.node_id, " is banned"))));
    }
  } else {
    auto caller = AuthenticateCaller(request.client_pem);
    if (!caller.ok()) return Refuse(subject, StatusRefusal(Step::kAuthenticate, caller.status()));
    subject.node_id = subject.spiffe_id = caller->node.spiffe_id;
    selectors = caller->node.selectors;
    presented_serial = caller->presented_serial;
  }
  auto key = KeyFromCsr(request.csr_der);
  if (!key.ok()) return Refuse(subject, StatusRefusal(Step::kRequest, key.status()));

  const int64_t now = deps_.clock->NowSeconds();
  policy::PolicyInput input{.kind = IssuanceKind::kNodeSvid,
                            .spiffe_id = subject.node_id,
                            .node_id = subject.node_id,
                            .selectors = selectors,
                            .ttl_seconds = deps_.minter->defaults().agent_svid_ttl_seconds,
                            .time = now};
  auto decision = Decide(input, false);
  if (!decision.ok()) return Refuse(subject, std::move(decision.refusal()));
  const int64_t ttl = CapTtl(input.ttl_seconds, *decision);

  auto cert = deps_.minter->NodeSvid(*key, subject.node_id, ttl);
  if (!cert.ok()) return Refuse(subject, StatusRefusal(Step::kMint, cert.status()));

  nlohmann::json detail = {{"expires_at", cert->not_after()}};
  if (attesting) detail["attestor"] = request.attestor;
  AddPolicyDetail(detail, *decision, PolicyAsked(deps_.policy));
  if (auto s = deps_.audit->Record({.event = "node_svid",
                                    .outcome = "issued",
                                    .spiffe_id = subject.node_id,
                                    .node_id = subject.node_id,
                                    .credential_id = cert->SerialHex(),
                                    .detail = AuditDetail(detail)});
      !s.ok()) {
    return RecordFailed(subject, s);
  }
  // The node's record: the serial it must present from now on. A node that attests again (a TPM
  // node restarting or renewing) or renews keeps its running connections valid until it uses
  // the new SVID: if this answer is lost, it can still call with the certificate it has.
  store::AttestedNode node;
  if (attesting) {
    node.spiffe_id = subject.node_id;
    node.attestor = request.attestor;
    node.selectors = selectors;
    node.created_at = now;
    if (auto existing = deps_.store->GetNode(node.spiffe_id); existing.ok()) {
      node.previous_cert_serial = existing->cert_serial;
    } else if (!absl::IsNotFound(existing.status())) {
      return RecordFailed(subject, existing.status());
    }
  } else {
    auto existing = deps_.store->GetNode(subject.node_id);
    if (!existing.ok()) return RecordFailed(subject, existing.status());
    node = std::move(*existing);
    node.previous_cert_serial = presented_serial;
  }
  node.cert_serial = cert->SerialHex();
  node.cert_expires_at = cert->not_after();
  node.updated_at = now;
  if (auto s = deps_.store->UpsertNode(node); !s.ok()) return RecordFailed(subject, s);
  if (attesting) deps_.entries->NotifyNodeChanged();
  spdlog::info("issued node x509-svid spiffe_id={} serial={} expires_at={}{}", subject.node_id,
               cert->SerialHex(), cert->not_after(), attesting ? " (attested)" : " (renewed)");
  Count(IssuanceKind::kNodeSvid, metrics::IssuanceOutcome::kIssued);
  return Issued(IssuedNodeSvid{subject.node_id, std::move(*cert)});
}

// ---- x509_svid ----

Result<Issued> IssuancePipeline::Run(const X509SvidRequest& request) const {
  Subject subject{.kind = IssuanceKind::kX509Svid};
  auto caller = AuthenticateCaller(request.client_pem);
  if (!caller.ok()) return Refuse(subject, StatusRefusal(Step::kAuthenticate, caller.status()));
  subject.node_id = caller->node.spiffe_id;
  if (request.items.size() > kMaxCsrsPerCall) {
    return Refuse(subject, StatusRefusal(Step::kRequest,
                                         absl::InvalidArgumentError(absl::StrCat(
                                             "at most ", kMaxCsrsPerCall, " CSRs per call"))));
  }
  const bool asked = PolicyAsked(deps_.policy);
  const int64_t now = deps_.clock->NowSeconds();
  std::vector<IssuedX509Svid> out;
  out.reserve(request.items.size());
  // Issuances and refusals of the batch, in one commit: a node signing thousands of SVIDs at
  // start waits for a few fsyncs, not one per SVID. A refused item is left out of the answer
  // (the agent retries it later); the others are issued.
  std::vector<AuditEvent> events;
  events.reserve(request.items.size());
  std::optional<Refusal> first_refusal;
  size_t refused = 0, errors = 0;
  auto refuse_item = [&](const store::RegistrationEntry* entry, const X509SvidItem& item,
                         Refusal r) {
    events.push_back(RefusalEvent("x509_svid", entry ? entry->spiffe_id : "", subject.node_id, "",
                                  item.entry_id, r));
    spdlog::info("issuance refused kind=x509_svid step={} node={} entry={}: {}", StepName(r.step),
                 subject.node_id, log::EscapeForLog(Clip(item.entry_id)),
                 log::EscapeForLog(std::string(r.status.message())));
    (OutcomeOf(r) == metrics::IssuanceOutcome::kError ? errors : refused)++;
    if (!first_refusal.has_value()) first_refusal = std::move(r);
  };
  // One deadline for the whole batch: a slow hook holds this thread at most one timeout, and
  // once it could not decide, the rest of the batch is refused without asking it again.
  const auto deadline =
      std::chrono::steady_clock::now() +
      (deps_.policy != nullptr ? deps_.policy->timeout() : std::chrono::milliseconds(0));
  std::optional<Refusal> hook_failure;
  for (const X509SvidItem& item : request.items) {
    auto entry = AuthorizeEntry(subject.node_id, item.entry_id);
    if (!entry.ok()) {
      refuse_item(nullptr, item, StatusRefusal(Step::kAuthorize, entry.status()));
      continue;
    }
    auto key = KeyFromCsr(item.csr_der);
    if (!key.ok()) {
      refuse_item(&*entry, item, StatusRefusal(Step::kRequest, key.status()));
      continue;
    }
    policy::PolicyInput input{.kind = IssuanceKind::kX509Svid,
                              .spiffe_id = entry->spiffe_id,
                              .node_id = subject.node_id,
                              .selectors = entry->selectors,
                              .ttl_seconds = entry->x509_ttl_s > 0
                                                 ? entry->x509_ttl_s
                                                 : deps_.minter->defaults().x509_svid_ttl_seconds,
                              .time = now};
    if (hook_failure.has_value()) {
      refuse_item(&*entry, item, *hook_failure);
      continue;
    }
    auto decision = Decide(input, false, deadline);
    if (!decision.ok()) {
      if (decision.refusal().policy_error) hook_failure = decision.refusal();
      refuse_item(&*entry, item, std::move(decision.refusal()));
      continue;
    }
    auto cert =
        deps_.minter->X509Svid(*key, entry->spiffe_id, CapTtl(input.ttl_seconds, *decision));
    if (!cert.ok()) {
      refuse_item(&*entry, item, StatusRefusal(Step::kMint, cert.status()));
      continue;
    }
    nlohmann::json detail = {{"entry_id", entry->id}, {"expires_at", cert->not_after}};
    AddPolicyDetail(detail, *decision, asked);
    events.push_back(
        {.event = "x509_svid",
         .outcome = "issued",
         .spiffe_id = entry->spiffe_id,
         .node_id = subject.node_id,
         .credential_id = cert->serial_hex,
         .detail = AuditDetail(detail),
         .credential = IndexRow(store::kCredentialKindX509Svid, cert->serial_hex, entry->spiffe_id,
                                subject.node_id, "", deps_.clock->NowSeconds(), cert->not_after)});
    out.push_back(IssuedX509Svid{entry->id, entry->spiffe_id, std::move(*cert)});
  }
  if (auto s = deps_.audit->RecordAll(std::move(events)); !s.ok()) {
    return RecordFailed(subject, s);
  }
  Count(IssuanceKind::kX509Svid, metrics::IssuanceOutcome::kDenied, refused);
  Count(IssuanceKind::kX509Svid, metrics::IssuanceOutcome::kError, errors);
  Count(IssuanceKind::kX509Svid, metrics::IssuanceOutcome::kIssued, out.size());
  // Nothing issued: the caller hears why (a single-CSR call gets its refusal).
  if (out.empty() && first_refusal.has_value()) return std::move(*first_refusal);
  return Issued(std::move(out));
}

// ---- jwt_svid ----

Result<Issued> IssuancePipeline::Run(const JwtSvidRequest& request) const {
  Subject subject{.kind = IssuanceKind::kJwtSvid, .entry_id = request.entry_id};
  auto caller = AuthenticateCaller(request.client_pem);
  if (!caller.ok()) return Refuse(subject, StatusRefusal(Step::kAuthenticate, caller.status()));
  subject.node_id = caller->node.spiffe_id;
  auto bad_request = [&](std::string why) {
    return Refuse(subject, StatusRefusal(Step::kRequest, absl::InvalidArgumentError(why)));
  };
  if (request.audiences.empty()) return bad_request("JWT-SVID audience is required");
  if (request.audiences.size() > kMaxAudiences) {
    return bad_request(absl::StrCat("at most ", kMaxAudiences, " audiences"));
  }
  for (const auto& aud : request.audiences) {
    if (aud.empty() || aud.size() > kMaxAudienceLength) {
      return bad_request("JWT-SVID audience must be 1-512 bytes");
    }
  }
  auto entry = AuthorizeEntry(subject.node_id, request.entry_id);
  if (!entry.ok()) return Refuse(subject, StatusRefusal(Step::kAuthorize, entry.status()));
  subject.spiffe_id = entry->spiffe_id;
  policy::PolicyInput input{.kind = IssuanceKind::kJwtSvid,
                            .spiffe_id = entry->spiffe_id,
                            .node_id = subject.node_id,
                            .selectors = entry->selectors,
                            .audience = request.audiences,
                            .ttl_seconds = entry->jwt_ttl_s > 0
                                               ? entry->jwt_ttl_s
                                               : deps_.minter->defaults().jwt_svid_ttl_seconds,
                            .time = deps_.clock->NowSeconds()};
  auto decision = Decide(input, false);
  if (!decision.ok()) return Refuse(subject, std::move(decision.refusal()));
  auto jwt = deps_.minter->JwtSvid(entry->spiffe_id, request.audiences,
                                   CapTtl(input.ttl_seconds, *decision));
  if (!jwt.ok()) return Refuse(subject, StatusRefusal(Step::kMint, jwt.status()));
  nlohmann::json detail = {
      {"entry_id", entry->id}, {"aud", request.audiences}, {"expires_at", jwt->expires_at}};
  AddPolicyDetail(detail, *decision, PolicyAsked(deps_.policy));
  if (auto s =
          deps_.audit->Record({.event = "jwt_svid",
                               .outcome = "issued",
                               .spiffe_id = entry->spiffe_id,
                               .node_id = subject.node_id,
                               .credential_id = jwt->jti,
                               .detail = AuditDetail(detail),
                               .credential = IndexRow(store::kCredentialKindJwtSvid, jwt->jti,
                                                      entry->spiffe_id, subject.node_id, "",
                                                      deps_.clock->NowSeconds(), jwt->expires_at)});
      !s.ok()) {
    return RecordFailed(subject, s);
  }
  spdlog::debug("issued jwt-svid spiffe_id={} jti={} entry={} node={} expires_at={}",
                entry->spiffe_id, jwt->jti, entry->id, subject.node_id, jwt->expires_at);
  Count(IssuanceKind::kJwtSvid, metrics::IssuanceOutcome::kIssued);
  return Issued(std::move(*jwt));
}

// ---- task (declaration) ----

Result<Issued> IssuancePipeline::Run(const TaskDeclarationRequest& request) const {
  Subject subject{.kind = IssuanceKind::kTask, .entry_id = request.entry_id};
  if (deps_.tasks == nullptr) {
    return StatusRefusal(Step::kRequest,
                         absl::UnimplementedError("tasks are not enabled on this broker"));
  }
  auto caller = AuthenticateCaller(request.client_pem);
  if (!caller.ok()) return Refuse(subject, StatusRefusal(Step::kAuthenticate, caller.status()));
  subject.node_id = caller->node.spiffe_id;
  auto entry = AuthorizeEntry(subject.node_id, request.entry_id);
  if (!entry.ok()) return Refuse(subject, StatusRefusal(Step::kAuthorize, entry.status()));
  subject.spiffe_id = entry->spiffe_id;
  auto task = deps_.tasks->Prepare(entry->spiffe_id, entry->scopes, request.task);
  if (!task.ok()) {
    return Refuse(subject, StatusRefusal(absl::IsPermissionDenied(task.status()) ? Step::kAuthorize
                                                                                 : Step::kRequest,
                                         task.status()));
  }
  policy::PolicyInput input{.kind = IssuanceKind::kTask,
                            .spiffe_id = entry->spiffe_id,
                            .node_id = subject.node_id,
                            .selectors = entry->selectors,
                            .audience = task->audiences,
                            .scopes = task->scopes,
                            .ttl_seconds = task->expires_at - task->created_at,
                            .task = policy::PolicyTask{.purpose = task->purpose,
                                                       .scopes = task->scopes,
                                                       .audiences = task->audiences},
                            .time = task->created_at};
  auto decision = Decide(input, false);
  if (!decision.ok()) return Refuse(subject, std::move(decision.refusal()));
  task->scopes = NarrowScopes(task->scopes, *decision);
  if (task->scopes.empty()) {
    return Refuse(subject,
                  StatusRefusal(Step::kPolicy, absl::PermissionDeniedError(
                                                   "the policy leaves none of the task's scopes")));
  }
  task->expires_at = task->created_at + CapTtl(task->expires_at - task->created_at, *decision);
  if (decision->require_approval) {
    // A human decides: the task is stored "pending_approval" with its approval in one
    // transaction, and the approver sees the very input document the hook saw.
    auto pending = deps_.tasks->CreatePendingApproval(
        *task, policy::PolicyInputJson(input).dump(-1, ' ', false,
                                                   nlohmann::json::error_handler_t::replace));
    if (!pending.ok()) {
      if (absl::IsFailedPrecondition(pending.status()) ||
          absl::IsInvalidArgument(pending.status())) {
        return Refuse(
            subject, StatusRefusal(Step::kPolicy, absl::PermissionDeniedError(
                                                      absl::StrCat("the policy requires approval: ",
                                                                   pending.status().message()))));
      }
      return RecordFailed(subject, pending.status());
    }
    *task = std::move(*pending);
  } else if (auto s = deps_.tasks->Create(*task); !s.ok()) {
    return RecordFailed(subject, s);
  }
  subject.task_id = task->id;
  nlohmann::json detail = {{"purpose", task->purpose},
                           {"scopes", task->scopes},
                           {"audiences", task->audiences},
                           {"entry_id", entry->id},
                           {"expires_at", task->expires_at}};
  AddPolicyDetail(detail, *decision, PolicyAsked(deps_.policy));
  const bool pending = !task->approval_id.empty();
  if (pending) detail["approval_id"] = task->approval_id;
  if (auto s = deps_.audit->Record({.event = "task_declared",
                                    .outcome = pending ? "pending_approval" : "ok",
                                    .spiffe_id = entry->spiffe_id,
                                    .node_id = subject.node_id,
                                    .task_id = task->id,
                                    .detail = AuditDetail(detail)});
      !s.ok()) {
    return RecordFailed(subject, s);
  }
  spdlog::info("task declared task={} spiffe_id={} entry={} scopes={} expires_at={}", task->id,
               task->spiffe_id, entry->id, task->scopes.size(), task->expires_at);
  Count(IssuanceKind::kTask, metrics::IssuanceOutcome::kIssued);
  return Issued(DeclaredTask{std::move(*task)});
}

// ---- task_token ----

Result<Issued> IssuancePipeline::Run(const TaskTokenRequest& request) const {
  Subject subject{.kind = IssuanceKind::kTaskToken,
                  .entry_id = request.ask.entry_id,
                  .claimed_task_id = request.ask.task_id};
  if (deps_.exchange == nullptr) {
    return OAuthRefusal(Step::kRequest, "unsupported_grant_type", absl::StatusCode::kUnimplemented,
                        "tasks are not enabled on this broker");
  }
  TaskTokenAsk ask = request.ask;
  if (!request.client_pem.empty() || ask.subject_token.empty()) {
    auto caller = AuthenticateCaller(request.client_pem);
    if (!caller.ok()) return Refuse(subject, StatusRefusal(Step::kAuthenticate, caller.status()));
    ask.node_id = subject.node_id = caller->node.spiffe_id;
  }
  auto authorized = deps_.exchange->Authorize(ask);
  if (!authorized.ok()) return Refuse(subject, std::move(authorized.refusal()));
  AuthorizedTaskToken& grant = *authorized;
  subject.spiffe_id = grant.spiffe_id;
  subject.task_id = grant.task.id;
  subject.node_id = grant.node_id.empty() ? subject.node_id : grant.node_id;
  const int64_t now = deps_.clock->NowSeconds();
  policy::PolicyInput input{
      .kind = IssuanceKind::kTaskToken,
      .spiffe_id = grant.spiffe_id,
      .node_id = grant.node_id,
      .selectors = grant.selectors,
      .audience = {grant.audience},
      .scopes = grant.scopes,
      .ttl_seconds = std::max<int64_t>(0, std::min(grant.ttl_seconds, grant.task.expires_at - now)),
      .task = policy::PolicyTask{.id = grant.task.id,
                                 .purpose = grant.task.purpose,
                                 .scopes = grant.task.scopes,
                                 .audiences = grant.task.audiences},
      .time = now};
  auto decision = Decide(input, true);
  if (!decision.ok()) return Refuse(subject, std::move(decision.refusal()));
  std::vector<std::string> scopes = NarrowScopes(grant.scopes, *decision);
  if (scopes.empty()) {
    return Refuse(subject,
                  OAuthRefusal(Step::kPolicy, "invalid_scope", absl::StatusCode::kPermissionDenied,
                               "the policy leaves none of the requested scopes"));
  }
  // The hook may have taken a while: a task ended (or sent back for approval) meanwhile gets no
  // token.
  if (auto still = deps_.tasks != nullptr ? deps_.tasks->GetUsable(grant.spiffe_id, grant.task.id)
                                          : absl::StatusOr<store::Task>(grant.task);
      !still.ok()) {
    return Refuse(
        subject,
        OAuthRefusal(Step::kAuthorize,
                     absl::IsUnavailable(still.status()) ? "server_error" : "invalid_grant",
                     still.status().code(), std::string(still.status().message())));
  }
  TaskTokenGrant mint{.spiffe_id = grant.spiffe_id,
                      .task_id = grant.task.id,
                      .task_purpose = grant.task.purpose,
                      .task_expires_at = grant.task.expires_at,
                      .audience = grant.audience,
                      .scopes = scopes,
                      .jkt = grant.jkt,
                      .ttl_seconds = CapTtl(grant.ttl_seconds, *decision)};
  auto token = deps_.minter->TaskToken(mint);
  if (!token.ok()) {
    if (absl::IsFailedPrecondition(token.status())) {
      return Refuse(subject, OAuthRefusal(Step::kAuthorize, "invalid_grant",
                                          absl::StatusCode::kFailedPrecondition,
                                          std::string(token.status().message())));
    }
    Refusal r = OAuthRefusal(Step::kMint, "server_error", absl::StatusCode::kInternal,
                             "cannot mint the token", 500);
    return Refuse(subject, std::move(r));
  }
  std::string scope;
  for (const auto& s : scopes) absl::StrAppend(&scope, scope.empty() ? "" : " ", s);
  nlohmann::json detail = {{"aud", grant.audience},
                           {"scope", scope},
                           {"jkt", grant.jkt},
                           {"expires_at", token->expires_at}};
  AddPolicyDetail(detail, *decision, PolicyAsked(deps_.policy));
  if (auto s = deps_.audit->Record(
          {.event = "task_token",
           .outcome = "issued",
           .spiffe_id = grant.spiffe_id,
           .node_id = Clip(subject.node_id),
           .task_id = grant.task.id,
           .credential_id = token->jti,
           .detail = AuditDetail(detail),
           .credential = IndexRow(store::kCredentialKindTaskToken, token->jti, grant.spiffe_id,
                                  Clip(subject.node_id), grant.task.id, deps_.clock->NowSeconds(),
                                  token->expires_at)});
      !s.ok()) {
    return RecordFailed(subject, s);
  }
  spdlog::debug("issued task token sub={} task={} aud=\"{}\" jti={} expires_at={}", grant.spiffe_id,
                grant.task.id, log::EscapeForLog(grant.audience), token->jti, token->expires_at);
  Count(IssuanceKind::kTaskToken, metrics::IssuanceOutcome::kIssued);
  IssuedTaskTokenResult out;
  out.token = std::move(*token);
  out.scopes = std::move(scopes);
  out.scopes_requested = grant.scopes_requested;
  out.requested_scopes = ask.scopes;
  out.jkt = grant.jkt;
  out.expires_in = std::max<int64_t>(0, out.token.expires_at - deps_.clock->NowSeconds());
  return Issued(std::move(out));
}

// ---- token_exchange ----

Result<Issued> IssuancePipeline::Run(const TokenExchangeRequest&) const {
  Subject subject{.kind = IssuanceKind::kTokenExchange};
  return Refuse(subject,
                OAuthRefusal(Step::kRequest, "invalid_request", absl::StatusCode::kUnimplemented,
                             "delegation (actor_token, user subject tokens) is not "
                             "supported yet"));
}

}  // namespace mandate::broker::issuance
