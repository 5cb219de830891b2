// Shared by the external policy hook tests: certificates made in the test, free ports, a gate
// that releases slow handlers when a test ends, and timing.
#ifndef MANDATE_TESTS_UNIT_POLICY_HOOK_TEST_UTIL_H_
#define MANDATE_TESTS_UNIT_POLICY_HOOK_TEST_UTIL_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/server/policy/policy_hook.h"

namespace mandate::broker::policy::testing {

template <typename T>
T ValueOrThrow(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) throw std::runtime_error(std::string(what) + ": " + v.status().ToString());
  return *std::move(v);
}

// A CA, a server certificate (IP 127.0.0.1, DNS hook.test) and a client certificate signed by
// it, and a second CA's client certificate, as PEM files in a temporary directory removed with
// the object.
class TestPki {
 public:
  TestPki() {
    char tmpl[] = "/tmp/policy-hook-test-XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp");
    dir_ = tmpl;
    const int64_t now = ::time(nullptr);
    auto ca_key = ValueOrThrow(crypto::PrivateKey::GenerateP256(), "CA key");
    crypto::CaOptions ca_options;
    ca_options.trust_domain_id = "spiffe://hooks.test";
    ca_options.not_before = now - 3600;
    ca_options.not_after = now + 86400;
    auto ca = ValueOrThrow(crypto::CreateSelfSignedCa(ca_key, ca_options), "CA");
    Write("ca.pem", ca.Pem());
    Leaf(ca, ca_key, "spiffe://hooks.test/policy", {"hook.test"}, {"127.0.0.1"}, "server", now);
    Leaf(ca, ca_key, "spiffe://hooks.test/broker", {}, {}, "client", now);

    auto other_key = ValueOrThrow(crypto::PrivateKey::GenerateP256(), "other CA key");
    ca_options.trust_domain_id = "spiffe://other.test";
    auto other = ValueOrThrow(crypto::CreateSelfSignedCa(other_key, ca_options), "other CA");
    Write("other-ca.pem", other.Pem());
    Leaf(other, other_key, "spiffe://other.test/broker", {}, {}, "stranger", now);
  }
  ~TestPki() {
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }
  TestPki(const TestPki&) = delete;
  TestPki& operator=(const TestPki&) = delete;

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string Read(const std::string& name) const {
    return ValueOrThrow(crypto::ReadFile(Path(name)), "read PEM");
  }
  std::string ca() const { return Path("ca.pem"); }
  std::string other_ca() const { return Path("other-ca.pem"); }
  std::string server_cert() const { return Path("server.pem"); }
  std::string server_key() const { return Path("server-key.pem"); }
  std::string client_cert() const { return Path("client.pem"); }
  std::string client_key() const { return Path("client-key.pem"); }
  std::string stranger_cert() const { return Path("stranger.pem"); }
  std::string stranger_key() const { return Path("stranger-key.pem"); }

 private:
  void Write(const std::string& name, const std::string& contents) {
    auto status = crypto::WriteFileAtomic(Path(name), contents, 0600);
    if (!status.ok()) throw std::runtime_error(status.ToString());
  }
  void Leaf(const crypto::Certificate& ca, const crypto::PrivateKey& ca_key, const std::string& id,
            std::vector<std::string> dns, std::vector<std::string> ips, const std::string& name,
            int64_t now) {
    auto key = ValueOrThrow(crypto::PrivateKey::GenerateP256(), "leaf key");
    crypto::LeafOptions options;
    options.spiffe_id = id;
    options.not_before = now - 3600;
    options.not_after = now + 86400;
    options.dns_sans = std::move(dns);
    options.ip_sans = std::move(ips);
    auto cert = ValueOrThrow(crypto::SignLeaf(ca, ca_key, key.public_key(), options), "leaf");
    Write(name + ".pem", cert.Pem());
    Write(name + "-key.pem", key.ExportPemSecret());
  }
  std::string dir_;
};

// A port nothing listens on (bound and released: another process could take it, which on a
// test machine does not happen within the test).
inline int UnusedPort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot pick a port");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

// Holds slow handlers until opened (at the end of a test), at most `limit`.
class Gate {
 public:
  void Wait(std::chrono::milliseconds limit) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, limit, [&] { return open_; });
  }
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// The input every test decides: a task token for the research agent, under a task.
inline PolicyInput SampleInput() {
  PolicyInput input;
  input.kind = IssuanceKind::kTaskToken;
  input.spiffe_id = "spiffe://example.org/agent/research";
  input.node_id = "spiffe://example.org/node/n1";
  input.selectors = {"unix:uid:1000", "unix:path:/usr/bin/research"};
  input.audience = {"https://api.example.org"};
  input.scopes = {"read:docs", "write:docs"};
  input.ttl_seconds = 900;
  input.task = PolicyTask{"task-1", "summarise \"Q3\"\nreport", {"read:docs"}, {"api"}};
  input.subject = "alice";
  input.actor_chain = {"spiffe://example.org/agent/research", "spiffe://example.org/agent/boss"};
  input.time = 1'800'000'000;  // 2027-01-15T08:00:00Z
  return input;
}

inline std::chrono::steady_clock::time_point In(std::chrono::milliseconds d) {
  return std::chrono::steady_clock::now() + d;
}

template <typename F>
std::chrono::milliseconds Elapsed(F&& f) {
  auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               start);
}

inline double MedianMicros(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples.empty() ? 0 : samples[samples.size() / 2];
}

}  // namespace mandate::broker::policy::testing

#endif  // MANDATE_TESTS_UNIT_POLICY_HOOK_TEST_UTIL_H_
