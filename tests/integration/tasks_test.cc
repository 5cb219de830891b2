// Declared tasks and DPoP-bound task tokens end to end: CLI and SDK through the agent's Tasks
// service to the broker (DESIGN.md §4, §6, §10).
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/jose/jose.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"
#include "mandate/workload_client.h"
#include "tests/integration/tasks_fixture.h"

namespace mandate::integration {
namespace {

using ::nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST_F(TasksFixture, CliTaskStartTokenAndEnd) {
  ASSERT_NO_FATAL_FAILURE(StartAll());
  CommandResult started = Workload(
      agent_, {"--output", "json", "task", "start", "--purpose", "triage \"#42\"", "--scope",
               "tickets:read", "--scope", "admin", "--audience", "https://tickets.example.org"});
  ASSERT_EQ(started.exit_code, 0) << started;
  json task = json::parse(started.out, nullptr, false);
  ASSERT_TRUE(task.is_object()) << started;
  EXPECT_EQ(task["status"], "active");
  EXPECT_EQ(task["scopes"], json::array({"tickets:read"}));
  EXPECT_EQ(task["audiences"], json::array({"https://tickets.example.org"}));
  ASSERT_TRUE(task["expires_at"].is_string());
  EXPECT_THAT(task["expires_at"].get<std::string>(), ::testing::EndsWith("Z"));
  const std::string id = task["id"].get<std::string>();

  CommandResult text = Workload(agent_, {"task", "start", "--purpose", "evil \x1b[2J", "--scope",
                                         "tickets:read", "--audience", "a"});
  // The broker refuses control characters in purposes outright.
  EXPECT_NE(text.exit_code, 0) << text;

  CommandResult token =
      Workload(agent_, {"task", "token", id, "--audience", "https://tickets.example.org"});
  ASSERT_EQ(token.exit_code, 0) << token;
  std::vector<std::string> lines = absl::StrSplit(token.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 2u) << token;
  ASSERT_TRUE(lines[1].starts_with("jkt: ")) << token;
  const std::string jkt = lines[1].substr(5);
  json claims = PayloadOf(lines[0]);
  ASSERT_TRUE(claims.is_object()) << token;
  EXPECT_EQ(claims["cnf"]["jkt"], jkt);
  EXPECT_EQ(claims["task"]["id"], id);
  EXPECT_EQ(claims["scope"], "tickets:read");
  EXPECT_EQ(claims["aud"], "https://tickets.example.org");
  EXPECT_EQ(claims["client_id"], spiffe_id_);
  EXPECT_EQ(token.out.find("PRIVATE"), std::string::npos);

  CommandResult wrong_aud = Workload(agent_, {"task", "token", id, "--audience", "other"});
  EXPECT_NE(wrong_aud.exit_code, 0);
  EXPECT_THAT(wrong_aud.err, HasSubstr("audience outside the task"));
  CommandResult wrong_scope =
      Workload(agent_, {"task", "token", id, "--audience", "https://tickets.example.org", "--scope",
                        "tickets:write"});
  EXPECT_NE(wrong_scope.exit_code, 0);
  EXPECT_THAT(wrong_scope.err, HasSubstr("scope outside the task"));

  // Another uid with its own identity on the same node cannot use the task.
  auto other = CreateScopedEntry(broker_.Id("/agent/nobody"), "unix:uid:65534", {"tickets:read"});
  ASSERT_TRUE(other.ok()) << other.status();
  ::chmod(temp_dir().c_str(), 0755);
  ::chmod((temp_dir() + "/run").c_str(), 0755);
  std::vector<std::string> as_nobody = {"/usr/bin/setpriv",
                                        "--reuid=65534",
                                        "--regid=65534",
                                        "--clear-groups",
                                        CliBinary(),
                                        "--socket",
                                        "unix://" + agent_.socket,
                                        "task",
                                        "token",
                                        id,
                                        "--audience",
                                        "https://tickets.example.org"};
  CommandResult stolen;
  ASSERT_TRUE(WaitUntil(
      [&] {
        stolen = RunCommand(as_nobody);
        return stolen.err.find("no identity issued") == std::string::npos;
      },
      15s, 100ms))
      << stolen;
  EXPECT_NE(stolen.exit_code, 0) << stolen;
  EXPECT_THAT(stolen.err, HasSubstr("task not found"));

  CommandResult ended = Workload(agent_, {"--output", "json", "task", "end", id});
  ASSERT_EQ(ended.exit_code, 0) << ended;
  EXPECT_EQ(json::parse(ended.out, nullptr, false)["status"], "ended");
  CommandResult after =
      Workload(agent_, {"task", "token", id, "--audience", "https://tickets.example.org"});
  EXPECT_NE(after.exit_code, 0) << after;
  EXPECT_THAT(after.err, HasSubstr("task ended"));
}

TEST_F(TasksFixture, SdkTokenVerifiesWithBrokerKeysAndProofsAreSingleUse) {
  ASSERT_NO_FATAL_FAILURE(StartAll());
  auto client = WorkloadClient::Connect("unix://" + agent_.socket);
  ASSERT_TRUE(client.ok()) << client.status();
  auto task = (*client)->DeclareTask("sdk task", {"tickets:write", "other"}, {"aud-a", "aud-b"});
  ASSERT_TRUE(task.ok()) << task.status();
  EXPECT_THAT(task->scopes, ElementsAre("tickets:write"));
  EXPECT_EQ(task->token_endpoint, broker_.issuer_url + "/token");
  auto token = (*client)->FetchTaskToken(*task, "aud-b");
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->token_type, "DPoP");
  EXPECT_THAT(token->scopes, ElementsAre("tickets:write"));
  auto thumbprint = (*client)->DpopKeyThumbprint();
  ASSERT_TRUE(thumbprint.ok()) << thumbprint.status();
  EXPECT_EQ(token->jkt, *thumbprint);

