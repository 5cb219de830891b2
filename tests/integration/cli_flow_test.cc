// The operator's and the workload's path through the `mandate` CLI against real daemons, with
// the results checked by independent tools: openssl(1) for the X509-SVID and Debian's PyJWT for
// the JWT-SVID.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>

#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"
#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::StartsWith;

// Verifies a JWT-SVID with PyJWT against the broker's OIDC JWKS (/keys) and prints its `sub`.
// argv: JWKS URL, token, audience.
constexpr char kPyJwtVerify[] = R"PY(
import json, sys, urllib.request
import jwt
url, token, audience = sys.argv[1:4]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
jwks = json.load(opener.open(url, timeout=5))
kid = jwt.get_unverified_header(token)["kid"]
matching = [k for k in jwks["keys"] if k.get("kid") == kid]
if len(matching) != 1:
    sys.exit("kid %r not in the JWKS at %s" % (kid, url))
key = jwt.PyJWK(matching[0]).key
claims = jwt.decode(token, key, algorithms=["ES256"], audience=audience)
print(claims["sub"])
)PY";

class CliFlowTest : public IntegrationTest {};

json FindAgent(const json& list, const std::string& spiffe_id) {
  if (!list.is_object() || !list.contains("agents") || !list["agents"].is_array()) return nullptr;
  for (const json& agent : list["agents"]) {
    if (agent.value("spiffe_id", "") == spiffe_id) return agent;
  }
  return nullptr;
}

TEST_F(CliFlowTest, JoinTokenAttestEntryAndFetchVerifiedByOpensslAndPyJwt) {
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();

  // `token generate` prints the token alone on one line (DESIGN.md §10).
  CommandResult token =
      Admin(*broker, {"token", "generate", "--spiffe-id", broker->JoinNodeId("node-a")});
  ASSERT_EQ(token.exit_code, 0) << token;
  ASSERT_EQ(std::count(token.out.begin(), token.out.end(), '\n'), 1) << token;
  std::string join_token(absl::StripTrailingAsciiWhitespace(token.out));
  ASSERT_FALSE(join_token.empty());

  auto agent = StartAgent(*broker, join_token);
  ASSERT_TRUE(agent.ok()) << agent.status();

  const std::string node_id = broker->JoinNodeId("node-a");
  CommandResult agents = Admin(*broker, {"agent", "list", "--output", "json"});
  ASSERT_EQ(agents.exit_code, 0) << agents;
  json listed = FindAgent(json::parse(agents.out, nullptr, false), node_id);
  ASSERT_TRUE(listed.is_object()) << "node " << node_id << " not in " << agents.out;
  EXPECT_EQ(listed["selectors"], json::array({"join:name:node-a"})) << listed.dump();
  EXPECT_EQ(listed["banned"], false);

  const std::string workload_id = broker->Id("/agent/research-bot");
  auto entry = CreateEntry(*broker, node_id, workload_id, {OwnUidSelector()});
  ASSERT_TRUE(entry.ok()) << entry.status();

  // The entry reaches the agent over its sync stream; poll rather than sleep.
  CommandResult fetch;
  ASSERT_TRUE(WaitUntil(
      [&] {
        fetch = Workload(*agent, {"fetch", "x509"});
        return fetch.exit_code == 0;
      },
      10s, 50ms))
      << fetch;
  EXPECT_THAT(fetch.out, StartsWith("SPIFFE ID: " + workload_id + "\n"));
  EXPECT_THAT(fetch.out, HasSubstr("-----BEGIN CERTIFICATE-----"));
  EXPECT_THAT(fetch.out, ::testing::Not(HasSubstr("PRIVATE KEY")));

  // --write DIR, then an independent verifier: openssl(1).
  const std::string out_dir = temp_dir() + "/svid";
  CommandResult write = Workload(*agent, {"fetch", "x509", "--write", out_dir});
  ASSERT_EQ(write.exit_code, 0) << write;
  for (const char* name : {"svid.pem", "svid.key", "bundle.pem"}) {
    EXPECT_TRUE(std::filesystem::exists(out_dir + "/" + name)) << name;
  }
  struct stat key_stat {};
  ASSERT_EQ(::stat((out_dir + "/svid.key").c_str(), &key_stat), 0);
  EXPECT_EQ(key_stat.st_mode & 0777, 0600u);
  CommandResult verify = RunCommand(
      {"/usr/bin/openssl", "verify", "-CAfile", out_dir + "/bundle.pem", out_dir + "/svid.pem"});
  EXPECT_EQ(verify.exit_code, 0) << verify;
  EXPECT_THAT(verify.out, HasSubstr(out_dir + "/svid.pem: OK")) << verify;
  CommandResult san = RunCommand({"/usr/bin/openssl", "x509", "-in", out_dir + "/svid.pem",
                                  "-noout", "-ext", "subjectAltName"});
  EXPECT_EQ(san.exit_code, 0) << san;
  EXPECT_THAT(san.out, HasSubstr("URI:" + workload_id)) << san;
  // The key written is the one the certificate certifies.
  CommandResult cert_pub =
      RunCommand({"/usr/bin/openssl", "x509", "-in", out_dir + "/svid.pem", "-noout", "-pubkey"});
  CommandResult key_pub =
      RunCommand({"/usr/bin/openssl", "pkey", "-in", out_dir + "/svid.key", "-pubout"});
  ASSERT_EQ(cert_pub.exit_code, 0) << cert_pub;
  ASSERT_EQ(key_pub.exit_code, 0) << key_pub;
  EXPECT_EQ(cert_pub.out, key_pub.out);

  // `fetch jwt` prints the compact JWT alone on one line; PyJWT verifies it with /keys.
  CommandResult jwt = Workload(*agent, {"fetch", "jwt", "--audience", "A"});
  ASSERT_EQ(jwt.exit_code, 0) << jwt;
  std::vector<std::string> lines = absl::StrSplit(jwt.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 1u) << jwt;
  ASSERT_EQ(std::count(lines[0].begin(), lines[0].end(), '.'), 2) << jwt;
  const std::string jwks_url = "http://" + broker->http_address + "/keys";
  CommandResult pyjwt =
      RunCommand({"/usr/bin/python3", "-c", kPyJwtVerify, jwks_url, lines[0], "A"});
  ASSERT_EQ(pyjwt.exit_code, 0) << pyjwt;
  EXPECT_EQ(absl::StripTrailingAsciiWhitespace(pyjwt.out), workload_id);
  // The same independent verifier refuses the token for another audience.
  CommandResult pyjwt_wrong_aud =
      RunCommand({"/usr/bin/python3", "-c", kPyJwtVerify, jwks_url, lines[0], "B"});
  EXPECT_NE(pyjwt_wrong_aud.exit_code, 0) << pyjwt_wrong_aud;
  EXPECT_THAT(pyjwt_wrong_aud.err, HasSubstr("InvalidAudienceError")) << pyjwt_wrong_aud;
}

