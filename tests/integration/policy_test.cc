// The policy hook chain end to end (DESIGN.md §5): real daemons asking a webhook and a gRPC
// PolicyHook server that the test runs in-process on 127.0.0.1, a rules file, human approval
// through the CLI, and the refusals of the two task-token paths (Workload API and POST /token)
// compared word for word.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "mandate/policy/v1/policy.grpc.pb.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"
#include "mandate/workload_client.h"
#include "tests/integration/tasks_fixture.h"

namespace mandate::integration {
namespace {

using ::nlohmann::json;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;
namespace pb = ::mandate::policy::v1;

constexpr char kWebhookPath[] = "/v1/data/mandate/issuance";
constexpr char kAudience[] = "https://tickets.example.org";

// What a scripted hook answers for one input document.
struct Verdict {
  bool allow = true;
  std::string reason;
  std::optional<int64_t> ttl_max;
  std::optional<std::vector<std::string>> scopes;
  bool require_approval = false;
  std::chrono::milliseconds delay{0};   // held this long first (released when the hook stops)
  std::optional<std::string> raw_body;  // webhook only: sent as is instead of the answer
};
using Script = std::function<Verdict(const json& input)>;

Script AllowAll() {
  return [](const json&) { return Verdict{}; };
}
Script DenyAll(const std::string& reason) {
  return [reason](const json&) { return Verdict{.allow = false, .reason = reason}; };
}
// `for_tokens` for task tokens, allow for everything else.
Script ForTaskTokens(Verdict for_tokens) {
  return [for_tokens](const json& input) {
    return input.value("kind", "") == "task_token" ? for_tokens : Verdict{};
  };
}

// Records every input document and answers what the test scripted. Thread-safe.
class ScriptedHook {
 public:
  virtual ~ScriptedHook() = default;
  void SetScript(Script script) {
    std::lock_guard<std::mutex> lock(mu_);
    script_ = std::move(script);
  }
  std::vector<json> Inputs() {
    std::lock_guard<std::mutex> lock(mu_);
    return inputs_;
  }
  std::vector<json> InputsOfKind(const std::string& kind) {
    std::vector<json> of_kind;
    for (const json& in : Inputs()) {
      if (in.value("kind", "") == kind) of_kind.push_back(in);
    }
    return of_kind;
  }
  virtual std::string BrokerFlag() const = 0;  // e.g. "--policy-webhook"
  virtual std::string Target() const = 0;

 protected:
  Verdict Decide(const json& input) {
    Script script;
    {
      std::lock_guard<std::mutex> lock(mu_);
      inputs_.push_back(input);
      script = script_;
    }
    Verdict v = script(input);
    if (v.delay.count() > 0) {
      std::unique_lock<std::mutex> lock(mu_);
      released_.wait_for(lock, v.delay, [&] { return stopping_; });
    }
    return v;
  }
  void ReleaseWaiters() {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    released_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable released_;
  bool stopping_ = false;
  Script script_ = AllowAll();
  std::vector<json> inputs_;
};

// An OPA-shaped webhook: POST kWebhookPath {"input": ...} -> {"result": answer}.
class WebhookHook final : public ScriptedHook {
 public:
  // `port` 0: a free one.
  explicit WebhookHook(int port = 0) {
    server_.set_keep_alive_timeout(1);  // how long stop() waits for an idle broker connection
    server_.set_tcp_nodelay(true);
    server_.set_payload_max_length(1 << 20);
    server_.Post(kWebhookPath, [this](const httplib::Request& req, httplib::Response& res) {
      json body = json::parse(req.body, nullptr, false);
      json input = body.is_object() && body.contains("input") ? body["input"] : json();
      Verdict v = Decide(input);
      if (v.raw_body.has_value()) {
        res.set_content(*v.raw_body, "application/json");
        return;
      }
      json answer = {{"allow", v.allow}};
      if (!v.reason.empty()) answer["reason"] = v.reason;
      if (v.ttl_max.has_value()) answer["ttl_max"] = *v.ttl_max;
      if (v.scopes.has_value()) answer["scopes"] = *v.scopes;
      if (v.require_approval) answer["require_approval"] = true;
      res.set_content(json{{"result", answer}}.dump(), "application/json");
    });
    if (port == 0) {
      port_ = server_.bind_to_any_port("127.0.0.1");
    } else if (server_.bind_to_port("127.0.0.1", port)) {
      port_ = port;
    }
    if (port_ <= 0) throw std::runtime_error("webhook cannot bind");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~WebhookHook() override {
    ReleaseWaiters();
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }
  std::string BrokerFlag() const override { return "--policy-webhook"; }
  std::string Target() const override { return Url(port_); }
  static std::string Url(int port) { return absl::StrCat("http://127.0.0.1:", port, kWebhookPath); }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
};

// A mandate.policy.v1.PolicyHook server (plaintext, loopback).
class GrpcHook final : public ScriptedHook, public pb::PolicyHook::Service {
 public:
  GrpcHook() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 15000);
    builder.RegisterService(this);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port_ == 0) throw std::runtime_error("gRPC hook did not start");
  }
  ~GrpcHook() override {
    ReleaseWaiters();
    server_->Shutdown(std::chrono::system_clock::now() + 1s);
  }
  std::string BrokerFlag() const override { return "--policy-grpc"; }
  std::string Target() const override { return absl::StrCat("127.0.0.1:", port_); }

  grpc::Status Check(grpc::ServerContext*, const pb::CheckRequest* request,
                     pb::CheckResponse* response) override {
    json input = {
        {"kind", request->kind()},
        {"spiffe_id", request->spiffe_id()},
        {"node_id", request->node_id()},
        {"selectors",
         std::vector<std::string>(request->selectors().begin(), request->selectors().end())},
        {"audience",
         std::vector<std::string>(request->audience().begin(), request->audience().end())},
        {"scopes", std::vector<std::string>(request->scopes().begin(), request->scopes().end())},
        {"ttl", request->ttl()},
        {"time", request->time()}};
    if (request->has_task()) {
      const pb::Task& t = request->task();
      input["task"] = {
          {"id", t.id()},
          {"purpose", t.purpose()},
          {"scopes", std::vector<std::string>(t.scopes().begin(), t.scopes().end())},
          {"audiences", std::vector<std::string>(t.audiences().begin(), t.audiences().end())}};
    }
    Verdict v = Decide(input);
    response->set_allow(v.allow);
    response->set_reason(v.reason);
    if (v.ttl_max.has_value()) response->set_ttl_max(*v.ttl_max);
    if (v.scopes.has_value()) {
      for (const auto& s : *v.scopes) response->mutable_scopes()->add_scopes(s);
    }
    response->set_require_approval(v.require_approval);
    return grpc::Status::OK;
  }

