// The broker's durable state behind one abstract interface (DESIGN.md §7, §9).
//
// Only implementations of `Store` touch SQL; everything else in the broker works with the plain
// record types below. Today there is `SqliteStore` (sqlite_store.h); a `PostgresStore` for several
// brokers sharing one state will implement the same interface. Later work adds the issued
// credential index, revocations, trusted issuers and approvals here, each as new record types +
// methods and a new numbered schema migration in each implementation. Rules that every
// implementation must apply alike live beside this header (approval_rules.h), not in one of them.
//
// Conventions shared by all records:
//   - Selectors are "type:value" strings (e.g. "unix:uid:1000", "join:name:web-1"); a selector list
//     is a set: the store deduplicates it and returns it sorted. The same holds for scopes.
//   - Times are int64 Unix seconds, supplied by the caller (the store has no clock of its own, so
//     callers can inject one and tests need not sleep).
//   - The store checks storage invariants (non-empty keys, uniqueness, the join token hash format).
//     Semantic validation (SPIFFE ID syntax, reserved paths, selector types) belongs to the callers
//     (`broker/common/spiffe`, the admin API) and must happen before a record reaches the store.
//
// Errors: NotFound / AlreadyExists / InvalidArgument / FailedPrecondition as documented per
// method; Unavailable when the database stays locked by another process past its busy timeout;
// Internal or DataLoss (corruption) for other storage failures, with the database's own message.
// A method that fails changes nothing: every multi-statement write is one transaction.
#ifndef MANDATE_BROKER_COMMON_STORE_STORE_H_
#define MANDATE_BROKER_COMMON_STORE_STORE_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::store {

// A registration entry: workloads under node `parent_id` whose selectors include all of
// `selectors` may receive credentials for `spiffe_id` (DESIGN.md §3).
struct RegistrationEntry {
  std::string id;  // Chosen by the caller (e.g. a UUID); non-empty, unique.
  std::string spiffe_id;
  std::string parent_id;  // The node agent's SPIFFE ID.
  std::vector<std::string> selectors;
  std::vector<std::string> scopes;  // Scopes a task for this identity may ask for.
  int64_t x509_ttl_s = 0, jwt_ttl_s = 0, token_ttl_s = 0;  // 0 = broker default.
  int64_t created_at = 0;
  // Assigned by the store on create: the value of EntriesRevision() right after this entry was
  // written. Ignored on input.
  int64_t revision = 0;

  friend bool operator==(const RegistrationEntry&, const RegistrationEntry&) = default;
};

// A node agent that proved its identity with a node attestor.
struct AttestedNode {
  std::string spiffe_id;
  std::string attestor;  // "join_token", "tpm".
  std::vector<std::string> selectors;
  std::string cert_serial;  // Serial of the node's current X509-SVID (hex).
  // Serial of the SVID the node renewed from; still accepted until the new one is first used
  // (a renewal whose answer was lost must not lock the node out). Empty when none.
  std::string previous_cert_serial;
  int64_t cert_expires_at = 0;
  int64_t created_at = 0;
  int64_t updated_at = 0;
  // A banned node keeps its row so that re-attestation under the same ID can be refused.
  bool banned = false;

  friend bool operator==(const AttestedNode&, const AttestedNode&) = default;
};

// A one-time join token. Only its hash is stored, so a copy of the database does not let anyone
// attest a node.
struct JoinToken {
  std::string token_hash;      // Hex SHA-256 of the token (64 hex digits; stored lowercase).
  std::string node_spiffe_id;  // The ID the node receives when it presents the token.
  int64_t created_at = 0;
  int64_t expires_at = 0;  // The token is usable while now < expires_at.

  friend bool operator==(const JoinToken&, const JoinToken&) = default;
};

