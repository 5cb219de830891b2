// mandate-broker: CA and signing keys, registration entries, node attestation, issuance, and the
// admin, node and HTTP endpoints (DESIGN.md §1, §6).
#include <grpcpp/grpcpp.h>
#include <grpcpp/resource_quota.h>
#include <grpcpp/security/server_credentials.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "attestors/node/join_token/join_token_attestor.h"
#include "attestors/node/tpm/server/tpm_server_attestor.h"
#include "broker/common/config/config_file.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/grpcutil/keepalive.h"
#include "broker/common/grpcutil/uds_listener.h"
#include "broker/common/log/log.h"
#include "broker/common/store/sqlite_store.h"
#include "broker/common/util/file_limit.h"
#include "broker/common/util/runtime.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/admin_service.h"
#include "broker/server/approvals/approval_registry.h"
#include "broker/server/audit/audit_checkpoint.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/entry_registry.h"
#include "broker/server/exchange/task_token_exchange.h"
#include "broker/server/http_endpoints.h"
#include "broker/server/issuance/minter.h"
#include "broker/server/issuance/pipeline.h"
#include "broker/server/metrics/metrics.h"
#include "broker/server/node_auth/node_authenticator.h"
#include "broker/server/node_service.h"
#include "broker/server/policy/grpc_policy.h"
#include "broker/server/policy/policy_chain.h"
#include "broker/server/policy/rules_policy.h"
#include "broker/server/policy/webhook_policy.h"
#include "broker/server/tasks/task_registry.h"
#include "broker/server/token_endpoint.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {
namespace {

struct BrokerFlags {
  std::string config_file;
  std::string data_dir;
  std::string trust_domain;
  std::string agent_listen = "127.0.0.1:8081";
  std::string http_listen = "127.0.0.1:8080";
  std::string admin_socket;  // default <data-dir>/admin.sock
  std::string issuer_url;    // default http://<http-listen>
  std::string http_tls_cert;
  std::string http_tls_key;
  bool insecure_http = false;
  std::string log_format = "text";
  std::string log_level = "info";
  int64_t x509_svid_ttl = 3600;
  int64_t jwt_svid_ttl = 300;
  int64_t agent_svid_ttl = 3600;
  int max_node_threads = 1024;
  int http_threads = 64;
  int http_max_connections = 1024;
  int http_max_connections_per_ip = 64;
  int64_t max_task_ttl = 8 * 3600;
  bool dpop_nonce = false;
  int64_t dpop_proof_max_age = 60;
  int64_t dpop_proof_max_future = 5;
  int64_t audit_checkpoint_interval = 60;
  int64_t approval_ttl = 900;
  int64_t policy_timeout_ms = 500;
  std::string policy_file;
  std::string policy_grpc;
  std::string policy_grpc_ca;
  std::string policy_grpc_cert;
  std::string policy_grpc_key;
  std::string policy_grpc_server_name;
  bool policy_grpc_plaintext = false;
  std::string policy_grpc_kinds;
  std::string policy_webhook;
  std::string policy_webhook_ca;
  std::string policy_webhook_cert;
  std::string policy_webhook_key;
  std::string policy_webhook_kinds;
  std::vector<std::string> tpm_ek_ca_files;
  std::vector<std::string> tpm_ek_hashes;
};

// Splits "host:port" ("[::1]:80" for IPv6). Port 0 means "pick a free port".
absl::Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not HOST:PORT"));
  }
  *host = address.substr(0, colon);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  if (!absl::SimpleAtoi(address.substr(colon + 1), port) || *port < 0 || *port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' has an invalid port"));
  }
  return absl::OkStatus();
}

bool IsLoopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.starts_with("127.");
}

absl::Status EnsureDataDir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::InternalError(
        absl::StrCat("cannot create --data-dir ", dir, ": ", std::strerror(errno)));
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat("--data-dir ", dir, " is not a directory"));
  }
  if ((st.st_mode & 077) != 0) ::chmod(dir.c_str(), st.st_mode & 0700);
  return absl::OkStatus();
}

