// CallerIdentifier::IdentifyPeer: the checks between the credentials a connection was accepted
// with and the /proc reads of the attestor, on the path every Workload API call takes
// (AttestPinned). Real processes and the real /proc: the test process, and children it forks.
#include "broker/agent/caller_identity.h"

#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::agent {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

namespace fs = std::filesystem;

int PidfdOpen(pid_t pid) { return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)); }

bool HasPrefix(const spiffe::SelectorSet& set, const std::string& prefix) {
  for (const std::string& s : set.strings()) {
    if (s.starts_with(prefix)) return true;
  }
  return false;
}

class CallerIdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    self_pidfd_ = PidfdOpen(::getpid());
    ASSERT_GE(self_pidfd_, 0);
  }
  void TearDown() override { ::close(self_pidfd_); }

  // The credentials the listener records when this process connects.
  grpcutil::PeerCredentials Self() const {
    grpcutil::PeerCredentials peer;
    peer.pid = ::getpid();
    peer.uid = ::geteuid();
    peer.gid = ::getegid();
    peer.pidfd = self_pidfd_;
    auto exe = attestor_.ReadExecutable(::getpid());
    EXPECT_TRUE(exe.ok()) << exe.status();
    peer.exe_pinned = exe.ok();
    if (exe.ok()) peer.exe = {exe->device, exe->inode};
    return peer;
  }

  unix_attestor::UnixAttestor attestor_;  // the real /proc
  CallerIdentifier identifier_{attestor_};
  int self_pidfd_ = -1;
};

TEST_F(CallerIdentityTest, ALiveCallerRunningItsPinnedExecutableIsIdentified) {
  auto caller = identifier_.IdentifyPeer(Self());
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_TRUE(caller->selectors.Contains("unix:uid:" + std::to_string(::geteuid())));
  EXPECT_TRUE(
      caller->selectors.Contains("unix:path:" + fs::read_symlink("/proc/self/exe").string()));
  EXPECT_TRUE(HasPrefix(caller->selectors, "unix:sha256:"));
}

// The pid named in the credentials is alive and attestable (as a reused pid would be), but the
// process that connected has exited: only its pidfd tells.
TEST_F(CallerIdentityTest, PidfdOfAnExitedProcessIsRefusedEvenWhenThePidIsAlive) {
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  int pidfd = PidfdOpen(child);
  ASSERT_GE(pidfd, 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  grpcutil::PeerCredentials peer = Self();
  peer.pidfd = pidfd;
  auto caller = identifier_.IdentifyPeer(peer);
  ::close(pidfd);
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("exited"));
}

TEST_F(CallerIdentityTest, UidOrGidOtherThanAtConnectIsRefused) {
  grpcutil::PeerCredentials peer = Self();
  peer.uid += 1;
  auto caller = identifier_.IdentifyPeer(peer);
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("changed user or group"));
  peer = Self();
  peer.gid += 1;
  EXPECT_EQ(identifier_.IdentifyPeer(peer).status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(CallerIdentityTest, NoPidfdIsRefused) {
  grpcutil::PeerCredentials peer = Self();
  peer.pidfd = -1;
  auto caller = identifier_.IdentifyPeer(peer);
  EXPECT_EQ(caller.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(caller.status().message()), HasSubstr("before it could be identified"));
}

// A child pinned while it runs this test binary, then exec'ing /usr/bin/sleep (same pid, same
// start time, same uid): calls held to the pinned image are refused; a connection pinned to
// sleep (one made after the exec) is served with sleep's selectors.
TEST_F(CallerIdentityTest, ExecAfterConnectIsRefused) {
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  pid_t child = ::fork();
  if (child == 0) {
    ::close(go[1]);
    char byte;
    (void)!::read(go[0], &byte, 1);
    ::execl("/usr/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ASSERT_GT(child, 0);
  ::close(go[0]);
  struct Reap {
    pid_t pid;
    ~Reap() {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  } reap{child};
  int pidfd = PidfdOpen(child);
  ASSERT_GE(pidfd, 0);
  grpcutil::PeerCredentials peer = Self();
  peer.pid = child;
  peer.pidfd = pidfd;
  auto at_connect = attestor_.ReadExecutable(child);
  ASSERT_TRUE(at_connect.ok()) << at_connect.status();
  peer.exe = {at_connect->device, at_connect->inode};
  ASSERT_TRUE(identifier_.IdentifyPeer(peer).ok());  // before the exec: served

  ASSERT_EQ(::write(go[1], "x", 1), 1);
  ::close(go[1]);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (fs::read_symlink("/proc/" + std::to_string(child) + "/exe") != "/usr/bin/sleep") {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "child did not exec sleep";
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto after_exec = identifier_.IdentifyPeer(peer);
  EXPECT_EQ(after_exec.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(after_exec.status().message()), HasSubstr("another executable"));

  auto sleep_exe = attestor_.ReadExecutable(child);
  ASSERT_TRUE(sleep_exe.ok());
  peer.exe = {sleep_exe->device, sleep_exe->inode};
  auto pinned_to_sleep = identifier_.IdentifyPeer(peer);
  ASSERT_TRUE(pinned_to_sleep.ok()) << pinned_to_sleep.status();
  EXPECT_TRUE(pinned_to_sleep->selectors.Contains("unix:path:/usr/bin/sleep"));
  ::close(pidfd);
}

TEST_F(CallerIdentityTest, WithoutAPinnedExecutableNoPathOrDigestIsClaimed) {
  grpcutil::PeerCredentials peer = Self();
  peer.exe_pinned = false;
  auto caller = identifier_.IdentifyPeer(peer);
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_TRUE(caller->selectors.Contains("unix:uid:" + std::to_string(::geteuid())));
  EXPECT_FALSE(HasPrefix(caller->selectors, "unix:path:"));
  EXPECT_FALSE(HasPrefix(caller->selectors, "unix:sha256:"));
}

TEST_F(CallerIdentityTest, DigestIsLeftOutWhenNoEntryNeedsIt) {
  CallerIdentifier no_need(attestor_, [](const std::vector<spiffe::Selector>&) { return false; });
  auto caller = no_need.IdentifyPeer(Self());
  ASSERT_TRUE(caller.ok()) << caller.status();
  EXPECT_FALSE(HasPrefix(caller->selectors, "unix:sha256:"));
  EXPECT_TRUE(HasPrefix(caller->selectors, "unix:path:"));
}

}  // namespace
}  // namespace mandate::agent
