// SqliteStore: the embedded default `Store`, one SQLite file in the broker's data dir.
//
// Durability: the database runs in WAL mode with `synchronous=FULL`, so every acknowledged write
// (a method that returned OK) has been fsynced and survives kill -9 and power loss.
//
// Concurrency: one SQLite connection, opened in multi-thread mode and guarded by one mutex held
// for the whole of each method, so calls from many threads are serialised and each call is one
// transaction. That is plenty for the broker's write rates; reads are short indexed lookups.
// The audit log has a second connection and mutex of its own: its group commits fsync
// continuously under load, and in WAL mode the main connection's reads (node rows, tasks) need
// not wait for them.
// Several processes may open the same file (WAL + a busy timeout); write transactions start with
// `BEGIN IMMEDIATE` so they queue for the write lock instead of failing half-way, and a lock held
// longer than the busy timeout surfaces as Unavailable.
//
// Schema: versioned migrations (sqlite_migrations.h) tracked by `PRAGMA user_version` plus a
// `schema_migrations` history table; the file is tagged with a Mandate `application_id`.
#ifndef MANDATE_BROKER_COMMON_STORE_SQLITE_STORE_H_
#define MANDATE_BROKER_COMMON_STORE_SQLITE_STORE_H_

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/store/sqlite_migrations.h"
#include "broker/common/store/store.h"

struct sqlite3;  // Kept opaque so that sqlite3.h stays out of this header.

namespace mandate::store {

struct SqliteStoreOptions {
  // How long a write waits for another process's lock before failing with Unavailable.
  int busy_timeout_ms = 5000;
};

class SqliteStore final : public Store {
 public:
  // `PRAGMA application_id` of every Mandate store ("MNDT").
  static constexpr int kApplicationId = 0x4D4E4454;

  // Opens (creating if absent) the database at `path` and brings its schema up to date.
  // A new file is created with mode 0600; an existing file readable by group or others is
  // tightened to 0600 (it holds node identities and join token hashes). The parent directory must
  // exist. Fails with:
  //   FailedPrecondition - the schema version is newer than this build knows (a newer broker
  //     wrote it), or the file is a SQLite database that is not a Mandate store, or WAL mode
  //     cannot be enabled;
  //   DataLoss - the file is not a SQLite database or is corrupt;
  //   other codes for I/O and permission problems; messages name the path and the cause.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> Open(const std::string& path,
                                                           const SqliteStoreOptions& options = {});

  // As Open, but migrates with `migrations` instead of SqliteSchemaMigrations(). For tests of
  // the migration mechanism only.
  static absl::StatusOr<std::unique_ptr<SqliteStore>> OpenWithMigrationsForTesting(
      const std::string& path, std::span<const SqliteMigration> migrations,
      const SqliteStoreOptions& options = {});

  // The schema version this build migrates to (the last migration's number).
  static int LatestSchemaVersion();

  SqliteStore(const SqliteStore&) = delete;
  SqliteStore& operator=(const SqliteStore&) = delete;
  // Closes the connection. No method may be running or called afterwards.
  ~SqliteStore() override;

  absl::StatusOr<RegistrationEntry> CreateEntry(RegistrationEntry entry) override;
  absl::StatusOr<std::vector<RegistrationEntry>> CreateEntries(
      std::vector<RegistrationEntry> entries) override;
  absl::StatusOr<RegistrationEntry> GetEntry(std::string_view id) override;
  absl::StatusOr<std::vector<RegistrationEntry>> ListEntries() override;
  absl::StatusOr<std::vector<RegistrationEntry>> ListEntriesByParent(
      std::string_view parent_id) override;
  absl::Status DeleteEntry(std::string_view id) override;
  absl::StatusOr<int64_t> EntriesRevision() override;

  absl::Status CreateJoinToken(const JoinToken& token) override;
  absl::StatusOr<JoinToken> ConsumeJoinToken(std::string_view token_hash, int64_t now) override;
  absl::Status PruneExpiredJoinTokens(int64_t now) override;

