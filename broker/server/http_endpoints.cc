#include "broker/server/http_endpoints.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"

namespace mandate::broker {
HttpEndpoints::HttpEndpoints(const TrustAuthority& authority) : authority_(authority) {}

HttpEndpoints::~HttpEndpoints() { Stop(); }

absl::StatusOr<std::string> HttpEndpoints::CheckpointsDocument() {
  std::lock_guard<std::mutex> lock(checkpoints_mu_);
  const auto now = std::chrono::steady_clock::now();
  if (!checkpoints_body_.empty() && now - checkpoints_read_at_ < std::chrono::seconds(1)) {
    return checkpoints_body_;
  }
  auto checkpoints = store_->ListAuditCheckpoints("", 100);
  if (!checkpoints.ok()) return checkpoints.status();
  nlohmann::json list = nlohmann::json::array();
  for (const store::AuditCheckpoint& c : *checkpoints) {
    list.push_back({{"chain_id", c.chain_id},
                    {"seq", c.seq},
                    {"hash", c.hash},
                    {"time", c.time},
                    {"jws", c.jws}});
  }
  checkpoints_body_ = nlohmann::json{{"checkpoints", list}}.dump();
  checkpoints_read_at_ = now;
  return checkpoints_body_;
}

void HttpEndpoints::Serve(const std::string& issuer_url, const TokenEndpoint* token_endpoint,
                          const AuditLog* audit, store::Store* store) {
  audit_ = audit;
  store_ = store;
  nlohmann::json doc = {
      {"issuer", issuer_url},
      {"jwks_uri", issuer_url + "/keys"},
      {"response_types_supported", {"id_token"}},
      {"subject_types_supported", {"public"}},
      {"id_token_signing_alg_values_supported", {"ES256"}},
  };
  token_endpoint_ = token_endpoint;
  if (token_endpoint_ != nullptr) {
    doc["token_endpoint"] = token_endpoint_->url();
    doc["grant_types_supported"] = {kTokenExchangeGrantType};
    // The workload authenticates with its JWT-SVID (subject_token), not as an OAuth client.
    doc["token_endpoint_auth_methods_supported"] = {"none"};
    doc["dpop_signing_alg_values_supported"] = dpop::kProofAlgorithms;
  }
  discovery_ = doc.dump();
  AddRoutes();
  server_->Start();
}

absl::Status HttpEndpoints::Bind(const std::string& host, int port,
                                 const std::string& tls_cert_file, const std::string& tls_key_file,
                                 int threads, const http::HttpLimits& limits) {
  http::HttpServerOptions options;
  options.host = host;
  options.port = port;
  options.tls_cert_file = tls_cert_file;
  options.tls_key_file = tls_key_file;
  // Parsing and the answers from memory take little CPU: a few I/O threads serve every
  // connection, the worker pool takes what blocks.
  options.io_threads = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 4u));
  options.worker_threads = threads;
  options.limits = limits;
  absl::StatusOr<std::unique_ptr<http::HttpServer>> server = http::HttpServer::Create(options);
  if (!server.ok()) return server.status();
  server_ = *std::move(server);
  port_ = server_->port();
  return absl::OkStatus();
}

