// TPM node attestation end to end through the real daemons: mandate-broker started with
// --tpm-ek-ca, mandate-agent with --tpm-tcti pointing at a throwaway swtpm.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/integration/harness.h"
#include "tests/tpm/swtpm_fixture.h"

namespace mandate::integration {
namespace {

using ::testing::HasSubstr;

class TpmDaemonTest : public IntegrationTest {
 protected:
  void SetUp() override {
    IntegrationTest::SetUp();
    MANDATE_REQUIRE_SWTPM();
  }

  // Starts mandate-agent with --tpm-tcti and no token.
  absl::StatusOr<AgentProcess> StartTpmAgent(const BrokerProcess& broker,
                                             const mandate::testing::Swtpm& tpm) {
    AgentOptions options;
    options.extra_args = {"--tpm-tcti", tpm.tcti()};
    return StartAgent(broker, "", options);
  }
};

nlohmann::json AgentsJson(const CommandResult& r) {
  auto doc = nlohmann::json::parse(r.out, nullptr, false);
  return doc.is_object() && doc.contains("agents") ? doc["agents"] : nlohmann::json::array();
}

TEST_F(TpmDaemonTest, TpmNodeAttestsServesWorkloadsAndReattestsOnRestart) {
  auto tpm = mandate::testing::Swtpm::Start();
  ASSERT_TRUE(tpm.ok()) << tpm.status();
  BrokerOptions options;
  options.extra_args = {"--tpm-ek-ca", (*tpm)->ek_ca_bundle_path()};
  auto broker = StartBroker(options);
  ASSERT_TRUE(broker.ok()) << broker.status();

  auto start = std::chrono::steady_clock::now();
  auto agent = StartTpmAgent(*broker, **tpm);
  ASSERT_TRUE(agent.ok()) << agent.status();
  std::cout << "TPM agent start to socket (attestation included): "
            << std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - start)
                   .count()
            << " ms\n";

  CommandResult list = Admin(*broker, {"agent", "list", "--output", "json"});
  ASSERT_EQ(list.exit_code, 0) << list;
  nlohmann::json agents = AgentsJson(list);
  ASSERT_EQ(agents.size(), 1u) << list;
  const std::string node_id = agents[0].value("spiffe_id", "");
  EXPECT_THAT(node_id, HasSubstr("spiffe://example.org/node/tpm/"));
  EXPECT_EQ(node_id.size(), std::string("spiffe://example.org/node/tpm/").size() + 64);
  std::string selectors = agents[0]["selectors"].dump();
  EXPECT_THAT(selectors, HasSubstr("tpm:ek_hash:" + node_id.substr(node_id.rfind('/') + 1)));
  EXPECT_THAT(selectors, HasSubstr("tpm:ek_ca:"));
  EXPECT_THAT(selectors, HasSubstr("tpm:pcr:sha256:0:"));
  EXPECT_EQ(agents[0].value("attestor", ""), "tpm");

  // Its workloads get SVIDs.
  const std::string workload_id = broker->Id("/agent/on-tpm-node");
  ASSERT_TRUE(CreateEntry(*broker, node_id, workload_id, {OwnUidSelector()}).ok());
  CommandResult fetched;
  ASSERT_TRUE(WaitUntil(
      [&] {
        fetched = Workload(*agent, {"fetch", "x509"});
        return fetched.exit_code == 0;
      },
      10s, 100ms))
      << fetched;
  EXPECT_THAT(fetched.out, HasSubstr(workload_id));

  // A restart re-attests with the TPM (nothing kept on disk) and gets the same node ID.
  ASSERT_EQ(StopProcess(agent->pid, SIGTERM), 0);
  auto again = StartTpmAgent(*broker, **tpm);
  ASSERT_TRUE(again.ok()) << again.status();
  list = Admin(*broker, {"agent", "list", "--output", "json"});
  agents = AgentsJson(list);
  ASSERT_EQ(agents.size(), 1u) << list;
  EXPECT_EQ(agents[0].value("spiffe_id", ""), node_id);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return Workload(*again, {"fetch", "jwt", "--audience", "a"}).exit_code == 0;
      },
      10s, 100ms));
}