 private:
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

// A loopback port nothing listens on (bound and released).
int UnusedPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// The lifetime (exp - iat) of a JWT.
int64_t LifetimeOf(const std::string& token) {
  json claims = PayloadOf(token);
  if (!claims.is_object() || !claims["exp"].is_number_integer() ||
      !claims["iat"].is_number_integer()) {
    return -1;
  }
  return claims["exp"].get<int64_t>() - claims["iat"].get<int64_t>();
}

// The sum of the samples of `metric` whose labels include every one of `labels`.
double MetricValue(const std::string& exposition, const std::string& metric,
                   const std::vector<std::string>& labels) {
  double total = 0;
  for (absl::string_view line : absl::StrSplit(exposition, '\n')) {
    if (!absl::StartsWith(line, metric + "{")) continue;
    size_t close = line.find('}');
    if (close == absl::string_view::npos) continue;
    absl::string_view label_text = line.substr(0, close);
    bool all = true;
    for (const auto& l : labels) all = all && absl::StrContains(label_text, l);
    double v = 0;
    if (all && absl::SimpleAtod(absl::StripAsciiWhitespace(line.substr(close + 1)), &v)) total += v;
  }
  return total;
}

class PolicyTest : public TasksFixture {
 protected:
  // A broker asking `hook` (plus `extra` flags) and an attested agent serving this process.
  void StartWithHook(ScriptedHook& hook, std::vector<std::string> extra = {}) {
    BrokerOptions options;
    options.extra_args = {hook.BrokerFlag(), hook.Target()};
    if (hook.BrokerFlag() == "--policy-grpc")
      options.extra_args.push_back("--policy-grpc-plaintext");
    options.extra_args.insert(options.extra_args.end(), extra.begin(), extra.end());
    ASSERT_NO_FATAL_FAILURE(StartAll(options));
    ASSERT_NO_FATAL_FAILURE(Connect());
  }
  void Connect() {
    auto client = WorkloadClient::Connect("unix://" + agent_.socket);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
    tasks_ = mandate::workload::v1::Tasks::NewStub(
        grpc::CreateChannel("unix:" + agent_.socket, grpc::InsecureChannelCredentials()));
  }
  std::string TokenEndpoint() const { return broker_.issuer_url + "/token"; }

  // A task of `spiffe_id` (this process's default identity when empty) known by ID only.
  TaskInfo TaskById(const std::string& id, const std::string& spiffe_id = "") const {
    return TaskInfo{.id = id,
                    .spiffe_id = spiffe_id.empty() ? spiffe_id_ : spiffe_id,
                    .token_endpoint = TokenEndpoint()};
  }

  // POST /token for `task_id` with a JWT-SVID of this process (`jwt_svid`; fetched when empty)
  // and a fresh DPoP proof.
  TokenHttpAnswer TokenOverHttp(const std::string& task_id, const std::string& audience,
                                const std::vector<std::string>& scopes = {},
                                std::string jwt_svid = "") {
    if (jwt_svid.empty()) {
      auto svid = client_->FetchJwtSvid({broker_.issuer_url}, spiffe_id_);
      if (!svid.ok()) {
        ADD_FAILURE() << "JWT-SVID for /token: " << svid.status();
        return {};
      }
      jwt_svid = svid->token;
    }
    auto params = ExchangeParams(jwt_svid, task_id);
    params.emplace_back("audience", audience);
    if (!scopes.empty()) params.emplace_back("scope", absl::StrJoin(scopes, " "));
    auto proof = client_->CreateProof("POST", TokenEndpoint());
    if (!proof.ok()) {
      ADD_FAILURE() << "proof: " << proof.status();
      return {};
    }
    return PostToken(broker_.http_address, params, {*proof});
  }

  // FetchTaskToken on the Workload API without the SDK (which prefixes its errors), so that
  // the status is the agent's own.
  absl::Status RawFetchTaskToken(const std::string& task_id, const std::string& audience,
                                 const std::vector<std::string>& scopes = {}) {
    auto proof = client_->CreateProof("POST", TokenEndpoint());
    if (!proof.ok()) return proof.status();
    mandate::workload::v1::FetchTaskTokenRequest request;
    request.set_task_id(task_id);
    request.set_audience(audience);
    for (const auto& s : scopes) request.add_scopes(s);
    request.set_dpop_proof(*proof);
    request.set_spiffe_id(spiffe_id_);
    grpc::ClientContext context;
    context.AddMetadata("workload.spiffe.io", "true");
    context.set_deadline(std::chrono::system_clock::now() + 10s);
    mandate::workload::v1::FetchTaskTokenResponse response;
    grpc::Status status = tasks_->FetchTaskToken(&context, request, &response);
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  }

  json AuditRecords() {
    CommandResult r = Admin(broker_, {"--output", "json", "audit", "list", "--limit", "10000"});
    json parsed = json::parse(r.out, nullptr, false);
    if (r.exit_code != 0 || !parsed.is_object() || !parsed["records"].is_array()) {
      ADD_FAILURE() << "audit list: " << r;
      return json::array();
    }
    return parsed["records"];
  }
  static int64_t MaxSeq(const json& records) {
    int64_t max = 0;
    for (const json& r : records) max = std::max(max, r.value("seq", int64_t{0}));
    return max;
  }

  std::string Metrics() {
    auto m = HttpGet(broker_.http_address, "/metrics");
    if (!m.ok() || m->status != 200) {
      ADD_FAILURE() << "/metrics: " << (m.ok() ? m->body : m.status().ToString());
      return "";
    }
    return m->body;
  }

  // Refusals of the two paths for one request: the same OAuth error word and description.
  void ExpectSameRefusal(const absl::Status& over_grpc, const TokenHttpAnswer& over_http,
                         const std::string& expected_error) {
    ASSERT_FALSE(over_grpc.ok());
    ASSERT_TRUE(over_http.body.is_object()) << over_http.status;
    EXPECT_GE(over_http.status, 400) << over_http.body.dump();
    EXPECT_FALSE(over_http.body.contains("access_token"));
    const std::string error = over_http.body.value("error", "");
    const std::string description = over_http.body.value("error_description", "");
    EXPECT_EQ(error, expected_error) << over_http.body.dump();
    EXPECT_FALSE(description.empty()) << over_http.body.dump();
    EXPECT_EQ(std::string(over_grpc.message()), absl::StrCat(error, ": ", description))
        << over_http.body.dump();
  }

