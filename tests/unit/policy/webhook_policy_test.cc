// WebhookPolicyHook against a real HTTP(S) server on 127.0.0.1 answering like OPA's data API.
#include "broker/server/policy/webhook_policy.h"

#include <httplib.h>

#include <atomic>
#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/policy/hook_test_util.h"

namespace mandate::broker::policy {
namespace {

using namespace std::chrono_literals;
using nlohmann::json;
using testing::Elapsed;
using testing::In;
using testing::SampleInput;

constexpr char kPath[] = "/v1/data/mandate/issuance";

struct ServerTls {
  std::string cert, key;  // empty: plain HTTP
  std::string client_ca;  // set: a client certificate signed by it is required
};

// An HTTP server on 127.0.0.1 that counts the connections its requests arrive on.
class HookServer {
 public:
  using Handler = std::function<void(const httplib::Request&, httplib::Response&)>;

  explicit HookServer(const testing::TestPki* pki = nullptr, ServerTls tls = {}) {
    if (tls.cert.empty()) {
      server_ = std::make_unique<httplib::Server>();
    } else {
      server_ = std::make_unique<httplib::SSLServer>(
          tls.cert.c_str(), tls.key.c_str(),
          tls.client_ca.empty() ? nullptr : tls.client_ca.c_str());
    }
    if (!server_->is_valid()) throw std::runtime_error("hook server is not valid");
    server_->set_keep_alive_max_count(100000);
    server_->set_keep_alive_timeout(1);  // also how long stop() waits for an idle connection
    // Without it Nagle's algorithm on the server's separate header and body writes meets the
    // client's delayed ACK, and every answer takes 40 ms.
    server_->set_tcp_nodelay(true);
  }
  ~HookServer() { Stop(); }

  // Serves POST kPath with `handler` on `port` (0: a free one).
  void Start(Handler handler, int port = 0) {
    handler_ = std::move(handler);
    server_->Post(kPath, [this](const httplib::Request& req, httplib::Response& res) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        connections_.insert(req.remote_port);
        last_body_ = req.body;
        last_content_type_ = req.get_header_value("Content-Type");
        ++requests_;
      }
      handler_(req, res);
    });
    if (port == 0) {
      port_ = server_->bind_to_any_port("127.0.0.1");
    } else if (server_->bind_to_port("127.0.0.1", port)) {
      port_ = port;
    }
    if (port_ <= 0) throw std::runtime_error("hook server cannot bind");
    thread_ = std::thread([this] { server_->listen_after_bind(); });
  }
  void Stop() {
    gate.Open();
    if (thread_.joinable()) {
      server_->stop();
      thread_.join();
    }
  }
  std::string Url(const std::string& scheme = "http", const std::string& host = "127.0.0.1") {
    return scheme + "://" + host + ":" + std::to_string(port_) + kPath;
  }
  size_t connections() {
    std::lock_guard<std::mutex> lock(mu_);
    return connections_.size();
  }
  int requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }
  std::string last_body() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_body_;
  }
  std::string last_content_type() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_content_type_;
  }
  testing::Gate gate;  // slow handlers wait here

 private:
  std::unique_ptr<httplib::Server> server_;
  Handler handler_;
  int port_ = 0;
  std::thread thread_;
  std::mutex mu_;
  std::set<int> connections_;  // client ports: one per connection
  std::string last_body_, last_content_type_;
  int requests_ = 0;
};

HookServer::Handler Answer(std::string body, int status = 200,
                           std::string type = "application/json") {
  return [=](const httplib::Request&, httplib::Response& res) {
    res.status = status;
    res.set_content(body, type.c_str());
  };
}

std::unique_ptr<WebhookPolicyHook> MakeHook(WebhookPolicyOptions options) {
  auto hook = WebhookPolicyHook::Create(std::move(options));
  if (!hook.ok()) throw std::runtime_error(hook.status().ToString());
  return *std::move(hook);
}
std::unique_ptr<WebhookPolicyHook> MakeHook(const std::string& url) {
  WebhookPolicyOptions options;
  options.url = url;
  return MakeHook(options);
}

TEST(WebhookPolicyHookTest, PostsTheInputDocumentAsOpaInput) {
  HookServer server;
  server.Start(Answer(R"({"result": {"allow": true}})"));
  auto hook = MakeHook(server.Url());
  EXPECT_EQ(hook->name(), "webhook");
  auto decision = hook->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_TRUE(decision->allow);
  EXPECT_EQ(server.last_content_type(), "application/json");
  json sent = json::parse(server.last_body(), nullptr, false);
  ASSERT_TRUE(sent.is_object());
  EXPECT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent["input"], PolicyInputJson(SampleInput()));
  EXPECT_EQ(sent["input"]["time"], "2027-01-15T08:00:00Z");
  EXPECT_EQ(sent["input"]["task"]["purpose"], "summarise \"Q3\"\nreport");
}

