#include "broker/common/store/sqlite_store.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "broker/common/store/approval_rules.h"
#include "broker/common/store/credential_index.h"
#include "broker/common/util/status_macros.h"

namespace mandate::store {
namespace {

// This Abseil build has its own string_view type (ABSL_OPTION_USE_STD_STRING_VIEW is 0), so
// std::string_view must be bridged explicitly before it reaches StrCat or a Status message.
absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }

constexpr std::string_view kEntriesRevisionCounter = "entries_revision";

// ---- Error mapping ----

// Maps a SQLite result code to an absl::Status carrying SQLite's own message. `db` may be null
// (then only the generic text for `rc` is available).
absl::Status SqliteError(sqlite3* db, int rc, std::string_view what) {
  const char* detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  std::string message = absl::StrCat(AbslView(what), ": ", detail, " (sqlite code ", rc, ")");
  switch (rc & 0xff) {
    case SQLITE_CONSTRAINT:
      if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
        return absl::AlreadyExistsError(message);
      }
      return absl::InvalidArgumentError(message);
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::UnavailableError(message);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(message);
    case SQLITE_PERM:
    case SQLITE_AUTH:
    case SQLITE_READONLY:
      return absl::PermissionDeniedError(message);
    case SQLITE_CANTOPEN:
      return absl::FailedPreconditionError(message);
    case SQLITE_FULL:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

// ---- Statements ----

// Prepared statements kept per connection and reused: compiling the SQL text cost as much as
// running the small queries that make up most store calls. A statement is taken out while in
// use, so nested or concurrent uses of the same SQL get their own; SQLite recompiles cached
// statements by itself after a schema change. Thread-safe.
class StatementCache {
 public:
  static StatementCache& Get() {
    static StatementCache* cache = new StatementCache();
    return *cache;
  }

  // A reset, unbound statement for `sql` on `db`, or nullptr when none is free.
  sqlite3_stmt* Take(sqlite3* db, std::string_view sql) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(KeyView{db, sql});
    if (it == free_.end() || it->second.empty()) return nullptr;
    sqlite3_stmt* stmt = it->second.back();
    it->second.pop_back();
    return stmt;
  }

  // Keeps `stmt` (already reset) for the next Take, or finalizes it when enough are kept.
  void Return(sqlite3* db, std::string_view sql, sqlite3_stmt* stmt) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(KeyView{db, sql});
      // The key string is allocated once per distinct statement, not on every return.
      if (it == free_.end())
        it = free_.emplace(Key{db, std::string(sql)}, std::vector<sqlite3_stmt*>{}).first;
      std::vector<sqlite3_stmt*>& kept = it->second;
      if (kept.size() < kMaxPerSql) {
        kept.push_back(stmt);
        return;
      }
    }
    sqlite3_finalize(stmt);
  }

  // Finalizes every kept statement of `db`; call before closing it.
  void FinalizeAll(sqlite3* db) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end();) {
      if (it->first.db != db) {
        ++it;
        continue;
      }
      for (sqlite3_stmt* stmt : it->second) sqlite3_finalize(stmt);
      it = free_.erase(it);
    }
  }

 private:
  static constexpr size_t kMaxPerSql = 8;
  struct Key {
    sqlite3* db;
    std::string sql;
  };
  struct KeyView {
    sqlite3* db;
    std::string_view sql;
  };
  // Orders Key and KeyView alike, so lookups need no string copy.
  struct KeyLess {
    using is_transparent = void;
    static KeyView View(const Key& k) { return {k.db, k.sql}; }
    static KeyView View(const KeyView& k) { return k; }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      KeyView x = View(a), y = View(b);
      return x.db != y.db ? std::less<sqlite3*>()(x.db, y.db) : x.sql < y.sql;
    }
  };
  std::mutex mu_;
  std::map<Key, std::vector<sqlite3_stmt*>, KeyLess> free_;
};

// A prepared statement, handed back to the StatementCache (reset, bindings cleared) on
// destruction. Data only ever enters SQL through Bind*.
class Statement {
 public:
  static absl::StatusOr<Statement> Prepare(sqlite3* db, std::string_view sql) {
    if (sqlite3_stmt* cached = StatementCache::Get().Take(db, sql); cached != nullptr) {
      return Statement(db, cached, sql);
    }
    sqlite3_stmt* stmt = nullptr;
    int rc = sqlite3_prepare_v3(db, sql.data(), static_cast<int>(sql.size()),
                                SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    if (rc != SQLITE_OK) {
      sqlite3_finalize(stmt);
      return SqliteError(db, rc, absl::StrCat("preparing \"", AbslView(sql), "\""));
    }
    return Statement(db, stmt, sql);
  }

  Statement(Statement&& other) noexcept
      : db_(other.db_), stmt_(std::exchange(other.stmt_, nullptr)), sql_(other.sql_) {}
  Statement& operator=(Statement&&) = delete;
  Statement(const Statement&) = delete;
  ~Statement() {
    if (stmt_ == nullptr) return;
    // Reset ends any read the statement holds open; its return code repeats the last step's.
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
    StatementCache::Get().Return(db_, sql_, stmt_);
  }

  absl::Status BindText(int index, std::string_view value) {
    return Check(sqlite3_bind_text64(stmt_, index, value.data(), value.size(), SQLITE_TRANSIENT,
                                     SQLITE_UTF8),
                 "binding a text parameter");
  }
  absl::Status BindInt64(int index, int64_t value) {
    return Check(sqlite3_bind_int64(stmt_, index, value), "binding an integer parameter");
  }

  // Advances the statement: true when a row is available, false when it has finished.
  absl::StatusOr<bool> Step() {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return SqliteError(db_, rc, absl::StrCat("executing \"", sqlite3_sql(stmt_), "\""));
  }

  // Runs a statement that returns no rows (or whose rows are not wanted) to completion.
  absl::Status Run() {
    while (true) {
      ASSIGN_OR_RETURN(bool has_row, Step());
      if (!has_row) return absl::OkStatus();
    }
  }

  // Makes the statement ready to run again with new bindings.
  void Reset() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  std::string ColumnText(int column) const {
    const unsigned char* text = sqlite3_column_text(stmt_, column);
    if (text == nullptr) return std::string();
    return std::string(reinterpret_cast<const char*>(text),
                       static_cast<size_t>(sqlite3_column_bytes(stmt_, column)));
  }
  int64_t ColumnInt64(int column) const { return sqlite3_column_int64(stmt_, column); }

 private:
  // `sql` must outlive the statement: callers pass string literals or constants.
  Statement(sqlite3* db, sqlite3_stmt* stmt, std::string_view sql)
      : db_(db), stmt_(stmt), sql_(sql) {}

  absl::Status Check(int rc, std::string_view what) {
    if (rc == SQLITE_OK) return absl::OkStatus();
    return SqliteError(db_, rc, what);
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_;
  std::string_view sql_;
};

// Runs constant SQL text (possibly several statements) that binds no data.
absl::Status ExecConstantSql(sqlite3* db, std::string_view sql, std::string_view what) {
  std::string sql_string(sql);  // sqlite3_exec needs a NUL-terminated string.
  char* error = nullptr;
  int rc = sqlite3_exec(db, sql_string.c_str(), nullptr, nullptr, &error);
  if (rc == SQLITE_OK) return absl::OkStatus();
  std::string detail = error != nullptr ? error : sqlite3_errstr(rc);
  sqlite3_free(error);
  absl::Status status = SqliteError(nullptr, rc, what);
  return absl::Status(status.code(),
                      absl::StrCat(AbslView(what), ": ", detail, " (sqlite code ", rc, ")"));
}

absl::StatusOr<int64_t> QuerySingleInt(sqlite3* db, std::string_view sql) {
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, sql));
  ASSIGN_OR_RETURN(bool has_row, stmt.Step());
  if (!has_row) return absl::InternalError(absl::StrCat("\"", AbslView(sql), "\" returned no row"));
  return stmt.ColumnInt64(0);
}

// ---- Transactions ----

// A transaction that rolls back unless committed, so a failed multi-statement write changes
// nothing.
class Transaction {
 public:
  // Write transactions take the write lock up front: a transaction that starts as a reader and
  // later upgrades can fail with SQLITE_BUSY half-way without the busy timeout helping.
  static absl::StatusOr<Transaction> BeginWrite(sqlite3* db) {
    RETURN_IF_ERROR(ExecConstantSql(db, "BEGIN IMMEDIATE", "starting a write transaction"));
    return Transaction(db);
  }
  // Read transactions give several SELECTs one consistent snapshot.
  static absl::StatusOr<Transaction> BeginRead(sqlite3* db) {
    RETURN_IF_ERROR(ExecConstantSql(db, "BEGIN DEFERRED", "starting a read transaction"));
    return Transaction(db);
  }

  Transaction(Transaction&& other) noexcept : db_(std::exchange(other.db_, nullptr)) {}
  Transaction& operator=(Transaction&&) = delete;
  Transaction(const Transaction&) = delete;
  ~Transaction() {
    // A failed COMMIT may leave the transaction open; autocommit mode means it is over.
    if (db_ != nullptr && sqlite3_get_autocommit(db_) == 0) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }

  absl::Status Commit() {
    absl::Status status = ExecConstantSql(db_, "COMMIT", "committing a transaction");
    if (status.ok()) db_ = nullptr;
    return status;
  }

 private:
  explicit Transaction(sqlite3* db) : db_(db) {}
  sqlite3* db_;
};

// ---- Helpers ----

// Sorted, without duplicates: selector and scope lists are sets.
std::vector<std::string> CanonicalSet(std::vector<std::string> values) {
  std::sort(values.begin(), values.end());
  values.erase(std::unique(values.begin(), values.end()), values.end());
  return values;
}

