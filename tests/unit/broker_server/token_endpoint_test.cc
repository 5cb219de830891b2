#include "broker/server/token_endpoint.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/jose/jose.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using testing::OpenStore;
using testing::TempDir;

constexpr int64_t kNow = 1'800'000'000;
constexpr char kIssuer[] = "https://broker.example.org";
constexpr char kTokenUrl[] = "https://broker.example.org/token";
constexpr char kNode[] = "spiffe://example.org/node/join/n1";
constexpr char kBot[] = "spiffe://example.org/agent/bot";
constexpr char kOther[] = "spiffe://example.org/agent/other";
constexpr char kForm[] = "application/x-www-form-urlencoded";

std::string FormEncode(const std::vector<std::pair<std::string, std::string>>& params) {
  std::string out;
  for (const auto& [name, value] : params) {
    if (!out.empty()) out += '&';
    for (const std::string* s : {&name, &value}) {
      for (unsigned char c : *s) {
        if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
          out += static_cast<char>(c);
        } else {
          char buf[4];
          std::snprintf(buf, sizeof buf, "%%%02X", c);
          out += buf;
        }
      }
      if (s == &name) out += '=';
    }
  }
  return out;
}

std::string Sign(const crypto::PrivateKey& key, const json& header, const json& claims) {
  return *jose::SignCompact(key, *jose::AlgorithmForKey(key.public_key()), header.dump(),
                            claims.dump());
}

class TokenEndpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = OpenStore(dir_);
    authority_ = std::move(TrustAuthority::LoadOrCreate(
                               {.data_dir = dir_.path(),
                                .trust_domain = *spiffe::TrustDomain::Parse("example.org")},
                               clock_))
                     .value();
    registry_ = std::move(EntryRegistry::Load(*store_)).value();
    // /token serves identities running on an attested node that is not banned.
    ASSERT_TRUE(store_
                    ->UpsertNode({.spiffe_id = kNode,
                                  .attestor = "join_token",
                                  .selectors = {"join_token:n1"},
                                  .cert_serial = "01",
                                  .cert_expires_at = kNow + 3600})
                    .ok());
    AddEntry("e1", kBot, {"read", "write", "deploy"}, /*token_ttl=*/120);
    AddEntry("e2", kOther, {"read"}, 0);
    audit_ = testing::OpenAuditLog(*store_, clock_);
    minter_ = std::make_unique<Minter>(*authority_, clock_, IssuerDefaults{.issuer_url = kIssuer});
    nodes_ = std::make_unique<NodeAuthenticator>(*authority_, *store_, clock_);
    tasks_ = std::make_unique<TaskRegistry>(*store_, *audit_, clock_, TaskLimits{});
    endpoint_ = MakeEndpoint(nullptr);
    dpop_key_ = *crypto::PrivateKey::GenerateP256();
    task_id_ = Declare(kBot, {"read", "write"}, {"https://api.example.org"});
  }

  // A token endpoint on its own exchange and pipeline (a broker instance, as far as /token sees).
  struct Stack {
    std::unique_ptr<TaskTokenExchange> exchange;
    std::unique_ptr<issuance::IssuancePipeline> pipeline;
    std::unique_ptr<TokenEndpoint> endpoint;
    TokenResponse Handle(const TokenRequest& request) const { return endpoint->Handle(request); }
  };
  Stack MakeStack(dpop::ReplayCache& cache, int64_t started_at, DpopNonceSource* nonces = nullptr,
                  const policy::PolicyChain* policy = nullptr) {
    Stack stack;
    stack.exchange = std::make_unique<TaskTokenExchange>(
        *authority_, *registry_, *tasks_, *store_, clock_,
        ExchangeOptions{
            .issuer_url = kIssuer,
            .proof = {.started_at = started_at, .replay_cache = &cache, .nonces = nonces}});
    stack.pipeline = std::make_unique<issuance::IssuancePipeline>(
        issuance::PipelineDeps{.minter = minter_.get(),
                               .nodes = nodes_.get(),
                               .entries = registry_.get(),
                               .tasks = tasks_.get(),
                               .exchange = stack.exchange.get(),
                               .policy = policy,
                               .audit = audit_.get(),
                               .store = store_.get(),
                               .clock = &clock_});
    stack.endpoint = std::make_unique<TokenEndpoint>(*stack.pipeline);
    return stack;
  }
  std::unique_ptr<TokenEndpoint> MakeEndpoint(DpopNonceSource* nonces) {
    main_ = MakeStack(cache_, kNow - 10, nonces, policy_);
    return std::move(main_.endpoint);
  }

  void AddEntry(const std::string& id, const std::string& spiffe_id,
                std::vector<std::string> scopes, int64_t token_ttl) {
    store::RegistrationEntry e;
    e.id = id;
    e.spiffe_id = spiffe_id;
    e.parent_id = kNode;
    e.selectors = {"unix:uid:1000"};
    e.scopes = std::move(scopes);
    e.token_ttl_s = token_ttl;
    ASSERT_TRUE(registry_->Create(e).ok());
  }

  std::string Declare(const std::string& spiffe_id, std::vector<std::string> scopes,
                      std::vector<std::string> audiences) {
    auto entry = registry_->ForSpiffeId(spiffe_id);
    TaskRequest request{
        .purpose = "fix the build", .scopes = std::move(scopes), .audiences = std::move(audiences)};
    auto task = tasks_->Declare(spiffe_id, entry.at(0).scopes, request);
    EXPECT_TRUE(task.ok()) << task.status();
    return task->id;
  }

  std::string JwtSvid(const std::string& entry_id = "e1",
                      std::vector<std::string> audiences = {kIssuer}) {
    auto entry = registry_->Get(entry_id);
    EXPECT_TRUE(entry.ok());
    auto svid = minter_->JwtSvid(entry->spiffe_id, audiences, 300);
    EXPECT_TRUE(svid.ok()) << svid.status();
    return svid->token;
  }

  std::string Proof(std::string_view htm = "POST", std::string_view htu = kTokenUrl,
                    int64_t iat = kNow, std::string_view nonce = "") {
    return *dpop::CreateProof(dpop_key_, htm, htu, iat, "", nonce);
  }

  std::vector<std::pair<std::string, std::string>> Params() {
    return {{"grant_type", kTokenExchangeGrantType},
            {"subject_token", JwtSvid()},
            {"subject_token_type", kJwtTokenType},
            {"task_id", task_id_},
            {"audience", "https://api.example.org"}};
  }

  static std::vector<std::pair<std::string, std::string>> With(
      std::vector<std::pair<std::string, std::string>> params, const std::string& name,
      std::optional<std::string> value) {
    std::erase_if(params, [&](const auto& p) { return p.first == name; });
    if (value) params.emplace_back(name, *value);
    return params;
  }

  TokenResponse Post(const std::vector<std::pair<std::string, std::string>>& params,
                     std::vector<std::string> proofs) {
    return endpoint_->Handle(TokenRequest{
        .content_type = kForm, .body = FormEncode(params), .dpop_headers = std::move(proofs)});
  }
  TokenResponse Post(const std::vector<std::pair<std::string, std::string>>& params) {
    return Post(params, {Proof()});
  }

  // A refusal: the status, the OAuth error code, and no token in the body.
  static void ExpectError(const TokenResponse& response, const std::string& error,
                          const std::string& description_part = "", int status = 400) {
    EXPECT_EQ(response.status, status) << response.body;
    json body = json::parse(response.body);
    EXPECT_EQ(body.value("error", ""), error) << response.body;
    EXPECT_FALSE(body.contains("access_token"));
    EXPECT_THAT(body.value("error_description", ""), HasSubstr(description_part));
  }

  // The verified payload of an issued token.
  json VerifiedToken(const std::string& token) {
    auto jws = jose::ParseCompact(token);
    EXPECT_TRUE(jws.ok());
    EXPECT_EQ(jws->header["typ"], "at+jwt");
    EXPECT_TRUE(jose::VerifySignature(*jws, authority_->jwt_public_key()).ok());
    return jws->payload;
  }

  TempDir dir_;
  FakeClock clock_{kNow};
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<TrustAuthority> authority_;
  std::unique_ptr<EntryRegistry> registry_;
  std::unique_ptr<AuditLog> audit_;
  std::unique_ptr<Minter> minter_;
  std::unique_ptr<NodeAuthenticator> nodes_;
  std::unique_ptr<TaskRegistry> tasks_;
  dpop::ReplayCache cache_;
  const policy::PolicyChain* policy_ = nullptr;
  Stack main_;
  std::unique_ptr<TokenEndpoint> endpoint_;
  crypto::PrivateKey dpop_key_ = *crypto::PrivateKey::GenerateP256();
  std::string task_id_;
};

