#include "broker/server/issuer.h"

#include <gtest/gtest.h>

#include <functional>

#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using testing::OpenStore;
using testing::TempDir;

constexpr int64_t kNow = 1'800'000'000;
constexpr char kNode[] = "spiffe://example.org/node/join/n1";
constexpr char kOtherNode[] = "spiffe://example.org/node/join/n2";

class IssuerTest : public ::testing::Test {
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
    entry.spiffe_id = "spiffe://example.org/agent/bot";
    entry.parent_id = kNode;
    entry.selectors = {"unix:uid:1000"};
    entry.jwt_ttl_s = 120;
    ASSERT_TRUE(registry_->Create(entry).ok());
    IssuerDefaults defaults;
    defaults.issuer_url = "https://broker.example.org";
    audit_ = testing::OpenAuditLog(*store_, clock_);
    issuer_ = std::make_unique<Issuer>(*authority_, *registry_, *audit_, clock_, defaults);
  }

  std::string Csr(const std::string& id) {
    auto key = crypto::PrivateKey::GenerateP256();
    return *crypto::CreateCsrDer(*key, id);
  }

  TempDir dir_;
  FakeClock clock_{kNow};
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<TrustAuthority> authority_;
  std::unique_ptr<EntryRegistry> registry_;
  std::unique_ptr<AuditLog> audit_;
  std::unique_ptr<Issuer> issuer_;
};

