// mandate-bench: the end-to-end benchmark driver (tests/bench/run.sh starts the daemons and calls
// it; docs/performance.md explains the scenarios).
//
//   mandate-bench run   --socket S --admin-socket A --issuer URL --http HOST:PORT --broker
//   HOST:PORT
//                       --bundle FILE --agent-data-dir DIR --node-id ID [--quick|--smoke]
//                       [--curve]
//       the baseline and every scenario against a running broker + agent; one JSON object.
//   mandate-bench seed  --db FILE --trust-domain TD --count N --nodes K
//       N registration entries spread over K nodes, written straight into a broker store.
//   mandate-bench match --count N [--quick]
//       in-process entry matching for a node holding N entries.
//
// Every figure is measured in this process on this machine; nothing is asserted here (run.sh
// compares with the targets).
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "broker/agent/agent.h"
#include "broker/agent/broker_client.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/selector.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/store/sqlite_store.h"
#include "broker/common/util/clock.h"
#include "broker/common/util/runtime.h"
#include "broker/server/audit/audit_log.h"
#include "mandate/admin/v1/admin.grpc.pb.h"
#include "mandate/token_verifier.h"
#include "mandate/workload_client.h"
#include "tests/bench/load.h"
#include "tests/bench/report.h"
#include "tests/bench/slow_clients.h"

namespace mandate::bench {
namespace {

using json = nlohmann::json;
using std::chrono::milliseconds;
namespace adminpb = mandate::admin::v1;

json ToJson(const LoadResult& r) {
  // Latencies keep two decimals: some operations (entry matching) take well under 1 us.
  auto us = [](double v) { return std::round(v * 100) / 100; };
  json out = {{"ops_per_s", static_cast<int64_t>(r.ops_per_s)},
              {"p50_us", us(r.p50_us)},
              {"p99_us", us(r.p99_us)},
              {"errors", r.errors},
              {"concurrency", r.concurrency},
              {"ops", r.ops}};
  if (r.errors > 0) out["first_error"] = r.first_error.substr(0, 300);
  return out;
}

// Fails the whole run: a benchmark that cannot set itself up measures nothing.
[[noreturn]] void Die(const std::string& what, const absl::Status& status) {
  std::cerr << "mandate-bench: " << what << ": " << status << "\n";
  std::exit(1);
}

// The exit code for a run whose results are `scenarios` (name -> result; `curve`, when given,
// holds more of them by scenario and concurrency): 1, after naming each failed one on stderr,
// when any operation failed or a scenario did none (FailedScenarios). The results are printed
// all the same, so the failures can be read in context.
int ExitCodeFor(const json& scenarios, const json& curve = json()) {
  std::vector<std::string> failed = FailedScenarios(scenarios);
  if (curve.is_object()) {
    for (const auto& [name, points] : curve.items()) {
      for (std::string& line : FailedScenarios(points, "curve " + name + " concurrency ")) {
        failed.push_back(std::move(line));
      }
    }
  }
  for (const std::string& line : failed) std::cerr << "mandate-bench: FAILED " << line << "\n";
  return failed.empty() ? 0 : 1;
}

template <typename T>
T OrDie(absl::StatusOr<T> value, const std::string& what) {
  if (!value.ok()) Die(what, value.status());
  return *std::move(value);
}

struct RunArgs {
  std::string socket;
  std::string admin_socket;
  std::string issuer;
  std::string http;
  std::string broker;
  std::string bundle;
  std::string agent_data_dir;
  std::string node_id;
  bool quick = false;
  bool smoke = false;
  bool curve = false;
  int concurrency = 16;
  std::string only;  // run just these scenarios (comma-separated; profiling, policy A/B)
};

class Bench {
 public:
  explicit Bench(RunArgs args) : args_(std::move(args)) {
    duration_ = milliseconds(args_.smoke ? 200 : args_.quick ? 2000 : 8000);
    auto channel =
        grpc::CreateChannel("unix:" + args_.admin_socket, grpc::InsecureChannelCredentials());
    admin_ = adminpb::Admin::NewStub(channel);
    td_ = OrDie(spiffe::SpiffeId::Parse(args_.node_id), "--node-id").trust_domain().name();
    // Unique per run, so several runs can share one stack (profiling by hand).
    main_id_ = absl::StrCat("spiffe://", td_, "/bench/main-", ::getpid());
  }

