// Shared fixture pieces for broker unit tests: a temp data dir with a real SQLite store.
#ifndef MANDATE_TESTS_UNIT_BROKER_SERVER_TEST_ENV_H_
#define MANDATE_TESTS_UNIT_BROKER_SERVER_TEST_ENV_H_

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>

#include "broker/common/store/sqlite_store.h"
#include "broker/server/audit/audit_log.h"

namespace mandate::broker::testing {

class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "mandate-test-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline std::unique_ptr<store::SqliteStore> OpenStore(const TempDir& dir) {
  auto store = store::SqliteStore::Open(dir.path() + "/mandate.db");
  EXPECT_TRUE(store.ok()) << store.status();
  return std::move(store).value();
}

// Runs `sql` on the store file of `dir` directly, bypassing the store (to tamper with it).
inline void ExecRawSql(const TempDir& dir, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir.path() + "/mandate.db").c_str(), &db), SQLITE_OK);
  char* error = nullptr;
  EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error), SQLITE_OK)
      << (error ? error : "");
  sqlite3_free(error);
  sqlite3_close(db);
}

// An audit log on `store` for fixtures; the store and clock must outlive it.
inline std::unique_ptr<AuditLog> OpenAuditLog(store::Store& store, const Clock& clock) {
  auto log = AuditLog::Open(store, "test-broker", clock);
  EXPECT_TRUE(log.ok()) << log.status();
  return std::move(log).value();
}

}  // namespace mandate::broker::testing

#endif  // MANDATE_TESTS_UNIT_BROKER_SERVER_TEST_ENV_H_
