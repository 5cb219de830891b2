#include "broker/server/http_endpoints.h"

#include <httplib.h>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"

namespace mandate::broker {
namespace {
constexpr char kJson[] = "application/json";
}  // namespace

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
  thread_ = std::thread([this] { server_->listen_after_bind(); });
}

absl::Status HttpEndpoints::Bind(const std::string& host, int port,
                                 const std::string& tls_cert_file, const std::string& tls_key_file,
                                 int threads) {
  if (!tls_cert_file.empty()) {
    server_ = std::make_unique<httplib::SSLServer>(tls_cert_file.c_str(), tls_key_file.c_str());
    if (!server_->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot load --http-tls-cert ", tls_cert_file,
                                                     " / --http-tls-key ", tls_key_file));
    }
  } else {
    server_ = std::make_unique<httplib::Server>();
  }
  httplib::Server& s = *server_;
  s.set_payload_max_length(64 * 1024);
  s.set_read_timeout(5, 0);
  s.set_write_timeout(5, 0);
  s.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  // An idle keep-alive connection holds a pool thread: release it soon, and recycle busy
  // connections now and then so one client cannot keep a thread forever.
  s.set_keep_alive_timeout(2);
  s.set_keep_alive_max_count(1000);
  // Answers are written in pieces (headers, body): without TCP_NODELAY, Nagle plus the client's
  // delayed ACK stalls every keep-alive request by ~40 ms.
  s.set_tcp_nodelay(true);
  s.Get("/.well-known/openid-configuration", [this](const httplib::Request&, httplib::Response& r) {
    r.set_content(discovery_, kJson);
  });
  s.Get("/keys", [this](const httplib::Request&, httplib::Response& r) {
    r.set_header("Cache-Control", "max-age=300");
    r.set_content(authority_.oidc_jwks(), kJson);
  });
  s.Get("/bundle", [this](const httplib::Request&, httplib::Response& r) {
    r.set_header("Cache-Control", "max-age=300");
    r.set_content(authority_.spiffe_bundle_jwks(), kJson);
  });
  s.Post("/token", [this](const httplib::Request& req, httplib::Response& r) {
    r.set_header("Cache-Control", "no-store");
    r.set_header("Pragma", "no-cache");
    if (token_endpoint_ == nullptr) {
      r.status = 404;
      r.set_content("{\"error\":\"not_found\"}", kJson);
      return;
    }
    TokenRequest request;
    request.content_type = req.get_header_value("Content-Type");
    request.body = req.body;
    request.has_query = req.target.find('?') != std::string::npos;
    size_t proofs = req.get_header_value_count("DPoP");
    for (size_t i = 0; i < proofs; ++i) {
      request.dpop_headers.push_back(req.get_header_value("DPoP", i));
    }
    TokenResponse response = token_endpoint_->Handle(request);
    r.status = response.status;
    if (!response.dpop_nonce.empty()) r.set_header("DPoP-Nonce", response.dpop_nonce);
    r.set_content(response.body, kJson);
  });
  // Prometheus text exposition format 0.0.4.
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& r) {
    std::string text;
    if (audit_ != nullptr) {
      AuditLog::Stats stats = audit_->stats();
      absl::StrAppend(&text,
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
    r.set_content(text, "text/plain; version=0.0.4; charset=utf-8");
  });
  // The newest signed checkpoints of every audit chain in the store (DESIGN.md §10), for
  // exporting elsewhere: anyone can verify them against /keys and hold the chain to them.
  s.Get("/audit/checkpoints", [this](const httplib::Request&, httplib::Response& r) {
    r.set_header("Cache-Control", "no-store");
    if (store_ == nullptr) {
      r.status = 404;
      r.set_content("{\"error\":\"not_found\"}", kJson);
      return;
    }
    absl::StatusOr<std::string> body = CheckpointsDocument();
    if (!body.ok()) {
      r.status = 503;
      r.set_content("{\"error\":\"unavailable\"}", kJson);
      return;
    }
    r.set_content(*std::move(body), kJson);
  });
  s.Get("/healthz", [](const httplib::Request&, httplib::Response& r) {
    r.set_content("{\"status\":\"ok\"}", kJson);
  });
  s.Get("/readyz", [this](const httplib::Request&, httplib::Response& r) {
    if (ready_) {
      r.set_content("{\"status\":\"ready\"}", kJson);
    } else {
      r.status = 503;
      r.set_content("{\"status\":\"starting\"}", kJson);
    }
  });
  s.set_error_handler([](const httplib::Request&, httplib::Response& r) {
    if (r.body.empty()) {
      r.set_content(absl::StrCat("{\"error\":\"", r.status == 404 ? "not_found" : "error", "\"}"),
                    kJson);
    }
  });
  if (port == 0) {
    port_ = s.bind_to_any_port(host);
    if (port_ < 0) return absl::UnavailableError(absl::StrCat("cannot bind HTTP on ", host));
  } else {
    if (!s.bind_to_port(host, port)) {
      return absl::UnavailableError(absl::StrCat("cannot bind HTTP on ", host, ":", port));
    }
    port_ = port;
  }
  return absl::OkStatus();
}

void HttpEndpoints::Stop() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace mandate::broker