  json Run() {
    json out;
    out["baseline"] = Baseline();
    main_entry_ = CreateEntry(main_id_);
    WaitServed(main_id_);
    json& s = out["scenarios"];
    const std::vector<std::pair<std::string, std::function<json()>>> scenarios = {
        {"jwt_svid_mint", [&] { return JwtSvidMint(args_.concurrency, /*cached=*/false); }},
        {"jwt_svid_cached", [&] { return JwtSvidMint(args_.concurrency, /*cached=*/true); }},
        {"broker_jwt_svid_mint", [&] { return BrokerJwtSvidMint(args_.concurrency); }},
        {"x509_svid_mint", [&] { return X509SvidMint(args_.concurrency); }},
        {"task_token", [&] { return TaskToken(args_.concurrency); }},
        {"token_endpoint", [&] { return TokenEndpoint(args_.concurrency); }},
        {"token_endpoint_idle_mix", [&] { return TokenEndpointIdleMix(args_.concurrency); }},
        {"verify_task_token", [&] { return VerifyTaskToken(); }},
        {"attest_connection", [&] { return AttestConnection(1); }},
        {"revocation_propagation", [&] { return RevocationPropagation(); }},
    };
    const std::vector<std::string> only = absl::StrSplit(args_.only, ',', absl::SkipEmpty());
    for (const auto& [name, run] : scenarios) {
      if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) continue;
      // Durability is on throughout: each scenario reports the audit records the broker
      // stored while it ran and the transactions (fsyncs) that stored them.
      AuditCounters before = ReadAuditCounters();
      s[name] = run();
      AuditCounters after = ReadAuditCounters();
      const int64_t records = after.records - before.records;
      const int64_t commits = after.commits - before.commits;
      if (records > 0) {
        s[name]["audit_records"] = records;
        s[name]["audit_commits"] = commits;
        s[name]["audit_records_per_commit"] =
            std::round(10.0 * records / std::max<int64_t>(commits, 1)) / 10.0;
      }
    }
    if (!args_.only.empty()) return out;
    // Measured again at the end, keeping the faster of the two: a shared machine's noise
    // (other tenants, frequency changes) then inflates the ratios less often than it deflates them.
    json again = Baseline();
    for (const char* key : {"es256_sign_per_s", "es256_verify_per_s"}) {
      out["baseline"][key] =
          std::max(out["baseline"][key].get<int64_t>(), again[key].get<int64_t>());
    }
    if (args_.curve) {
      json& curve = out["curve"]["jwt_svid_mint"];
      for (int c : {1, 2, 4, 8, 16, 32, 64}) curve[std::to_string(c)] = JwtSvidMint(c, false);
      json& task_curve = out["curve"]["task_token"];
      for (int c : {1, 4, 16, 64}) task_curve[std::to_string(c)] = TaskToken(c);
    }
    return out;
  }

 private:
  // OpenSSL's single-core ES256 rates through the crypto module (EVP), measured now: every
  // target is a ratio to these.
  json Baseline() {
    crypto::PrivateKey key = OrDie(crypto::PrivateKey::GenerateP256(), "key");
    crypto::PublicKey pub = key.public_key();
    const std::string message(100, 'm');
    std::string signature = OrDie(key.SignDer(message), "sign");
    milliseconds each = args_.smoke ? milliseconds(100) : milliseconds(1000);
    LoadResult sign = RunLoad(1, each, [&](int) { return key.SignDer(message).status(); });
    LoadResult verify = RunLoad(1, each, [&](int) {
      return pub.VerifyDer(message, signature) ? absl::OkStatus()
                                               : absl::InternalError("verify failed");
    });
    return {{"es256_sign_per_s", static_cast<int64_t>(sign.ops_per_s)},
            {"es256_verify_per_s", static_cast<int64_t>(verify.ops_per_s)}};
  }

