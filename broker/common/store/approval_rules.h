// Rules about approvals that every Store implementation (SQLite today, PostgreSQL later) and the
// broker's approval code apply alike: the id format, the status names, what a valid new approval
// looks like, and the deadline arithmetic of a decision. Kept out of the SQL code so that two
// stores cannot drift apart on them.
//
// Thread-safety: pure functions and constants.
#ifndef MANDATE_BROKER_COMMON_STORE_APPROVAL_RULES_H_
#define MANDATE_BROKER_COMMON_STORE_APPROVAL_RULES_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "broker/common/store/store.h"

namespace mandate::store {

// Approval statuses.
inline constexpr std::string_view kApprovalPending = "pending";
inline constexpr std::string_view kApprovalApproved = "approved";
inline constexpr std::string_view kApprovalDenied = "denied";
inline constexpr std::string_view kApprovalExpired = "expired";

// Task statuses the approval methods read and write.
inline constexpr std::string_view kTaskActive = "active";
inline constexpr std::string_view kTaskPendingApproval = "pending_approval";
inline constexpr std::string_view kTaskDenied = "denied";

// Approval ids: "appr_" followed by the unpadded base64url encoding of 16 random bytes.
inline constexpr std::string_view kApprovalIdPrefix = "appr_";
inline constexpr size_t kApprovalIdRandomBytes = 16;
inline constexpr size_t kApprovalIdEncodedChars = 22;  // ceil(16 * 8 / 6)

// Bounds on what an approval carries, so that a stored record stays displayable.
inline constexpr size_t kMaxApprovalInputDocumentBytes = 64 * 1024;
inline constexpr size_t kMaxApprovalDecidedByBytes = 256;
inline constexpr size_t kMaxApprovalReasonBytes = 1024;

// True for "appr_" + exactly 22 base64url characters whose last one carries no stray bits (so
// each id has one spelling).
bool IsApprovalId(std::string_view id);

// Whether `status` is one of the four approval statuses.
bool IsApprovalStatus(std::string_view status);

// The checks CreateTaskAwaitingApproval makes before storing anything: `approval` is well formed
// and new (IsApprovalId, status "pending", no decision, expires_at > created_at, a non-empty
// input document within kMaxApprovalInputDocumentBytes) and the pair agrees (task status
// "pending_approval", task.approval_id == approval.id, approval.task_id == task.id, same
// spiffe_id). InvalidArgument naming the broken rule otherwise. The task's own field checks
// (non-empty id, scopes, ...) are the store's, as for CreateTask.
absl::Status ValidateNewApproval(const Task& task, const Approval& approval);

// The checks on a decision's operator input: decided_by non-empty and at most
// kMaxApprovalDecidedByBytes, reason at most kMaxApprovalReasonBytes. InvalidArgument otherwise.
absl::Status ValidateDecision(std::string_view decided_by, std::string_view reason);

// Whether `approval` can still be decided at `now`: status "pending" and now < expires_at. A
// store's compare-and-set (DecideApproval, ExpireApprovals) states the same condition in its own
// query language; keep the two in step.
bool ApprovalIsOpen(const Approval& approval, int64_t now);

// The status `approval` effectively has at `now`: "expired" for a pending one past its
// expires_at (before a sweep has marked it), its stored status otherwise.
std::string_view EffectiveApprovalStatus(const Approval& approval, int64_t now);

// Why `approval` cannot be decided at `now` (FailedPrecondition naming it and saying "is already
// approved", "is already denied" or "expired"); OK when ApprovalIsOpen.
absl::Status CheckApprovalOpen(const Approval& approval, int64_t now);

// The deadline a task gets when its approval is granted at `now`: now plus the lifetime it was
// declared with (expires_at - created_at), so the time spent waiting for a human is not taken
// from it. Saturates at INT64_MAX; a task declared with no lifetime left gets none.
int64_t ApprovedTaskExpiry(const Task& task, int64_t now);

}  // namespace mandate::store

#endif  // MANDATE_BROKER_COMMON_STORE_APPROVAL_RULES_H_