// An injective encoding of a canonical selector set: each element is length-prefixed, so no two
// different sets share a key whatever bytes the selectors contain.
std::string SelectorSetKey(const std::vector<std::string>& canonical_selectors) {
  std::string key;
  for (const std::string& selector : canonical_selectors) {
    absl::StrAppend(&key, selector.size(), ":", selector, ";");
  }
  return key;
}

absl::Status CheckNoEmptyElement(const std::vector<std::string>& values, std::string_view what) {
  for (const std::string& value : values) {
    if (value.empty()) return absl::InvalidArgumentError(absl::StrCat("empty ", AbslView(what)));
  }
  return absl::OkStatus();
}

// Join token hashes are 64 hex digits; returned lowercase so that case never matters.
absl::StatusOr<std::string> NormalizeTokenHash(std::string_view token_hash) {
  if (token_hash.size() != 64 || !std::all_of(token_hash.begin(), token_hash.end(), [](char c) {
        return absl::ascii_isxdigit(static_cast<unsigned char>(c));
      })) {
    return absl::InvalidArgumentError(
        "join token hash must be the hex SHA-256 of the token (64 hex digits)");
  }
  return absl::AsciiStrToLower(AbslView(token_hash));
}

absl::StatusOr<int64_t> BumpCounter(sqlite3* db, std::string_view name) {
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db,
                                                      "UPDATE store_counters SET value = value + 1 "
                                                      "WHERE name = ?1 RETURNING value"));
  RETURN_IF_ERROR(stmt.BindText(1, name));
  ASSIGN_OR_RETURN(bool has_row, stmt.Step());
  if (!has_row)
    return absl::InternalError(absl::StrCat("store counter '", AbslView(name), "' is missing"));
  int64_t value = stmt.ColumnInt64(0);
  RETURN_IF_ERROR(stmt.Run());  // Finish the statement so the transaction can commit.
  return value;
}

// Inserts (key, element) rows with a statement of the form "INSERT ... VALUES (?1, ?2)".
absl::Status InsertSetRows(sqlite3* db, std::string_view sql, std::string_view key,
                           const std::vector<std::string>& elements) {
  if (elements.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, sql));
  for (const std::string& element : elements) {
    stmt.Reset();
    RETURN_IF_ERROR(stmt.BindText(1, key));
    RETURN_IF_ERROR(stmt.BindText(2, element));
    RETURN_IF_ERROR(stmt.Run());
  }
  return absl::OkStatus();
}

// Reads (key, element) rows, ordered by key then element, into the matching record's field.
template <typename Record>
absl::Status LoadSetRows(sqlite3* db, std::string_view sql, std::optional<std::string_view> arg,
                         const std::map<std::string, Record*, std::less<>>& records_by_key,
                         std::vector<std::string> Record::*field) {
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, sql));
  if (arg.has_value()) RETURN_IF_ERROR(stmt.BindText(1, *arg));
  while (true) {
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) return absl::OkStatus();
    auto it = records_by_key.find(stmt.ColumnText(0));
    if (it == records_by_key.end()) continue;  // Cannot happen inside one read transaction.
    (it->second->*field).push_back(stmt.ColumnText(1));
  }
}

// The three queries that load entries with one filter; each binds at most ?1. Element queries
// are ordered so that the loaded sets come out sorted.
struct EntryQueries {
  std::string_view entries;
  std::string_view selectors;
  std::string_view scopes;
};

#define MANDATE_ENTRY_COLUMNS \
  "SELECT id, spiffe_id, parent_id, x509_ttl_s, jwt_ttl_s, token_ttl_s, created_at, revision "

constexpr EntryQueries kAllEntries = {
    MANDATE_ENTRY_COLUMNS "FROM registration_entries ORDER BY id",
    "SELECT entry_id, selector FROM registration_entry_selectors ORDER BY entry_id, selector",
    "SELECT entry_id, scope FROM registration_entry_scopes ORDER BY entry_id, scope",
};
constexpr EntryQueries kEntryById = {
    MANDATE_ENTRY_COLUMNS "FROM registration_entries WHERE id = ?1",
    "SELECT entry_id, selector FROM registration_entry_selectors WHERE entry_id = ?1 "
    "ORDER BY selector",
    "SELECT entry_id, scope FROM registration_entry_scopes WHERE entry_id = ?1 ORDER BY scope",
};
constexpr EntryQueries kEntriesByParent = {
    MANDATE_ENTRY_COLUMNS "FROM registration_entries WHERE parent_id = ?1 ORDER BY id",
    "SELECT s.entry_id, s.selector FROM registration_entry_selectors s "
    "JOIN registration_entries e ON e.id = s.entry_id WHERE e.parent_id = ?1 "
    "ORDER BY s.entry_id, s.selector",
    "SELECT s.entry_id, s.scope FROM registration_entry_scopes s "
    "JOIN registration_entries e ON e.id = s.entry_id WHERE e.parent_id = ?1 "
    "ORDER BY s.entry_id, s.scope",
};

#undef MANDATE_ENTRY_COLUMNS

absl::StatusOr<std::vector<RegistrationEntry>> LoadEntries(sqlite3* db, const EntryQueries& queries,
                                                           std::optional<std::string_view> arg) {
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginRead(db));
  std::vector<RegistrationEntry> entries;
  {
    ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, queries.entries));
    if (arg.has_value()) RETURN_IF_ERROR(stmt.BindText(1, *arg));
    while (true) {
      ASSIGN_OR_RETURN(bool has_row, stmt.Step());
      if (!has_row) break;
      RegistrationEntry& entry = entries.emplace_back();
      entry.id = stmt.ColumnText(0);
      entry.spiffe_id = stmt.ColumnText(1);
      entry.parent_id = stmt.ColumnText(2);
      entry.x509_ttl_s = stmt.ColumnInt64(3);
      entry.jwt_ttl_s = stmt.ColumnInt64(4);
      entry.token_ttl_s = stmt.ColumnInt64(5);
      entry.created_at = stmt.ColumnInt64(6);
      entry.revision = stmt.ColumnInt64(7);
    }
  }
  if (entries.empty()) return entries;
  std::map<std::string, RegistrationEntry*, std::less<>> by_id;
  for (RegistrationEntry& entry : entries) by_id.emplace(entry.id, &entry);
  RETURN_IF_ERROR(LoadSetRows(db, queries.selectors, arg, by_id, &RegistrationEntry::selectors));
  RETURN_IF_ERROR(LoadSetRows(db, queries.scopes, arg, by_id, &RegistrationEntry::scopes));
  RETURN_IF_ERROR(txn.Commit());
  return entries;
}

struct NodeQueries {
  std::string_view nodes;
  std::string_view selectors;
};

constexpr NodeQueries kAllNodes = {
    "SELECT spiffe_id, attestor, cert_serial, cert_expires_at, created_at, updated_at, banned, "
    "previous_cert_serial "
    "FROM attested_nodes ORDER BY spiffe_id",
    "SELECT node_id, selector FROM attested_node_selectors ORDER BY node_id, selector",
};
constexpr NodeQueries kNodeById = {
    "SELECT spiffe_id, attestor, cert_serial, cert_expires_at, created_at, updated_at, banned, "
    "previous_cert_serial "
    "FROM attested_nodes WHERE spiffe_id = ?1",
    "SELECT node_id, selector FROM attested_node_selectors WHERE node_id = ?1 ORDER BY selector",
};

absl::StatusOr<std::vector<AttestedNode>> LoadNodes(sqlite3* db, const NodeQueries& queries,
                                                    std::optional<std::string_view> arg) {
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginRead(db));
  std::vector<AttestedNode> nodes;
  {
    ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, queries.nodes));
    if (arg.has_value()) RETURN_IF_ERROR(stmt.BindText(1, *arg));
    while (true) {
      ASSIGN_OR_RETURN(bool has_row, stmt.Step());
      if (!has_row) break;
      AttestedNode& node = nodes.emplace_back();
      node.spiffe_id = stmt.ColumnText(0);
      node.attestor = stmt.ColumnText(1);
      node.cert_serial = stmt.ColumnText(2);
      node.cert_expires_at = stmt.ColumnInt64(3);
      node.created_at = stmt.ColumnInt64(4);
      node.updated_at = stmt.ColumnInt64(5);
      node.banned = stmt.ColumnInt64(6) != 0;
      node.previous_cert_serial = stmt.ColumnText(7);
    }
  }
  if (nodes.empty()) return nodes;
  std::map<std::string, AttestedNode*, std::less<>> by_id;
  for (AttestedNode& node : nodes) by_id.emplace(node.spiffe_id, &node);
  RETURN_IF_ERROR(LoadSetRows(db, queries.selectors, arg, by_id, &AttestedNode::selectors));
  RETURN_IF_ERROR(txn.Commit());
  return nodes;
}

// ---- Tasks ----

// The list without its later duplicates, in the order given: task scopes and audiences are
// ordered (the order the agent asked for), unlike entry scope sets.
std::vector<std::string> DedupeKeepingOrder(const std::vector<std::string>& values) {
  std::vector<std::string> unique;
  unique.reserve(values.size());
  for (const std::string& value : values) {
    if (std::find(unique.begin(), unique.end(), value) == unique.end()) unique.push_back(value);
  }
  return unique;
}

// Inserts (task_id, position, element) rows with "INSERT ... VALUES (?1, ?2, ?3)".
absl::Status InsertListRows(sqlite3* db, std::string_view sql, std::string_view task_id,
                            const std::vector<std::string>& elements) {
  if (elements.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, sql));
  for (size_t position = 0; position < elements.size(); ++position) {
    stmt.Reset();
    RETURN_IF_ERROR(stmt.BindText(1, task_id));
    RETURN_IF_ERROR(stmt.BindInt64(2, static_cast<int64_t>(position)));
    RETURN_IF_ERROR(stmt.BindText(3, elements[position]));
    RETURN_IF_ERROR(stmt.Run());
  }
  return absl::OkStatus();
}