  struct AuditCounters {
    int64_t records = 0;
    int64_t commits = 0;
  };
  // The broker's audit counters from /metrics; zeros when they cannot be read.
  AuditCounters ReadAuditCounters() {
    httplib::Client http(args_.http.substr(0, args_.http.rfind(':')),
                         std::stoi(args_.http.substr(args_.http.rfind(':') + 1)));
    auto response = http.Get("/metrics");
    AuditCounters out;
    if (!response || response->status != 200) return out;
    auto value = [&](const char* name) -> int64_t {
      std::string needle = absl::StrCat("\n", name, " ");
      size_t at = response->body.find(needle);
      if (at == std::string::npos) return 0;
      return std::strtoll(response->body.c_str() + at + needle.size(), nullptr, 10);
    };
    out.records = value("mandate_audit_records_total");
    out.commits = value("mandate_audit_commits_total");
    return out;
  }

  std::unique_ptr<WorkloadClient> Client() {
    return OrDie(WorkloadClient::Connect("unix://" + args_.socket), "connect to the agent");
  }

  // An entry for this process (its uid) under the bench agent's node.
  adminpb::CreateEntryRequest EntryRequest(const std::string& spiffe_id) {
    adminpb::CreateEntryRequest request;
    auto* entry = request.mutable_entry();
    entry->set_spiffe_id(spiffe_id);
    entry->set_parent_id(args_.node_id);
    entry->add_selectors(absl::StrCat("unix:uid:", ::getuid()));
    entry->add_scopes("bench:read");
    entry->add_scopes("bench:write");
    return request;
  }

  std::string CreateEntry(const std::string& spiffe_id) {
    grpc::ClientContext context;
    mandate::common::v1::Entry created;
    grpc::Status status = admin_->CreateEntry(&context, EntryRequest(spiffe_id), &created);
    if (!status.ok()) Die("create entry", absl::InternalError(status.error_message()));
    return created.id();
  }

  absl::Status DeleteEntry(const std::string& id) {
    grpc::ClientContext context;
    adminpb::DeleteEntryRequest request;
    request.set_id(id);
    adminpb::DeleteEntryResponse response;
    grpc::Status status = admin_->DeleteEntry(&context, request, &response);
    return status.ok() ? absl::OkStatus() : absl::InternalError(status.error_message());
  }

  // Waits until the agent serves `spiffe_id` to this process.
  void WaitServed(const std::string& spiffe_id) {
    auto client = Client();
    for (int i = 0; i < 500; ++i) {
      if (client->FetchJwtSvid({"https://bench.example/ready"}, spiffe_id).ok()) return;
      std::this_thread::sleep_for(milliseconds(20));
    }
    Die("agent never served " + spiffe_id, absl::DeadlineExceededError("10 s"));
  }

  // SDK -> agent -> broker -> sign. With `cached`, one audience per thread: after the first call
  // the agent answers from its JWT-SVID cache.
  json JwtSvidMint(int concurrency, bool cached) {
    std::vector<std::unique_ptr<WorkloadClient>> clients;
    for (int t = 0; t < concurrency; ++t) clients.push_back(Client());
    std::vector<int64_t> counters(concurrency, 0);
    const std::string run = std::to_string(++run_counter_);
    LoadResult r = RunLoad(concurrency, duration_, [&](int t) {
      std::string audience =
          cached ? absl::StrCat("https://cached.bench.example/", t)
                 : absl::StrCat("https://bench.example/", run, "/", t, "/", counters[t]++);
      return clients[t]->FetchJwtSvid({audience}, main_id_).status();
    });
    return ToJson(r);
  }

  // The node API's CSR signing as the agent calls it: mTLS with the agent's own SVID, one CSR
  // per call, signed by the broker for the bench entry.
  // A node API client with the bench agent's identity (its SVID and key from its data dir).
  std::unique_ptr<agent::BrokerClient> AgentBrokerClient() {
    std::string pem =
        OrDie(crypto::ReadFile(args_.agent_data_dir + "/agent_svid.pem"), "agent_svid.pem");
    auto chain = OrDie(crypto::Certificate::ParsePemChain(pem), "agent chain");
    auto key = OrDie(crypto::PrivateKey::FromPem(pem), "agent key");
    std::string bundle = OrDie(crypto::ReadFile(args_.bundle), "bundle");
    auto broker = std::make_unique<agent::BrokerClient>(
        args_.broker, bundle, OrDie(spiffe::TrustDomain::Parse(td_), "trust domain"));
    if (auto s = broker->SetIdentity(chain, key); !s.ok()) Die("agent identity", s);
    return broker;
  }