// Applies a TOML config file to flags that were not given on the command line.
absl::Status ApplyConfigFile(const std::string& path, CLI::App& app, BrokerFlags& flags) {
  ASSIGN_OR_RETURN(config::ConfigFile file, config::ConfigFile::Load(path));
  auto given = [&](const char* flag) { return app.count(flag) > 0; };
  RETURN_IF_ERROR(file.GetString("data_dir", given("--data-dir"), flags.data_dir));
  RETURN_IF_ERROR(file.GetString("trust_domain", given("--trust-domain"), flags.trust_domain));
  RETURN_IF_ERROR(file.GetString("agent_listen", given("--agent-listen"), flags.agent_listen));
  RETURN_IF_ERROR(file.GetString("http_listen", given("--http-listen"), flags.http_listen));
  RETURN_IF_ERROR(file.GetString("admin_socket", given("--admin-socket"), flags.admin_socket));
  RETURN_IF_ERROR(file.GetString("issuer_url", given("--issuer-url"), flags.issuer_url));
  RETURN_IF_ERROR(file.GetString("http_tls_cert", given("--http-tls-cert"), flags.http_tls_cert));
  RETURN_IF_ERROR(file.GetString("http_tls_key", given("--http-tls-key"), flags.http_tls_key));
  RETURN_IF_ERROR(file.GetBool("insecure_http", given("--insecure-http"), flags.insecure_http));
  RETURN_IF_ERROR(file.GetString("log_format", given("--log-format"), flags.log_format));
  RETURN_IF_ERROR(file.GetString("log_level", given("--log-level"), flags.log_level));
  RETURN_IF_ERROR(file.GetInt("x509_svid_ttl", given("--x509-svid-ttl"), flags.x509_svid_ttl));
  RETURN_IF_ERROR(file.GetInt("jwt_svid_ttl", given("--jwt-svid-ttl"), flags.jwt_svid_ttl));
  RETURN_IF_ERROR(file.GetInt("agent_svid_ttl", given("--agent-svid-ttl"), flags.agent_svid_ttl));
  RETURN_IF_ERROR(file.GetInt("max_task_ttl", given("--max-task-ttl"), flags.max_task_ttl));
  RETURN_IF_ERROR(file.GetBool("dpop_nonce", given("--dpop-nonce"), flags.dpop_nonce));
  RETURN_IF_ERROR(
      file.GetInt("dpop_proof_max_age", given("--dpop-proof-max-age"), flags.dpop_proof_max_age));
  RETURN_IF_ERROR(file.GetInt("dpop_proof_max_future", given("--dpop-proof-max-future"),
                              flags.dpop_proof_max_future));
  RETURN_IF_ERROR(file.GetInt("audit_checkpoint_interval", given("--audit-checkpoint-interval"),
                              flags.audit_checkpoint_interval));
  RETURN_IF_ERROR(file.GetInt("approval_ttl", given("--approval-ttl"), flags.approval_ttl));
  RETURN_IF_ERROR(
      file.GetInt("policy_timeout_ms", given("--policy-timeout-ms"), flags.policy_timeout_ms));
  if (flags.policy_timeout_ms < 1 || flags.policy_timeout_ms > 60000) {
    return absl::InvalidArgumentError("policy_timeout_ms must be between 1 and 60000");
  }
  for (auto [key, flag, out] :
       {std::tuple{"policy_file", "--policy-file", &flags.policy_file},
        std::tuple{"policy_grpc", "--policy-grpc", &flags.policy_grpc},
        std::tuple{"policy_grpc_ca", "--policy-grpc-ca", &flags.policy_grpc_ca},
        std::tuple{"policy_grpc_cert", "--policy-grpc-cert", &flags.policy_grpc_cert},
        std::tuple{"policy_grpc_key", "--policy-grpc-key", &flags.policy_grpc_key},
        std::tuple{"policy_grpc_server_name", "--policy-grpc-server-name",
                   &flags.policy_grpc_server_name},
        std::tuple{"policy_grpc_kinds", "--policy-grpc-kinds", &flags.policy_grpc_kinds},
        std::tuple{"policy_webhook", "--policy-webhook", &flags.policy_webhook},
        std::tuple{"policy_webhook_ca", "--policy-webhook-ca", &flags.policy_webhook_ca},
        std::tuple{"policy_webhook_cert", "--policy-webhook-cert", &flags.policy_webhook_cert},
        std::tuple{"policy_webhook_key", "--policy-webhook-key", &flags.policy_webhook_key},
        std::tuple{"policy_webhook_kinds", "--policy-webhook-kinds",
                   &flags.policy_webhook_kinds}}) {
    RETURN_IF_ERROR(file.GetString(key, given(flag), *out));
  }
  RETURN_IF_ERROR(file.GetBool("policy_grpc_plaintext", given("--policy-grpc-plaintext"),
                               flags.policy_grpc_plaintext));
  int64_t threads = flags.max_node_threads;
  RETURN_IF_ERROR(file.GetInt("max_node_threads", given("--max-node-threads"), threads));
  if (threads < 16 || threads > 65536) {
    return absl::InvalidArgumentError("max_node_threads must be between 16 and 65536");
  }
  flags.max_node_threads = static_cast<int>(threads);
  int64_t http_threads = flags.http_threads;
  RETURN_IF_ERROR(file.GetInt("http_threads", given("--http-threads"), http_threads));
  if (http_threads < 4 || http_threads > 4096) {
    return absl::InvalidArgumentError("http_threads must be between 4 and 4096");
  }
  flags.http_threads = static_cast<int>(http_threads);
  int64_t http_conns = flags.http_max_connections;
  RETURN_IF_ERROR(file.GetInt("http_max_connections", given("--http-max-connections"), http_conns));
  int64_t http_conns_per_ip = flags.http_max_connections_per_ip;
  RETURN_IF_ERROR(file.GetInt("http_max_connections_per_ip", given("--http-max-connections-per-ip"),
                              http_conns_per_ip));
  if (http_conns < 1 || http_conns > 65536 || http_conns_per_ip < 1 ||
      http_conns_per_ip > http_conns) {
    return absl::InvalidArgumentError(
        "http_max_connections must be between 1 and 65536, http_max_connections_per_ip between 1 "
        "and http_max_connections");
  }
  flags.http_max_connections = static_cast<int>(http_conns);
  flags.http_max_connections_per_ip = static_cast<int>(http_conns_per_ip);
  RETURN_IF_ERROR(file.GetStringList("tpm_ek_ca", given("--tpm-ek-ca"), flags.tpm_ek_ca_files));
  RETURN_IF_ERROR(file.GetStringList("tpm_ek_hash", given("--tpm-ek-hash"), flags.tpm_ek_hashes));
  return file.CheckAllKeysKnown();
}