#define MANDATE_TASK_COLUMNS                                                                   \
  "SELECT id, spiffe_id, purpose, status, created_at, expires_at, ended_at, approval_id FROM " \
  "tasks "

constexpr std::string_view kTaskById = MANDATE_TASK_COLUMNS "WHERE id = ?1";
constexpr std::string_view kAllTasks = MANDATE_TASK_COLUMNS "ORDER BY created_at, id";
constexpr std::string_view kAllActiveTasks =
    MANDATE_TASK_COLUMNS "WHERE status = 'active' ORDER BY created_at, id";
constexpr std::string_view kTasksOfSpiffeId =
    MANDATE_TASK_COLUMNS "WHERE spiffe_id = ?1 ORDER BY created_at, id";
constexpr std::string_view kActiveTasksOfSpiffeId =
    MANDATE_TASK_COLUMNS "WHERE spiffe_id = ?1 AND status = 'active' ORDER BY created_at, id";

#undef MANDATE_TASK_COLUMNS

// Loads the tasks `tasks_sql` selects (binding `arg` as ?1 when given) with their scopes and
// audiences. The caller holds a transaction, so the rows are one consistent snapshot.
absl::StatusOr<std::vector<Task>> LoadTasksInTransaction(sqlite3* db, std::string_view tasks_sql,
                                                         std::optional<std::string_view> arg) {
  std::vector<Task> tasks;
  {
    ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, tasks_sql));
    if (arg.has_value()) RETURN_IF_ERROR(stmt.BindText(1, *arg));
    while (true) {
      ASSIGN_OR_RETURN(bool has_row, stmt.Step());
      if (!has_row) break;
      Task& task = tasks.emplace_back();
      task.id = stmt.ColumnText(0);
      task.spiffe_id = stmt.ColumnText(1);
      task.purpose = stmt.ColumnText(2);
      task.status = stmt.ColumnText(3);
      task.created_at = stmt.ColumnInt64(4);
      task.expires_at = stmt.ColumnInt64(5);
      task.ended_at = stmt.ColumnInt64(6);
      task.approval_id = stmt.ColumnText(7);
    }
  }
  if (tasks.empty()) return tasks;
  // One primary-key range scan per task and list; the statements are prepared once.
  ASSIGN_OR_RETURN(
      Statement scopes,
      Statement::Prepare(db, "SELECT scope FROM task_scopes WHERE task_id = ?1 ORDER BY position"));
  ASSIGN_OR_RETURN(Statement audiences,
                   Statement::Prepare(db,
                                      "SELECT audience FROM task_audiences WHERE task_id = ?1 "
                                      "ORDER BY position"));
  auto load_list = [](Statement& stmt, std::string_view task_id,
                      std::vector<std::string>& list) -> absl::Status {
    stmt.Reset();
    RETURN_IF_ERROR(stmt.BindText(1, task_id));
    while (true) {
      ASSIGN_OR_RETURN(bool has_row, stmt.Step());
      if (!has_row) return absl::OkStatus();
      list.push_back(stmt.ColumnText(0));
    }
  };
  for (Task& task : tasks) {
    RETURN_IF_ERROR(load_list(scopes, task.id, task.scopes));
    RETURN_IF_ERROR(load_list(audiences, task.id, task.audiences));
  }
  return tasks;
}

absl::StatusOr<std::vector<Task>> LoadTasks(sqlite3* db, std::string_view tasks_sql,
                                            std::optional<std::string_view> arg) {
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginRead(db));
  ASSIGN_OR_RETURN(std::vector<Task> tasks, LoadTasksInTransaction(db, tasks_sql, arg));
  RETURN_IF_ERROR(txn.Commit());
  return tasks;
}

absl::Status TaskNotFound(std::string_view id) {
  return absl::NotFoundError(absl::StrCat("task '", AbslView(id), "' not found"));
}

// The field checks CreateTask and CreateTaskAwaitingApproval share.
absl::Status CheckTaskFields(const Task& task) {
  if (task.id.empty()) return absl::InvalidArgumentError("task id is empty");
  if (task.spiffe_id.empty()) return absl::InvalidArgumentError("task SPIFFE ID is empty");
  if (task.status.empty()) return absl::InvalidArgumentError("task status is empty");
  RETURN_IF_ERROR(CheckNoEmptyElement(task.scopes, "scope in task"));
  return CheckNoEmptyElement(task.audiences, "audience in task");
}

// Inserts the task row and its lists; the caller holds a write transaction.
absl::Status InsertTaskInTransaction(sqlite3* db, const Task& task) {
  {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db,
                                        "INSERT INTO tasks (id, spiffe_id, purpose, status, "
                                        "created_at, expires_at, ended_at, approval_id) "
                                        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"));
    RETURN_IF_ERROR(stmt.BindText(1, task.id));
    RETURN_IF_ERROR(stmt.BindText(2, task.spiffe_id));
    RETURN_IF_ERROR(stmt.BindText(3, task.purpose));
    RETURN_IF_ERROR(stmt.BindText(4, task.status));
    RETURN_IF_ERROR(stmt.BindInt64(5, task.created_at));
    RETURN_IF_ERROR(stmt.BindInt64(6, task.expires_at));
    RETURN_IF_ERROR(stmt.BindInt64(7, task.ended_at));
    RETURN_IF_ERROR(stmt.BindText(8, task.approval_id));
    absl::Status status = stmt.Run();
    if (absl::IsAlreadyExists(status)) {
      return absl::AlreadyExistsError(absl::StrCat("task '", task.id, "' already exists"));
    }
    RETURN_IF_ERROR(status);
  }
  RETURN_IF_ERROR(
      InsertListRows(db, "INSERT INTO task_scopes (task_id, position, scope) VALUES (?1, ?2, ?3)",
                     task.id, DedupeKeepingOrder(task.scopes)));
  return InsertListRows(
      db, "INSERT INTO task_audiences (task_id, position, audience) VALUES (?1, ?2, ?3)", task.id,
      DedupeKeepingOrder(task.audiences));
}

// ---- Opening ----

// Creates `path` with mode 0600 if it does not exist, so SQLite never creates it with the
// umask's default; tightens an existing file that group or others could read.
absl::Status PrepareDatabaseFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd >= 0) {
    // The umask may have removed bits we need; set exactly 0600.
    int rc = ::fchmod(fd, 0600);
    int saved_errno = errno;
    ::close(fd);
    if (rc != 0) {
      return absl::InternalError(absl::StrCat("cannot set mode 0600 on store file '", path,
                                              "': ", std::strerror(saved_errno)));
    }
    return absl::OkStatus();
  }
  if (errno != EEXIST) {
    int saved_errno = errno;
    std::string message =
        absl::StrCat("cannot create store file '", path, "': ", std::strerror(saved_errno));
    if (saved_errno == EACCES || saved_errno == EPERM) {
      return absl::PermissionDeniedError(message);
    }
    return absl::FailedPreconditionError(message);
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot stat store file '", path, "': ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("store path '", path, "' exists but is not a regular file"));
  }
  if ((st.st_mode & 077) != 0 && ::chmod(path.c_str(), st.st_mode & 0700) != 0) {
    return absl::PermissionDeniedError(
        absl::StrCat("store file '", path,
                     "' is accessible by group or others and its mode "
                     "cannot be tightened to owner-only: ",
                     std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status ConfigureConnection(sqlite3* db, const std::string& path,
                                 const SqliteStoreOptions& options) {
  sqlite3_extended_result_codes(db, 1);
  sqlite3_busy_timeout(db, options.busy_timeout_ms);
  // The first statement reads the file header, so a non-database file fails here.
  {
    ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, "PRAGMA journal_mode=WAL"));
    absl::StatusOr<bool> has_row = stmt.Step();
    if (!has_row.ok()) {
      return absl::Status(has_row.status().code(),
                          absl::StrCat("opening store '", path, "': ", has_row.status().message()));
    }
    std::string mode = *has_row ? absl::AsciiStrToLower(stmt.ColumnText(0)) : "";
    if (mode != "wal") {
      return absl::FailedPreconditionError(
          absl::StrCat("store '", path, "' cannot use WAL journal mode (got '", mode,
                       "'); put the data dir on a local filesystem"));
    }
  }
  // FULL: in WAL mode NORMAL may lose the last commits on power loss; we acknowledge nothing
  // that is not on disk.
  RETURN_IF_ERROR(ExecConstantSql(db, "PRAGMA synchronous=FULL", "setting synchronous=FULL"));
  RETURN_IF_ERROR(ExecConstantSql(db, "PRAGMA foreign_keys=ON", "enabling foreign keys"));
  ASSIGN_OR_RETURN(int64_t foreign_keys, QuerySingleInt(db, "PRAGMA foreign_keys"));
  if (foreign_keys != 1) {
    return absl::FailedPreconditionError("this SQLite build cannot enforce foreign keys");
  }
  ASSIGN_OR_RETURN(int64_t application_id, QuerySingleInt(db, "PRAGMA application_id"));
  if (application_id != 0 && application_id != SqliteStore::kApplicationId) {
    return absl::FailedPreconditionError(
        absl::StrFormat("'%s' is a SQLite database of another application (application_id "
                        "0x%08x), not a Mandate store",
                        path, static_cast<uint32_t>(application_id)));
  }
  return absl::OkStatus();
}

absl::Status CheckMigrationList(std::span<const SqliteMigration> migrations) {
  for (size_t i = 0; i < migrations.size(); ++i) {
    if (migrations[i].version != static_cast<int>(i + 1)) {
      return absl::InternalError(absl::StrCat("schema migration #", i, " has version ",
                                              migrations[i].version, "; expected ", i + 1));
    }
  }
  return absl::OkStatus();
}

// Applies the missing migrations, one transaction each. The version is re-read inside each
// transaction, so two processes opening the same new file cannot both apply a step.
absl::Status Migrate(sqlite3* db, const std::string& path,
                     std::span<const SqliteMigration> migrations) {
  RETURN_IF_ERROR(CheckMigrationList(migrations));
  const int latest = static_cast<int>(migrations.size());
  while (true) {
    ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db));
    ASSIGN_OR_RETURN(int64_t version, QuerySingleInt(db, "PRAGMA user_version"));
    if (version != 0) {
      ASSIGN_OR_RETURN(int64_t application_id, QuerySingleInt(db, "PRAGMA application_id"));
      if (application_id != SqliteStore::kApplicationId) {
        return absl::FailedPreconditionError(absl::StrCat(
            "'", path, "' has a schema version but no Mandate application_id; it is not a ",
            "Mandate store"));
      }
    }
    if (version > latest) {
      return absl::FailedPreconditionError(absl::StrCat(
          "store '", path, "' has schema version ", version, ", newer than the newest this build ",
          "knows (", latest, "); it was written by a newer mandate-broker - run that version or ",
          "restore a backup made before the upgrade"));
    }
    if (version < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("store '", path, "' has invalid schema version ", version));
    }
    if (version == latest) return txn.Commit();
    const SqliteMigration& step = migrations[version];
    if (version == 0) {
      // Never graft our schema onto someone else's database.
      ASSIGN_OR_RETURN(int64_t objects, QuerySingleInt(db, "SELECT count(*) FROM sqlite_schema"));
      if (objects != 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("'", path, "' holds tables but no Mandate schema version; it is not a ",
                         "Mandate store"));
      }
      RETURN_IF_ERROR(ExecConstantSql(db,
                                      "CREATE TABLE schema_migrations ("
                                      " version INTEGER PRIMARY KEY NOT NULL,"
                                      " name TEXT NOT NULL,"
                                      " applied_at INTEGER NOT NULL) STRICT",
                                      "creating schema_migrations"));
      // The id is a constant of this code, not data.
      RETURN_IF_ERROR(
          ExecConstantSql(db, absl::StrCat("PRAGMA application_id = ", SqliteStore::kApplicationId),
                          "setting application_id"));
    }
    RETURN_IF_ERROR(ExecConstantSql(
        db, step.sql,
        absl::StrCat("applying schema migration ", step.version, " (", AbslView(step.name), ")")));
    {
      ASSIGN_OR_RETURN(
          Statement record,
          Statement::Prepare(db,
                             "INSERT INTO schema_migrations (version, name, applied_at)"
                             " VALUES (?1, ?2, CAST(strftime('%s', 'now') AS INTEGER))"));
      RETURN_IF_ERROR(record.BindInt64(1, step.version));
      RETURN_IF_ERROR(record.BindText(2, step.name));
      RETURN_IF_ERROR(record.Run());
    }
    // PRAGMA takes no bound parameters; the version is a constant of this code, not data.
    RETURN_IF_ERROR(ExecConstantSql(db, absl::StrCat("PRAGMA user_version = ", step.version),
                                    "recording the schema version"));
    RETURN_IF_ERROR(txn.Commit());
  }
}

}  // namespace