void HttpEndpoints::AddRoutes() {
  using http::Execution;
  using http::HttpRequest;
  using http::HttpResponse;
  http::HttpServer& s = *server_;
  s.Route("GET", "/.well-known/openid-configuration", Execution::kIoThread,
          [this](const HttpRequest&, HttpResponse& r) { r.body = discovery_; });
  s.Route("GET", "/keys", Execution::kIoThread, [this](const HttpRequest&, HttpResponse& r) {
    r.headers.emplace_back("Cache-Control", "max-age=300");
    r.body = authority_.oidc_jwks();
  });
  s.Route("GET", "/bundle", Execution::kIoThread, [this](const HttpRequest&, HttpResponse& r) {
    r.headers.emplace_back("Cache-Control", "max-age=300");
    r.body = authority_.spiffe_bundle_jwks();
  });
  // Verifies a DPoP proof, signs, and waits for the audit record's group commit (an fsync).
  s.Route("POST", "/token", Execution::kWorkerPool,
          [this](const HttpRequest& req, HttpResponse& r) {
            r.headers = {{"Cache-Control", "no-store"}, {"Pragma", "no-cache"}};
            if (token_endpoint_ == nullptr) {
              r.status = 404;
              r.body = "{\"error\":\"not_found\"}";
              return;
            }
            TokenRequest request;
            request.content_type = req.Header("Content-Type");
            request.body = req.body;
            request.has_query = req.target.find('?') != std::string_view::npos;
            // Every DPoP header is passed on, so that more than one is refused.
            for (std::string_view proof : req.HeaderValues("DPoP")) {
              request.dpop_headers.emplace_back(proof);
            }
            TokenResponse response = token_endpoint_->Handle(request);
            r.status = response.status;
            if (!response.dpop_nonce.empty()) {
              r.headers.emplace_back("DPoP-Nonce", std::move(response.dpop_nonce));
            }
            if (response.retry_after_seconds > 0) {
              r.headers.emplace_back("Retry-After", std::to_string(response.retry_after_seconds));
            }
            r.body = std::move(response.body);
          });
  // Prometheus text exposition format 0.0.4.
  s.Route("GET", "/metrics", Execution::kIoThread, [this](const HttpRequest&, HttpResponse& r) {
    r.content_type = "text/plain; version=0.0.4; charset=utf-8";
    if (metrics_ != nullptr) r.body = metrics_->Render();
    if (audit_ != nullptr) {
      AuditLog::Stats stats = audit_->stats();
      absl::StrAppend(&r.body,
                      "# HELP mandate_audit_records_total Audit records stored by this process.\n"
                      "# TYPE mandate_audit_records_total counter\n"
                      "mandate_audit_records_total ",
                      stats.records,
                      "\n# HELP mandate_audit_commits_total Transactions (fsyncs) that stored "
                      "them (group commit).\n"
                      "# TYPE mandate_audit_commits_total counter\n"
                      "mandate_audit_commits_total ",
                      stats.batches,
                      "\n# HELP mandate_audit_failed_total Audit records not stored; their "
                      "requests failed.\n"
                      "# TYPE mandate_audit_failed_total counter\n"
                      "mandate_audit_failed_total ",
                      stats.failed, "\n");
    }
    const http::HttpServerStats http = server_->stats();
    absl::StrAppend(
        &r.body,
        "# HELP mandate_http_connections_open HTTP connections open now.\n"
        "# TYPE mandate_http_connections_open gauge\n"
        "mandate_http_connections_open ",
        http.connections_open,
        "\n# HELP mandate_http_connections_refused_total HTTP connections closed at accept "
        "(connection cap reached).\n"
        "# TYPE mandate_http_connections_refused_total counter\n"
        "mandate_http_connections_refused_total ",
        http.connections_refused,
        "\n# HELP mandate_http_connections_evicted_total HTTP connections idle, slow or not "
        "reading their answer, closed to make room for a new one at the global cap.\n"
        "# TYPE mandate_http_connections_evicted_total counter\n"
        "mandate_http_connections_evicted_total ",
        http.connections_evicted,
        "\n# HELP mandate_http_requests_refused_total HTTP requests refused by the listener's "
        "limits (400, 411, 413, 415, 431).\n"
        "# TYPE mandate_http_requests_refused_total counter\n"
        "mandate_http_requests_refused_total ",
        http.requests_refused,
        "\n# HELP mandate_http_deadlines_missed_total HTTP connections closed because a "
        "request, handshake or answer missed its deadline.\n"
        "# TYPE mandate_http_deadlines_missed_total counter\n"
        "mandate_http_deadlines_missed_total ",
        http.deadlines_missed, "\n");
  });
  // The newest signed checkpoints of every audit chain in the store (DESIGN.md §10), for
  // exporting elsewhere: anyone can verify them against /keys and hold the chain to them. On the
  // worker pool: reading the store can wait for the audit connection's commit.
  s.Route("GET", "/audit/checkpoints", Execution::kWorkerPool,
          [this](const HttpRequest&, HttpResponse& r) {
            r.headers.emplace_back("Cache-Control", "no-store");
            if (store_ == nullptr) {
              r.status = 404;
              r.body = "{\"error\":\"not_found\"}";
              return;
            }
            absl::StatusOr<std::string> body = CheckpointsDocument();
            if (!body.ok()) {
              r.status = 503;
              r.body = "{\"error\":\"unavailable\"}";
              return;
            }
            r.body = *std::move(body);
          });
  s.Route("GET", "/healthz", Execution::kIoThread,
          [](const HttpRequest&, HttpResponse& r) { r.body = "{\"status\":\"ok\"}"; });
  s.Route("GET", "/readyz", Execution::kIoThread, [this](const HttpRequest&, HttpResponse& r) {
    if (ready_) {
      r.body = "{\"status\":\"ready\"}";
    } else {
      r.status = 503;
      r.body = "{\"status\":\"starting\"}";
    }
  });
}

void HttpEndpoints::Stop() {
  if (server_) server_->Stop();
}

}  // namespace mandate::broker