absl::StatusOr<attestors::TpmServerOptions> TpmOptionsFromFlags(const BrokerFlags& flags) {
  attestors::TpmServerOptions options;
  for (const auto& file : flags.tpm_ek_ca_files) {
    auto pem = crypto::ReadFile(file);
    if (!pem.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tpm-ek-ca ", file, ": ", pem.status().message()));
    }
    auto certs = crypto::Certificate::ParsePemChain(*pem);
    if (!certs.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tpm-ek-ca ", file, ": ", certs.status().message()));
    }
    options.ek_ca_certificates.insert(options.ek_ca_certificates.end(), certs->begin(),
                                      certs->end());
  }
  for (const auto& hash : flags.tpm_ek_hashes) {
    bool hex = hash.size() == 64 && hash.find_first_not_of("0123456789abcdef") == std::string::npos;
    if (!hex) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--tpm-ek-hash '", hash,
          "' must be 64 lowercase hex digits: the SHA-256 of the EK SubjectPublicKeyInfo DER"));
    }
    options.ek_hash_allowlist.push_back(hash);
  }
  if (auto s = attestors::ValidateTpmServerOptions(options); !s.ok()) return s;
  return options;
}

// "kind,kind,..." -> the kinds (empty = every kind).
absl::StatusOr<std::set<policy::IssuanceKind>> ParseKinds(const std::string& flag,
                                                          const std::string& list) {
  std::set<policy::IssuanceKind> kinds;
  for (absl::string_view name : absl::StrSplit(list, ',', absl::SkipWhitespace())) {
    auto kind = policy::ParseIssuanceKind(std::string(absl::StripAsciiWhitespace(name)));
    if (!kind.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(flag, ": ", kind.status().message()));
    }
    kinds.insert(*kind);
  }
  return kinds;
}

// The hooks the flags ask for, in the order they are asked: external hooks first, built-in
// rules last, so an execution cap is only counted once every other hook has allowed.
// `rules` receives the rules hook (for SIGHUP and the admin API's reload), if any.
absl::StatusOr<std::vector<policy::HookBinding>> PolicyHooksFromFlags(
    const BrokerFlags& flags, store::Store& store, const Clock& clock,
    metrics::BrokerMetrics* metrics, std::shared_ptr<policy::RulesPolicy>* rules) {
  std::vector<policy::HookBinding> hooks;
  if (!flags.policy_grpc.empty()) {
    ASSIGN_OR_RETURN(auto kinds, ParseKinds("--policy-grpc-kinds", flags.policy_grpc_kinds));
    auto hook =
        policy::GrpcPolicyHook::Create({.target = flags.policy_grpc,
                                        .plaintext = flags.policy_grpc_plaintext,
                                        .ca_file = flags.policy_grpc_ca,
                                        .client_cert_file = flags.policy_grpc_cert,
                                        .client_key_file = flags.policy_grpc_key,
                                        .server_name_override = flags.policy_grpc_server_name});
    if (!hook.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--policy-grpc: ", hook.status().message()));
    }
    hooks.push_back({.hook = std::move(*hook), .kinds = std::move(kinds)});
    spdlog::info("policy hook: gRPC {}{}", flags.policy_grpc,
                 flags.policy_grpc_plaintext ? " (plaintext)" : "");
  }
  if (!flags.policy_webhook.empty()) {
    ASSIGN_OR_RETURN(auto kinds, ParseKinds("--policy-webhook-kinds", flags.policy_webhook_kinds));
    auto hook = policy::WebhookPolicyHook::Create({.url = flags.policy_webhook,
                                                   .ca_file = flags.policy_webhook_ca,
                                                   .client_cert_file = flags.policy_webhook_cert,
                                                   .client_key_file = flags.policy_webhook_key});
    if (!hook.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--policy-webhook: ", hook.status().message()));
    }
    hooks.push_back({.hook = std::move(*hook), .kinds = std::move(kinds)});
    if (flags.policy_webhook.starts_with("http://")) {
      spdlog::warn("policy webhook {} is plain HTTP: anyone on the path can change decisions",
                   flags.policy_webhook);
    }
    spdlog::info("policy hook: webhook {}", flags.policy_webhook);
  }
  if (!flags.policy_file.empty()) {
    auto loaded = policy::RulesPolicy::Load(flags.policy_file, store, clock, metrics);
    if (!loaded.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--policy-file: ", loaded.status().message()));
    }
    *rules = std::move(*loaded);
    hooks.push_back({.hook = *rules});
    spdlog::info("policy hook: rules from {}", flags.policy_file);
  }
  return hooks;
}