// ---- SqliteStore ----

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::Open(const std::string& path,
                                                               const SqliteStoreOptions& options) {
  return OpenWithMigrationsForTesting(path, SqliteSchemaMigrations(), options);
}

absl::StatusOr<std::unique_ptr<SqliteStore>> SqliteStore::OpenWithMigrationsForTesting(
    const std::string& path, std::span<const SqliteMigration> migrations,
    const SqliteStoreOptions& options) {
  if (path.empty()) return absl::InvalidArgumentError("store path is empty");
  if (sqlite3_threadsafe() == 0) {
    // Multi-thread mode below relies on SQLite's own global locks.
    return absl::FailedPreconditionError(
        "the linked SQLite library was built without thread "
        "safety (SQLITE_THREADSAFE=0)");
  }
  RETURN_IF_ERROR(PrepareDatabaseFile(path));
  sqlite3* db = nullptr;
  // No SQLITE_OPEN_CREATE: PrepareDatabaseFile created the file with the right mode. Multi-thread
  // mode (NOMUTEX) because our own mutex serialises all use of the connection.
  int rc = sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    absl::Status status = SqliteError(db, rc, absl::StrCat("opening store '", path, "'"));
    sqlite3_close_v2(db);
    return status;
  }
  // Owns `db` from here on, so every early return closes it.
  std::unique_ptr<SqliteStore> store(new SqliteStore(db));
  RETURN_IF_ERROR(ConfigureConnection(db, path, options));
  RETURN_IF_ERROR(Migrate(db, path, migrations));
  rc = sqlite3_open_v2(path.c_str(), &store->audit_db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                       nullptr);
  if (rc != SQLITE_OK) {
    return SqliteError(store->audit_db_, rc, absl::StrCat("opening store '", path, "' for audit"));
  }
  RETURN_IF_ERROR(ConfigureConnection(store->audit_db_, path, options));
  return store;
}

int SqliteStore::LatestSchemaVersion() { return static_cast<int>(SqliteSchemaMigrations().size()); }

SqliteStore::~SqliteStore() {
  StatementCache::Get().FinalizeAll(db_);
  sqlite3_close_v2(db_);
  if (audit_db_ != nullptr) {
    StatementCache::Get().FinalizeAll(audit_db_);
    sqlite3_close_v2(audit_db_);
  }
}

absl::StatusOr<RegistrationEntry> SqliteStore::CreateEntry(RegistrationEntry entry) {
  std::vector<RegistrationEntry> one;
  one.push_back(std::move(entry));
  ASSIGN_OR_RETURN(std::vector<RegistrationEntry> stored, CreateEntries(std::move(one)));
  return std::move(stored.front());
}

absl::StatusOr<std::vector<RegistrationEntry>> SqliteStore::CreateEntries(
    std::vector<RegistrationEntry> entries) {
  if (entries.empty()) return entries;
  for (RegistrationEntry& entry : entries) {
    RETURN_IF_ERROR(CanonicalizeEntry(entry));
  }
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  for (RegistrationEntry& entry : entries) {
    RETURN_IF_ERROR(InsertEntryLocked(entry));
  }
  RETURN_IF_ERROR(txn.Commit());
  return entries;
}

// Checks what needs no database and puts selectors and scopes in canonical order.
absl::Status SqliteStore::CanonicalizeEntry(RegistrationEntry& entry) {
  if (entry.id.empty()) return absl::InvalidArgumentError("registration entry id is empty");
  if (entry.spiffe_id.empty()) {
    return absl::InvalidArgumentError("registration entry SPIFFE ID is empty");
  }
  if (entry.parent_id.empty()) {
    return absl::InvalidArgumentError("registration entry parent ID is empty");
  }
  RETURN_IF_ERROR(CheckNoEmptyElement(entry.selectors, "selector in registration entry"));
  RETURN_IF_ERROR(CheckNoEmptyElement(entry.scopes, "scope in registration entry"));
  entry.selectors = CanonicalSet(std::move(entry.selectors));
  entry.scopes = CanonicalSet(std::move(entry.scopes));
  return absl::OkStatus();
}

// Inserts one canonical entry inside the caller's write transaction.
absl::Status SqliteStore::InsertEntryLocked(RegistrationEntry& entry) {
  const std::string selector_set_key = SelectorSetKey(entry.selectors);
  {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db_, "SELECT 1 FROM registration_entries WHERE id = ?1"));
    RETURN_IF_ERROR(stmt.BindText(1, entry.id));
    ASSIGN_OR_RETURN(bool exists, stmt.Step());
    if (exists) {
      return absl::AlreadyExistsError(
          absl::StrCat("registration entry '", entry.id, "' already exists"));
    }
  }
  {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db_,
                                        "SELECT id FROM registration_entries WHERE spiffe_id = ?1 "
                                        "AND parent_id = ?2 AND selector_set_key = ?3"));
    RETURN_IF_ERROR(stmt.BindText(1, entry.spiffe_id));
    RETURN_IF_ERROR(stmt.BindText(2, entry.parent_id));
    RETURN_IF_ERROR(stmt.BindText(3, selector_set_key));
    ASSIGN_OR_RETURN(bool exists, stmt.Step());
    if (exists) {
      return absl::AlreadyExistsError(absl::StrCat(
          "registration entry '", stmt.ColumnText(0), "' already has SPIFFE ID '", entry.spiffe_id,
          "', parent ID '", entry.parent_id, "' and the same selectors"));
    }
  }
  ASSIGN_OR_RETURN(entry.revision, BumpCounter(db_, kEntriesRevisionCounter));
  {
    ASSIGN_OR_RETURN(
        Statement stmt,
        Statement::Prepare(db_,
                           "INSERT INTO registration_entries (id, spiffe_id, parent_id, "
                           "selector_set_key, x509_ttl_s, jwt_ttl_s, token_ttl_s, created_at, "
                           "revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"));
    RETURN_IF_ERROR(stmt.BindText(1, entry.id));
    RETURN_IF_ERROR(stmt.BindText(2, entry.spiffe_id));
    RETURN_IF_ERROR(stmt.BindText(3, entry.parent_id));
    RETURN_IF_ERROR(stmt.BindText(4, selector_set_key));
    RETURN_IF_ERROR(stmt.BindInt64(5, entry.x509_ttl_s));
    RETURN_IF_ERROR(stmt.BindInt64(6, entry.jwt_ttl_s));
    RETURN_IF_ERROR(stmt.BindInt64(7, entry.token_ttl_s));
    RETURN_IF_ERROR(stmt.BindInt64(8, entry.created_at));
    RETURN_IF_ERROR(stmt.BindInt64(9, entry.revision));
    RETURN_IF_ERROR(stmt.Run());
  }
  RETURN_IF_ERROR(InsertSetRows(
      db_, "INSERT INTO registration_entry_selectors (entry_id, selector) VALUES (?1, ?2)",
      entry.id, entry.selectors));
  RETURN_IF_ERROR(
      InsertSetRows(db_, "INSERT INTO registration_entry_scopes (entry_id, scope) VALUES (?1, ?2)",
                    entry.id, entry.scopes));
  return absl::OkStatus();
}

