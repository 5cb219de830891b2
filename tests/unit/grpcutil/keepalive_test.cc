// The agent's broker keepalive against the broker's ping policy, with a real gRPC server and
// channel on loopback: an idle Sync stream (what every agent keeps open) and its connection must
// survive the agent's pings. Intervals are scaled down (1 s instead of 30 s) so the test takes
// seconds; the relation between both sides is the one production uses.
#include "broker/common/grpcutil/keepalive.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mandate/node/v1/node.grpc.pb.h"

namespace mandate::grpcutil {
namespace {

namespace nodepb = mandate::node::v1;
using namespace std::chrono_literals;

// gRPC sends at most one ping a second whatever the keepalive time, so this is the shortest
// interval that scales the production one faithfully.
constexpr int kKeepaliveMs = 1000;

// Sync streams that send one snapshot, then stay open and silent until stopped; each records
// the peer address (the client's port names its TCP connection).
class IdleSync final : public nodepb::NodeApi::Service {
 public:
  grpc::Status Sync(grpc::ServerContext* context, const nodepb::SyncRequest*,
                    grpc::ServerWriter<nodepb::SyncResponse>* writer) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      peers_.push_back(context->peer());
    }
    writer->Write(nodepb::SyncResponse());
    while (!context->IsCancelled() && !stop_) std::this_thread::sleep_for(10ms);
    return grpc::Status::OK;
  }
  std::vector<std::string> peers() {
    std::lock_guard<std::mutex> lock(mu_);
    return peers_;
  }
  std::atomic<bool> stop_{false};

 private:
  std::mutex mu_;
  std::vector<std::string> peers_;
};

struct Outcome {
  bool stream_ended_early = false;  // the idle stream ended before the server was stopped
  bool same_connection = false;     // a call made after the idle time used the same connection
  grpc::Status status;              // the idle stream's final status
};

// Opens a Sync stream from a channel with the agent's keepalive, keeps it idle for `idle`, then
// opens a second one and reports whether both streams share the first connection.
Outcome KeepIdle(bool server_accepts_keepalive, std::chrono::milliseconds idle) {
  IdleSync service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  if (server_accepts_keepalive) AcceptAgentKeepalive(builder, kKeepaliveMs);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  EXPECT_NE(port, 0);

  grpc::ChannelArguments args;
  SetAgentKeepalive(args, kKeepaliveMs);
  auto channel = grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(port),
                                           grpc::InsecureChannelCredentials(), args);
  auto stub = nodepb::NodeApi::NewStub(channel);
  const auto deadline = std::chrono::system_clock::now() + idle + 10s;
  grpc::ClientContext first_context;
  first_context.set_deadline(deadline);
  auto first = stub->Sync(&first_context, nodepb::SyncRequest());
  nodepb::SyncResponse snapshot;
  EXPECT_TRUE(first->Read(&snapshot));
  std::atomic<bool> ended{false};
  std::thread watcher([&] {
    nodepb::SyncResponse more;
    while (first->Read(&more)) {
    }
    ended = true;
  });

  std::this_thread::sleep_for(idle);
  Outcome outcome;
  outcome.stream_ended_early = ended.load();
  grpc::ClientContext second_context;
  second_context.set_deadline(deadline);
  auto second = stub->Sync(&second_context, nodepb::SyncRequest());
  EXPECT_TRUE(second->Read(&snapshot));
  std::vector<std::string> peers = service.peers();
  EXPECT_EQ(peers.size(), 2u);
  outcome.same_connection = peers.size() == 2 && peers[0] == peers[1];

  service.stop_ = true;
  watcher.join();
  outcome.status = first->Finish();
  while (second->Read(&snapshot)) {
  }
  second->Finish();
  server->Shutdown(std::chrono::system_clock::now() + 1s);
  return outcome;
}

TEST(AgentKeepaliveTest, AnIdleSyncStreamAndItsConnectionSurviveTheAgentsPings) {
  // 4 s: four pings, past the two strikes that end a connection under gRPC's defaults.
  Outcome outcome = KeepIdle(/*server_accepts_keepalive=*/true, 4000ms);
  EXPECT_FALSE(outcome.stream_ended_early) << outcome.status.error_message();
  EXPECT_TRUE(outcome.same_connection);
  EXPECT_TRUE(outcome.status.ok())
      << outcome.status.error_code() << " " << outcome.status.error_message();
}

// The failure the broker's policy fixes, reproduced with gRPC's default server settings (what
// the broker had): the agent's pings earn a GOAWAY too_many_pings, the connection is retired
// and the next call needs a new one. (The test above, without AcceptAgentKeepalive.)
TEST(AgentKeepaliveTest, WithGrpcDefaultsTheServerCutsTheAgentOff) {
  Outcome outcome = KeepIdle(/*server_accepts_keepalive=*/false, 4000ms);
  EXPECT_FALSE(outcome.same_connection);
}

}  // namespace
}  // namespace mandate::grpcutil
