// FailedScenarios: the benchmark fails on any operation error or a scenario that did nothing,
// instead of reporting figures measured on failures.
#include "tests/bench/report.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mandate::bench {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST(BenchReportTest, SoundScenariosPass) {
  json scenarios = {{"jwt_svid_mint", {{"ops", 1200}, {"errors", 0}}},
                    {"revocation_propagation", {{"rounds", 2}, {"errors", 0}}}};
  EXPECT_THAT(FailedScenarios(scenarios), IsEmpty());
}

TEST(BenchReportTest, AnyOperationErrorFailsItsScenario) {
  json scenarios = {
      {"jwt_svid_mint", {{"ops", 1200}, {"errors", 1}, {"first_error", "UNAVAILABLE: x"}}},
      {"x509_svid_mint", {{"ops", 10}, {"errors", 0}}}};
  auto failed = FailedScenarios(scenarios);
  ASSERT_EQ(failed.size(), 1u);
  EXPECT_THAT(failed[0], HasSubstr("jwt_svid_mint: 1 operation error(s)"));
  EXPECT_THAT(failed[0], HasSubstr("UNAVAILABLE: x"));
}

TEST(BenchReportTest, ZeroOperationsFailsEvenWithoutErrors) {
  json scenarios = {{"token_endpoint", {{"ops", 0}, {"errors", 0}}},
                    {"revocation_propagation", {{"rounds", 2}, {"errors", 2}}},
                    {"new_scenario", {{"p50_us", 3.0}}},
                    {"broken", "oops"}};
  EXPECT_THAT(FailedScenarios(scenarios),
              ElementsAre(HasSubstr("broken: no result"), HasSubstr("new_scenario: reports no"),
                          HasSubstr("revocation_propagation: 2 operation error(s)"),
                          HasSubstr("token_endpoint: no operation succeeded")));
  EXPECT_THAT(FailedScenarios(json()), ElementsAre(HasSubstr("not an object")));
}

TEST(BenchReportTest, CurvePointsAreNamedWithTheirPrefix) {
  json points = {{"16", {{"ops", 0}, {"errors", 0}}}};
  EXPECT_THAT(FailedScenarios(points, "curve task_token concurrency "),
              ElementsAre("curve task_token concurrency 16: no operation succeeded"));
}

}  // namespace
}  // namespace mandate::bench
