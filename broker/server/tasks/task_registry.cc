#include "broker/server/tasks/task_registry.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "broker/common/log/log.h"
#include "broker/common/store/approval_rules.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/approvals/approval_registry.h"
#include "broker/server/audit/audit_detail.h"

namespace mandate::broker {
namespace {

constexpr std::string_view kActive = "active";
constexpr std::string_view kEnded = "ended";
constexpr size_t kTaskIdRandomBytes = 16;  // 128 bits: unguessable, so ids need no secrecy.

// This Abseil build has its own string_view type, so std::string_view is bridged explicitly.
absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }

// Decodes the UTF-8 code point starting at `text[*pos]` and advances `*pos` past it; nullopt for
// an invalid sequence (truncated, overlong, surrogate or beyond U+10FFFF).
std::optional<char32_t> NextCodePoint(std::string_view text, size_t* pos) {
  const auto byte = [&](size_t i) { return static_cast<unsigned char>(text[i]); };
  const unsigned char lead = byte(*pos);
  if (lead < 0x80) {
    ++*pos;
    return lead;
  }
  size_t length;
  char32_t code_point;
  char32_t min_code_point;
  if ((lead & 0xE0) == 0xC0) {
    length = 2, code_point = lead & 0x1F, min_code_point = 0x80;
  } else if ((lead & 0xF0) == 0xE0) {
    length = 3, code_point = lead & 0x0F, min_code_point = 0x800;
  } else if ((lead & 0xF8) == 0xF0) {
    length = 4, code_point = lead & 0x07, min_code_point = 0x10000;
  } else {
    return std::nullopt;
  }
  if (text.size() - *pos < length) return std::nullopt;
  for (size_t i = 1; i < length; ++i) {
    const unsigned char continuation = byte(*pos + i);
    if ((continuation & 0xC0) != 0x80) return std::nullopt;
    code_point = (code_point << 6) | (continuation & 0x3F);
  }
  if (code_point < min_code_point || code_point > 0x10FFFF ||
      (code_point >= 0xD800 && code_point <= 0xDFFF)) {
    return std::nullopt;
  }
  *pos += length;
  return code_point;
}

// C0 controls, DEL and C1 controls.
bool IsControl(char32_t c) { return c < 0x20 || (c >= 0x7F && c <= 0x9F); }

// Unicode bidirectional embeddings, overrides and isolates: they make displayed text differ from
// its logical order ("Trojan Source"), which a human approving a task must not be shown.
bool IsBidiControl(char32_t c) {
  return (c >= 0x202A && c <= 0x202E) || (c >= 0x2066 && c <= 0x2069);
}

// Checks that `text` is UTF-8 whose characters `allowed` accepts; `what` names it in errors.
template <typename Allowed>
absl::Status CheckDisplayableText(std::string_view text, std::string_view what, Allowed allowed,
                                  std::string_view rule) {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t offset = pos;
    std::optional<char32_t> c = NextCodePoint(text, &pos);
    if (!c.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat(AbslView(what), " is not valid UTF-8 (at byte ", offset, ")"));
    }
    if (!allowed(*c)) {
      return absl::InvalidArgumentError(
          absl::StrCat(AbslView(what), " holds a ", AbslView(rule), " at byte ", offset));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidatePurpose(std::string_view purpose, size_t max_bytes) {
  if (purpose.empty()) return absl::InvalidArgumentError("task purpose is empty");
  if (purpose.size() > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "task purpose is ", purpose.size(), " bytes long; at most ", max_bytes, " are allowed"));
  }
  for (size_t pos = 0; pos < purpose.size();) {
    const size_t offset = pos;
    std::optional<char32_t> c = NextCodePoint(purpose, &pos);
    if (!c.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("task purpose is not valid UTF-8 (at byte ", offset, ")"));
    }
    if (*c != U'\t' && IsControl(*c)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task purpose holds a control character at byte ", offset,
          " (only tab is allowed: the purpose is shown to humans as one line of text)"));
    }
    if (IsBidiControl(*c)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task purpose holds a Unicode bidirectional control character at byte ", offset,
          " (it would make the purpose display differently from what it says)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateScopes(const std::vector<std::string>& scopes, size_t max_scopes) {
  if (scopes.empty()) return absl::InvalidArgumentError("task requests no scope");
  if (scopes.size() > max_scopes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "task requests ", scopes.size(), " scopes; at most ", max_scopes, " are allowed"));
  }
  for (size_t i = 0; i < scopes.size(); ++i) {
    if (scopes[i].size() > kMaxTaskScopeBytes) {
      return absl::InvalidArgumentError(absl::StrCat("task scope #", i + 1, " is ",
                                                     scopes[i].size(), " bytes long; at most ",
                                                     kMaxTaskScopeBytes, " are allowed"));
    }
    if (!IsScopeToken(scopes[i])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task scope #", i + 1,
          " is not an RFC 6749 scope-token (one or more printable ASCII characters other than "
          "space, '\"' and '\\')"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateAudiences(const std::vector<std::string>& audiences, size_t max_audiences) {
  if (audiences.empty()) return absl::InvalidArgumentError("task names no audience");
  if (audiences.size() > max_audiences) {
    return absl::InvalidArgumentError(absl::StrCat(
        "task names ", audiences.size(), " audiences; at most ", max_audiences, " are allowed"));
  }
  for (size_t i = 0; i < audiences.size(); ++i) {
    const std::string& audience = audiences[i];
    if (audience.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("task audience #", i + 1, " is empty"));
    }
    if (audience.size() > kMaxTaskAudienceBytes) {
      return absl::InvalidArgumentError(absl::StrCat("task audience #", i + 1, " is ",
                                                     audience.size(), " bytes long; at most ",
                                                     kMaxTaskAudienceBytes, " are allowed"));
    }
    // Audiences end up in token `aud` claims and in listings: text, without control characters.
    RETURN_IF_ERROR(CheckDisplayableText(
        audience, absl::StrCat("task audience #", i + 1), [](char32_t c) { return !IsControl(c); },
        "control character"));
  }
  return absl::OkStatus();
}

std::vector<std::string> DedupeKeepingOrder(const std::vector<std::string>& values) {
  std::vector<std::string> unique;
  for (const std::string& value : values) {
    if (std::find(unique.begin(), unique.end(), value) == unique.end()) unique.push_back(value);
  }
  return unique;
}

absl::Status TaskNotFound() { return absl::NotFoundError("task not found"); }

absl::Status TaskIs(std::string_view status) {
  return absl::FailedPreconditionError(absl::StrCat("task is ", AbslView(status)));
}

}  // namespace