int Fail(const absl::Status& status) {
  spdlog::error("{}", std::string(status.message()));
  std::cerr << "mandate-broker: " << status.message() << "\n";
  return 1;
}

int Run(const BrokerFlags& flags) {
  if (auto s = EnsureDataDir(flags.data_dir); !s.ok()) return Fail(s);
  auto td = spiffe::TrustDomain::Parse(flags.trust_domain);
  if (!td.ok())
    return Fail(
        absl::InvalidArgumentError(absl::StrCat("--trust-domain: ", td.status().message())));
  std::string http_host, agent_host;
  int http_port = 0, agent_port = 0;
  if (auto s = SplitHostPort(flags.http_listen, &http_host, &http_port); !s.ok()) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--http-listen: ", s.message())));
  }
  if (auto s = SplitHostPort(flags.agent_listen, &agent_host, &agent_port); !s.ok()) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--agent-listen: ", s.message())));
  }
  bool http_tls = !flags.http_tls_cert.empty() || !flags.http_tls_key.empty();
  if (http_tls && (flags.http_tls_cert.empty() || flags.http_tls_key.empty())) {
    return Fail(absl::InvalidArgumentError("--http-tls-cert and --http-tls-key go together"));
  }
  if (!http_tls && !IsLoopback(http_host) && !flags.insecure_http) {
    return Fail(absl::InvalidArgumentError(
        "refusing plain HTTP on a non-loopback address: give --http-tls-cert/--http-tls-key, "
        "or --insecure-http if you really mean it"));
  }

  const Clock& clock = Clock::Real();
  auto store = store::SqliteStore::Open(flags.data_dir + "/mandate.db");
  if (!store.ok()) return Fail(store.status());
  if (auto s = (*store)->PruneExpiredJoinTokens(clock.NowSeconds()); !s.ok()) return Fail(s);
  auto audit_chain = LoadOrCreateAuditChainId(flags.data_dir);
  if (!audit_chain.ok()) return Fail(audit_chain.status());
  // Declared before everything that records into it, so it is destroyed (its queue written)
  // after they have stopped.
  auto audit = AuditLog::Open(**store, *audit_chain, clock);
  if (!audit.ok()) return Fail(audit.status());

  // A data directory without a JWT key has never had a broker running on it, so no earlier
  // instance can have accepted a DPoP proof that this one's empty replay cache would miss.
  std::error_code exists_error;
  const bool first_start =
      !std::filesystem::exists(flags.data_dir + "/jwt.key", exists_error) && !exists_error;
  TrustAuthority::Options ta_options{.data_dir = flags.data_dir, .trust_domain = *td};
  auto authority = TrustAuthority::LoadOrCreate(ta_options, clock);
  if (!authority.ok()) return Fail(authority.status());
  auto entries = EntryRegistry::Load(**store);
  if (!entries.ok()) return Fail(entries.status());

  // Bind HTTP first: the issuer URL (iss of every token) may name its port.
  std::string issuer_url = flags.issuer_url;
  HttpEndpoints http(**authority);
  http::HttpLimits http_limits;
  http_limits.max_connections = flags.http_max_connections;
  http_limits.max_connections_per_ip = flags.http_max_connections_per_ip;
  // HTTP clients must not take the descriptors agents, the store and the audit log need: past
  // half the open-file limit, the cap is lowered (the limit was raised to the hard one at start).
  if (const uint64_t half = RaiseFileLimit() / 2;
      static_cast<uint64_t>(http_limits.max_connections) > half) {
    spdlog::warn(
        "--http-max-connections {} lowered to {}: half the open-file limit (raise LimitNOFILE)",
        http_limits.max_connections, half);
    http_limits.max_connections = static_cast<int>(std::max<uint64_t>(half, 1));
    http_limits.max_connections_per_ip =
        std::min(http_limits.max_connections_per_ip, http_limits.max_connections);
  }
  if (auto s = http.Bind(http_host, http_port, flags.http_tls_cert, flags.http_tls_key,
                         flags.http_threads, http_limits);
      !s.ok()) {
    return Fail(s);
  }
  if (issuer_url.empty()) {
    issuer_url = absl::StrCat(
        http_tls ? "https://" : "http://",
        http_host.find(':') != std::string::npos ? absl::StrCat("[", http_host, "]") : http_host,
        ":", http.port());
  }

  IssuerDefaults defaults;
  defaults.issuer_url = issuer_url;
  defaults.x509_svid_ttl_seconds = flags.x509_svid_ttl;
  defaults.jwt_svid_ttl_seconds = flags.jwt_svid_ttl;
  defaults.agent_svid_ttl_seconds = flags.agent_svid_ttl;
  Minter minter(**authority, clock, defaults);

  attestors::JoinTokenServerAttestor join_token(**store, clock, *td);
  std::map<std::string, attestors::ServerNodeAttestor*, std::less<>> node_attestors = {
      {std::string(join_token.name()), &join_token}};
  std::unique_ptr<attestors::TpmServerAttestor> tpm;
  if (!flags.tpm_ek_ca_files.empty() || !flags.tpm_ek_hashes.empty()) {
    auto options = TpmOptionsFromFlags(flags);
    if (!options.ok()) return Fail(options.status());
    tpm = std::make_unique<attestors::TpmServerAttestor>(std::move(*options), **store, clock, *td);
    node_attestors.emplace(std::string(tpm->name()), tpm.get());
    spdlog::info("TPM node attestation enabled: {} EK CA certificate(s), {} allowlisted EK(s)",
                 flags.tpm_ek_ca_files.size(), flags.tpm_ek_hashes.size());
  }
  TaskLimits task_limits;
  task_limits.max_ttl_seconds = flags.max_task_ttl;
  task_limits.default_ttl_seconds = std::min(task_limits.default_ttl_seconds, flags.max_task_ttl);
  metrics::BrokerMetrics broker_metrics;
  // Task declarations the policy hook sends to a human wait here (--approval-ttl).
  auto approvals = ApprovalRegistry::Create(**store, **audit, clock, &broker_metrics,
                                            {.ttl_seconds = flags.approval_ttl});
  if (!approvals.ok()) return Fail(approvals.status());
  (*approvals)->Start(std::chrono::seconds(10));
  TaskRegistry task_registry(**store, **audit, clock, task_limits, approvals->get());
  // One cache for every path that accepts token-request proofs, so a proof is used once.
  dpop::ReplayCache replay_cache;
  // Proofs the previous instance may have accepted are refused (dpop::FirstAcceptableIat).
  const int64_t started_at = first_start ? 0 : clock.NowSeconds();
  // Nonces rotate once per proof lifetime; the previous one stays valid, so a client's nonce
  // works for one to two proof lifetimes and every answer hands out the current one.
  std::unique_ptr<DpopNonceSource> dpop_nonces;
  if (flags.dpop_nonce) {
    dpop_nonces = std::make_unique<DpopNonceSource>(clock, flags.dpop_proof_max_age);
  }
  ExchangeOptions exchange_options{.issuer_url = issuer_url,
                                   .default_token_ttl_seconds = defaults.task_token_ttl_seconds,
                                   .proof = {.started_at = started_at,
                                             .max_age_seconds = flags.dpop_proof_max_age,
                                             .max_future_seconds = flags.dpop_proof_max_future,
                                             .replay_cache = &replay_cache,
                                             .nonces = dpop_nonces.get()}};
  TaskTokenExchange exchange(**authority, **entries, task_registry, **store, clock,
                             exchange_options);
  std::shared_ptr<policy::RulesPolicy> rules;
  auto hooks = PolicyHooksFromFlags(flags, **store, clock, &broker_metrics, &rules);
  if (!hooks.ok()) return Fail(hooks.status());
  policy::PolicyChain policy_chain(
      std::move(*hooks), std::chrono::milliseconds(flags.policy_timeout_ms), &broker_metrics);
  NodeAuthenticator node_authenticator(**authority, **store, clock);
  issuance::IssuancePipeline pipeline({.minter = &minter,
                                       .nodes = &node_authenticator,
                                       .entries = entries->get(),
                                       .tasks = &task_registry,
                                       .exchange = &exchange,
                                       .policy = &policy_chain,
                                       .audit = audit->get(),
                                       .store = store->get(),
                                       .metrics = &broker_metrics,
                                       .clock = &clock});
  TokenEndpoint token_endpoint(pipeline);
  NodeService node_service(**authority, **entries, node_authenticator, pipeline, &task_registry,
                           node_attestors, issuer_url);
  AdminService admin_service(**authority, **store, **entries, **audit, clock);
  admin_service.EnableApprovals(approvals->get());
  // `mandate policy reload` does what SIGHUP does.
  if (rules != nullptr) admin_service.SetPolicyReloader([rules] { return rules->Reload(); });

  // TLS for the agent-facing port: a fresh key each start, certificate from our CA.
  auto server_key = crypto::PrivateKey::GenerateP256();
  if (!server_key.ok()) return Fail(server_key.status());
  int64_t server_ttl = (*authority)->ca_certificate().not_after() - clock.NowSeconds();
  auto server_cert = (*authority)->SignServerCertificate(server_key->public_key(), server_ttl);
  if (!server_cert.ok()) return Fail(server_cert.status());
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = (*authority)->bundle_pem();
  ssl.pem_key_cert_pairs.push_back({server_key->ExportPemSecret(), server_cert->Pem()});

  grpc::ServerBuilder node_builder;
  int bound_agent_port = 0;
  node_builder.AddListeningPort(flags.agent_listen, grpc::SslServerCredentials(ssl),
                                &bound_agent_port);
  node_builder.RegisterService(&node_service);
  node_builder.SetMaxReceiveMessageSize(4 * 1024 * 1024);
  // Bound what unauthenticated peers can hold: threads for the synchronous handlers (each agent
  // keeps one Sync stream open) and streams per connection. Excess calls get RESOURCE_EXHAUSTED.
  grpc::ResourceQuota node_quota("node-api");
  node_quota.SetMaxThreads(flags.max_node_threads);
  node_builder.SetResourceQuota(node_quota);
  node_builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 16);
  // Agents ping every 30 s (SetAgentKeepalive); gRPC's default policy answers that with GOAWAY.
  grpcutil::AcceptAgentKeepalive(node_builder);
  // Idle handler threads kept ready (gRPC's default of 2 creates a thread per concurrent call).
  node_builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MIN_POLLERS, 2);
  node_builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 16);
  std::unique_ptr<grpc::Server> node_server = node_builder.BuildAndStart();
  if (!node_server || bound_agent_port == 0) {
    return Fail(absl::UnavailableError(
        absl::StrCat("cannot listen on --agent-listen ", flags.agent_listen)));
  }

  grpc::ServerBuilder admin_builder;
  admin_builder.RegisterService(&admin_service);
  std::unique_ptr<grpc::Server> admin_server = admin_builder.BuildAndStart();
  std::string admin_path =
      flags.admin_socket.empty() ? flags.data_dir + "/admin.sock" : flags.admin_socket;
  uid_t self = ::geteuid();
  auto admin_listener = grpcutil::UdsListener::Start(
      admin_server.get(), admin_path, 0600,
      [self](const grpcutil::PeerCredentials& peer) { return peer.uid == self || peer.uid == 0; });
  if (!admin_listener.ok()) return Fail(admin_listener.status());
  // Decisions record who made them: the admin socket's peer (SO_PEERCRED at accept).
  admin_service.SetCallerIdentifier(
      [listener = admin_listener->get()](
          const grpc::ServerContext* context) -> absl::StatusOr<std::string> {
        if (context == nullptr) return absl::UnauthenticatedError("no call context");
        ASSIGN_OR_RETURN(grpcutil::PeerCredentials peer, listener->PeerOf(*context));
        return absl::StrCat("uid:", peer.uid);
      });

  // Signs the audit chain's head now and then; its destructor (before the audit log's) signs
  // the final head of this run.
  AuditCheckpointer checkpointer(
      **store, **audit, issuer_url,
      [&authority](std::string_view typ, std::string_view payload) {
        return (*authority)->SignJws(typ, payload);
      },
      (*authority)->jwt_public_key(), clock);
  checkpointer.Start(std::chrono::seconds(flags.audit_checkpoint_interval));

  http.SetMetrics(&broker_metrics);
  http.Serve(issuer_url, &token_endpoint, audit->get(), store->get());

  nlohmann::json endpoints = {{"agent_address", absl::StrCat(agent_host, ":", bound_agent_port)},
                              {"http_address", absl::StrCat(http_host, ":", http.port())},
                              {"issuer_url", issuer_url},
                              {"admin_socket", admin_path},
                              {"trust_domain", td->name()},
                              {"pid", ::getpid()}};
  if (auto s = crypto::WriteFileAtomic(flags.data_dir + "/endpoints.json", endpoints.dump() + "\n",
                                       0644);
      !s.ok()) {
    return Fail(s);
  }
  http.SetReady(true);
  spdlog::info("mandate-broker ready trust_domain={} agent={}:{} http={} admin={} entries={}",
               td->name(), agent_host, bound_agent_port, issuer_url, admin_path,
               (*entries)->size());

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  int sig = 0;
  // SIGHUP reloads the rules file; a broken file is refused and the last good one stays.
  while (sigwait(&signals, &sig) == 0 && sig == SIGHUP) {
    if (rules == nullptr) {
      spdlog::info("SIGHUP: no --policy-file to reload");
    } else if (absl::Status s = rules->Reload(); !s.ok()) {
      spdlog::error("policy reload refused, keeping the last good rules: {}",
                    std::string(s.message()));
    } else {
      spdlog::info("policy rules reloaded from {}", flags.policy_file);
    }
  }
  spdlog::info("signal {} received; draining", sig);
  http.SetReady(false);
  node_service.Shutdown();
  (*admin_listener)->Stop();
  auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(5);
  node_server->Shutdown(deadline);
  admin_server->Shutdown(deadline);
  http.Stop();
  checkpointer.Stop();
  (*approvals)->Stop();
  spdlog::info("mandate-broker stopped");
  return 0;
}

}  // namespace
}  // namespace mandate::broker