TEST_F(TokenEndpointTest, ExchangesAJwtSvidForADpopBoundTaskToken) {
  TokenResponse response = Post(Params());
  ASSERT_EQ(response.status, 200) << response.body;
  json body = json::parse(response.body);
  EXPECT_EQ(body["token_type"], "DPoP");
  EXPECT_EQ(body["issued_token_type"], kAccessTokenType);
  // The entry's token TTL (120 s) applies.
  EXPECT_EQ(body["expires_in"], 120);
  // No scope was asked for, so the answer says what was granted: the task's scopes.
  EXPECT_EQ(body["scope"], "read write");
  json claims = VerifiedToken(body["access_token"]);
  EXPECT_EQ(claims["iss"], kIssuer);
  EXPECT_EQ(claims["sub"], kBot);
  EXPECT_EQ(claims["client_id"], kBot);
  EXPECT_EQ(claims["aud"], "https://api.example.org");
  EXPECT_EQ(claims["scope"], "read write");
  EXPECT_EQ(claims["task"]["id"], task_id_);
  EXPECT_EQ(claims["cnf"]["jkt"], *jose::JwkThumbprint(dpop_key_.public_key()));
  EXPECT_TRUE(response.dpop_nonce.empty());
}

TEST_F(TokenEndpointTest, NarrowsToTheRequestedScopeAndOmitsScopeWhenUnchanged) {
  TokenResponse response = Post(With(Params(), "scope", "write"));
  ASSERT_EQ(response.status, 200) << response.body;
  json body = json::parse(response.body);
  EXPECT_FALSE(body.contains("scope"));
  EXPECT_EQ(VerifiedToken(body["access_token"])["scope"], "write");
}

TEST_F(TokenEndpointTest, AudienceDefaultsToTheTasksOnlyAudience) {
  TokenResponse response = Post(With(Params(), "audience", std::nullopt));
  ASSERT_EQ(response.status, 200) << response.body;
  EXPECT_EQ(VerifiedToken(json::parse(response.body)["access_token"])["aud"],
            "https://api.example.org");
  std::string two = Declare(kBot, {"read"}, {"https://a.example", "https://b.example"});
  ExpectError(Post(With(With(Params(), "task_id", two), "audience", std::nullopt)),
              "invalid_request", "audience is required");
}

TEST_F(TokenEndpointTest, AJwtSvidMayBePresentedManyTimesButEachProofOnce) {
  std::string svid = JwtSvid();
  auto params = With(Params(), "subject_token", svid);
  EXPECT_EQ(Post(params, {Proof()}).status, 200);
  EXPECT_EQ(Post(params, {Proof()}).status, 200);
  std::string proof = Proof();
  EXPECT_EQ(Post(params, {proof}).status, 200);
  ExpectError(Post(params, {proof}), "invalid_dpop_proof", "replayed");
}

TEST_F(TokenEndpointTest, SharesTheReplayCacheWithTheWorkloadApiPath) {
  // A proof first accepted on the Workload API path (same cache) is refused here.
  std::string proof = Proof();
  dpop::VerifyOptions options;
  options.htm = "POST";
  options.htu = kTokenUrl;
  options.now = kNow;
  ASSERT_TRUE(dpop::VerifyProof(proof, options, &cache_).ok());
  ExpectError(Post(Params(), {proof}), "invalid_dpop_proof", "replayed");
}

