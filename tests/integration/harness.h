// A small fixture for integration tests that run the real daemons (mandate-broker, mandate-agent)
// and the `mandate` CLI as child processes, on loopback TCP and Unix sockets inside a per-test
// temporary directory.
//
// Guarantees:
// - Every process started here is killed (SIGTERM, then SIGKILL after a timeout) and reaped in
//   TearDown, and is also sent SIGKILL by the kernel if the test process dies first
//   (PR_SET_PDEATHSIG), so no daemon outlives its test.
// - The temporary directory is removed in TearDown, whether the test passed or failed.
// - Each daemon writes stdout and stderr to its own log file in the temporary directory; when the
//   test failed, TearDown prints every log so the failure can be understood from CI output.
// - Nothing sleeps for a fixed time where a condition can be polled (WaitUntil).
//
// Thread-safety: a fixture is used from the test's thread only. Processes are started with
// fork + execve, doing only async-signal-safe work in the child, so it is safe while gRPC
// threads run in the test process.
#ifndef MANDATE_TESTS_INTEGRATION_HARNESS_H_
#define MANDATE_TESTS_INTEGRATION_HARNESS_H_

#include <gtest/gtest.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::integration {

using namespace std::chrono_literals;

// Readiness of a daemon (endpoints written, /readyz 200, socket present).
inline constexpr std::chrono::milliseconds kReadyTimeout = 10s;

// Where the three binaries are: $MANDATE_BUILD_DIR (set by ctest), else the build directory
// compiled into the test.
std::string BuildDir();
std::string BrokerBinary();
std::string AgentBinary();
std::string CliBinary();

// Polls `predicate` every `interval` until it returns true (true) or `timeout` passes (false).
// The predicate is evaluated once more at the deadline, so a slow last step still counts.
bool WaitUntil(const std::function<bool()>& predicate, std::chrono::milliseconds timeout,
               std::chrono::milliseconds interval = 20ms);

// The contents of `path`, or "" when it cannot be read.
std::string ReadFileOrEmpty(const std::string& path);
absl::Status WriteFile(const std::string& path, const std::string& contents, mode_t mode = 0600);

struct HttpResponse {
  int status = 0;
  std::string body;
};
// A plain HTTP/1.1 GET to "127.0.0.1:PORT" (IPv4 loopback only) with a 5 s timeout.
absl::StatusOr<HttpResponse> HttpGet(const std::string& host_port, const std::string& path);

struct CommandResult {
  // The exit code; 128 + N when killed by signal N; -1 when it could not be run or timed out.
  int exit_code = -1;
  std::string out;
  std::string err;
};
// Prints a CommandResult in assertion messages.
std::ostream& operator<<(std::ostream& os, const CommandResult& r);

// Runs `argv` (argv[0] an absolute path) to completion with stdin from /dev/null and captured
// stdout/stderr. The child's environment is the test's, minus MANDATE_* and SPIFFE_* variables
// (so a developer's shell cannot change the outcome) and proxy variables (all traffic is local),
// plus `env`. Killed after `timeout`. Daemons get the same environment.
CommandResult RunCommand(const std::vector<std::string>& argv,
                         const std::map<std::string, std::string>& env = {},
                         std::chrono::milliseconds timeout = 30s);

struct BrokerProcess;
// Runs one SQL statement with one bound parameter (empty: none) on `broker`'s store file behind
// its back (Python's sqlite3: a second writer, as an intruder would be).
CommandResult TamperWithStore(const BrokerProcess& broker, const std::string& sql,
                              const std::string& parameter = "");

// A running broker, as told by its endpoints.json.
struct BrokerProcess {
  pid_t pid = -1;
  std::string data_dir;
  std::string trust_domain;
  std::string agent_address;  // "127.0.0.1:PORT"
  std::string http_address;   // "127.0.0.1:PORT"
  std::string issuer_url;
  std::string admin_socket;
  std::string bundle_path;  // <data-dir>/bundle.pem
  std::string log_path;

  // spiffe://<td>/node/join/<name>
  std::string JoinNodeId(const std::string& name) const;
  // spiffe://<td><path>
  std::string Id(const std::string& path) const;
};

struct AgentProcess {
  pid_t pid = -1;
  std::string data_dir;
  std::string socket;  // Workload API socket path
  std::string log_path;
};

struct BrokerOptions {
  std::string data_dir;  // default <temp>/broker
  std::string trust_domain = "example.org";
  std::string agent_listen = "127.0.0.1:0";
  std::string http_listen = "127.0.0.1:0";
  std::vector<std::string> extra_args;
  // Run through this command first, which must exec the broker in the same process
  // (an absolute path, e.g. {"/usr/bin/prlimit", "--nofile=128:128", "--"}).
  std::vector<std::string> command_prefix;
};