// The TPM boot counters (TPMS_CLOCK_INFO resetCount, restartCount) last seen in a quote from one
// EK. They must never go backwards: a quote with smaller counters is a replay or a rolled-back TPM.
struct TpmCounters {
  int64_t reset_count = 0;
  int64_t restart_count = 0;
  friend bool operator==(const TpmCounters&, const TpmCounters&) = default;
};

// A task an agent declared (DESIGN.md §5): what it is for, the scopes and audiences its tokens
// may carry, and until when. Scopes and audiences are ordered lists: the store keeps the order
// they were given in (it is the order the agent asked for, shown back to it) and drops later
// duplicates; an empty element is refused.
struct Task {
  std::string id;         // Chosen by the caller ("task_..."); non-empty, unique.
  std::string spiffe_id;  // The agent the task belongs to.
  std::string purpose;    // Agent-controlled text: data, escaped wherever it is shown.
  std::vector<std::string> scopes;
  std::vector<std::string> audiences;
  // "active", "ended", "pending_approval" (awaiting a human, see Approval) or "denied" (its
  // approval was denied or expired); revocation will add "revoked". The store treats the value
  // as an opaque non-empty string, except that EndTask ends only "active" tasks and the approval
  // methods move only "pending_approval" ones, so readers must not assume the list is closed.
  std::string status;
  int64_t created_at = 0;
  int64_t expires_at = 0;  // Usable while now < expires_at (callers check; the store has no clock).
  int64_t ended_at = 0;    // 0 while not ended.
  // The approval the task was declared under (CreateTaskAwaitingApproval); kept after the
  // decision, so the task and its tokens can be traced to the human who admitted it. Empty for a
  // task that never needed approval.
  std::string approval_id;

  friend bool operator==(const Task&, const Task&) = default;
};

// A human decision a task declaration waits for (DESIGN.md §5: the policy hook may require
// approval). Rules every Store implementation shares (id format, the statuses, the deadline
// arithmetic) are in approval_rules.h.
struct Approval {
  std::string id;  // "appr_" + 22 base64url characters (128 random bits), chosen by the caller.
  std::string task_id;    // The task awaiting it (status "pending_approval").
  std::string spiffe_id;  // The task's owner.
  // The policy input document (JSON text) the hook answered `require_approval` to: what the
  // approver is shown. It holds agent-controlled text (the purpose): data, escaped when shown.
  std::string input_document;
  std::string status;  // "pending", "approved", "denied", "expired".
  int64_t created_at = 0;
  int64_t expires_at = 0;  // Decidable while now < expires_at.
  int64_t decided_at = 0;  // 0 while pending; the sweep's time for "expired".
  std::string decided_by;  // The operator identity (e.g. "uid:1000"); empty while pending/expired.
  std::string reason;      // The operator's reason; may be empty.

  friend bool operator==(const Approval&, const Approval&) = default;
};

// The result of DecideApproval: both records as the same transaction left them.
struct DecidedApproval {
  Approval approval;
  Task task;
};

// One credential the broker issued (DESIGN.md §5 "Revocation"): the credential index. A row is
// written in the same transaction as the credential's audit record, so nothing is issued
// without a row; revocation cascades over `parent_id`. Rows are never updated by issuance.
struct IssuedCredential {
  std::string id;    // jti of a token, lowercase hex serial of a certificate; non-empty, unique
  std::string kind;  // "x509_svid", "jwt_svid", "task_token", "delegated_token"
  std::string spiffe_id;       // the identity it was issued to (the current actor)
  std::string node_id;         // the node agent that relayed the request; may be empty
  std::string subject_issuer;  // delegated: the user token's `iss`; empty otherwise
  std::string subject;         // delegated: the user's `sub`; empty otherwise
  std::string task_id;         // may be empty
  std::string parent_id;       // the credential (a broker token's jti) it came from; may be empty
  int64_t issued_at = 0;
  int64_t expires_at = 0;
  friend bool operator==(const IssuedCredential&, const IssuedCredential&) = default;
};