TEST_F(TokenEndpointTest, RefusesMalformedRequests) {
  auto bad_type = endpoint_->Handle(TokenRequest{
      .content_type = "application/json", .body = FormEncode(Params()), .dpop_headers = {Proof()}});
  ExpectError(bad_type, "invalid_request", "Content-Type");
  auto with_charset =
      endpoint_->Handle(TokenRequest{.content_type = "Application/X-WWW-Form-Urlencoded; "
                                                     "charset=UTF-8",
                                     .body = FormEncode(Params()),
                                     .dpop_headers = {Proof()}});
  EXPECT_EQ(with_charset.status, 200) << with_charset.body;
  auto query = endpoint_->Handle(TokenRequest{.content_type = kForm,
                                              .body = FormEncode(Params()),
                                              .has_query = true,
                                              .dpop_headers = {Proof()}});
  ExpectError(query, "invalid_request", "body");
  auto bad_escape = endpoint_->Handle(TokenRequest{
      .content_type = kForm, .body = FormEncode(Params()) + "&x=%zz", .dpop_headers = {Proof()}});
  ExpectError(bad_escape, "invalid_request", "percent");
  auto repeated = Params();
  repeated.emplace_back("task_id", task_id_);
  ExpectError(Post(repeated), "invalid_request", "task_id is repeated");
  ExpectError(Post(With(Params(), "grant_type", std::nullopt)), "invalid_request", "grant_type");
  ExpectError(Post(With(Params(), "grant_type", "client_credentials")), "unsupported_grant_type");
  ExpectError(Post(With(Params(), "subject_token", std::nullopt)), "invalid_request",
              "subject_token");
  ExpectError(
      Post(With(Params(), "subject_token_type", "urn:ietf:params:oauth:token-type:id_token")),
      "invalid_request", "subject_token_type");
  ExpectError(Post(With(Params(), "requested_token_type", kJwtTokenType)), "invalid_request",
              "requested_token_type");
  ExpectError(Post(With(Params(), "actor_token", JwtSvid())), "invalid_request", "actor_token");
  ExpectError(Post(With(Params(), "task_id", std::nullopt)), "invalid_request", "task_id");
  // Unknown parameters are ignored (RFC 6749 §3.1).
  EXPECT_EQ(Post(With(Params(), "client_id", "whatever")).status, 200);
  // Nothing consumed a proof slot except the two accepted requests.
  EXPECT_EQ(cache_.size(), 2u);
}

TEST_F(TokenEndpointTest, RefusesMissingOrRepeatedDpopHeader) {
  ExpectError(Post(Params(), {}), "invalid_dpop_proof", "missing DPoP header");
  ExpectError(Post(Params(), {Proof(), Proof()}), "invalid_dpop_proof", "more than one");
}

TEST_F(TokenEndpointTest, RefusesSubjectTokensThatAreNotThisBrokersJwtSvidForIt) {
  ExpectError(Post(With(Params(), "subject_token", JwtSvid("e1", {"https://api.example.org"}))),
              "invalid_request", "audience");
  // Also addressed to another service: that service could exchange it in the workload's name.
  ExpectError(
      Post(With(Params(), "subject_token", JwtSvid("e1", {kIssuer, "https://api.example.org"}))),
      "invalid_request", "audience");
  // A task token is not a JWT-SVID.
  json first = json::parse(Post(Params()).body);
  ExpectError(Post(With(Params(), "subject_token", first["access_token"].get<std::string>())),
              "invalid_request", "typ");
  // Same claims, signed by another key.
  auto other_key = *crypto::PrivateKey::GenerateP256();
  json header = {{"alg", "ES256"}, {"kid", authority_->jwt_key_id()}, {"typ", "JWT"}};
  json claims = {{"sub", kBot}, {"aud", kIssuer}, {"exp", kNow + 60}, {"iat", kNow}};
  ExpectError(Post(With(Params(), "subject_token", Sign(other_key, header, claims))),
              "invalid_request", "signature");
  // Tampered payload.
  std::string svid = JwtSvid();
  size_t dot = svid.find('.');
  svid[dot + 5] = svid[dot + 5] == 'A' ? 'B' : 'A';
  ExpectError(Post(With(Params(), "subject_token", svid)), "invalid_request");
  ExpectError(Post(With(Params(), "subject_token", "not-a-jwt")), "invalid_request");
}