int main(int argc, char** argv) {
  mandate::SetUpRuntime();
  // Every agent connection and HTTP client costs a descriptor: use what the hard limit allows.
  mandate::RaiseFileLimit();
  // Block termination signals and SIGHUP (reload the rules file) in every thread; main() takes
  // them with sigwait. A SIGHUP left unblocked would kill the broker (its default action).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  mandate::broker::BrokerFlags flags;
  CLI::App app{"mandate-broker: workload identity and credential broker"};
  app.add_option("--config", flags.config_file, "TOML config file (keys as flag names with _)");
  app.add_option("--data-dir", flags.data_dir, "State directory (created 0700)");
  app.add_option("--trust-domain", flags.trust_domain, "Trust domain, e.g. example.org");
  app.add_option("--agent-listen", flags.agent_listen, "gRPC+TLS address for node agents")
      ->capture_default_str();
  app.add_option("--http-listen", flags.http_listen, "HTTP address")->capture_default_str();
  app.add_option("--admin-socket", flags.admin_socket, "Admin socket (default DIR/admin.sock)");
  app.add_option("--issuer-url", flags.issuer_url, "Issuer URL (default from --http-listen)");
  app.add_option("--http-tls-cert", flags.http_tls_cert, "TLS certificate for HTTP");
  app.add_option("--http-tls-key", flags.http_tls_key, "TLS key for HTTP");
  app.add_flag("--insecure-http", flags.insecure_http, "Allow plain HTTP on non-loopback");
  app.add_option("--log-format", flags.log_format, "text|json")->capture_default_str();
  app.add_option("--log-level", flags.log_level, "trace|debug|info|warn|error")
      ->capture_default_str();
  app.add_option("--x509-svid-ttl", flags.x509_svid_ttl, "Default X509-SVID TTL (s)")
      ->capture_default_str();
  app.add_option("--jwt-svid-ttl", flags.jwt_svid_ttl, "Default JWT-SVID TTL (s)")
      ->capture_default_str();
  app.add_option("--agent-svid-ttl", flags.agent_svid_ttl, "Node agent SVID TTL (s)")
      ->capture_default_str();
  app.add_option("--max-node-threads", flags.max_node_threads,
                 "Threads for the node API (one per connected agent plus calls in flight)")
      ->capture_default_str()
      ->check(CLI::Range(16, 65536));
  app.add_option("--http-threads", flags.http_threads,
                 "Worker threads for POST /token (requests handled at once)")
      ->capture_default_str()
      ->check(CLI::Range(4, 4096));
  app.add_option("--http-max-connections", flags.http_max_connections,
                 "Open HTTP connections in all; more are closed at accept")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  app.add_option("--http-max-connections-per-ip", flags.http_max_connections_per_ip,
                 "Open HTTP connections from one IP address; more are closed at accept")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  app.add_option("--max-task-ttl", flags.max_task_ttl,
                 "Longest lifetime of a declared task (s); longer requests are capped")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{60}, int64_t{30 * 24 * 3600}));
  app.add_flag("--dpop-nonce", flags.dpop_nonce,
               "Require a server-issued DPoP nonce in /token proofs (RFC 9449 §8)");
  app.add_option("--dpop-proof-max-age", flags.dpop_proof_max_age,
                 "Oldest DPoP proof iat accepted (s before now)")
      ->capture_default_str();
  app.add_option("--dpop-proof-max-future", flags.dpop_proof_max_future,
                 "Newest DPoP proof iat accepted (s after now: clock skew)")
      ->capture_default_str();
  app.add_option("--audit-checkpoint-interval", flags.audit_checkpoint_interval,
                 "Seconds between signed checkpoints of the audit chain head (when it grew)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{86400}));
  app.add_option("--policy-timeout-ms", flags.policy_timeout_ms,
                 "Deadline of one policy decision (all hooks together); past it the request is "
                 "denied")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{60000}));
  app.add_option("--policy-file", flags.policy_file,
                 "Built-in policy rules (TOML, docs/policy.md); reloaded on SIGHUP");
  app.add_option("--policy-grpc", flags.policy_grpc,
                 "External policy hook: HOST:PORT of mandate.policy.v1.PolicyHook");
  app.add_option("--policy-grpc-ca", flags.policy_grpc_ca, "PEM roots of the gRPC hook's TLS");
  app.add_option("--policy-grpc-cert", flags.policy_grpc_cert,
                 "PEM client certificate chain for the gRPC hook (mTLS)");
  app.add_option("--policy-grpc-key", flags.policy_grpc_key,
                 "PEM client key for the gRPC hook (mTLS)");
  app.add_option("--policy-grpc-server-name", flags.policy_grpc_server_name,
                 "Name checked in the gRPC hook's certificate instead of HOST");
  app.add_flag("--policy-grpc-plaintext", flags.policy_grpc_plaintext,
               "Plaintext gRPC to the hook (loopback development only)");
  app.add_option("--policy-grpc-kinds", flags.policy_grpc_kinds,
                 "Comma-separated kinds the gRPC hook decides (default: all)");
  app.add_option("--policy-webhook", flags.policy_webhook,
                 "External policy hook: URL answering OPA's data API (POST {input})");
  app.add_option("--policy-webhook-ca", flags.policy_webhook_ca,
                 "PEM roots for an https:// webhook (default: the system's)");
  app.add_option("--policy-webhook-cert", flags.policy_webhook_cert,
                 "PEM client certificate chain for the webhook (mTLS)");
  app.add_option("--policy-webhook-key", flags.policy_webhook_key,
                 "PEM client key for the webhook (mTLS)");
  app.add_option("--policy-webhook-kinds", flags.policy_webhook_kinds,
                 "Comma-separated kinds the webhook decides (default: all)");
  app.add_option("--approval-ttl", flags.approval_ttl,
                 "Seconds an operator has to approve a task declaration the policy hook sent "
                 "to a human; then it expires and the task is refused")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{7 * 24 * 3600}));
  app.add_option("--tpm-ek-ca", flags.tpm_ek_ca_files,
                 "PEM bundle of TPM EK CA certificates to trust (repeatable; enables TPM "
                 "attestation)");
  app.add_option("--tpm-ek-hash", flags.tpm_ek_hashes,
                 "SHA-256 (hex) of an EK SubjectPublicKeyInfo to admit without a certificate "
                 "(repeatable)");
  CLI11_PARSE(app, argc, argv);
  if (!flags.config_file.empty()) {
    if (auto s = mandate::broker::ApplyConfigFile(flags.config_file, app, flags); !s.ok()) {
      std::cerr << "mandate-broker: " << s.message() << "\n";
      return 2;
    }
  }
  if (flags.data_dir.empty() || flags.trust_domain.empty()) {
    std::cerr << "mandate-broker: --data-dir and --trust-domain are required\n";
    return 2;
  }
  for (int64_t ttl : {flags.x509_svid_ttl, flags.jwt_svid_ttl, flags.agent_svid_ttl}) {
    if (ttl < 60 || ttl > 30 * 24 * 3600) {
      std::cerr << "mandate-broker: SVID TTLs must be between 60 s and 30 days\n";
      return 2;
    }
  }
  if (flags.max_task_ttl < 60 || flags.max_task_ttl > 30 * 24 * 3600) {
    std::cerr << "mandate-broker: --max-task-ttl must be between 60 s and 30 days\n";
    return 2;
  }
  if (flags.dpop_proof_max_age < 5 || flags.dpop_proof_max_age > 600 ||
      flags.dpop_proof_max_future < 0 || flags.dpop_proof_max_future > 60) {
    std::cerr << "mandate-broker: --dpop-proof-max-age must be 5-600 s and "
                 "--dpop-proof-max-future 0-60 s\n";
    return 2;
  }
  if (auto s = mandate::log::InitLogging("mandate-broker", flags.log_format, flags.log_level);
      !s.ok()) {
    std::cerr << "mandate-broker: " << s.message() << "\n";
    return 2;
  }
  return mandate::broker::Run(flags);
}
