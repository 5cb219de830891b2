// SqliteStore's counters behind policy execution caps: the limit holds under concurrency (one
// process, and two connections as two processes would have), across a reopen, and pruning only
// drops expired counters.
#include <atomic>
#include <thread>
#include <vector>

#include "broker/common/store/sqlite_migrations.h"
#include "store_test_util.h"

namespace mandate::store {
namespace {

using test_util::SqliteStoreFixture;

class SqliteStoreCountersTest : public SqliteStoreFixture {
 protected:
  int64_t RawValue(const std::string& key) {
    return QueryRawInt("SELECT value FROM policy_counters WHERE key = '" + key + "'");
  }
  int64_t RawExpiry(const std::string& key) {
    return QueryRawInt("SELECT expires_at FROM policy_counters WHERE key = '" + key + "'");
  }
};

TEST_F(SqliteStoreCountersTest, CountsUpToTheLimitThenRefusesWithoutChanging) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (int64_t i = 1; i <= 3; ++i) {
    absl::StatusOr<int64_t> value = store->IncrementCounterBelow("k", 3, 100);
    ASSERT_TRUE(value.ok()) << value.status();
    EXPECT_EQ(*value, i);
  }
  absl::StatusOr<int64_t> refused = store->IncrementCounterBelow("k", 3, 500);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_EQ(RawValue("k"), 3);
  EXPECT_EQ(RawExpiry("k"), 100);  // a refused increment does not extend the counter either
  // A higher limit (a reloaded policy) lets it go on; a lower one refuses at once.
  EXPECT_EQ(*store->IncrementCounterBelow("k", 4, 100), 4);
  EXPECT_EQ(store->IncrementCounterBelow("k", 2, 100).status().code(),
            absl::StatusCode::kResourceExhausted);
  // Other keys are independent.
  EXPECT_EQ(*store->IncrementCounterBelow("other", 1, 100), 1);
}

TEST_F(SqliteStoreCountersTest, RefusesEmptyKeyAndLimitBelowOne) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->IncrementCounterBelow("", 3, 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->IncrementCounterBelow("k", 0, 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RawValue("k"), -1);
}

TEST_F(SqliteStoreCountersTest, ExpiryMovesLaterNeverEarlier) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->IncrementCounterBelow("k", 10, 200).ok());
  ASSERT_TRUE(store->IncrementCounterBelow("k", 10, 100).ok());
  EXPECT_EQ(RawExpiry("k"), 200);
  ASSERT_TRUE(store->IncrementCounterBelow("k", 10, 300).ok());
  EXPECT_EQ(RawExpiry("k"), 300);
}

TEST_F(SqliteStoreCountersTest, PruneDropsOnlyExpiredCounters) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->IncrementCounterBelow("old", 1, 100).ok());
  ASSERT_TRUE(store->IncrementCounterBelow("edge", 1, 150).ok());
  ASSERT_TRUE(store->IncrementCounterBelow("new", 1, 151).ok());
  ASSERT_TRUE(store->PruneCounters(150).ok());
  EXPECT_EQ(RawValue("old"), -1);
  EXPECT_EQ(RawValue("edge"), -1);  // expires_at <= now is expired
  EXPECT_EQ(RawValue("new"), 1);
  // A pruned counter starts again from zero.
  EXPECT_EQ(*store->IncrementCounterBelow("old", 1, 400), 1);
  EXPECT_EQ(store->IncrementCounterBelow("new", 1, 400).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(SqliteStoreCountersTest, CountersSurviveReopen) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->IncrementCounterBelow("k", 2, 100).ok());
    ASSERT_TRUE(store->IncrementCounterBelow("k", 2, 100).ok());
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->IncrementCounterBelow("k", 2, 100).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(*store->IncrementCounterBelow("k", 3, 100), 3);
}

TEST_F(SqliteStoreCountersTest, MigratesADatabaseFromBeforeTheCounters) {
  // A file at schema 6, as the broker before policy caps left it, then opened by this build.
  {
    auto old = SqliteStore::OpenWithMigrationsForTesting(path_, SqliteSchemaMigrations().first(6));
    ASSERT_TRUE(old.ok()) << old.status();
    EXPECT_EQ(*(*old)->SchemaVersion(), 6);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->SchemaVersion(), SqliteStore::LatestSchemaVersion());
  EXPECT_EQ(*store->IncrementCounterBelow("k", 1, 100), 1);
}

// 16 threads on two store instances (two connections, as two brokers sharing the file would
// have) race for 40 places: exactly 40 succeed and the rest are refused, none fail otherwise.
TEST_F(SqliteStoreCountersTest, ExactlyLimitSucceedUnderConcurrencyAcrossConnections) {
  auto first = OpenStore();
  auto second = OpenStore();
  ASSERT_NE(first, nullptr);
  ASSERT_NE(second, nullptr);
  constexpr int kThreads = 16, kAttemptsEach = 8, kLimit = 40;
  std::atomic<int> ok{0}, refused{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Store& store = t % 2 == 0 ? static_cast<Store&>(*first) : *second;
      for (int i = 0; i < kAttemptsEach; ++i) {
        absl::StatusOr<int64_t> value = store.IncrementCounterBelow("race", kLimit, 100);
        if (value.ok()) {
          ++ok;
        } else if (absl::IsResourceExhausted(value.status())) {
          ++refused;
        } else {
          ++failed;
        }
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(ok.load(), kLimit);
  EXPECT_EQ(refused.load(), kThreads * kAttemptsEach - kLimit);
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(RawValue("race"), kLimit);
}

}  // namespace
}  // namespace mandate::store
