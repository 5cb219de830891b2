#include "tests/integration/harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

extern char** environ;

namespace mandate::integration {
namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

// The child's environment: ours without MANDATE_* / SPIFFE_* plus `extra`.
std::vector<std::string> ChildEnvironment(const std::map<std::string, std::string>& extra) {
  std::vector<std::string> out;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    std::string_view entry(*e);
    if (entry.starts_with("MANDATE_") || entry.starts_with("SPIFFE_")) continue;
    std::string name(entry.substr(0, entry.find('=')));
    // gRPC and Python honour proxy variables; everything here is loopback or a Unix socket.
    std::string lower = absl::AsciiStrToLower(name);
    if (lower == "http_proxy" || lower == "https_proxy" || lower == "grpc_proxy" ||
        lower == "all_proxy") {
      continue;
    }
    if (extra.count(name) != 0) continue;
    out.emplace_back(entry);
  }
  for (const auto& [name, value] : extra) out.push_back(absl::StrCat(name, "=", value));
  return out;
}

std::vector<char*> CStrings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// In the child between fork and execve: async-signal-safe calls only.
[[noreturn]] void ExecChild(pid_t parent, int stdout_fd, int stderr_fd, char* const argv[],
                            char* const envp[]) {
  // Die with the test process, even if it crashes before TearDown.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(126);
  // Undo the signal mask a daemon-like parent might have; gtest does not block signals, but
  // gRPC threads might have, and the mask is inherited from the forking thread.
  sigset_t empty;
  sigemptyset(&empty);
  ::sigprocmask(SIG_SETMASK, &empty, nullptr);
  int null_fd = ::open("/dev/null", O_RDONLY);
  if (null_fd < 0 || ::dup2(null_fd, 0) < 0) ::_exit(126);
  if (::dup2(stdout_fd, 1) < 0 || ::dup2(stderr_fd, 2) < 0) ::_exit(126);
  ::execve(argv[0], argv, envp);
  ::_exit(127);
}

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& host_port) {
  auto colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port)) {
    return absl::InvalidArgumentError(absl::StrCat("not HOST:PORT: ", host_port));
  }
  return std::make_pair(host_port.substr(0, colon), port);
}

std::string Tail(const std::string& s, size_t max) {
  return s.size() <= max ? s : absl::StrCat("...", s.substr(s.size() - max));
}

}  // namespace

std::string BuildDir() {
  if (const char* dir = std::getenv("MANDATE_BUILD_DIR"); dir != nullptr && *dir != '\0') {
    return dir;
  }
  return MANDATE_INTEGRATION_BUILD_DIR;
}
std::string BrokerBinary() { return BuildDir() + "/broker/server/mandate-broker"; }
std::string AgentBinary() { return BuildDir() + "/broker/agent/mandate-agent"; }
std::string CliBinary() { return BuildDir() + "/sdk/mandate"; }

bool WaitUntil(const std::function<bool()>& predicate, std::chrono::milliseconds timeout,
               std::chrono::milliseconds interval) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (predicate()) return true;
    std::this_thread::sleep_for(interval);
  }
  return predicate();
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return "";
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status WriteFile(const std::string& path, const std::string& contents, mode_t mode) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", std::strerror(errno)));
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("write ", path, ": ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return absl::OkStatus();
}

absl::StatusOr<HttpResponse> HttpGet(const std::string& host_port, const std::string& path) {
  auto hp = SplitHostPort(host_port);
  if (!hp.ok()) return hp.status();
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(hp->second));
  if (::inet_pton(AF_INET, hp->first.c_str(), &addr.sin_addr) != 1) {
    return absl::InvalidArgumentError(absl::StrCat("not an IPv4 address: ", hp->first));
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(std::strerror(errno));
  timeval tv{.tv_sec = 5, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int e = errno;
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("connect ", host_port, ": ", std::strerror(e)));
  }
  std::string request =
      absl::StrCat("GET ", path, " HTTP/1.1\r\nHost: ", host_port, "\r\nConnection: close\r\n\r\n");
  if (::send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
      static_cast<ssize_t>(request.size())) {
    ::close(fd);
    return absl::UnavailableError("send failed");
  }
  std::string raw;
  char buf[4096];
  while (true) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    raw.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  // "HTTP/1.1 200 OK\r\n...\r\n\r\nbody"
  auto space = raw.find(' ');
  auto header_end = raw.find("\r\n\r\n");
  HttpResponse response;
  if (space == std::string::npos || header_end == std::string::npos ||
      !absl::SimpleAtoi(raw.substr(space + 1, 3), &response.status)) {
    return absl::DataLossError(absl::StrCat("malformed HTTP response: ", Tail(raw, 200)));
  }
  response.body = raw.substr(header_end + 4);
  return response;
}

