// Human approval of task declarations (DESIGN.md §5, §11), the operator's side: open an approval
// for a task the policy hook sent to a human, list and show what waits, decide, and let what
// nobody decided expire (--approval-ttl, default 15 minutes).
//
// Deciding whether a declaration needs approval is not done here (the policy hook answers
// `require_approval`); TaskRegistry::DeclarePendingApproval stores such a task through Open(),
// and TaskRegistry::GetUsable tells the agent what became of it.
//
// Decisions and expiries are audited as event "approval" with outcome "approved", "denied" or
// "expired" (detail: approval_id, decided_by, reason, the task's new deadline); a decision whose
// record cannot be stored is answered Unavailable (it stands, unaudited, as the admin API says
// for every change). The gauge mandate_approvals_pending follows every change this broker makes
// and every sweep (brokers sharing a store see each other's changes at their next sweep).
//
// Ownership: borrows the store, the audit log, the clock and the metrics (may be null), which
// must outlive it. Thread-safety: every method may be called concurrently; the sweeper thread
// (Start) is stopped by Stop() or the destructor.
#ifndef MANDATE_BROKER_SERVER_APPROVALS_APPROVAL_REGISTRY_H_
#define MANDATE_BROKER_SERVER_APPROVALS_APPROVAL_REGISTRY_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"
#include "broker/server/audit/audit_log.h"

namespace mandate::broker {

namespace metrics {
class BrokerMetrics;
}

struct ApprovalOptions {
  // --approval-ttl: how long a human has to decide; then the approval expires and the task is
  // refused ("task approval expired"). 1 second .. kMaxApprovalTtlSeconds.
  int64_t ttl_seconds = 900;
};
inline constexpr int64_t kMaxApprovalTtlSeconds = 7 * 24 * 3600;

// A new approval id: "appr_" + 22 base64url characters (128 random bits). Internal when the
// system's random source fails.
absl::StatusOr<std::string> NewApprovalId();

class ApprovalRegistry {
 public:
  // InvalidArgument when options.ttl_seconds is out of range.
  static absl::StatusOr<std::unique_ptr<ApprovalRegistry>> Create(store::Store& store,
                                                                  AuditLog& audit,
                                                                  const Clock& clock,
                                                                  metrics::BrokerMetrics* metrics,
                                                                  ApprovalOptions options = {});
  ~ApprovalRegistry();  // Stop()
  ApprovalRegistry(const ApprovalRegistry&) = delete;
  ApprovalRegistry& operator=(const ApprovalRegistry&) = delete;

  int64_t ttl_seconds() const { return options_.ttl_seconds; }

  // Stores `task` (made "pending_approval" here, approval_id set) with a new pending approval
  // holding `input_document` (the policy input as JSON text), expiring ttl_seconds from now, in
  // one transaction; updates `task` to what was stored and returns the approval. Store errors
  // are passed through (InvalidArgument for a malformed task or document, e.g. an empty one).
  // Auditing the declaration is the caller's (TaskRegistry's): this adds no record.
  absl::StatusOr<store::Approval> Open(store::Task& task, std::string input_document);

  // The approvals whose effective status is `status` ("pending", "approved", "denied",
  // "expired"; empty = all), oldest first, after expiring what is due. InvalidArgument for any
  // other status.
  absl::StatusOr<std::vector<store::Approval>> List(std::string_view status);

  // One approval, after expiring what is due. NotFound("approval <id> not found") when absent,
  // InvalidArgument when `id` is not an approval id at all.
  absl::StatusOr<store::Approval> Get(std::string_view id);

  // Approves or denies approval `id` as `decided_by` (the operator identity), with `reason`
  // (may be empty; at most store::kMaxApprovalReasonBytes, valid UTF-8). On approval the task
  // becomes usable for its full declared lifetime from now; on denial it is refused for good.
  // InvalidArgument for a malformed id or reason; NotFound; FailedPrecondition when already
  // decided or expired ("approval <id> is already approved", "... expired ..."). Unavailable
  // when the decision was stored but its audit record was not.
  absl::StatusOr<store::DecidedApproval> Decide(std::string_view id, bool approve,
                                                const std::string& decided_by,
                                                const std::string& reason);

  // Expires every pending approval past its deadline (their tasks become "denied"), audits each
  // and refreshes the gauge. Returns how many it expired.
  absl::StatusOr<size_t> ExpireDue();

  // Runs ExpireDue every `interval` on a thread of its own (errors are logged) until Stop().
  void Start(std::chrono::seconds interval);
  void Stop();

 private:
  ApprovalRegistry(store::Store& store, AuditLog& audit, const Clock& clock,
                   metrics::BrokerMetrics* metrics, ApprovalOptions options);
  // Sets mandate_approvals_pending from the store (logged, not returned, on failure).
  void RefreshPendingGauge();

  store::Store& store_;
  AuditLog& audit_;
  const Clock& clock_;
  metrics::BrokerMetrics* const metrics_;
  const ApprovalOptions options_;

  absl::Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread sweeper_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_APPROVALS_APPROVAL_REGISTRY_H_
