#include "broker/server/delegation/delegation_rules.h"

#include <optional>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::broker::delegation {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

ScopeBounds WideBounds() {
  ScopeBounds b;
  b.user = {"read", "write", "admin"};
  b.entitlements = {"read", "write", "admin"};
  b.task = {"read", "write", "admin"};
  return b;
}

TEST(IntersectScopes, NarrowsByEveryBound) {
  ScopeBounds b = WideBounds();
  b.requested = {"read", "write", "admin", "read"};
  b.entitlements = {"read", "write"};
  b.earlier_links = {{"spiffe://t/a", {"read", "write"}, 0}};
  b.policy = std::vector<std::string>{"read"};
  auto got = IntersectScopes(b);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_THAT(*got, ElementsAre("read"));
}

TEST(IntersectScopes, NoRequestMeansUsersScopeNarrowed) {
  ScopeBounds b = WideBounds();
  b.task = {"write", "admin"};
  auto got = IntersectScopes(b);
  ASSERT_TRUE(got.ok());
  EXPECT_THAT(*got, ElementsAre("write", "admin"));
}

TEST(IntersectScopes, UserTokenWithoutScopeGrantsNothing) {
  ScopeBounds b = WideBounds();
  b.user.clear();
  b.requested = {"read"};
  EXPECT_EQ(IntersectScopes(b).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(IntersectScopes, NeverWidensBeyondAnEarlierLink) {
  ScopeBounds b = WideBounds();
  b.requested = {"admin"};
  b.earlier_links = {{"spiffe://t/a", {"read"}, 0}};
  auto got = IntersectScopes(b);
  ASSERT_FALSE(got.ok());
  EXPECT_THAT(got.status().message(), HasSubstr("spiffe://t/a"));
}

TEST(IntersectScopes, PolicyCanEmptyTheResult) {
  ScopeBounds b = WideBounds();
  b.policy = std::vector<std::string>{};
  auto got = IntersectScopes(b);
  ASSERT_FALSE(got.ok());
  EXPECT_THAT(got.status().message(), HasSubstr("policy"));
}

TEST(DelegatedExpiry, TakesTheMinimum) {
  EXPECT_EQ(*DelegatedExpiry(100, 600, 500, 900, {}), 500);
  EXPECT_EQ(*DelegatedExpiry(100, 60, 500, 900, {}), 160);
  EXPECT_EQ(*DelegatedExpiry(100, 600, 500, 300, {}), 300);
  EXPECT_EQ(*DelegatedExpiry(100, 600, 500, 900, {{"a", {}, 200}}), 200);
}

TEST(DelegatedExpiry, RefusesWhenNothingIsLeft) {
  EXPECT_FALSE(DelegatedExpiry(100, 600, 100, 900, {}).ok());
  EXPECT_FALSE(DelegatedExpiry(100, 600, 500, 900, {{"a", {}, 50}}).ok());
}

TEST(EffectiveMaxDepth, PolicyMayLowerNeverRaise) {
  EXPECT_EQ(EffectiveMaxDepth(4, std::nullopt), 4);
  EXPECT_EQ(EffectiveMaxDepth(4, 2), 2);
  EXPECT_EQ(EffectiveMaxDepth(4, 9), 4);
  EXPECT_EQ(EffectiveMaxDepth(4, -3), 0);
}

TEST(CheckChainExtension, EnforcesMayAct) {
  EXPECT_TRUE(CheckChainExtension("spiffe://t/b", {}, std::string("spiffe://t/b"), 4).ok());
  EXPECT_EQ(CheckChainExtension("spiffe://t/b", {}, std::string("spiffe://t/c"), 4).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(CheckChainExtension, RefusesRepeatedActor) {
  EXPECT_FALSE(
      CheckChainExtension("spiffe://t/a", {"spiffe://t/a", "spiffe://t/b"}, std::nullopt, 4).ok());
}

TEST(CheckChainExtension, CapsDepth) {
  EXPECT_TRUE(CheckChainExtension("d", {"a", "b", "c"}, std::nullopt, 4).ok());
  EXPECT_FALSE(CheckChainExtension("e", {"a", "b", "c", "d"}, std::nullopt, 4).ok());
  EXPECT_FALSE(CheckChainExtension("a", {}, std::nullopt, 0).ok());
}

TEST(BuildActorChain, OutermostIsTheCurrentActor) {
  EXPECT_THAT(BuildActorChain("c", {"a", "b"}), ElementsAre("c", "b", "a"));
  EXPECT_THAT(BuildActorChain("a", {}), ElementsAre("a"));
}

}  // namespace
}  // namespace mandate::broker::delegation
