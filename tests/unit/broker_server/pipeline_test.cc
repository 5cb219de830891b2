// The issuance pipeline: every kind goes through authorise -> policy -> narrow -> mint -> record,
// refusals are audited once with their step, and nothing leaves without its record.
#include "broker/server/issuance/pipeline.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "broker/common/crypto/keys.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/jose/jose.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker::issuance {
namespace {

using ::testing::HasSubstr;
using testing::OpenStore;
using testing::TempDir;
using json = nlohmann::json;

constexpr int64_t kNow = 1'800'000'000;
constexpr char kIssuer[] = "https://broker.example.org";
constexpr char kTokenUrl[] = "https://broker.example.org/token";
constexpr char kNode[] = "spiffe://example.org/node/join/n1";
constexpr char kOtherNode[] = "spiffe://example.org/node/join/n2";
constexpr char kBot[] = "spiffe://example.org/agent/bot";
constexpr char kApi[] = "https://api.example.org";

// A policy hook the test controls: it records every input and answers what it is told.
class ScriptedHook : public policy::PolicyHook {
 public:
  std::string_view name() const override { return "scripted"; }
  absl::StatusOr<policy::PolicyDecision> Check(const policy::PolicyInput& input,
                                               std::chrono::steady_clock::time_point) override {
    std::function<void()> during;
    absl::StatusOr<policy::PolicyDecision> answer = absl::UnknownError("");
    {
      std::lock_guard<std::mutex> lock(mu_);
      inputs_.push_back(input);
      during = during_;
      answer = answer_;
    }
    if (during) during();
    return answer;
  }
  void Answer(absl::StatusOr<policy::PolicyDecision> answer) {
    std::lock_guard<std::mutex> lock(mu_);
    answer_ = std::move(answer);
  }
  // Runs during every Check (to change the world while the hook decides).
  void During(std::function<void()> action) {
    std::lock_guard<std::mutex> lock(mu_);
    during_ = std::move(action);
  }
  std::vector<policy::PolicyInput> inputs() {
    std::lock_guard<std::mutex> lock(mu_);
    return inputs_;
  }