  absl::Status UpsertNode(const AttestedNode& node) override;
  absl::StatusOr<AttestedNode> GetNode(std::string_view spiffe_id) override;
  absl::StatusOr<std::vector<AttestedNode>> ListNodes() override;
  absl::Status DeleteNode(std::string_view spiffe_id) override;
  absl::Status SetNodeBanned(std::string_view spiffe_id, bool banned) override;
  absl::StatusOr<bool> IsNodeBanned(std::string_view spiffe_id) override;
  absl::Status ConfirmNodeCertSerial(std::string_view spiffe_id,
                                     std::string_view cert_serial) override;
  absl::Status AdvanceTpmCounters(std::string_view ek_hash, const TpmCounters& counters) override;
  absl::Status ResetTpmCounters(std::string_view ek_hash) override;

  absl::Status CreateTask(const Task& task) override;
  absl::StatusOr<Task> GetTask(std::string_view id) override;
  absl::StatusOr<Task> EndTask(std::string_view id, int64_t now) override;
  absl::StatusOr<std::vector<Task>> ListTasks(std::string_view spiffe_id,
                                              bool active_only) override;

  absl::Status CreateTaskAwaitingApproval(const Task& task, const Approval& approval) override;
  absl::StatusOr<DecidedApproval> DecideApproval(std::string_view id, bool approve,
                                                 std::string_view decided_by,
                                                 std::string_view reason, int64_t now) override;
  absl::StatusOr<std::vector<Approval>> ExpireApprovals(int64_t now) override;
  absl::StatusOr<Approval> GetApproval(std::string_view id) override;
  absl::StatusOr<std::vector<Approval>> ListApprovals(std::string_view status) override;

  absl::Status AppendAuditRecords(const std::vector<AuditRecord>& records) override;
  absl::Status AppendAuditBatch(const std::vector<AuditRecord>& records,
                                const std::vector<IssuedCredential>& credentials) override;
  absl::StatusOr<IssuedCredential> GetCredential(std::string_view id) override;
  absl::StatusOr<std::vector<IssuedCredential>> ListCredentials(
      const CredentialQuery& query) override;
  absl::StatusOr<AuditRecord> LastAuditRecord(std::string_view chain_id) override;
  absl::StatusOr<std::vector<AuditRecord>> ListAuditRecords(const AuditQuery& query) override;
  absl::StatusOr<std::vector<std::string>> ListAuditChains() override;
  absl::Status AddAuditCheckpoint(const AuditCheckpoint& checkpoint) override;
  absl::StatusOr<std::vector<AuditCheckpoint>> ListAuditCheckpoints(std::string_view chain_id,
                                                                    int64_t limit) override;

  absl::StatusOr<int64_t> IncrementCounterBelow(std::string_view key, int64_t limit,
                                                int64_t expires_at) override;
  absl::Status PruneCounters(int64_t now) override;

  absl::StatusOr<int> SchemaVersion() override;

  // `PRAGMA synchronous` as each of the store's own connections reports it (main first, then
  // the audit connection): the durability promise above is per connection, since the setting is
  // not stored in the file. For tests.
  absl::StatusOr<std::vector<int64_t>> SynchronousModesForTesting();

 private:
  explicit SqliteStore(sqlite3* db) : db_(db) {}
  static absl::Status CanonicalizeEntry(RegistrationEntry& entry);
  absl::Status InsertEntryLocked(RegistrationEntry& entry) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  absl::Mutex mu_;
  sqlite3* const db_ ABSL_PT_GUARDED_BY(mu_);  // Owned; closed in the destructor.
  absl::Mutex audit_mu_;
  // Owned; closed in the destructor. Set once by Open before the store is shared.
  sqlite3* audit_db_ ABSL_PT_GUARDED_BY(audit_mu_) = nullptr;
};

}  // namespace mandate::store

#endif  // MANDATE_BROKER_COMMON_STORE_SQLITE_STORE_H_