TEST_F(TokenEndpointTest, RefusesExpiredJwtSvidsAndIdentitiesNoLongerRegistered) {
  std::string svid = JwtSvid();
  clock_.Advance(301);  // the default JWT-SVID lifetime is 300 s
  ExpectError(Post(With(Params(), "subject_token", svid), {Proof("POST", kTokenUrl, kNow + 301)}),
              "invalid_request", "expired");
  clock_.Set(kNow);
  auto params = Params();  // with a fresh JWT-SVID
  ASSERT_TRUE(registry_->Delete("e1").ok());
  ExpectError(Post(params), "invalid_request", "no registration entry");
}

TEST_F(TokenEndpointTest, RefusesUnusableTasksAsInvalidGrant) {
  ExpectError(Post(With(Params(), "task_id", "task_unknown")), "invalid_grant", "not found");
  // Another identity's task looks exactly like an unknown one.
  std::string others = Declare(kOther, {"read"}, {"https://api.example.org"});
  ExpectError(Post(With(Params(), "task_id", others)), "invalid_grant", "not found");
  std::string ended = Declare(kBot, {"read"}, {"https://api.example.org"});
  ASSERT_TRUE(tasks_->End(kBot, ended).ok());
  ExpectError(Post(With(Params(), "task_id", ended)), "invalid_grant", "ended");
  clock_.Advance(901);  // past the 15-minute default task lifetime
  ExpectError(Post(With(With(Params(), "subject_token", JwtSvid()), "task_id", task_id_),
                   {Proof("POST", kTokenUrl, kNow + 901)}),
              "invalid_grant", "expired");
}

TEST_F(TokenEndpointTest, RefusesAudienceAndScopeOutsideTheTask) {
  ExpectError(Post(With(Params(), "audience", "https://evil.example")), "invalid_target");
  auto two_audiences = Params();
  two_audiences.emplace_back("audience", "https://api.example.org");
  ExpectError(Post(two_audiences), "invalid_target", "one audience");
  ExpectError(Post(With(Params(), "resource", "https://api.example.org")), "invalid_target");
  // "deploy" is entitled by the entry but not part of the task.
  ExpectError(Post(With(Params(), "scope", "read deploy")), "invalid_scope");
  ExpectError(Post(With(Params(), "scope", "admin")), "invalid_scope");
  ExpectError(Post(With(Params(), "scope", "re\"ad")), "invalid_scope", "malformed");
  ExpectError(Post(With(Params(), "scope", "   ")), "invalid_scope");
  EXPECT_EQ(cache_.size(), 0u);
}

TEST_F(TokenEndpointTest, RefusesEveryKindOfBadProof) {
  json header = {{"typ", "dpop+jwt"}, {"alg", "ES256"}};
  header["jwk"] = *jose::PublicKeyToJwk(dpop_key_.public_key());
  json claims = {
      {"jti", "0123456789abcdefghij"}, {"htm", "POST"}, {"htu", kTokenUrl}, {"iat", kNow}};
  auto unsigned_with = [&](const std::string& alg) {
    json h = header;
    h["alg"] = alg;
    return jose::Base64UrlEncode(h.dump()) + "." + jose::Base64UrlEncode(claims.dump()) + "." +
           jose::Base64UrlEncode(std::string(32, 'x'));
  };
  ExpectError(Post(Params(), {unsigned_with("none")}), "invalid_dpop_proof");
  ExpectError(Post(Params(), {unsigned_with("HS256")}), "invalid_dpop_proof");
  json with_private = header;
  with_private["jwk"]["d"] = jose::Base64UrlEncode(std::string(32, '\x01'));
  ExpectError(Post(Params(), {Sign(dpop_key_, with_private, claims)}), "invalid_dpop_proof",
              "private");
  ExpectError(Post(Params(), {Proof("GET")}), "invalid_dpop_proof", "htm");
  ExpectError(Post(Params(), {Proof("POST", "https://broker.example.org/other")}),
              "invalid_dpop_proof", "htu");
  ExpectError(Post(Params(), {Proof("POST", kTokenUrl, kNow - 61)}), "invalid_dpop_proof", "iat");
  ExpectError(Post(Params(), {Proof("POST", kTokenUrl, kNow + 6)}), "invalid_dpop_proof", "iat");
  // Bound to some access token: not a token-request proof.
  ExpectError(Post(Params(), {*dpop::CreateProof(dpop_key_, "POST", kTokenUrl, kNow, "tok")}),
              "invalid_dpop_proof", "ath");
  // Made before this broker started: its replay cache cannot know it.
  clock_.Advance(30);
  ExpectError(Post(Params(), {Proof("POST", kTokenUrl, kNow - 20)}), "invalid_dpop_proof");
  EXPECT_EQ(cache_.size(), 0u);
}