  auto parsed = jose::ParseCompact(token->access_token);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->header["typ"], "at+jwt");
  EXPECT_EQ(parsed->payload["cnf"]["jkt"], *thumbprint);
  auto keys = HttpGet(broker_.http_address, "/keys");
  ASSERT_TRUE(keys.ok()) << keys.status();
  json jwks = json::parse(keys->body, nullptr, false);
  ASSERT_TRUE(jwks.is_object() && jwks.contains("keys")) << keys->body;
  bool verified = false;
  for (const json& jwk : jwks["keys"]) {
    if (!jwk.contains("kid") || jwk["kid"] != parsed->header["kid"]) continue;
    auto key = jose::PublicKeyFromJwk(jwk);
    ASSERT_TRUE(key.ok()) << key.status();
    EXPECT_TRUE(jose::VerifySignature(*parsed, *key).ok());
    verified = true;
  }
  EXPECT_TRUE(verified) << keys->body;

  // The same proof twice through the raw Tasks API: the second is a replay.
  auto proof = (*client)->CreateProof("POST", task->token_endpoint);
  ASSERT_TRUE(proof.ok()) << proof.status();
  auto stub = mandate::workload::v1::Tasks::NewStub(
      grpc::CreateChannel("unix:" + agent_.socket, grpc::InsecureChannelCredentials()));
  mandate::workload::v1::FetchTaskTokenRequest request;
  request.set_task_id(task->id);
  request.set_audience("aud-a");
  request.set_dpop_proof(*proof);
  for (int attempt = 0; attempt < 2; ++attempt) {
    grpc::ClientContext context;
    context.AddMetadata("workload.spiffe.io", "true");
    mandate::workload::v1::FetchTaskTokenResponse response;
    grpc::Status status = stub->FetchTaskToken(&context, request, &response);
    if (attempt == 0) {
      EXPECT_TRUE(status.ok()) << status.error_message();
    } else {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_THAT(status.error_message(), HasSubstr("replayed"));
    }
  }