 private:
  std::mutex mu_;
  absl::StatusOr<policy::PolicyDecision> answer_ = policy::PolicyDecision{.allow = true};
  std::vector<policy::PolicyInput> inputs_;
  std::function<void()> during_;
};

class PipelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = OpenStore(dir_);
    auto authority = TrustAuthority::LoadOrCreate(
        {.data_dir = dir_.path(), .trust_domain = *spiffe::TrustDomain::Parse("example.org")},
        clock_);
    ASSERT_TRUE(authority.ok()) << authority.status();
    authority_ = std::move(*authority);
    registry_ = std::move(EntryRegistry::Load(*store_)).value();
    store::RegistrationEntry entry;
    entry.id = "e1";
    entry.spiffe_id = kBot;
    entry.parent_id = kNode;
    entry.selectors = {"unix:uid:1000"};
    entry.scopes = {"read", "write"};
    entry.jwt_ttl_s = 120;
    ASSERT_TRUE(registry_->Create(entry).ok());
    audit_ = testing::OpenAuditLog(*store_, clock_);
    minter_ = std::make_unique<Minter>(*authority_, clock_, IssuerDefaults{.issuer_url = kIssuer});
    nodes_ = std::make_unique<NodeAuthenticator>(*authority_, *store_, clock_);
    tasks_ = std::make_unique<TaskRegistry>(*store_, *audit_, clock_, TaskLimits{});
    exchange_ = std::make_unique<TaskTokenExchange>(
        *authority_, *registry_, *tasks_, *store_, clock_,
        ExchangeOptions{.issuer_url = kIssuer, .proof = {.replay_cache = &cache_}});
    hook_ = std::make_shared<ScriptedHook>();
    chain_ =
        std::make_unique<policy::PolicyChain>(std::vector<policy::HookBinding>{{.hook = hook_}},
                                              std::chrono::milliseconds(500), &metrics_);
    pipeline_ = MakePipeline(*audit_);
    node_pem_ = AttestNode(kNode);
  }

  std::unique_ptr<IssuancePipeline> MakePipeline(AuditLog& audit) {
    return std::make_unique<IssuancePipeline>(PipelineDeps{.minter = minter_.get(),
                                                           .nodes = nodes_.get(),
                                                           .entries = registry_.get(),
                                                           .tasks = tasks_.get(),
                                                           .exchange = exchange_.get(),
                                                           .policy = chain_.get(),
                                                           .audit = &audit,
                                                           .store = store_.get(),
                                                           .metrics = &metrics_,
                                                           .clock = &clock_});
  }

  // A node as attestation leaves it: an SVID from our CA and its row in the store.
  std::string AttestNode(const std::string& node_id) {
    auto key = crypto::PrivateKey::GenerateP256();
    auto cert = minter_->NodeSvid(key->public_key(), node_id, 3600);
    EXPECT_TRUE(cert.ok());
    store::AttestedNode node{.spiffe_id = node_id,
                             .attestor = "join_token",
                             .selectors = {"join_token:n1"},
                             .cert_serial = cert->SerialHex(),
                             .cert_expires_at = cert->not_after(),
                             .created_at = kNow,
                             .updated_at = kNow};
    EXPECT_TRUE(store_->UpsertNode(node).ok());
    return cert->Pem();
  }

  static std::string Csr(const std::string& id = "") {
    auto key = crypto::PrivateKey::GenerateP256();
    return *crypto::CreateCsrDer(*key, id);
  }

  std::string DeclareTask() {
    auto task = pipeline_->DeclareTask(
        {.client_pem = node_pem_,
         .entry_id = "e1",
         .task = {.purpose = "triage", .scopes = {"read", "write"}, .audiences = {kApi}}});
    EXPECT_TRUE(task.ok()) << (task.ok() ? "" : task.refusal().status.ToString());
    return task.ok() ? task->task.id : "";
  }

  TaskTokenRequest TokenRequest(const std::string& task_id) {
    TaskTokenRequest request{.client_pem = node_pem_};
    request.ask.entry_id = "e1";
    request.ask.task_id = task_id;
    request.ask.dpop_proof = *dpop::CreateProof(dpop_key_, "POST", kTokenUrl, kNow);
    return request;
  }

  std::vector<store::AuditRecord> AuditRecords() {
    return std::move(store_->ListAuditRecords({})).value();
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
  std::unique_ptr<TaskTokenExchange> exchange_;
  std::shared_ptr<ScriptedHook> hook_;
  metrics::BrokerMetrics metrics_;
  std::unique_ptr<policy::PolicyChain> chain_;
  std::unique_ptr<IssuancePipeline> pipeline_;
  std::string node_pem_;
  crypto::PrivateKey dpop_key_ = *crypto::PrivateKey::GenerateP256();
};

// ---- every kind goes through the hook, with the whole context ----