// The broker checks agent text is UTF-8 before it gets here; a slip there must not throw here.
TEST(WebhookPolicyHookTest, InvalidUtf8InTheInputIsReplacedNotThrown) {
  HookServer server;
  server.Start(Answer(R"({"result": {"allow": true}})"));
  auto hook = MakeHook(server.Url());
  PolicyInput input = SampleInput();
  input.task->purpose = "bad \xff byte";
  auto decision = hook->Check(input, In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  json sent = json::parse(server.last_body(), nullptr, false);
  ASSERT_TRUE(sent.is_object());
  EXPECT_EQ(sent["input"]["task"]["purpose"], "bad \xef\xbf\xbd byte");  // U+FFFD
}

TEST(WebhookPolicyHookTest, MapsEveryAnswerField) {
  HookServer server;
  server.Start([](const httplib::Request& req, httplib::Response& res) {
    json input = json::parse(req.body)["input"];
    const std::string id = input["spiffe_id"];
    json result;
    if (id.ends_with("/research")) {
      result = {{"allow", true}, {"ttl_max", 300}, {"scopes", {"read:docs"}}};
    } else if (id.ends_with("/payments")) {
      result = {{"allow", true}, {"require_approval", true}, {"reason", "payments need a human"}};
    } else {
      result = {{"allow", false}, {"reason", "unknown agent"}, {"extra", "ignored"}};
    }
    res.set_content(json{{"result", result}}.dump(), "application/json; charset=utf-8");
  });
  auto hook = MakeHook(server.Url());
  PolicyInput input = SampleInput();
  auto research = hook->Check(input, In(5s));
  ASSERT_TRUE(research.ok()) << research.status();
  EXPECT_TRUE(research->allow);
  EXPECT_EQ(research->ttl_max, 300);
  EXPECT_EQ(research->scopes, std::vector<std::string>{"read:docs"});

  input.spiffe_id = "spiffe://example.org/agent/payments";
  auto payments = hook->Check(input, In(5s));
  ASSERT_TRUE(payments.ok());
  EXPECT_TRUE(payments->require_approval);
  EXPECT_EQ(payments->reason, "payments need a human");
  EXPECT_FALSE(payments->ttl_max.has_value());

  input.spiffe_id = "spiffe://example.org/agent/stranger";
  auto denied = hook->Check(input, In(5s));
  ASSERT_TRUE(denied.ok()) << "a denial is a decision, not an error";
  EXPECT_FALSE(denied->allow);
  EXPECT_EQ(denied->reason, "unknown agent");
}

TEST(WebhookPolicyHookTest, MalformedAnswersAreErrorsNotDenials) {
  struct Case {
    const char* what;
    std::string body;
    std::string type = "application/json";
    std::string message;  // expected in the status message
  };
  const std::vector<Case> cases = {
      {"undefined rule", "{}", "application/json", "policy undefined"},
      {"garbage", "<html>hello</html>", "application/json", "not JSON"},
      {"empty", "", "application/json", "not JSON"},
      {"trailing bytes", R"({"result": {"allow": true}} x)", "application/json", "not JSON"},
      {"duplicate member", R"({"result": {"allow": false, "allow": true}})", "application/json",
       "duplicate"},
      {"duplicate result", R"({"result": {"allow": false}, "result": {"allow": true}})",
       "application/json", "duplicate"},
      {"not an object", R"([{"allow": true}])", "application/json", "not a JSON object"},
      {"result not an object", R"({"result": true})", "application/json", "not a decision"},
      {"allow missing", R"({"result": {"reason": "?"}})", "application/json", "allow"},
      {"allow a string", R"({"result": {"allow": "true"}})", "application/json", "allow"},
      {"ttl_max a string", R"({"result": {"allow": true, "ttl_max": "300"}})", "application/json",
       "ttl_max"},
      {"ttl_max zero", R"({"result": {"allow": true, "ttl_max": 0}})", "application/json",
       "ttl_max"},
      {"scopes a string", R"({"result": {"allow": true, "scopes": "read:*"}})", "application/json",
       "scopes"},
      {"require_approval a number", R"({"result": {"allow": true, "require_approval": 1}})",
       "application/json", "require_approval"},
      {"wrong content type", R"({"result": {"allow": true}})", "text/plain", "application/json"},
      {"deeply nested", R"({"result": )" + std::string(30000, '[') + std::string(30000, ']') + "}",
       "application/json", "not a decision"},
  };
  for (const Case& c : cases) {
    HookServer server;
    server.Start(Answer(c.body, 200, c.type));
    auto decision = MakeHook(server.Url())->Check(SampleInput(), In(5s));
    EXPECT_EQ(decision.status().code(), absl::StatusCode::kInvalidArgument)
        << c.what << ": " << decision.status();
    EXPECT_NE(decision.status().message().find(c.message), std::string_view::npos)
        << c.what << ": " << decision.status();
  }
}

TEST(WebhookPolicyHookTest, NonSuccessStatusIsUnavailable) {
  for (int status : {500, 404, 400, 302, 204}) {
    HookServer server;
    server.Start(Answer(R"({"code": "internal_error", "message": "boom\n"})", status));
    auto decision = MakeHook(server.Url())->Check(SampleInput(), In(5s));
    if (status == 204) {
      // 2xx without a JSON body: the content type (none) is refused.
      EXPECT_EQ(decision.status().code(), absl::StatusCode::kInvalidArgument) << status;
      continue;
    }
    EXPECT_EQ(decision.status().code(), absl::StatusCode::kUnavailable) << status;
    EXPECT_NE(decision.status().message().find("HTTP " + std::to_string(status)),
              std::string_view::npos);
    EXPECT_EQ(std::string(decision.status().message()).find('\n'), std::string::npos);
  }
}

TEST(WebhookPolicyHookTest, OversizedAnswersAreRefusedWithoutReadingThem) {
  // Declared by Content-Length: refused from the header.
  HookServer sized;
  sized.Start(
      Answer(R"({"result": {"allow": true, "reason": ")" + std::string(10 << 20, 'x') + R"("}})"));
  auto decision = MakeHook(sized.Url())->Check(SampleInput(), In(5s));
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kInvalidArgument) << decision.status();
  EXPECT_NE(decision.status().message().find("larger"), std::string_view::npos);

  // Chunked, without a length: cut off once past the cap. The server's writes fail long before
  // it has sent 100 MB.
  std::atomic<size_t> written{0};
  HookServer chunked;
  chunked.Start([&](const httplib::Request&, httplib::Response& res) {
    res.set_chunked_content_provider("application/json", [&](size_t, httplib::DataSink& sink) {
      static const std::string block(64 << 10, ' ');
      if (written >= (100u << 20)) {
        sink.done();
        return true;
      }
      if (!sink.write(block.data(), block.size())) return false;
      written += block.size();
      return true;
    });
  });
  auto streamed = MakeHook(chunked.Url())->Check(SampleInput(), In(5s));
  EXPECT_EQ(streamed.status().code(), absl::StatusCode::kInvalidArgument) << streamed.status();
  chunked.Stop();
  EXPECT_LT(written.load(), 50u << 20);

  // Just under the cap is fine.
  HookServer small;
  small.Start(
      Answer(R"({"result": {"allow": true, "reason": ")" + std::string(60 << 10, 'x') + R"("}})"));
  EXPECT_TRUE(MakeHook(small.Url())->Check(SampleInput(), In(5s)).ok());
}