  json X509SvidMint(int concurrency) {
    auto broker = AgentBrokerClient();
    crypto::PrivateKey workload_key = OrDie(crypto::PrivateKey::GenerateP256(), "key");
    std::string csr = OrDie(crypto::CreateCsrDer(workload_key, main_id_), "csr");
    LoadResult r = RunLoad(concurrency, duration_, [&](int) {
      return broker->SignX509Svids({{main_entry_, csr}}).status();
    });
    return ToJson(r);
  }

  // The broker alone: MintJwtSvid called as the agent would (mTLS with the agent's SVID, one
  // connection), a new audience per call. Set beside jwt_svid_mint it splits the cost of the
  // Workload API hop (attestation, agent gRPC) from the broker's.
  json BrokerJwtSvidMint(int concurrency) {
    auto broker = AgentBrokerClient();
    std::atomic<int64_t> n{0};
    LoadResult r = RunLoad(concurrency, duration_, [&](int) {
      return broker->MintJwtSvid(main_entry_, {absl::StrCat("https://direct.bench.example/", n++)})
          .status();
    });
    return ToJson(r);
  }

  // Workload API FetchTaskToken: the SDK signs a DPoP proof, the agent forwards it, the broker
  // verifies it (replay cache included) and signs the token.
  json TaskToken(int concurrency) {
    std::vector<std::unique_ptr<WorkloadClient>> clients;
    std::vector<TaskInfo> tasks;
    for (int t = 0; t < concurrency; ++t) {
      clients.push_back(Client());
      tasks.push_back(
          OrDie(clients[t]->DeclareTask("benchmark", {"bench:read"}, {"https://api.bench.example"},
                                        std::chrono::seconds(0), main_id_),
                "declare task"));
    }
    LoadResult r = RunLoad(concurrency, duration_, [&](int t) {
      return clients[t]->FetchTaskToken(tasks[t], "https://api.bench.example").status();
    });
    return ToJson(r);
  }

  // HTTP POST /token: JWT-SVID (fetched once per thread) + a fresh DPoP proof per call, over a
  // keep-alive connection per thread.
  json TokenEndpoint(int concurrency) {
    std::vector<std::unique_ptr<WorkloadClient>> clients;
    std::vector<std::unique_ptr<httplib::Client>> http;
    std::vector<httplib::Params> forms;
    std::string token_endpoint;
    std::string host = args_.http.substr(0, args_.http.rfind(':'));
    int port = std::stoi(args_.http.substr(args_.http.rfind(':') + 1));
    for (int t = 0; t < concurrency; ++t) {
      clients.push_back(Client());
      TaskInfo task =
          OrDie(clients[t]->DeclareTask("benchmark", {"bench:read"}, {"https://api.bench.example"},
                                        std::chrono::seconds(0), main_id_),
                "declare task");
      token_endpoint = task.token_endpoint;
      JwtSvid svid = OrDie(clients[t]->FetchJwtSvid({args_.issuer}, main_id_), "JWT-SVID");
      forms.push_back({{"grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"},
                       {"subject_token", svid.token},
                       {"subject_token_type", "urn:ietf:params:oauth:token-type:jwt"},
                       {"task_id", task.id}});
      http.push_back(std::make_unique<httplib::Client>(host, port));
      http[t]->set_keep_alive(true);
      http[t]->set_tcp_nodelay(true);
    }
    LoadResult r = RunLoad(concurrency, duration_, [&](int t) -> absl::Status {
      auto proof = clients[t]->CreateProof("POST", token_endpoint);
      if (!proof.ok()) return proof.status();
      auto response = http[t]->Post("/token", {{"DPoP", *proof}}, forms[t]);
      if (!response) return absl::UnavailableError(httplib::to_string(response.error()));
      if (response->status != 200) {
        return absl::InternalError(absl::StrCat(response->status, " ", response->body));
      }
      return absl::OkStatus();
    });
    return ToJson(r);
  }