std::ostream& operator<<(std::ostream& os, const CommandResult& r) {
  return os << "exit=" << r.exit_code << "\n--- stdout ---\n"
            << r.out << "\n--- stderr ---\n"
            << r.err;
}

CommandResult RunCommand(const std::vector<std::string>& argv_in,
                         const std::map<std::string, std::string>& env,
                         std::chrono::milliseconds timeout) {
  CommandResult result;
  std::vector<std::string> argv_strings = argv_in;
  std::vector<std::string> env_strings = ChildEnvironment(env);
  std::vector<char*> argv = CStrings(argv_strings);
  std::vector<char*> envp = CStrings(env_strings);
  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
    result.err = absl::StrCat("pipe2: ", std::strerror(errno));
    return result;
  }
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    result.err = absl::StrCat("pipe2: ", std::strerror(errno));
    return result;
  }
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) ExecChild(parent, out_pipe[1], err_pipe[1], argv.data(), envp.data());
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (pid < 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    result.err = absl::StrCat("fork: ", std::strerror(errno));
    return result;
  }
  auto deadline = Clock::now() + timeout;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_fds = 2;
  bool timed_out = false;
  while (open_fds > 0) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    int n = ::poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[4096];
      ssize_t r = ::read(fds[i].fd, buf, sizeof(buf));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      } else {
        sinks[i]->append(buf, static_cast<size_t>(r));
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  int status = 0;
  if (timed_out) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    result.err +=
        absl::StrCat("\n[harness: ", argv_in[0], " killed after ", timeout.count(), " ms]\n");
    result.exit_code = -1;
    return result;
  }
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.exit_code = DecodeWaitStatus(status);
  return result;
}

CommandResult TamperWithStore(const BrokerProcess& broker, const std::string& sql,
                              const std::string& parameter) {
  return RunCommand({"/usr/bin/python3", "-c",
                     "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); "
                     "c.execute(sys.argv[2], (sys.argv[3],) if '?' in sys.argv[2] else ()); "
                     "c.commit()",
                     broker.data_dir + "/mandate.db", sql, parameter});
}

std::string BrokerProcess::JoinNodeId(const std::string& name) const {
  return absl::StrCat("spiffe://", trust_domain, "/node/join/", name);
}
std::string BrokerProcess::Id(const std::string& path) const {
  return absl::StrCat("spiffe://", trust_domain, path);
}

// ---------------------------------------------------------------------------- fixture

void IntegrationTest::SetUp() {
  std::string tmpl = (std::filesystem::temp_directory_path() / "mandate-integ-XXXXXX").string();
  ASSERT_NE(::mkdtemp(tmpl.data()), nullptr) << std::strerror(errno);
  temp_dir_ = tmpl;
  ASSERT_EQ(::mkdir((temp_dir_ + "/run").c_str(), 0755), 0) << std::strerror(errno);
  for (const std::string& binary : {BrokerBinary(), AgentBinary(), CliBinary()}) {
    ASSERT_EQ(::access(binary.c_str(), X_OK), 0)
        << binary << " is missing; build it first (MANDATE_BUILD_DIR=" << BuildDir() << ")";
  }
}

