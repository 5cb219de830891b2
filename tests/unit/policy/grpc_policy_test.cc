// GrpcPolicyHook against a real mandate.policy.v1.PolicyHook server on 127.0.0.1.
#include "broker/server/policy/grpc_policy.h"

#include <grpcpp/grpcpp.h>

#include <functional>
#include <iostream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "broker/common/crypto/keys.h"
#include "gtest/gtest.h"
#include "mandate/policy/v1/policy.grpc.pb.h"
#include "tests/unit/policy/hook_test_util.h"

namespace mandate::broker::policy {
namespace {

using namespace std::chrono_literals;
using testing::Elapsed;
using testing::In;
using testing::SampleInput;
namespace pb = ::mandate::policy::v1;

using Handler = std::function<grpc::Status(const pb::CheckRequest&, pb::CheckResponse&)>;

class FakeHookService final : public pb::PolicyHook::Service {
 public:
  explicit FakeHookService(Handler handler) : handler_(std::move(handler)) {}
  grpc::Status Check(grpc::ServerContext* context, const pb::CheckRequest* request,
                     pb::CheckResponse* response) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      peers_.insert(context->peer());
      last_ = *request;
      ++calls_;
    }
    return handler_(*request, *response);
  }
  std::set<std::string> peers() {
    std::lock_guard<std::mutex> lock(mu_);
    return peers_;
  }
  pb::CheckRequest last() {
    std::lock_guard<std::mutex> lock(mu_);
    return last_;
  }
  int calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  Handler handler_;
  std::mutex mu_;
  std::set<std::string> peers_;
  pb::CheckRequest last_;
  int calls_ = 0;
};

std::string ReadPem(const std::string& path) {
  return testing::ValueOrThrow(crypto::ReadFile(path), "read PEM");
}

struct ServerTls {
  std::string cert, key;  // empty: plaintext
  std::string client_ca;  // set: a client certificate signed by it is required
};

// A hook server on 127.0.0.1 (`port` 0: a free one).
class FakeHookServer {
 public:
  explicit FakeHookServer(Handler handler, ServerTls tls = {}, int port = 0)
      : service_(std::move(handler)) {
    std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
    if (!tls.cert.empty()) {
      grpc::SslServerCredentialsOptions ssl(
          tls.client_ca.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                                : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
      ssl.pem_key_cert_pairs.push_back({ReadPem(tls.key), ReadPem(tls.cert)});
      if (!tls.client_ca.empty()) ssl.pem_root_certs = ReadPem(tls.client_ca);
      credentials = grpc::SslServerCredentials(ssl);
    }
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:" + std::to_string(port), credentials, &port_);
    // The hook's clients ping every 30 s, calls or not.
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 15000);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr || port_ == 0) throw std::runtime_error("hook server did not start");
  }
  ~FakeHookServer() {
    gate.Open();
    server_->Shutdown(std::chrono::system_clock::now() + 1s);
  }
  int port() const { return port_; }
  std::string target() const { return "127.0.0.1:" + std::to_string(port_); }
  FakeHookService& service() { return service_; }
  testing::Gate gate;  // slow handlers wait here

 private:
  FakeHookService service_;
  int port_ = 0;
  std::unique_ptr<grpc::Server> server_;
};

std::unique_ptr<GrpcPolicyHook> PlaintextHook(const std::string& target) {
  GrpcPolicyOptions options;
  options.target = target;
  options.plaintext = true;
  options.max_reconnect_backoff = 200ms;
  auto hook = GrpcPolicyHook::Create(options);
  if (!hook.ok()) throw std::runtime_error(hook.status().ToString());
  return *std::move(hook);
}

Handler Allow() {
  return [](const pb::CheckRequest&, pb::CheckResponse& r) {
    r.set_allow(true);
    return grpc::Status::OK;
  };
}

