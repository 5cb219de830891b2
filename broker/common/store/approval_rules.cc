#include "broker/common/store/approval_rules.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace mandate::store {
namespace {

// This Abseil build has its own string_view type, so std::string_view is bridged explicitly.
absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }

int Base64UrlValue(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

}  // namespace

bool IsApprovalId(std::string_view id) {
  if (!id.starts_with(kApprovalIdPrefix)) return false;
  std::string_view encoded = id.substr(kApprovalIdPrefix.size());
  if (encoded.size() != kApprovalIdEncodedChars) return false;
  for (char c : encoded) {
    if (Base64UrlValue(c) < 0) return false;
  }
  // 22 characters hold 132 bits for 128: the last character's low 4 bits must be zero.
  return (Base64UrlValue(encoded.back()) & 0x0f) == 0;
}

bool IsApprovalStatus(std::string_view status) {
  return status == kApprovalPending || status == kApprovalApproved || status == kApprovalDenied ||
         status == kApprovalExpired;
}

absl::Status ValidateNewApproval(const Task& task, const Approval& approval) {
  if (!IsApprovalId(approval.id)) {
    return absl::InvalidArgumentError(
        "approval id must be \"appr_\" followed by 22 base64url characters");
  }
  if (approval.status != kApprovalPending) {
    return absl::InvalidArgumentError("a new approval must have status \"pending\"");
  }
  if (approval.decided_at != 0 || !approval.decided_by.empty() || !approval.reason.empty()) {
    return absl::InvalidArgumentError("a new approval must carry no decision");
  }
  if (approval.expires_at <= approval.created_at) {
    return absl::InvalidArgumentError("approval expires_at must be after its created_at");
  }
  if (approval.input_document.empty()) {
    return absl::InvalidArgumentError("approval input document is empty");
  }
  if (approval.input_document.size() > kMaxApprovalInputDocumentBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("approval input document is ", approval.input_document.size(),
                     " bytes; at most ", kMaxApprovalInputDocumentBytes, " are allowed"));
  }
  if (task.status != kTaskPendingApproval) {
    return absl::InvalidArgumentError(
        "a task awaiting approval must have status \"pending_approval\"");
  }
  if (task.approval_id != approval.id) {
    return absl::InvalidArgumentError("the task's approval_id must name the approval");
  }
  if (approval.task_id != task.id) {
    return absl::InvalidArgumentError("the approval's task_id must name the task");
  }
  if (approval.spiffe_id != task.spiffe_id) {
    return absl::InvalidArgumentError("the approval's spiffe_id must be the task's owner");
  }
  return absl::OkStatus();
}

absl::Status ValidateDecision(std::string_view decided_by, std::string_view reason) {
  if (decided_by.empty()) {
    return absl::InvalidArgumentError("an approval decision must name who made it");
  }
  if (decided_by.size() > kMaxApprovalDecidedByBytes) {
    return absl::InvalidArgumentError(absl::StrCat("the decider's identity is longer than ",
                                                   kMaxApprovalDecidedByBytes, " bytes"));
  }
  if (reason.size() > kMaxApprovalReasonBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("the reason is longer than ", kMaxApprovalReasonBytes, " bytes"));
  }
  return absl::OkStatus();
}

bool ApprovalIsOpen(const Approval& approval, int64_t now) {
  return approval.status == kApprovalPending && now < approval.expires_at;
}

std::string_view EffectiveApprovalStatus(const Approval& approval, int64_t now) {
  if (approval.status == kApprovalPending && now >= approval.expires_at) return kApprovalExpired;
  return approval.status;
}

absl::Status CheckApprovalOpen(const Approval& approval, int64_t now) {
  if (ApprovalIsOpen(approval, now)) return absl::OkStatus();
  std::string_view status = EffectiveApprovalStatus(approval, now);
  if (status == kApprovalExpired) {
    return absl::FailedPreconditionError(
        absl::StrCat("approval ", approval.id, " expired; the task must be declared again"));
  }
  return absl::FailedPreconditionError(
      absl::StrCat("approval ", approval.id, " is already ", AbslView(status)));
}

int64_t ApprovedTaskExpiry(const Task& task, int64_t now) {
  const int64_t lifetime = std::max<int64_t>(0, task.expires_at - task.created_at);
  if (now > std::numeric_limits<int64_t>::max() - lifetime) {
    return std::numeric_limits<int64_t>::max();
  }
  return now + lifetime;
}

}  // namespace mandate::store
