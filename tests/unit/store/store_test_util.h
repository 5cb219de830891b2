// Shared fixture for SqliteStore tests: a fresh temp dir per test, removed in TearDown.
#ifndef MANDATE_TESTS_UNIT_STORE_STORE_TEST_UTIL_H_
#define MANDATE_TESTS_UNIT_STORE_STORE_TEST_UTIL_H_

#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>

#include "broker/common/store/sqlite_store.h"
#include "gtest/gtest.h"

namespace mandate::store::test_util {

class SqliteStoreFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "mandate-store-XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = (std::filesystem::path(dir_) / "broker.db").string();
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::unique_ptr<SqliteStore> OpenStore() {
    absl::StatusOr<std::unique_ptr<SqliteStore>> store = SqliteStore::Open(path_);
    EXPECT_TRUE(store.ok()) << store.status();
    return store.ok() ? std::move(*store) : nullptr;
  }

  // Runs SQL on the file directly, bypassing the store (to set up states the store never makes).
  void ExecRaw(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    char* error = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error);
    EXPECT_EQ(rc, SQLITE_OK) << (error ? error : "");
    sqlite3_free(error);
    sqlite3_close(db);
  }

  // The first column of the first row of `sql`, read directly from the file; -1 when no row.
  int64_t QueryRawInt(const std::string& sql) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    int64_t value = -1;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK) << sql;
    if (stmt != nullptr && sqlite3_step(stmt) == SQLITE_ROW) value = sqlite3_column_int64(stmt, 0);
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return value;
  }

  std::string dir_;
  std::string path_;
};

// A registration entry with the given id, parent and selectors and fixed other fields.
inline RegistrationEntry MakeEntry(std::string id, std::string parent_id,
                                   std::vector<std::string> selectors,
                                   std::string spiffe_id = "spiffe://example.org/agent/bot") {
  RegistrationEntry entry;
  entry.id = std::move(id);
  entry.spiffe_id = std::move(spiffe_id);
  entry.parent_id = std::move(parent_id);
  entry.selectors = std::move(selectors);
  entry.scopes = {"tickets:read"};
  entry.x509_ttl_s = 3600;
  entry.jwt_ttl_s = 300;
  entry.token_ttl_s = 600;
  entry.created_at = 1700000000;
  return entry;
}

// A syntactically valid token hash: 64 copies of hex digit `c`.
inline std::string TokenHash(char c) { return std::string(64, c); }

}  // namespace mandate::store::test_util

#endif  // MANDATE_TESTS_UNIT_STORE_STORE_TEST_UTIL_H_
