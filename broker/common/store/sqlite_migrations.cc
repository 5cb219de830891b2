#include "broker/common/store/sqlite_migrations.h"

#include <array>

namespace mandate::store {
namespace {

// Version 1: registration entries, attested nodes, join tokens.
//
// Selector and scope sets live in child tables (one row per element) rather than in a JSON column,
// so that "which entries/nodes carry selector X" is an indexed lookup and PostgreSQL can use the
// same layout. `selector_set_key` is a canonical, injective encoding of an entry's selector set
// (sorted, deduplicated, each element length-prefixed); the unique index over
// (spiffe_id, parent_id, selector_set_key) makes the database itself refuse duplicate entries,
// even if two processes write at once.
//
// `store_counters` holds persisted counters such as `entries_revision`, bumped in the same
// transaction as the change it counts.
constexpr std::string_view kV1Sql = R"sql(
CREATE TABLE store_counters (
  name TEXT PRIMARY KEY NOT NULL,
  value INTEGER NOT NULL
) STRICT;
INSERT INTO store_counters (name, value) VALUES ('entries_revision', 0);

CREATE TABLE registration_entries (
  id TEXT PRIMARY KEY NOT NULL,
  spiffe_id TEXT NOT NULL,
  parent_id TEXT NOT NULL,
  selector_set_key TEXT NOT NULL,
  x509_ttl_s INTEGER NOT NULL,
  jwt_ttl_s INTEGER NOT NULL,
  token_ttl_s INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  revision INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX registration_entries_identity
  ON registration_entries (spiffe_id, parent_id, selector_set_key);
CREATE INDEX registration_entries_by_parent ON registration_entries (parent_id);

CREATE TABLE registration_entry_selectors (
  entry_id TEXT NOT NULL REFERENCES registration_entries (id) ON DELETE CASCADE,
  selector TEXT NOT NULL,
  PRIMARY KEY (entry_id, selector)
) STRICT, WITHOUT ROWID;
CREATE INDEX registration_entry_selectors_by_selector ON registration_entry_selectors (selector);

CREATE TABLE registration_entry_scopes (
  entry_id TEXT NOT NULL REFERENCES registration_entries (id) ON DELETE CASCADE,
  scope TEXT NOT NULL,
  PRIMARY KEY (entry_id, scope)
) STRICT, WITHOUT ROWID;

CREATE TABLE attested_nodes (
  spiffe_id TEXT PRIMARY KEY NOT NULL,
  attestor TEXT NOT NULL,
  cert_serial TEXT NOT NULL,
  cert_expires_at INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  banned INTEGER NOT NULL CHECK (banned IN (0, 1))
) STRICT;

CREATE TABLE attested_node_selectors (
  node_id TEXT NOT NULL REFERENCES attested_nodes (spiffe_id) ON DELETE CASCADE,
  selector TEXT NOT NULL,
  PRIMARY KEY (node_id, selector)
) STRICT, WITHOUT ROWID;
CREATE INDEX attested_node_selectors_by_selector ON attested_node_selectors (selector);

CREATE TABLE join_tokens (
  token_hash TEXT PRIMARY KEY NOT NULL,
  node_spiffe_id TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX join_tokens_by_expiry ON join_tokens (expires_at);
)sql";

// The serial a node presented before its last renewal, accepted until the new one is used, so
// a renewal whose answer was lost does not lock the node out.
constexpr char kV2Sql[] = R"sql(
ALTER TABLE attested_nodes ADD COLUMN previous_cert_serial TEXT NOT NULL DEFAULT '';
)sql";

constexpr char kV3Sql[] = R"sql(
CREATE TABLE tpm_counters (
  ek_hash TEXT PRIMARY KEY NOT NULL,
  reset_count INTEGER NOT NULL,
  restart_count INTEGER NOT NULL
) STRICT;
)sql";

// Version 4: tasks agents declared (DESIGN.md §5).
//
// Scopes and audiences are ordered lists, so they live in child tables with an explicit
// `position` (0, 1, ...; the order the agent asked for) rather than in a JSON column, like the
// entry sets above; each (task, value) pair is unique, so a list holds no duplicates. `status` is
// free text with no CHECK constraint, so that later statuses ("pending_approval", "revoked") need
// no table rebuild. Tasks are looked up by owner (the agent listing its tasks) and, for later
// sweeps of live tasks, by status and deadline.
constexpr char kV4Sql[] = R"sql(
CREATE TABLE tasks (
  id TEXT PRIMARY KEY NOT NULL,
  spiffe_id TEXT NOT NULL,
  purpose TEXT NOT NULL,
  status TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  ended_at INTEGER NOT NULL
) STRICT;
CREATE INDEX tasks_by_spiffe_id ON tasks (spiffe_id, status);
CREATE INDEX tasks_by_status ON tasks (status, expires_at);

CREATE TABLE task_scopes (
  task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  scope TEXT NOT NULL,
  PRIMARY KEY (task_id, position),
  UNIQUE (task_id, scope)
) STRICT, WITHOUT ROWID;

CREATE TABLE task_audiences (
  task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
  position INTEGER NOT NULL,
  audience TEXT NOT NULL,
  PRIMARY KEY (task_id, position),
  UNIQUE (task_id, audience)
) STRICT, WITHOUT ROWID;
)sql";