// A trusted issuer of user tokens (DESIGN.md §5 "Delegation"): tokens it signs may be exchanged
// for delegated tokens. Exactly one of jwks_json (a --jwks-file's contents) and jwks_uri is the
// source; for a jwks_uri the last good set fetched is kept in jwks_json.
struct TrustedIssuer {
  std::string issuer;     // the `iss` value, exactly as the tokens carry it; unique
  std::string jwks_json;  // the JWK Set (JSON); for a jwks_uri the last good fetch ("" before)
  std::string jwks_uri;   // empty for a static set
  int64_t created_at = 0;
  int64_t updated_at = 0;  // when jwks_json last changed
  friend bool operator==(const TrustedIssuer&, const TrustedIssuer&) = default;
};

// One record of the broker's audit log (DESIGN.md §7, §10): a decision or an issuance. Records of
// one broker form a hash chain: `seq` counts 1, 2, ... within `chain_id`, and `hash` covers every
// other field including `prev_hash` (the previous record's `hash`; empty for seq 1). The store
// keeps records as given; computing and checking the chain is the audit module's job.
struct AuditRecord {
  std::string chain_id;  // The broker that wrote it; several brokers may share one store.
  int64_t seq = 0;
  int64_t time = 0;
  std::string event;          // e.g. "jwt_svid", "x509_svid", "task_token", "task_declared".
  std::string outcome;        // "issued", "denied", "ok".
  std::string spiffe_id;      // The subject the decision was about; may be empty.
  std::string node_id;        // The calling node agent; may be empty.
  std::string task_id;        // May be empty.
  std::string credential_id;  // jti of a token, hex serial of a certificate; may be empty.
  std::string detail;         // A JSON object with the rest (audiences, expiry, reason, ...).
  std::string prev_hash;
  std::string hash;

  friend bool operator==(const AuditRecord&, const AuditRecord&) = default;
};

// A signed statement of an audit chain's head: "chain `chain_id` had `seq` records, the last with
// hash `hash`", as a JWS by the broker's JWT key. Exported copies let anyone detect a chain that
// was cut or recomputed after the checkpoint.
struct AuditCheckpoint {
  std::string chain_id;
  int64_t seq = 0;
  std::string hash;
  int64_t time = 0;
  std::string jws;

  friend bool operator==(const AuditCheckpoint&, const AuditCheckpoint&) = default;
};

// Which audit records ListAuditRecords returns; empty/zero fields do not filter.
struct AuditQuery {
  std::string chain_id;
  int64_t after_seq = 0;  // With chain_id: only records with seq > after_seq (paging a chain).
  int64_t since = 0;      // time >= since
  std::string spiffe_id;
  std::string task_id;
  std::string credential_id;
  int64_t limit = 1000;  // At most this many (1..10000).
};

// Which rows of the credential index ListCredentials returns; empty fields do not filter.
// Rows come ordered by id; page with after_id (the last id of the previous page).
struct CredentialQuery {
  std::string spiffe_id;
  std::string subject;
  std::string subject_issuer;
  std::string task_id;
  std::string parent_id;
  std::string after_id;
  int64_t limit = 100;  // 1..kMaxCredentialListLimit (credential_index.h)
};

// Thread-safety: every method may be called concurrently from any thread; each call is atomic
// (it sees and leaves a consistent state). Implementations are not copyable; the owner (the
// broker's `main()`) keeps one instance alive for as long as any module uses it.
class Store {
 public:
  virtual ~Store() = default;

  // ---- Registration entries ----

