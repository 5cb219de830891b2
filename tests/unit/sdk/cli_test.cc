#include "sdk/cli/cli.h"

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
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

}  // namespace
}  // namespace mandate::cli