absl::StatusOr<std::vector<std::string>> TokenScopesForTask(
    const store::Task& task, std::string_view audience,
    const std::vector<std::string>& requested_scopes) {
  if (std::find(task.audiences.begin(), task.audiences.end(), audience) == task.audiences.end()) {
    return absl::InvalidArgumentError("audience outside the task");
  }
  if (requested_scopes.empty()) return task.scopes;
  for (size_t i = 0; i < requested_scopes.size(); ++i) {
    if (std::find(task.scopes.begin(), task.scopes.end(), requested_scopes[i]) ==
        task.scopes.end()) {
      return absl::InvalidArgumentError(absl::StrCat("scope outside the task (scope ", i + 1, ")"));
    }
  }
  std::vector<std::string> granted;
  for (const std::string& scope : task.scopes) {
    if (std::find(requested_scopes.begin(), requested_scopes.end(), scope) !=
        requested_scopes.end()) {
      granted.push_back(scope);
    }
  }
  return granted;
}

TaskRegistry::TaskRegistry(store::Store& store, AuditLog& audit, const Clock& clock,
                           TaskLimits limits, ApprovalRegistry* approvals)
    : store_(store),
      audit_(audit),
      clock_(clock),
      limits_(std::move(limits)),
      approvals_(approvals) {}

