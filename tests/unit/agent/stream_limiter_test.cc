#include "broker/agent/stream_limiter.h"

#include <optional>
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

}  // namespace
}  // namespace mandate::agent