  std::unique_ptr<WorkloadClient> client_;
  std::unique_ptr<mandate::workload::v1::Tasks::Stub> tasks_;
};

// ---- 1. Every kind of issuance reaches the hook; a hook that denies stops them all ----

TEST_F(PolicyTest, HookSeesEveryKindAndADenyingHookStopsEveryIssuance) {
  WebhookHook hook;
  ASSERT_NO_FATAL_FAILURE(StartWithHook(hook));
  const std::string node_id = broker_.JoinNodeId("node-tasks");

  auto x509 = client_->FetchX509Context();
  ASSERT_TRUE(x509.ok()) << x509.status();
  auto jwt = client_->FetchJwtSvid({"aud-enum"}, spiffe_id_);
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  auto task = client_->DeclareTask("enumerate \"kinds\"", {"tickets:read"}, {kAudience});
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_EQ(task->status, "active");
  auto token = client_->FetchTaskToken(*task, kAudience);
  ASSERT_TRUE(token.ok()) << token.status();
  TokenHttpAnswer http = TokenOverHttp(task->id, kAudience);
  ASSERT_EQ(http.status, 200) << http.body.dump();

  std::vector<json> nodes = hook.InputsOfKind("node_svid");
  ASSERT_FALSE(nodes.empty());
  EXPECT_EQ(nodes[0]["spiffe_id"], node_id) << nodes[0].dump();
  EXPECT_THAT(nodes[0]["selectors"].get<std::vector<std::string>>(),
              Contains("join:name:node-tasks"))
      << nodes[0].dump();

  bool saw_x509 = false;
  for (const json& in : hook.InputsOfKind("x509_svid")) {
    if (in["spiffe_id"] != spiffe_id_) continue;
    saw_x509 = true;
    EXPECT_EQ(in["node_id"], node_id) << in.dump();
    EXPECT_THAT(in["selectors"].get<std::vector<std::string>>(), Contains(OwnUidSelector()));
    EXPECT_FALSE(in.contains("task")) << in.dump();
  }
  EXPECT_TRUE(saw_x509);

  bool saw_jwt = false;
  for (const json& in : hook.InputsOfKind("jwt_svid")) {
    if (in["audience"] != json::array({"aud-enum"})) continue;
    saw_jwt = true;
    EXPECT_EQ(in["spiffe_id"], spiffe_id_);
    EXPECT_THAT(in["selectors"].get<std::vector<std::string>>(), Contains(OwnUidSelector()));
  }
  EXPECT_TRUE(saw_jwt);

  std::vector<json> declared = hook.InputsOfKind("task");
  ASSERT_EQ(declared.size(), 1u);
  EXPECT_EQ(declared[0]["spiffe_id"], spiffe_id_);
  EXPECT_EQ(declared[0]["task"]["id"], "");  // being decided: no ID yet
  EXPECT_EQ(declared[0]["task"]["purpose"], "enumerate \"kinds\"");
  EXPECT_EQ(declared[0]["task"]["scopes"], json::array({"tickets:read"}));
  EXPECT_EQ(declared[0]["task"]["audiences"], json::array({kAudience}));

  std::vector<json> tokens = hook.InputsOfKind("task_token");
  ASSERT_EQ(tokens.size(), 2u);  // one per path
  for (const json& in : tokens) {
    EXPECT_EQ(in["spiffe_id"], spiffe_id_);
    EXPECT_EQ(in["node_id"], node_id);
    EXPECT_EQ(in["audience"], json::array({kAudience}));
    EXPECT_EQ(in["scopes"], json::array({"tickets:read"}));
    EXPECT_EQ(in["task"]["id"], task->id);
    EXPECT_EQ(in["task"]["purpose"], "enumerate \"kinds\"");
    EXPECT_GT(in["ttl"].get<int64_t>(), 0);
    EXPECT_THAT(in["selectors"].get<std::vector<std::string>>(), Contains(OwnUidSelector()));
  }

  // Now the hook denies everything.
  auto svid_for_http = client_->FetchJwtSvid({broker_.issuer_url}, spiffe_id_);
  ASSERT_TRUE(svid_for_http.ok()) << svid_for_http.status();
  const std::string reason = "frozen by the \"test\"";
  hook.SetScript(DenyAll(reason));
  const int64_t switched_at = MaxSeq(AuditRecords());

  auto denied_jwt = client_->FetchJwtSvid({"aud-after"}, spiffe_id_);
  EXPECT_EQ(denied_jwt.status().code(), absl::StatusCode::kPermissionDenied) << denied_jwt.status();
  EXPECT_THAT(Msg(denied_jwt.status()), HasSubstr(reason));
  auto denied_task = client_->DeclareTask("after", {"tickets:read"}, {kAudience});
  EXPECT_EQ(denied_task.status().code(), absl::StatusCode::kPermissionDenied)
      << denied_task.status();
  EXPECT_THAT(Msg(denied_task.status()), HasSubstr(reason));
  auto denied_token = client_->FetchTaskToken(*task, kAudience);
  EXPECT_EQ(denied_token.status().code(), absl::StatusCode::kPermissionDenied)
      << denied_token.status();
  EXPECT_THAT(Msg(denied_token.status()), HasSubstr(reason));
  TokenHttpAnswer denied_http = TokenOverHttp(task->id, kAudience, {}, svid_for_http->token);
  EXPECT_EQ(denied_http.status, 400) << denied_http.body.dump();
  EXPECT_EQ(denied_http.body.value("error", ""), "invalid_grant");
  EXPECT_EQ(denied_http.body.value("error_description", ""), reason);
  // A new identity gets no X509-SVID.
  const std::string late_id = broker_.Id("/agent/late");
  ASSERT_TRUE(CreateScopedEntry(late_id, OwnUidSelector(), {}).ok());

  json records;
  ASSERT_TRUE(WaitUntil(
      [&] {
        records = AuditRecords();
        for (const json& r : records) {
          if (r["event"] == "x509_svid" && r["outcome"] == "denied" && r["spiffe_id"] == late_id)
            return true;
        }
        return false;
      },
      15s, 200ms))
      << records.dump(1);
  std::set<std::string> denied_events;
  for (const json& r : records) {
    if (r["seq"].get<int64_t>() <= switched_at) continue;
    EXPECT_NE(r["outcome"], "issued") << r.dump();
    if (r["outcome"] != "denied") continue;
    EXPECT_EQ(r["detail"]["step"], "policy") << r.dump();
    // OAuth refusals (task tokens) carry their error word first.
    EXPECT_THAT(r["detail"].value("reason", ""),
                ::testing::AnyOf(reason, "invalid_grant: " + reason))
        << r.dump();
    EXPECT_EQ(r["detail"]["hook"], "webhook") << r.dump();
    denied_events.insert(r["event"].get<std::string>());
  }
  EXPECT_THAT(denied_events,
              ::testing::IsSupersetOf({"jwt_svid", "task_declared", "task_token", "x509_svid"}));
  auto context = client_->FetchX509Context();
  ASSERT_TRUE(context.ok()) << context.status();
  for (const auto& svid : context->svids) EXPECT_NE(svid.spiffe_id, late_id);
}

// ---- 2. Allow, deny with a reason, ttl_max and scopes, through either kind of hook ----

class HookDecisionsTest : public PolicyTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(HookDecisionsTest, AllowDenyTtlAndScopesShapeTheToken) {
  std::unique_ptr<ScriptedHook> hook;
  if (GetParam() == "webhook") {
    hook = std::make_unique<WebhookHook>();
  } else {
    hook = std::make_unique<GrpcHook>();
  }
  ASSERT_NO_FATAL_FAILURE(StartWithHook(*hook));
  auto task = client_->DeclareTask("decisions", {"tickets:read", "tickets:write"}, {kAudience});
  ASSERT_TRUE(task.ok()) << task.status();
  ASSERT_THAT(task->scopes, ElementsAre("tickets:read", "tickets:write"));