void IntegrationTest::TearDown() {
  // Stop everything still running: SIGTERM first so daemons can clean up, then SIGKILL.
  std::vector<pid_t> pids = running_;
  for (pid_t pid : pids) ::kill(pid, SIGTERM);
  for (pid_t pid : pids) {
    if (!WaitForExit(pid, 5s).has_value()) {
      ::kill(pid, SIGKILL);
      WaitForExit(pid, 5s);
    }
  }
  if (HasFailure()) {
    for (const std::string& log : logs_) {
      std::cerr << "==================== " << log << " ====================\n"
                << Tail(ReadFileOrEmpty(log), 32 * 1024) << "\n";
    }
  }
  if (!temp_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(temp_dir_, ec);
  }
}

std::string IntegrationTest::NextLogPath(const std::string& stem) {
  std::string path = absl::StrCat(temp_dir_, "/", stem, "-", ++log_counter_, ".log");
  logs_.push_back(path);
  return path;
}

absl::StatusOr<pid_t> IntegrationTest::SpawnDaemon(const std::vector<std::string>& argv_in,
                                                   const std::map<std::string, std::string>& env,
                                                   const std::string& log_path) {
  std::vector<std::string> argv_strings = argv_in;
  std::vector<std::string> env_strings = ChildEnvironment(env);
  std::vector<char*> argv = CStrings(argv_strings);
  std::vector<char*> envp = CStrings(env_strings);
  int log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (log_fd < 0) {
    return absl::InternalError(absl::StrCat("open ", log_path, ": ", std::strerror(errno)));
  }
  pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid == 0) ExecChild(parent, log_fd, log_fd, argv.data(), envp.data());
  ::close(log_fd);
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", std::strerror(errno)));
  running_.push_back(pid);
  return pid;
}

std::optional<int> IntegrationTest::WaitForExit(pid_t pid, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (true) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid || (r < 0 && errno == ECHILD)) {
      std::erase(running_, pid);
      int code = r == pid ? DecodeWaitStatus(status) : -1;
      exit_codes_[pid] = code;
      return code;
    }
    if (Clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(10ms);
  }
}

bool IntegrationTest::IsRunning(pid_t pid) {
  if (std::find(running_.begin(), running_.end(), pid) == running_.end()) return false;
  return !WaitForExit(pid, 0ms).has_value();
}

int IntegrationTest::StopProcess(pid_t pid, int signal, std::chrono::milliseconds timeout) {
  if (std::find(running_.begin(), running_.end(), pid) == running_.end()) {
    // Already reaped (it exited on its own): report how it ended.
    if (auto it = exit_codes_.find(pid); it != exit_codes_.end()) return it->second;
    ADD_FAILURE() << "StopProcess(" << pid << "): not a running process of this test";
    return -1;
  }
  ::kill(pid, signal);
  return WaitForExit(pid, timeout).value_or(-1);
}

absl::StatusOr<BrokerProcess> IntegrationTest::StartBroker(BrokerOptions options) {
  if (options.data_dir.empty()) options.data_dir = temp_dir_ + "/broker";
  std::vector<std::string> argv = {BrokerBinary(),       "--data-dir",         options.data_dir,
                                   "--trust-domain",     options.trust_domain, "--agent-listen",
                                   options.agent_listen, "--http-listen",      options.http_listen};
  argv.insert(argv.end(), options.extra_args.begin(), options.extra_args.end());
  argv.insert(argv.begin(), options.command_prefix.begin(), options.command_prefix.end());
  std::string log_path = NextLogPath("broker");
  auto pid = SpawnDaemon(argv, {}, log_path);
  if (!pid.ok()) return pid.status();

  BrokerProcess broker;
  broker.pid = *pid;
  broker.data_dir = options.data_dir;
  broker.log_path = log_path;
  broker.bundle_path = options.data_dir + "/bundle.pem";
  bool exited = false;
  bool ready = WaitUntil(
      [&] {
        if (!IsRunning(*pid)) {
          exited = true;
          return true;
        }
        // An endpoints.json left by an earlier run on the same data dir names another pid.
        json endpoints =
            json::parse(ReadFileOrEmpty(options.data_dir + "/endpoints.json"), nullptr, false);
        if (endpoints.is_discarded() || !endpoints.is_object() || !endpoints.contains("pid") ||
            !endpoints["pid"].is_number_integer() || endpoints["pid"].get<pid_t>() != *pid) {
          return false;
        }
        for (const char* key :
             {"agent_address", "http_address", "issuer_url", "admin_socket", "trust_domain"}) {
          if (!endpoints.contains(key) || !endpoints[key].is_string()) return false;
        }
        broker.agent_address = endpoints["agent_address"].get<std::string>();
        broker.http_address = endpoints["http_address"].get<std::string>();
        broker.issuer_url = endpoints["issuer_url"].get<std::string>();
        broker.admin_socket = endpoints["admin_socket"].get<std::string>();
        broker.trust_domain = endpoints["trust_domain"].get<std::string>();
        auto readyz = HttpGet(broker.http_address, "/readyz");
        return readyz.ok() && readyz->status == 200;
      },
      kReadyTimeout, 25ms);
  if (exited || !ready) {
    return absl::UnavailableError(
        absl::StrCat("mandate-broker ", exited ? "exited during start" : "not ready within 10 s",
                     "; log:\n", ReadFileOrEmpty(log_path)));
  }
  return broker;
}

