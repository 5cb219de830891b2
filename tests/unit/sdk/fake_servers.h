// In-process fakes of the Workload API and the broker admin API on Unix sockets in a temp dir,
// so the SDK and CLI are tested over real gRPC without daemons.
#ifndef MANDATE_TESTS_UNIT_SDK_FAKE_SERVERS_H_
#define MANDATE_TESTS_UNIT_SDK_FAKE_SERVERS_H_

#include <grpcpp/grpcpp.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "gtest/gtest.h"
#include "mandate/admin/v1/admin.grpc.pb.h"
#include "spiffe/workload.grpc.pb.h"

namespace mandate::testing {

// A temp dir removed (with its contents) on destruction.
class TempDir {
 public:
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "mandate-sdk-XXXXXX").string();
    char* made = mkdtemp(templ.data());
    EXPECT_NE(made, nullptr);
    path_ = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class FakeWorkloadApi final : public SpiffeWorkloadAPI::Service {
 public:
  // What the fake answers; set before the calls.
  X509SVIDResponse x509;
  JWTSVIDResponse jwt;
  JWTBundlesResponse jwt_bundles;
  // When not OK every RPC fails with it.
  grpc::Status fail = grpc::Status::OK;
  // FetchX509SVID sends `x509` this many times, 50 ms apart, then holds the stream open.
  int x509_updates = 1;

  std::atomic<int> calls_without_header{0};
  std::atomic<int> x509_streams{0};
  std::mutex mu;
  JWTSVIDRequest last_jwt_request;  // GUARDED_BY(mu)

  grpc::Status FetchX509SVID(grpc::ServerContext* ctx, const X509SVIDRequest*,
                             grpc::ServerWriter<X509SVIDResponse>* writer) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    x509_streams++;
    for (int i = 0; i < x509_updates; ++i) {
      if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      if (!writer->Write(x509)) return grpc::Status::OK;
    }
    while (!ctx->IsCancelled()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return grpc::Status::CANCELLED;
  }
  grpc::Status FetchJWTSVID(grpc::ServerContext* ctx, const JWTSVIDRequest* req,
                            JWTSVIDResponse* resp) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    {
      std::lock_guard<std::mutex> lock(mu);
      last_jwt_request = *req;
    }
    *resp = jwt;
    return grpc::Status::OK;
  }
  grpc::Status FetchJWTBundles(grpc::ServerContext* ctx, const JWTBundlesRequest*,
                               grpc::ServerWriter<JWTBundlesResponse>* writer) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    writer->Write(jwt_bundles);
    while (!ctx->IsCancelled()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return grpc::Status::CANCELLED;
  }
  grpc::Status ValidateJWTSVID(grpc::ServerContext* ctx, const ValidateJWTSVIDRequest* req,
                               ValidateJWTSVIDResponse* resp) override {
    if (auto s = Check(ctx); !s.ok()) return s;
    resp->set_spiffe_id("spiffe://example.org/agent/bot");
    (*resp->mutable_claims()->mutable_fields())["aud"].set_string_value(req->audience());
    return grpc::Status::OK;
  }

 private:
  grpc::Status Check(grpc::ServerContext* ctx) {
    auto it = ctx->client_metadata().find("workload.spiffe.io");
    if (it == ctx->client_metadata().end() || it->second != "true") {
      calls_without_header++;
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "security header missing from request");
    }
    return fail;
  }
};

class FakeAdminApi final : public mandate::admin::v1::Admin::Service {
 public:
  mandate::admin::v1::ListEntriesResponse entries;
  mandate::admin::v1::CreateEntryRequest last_create;  // written by CreateEntry

  grpc::Status CreateJoinToken(grpc::ServerContext*,
                               const mandate::admin::v1::CreateJoinTokenRequest* req,
                               mandate::admin::v1::CreateJoinTokenResponse* resp) override {
    resp->set_token("tok-123");
    resp->set_spiffe_id(req->spiffe_id());
    resp->set_expires_at(1'800'000'600);
    return grpc::Status::OK;
  }
  grpc::Status CreateEntry(grpc::ServerContext*, const mandate::admin::v1::CreateEntryRequest* req,
                           mandate::common::v1::Entry* resp) override {
    last_create = *req;
    *resp = req->entry();
    resp->set_id("entry-1");
    resp->set_created_at(1'800'000'000);
    return grpc::Status::OK;
  }
  grpc::Status ListEntries(grpc::ServerContext*, const mandate::admin::v1::ListEntriesRequest*,
                           mandate::admin::v1::ListEntriesResponse* resp) override {
    *resp = entries;
    return grpc::Status::OK;
  }
  grpc::Status GetEntry(grpc::ServerContext*, const mandate::admin::v1::GetEntryRequest* req,
                        mandate::common::v1::Entry*) override {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "entry " + req->id() + " not found");
  }
};

// Serves `service` on `path` until destroyed.
class FakeServer {
 public:
  FakeServer(grpc::Service* service, const std::string& path) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("unix:" + path, grpc::InsecureServerCredentials());
    builder.RegisterService(service);
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
  }
  ~FakeServer() {
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
    }
  }

 private:
  std::unique_ptr<grpc::Server> server_;
};

}  // namespace mandate::testing

#endif  // MANDATE_TESTS_UNIT_SDK_FAKE_SERVERS_H_