TEST_F(TokenEndpointTest, NonceModeAsksForTheNonceThenAcceptsItAndRotates) {
  DpopNonceSource nonces(clock_, 60);
  endpoint_ = MakeEndpoint(&nonces);
  TokenResponse first = Post(Params());
  ExpectError(first, "use_dpop_nonce");
  ASSERT_FALSE(first.dpop_nonce.empty());
  TokenResponse second = Post(Params(), {Proof("POST", kTokenUrl, kNow, first.dpop_nonce)});
  ASSERT_EQ(second.status, 200) << second.body;
  EXPECT_EQ(second.dpop_nonce, first.dpop_nonce);
  // One rotation later the previous nonce still works; two rotations later it does not.
  clock_.Advance(61);
  EXPECT_EQ(Post(Params(), {Proof("POST", kTokenUrl, kNow + 61, first.dpop_nonce)}).status, 200);
  clock_.Advance(61);
  TokenResponse stale = Post(Params(), {Proof("POST", kTokenUrl, kNow + 122, first.dpop_nonce)});
  ExpectError(stale, "use_dpop_nonce");
  EXPECT_NE(stale.dpop_nonce, first.dpop_nonce);
  EXPECT_EQ(Post(Params(), {Proof("POST", kTokenUrl, kNow + 122, stale.dpop_nonce)}).status, 200);
}

// ---------------------------------------------------------------------------- replay cache

// Replays the red-team lock-out through /token: one identity's stream of legitimate requests
// used to fill the one shared replay cache until every other identity got "replay cache is
// full". Now that identity is charged to its own share (whatever keys it uses) and answered 503
// temporarily_unavailable, never a proof error, and the others keep working.
TEST_F(TokenEndpointTest, OneIdentityUsingUpItsReplayShareCannotLockAnotherOut) {
  dpop::ReplayCache small(64, 4);
  Stack endpoint = MakeStack(small, kNow - 10);
  auto post = [&](const std::vector<std::pair<std::string, std::string>>& params,
                  const std::string& proof) {
    return endpoint.Handle(
        TokenRequest{.content_type = kForm, .body = FormEncode(params), .dpop_headers = {proof}});
  };
  for (int i = 0; i < 4; ++i) ASSERT_EQ(post(Params(), Proof()).status, 200) << i;
  TokenResponse over = post(Params(), Proof());
  ExpectError(over, "temporarily_unavailable", "share", 503);
  // A new key does not buy the same identity a new share.
  auto other_key = *crypto::PrivateKey::GenerateP256();
  ExpectError(post(Params(), *dpop::CreateProof(other_key, "POST", kTokenUrl, kNow)),
              "temporarily_unavailable", "share", 503);
  // Another identity is served.
  std::string others_task = Declare(kOther, {"read"}, {"https://api.example.org"});
  auto others = With(With(Params(), "subject_token", JwtSvid("e2")), "task_id", others_task);
  TokenResponse served = post(others, *dpop::CreateProof(other_key, "POST", kTokenUrl, kNow));
  EXPECT_EQ(served.status, 200) << served.body;
  // Once the flood's proofs expire, the first identity is served again.
  clock_.Advance(61);
  auto later = With(Params(), "subject_token", JwtSvid());
  EXPECT_EQ(post(later, Proof("POST", kTokenUrl, kNow + 61)).status, 200);
}