absl::StatusOr<std::pair<pid_t, std::string>> IntegrationTest::StartService(
    const std::vector<std::string>& argv, const std::string& ready_prefix) {
  std::string stem = argv.at(0).substr(argv.at(0).rfind('/') + 1);
  std::string log_path = NextLogPath(stem);
  auto spawned = SpawnDaemon(argv, {}, log_path);
  if (!spawned.ok()) return spawned.status();
  pid_t pid = *spawned;
  std::string found;
  bool exited = false;
  bool ready = WaitUntil(
      [&] {
        std::vector<std::string> lines = absl::StrSplit(ReadFileOrEmpty(log_path), '\n');
        for (const std::string& line : lines) {
          if (line.starts_with(ready_prefix)) {
            found = line.substr(ready_prefix.size());
            return true;
          }
        }
        exited = !IsRunning(pid);
        return exited;
      },
      kReadyTimeout, 25ms);
  if (exited || !ready) {
    return absl::UnavailableError(absl::StrCat(stem, exited ? " exited during start" : " not ready",
                                               "; log:\n", ReadFileOrEmpty(log_path)));
  }
  return std::make_pair(pid, found);
}

std::vector<std::string> IntegrationTest::AgentArgv(const BrokerProcess& broker,
                                                    const std::string& join_token,
                                                    AgentOptions& options) {
  if (options.data_dir.empty()) options.data_dir = temp_dir_ + "/agent";
  if (options.socket.empty()) options.socket = temp_dir_ + "/run/agent.sock";
  std::vector<std::string> argv = {AgentBinary(),      "--data-dir",         options.data_dir,
                                   "--broker",         broker.agent_address, "--trust-bundle",
                                   broker.bundle_path, "--socket",           options.socket};
  argv.insert(argv.end(), options.extra_args.begin(), options.extra_args.end());
  if (!join_token.empty()) {
    // A file rather than --join-token: the token does not belong in /proc/*/cmdline.
    std::string token_file = absl::StrCat(temp_dir_, "/join-token-", ++log_counter_);
    if (WriteFile(token_file, join_token + "\n", 0600).ok()) {
      argv.insert(argv.end(), {"--join-token-file", token_file});
    }
  }
  return argv;
}