  auto ended = (*client)->EndTask(task->id);
  ASSERT_TRUE(ended.ok()) << ended.status();
  EXPECT_EQ(ended->status, "ended");
  EXPECT_EQ((*client)->FetchTaskToken(*task, "aud-a").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(TasksFixture, TokenEndpointExchangesAJwtSvidForADpopBoundTaskToken) {
  ASSERT_NO_FATAL_FAILURE(StartAll());
  auto discovery = HttpGet(broker_.http_address, "/.well-known/openid-configuration");
  ASSERT_TRUE(discovery.ok()) << discovery.status();
  json metadata = json::parse(discovery->body, nullptr, false);
  EXPECT_EQ(metadata.value("token_endpoint", ""), broker_.issuer_url + "/token");
  EXPECT_THAT(metadata["grant_types_supported"].dump(),
              HasSubstr("urn:ietf:params:oauth:grant-type:token-exchange"));
  EXPECT_THAT(metadata["dpop_signing_alg_values_supported"].dump(), HasSubstr("ES256"));

  auto client = WorkloadClient::Connect("unix://" + agent_.socket);
  ASSERT_TRUE(client.ok()) << client.status();
  auto task = (*client)->DeclareTask("http task", {"tickets:read", "tickets:write"},
                                     {"https://tickets.example.org"});
  ASSERT_TRUE(task.ok()) << task.status();
  auto svid = (*client)->FetchJwtSvid({broker_.issuer_url});
  ASSERT_TRUE(svid.ok()) << svid.status();
  auto params = ExchangeParams(svid->token, task->id);
  params.emplace_back("scope", "tickets:read");
  auto proof = (*client)->CreateProof("POST", task->token_endpoint);
  ASSERT_TRUE(proof.ok()) << proof.status();

  TokenHttpAnswer answer = PostToken(broker_.http_address, params, {*proof});
  ASSERT_EQ(answer.status, 200) << answer.body.dump();
  EXPECT_EQ(answer.body["token_type"], "DPoP");
  EXPECT_EQ(answer.body["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
  EXPECT_GT(answer.body["expires_in"].get<int64_t>(), 0);
  EXPECT_FALSE(answer.body.contains("scope"));  // exactly what was asked
  json claims = PayloadOf(answer.body["access_token"]);
  EXPECT_EQ(claims["sub"], spiffe_id_);
  EXPECT_EQ(claims["aud"], "https://tickets.example.org");
  EXPECT_EQ(claims["scope"], "tickets:read");
  EXPECT_EQ(claims["task"]["id"], task->id);
  EXPECT_EQ(claims["cnf"]["jkt"], *(*client)->DpopKeyThumbprint());

  // The same proof again is a replay; nothing is minted.
  TokenHttpAnswer replay = PostToken(broker_.http_address, params, {*proof});
  EXPECT_EQ(replay.status, 400);
  EXPECT_EQ(replay.body.value("error", ""), "invalid_dpop_proof");
  EXPECT_FALSE(replay.body.contains("access_token"));
  TokenHttpAnswer no_proof = PostToken(broker_.http_address, params, {});
  EXPECT_EQ(no_proof.body.value("error", ""), "invalid_dpop_proof");

  // A JWT-SVID for another audience is not a credential for the broker.
  auto other_svid = (*client)->FetchJwtSvid({"https://tickets.example.org"});
  ASSERT_TRUE(other_svid.ok()) << other_svid.status();
  auto wrong_aud = params;
  wrong_aud[1].second = other_svid->token;
  TokenHttpAnswer refused = PostToken(broker_.http_address, wrong_aud,
                                      {*(*client)->CreateProof("POST", task->token_endpoint)});
  EXPECT_EQ(refused.status, 400);
  EXPECT_EQ(refused.body.value("error", ""), "invalid_request");

  // Scope outside the task, then an ended task.
  auto too_wide = params;
  too_wide[4].second = "tickets:admin";
  EXPECT_EQ(PostToken(broker_.http_address, too_wide,
                      {*(*client)->CreateProof("POST", task->token_endpoint)})
                .body.value("error", ""),
            "invalid_scope");
  ASSERT_TRUE((*client)->EndTask(task->id).ok());
  EXPECT_EQ(PostToken(broker_.http_address, params,
                      {*(*client)->CreateProof("POST", task->token_endpoint)})
                .body.value("error", ""),
            "invalid_grant");
}

// A broker with --dpop-nonce, and a task of this process declared through the SDK.
class NonceTasksFixture : public TasksFixture {
 protected:
  void SetUp() override {
    TasksFixture::SetUp();
    BrokerOptions options;
    options.extra_args = {"--dpop-nonce"};
    ASSERT_NO_FATAL_FAILURE(StartAll(options));
    auto client = WorkloadClient::Connect("unix://" + agent_.socket);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = *std::move(client);
    auto task = client_->DeclareTask("nonce task", {"tickets:read"}, {"aud-n"});
    ASSERT_TRUE(task.ok()) << task.status();
    task_ = *task;
  }
  void TearDown() override {
    client_.reset();  // before the agent stops, which would wait for the connection
    TasksFixture::TearDown();
  }
  std::unique_ptr<WorkloadClient> client_;
  TaskInfo task_;
};

TEST_F(NonceTasksFixture, TokenEndpointWithDpopNonceHandsOutANonceAndAcceptsIt) {
  auto svid = client_->FetchJwtSvid({broker_.issuer_url});
  ASSERT_TRUE(svid.ok()) << svid.status();
  auto params = ExchangeParams(svid->token, task_.id);
  // A client holding its own key, as any OAuth DPoP client would.
  auto key = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok());
  auto now = [] { return static_cast<int64_t>(::time(nullptr)); };
  TokenHttpAnswer first =
      PostToken(broker_.http_address, params,
                {*dpop::CreateProof(*key, "POST", task_.token_endpoint, now())});
  EXPECT_EQ(first.status, 400);
  EXPECT_EQ(first.body.value("error", ""), "use_dpop_nonce");
  ASSERT_FALSE(first.dpop_nonce.empty());
  TokenHttpAnswer second = PostToken(
      broker_.http_address, params,
      {*dpop::CreateProof(*key, "POST", task_.token_endpoint, now(), "", first.dpop_nonce)});
  ASSERT_EQ(second.status, 200) << second.body.dump();
  EXPECT_EQ(second.body["scope"], "tickets:read");
  EXPECT_EQ(PayloadOf(second.body["access_token"])["cnf"]["jkt"],
            *jose::JwkThumbprint(key->public_key()));
  EXPECT_EQ(second.dpop_nonce, first.dpop_nonce);
  // The SDK's own key and proof carry the nonce too.
  auto sdk_proof = client_->CreateProof("POST", task_.token_endpoint, "", second.dpop_nonce);
  ASSERT_TRUE(sdk_proof.ok()) << sdk_proof.status();
  TokenHttpAnswer third = PostToken(broker_.http_address, params, {*sdk_proof});
  ASSERT_EQ(third.status, 200) << third.body.dump();
  EXPECT_EQ(PayloadOf(third.body["access_token"])["cnf"]["jkt"], *client_->DpopKeyThumbprint());
}

// Issue 10 item 11: the node API's FetchTaskToken ignored --dpop-nonce, so a proof without the
// nonce was refused at /token but accepted through the agent. Now both paths require it; the
// agent passes the broker's nonce on and the SDK signs its retry with it.
TEST_F(NonceTasksFixture, WorkloadApiTaskTokensRequireTheNonceUnderDpopNonce) {
  auto stub = mandate::workload::v1::Tasks::NewStub(
      grpc::CreateChannel("unix:" + agent_.socket, grpc::InsecureChannelCredentials()));
  auto fetch = [&](const std::string& proof, std::string* nonce) {
    mandate::workload::v1::FetchTaskTokenRequest request;
    request.set_task_id(task_.id);
    request.set_audience("aud-n");
    request.set_dpop_proof(proof);
    grpc::ClientContext context;
    context.AddMetadata("workload.spiffe.io", "true");
    mandate::workload::v1::FetchTaskTokenResponse response;
    grpc::Status status = stub->FetchTaskToken(&context, request, &response);
    auto it = context.GetServerTrailingMetadata().find("dpop-nonce");
    if (it != context.GetServerTrailingMetadata().end()) {
      nonce->assign(it->second.data(), it->second.size());
    }
    return status;
  };
  // A proof without the nonce is refused, and the refusal carries the nonce.
  std::string nonce;
  grpc::Status refused = fetch(*client_->CreateProof("POST", task_.token_endpoint), &nonce);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.error_message(), HasSubstr("use_dpop_nonce"));
  ASSERT_FALSE(nonce.empty());
  // With a nonce of another server, too.
  std::string ignored;
  EXPECT_EQ(
      fetch(*client_->CreateProof("POST", task_.token_endpoint, "", "not-the-nonce"), &ignored)
          .error_code(),
      grpc::StatusCode::FAILED_PRECONDITION);
  // With it, the token is issued.
  std::string after;
  grpc::Status accepted =
      fetch(*client_->CreateProof("POST", task_.token_endpoint, "", nonce), &after);
  EXPECT_TRUE(accepted.ok()) << accepted.error_message();
  EXPECT_EQ(after, nonce);
  // The SDK does all that by itself: its first proof has no nonce, it retries with the one
  // handed out, and later calls carry it from the start.
  for (int i = 0; i < 2; ++i) {
    auto token = client_->FetchTaskToken(task_, "aud-n");
    ASSERT_TRUE(token.ok()) << token.status();
    EXPECT_EQ(token->jkt, *client_->DpopKeyThumbprint());
  }
  // POST /token agrees: the same nonce is current there.
  auto svid = client_->FetchJwtSvid({broker_.issuer_url});
  ASSERT_TRUE(svid.ok()) << svid.status();
  TokenHttpAnswer http =
      PostToken(broker_.http_address, ExchangeParams(svid->token, task_.id),
                {*client_->CreateProof("POST", task_.token_endpoint, "", nonce)});
  EXPECT_EQ(http.status, 200) << http.body.dump();
}

// Issue 10 item 7 against real daemons: a proof dated into the future (within the 5 s skew)
// that the broker accepted is replayed right after a restart, when the replay cache is empty.
// The restarted broker refuses every proof with 503 temporarily_unavailable for 6 s, then that
// one for good; the SDK waits the window out by itself.
TEST_F(TasksFixture, ARestartedBrokerRefusesAProofItsPredecessorAccepted) {
  ASSERT_NO_FATAL_FAILURE(StartAll());
  auto client = WorkloadClient::Connect("unix://" + agent_.socket);
  ASSERT_TRUE(client.ok()) << client.status();
  auto task = (*client)->DeclareTask("restart task", {"tickets:read"}, {"aud-r"});
  ASSERT_TRUE(task.ok()) << task.status();
  auto svid = (*client)->FetchJwtSvid({broker_.issuer_url});
  ASSERT_TRUE(svid.ok()) << svid.status();
  const auto params = ExchangeParams(svid->token, task->id);
  auto key = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok());
  const std::string future_proof =
      *dpop::CreateProof(*key, "POST", task->token_endpoint, ::time(nullptr) + 4);
  ASSERT_EQ(PostToken(broker_.http_address, params, {future_proof}).status, 200);

  ASSERT_EQ(StopProcess(broker_.pid, SIGTERM), 0);
  BrokerOptions same_ports;
  same_ports.agent_listen = broker_.agent_address;
  same_ports.http_listen = broker_.http_address;
  const auto restart_began = std::chrono::steady_clock::now();
  auto restarted = StartBroker(same_ports);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;

  TokenHttpAnswer during = PostToken(broker_.http_address, params, {future_proof});
  if (std::chrono::steady_clock::now() - restart_began < 5s) {
    EXPECT_EQ(during.status, 503) << during.body.dump();
    EXPECT_EQ(during.body.value("error", ""), "temporarily_unavailable");
  }
  // Once the agent is connected to the new broker (a JWT-SVID for a new audience is minted
  // there), the SDK's proof may still fall in the window: it waits as told and succeeds.
  int audience = 0;
  ASSERT_TRUE(WaitUntil(
      [&] {
        return Workload(agent_,
                        {"fetch", "jwt", "--audience", absl::StrCat("after-restart-", ++audience)})
                   .exit_code == 0;
      },
      15s, 100ms));
  auto token = (*client)->FetchTaskToken(*task, "aud-r");
  EXPECT_TRUE(token.ok()) << token.status();
  std::this_thread::sleep_until(restart_began + 7s);
  TokenHttpAnswer replay = PostToken(broker_.http_address, params, {future_proof});
  EXPECT_EQ(replay.status, 400) << replay.body.dump();
  EXPECT_EQ(replay.body.value("error", ""), "invalid_dpop_proof");
  TokenHttpAnswer fresh =
      PostToken(broker_.http_address, params,
                {*dpop::CreateProof(*key, "POST", task->token_endpoint, ::time(nullptr))});
  EXPECT_EQ(fresh.status, 200) << fresh.body.dump();
}

}  // namespace
}  // namespace mandate::integration