TEST_F(TokenEndpointTest, AFullReplayCacheAnswers503TemporarilyUnavailable) {
  dpop::ReplayCache tiny(1, 1);
  Stack endpoint = MakeStack(tiny, kNow - 10);
  auto post = [&](const std::vector<std::pair<std::string, std::string>>& params) {
    return endpoint.Handle(
        TokenRequest{.content_type = kForm, .body = FormEncode(params), .dpop_headers = {Proof()}});
  };
  ASSERT_EQ(post(Params()).status, 200);
  std::string others_task = Declare(kOther, {"read"}, {"https://api.example.org"});
  ExpectError(post(With(With(Params(), "subject_token", JwtSvid("e2")), "task_id", others_task)),
              "temporarily_unavailable", "full", 503);
}

// Issue item 7: a proof dated into the future (within the allowed skew) that the previous
// instance accepted is refused by a broker started right after, whose replay cache is empty.
TEST_F(TokenEndpointTest, ARestartedBrokerRefusesAFutureDatedProofTheLastOneAccepted) {
  std::string proof = Proof("POST", kTokenUrl, kNow + 4);  // future skew 5 s, minus one
  ASSERT_EQ(Post(Params(), {proof}).status, 200);
  // The restart: same data, a new process with an empty cache, started now.
  dpop::ReplayCache empty;
  Stack restarted = MakeStack(empty, kNow);
  auto post = [&](int64_t now, const std::string& dpop) {
    clock_.Set(now);
    return restarted.Handle(
        TokenRequest{.content_type = kForm, .body = FormEncode(Params()), .dpop_headers = {dpop}});
  };
  // While the window is open every proof is refused, retryably.
  ExpectError(post(kNow, proof), "temporarily_unavailable", "restarted", 503);
  ExpectError(post(kNow + 2, Proof("POST", kTokenUrl, kNow + 2)), "temporarily_unavailable",
              "retry with a new proof in 4 s", 503);
  // After it, the replay is refused for good and fresh proofs are served.
  ExpectError(post(kNow + 6, proof), "invalid_dpop_proof", "before the verifier restarted");
  EXPECT_EQ(post(kNow + 6, Proof("POST", kTokenUrl, kNow + 6)).status, 200);
  // A broker with a new data directory has no previous instance: started_at 0, no window.
  dpop::ReplayCache fresh_cache;
  Stack fresh = MakeStack(fresh_cache, 0);
  clock_.Set(kNow + 6);
  EXPECT_EQ(fresh
                .Handle(TokenRequest{.content_type = kForm,
                                     .body = FormEncode(Params()),
                                     .dpop_headers = {Proof("POST", kTokenUrl, kNow + 6)}})
                .status,
            200);
}

// Issue item 11: a proof or subject token repeating a member name is refused, whichever value
// would have been read.
TEST_F(TokenEndpointTest, RefusesProofsWithDuplicateMemberNames) {
  json jwk = *jose::PublicKeyToJwk(dpop_key_.public_key());
  const std::string header = R"({"typ":"dpop+jwt","alg":"ES256","jwk":)" + jwk.dump() + "}";
  const std::string claims =
      absl::StrCat(R"({"jti":"0123456789abcdefghij","htm":"GET",)", R"("htm":"POST","htu":")",
                   kTokenUrl, R"(","iat":)", kNow, "}");
  auto signed_proof = jose::SignCompact(dpop_key_, jose::Algorithm::kES256, header, claims);
  ASSERT_TRUE(signed_proof.ok());
  ExpectError(Post(Params(), {*signed_proof}), "invalid_dpop_proof", "duplicate member name");
  std::string doubled_typ = header;
  doubled_typ.insert(1, R"("typ":"JWT",)");
  auto typ_proof =
      jose::SignCompact(dpop_key_, jose::Algorithm::kES256, doubled_typ,
                        absl::StrCat(R"({"jti":"0123456789abcdefghij","htm":"POST","htu":")",
                                     kTokenUrl, R"(","iat":)", kNow, "}"));
  ExpectError(Post(Params(), {*typ_proof}), "invalid_dpop_proof", "duplicate member name");
  EXPECT_EQ(cache_.size(), 0u);
}