absl::StatusOr<AgentProcess> IntegrationTest::StartAgent(const BrokerProcess& broker,
                                                         const std::string& join_token,
                                                         AgentOptions options) {
  std::vector<std::string> argv = AgentArgv(broker, join_token, options);
  ::unlink(options.socket.c_str());
  std::string log_path = NextLogPath("agent");
  auto pid = SpawnDaemon(argv, {}, log_path);
  if (!pid.ok()) return pid.status();
  AgentProcess agent{
      .pid = *pid, .data_dir = options.data_dir, .socket = options.socket, .log_path = log_path};
  bool exited = false;
  bool ready = WaitUntil(
      [&] {
        if (!IsRunning(*pid)) {
          exited = true;
          return true;
        }
        struct stat st {};
        return ::stat(options.socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
      },
      kReadyTimeout + 5s /* the agent waits up to 10 s for its first sync */, 25ms);
  if (exited || !ready) {
    return absl::UnavailableError(
        absl::StrCat("mandate-agent ", exited ? "exited during start" : "not ready within 15 s",
                     "; log:\n", ReadFileOrEmpty(log_path)));
  }
  return agent;
}

CommandResult IntegrationTest::RunAgentUntilExit(const BrokerProcess& broker,
                                                 const std::string& join_token,
                                                 AgentOptions options,
                                                 std::chrono::milliseconds timeout) {
  std::vector<std::string> argv = AgentArgv(broker, join_token, options);
  std::string log_path = NextLogPath("agent");
  CommandResult result;
  auto pid = SpawnDaemon(argv, {}, log_path);
  if (!pid.ok()) {
    result.err = pid.status().ToString();
    return result;
  }
  std::optional<int> code = WaitForExit(*pid, timeout);
  if (!code.has_value()) {
    ::kill(*pid, SIGKILL);
    WaitForExit(*pid, 5s);
  }
  result.exit_code = code.value_or(-1);
  result.err = ReadFileOrEmpty(log_path);
  return result;
}

CommandResult IntegrationTest::RunCli(const std::vector<std::string>& args,
                                      const std::map<std::string, std::string>& env) {
  std::vector<std::string> argv = {CliBinary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv, env);
}

CommandResult IntegrationTest::Admin(const BrokerProcess& broker,
                                     const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"--admin-socket", broker.admin_socket};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCli(argv);
}

CommandResult IntegrationTest::Workload(const AgentProcess& agent,
                                        const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"--socket", "unix://" + agent.socket};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCli(argv);
}

absl::StatusOr<std::string> IntegrationTest::GenerateJoinToken(const BrokerProcess& broker,
                                                               const std::string& name,
                                                               int ttl_seconds) {
  std::vector<std::string> args = {"token", "generate", "--spiffe-id", broker.JoinNodeId(name)};
  if (ttl_seconds > 0) args.insert(args.end(), {"--ttl", std::to_string(ttl_seconds)});
  CommandResult r = Admin(broker, args);
  std::string token(absl::StripAsciiWhitespace(r.out));
  if (r.exit_code != 0 || token.empty() || token.find('\n') != std::string::npos) {
    return absl::InternalError(absl::StrCat("token generate failed: ", r.exit_code, " ", r.err));
  }
  return token;
}

absl::StatusOr<std::string> IntegrationTest::CreateEntry(
    const BrokerProcess& broker, const std::string& parent_id, const std::string& spiffe_id,
    const std::vector<std::string>& selectors) {
  std::vector<std::string> args = {"--output",    "json",    "entry",       "create",
                                   "--parent-id", parent_id, "--spiffe-id", spiffe_id};
  for (const std::string& s : selectors) args.insert(args.end(), {"--selector", s});
  CommandResult r = Admin(broker, args);
  json created = json::parse(r.out, nullptr, false);
  if (r.exit_code != 0 || created.is_discarded() || !created.is_object() ||
      !created.contains("id") || !created["id"].is_string()) {
    return absl::InternalError(
        absl::StrCat("entry create failed: ", r.exit_code, " ", r.out, " ", r.err));
  }
  return created["id"].get<std::string>();
}

absl::StatusOr<AgentProcess> IntegrationTest::StartAttestedAgent(const BrokerProcess& broker,
                                                                 const std::string& node_name,
                                                                 AgentOptions options) {
  auto token = GenerateJoinToken(broker, node_name);
  if (!token.ok()) return token.status();
  return StartAgent(broker, *token, std::move(options));
}

std::string IntegrationTest::OwnUidSelector() { return absl::StrCat("unix:uid:", ::getuid()); }

}  // namespace mandate::integration