TEST(WebhookPolicyHookTest, HookDownFailsFastAndWorksOnceItComesUp) {
  const int port = testing::UnusedPort();
  const std::string url = "http://127.0.0.1:" + std::to_string(port) + kPath;
  HookServer server;  // started below; declared first so that the hook closes its connection first
  std::unique_ptr<WebhookPolicyHook> hook;
  EXPECT_LT(Elapsed([&] { hook = MakeHook(url); }), 1000ms);
  absl::StatusOr<PolicyDecision> down;
  auto took = Elapsed([&] { down = hook->Check(SampleInput(), In(2000ms)); });
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_LT(took, 1500ms) << "a refused connection is reported before the deadline";

  server.Start(Answer(R"({"result": {"allow": true}})"), port);
  auto up = hook->Check(SampleInput(), In(5s));
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_TRUE(up->allow);
}

// The pooled connection dies with the hook; the next decision after a restart connects anew.
TEST(WebhookPolicyHookTest, AHookRestartedBetweenDecisionsIsReconnected) {
  auto first = std::make_unique<HookServer>();
  first->Start(Answer(R"({"result": {"allow": true}})"));
  const std::string url = first->Url();
  const int port = std::stoi(url.substr(url.rfind(':') + 1));
  HookServer second;
  auto hook = MakeHook(url);
  ASSERT_TRUE(hook->Check(SampleInput(), In(5s)).ok());
  first.reset();
  second.Start(Answer(R"({"result": {"allow": false, "reason": "second"}})"), port);
  auto decision = hook->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_EQ(decision->reason, "second");
}

