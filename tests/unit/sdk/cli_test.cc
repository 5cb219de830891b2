#include "sdk/cli/cli.h"

#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "gtest/gtest.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/unit/sdk/fake_servers.h"
#include "tests/unit/sdk/test_pki.h"

namespace mandate::cli {
namespace {

using nlohmann::json;

struct Result {
  int code;
  std::string out;
  std::string err;
};

Result RunMandate(std::initializer_list<std::string> args) {
  std::vector<std::string> storage{"mandate"};
  storage.insert(storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& s : storage) {
    argv.push_back(s.data());
  }
  argv.push_back(nullptr);
  std::ostringstream out, err;
  int code = RunCli(static_cast<int>(storage.size()), argv.data(), out, err);
  return Result{code, out.str(), err.str()};
}

// Keeps the socket variables out of the tests' way and restores them.
class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* name : kNames) {
      const char* v = std::getenv(name);
      saved_.push_back(v ? std::optional<std::string>(v) : std::nullopt);
      unsetenv(name);
    }
  }
  void TearDown() override {
    for (size_t i = 0; i < std::size(kNames); ++i) {
      if (saved_[i]) {
        setenv(kNames[i], saved_[i]->c_str(), 1);
      } else {
        unsetenv(kNames[i]);
      }
    }
  }
  static constexpr const char* kNames[] = {"MANDATE_ADMIN_SOCKET", "MANDATE_ENDPOINT_SOCKET",
                                           "SPIFFE_ENDPOINT_SOCKET"};
  std::vector<std::optional<std::string>> saved_;
  testing::TempDir dir_;
};

TEST_F(CliTest, HelpSucceedsAndListsCommands) {
  Result r = RunMandate({"--help"});
  EXPECT_EQ(r.code, 0);
  for (const char* word : {"token", "entry", "agent", "bundle", "fetch", "validate",
                           "--admin-socket", kDefaultAdminSocket}) {
    EXPECT_NE(r.out.find(word), std::string::npos) << word;
  }
}