  // token_endpoint while 200 slow clients (slowloris: a header byte every 500 ms, reopened when
  // closed) hold connections to the same HTTP listener.
  json TokenEndpointIdleMix(int concurrency) {
    const int slow = args_.smoke ? 20 : 200;
    SlowClients clients(args_.http, slow);
    json out = TokenEndpoint(concurrency);
    out["slow_connections"] = slow;
    out["slow_reopened"] = clients.reopened();
    return out;
  }

  // The verifier SDK on one thread: token + proof per request. Proofs are made beforehand (each
  // is single-use), so only verification is timed.
  json VerifyTaskToken() {
    auto client = Client();
    TaskInfo task =
        OrDie(client->DeclareTask("benchmark", {"bench:read"}, {"https://api.bench.example"},
                                  std::chrono::seconds(0), main_id_),
              "declare task");
    mandate::TaskToken token =
        OrDie(client->FetchTaskToken(task, "https://api.bench.example"), "task token");
    TokenVerifierOptions options;
    options.issuer = args_.issuer;
    options.audience = "https://api.bench.example";
    // A service that has been up for a while: the clock reads an hour back while the verifier
    // is created, so its restart window (no proofs until creation + proof_max_future_seconds +
    // 1 s) is behind it and the proofs made below are accepted.
    auto created = std::make_shared<std::atomic<bool>>(false);
    options.clock = [created] {
      return mandate::Clock::Real().NowSeconds() - (created->load() ? 0 : 3600);
    };
    auto verifier = OrDie(TokenVerifier::Create(options), "verifier");
    *created = true;
    const std::string url = "https://api.bench.example/v1/items";
    const std::string authorization = "DPoP " + token.access_token;
    int64_t count = args_.smoke ? 200 : args_.quick ? 8000 : 30000;
    std::vector<std::string> proofs;
    proofs.reserve(count + 1);
    for (int64_t i = 0; i <= count; ++i) {
      proofs.push_back(OrDie(client->CreateProof("GET", url, token.access_token), "proof"));
    }
    // The first call fetches the JWKS; it is not part of the steady state.
    HttpRequestView warm{"GET", url, {authorization}, {proofs.back()}};
    if (auto v = verifier->Verify(warm); !v.ok()) Die("verify", v.status());
    std::atomic<int64_t> next{0};
    LoadResult r = RunLoad(
        1, duration_ * 4,
        [&](int) {
          HttpRequestView request{"GET", url, {authorization}, {proofs[next++]}};
          return verifier->Verify(request).status();
        },
        count);
    return ToJson(r);
  }

  // A new Workload API connection per call: connect, attest the caller (exe hash cached by
  // inode/mtime), answer from the JWT-SVID cache.
  json AttestConnection(int concurrency) {
    LoadResult r = RunLoad(concurrency, duration_, [&](int) -> absl::Status {
      auto client = WorkloadClient::Connect("unix://" + args_.socket);
      if (!client.ok()) return client.status();
      return (*client)->FetchJwtSvid({"https://cached.bench.example/attest"}, main_id_).status();
    });
    return ToJson(r);
  }