absl::StatusOr<store::Task> TaskRegistry::Prepare(const std::string& spiffe_id,
                                                  const std::vector<std::string>& entitled_scopes,
                                                  const TaskRequest& request) const {
  if (spiffe_id.empty()) return absl::InvalidArgumentError("task owner SPIFFE ID is empty");
  RETURN_IF_ERROR(ValidatePurpose(request.purpose, limits_.max_purpose_bytes));
  RETURN_IF_ERROR(ValidateScopes(request.scopes, limits_.max_scopes));
  RETURN_IF_ERROR(ValidateAudiences(request.audiences, limits_.max_audiences));
  if (request.ttl_seconds < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("task ttl is negative (", request.ttl_seconds, " seconds)"));
  }

  store::Task task;
  for (const std::string& scope : DedupeKeepingOrder(request.scopes)) {
    if (std::find(entitled_scopes.begin(), entitled_scopes.end(), scope) != entitled_scopes.end()) {
      task.scopes.push_back(scope);
    }
  }
  if (task.scopes.empty()) {
    return absl::PermissionDeniedError(
        absl::StrCat("none of the requested scopes is granted to ", spiffe_id));
  }
  task.audiences = DedupeKeepingOrder(request.audiences);

  ASSIGN_OR_RETURN(std::string random, crypto::RandomBytes(kTaskIdRandomBytes));
  task.id = absl::StrCat("task_", jose::Base64UrlEncode(random));
  task.spiffe_id = spiffe_id;
  task.purpose = request.purpose;
  const int64_t requested_ttl =
      request.ttl_seconds == 0 ? limits_.default_ttl_seconds : request.ttl_seconds;
  task.status = std::string(kActive);
  task.created_at = clock_.NowSeconds();
  task.expires_at = task.created_at + std::min(requested_ttl, limits_.max_ttl_seconds);
  return task;
}

absl::Status TaskRegistry::Create(const store::Task& task) { return store_.CreateTask(task); }

absl::StatusOr<store::Task> TaskRegistry::PrepareAudited(
    const std::string& spiffe_id, const std::vector<std::string>& entitled_scopes,
    const TaskRequest& request) {
  absl::StatusOr<store::Task> prepared = Prepare(spiffe_id, entitled_scopes, request);
  if (absl::IsPermissionDenied(prepared.status())) {
    nlohmann::json detail = {{"scopes", request.scopes},
                             {"reason", std::string(prepared.status().message())}};
    if (absl::Status s = audit_.Record({.event = "task_declared",
                                        .outcome = "denied",
                                        .spiffe_id = spiffe_id,
                                        .detail = AuditDetail(detail)});
        !s.ok()) {
      spdlog::error("refusal not audited: {}", std::string(s.message()));
    }
  }
  return prepared;
}

absl::StatusOr<store::Task> TaskRegistry::CreatePendingApproval(const store::Task& prepared,
                                                                std::string input_document) {
  if (approvals_ == nullptr) {
    return absl::FailedPreconditionError("approvals are not enabled on this broker");
  }
  const nlohmann::json input = nlohmann::json::parse(input_document, nullptr, false);
  if (input.is_discarded() || !input.is_object()) {
    return absl::InvalidArgumentError("the approval's input document is not a JSON object");
  }
  store::Task task = prepared;
  RETURN_IF_ERROR(approvals_->Open(task, std::move(input_document)).status());
  return task;
}

absl::StatusOr<store::Task> TaskRegistry::Declare(const std::string& spiffe_id,
                                                  const std::vector<std::string>& entitled_scopes,
                                                  const TaskRequest& request) {
  absl::StatusOr<store::Task> prepared = PrepareAudited(spiffe_id, entitled_scopes, request);
  if (!prepared.ok()) return prepared.status();
  store::Task& task = *prepared;
  RETURN_IF_ERROR(store_.CreateTask(task));
  RETURN_IF_ERROR(audit_.Record({.event = "task_declared",
                                 .outcome = "ok",
                                 .spiffe_id = spiffe_id,
                                 .task_id = task.id,
                                 .detail = AuditDetail({{"purpose", task.purpose},
                                                        {"scopes", task.scopes},
                                                        {"audiences", task.audiences},
                                                        {"expires_at", task.expires_at}})}));
  return task;
}