TEST_F(CliTest, MissingCommandNamesTheChoices) {
  Result r = RunMandate({});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("entry"), std::string::npos) << r.err;
  r = RunMandate({"--output", "json", "entry"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("mandate entry: missing command"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("create, list, show, delete"), std::string::npos) << r.err;
}

TEST_F(CliTest, UnknownCommandIsAnError) {
  Result r = RunMandate({"frobnicate"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("frobnicate"), std::string::npos) << r.err;
  r = RunMandate({"entry", "frobnicate"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("frobnicate"), std::string::npos) << r.err;
}

TEST_F(CliTest, TokenGenerateNeedsSpiffeId) {
  Result r = RunMandate({"token", "generate"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--spiffe-id"), std::string::npos) << r.err;
}

TEST_F(CliTest, TokenGenerateRefusesNonJoinId) {
  Result r = RunMandate({"token", "generate", "--spiffe-id", "spiffe://example.org/agent/x"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("/node/join/"), std::string::npos) << r.err;
}

TEST_F(CliTest, OutputMustBeTextOrJson) {
  EXPECT_EQ(RunMandate({"--output", "yaml", "entry", "list"}).code, 1);
}

TEST_F(CliTest, MissingAdminSocketSaysWhatToFix) {
  std::string sock = dir_.path() + "/admin.sock";
  Result r = RunMandate({"entry", "list", "--admin-socket", sock});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("cannot reach the broker admin socket " + sock), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("MANDATE_ADMIN_SOCKET"), std::string::npos);
}

TEST_F(CliTest, AdminSocketComesFromEnvironment) {
  std::string sock = dir_.path() + "/env-admin.sock";
  setenv("MANDATE_ADMIN_SOCKET", sock.c_str(), 1);
  Result r = RunMandate({"agent", "list"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find(sock), std::string::npos) << r.err;
}

TEST_F(CliTest, EntryCreateValidatesLocally) {
  Result r =
      RunMandate({"entry", "create", "--parent-id", "spiffe://example.org/node/join/n1",
                  "--spiffe-id", "spiffe://example.org/node/x", "--selector", "unix:uid:1000"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("reserved"), std::string::npos) << r.err;
  r = RunMandate({"entry", "create", "--parent-id", "spiffe://example.org/node/join/n1",
                  "--spiffe-id", "spiffe://example.org/agent/bot", "--selector", "unix:uid:abc"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("unix:uid:abc"), std::string::npos) << r.err;
  r = RunMandate({"entry", "create", "--spiffe-id", "spiffe://example.org/agent/bot", "--selector",
                  "unix:uid:1"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--parent-id"), std::string::npos) << r.err;
}

TEST_F(CliTest, FetchWithoutSocketNamesTheVariables) {
  Result r = RunMandate({"fetch", "x509"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("MANDATE_ENDPOINT_SOCKET"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--socket"), std::string::npos) << r.err;
}

TEST_F(CliTest, FetchJwtNeedsAudience) {
  Result r = RunMandate({"fetch", "jwt", "--socket", "/nonexistent.sock"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("--audience"), std::string::npos) << r.err;
}

TEST_F(CliTest, TaskTokenRefusesMalformedDpopRequestsBeforeConnecting) {
  // No socket is configured: the argument is refused before the CLI looks for one.
  struct Case {
    std::string arg;
    std::string error;
  };
  for (const Case& c : std::vector<Case>{
           {"GET", "no space between the method and the URL"},
           {"https://api.example.org/x", "no space between the method and the URL"},
           {" https://api.example.org/x", "the method is empty"},
           {"GET ", "the URL is empty"},
           {"GET  https://api.example.org/x", "contains a space"},
           {"GET https://api.example.org/x extra", "contains a space"},
           {"GET\thttps://api.example.org/x", "no space"},
           {"get https://api.example.org/x", "case-sensitive; write GET"},
           {"G(T https://api.example.org/x", "not an HTTP method token"},
           {"GET api.example.org/x", "not an absolute http:// or https:// URL"},
           {"GET /v1/x", "not an absolute http:// or https:// URL"},
       }) {
    Result r = RunMandate({"task", "token", "t1", "--audience", "a", "--dpop-request", c.arg});
    EXPECT_EQ(r.code, 1) << c.arg;
    EXPECT_NE(r.err.find("--dpop-request"), std::string::npos) << c.arg << ": " << r.err;
    EXPECT_NE(r.err.find(c.error), std::string::npos) << c.arg << ": " << r.err;
    EXPECT_NE(r.err.find("expected \"METHOD URL\""), std::string::npos) << r.err;
    EXPECT_EQ(r.out, "") << c.arg;
  }
}

TEST_F(CliTest, TaskTokenHelpSaysProofsAreSingleUseAndShortLived) {
  Result r = RunMandate({"task", "token", "--help"});
  EXPECT_EQ(r.code, 0);
  EXPECT_NE(r.out.find("--dpop-request"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("single-use"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("60 s"), std::string::npos) << r.out;
}

class CliAdminTest : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    for (int i = 1; i <= 3; ++i) {
      common::v1::Entry* e = admin_.entries.add_entries();
      e->set_id("e" + std::to_string(i));
      e->set_spiffe_id("spiffe://example.org/agent/a" + std::to_string(i));
      e->set_parent_id("spiffe://example.org/node/join/n1");
      e->add_selectors("unix:uid:100" + std::to_string(i));
      e->set_created_at(1'800'000'000);
    }
    socket_ = dir_.path() + "/admin.sock";
    server_ = std::make_unique<testing::FakeServer>(&admin_, socket_);
  }
  void TearDown() override {
    server_.reset();
    CliTest::TearDown();
  }
  testing::FakeAdminApi admin_;
  std::string socket_;
  std::unique_ptr<testing::FakeServer> server_;
};

TEST_F(CliAdminTest, EntryListJsonWithGlobalOptionsAfterCommandWords) {
  Result r =
      RunMandate({"entry", "list", "--output", "json", "--admin-socket", socket_, "--limit", "2"});
  ASSERT_EQ(r.code, 0) << r.err;
  json doc = json::parse(r.out);
  ASSERT_EQ(doc["entries"].size(), 2u);
  EXPECT_EQ(doc["entries"][0]["selectors"][0], "unix:uid:1001");
  EXPECT_EQ(doc["entries"][0]["created_at"], "2027-01-15T08:00:00Z");
}

TEST_F(CliAdminTest, EntryListTextIsATable) {
  Result r = RunMandate({"--admin-socket", socket_, "entry", "list"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.rfind("ID", 0), 0u);
  EXPECT_NE(r.out.find("spiffe://example.org/agent/a3"), std::string::npos);
}

TEST_F(CliAdminTest, TokenGeneratePrintsTheTokenAlone) {
  Result r = RunMandate({"--admin-socket", socket_, "token", "generate", "--spiffe-id",
                         "spiffe://example.org/node/join/n1", "--ttl", "60"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, "tok-123\n");
}

TEST_F(CliAdminTest, EntryCreateSendsEveryField) {
  Result r =
      RunMandate({"--admin-socket", socket_, "entry", "create", "--parent-id",
                  "spiffe://example.org/node/join/n1", "--spiffe-id",
                  "spiffe://example.org/agent/bot", "--selector", "unix:uid:1000", "--selector",
                  "unix:gid:50", "--scope", "read", "--jwt-ttl", "120", "--output", "json"});
  ASSERT_EQ(r.code, 0) << r.err;
  const common::v1::Entry& sent = admin_.last_create.entry();
  EXPECT_EQ(sent.selectors_size(), 2);
  EXPECT_EQ(sent.scopes(0), "read");
  EXPECT_EQ(sent.jwt_ttl_seconds(), 120);
  EXPECT_EQ(json::parse(r.out)["id"], "entry-1");
}

TEST_F(CliAdminTest, ServerErrorMessageReachesStderr) {
  Result r = RunMandate({"--admin-socket", socket_, "entry", "show", "nope"});
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("entry nope not found"), std::string::npos) << r.err;
}

class CliWorkloadTest : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    ca_ = std::make_unique<testing::TestCa>(testing::MakeCa("example.org", now));
    leaf_ = std::make_unique<testing::TestLeaf>(
        testing::MakeLeaf(*ca_, "spiffe://example.org/agent/bot", now - 60, now + 3600));
    X509SVID* svid = api_.x509.add_svids();
    svid->set_spiffe_id("spiffe://example.org/agent/bot");
    svid->set_x509_svid(leaf_->cert.Der());
    svid->set_x509_svid_key(leaf_->key.ExportPkcs8DerSecret());
    svid->set_bundle(ca_->cert.Der());
    token_ = testing::SignEs256(
        leaf_->key, json{{"alg", "ES256"}, {"kid", "k1"}},
        json{{"sub", "spiffe://example.org/agent/bot"}, {"aud", "api"}, {"exp", now + 300}});
    JWTSVID* j = api_.jwt.add_svids();
    j->set_spiffe_id("spiffe://example.org/agent/bot");
    j->set_svid(token_);
    socket_ = dir_.path() + "/agent.sock";
    server_ = std::make_unique<testing::FakeServer>(&api_, socket_);
  }
  void TearDown() override {
    server_.reset();
    CliTest::TearDown();
  }
  testing::FakeWorkloadApi api_;
  std::unique_ptr<testing::TestCa> ca_;
  std::unique_ptr<testing::TestLeaf> leaf_;
  std::string token_;
  std::string socket_;
  std::unique_ptr<testing::FakeServer> server_;
};

TEST_F(CliWorkloadTest, FetchJwtPrintsTheTokenAlone) {
  setenv("SPIFFE_ENDPOINT_SOCKET", ("unix://" + socket_).c_str(), 1);
  Result r = RunMandate({"fetch", "jwt", "--audience", "api"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, token_ + "\n");
}

TEST_F(CliWorkloadTest, FetchX509PrintsIdAndChain) {
  Result r = RunMandate({"fetch", "x509", "--socket", socket_});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("spiffe://example.org/agent/bot"), std::string::npos);
  EXPECT_NE(r.out.find(leaf_->cert.Pem()), std::string::npos);
  EXPECT_EQ(r.out.find("PRIVATE KEY"), std::string::npos);
}

TEST_F(CliWorkloadTest, FetchX509WritesFilesWithPrivateKeyMode) {
  std::string out_dir = dir_.path() + "/out";
  Result r = RunMandate({"--socket", socket_, "fetch", "x509", "--write", out_dir});
  ASSERT_EQ(r.code, 0) << r.err;
  struct stat st;
  ASSERT_EQ(stat((out_dir + "/svid.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto key = crypto::ReadFile(out_dir + "/svid.key");
  ASSERT_TRUE(key.ok());
  auto parsed = crypto::PrivateKey::FromPem(*key);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->public_key().Equals(leaf_->key.public_key()));
  auto bundle = crypto::ReadFile(out_dir + "/bundle.pem");
  ASSERT_TRUE(bundle.ok());
  EXPECT_EQ(*bundle, ca_->cert.Pem());
  auto chain = crypto::ReadFile(out_dir + "/svid.pem");
  ASSERT_TRUE(chain.ok());
  EXPECT_EQ(*chain, leaf_->cert.Pem());
}

// The Tasks service of the agent: one active task; FetchTaskToken binds its token to the key of
// the proof it receives, as the broker does.
class FakeTasksApi final : public mandate::workload::v1::Tasks::Service {
 public:
  static constexpr char kTokenEndpoint[] = "http://127.0.0.1:8080/token";
  static constexpr char kAccessToken[] = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJib3QifQ.c2ln";

  std::atomic<int> get_task_calls{0};
  std::atomic<int> token_calls{0};
  std::string token_request_jkt;  // written by FetchTaskToken

  grpc::Status GetTask(grpc::ServerContext*, const mandate::workload::v1::GetTaskRequest* req,
                       mandate::workload::v1::Task* resp) override {
    get_task_calls++;
    resp->set_id(req->task_id());
    resp->set_spiffe_id("spiffe://example.org/agent/bot");
    resp->set_status("active");
    resp->add_scopes("tickets:read");
    resp->add_audiences("https://api.example.org");
    resp->set_token_endpoint(kTokenEndpoint);
    return grpc::Status::OK;
  }
  grpc::Status FetchTaskToken(grpc::ServerContext*,
                              const mandate::workload::v1::FetchTaskTokenRequest* req,
                              mandate::workload::v1::FetchTaskTokenResponse* resp) override {
    token_calls++;
    auto proof = jose::ParseCompact(req->dpop_proof());
    if (!proof.ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad proof");
    }
    auto jkt = jose::JwkThumbprint(proof->header["jwk"]);
    if (!jkt.ok() || proof->payload["htm"] != "POST" || proof->payload["htu"] != kTokenEndpoint ||
        proof->payload.contains("ath")) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad token-request proof");
    }
    token_request_jkt = *jkt;
    resp->set_access_token(kAccessToken);
    resp->set_token_type("DPoP");
    resp->set_expires_in(300);
    resp->add_scopes("tickets:read");
    resp->set_jkt(*jkt);
    return grpc::Status::OK;
  }
};

class CliTasksTest : public CliTest {
 protected:
  void SetUp() override {
    CliTest::SetUp();
    socket_ = dir_.path() + "/agent.sock";
    server_ = std::make_unique<testing::FakeServer>(&tasks_, socket_);
  }
  void TearDown() override {
    server_.reset();
    CliTest::TearDown();
  }

  // Checks `proof` the way an upstream service would for a request `method` `htu` carrying
  // FakeTasksApi::kAccessToken bound to `jkt`.
  static void ExpectUpstreamProof(const std::string& proof, const std::string& method,
                                  const std::string& htu, const std::string& jkt) {
    SCOPED_TRACE(proof);
    auto parsed = jose::ParseCompact(proof);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(parsed->header["typ"], "dpop+jwt");
    EXPECT_EQ(parsed->header["alg"], "ES256");
    ASSERT_TRUE(parsed->header["jwk"].is_object());
    EXPECT_FALSE(parsed->header["jwk"].contains("d"));
    auto key = jose::PublicKeyFromJwk(parsed->header["jwk"]);
    ASSERT_TRUE(key.ok()) << key.status();
    EXPECT_TRUE(jose::VerifySignature(*parsed, *key).ok());
    auto thumbprint = jose::JwkThumbprint(*key);
    ASSERT_TRUE(thumbprint.ok());
    EXPECT_EQ(*thumbprint, jkt);
    EXPECT_EQ(parsed->payload["htm"], method);
    EXPECT_EQ(parsed->payload["htu"], htu);
    EXPECT_EQ(parsed->payload["ath"],
              jose::Base64UrlEncode(crypto::Sha256(FakeTasksApi::kAccessToken)));
    int64_t now = std::chrono::duration_cast<std::chrono::seconds>(
                      std::chrono::system_clock::now().time_since_epoch())
                      .count();
    ASSERT_TRUE(parsed->payload["iat"].is_number_integer());
    EXPECT_LE(std::abs(parsed->payload["iat"].get<int64_t>() - now), 60);
    ASSERT_TRUE(parsed->payload["jti"].is_string());
    EXPECT_GE(parsed->payload["jti"].get<std::string>().size(), 16u);
  }

  FakeTasksApi tasks_;
  std::string socket_;
  std::unique_ptr<testing::FakeServer> server_;
};

TEST_F(CliTasksTest, TaskTokenWithoutDpopRequestsKeepsTwoLines) {
  Result r = RunMandate(
      {"--socket", socket_, "task", "token", "t1", "--audience", "https://api.example.org"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out,
            std::string(FakeTasksApi::kAccessToken) + "\njkt: " + tasks_.token_request_jkt + "\n");
}

TEST_F(CliTasksTest, TaskTokenPrintsOneProofPerRequestBoundToTheToken) {
  // The option takes one value per occurrence, so the task ID may follow it.
  Result r =
      RunMandate({"--socket", socket_, "task", "token", "--audience", "https://api.example.org",
                  "--dpop-request", "GET https://API.example.org:443/v1/items?x=1#f",
                  "--dpop-request", "POST http://127.0.0.1:9000/v1/items", "t1"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<std::string> lines = absl::StrSplit(r.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 4u) << r.out;
  EXPECT_EQ(lines[0], FakeTasksApi::kAccessToken);
  ASSERT_FALSE(tasks_.token_request_jkt.empty());
  EXPECT_EQ(lines[1], "jkt: " + tasks_.token_request_jkt);
  ASSERT_EQ(lines[2].rfind("dpop: ", 0), 0u) << lines[2];
  ASSERT_EQ(lines[3].rfind("dpop: ", 0), 0u) << lines[3];
  // htu is the URL without query and fragment, normalised (RFC 9449 §4.2).
  ExpectUpstreamProof(lines[2].substr(6), "GET", "https://api.example.org/v1/items",
                      tasks_.token_request_jkt);
  ExpectUpstreamProof(lines[3].substr(6), "POST", "http://127.0.0.1:9000/v1/items",
                      tasks_.token_request_jkt);
  EXPECT_NE(lines[2], lines[3]);
}

TEST_F(CliTasksTest, TaskTokenJsonListsTheProofs) {
  Result r = RunMandate({"--socket", socket_, "--output", "json", "task", "token", "t1",
                         "--audience", "https://api.example.org", "--dpop-request",
                         "DELETE https://api.example.org/v1/items/7"});
  ASSERT_EQ(r.code, 0) << r.err;
  json doc = json::parse(r.out);
  EXPECT_EQ(doc["access_token"], FakeTasksApi::kAccessToken);
  EXPECT_EQ(doc["jkt"], tasks_.token_request_jkt);
  ASSERT_TRUE(doc["dpop_proofs"].is_array());
  ASSERT_EQ(doc["dpop_proofs"].size(), 1u);
  const json& p = doc["dpop_proofs"][0];
  EXPECT_EQ(p["method"], "DELETE");
  EXPECT_EQ(p["url"], "https://api.example.org/v1/items/7");
  ExpectUpstreamProof(p["proof"].get<std::string>(), "DELETE", "https://api.example.org/v1/items/7",
                      tasks_.token_request_jkt);

  r = RunMandate({"--socket", socket_, "--output", "json", "task", "token", "t1", "--audience",
                  "https://api.example.org"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out)["dpop_proofs"], json::array());
}

TEST_F(CliTasksTest, BadDpopRequestUrlFailsBeforeAnyCall) {
  // Well-formed "METHOD URL" but a URL the SDK refuses as htu: caught before the agent is asked
  // for anything, so no token is minted for nothing.
  for (const char* arg :
       {"GET https://user@api.example.org/x", "GET https://api.example.org:99999/x",
        "GET https://api.example.org/a/../b", "GET ftp://api.example.org/x"}) {
    Result r = RunMandate({"--socket", socket_, "task", "token", "t1", "--audience",
                           "https://api.example.org", "--dpop-request", arg});
    EXPECT_EQ(r.code, 1) << arg;
    EXPECT_NE(r.err.find(std::string("--dpop-request '") + arg + "'"), std::string::npos)
        << arg << ": " << r.err;
    EXPECT_EQ(r.out, "") << arg;
  }
  EXPECT_EQ(tasks_.get_task_calls, 0);
  EXPECT_EQ(tasks_.token_calls, 0);
}

}  // namespace
}  // namespace mandate::cli
