// The admin socket's two locks (DESIGN.md §6; docs/threat-model.md): the socket file is created
// with mode 0600, and behind it the broker accepts only connections from its own uid or root
// (SO_PEERCRED). The second is tested by loosening the first: with the file opened to everyone,
// another user's `mandate` CLI reaches the socket and is still refused.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

using ::testing::HasSubstr;

constexpr char kNobody[] = "65534";

class AdminSocketTest : public IntegrationTest {
 protected:
  // `mandate <args>` run as uid/gid 65534 with no supplementary groups.
  CommandResult RunCliAsNobody(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"/usr/bin/setpriv", "--reuid",  kNobody, "--regid", kNobody,
                                     "--clear-groups",   CliBinary()};
    argv.insert(argv.end(), args.begin(), args.end());
    return RunCommand(argv);
  }
};

TEST_F(AdminSocketTest, IsMode0600AndRefusesOtherUsersEvenWhenLoosened) {
  if (::geteuid() != 0) {
    // CI runs the suite as root; a developer's unprivileged run skips, CI must not.
    const char* ci = std::getenv("CI");
    ASSERT_FALSE(ci != nullptr && std::string(ci) == "true") << "CI=true needs root (setpriv)";
    GTEST_SKIP() << "needs root to run the CLI as another user (setpriv)";
  }
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  struct stat st {};
  ASSERT_EQ(::stat(broker->admin_socket.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u) << std::oct << (st.st_mode & 07777);
  EXPECT_EQ(st.st_uid, ::geteuid());

  // Open the way to the socket for everyone: its directories and the file itself.
  ASSERT_EQ(::chmod(temp_dir().c_str(), 0711), 0);
  ASSERT_EQ(::chmod(broker->data_dir.c_str(), 0711), 0);
  ASSERT_EQ(::chmod(broker->admin_socket.c_str(), 0666), 0);

  // uid 65534 can run the CLI at all (so a refusal below is the broker's doing) ...
  CommandResult runs = RunCliAsNobody({"--help"});
  ASSERT_EQ(runs.exit_code, 0) << runs;
  // ... and is refused by the broker's peer check, and nothing it asked for happens.
  const std::vector<std::string> create_token = {"--admin-socket", broker->admin_socket,
                                                 "token",          "generate",
                                                 "--spiffe-id",    broker->JoinNodeId("intruder")};
  CommandResult refused = RunCliAsNobody(create_token);
  EXPECT_NE(refused.exit_code, 0) << refused;
  EXPECT_THAT(refused.err, HasSubstr("UNAVAILABLE")) << refused;
  CommandResult listed = RunCliAsNobody({"--admin-socket", broker->admin_socket, "entry", "list"});
  EXPECT_NE(listed.exit_code, 0) << listed;
  EXPECT_EQ(listed.out, "") << listed;

  // The broker's own uid (root here) still gets through the same socket.
  CommandResult own = Admin(*broker, {"--output", "json", "audit", "list"});
  ASSERT_EQ(own.exit_code, 0) << own;
  EXPECT_THAT(own.out, ::testing::Not(HasSubstr("intruder")))
      << "the refused call created a join token";
}

}  // namespace
}  // namespace mandate::integration