TEST(GrpcPolicyHookTest, SendsTheInputDocumentsFields) {
  FakeHookServer server(Allow());
  auto hook = PlaintextHook(server.target());
  EXPECT_EQ(hook->name(), "grpc");
  auto decision = hook->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_TRUE(decision->allow);
  pb::CheckRequest got = server.service().last();
  EXPECT_EQ(got.kind(), "task_token");
  EXPECT_EQ(got.spiffe_id(), "spiffe://example.org/agent/research");
  EXPECT_EQ(got.node_id(), "spiffe://example.org/node/n1");
  ASSERT_EQ(got.selectors_size(), 2);
  EXPECT_EQ(got.selectors(1), "unix:path:/usr/bin/research");
  ASSERT_EQ(got.audience_size(), 1);
  EXPECT_EQ(got.audience(0), "https://api.example.org");
  ASSERT_EQ(got.scopes_size(), 2);
  EXPECT_EQ(got.scopes(0), "read:docs");
  EXPECT_EQ(got.ttl(), 900);
  ASSERT_TRUE(got.has_task());
  EXPECT_EQ(got.task().id(), "task-1");
  EXPECT_EQ(got.task().purpose(), "summarise \"Q3\"\nreport");
  EXPECT_EQ(got.task().scopes_size(), 1);
  EXPECT_EQ(got.task().audiences(0), "api");
  EXPECT_EQ(got.subject(), "alice");
  ASSERT_EQ(got.actor_chain_size(), 2);
  EXPECT_EQ(got.actor_chain(1), "spiffe://example.org/agent/boss");
  EXPECT_EQ(got.time(), "2027-01-15T08:00:00Z");

  PolicyInput no_task = SampleInput();
  no_task.task.reset();
  ASSERT_TRUE(hook->Check(no_task, In(5s)).ok());
  EXPECT_FALSE(server.service().last().has_task());
}

TEST(GrpcPolicyHookTest, MapsEveryAnswerField) {
  FakeHookServer server([](const pb::CheckRequest& request, pb::CheckResponse& r) {
    if (request.spiffe_id().ends_with("/payments")) {
      r.set_allow(true);
      r.set_require_approval(true);
      r.set_reason("payments need a human");
    } else if (request.spiffe_id().ends_with("/research")) {
      r.set_allow(true);
      r.set_ttl_max(300);
      r.mutable_scopes()->add_scopes("read:docs");
    } else if (request.spiffe_id().ends_with("/empty-scopes")) {
      r.set_allow(true);
      r.mutable_scopes();  // set, with no scope: narrows to nothing
    } else {
      r.set_allow(false);
      r.set_reason("unknown agent");
    }
    return grpc::Status::OK;
  });
  auto hook = PlaintextHook(server.target());
  PolicyInput input = SampleInput();

  auto research = hook->Check(input, In(5s));
  ASSERT_TRUE(research.ok()) << research.status();
  EXPECT_TRUE(research->allow);
  EXPECT_EQ(research->ttl_max, 300);
  ASSERT_TRUE(research->scopes.has_value());
  EXPECT_EQ(*research->scopes, std::vector<std::string>{"read:docs"});
  EXPECT_FALSE(research->require_approval);

  input.spiffe_id = "spiffe://example.org/agent/payments";
  auto payments = hook->Check(input, In(5s));
  ASSERT_TRUE(payments.ok());
  EXPECT_TRUE(payments->allow);
  EXPECT_TRUE(payments->require_approval);
  EXPECT_EQ(payments->reason, "payments need a human");
  EXPECT_FALSE(payments->ttl_max.has_value());
  EXPECT_FALSE(payments->scopes.has_value());

  input.spiffe_id = "spiffe://example.org/agent/empty-scopes";
  auto empty = hook->Check(input, In(5s));
  ASSERT_TRUE(empty.ok());
  ASSERT_TRUE(empty->scopes.has_value());
  EXPECT_TRUE(empty->scopes->empty());

  input.spiffe_id = "spiffe://example.org/agent/stranger";
  auto denied = hook->Check(input, In(5s));
  ASSERT_TRUE(denied.ok()) << "a denial is a decision, not an error";
  EXPECT_FALSE(denied->allow);
  EXPECT_EQ(denied->reason, "unknown agent");
}

TEST(GrpcPolicyHookTest, NonPositiveTtlMaxIsAnError) {
  for (int64_t ttl : {0, -5}) {
    FakeHookServer server([ttl](const pb::CheckRequest&, pb::CheckResponse& r) {
      r.set_allow(true);
      r.set_ttl_max(ttl);
      return grpc::Status::OK;
    });
    auto decision = PlaintextHook(server.target())->Check(SampleInput(), In(5s));
    EXPECT_EQ(decision.status().code(), absl::StatusCode::kInvalidArgument) << ttl;
  }
}