  // Allow: the token carries what the task grants, for the broker's default lifetime.
  auto plain = client_->FetchTaskToken(*task, kAudience);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(PayloadOf(plain->access_token)["scope"], "tickets:read tickets:write");
  const int64_t default_lifetime = LifetimeOf(plain->access_token);
  ASSERT_GT(default_lifetime, 60);

  // ttl_max caps the lifetime, on both paths.
  hook->SetScript(ForTaskTokens({.ttl_max = 60}));
  auto capped = client_->FetchTaskToken(*task, kAudience);
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_LE(LifetimeOf(capped->access_token), 60);
  EXPECT_GT(LifetimeOf(capped->access_token), 0);
  TokenHttpAnswer capped_http = TokenOverHttp(task->id, kAudience);
  ASSERT_EQ(capped_http.status, 200) << capped_http.body.dump();
  EXPECT_LE(capped_http.body["expires_in"].get<int64_t>(), 60);
  EXPECT_LE(LifetimeOf(capped_http.body["access_token"]), 60);

  // A ttl_max above the broker's own does not extend it.
  hook->SetScript(ForTaskTokens({.ttl_max = 86400}));
  auto not_extended = client_->FetchTaskToken(*task, kAudience);
  ASSERT_TRUE(not_extended.ok()) << not_extended.status();
  EXPECT_LE(LifetimeOf(not_extended->access_token), default_lifetime);

  // scopes narrow; a scope the hook names that was not asked for is not added.
  hook->SetScript(ForTaskTokens({.scopes = std::vector<std::string>{"tickets:read", "admin"}}));
  auto narrowed = client_->FetchTaskToken(*task, kAudience);
  ASSERT_TRUE(narrowed.ok()) << narrowed.status();
  EXPECT_EQ(PayloadOf(narrowed->access_token)["scope"], "tickets:read");
  EXPECT_THAT(narrowed->scopes, ElementsAre("tickets:read"));
  TokenHttpAnswer narrowed_http = TokenOverHttp(task->id, kAudience);
  ASSERT_EQ(narrowed_http.status, 200) << narrowed_http.body.dump();
  EXPECT_EQ(PayloadOf(narrowed_http.body["access_token"])["scope"], "tickets:read");
  // Asked for tickets:write alone, the hook's list leaves nothing: refused, "admin" not given.
  absl::Status write_only = RawFetchTaskToken(task->id, kAudience, {"tickets:write"});
  EXPECT_EQ(Msg(write_only), "invalid_scope: the policy leaves none of the requested scopes");
  TokenHttpAnswer write_only_http = TokenOverHttp(task->id, kAudience, {"tickets:write"});
  EXPECT_EQ(write_only_http.status, 400) << write_only_http.body.dump();
  EXPECT_EQ(write_only_http.body.value("error", ""), "invalid_scope");
  // A hook naming more than was asked for adds nothing.
  hook->SetScript(ForTaskTokens(
      {.scopes = std::vector<std::string>{"admin", "tickets:write", "tickets:read", "root"}}));
  auto not_widened = client_->FetchTaskToken(*task, kAudience, {"tickets:write"});
  ASSERT_TRUE(not_widened.ok()) << not_widened.status();
  EXPECT_EQ(PayloadOf(not_widened->access_token)["scope"], "tickets:write");
  auto all = client_->FetchTaskToken(*task, kAudience);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(PayloadOf(all->access_token)["scope"], "tickets:read tickets:write");
  // The hook saw what the broker would grant, before its own cap.
  std::vector<json> seen = hook->InputsOfKind("task_token");
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back()["scopes"], json::array({"tickets:read", "tickets:write"}));

  // Deny with a reason: shown on both paths, nothing minted.
  const std::string reason = "no tickets for you: change freeze";
  hook->SetScript(ForTaskTokens({.allow = false, .reason = reason}));
  absl::Status denied = RawFetchTaskToken(task->id, kAudience);
  EXPECT_EQ(denied.code(), absl::StatusCode::kPermissionDenied) << denied;
  EXPECT_EQ(Msg(denied), "invalid_grant: " + reason);
  TokenHttpAnswer denied_http = TokenOverHttp(task->id, kAudience);
  EXPECT_EQ(denied_http.status, 400);
  EXPECT_EQ(denied_http.body.value("error", ""), "invalid_grant");
  EXPECT_EQ(denied_http.body.value("error_description", ""), reason);