TEST_F(PipelineTest, EveryIssuanceKindIsDecidedByTheHook) {
  ASSERT_TRUE(pipeline_->IssueNodeSvid({.client_pem = node_pem_, .csr_der = Csr()}).ok());
  ASSERT_TRUE(
      pipeline_
          ->IssueNodeSvid(
              {.attestor = "join_token",
               .attestation = attestors::NodeAttestationResult{kOtherNode, {"join_token:n2"}},
               .csr_der = Csr()})
          .ok());
  ASSERT_TRUE(pipeline_->IssueX509Svids({.client_pem = node_pem_, .items = {{"e1", Csr()}}}).ok());
  ASSERT_TRUE(
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {kApi}})
          .ok());
  const std::string task_id = DeclareTask();
  auto token = pipeline_->IssueTaskToken(TokenRequest(task_id));
  ASSERT_TRUE(token.ok()) << token.refusal().status;

  std::multiset<policy::IssuanceKind> seen;
  for (const auto& input : hook_->inputs()) seen.insert(input.kind);
  // token_exchange (delegation) is refused before any decision until delegation lands.
  for (policy::IssuanceKind kind :
       {policy::IssuanceKind::kNodeSvid, policy::IssuanceKind::kX509Svid,
        policy::IssuanceKind::kJwtSvid, policy::IssuanceKind::kTask,
        policy::IssuanceKind::kTaskToken}) {
    EXPECT_GE(seen.count(kind), 1u) << policy::IssuanceKindName(kind);
  }
  EXPECT_EQ(seen.count(policy::IssuanceKind::kNodeSvid), 2u);

  // The input document carries who, what, why and when.
  auto inputs = hook_->inputs();
  const policy::PolicyInput& jwt = inputs[3];
  EXPECT_EQ(jwt.kind, policy::IssuanceKind::kJwtSvid);
  EXPECT_EQ(jwt.spiffe_id, kBot);
  EXPECT_EQ(jwt.node_id, kNode);
  EXPECT_EQ(jwt.selectors, std::vector<std::string>{"unix:uid:1000"});
  EXPECT_EQ(jwt.audience, std::vector<std::string>{kApi});
  EXPECT_EQ(jwt.ttl_seconds, 120);
  EXPECT_EQ(jwt.time, kNow);
  const policy::PolicyInput& declared = inputs[4];
  ASSERT_TRUE(declared.task.has_value());
  EXPECT_EQ(declared.task->purpose, "triage");
  EXPECT_EQ(declared.scopes, (std::vector<std::string>{"read", "write"}));
  const policy::PolicyInput& tt = inputs[5];
  ASSERT_TRUE(tt.task.has_value());
  EXPECT_EQ(tt.task->id, task_id);
  EXPECT_EQ(tt.audience, std::vector<std::string>{kApi});
  EXPECT_EQ(tt.ttl_seconds, 300);
  json doc = policy::PolicyInputJson(tt);
  EXPECT_EQ(doc["kind"], "task_token");
  EXPECT_EQ(doc["time"], "2027-01-15T08:00:00Z");
  EXPECT_EQ(doc["task"]["id"], task_id);
}

TEST_F(PipelineTest, AHookDenyingEverythingLeavesNothingMintedAndEverythingAudited) {
  // Declare the task first, so the token request reaches the hook.
  const std::string task_id = DeclareTask();
  const size_t before = AuditRecords().size();
  hook_->Answer(policy::PolicyDecision{.allow = false, .reason = "not today"});

  std::vector<Refusal> refusals;
  auto collect = [&](const auto& result) {
    ASSERT_FALSE(result.ok());
    refusals.push_back(result.refusal());
  };
  collect(pipeline_->IssueNodeSvid({.client_pem = node_pem_, .csr_der = Csr()}));
  collect(pipeline_->IssueNodeSvid({.attestor = "join_token",
                                    .attestation = attestors::NodeAttestationResult{kOtherNode, {}},
                                    .csr_der = Csr()}));
  collect(pipeline_->IssueX509Svids({.client_pem = node_pem_, .items = {{"e1", Csr()}}}));
  collect(
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {kApi}}));
  collect(
      pipeline_->DeclareTask({.client_pem = node_pem_,
                              .entry_id = "e1",
                              .task = {.purpose = "p", .scopes = {"read"}, .audiences = {kApi}}}));
  collect(pipeline_->IssueTaskToken(TokenRequest(task_id)));
  for (const Refusal& r : refusals) {
    EXPECT_EQ(r.step, Step::kPolicy);
    EXPECT_EQ(r.status.code(), absl::StatusCode::kPermissionDenied);
    EXPECT_THAT(std::string(r.status.message()), HasSubstr("not today"));
  }
  EXPECT_EQ(refusals.back().oauth_error, "invalid_grant");

  auto records = AuditRecords();
  ASSERT_EQ(records.size(), before + refusals.size());
  for (size_t i = before; i < records.size(); ++i) {
    EXPECT_EQ(records[i].outcome, "denied") << records[i].event;
    json detail = json::parse(records[i].detail);
    EXPECT_EQ(detail["step"], "policy");
    EXPECT_THAT(detail["reason"].get<std::string>(), HasSubstr("not today"));
    EXPECT_EQ(detail["hook"], "scripted");
  }
  // The refused node was not recorded as attested; the refused task was not stored.
  EXPECT_TRUE(absl::IsNotFound(store_->GetNode(kOtherNode).status()));
  EXPECT_EQ(store_->ListTasks(kBot, false)->size(), 1u);
  EXPECT_THAT(metrics_.Render(),
              HasSubstr(R"(mandate_policy_decisions_total{kind="jwt_svid",outcome="deny"} 1)"));
}

