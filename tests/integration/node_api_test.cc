// The broker's node API (NodeService) against a real broker and agents, called here with each
// agent's own X509-SVID (read from its data dir) as the mTLS client certificate:
// - the node is the one its certificate names, never one a request could name: agent B asking
//   for node A's entry is refused;
// - a certificate superseded by a re-attestation is refused once the new one is in use;
// - store errors are UNAVAILABLE (retry), never a verdict on the node.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "mandate/node/v1/node.grpc.pb.h"
#include "mandate/workload_client.h"
#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

namespace nodepb = mandate::node::v1;
using ::testing::HasSubstr;

// An agent's key and certificate chain as it keeps them (agent_svid.pem: key, then chain).
struct NodeCredentials {
  std::string key_pem;
  std::string chain_pem;
};

absl::StatusOr<NodeCredentials> ReadAgentCredentials(const AgentProcess& agent) {
  const std::string pem = ReadFileOrEmpty(agent.data_dir + "/agent_svid.pem");
  const size_t chain_at = pem.find("-----BEGIN CERTIFICATE-----");
  if (pem.empty() || chain_at == std::string::npos || chain_at == 0) {
    return absl::NotFoundError("no agent_svid.pem with a key and a chain in " + agent.data_dir);
  }
  return NodeCredentials{pem.substr(0, chain_at), pem.substr(chain_at)};
}

// A node API client presenting `credentials` (none: an empty key) to `broker`.
std::unique_ptr<nodepb::NodeApi::Stub> NodeClient(const BrokerProcess& broker,
                                                  const NodeCredentials& credentials) {
  grpc::SslCredentialsOptions tls;
  tls.pem_root_certs = ReadFileOrEmpty(broker.bundle_path);
  tls.pem_private_key = credentials.key_pem;
  tls.pem_cert_chain = credentials.chain_pem;
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride("localhost");  // the broker's certificate has DNS:localhost
  return nodepb::NodeApi::NewStub(
      grpc::CreateCustomChannel(broker.agent_address, grpc::SslCredentials(tls), args));
}

grpc::Status MintJwt(nodepb::NodeApi::Stub& node, const std::string& entry_id,
                     nodepb::MintJwtSvidResponse* response = nullptr) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 10s);
  nodepb::MintJwtSvidRequest request;
  request.set_entry_id(entry_id);
  request.add_audience("https://node-api.example.org");
  nodepb::MintJwtSvidResponse ignored;
  return node.MintJwtSvid(&context, request, response != nullptr ? response : &ignored);
}

std::string Describe(const grpc::Status& status) {
  return std::to_string(status.error_code()) + " " + status.error_message();
}

class NodeApiTest : public IntegrationTest {
 protected:
  // An attested agent named `name` with its own data dir and socket, and an entry for this
  // process's uid under it; returns the entry ID.
  void StartNode(const std::string& name, AgentProcess* agent, std::string* entry_id) {
    auto started = StartAttestedAgent(broker_, name,
                                      {.data_dir = temp_dir() + "/agent-" + name,
                                       .socket = temp_dir() + "/run/" + name + ".sock",
                                       .extra_args = {}});
    ASSERT_TRUE(started.ok()) << started.status();
    *agent = *started;
    auto entry = CreateEntry(broker_, broker_.JoinNodeId(name), broker_.Id("/agent/" + name),
                             {OwnUidSelector()});
    ASSERT_TRUE(entry.ok()) << entry.status();
    *entry_id = *entry;
  }

  void StartBrokerOnly() {
    auto broker = StartBroker();
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *broker;
  }

  BrokerProcess broker_;
};

TEST_F(NodeApiTest, ANodeIsTheOneItsCertificateNamesAndCannotUseAnotherNodesEntry) {
  ASSERT_NO_FATAL_FAILURE(StartBrokerOnly());
  AgentProcess agent_a, agent_b;
  std::string entry_a, entry_b;
  ASSERT_NO_FATAL_FAILURE(StartNode("node-a", &agent_a, &entry_a));
  ASSERT_NO_FATAL_FAILURE(StartNode("node-b", &agent_b, &entry_b));
  auto credentials_b = ReadAgentCredentials(agent_b);
  ASSERT_TRUE(credentials_b.ok()) << credentials_b.status();
  auto node_b = NodeClient(broker_, *credentials_b);

  // Positive control: B's own entry is served to B's certificate.
  nodepb::MintJwtSvidResponse minted;
  grpc::Status own = MintJwt(*node_b, entry_b, &minted);
  ASSERT_TRUE(own.ok()) << Describe(own);
  EXPECT_EQ(minted.spiffe_id(), broker_.Id("/agent/node-b"));

  // Node A's entry, asked for with B's certificate, on every path that takes an entry ID.
  grpc::Status jwt = MintJwt(*node_b, entry_a);
  EXPECT_EQ(jwt.error_code(), grpc::StatusCode::PERMISSION_DENIED) << Describe(jwt);
  EXPECT_THAT(jwt.error_message(), HasSubstr("is not assigned to this node"));
  {
    auto key = crypto::PrivateKey::GenerateP256();
    ASSERT_TRUE(key.ok());
    auto csr = crypto::CreateCsrDer(*key, broker_.Id("/agent/node-a"));
    ASSERT_TRUE(csr.ok()) << csr.status();
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    nodepb::SignX509SvidsRequest request;
    nodepb::X509SvidRequest* one = request.add_requests();
    one->set_entry_id(entry_a);
    one->set_csr(*csr);
    nodepb::SignX509SvidsResponse response;
    grpc::Status x509 = node_b->SignX509Svids(&context, request, &response);
    EXPECT_EQ(x509.error_code(), grpc::StatusCode::PERMISSION_DENIED) << Describe(x509);
    EXPECT_EQ(response.svids_size(), 0);
  }
  {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    nodepb::NodeDeclareTaskRequest request;
    request.set_entry_id(entry_a);
    request.set_purpose("borrowed identity");
    mandate::workload::v1::Task task;
    grpc::Status declared = node_b->DeclareTask(&context, request, &task);
    EXPECT_EQ(declared.error_code(), grpc::StatusCode::PERMISSION_DENIED) << Describe(declared);
  }
  // And B's workloads see B's identity only.
  auto client = WorkloadClient::Connect("unix://" + agent_b.socket);
  ASSERT_TRUE(client.ok()) << client.status();
  absl::StatusOr<X509Context> context = absl::UnknownError("not fetched");
  ASSERT_TRUE(WaitUntil(
      [&] {
        context = (*client)->FetchX509Context();
        return context.ok();
      },
      15s, 50ms))
      << context.status();
  ASSERT_EQ(context->svids.size(), 1u);
  EXPECT_EQ(context->svids[0].spiffe_id, broker_.Id("/agent/node-b"));
}