  // A denied JWT-SVID carries the hook's reason too.
  hook->SetScript([](const json& in) {
    return in.value("kind", "") == "jwt_svid" ? Verdict{.allow = false, .reason = "no JWTs"}
                                              : Verdict{};
  });
  auto no_jwt = client_->FetchJwtSvid({"aud-denied"}, spiffe_id_);
  EXPECT_EQ(no_jwt.status().code(), absl::StatusCode::kPermissionDenied) << no_jwt.status();
  EXPECT_THAT(Msg(no_jwt.status()), HasSubstr("no JWTs"));
}

INSTANTIATE_TEST_SUITE_P(Hooks, HookDecisionsTest, ::testing::Values("webhook", "grpc"),
                         [](const auto& info) { return info.param; });

// ---- 3. A hook that cannot decide denies, quickly, and the broker stays up ----

TEST_F(PolicyTest, HookFaultsDenyAndTheBrokerStaysUp) {
  const int port = UnusedPort();
  ASSERT_GT(port, 0);
  BrokerOptions options;
  options.extra_args = {"--policy-webhook", WebhookHook::Url(port), "--policy-webhook-kinds",
                        "task_token",       "--policy-timeout-ms",  "200"};
  // Nothing listens on the hook's port: the kinds it is not bound to are still served.
  ASSERT_NO_FATAL_FAILURE(StartAll(options));
  ASSERT_NO_FATAL_FAILURE(Connect());
  auto x509 = client_->FetchX509Context();
  ASSERT_TRUE(x509.ok()) << x509.status();
  EXPECT_EQ(x509->svids.at(0).spiffe_id, spiffe_id_);
  auto task = client_->DeclareTask("faults", {"tickets:read"}, {kAudience});
  ASSERT_TRUE(task.ok()) << task.status();

  int refused = 0;
  auto expect_refused = [&](const std::string& what) {
    SCOPED_TRACE(what);
    absl::StatusOr<TaskToken> token = absl::UnknownError("not asked");
    auto took = std::chrono::steady_clock::now();
    token = client_->FetchTaskToken(*task, kAudience);
    auto elapsed = std::chrono::steady_clock::now() - took;
    EXPECT_FALSE(token.ok());
    // Denied, as a temporary condition (the caller may retry once the hook is back).
    EXPECT_EQ(token.status().code(), absl::StatusCode::kUnavailable) << token.status();
    EXPECT_THAT(Msg(token.status()),
                HasSubstr("temporarily_unavailable: policy hook webhook could not decide"))
        << token.status();
    EXPECT_LT(elapsed, 2s);
    ++refused;
    EXPECT_TRUE(IsRunning(broker_.pid));
    auto ready = HttpGet(broker_.http_address, "/readyz");
    EXPECT_TRUE(ready.ok() && ready->status == 200);
  };
  expect_refused("hook down");
  auto jwt = client_->FetchJwtSvid({"aud-not-bound"}, spiffe_id_);
  EXPECT_TRUE(jwt.ok()) << jwt.status();

  // The hook comes up on that port: it decides from now on.
  WebhookHook hook(port);
  absl::StatusOr<TaskToken> allowed = absl::UnknownError("not asked");
  ASSERT_TRUE(WaitUntil(
      [&] {
        allowed = client_->FetchTaskToken(*task, kAudience);
        return allowed.ok();
      },
      10s, 100ms))
      << allowed.status();
  EXPECT_THAT(hook.InputsOfKind("task_token"), ::testing::SizeIs(::testing::Ge(1)));
  EXPECT_TRUE(hook.InputsOfKind("x509_svid").empty());  // not bound to it

  hook.SetScript(ForTaskTokens({.delay = 3s}));
  expect_refused("slow hook");
  hook.SetScript(ForTaskTokens({.raw_body = std::string(R"({"result": {"allow": "yes")")}));
  expect_refused("malformed answer");
  hook.SetScript(ForTaskTokens(
      {.raw_body = R"({"result": {"allow": true, "pad": ")" + std::string(1 << 20, 'x') + "\"}}"}));
  expect_refused("oversized answer");
  hook.SetScript(ForTaskTokens({.raw_body = std::string("{}")}));  // OPA: policy undefined
  expect_refused("no result");

  // Still serving, and the errors are counted apart from denials.
  auto after = client_->FetchX509Context();
  EXPECT_TRUE(after.ok()) << after.status();
  hook.SetScript(AllowAll());
  EXPECT_TRUE(client_->FetchTaskToken(*task, kAudience).ok());
  const std::string metrics = Metrics();
  EXPECT_GE(MetricValue(metrics, "mandate_policy_decisions_total",
                        {"kind=\"task_token\"", "outcome=\"error\""}),
            refused)
      << metrics;
  EXPECT_EQ(MetricValue(metrics, "mandate_policy_decisions_total",
                        {"kind=\"task_token\"", "outcome=\"deny\""}),
            0);
  EXPECT_GE(
      MetricValue(metrics, "mandate_issuances_total", {"kind=\"task_token\"", "outcome=\"error\""}),
      refused);
  EXPECT_GE(MetricValue(metrics, "mandate_issuances_total",
                        {"kind=\"task_token\"", "outcome=\"issued\""}),
            2);
  EXPECT_GE(
      MetricValue(metrics, "mandate_issuances_total", {"kind=\"x509_svid\"", "outcome=\"issued\""}),
      1);
  // The refusals are audited as policy errors.
  int audited_errors = 0;
  for (const json& r : AuditRecords()) {
    if (r["event"] == "task_token" && r["outcome"] == "denied") {
      EXPECT_EQ(r["detail"]["step"], "policy") << r.dump();
      EXPECT_EQ(r["detail"].value("policy_error", false), true) << r.dump();
      ++audited_errors;
    }
  }
  EXPECT_EQ(audited_errors, refused);
}

// ---- 4. The rules file: narrowing, lifetimes, approval, caps, reloads ----

constexpr char kRulesTemplate[] = R"(default = "deny"

[[rule]]
name = "nodes"
spiffe_id = "spiffe://example.org/node/**"
kinds = ["node_svid"]
effect = "allow"

[[rule]]
name = "svids"
spiffe_id = "spiffe://example.org/**"
kinds = ["x509_svid", "jwt_svid"]
effect = "allow"

[[rule]]
name = "research"
spiffe_id = "spiffe://example.org/agent/research"
selectors = ["UID"]
kinds = ["task", "task_token"]
effect = "allow"
scopes = ["tickets:read"]
ttl_max = TTL

[[rule]]
name = "payments"
spiffe_id = "spiffe://example.org/agent/payments"
selectors = ["UID"]
kinds = ["task", "task_token"]
effect = "allow"
require_approval = true
max_tokens_per_task = 3
)";