TEST_F(PipelineTest, AHookThatCannotDecideDeniesAndIsCountedApart) {
  hook_->Answer(absl::UnavailableError("connection refused"));
  auto jwt =
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {kApi}});
  ASSERT_FALSE(jwt.ok());
  EXPECT_TRUE(jwt.refusal().policy_error);
  // Denied, as a temporary condition: the caller may retry once the hook is back.
  EXPECT_EQ(jwt.refusal().status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(jwt.refusal().status.message()), HasSubstr("could not decide"));
  json detail = json::parse(AuditRecords().back().detail);
  EXPECT_EQ(detail["policy_error"], true);
  std::string metrics = metrics_.Render();
  EXPECT_THAT(metrics,
              HasSubstr(R"(mandate_policy_decisions_total{kind="jwt_svid",outcome="error"} 1)"));
  EXPECT_THAT(metrics, HasSubstr(R"(mandate_issuances_total{kind="jwt_svid",outcome="error"} 1)"));
}

TEST_F(PipelineTest, TheHookCapsTtlAndNarrowsScopesButNeverWidens) {
  hook_->Answer(policy::PolicyDecision{
      .allow = true, .ttl_max = 30, .scopes = std::vector<std::string>{"read", "admin"}});
  auto jwt =
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {kApi}});
  ASSERT_TRUE(jwt.ok());
  EXPECT_EQ(jwt->expires_at, kNow + 30);
  auto declared = pipeline_->DeclareTask(
      {.client_pem = node_pem_,
       .entry_id = "e1",
       .task = {.purpose = "p", .scopes = {"read", "write"}, .audiences = {kApi}}});
  ASSERT_TRUE(declared.ok());
  // "admin" was never asked for (nor entitled): it is not added.
  EXPECT_EQ(declared->task.scopes, std::vector<std::string>{"read"});
  EXPECT_EQ(declared->task.expires_at, kNow + 30);
  auto token = pipeline_->IssueTaskToken(TokenRequest(declared->task.id));
  ASSERT_TRUE(token.ok()) << token.refusal().status;
  EXPECT_EQ(token->scopes, std::vector<std::string>{"read"});
  EXPECT_EQ(token->token.expires_at, kNow + 30);
  // A policy that leaves no scope refuses, with invalid_scope at /token.
  hook_->Answer(policy::PolicyDecision{.allow = true, .scopes = std::vector<std::string>{}});
  auto none = pipeline_->IssueTaskToken(TokenRequest(declared->task.id));
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.refusal().oauth_error, "invalid_scope");
}

TEST_F(PipelineTest, ApprovalIsOnlyForTaskDeclarations) {
  const std::string task_id = DeclareTask();
  hook_->Answer(policy::PolicyDecision{.allow = true, .require_approval = true});
  auto token = pipeline_->IssueTaskToken(TokenRequest(task_id));
  ASSERT_FALSE(token.ok());
  EXPECT_EQ(token.refusal().step, Step::kPolicy);
  EXPECT_THAT(token.refusal().description, HasSubstr("approval"));
  auto jwt =
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {kApi}});
  EXPECT_FALSE(jwt.ok());
}

TEST_F(PipelineTest, ATaskEndedWhileTheHookDecidesGetsNoToken) {
  const std::string task_id = DeclareTask();
  hook_->During([&] { ASSERT_TRUE(tasks_->End(kBot, task_id).ok()); });
  auto token = pipeline_->IssueTaskToken(TokenRequest(task_id));
  ASSERT_FALSE(token.ok());
  EXPECT_EQ(token.refusal().oauth_error, "invalid_grant");
  EXPECT_THAT(token.refusal().description, HasSubstr("ended"));
  auto records = AuditRecords();
  EXPECT_EQ(records.back().outcome, "denied");
  EXPECT_EQ(records.back().spiffe_id, kBot);
  EXPECT_EQ(records.back().task_id, task_id);
}

