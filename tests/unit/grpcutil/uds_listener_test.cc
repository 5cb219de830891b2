#include "broker/common/grpcutil/uds_listener.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "mandate/admin/v1/admin.grpc.pb.h"

namespace mandate::grpcutil {
namespace {

namespace adminpb = mandate::admin::v1;

// Answers GetBundle with "pid uid pidfd_alive" of the caller as the listener saw it.
class WhoAmI final : public adminpb::Admin::Service {
 public:
  const UdsListener* listener = nullptr;
  bool report_start_time = false;
  grpc::Status GetBundle(grpc::ServerContext* context, const adminpb::GetBundleRequest*,
                         adminpb::GetBundleResponse* response) override {
    auto peer = listener->PeerOf(*context);
    if (!peer.ok()) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(peer.status().message()));
    }
    response->set_trust_domain(std::to_string(peer->pid) + " " + std::to_string(peer->uid) + " " +
                               (PidfdAlive(peer->pidfd) ? "alive" : "gone"));
    if (report_start_time) response->set_jwks(std::to_string(peer->start_time));
    return grpc::Status::OK;
  }
};

class UdsListenerTest : public ::testing::Test {
 protected:
  // gRPC closes a connection some time after its peer does; poll instead of sleeping.
  template <typename Fn>
  bool WaitForOk(Fn fn) {
    for (int i = 0; i < 100; ++i) {
      if (fn()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "mandate-uds-XXXXXX").string();
    dir_ = ::mkdtemp(pattern.data());
    path_ = dir_ + "/s.sock";
    grpc::ServerBuilder builder;
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
  }
  void TearDown() override {
    if (listener_) listener_->Stop();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    std::filesystem::remove_all(dir_);
  }
  void Listen(UdsListener::AcceptFilter filter = nullptr) {
    auto listener = UdsListener::Start(server_.get(), path_, 0600, std::move(filter));
    ASSERT_TRUE(listener.ok()) << listener.status();
    listener_ = std::move(*listener);
    service_.listener = listener_.get();
  }
  grpc::Status Call(adminpb::GetBundleResponse* response) {
    auto stub = adminpb::Admin::NewStub(
        grpc::CreateChannel("unix:" + path_, grpc::InsecureChannelCredentials()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    return stub->GetBundle(&context, adminpb::GetBundleRequest(), response);
  }

  std::string dir_, path_;
  WhoAmI service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<UdsListener> listener_;
};

TEST_F(UdsListenerTest, HandlersSeeTheCallersCredentials) {
  Listen();
  adminpb::GetBundleResponse response;
  grpc::Status status = Call(&response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.trust_domain(),
            std::to_string(::getpid()) + " " + std::to_string(::geteuid()) + " alive");
}

TEST_F(UdsListenerTest, StartTimeIsTakenAtAccept) {
  auto listener = UdsListener::Start(
      server_.get(), path_, 0600, nullptr,
      [](pid_t pid) -> absl::StatusOr<uint64_t> { return pid == ::getpid() ? 4242 : 1; });
  ASSERT_TRUE(listener.ok());
  listener_ = std::move(*listener);
  service_.listener = listener_.get();
  service_.report_start_time = true;
  adminpb::GetBundleResponse response;
  ASSERT_TRUE(Call(&response).ok());
  EXPECT_EQ(response.jwks(), "4242");
}

TEST_F(UdsListenerTest, ConnectionsBeyondThePerUidCapAreClosed) {
  Listen();
  listener_->SetMaxConnectionsPerUidForTesting(2);
  auto connect_raw = [&] {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path_.c_str());
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    return fd;
  };
  int a = connect_raw();
  int b = connect_raw();
  int c = connect_raw();
  // The third connection is closed by the listener: reading it sees end of file.
  pollfd p{c, POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 5000), 1);
  char byte;
  EXPECT_EQ(::read(c, &byte, 1), 0);
  ::close(c);
  // Closing one frees a slot: a real call gets through again.
  ::close(a);
  ::close(b);
  adminpb::GetBundleResponse response;
  EXPECT_TRUE(WaitForOk([&] { return Call(&response).ok(); }));
}

TEST_F(UdsListenerTest, SocketGetsTheRequestedMode) {
  Listen();
  struct stat st {};
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(UdsListenerTest, FilteredConnectionsNeverReachHandlers) {
  Listen([](const PeerCredentials&) { return false; });
  adminpb::GetBundleResponse response;
  EXPECT_FALSE(Call(&response).ok());
  EXPECT_TRUE(response.trust_domain().empty());
}

TEST_F(UdsListenerTest, RefusesToReplaceARegularFile) {
  std::ofstream(path_) << "not a socket";
  auto listener = UdsListener::Start(server_.get(), path_, 0600, nullptr);
  EXPECT_EQ(listener.status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(UdsListenerTest, StopRemovesTheSocket) {
  Listen();
  listener_->Stop();
  EXPECT_FALSE(std::filesystem::exists(path_));
}

TEST_F(UdsListenerTest, PidfdOfAnExitedProcessIsNotAlive) {
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, child, 0));
  ASSERT_GE(pidfd, 0);
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_FALSE(PidfdAlive(pidfd));
  ::close(pidfd);
  EXPECT_FALSE(PidfdAlive(-1));
}

}  // namespace
}  // namespace mandate::grpcutil