std::string Rules(const std::string& uid_selector, int research_ttl) {
  std::string text = kRulesTemplate;
  for (size_t at; (at = text.find("UID")) != std::string::npos;) text.replace(at, 3, uid_selector);
  text.replace(text.find("TTL"), 3, std::to_string(research_ttl));
  return text;
}

class RulesFileTest : public PolicyTest {
 protected:
  // An entry for this process with a 900 s token TTL, so that the rules' caps show.
  void CreateLongTtlEntry(const std::string& id) {
    CommandResult r = Admin(broker_, {"--output", "json", "entry", "create", "--parent-id",
                                      broker_.JoinNodeId("node-tasks"), "--spiffe-id", id,
                                      "--selector", OwnUidSelector(), "--scope", "tickets:read",
                                      "--scope", "tickets:write", "--token-ttl", "900"});
    ASSERT_EQ(r.exit_code, 0) << r;
  }
  // A task token's lifetime for `task`, or -1.
  int64_t TokenLifetime(const TaskInfo& task) {
    auto token = client_->FetchTaskToken(task, kAudience);
    if (!token.ok()) {
      ADD_FAILURE() << token.status();
      return -1;
    }
    EXPECT_EQ(PayloadOf(token->access_token)["scope"], "tickets:read");
    return LifetimeOf(token->access_token);
  }
};

TEST_F(RulesFileTest, BrokenFileAtStartNamesLineAndKey) {
  const std::string path = temp_dir() + "/broken.toml";
  std::string text = Rules(OwnUidSelector(), 300);
  text.replace(text.find("ttl_max = 300"), 13, "ttl_max = \"five minutes\"");
  ASSERT_TRUE(WriteFile(path, text).ok());
  const int line =
      1 + static_cast<int>(std::count(text.begin(), text.begin() + text.find("ttl_max"), '\n'));
  BrokerOptions options;
  options.extra_args = {"--policy-file", path};
  auto broker = StartBroker(options);
  ASSERT_FALSE(broker.ok());
  EXPECT_THAT(Msg(broker.status()), HasSubstr(absl::StrCat(path, ":", line, ":")));
  EXPECT_THAT(Msg(broker.status()), HasSubstr("rule[3].ttl_max"));
  EXPECT_THAT(Msg(broker.status()), HasSubstr("exited during start"));
}

TEST_F(PolicyTest, PolicyTimeoutOutsideItsRangeInTheConfigFileIsRefusedAtStart) {
  for (const char* value : {"0", "60001", "-5"}) {
    const std::string path = temp_dir() + "/broker-" + value + ".toml";
    ASSERT_TRUE(WriteFile(path, absl::StrCat("policy_timeout_ms = ", value, "\n")).ok());
    BrokerOptions options;
    options.extra_args = {"--config", path};
    auto broker = StartBroker(options);
    ASSERT_FALSE(broker.ok()) << value;
    EXPECT_THAT(Msg(broker.status()), HasSubstr("policy_timeout_ms must be between 1 and 60000"))
        << value;
  }
  // The edges of the range are accepted.
  const std::string path = temp_dir() + "/broker-edge.toml";
  ASSERT_TRUE(WriteFile(path, "policy_timeout_ms = 60000\n").ok());
  BrokerOptions options;
  options.extra_args = {"--config", path};
  auto broker = StartBroker(options);
  EXPECT_TRUE(broker.ok()) << broker.status();
}