absl::StatusOr<RegistrationEntry> SqliteStore::GetEntry(std::string_view id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(std::vector<RegistrationEntry> entries, LoadEntries(db_, kEntryById, id));
  if (entries.empty()) {
    return absl::NotFoundError(absl::StrCat("registration entry '", AbslView(id), "' not found"));
  }
  return std::move(entries.front());
}

absl::StatusOr<std::vector<RegistrationEntry>> SqliteStore::ListEntries() {
  absl::MutexLock lock(&mu_);
  return LoadEntries(db_, kAllEntries, std::nullopt);
}

absl::StatusOr<std::vector<RegistrationEntry>> SqliteStore::ListEntriesByParent(
    std::string_view parent_id) {
  absl::MutexLock lock(&mu_);
  return LoadEntries(db_, kEntriesByParent, parent_id);
}

absl::Status SqliteStore::DeleteEntry(std::string_view id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  {
    // Selector and scope rows go with it (ON DELETE CASCADE).
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db_, "DELETE FROM registration_entries WHERE id = ?1"));
    RETURN_IF_ERROR(stmt.BindText(1, id));
    RETURN_IF_ERROR(stmt.Run());
  }
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("registration entry '", AbslView(id), "' not found"));
  }
  RETURN_IF_ERROR(BumpCounter(db_, kEntriesRevisionCounter).status());
  return txn.Commit();
}

absl::StatusOr<int64_t> SqliteStore::EntriesRevision() {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_, "SELECT value FROM store_counters WHERE name = ?1"));
  RETURN_IF_ERROR(stmt.BindText(1, kEntriesRevisionCounter));
  ASSIGN_OR_RETURN(bool has_row, stmt.Step());
  if (!has_row) return absl::InternalError("store counter 'entries_revision' is missing");
  return stmt.ColumnInt64(0);
}

absl::Status SqliteStore::CreateJoinToken(const JoinToken& token) {
  ASSIGN_OR_RETURN(std::string token_hash, NormalizeTokenHash(token.token_hash));
  if (token.node_spiffe_id.empty()) {
    return absl::InvalidArgumentError("join token node SPIFFE ID is empty");
  }
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_,
                                      "INSERT INTO join_tokens (token_hash, node_spiffe_id, "
                                      "created_at, expires_at) VALUES (?1, ?2, ?3, ?4)"));
  RETURN_IF_ERROR(stmt.BindText(1, token_hash));
  RETURN_IF_ERROR(stmt.BindText(2, token.node_spiffe_id));
  RETURN_IF_ERROR(stmt.BindInt64(3, token.created_at));
  RETURN_IF_ERROR(stmt.BindInt64(4, token.expires_at));
  absl::Status status = stmt.Run();
  if (absl::IsAlreadyExists(status)) {
    // The hash is not secret, but it identifies a live credential: keep it out of messages.
    return absl::AlreadyExistsError("a join token with this hash already exists");
  }
  return status;
}

absl::StatusOr<JoinToken> SqliteStore::ConsumeJoinToken(std::string_view token_hash, int64_t now) {
  JoinToken token;
  ASSIGN_OR_RETURN(token.token_hash, NormalizeTokenHash(token_hash));
  absl::MutexLock lock(&mu_);
  // One DELETE ... RETURNING: the row is gone the moment anyone reads it, so two concurrent
  // consumers (threads or processes) cannot both succeed.
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_,
                                      "DELETE FROM join_tokens WHERE token_hash = ?1 "
                                      "RETURNING node_spiffe_id, created_at, expires_at"));
  RETURN_IF_ERROR(stmt.BindText(1, token.token_hash));
  ASSIGN_OR_RETURN(bool found, stmt.Step());
  if (!found) return absl::NotFoundError("join token not found or already used");
  token.node_spiffe_id = stmt.ColumnText(0);
  token.created_at = stmt.ColumnInt64(1);
  token.expires_at = stmt.ColumnInt64(2);
  // The statement runs in autocommit mode: the deletion is durable once it completes.
  RETURN_IF_ERROR(stmt.Run());
  if (token.expires_at <= now) return absl::FailedPreconditionError("join token expired");
  return token;
}

absl::Status SqliteStore::PruneExpiredJoinTokens(int64_t now) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_, "DELETE FROM join_tokens WHERE expires_at <= ?1"));
  RETURN_IF_ERROR(stmt.BindInt64(1, now));
  return stmt.Run();
}

absl::Status SqliteStore::UpsertNode(const AttestedNode& node) {
  if (node.spiffe_id.empty()) return absl::InvalidArgumentError("node SPIFFE ID is empty");
  RETURN_IF_ERROR(CheckNoEmptyElement(node.selectors, "selector in attested node"));
  const std::vector<std::string> selectors = CanonicalSet(node.selectors);

  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  {
    ASSIGN_OR_RETURN(
        Statement stmt,
        Statement::Prepare(
            db_,
            "INSERT INTO attested_nodes (spiffe_id, attestor, cert_serial, cert_expires_at, "
            "created_at, updated_at, banned, previous_cert_serial) "
            "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) "
            "ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, "
            "cert_serial = excluded.cert_serial, cert_expires_at = excluded.cert_expires_at, "
            "updated_at = excluded.updated_at, "
            "previous_cert_serial = excluded.previous_cert_serial"));
    RETURN_IF_ERROR(stmt.BindText(1, node.spiffe_id));
    RETURN_IF_ERROR(stmt.BindText(2, node.attestor));
    RETURN_IF_ERROR(stmt.BindText(3, node.cert_serial));
    RETURN_IF_ERROR(stmt.BindInt64(4, node.cert_expires_at));
    RETURN_IF_ERROR(stmt.BindInt64(5, node.created_at));
    RETURN_IF_ERROR(stmt.BindInt64(6, node.updated_at));
    RETURN_IF_ERROR(stmt.BindInt64(7, node.banned ? 1 : 0));
    RETURN_IF_ERROR(stmt.BindText(8, node.previous_cert_serial));
    RETURN_IF_ERROR(stmt.Run());
  }
  {
    ASSIGN_OR_RETURN(
        Statement stmt,
        Statement::Prepare(db_, "DELETE FROM attested_node_selectors WHERE node_id = ?1"));
    RETURN_IF_ERROR(stmt.BindText(1, node.spiffe_id));
    RETURN_IF_ERROR(stmt.Run());
  }
  RETURN_IF_ERROR(
      InsertSetRows(db_, "INSERT INTO attested_node_selectors (node_id, selector) VALUES (?1, ?2)",
                    node.spiffe_id, selectors));
  return txn.Commit();
}

absl::StatusOr<AttestedNode> SqliteStore::GetNode(std::string_view spiffe_id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(std::vector<AttestedNode> nodes, LoadNodes(db_, kNodeById, spiffe_id));
  if (nodes.empty())
    return absl::NotFoundError(absl::StrCat("node '", AbslView(spiffe_id), "' not found"));
  return std::move(nodes.front());
}

absl::StatusOr<std::vector<AttestedNode>> SqliteStore::ListNodes() {
  absl::MutexLock lock(&mu_);
  return LoadNodes(db_, kAllNodes, std::nullopt);
}

absl::Status SqliteStore::DeleteNode(std::string_view spiffe_id) {
  absl::MutexLock lock(&mu_);
  // Selector rows go with it (ON DELETE CASCADE), in the statement's own transaction.
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_, "DELETE FROM attested_nodes WHERE spiffe_id = ?1"));
  RETURN_IF_ERROR(stmt.BindText(1, spiffe_id));
  RETURN_IF_ERROR(stmt.Run());
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("node '", AbslView(spiffe_id), "' not found"));
  }
  return absl::OkStatus();
}

absl::Status SqliteStore::SetNodeBanned(std::string_view spiffe_id, bool banned) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(
      Statement stmt,
      Statement::Prepare(db_, "UPDATE attested_nodes SET banned = ?2 WHERE spiffe_id = ?1"));
  RETURN_IF_ERROR(stmt.BindText(1, spiffe_id));
  RETURN_IF_ERROR(stmt.BindInt64(2, banned ? 1 : 0));
  RETURN_IF_ERROR(stmt.Run());
  if (sqlite3_changes(db_) == 0) {
    return absl::NotFoundError(absl::StrCat("node '", AbslView(spiffe_id), "' not found"));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> SqliteStore::IsNodeBanned(std::string_view spiffe_id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(
      Statement stmt,
      Statement::Prepare(db_, "SELECT banned FROM attested_nodes WHERE spiffe_id = ?1"));
  RETURN_IF_ERROR(stmt.BindText(1, spiffe_id));
  ASSIGN_OR_RETURN(bool found, stmt.Step());
  return found && stmt.ColumnInt64(0) != 0;
}

absl::Status SqliteStore::ConfirmNodeCertSerial(std::string_view spiffe_id,
                                                std::string_view cert_serial) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_,
                                      "UPDATE attested_nodes SET previous_cert_serial = '' "
                                      "WHERE spiffe_id = ?1 AND cert_serial = ?2"));
  RETURN_IF_ERROR(stmt.BindText(1, spiffe_id));
  RETURN_IF_ERROR(stmt.BindText(2, cert_serial));
  return stmt.Run();
}

