// mandate-agent: attests its node to the broker, attests local processes, and serves the SPIFFE
// Workload API on a Unix socket (DESIGN.md §1, §6).
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "attestors/node/join_token/join_token_attestor.h"
#include "attestors/node/tpm/agent/tpm_agent_attestor.h"
#include "attestors/workload/unix/unix_attestor.h"
#include "broker/agent/agent.h"
#include "broker/agent/caller_identity.h"
#include "broker/agent/stream_limiter.h"
#include "broker/agent/tasks_service.h"
#include "broker/agent/workload_service.h"
#include "broker/common/config/config_file.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/grpcutil/uds_listener.h"
#include "broker/common/log/log.h"
#include "broker/common/util/file_limit.h"
#include "broker/common/util/runtime.h"
#include "broker/common/util/status_macros.h"

namespace mandate::agent {
namespace {

struct AgentFlags {
  std::string config_file;
  std::string data_dir;
  std::string broker;
  std::string trust_bundle;
  std::string join_token;
  std::string join_token_file;
  std::string tpm_tcti;
  std::string socket;  // default <data-dir>/agent.sock
  std::string log_format = "text";
  std::string log_level = "info";
  uint64_t max_exe_hash_bytes = 64ull * 1024 * 1024;
  // Open watch streams (each holds a handler thread) in all and per uid.
  int max_watch_streams = 1024;
  int max_watch_streams_per_uid = 256;
  // Unary calls in flight (each holds a handler thread; Tasks calls wait on the broker for up
  // to 15 s) in all and per uid.
  int max_unary_calls = 128;
  int max_unary_calls_per_uid = 16;
};

// gRPC handler threads beyond what admitted streams and unary calls can hold: gRPC's pollers
// (up to MAX_POLLERS, 16) and calls that are still being identified or are being refused by a
// limiter (they return at once). So the quota is never used up by calls that are held, and no
// uid, nor all uids together, can make gRPC refuse calls for lack of threads by holding them.
constexpr int kReserveThreads = 64;
// Concurrent calls on one connection; more wait in the client for a free stream.
constexpr int kMaxStreamsPerConnection = 32;

int Fail(const absl::Status& status) {
  spdlog::error("{}", std::string(status.message()));
  std::cerr << "mandate-agent: " << status.message() << "\n";
  return 1;
}

// Applies a TOML config file to flags that were not given on the command line.
absl::Status ApplyConfigFile(const std::string& path, CLI::App& app, AgentFlags& flags) {
  ASSIGN_OR_RETURN(config::ConfigFile file, config::ConfigFile::Load(path));
  auto given = [&](const char* flag) { return app.count(flag) > 0; };
  RETURN_IF_ERROR(file.GetString("data_dir", given("--data-dir"), flags.data_dir));
  RETURN_IF_ERROR(file.GetString("broker", given("--broker"), flags.broker));
  RETURN_IF_ERROR(file.GetString("trust_bundle", given("--trust-bundle"), flags.trust_bundle));
  RETURN_IF_ERROR(
      file.GetString("join_token_file", given("--join-token-file"), flags.join_token_file));
  RETURN_IF_ERROR(file.GetString("tpm_tcti", given("--tpm-tcti"), flags.tpm_tcti));
  RETURN_IF_ERROR(file.GetString("socket", given("--socket"), flags.socket));
  RETURN_IF_ERROR(file.GetString("log_format", given("--log-format"), flags.log_format));
  RETURN_IF_ERROR(file.GetString("log_level", given("--log-level"), flags.log_level));
  int64_t max_hash = static_cast<int64_t>(flags.max_exe_hash_bytes);
  RETURN_IF_ERROR(file.GetInt("max_exe_hash_bytes", given("--max-exe-hash-bytes"), max_hash));
  if (max_hash < 0) return absl::InvalidArgumentError("max_exe_hash_bytes must not be negative");
  flags.max_exe_hash_bytes = static_cast<uint64_t>(max_hash);
  // Limits are range-checked in Run, with the command line's values.
  auto get_limit = [&](const char* key, const char* flag, int& value) {
    int64_t read = value;
    RETURN_IF_ERROR(file.GetInt(key, given(flag), read));
    value = static_cast<int>(std::clamp<int64_t>(read, -1, 1 << 20));
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_limit("max_watch_streams", "--max-watch-streams", flags.max_watch_streams));
  RETURN_IF_ERROR(get_limit("max_watch_streams_per_uid", "--max-watch-streams-per-uid",
                            flags.max_watch_streams_per_uid));
  RETURN_IF_ERROR(get_limit("max_unary_calls", "--max-unary-calls", flags.max_unary_calls));
  RETURN_IF_ERROR(get_limit("max_unary_calls_per_uid", "--max-unary-calls-per-uid",
                            flags.max_unary_calls_per_uid));
  return file.CheckAllKeysKnown();
}

// The trust domain is the one the bundle's CA certificate names.
absl::StatusOr<spiffe::TrustDomain> TrustDomainOfBundle(const std::string& pem) {
  auto certs = crypto::Certificate::ParsePemChain(pem);
  if (!certs.ok()) return certs.status();
  for (const auto& cert : *certs) {
    for (const auto& uri : cert.UriSans()) {
      auto id = spiffe::SpiffeId::Parse(uri);
      if (id.ok() && id->path().empty()) return id->trust_domain();
    }
  }
  return absl::InvalidArgumentError(
      "trust bundle has no CA certificate naming a trust domain (URI SAN spiffe://<td>)");
}

int Run(AgentFlags flags) {
  if (flags.max_watch_streams < 1 || flags.max_watch_streams > 65536 ||
      flags.max_watch_streams_per_uid < 1 ||
      flags.max_watch_streams_per_uid > flags.max_watch_streams) {
    return Fail(absl::InvalidArgumentError(
        "--max-watch-streams must be 1-65536 and --max-watch-streams-per-uid "
        "1-max-watch-streams"));
  }
  if (flags.max_unary_calls < 1 || flags.max_unary_calls > 65536 ||
      flags.max_unary_calls_per_uid < 1 || flags.max_unary_calls_per_uid > flags.max_unary_calls) {
    return Fail(absl::InvalidArgumentError(
        "--max-unary-calls must be 1-65536 and --max-unary-calls-per-uid 1-max-unary-calls"));
  }
  const uint64_t file_limit = RaiseFileLimit();
  // 0711: other users may reach the Workload API socket inside it but cannot list it; the
  // agent's key file inside is 0600.
  if (::mkdir(flags.data_dir.c_str(), 0711) != 0 && errno != EEXIST) {
    return Fail(absl::InternalError(
        absl::StrCat("cannot create --data-dir ", flags.data_dir, ": ", std::strerror(errno))));
  }
  struct stat st {};
  if (::stat(flags.data_dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return Fail(absl::FailedPreconditionError(
        absl::StrCat("--data-dir ", flags.data_dir, " is not a directory")));
  }
  if ((st.st_mode & 0066) != 0 || (st.st_mode & 0711) != 0711) {
    ::chmod(flags.data_dir.c_str(), (st.st_mode & 0700) | 0711);
  }

  std::string token = flags.join_token;
  if (token.empty() && !flags.join_token_file.empty()) {
    auto contents = crypto::ReadFile(flags.join_token_file);
    if (!contents.ok()) return Fail(contents.status());
    token = std::string(absl::StripAsciiWhitespace(*contents));
  }
  if (token.empty()) {
    if (const char* env = std::getenv("MANDATE_JOIN_TOKEN"); env != nullptr) token = env;
  }
  auto bundle = crypto::ReadFile(flags.trust_bundle);
  if (!bundle.ok()) {
    return Fail(
        absl::InvalidArgumentError(absl::StrCat("--trust-bundle: ", bundle.status().message())));
  }
  auto td = TrustDomainOfBundle(*bundle);
  if (!td.ok()) return Fail(td.status());

  AgentOptions options{.data_dir = flags.data_dir,
                       .broker_address = flags.broker,
                       .trust_bundle_pem = *bundle,
                       .trust_domain = *td};
  const Clock& clock = Clock::Real();
  // Declared before the agent so that it outlives the agent's threads on every return path.
  std::unique_ptr<attestors::AgentNodeAttestor> node_attestor;
  auto agent = Agent::Create(options, clock);
  if (!agent.ok()) return Fail(agent.status());
  if (!flags.tpm_tcti.empty()) {
    if (!token.empty()) {
      return Fail(absl::InvalidArgumentError(
          "give either --tpm-tcti or a join token, not both: a node has one node attestor"));
    }
    auto tpm = attestors::TpmAgentAttestor::Create(flags.tpm_tcti);
    if (!tpm.ok()) {
      return Fail(absl::Status(tpm.status().code(), absl::StrCat("--tpm-tcti ", flags.tpm_tcti,
                                                                 ": ", tpm.status().message())));
    }
    if (auto ek = (*tpm)->EkHashHex(); ek.ok()) {
      // What an operator needs for --tpm-ek-hash (TPMs without an EK certificate).
      spdlog::info("TPM EK SubjectPublicKeyInfo sha256={}", *ek);
    }
    node_attestor = std::move(*tpm);
  } else if (!token.empty()) {
    node_attestor = std::make_unique<attestors::JoinTokenAgentAttestor>(token);
  }
  if (auto s = (*agent)->EstablishIdentity(node_attestor.get()); !s.ok()) return Fail(s);
  (*agent)->Start();
  // Give the first sync a moment so early callers find their SVIDs; serve regardless after.
  if (!(*agent)->WaitUntilReady(std::chrono::seconds(10))) {
    spdlog::warn("not every SVID is available yet; serving what there is");
  }

  unix_attestor::UnixAttestorOptions attestor_options;
  attestor_options.max_hash_bytes = flags.max_exe_hash_bytes;
  unix_attestor::UnixAttestor attestor(attestor_options);
  // Executables are hashed only for callers an entry with unix:sha256 could match.
  Agent& core = **agent;
  CallerIdentifier identifier(attestor, [&core](const std::vector<spiffe::Selector>& selectors) {
    return Agent::NeedsExeHash(*core.Current(), spiffe::SelectorSet(selectors));
  });
  StreamLimiter streams(static_cast<size_t>(flags.max_watch_streams),
                        static_cast<size_t>(flags.max_watch_streams_per_uid));
  StreamLimiter unary_calls(static_cast<size_t>(flags.max_unary_calls),
                            static_cast<size_t>(flags.max_unary_calls_per_uid));
  WorkloadService service(core, identifier, streams, unary_calls);
  TasksService tasks_service(core, identifier, unary_calls);
  grpc::ServerBuilder builder;
  builder.RegisterService(&service);
  builder.RegisterService(&tasks_service);
  // Bound what local callers can make the agent hold: handler threads (each open watch stream
  // and each unary call in flight keeps one; calls past the quota get RESOURCE_EXHAUSTED from
  // gRPC, so the limiters, which keep a share for every uid, must refuse first) and calls per
  // connection.
  grpc::ResourceQuota quota("workload-api");
  quota.SetMaxThreads(flags.max_watch_streams + flags.max_unary_calls + kReserveThreads);
  builder.SetResourceQuota(quota);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, kMaxStreamsPerConnection);
  builder.SetMaxReceiveMessageSize(1024 * 1024);
  // gRPC's synchronous server keeps at most MAX_POLLERS idle threads and creates one per call
  // beyond them; the default (2) made busy workloads pay a thread creation per request.
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 2);
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 16);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  std::string socket = flags.socket.empty() ? flags.data_dir + "/agent.sock" : flags.socket;
  // Callers are identified per call, held to the executable they ran at accept; anyone may
  // connect (mode 0666). Connection caps come from the descriptor limit. No start time is read
  // at accept: nothing could compare it (the pidfd and uid/gid checks pin the caller).
  grpcutil::UdsListener::Options listen_options;
  listen_options.executable_reader = identifier.ExecutableReader();
  auto listener = grpcutil::UdsListener::Start(server.get(), socket, 0666, listen_options);
  if (!listener.ok()) return Fail(listener.status());
  identifier.set_listener(listener->get());
  grpcutil::ConnectionCaps caps = (*listener)->caps();
  spdlog::info(
      "mandate-agent ready node={} socket={} serving={} open_files_limit={} max_connections={} "
      "max_connections_per_uid={} max_watch_streams={} max_watch_streams_per_uid={} "
      "max_unary_calls={} max_unary_calls_per_uid={}",
      (*agent)->node_id(), socket, (*agent)->Current()->serving, file_limit, caps.total,
      caps.per_uid, flags.max_watch_streams, flags.max_watch_streams_per_uid, flags.max_unary_calls,
      flags.max_unary_calls_per_uid);

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("signal {} received; stopping", sig);
  service.Shutdown();
  (*listener)->Stop();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  (*agent)->Stop();
  spdlog::info("mandate-agent stopped");
  return 0;
}

}  // namespace
}  // namespace mandate::agent

