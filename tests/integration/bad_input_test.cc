// Bad input against real daemons: each case asserts the exact refusal and that nothing changed.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <ctime>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "mandate/admin/v1/admin.grpc.pb.h"
#include "mandate/workload_client.h"
#include "nlohmann/json.hpp"
#include "spiffe/workload.grpc.pb.h"
#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

using nlohmann::json;
using ::testing::AnyOf;
using ::testing::HasSubstr;

class BadInputTest : public IntegrationTest {
 protected:
  // The Workload API connection goes first: an idle client connection holds the agent's gRPC
  // shutdown until its 3 s deadline, which would only slow every test down.
  void TearDown() override {
    client_.reset();
    IntegrationTest::TearDown();
  }

  // Broker + attested agent + an entry for this process's uid, served (polled) before returning.
  void StartServedWorkload(const std::string& node_name) {
    auto broker = StartBroker();
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *broker;
    auto agent = StartAttestedAgent(broker_, node_name);
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *agent;
    workload_id_ = broker_.Id("/agent/" + node_name);
    auto entry =
        CreateEntry(broker_, broker_.JoinNodeId(node_name), workload_id_, {OwnUidSelector()});
    ASSERT_TRUE(entry.ok()) << entry.status();
    auto client = WorkloadClient::Connect("unix://" + agent_.socket);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    absl::StatusOr<X509Svid> svid = absl::UnknownError("not fetched");
    ASSERT_TRUE(WaitUntil(
        [&] {
          svid = client_->FetchX509Svid();
          return svid.ok();
        },
        10s, 50ms))
        << svid.status();
  }

  std::unique_ptr<SpiffeWorkloadAPI::Stub> RawWorkloadStub() {
    return SpiffeWorkloadAPI::NewStub(
        grpc::CreateChannel("unix:" + agent_.socket, grpc::InsecureChannelCredentials()));
  }

  BrokerProcess broker_;
  AgentProcess agent_;
  std::string workload_id_;
  std::unique_ptr<WorkloadClient> client_;
};

void SetDeadline(grpc::ClientContext& ctx) {
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
}