absl::Status SqliteStore::AdvanceTpmCounters(std::string_view ek_hash,
                                             const TpmCounters& counters) {
  if (ek_hash.empty()) return absl::InvalidArgumentError("EK hash is empty");
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db_,
                                        "SELECT reset_count, restart_count FROM tpm_counters "
                                        "WHERE ek_hash = ?1"));
    RETURN_IF_ERROR(stmt.BindText(1, ek_hash));
    ASSIGN_OR_RETURN(bool found, stmt.Step());
    if (found) {
      TpmCounters stored{stmt.ColumnInt64(0), stmt.ColumnInt64(1)};
      if (std::pair(counters.reset_count, counters.restart_count) <
          std::pair(stored.reset_count, stored.restart_count)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "TPM counters went backwards (resetCount/restartCount ", counters.reset_count, "/",
            counters.restart_count, " after ", stored.reset_count, "/", stored.restart_count,
            "): replayed quote or rolled-back TPM"));
      }
    }
  }
  {
    ASSIGN_OR_RETURN(
        Statement stmt,
        Statement::Prepare(db_,
                           "INSERT INTO tpm_counters (ek_hash, reset_count, restart_count) "
                           "VALUES (?1, ?2, ?3) ON CONFLICT (ek_hash) DO UPDATE SET "
                           "reset_count = excluded.reset_count, "
                           "restart_count = excluded.restart_count"));
    RETURN_IF_ERROR(stmt.BindText(1, ek_hash));
    RETURN_IF_ERROR(stmt.BindInt64(2, counters.reset_count));
    RETURN_IF_ERROR(stmt.BindInt64(3, counters.restart_count));
    RETURN_IF_ERROR(stmt.Run());
  }
  return txn.Commit();
}

absl::Status SqliteStore::ResetTpmCounters(std::string_view ek_hash) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_, "DELETE FROM tpm_counters WHERE ek_hash = ?1"));
  RETURN_IF_ERROR(stmt.BindText(1, ek_hash));
  return stmt.Run();
}

absl::Status SqliteStore::CreateTask(const Task& task) {
  RETURN_IF_ERROR(CheckTaskFields(task));
  if (!task.approval_id.empty() || task.status == kTaskPendingApproval) {
    return absl::InvalidArgumentError(
        "a task awaiting approval is stored with CreateTaskAwaitingApproval");
  }
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  RETURN_IF_ERROR(InsertTaskInTransaction(db_, task));
  return txn.Commit();
}

absl::StatusOr<Task> SqliteStore::GetTask(std::string_view id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(std::vector<Task> tasks, LoadTasks(db_, kTaskById, id));
  if (tasks.empty()) return TaskNotFound(id);
  return std::move(tasks.front());
}

absl::StatusOr<Task> SqliteStore::EndTask(std::string_view id, int64_t now) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  {
    // The status test is part of the UPDATE, so of two concurrent enders (threads or
    // processes) exactly one succeeds.
    ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db_,
                                                        "UPDATE tasks SET status = 'ended', "
                                                        "ended_at = ?2 WHERE id = ?1 "
                                                        "AND status = 'active'"));
    RETURN_IF_ERROR(stmt.BindText(1, id));
    RETURN_IF_ERROR(stmt.BindInt64(2, now));
    RETURN_IF_ERROR(stmt.Run());
  }
  const bool ended_now = sqlite3_changes(db_) != 0;
  ASSIGN_OR_RETURN(std::vector<Task> tasks, LoadTasksInTransaction(db_, kTaskById, id));
  if (tasks.empty()) return TaskNotFound(id);
  if (!ended_now) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", AbslView(id), "' is not active (status '", tasks.front().status, "')"));
  }
  RETURN_IF_ERROR(txn.Commit());
  return std::move(tasks.front());
}

absl::StatusOr<std::vector<Task>> SqliteStore::ListTasks(std::string_view spiffe_id,
                                                         bool active_only) {
  absl::MutexLock lock(&mu_);
  if (spiffe_id.empty()) {
    return LoadTasks(db_, active_only ? kAllActiveTasks : kAllTasks, std::nullopt);
  }
  return LoadTasks(db_, active_only ? kActiveTasksOfSpiffeId : kTasksOfSpiffeId, spiffe_id);
}

// ---- Approvals ----

namespace {

#define MANDATE_APPROVAL_COLUMNS                                                                \
  "SELECT id, task_id, spiffe_id, input_document, status, created_at, expires_at, decided_at, " \
  "decided_by, reason FROM approvals "

constexpr std::string_view kApprovalById = MANDATE_APPROVAL_COLUMNS "WHERE id = ?1";
constexpr std::string_view kAllApprovals = MANDATE_APPROVAL_COLUMNS "ORDER BY created_at, id";
constexpr std::string_view kApprovalsByStatus =
    MANDATE_APPROVAL_COLUMNS "WHERE status = ?1 ORDER BY created_at, id";

#undef MANDATE_APPROVAL_COLUMNS

Approval ReadApproval(const Statement& stmt) {
  Approval a;
  a.id = stmt.ColumnText(0);
  a.task_id = stmt.ColumnText(1);
  a.spiffe_id = stmt.ColumnText(2);
  a.input_document = stmt.ColumnText(3);
  a.status = stmt.ColumnText(4);
  a.created_at = stmt.ColumnInt64(5);
  a.expires_at = stmt.ColumnInt64(6);
  a.decided_at = stmt.ColumnInt64(7);
  a.decided_by = stmt.ColumnText(8);
  a.reason = stmt.ColumnText(9);
  return a;
}

absl::StatusOr<std::vector<Approval>> LoadApprovals(sqlite3* db, std::string_view sql,
                                                    std::optional<std::string_view> arg) {
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db, sql));
  if (arg.has_value()) RETURN_IF_ERROR(stmt.BindText(1, *arg));
  std::vector<Approval> out;
  while (true) {
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) return out;
    out.push_back(ReadApproval(stmt));
  }
}

absl::Status ApprovalNotFound(std::string_view id) {
  return absl::NotFoundError(absl::StrCat("approval '", AbslView(id), "' not found"));
}

// Moves task `task_id` out of "pending_approval" (and only out of it) to `status` with deadline
// `expires_at`; FailedPrecondition when the task is not awaiting `approval_id`. The caller holds
// a write transaction and rolls it back on error.
absl::Status SettlePendingTask(sqlite3* db, std::string_view task_id, std::string_view approval_id,
                               std::string_view status, int64_t expires_at) {
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db,
                                                      "UPDATE tasks SET status = ?3, "
                                                      "expires_at = ?4 WHERE id = ?1 "
                                                      "AND approval_id = ?2 "
                                                      "AND status = 'pending_approval'"));
  RETURN_IF_ERROR(stmt.BindText(1, task_id));
  RETURN_IF_ERROR(stmt.BindText(2, approval_id));
  RETURN_IF_ERROR(stmt.BindText(3, status));
  RETURN_IF_ERROR(stmt.BindInt64(4, expires_at));
  RETURN_IF_ERROR(stmt.Run());
  if (sqlite3_changes(db) == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task '", AbslView(task_id), "' is no longer awaiting approval ", AbslView(approval_id)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SqliteStore::CreateTaskAwaitingApproval(const Task& task, const Approval& approval) {
  RETURN_IF_ERROR(CheckTaskFields(task));
  RETURN_IF_ERROR(ValidateNewApproval(task, approval));
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  RETURN_IF_ERROR(InsertTaskInTransaction(db_, task));
  {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db_,
                                        "INSERT INTO approvals (id, task_id, spiffe_id, "
                                        "input_document, status, created_at, expires_at, "
                                        "decided_at, decided_by, reason) "
                                        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, '', '')"));
    RETURN_IF_ERROR(stmt.BindText(1, approval.id));
    RETURN_IF_ERROR(stmt.BindText(2, approval.task_id));
    RETURN_IF_ERROR(stmt.BindText(3, approval.spiffe_id));
    RETURN_IF_ERROR(stmt.BindText(4, approval.input_document));
    RETURN_IF_ERROR(stmt.BindText(5, approval.status));
    RETURN_IF_ERROR(stmt.BindInt64(6, approval.created_at));
    RETURN_IF_ERROR(stmt.BindInt64(7, approval.expires_at));
    absl::Status status = stmt.Run();
    if (absl::IsAlreadyExists(status)) {
      return absl::AlreadyExistsError(absl::StrCat("approval '", approval.id, "' already exists"));
    }
    RETURN_IF_ERROR(status);
  }
  return txn.Commit();
}

absl::StatusOr<DecidedApproval> SqliteStore::DecideApproval(std::string_view id, bool approve,
                                                            std::string_view decided_by,
                                                            std::string_view reason, int64_t now) {
  RETURN_IF_ERROR(ValidateDecision(decided_by, reason));
  const std::string_view new_status = approve ? kApprovalApproved : kApprovalDenied;
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  {
    // The compare is part of the UPDATE, so of two deciders (threads or processes sharing the
    // file) exactly one changes the row; the loser sees the winner's decision below.
    ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(db_,
                                                        "UPDATE approvals SET status = ?2, "
                                                        "decided_at = ?3, decided_by = ?4, "
                                                        "reason = ?5 WHERE id = ?1 "
                                                        "AND status = 'pending' "
                                                        "AND expires_at > ?3"));
    RETURN_IF_ERROR(stmt.BindText(1, id));
    RETURN_IF_ERROR(stmt.BindText(2, new_status));
    RETURN_IF_ERROR(stmt.BindInt64(3, now));
    RETURN_IF_ERROR(stmt.BindText(4, decided_by));
    RETURN_IF_ERROR(stmt.BindText(5, reason));
    RETURN_IF_ERROR(stmt.Run());
  }
  const bool decided_now = sqlite3_changes(db_) != 0;
  ASSIGN_OR_RETURN(std::vector<Approval> approvals, LoadApprovals(db_, kApprovalById, id));
  if (approvals.empty()) return ApprovalNotFound(id);
  DecidedApproval result;
  result.approval = std::move(approvals.front());
  if (!decided_now) {
    // Nothing was written: say why from the row as it stands.
    absl::Status why = CheckApprovalOpen(result.approval, now);
    return why.ok() ? absl::InternalError("approval update changed no row") : why;
  }
  ASSIGN_OR_RETURN(std::vector<Task> tasks,
                   LoadTasksInTransaction(db_, kTaskById, result.approval.task_id));
  if (tasks.empty()) return TaskNotFound(result.approval.task_id);
  Task& task = tasks.front();
  const int64_t expires_at = approve ? ApprovedTaskExpiry(task, now) : task.expires_at;
  const std::string_view task_status = approve ? kTaskActive : kTaskDenied;
  RETURN_IF_ERROR(SettlePendingTask(db_, task.id, result.approval.id, task_status, expires_at));
  RETURN_IF_ERROR(txn.Commit());
  task.status = std::string(task_status);
  task.expires_at = expires_at;
  result.task = std::move(task);
  return result;
}

