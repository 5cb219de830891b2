// The broker's audit log (DESIGN.md §7, §10): every issuance and every refusal the issuer makes is
// one record, hash-chained to the one before it, and durable before the caller is answered.
//
// Group commit: Record() queues the record and waits. The caller at the front of the queue is the
// leader: it takes every queued record (up to `max_batch`), assigns sequence numbers and chain
// hashes, appends the lot in one store transaction - one fsync for many records - and then wakes
// the callers whose records it wrote; the next caller in line leads the next batch. Under load the
// queue fills while a batch is being written, so the fsync rate stays bounded while the record
// rate follows the issuance rate, and no extra thread has to be woken for each commit (the leader
// is a caller that would be waiting anyway). A caller is told OK only after its batch committed;
// when the store refuses a batch, every caller in it gets Unavailable, nothing of it is stored,
// and the chain continues from the last stored record (re-read before the next batch). Callers
// fail closed on an error: a credential whose record is not stored is not handed out.
//
// Chain: each broker writes its own chain (`chain_id`, kept in the data dir), so several brokers
// may share a store. seq counts 1, 2, ...; `hash` is the hex SHA-256 over a length-prefixed
// encoding of every other stored field, `prev_hash` included (AuditRecordHash). Editing, removing
// or reordering a record breaks the chain at that point (VerifyAuditChain). Cutting the tail, or
// recomputing the whole chain, needs signed checkpoints of the chain head to detect; see
// docs/threat-model.md.
//
// Thread-safety: Record() may be called from any number of threads. Ownership: the log borrows
// the store and the clock, which must outlive it.
#ifndef MANDATE_BROKER_SERVER_AUDIT_AUDIT_LOG_H_
#define MANDATE_BROKER_SERVER_AUDIT_AUDIT_LOG_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"

namespace mandate::broker {

// What happened; the log adds the time, the chain position and the hashes.
struct AuditEvent {
  std::string event;    // "x509_svid", "jwt_svid", "task_token", "node_svid", "task_declared", ...
  std::string outcome;  // "issued", "denied", "ok".
  std::string spiffe_id;
  std::string node_id;
  std::string task_id;
  std::string credential_id;  // jti or hex serial.
  std::string detail;         // A JSON object; empty means "{}".
  // The credential index row for an issued credential, stored in the same transaction as this
  // record (set only on "issued" records of credentials).
  std::optional<store::IssuedCredential> credential;
};

// Records first..last (inclusive) of a chain.
struct AuditSeqRange {
  int64_t first = 0;
  int64_t last = 0;
  bool operator==(const AuditSeqRange&) const = default;
};

// Most ranges kept in one list (AddAuditSeqRange); beyond it the oldest two are merged into one
// range, which then also spans the records between them: a list of records not vouched for then
// says too much, never too little.
inline constexpr size_t kMaxAuditSeqRanges = 32;

// Appends `range`, which must start after every range in `ranges`, joining it to the last when
// they touch, and keeps at most kMaxAuditSeqRanges.
void AddAuditSeqRange(std::vector<AuditSeqRange>& ranges, AuditSeqRange range);

struct AuditLogOptions {
  // Most records in one transaction (a RecordAll larger than this is still written whole).
  size_t max_batch = 1024;
  // Most records waiting to be written; beyond it Record() answers Unavailable at once rather
  // than letting memory and latency grow without bound when the disk stalls.
  size_t max_queued = 65536;
};

class AuditLog {
 public:
  // Continues chain `chain_id` after its last stored record (or starts it). InvalidArgument for a
  // chain_id that is not 1-64 of [A-Za-z0-9_-]; the store's error when it cannot be read.
  static absl::StatusOr<std::unique_ptr<AuditLog>> Open(store::Store& store, std::string chain_id,
                                                        const Clock& clock,
                                                        AuditLogOptions options = {});

  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;
  // No Record() call may be running or start.
  ~AuditLog() = default;

  // Appends a record stamped with the current time; returns once it is durable. Unavailable
  // when it could not be stored (the caller must not act as if it had been).
  absl::Status Record(AuditEvent event);
  // Records several events, in order, in one commit (one caller waiting once); all are stored
  // or none is. For callers that decide many things in one request (a node's batch of CSRs).
  absl::Status RecordAll(std::vector<AuditEvent> events);

