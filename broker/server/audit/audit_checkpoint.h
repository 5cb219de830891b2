// Signed checkpoints of the broker's audit chain (DESIGN.md §10).
//
// The hash chain shows edits and removals inside the chain, but someone who can write the store
// could cut its tail or recompute it from scratch. A checkpoint is a JWS by the broker's JWT key
// (typ "audit-checkpoint+jwt") stating "chain C had N records, the last with hash H" at time T.
// The broker stores one whenever the chain has grown, every --audit-checkpoint-interval seconds
// and at shutdown, and publishes the newest at GET /audit/checkpoints. A checkpoint copied
// elsewhere keeps its force even if the store's copy is deleted: the chain must still hold record
// N with hash H, which a cut or a recomputed chain does not.
//
// Witnessed records only: a broker signs the head it holds in memory (AuditLog::CheckStoredHead),
// never records it merely found in the store. Records it found past the newest checkpoint that
// verifies with its key - at Open (written while it was stopped: by its previous run if that ended
// without a final checkpoint, or by someone else), or added by another writer while it ran - it did
// not witness; every checkpoint it signs lists those ranges, and the ranges the checkpoint it
// started from listed, in its payload's "unwitnessed" ([[first, last], ...]), so no later
// checkpoint vouches for them.
//
// Thread-safety: CheckpointNow may be called concurrently with the periodic thread.
#ifndef MANDATE_BROKER_SERVER_AUDIT_AUDIT_CHECKPOINT_H_
#define MANDATE_BROKER_SERVER_AUDIT_AUDIT_CHECKPOINT_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/store/store.h"
#include "broker/common/util/clock.h"
#include "broker/server/audit/audit_log.h"

namespace mandate::broker {

inline constexpr char kAuditCheckpointType[] = "audit-checkpoint+jwt";

// Signs a JWS with header typ `typ` over `payload_json` (TrustAuthority::SignJws).
using JwsSigner =
    std::function<absl::StatusOr<std::string>(std::string_view typ, std::string_view payload)>;

class AuditCheckpointer {
 public:
  // Checkpoints `log`'s chain. Borrows `store`, `log`, `key` (the public half of `sign`'s key,
  // to find the newest genuine checkpoint to continue from) and `clock`, which must outlive it.
  // `issuer` is the broker's issuer URL (the checkpoint's `iss`).
  AuditCheckpointer(store::Store& store, AuditLog& log, std::string issuer, JwsSigner sign,
                    const crypto::PublicKey& key, const Clock& clock);
  AuditCheckpointer(const AuditCheckpointer&) = delete;
  AuditCheckpointer& operator=(const AuditCheckpointer&) = delete;
  ~AuditCheckpointer();  // Stop()

  // Signs and stores a checkpoint of the head `log` holds, unless the chain is empty or that head
  // is already checkpointed (then nullopt). The store's error, or CheckStoredHead's DataLoss when
  // the stored chain is not the one `log` wrote (nothing is signed then).
  absl::StatusOr<std::optional<store::AuditCheckpoint>> CheckpointNow();

  // Calls CheckpointNow every `interval` on a thread of its own (errors are logged).
  void Start(std::chrono::seconds interval);
  // Stops the thread, then checkpoints once more so the final head of this run is signed.
  void Stop();

 private:
  // Reads the newest genuine checkpoint: sets checkpointed_seq_, base_seq_, base_unwitnessed_.
  absl::Status LoadBaseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  store::Store& store_;
  AuditLog& log_;
  const std::string issuer_;
  const JwsSigner sign_;
  const crypto::PublicKey& key_;
  const Clock& clock_;

  absl::Mutex mu_;
  int64_t checkpointed_seq_ ABSL_GUARDED_BY(mu_) = -1;  // -1: not read from the store yet
  // The newest genuine checkpoint when this run started, and what it listed as not witnessed.
  int64_t base_seq_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<AuditSeqRange> base_unwitnessed_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// Checks `checkpoint` against `key` (the broker's JWT public key) and the chain in `store`:
// the JWS verifies, has typ audit-checkpoint+jwt, and its payload names the same chain_id, seq
// and hash; then record `seq` of that chain exists and has that hash. DataLoss, saying which,
// when the chain was cut ("has no record N") or rewritten ("record N's hash differs");
// Unauthenticated / InvalidArgument for a checkpoint that is not genuine; store errors as such.
absl::Status VerifyAuditCheckpoint(store::Store& store, const store::AuditCheckpoint& checkpoint,
                                   const crypto::PublicKey& key);
// The same, returning the ranges the checkpoint's payload lists as not witnessed (sorted, within
// 1..seq; InvalidArgument when malformed).
absl::StatusOr<std::vector<AuditSeqRange>> VerifyAuditCheckpointRanges(
    store::Store& store, const store::AuditCheckpoint& checkpoint, const crypto::PublicKey& key);

// What `mandate audit verify` says about one chain of the store.
struct AuditChainVerdict {
  std::string chain_id;
  bool this_broker = false;  // the chain the verifying broker writes
  int64_t records = 0;       // records that link up from seq 1
  std::string head_hash;     // hash of the last of them
  int64_t checkpoints = 0;   // stored checkpoints checked (the newest 100)
  int64_t checkpointed_seq = 0;
  // Records 1..covered_seq are vouched for, except those in `not_vouched`: by a checkpoint that
  // verifies with the broker's JWT key and whose record is still there, or (this broker's chain)
  // by the head the running broker holds. 0: nothing vouches for the chain.
  int64_t covered_seq = 0;
  // Records within 1..covered_seq that nothing vouches for, oldest first: the ranges the newest
  // genuine checkpoint lists as unwitnessed and, for this broker's chain, the records it found at
  // Open past that checkpoint. They link up, but were written while no broker watched (a run that
  // ended without a final checkpoint - kill -9 - or someone with write access to the store).
  // Reported, not a failure: `status` stays OK.
  std::vector<AuditSeqRange> not_vouched;
  // The chain links up but nothing this broker can check vouches for it: fabricated, or written
  // by a broker whose key this one does not know. `status` is then FailedPrecondition.
  bool unverified = false;
  // OK; DataLoss naming the first break, the cut or the rewrite; FailedPrecondition when
  // unverified.
  absl::Status status;
};

// Verifies every chain of `store` (DESIGN.md §10; docs/threat-model.md "Audit log"):
// - each chain links up from seq 1 (VerifyAuditChain) and holds what its newest 100 signed
//   checkpoints name (VerifyAuditCheckpoint with `key`);
// - a chain of another broker passes only when at least one checkpoint verifiable with `key`
//   covers it (its head or a prefix); otherwise it is reported unverified, so a self-consistent
//   chain inserted under a new chain ID does not pass;
// - this broker's chain (`own`'s) is always reported, and must match the head `own` holds in
//   memory (AuditLog::CheckStoredHead): deleted, cut, rewritten or extended behind the broker's
//   back, it fails;
// - what the broker vouches for: the prefix its newest genuine checkpoint covers and (its own
//   chain) the records this process wrote (not in AuditLog::Head::found), minus the unwitnessed
//   ranges, which are reported in `not_vouched`.
// Errors reading the store are returned as such.
absl::StatusOr<std::vector<AuditChainVerdict>> VerifyAuditStore(store::Store& store, AuditLog& own,
                                                                const crypto::PublicKey& key);

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_AUDIT_AUDIT_CHECKPOINT_H_