struct AgentOptions {
  std::string data_dir;                 // default <temp>/agent
  std::string socket;                   // default <temp>/run/agent.sock
  std::vector<std::string> extra_args;  // e.g. {"--tpm-tcti", "swtpm:path=..."}
};

class IntegrationTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override;

  const std::string& temp_dir() const { return temp_dir_; }

  // Starts mandate-broker and waits (kReadyTimeout) until it wrote endpoints.json with its own
  // pid and answers GET /readyz with 200. The error carries the broker's log.
  absl::StatusOr<BrokerProcess> StartBroker(BrokerOptions options = {});

  // Starts mandate-agent against `broker`, the join token (empty: none) in a 0600 file passed
  // with --join-token-file, and waits until the Workload API socket exists. A stale socket from
  // an earlier run is removed first so that its presence proves this process made it.
  absl::StatusOr<AgentProcess> StartAgent(const BrokerProcess& broker,
                                          const std::string& join_token, AgentOptions options = {});

  // Starts mandate-agent like StartAgent but expects it to exit (attestation refused): returns
  // its exit code (or -1 if it was still running after `timeout`, then it is killed) and its log
  // in `err`.
  CommandResult RunAgentUntilExit(const BrokerProcess& broker, const std::string& join_token,
                                  AgentOptions options = {},
                                  std::chrono::milliseconds timeout = 10s);

  // Starts `argv` (argv[0] absolute) as a tracked daemon with its output in a log file, and
  // waits (kReadyTimeout) until a line of the log starts with `ready_prefix`; returns that line's
  // remainder (e.g. a bound address). The error carries the log.
  absl::StatusOr<std::pair<pid_t, std::string>> StartService(const std::vector<std::string>& argv,
                                                             const std::string& ready_prefix);

  // Sends `signal` to a process this fixture started and reaps it, waiting up to `timeout`.
  // Returns the exit code (128 + N if killed by signal N), or -1 if it did not exit in time
  // (the process is then left running for TearDown to kill).
  int StopProcess(pid_t pid, int signal, std::chrono::milliseconds timeout = 10s);

  // True while `pid` (started by this fixture) has not exited.
  bool IsRunning(pid_t pid);

  // RunCommand on the `mandate` CLI.
  CommandResult RunCli(const std::vector<std::string>& args,
                       const std::map<std::string, std::string>& env = {});
  // The CLI against the broker's admin socket, e.g. Admin(b, {"entry", "list"}).
  CommandResult Admin(const BrokerProcess& broker, const std::vector<std::string>& args);
  // The CLI against the agent's Workload API socket, e.g. Workload(a, {"fetch", "x509"}).
  CommandResult Workload(const AgentProcess& agent, const std::vector<std::string>& args);

  // `mandate token generate` for spiffe://<td>/node/join/<name>; returns the token.
  absl::StatusOr<std::string> GenerateJoinToken(const BrokerProcess& broker,
                                                const std::string& name, int ttl_seconds = 0);
  // `mandate entry create --output json`; returns the new entry's ID.
  absl::StatusOr<std::string> CreateEntry(const BrokerProcess& broker, const std::string& parent_id,
                                          const std::string& spiffe_id,
                                          const std::vector<std::string>& selectors);
  // GenerateJoinToken + StartAgent.
  absl::StatusOr<AgentProcess> StartAttestedAgent(const BrokerProcess& broker,
                                                  const std::string& node_name,
                                                  AgentOptions options = {});

  // "unix:uid:<getuid()>": the selector that matches this test process and the CLI it runs.
  static std::string OwnUidSelector();

 private:
  // fork + execve with stdout and stderr appended to `log_path`; tracked for TearDown.
  absl::StatusOr<pid_t> SpawnDaemon(const std::vector<std::string>& argv,
                                    const std::map<std::string, std::string>& env,
                                    const std::string& log_path);
  // waitpid with a deadline; on exit records the status and forgets the pid.
  std::optional<int> WaitForExit(pid_t pid, std::chrono::milliseconds timeout);
  std::vector<std::string> AgentArgv(const BrokerProcess& broker, const std::string& join_token,
                                     AgentOptions& options);
  std::string NextLogPath(const std::string& stem);

  std::string temp_dir_;
  std::vector<pid_t> running_;
  std::map<pid_t, int> exit_codes_;  // of processes reaped so far
  std::vector<std::string> logs_;
  int log_counter_ = 0;
};

}  // namespace mandate::integration

#endif  // MANDATE_TESTS_INTEGRATION_HARNESS_H_