TEST_F(BadInputTest, WorkloadApiRefusesMissingSecurityHeaderAndMissingAudience) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-header"));
  auto stub = RawWorkloadStub();

  {  // Unary call without `workload.spiffe.io: true`.
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    JWTSVIDRequest request;
    request.add_audience("A");
    JWTSVIDResponse response;
    grpc::Status status = stub->FetchJWTSVID(&ctx, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("security header missing"));
    EXPECT_EQ(response.svids_size(), 0);
  }
  {  // Streaming call without the header: no SVID, InvalidArgument.
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    auto reader = stub->FetchX509SVID(&ctx, X509SVIDRequest());
    X509SVIDResponse response;
    EXPECT_FALSE(reader->Read(&response));
    grpc::Status status = reader->Finish();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("security header missing"));
  }
  {  // The header must say "true".
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    ctx.AddMetadata("workload.spiffe.io", "false");
    JWTSVIDRequest request;
    request.add_audience("A");
    JWTSVIDResponse response;
    grpc::Status status = stub->FetchJWTSVID(&ctx, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  }
  {  // With the header but without an audience: InvalidArgument, no token.
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    ctx.AddMetadata("workload.spiffe.io", "true");
    JWTSVIDResponse response;
    grpc::Status status = stub->FetchJWTSVID(&ctx, JWTSVIDRequest(), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("audience must be specified"));
    EXPECT_EQ(response.svids_size(), 0);
  }
  {  // ValidateJWTSVID without an audience.
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    ctx.AddMetadata("workload.spiffe.io", "true");
    ValidateJWTSVIDRequest request;
    request.set_svid("a.b.c");
    ValidateJWTSVIDResponse response;
    grpc::Status status = stub->ValidateJWTSVID(&ctx, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("audience must be specified"));
  }
  {  // Control: the same raw call, correctly made, is served.
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    ctx.AddMetadata("workload.spiffe.io", "true");
    JWTSVIDRequest request;
    request.add_audience("A");
    JWTSVIDResponse response;
    grpc::Status status = stub->FetchJWTSVID(&ctx, request, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(response.svids_size(), 1);
    EXPECT_EQ(response.svids(0).spiffe_id(), workload_id_);
  }
  // The SDK refuses an empty audience list too.
  auto no_audience = client_->FetchJwtSvid({});
  EXPECT_EQ(no_audience.status().code(), absl::StatusCode::kInvalidArgument)
      << no_audience.status();
}

TEST_F(BadInputTest, ReusedJoinTokenIsRefused) {
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  auto token = GenerateJoinToken(*broker, "node-once");
  ASSERT_TRUE(token.ok()) << token.status();
  auto first = StartAgent(*broker, *token);
  ASSERT_TRUE(first.ok()) << first.status();
  CommandResult agents_before = Admin(*broker, {"agent", "list", "--output", "json"});
  ASSERT_EQ(agents_before.exit_code, 0) << agents_before;

  CommandResult second = RunAgentUntilExit(*broker, *token,
                                           {.data_dir = temp_dir() + "/agent2",
                                            .socket = temp_dir() + "/run/a2.sock",
                                            .extra_args = {}});
  EXPECT_NE(second.exit_code, 0) << second;
  EXPECT_NE(second.exit_code, -1) << "the second agent did not exit: " << second;
  EXPECT_THAT(second.err, HasSubstr("join token unknown or already used"));
  EXPECT_THAT(ReadFileOrEmpty(broker->log_path), HasSubstr("join token unknown or already used"));
  CommandResult agents_after = Admin(*broker, {"agent", "list", "--output", "json"});
  EXPECT_EQ(agents_after.out, agents_before.out);
  // The first agent is unaffected.
  EXPECT_TRUE(IsRunning(first->pid));
}

TEST_F(BadInputTest, ExpiredJoinTokenIsRefused) {
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  auto token = GenerateJoinToken(*broker, "node-late", /*ttl_seconds=*/1);
  ASSERT_TRUE(token.ok()) << token.status();
  // The broker's clock has whole seconds and the token lives 1 s: after 2 s it has expired
  // whatever the sub-second phase. Nothing to poll here; the passing of time is the point.
  std::this_thread::sleep_for(2s);
  CommandResult agent = RunAgentUntilExit(*broker, *token);
  EXPECT_NE(agent.exit_code, 0) << agent;
  EXPECT_NE(agent.exit_code, -1) << "the agent did not exit: " << agent;
  EXPECT_THAT(agent.err, HasSubstr("join token expired"));
  EXPECT_THAT(ReadFileOrEmpty(broker->log_path), HasSubstr("join token expired"));
  CommandResult agents = Admin(*broker, {"agent", "list", "--output", "json"});
  ASSERT_EQ(agents.exit_code, 0) << agents;
  EXPECT_EQ(json::parse(agents.out, nullptr, false), json({{"agents", json::array()}}));
}

TEST_F(BadInputTest, EntryCreateRefusesMalformedIdsAndSelectorsAndChangesNothing) {
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  const std::string parent = broker->JoinNodeId("node-x");
  // One good entry, so "unchanged" is not trivially "empty".
  auto good = CreateEntry(*broker, parent, broker->Id("/agent/good"), {"unix:uid:1000"});
  ASSERT_TRUE(good.ok()) << good.status();
  CommandResult before = Admin(*broker, {"entry", "list", "--output", "json"});
  ASSERT_EQ(before.exit_code, 0) << before;

  struct Case {
    std::string spiffe_id;
    std::string selector;
    std::string rule;  // what the refusal must mention
  };
  const std::vector<Case> cases = {
      {"spiffe://example.org/a/../b", "unix:uid:1000", "'..'"},
      {"spiffe://example.org/agent/x", "unix:uid:abc", "decimal"},
      {"spiffe://example.org/node/x", "unix:uid:1000", "reserved"},
      {"spiffe://example.org/broker", "unix:uid:1000", "reserved"},
      {"spiffe://other.org/agent/x", "unix:uid:1000", "trust domain"},
      {"spiffe://example.org/agent/x", "nocolon", "selector"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.spiffe_id + " " + c.selector);
    CommandResult r = Admin(*broker, {"entry", "create", "--parent-id", parent, "--spiffe-id",
                                      c.spiffe_id, "--selector", c.selector});
    EXPECT_NE(r.exit_code, 0) << r;
    EXPECT_THAT(r.err, HasSubstr(c.rule)) << r;
    EXPECT_EQ(r.out, "") << r;
  }

  // The CLI checks before sending; the broker is the authority and must refuse the same input
  // when a client skips those checks.
  auto admin = mandate::admin::v1::Admin::NewStub(
      grpc::CreateChannel("unix:" + broker->admin_socket, grpc::InsecureChannelCredentials()));
  for (const Case& c : cases) {
    SCOPED_TRACE("raw admin call: " + c.spiffe_id + " " + c.selector);
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    mandate::admin::v1::CreateEntryRequest request;
    request.mutable_entry()->set_parent_id(parent);
    request.mutable_entry()->set_spiffe_id(c.spiffe_id);
    request.mutable_entry()->add_selectors(c.selector);
    mandate::common::v1::Entry created;
    grpc::Status status = admin->CreateEntry(&ctx, request, &created);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr(c.rule));
  }
  {  // A malformed parent ID is refused by the broker too.
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    mandate::admin::v1::CreateEntryRequest request;
    request.mutable_entry()->set_parent_id("spiffe://example.org/node/join/../x");
    request.mutable_entry()->set_spiffe_id("spiffe://example.org/agent/x");
    request.mutable_entry()->add_selectors("unix:uid:1000");
    mandate::common::v1::Entry created;
    grpc::Status status = admin->CreateEntry(&ctx, request, &created);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("--parent-id"));
  }

  CommandResult after = Admin(*broker, {"entry", "list", "--output", "json"});
  ASSERT_EQ(after.exit_code, 0) << after;
  EXPECT_EQ(after.out, before.out);
}