// Version 5: the audit log (DESIGN.md §7, §10). One hash chain per broker (`chain_id`), so
// several brokers can share a store. The chain order is the primary key, so paging a chain for
// verification is a range scan; the other indexes serve `mandate audit list` filters.
constexpr char kV5Sql[] = R"sql(
CREATE TABLE audit_log (
  chain_id TEXT NOT NULL,
  seq INTEGER NOT NULL CHECK (seq >= 1),
  time INTEGER NOT NULL,
  event TEXT NOT NULL,
  outcome TEXT NOT NULL,
  spiffe_id TEXT NOT NULL,
  node_id TEXT NOT NULL,
  task_id TEXT NOT NULL,
  credential_id TEXT NOT NULL,
  detail TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  hash TEXT NOT NULL,
  PRIMARY KEY (chain_id, seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX audit_log_by_time ON audit_log (time);
CREATE INDEX audit_log_by_spiffe_id ON audit_log (spiffe_id, time) WHERE spiffe_id != '';
CREATE INDEX audit_log_by_task ON audit_log (task_id) WHERE task_id != '';
CREATE INDEX audit_log_by_credential ON audit_log (credential_id) WHERE credential_id != '';
)sql";

// Version 6: signed checkpoints of audit chain heads.
constexpr char kV6Sql[] = R"sql(
CREATE TABLE audit_checkpoints (
  chain_id TEXT NOT NULL,
  seq INTEGER NOT NULL CHECK (seq >= 1),
  hash TEXT NOT NULL,
  time INTEGER NOT NULL,
  jws TEXT NOT NULL,
  PRIMARY KEY (chain_id, seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX audit_checkpoints_by_time ON audit_checkpoints (time);
)sql";

// Version 7: counters behind the policy's execution caps (tokens per task, issuances per
// minute). Keys and expiry times are built by the policy module; the store only adds under a
// limit and prunes what expired, so the expiry index serves the prune.
constexpr char kV7Sql[] = R"sql(
CREATE TABLE policy_counters (
  key TEXT PRIMARY KEY NOT NULL,
  value INTEGER NOT NULL CHECK (value >= 0),
  expires_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX policy_counters_by_expiry ON policy_counters (expires_at);
)sql";

// Version 8: approvals (DESIGN.md §5) - task declarations the policy hook sent to a human.
//
// One approval per task (`task_id` UNIQUE), deleted with it. `status` is free text checked by
// the store (approval_rules.h), like the task status. Pending approvals are swept by deadline
// and listed by status, hence the (status, expires_at) index. A task names the approval it was
// declared under in `approval_id` (empty for the tasks that never needed one, including every
// task stored before this version).
constexpr char kV8Sql[] = R"sql(
CREATE TABLE approvals (
  id TEXT PRIMARY KEY NOT NULL,
  task_id TEXT NOT NULL UNIQUE REFERENCES tasks (id) ON DELETE CASCADE,
  spiffe_id TEXT NOT NULL,
  input_document TEXT NOT NULL,
  status TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  decided_at INTEGER NOT NULL,
  decided_by TEXT NOT NULL,
  reason TEXT NOT NULL
) STRICT;
CREATE INDEX approvals_by_status ON approvals (status, expires_at);
CREATE INDEX approvals_by_created_at ON approvals (created_at, id);
ALTER TABLE tasks ADD COLUMN approval_id TEXT NOT NULL DEFAULT '';
)sql";

// The credential index: one row per credential issued, written in the audit batch's transaction.
// Revocation cascades over parent_id; operators look rows up by subject, task and SPIFFE ID.
constexpr char kV9Sql[] = R"sql(
CREATE TABLE issued_credentials (
  id TEXT PRIMARY KEY NOT NULL,
  kind TEXT NOT NULL,
  spiffe_id TEXT NOT NULL,
  node_id TEXT NOT NULL,
  subject_issuer TEXT NOT NULL,
  subject TEXT NOT NULL,
  task_id TEXT NOT NULL,
  parent_id TEXT NOT NULL,
  issued_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX issued_credentials_by_parent ON issued_credentials (parent_id, id);
CREATE INDEX issued_credentials_by_subject ON issued_credentials (subject_issuer, subject, id);
CREATE INDEX issued_credentials_by_task ON issued_credentials (task_id, id);
CREATE INDEX issued_credentials_by_spiffe_id ON issued_credentials (spiffe_id, id);
)sql";

constexpr std::array<SqliteMigration, 9> kMigrations = {{
    {1, "entries, nodes, join tokens", kV1Sql},
    {2, "previous node certificate serial", kV2Sql},
    {3, "TPM boot counters per EK", kV3Sql},
    {4, "tasks", kV4Sql},
    {5, "audit log", kV5Sql},
    {6, "audit checkpoints", kV6Sql},
    {7, "policy counters", kV7Sql},
    {8, "approvals", kV8Sql},
    {9, "credential index", kV9Sql},
}};

}  // namespace

std::span<const SqliteMigration> SqliteSchemaMigrations() { return kMigrations; }

}  // namespace mandate::store