  // Deleting a registration entry (the admin action that revokes an identity today) until the
  // agent refuses that identity to its workload. Milliseconds.
  json RevocationPropagation() {
    int rounds = args_.smoke ? 2 : args_.quick ? 10 : 40;
    auto client = Client();
    std::vector<double> millis;
    int64_t errors = 0;
    for (int i = 0; i < rounds; ++i) {
      std::string id = absl::StrCat("spiffe://", td_, "/bench/revoke-", run_counter_, "-", i);
      std::string entry = CreateEntry(id);
      WaitServed(id);
      auto start = std::chrono::steady_clock::now();
      if (!DeleteEntry(entry).ok()) {
        ++errors;
        continue;
      }
      bool refused = false;
      while (std::chrono::steady_clock::now() - start < std::chrono::seconds(10)) {
        if (!client->FetchJwtSvid({"https://bench.example/revoked"}, id).ok()) {
          refused = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      if (!refused) {
        ++errors;
        continue;
      }
      millis.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
              .count());
    }
    std::sort(millis.begin(), millis.end());
    return {{"p50_ms", Quantile(millis, 0.5)},
            {"p99_ms", Quantile(millis, 0.99)},
            {"max_ms", millis.empty() ? 0 : millis.back()},
            {"rounds", rounds},
            {"errors", errors},
            {"concurrency", 1}};
  }

  RunArgs args_;
  milliseconds duration_;
  std::unique_ptr<adminpb::Admin::Stub> admin_;
  std::string td_;
  std::string main_id_;
  std::string main_entry_;
  int run_counter_ = 0;
};

// Writes `count` entries over `nodes` node IDs into the store at `db` in batches (one
// transaction each). Their selectors match no real process.
int Seed(const std::string& db, const std::string& td, int64_t count, int64_t nodes) {
  auto store = OrDie(store::SqliteStore::Open(db), "open store");
  const int64_t batch_size = 5000;
  for (int64_t base = 0; base < count; base += batch_size) {
    std::vector<store::RegistrationEntry> batch;
    for (int64_t i = base; i < std::min(count, base + batch_size); ++i) {
      store::RegistrationEntry e;
      e.id = absl::StrCat("seed-", i);
      e.spiffe_id = absl::StrCat("spiffe://", td, "/fleet/agent-", i);
      e.parent_id = absl::StrCat("spiffe://", td, "/node/join/seed-", i % nodes);
      e.selectors = {absl::StrCat("unix:uid:", 100000 + i), "unix:path:/opt/agents/bot"};
      e.scopes = {"tickets:read"};
      e.created_at = 1700000000;
      batch.push_back(std::move(e));
    }
    OrDie(store->CreateEntries(std::move(batch)), "seed entries");
  }
  std::cout << json{{"seeded", count}, {"nodes", nodes}}.dump() << std::endl;
  return 0;
}

// Agent-side entry matching for one caller against a node holding `count` entries (the work
// every Workload API call does after attestation).
int Match(int64_t count, bool quick) {
  agent::Snapshot snapshot;
  snapshot.trust_domain = "example.org";
  for (int64_t i = 0; i < count; ++i) {
    agent::AssignedEntry e;
    e.id = absl::StrCat("seed-", i);
    e.spiffe_id = absl::StrCat("spiffe://example.org/fleet/agent-", i);
    e.selectors = spiffe::SelectorSet(
        std::vector<std::string>{absl::StrCat("unix:uid:", 100000 + i), "unix:path:/opt/bot"});
    snapshot.entries.push_back(std::move(e));
  }
  agent::Agent::IndexEntries(snapshot);
  // A caller with a typical selector set (uid, gid, user, path, sha256, unit).
  spiffe::SelectorSet caller(std::vector<std::string>{
      absl::StrCat("unix:uid:", 100000 + count / 2), "unix:gid:1000", "unix:user:bot",
      "unix:path:/opt/bot", "unix:sha256:" + std::string(64, 'a'), "systemd:unit:bot.service"});
  size_t matched = 0;
  LoadResult r = RunLoad(1, milliseconds(quick ? 1000 : 3000), [&](int) {
    matched = agent::Agent::Match(snapshot, caller).size();
    return matched == 1 ? absl::OkStatus() : absl::InternalError("wrong match count");
  });
  json out = ToJson(r);
  out["entries"] = count;
  std::cout << out.dump() << std::endl;
  return ExitCodeFor({{"match", out}});
}

// The audit log alone, in process, on a real SQLite store in `dir`: `concurrency` threads
// recording back to back, each call returning once its record is fsynced (group commit). Shows
// what durability costs apart from everything else on the issuance path.
int AuditAppend(const std::string& dir, int concurrency, bool quick) {
  auto store = OrDie(store::SqliteStore::Open(dir + "/audit-bench.db"), "open store");
  auto log = OrDie(broker::AuditLog::Open(*store, "bench", Clock::Real()), "open audit log");
  LoadResult r = RunLoad(concurrency, milliseconds(quick ? 1500 : 4000), [&](int) {
    // Credential identifiers as the issuer makes them (time-ordered, see crypto::TimeOrderedId).
    absl::StatusOr<std::string> jti = crypto::TimeOrderedId();
    if (!jti.ok()) return jti.status();
    return log->Record({.event = "jwt_svid",
                        .outcome = "issued",
                        .spiffe_id = "spiffe://example.org/bench/agent",
                        .node_id = "spiffe://example.org/node/join/bench",
                        .credential_id = crypto::HexEncode(*jti),
                        .detail = R"({"entry_id":"e1","aud":["https://api.example"],)"
                                  R"("expires_at":1800000300})"});
  });
  broker::AuditLog::Stats stats = log->stats();
  json out = ToJson(r);
  out["audit_records_per_commit"] =
      std::round(10.0 * stats.records / std::max<int64_t>(stats.batches, 1)) / 10.0;
  std::cout << out.dump() << std::endl;
  return ExitCodeFor({{"audit_append", out}});
}

}  // namespace
}  // namespace mandate::bench

