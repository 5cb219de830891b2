// The broker's HTTP/1.1 server (DESIGN.md §6): an event-driven listener with hard per-request and
// per-connection limits, so no network client can make it allocate without bound or hold its
// threads. This module owns the HTTP server dependency (Boost.Beast over Asio, OpenSSL for
// HTTPS); only http_server.cc includes it, so nothing else pays for it at compile time.
//
// What a client can make the server hold (HttpLimits): the request line and headers together at
// most `max_header_bytes`, at most `max_header_count` fields, a body of at most `max_body_bytes`
// with a Content-Length (Transfer-Encoding is refused with 411: every client of the broker sends a
// length; with 400 when Content-Length comes with it, an ambiguous framing), never decompressed (a
// Content-Encoding other than identity is refused with 415). A request must arrive whole within
// `request_deadline` of its first byte, an idle keep-alive connection is closed after
// `idle_timeout`, a response must be written within `write_deadline`. A connection past
// `max_connections_per_ip` from one address (IPv4: the address, IPv6: its /64) is closed at accept
// without reading from it. At `max_connections` a new connection replaces one whose handler is not
// running (idle, with a request not yet read whole, or writing an answer): the one longest in that
// state at the address holding the most connections, closed on its strand; only when every
// connection's handler is running is the new one closed at accept. So a flood of slow or idle
// connections cannot lock newcomers out, and the memory the server holds for clients is bounded by
// connections x (read buffer + header copy + body + answer): about 100 KiB each with the defaults
// (~50 KiB more for OpenSSL with HTTPS), ~100 MiB for the default 1024 connections
// (docs/operator-guide.md, "HTTP listener limits").
//
// Refusals are answered with a JSON body {"error":"..."} and `Connection: close`:
//   400 bad_request (malformed request; Transfer-Encoding with Content-Length),
//   411 length_required (Transfer-Encoding),
//   413 payload_too_large, 415 unsupported_media_type (Content-Encoding),
//   431 request_header_fields_too_large (header bytes or count), 404 not_found (no route).
// A deadline that passes closes the connection without an answer.
//
// Threading: `io_threads` threads run every socket; handlers registered with
// Execution::kIoThread run there and must not block (they answer from memory). Handlers
// registered with Execution::kWorkerPool run on a pool of `worker_threads` threads (they may
// block, e.g. on an fsync) and their answers are written back by the I/O threads. At most one
// request per connection is in flight (no pipelining), so the pool's queue is bounded by the
// connection cap.
#ifndef MANDATE_BROKER_SERVER_HTTP_HTTP_SERVER_H_
#define MANDATE_BROKER_SERVER_HTTP_HTTP_SERVER_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace mandate::http {

struct HttpLimits {
  // Request line plus every header line, bytes (431 past it).
  size_t max_header_bytes = 16 * 1024;
  // Header fields per request (431 past it).
  size_t max_header_count = 100;
  // Request body, bytes (413 past it, judged from Content-Length before reading the body).
  size_t max_body_bytes = 64 * 1024;
  // From the first byte of a request until it is read whole (and, for HTTPS, from accept until
  // the handshake is done). Closes the connection when it passes.
  std::chrono::milliseconds request_deadline{5000};
  // How long a connection may wait for the first byte of its next request.
  std::chrono::milliseconds idle_timeout{2000};
  // How long writing one response may take.
  std::chrono::milliseconds write_deadline{5000};
  // Requests answered on one connection before it is closed (keep-alive recycling).
  int max_requests_per_connection = 1000;
  // Open connections from one IP address (IPv6: one /64): past it, a new connection is closed at
  // accept. In all: at it, a new connection replaces an idle or slow one (see the top of file).
  int max_connections = 1024;
  int max_connections_per_ip = 64;
};

struct HttpHeader {
  std::string_view name;  // as received
  std::string_view value;
};

// One request, valid only during the handler's call.
struct HttpRequest {
  std::string_view method;  // e.g. "GET"
  std::string_view target;  // e.g. "/token?x=1"
  std::string_view path;    // target up to '?'
  std::span<const HttpHeader> headers;
  std::string_view body;

  // The first value of header `name` (case-insensitive), "" when absent.
  std::string_view Header(std::string_view name) const;
  // Every value of header `name`, in order received.
  std::vector<std::string_view> HeaderValues(std::string_view name) const;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::vector<std::pair<std::string, std::string>> headers;  // besides Content-Type/-Length
  std::string body;
};

using HttpHandler = std::function<void(const HttpRequest&, HttpResponse&)>;

enum class Execution {
  kIoThread,    // cheap, never blocks
  kWorkerPool,  // may block
};

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;               // 0 picks a free port
  std::string tls_cert_file;  // both set: HTTPS (PEM files)
  std::string tls_key_file;
  int io_threads = 2;
  int worker_threads = 64;
  HttpLimits limits;
};

// What the server has refused or cut off since it started, and what it holds now (for /metrics).
struct HttpServerStats {
  int64_t connections_open = 0;
  int64_t connections_refused = 0;  // closed at accept: the per-address cap, or the global cap
                                    // with every connection's handler running
  int64_t connections_evicted = 0;  // closed at the global cap to make room for a new one
  int64_t requests_refused = 0;     // answered 400/411/413/415/431 by the limits
  int64_t deadlines_missed = 0;     // closed: a request not read, or an answer not written, in time
};

// The key the per-address cap counts a client at `ip` under, printed: an IPv4 address whole
// ("127.0.0.2", also for IPv4-mapped IPv6), an IPv6 address by its /64 ("2001:db8:1:2::/64"): one
// holder of a /64, the smallest block a site is usually given, can use any of its addresses.
// InvalidArgument when `ip` is not an IP address.
absl::StatusOr<std::string> ClientKeyForCap(std::string_view ip);

// Thread-safety: Route before Start only; Start and Stop from one thread; handlers are called
// concurrently from several threads; stats() from any thread.
class HttpServer {
 public:
  // Binds (and loads the TLS files, if given). InvalidArgument for unusable TLS files or
  // options, Unavailable when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Create(HttpServerOptions options);
  ~HttpServer();  // Stops.
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Serves `method` `path` (exact match on the path, the query ignored). A GET route also
  // answers HEAD, without the body.
  void Route(std::string_view method, std::string_view path, Execution execution,
             HttpHandler handler);
  // Starts accepting. Handlers (and what they borrow) must stay valid until Stop returns.
  void Start();
  // Stops accepting, closes every connection, and waits for running handlers. Idempotent.
  void Stop();
  int port() const;
  HttpServerStats stats() const;

 private:
  struct Impl;
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mandate::http

#endif  // MANDATE_BROKER_SERVER_HTTP_HTTP_SERVER_H_