absl::StatusOr<store::Task> TaskRegistry::DeclarePendingApproval(
    const std::string& spiffe_id, const std::vector<std::string>& entitled_scopes,
    const TaskRequest& request, std::string input_document) {
  if (approvals_ == nullptr) {
    return absl::FailedPreconditionError("approvals are not enabled on this broker");
  }
  ASSIGN_OR_RETURN(store::Task prepared, PrepareAudited(spiffe_id, entitled_scopes, request));
  ASSIGN_OR_RETURN(store::Task task, CreatePendingApproval(prepared, std::move(input_document)));
  RETURN_IF_ERROR(audit_.Record({.event = "task_declared",
                                 .outcome = "pending_approval",
                                 .spiffe_id = spiffe_id,
                                 .task_id = task.id,
                                 .detail = AuditDetail({{"purpose", task.purpose},
                                                        {"scopes", task.scopes},
                                                        {"audiences", task.audiences},
                                                        {"approval_id", task.approval_id}})}));
  return task;
}

absl::Status TaskRegistry::NotUsable(const store::Task& task, int64_t now) const {
  if (task.status == kEnded) return absl::FailedPreconditionError("task ended");
  const bool under_approval = task.status == store::kTaskPendingApproval ||
                              (task.status == store::kTaskDenied && !task.approval_id.empty());
  if (!under_approval) return TaskIs(task.status);
  absl::StatusOr<store::Approval> approval = store_.GetApproval(task.approval_id);
  if (absl::IsNotFound(approval.status())) return TaskIs(task.status);
  if (!approval.ok()) return approval.status();
  const std::string_view status = store::EffectiveApprovalStatus(*approval, now);
  if (status == store::kApprovalPending && task.status == store::kTaskPendingApproval) {
    return absl::FailedPreconditionError(
        absl::StrCat(AbslView(kAuthorizationPending), ": task awaits approval ", approval->id));
  }
  if (status == store::kApprovalExpired) {
    return absl::FailedPreconditionError("task approval expired");
  }
  if (status == store::kApprovalDenied) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task approval denied: ",
        approval->reason.empty() ? "no reason given" : log::EscapeForLog(approval->reason)));
  }
  return TaskIs(task.status);
}

absl::StatusOr<store::Task> TaskRegistry::GetOwned(const std::string& spiffe_id,
                                                   std::string_view task_id) const {
  absl::StatusOr<store::Task> task = store_.GetTask(task_id);
  if (absl::IsNotFound(task.status())) return TaskNotFound();
  if (!task.ok()) return task.status();
  // Someone else's task gets the same answer as an unknown one.
  if (task->spiffe_id != spiffe_id) return TaskNotFound();
  return task;
}

absl::StatusOr<store::Task> TaskRegistry::GetUsable(const std::string& spiffe_id,
                                                    std::string_view task_id) const {
  ASSIGN_OR_RETURN(store::Task task, GetOwned(spiffe_id, task_id));
  const int64_t now = clock_.NowSeconds();
  if (task.status != kActive) return NotUsable(task, now);
  if (now >= task.expires_at) return absl::FailedPreconditionError("task expired");
  return task;
}

absl::StatusOr<store::Task> TaskRegistry::End(const std::string& spiffe_id,
                                              std::string_view task_id) {
  ASSIGN_OR_RETURN(store::Task task, GetOwned(spiffe_id, task_id));
  if (task.status == kEnded) return absl::FailedPreconditionError("task ended");
  absl::StatusOr<store::Task> ended = store_.EndTask(task_id, clock_.NowSeconds());
  if (absl::IsFailedPrecondition(ended.status())) {
    // Its status changed since it was read (e.g. a concurrent End): report the current one.
    absl::StatusOr<store::Task> current = store_.GetTask(task_id);
    if (!current.ok()) return current.status();
    if (current->status == kEnded) return absl::FailedPreconditionError("task ended");
    return absl::FailedPreconditionError(absl::StrCat("task is ", current->status));
  }
  if (!ended.ok()) return ended.status();
  RETURN_IF_ERROR(audit_.Record({.event = "task_ended",
                                 .outcome = "ok",
                                 .spiffe_id = spiffe_id,
                                 .task_id = ended->id,
                                 .detail = AuditDetail({{"ended_at", ended->ended_at}})}));
  return ended;
}

}  // namespace mandate::broker
