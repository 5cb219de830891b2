#include "mandate/workload_client.h"

#include <atomic>
#include <chrono>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "mandate/jwtsvid.h"
#include "mandate/x509svid.h"
#include "nlohmann/json.hpp"
#include "tests/unit/sdk/fake_servers.h"
#include "tests/unit/sdk/test_pki.h"

namespace mandate {
namespace {

using nlohmann::json;
using testing::kNow;

class WorkloadClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
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
    svid->set_hint("main");
    federated_ = std::make_unique<testing::TestCa>(testing::MakeCa("other.org", now));
    (*api_.x509.mutable_federated_bundles())["spiffe://other.org"] = federated_->cert.Der();

    jwt_ = testing::SignEs256(
        leaf_->key, json{{"alg", "ES256"}, {"kid", "k1"}, {"typ", "JWT"}},
        json{{"sub", "spiffe://example.org/agent/bot"}, {"aud", "api"}, {"exp", kNow}});
    JWTSVID* j = api_.jwt.add_svids();
    j->set_spiffe_id("spiffe://example.org/agent/bot");
    j->set_svid(jwt_);
    (*api_.jwt_bundles.mutable_bundles())["spiffe://example.org"] =
        testing::MakeJwks(leaf_->key, "k1");

    socket_ = dir_.path() + "/agent.sock";
    server_ = std::make_unique<testing::FakeServer>(&api_, socket_);
  }

  std::unique_ptr<WorkloadClient> Client(WorkloadClientOptions options = {}) {
    auto client = WorkloadClient::Connect("unix://" + socket_, options);
    EXPECT_TRUE(client.ok()) << client.status();
    return client.ok() ? *std::move(client) : nullptr;
  }

  testing::TempDir dir_;
  std::string socket_;
  testing::FakeWorkloadApi api_;
  std::unique_ptr<testing::FakeServer> server_;
  std::unique_ptr<testing::TestCa> ca_;
  std::unique_ptr<testing::TestCa> federated_;
  std::unique_ptr<testing::TestLeaf> leaf_;
  std::string jwt_;
};