TEST_F(CliFlowTest, CallerRunningAsAnotherUidGetsPermissionDenied) {
  if (::geteuid() != 0) GTEST_SKIP() << "running the CLI as uid 65534 needs root";
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  auto agent = StartAttestedAgent(*broker, "node-uid");
  ASSERT_TRUE(agent.ok()) << agent.status();
  auto entry = CreateEntry(*broker, broker->JoinNodeId("node-uid"), broker->Id("/agent/root-only"),
                           {OwnUidSelector()});
  ASSERT_TRUE(entry.ok()) << entry.status();
  // Positive control: our own uid is served, so the refusal below is about the uid.
  CommandResult own;
  ASSERT_TRUE(WaitUntil(
      [&] {
        own = Workload(*agent, {"fetch", "x509"});
        return own.exit_code == 0;
      },
      10s, 50ms))
      << own;

  // uid 65534 must reach the socket (0666) and run the CLI: make the path traversable and give
  // it a copy of the binary in a directory it can read.
  ASSERT_EQ(::chmod(temp_dir().c_str(), 0755), 0);
  ASSERT_EQ(::chmod((temp_dir() + "/run").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((temp_dir() + "/bin").c_str(), 0755), 0);
  const std::string cli_copy = temp_dir() + "/bin/mandate";
  std::filesystem::copy_file(CliBinary(), cli_copy);
  ASSERT_EQ(::chmod(cli_copy.c_str(), 0755), 0);

  for (const std::vector<std::string>& command :
       {std::vector<std::string>{"fetch", "x509"},
        std::vector<std::string>{"fetch", "jwt", "--audience", "A"}}) {
    std::vector<std::string> argv = {"/usr/bin/setpriv", "--reuid",  "65534",
                                     "--regid",          "65534",    "--clear-groups",
                                     cli_copy,           "--socket", "unix://" + agent->socket};
    argv.insert(argv.end(), command.begin(), command.end());
    CommandResult other = RunCommand(argv);
    EXPECT_NE(other.exit_code, 0) << other;
    EXPECT_THAT(other.err, HasSubstr("no identity issued")) << other;
    EXPECT_THAT(other.out, ::testing::Not(HasSubstr("BEGIN CERTIFICATE"))) << other;
  }
}

}  // namespace
}  // namespace mandate::integration