TEST(WebhookPolicyHookTest, ASlowHookDoesNotHoldTheCallerPastTheDeadline) {
  HookServer server;
  server.Start([&](const httplib::Request&, httplib::Response& res) {
    server.gate.Wait(5000ms);
    res.set_content(R"({"result": {"allow": true}})", "application/json");
  });
  auto hook = MakeHook(server.Url());
  absl::StatusOr<PolicyDecision> decision;
  auto took = Elapsed([&] { decision = hook->Check(SampleInput(), In(200ms)); });
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kDeadlineExceeded) << decision.status();
  EXPECT_LT(took, 1000ms);
  EXPECT_GE(took, 150ms);
  EXPECT_EQ(hook->Check(SampleInput(), In(-1ms)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

// A hook that sends a byte every 20 ms never trips a read timeout; the deadline still holds.
TEST(WebhookPolicyHookTest, AHookTricklingItsAnswerIsCutOffAtTheDeadline) {
  HookServer server;
  server.Start([&](const httplib::Request&, httplib::Response& res) {
    auto start = std::chrono::steady_clock::now();
    res.set_chunked_content_provider("application/json",
                                     [&, start](size_t, httplib::DataSink& sink) {
                                       server.gate.Wait(20ms);
                                       if (std::chrono::steady_clock::now() - start > 5s) {
                                         sink.done();
                                         return true;
                                       }
                                       return sink.write(" ", 1);
                                     });
  });
  auto hook = MakeHook(server.Url());
  absl::StatusOr<PolicyDecision> decision;
  auto took = Elapsed([&] { decision = hook->Check(SampleInput(), In(200ms)); });
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kDeadlineExceeded) << decision.status();
  EXPECT_LT(took, 1000ms);
}

TEST(WebhookPolicyHookTest, CallersWaitForABusyPoolOnlyUntilTheirDeadline) {
  HookServer server;
  std::atomic<bool> slow{true};
  server.Start([&](const httplib::Request&, httplib::Response& res) {
    if (slow) server.gate.Wait(5000ms);
    res.set_content(R"({"result": {"allow": true}})", "application/json");
  });
  WebhookPolicyOptions options;
  options.url = server.Url();
  options.max_connections = 1;
  auto hook = MakeHook(options);
  std::thread holder([&] { (void)hook->Check(SampleInput(), In(5s)); });
  while (server.requests() == 0) std::this_thread::sleep_for(5ms);
  absl::StatusOr<PolicyDecision> waiting;
  auto took = Elapsed([&] { waiting = hook->Check(SampleInput(), In(200ms)); });
  EXPECT_EQ(waiting.status().code(), absl::StatusCode::kDeadlineExceeded) << waiting.status();
  EXPECT_LT(took, 1000ms);
  slow = false;
  server.gate.Open();
  holder.join();
  EXPECT_TRUE(hook->Check(SampleInput(), In(5s)).ok());
}

TEST(WebhookPolicyHookTest, ConnectionsAreKeptAliveBetweenDecisions) {
  HookServer server;
  server.Start(Answer(R"({"result": {"allow": true}})"));
  auto hook = MakeHook(server.Url());
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(hook->Check(SampleInput(), In(5s)).ok()) << i;
  EXPECT_EQ(server.requests(), 50);
  EXPECT_EQ(server.connections(), 1u);
}

TEST(WebhookPolicyHookTest, ConcurrentCallersShareABoundedPool) {
  HookServer server;
  server.Start(Answer(R"({"result": {"allow": true}})"));
  WebhookPolicyOptions options;
  options.url = server.Url();
  options.max_connections = 3;
  auto hook = MakeHook(options);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 25; ++i) ok += hook->Check(SampleInput(), In(5s)).ok() ? 1 : 0;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 200);
  EXPECT_LE(server.connections(), 3u);
}

TEST(WebhookPolicyHookTest, AHostNameIsResolved) {
  HookServer server;
  server.Start(Answer(R"({"result": {"allow": true}})"));
  auto hook = MakeHook(server.Url("http", "localhost"));
  auto decision = hook->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();

  auto nowhere = MakeHook("http://no-such-host.invalid:8181/v1/data/x");
  EXPECT_FALSE(nowhere->Check(SampleInput(), In(2s)).ok());
}