TEST_F(PipelineTest, ABatchAsksAFailingHookOnceAndSharesOneDeadline) {
  hook_->Answer(absl::DeadlineExceededError("too slow"));
  std::vector<X509SvidItem> items(20, {"e1", Csr()});
  auto svids = pipeline_->IssueX509Svids({.client_pem = node_pem_, .items = items});
  ASSERT_FALSE(svids.ok());
  EXPECT_TRUE(svids.refusal().policy_error);
  EXPECT_EQ(hook_->inputs().size(), 1u);
}

TEST_F(PipelineTest, CallerSuppliedIdsNeverReachTheRecordsColumns) {
  // An unknown task named by bytes that are not UTF-8: the record stays readable, and the
  // claimed ID is kept, escaped, in the detail only.
  auto token = pipeline_->IssueTaskToken(TokenRequest(std::string("task_\xff\xfe") + "x"));
  ASSERT_FALSE(token.ok());
  auto records = AuditRecords();
  ASSERT_FALSE(records.empty());
  EXPECT_EQ(records.back().task_id, "");
  EXPECT_EQ(records.back().spiffe_id, kBot);  // the refusal names the authenticated caller
  json detail = json::parse(records.back().detail);
  EXPECT_THAT(detail["task_id"].get<std::string>(), HasSubstr("task_"));
  EXPECT_EQ(detail["task_id"].get<std::string>().find('\xff'), std::string::npos);
}

TEST_F(PipelineTest, TheNodePathHandsTheHookTheCallingNodeAndEntry) {
  const std::string task_id = DeclareTask();
  ASSERT_TRUE(pipeline_->IssueTaskToken(TokenRequest(task_id)).ok());
  const policy::PolicyInput input = hook_->inputs().back();
  EXPECT_EQ(input.node_id, kNode);
  EXPECT_EQ(input.selectors, std::vector<std::string>{"unix:uid:1000"});
}

// ---- authorisation ----

TEST_F(PipelineTest, EntryOfAnotherNodeIsRefusedLikeAnUnknownOne) {
  const std::string other_pem = AttestNode(kOtherNode);
  auto other = pipeline_->IssueX509Svids({.client_pem = other_pem, .items = {{"e1", Csr()}}});
  auto unknown = pipeline_->IssueX509Svids({.client_pem = node_pem_, .items = {{"nope", Csr()}}});
  ASSERT_FALSE(other.ok());
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(other.refusal().status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(unknown.refusal().status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(other.refusal().step, Step::kAuthorize);
  // Nothing was asked of the hook for a request that failed authorisation.
  EXPECT_TRUE(hook_->inputs().empty());
}

TEST_F(PipelineTest, AnUnauthenticatedCallerIsRefusedAndAudited) {
  auto jwt = pipeline_->IssueJwtSvid({.client_pem = "", .entry_id = "e1", .audiences = {kApi}});
  ASSERT_FALSE(jwt.ok());
  EXPECT_EQ(jwt.refusal().step, Step::kAuthenticate);
  EXPECT_EQ(jwt.refusal().status.code(), absl::StatusCode::kUnauthenticated);
  auto records = AuditRecords();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(json::parse(records[0].detail)["step"], "authenticate");
}

TEST_F(PipelineTest, AFailedAttestationIsAudited) {
  auto svid = pipeline_->IssueNodeSvid({.attestor = "join_token",
                                        .attestation = absl::PermissionDeniedError("token spent"),
                                        .csr_der = Csr()});
  ASSERT_FALSE(svid.ok());
  auto records = AuditRecords();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].event, "node_svid");
  EXPECT_EQ(records[0].outcome, "denied");
  EXPECT_EQ(json::parse(records[0].detail)["reason"], "token spent");
}

TEST_F(PipelineTest, ABannedNodeIsNotAttestedAgain) {
  ASSERT_TRUE(store_->SetNodeBanned(kNode, true).ok());
  auto svid = pipeline_->IssueNodeSvid({.attestor = "join_token",
                                        .attestation = attestors::NodeAttestationResult{kNode, {}},
                                        .csr_der = Csr()});
  ASSERT_FALSE(svid.ok());
  EXPECT_THAT(std::string(svid.refusal().status.message()), HasSubstr("banned"));
}