TEST_F(NodeApiTest, ACertificateSupersededByReattestationIsRefused) {
  ASSERT_NO_FATAL_FAILURE(StartBrokerOnly());
  AgentProcess first;
  std::string entry;
  ASSERT_NO_FATAL_FAILURE(StartNode("node-s", &first, &entry));
  auto old_credentials = ReadAgentCredentials(first);
  ASSERT_TRUE(old_credentials.ok()) << old_credentials.status();
  auto old_node = NodeClient(broker_, *old_credentials);
  grpc::Status before = MintJwt(*old_node, entry);
  ASSERT_TRUE(before.ok()) << Describe(before);
  ASSERT_EQ(StopProcess(first.pid, SIGTERM), 0);

  // The same node attests again (fresh token, fresh data dir) and uses its new SVID.
  auto second = StartAttestedAgent(broker_, "node-s",
                                   {.data_dir = temp_dir() + "/agent-s2",
                                    .socket = temp_dir() + "/run/s2.sock",
                                    .extra_args = {}});
  ASSERT_TRUE(second.ok()) << second.status();
  auto new_credentials = ReadAgentCredentials(*second);
  ASSERT_TRUE(new_credentials.ok()) << new_credentials.status();
  ASSERT_NE(new_credentials->chain_pem, old_credentials->chain_pem);
  auto new_node = NodeClient(broker_, *new_credentials);
  grpc::Status current = MintJwt(*new_node, entry);
  ASSERT_TRUE(current.ok()) << Describe(current);

  // Once the new SVID is in use, the old one is refused (the agent's Sync stream has used it,
  // and so has the call above).
  grpc::Status stale;
  ASSERT_TRUE(WaitUntil(
      [&] {
        stale = MintJwt(*old_node, entry);
        return !stale.ok();
      },
      15s, 50ms))
      << "the superseded certificate is still accepted";
  EXPECT_EQ(stale.error_code(), grpc::StatusCode::UNAUTHENTICATED) << Describe(stale);
  EXPECT_THAT(stale.error_message(), HasSubstr("superseded"));
  EXPECT_TRUE(MintJwt(*new_node, entry).ok());
}

TEST_F(NodeApiTest, StoreErrorsAreUnavailableNotVerdicts) {
  ASSERT_NO_FATAL_FAILURE(StartBrokerOnly());
  AgentProcess agent;
  std::string entry;
  ASSERT_NO_FATAL_FAILURE(StartNode("node-u", &agent, &entry));
  auto credentials = ReadAgentCredentials(agent);
  ASSERT_TRUE(credentials.ok()) << credentials.status();
  auto node = NodeClient(broker_, *credentials);
  ASSERT_TRUE(MintJwt(*node, entry).ok());
  auto token = GenerateJoinToken(broker_, "node-late");
  ASSERT_TRUE(token.ok()) << token.status();

  // The node table becomes unreadable (as on a broken disk or a botched migration).
  CommandResult away = TamperWithStore(broker_, "ALTER TABLE attested_nodes RENAME TO nodes_away");
  ASSERT_EQ(away.exit_code, 0) << away;
  grpc::Status during = MintJwt(*node, entry);
  EXPECT_EQ(during.error_code(), grpc::StatusCode::UNAVAILABLE) << Describe(during);
  {
    // Attestation too: the join token is good, the store cannot say whether the node is banned.
    auto key = crypto::PrivateKey::GenerateP256();
    ASSERT_TRUE(key.ok());
    auto csr = crypto::CreateCsrDer(*key, "");
    ASSERT_TRUE(csr.ok()) << csr.status();
    auto anonymous = NodeClient(broker_, {});
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    auto stream = anonymous->Attest(&context);
    nodepb::AttestRequest request;
    request.mutable_params()->set_attestor("join_token");
    request.mutable_params()->set_payload(*token);
    request.mutable_params()->set_csr(*csr);
    ASSERT_TRUE(stream->Write(request));
    stream->WritesDone();
    nodepb::AttestResponse response;
    while (stream->Read(&response)) {
    }
    grpc::Status attested = stream->Finish();
    EXPECT_EQ(attested.error_code(), grpc::StatusCode::UNAVAILABLE) << Describe(attested);
  }

  CommandResult back = TamperWithStore(broker_, "ALTER TABLE nodes_away RENAME TO attested_nodes");
  ASSERT_EQ(back.exit_code, 0) << back;
  grpc::Status after = MintJwt(*node, entry);
  EXPECT_TRUE(after.ok()) << Describe(after);
}

}  // namespace
}  // namespace mandate::integration
