// The verifier SDK (mandate/token_verifier.h) against task tokens from a real broker, fetched
// through the Workload API and through POST /token, with keys found by discovery over HTTP; and
// the example upstream service (sdk/examples) answering a real HTTP client.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "broker/common/util/clock.h"
#include "mandate/token_verifier.h"
#include "mandate/workload_client.h"
#include "tests/integration/tasks_fixture.h"

namespace mandate::integration {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kAudience[] = "https://tickets.example.org";
constexpr char kUrl[] = "https://tickets.example.org/v1/tickets?open=1";

class VerifierFixture : public TasksFixture {
 protected:
  void SetUp() override {
    TasksFixture::SetUp();
    ASSERT_NO_FATAL_FAILURE(StartAll());
    auto client = WorkloadClient::Connect("unix://" + agent_.socket);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    auto task =
        client_->DeclareTask("verify me", {"tickets:read", "tickets:write"}, {kAudience, "other"});
    ASSERT_TRUE(task.ok()) << task.status();
    task_ = *task;
    TokenVerifierOptions options;
    options.issuer = broker_.issuer_url;
    options.audience = kAudience;
    // The verifier plays a service that has been up for a while: its clock reads an hour back
    // while it is created, so the restart window (every proof refused until creation +
    // proof_max_future_seconds + 1 s; unit-tested in token_verifier_test) is behind it.
    auto created = std::make_shared<std::atomic<bool>>(false);
    options.clock = [created] {
      return mandate::Clock::Real().NowSeconds() - (created->load() ? 0 : 3600);
    };
    auto verifier = TokenVerifier::Create(options);
    *created = true;
    ASSERT_TRUE(verifier.ok()) << verifier.status();
    verifier_ = std::move(*verifier);
  }

  void TearDown() override {
    // Close the Workload API connection before the fixture stops the agent, which would
    // otherwise wait for it to drain.
    client_.reset();
    TasksFixture::TearDown();
  }

  // The request an upstream service sees: `Authorization: <scheme> <token>` and `proofs`.
  static HttpRequestView Request(const std::string& token, std::vector<std::string> proofs,
                                 std::string_view method = "GET", std::string_view url = kUrl,
                                 const std::string& scheme = "DPoP") {
    return HttpRequestView{.method = method,
                           .url = url,
                           .authorization = {scheme + " " + token},
                           .dpop = std::move(proofs)};
  }

  std::string Proof(const std::string& token, std::string_view method = "GET",
                    std::string_view url = kUrl) {
    auto proof = client_->CreateProof(method, url, token);
    EXPECT_TRUE(proof.ok()) << proof.status();
    return proof.value_or("");
  }

  static void ExpectRefused(const absl::StatusOr<VerifiedTaskToken>& result,
                            const std::string& oauth_error, const std::string& message_part) {
    ASSERT_FALSE(result.ok()) << "accepted; expected " << oauth_error;
    EXPECT_EQ(OAuthErrorCode(result.status()), oauth_error) << result.status();
    EXPECT_THAT(std::string(result.status().message()), HasSubstr(message_part));
  }

  std::unique_ptr<WorkloadClient> client_;
  TaskInfo task_;
  std::unique_ptr<TokenVerifier> verifier_;
};

TEST_F(VerifierFixture, AcceptsAWorkloadApiTokenWithAFreshProofOnce) {
  auto token = client_->FetchTaskToken(task_, kAudience, {"tickets:read"});
  ASSERT_TRUE(token.ok()) << token.status();
  std::string proof = Proof(token->access_token);
  auto verified = verifier_->Verify(Request(token->access_token, {proof}));
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->subject(), spiffe_id_);
  EXPECT_EQ(verified->client_id(), spiffe_id_);
  EXPECT_EQ(verified->issuer(), broker_.issuer_url);
  EXPECT_EQ(verified->task_id(), task_.id);
  EXPECT_EQ(verified->task_purpose(), "verify me");
  EXPECT_THAT(verified->scopes(), ElementsAre("tickets:read"));
  EXPECT_TRUE(verified->HasScope("tickets:read"));
  EXPECT_FALSE(verified->HasScope("tickets:write"));
  EXPECT_EQ(verified->jkt(), *client_->DpopKeyThumbprint());
  EXPECT_TRUE(verified->actor_chain().empty());
  EXPECT_EQ(RequireScope(*verified, "tickets:write").code(), absl::StatusCode::kPermissionDenied);