TEST_F(PipelineTest, MalformedCsrIsInvalidArgument) {
  std::string csr = Csr();
  csr[csr.size() - 3] ^= 0x01;
  for (const std::string& bad : {csr, std::string("garbage")}) {
    auto svids = pipeline_->IssueX509Svids({.client_pem = node_pem_, .items = {{"e1", bad}}});
    ASSERT_FALSE(svids.ok());
    EXPECT_EQ(svids.refusal().status.code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(PipelineTest, JwtSvidAudienceIsRequiredAndBounded) {
  for (std::vector<std::string> audiences :
       {std::vector<std::string>{}, std::vector<std::string>{""}, std::vector<std::string>(17, "a"),
        std::vector<std::string>{std::string(513, 'a')}}) {
    auto jwt = pipeline_->IssueJwtSvid(
        {.client_pem = node_pem_, .entry_id = "e1", .audiences = audiences});
    ASSERT_FALSE(jwt.ok());
    EXPECT_EQ(jwt.refusal().status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(jwt.refusal().step, Step::kRequest);
  }
}

TEST_F(PipelineTest, AHugeEntryIdIsRefusedWithoutBeingEchoedOrStoredWhole) {
  const std::string huge(1 << 20, 'x');
  auto refused =
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = huge, .audiences = {"a"}});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.refusal().status.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_LT(refused.refusal().status.message().size(), 200u);
  auto records = AuditRecords();
  ASSERT_EQ(records.size(), 1u);
  EXPECT_LT(records[0].detail.size(), 512u);
  auto detail = json::parse(records[0].detail);
  EXPECT_EQ(detail["entry_id"], std::string(128, 'x'));
  EXPECT_EQ(detail["entry_id_bytes"], huge.size());
}

// ---- the record ----

TEST_F(PipelineTest, EveryIssuanceIsAuditedWithItsCredentialIdAndNeverTheCredential) {
  auto x509 = pipeline_->IssueX509Svids({.client_pem = node_pem_, .items = {{"e1", Csr()}}});
  auto jwt =
      pipeline_->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {kApi}});
  const std::string task_id = DeclareTask();
  auto token = pipeline_->IssueTaskToken(TokenRequest(task_id));
  auto node = pipeline_->IssueNodeSvid({.client_pem = node_pem_, .csr_der = Csr()});
  ASSERT_TRUE(x509.ok() && jwt.ok() && token.ok() && node.ok());
  auto records = AuditRecords();
  ASSERT_EQ(records.size(), 5u);
  EXPECT_EQ(records[0].event, "x509_svid");
  EXPECT_EQ(records[0].outcome, "issued");
  EXPECT_EQ(records[0].spiffe_id, kBot);
  EXPECT_EQ(records[0].node_id, kNode);
  EXPECT_EQ(records[0].credential_id, (*x509)[0].certificate.serial_hex);
  EXPECT_EQ(json::parse(records[0].detail)["entry_id"], "e1");
  EXPECT_EQ(json::parse(records[0].detail)["policy"]["decision"], "allow");
  EXPECT_EQ(records[1].event, "jwt_svid");
  EXPECT_EQ(records[1].credential_id, jwt->jti);
  EXPECT_EQ(records[2].event, "task_declared");
  EXPECT_EQ(records[2].task_id, task_id);
  EXPECT_EQ(records[3].event, "task_token");
  EXPECT_EQ(records[3].task_id, task_id);
  EXPECT_EQ(records[3].credential_id, token->token.jti);
  EXPECT_EQ(json::parse(records[3].detail)["scope"], "read write");
  EXPECT_EQ(records[4].event, "node_svid");
  EXPECT_EQ(records[4].credential_id, node->certificate.SerialHex());
  for (const auto& r : records) {
    EXPECT_EQ(r.detail.find(jwt->token), std::string::npos);
    EXPECT_EQ(r.detail.find(token->token.token), std::string::npos);
  }
  // Each workload credential has its index row; node SVIDs are tracked by the node row.
  auto rows = store_->ListCredentials({});
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 3u);
  auto x509_row = store_->GetCredential((*x509)[0].certificate.serial_hex);
  ASSERT_TRUE(x509_row.ok()) << x509_row.status();
  EXPECT_EQ(x509_row->kind, "x509_svid");
  EXPECT_EQ(x509_row->spiffe_id, kBot);
  EXPECT_EQ(x509_row->node_id, kNode);
  EXPECT_EQ(x509_row->expires_at, (*x509)[0].certificate.not_after);
  auto jwt_row = store_->GetCredential(jwt->jti);
  ASSERT_TRUE(jwt_row.ok()) << jwt_row.status();
  EXPECT_EQ(jwt_row->kind, "jwt_svid");
  EXPECT_EQ(jwt_row->expires_at, jwt->expires_at);
  auto token_row = store_->GetCredential(token->token.jti);
  ASSERT_TRUE(token_row.ok()) << token_row.status();
  EXPECT_EQ(token_row->kind, "task_token");
  EXPECT_EQ(token_row->task_id, task_id);
  EXPECT_EQ(token_row->spiffe_id, kBot);
  EXPECT_EQ(token_row->expires_at, token->token.expires_at);
  EXPECT_TRUE(token_row->parent_id.empty());
  EXPECT_TRUE(absl::IsNotFound(store_->GetCredential(node->certificate.SerialHex()).status()));
  // Renewal: the node must present the new SVID, and the old one stays good until it does.
  auto stored = store_->GetNode(kNode);
  EXPECT_EQ(stored->cert_serial, node->certificate.SerialHex());
  EXPECT_FALSE(stored->previous_cert_serial.empty());
}