// ---------------------------------------------------------------------------- ValidateJWTSVID

std::string B64(const std::string& s) { return jose::Base64UrlEncode(s); }

// The claims of a compact JWS, decoded without any check.
json PayloadOf(const std::string& token) {
  std::vector<std::string> parts = absl::StrSplit(token, '.');
  if (parts.size() != 3) return nullptr;
  auto decoded = jose::Base64UrlDecode(parts[1]);
  if (!decoded.ok()) return nullptr;
  return json::parse(*decoded, nullptr, false);
}

json HeaderOf(const std::string& token) {
  std::vector<std::string> parts = absl::StrSplit(token, '.');
  if (parts.size() != 3) return nullptr;
  auto decoded = jose::Base64UrlDecode(parts[0]);
  if (!decoded.ok()) return nullptr;
  return json::parse(*decoded, nullptr, false);
}

absl::StatusOr<std::string> SignEs256(const crypto::PrivateKey& key, const json& payload) {
  auto kid = jose::JwkThumbprint(key.public_key());
  if (!kid.ok()) return kid.status();
  json header = {{"alg", "ES256"}, {"kid", *kid}, {"typ", "JWT"}};
  return jose::SignCompact(key, jose::Algorithm::kES256, header.dump(), payload.dump());
}

TEST_F(BadInputTest, ValidateJwtSvidRefusesTamperedWrongAudienceAlgNoneAndExpiredTokens) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-jwt"));
  auto jwt = client_->FetchJwtSvid({"A"});
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  const std::string& token = jwt->token;
  // Control: the genuine token validates for its audience.
  auto genuine = client_->ValidateJwtSvid(token, "A");
  ASSERT_TRUE(genuine.ok()) << genuine.status();
  EXPECT_EQ(genuine->spiffe_id, workload_id_);

  std::vector<std::string> parts = absl::StrSplit(token, '.');
  ASSERT_EQ(parts.size(), 3u);
  json claims = PayloadOf(token);
  ASSERT_TRUE(claims.is_object());
  ASSERT_TRUE(claims.contains("exp") && claims["exp"].is_number_integer());
  const int64_t now = static_cast<int64_t>(std::time(nullptr));

  auto expect_refused = [&](const std::string& what, const std::string& candidate,
                            const std::string& audience, const std::string& rule) {
    SCOPED_TRACE(what);
    auto r = client_->ValidateJwtSvid(candidate, audience);
    ASSERT_FALSE(r.ok()) << "accepted: " << candidate;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr("invalid JWT-SVID"));
    EXPECT_THAT(r.status().message(), HasSubstr(rule));
  };

  expect_refused("wrong audience", token, "B", "audience");

  // Tampered: the payload re-encoded with a later exp, the original signature kept.
  json extended = claims;
  extended["exp"] = claims["exp"].get<int64_t>() + 3600;
  expect_refused("tampered exp", parts[0] + "." + B64(extended.dump()) + "." + parts[2], "A",
                 "signature");
  // Tampered: one character of the payload flipped. Flipping a base64url character may also
  // break the JSON or the canonical encoding; any of those refusals is right, acceptance is not.
  std::string flipped_payload = parts[1];
  flipped_payload[flipped_payload.size() / 2] ^= 0x01;
  auto flipped = client_->ValidateJwtSvid(parts[0] + "." + flipped_payload + "." + parts[2], "A");
  EXPECT_EQ(flipped.status().code(), absl::StatusCode::kInvalidArgument) << flipped.status();

  // alg "none", hand-made, with and without a signature part.
  json none_header = HeaderOf(token);
  ASSERT_TRUE(none_header.is_object());
  none_header["alg"] = "none";
  expect_refused("alg none", B64(none_header.dump()) + "." + parts[1] + ".", "A", "");
  expect_refused("alg none with the original signature",
                 B64(none_header.dump()) + "." + parts[1] + "." + parts[2], "A", "none");

  // Expired. A broker started with the minimum --jwt-svid-ttl (60 s) cannot hand out a token that
  // expires within a test, so the expired tokens are crafted:
  json expired_claims = claims;
  expired_claims["iat"] = now - 7200;
  expired_claims["exp"] = now - 3600;
  // (1) signed with a different key: refused (no key with that kid), whatever its expiry says.
  auto other_key = crypto::PrivateKey::GenerateP256();
  ASSERT_TRUE(other_key.ok()) << other_key.status();
  auto foreign = SignEs256(*other_key, expired_claims);
  ASSERT_TRUE(foreign.ok()) << foreign.status();
  expect_refused("expired, foreign key", *foreign, "A", "kid");
  // (2) signed with the broker's own JWT key, read from its data dir (this test owns it): the
  // signature is genuine, so only the expiry check can refuse it.
  auto broker_key = crypto::PrivateKey::FromPem(ReadFileOrEmpty(broker_.data_dir + "/jwt.key"));
  ASSERT_TRUE(broker_key.ok()) << broker_key.status();
  auto fresh = SignEs256(*broker_key, claims);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  ASSERT_TRUE(client_->ValidateJwtSvid(*fresh, "A").ok())
      << "a token re-signed with the broker key must validate, or the expired case proves nothing";
  auto expired = SignEs256(*broker_key, expired_claims);
  ASSERT_TRUE(expired.ok()) << expired.status();
  expect_refused("expired, broker key", *expired, "A", "expired");

  // Garbage.
  expect_refused("not a JWS", "not-a-token", "A", "");
}

}  // namespace
}  // namespace mandate::integration