int main(int argc, char** argv) {
  mandate::SetUpRuntime();
  using mandate::bench::RunArgs;
  CLI::App app{"mandate-bench: Mandate's end-to-end benchmark driver"};
  app.require_subcommand(1);
  RunArgs run_args;
  auto* run = app.add_subcommand("run", "Baseline and scenarios against a running stack");
  run->add_option("--socket", run_args.socket, "Workload API socket path")->required();
  run->add_option("--admin-socket", run_args.admin_socket, "Broker admin socket")->required();
  run->add_option("--issuer", run_args.issuer, "Broker issuer URL")->required();
  run->add_option("--http", run_args.http, "Broker HTTP HOST:PORT")->required();
  run->add_option("--broker", run_args.broker, "Broker agent API HOST:PORT")->required();
  run->add_option("--bundle", run_args.bundle, "Trust bundle PEM")->required();
  run->add_option("--agent-data-dir", run_args.agent_data_dir, "Agent data dir")->required();
  run->add_option("--node-id", run_args.node_id, "The agent's node SPIFFE ID")->required();
  run->add_option("--concurrency", run_args.concurrency, "Client threads")->capture_default_str();
  run->add_flag("--quick", run_args.quick, "Short runs (about 2 s per scenario)");
  run->add_flag("--smoke", run_args.smoke, "Tiny runs: only checks that every scenario works");
  run->add_flag("--curve", run_args.curve, "Also ops/s against concurrency 1-64");
  run->add_option("--only", run_args.only, "Run only these scenarios (comma-separated)");

  std::string db, td;
  int64_t count = 0, nodes = 1;
  bool quick_match = false;
  auto* seed = app.add_subcommand("seed", "Write registration entries into a broker store");
  seed->add_option("--db", db, "SQLite file (DATA_DIR/mandate.db)")->required();
  seed->add_option("--trust-domain", td, "Trust domain")->required();
  seed->add_option("--count", count, "Entries")->required();
  seed->add_option("--nodes", nodes, "Spread over this many node IDs")->capture_default_str();
  auto* match = app.add_subcommand("match", "Agent-side entry matching, in process");
  match->add_option("--count", count, "Entries on the node")->required();
  match->add_flag("--quick", quick_match, "Short run");
  std::string audit_dir;
  int audit_concurrency = 16;
  bool quick_audit = false;
  auto* audit = app.add_subcommand("audit", "Durable audit appends alone, in process");
  audit->add_option("--dir", audit_dir, "Directory for the SQLite file")->required();
  audit->add_option("--concurrency", audit_concurrency, "Threads")->capture_default_str();
  audit->add_flag("--quick", quick_audit, "Short run");
  CLI11_PARSE(app, argc, argv);
  if (*audit) return mandate::bench::AuditAppend(audit_dir, audit_concurrency, quick_audit);

  if (*run) {
    mandate::bench::Bench bench(run_args);
    const nlohmann::json out = bench.Run();
    std::cout << out.dump() << std::endl;
    return mandate::bench::ExitCodeFor(out.value("scenarios", nlohmann::json()),
                                       out.value("curve", nlohmann::json()));
  }
  if (*seed) return mandate::bench::Seed(db, td, count, std::max<int64_t>(1, nodes));
  return mandate::bench::Match(count, quick_match);
}