TEST_F(PipelineTest, ABatchIsAuditedInOneCommitAndARefusedItemIsLeftOut) {
  const int64_t batches_before = audit_->stats().batches;
  auto svids = pipeline_->IssueX509Svids(
      {.client_pem = node_pem_, .items = {{"e1", Csr()}, {"not-mine", Csr()}, {"e1", Csr()}}});
  ASSERT_TRUE(svids.ok()) << svids.refusal().status;
  ASSERT_EQ(svids->size(), 2u);
  EXPECT_EQ(audit_->stats().batches, batches_before + 1);
  auto records = AuditRecords();
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].outcome, "issued");
  EXPECT_EQ(records[1].outcome, "denied");
  EXPECT_EQ(json::parse(records[1].detail)["entry_id"], "not-mine");
  EXPECT_EQ(records[2].outcome, "issued");
  auto too_many = pipeline_->IssueX509Svids(
      {.client_pem = node_pem_, .items = std::vector<X509SvidItem>(1001, {"e1", Csr()})});
  EXPECT_FALSE(too_many.ok());
}

TEST_F(PipelineTest, NoCredentialLeavesWithoutItsAuditRecord) {
  // The audit log cannot take records (its backlog bound is zero): issuance fails closed.
  auto closed = AuditLog::Open(*store_, "closed", clock_, {.max_queued = 0});
  ASSERT_TRUE(closed.ok());
  const std::string task_id = DeclareTask();
  auto pipeline = MakePipeline(**closed);
  auto jwt =
      pipeline->IssueJwtSvid({.client_pem = node_pem_, .entry_id = "e1", .audiences = {"a"}});
  auto x509 = pipeline->IssueX509Svids({.client_pem = node_pem_, .items = {{"e1", Csr()}}});
  auto token = pipeline->IssueTaskToken(TokenRequest(task_id));
  auto node = pipeline->IssueNodeSvid({.client_pem = node_pem_, .csr_der = Csr()});
  for (const Refusal* r : {&jwt.refusal(), &x509.refusal(), &token.refusal(), &node.refusal()}) {
    EXPECT_TRUE(absl::IsUnavailable(r->status)) << r->status;
    EXPECT_EQ(r->step, Step::kRecord);
  }
  EXPECT_TRUE(store_->ListCredentials({})->empty());
}

}  // namespace
}  // namespace mandate::broker::issuance
