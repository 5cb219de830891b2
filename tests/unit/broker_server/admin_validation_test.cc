#include <gtest/gtest.h>

#include "broker/server/admin_service.h"
#include "broker/server/approvals/approval_registry.h"
#include "broker/server/tasks/task_registry.h"
#include "nlohmann/json.hpp"
#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using testing::OpenStore;
using testing::TempDir;

class AdminValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = OpenStore(dir_);
    authority_ = std::move(TrustAuthority::LoadOrCreate(
                               {.data_dir = dir_.path(),
                                .trust_domain = *spiffe::TrustDomain::Parse("example.org")},
                               clock_))
                     .value();
    registry_ = std::move(EntryRegistry::Load(*store_)).value();
    audit_ = testing::OpenAuditLog(*store_, clock_);
    admin_ = std::make_unique<AdminService>(*authority_, *store_, *registry_, *audit_, clock_);
  }

  mandate::common::v1::Entry Good() {
    mandate::common::v1::Entry e;
    e.set_spiffe_id("spiffe://example.org/agent/bot");
    e.set_parent_id("spiffe://example.org/node/join/n1");
    e.add_selectors("unix:uid:1000");
    e.add_scopes("tickets:read");
    return e;
  }

  std::string Refusal(const mandate::common::v1::Entry& e) {
    absl::Status s = admin_->ValidateEntry(e);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    return std::string(s.message());
  }

  TempDir dir_;
  FakeClock clock_{1'800'000'000};
  std::unique_ptr<store::SqliteStore> store_;
  std::unique_ptr<TrustAuthority> authority_;
  std::unique_ptr<EntryRegistry> registry_;
  std::unique_ptr<AuditLog> audit_;
  std::unique_ptr<AdminService> admin_;
};

TEST_F(AdminValidationTest, ChangesAreAudited) {
  mandate::admin::v1::CreateJoinTokenRequest token_request;
  token_request.set_spiffe_id("spiffe://example.org/node/join/n1");
  mandate::admin::v1::CreateJoinTokenResponse token;
  ASSERT_TRUE(admin_->CreateJoinToken(nullptr, &token_request, &token).ok());
  mandate::admin::v1::CreateEntryRequest create;
  *create.mutable_entry() = Good();
  mandate::common::v1::Entry created;
  ASSERT_TRUE(admin_->CreateEntry(nullptr, &create, &created).ok());
  mandate::admin::v1::DeleteEntryRequest del;
  del.set_id(created.id());
  mandate::admin::v1::DeleteEntryResponse deleted;
  ASSERT_TRUE(admin_->DeleteEntry(nullptr, &del, &deleted).ok());

  auto records = std::move(store_->ListAuditRecords({})).value();
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].event, "join_token_created");
  EXPECT_EQ(records[0].spiffe_id, "spiffe://example.org/node/join/n1");
  // The token itself is never recorded, only a prefix of its hash.
  EXPECT_EQ(records[0].detail.find(token.token()), std::string::npos);
  EXPECT_NE(records[0].detail.find("token_sha256_prefix"), std::string::npos);
  EXPECT_EQ(records[1].event, "entry_created");
  EXPECT_EQ(records[1].spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_EQ(records[1].node_id, "spiffe://example.org/node/join/n1");
  EXPECT_NE(records[1].detail.find(created.id()), std::string::npos);
  EXPECT_NE(records[1].detail.find("unix:uid:1000"), std::string::npos);
  EXPECT_EQ(records[2].event, "entry_deleted");
  EXPECT_NE(records[2].detail.find(created.id()), std::string::npos);
}