TEST(GrpcPolicyHookTest, AFailedCallIsAnErrorWhateverItsCode) {
  FakeHookServer server([](const pb::CheckRequest&, pb::CheckResponse& r) {
    r.set_allow(true);  // ignored: the status is not OK
    return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "no\nway \"out\"");
  });
  auto decision = PlaintextHook(server.target())->Check(SampleInput(), In(5s));
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kUnavailable);
  // The hook's text is escaped: one line.
  EXPECT_EQ(std::string(decision.status().message()).find('\n'), std::string::npos);
  EXPECT_NE(decision.status().message().find("no\\nway"), std::string_view::npos);
}

TEST(GrpcPolicyHookTest, AnOversizedAnswerIsAnError) {
  FakeHookServer server([](const pb::CheckRequest&, pb::CheckResponse& r) {
    r.set_allow(true);
    r.set_reason(std::string(10 << 20, 'x'));
    return grpc::Status::OK;
  });
  auto decision = PlaintextHook(server.target())->Check(SampleInput(), In(5s));
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kUnavailable) << decision.status();

  FakeHookServer small([](const pb::CheckRequest&, pb::CheckResponse& r) {
    r.set_allow(true);
    r.set_reason(std::string(60 << 10, 'x'));  // under the cap
    return grpc::Status::OK;
  });
  EXPECT_TRUE(PlaintextHook(small.target())->Check(SampleInput(), In(5s)).ok());
}