int main(int argc, char** argv) {
  mandate::SetUpRuntime();
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  mandate::agent::AgentFlags flags;
  CLI::App app{"mandate-agent: node agent serving the SPIFFE Workload API"};
  app.add_option("--config", flags.config_file, "TOML config file (keys as flag names with _)");
  app.add_option("--data-dir", flags.data_dir, "State directory (created 0700)");
  app.add_option("--broker", flags.broker, "Broker agent address HOST:PORT");
  app.add_option("--trust-bundle", flags.trust_bundle,
                 "PEM CA bundle that authenticates the broker");
  app.add_option("--join-token", flags.join_token,
                 "Join token (prefer --join-token-file or MANDATE_JOIN_TOKEN: argv is public)");
  app.add_option("--join-token-file", flags.join_token_file, "File holding the join token");
  app.add_option("--tpm-tcti", flags.tpm_tcti, "TPM TCTI for TPM node attestation");
  app.add_option("--socket", flags.socket, "Workload API socket (default DIR/agent.sock)");
  app.add_option("--log-format", flags.log_format, "text|json")->capture_default_str();
  app.add_option("--log-level", flags.log_level, "trace|debug|info|warn|error")
      ->capture_default_str();
  app.add_option("--max-exe-hash-bytes", flags.max_exe_hash_bytes,
                 "Executables larger than this get no unix:sha256 selector")
      ->capture_default_str();
  app.add_option("--max-watch-streams", flags.max_watch_streams,
                 "Open Workload API watch streams at most; more get RESOURCE_EXHAUSTED")
      ->capture_default_str();
  app.add_option("--max-watch-streams-per-uid", flags.max_watch_streams_per_uid,
                 "Open watch streams at most per caller uid")
      ->capture_default_str();
  app.add_option("--max-unary-calls", flags.max_unary_calls,
                 "Unary Workload and Tasks API calls in flight at most; more get "
                 "RESOURCE_EXHAUSTED")
      ->capture_default_str();
  app.add_option("--max-unary-calls-per-uid", flags.max_unary_calls_per_uid,
                 "Unary calls in flight at most per caller uid")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (!flags.config_file.empty()) {
    if (auto s = mandate::agent::ApplyConfigFile(flags.config_file, app, flags); !s.ok()) {
      std::cerr << "mandate-agent: " << s.message() << "\n";
      return 2;
    }
  }
  if (flags.data_dir.empty() || flags.broker.empty() || flags.trust_bundle.empty()) {
    std::cerr << "mandate-agent: --data-dir, --broker and --trust-bundle are required\n";
    return 2;
  }
  if (auto s = mandate::log::InitLogging("mandate-agent", flags.log_format, flags.log_level);
      !s.ok()) {
    std::cerr << "mandate-agent: " << s.message() << "\n";
    return 2;
  }
  return mandate::agent::Run(std::move(flags));
}
