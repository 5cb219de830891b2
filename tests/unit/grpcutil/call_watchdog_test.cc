#include "broker/common/grpcutil/call_watchdog.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include "mandate/node/v1/node.grpc.pb.h"

namespace mandate::grpcutil {
namespace {

namespace nodepb = mandate::node::v1;

// An Attest handler that waits for a first message forever unless the watchdog steps in.
class StallingAttest final : public nodepb::NodeApi::Service {
 public:
  explicit StallingAttest(CallWatchdog& watchdog) : watchdog_(watchdog) {}
  grpc::Status Attest(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<nodepb::AttestResponse, nodepb::AttestRequest>* stream) override {
    auto guard = watchdog_.Watch(context, std::chrono::milliseconds(200));
    nodepb::AttestRequest request;
    while (stream->Read(&request)) {
    }
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no params");
  }

 private:
  CallWatchdog& watchdog_;
};

TEST(CallWatchdogTest, SilentStreamIsCancelledAfterItsBudget) {
  CallWatchdog watchdog;
  StallingAttest service(watchdog);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  ASSERT_NE(port, 0);

  auto stub = nodepb::NodeApi::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto start = std::chrono::steady_clock::now();
  auto stream = stub->Attest(&context);
  nodepb::AttestResponse response;
  EXPECT_FALSE(stream->Read(&response));  // Ends when the server cancels, not at the deadline.
  grpc::Status status = stream->Finish();
  auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_LT(elapsed, std::chrono::seconds(10));
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

TEST(CallWatchdogTest, GuardReleasedBeforeBudgetCancelsNothing) {
  CallWatchdog watchdog;
  grpc::ServerContext context;
  { auto guard = watchdog.Watch(&context, std::chrono::milliseconds(50)); }
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  EXPECT_FALSE(context.IsCancelled());
}

}  // namespace
}  // namespace mandate::grpcutil
