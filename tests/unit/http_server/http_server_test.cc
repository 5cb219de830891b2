// http::HttpServer on loopback: routing, what handlers see, each limit with small values, the
// worker pool keeping blocking handlers off the I/O threads, and HTTPS.
#include "broker/server/http/http_server.h"

#include <gtest/gtest.h>
#include <httplib.h>
#include <stdlib.h>
#include <sys/ioctl.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tests/integration/raw_http.h"

namespace mandate::http {
namespace {

using namespace std::chrono_literals;
using namespace ::mandate::testing_http;

class HttpServerTest : public ::testing::Test {
 protected:
  // A server on 127.0.0.1 with `limits`: GET /hello on the I/O threads, POST /echo on the pool
  // (answers the body, the DPoP values joined by '|', and whether a query was given).
  void StartServer(HttpLimits limits = {}) {
    HttpServerOptions options;
    options.io_threads = 1;
    options.worker_threads = 2;
    options.limits = limits;
    auto server = HttpServer::Create(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    server_->Route("GET", "/hello", Execution::kIoThread, [](const HttpRequest&, HttpResponse& r) {
      r.headers.emplace_back("Cache-Control", "max-age=1");
      r.body = "hi";
    });
    server_->Route(
        "POST", "/echo", Execution::kWorkerPool, [](const HttpRequest& req, HttpResponse& r) {
          std::string proofs;
          for (std::string_view v : req.HeaderValues("dpop")) {
            if (!proofs.empty()) proofs += '|';
            proofs += v;
          }
          r.content_type = "text/plain";
          r.body = absl::StrCat(std::string(req.body), ";", proofs, ";", std::string(req.path), ";",
                                req.target.find('?') != std::string_view::npos);
        });
    server_->Start();
    address_ = absl::StrCat("127.0.0.1:", server_->port());
  }

  int Raw(const std::string& request) {
    int fd = Connect(address_);
    EXPECT_GE(fd, 0);
    int status = SendAll(fd, request) ? StatusOf(ReadResponse(fd)) : 0;
    ::close(fd);
    return status;
  }

  std::unique_ptr<HttpServer> server_;
  std::string address_;
};

TEST_F(HttpServerTest, RoutesAndPassesRequestsThrough) {
  StartServer();
  httplib::Client client("127.0.0.1", server_->port());
  auto hello = client.Get("/hello?x=1");
  ASSERT_TRUE(hello);
  EXPECT_EQ(hello->status, 200);
  EXPECT_EQ(hello->body, "hi");
  EXPECT_EQ(hello->get_header_value("Cache-Control"), "max-age=1");
  EXPECT_EQ(hello->get_header_value("Content-Type"), "application/json");

  auto missing = client.Get("/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  EXPECT_EQ(missing->body, "{\"error\":\"not_found\"}");
  auto wrong_method = client.Post("/hello", "x", "text/plain");
  ASSERT_TRUE(wrong_method);
  EXPECT_EQ(wrong_method->status, 404);

  // Both DPoP values reach the handler, in order.
  httplib::Headers headers = {{"DPoP", "one"}, {"DPoP", "two"}};
  auto echo = client.Post("/echo?q", headers, "body", "text/plain");
  ASSERT_TRUE(echo);
  EXPECT_EQ(echo->status, 200);
  EXPECT_EQ(echo->body, "body;one|two;/echo;1");

  auto head = client.Head("/hello");
  ASSERT_TRUE(head);
  EXPECT_EQ(head->status, 200);
  EXPECT_EQ(head->body, "");
  EXPECT_EQ(head->get_header_value("Content-Length"), "2");
}

TEST_F(HttpServerTest, KeepsConnectionsAlive) {
  StartServer();
  int fd = Connect(address_);
  ASSERT_GE(fd, 0);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(SendAll(fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"));
    EXPECT_EQ(StatusOf(ReadResponse(fd)), 200) << "request " << i;
  }
  ::close(fd);
}

// curl sends "Expect: 100-continue" with bodies over 1 KiB and waits for the go-ahead.
TEST_F(HttpServerTest, AnswersExpectContinue) {
  StartServer();
  int fd = Connect(address_);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(
      fd, "POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"));
  char buf[64];
  ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
  ASSERT_GT(n, 0);
  EXPECT_EQ(std::string(buf, static_cast<size_t>(n)), "HTTP/1.1 100 Continue\r\n\r\n");
  ASSERT_TRUE(SendAll(fd, "abc"));
  const std::string answer = ReadResponse(fd);
  EXPECT_EQ(StatusOf(answer), 200);
  EXPECT_NE(answer.find("abc;;/echo;0"), std::string::npos) << answer;
  ::close(fd);
}

TEST_F(HttpServerTest, RefusesOversizedHeaders) {
  HttpLimits limits;
  limits.max_header_bytes = 1024;
  limits.max_header_count = 10;
  StartServer(limits);
  EXPECT_EQ(Raw("GET /hello HTTP/1.1\r\nX: " + std::string(2000, 'a') + "\r\n\r\n"), 431);
  std::string many = "GET /hello HTTP/1.1\r\n";
  for (int i = 0; i < 11; ++i) absl::StrAppend(&many, "X-", i, ": v\r\n");
  EXPECT_EQ(Raw(many + "\r\n"), 431);
  std::string ten = "GET /hello HTTP/1.1\r\n";
  for (int i = 0; i < 10; ++i) absl::StrAppend(&ten, "X-", i, ": v\r\n");
  EXPECT_EQ(Raw(ten + "\r\n"), 200);
}

TEST_F(HttpServerTest, RefusesBodiesPastTheCapEncodedOrChunked) {
  HttpLimits limits;
  limits.max_body_bytes = 100;
  StartServer(limits);
  const std::string post = "POST /echo HTTP/1.1\r\nHost: x\r\n";
  EXPECT_EQ(Raw(post + "Content-Length: 100\r\n\r\n" + std::string(100, 'a')), 200);
  EXPECT_EQ(Raw(post + "Content-Length: 101\r\n\r\n" + std::string(101, 'a')), 413);
  EXPECT_EQ(Raw(post + "Transfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"), 411);
  // Both framings: ambiguous (request smuggling), 400 whichever comes first.
  EXPECT_EQ(
      Raw(post + "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n"),
      400);
  EXPECT_EQ(
      Raw(post + "Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n1\r\na\r\n0\r\n\r\n"),
      400);
  EXPECT_EQ(Raw(post + "Transfer-Encoding: gzip\r\nContent-Length: 1\r\n\r\na"), 400);
  EXPECT_EQ(Raw(post + "Content-Encoding: gzip\r\nContent-Length: 1\r\n\r\na"), 415);
  EXPECT_EQ(Raw(post + "Content-Encoding: identity\r\nContent-Length: 1\r\n\r\na"), 200);
  EXPECT_EQ(Raw("NOT HTTP\r\n\r\n"), 400);
}

TEST_F(HttpServerTest, DeadlinesCloseSlowAndIdleConnections) {
  HttpLimits limits;
  limits.request_deadline = 300ms;
  limits.idle_timeout = 200ms;
  StartServer(limits);
  int slow = Connect(address_);
  int idle = Connect(address_);
  ASSERT_GE(slow, 0);
  ASSERT_GE(idle, 0);
  ASSERT_TRUE(SendAll(slow, "GET /hello HTTP/1.1\r\n"));
  // A byte every 50 ms keeps no connection alive past the whole-request deadline.
  bool slow_closed = false;
  for (int i = 0; i < 40 && !slow_closed; ++i) {
    std::this_thread::sleep_for(50ms);
    slow_closed = PeerClosed(slow) || !SendAll(slow, "X");
  }
  EXPECT_TRUE(slow_closed);
  EXPECT_TRUE(PeerClosed(idle));
  ::close(slow);
  ::close(idle);
}

bool EventuallyClosed(int fd) {
  for (int i = 0; i < 200; ++i) {
    if (PeerClosed(fd)) return true;
    std::this_thread::sleep_for(10ms);
  }
  return false;
}

// Past the per-address cap a connection is closed at accept, the ones before it stay open
// (accept takes them in order, so once the refused one is closed the others were counted). At
// the global cap a newcomer replaces the oldest idle connection of the address holding the most.
TEST_F(HttpServerTest, CapsConnectionsPerAddressAndReplacesAtTheGlobalCap) {
  HttpLimits limits;
  limits.max_connections = 3;
  limits.max_connections_per_ip = 2;
  StartServer(limits);
  int a = Connect(address_, "127.0.0.2");
  int b = Connect(address_, "127.0.0.2");
  int c = Connect(address_, "127.0.0.2");
  EXPECT_TRUE(EventuallyClosed(c)) << "third connection from one address";
  EXPECT_FALSE(PeerClosed(a));
  EXPECT_FALSE(PeerClosed(b));
  int d = Connect(address_, "127.0.0.3");
  int e = Connect(address_, "127.0.0.4");
  EXPECT_TRUE(EventuallyClosed(a)) << "the oldest connection of 127.0.0.2 was not replaced";
  EXPECT_FALSE(PeerClosed(b));
  EXPECT_FALSE(PeerClosed(d));
  ASSERT_TRUE(SendAll(e, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_EQ(StatusOf(ReadResponse(e)), 200) << "the newcomer was not served";
  EXPECT_EQ(server_->stats().connections_evicted, 1);
  EXPECT_EQ(server_->stats().connections_refused, 1);
  for (int fd : {a, b, c, d, e}) ::close(fd);
}

// Connections answering a request are never closed for a newcomer: when all are, it is refused.
TEST(HttpServerCapTest, RefusesWhenEveryConnectionIsAnswering) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<int> entered{0};
  HttpServerOptions options;
  options.io_threads = 1;
  options.worker_threads = 2;
  options.limits.max_connections = 2;
  auto server = HttpServer::Create(options);
  ASSERT_TRUE(server.ok());
  (*server)->Route("POST", "/block", Execution::kWorkerPool,
                   [&](const HttpRequest&, HttpResponse& r) {
                     ++entered;
                     released.wait();
                     r.body = "done";
                   });
  (*server)->Start();
  const std::string address = absl::StrCat("127.0.0.1:", (*server)->port());
  const std::string block = "POST /block HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
  int a = Connect(address, "127.0.0.2");
  int b = Connect(address, "127.0.0.3");
  ASSERT_TRUE(SendAll(a, block));
  ASSERT_TRUE(SendAll(b, block));
  while (entered < 2) std::this_thread::sleep_for(5ms);
  int c = Connect(address, "127.0.0.4");
  EXPECT_TRUE(EventuallyClosed(c)) << "a newcomer replaced a connection answering a request";
  EXPECT_EQ((*server)->stats().connections_evicted, 0);
  release.set_value();
  EXPECT_EQ(StatusOf(ReadResponse(a)), 200);
  EXPECT_EQ(StatusOf(ReadResponse(b)), 200);
  for (int fd : {a, b, c}) ::close(fd);
  (*server)->Stop();
}

// A client that does not read its answer holds the connection only until a newcomer needs the
// slot: a connection writing an answer is replaced like an idle or slow one.
TEST(HttpServerCapTest, ReplacesAConnectionWhoseClientDoesNotRead) {
  HttpServerOptions options;
  options.io_threads = 1;
  options.limits.max_connections = 1;
  auto server = HttpServer::Create(options);
  ASSERT_TRUE(server.ok());
  const std::string big(32 << 20, 'x');  // more than the socket buffers hold
  (*server)->Route("GET", "/big", Execution::kIoThread,
                   [&](const HttpRequest&, HttpResponse& r) { r.body = big; });
  (*server)->Route("GET", "/hello", Execution::kIoThread,
                   [](const HttpRequest&, HttpResponse& r) { r.body = "hi"; });
  (*server)->Start();
  const std::string address = absl::StrCat("127.0.0.1:", (*server)->port());
  int stuck = Connect(address, "127.0.0.2");
  ASSERT_GE(stuck, 0);
  ASSERT_TRUE(SendAll(stuck, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n"));  // and never read
  // Once the answer starts arriving its write is under way (and, with one I/O thread, the
  // newcomer's accept runs after the handler that started it).
  int queued = 0;
  for (int i = 0; i < 500 && queued == 0; ++i) {
    std::this_thread::sleep_for(2ms);
    ASSERT_EQ(::ioctl(stuck, FIONREAD, &queued), 0);
  }
  ASSERT_GT(queued, 0);
  int newcomer = Connect(address, "127.0.0.3");
  ASSERT_GE(newcomer, 0);
  ASSERT_TRUE(SendAll(newcomer, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"));
  EXPECT_EQ(StatusOf(ReadResponse(newcomer)), 200) << "a stuck write kept the newcomer out";
  EXPECT_EQ((*server)->stats().connections_evicted, 1);
  ::close(stuck);
  ::close(newcomer);
  (*server)->Stop();
}

TEST(ClientKeyForCapTest, Ipv6ByItsSlash64Ipv4Whole) {
  EXPECT_EQ(*ClientKeyForCap("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::/64");
  EXPECT_EQ(*ClientKeyForCap("2001:db8:1:2::1"), *ClientKeyForCap("2001:db8:1:2:ffff::9"));
  EXPECT_NE(*ClientKeyForCap("2001:db8:1:2::1"), *ClientKeyForCap("2001:db8:1:3::1"));
  EXPECT_EQ(*ClientKeyForCap("::1"), "::/64");
  EXPECT_EQ(*ClientKeyForCap("127.0.0.2"), "127.0.0.2");
  EXPECT_NE(*ClientKeyForCap("127.0.0.2"), *ClientKeyForCap("127.0.0.3"));
  // A dual-stack listener's IPv4 clients keep their whole address.
  EXPECT_EQ(*ClientKeyForCap("::ffff:192.0.2.7"), "192.0.2.7");
  EXPECT_NE(*ClientKeyForCap("::ffff:192.0.2.7"), *ClientKeyForCap("::ffff:192.0.2.8"));
  EXPECT_EQ(ClientKeyForCap("not-an-ip").status().code(), absl::StatusCode::kInvalidArgument);
}

// With one I/O thread and one worker stuck in a handler, GET /hello is still answered: blocking
// work never holds the I/O thread.
TEST(HttpServerPoolTest, BlockingHandlersDoNotHoldTheIoThreads) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> entered{false};
  HttpServerOptions options;
  options.io_threads = 1;
  options.worker_threads = 1;
  auto blocking = HttpServer::Create(options);
  ASSERT_TRUE(blocking.ok());
  (*blocking)->Route("POST", "/block", Execution::kWorkerPool,
                     [&](const HttpRequest&, HttpResponse& r) {
                       entered = true;
                       released.wait();
                       r.body = "done";
                     });
  (*blocking)->Route("GET", "/hello", Execution::kIoThread,
                     [](const HttpRequest&, HttpResponse& r) { r.body = "hi"; });
  (*blocking)->Start();
  const int port = (*blocking)->port();
  std::thread poster([port] {
    httplib::Client client("127.0.0.1", port);
    auto r = client.Post("/block", "", "text/plain");
    EXPECT_TRUE(r && r->status == 200);
  });
  while (!entered) std::this_thread::sleep_for(5ms);
  httplib::Client client("127.0.0.1", port);
  client.set_read_timeout(5, 0);
  auto hello = client.Get("/hello");
  EXPECT_TRUE(hello && hello->status == 200);
  release.set_value();
  poster.join();
  (*blocking)->Stop();
}

TEST(HttpServerTlsTest, ServesHttpsAndRefusesBadKeyFiles) {
  char tmpl[] = "/tmp/http-server-test-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const std::string cert = dir + "/cert.pem", key = dir + "/key.pem";
  const std::string command = absl::StrCat(
      "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj "
      "/CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 -keyout ",
      key, " -out ", cert, " 2>/dev/null");
  ASSERT_EQ(std::system(command.c_str()), 0);

  HttpServerOptions options;
  options.tls_cert_file = cert;
  options.tls_key_file = dir + "/missing.pem";
  EXPECT_EQ(HttpServer::Create(options).status().code(), absl::StatusCode::kInvalidArgument);

  options.tls_key_file = key;
  auto server = HttpServer::Create(options);
  ASSERT_TRUE(server.ok()) << server.status();
  (*server)->Route("GET", "/hello", Execution::kIoThread,
                   [](const HttpRequest&, HttpResponse& r) { r.body = "hi"; });
  (*server)->Start();
  httplib::SSLClient client("127.0.0.1", (*server)->port());
  client.set_ca_cert_path(cert.c_str());
  client.enable_server_certificate_verification(true);
  for (int i = 0; i < 2; ++i) {  // the second over the same connection
    auto hello = client.Get("/hello");
    ASSERT_TRUE(hello) << httplib::to_string(hello.error());
    EXPECT_EQ(hello->status, 200);
    EXPECT_EQ(hello->body, "hi");
  }
  (*server)->Stop();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace mandate::http