TEST_F(TokenEndpointTest, AnIdentityWhoseNodeIsBannedOrEvictedGetsNoToken) {
  ASSERT_TRUE(store_->SetNodeBanned(kNode, true).ok());
  ExpectError(Post(Params()), "invalid_grant", "no attested node");
  ASSERT_TRUE(store_->DeleteNode(kNode).ok());
  ExpectError(Post(Params()), "invalid_grant", "no attested node");
}

TEST_F(TokenEndpointTest, AnEmptyAudienceMeansTheTasksOnlyOne) {
  TokenResponse response = Post(With(Params(), "audience", ""));
  EXPECT_EQ(response.status, 200) << response.body;
}

// Garbage from callers that proved nothing is audited within a budget, then only counted.
TEST_F(TokenEndpointTest, RefusalsOfAnonymousCallersAreAuditedWithinABudget) {
  metrics::BrokerMetrics metrics;
  dpop::ReplayCache cache;
  Stack stack = MakeStack(cache, kNow - 10);
  issuance::PipelineDeps deps{.minter = minter_.get(),
                              .nodes = nodes_.get(),
                              .entries = registry_.get(),
                              .tasks = tasks_.get(),
                              .exchange = stack.exchange.get(),
                              .audit = audit_.get(),
                              .store = store_.get(),
                              .metrics = &metrics,
                              .clock = &clock_};
  issuance::IssuancePipeline pipeline(deps);
  TokenEndpoint endpoint(pipeline);
  const size_t before = store_->ListAuditRecords({})->size();
  for (int i = 0; i < 400; ++i) {
    TokenResponse r = endpoint.Handle(TokenRequest{.content_type = "text/plain", .body = "x"});
    ASSERT_EQ(r.status, 400);
  }
  const size_t audited = store_->ListAuditRecords({})->size() - before;
  EXPECT_GE(audited, 200u);
  EXPECT_LT(audited, 400u);
  EXPECT_THAT(metrics.Render(), HasSubstr("mandate_audit_refusals_unrecorded_total"));
  EXPECT_THAT(metrics.Render(),
              ::testing::Not(HasSubstr("mandate_audit_refusals_unrecorded_total 0")));
}

TEST(ParseFormUrlEncodedTest, DecodesAndKeepsOrderAndRepetitions) {
  auto form = ParseFormUrlEncoded("a=1&b=x+y%2Bz&&a=%E2%9C%93&flag");
  ASSERT_TRUE(form.ok()) << form.status();
  std::vector<std::pair<std::string, std::string>> expected = {
      {"a", "1"}, {"b", "x y+z"}, {"a", "\xE2\x9C\x93"}, {"flag", ""}};
  EXPECT_EQ(*form, expected);
}

TEST(ParseFormUrlEncodedTest, RefusesMalformedInput) {
  for (const char* body : {"a=%", "a=%4", "a=%zz", "a=%00", "%G1=x"}) {
    EXPECT_EQ(ParseFormUrlEncoded(body).status().code(), absl::StatusCode::kInvalidArgument)
        << body;
  }
  std::string many;
  for (int i = 0; i < 65; ++i) many += "a=b&";
  EXPECT_FALSE(ParseFormUrlEncoded(many).ok());
  EXPECT_TRUE(ParseFormUrlEncoded(many, 65).ok());
}

TEST(TokenEndpointUrlTest, AppendsTokenToTheIssuer) {
  EXPECT_EQ(TokenEndpointUrl("https://b.example"), "https://b.example/token");
  EXPECT_EQ(TokenEndpointUrl("https://b.example/"), "https://b.example/token");
}

}  // namespace
}  // namespace mandate::broker