TEST_F(AdminValidationTest, AChangeWhoseRecordCannotBeStoredSaysSo) {
  auto closed = AuditLog::Open(*store_, "closed", clock_, {.max_queued = 0});
  ASSERT_TRUE(closed.ok());
  AdminService admin(*authority_, *store_, *registry_, **closed, clock_);
  mandate::admin::v1::CreateEntryRequest create;
  *create.mutable_entry() = Good();
  mandate::common::v1::Entry created;
  grpc::Status status = admin.CreateEntry(nullptr, &create, &created);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_NE(status.error_message().find("applied, but its audit record"), std::string::npos);
  mandate::admin::v1::CreateJoinTokenRequest token_request;
  token_request.set_spiffe_id("spiffe://example.org/node/join/n1");
  mandate::admin::v1::CreateJoinTokenResponse token;
  EXPECT_EQ(admin.CreateJoinToken(nullptr, &token_request, &token).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(token.token().empty()) << "an unaudited join token is not handed out";
}

TEST_F(AdminValidationTest, AcceptsAWellFormedEntry) {
  EXPECT_TRUE(admin_->ValidateEntry(Good()).ok());
}

TEST_F(AdminValidationTest, RefusalsNameTheRule) {
  auto e = Good();
  e.set_spiffe_id("spiffe://example.org/a/../b");
  EXPECT_NE(Refusal(e).find("'..'"), std::string::npos);

  e = Good();
  e.set_spiffe_id("spiffe://other.org/agent/bot");
  EXPECT_NE(Refusal(e).find("trust domain"), std::string::npos);

  e = Good();
  e.set_spiffe_id("spiffe://example.org/node/join/x");
  EXPECT_NE(Refusal(e).find("reserved"), std::string::npos);

  e = Good();
  e.set_spiffe_id("spiffe://example.org/broker");
  EXPECT_NE(Refusal(e).find("reserved"), std::string::npos);

  e = Good();
  e.set_parent_id("not-an-id");
  EXPECT_NE(Refusal(e).find("--parent-id"), std::string::npos);

  e = Good();
  e.clear_selectors();
  EXPECT_NE(Refusal(e).find("at least one --selector"), std::string::npos);

  e = Good();
  e.set_selectors(0, "unix:uid:abc");
  EXPECT_NE(Refusal(e).find("decimal"), std::string::npos);

  e = Good();
  e.set_selectors(0, "nosuchtype:x:y");
  Refusal(e);

  e = Good();
  e.set_scopes(0, "has space");
  EXPECT_NE(Refusal(e).find("scope"), std::string::npos);

  e = Good();
  e.set_x509_ttl_seconds(-1);
  EXPECT_NE(Refusal(e).find("--x509-ttl"), std::string::npos);

  e = Good();
  e.set_jwt_ttl_seconds(5);  // too short to rotate at half life
  EXPECT_NE(Refusal(e).find("--jwt-ttl"), std::string::npos);
}

TEST_F(AdminValidationTest, CreateEntryRefusalStoresNothing) {
  grpc::ServerContext context;
  mandate::admin::v1::CreateEntryRequest request;
  *request.mutable_entry() = Good();
  request.mutable_entry()->set_selectors(0, "unix:uid:-1");
  mandate::common::v1::Entry response;
  grpc::Status status = admin_->CreateEntry(&context, &request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(store_->ListEntries()->size(), 0u);
}

TEST_F(AdminValidationTest, JoinTokenMustNameAJoinNode) {
  grpc::ServerContext context;
  mandate::admin::v1::CreateJoinTokenRequest request;
  mandate::admin::v1::CreateJoinTokenResponse response;
  for (const char* id : {"spiffe://example.org/agent/x", "spiffe://example.org/node/join/a/b",
                         "spiffe://other.org/node/join/a", "garbage"}) {
    request.set_spiffe_id(id);
    EXPECT_EQ(admin_->CreateJoinToken(&context, &request, &response).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT)
        << id;
  }
  request.set_spiffe_id("spiffe://example.org/node/join/a");
  request.set_ttl_seconds(-5);
  EXPECT_EQ(admin_->CreateJoinToken(&context, &request, &response).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  request.set_ttl_seconds(60);
  ASSERT_TRUE(admin_->CreateJoinToken(&context, &request, &response).ok());
  EXPECT_EQ(response.expires_at(), 1'800'000'060);
  EXPECT_GE(response.token().size(), 43u);
}

// ---- Approvals and policy reload ----

class AdminApprovalsTest : public AdminValidationTest {
 protected:
  void SetUp() override {
    AdminValidationTest::SetUp();
    approvals_ = std::move(ApprovalRegistry::Create(*store_, *audit_, clock_, nullptr)).value();
    tasks_ =
        std::make_unique<TaskRegistry>(*store_, *audit_, clock_, TaskLimits{}, approvals_.get());
  }

  // A task declaration awaiting approval; returns its approval id.
  std::string Pending(const std::string& purpose = "deploy \"v7\" now") {
    TaskRequest request;
    request.purpose = purpose;
    request.scopes = {"deploy:prod"};
    request.audiences = {"https://deploy.example.org"};
    request.ttl_seconds = 600;
    auto task = tasks_->DeclarePendingApproval("spiffe://example.org/agent/bot", {"deploy:prod"},
                                               request, R"({"kind":"task"})");
    EXPECT_TRUE(task.ok()) << task.status();
    return task.ok() ? task->approval_id : "";
  }

  grpc::Status Decide(const std::string& id, bool approve, const std::string& reason,
                      mandate::admin::v1::Approval* out) {
    mandate::admin::v1::DecideApprovalRequest request;
    request.set_id(id);
    request.set_approve(approve);
    request.set_reason(reason);
    return admin_->DecideApproval(nullptr, &request, out);
  }

  std::unique_ptr<ApprovalRegistry> approvals_;
  std::unique_ptr<TaskRegistry> tasks_;
};

TEST_F(AdminApprovalsTest, WithoutApprovalsEnabledTheRpcsSaySo) {
  mandate::admin::v1::ListApprovalsResponse list;
  grpc::Status status = admin_->ListApprovals(nullptr, nullptr, &list);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(status.error_message().find("not enabled"), std::string::npos);
  mandate::admin::v1::Approval out;
  EXPECT_EQ(Decide(Pending(), true, "", &out).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(AdminApprovalsTest, ADecisionNeedsToKnowTheCaller) {
  admin_->EnableApprovals(approvals_.get());
  const std::string id = Pending();
  mandate::admin::v1::Approval out;
  EXPECT_EQ(Decide(id, true, "", &out).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  admin_->SetCallerIdentifier([](const grpc::ServerContext*) -> absl::StatusOr<std::string> {
    return absl::UnauthenticatedError("call did not come through the admin socket");
  });
  EXPECT_EQ(Decide(id, true, "", &out).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(approvals_->Get(id)->status, "pending") << "nothing decided without a decider";
}

TEST_F(AdminApprovalsTest, ListShowAndDecideRecordTheCaller) {
  admin_->EnableApprovals(approvals_.get());
  admin_->SetCallerIdentifier(
      [](const grpc::ServerContext*) -> absl::StatusOr<std::string> { return "uid:1000"; });
  const std::string id = Pending();

  mandate::admin::v1::ListApprovalsRequest list_request;
  list_request.set_status("pending");
  mandate::admin::v1::ListApprovalsResponse list;
  ASSERT_TRUE(admin_->ListApprovals(nullptr, &list_request, &list).ok());
  ASSERT_EQ(list.approvals_size(), 1);
  const mandate::admin::v1::Approval& listed = list.approvals(0);
  EXPECT_EQ(listed.id(), id);
  EXPECT_EQ(listed.status(), "pending");
  EXPECT_EQ(listed.purpose(), "deploy \"v7\" now");
  EXPECT_EQ(listed.scopes(0), "deploy:prod");
  EXPECT_EQ(listed.task_status(), "pending_approval");
  EXPECT_EQ(listed.task_ttl_seconds(), 600);
  EXPECT_EQ(listed.input_document(), R"({"kind":"task"})");

  clock_.Set(clock_.NowSeconds() + 100);
  mandate::admin::v1::Approval decided;
  grpc::Status status = Decide(id, true, "CHG-7", &decided);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(decided.status(), "approved");
  EXPECT_EQ(decided.decided_by(), "uid:1000");
  EXPECT_EQ(decided.reason(), "CHG-7");
  EXPECT_EQ(decided.task_status(), "active");
  EXPECT_EQ(decided.task_ttl_seconds(), 600) << "lifetime counted from the approval";
  EXPECT_EQ(decided.task_expires_at(), clock_.NowSeconds() + 600);

  mandate::admin::v1::Approval again;
  status = Decide(id, false, "", &again);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(status.error_message().find("already approved"), std::string::npos);

  mandate::admin::v1::GetApprovalRequest get;
  get.set_id(id);
  mandate::admin::v1::Approval shown;
  ASSERT_TRUE(admin_->GetApproval(nullptr, &get, &shown).ok());
  EXPECT_EQ(shown.decided_by(), "uid:1000");
  auto records = std::move(store_->ListAuditRecords({})).value();
  ASSERT_FALSE(records.empty());
  EXPECT_EQ(records.back().event, "approval");
  EXPECT_EQ(records.back().outcome, "approved");
  EXPECT_EQ(nlohmann::json::parse(records.back().detail)["decided_by"], "uid:1000");
}

TEST_F(AdminApprovalsTest, MalformedRequestsAreRefusedByRule) {
  admin_->EnableApprovals(approvals_.get());
  admin_->SetCallerIdentifier(
      [](const grpc::ServerContext*) -> absl::StatusOr<std::string> { return "uid:0"; });
  const std::string id = Pending();
  mandate::admin::v1::Approval out;
  EXPECT_EQ(Decide("appr_../../etc", true, "", &out).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Decide("appr_" + std::string(21, 'Q') + "A", true, "", &out).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Decide(id, false, std::string(2000, 'r'), &out).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Decide(id, false, "two\nlines", &out).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  mandate::admin::v1::ListApprovalsRequest list_request;
  list_request.set_status("PENDING; DROP TABLE");
  mandate::admin::v1::ListApprovalsResponse list;
  EXPECT_EQ(admin_->ListApprovals(nullptr, &list_request, &list).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  mandate::admin::v1::GetApprovalRequest get;
  get.set_id("");
  EXPECT_EQ(admin_->GetApproval(nullptr, &get, &out).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(approvals_->Get(id)->status, "pending");
}

TEST_F(AdminApprovalsTest, ReloadPolicyCallsTheReloaderAndAuditsIt) {
  mandate::admin::v1::ReloadPolicyResponse response;
  grpc::Status status = admin_->ReloadPolicy(nullptr, nullptr, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_NE(status.error_message().find("no --policy-file"), std::string::npos);

  int calls = 0;
  absl::Status next = absl::InvalidArgumentError("rules.toml:3: unknown kind \"nope\"");
  admin_->SetPolicyReloader([&] {
    ++calls;
    return next;
  });
  status = admin_->ReloadPolicy(nullptr, nullptr, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(status.error_message().find("rules in force stay"), std::string::npos);
  EXPECT_NE(status.error_message().find("rules.toml:3"), std::string::npos);
  next = absl::OkStatus();
  EXPECT_TRUE(admin_->ReloadPolicy(nullptr, nullptr, &response).ok());
  EXPECT_EQ(calls, 2);
  auto records = std::move(store_->ListAuditRecords({})).value();
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].event, "policy_reloaded");
  EXPECT_EQ(records[0].outcome, "error");
  EXPECT_EQ(records[1].outcome, "ok");
}

}  // namespace
}  // namespace mandate::broker