TEST(GrpcPolicyHookTest, HookDownFailsFastAndWorksOnceItComesUp) {
  const int port = testing::UnusedPort();
  const std::string target = "127.0.0.1:" + std::to_string(port);
  std::unique_ptr<GrpcPolicyHook> hook;
  // Construction does not wait for the hook.
  EXPECT_LT(Elapsed([&] { hook = PlaintextHook(target); }), 1000ms);
  absl::StatusOr<PolicyDecision> down;
  auto took = Elapsed([&] { down = hook->Check(SampleInput(), In(2000ms)); });
  EXPECT_EQ(down.status().code(), absl::StatusCode::kUnavailable) << down.status();
  EXPECT_LT(took, 1500ms) << "a refused connection is reported before the deadline";

  FakeHookServer server(Allow(), {}, port);
  absl::StatusOr<PolicyDecision> up = absl::UnknownError("not tried");
  for (int i = 0; i < 100 && !up.ok(); ++i) {
    up = hook->Check(SampleInput(), In(1000ms));
    if (!up.ok()) std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_TRUE(up->allow);
}

TEST(GrpcPolicyHookTest, AHookRestartedBetweenDecisionsIsReconnected) {
  auto first = std::make_unique<FakeHookServer>(Allow());
  const int port = first->port();
  auto hook = PlaintextHook(first->target());
  ASSERT_TRUE(hook->Check(SampleInput(), In(5s)).ok());
  first.reset();
  FakeHookServer second(
      [](const pb::CheckRequest&, pb::CheckResponse& r) {
        r.set_reason("second");
        return grpc::Status::OK;
      },
      {}, port);
  absl::StatusOr<PolicyDecision> decision = absl::UnknownError("not tried");
  for (int i = 0; i < 100 && !decision.ok(); ++i) {
    decision = hook->Check(SampleInput(), In(1000ms));
    if (!decision.ok()) std::this_thread::sleep_for(100ms);
  }
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_EQ(decision->reason, "second");
}

TEST(GrpcPolicyHookTest, ASlowHookDoesNotHoldTheCallerPastTheDeadline) {
  FakeHookServer* self = nullptr;
  FakeHookServer server([&self](const pb::CheckRequest&, pb::CheckResponse& r) {
    self->gate.Wait(5000ms);
    r.set_allow(true);
    return grpc::Status::OK;
  });
  self = &server;
  auto hook = PlaintextHook(server.target());
  absl::StatusOr<PolicyDecision> decision;
  auto took = Elapsed([&] { decision = hook->Check(SampleInput(), In(200ms)); });
  EXPECT_EQ(decision.status().code(), absl::StatusCode::kDeadlineExceeded) << decision.status();
  EXPECT_LT(took, 1000ms);
  EXPECT_GE(took, 150ms);
  // A deadline already past is refused without a call.
  EXPECT_EQ(hook->Check(SampleInput(), In(-1ms)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(GrpcPolicyHookTest, OneConnectionServesManyDecisions) {
  FakeHookServer server(Allow());
  auto hook = PlaintextHook(server.target());
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(hook->Check(SampleInput(), In(5s)).ok());
  EXPECT_EQ(server.service().calls(), 50);
  EXPECT_EQ(server.service().peers().size(), 1u);
}

TEST(GrpcPolicyHookTest, ConcurrentChecks) {
  FakeHookServer server(Allow());
  auto hook = PlaintextHook(server.target());
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 25; ++i) ok += hook->Check(SampleInput(), In(5s)).ok() ? 1 : 0;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 200);
  EXPECT_EQ(server.service().peers().size(), 1u);
}

TEST(GrpcPolicyHookTest, RefusesUnusableOptions) {
  testing::TestPki pki;
  GrpcPolicyOptions options;
  EXPECT_EQ(GrpcPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.target = "127.0.0.1:1";
  // TLS is the default and needs roots.
  EXPECT_EQ(GrpcPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.plaintext = true;
  options.ca_file = pki.ca();
  EXPECT_EQ(GrpcPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.plaintext = false;
  options.client_cert_file = pki.client_cert();
  EXPECT_EQ(GrpcPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.client_key_file = pki.Path("missing.pem");
  EXPECT_EQ(GrpcPolicyHook::Create(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.client_key_file = pki.client_key();
  EXPECT_TRUE(GrpcPolicyHook::Create(options).ok());
}

TEST(GrpcPolicyHookTest, Tls) {
  testing::TestPki pki;
  FakeHookServer server(Allow(), {pki.server_cert(), pki.server_key(), ""});
  GrpcPolicyOptions options;
  options.target = server.target();
  options.ca_file = pki.ca();
  auto hook = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(hook.ok()) << hook.status();
  auto decision = (*hook)->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_TRUE(decision->allow);

  // The name in the certificate instead of the address.
  options.target = "localhost:" + std::to_string(server.port());
  options.server_name_override = "hook.test";
  auto renamed = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(renamed.ok());
  EXPECT_TRUE((*renamed)->Check(SampleInput(), In(5s)).ok());
  options.server_name_override = "other.test";
  auto wrong_name = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(wrong_name.ok());
  EXPECT_EQ((*wrong_name)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);

  // Roots that did not sign the hook's certificate.
  options.target = server.target();
  options.server_name_override.clear();
  options.ca_file = pki.other_ca();
  auto untrusted = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(untrusted.ok());
  EXPECT_EQ((*untrusted)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);

  // A plaintext client gets nothing from a TLS server.
  EXPECT_EQ(PlaintextHook(server.target())->Check(SampleInput(), In(2s)).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST(GrpcPolicyHookTest, MutualTls) {
  testing::TestPki pki;
  FakeHookServer server(Allow(), {pki.server_cert(), pki.server_key(), pki.ca()});
  GrpcPolicyOptions options;
  options.target = server.target();
  options.ca_file = pki.ca();
  auto anonymous = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(anonymous.ok());
  EXPECT_EQ((*anonymous)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);

  options.client_cert_file = pki.stranger_cert();
  options.client_key_file = pki.stranger_key();
  auto stranger = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(stranger.ok());
  EXPECT_EQ((*stranger)->Check(SampleInput(), In(5s)).status().code(),
            absl::StatusCode::kUnavailable);

  options.client_cert_file = pki.client_cert();
  options.client_key_file = pki.client_key();
  auto client = GrpcPolicyHook::Create(options);
  ASSERT_TRUE(client.ok());
  auto decision = (*client)->Check(SampleInput(), In(5s));
  ASSERT_TRUE(decision.ok()) << decision.status();
  EXPECT_TRUE(decision->allow);
  EXPECT_EQ(server.service().calls(), 1);
}

// Not a timed assertion: prints the per-decision latency on loopback for the record.
TEST(GrpcPolicyHookTest, LoopbackLatency) {
  FakeHookServer server(Allow());
  auto hook = PlaintextHook(server.target());
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
  std::cout << "grpc hook, plaintext loopback: median " << median << " us over 1000 decisions\n";
  RecordProperty("median_us", std::to_string(median));
  EXPECT_EQ(server.service().peers().size(), 1u);
}

}  // namespace
}  // namespace mandate::broker::policy
