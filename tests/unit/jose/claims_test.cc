#include <cstdint>
#include <limits>

#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::jose {
namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

constexpr int64_t kNow = 1'700'000'000;

TEST(CheckTimeClaimsTest, AcceptsTokenInsideItsWindow) {
  json claims = {{"iat", kNow - 10}, {"nbf", kNow - 10}, {"exp", kNow + 300}};
  EXPECT_TRUE(CheckTimeClaims(claims, kNow, 0, /*require_exp=*/true).ok());
}

TEST(CheckTimeClaimsTest, RejectsTokenAtAndAfterExp) {
  json claims = {{"exp", kNow}};
  absl::Status at_exp = CheckTimeClaims(claims, kNow, 0, true);
  EXPECT_EQ(at_exp.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(at_exp.message(), HasSubstr("token expired"));
  EXPECT_TRUE(CheckTimeClaims(claims, kNow - 1, 0, true).ok());
  EXPECT_FALSE(CheckTimeClaims(claims, kNow + 1000, 0, true).ok());
}

TEST(CheckTimeClaimsTest, LeewayExtendsExpiryExactlyByLeeway) {
  json claims = {{"exp", kNow}};
  EXPECT_TRUE(CheckTimeClaims(claims, kNow + 29, 30, true).ok());
  absl::Status late = CheckTimeClaims(claims, kNow + 30, 30, true);
  EXPECT_EQ(late.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(late.message(), HasSubstr("token expired"));
}

TEST(CheckTimeClaimsTest, RejectsNbfInTheFutureBeyondLeeway) {
  json claims = {{"nbf", kNow + 60}, {"exp", kNow + 600}};
  absl::Status early = CheckTimeClaims(claims, kNow, 30, true);
  EXPECT_EQ(early.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(early.message(), HasSubstr("not yet valid"));
  EXPECT_TRUE(CheckTimeClaims(claims, kNow, 60, true).ok());
  EXPECT_TRUE(CheckTimeClaims(claims, kNow + 60, 0, true).ok());  // nbf itself is valid
}

TEST(CheckTimeClaimsTest, RejectsIatInTheFutureBeyondLeeway) {
  json claims = {{"iat", kNow + 120}, {"exp", kNow + 600}};
  absl::Status future = CheckTimeClaims(claims, kNow, 60, true);
  EXPECT_EQ(future.code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(future.message(), HasSubstr("issued in the future"));
  EXPECT_TRUE(CheckTimeClaims(claims, kNow, 120, true).ok());
}

TEST(CheckTimeClaimsTest, MissingExpFailsOnlyWhenRequired) {
  json claims = {{"iat", kNow}};
  absl::Status missing = CheckTimeClaims(claims, kNow, 0, /*require_exp=*/true);
  EXPECT_EQ(missing.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.message(), HasSubstr("no exp"));
  EXPECT_TRUE(CheckTimeClaims(claims, kNow, 0, /*require_exp=*/false).ok());
}

TEST(CheckTimeClaimsTest, RejectsNonNumericTimeClaims) {
  for (const char* name : {"exp", "nbf", "iat"}) {
    for (const json& bad :
         {json("1700000600"), json(true), json(nullptr), json::array({1}), json::object()}) {
      json claims = {{"exp", kNow + 600}};
      claims[name] = bad;
      absl::Status status = CheckTimeClaims(claims, kNow, 0, false);
      EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << name << "=" << bad.dump();
      EXPECT_THAT(status.message(), HasSubstr(name));
    }
  }
}

TEST(CheckTimeClaimsTest, RejectsNonFiniteNumbers) {
  json claims = {{"exp", std::numeric_limits<double>::infinity()}};
  EXPECT_EQ(CheckTimeClaims(claims, kNow, 0, true).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CheckTimeClaimsTest, AcceptsFractionalAndHugeValuesWithoutOverflow) {
  EXPECT_TRUE(CheckTimeClaims({{"exp", kNow + 0.5}}, kNow, 0, true).ok());
  EXPECT_FALSE(CheckTimeClaims({{"exp", kNow - 0.5}}, kNow, 0, true).ok());
  EXPECT_TRUE(CheckTimeClaims({{"exp", std::numeric_limits<uint64_t>::max()}}, kNow, 0, true).ok());
  EXPECT_TRUE(CheckTimeClaims({{"exp", std::numeric_limits<int64_t>::max()}}, kNow,
                              std::numeric_limits<int64_t>::max(), true)
                  .ok());
  // A hugely negative exp with a huge leeway must not wrap around into "valid".
  EXPECT_FALSE(CheckTimeClaims({{"exp", std::numeric_limits<int64_t>::min()}}, kNow,
                               std::numeric_limits<int64_t>::max() - 1, true)
                   .ok());
}

TEST(CheckTimeClaimsTest, RejectsNegativeLeewayAndNonObjectPayload) {
  EXPECT_EQ(CheckTimeClaims({{"exp", kNow + 10}}, kNow, -1, true).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckTimeClaims(json::array(), kNow, 0, false).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AudienceContainsTest, MatchesStringAudienceExactly) {
  json claims = {{"aud", "https://api.example"}};
  EXPECT_TRUE(AudienceContains(claims, "https://api.example"));
  EXPECT_FALSE(AudienceContains(claims, "https://api.example/"));
  EXPECT_FALSE(AudienceContains(claims, "HTTPS://API.EXAMPLE"));
  EXPECT_FALSE(AudienceContains(claims, ""));
}

TEST(AudienceContainsTest, MatchesAnyElementOfArrayAudience) {
  json claims = {{"aud", {"a", "b", "c"}}};
  EXPECT_TRUE(AudienceContains(claims, "a"));
  EXPECT_TRUE(AudienceContains(claims, "c"));
  EXPECT_FALSE(AudienceContains(claims, "d"));
  EXPECT_FALSE(AudienceContains({{"aud", json::array()}}, "a"));
}

TEST(AudienceContainsTest, MalformedOrMissingAudienceMatchesNothing) {
  EXPECT_FALSE(AudienceContains(json::object(), "a"));
  EXPECT_FALSE(AudienceContains({{"aud", 1}}, "1"));
  EXPECT_FALSE(AudienceContains({{"aud", nullptr}}, "a"));
  EXPECT_FALSE(AudienceContains({{"aud", {{"a", 1}}}}, "a"));
  // One non-string element makes the whole claim malformed, even if another element matches.
  EXPECT_FALSE(AudienceContains({{"aud", {"a", 1}}}, "a"));
  EXPECT_FALSE(AudienceContains(json("a"), "a"));
}

}  // namespace
}  // namespace mandate::jose