TEST_F(WorkloadClientTest, FetchX509ContextReturnsSvidAndBundlesWithSecurityHeader) {
  auto context = Client()->FetchX509Context();
  ASSERT_TRUE(context.ok()) << context.status();
  EXPECT_EQ(api_.calls_without_header.load(), 0);
  ASSERT_EQ(context->svids.size(), 1u);
  const X509Svid& svid = context->svids[0];
  EXPECT_EQ(svid.spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_EQ(svid.hint, "main");
  EXPECT_EQ(svid.chain_der, std::vector<std::string>{leaf_->cert.Der()});
  EXPECT_EQ(svid.expires_at, leaf_->cert.not_after());
  ASSERT_EQ(context->bundles.count("example.org"), 1u);
  ASSERT_EQ(context->bundles.count("other.org"), 1u);
  EXPECT_EQ(context->bundles.at("other.org").ca_der[0], federated_->cert.Der());
  // The fetched context verifies its own SVID.
  auto verified = VerifyX509Svid(svid.chain_der, context->Bundles());
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(WorkloadClientTest, KeyNotMatchingCertificateIsRefused) {
  auto other = crypto::PrivateKey::GenerateP256();
  api_.x509.mutable_svids(0)->set_x509_svid_key(other->ExportPkcs8DerSecret());
  auto context = Client()->FetchX509Context();
  EXPECT_EQ(context.status().code(), absl::StatusCode::kInternal);
}

TEST_F(WorkloadClientTest, ServerErrorCodeAndMessageArePreserved) {
  api_.fail = grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "no identity issued");
  auto svid = Client()->FetchX509Svid();
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(svid.status().message().find("no identity issued"), std::string::npos);
  auto jwt = Client()->FetchJwtSvid({"api"});
  EXPECT_EQ(jwt.status().code(), absl::StatusCode::kPermissionDenied);
}

TEST_F(WorkloadClientTest, UnreachableSocketIsUnavailableAndNamesIt) {
  auto client = WorkloadClient::Connect(dir_.path() + "/missing.sock");
  ASSERT_TRUE(client.ok());
  auto svid = (*client)->FetchX509Svid();
  EXPECT_EQ(svid.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(svid.status().message().find("missing.sock"), std::string::npos);
}

TEST_F(WorkloadClientTest, FetchJwtSvidSendsAudiencesAndReadsExpiry) {
  auto svid = Client()->FetchJwtSvid({"api", "db"}, "spiffe://example.org/agent/bot");
  ASSERT_TRUE(svid.ok()) << svid.status();
  EXPECT_EQ(svid->token, jwt_);
  EXPECT_EQ(svid->expiry, kNow);
  std::lock_guard<std::mutex> lock(api_.mu);
  ASSERT_EQ(api_.last_jwt_request.audience_size(), 2);
  EXPECT_EQ(api_.last_jwt_request.audience(1), "db");
  EXPECT_EQ(api_.last_jwt_request.spiffe_id(), "spiffe://example.org/agent/bot");
}

TEST_F(WorkloadClientTest, FetchJwtSvidNeedsAnAudience) {
  EXPECT_EQ(Client()->FetchJwtSvid({}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(WorkloadClientTest, FetchedJwtBundlesVerifyTokens) {
  auto bundles = Client()->FetchJwtBundles();
  ASSERT_TRUE(bundles.ok()) << bundles.status();
  ASSERT_EQ(bundles->jwt_bundles().count("example.org"), 1u);
  auto verified = ParseAndValidateJwtSvid(jwt_, *bundles, {"api"}, kNow - 10);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(WorkloadClientTest, ValidateJwtSvidReturnsClaimsJson) {
  auto resp = Client()->ValidateJwtSvid(jwt_, "api");
  ASSERT_TRUE(resp.ok()) << resp.status();
  EXPECT_EQ(resp->spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_EQ(json::parse(resp->claims_json)["aud"], "api");
}

TEST_F(WorkloadClientTest, WatcherDeliversEveryUpdateAndCloses) {
  api_.x509_updates = 3;
  std::atomic<int> updates{0};
  auto client = Client();
  auto watcher = client->WatchX509Context([&](const X509Context& c) {
    if (c.svids.size() == 1) updates++;
  });
  ASSERT_TRUE(watcher->WaitUntilUpdated(std::chrono::seconds(5)).ok());
  for (int i = 0; i < 100 && updates.load() < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(updates.load(), 3);
  watcher->Close();  // must return although the server holds the stream open
  client.reset();
}

TEST_F(WorkloadClientTest, BlockingWatchReturnsWhenStopped) {
  std::atomic<bool> stop{false};
  std::atomic<int> updates{0};
  auto client = Client();
  absl::Status result;
  std::thread t(
      [&] { result = client->WatchX509Context([&](const X509Context&) { updates++; }, stop); });
  for (int i = 0; i < 250 && updates.load() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  stop = true;
  t.join();
  EXPECT_TRUE(result.ok()) << result;
  EXPECT_GE(updates.load(), 1);
}

TEST_F(WorkloadClientTest, WatcherStopsOnInvalidArgument) {
  api_.fail = grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad request");
  auto watcher = Client()->WatchX509Context([](const X509Context&) {});
  absl::Status s = watcher->WaitUntilUpdated(std::chrono::seconds(5));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("bad request"), std::string::npos);
}

TEST_F(WorkloadClientTest, WatcherRetriesAfterUnavailable) {
  api_.fail = grpc::Status(grpc::StatusCode::UNAVAILABLE, "not yet");
  WorkloadClientOptions options;
  options.watch_initial_backoff = std::chrono::milliseconds(20);
  std::atomic<int> errors{0};
  auto watcher = Client(options)->WatchX509Context([](const X509Context&) {},
                                                   [&](const absl::Status&) { errors++; });
  for (int i = 0; i < 250 && errors.load() < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GE(errors.load(), 2);
  watcher->Close();
}

}  // namespace
}  // namespace mandate
