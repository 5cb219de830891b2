#include "broker/agent/stream_limiter.h"

#include <atomic>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace mandate::agent {
namespace {

TEST(StreamLimiterTest, CapsPerUidAndInAllAndFreesSlotsOnRelease) {
  StreamLimiter limiter(/*max_total=*/3, /*max_per_uid=*/2);
  std::vector<StreamLimiter::Slot> held;
  for (int i = 0; i < 2; ++i) {
    auto slot = limiter.Acquire(1000);
    ASSERT_TRUE(slot.has_value());
    held.push_back(std::move(*slot));
  }
  EXPECT_FALSE(limiter.Acquire(1000).has_value());  // uid 1000 is at its cap
  {
    auto other = limiter.Acquire(0);  // another uid still gets a place
    ASSERT_TRUE(other.has_value());
    EXPECT_FALSE(limiter.Acquire(2000).has_value());  // everyone together is at the cap
    EXPECT_EQ(limiter.open(), 3u);
  }
  EXPECT_EQ(limiter.open(), 2u);
  held.pop_back();
  EXPECT_TRUE(limiter.Acquire(1000).has_value());
  held.clear();
  EXPECT_EQ(limiter.open(), 0u);
}

// The unary limiter's use: one uid's calls race for places from many handler threads and hold
// them (a call waiting on the broker); exactly its share is admitted, another uid still gets a
// place, and the places come back when the calls return.
TEST(StreamLimiterTest, ConcurrentCallsOfOneUidGetExactlyItsShare) {
  StreamLimiter limiter(/*max_total=*/128, /*max_per_uid=*/16);
  std::mutex mu;
  std::vector<StreamLimiter::Slot> held;
  std::atomic<int> refused{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 64; ++i) {
    callers.emplace_back([&] {
      auto slot = limiter.Acquire(1000);
      if (!slot.has_value()) {
        ++refused;
        return;
      }
      std::lock_guard<std::mutex> lock(mu);
      held.push_back(std::move(*slot));
    });
  }
  for (auto& t : callers) t.join();
  EXPECT_EQ(held.size(), 16u);
  EXPECT_EQ(refused.load(), 48);
  EXPECT_TRUE(limiter.Acquire(65534).has_value());
  held.clear();
  EXPECT_EQ(limiter.open(), 0u);
  EXPECT_TRUE(limiter.Acquire(1000).has_value());
}

}  // namespace
}  // namespace mandate::agent
