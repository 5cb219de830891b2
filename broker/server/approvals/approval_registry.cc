#include "broker/server/approvals/approval_registry.h"

#include <spdlog/spdlog.h>

#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "broker/common/log/log.h"
#include "broker/common/store/approval_rules.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/audit/audit_detail.h"
#include "broker/server/metrics/metrics.h"

namespace mandate::broker {
namespace {

// This Abseil build has its own string_view type, so std::string_view is bridged explicitly.
absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }

// A reason is shown to the agent and to other operators as one line of text: valid UTF-8
// without control characters (C0 but tab, DEL, C1), as for task purposes.
absl::Status CheckReason(std::string_view reason) {
  for (size_t i = 0; i < reason.size();) {
    const unsigned char lead = static_cast<unsigned char>(reason[i]);
    size_t length = lead < 0x80             ? 1
                    : (lead & 0xE0) == 0xC0 ? 2
                    : (lead & 0xF0) == 0xE0 ? 3
                    : (lead & 0xF8) == 0xF0 ? 4
                                            : 0;
    if (length == 0 || reason.size() - i < length) {
      return absl::InvalidArgumentError("--reason is not valid UTF-8");
    }
    char32_t c = length == 1 ? lead : lead & (0x7F >> length);
    for (size_t k = 1; k < length; ++k) {
      const unsigned char next = static_cast<unsigned char>(reason[i + k]);
      if ((next & 0xC0) != 0x80) return absl::InvalidArgumentError("--reason is not valid UTF-8");
      c = (c << 6) | (next & 0x3F);
    }
    constexpr char32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < kMin[length] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
      return absl::InvalidArgumentError("--reason is not valid UTF-8");
    }
    if (c != U'\t' && (c < 0x20 || (c >= 0x7F && c <= 0x9F))) {
      return absl::InvalidArgumentError(
          absl::StrCat("--reason holds a control character at byte ", i, " (one line of text)"));
    }
    i += length;
  }
  return absl::OkStatus();
}

absl::Status CheckApprovalIdSyntax(std::string_view id) {
  if (!store::IsApprovalId(id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", log::EscapeForLog(id),
        "\" is not an approval id (appr_ followed by 22 characters; see mandate approval list)"));
  }
  return absl::OkStatus();
}

nlohmann::json DecisionDetail(const store::Approval& approval, const store::Task& task) {
  nlohmann::json detail = {{"approval_id", approval.id},
                           {"decided_by", approval.decided_by},
                           {"reason", approval.reason},
                           {"task_status", task.status}};
  if (task.status == store::kTaskActive) detail["task_expires_at"] = task.expires_at;
  return detail;
}

}  // namespace

absl::StatusOr<std::string> NewApprovalId() {
  ASSIGN_OR_RETURN(std::string random, crypto::RandomBytes(store::kApprovalIdRandomBytes));
  return absl::StrCat(AbslView(store::kApprovalIdPrefix), jose::Base64UrlEncode(random));
}

absl::StatusOr<std::unique_ptr<ApprovalRegistry>> ApprovalRegistry::Create(
    store::Store& store, AuditLog& audit, const Clock& clock, metrics::BrokerMetrics* metrics,
    ApprovalOptions options) {
  if (options.ttl_seconds < 1 || options.ttl_seconds > kMaxApprovalTtlSeconds) {
    return absl::InvalidArgumentError(
        absl::StrCat("--approval-ttl must be between 1 and ", kMaxApprovalTtlSeconds, " seconds"));
  }
  std::unique_ptr<ApprovalRegistry> registry(
      new ApprovalRegistry(store, audit, clock, metrics, options));
  registry->RefreshPendingGauge();
  return registry;
}

ApprovalRegistry::ApprovalRegistry(store::Store& store, AuditLog& audit, const Clock& clock,
                                   metrics::BrokerMetrics* metrics, ApprovalOptions options)
    : store_(store), audit_(audit), clock_(clock), metrics_(metrics), options_(options) {}

ApprovalRegistry::~ApprovalRegistry() { Stop(); }

void ApprovalRegistry::RefreshPendingGauge() {
  if (metrics_ == nullptr) return;
  absl::StatusOr<std::vector<store::Approval>> pending =
      store_.ListApprovals(store::kApprovalPending);
  if (!pending.ok()) {
    spdlog::warn("cannot count pending approvals: {}", std::string(pending.status().message()));
    return;
  }
  const int64_t now = clock_.NowSeconds();
  size_t open = 0;
  for (const store::Approval& approval : *pending) {
    if (store::ApprovalIsOpen(approval, now)) ++open;
  }
  metrics_->SetApprovalsPending(static_cast<double>(open));
}

absl::StatusOr<store::Approval> ApprovalRegistry::Open(store::Task& task,
                                                       std::string input_document) {
  ASSIGN_OR_RETURN(std::string id, NewApprovalId());
  store::Approval approval;
  approval.id = std::move(id);
  approval.task_id = task.id;
  approval.spiffe_id = task.spiffe_id;
  approval.input_document = std::move(input_document);
  approval.status = std::string(store::kApprovalPending);
  approval.created_at = clock_.NowSeconds();
  approval.expires_at = approval.created_at + options_.ttl_seconds;
  store::Task pending = task;
  pending.status = std::string(store::kTaskPendingApproval);
  pending.approval_id = approval.id;
  RETURN_IF_ERROR(store_.CreateTaskAwaitingApproval(pending, approval));
  task = std::move(pending);
  RefreshPendingGauge();
  return approval;
}