absl::StatusOr<std::vector<Approval>> SqliteStore::ExpireApprovals(int64_t now) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  std::vector<Approval> expired;
  {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(db_,
                                        "UPDATE approvals SET status = 'expired', "
                                        "decided_at = ?1 WHERE status = 'pending' "
                                        "AND expires_at <= ?1 RETURNING id, task_id, spiffe_id, "
                                        "input_document, status, created_at, expires_at, "
                                        "decided_at, decided_by, reason"));
    RETURN_IF_ERROR(stmt.BindInt64(1, now));
    while (true) {
      ASSIGN_OR_RETURN(bool has_row, stmt.Step());
      if (!has_row) break;
      expired.push_back(ReadApproval(stmt));
    }
  }
  if (expired.empty()) return expired;  // The transaction wrote nothing; rolling back is fine.
  ASSIGN_OR_RETURN(Statement task_update,
                   Statement::Prepare(db_,
                                      "UPDATE tasks SET status = 'denied' WHERE id = ?1 "
                                      "AND approval_id = ?2 AND status = 'pending_approval'"));
  for (const Approval& approval : expired) {
    task_update.Reset();
    RETURN_IF_ERROR(task_update.BindText(1, approval.task_id));
    RETURN_IF_ERROR(task_update.BindText(2, approval.id));
    RETURN_IF_ERROR(task_update.Run());
  }
  RETURN_IF_ERROR(txn.Commit());
  std::sort(expired.begin(), expired.end(),
            [](const Approval& a, const Approval& b) { return a.id < b.id; });
  return expired;
}

absl::StatusOr<Approval> SqliteStore::GetApproval(std::string_view id) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(std::vector<Approval> approvals, LoadApprovals(db_, kApprovalById, id));
  if (approvals.empty()) return ApprovalNotFound(id);
  return std::move(approvals.front());
}

absl::StatusOr<std::vector<Approval>> SqliteStore::ListApprovals(std::string_view status) {
  absl::MutexLock lock(&mu_);
  if (status.empty()) return LoadApprovals(db_, kAllApprovals, std::nullopt);
  return LoadApprovals(db_, kApprovalsByStatus, status);
}

// ---- Audit log ----

namespace {

constexpr char kAuditColumns[] =
    "chain_id, seq, time, event, outcome, spiffe_id, node_id, task_id, credential_id, detail, "
    "prev_hash, hash";
constexpr int64_t kMaxAuditListLimit = 10000;

const std::string& LastAuditRecordSql() {
  static const std::string* sql = new std::string(absl::StrCat(
      "SELECT ", kAuditColumns, " FROM audit_log WHERE chain_id = ?1 ORDER BY seq DESC LIMIT 1"));
  return *sql;
}

AuditRecord ReadAuditRecord(const Statement& stmt) {
  AuditRecord r;
  r.chain_id = stmt.ColumnText(0);
  r.seq = stmt.ColumnInt64(1);
  r.time = stmt.ColumnInt64(2);
  r.event = stmt.ColumnText(3);
  r.outcome = stmt.ColumnText(4);
  r.spiffe_id = stmt.ColumnText(5);
  r.node_id = stmt.ColumnText(6);
  r.task_id = stmt.ColumnText(7);
  r.credential_id = stmt.ColumnText(8);
  r.detail = stmt.ColumnText(9);
  r.prev_hash = stmt.ColumnText(10);
  r.hash = stmt.ColumnText(11);
  return r;
}

// One statement text per combination of filters, so each is prepared once and cached; built
// from constant fragments only (values are always bound).
std::string AuditListSql(const AuditQuery& q) {
  std::string sql = absl::StrCat("SELECT ", kAuditColumns, " FROM audit_log WHERE 1");
  if (!q.chain_id.empty()) sql += " AND chain_id = ?1 AND seq > ?2";
  if (q.since > 0) sql += " AND time >= ?3";
  if (!q.spiffe_id.empty()) sql += " AND spiffe_id = ?4";
  if (!q.task_id.empty()) sql += " AND task_id = ?5";
  if (!q.credential_id.empty()) sql += " AND credential_id = ?6";
  sql += " ORDER BY chain_id, seq LIMIT ?7";
  return sql;
}

}  // namespace

absl::Status SqliteStore::AppendAuditRecords(const std::vector<AuditRecord>& records) {
  static const std::vector<IssuedCredential> kNoCredentials;
  return AppendAuditBatch(records, kNoCredentials);
}

absl::Status SqliteStore::AppendAuditBatch(const std::vector<AuditRecord>& records,
                                           const std::vector<IssuedCredential>& credentials) {
  for (const IssuedCredential& c : credentials) RETURN_IF_ERROR(ValidateIssuedCredential(c));
  for (const AuditRecord& r : records) {
    if (r.chain_id.empty() || r.event.empty() || r.outcome.empty() || r.hash.empty()) {
      return absl::InvalidArgumentError(
          "audit record needs a chain_id, an event, an outcome and a hash");
    }
    if (r.seq < 1) return absl::InvalidArgumentError("audit record seq must be >= 1");
  }
  if (records.empty() && credentials.empty()) return absl::OkStatus();
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(audit_db_));
  {
    ASSIGN_OR_RETURN(
        Statement stmt,
        Statement::Prepare(audit_db_,
                           "INSERT INTO audit_log (chain_id, seq, time, event, "
                           "outcome, spiffe_id, node_id, task_id, credential_id, "
                           "detail, prev_hash, hash) "
                           "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"));
    for (const AuditRecord& r : records) {
      RETURN_IF_ERROR(stmt.BindText(1, r.chain_id));
      RETURN_IF_ERROR(stmt.BindInt64(2, r.seq));
      RETURN_IF_ERROR(stmt.BindInt64(3, r.time));
      RETURN_IF_ERROR(stmt.BindText(4, r.event));
      RETURN_IF_ERROR(stmt.BindText(5, r.outcome));
      RETURN_IF_ERROR(stmt.BindText(6, r.spiffe_id));
      RETURN_IF_ERROR(stmt.BindText(7, r.node_id));
      RETURN_IF_ERROR(stmt.BindText(8, r.task_id));
      RETURN_IF_ERROR(stmt.BindText(9, r.credential_id));
      RETURN_IF_ERROR(stmt.BindText(10, r.detail));
      RETURN_IF_ERROR(stmt.BindText(11, r.prev_hash));
      RETURN_IF_ERROR(stmt.BindText(12, r.hash));
      absl::Status status = stmt.Run();
      if (absl::IsAlreadyExists(status)) {
        return absl::AlreadyExistsError(absl::StrCat("audit chain '", r.chain_id,
                                                     "' already has a record ", r.seq,
                                                     " (another writer extended it)"));
      }
      RETURN_IF_ERROR(status);
      stmt.Reset();
    }
  }
  if (!credentials.empty()) {
    ASSIGN_OR_RETURN(Statement stmt,
                     Statement::Prepare(audit_db_,
                                        "INSERT INTO issued_credentials (id, kind, spiffe_id, "
                                        "node_id, subject_issuer, subject, task_id, parent_id, "
                                        "issued_at, expires_at) "
                                        "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"));
    for (const IssuedCredential& c : credentials) {
      RETURN_IF_ERROR(stmt.BindText(1, c.id));
      RETURN_IF_ERROR(stmt.BindText(2, c.kind));
      RETURN_IF_ERROR(stmt.BindText(3, c.spiffe_id));
      RETURN_IF_ERROR(stmt.BindText(4, c.node_id));
      RETURN_IF_ERROR(stmt.BindText(5, c.subject_issuer));
      RETURN_IF_ERROR(stmt.BindText(6, c.subject));
      RETURN_IF_ERROR(stmt.BindText(7, c.task_id));
      RETURN_IF_ERROR(stmt.BindText(8, c.parent_id));
      RETURN_IF_ERROR(stmt.BindInt64(9, c.issued_at));
      RETURN_IF_ERROR(stmt.BindInt64(10, c.expires_at));
      absl::Status status = stmt.Run();
      if (absl::IsAlreadyExists(status)) {
        return absl::AlreadyExistsError(
            absl::StrCat("a credential with id '", c.id, "' is already recorded"));
      }
      RETURN_IF_ERROR(status);
      stmt.Reset();
    }
  }
  return txn.Commit();
}

namespace {

constexpr char kCredentialColumns[] =
    "id, kind, spiffe_id, node_id, subject_issuer, subject, task_id, parent_id, issued_at, "
    "expires_at";

IssuedCredential ReadCredential(const Statement& stmt) {
  IssuedCredential c;
  c.id = stmt.ColumnText(0);
  c.kind = stmt.ColumnText(1);
  c.spiffe_id = stmt.ColumnText(2);
  c.node_id = stmt.ColumnText(3);
  c.subject_issuer = stmt.ColumnText(4);
  c.subject = stmt.ColumnText(5);
  c.task_id = stmt.ColumnText(6);
  c.parent_id = stmt.ColumnText(7);
  c.issued_at = stmt.ColumnInt64(8);
  c.expires_at = stmt.ColumnInt64(9);
  return c;
}

// One statement text per combination of filters; values are always bound, never spliced.
std::string CredentialListSql(const CredentialQuery& q) {
  std::string sql =
      absl::StrCat("SELECT ", kCredentialColumns, " FROM issued_credentials WHERE id > ?1");
  if (!q.spiffe_id.empty()) sql += " AND spiffe_id = ?2";
  if (!q.subject.empty()) sql += " AND subject = ?3";
  if (!q.subject_issuer.empty()) sql += " AND subject_issuer = ?4";
  if (!q.task_id.empty()) sql += " AND task_id = ?5";
  if (!q.parent_id.empty()) sql += " AND parent_id = ?6";
  sql += " ORDER BY id LIMIT ?7";
  return sql;
}

}  // namespace

