// The broker's HTTP endpoints (DESIGN.md §6): OIDC discovery, JWKS, SPIFFE bundle, the OAuth
// token endpoint, health. Serves on its own threads (http::HttpServer, with its request and
// connection limits); documents are prebuilt by the TrustAuthority, token requests are answered
// by TokenEndpoint on the server's worker pool (they block on signing and the audit fsync).
#ifndef MANDATE_BROKER_SERVER_HTTP_ENDPOINTS_H_
#define MANDATE_BROKER_SERVER_HTTP_ENDPOINTS_H_

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/http/http_server.h"
#include "broker/server/metrics/metrics.h"
#include "broker/server/token_endpoint.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {

class HttpEndpoints {
 public:
  // `authority` must outlive this object.
  explicit HttpEndpoints(const TrustAuthority& authority);
  ~HttpEndpoints();

  // Binds host:port (port 0 picks a free one); port() is known afterwards. With a certificate
  // and key file it serves HTTPS. `threads` is the size of the worker pool that runs POST /token
  // and GET /audit/checkpoints, which block (the other routes answer from memory on the I/O
  // threads); `limits` bound what clients can make the server hold (http_server.h).
  absl::Status Bind(const std::string& host, int port, const std::string& tls_cert_file = "",
                    const std::string& tls_key_file = "", int threads = 64,
                    const http::HttpLimits& limits = {});
  // Starts serving on the bound socket; the discovery document names `issuer_url`. With a
  // `token_endpoint` (borrowed; must outlive Stop) POST /token is served and advertised. With an
  // `audit` log (borrowed likewise), /metrics reports its counters; with a `store`, GET
  // /audit/checkpoints publishes the newest signed audit checkpoints.
  void Serve(const std::string& issuer_url, const TokenEndpoint* token_endpoint = nullptr,
             const AuditLog* audit = nullptr, store::Store* store = nullptr);
  // With metrics (borrowed; must outlive Stop), /metrics also reports issuance and policy.
  // Call before Serve.
  void SetMetrics(const metrics::BrokerMetrics* metrics) { metrics_ = metrics; }
  int port() const { return port_; }
  void SetReady(bool ready) { ready_ = ready; }
  void Stop();

 private:
  const TrustAuthority& authority_;
  std::string discovery_;
  const TokenEndpoint* token_endpoint_ = nullptr;    // set before serving, then read-only
  const AuditLog* audit_ = nullptr;                  // likewise
  store::Store* store_ = nullptr;                    // likewise
  const metrics::BrokerMetrics* metrics_ = nullptr;  // likewise
  // GET /audit/checkpoints answers from this copy, read from the store at most once a second:
  // the endpoint is unauthenticated and the store's audit connection also takes the commits.
  std::mutex checkpoints_mu_;
  std::string checkpoints_body_;                               // GUARDED_BY(checkpoints_mu_)
  std::chrono::steady_clock::time_point checkpoints_read_at_;  // GUARDED_BY(checkpoints_mu_)
  absl::StatusOr<std::string> CheckpointsDocument();
  void AddRoutes();
  std::unique_ptr<http::HttpServer> server_;
  std::atomic<bool> ready_{false};
  int port_ = 0;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_HTTP_ENDPOINTS_H_
