// Fixture for rules policy tests: a temp dir holding the rules file and a real SQLite store, and
// a fake clock (Wednesday 2026-12-02 10:00:00 UTC unless a test moves it).
#ifndef MANDATE_TESTS_UNIT_POLICY_RULES_TEST_ENV_H_
#define MANDATE_TESTS_UNIT_POLICY_RULES_TEST_ENV_H_

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "broker/common/store/sqlite_store.h"
#include "broker/common/util/clock.h"
#include "broker/server/policy/rules_policy.h"

namespace mandate::broker::policy::testing {

inline constexpr int64_t kWednesday10am = 1796205600;  // 2026-12-02T10:00:00Z

class RulesPolicyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "mandate-rules-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
    path_ = dir_ + "/policy.toml";
    OpenStore();
  }
  void TearDown() override {
    store_.reset();
    std::filesystem::remove_all(dir_);
  }

  void OpenStore() {
    auto store = store::SqliteStore::Open(dir_ + "/mandate.db");
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::move(store).value();
  }

  void Write(const std::string& text) { std::ofstream(path_, std::ios::trunc) << text; }

  // Writes `text` and loads it; null (with a test failure) when it does not load.
  std::unique_ptr<RulesPolicy> Load(const std::string& text) {
    Write(text);
    auto policy = RulesPolicy::Load(path_, *store_, clock_, metrics_);
    EXPECT_TRUE(policy.ok()) << policy.status();
    return policy.ok() ? std::move(policy).value() : nullptr;
  }

  // Writes `text` and returns Load's error (OK when it loaded).
  absl::Status LoadError(const std::string& text) {
    Write(text);
    return RulesPolicy::Load(path_, *store_, clock_, metrics_).status();
  }

  static std::chrono::steady_clock::time_point Later() {
    return std::chrono::steady_clock::now() + std::chrono::seconds(30);
  }

  static PolicyInput Input(IssuanceKind kind, std::string spiffe_id) {
    PolicyInput input;
    input.kind = kind;
    input.spiffe_id = std::move(spiffe_id);
    input.ttl_seconds = 3600;
    return input;
  }

  void ExecRawSql(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir_ + "/mandate.db").c_str(), &db), SQLITE_OK);
    char* error = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &error), SQLITE_OK)
        << (error ? error : "");
    sqlite3_free(error);
    sqlite3_close(db);
  }

  std::string dir_;
  std::string path_;
  std::unique_ptr<store::SqliteStore> store_;
  FakeClock clock_{kWednesday10am};
  metrics::BrokerMetrics* metrics_ = nullptr;
};

}  // namespace mandate::broker::policy::testing

#endif  // MANDATE_TESTS_UNIT_POLICY_RULES_TEST_ENV_H_