  // Stores `entry` and bumps EntriesRevision(). Returns the entry as stored (selectors and scopes
  // deduplicated and sorted, `revision` assigned).
  // InvalidArgument: empty id, spiffe_id or parent_id, or an empty selector/scope string.
  // AlreadyExists: an entry with this id exists, or one with the same (spiffe_id, parent_id,
  // selector set) exists (SPIRE refuses such duplicates; the message names the existing entry).
  virtual absl::StatusOr<RegistrationEntry> CreateEntry(RegistrationEntry entry) = 0;
  // Stores all of `entries` in one transaction (one fsync), or none of them: the same checks as
  // CreateEntry, including duplicates within the batch. Returns them as stored, in order, with
  // consecutive revisions.
  virtual absl::StatusOr<std::vector<RegistrationEntry>> CreateEntries(
      std::vector<RegistrationEntry> entries) = 0;

  // NotFound when no entry has this id.
  virtual absl::StatusOr<RegistrationEntry> GetEntry(std::string_view id) = 0;

  // All entries, ordered by id.
  virtual absl::StatusOr<std::vector<RegistrationEntry>> ListEntries() = 0;

  // Entries whose parent_id equals `parent_id` exactly, ordered by id (indexed lookup: this is
  // the hot path when a node agent asks which workloads it may serve).
  virtual absl::StatusOr<std::vector<RegistrationEntry>> ListEntriesByParent(
      std::string_view parent_id) = 0;

  // Deletes the entry and bumps EntriesRevision(). NotFound when absent (nothing is bumped).
  virtual absl::Status DeleteEntry(std::string_view id) = 0;

  // A persisted counter bumped by every successful entry create or delete; it never decreases, so
  // a cache that remembers the value it loaded at can tell whether it is stale. 0 for a new store.
  virtual absl::StatusOr<int64_t> EntriesRevision() = 0;

  // ---- Join tokens ----

  // InvalidArgument: token_hash is not 64 hex digits (so a raw token is never stored by mistake),
  // or node_spiffe_id is empty. AlreadyExists: a token with this hash exists.
  virtual absl::Status CreateJoinToken(const JoinToken& token) = 0;

  // Atomically deletes and returns the token with this hash: of two concurrent callers (even in
  // different processes sharing the database) at most one gets it.
  // NotFound: unknown or already used. FailedPrecondition("join token expired"): it existed but
  // expires_at <= now; it is deleted all the same, so a retry gets NotFound.
  virtual absl::StatusOr<JoinToken> ConsumeJoinToken(std::string_view token_hash, int64_t now) = 0;

  // Deletes every token with expires_at <= now.
  virtual absl::Status PruneExpiredJoinTokens(int64_t now) = 0;

  // ---- Attested nodes ----

  // Inserts the node, or updates an existing row with the same spiffe_id: attestor, selectors
  // (replaced as a whole), cert_serial, previous_cert_serial, cert_expires_at and updated_at are
  // taken from `node`,
  // while created_at and banned of the existing row are kept. Refusing banned nodes is the
  // caller's job (IsNodeBanned) before it attests. InvalidArgument: empty spiffe_id or selector.
  virtual absl::Status UpsertNode(const AttestedNode& node) = 0;

  // NotFound when absent.
  virtual absl::StatusOr<AttestedNode> GetNode(std::string_view spiffe_id) = 0;

  // All nodes (banned ones included), ordered by spiffe_id.
  virtual absl::StatusOr<std::vector<AttestedNode>> ListNodes() = 0;

  // Removes the node row entirely (a later attestation starts afresh). NotFound when absent.
  virtual absl::Status DeleteNode(std::string_view spiffe_id) = 0;

  // Sets or clears the ban flag; the row stays either way. NotFound when absent.
  virtual absl::Status SetNodeBanned(std::string_view spiffe_id, bool banned) = 0;

  // Forgets the previous certificate serial of a node whose current serial is `cert_serial`
  // (the node has started using its renewed SVID). Changes nothing, and is OK, when the row is
  // gone or its serial has moved on: never re-creates a row.
  virtual absl::Status ConfirmNodeCertSerial(std::string_view spiffe_id,
                                             std::string_view cert_serial) = 0;
  // True when a node row with this ID exists and is banned; false when absent.
  virtual absl::StatusOr<bool> IsNodeBanned(std::string_view spiffe_id) = 0;

