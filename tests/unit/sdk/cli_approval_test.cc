// The `mandate` CLI's approval commands (admin socket), `policy reload`, and `task start` for a
// task that awaits approval (--output json, --wait), against in-process fake servers.
#include <atomic>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "mandate/admin/v1/admin.grpc.pb.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "sdk/cli/cli.h"
#include "tests/unit/sdk/fake_servers.h"

namespace mandate::cli {
namespace {

using nlohmann::json;
namespace adminpb = mandate::admin::v1;
namespace workloadpb = mandate::workload::v1;

constexpr char kApprovalId[] = "appr_AAAAAAAAAAAAAAAAAAAAAA";
// A purpose written to fool a human: a right-to-left override and a terminal escape.
constexpr char kEvilPurpose[] = "rotate \u202egnp.exe\u202c keys \x1b[2J \"now\"";

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result RunMandate(std::initializer_list<std::string> args) {
  std::vector<std::string> storage{"mandate"};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : storage) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::ostringstream out, err;
  int code = RunCli(static_cast<int>(storage.size()), argv.data(), out, err);
  return Result{code, out.str(), err.str()};
}

adminpb::Approval MakeApproval() {
  adminpb::Approval a;
  a.set_id(kApprovalId);
  a.set_task_id("task_1");
  a.set_spiffe_id("spiffe://example.org/agent/bot");
  a.set_purpose(kEvilPurpose);
  a.add_scopes("keys:rotate");
  a.add_audiences("https://kms.example.org");
  a.set_status("pending");
  a.set_task_status("pending_approval");
  a.set_task_ttl_seconds(600);
  a.set_created_at(1'800'000'000);
  a.set_expires_at(1'800'000'900);
  json input = {{"kind", "task"}, {"task", {{"purpose", kEvilPurpose}}}};
  a.set_input_document(input.dump());
  return a;
}

class FakeApprovalAdmin final : public adminpb::Admin::Service {
 public:
  std::mutex mu;
  adminpb::DecideApprovalRequest last_decision;
  adminpb::ListApprovalsRequest last_list;
  grpc::Status reload_answer = grpc::Status::OK;

  grpc::Status ListApprovals(grpc::ServerContext*, const adminpb::ListApprovalsRequest* req,
                             adminpb::ListApprovalsResponse* resp) override {
    std::lock_guard<std::mutex> lock(mu);
    last_list = *req;
    *resp->add_approvals() = MakeApproval();
    return grpc::Status::OK;
  }
  grpc::Status GetApproval(grpc::ServerContext*, const adminpb::GetApprovalRequest* req,
                           adminpb::Approval* resp) override {
    if (req->id() != kApprovalId) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "approval " + req->id() + " not found");
    }
    *resp = MakeApproval();
    return grpc::Status::OK;
  }
  grpc::Status DecideApproval(grpc::ServerContext*, const adminpb::DecideApprovalRequest* req,
                              adminpb::Approval* resp) override {
    std::lock_guard<std::mutex> lock(mu);
    last_decision = *req;
    *resp = MakeApproval();
    resp->set_status(req->approve() ? "approved" : "denied");
    resp->set_decided_by("uid:1000");
    resp->set_reason(req->reason());
    resp->set_task_status(req->approve() ? "active" : "denied");
    resp->set_task_expires_at(1'800'001'000);
    return grpc::Status::OK;
  }
  grpc::Status ReloadPolicy(grpc::ServerContext*, const adminpb::ReloadPolicyRequest*,
                            adminpb::ReloadPolicyResponse*) override {
    return reload_answer;
  }
};

// An agent whose tasks need approval: DeclareTask answers pending; GetTask answers
// authorization_pending `pending_polls` times, then `final_answer` (the task, active, when OK).
class FakePendingTasks final : public workloadpb::Tasks::Service {
 public:
  std::atomic<int> pending_polls{2};
  std::atomic<int> get_calls{0};
  grpc::Status final_answer = grpc::Status::OK;

  static workloadpb::Task Task(const std::string& status) {
    workloadpb::Task t;
    t.set_id("task_1");
    t.set_spiffe_id("spiffe://example.org/agent/bot");
    t.set_purpose("rotate keys");
    t.add_scopes("keys:rotate");
    t.add_audiences("https://kms.example.org");
    t.set_status(status);
    if (status == "pending_approval" || status == "active") t.set_approval_id(kApprovalId);
    t.set_created_at(1'800'000'000);
    t.set_expires_at(1'800'000'600);
    t.set_token_endpoint("http://127.0.0.1:8080/token");
    return t;
  }
  grpc::Status DeclareTask(grpc::ServerContext*, const workloadpb::DeclareTaskRequest*,
                           workloadpb::Task* resp) override {
    *resp = Task("pending_approval");
    return grpc::Status::OK;
  }
  grpc::Status GetTask(grpc::ServerContext*, const workloadpb::GetTaskRequest*,
                       workloadpb::Task* resp) override {
    get_calls++;
    if (pending_polls.fetch_sub(1) > 0) {
      return grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          std::string("authorization_pending: task awaits approval ") + kApprovalId);
    }
    if (!final_answer.ok()) return final_answer;
    *resp = Task("active");
    return grpc::Status::OK;
  }
};

class CliApprovalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    unsetenv("MANDATE_ADMIN_SOCKET");
    unsetenv("MANDATE_ENDPOINT_SOCKET");
    unsetenv("SPIFFE_ENDPOINT_SOCKET");
    admin_socket_ = dir_.path() + "/admin.sock";
    agent_socket_ = dir_.path() + "/agent.sock";
    admin_server_ = std::make_unique<testing::FakeServer>(&admin_, admin_socket_);
    agent_server_ = std::make_unique<testing::FakeServer>(&tasks_, agent_socket_);
  }
  void TearDown() override {
    admin_server_.reset();
    agent_server_.reset();
  }
  Result StartTask(std::initializer_list<std::string> extra) {
    std::vector<std::string> args = {
        "task",     "start",       "--purpose",  "rotate keys",
        "--scope",  "keys:rotate", "--audience", "https://kms.example.org",
        "--socket", agent_socket_};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<std::string> storage{"mandate"};
    storage.insert(storage.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& s : storage) argv.push_back(s.data());
    argv.push_back(nullptr);
    std::ostringstream out, err;
    int code = RunCli(static_cast<int>(storage.size()), argv.data(), out, err);
    return Result{code, out.str(), err.str()};
  }

  testing::TempDir dir_;
  FakeApprovalAdmin admin_;
  FakePendingTasks tasks_;
  std::string admin_socket_;
  std::string agent_socket_;
  std::unique_ptr<testing::FakeServer> admin_server_;
  std::unique_ptr<testing::FakeServer> agent_server_;
};

// The bytes that must never reach an approver's terminal raw.
void ExpectNoRawDeception(const std::string& text) {
  EXPECT_EQ(text.find("\u202e"), std::string::npos) << "raw right-to-left override";
  EXPECT_EQ(text.find("\u202c"), std::string::npos) << "raw pop directional formatting";
  EXPECT_EQ(text.find('\x1b'), std::string::npos) << "raw terminal escape";
}

TEST_F(CliApprovalTest, ShowQuotesThePurposeAndPrintsTheWholeEscapedInputDocument) {
  Result r = RunMandate({"approval", "show", kApprovalId, "--admin-socket", admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  ExpectNoRawDeception(r.out);
  EXPECT_NE(r.out.find(R"(Purpose:    "rotate \u202egnp.exe\u202c keys \u001b[2J \"now\"")"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("Input document"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(R"("kind": "task")"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(R"(\u202egnp.exe)"), std::string::npos) << "escaped inside the document";
  EXPECT_NE(r.out.find("Lifetime:   600s from approval"), std::string::npos) << r.out;
}

TEST_F(CliApprovalTest, ShowAndListJsonKeepTheDataButNoRawDeception) {
  Result r = RunMandate(
      {"--output", "json", "approval", "show", kApprovalId, "--admin-socket", admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  ExpectNoRawDeception(r.out);
  json doc = json::parse(r.out);
  EXPECT_EQ(doc["purpose"], kEvilPurpose) << "a JSON reader gets the exact text back";
  EXPECT_EQ(doc["input"]["task"]["purpose"], kEvilPurpose);
  EXPECT_EQ(doc["status"], "pending");
  EXPECT_EQ(doc["expires_at"], "2027-01-15T08:15:00Z");

  r = RunMandate({"approval", "list", "--status", "pending", "--output", "json", "--admin-socket",
                  admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  ExpectNoRawDeception(r.out);
  EXPECT_EQ(json::parse(r.out)["approvals"][0]["id"], kApprovalId);
  EXPECT_EQ(admin_.last_list.status(), "pending");

  r = RunMandate({"approval", "list", "--admin-socket", admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  ExpectNoRawDeception(r.out);
  EXPECT_EQ(r.out.rfind("ID", 0), 0u) << r.out;
}

TEST_F(CliApprovalTest, ApproveAndDenySendTheDecisionAndReason) {
  Result r = RunMandate(
      {"approval", "approve", kApprovalId, "--reason", "CHG-7", "--admin-socket", admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(admin_.last_decision.approve());
  EXPECT_EQ(admin_.last_decision.id(), kApprovalId);
  EXPECT_EQ(admin_.last_decision.reason(), "CHG-7");
  EXPECT_NE(r.out.find("Approved " + std::string(kApprovalId)), std::string::npos) << r.out;

  r = RunMandate(
      {"--output", "json", "approval", "deny", kApprovalId, "--admin-socket", admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(admin_.last_decision.approve());
  EXPECT_EQ(admin_.last_decision.reason(), "");
  EXPECT_EQ(json::parse(r.out)["status"], "denied");
}

TEST_F(CliApprovalTest, MalformedApprovalIdIsRefusedBeforeConnecting) {
  std::string missing = dir_.path() + "/nothing.sock";
  Result r = RunMandate({"approval", "approve", "appr_../x", "--admin-socket", missing});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("not an approval ID"), std::string::npos) << r.err;
  r = RunMandate({"approval", "list", "--status", "maybe", "--admin-socket", admin_socket_});
  EXPECT_EQ(r.code, 1);
}

TEST_F(CliApprovalTest, PolicyReloadReportsTheBrokersAnswer) {
  Result r = RunMandate({"policy", "reload", "--admin-socket", admin_socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "Policy reloaded\n");
  admin_.reload_answer = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                      "no --policy-file: this broker has no policy rules file");
  r = RunMandate({"policy", "reload", "--admin-socket", admin_socket_});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("no --policy-file"), std::string::npos) << r.err;
}

TEST_F(CliApprovalTest, TaskStartJsonShowsStatusAndApprovalId) {
  Result r = StartTask({"--output", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json doc = json::parse(r.out);
  EXPECT_EQ(doc["status"], "pending_approval");
  EXPECT_EQ(doc["approval_id"], kApprovalId);
  EXPECT_EQ(tasks_.get_calls.load(), 0) << "no --wait: no polling";
  r = StartTask({});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Approval:  " + std::string(kApprovalId)), std::string::npos) << r.out;
}

TEST_F(CliApprovalTest, TaskStartWaitReturnsTheApprovedTask) {
  Result r = StartTask({"--wait", "--output", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  json doc = json::parse(r.out);
  EXPECT_EQ(doc["status"], "active");
  EXPECT_EQ(doc["id"], "task_1");
  EXPECT_EQ(tasks_.get_calls.load(), 3) << "two pending answers, then the task";
}

TEST_F(CliApprovalTest, TaskStartWaitFailsClearlyWhenDenied) {
  tasks_.pending_polls = 1;
  tasks_.final_answer = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                     "task approval denied: not during the freeze");
  Result r = StartTask({"--wait"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("task task_1 was not approved"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("task approval denied: not during the freeze"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("awaits approval " + std::string(kApprovalId)), std::string::npos)
      << "the operator's next step is named while waiting: " << r.err;
}

TEST_F(CliApprovalTest, TaskStartWaitFailsWhenExpired) {
  tasks_.pending_polls = 0;
  tasks_.final_answer =
      grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "task approval expired");
  Result r = StartTask({"--wait", "--output", "json"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("task approval expired"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << "nothing on stdout for a task that will never run: " << r.out;
}

TEST_F(CliApprovalTest, TaskStartWaitGivesUpAtItsTimeout) {
  tasks_.pending_polls = 1'000'000;
  Result r = StartTask({"--wait", "--wait-timeout", "1"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("still awaits approval"), std::string::npos) << r.err;
  EXPECT_GE(tasks_.get_calls.load(), 1);
}

}  // namespace
}  // namespace mandate::cli
