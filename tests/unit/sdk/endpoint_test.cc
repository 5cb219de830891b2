#include <cstdlib>
#include <optional>
#include <string>

#include "gtest/gtest.h"
#include "mandate/workload_client.h"

namespace mandate {
namespace {

TEST(ParseWorkloadEndpointTest, AcceptsUnixForms) {
  EXPECT_EQ(*ParseWorkloadEndpoint("unix:///run/mandate/agent.sock"),
            "unix:/run/mandate/agent.sock");
  EXPECT_EQ(*ParseWorkloadEndpoint("unix:/run/mandate/agent.sock"), "unix:/run/mandate/agent.sock");
  EXPECT_EQ(*ParseWorkloadEndpoint("/run/mandate/agent.sock"), "unix:/run/mandate/agent.sock");
}

TEST(ParseWorkloadEndpointTest, RefusesMalformedEndpoints) {
  for (const char* bad : {"", "unix://", "unix:", "unix:/", "unix://host/agent.sock",
                          "unix:relative.sock", "relative/agent.sock", "tcp://127.0.0.1:8081",
                          "unix:///run/a.sock?x=1", "unix:///run/a.sock#frag"}) {
    auto target = ParseWorkloadEndpoint(bad);
    EXPECT_EQ(target.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_NE(ParseWorkloadEndpoint("tcp://127.0.0.1:1").status().message().find("tcp"),
            std::string::npos);
}

// Saves and restores the two endpoint variables so tests do not leak environment.
class ResolveWorkloadEndpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int i = 0; i < 2; ++i) {
      const char* v = std::getenv(kNames[i]);
      saved_[i] = v ? std::optional<std::string>(v) : std::nullopt;
      unsetenv(kNames[i]);
    }
  }
  void TearDown() override {
    for (int i = 0; i < 2; ++i) {
      if (saved_[i]) {
        setenv(kNames[i], saved_[i]->c_str(), 1);
      } else {
        unsetenv(kNames[i]);
      }
    }
  }
  static constexpr const char* kNames[2] = {kMandateEndpointEnv, kSpiffeEndpointEnv};
  std::optional<std::string> saved_[2];
};

TEST_F(ResolveWorkloadEndpointTest, NoEndpointAnywhereNamesBothVariables) {
  auto target = ResolveWorkloadEndpoint("");
  EXPECT_EQ(target.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(target.status().message().find("MANDATE_ENDPOINT_SOCKET"), std::string::npos);
  EXPECT_NE(target.status().message().find("SPIFFE_ENDPOINT_SOCKET"), std::string::npos);
}

TEST_F(ResolveWorkloadEndpointTest, MandateVariableWinsOverSpiffeVariable) {
  setenv(kSpiffeEndpointEnv, "unix:///spiffe.sock", 1);
  EXPECT_EQ(*ResolveWorkloadEndpoint(""), "unix:/spiffe.sock");
  setenv(kMandateEndpointEnv, "unix:///mandate.sock", 1);
  EXPECT_EQ(*ResolveWorkloadEndpoint(""), "unix:/mandate.sock");
}

TEST_F(ResolveWorkloadEndpointTest, ExplicitEndpointWinsOverEnvironment) {
  setenv(kMandateEndpointEnv, "unix:///mandate.sock", 1);
  EXPECT_EQ(*ResolveWorkloadEndpoint("/explicit.sock"), "unix:/explicit.sock");
}

TEST_F(ResolveWorkloadEndpointTest, EmptyVariableCountsAsUnset) {
  setenv(kMandateEndpointEnv, "", 1);
  setenv(kSpiffeEndpointEnv, "unix:///spiffe.sock", 1);
  EXPECT_EQ(*ResolveWorkloadEndpoint(""), "unix:/spiffe.sock");
}

TEST_F(ResolveWorkloadEndpointTest, BadVariableValueNamesTheVariable) {
  setenv(kMandateEndpointEnv, "tcp://127.0.0.1:1", 1);
  auto target = ResolveWorkloadEndpoint("");
  EXPECT_EQ(target.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(target.status().message().find("MANDATE_ENDPOINT_SOCKET"), std::string::npos);
}

TEST_F(ResolveWorkloadEndpointTest, ConnectWithoutEndpointFailsClearly) {
  auto client = WorkloadClient::Connect();
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mandate