  // ---- TPM boot counters, by hex SHA-256 of the EK SubjectPublicKeyInfo ----
  // Records `counters` for `ek_hash` when they are not lexicographically smaller than the stored
  // pair (equal is fine: the same boot attesting again). FailedPrecondition("TPM counters went
  // backwards ...") otherwise, and nothing changes. Atomic against concurrent callers.
  virtual absl::Status AdvanceTpmCounters(std::string_view ek_hash,
                                          const TpmCounters& counters) = 0;
  // Forgets the counters of `ek_hash` (operator override after a TPM clear). OK when absent.
  virtual absl::Status ResetTpmCounters(std::string_view ek_hash) = 0;

  // ---- Tasks ----

  // Stores `task` as given (scopes and audiences deduplicated, order kept).
  // InvalidArgument: empty id, spiffe_id or status, an empty scope/audience string, or a
  // non-empty approval_id or status "pending_approval" (CreateTaskAwaitingApproval stores those).
  // AlreadyExists: a task with this id exists.
  virtual absl::Status CreateTask(const Task& task) = 0;

  // NotFound when no task has this id.
  virtual absl::StatusOr<Task> GetTask(std::string_view id) = 0;

  // Sets status "ended" and ended_at = `now`, atomically against concurrent callers, and returns
  // the task as stored. NotFound when absent; FailedPrecondition when its status is not "active"
  // (already ended, or any later status), and nothing changes.
  virtual absl::StatusOr<Task> EndTask(std::string_view id, int64_t now) = 0;

  // Tasks of `spiffe_id` (every task when empty), ordered by created_at then id. With
  // `active_only`, only those whose status is "active" - including any past their expires_at,
  // since the store does not know the time.
  virtual absl::StatusOr<std::vector<Task>> ListTasks(std::string_view spiffe_id,
                                                      bool active_only) = 0;

  // ---- Approvals (task declarations awaiting a human) ----

  // Stores `task` (status "pending_approval", approval_id = approval.id) and `approval` (status
  // "pending", task_id = task.id, same spiffe_id, expires_at > created_at, no decision yet) in one
  // transaction. InvalidArgument: as CreateTask, or any of the above does not hold, or the
  // approval id is malformed (ValidateNewApproval in approval_rules.h). AlreadyExists: a task or
  // approval with this id exists; nothing is stored.
  virtual absl::Status CreateTaskAwaitingApproval(const Task& task, const Approval& approval) = 0;

  // Decides approval `id` as `decided_by` (non-empty) at `now`: a compare-and-set that changes
  // only a "pending" approval with now < expires_at, to "approved" or "denied", and in the same
  // transaction moves its task from "pending_approval" to "active" with expires_at =
  // ApprovedTaskExpiry(task, now) (waiting for a human does not eat the task's lifetime), or to
  // "denied". Of concurrent deciders (threads or processes) exactly one succeeds.
  // NotFound when absent; FailedPrecondition when already decided or expired (the message says
  // which), or when the task is no longer awaiting approval; InvalidArgument for an empty
  // decided_by. Nothing changes on error.
  virtual absl::StatusOr<DecidedApproval> DecideApproval(std::string_view id, bool approve,
                                                         std::string_view decided_by,
                                                         std::string_view reason, int64_t now) = 0;

  // Marks every "pending" approval with expires_at <= now as "expired" (decided_at = now) and
  // moves its task from "pending_approval" to "denied", in one transaction. Returns the approvals
  // it expired (each exactly once, even with several brokers sweeping), ordered by id.
  virtual absl::StatusOr<std::vector<Approval>> ExpireApprovals(int64_t now) = 0;

  // NotFound when absent.
  virtual absl::StatusOr<Approval> GetApproval(std::string_view id) = 0;