absl::StatusOr<IssuedCredential> SqliteStore::GetCredential(std::string_view id) {
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(audit_db_, absl::StrCat("SELECT ", kCredentialColumns,
                                                              " FROM issued_credentials "
                                                              "WHERE id = ?1")));
  RETURN_IF_ERROR(stmt.BindText(1, id));
  ASSIGN_OR_RETURN(bool has_row, stmt.Step());
  if (!has_row) {
    return absl::NotFoundError(absl::StrCat("no credential '", AbslView(id), "' is recorded"));
  }
  return ReadCredential(stmt);
}

absl::StatusOr<std::vector<IssuedCredential>> SqliteStore::ListCredentials(
    const CredentialQuery& query) {
  RETURN_IF_ERROR(ValidateCredentialQuery(query));
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(audit_db_, CredentialListSql(query)));
  RETURN_IF_ERROR(stmt.BindText(1, query.after_id));
  if (!query.spiffe_id.empty()) RETURN_IF_ERROR(stmt.BindText(2, query.spiffe_id));
  if (!query.subject.empty()) RETURN_IF_ERROR(stmt.BindText(3, query.subject));
  if (!query.subject_issuer.empty()) RETURN_IF_ERROR(stmt.BindText(4, query.subject_issuer));
  if (!query.task_id.empty()) RETURN_IF_ERROR(stmt.BindText(5, query.task_id));
  if (!query.parent_id.empty()) RETURN_IF_ERROR(stmt.BindText(6, query.parent_id));
  RETURN_IF_ERROR(stmt.BindInt64(7, query.limit));
  std::vector<IssuedCredential> out;
  while (true) {
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) break;
    out.push_back(ReadCredential(stmt));
  }
  return out;
}

absl::StatusOr<AuditRecord> SqliteStore::LastAuditRecord(std::string_view chain_id) {
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(audit_db_, LastAuditRecordSql()));
  RETURN_IF_ERROR(stmt.BindText(1, chain_id));
  ASSIGN_OR_RETURN(bool has_row, stmt.Step());
  if (!has_row) {
    return absl::NotFoundError(
        absl::StrCat("audit chain '", AbslView(chain_id), "' has no record"));
  }
  return ReadAuditRecord(stmt);
}

absl::StatusOr<std::vector<AuditRecord>> SqliteStore::ListAuditRecords(const AuditQuery& query) {
  if (query.limit < 1 || query.limit > kMaxAuditListLimit) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit list limit must be 1..", kMaxAuditListLimit));
  }
  // Declared before the statement, which refers to the text until it is returned to the cache.
  const std::string sql = AuditListSql(query);
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(Statement stmt, Statement::Prepare(audit_db_, sql));
  if (!query.chain_id.empty()) {
    RETURN_IF_ERROR(stmt.BindText(1, query.chain_id));
    RETURN_IF_ERROR(stmt.BindInt64(2, query.after_seq));
  }
  if (query.since > 0) RETURN_IF_ERROR(stmt.BindInt64(3, query.since));
  if (!query.spiffe_id.empty()) RETURN_IF_ERROR(stmt.BindText(4, query.spiffe_id));
  if (!query.task_id.empty()) RETURN_IF_ERROR(stmt.BindText(5, query.task_id));
  if (!query.credential_id.empty()) RETURN_IF_ERROR(stmt.BindText(6, query.credential_id));
  RETURN_IF_ERROR(stmt.BindInt64(7, query.limit));
  std::vector<AuditRecord> out;
  while (true) {
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) break;
    out.push_back(ReadAuditRecord(stmt));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> SqliteStore::ListAuditChains() {
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(
      Statement stmt,
      Statement::Prepare(audit_db_, "SELECT DISTINCT chain_id FROM audit_log ORDER BY chain_id"));
  std::vector<std::string> out;
  while (true) {
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) break;
    out.push_back(stmt.ColumnText(0));
  }
  return out;
}

absl::Status SqliteStore::AddAuditCheckpoint(const AuditCheckpoint& c) {
  if (c.chain_id.empty() || c.hash.empty() || c.jws.empty() || c.seq < 1) {
    return absl::InvalidArgumentError("audit checkpoint needs a chain_id, seq >= 1, hash and jws");
  }
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(audit_db_,
                                      "INSERT INTO audit_checkpoints (chain_id, seq, hash, time, "
                                      "jws) VALUES (?1, ?2, ?3, ?4, ?5)"));
  RETURN_IF_ERROR(stmt.BindText(1, c.chain_id));
  RETURN_IF_ERROR(stmt.BindInt64(2, c.seq));
  RETURN_IF_ERROR(stmt.BindText(3, c.hash));
  RETURN_IF_ERROR(stmt.BindInt64(4, c.time));
  RETURN_IF_ERROR(stmt.BindText(5, c.jws));
  absl::Status status = stmt.Run();
  if (absl::IsAlreadyExists(status)) {
    return absl::AlreadyExistsError(
        absl::StrCat("audit chain '", c.chain_id, "' already has a checkpoint at ", c.seq));
  }
  return status;
}

absl::StatusOr<std::vector<AuditCheckpoint>> SqliteStore::ListAuditCheckpoints(
    std::string_view chain_id, int64_t limit) {
  if (limit < 1 || limit > kMaxAuditListLimit) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit checkpoint limit must be 1..", kMaxAuditListLimit));
  }
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(
      Statement stmt,
      Statement::Prepare(audit_db_, chain_id.empty()
                                        ? "SELECT chain_id, seq, hash, time, jws FROM "
                                          "audit_checkpoints ORDER BY time DESC, seq DESC "
                                          "LIMIT ?2"
                                        : "SELECT chain_id, seq, hash, time, jws FROM "
                                          "audit_checkpoints WHERE chain_id = ?1 "
                                          "ORDER BY time DESC, seq DESC LIMIT ?2"));
  if (!chain_id.empty()) RETURN_IF_ERROR(stmt.BindText(1, chain_id));
  RETURN_IF_ERROR(stmt.BindInt64(2, limit));
  std::vector<AuditCheckpoint> out;
  while (true) {
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) break;
    AuditCheckpoint& c = out.emplace_back();
    c.chain_id = stmt.ColumnText(0);
    c.seq = stmt.ColumnInt64(1);
    c.hash = stmt.ColumnText(2);
    c.time = stmt.ColumnInt64(3);
    c.jws = stmt.ColumnText(4);
  }
  return out;
}

// ---- Counters ----

absl::StatusOr<int64_t> SqliteStore::IncrementCounterBelow(std::string_view key, int64_t limit,
                                                           int64_t expires_at) {
  if (key.empty()) return absl::InvalidArgumentError("counter key is empty");
  if (limit < 1) return absl::InvalidArgumentError("counter limit must be at least 1");
  absl::MutexLock lock(&mu_);
  // One conditional upsert in a write transaction: the limit test and the increment are one
  // step for SQLite, so concurrent callers (threads or processes) can never both pass at
  // limit - 1. When the row is at the limit the WHERE leaves it alone and RETURNING yields no
  // row.
  ASSIGN_OR_RETURN(Transaction txn, Transaction::BeginWrite(db_));
  int64_t value = 0;
  {
    ASSIGN_OR_RETURN(
        Statement stmt,
        Statement::Prepare(db_,
                           "INSERT INTO policy_counters (key, value, expires_at) "
                           "VALUES (?1, 1, ?3) ON CONFLICT (key) DO UPDATE SET "
                           "value = value + 1, expires_at = MAX(expires_at, excluded.expires_at) "
                           "WHERE value < ?2 RETURNING value"));
    RETURN_IF_ERROR(stmt.BindText(1, key));
    RETURN_IF_ERROR(stmt.BindInt64(2, limit));
    RETURN_IF_ERROR(stmt.BindInt64(3, expires_at));
    ASSIGN_OR_RETURN(bool has_row, stmt.Step());
    if (!has_row) {
      return absl::ResourceExhaustedError(
          absl::StrCat("counter '", AbslView(key), "' is at its limit of ", limit));
    }
    value = stmt.ColumnInt64(0);
    RETURN_IF_ERROR(stmt.Run());  // Finish the statement so the transaction can commit.
  }
  RETURN_IF_ERROR(txn.Commit());
  return value;
}

absl::Status SqliteStore::PruneCounters(int64_t now) {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(Statement stmt,
                   Statement::Prepare(db_, "DELETE FROM policy_counters WHERE expires_at <= ?1"));
  RETURN_IF_ERROR(stmt.BindInt64(1, now));
  return stmt.Run();
}

absl::StatusOr<std::vector<int64_t>> SqliteStore::SynchronousModesForTesting() {
  int64_t main_mode = 0;
  {
    absl::MutexLock lock(&mu_);
    ASSIGN_OR_RETURN(main_mode, QuerySingleInt(db_, "PRAGMA synchronous"));
  }
  absl::MutexLock lock(&audit_mu_);
  ASSIGN_OR_RETURN(int64_t audit_mode, QuerySingleInt(audit_db_, "PRAGMA synchronous"));
  return std::vector<int64_t>{main_mode, audit_mode};
}

absl::StatusOr<int> SqliteStore::SchemaVersion() {
  absl::MutexLock lock(&mu_);
  ASSIGN_OR_RETURN(int64_t version, QuerySingleInt(db_, "PRAGMA user_version"));
  return static_cast<int>(version);
}

}  // namespace mandate::store