absl::StatusOr<std::vector<store::Approval>> ApprovalRegistry::List(std::string_view status) {
  if (!status.empty() && !store::IsApprovalStatus(status)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown approval status \"",
                                                   log::EscapeForLog(status),
                                                   "\"; use pending, approved, denied or expired"));
  }
  // Expired approvals are marked first, so "pending" lists only what can still be decided; a
  // sweep that fails does not hide the list (effective statuses are computed below anyway).
  if (absl::StatusOr<size_t> swept = ExpireDue(); !swept.ok()) {
    spdlog::warn("approval sweep failed: {}", std::string(swept.status().message()));
  }
  ASSIGN_OR_RETURN(std::vector<store::Approval> all, store_.ListApprovals(""));
  const int64_t now = clock_.NowSeconds();
  std::vector<store::Approval> out;
  for (store::Approval& approval : all) {
    approval.status = std::string(store::EffectiveApprovalStatus(approval, now));
    if (status.empty() || approval.status == status) out.push_back(std::move(approval));
  }
  return out;
}

absl::StatusOr<store::Approval> ApprovalRegistry::Get(std::string_view id) {
  RETURN_IF_ERROR(CheckApprovalIdSyntax(id));
  if (absl::StatusOr<size_t> swept = ExpireDue(); !swept.ok()) {
    spdlog::warn("approval sweep failed: {}", std::string(swept.status().message()));
  }
  absl::StatusOr<store::Approval> approval = store_.GetApproval(id);
  if (absl::IsNotFound(approval.status())) {
    return absl::NotFoundError(absl::StrCat("approval ", AbslView(id), " not found"));
  }
  if (!approval.ok()) return approval.status();
  approval->status = std::string(store::EffectiveApprovalStatus(*approval, clock_.NowSeconds()));
  return approval;
}

absl::StatusOr<store::DecidedApproval> ApprovalRegistry::Decide(std::string_view id, bool approve,
                                                                const std::string& decided_by,
                                                                const std::string& reason) {
  RETURN_IF_ERROR(CheckApprovalIdSyntax(id));
  RETURN_IF_ERROR(store::ValidateDecision(decided_by, reason));
  RETURN_IF_ERROR(CheckReason(reason));
  absl::StatusOr<store::DecidedApproval> decided =
      store_.DecideApproval(id, approve, decided_by, reason, clock_.NowSeconds());
  if (absl::IsNotFound(decided.status())) {
    return absl::NotFoundError(absl::StrCat("approval ", AbslView(id), " not found"));
  }
  if (!decided.ok()) return decided.status();
  RefreshPendingGauge();
  spdlog::info("approval {} {} by {} task={} spiffe_id={}", decided->approval.id,
               decided->approval.status, log::EscapeForLog(decided_by), decided->task.id,
               decided->task.spiffe_id);
  if (absl::Status s =
          audit_.Record({.event = "approval",
                         .outcome = decided->approval.status,
                         .spiffe_id = decided->task.spiffe_id,
                         .task_id = decided->task.id,
                         .detail = AuditDetail(DecisionDetail(decided->approval, decided->task))});
      !s.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "the decision was applied, but its audit record could not be stored: ", s.message()));
  }
  return decided;
}

absl::StatusOr<size_t> ApprovalRegistry::ExpireDue() {
  ASSIGN_OR_RETURN(std::vector<store::Approval> expired,
                   store_.ExpireApprovals(clock_.NowSeconds()));
  if (!expired.empty()) RefreshPendingGauge();
  absl::Status audited = absl::OkStatus();
  for (const store::Approval& approval : expired) {
    spdlog::info("approval {} expired undecided task={} spiffe_id={}", approval.id,
                 approval.task_id, approval.spiffe_id);
    absl::Status s = audit_.Record({.event = "approval",
                                    .outcome = std::string(store::kApprovalExpired),
                                    .spiffe_id = approval.spiffe_id,
                                    .task_id = approval.task_id,
                                    .detail = AuditDetail({{"approval_id", approval.id},
                                                           {"expires_at", approval.expires_at},
                                                           {"task_status", store::kTaskDenied}})});
    if (!s.ok() && audited.ok()) audited = s;
  }
  if (!audited.ok()) {
    return absl::UnavailableError(absl::StrCat(
        "approvals expired, but not every audit record could be stored: ", audited.message()));
  }
  return expired.size();
}

void ApprovalRegistry::Start(std::chrono::seconds interval) {
  sweeper_ = std::thread([this, interval] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
        if (mu_.AwaitWithTimeout(absl::Condition(&stopping), absl::FromChrono(interval))) return;
      }
      if (absl::StatusOr<size_t> swept = ExpireDue(); !swept.ok()) {
        spdlog::error("approval sweep failed: {}", std::string(swept.status().message()));
      }
      // Also picks up approvals other brokers sharing the store opened or decided.
      RefreshPendingGauge();
    }
  });
}

void ApprovalRegistry::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (sweeper_.joinable()) sweeper_.join();
}

}  // namespace mandate::broker