  // Approvals whose status equals `status` (all when empty), ordered by created_at then id. A
  // "pending" approval past its expires_at stays "pending" here until ExpireApprovals runs.
  virtual absl::StatusOr<std::vector<Approval>> ListApprovals(std::string_view status) = 0;

  // ---- Audit log ----

  // Appends `records` in one transaction (one fsync), or none of them. Callers batch many
  // records per call (group commit). InvalidArgument: an empty chain_id, event, outcome or hash,
  // or seq < 1. AlreadyExists: a record with the same (chain_id, seq) is stored (another writer
  // extended the chain: the caller's view of the chain head is stale).
  virtual absl::Status AppendAuditRecords(const std::vector<AuditRecord>& records) = 0;

  // Appends `records` and the credential index rows `credentials` in one transaction, or nothing.
  // Errors as AppendAuditRecords; also InvalidArgument for a row ValidateIssuedCredential refuses
  // and AlreadyExists when a row's id is already stored (a jti/serial collision is never
  // silent). With no credentials it costs what AppendAuditRecords costs.
  virtual absl::Status AppendAuditBatch(const std::vector<AuditRecord>& records,
                                        const std::vector<IssuedCredential>& credentials) = 0;

  // The credential index row with `id`; NotFound when none.
  virtual absl::StatusOr<IssuedCredential> GetCredential(std::string_view id) = 0;

  // Rows matching `query`; InvalidArgument for a limit outside 1..kMaxCredentialListLimit.
  virtual absl::StatusOr<std::vector<IssuedCredential>> ListCredentials(
      const CredentialQuery& query) = 0;

  // The record with the highest seq of `chain_id`; NotFound when the chain has no record.
  virtual absl::StatusOr<AuditRecord> LastAuditRecord(std::string_view chain_id) = 0;

  // Matching records ordered by (chain_id, seq). InvalidArgument: limit out of range.
  virtual absl::StatusOr<std::vector<AuditRecord>> ListAuditRecords(const AuditQuery& query) = 0;

  // Every chain_id with at least one record, sorted.
  virtual absl::StatusOr<std::vector<std::string>> ListAuditChains() = 0;

  // Stores a checkpoint. InvalidArgument: empty chain_id, hash or jws, or seq < 1.
  // AlreadyExists: one for (chain_id, seq) is stored.
  virtual absl::Status AddAuditCheckpoint(const AuditCheckpoint& checkpoint) = 0;
  // Checkpoints of `chain_id` (all chains when empty), newest first (by time, then seq), at most
  // `limit` (1..10000).
  virtual absl::StatusOr<std::vector<AuditCheckpoint>> ListAuditCheckpoints(
      std::string_view chain_id, int64_t limit) = 0;

  // ---- Counters (policy execution caps) ----
  // Named counters for caps that must hold across threads, processes sharing the store and
  // restarts. The store knows nothing of what a key means or when a window starts: the policy
  // module builds keys and expiry times, so every implementation counts the same way.

  // Atomically adds 1 to counter `key` (a new counter starts at 0) unless it is already at
  // `limit` or above, and returns the new value: of any number of concurrent callers with the
  // same limit exactly `limit` succeed. The counter is kept at least until `expires_at` (an
  // increment may move a counter's expiry later, never earlier).
  // ResourceExhausted: the counter is at `limit`; nothing changes.
  // InvalidArgument: empty key, or limit < 1.
  virtual absl::StatusOr<int64_t> IncrementCounterBelow(std::string_view key, int64_t limit,
                                                        int64_t expires_at) = 0;
  // Deletes every counter whose expires_at <= now.
  virtual absl::Status PruneCounters(int64_t now) = 0;

  // ---- Maintenance ----

  // The schema version of the open database (the number of the last applied migration).
  virtual absl::StatusOr<int> SchemaVersion() = 0;
};

}  // namespace mandate::store

#endif  // MANDATE_BROKER_COMMON_STORE_STORE_H_