  // The same proof again is a replay; a fresh one is fine.
  ExpectRefused(verifier_->Verify(Request(token->access_token, {proof})), "invalid_dpop_proof",
                "replayed");
  EXPECT_TRUE(verifier_->Verify(Request(token->access_token, {Proof(token->access_token)})).ok());
}

TEST_F(VerifierFixture, AcceptsATokenEndpointToken) {
  auto svid = client_->FetchJwtSvid({broker_.issuer_url});
  ASSERT_TRUE(svid.ok()) << svid.status();
  auto params = ExchangeParams(svid->token, task_.id);
  params.emplace_back("audience", kAudience);
  auto proof = client_->CreateProof("POST", task_.token_endpoint);
  ASSERT_TRUE(proof.ok()) << proof.status();
  TokenHttpAnswer answer = PostToken(broker_.http_address, params, {*proof});
  ASSERT_EQ(answer.status, 200) << answer.body.dump();
  std::string token = answer.body["access_token"];
  auto verified = verifier_->Verify(Request(token, {Proof(token)}));
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_THAT(verified->scopes(), ElementsAre("tickets:read", "tickets:write"));
  EXPECT_EQ(verified->subject(), spiffe_id_);
}

TEST_F(VerifierFixture, RefusesEveryVariantOfABadPresentation) {
  auto fetched = client_->FetchTaskToken(task_, kAudience);
  ASSERT_TRUE(fetched.ok()) << fetched.status();
  const std::string token = fetched->access_token;

  // DPoP-bound token presented as a bearer token.
  ExpectRefused(verifier_->Verify(Request(token, {Proof(token)}, "GET", kUrl, "Bearer")),
                "invalid_token", "Bearer");
  // No proof, two proofs.
  ExpectRefused(verifier_->Verify(Request(token, {})), "invalid_dpop_proof", "missing");
  ExpectRefused(verifier_->Verify(Request(token, {Proof(token), Proof(token)})),
                "invalid_dpop_proof", "more than one");
  // Proof for another method or URL.
  ExpectRefused(verifier_->Verify(Request(token, {Proof(token, "POST")})), "invalid_dpop_proof",
                "htm");
  ExpectRefused(
      verifier_->Verify(Request(token, {Proof(token, "GET", "https://tickets.example.org/admin")})),
      "invalid_dpop_proof", "htu");
  // Proof without ath, or bound to another token.
  auto unbound = client_->CreateProof("GET", kUrl);
  ASSERT_TRUE(unbound.ok());
  ExpectRefused(verifier_->Verify(Request(token, {*unbound})), "invalid_dpop_proof", "ath");
  auto second = client_->FetchTaskToken(task_, kAudience);
  ASSERT_TRUE(second.ok()) << second.status();
  ExpectRefused(verifier_->Verify(Request(token, {Proof(second->access_token)})),
                "invalid_dpop_proof", "ath");
  // A proof by another key (another SDK client holds another key): not the token's cnf.jkt.
  auto other_client = WorkloadClient::Connect("unix://" + agent_.socket);
  ASSERT_TRUE(other_client.ok());
  auto foreign = (*other_client)->CreateProof("GET", kUrl, token);
  ASSERT_TRUE(foreign.ok());
  ExpectRefused(verifier_->Verify(Request(token, {*foreign})), "invalid_dpop_proof", "cnf.jkt");
  // A token for another audience of the same task.
  auto other_aud = client_->FetchTaskToken(task_, "other");
  ASSERT_TRUE(other_aud.ok()) << other_aud.status();
  ExpectRefused(
      verifier_->Verify(Request(other_aud->access_token, {Proof(other_aud->access_token)})),
      "invalid_token", "aud");
  // A JWT-SVID is not a task token, even for this audience.
  auto svid = client_->FetchJwtSvid({kAudience});
  ASSERT_TRUE(svid.ok());
  ExpectRefused(verifier_->Verify(Request(svid->token, {Proof(svid->token)})), "invalid_token",
                "typ");
  // A tampered token.
  std::string tampered = token;
  size_t dot = tampered.find('.');
  tampered[dot + 10] = tampered[dot + 10] == 'A' ? 'B' : 'A';
  ExpectRefused(verifier_->Verify(Request(tampered, {Proof(tampered)})), "invalid_token", "");
  // A verifier expecting another issuer.
  TokenVerifierOptions elsewhere_options = verifier_->options();
  elsewhere_options.issuer = "http://127.0.0.1:1";
  elsewhere_options.http_timeout_ms = 500;
  auto elsewhere = TokenVerifier::Create(elsewhere_options);
  ASSERT_TRUE(elsewhere.ok()) << elsewhere.status();
  EXPECT_FALSE((*elsewhere)->Verify(Request(token, {Proof(token)})).ok());
  // After all that, the genuine presentation still works.
  EXPECT_TRUE(verifier_->Verify(Request(token, {Proof(token)})).ok());
}

