// Rotation at half life, against real daemons with the shortest lifetimes the broker allows
// (60 s): the agent renews its own SVID and every workload SVID at about 25 s (half of a
// lifetime backdated by 10 s), streams push the rotated SVID, and the workload keeps working
// across the agent's renewal. This test takes about half a minute by design.
#include <gtest/gtest.h>

#include <condition_variable>
#include <iostream>
#include <mutex>
#include <nlohmann/json.hpp>

#include "broker/common/crypto/x509.h"
#include "mandate/svid.h"
#include "mandate/workload_client.h"
#include "mandate/x509svid.h"
#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

class RotationTest : public IntegrationTest {};

std::string LeafSerial(const X509Context& context) {
  if (context.svids.empty() || context.svids[0].chain_der.empty()) return "";
  auto leaf = crypto::Certificate::FromDer(context.svids[0].chain_der[0]);
  return leaf.ok() ? leaf->SerialHex() : "";
}

std::string NodeSerial(const CommandResult& agents_json) {
  auto doc = nlohmann::json::parse(agents_json.out, nullptr, false);
  if (!doc.is_object() || !doc.contains("agents") || doc["agents"].empty()) return "";
  return doc["agents"][0].value("cert_serial", "");
}

TEST_F(RotationTest, WorkloadAndAgentSvidsRotateAtHalfLife) {
  BrokerOptions options;
  options.extra_args = {"--x509-svid-ttl", "60", "--agent-svid-ttl", "60"};
  auto broker = StartBroker(options);
  ASSERT_TRUE(broker.ok()) << broker.status();
  auto agent = StartAttestedAgent(*broker, "node-rotate");
  ASSERT_TRUE(agent.ok()) << agent.status();
  const std::string node_id = broker->JoinNodeId("node-rotate");
  const std::string workload_id = broker->Id("/agent/rotating");
  ASSERT_TRUE(CreateEntry(*broker, node_id, workload_id, {OwnUidSelector()}).ok());

  CommandResult agents = Admin(*broker, {"agent", "list", "--output", "json"});
  ASSERT_EQ(agents.exit_code, 0) << agents;
  const std::string first_node_serial = NodeSerial(agents);
  ASSERT_FALSE(first_node_serial.empty()) << agents;

  auto client = WorkloadClient::Connect("unix://" + agent->socket);
  ASSERT_TRUE(client.ok()) << client.status();
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> serials;  // one per update, in order
  X509Context latest;
  auto watcher = (*client)->WatchX509Context([&](const X509Context& update) {
    std::lock_guard<std::mutex> lock(mu);
    serials.push_back(LeafSerial(update));
    latest = update;
    cv.notify_all();
  });
  ASSERT_TRUE(watcher->WaitUntilUpdated(10s).ok());

  auto start = std::chrono::steady_clock::now();
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, 50s, [&] {
      return serials.size() >= 2 && serials.back() != serials.front();
    })) << "no rotated X509-SVID was pushed";
    BundleSet bundles = latest.Bundles();
    auto verified = VerifyX509Svid(latest.svids[0].chain_der, bundles);
    EXPECT_TRUE(verified.ok()) << verified.status();
    EXPECT_EQ(latest.svids[0].spiffe_id, workload_id);
  }
  std::cout << "rotated X509-SVID pushed after "
            << std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() -
                                                                start)
                   .count()
            << " s of watching\n";
  watcher->Close();

  // The agent renewed its own SVID too (the broker records the new serial once it is used), and
  // the workload is still served afterwards.
  ASSERT_TRUE(WaitUntil(
      [&] {
        return NodeSerial(Admin(*broker, {"agent", "list", "--output", "json"})) !=
               first_node_serial;
      },
      30s, 250ms))
      << "the agent did not renew its SVID";
  CommandResult jwt = Workload(*agent, {"fetch", "jwt", "--audience", "after-renewal"});
  EXPECT_EQ(jwt.exit_code, 0) << jwt;
}

}  // namespace
}  // namespace mandate::integration