TEST(WebhookPolicyHookTest, RefusesUnusableOptions) {
  testing::TestPki pki;
  for (const char* url :
       {"", "opa:8181/v1/data", "ftp://opa/x", "http://", "http://user@opa/x", "http://opa/x#frag",
        "http://opa:99999/x", "http://opa:http/x", "http://op a/x", "http://[::1/x"}) {
    WebhookPolicyOptions options;
    options.url = url;
    EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(),
              absl::StatusCode::kInvalidArgument)
        << url;
  }
  WebhookPolicyOptions options;
  options.url = "http://127.0.0.1:8181/v1/data/mandate/issuance?pretty=false";
  EXPECT_TRUE(WebhookPolicyHook::Create(options).ok());
  options.ca_file = pki.ca();  // TLS files for plain http
  EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.url = "https://127.0.0.1:8181/v1/data/mandate/issuance";
  EXPECT_TRUE(WebhookPolicyHook::Create(options).ok());
  options.ca_file = pki.Path("missing.pem");
  EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.ca_file = pki.client_key();  // not a certificate
  EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.ca_file = pki.ca();
  options.client_cert_file = pki.client_cert();
  EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.client_key_file = pki.client_cert();  // not a key
  EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.client_key_file = pki.client_key();
  EXPECT_TRUE(WebhookPolicyHook::Create(options).ok());
  options.max_connections = 0;
  EXPECT_EQ(WebhookPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(WebhookPolicyHookTest, Https) {
  testing::TestPki pki;
  HookServer server(&pki, {pki.server_cert(), pki.server_key(), ""});
  server.Start(Answer(R"({"result": {"allow": true, "ttl_max": 60}})"));
  WebhookPolicyOptions options;
  options.url = server.Url("https");
  options.ca_file = pki.ca();
  auto hook = MakeHook(options);
  for (int i = 0; i < 50; ++i) {
    auto decision = hook->Check(SampleInput(), In(5s));
    ASSERT_TRUE(decision.ok()) << decision.status();
    EXPECT_EQ(decision->ttl_max, 60);
  }
  EXPECT_EQ(server.connections(), 1u) << "one TLS handshake for every decision";

  // The certificate names 127.0.0.1 and hook.test, not localhost.
  options.url = server.Url("https", "localhost");
  EXPECT_EQ(MakeHook(options)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);
  // Roots that did not sign it, and the system's roots.
  options.url = server.Url("https");
  options.ca_file = pki.other_ca();
  EXPECT_EQ(MakeHook(options)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);
  options.ca_file.clear();
  EXPECT_EQ(MakeHook(options)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);
  // Plain HTTP to a TLS server.
  EXPECT_FALSE(MakeHook(server.Url("http"))->Check(SampleInput(), In(2s)).ok());
}

TEST(WebhookPolicyHookTest, MutualTls) {
  testing::TestPki pki;
  HookServer server(&pki, {pki.server_cert(), pki.server_key(), pki.ca()});
  server.Start(Answer(R"({"result": {"allow": true}})"));
  WebhookPolicyOptions options;
  options.url = server.Url("https");
  options.ca_file = pki.ca();
  EXPECT_EQ(MakeHook(options)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);
  options.client_cert_file = pki.stranger_cert();
  options.client_key_file = pki.stranger_key();
  EXPECT_EQ(MakeHook(options)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(server.requests(), 0);
  options.client_cert_file = pki.client_cert();
  options.client_key_file = pki.client_key();
  auto decision = MakeHook(options)->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_TRUE(decision->allow);
  EXPECT_EQ(server.requests(), 1);
}

// Not a timed assertion: prints the per-decision latency on loopback for the record.
TEST(WebhookPolicyHookTest, LoopbackLatency) {
  testing::TestPki pki;
  for (bool tls : {false, true}) {
    HookServer server(&pki, tls ? ServerTls{pki.server_cert(), pki.server_key(), ""} : ServerTls{});
    server.Start(Answer(R"({"result": {"allow": true}})"));
    WebhookPolicyOptions options;
    options.url = server.Url(tls ? "https" : "http");
    if (tls) options.ca_file = pki.ca();
    auto hook = MakeHook(options);
    ASSERT_TRUE(hook->Check(SampleInput(), In(5s)).ok());  // connected
    std::vector<double> micros;
    for (int i = 0; i < 1000; ++i) {
      auto start = std::chrono::steady_clock::now();
      ASSERT_TRUE(hook->Check(SampleInput(), In(5s)).ok());
      micros.push_back(
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
              .count());
    }
    const double median = testing::MedianMicros(micros);
    std::cout << "webhook hook, " << (tls ? "https" : "http") << " loopback: median " << median
              << " us over 1000 decisions\n";
    RecordProperty(tls ? "https_median_us" : "http_median_us", std::to_string(median));
    EXPECT_EQ(server.connections(), 1u);
  }
}

}  // namespace
}  // namespace mandate::broker::policy