TEST_F(IssuerTest, X509SvidCarriesTheEntryIdNotTheCsrSan) {
  auto svid = issuer_->IssueX509Svid(kNode, "e1", Csr("spiffe://example.org/agent/admin"));
  ASSERT_TRUE(svid.ok()) << svid.status();
  auto cert = crypto::Certificate::FromDer(svid->certificate.der);
  ASSERT_TRUE(cert.ok()) << cert.status();
  EXPECT_EQ(svid->certificate.serial_hex, cert->SerialHex());
  EXPECT_EQ(svid->certificate.not_before, cert->not_before());
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{"spiffe://example.org/agent/bot"});
  EXPECT_EQ(svid->certificate.not_after, kNow + 3600);
  EXPECT_EQ(cert->not_after(), kNow + 3600);
  auto verified = crypto::VerifyX509SvidChain({*cert}, authority_->x509_roots(), kNow);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(IssuerTest, EntryOfAnotherNodeIsRefusedLikeAnUnknownOne) {
  auto other = issuer_->IssueX509Svid(kOtherNode, "e1", Csr(""));
  auto unknown = issuer_->IssueX509Svid(kNode, "nope", Csr(""));
  EXPECT_EQ(other.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(issuer_->IssueJwtSvid(kOtherNode, "e1", {"a"}).status().code(),
            absl::StatusCode::kPermissionDenied);
}

TEST_F(IssuerTest, MalformedCsrIsInvalidArgument) {
  std::string csr = Csr("");
  csr[csr.size() - 3] ^= 0x01;
  EXPECT_EQ(issuer_->IssueX509Svid(kNode, "e1", csr).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueX509Svid(kNode, "e1", "garbage").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(IssuerTest, JwtSvidHeaderAndClaimsFollowTheSpiffeProfile) {
  auto jwt = issuer_->IssueJwtSvid(kNode, "e1", {"https://api.example.org", "b"});
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  auto parsed = jose::ParseCompact(jwt->token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header.size(), 3u);  // alg, kid, typ and nothing else
  EXPECT_EQ(parsed->header["alg"], "ES256");
  EXPECT_EQ(parsed->header["typ"], "JWT");
  EXPECT_EQ(parsed->header["kid"], authority_->jwt_key_id());
  EXPECT_EQ(parsed->payload["sub"], "spiffe://example.org/agent/bot");
  EXPECT_EQ(parsed->payload["aud"], nlohmann::json({"https://api.example.org", "b"}));
  EXPECT_EQ(parsed->payload["iat"], kNow);
  EXPECT_EQ(parsed->payload["exp"], kNow + 120);  // the entry's TTL
  EXPECT_EQ(parsed->payload["jti"], jwt->jti);
  auto set = jose::JwkSet::Parse(authority_->oidc_jwks());
  EXPECT_TRUE(jose::VerifySignature(*parsed, set->FindByKid(authority_->jwt_key_id())->key).ok());
  // Every token gets a fresh jti.
  auto again = issuer_->IssueJwtSvid(kNode, "e1", {"b"});
  EXPECT_NE(again->jti, jwt->jti);
}

TEST_F(IssuerTest, JwtSvidAudienceIsRequiredAndBounded) {
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", {""}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", std::vector<std::string>(17, "a")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(issuer_->IssueJwtSvid(kNode, "e1", {std::string(513, 'a')}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TaskTokenGrant Grant() {
  TaskTokenGrant grant;
  grant.spiffe_id = "spiffe://example.org/agent/bot";
  grant.task_id = "task_abc";
  grant.task_purpose = "triage \"ticket\" 42";
  grant.task_expires_at = kNow + 3600;
  grant.audience = "https://api.example.org";
  grant.scopes = {"tickets:read", "tickets:write"};
  grant.jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";
  return grant;
}

TEST_F(IssuerTest, TaskTokenFollowsTheRfc9068ProfileAndIsDpopBound) {
  auto token = issuer_->IssueTaskToken(Grant());
  ASSERT_TRUE(token.ok()) << token.status();
  auto parsed = jose::ParseCompact(token->token);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header["typ"], "at+jwt");
  EXPECT_EQ(parsed->header["alg"], "ES256");
  EXPECT_EQ(parsed->header["kid"], authority_->jwt_key_id());
  const auto& claims = parsed->payload;
  EXPECT_EQ(claims["iss"], "https://broker.example.org");
  EXPECT_EQ(claims["sub"], "spiffe://example.org/agent/bot");
  EXPECT_EQ(claims["client_id"], "spiffe://example.org/agent/bot");
  EXPECT_EQ(claims["aud"], "https://api.example.org");
  EXPECT_EQ(claims["scope"], "tickets:read tickets:write");
  EXPECT_EQ(claims["cnf"]["jkt"], "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I");
  EXPECT_EQ(claims["task"]["id"], "task_abc");
  EXPECT_EQ(claims["task"]["purpose"], "triage \"ticket\" 42");
  EXPECT_EQ(claims["iat"], kNow);
  EXPECT_EQ(claims["exp"], kNow + 300);  // default 5 min
  EXPECT_EQ(claims["jti"], token->jti);
  auto set = jose::JwkSet::Parse(authority_->oidc_jwks());
  EXPECT_TRUE(jose::VerifySignature(*parsed, set->FindByKid(authority_->jwt_key_id())->key).ok());
}

TEST_F(IssuerTest, TaskTokenNeverOutlivesItsTask) {
  auto grant = Grant();
  grant.task_expires_at = kNow + 42;
  auto token = issuer_->IssueTaskToken(grant);
  ASSERT_TRUE(token.ok());
  EXPECT_EQ(token->expires_at, kNow + 42);
  grant.task_expires_at = kNow;
  EXPECT_EQ(issuer_->IssueTaskToken(grant).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(IssuerTest, TaskTokenNeedsAudienceScopesAndKey) {
  for (auto mutate : std::vector<std::function<void(TaskTokenGrant&)>>{
           [](TaskTokenGrant& g) { g.audience.clear(); },
           [](TaskTokenGrant& g) { g.scopes.clear(); }, [](TaskTokenGrant& g) { g.jkt.clear(); }}) {
    auto grant = Grant();
    mutate(grant);
    EXPECT_EQ(issuer_->IssueTaskToken(grant).status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(IssuerTest, NodeSvidNamesTheNode) {
  auto cert = issuer_->IssueNodeSvid(kNode, Csr(""));
  ASSERT_TRUE(cert.ok());
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{kNode});
}

// ---- Audit: every issuance and every refusal leaves one record; no record, no credential ----

std::vector<store::AuditRecord> AuditRecords(store::Store& store) {
  return std::move(store.ListAuditRecords({})).value();
}

TEST_F(IssuerTest, EveryIssuanceIsAuditedWithItsCredentialId) {
  auto x509 = issuer_->IssueX509Svid(kNode, "e1", Csr(""));
  auto jwt = issuer_->IssueJwtSvid(kNode, "e1", {"https://api.example.org"});
  auto token = issuer_->IssueTaskToken(Grant());
  auto node = issuer_->IssueNodeSvid(kNode, Csr(""));
  ASSERT_TRUE(x509.ok() && jwt.ok() && token.ok() && node.ok());
  auto records = AuditRecords(*store_);
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records[0].event, "x509_svid");
  EXPECT_EQ(records[0].outcome, "issued");
  EXPECT_EQ(records[0].spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_EQ(records[0].node_id, kNode);
  EXPECT_EQ(records[0].credential_id, x509->certificate.serial_hex);
  EXPECT_EQ(nlohmann::json::parse(records[0].detail)["entry_id"], "e1");

  EXPECT_EQ(records[1].event, "jwt_svid");
  EXPECT_EQ(records[1].credential_id, jwt->jti);
  auto jwt_detail = nlohmann::json::parse(records[1].detail);
  EXPECT_EQ(jwt_detail["aud"], nlohmann::json({"https://api.example.org"}));
  EXPECT_EQ(jwt_detail["expires_at"], jwt->expires_at);

  EXPECT_EQ(records[2].event, "task_token");
  EXPECT_EQ(records[2].task_id, "task_abc");
  EXPECT_EQ(records[2].credential_id, token->jti);
  auto token_detail = nlohmann::json::parse(records[2].detail);
  EXPECT_EQ(token_detail["scope"], "tickets:read tickets:write");
  EXPECT_EQ(token_detail["jkt"], Grant().jkt);

  EXPECT_EQ(records[3].event, "node_svid");
  EXPECT_EQ(records[3].spiffe_id, kNode);
  EXPECT_EQ(records[3].credential_id, node->SerialHex());
  // No record holds a credential itself.
  for (const auto& r : records) {
    EXPECT_EQ(r.detail.find(jwt->token), std::string::npos);
    EXPECT_EQ(r.detail.find(token->token), std::string::npos);
  }
}

TEST_F(IssuerTest, RefusalsAreAudited) {
  ASSERT_FALSE(issuer_->IssueJwtSvid(kOtherNode, "e1", {"a"}).ok());
  ASSERT_FALSE(issuer_->IssueX509Svid(kNode, "nope", Csr("")).ok());
  auto records = AuditRecords(*store_);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].event, "jwt_svid");
  EXPECT_EQ(records[0].outcome, "denied");
  EXPECT_EQ(records[0].node_id, kOtherNode);
  EXPECT_EQ(nlohmann::json::parse(records[0].detail)["entry_id"], "e1");
  EXPECT_EQ(records[1].event, "x509_svid");
  EXPECT_EQ(records[1].outcome, "denied");
  EXPECT_EQ(nlohmann::json::parse(records[1].detail)["entry_id"], "nope");
}

TEST_F(IssuerTest, ABatchOfX509SvidsIsAuditedInOneCommit) {
  std::vector<X509SvidRequest> requests;
  for (int i = 0; i < 3; ++i) requests.push_back({"e1", Csr("")});
  auto svids = issuer_->IssueX509Svids(kNode, requests);
  ASSERT_TRUE(svids.ok()) << svids.status();
  ASSERT_EQ(svids->size(), 3u);
  auto records = AuditRecords(*store_);
  ASSERT_EQ(records.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(records[i].event, "x509_svid");
    EXPECT_EQ(records[i].credential_id, (*svids)[i].certificate.serial_hex);
  }
  EXPECT_EQ(audit_->stats().batches, 1);
}

TEST_F(IssuerTest, ABatchWithOneRefusalReturnsNothingAndRecordsOnlyTheRefusal) {
  std::vector<X509SvidRequest> requests = {{"e1", Csr("")}, {"not-mine", Csr("")}};
  auto svids = issuer_->IssueX509Svids(kNode, requests);
  EXPECT_EQ(svids.status().code(), absl::StatusCode::kPermissionDenied);
  auto records = AuditRecords(*store_);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].outcome, "denied");
  EXPECT_EQ(nlohmann::json::parse(records[0].detail)["entry_id"], "not-mine");
}

TEST_F(IssuerTest, AHugeEntryIdIsRefusedWithoutBeingEchoedOrStoredWhole) {
  const std::string huge(1 << 20, 'x');
  auto refused = issuer_->IssueJwtSvid(kNode, huge, {"a"});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_LT(refused.status().message().size(), 200u);
  auto records = AuditRecords(*store_);
  ASSERT_EQ(records.size(), 1u);
  EXPECT_LT(records[0].detail.size(), 512u);
  auto detail = nlohmann::json::parse(records[0].detail);
  EXPECT_EQ(detail["entry_id"], std::string(128, 'x'));
  EXPECT_EQ(detail["entry_id_bytes"], huge.size());
}

TEST_F(IssuerTest, NoCredentialLeavesWithoutItsAuditRecord) {
  // The audit log cannot take records (its backlog bound is zero): issuance fails closed.
  auto closed = AuditLog::Open(*store_, "closed", clock_, {.max_queued = 0});
  ASSERT_TRUE(closed.ok());
  IssuerDefaults defaults;
  defaults.issuer_url = "https://broker.example.org";
  Issuer issuer(*authority_, *registry_, **closed, clock_, defaults);
  EXPECT_TRUE(absl::IsUnavailable(issuer.IssueJwtSvid(kNode, "e1", {"a"}).status()));
  EXPECT_TRUE(absl::IsUnavailable(issuer.IssueX509Svid(kNode, "e1", Csr("")).status()));
  EXPECT_TRUE(absl::IsUnavailable(issuer.IssueTaskToken(Grant()).status()));
  EXPECT_TRUE(absl::IsUnavailable(issuer.IssueNodeSvid(kNode, Csr("")).status()));
  EXPECT_TRUE(absl::IsUnavailable(issuer.IssueX509Svids(kNode, {{"e1", Csr("")}}).status()));
}

}  // namespace
}  // namespace mandate::broker