TEST_F(RulesFileTest, RulesNarrowCapAndReload) {
  const std::string path = temp_dir() + "/policy.toml";
  ASSERT_TRUE(WriteFile(path, Rules(OwnUidSelector(), 300)).ok());
  BrokerOptions options;
  // Fixed ports, so that the agent finds the broker again after its restart.
  options.agent_listen = absl::StrCat("127.0.0.1:", UnusedPort());
  options.http_listen = absl::StrCat("127.0.0.1:", UnusedPort());
  options.extra_args = {"--policy-file", path};
  ASSERT_NO_FATAL_FAILURE(StartAll(options));
  ASSERT_NO_FATAL_FAILURE(Connect());
  const std::string research = broker_.Id("/agent/research");
  const std::string payments = broker_.Id("/agent/payments");
  ASSERT_NO_FATAL_FAILURE(CreateLongTtlEntry(research));
  ASSERT_NO_FATAL_FAILURE(CreateLongTtlEntry(payments));
  ASSERT_TRUE(WaitUntil([&] { return client_->FetchJwtSvid({"x"}, payments).ok(); }, 15s, 100ms));

  // Research: read-only tasks, five-minute tokens (the entry would give 900 s).
  auto r_task = client_->DeclareTask("research", {"tickets:read", "tickets:write"}, {kAudience}, 0s,
                                     research);
  ASSERT_TRUE(r_task.ok()) << r_task.status();
  EXPECT_EQ(r_task->status, "active");
  EXPECT_THAT(r_task->scopes, ElementsAre("tickets:read"));
  int64_t lifetime = TokenLifetime(*r_task);
  EXPECT_LE(lifetime, 300);
  EXPECT_GT(lifetime, 200);
  // The default identity matches no task rule: default deny.
  auto unruled =
      client_->DeclareTask("nothing matches", {"tickets:read"}, {kAudience}, 0s, spiffe_id_);
  EXPECT_EQ(unruled.status().code(), absl::StatusCode::kPermissionDenied) << unruled.status();
  EXPECT_THAT(Msg(unruled.status()), HasSubstr("no rule matched; default deny"));

  // Payments: the task waits for a human, then gets three tokens and no more.
  auto p_task = client_->DeclareTask("refund", {"tickets:read"}, {kAudience}, 0s, payments);
  ASSERT_TRUE(p_task.ok()) << p_task.status();
  EXPECT_EQ(p_task->status, "pending_approval");
  ASSERT_THAT(p_task->approval_id, StartsWith("appr_"));
  auto pending = client_->FetchTaskToken(*p_task, kAudience);
  EXPECT_EQ(pending.status().code(), absl::StatusCode::kFailedPrecondition) << pending.status();
  CommandResult approved = Admin(broker_, {"approval", "approve", p_task->approval_id});
  ASSERT_EQ(approved.exit_code, 0) << approved;
  for (int i = 0; i < 3; ++i) {
    auto token = client_->FetchTaskToken(*p_task, kAudience);
    ASSERT_TRUE(token.ok()) << i << ": " << token.status();
  }
  const std::string cap = "execution cap: at most 3 tokens per task (rule 'payments')";
  auto fourth = client_->FetchTaskToken(*p_task, kAudience);
  EXPECT_EQ(fourth.status().code(), absl::StatusCode::kPermissionDenied) << fourth.status();
  EXPECT_THAT(Msg(fourth.status()), HasSubstr(cap));

  // The count lives in the store: a restarted broker still refuses.
  ASSERT_EQ(StopProcess(broker_.pid, SIGTERM), 0);
  auto restarted = StartBroker(options);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;
  absl::StatusOr<TaskToken> after_restart = absl::UnknownError("not asked");
  ASSERT_TRUE(WaitUntil(
      [&] {
        after_restart = client_->FetchTaskToken(*p_task, kAudience);
        return absl::StrContains(after_restart.status().message(), cap) || after_restart.ok();
      },
      20s, 200ms))
      << after_restart.status();
  EXPECT_FALSE(after_restart.ok());
  EXPECT_THAT(Msg(after_restart.status()), HasSubstr(cap));

  // SIGHUP with a broken file: the last good rules stay.
  ASSERT_TRUE(WriteFile(path, Rules(OwnUidSelector(), 120) + "\n[[rule]]\nname = 7\n").ok());
  ASSERT_EQ(::kill(broker_.pid, SIGHUP), 0);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return absl::StrContains(ReadFileOrEmpty(broker_.log_path),
                                 "policy reload refused, keeping the last good rules");
      },
      10s))
      << ReadFileOrEmpty(broker_.log_path);
  EXPECT_THAT(ReadFileOrEmpty(broker_.log_path), HasSubstr("rule[5].name"));
  lifetime = TokenLifetime(*r_task);
  EXPECT_GT(lifetime, 200);
  EXPECT_LE(lifetime, 300);

  // SIGHUP with a good file: its rules apply.
  ASSERT_TRUE(WriteFile(path, Rules(OwnUidSelector(), 120)).ok());
  ASSERT_EQ(::kill(broker_.pid, SIGHUP), 0);
  ASSERT_TRUE(WaitUntil(
      [&] {
        return absl::StrContains(ReadFileOrEmpty(broker_.log_path), "policy rules reloaded from");
      },
      10s));
  lifetime = TokenLifetime(*r_task);
  EXPECT_LE(lifetime, 120);
  EXPECT_GT(lifetime, 60);

  // `mandate policy reload` through the admin API: the same, broken file refused.
  ASSERT_TRUE(WriteFile(path, Rules(OwnUidSelector(), 60) + "colour = \"blue\"\n").ok());
  CommandResult broken_reload = Admin(broker_, {"policy", "reload"});
  EXPECT_NE(broken_reload.exit_code, 0) << broken_reload;
  EXPECT_THAT(broken_reload.err, HasSubstr("colour")) << broken_reload;
  lifetime = TokenLifetime(*r_task);
  EXPECT_LE(lifetime, 120);
  EXPECT_GT(lifetime, 60);
  ASSERT_TRUE(WriteFile(path, Rules(OwnUidSelector(), 60)).ok());
  CommandResult reload = Admin(broker_, {"--output", "json", "policy", "reload"});
  ASSERT_EQ(reload.exit_code, 0) << reload;
  EXPECT_EQ(json::parse(reload.out, nullptr, false), json({{"reloaded", true}})) << reload;
  lifetime = TokenLifetime(*r_task);
  EXPECT_LE(lifetime, 60);
  EXPECT_GT(lifetime, 0);
  bool audited_ok = false, audited_error = false;
  for (const json& r : AuditRecords()) {
    if (r["event"] != "policy_reloaded") continue;
    audited_ok = audited_ok || r["outcome"] == "ok";
    audited_error = audited_error || r["outcome"] == "error";
  }
  EXPECT_TRUE(audited_ok);
  EXPECT_TRUE(audited_error);
}

// ---- 5 and 6. Human approval through the CLI; the two paths refuse alike ----

// Declarations whose purpose starts with "approve:" wait for a human; tokens for a task whose
// purpose contains "deny-me" are refused.
Script ApprovalScript() {
  return [](const json& in) {
    const std::string kind = in.value("kind", "");
    const std::string purpose =
        in.contains("task") && in["task"].is_object() ? in["task"].value("purpose", "") : "";
    if (kind == "task" && purpose.starts_with("approve:")) {
      return Verdict{.reason = "a human decides", .require_approval = true};
    }
    if (kind == "task_token" && purpose.find("deny-me") != std::string::npos) {
      return Verdict{.allow = false, .reason = "tokens for this task are refused by policy"};
    }
    return Verdict{};
  };
}