TEST_F(TpmDaemonTest, TpmNodeRenewsByReattestingWithoutInterruptingWorkloads) {
  auto tpm = mandate::testing::Swtpm::Start();
  ASSERT_TRUE(tpm.ok()) << tpm.status();
  BrokerOptions options;
  options.extra_args = {"--tpm-ek-ca", (*tpm)->ek_ca_bundle_path(), "--agent-svid-ttl", "60"};
  auto broker = StartBroker(options);
  ASSERT_TRUE(broker.ok()) << broker.status();
  auto agent = StartTpmAgent(*broker, **tpm);
  ASSERT_TRUE(agent.ok()) << agent.status();
  nlohmann::json agents = AgentsJson(Admin(*broker, {"agent", "list", "--output", "json"}));
  ASSERT_EQ(agents.size(), 1u);
  const std::string node_id = agents[0].value("spiffe_id", "");
  const std::string first_serial = agents[0].value("cert_serial", "");
  ASSERT_TRUE(
      CreateEntry(*broker, node_id, broker->Id("/agent/renewing"), {OwnUidSelector()}).ok());
  ASSERT_TRUE(WaitUntil(
      [&] {
        return Workload(*agent, {"fetch", "x509"}).exit_code == 0;
      },
      10s, 100ms));

  // At half life (about 25 s) the agent attests again with a new key.
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto now = AgentsJson(Admin(*broker, {"agent", "list", "--output", "json"}));
        return now.size() == 1 && now[0].value("cert_serial", "") != first_serial;
      },
      45s, 500ms))
      << ReadFileOrEmpty(agent->log_path);
  EXPECT_THAT(ReadFileOrEmpty(agent->log_path), HasSubstr("renewed by re-attestation"));
  // Workloads were never cut off, and are still served with the renewed node identity.
  EXPECT_THAT(ReadFileOrEmpty(agent->log_path), ::testing::Not(HasSubstr("stops serving")));
  CommandResult jwt = Workload(*agent, {"fetch", "jwt", "--audience", "after"});
  EXPECT_EQ(jwt.exit_code, 0) << jwt;
}

TEST_F(TpmDaemonTest, TpmFromAnotherCaIsRefused) {
  auto trusted = mandate::testing::Swtpm::Start();
  ASSERT_TRUE(trusted.ok()) << trusted.status();
  auto other = mandate::testing::Swtpm::Start();  // its own, untrusted, EK CA
  ASSERT_TRUE(other.ok()) << other.status();
  BrokerOptions options;
  options.extra_args = {"--tpm-ek-ca", (*trusted)->ek_ca_bundle_path()};
  auto broker = StartBroker(options);
  ASSERT_TRUE(broker.ok()) << broker.status();

  AgentOptions agent_options;
  agent_options.extra_args = {"--tpm-tcti", (*other)->tcti()};
  CommandResult refused = RunAgentUntilExit(*broker, "", agent_options);
  EXPECT_NE(refused.exit_code, 0) << refused;
  EXPECT_THAT(refused.err, HasSubstr("untrusted EK CA"));
  EXPECT_THAT(ReadFileOrEmpty(broker->log_path), HasSubstr("untrusted EK CA"));
  CommandResult list = Admin(*broker, {"agent", "list", "--output", "json"});
  EXPECT_TRUE(AgentsJson(list).empty()) << list;
}

TEST_F(TpmDaemonTest, BrokerWithoutTpmOptionsRefusesTpmAgents) {
  auto tpm = mandate::testing::Swtpm::Start();
  ASSERT_TRUE(tpm.ok()) << tpm.status();
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  AgentOptions agent_options;
  agent_options.extra_args = {"--tpm-tcti", (*tpm)->tcti()};
  CommandResult refused = RunAgentUntilExit(*broker, "", agent_options);
  EXPECT_NE(refused.exit_code, 0) << refused;
  EXPECT_THAT(refused.err, HasSubstr("not enabled"));
}

}  // namespace
}  // namespace mandate::integration