  const std::string& chain_id() const { return chain_id_; }
  // Compares the store's copy of this chain with the head this process holds (the last record it
  // wrote, or found at Open). It waits its turn in the commit queue, so no batch of this log is
  // being written meanwhile and a legitimate append can never look like tampering. DataLoss,
  // naming the chain, when the stored chain ends before that head (cut, or deleted: "missing
  // from the store"), holds a different record there (rewritten), or goes on past it (records
  // this broker did not write); the store's error when it cannot be read. On OK, `*head` (when
  // given) is the head this process holds.
  struct Head {
    int64_t seq = 0;   // 0: no record in the chain yet
    std::string hash;  // of record `seq`
    // Records up to `seq` that this process found in the store rather than wrote, oldest first:
    // the chain as it was at Open, and records another writer added that a write after a failed
    // one had to continue from. Only the records past them are vouched for by this process.
    std::vector<AuditSeqRange> found;
  };
  absl::Status CheckStoredHead(Head* head = nullptr);

  struct Stats {
    int64_t records = 0;  // Stored by this process.
    int64_t batches = 0;  // Transactions that stored them.
    int64_t failed = 0;   // Records refused (store errors, full queue).
  };
  // Lock-free: /metrics scrapes must never wait on (or hold up) the commit queue.
  Stats stats() const;

 private:
  // A waiting caller; lives on its stack.
  struct Waiter {
    std::vector<store::AuditRecord> records;
    std::vector<store::IssuedCredential> credentials;  // index rows of the issued ones
    // A CheckStoredHead call: never batched with others, it runs alone at the front.
    bool head_check = false;
    bool done = false;
    absl::Status status;
  };

  AuditLog(store::Store& store, std::string chain_id, const Clock& clock, AuditLogOptions options)
      : store_(store), chain_id_(std::move(chain_id)), clock_(clock), options_(options) {}
  // Numbers, hashes and stores `records` with the index rows `credentials` (one transaction);
  // advances the chain head only when stored.
  absl::Status WriteBatch(std::vector<store::AuditRecord>& records,
                          const std::vector<store::IssuedCredential>& credentials);
  absl::Status LoadHead();
  // LoadHead after a failed write: records past the head this process knew that are not its
  // failed batch (which may have been stored after all) join `found_`.
  absl::Status ReloadStaleHead();
  // CheckStoredHead's comparison; only the caller at the front of `queue_` may run it.
  absl::Status CompareStoredHead();

  store::Store& store_;
  const std::string chain_id_;
  const Clock& clock_;
  const AuditLogOptions options_;

  // The chain head: touched only by the current leader (one at a time: the leader stays at the
  // front of `queue_` until its batch is written) and by Open.
  int64_t head_seq_ = 0;
  std::string head_hash_;
  bool head_stale_ = false;
  // The last seq and hash of the batch whose write failed (when head_stale_).
  int64_t failed_seq_ = 0;
  std::string failed_hash_;
  std::vector<AuditSeqRange> found_;

  mutable absl::Mutex mu_;
  std::deque<Waiter*> queue_ ABSL_GUARDED_BY(mu_);  // front = the leader
  size_t queued_records_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<int64_t> stored_records_{0};
  std::atomic<int64_t> commits_{0};
  std::atomic<int64_t> failed_records_{0};
};

// The chain hash of `record`: hex SHA-256 over every field except `hash` itself.
std::string AuditRecordHash(const store::AuditRecord& record);

struct AuditChainReport {
  std::string chain_id;
  int64_t records = 0;    // Records checked (all of them when the chain is intact).
  std::string head_hash;  // Hash of the last good record.
  absl::Status status;    // OK, or DataLoss naming the first broken seq and why.
};

// Recomputes chain `chain_id` from seq 1, a page at a time. The report's status says where it
// first breaks (a missing or out-of-order seq, a prev_hash that is not the previous hash, a hash
// that does not match the fields); errors reading the store are returned as such.
absl::StatusOr<AuditChainReport> VerifyAuditChain(store::Store& store, const std::string& chain_id);

// Reads or creates the broker's chain id in `data_dir` (file "audit-chain-id", 0600): one random
// id per data dir, so each broker sharing a store writes its own chain.
absl::StatusOr<std::string> LoadOrCreateAuditChainId(const std::string& data_dir);

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_AUDIT_AUDIT_LOG_H_
