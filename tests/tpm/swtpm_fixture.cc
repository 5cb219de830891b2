#include "tests/tpm/swtpm_fixture.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace mandate::testing {
namespace {

using Clock = std::chrono::steady_clock;

absl::Status WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

std::string ReadFileOrEmpty(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// fork/exec with stdout and stderr appended to `log_path`; returns the child's pid.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log_path) {
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork failed: ", std::strerror(errno)));
  if (pid == 0) {
    int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
      dup2(fd, STDOUT_FILENO);
      dup2(fd, STDERR_FILENO);
      close(fd);
    }
    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) {
      dup2(null_fd, STDIN_FILENO);
      close(null_fd);
    }
    execvp(args[0], args.data());
    _exit(127);
  }
  return pid;
}

// Runs a command to completion (killing it after `timeout`); fails with its log on a non-zero
// exit.
absl::Status Run(const std::vector<std::string>& argv, const std::string& log_path,
                 std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  absl::StatusOr<pid_t> pid = Spawn(argv, log_path);
  if (!pid.ok()) return pid.status();
  const auto deadline = Clock::now() + timeout;
  int status = 0;
  while (true) {
    pid_t r = waitpid(*pid, &status, WNOHANG);
    if (r == *pid) break;
    if (r < 0 && errno != EINTR) return absl::InternalError("waitpid failed");
    if (Clock::now() > deadline) {
      kill(*pid, SIGKILL);
      waitpid(*pid, &status, 0);
      return absl::DeadlineExceededError(absl::StrCat(argv[0], " timed out"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return absl::InternalError(absl::StrCat("`", absl::StrJoin(argv, " "), "` failed (status ",
                                            status, "):\n", ReadFileOrEmpty(log_path)));
  }
  return absl::OkStatus();
}

bool OnPath(const std::string& name) {
  const char* path = getenv("PATH");
  if (path == nullptr) return false;
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (!dir.empty() && access((dir + "/" + name).c_str(), X_OK) == 0) return true;
  }
  return false;
}

bool CanConnect(const std::string& socket_path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof(addr.sun_path) - 1);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

}  // namespace

bool SwtpmAvailable() {
  return OnPath("swtpm") && OnPath("swtpm_setup") && OnPath("swtpm_localca");
}

bool RunningInCi() {
  const char* ci = getenv("CI");
  return ci != nullptr && std::string_view(ci) == "true";
}

absl::StatusOr<std::unique_ptr<Swtpm>> Swtpm::Start(const SwtpmOptions& options) {
  std::string tmpl = (std::filesystem::temp_directory_path() / "swtpm.XXXXXX").string();
  if (mkdtemp(tmpl.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp failed: ", std::strerror(errno)));
  }
  // From here on the destructor removes the dir, whatever fails.
  std::unique_ptr<Swtpm> tpm(new Swtpm(tmpl));
  absl::Status status = tpm->Setup(options);
  if (status.ok()) status = tpm->Launch();
  if (status.ok() && options.without_rsa_ek_cert) {
    // Platform auth is empty on a fresh swtpm; the EK certificate indices are platform-created.
    status = Run({"tpm2_nvundefine", "-T", tpm->tcti_, "-C", "p", "0x01c00002"},
                 tpm->dir_ + "/nvundefine.log");
  }
  for (const char* handle : {"0x81010001", "0x81010016"}) {
    if (status.ok() && options.without_persistent_eks) {
      // Owner auth is empty on a fresh swtpm.
      status = Run({"tpm2_evictcontrol", "-T", tpm->tcti_, "-C", "o", "-c", handle},
                   tpm->dir_ + "/evictcontrol.log");
    }
  }
  if (!status.ok()) return status;
  return tpm;
}

absl::Status Swtpm::Setup(const SwtpmOptions& options) {
  const std::string state_dir = dir_ + "/state";
  ca_dir_ = options.same_ca_as != nullptr ? options.same_ca_as->ca_dir_ : dir_ + "/ca";
  std::error_code ec;
  std::filesystem::create_directories(state_dir, ec);
  if (!ec) std::filesystem::create_directories(ca_dir_, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create swtpm dirs: ", ec.message()));

  // A private config: the system one points at /var/lib/swtpm-localca, which is shared between
  // runs and not writable by ordinary users.
  const std::string localca_conf = dir_ + "/swtpm-localca.conf";
  const std::string localca_options = dir_ + "/swtpm-localca.options";
  const std::string setup_conf = dir_ + "/swtpm_setup.conf";
  absl::Status s = WriteFile(localca_conf, absl::StrCat("statedir = ", ca_dir_,
                                                        "\n"
                                                        "signingkey = ",
                                                        ca_dir_,
                                                        "/signkey.pem\n"
                                                        "issuercert = ",
                                                        ca_dir_,
                                                        "/issuercert.pem\n"
                                                        "certserial = ",
                                                        ca_dir_, "/certserial\n"));
  if (s.ok()) {
    s = WriteFile(localca_options,
                  "--platform-manufacturer Mandate\n--platform-version 2.1\n"
                  "--platform-model swtpm\n");
  }
  if (s.ok()) {
    s = WriteFile(setup_conf, absl::StrCat("create_certs_tool = swtpm_localca\n"
                                           "create_certs_tool_config = ",
                                           localca_conf,
                                           "\n"
                                           "create_certs_tool_options = ",
                                           localca_options,
                                           "\n"
                                           "active_pcr_banks = sha256\n"));
  }
  if (!s.ok()) return s;
  s = Run(
      {"swtpm_setup", "--tpm2", "--tpmstate", state_dir, "--config", setup_conf, "--create-ek-cert",
       "--create-platform-cert", "--overwrite", "--logfile", dir_ + "/setup.log"},
      dir_ + "/setup.out");
  if (!s.ok()) {
    return absl::InternalError(
        absl::StrCat(s.message(), "\nsetup.log:\n", ReadFileOrEmpty(dir_ + "/setup.log")));
  }
  const std::string root = ReadFileOrEmpty(ca_dir_ + "/swtpm-localca-rootca-cert.pem");
  const std::string issuer = ReadFileOrEmpty(ca_dir_ + "/issuercert.pem");
  if (root.empty() || issuer.empty()) {
    return absl::InternalError("swtpm_localca did not leave its root and issuer certificates");
  }
  ek_ca_bundle_path_ = dir_ + "/ek-ca-bundle.pem";
  return WriteFile(ek_ca_bundle_path_, root + issuer);
}

absl::Status Swtpm::Launch() {
  const std::string socket_path = dir_ + "/tpm.sock";
  if (socket_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return absl::FailedPreconditionError(
        absl::StrCat("swtpm socket path is too long for a unix socket: ", socket_path));
  }
  absl::StatusOr<pid_t> pid = Spawn(
      {"swtpm", "socket", "--tpm2", "--tpmstate", "dir=" + dir_ + "/state", "--server",
       "type=unixio,path=" + socket_path, "--ctrl", "type=unixio,path=" + socket_path + ".ctrl",
       "--flags", "not-need-init,startup-clear", "--log", "file=" + dir_ + "/swtpm.log"},
      dir_ + "/swtpm.out");
  if (!pid.ok()) return pid.status();
  pid_ = *pid;
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  while (Clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return absl::InternalError(absl::StrCat("swtpm exited during startup:\n",
                                              ReadFileOrEmpty(dir_ + "/swtpm.out"),
                                              ReadFileOrEmpty(dir_ + "/swtpm.log")));
    }
    if (CanConnect(socket_path)) {
      tcti_ = "swtpm:path=" + socket_path;
      return absl::OkStatus();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return absl::DeadlineExceededError("swtpm did not open its socket within 5 s");
}

void Swtpm::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::seconds(2);
  int status = 0;
  while (waitpid(pid_, &status, WNOHANG) == 0) {
    if (Clock::now() > deadline) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  pid_ = -1;
}

Swtpm::~Swtpm() {
  Stop();
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

void SwtpmTest::SetUp() {
  MANDATE_REQUIRE_SWTPM();
  absl::StatusOr<std::unique_ptr<Swtpm>> tpm = Swtpm::Start();
  ASSERT_TRUE(tpm.ok()) << tpm.status();
  swtpm_ = std::move(*tpm);
}

}  // namespace mandate::testing