TEST_F(PolicyTest, ApprovalFlowThroughTheCliAndBothPathsRefuseAlike) {
  WebhookHook hook;
  hook.SetScript(ApprovalScript());
  ASSERT_NO_FATAL_FAILURE(StartWithHook(hook));

  // A task that needs approval; its purpose has quotes and a backslash.
  const std::string purpose = R"(approve: refund "INV-7" \ now)";
  CommandResult started =
      Workload(agent_, {"--output", "json", "task", "start", "--purpose", purpose, "--scope",
                        "tickets:read", "--audience", kAudience});
  ASSERT_EQ(started.exit_code, 0) << started;
  json task_json = json::parse(started.out, nullptr, false);
  ASSERT_TRUE(task_json.is_object()) << started;
  EXPECT_EQ(task_json["status"], "pending_approval");
  ASSERT_TRUE(task_json["approval_id"].is_string()) << started;
  const std::string approval_id = task_json["approval_id"];
  EXPECT_THAT(approval_id, StartsWith("appr_"));
  const TaskInfo pending = TaskById(task_json["id"]);

  EXPECT_EQ(client_->FetchTaskToken(pending, kAudience).status().code(),
            absl::StatusCode::kFailedPrecondition);
  absl::Status over_grpc = RawFetchTaskToken(pending.id, kAudience);
  EXPECT_EQ(over_grpc.code(), absl::StatusCode::kFailedPrecondition) << over_grpc;
  EXPECT_THAT(Msg(over_grpc),
              StartsWith("authorization_pending: task awaits approval " + approval_id));
  TokenHttpAnswer over_http = TokenOverHttp(pending.id, kAudience);
  EXPECT_EQ(over_http.status, 400);
  EXPECT_EQ(over_http.body.value("error", ""), "authorization_pending");
  {
    SCOPED_TRACE("pending task");
    ExpectSameRefusal(over_grpc, over_http, "authorization_pending");
  }

  CommandResult list =
      Admin(broker_, {"--output", "json", "approval", "list", "--status", "pending"});
  ASSERT_EQ(list.exit_code, 0) << list;
  json approvals = json::parse(list.out, nullptr, false);
  ASSERT_TRUE(approvals.is_object() && approvals["approvals"].is_array()) << list;
  ASSERT_EQ(approvals["approvals"].size(), 1u) << list;
  EXPECT_EQ(approvals["approvals"][0]["id"], approval_id);
  EXPECT_EQ(approvals["approvals"][0]["purpose"], purpose);
  EXPECT_EQ(approvals["approvals"][0]["task_id"], pending.id);
  CommandResult show = Admin(broker_, {"approval", "show", approval_id});
  ASSERT_EQ(show.exit_code, 0) << show;
  EXPECT_THAT(show.out, HasSubstr(R"("approve: refund \"INV-7\" \\ now")")) << show;
  EXPECT_THAT(show.out, HasSubstr(spiffe_id_));

  CommandResult approve =
      Admin(broker_, {"approval", "approve", approval_id, "--reason", "CHG-1234"});
  ASSERT_EQ(approve.exit_code, 0) << approve;
  auto token = client_->FetchTaskToken(pending, kAudience);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(PayloadOf(token->access_token)["task"]["id"], pending.id);
  TokenHttpAnswer http_token = TokenOverHttp(pending.id, kAudience);
  EXPECT_EQ(http_token.status, 200) << http_token.body.dump();
  CommandResult again = Admin(broker_, {"approval", "deny", approval_id});
  EXPECT_NE(again.exit_code, 0);
  EXPECT_THAT(again.err, HasSubstr("already approved")) << again;

  // Denied with a reason: refused for good, the reason shown on both paths.
  auto second = client_->DeclareTask("approve: second", {"tickets:read"}, {kAudience});
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(second->status, "pending_approval");
  CommandResult deny = Admin(
      broker_, {"approval", "deny", second->approval_id, "--reason", "not during the freeze"});
  ASSERT_EQ(deny.exit_code, 0) << deny;
  absl::Status denied_grpc = RawFetchTaskToken(second->id, kAudience);
  EXPECT_EQ(Msg(denied_grpc), "invalid_grant: task approval denied: not during the freeze");
  TokenHttpAnswer denied_http = TokenOverHttp(second->id, kAudience);
  EXPECT_EQ(denied_http.body.value("error", ""), "invalid_grant");
  EXPECT_THAT(denied_http.body.value("error_description", ""), HasSubstr("not during the freeze"));
  {
    SCOPED_TRACE("denied approval");
    ExpectSameRefusal(denied_grpc, denied_http, "invalid_grant");
  }

  // `task start --wait` blocks until someone approves from elsewhere.
  CommandResult waited;
  std::thread waiter([&] {
    waited = RunCommand({CliBinary(), "--socket", "unix://" + agent_.socket, "--output", "json",
                         "task", "start", "--wait", "--wait-timeout", "30", "--purpose",
                         "approve: waited", "--scope", "tickets:read", "--audience", kAudience});
  });
  std::string waited_id;
  EXPECT_TRUE(WaitUntil(
      [&] {
        CommandResult l =
            Admin(broker_, {"--output", "json", "approval", "list", "--status", "pending"});
        json parsed = json::parse(l.out, nullptr, false);
        if (!parsed.is_object() || !parsed["approvals"].is_array()) return false;
        for (const json& a : parsed["approvals"]) {
          if (a.value("purpose", "") == "approve: waited") waited_id = a.value("id", "");
        }
        return !waited_id.empty();
      },
      15s, 100ms));
  if (!waited_id.empty()) {
    CommandResult ok = Admin(broker_, {"approval", "approve", waited_id});
    EXPECT_EQ(ok.exit_code, 0) << ok;
  }
  waiter.join();
  ASSERT_EQ(waited.exit_code, 0) << waited;
  json waited_task = json::parse(waited.out, nullptr, false);
  ASSERT_TRUE(waited_task.is_object()) << waited;
  EXPECT_EQ(waited_task["status"], "active");
  EXPECT_EQ(waited_task["approval_id"], waited_id);
  EXPECT_TRUE(client_->FetchTaskToken(TaskById(waited_task["id"]), kAudience).ok());

  // The same request over both paths, refused the same way.
  auto active = client_->DeclareTask("plain", {"tickets:read"}, {kAudience});
  ASSERT_TRUE(active.ok()) << active.status();
  {
    SCOPED_TRACE("scope outside the task");
    absl::Status g = RawFetchTaskToken(active->id, kAudience, {"tickets:write"});
    ExpectSameRefusal(g, TokenOverHttp(active->id, kAudience, {"tickets:write"}), "invalid_scope");
  }
  {
    SCOPED_TRACE("audience outside the task");
    absl::Status g = RawFetchTaskToken(active->id, "https://elsewhere.example.org");
    ExpectSameRefusal(g, TokenOverHttp(active->id, "https://elsewhere.example.org"),
                      "invalid_target");
  }
  {
    SCOPED_TRACE("unknown task");
    const std::string unknown = "task_AAAAAAAAAAAAAAAAAAAAAA";
    absl::Status g = RawFetchTaskToken(unknown, kAudience);
    ExpectSameRefusal(g, TokenOverHttp(unknown, kAudience), "invalid_grant");
  }
  {
    SCOPED_TRACE("policy denial");
    auto doomed = client_->DeclareTask("deny-me", {"tickets:read"}, {kAudience});
    ASSERT_TRUE(doomed.ok()) << doomed.status();
    absl::Status g = RawFetchTaskToken(doomed->id, kAudience);
    TokenHttpAnswer h = TokenOverHttp(doomed->id, kAudience);
    ExpectSameRefusal(g, h, "invalid_grant");
    EXPECT_EQ(h.body.value("error_description", ""), "tokens for this task are refused by policy");
  }
  {
    SCOPED_TRACE("ended task");
    ASSERT_TRUE(client_->EndTask(active->id).ok());
    absl::Status g = RawFetchTaskToken(active->id, kAudience);
    ExpectSameRefusal(g, TokenOverHttp(active->id, kAudience), "invalid_grant");
  }
}

}  // namespace
}  // namespace mandate::integration