TEST_F(VerifierFixture, ExampleUpstreamServiceAcceptsAndRefuses) {
  std::string example = BuildDir() + "/sdk/examples/mandate-example-upstream";
  auto started = StartService({example, "--issuer", broker_.issuer_url, "--audience", kAudience,
                               "--listen", "127.0.0.1:0", "--required-scope", "tickets:read"},
                              "listening on ");
  ASSERT_TRUE(started.ok()) << started.status();
  const std::string address = started->second;
  const std::string url = "http://" + address + "/whoami";
  std::vector<std::string> host_port = absl::StrSplit(address, ':');
  httplib::Client http(host_port.at(0), std::stoi(host_port.at(1)));
  http.set_read_timeout(10);

  auto token = client_->FetchTaskToken(task_, kAudience);
  ASSERT_TRUE(token.ok()) << token.status();
  auto get = [&](const std::string& authorization, const std::string& proof) {
    httplib::Headers headers = {{"Authorization", authorization}};
    if (!proof.empty()) headers.emplace("DPoP", proof);
    return http.Get("/whoami", headers);
  };
  // For its first proof_max_future_seconds + 1 s the service refuses every proof with a 503
  // temporarily_unavailable (its replay cache cannot know proofs a previous instance accepted);
  // a client retries with a new proof.
  auto ok = get("DPoP " + token->access_token, Proof(token->access_token, "GET", url));
  for (auto until = std::chrono::steady_clock::now() + 10s;
       ok && ok->status == 503 && std::chrono::steady_clock::now() < until;) {
    EXPECT_THAT(ok->body, HasSubstr("temporarily_unavailable"));
    std::this_thread::sleep_for(250ms);
    ok = get("DPoP " + token->access_token, Proof(token->access_token, "GET", url));
  }
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  json body = json::parse(ok->body, nullptr, false);
  EXPECT_EQ(body.value("subject", ""), spiffe_id_);
  EXPECT_EQ(body.value("task_id", ""), task_.id);

  auto bearer = get("Bearer " + token->access_token, Proof(token->access_token, "GET", url));
  ASSERT_TRUE(bearer);
  EXPECT_EQ(bearer->status, 401);
  EXPECT_THAT(bearer->get_header_value("WWW-Authenticate"), HasSubstr("invalid_token"));
  auto no_proof = get("DPoP " + token->access_token, "");
  ASSERT_TRUE(no_proof);
  EXPECT_EQ(no_proof->status, 401);
  EXPECT_THAT(no_proof->get_header_value("WWW-Authenticate"), HasSubstr("invalid_dpop_proof"));

  // A token without the required scope is a 403 insufficient_scope.
  auto narrow = client_->FetchTaskToken(task_, kAudience, {"tickets:write"});
  ASSERT_TRUE(narrow.ok()) << narrow.status();
  auto forbidden = get("DPoP " + narrow->access_token, Proof(narrow->access_token, "GET", url));
  ASSERT_TRUE(forbidden);
  EXPECT_EQ(forbidden->status, 403);
  EXPECT_THAT(forbidden->get_header_value("WWW-Authenticate"), HasSubstr("insufficient_scope"));

  EXPECT_EQ(StopProcess(started->first, SIGTERM), 0);
}

}  // namespace
}  // namespace mandate::integration
