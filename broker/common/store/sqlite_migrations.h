// The SQLite schema as an append-only list of numbered migrations.
//
// How to change the schema: append a new step with the next version number; never edit or
// reorder a step that has shipped (databases in the field have already applied it). Each step
// runs in its own transaction together with the bump of `PRAGMA user_version` and its row in
// `schema_migrations`, so a failed step leaves the database exactly at the previous version.
// A database whose version is newer than the last step here is refused (see SqliteStore::Open).
#ifndef MANDATE_BROKER_COMMON_STORE_SQLITE_MIGRATIONS_H_
#define MANDATE_BROKER_COMMON_STORE_SQLITE_MIGRATIONS_H_

#include <span>
#include <string_view>

namespace mandate::store {

struct SqliteMigration {
  int version;            // 1, 2, 3, ... in order, without gaps.
  std::string_view name;  // Recorded in schema_migrations, for operators.
  std::string_view sql;   // Constant DDL/DML; may hold several statements. Never built from data.
};

// The migrations SqliteStore::Open applies, in order. The span refers to static storage.
std::span<const SqliteMigration> SqliteSchemaMigrations();

}  // namespace mandate::store

#endif  // MANDATE_BROKER_COMMON_STORE_SQLITE_MIGRATIONS_H_
