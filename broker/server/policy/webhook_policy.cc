#include "broker/server/policy/webhook_policy.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netdb.h>
#include <openssl/pem.h>
#include <sys/socket.h>

#include <condition_variable>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/jose/jose.h"
#include "broker/common/log/log.h"
#include "broker/common/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace mandate::broker::policy {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxHookMessageChars = 200;
constexpr std::chrono::milliseconds kIoSlack{50};

std::string HookText(std::string_view text) {
  std::string escaped = log::EscapeForLog(text.substr(0, kMaxHookMessageChars));
  if (text.size() > kMaxHookMessageChars) escaped += "...";
  return escaped;
}

absl::Status Invalid(std::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("policy hook webhook: ", absl::string_view(message.data(), message.size())));
}

// ---------------------------------------------------------------------------- URL

struct WebhookUrl {
  bool https = false;
  std::string host;    // without IPv6 brackets: what is resolved and checked in certificates
  std::string origin;  // scheme://authority, what httplib::Client takes
  std::string target;  // path and query, at least "/"
};

absl::StatusOr<WebhookUrl> ParseWebhookUrl(absl::string_view url) {
  for (char c : url) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7F) return Invalid("the URL has a space, control or non-ASCII byte");
  }
  WebhookUrl out;
  absl::string_view rest = url;
  std::string lower = absl::AsciiStrToLower(url.substr(0, 8));
  if (lower.starts_with("https://")) {
    out.https = true;
    rest.remove_prefix(8);
  } else if (lower.starts_with("http://")) {
    rest.remove_prefix(7);
  } else {
    return Invalid("the URL must start with http:// or https://");
  }
  size_t authority_end = rest.find_first_of("/?#");
  absl::string_view authority = rest.substr(0, authority_end);
  absl::string_view target =
      authority_end == absl::string_view::npos ? absl::string_view() : rest.substr(authority_end);
  if (authority.empty() || authority.find('@') != absl::string_view::npos) {
    return Invalid("the URL needs a host and must not carry user information");
  }
  if (target.find('#') != absl::string_view::npos) return Invalid("the URL has a fragment");
  absl::string_view host = authority;
  absl::string_view port;
  if (authority.front() == '[') {
    size_t close = authority.find(']');
    if (close == absl::string_view::npos) return Invalid("the URL has an unclosed IPv6 literal");
    host = authority.substr(1, close - 1);
    absl::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return Invalid("the URL has bytes after its IPv6 literal");
      port = after.substr(1);
    }
  } else if (size_t colon = authority.find(':'); colon != absl::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
  }
  int port_number = 0;
  if (host.empty()) return Invalid("the URL has no host");
  if (!port.empty() &&
      (!absl::SimpleAtoi(port, &port_number) || port_number < 1 || port_number > 65535)) {
    return Invalid("the URL's port is not a number in 1-65535");
  }
  out.host = std::string(host);
  out.origin = absl::StrCat(out.https ? "https://" : "http://", authority);
  out.target =
      target.empty() || target.front() == '?' ? absl::StrCat("/", target) : std::string(target);
  return out;
}

bool IsIpLiteral(const std::string& host) {
  unsigned char buf[sizeof(in6_addr)];
  return ::inet_pton(AF_INET, host.c_str(), buf) == 1 ||
         ::inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

// A PEM file that holds at least one certificate (or, for keys, a private key), checked at
// construction so a typo fails the broker's start instead of every decision.
absl::Status CheckPemFile(const std::string& path, bool is_key, const char* what) {
  absl::StatusOr<std::string> pem = crypto::ReadFile(path);
  if (!pem.ok())
    return Invalid(absl::StrCat("cannot read the ", what, ": ", pem.status().message()));
  if (is_key) {
    absl::StatusOr<crypto::PrivateKey> key = crypto::PrivateKey::FromPem(*pem);
    OPENSSL_cleanse(pem->data(), pem->size());
    if (!key.ok()) return Invalid(absl::StrCat("the ", what, " holds no usable private key"));
    return absl::OkStatus();
  }
  if (!crypto::Certificate::ParsePemChain(*pem).ok()) {
    return Invalid(absl::StrCat("the ", what, " holds no PEM certificate"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------- resolver

// Resolves one host name on background threads: getaddrinfo cannot be interrupted, so a caller
// waits for it only until its deadline and a stuck lookup holds a thread of its own, not the
// caller. At most one lookup runs at a time; an address older than the TTL is still used while
// its refresh runs.
class Resolver {
 public:
  Resolver(std::string host, std::chrono::seconds ttl)
      : state_(std::make_shared<State>()), host_(std::move(host)), ttl_(ttl) {}

  absl::StatusOr<std::string> Resolve(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(state_->mu);
    const bool fresh = state_->have && Clock::now() - state_->resolved_at < ttl_;
    if (fresh) return state_->address;
    const uint64_t generation = state_->generation;
    if (!state_->in_flight) {
      state_->in_flight = true;
      std::thread([state = state_, host = host_] { Lookup(state, host); }).detach();
    }
    if (state_->have) return state_->address;  // stale, while the refresh runs
    if (!state_->cv.wait_until(lock, deadline, [&] { return state_->generation != generation; })) {
      return absl::DeadlineExceededError(absl::StrCat("policy hook webhook: resolving ",
                                                      HookText(host_), " took past the deadline"));
    }
    if (!state_->have) {
      return absl::UnavailableError(absl::StrCat("policy hook webhook: cannot resolve ",
                                                 HookText(host_), ": ", state_->error));
    }
    return state_->address;
  }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    bool in_flight ABSL_GUARDED_BY(mu) = false;
    uint64_t generation ABSL_GUARDED_BY(mu) = 0;
    bool have ABSL_GUARDED_BY(mu) = false;
    std::string address ABSL_GUARDED_BY(mu);
    Clock::time_point resolved_at ABSL_GUARDED_BY(mu);
    std::string error ABSL_GUARDED_BY(mu);
  };

  // Runs on its own thread; `state` outlives the resolver if the lookup does.
  static void Lookup(std::shared_ptr<State> state, std::string host) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* result = nullptr;
    int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &result);
    std::string address;
    std::string error;
    if (rc != 0 || result == nullptr) {
      error = rc != 0 ? ::gai_strerror(rc) : "no address";
    } else {
      char text[INET6_ADDRSTRLEN] = {};
      const void* where = result->ai_family == AF_INET6
                              ? static_cast<const void*>(
                                    &reinterpret_cast<sockaddr_in6*>(result->ai_addr)->sin6_addr)
                              : &reinterpret_cast<sockaddr_in*>(result->ai_addr)->sin_addr;
      if (::inet_ntop(result->ai_family, where, text, sizeof(text)) != nullptr) {
        address = text;
      } else {
        error = "unprintable address";
      }
    }
    if (result != nullptr) ::freeaddrinfo(result);
    std::lock_guard<std::mutex> lock(state->mu);
    if (!address.empty()) {
      state->have = true;
      state->address = std::move(address);
      state->resolved_at = Clock::now();
    } else {
      state->error = std::move(error);  // a stale address, if any, stays usable
    }
    state->in_flight = false;
    ++state->generation;
    state->cv.notify_all();
  }

  const std::shared_ptr<State> state_;
  const std::string host_;
  const std::chrono::seconds ttl_;
};

// ---------------------------------------------------------------------------- watchdog

// Shuts down the socket of a call still running at its deadline. httplib's timeouts bound each
// read and write, not the call: a hook sending a byte every few milliseconds would never trip
// them. stop() is the one httplib call documented as safe from another thread during a request.
class Watchdog {
 public:
  Watchdog() : thread_([this] { Run(); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      cv_.notify_all();
    }
    thread_.join();
  }

  uint64_t Watch(httplib::Client* client, Clock::time_point deadline) {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t id = next_id_++;
    watched_[id] = {deadline, client};
    // Wake the watchdog only when it sleeps past this deadline: most calls end long before it
    // wakes anyway, and a wake-up per decision costs a thread switch on the hot path.
    if (deadline < sleeping_until_) cv_.notify_all();
    return id;
  }

  // Ends the watch; true when the deadline had passed and the call was cut off. Once it returns
  // the watchdog no longer touches the client.
  bool Forget(uint64_t id) {
    std::unique_lock<std::mutex> lock(mu_);
    watched_.erase(id);
    cv_.wait(lock, [&] { return cutting_ != id; });
    return fired_.erase(id) > 0;
  }

 private:
  struct Watched {
    Clock::time_point deadline;
    httplib::Client* client;
  };

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      const Clock::time_point now = Clock::now();
      Clock::time_point next = now + std::chrono::seconds(60);
      auto due = watched_.end();
      for (auto it = watched_.begin(); it != watched_.end(); ++it) {
        if (it->second.deadline <= now) {
          due = it;
          break;
        }
        next = std::min(next, it->second.deadline);
      }
      if (due == watched_.end()) {
        sleeping_until_ = next;
        cv_.wait_until(lock, next);
        sleeping_until_ = Clock::time_point::min();
        continue;
      }
      const uint64_t id = due->first;
      httplib::Client* client = due->second.client;
      watched_.erase(due);
      fired_.insert(id);
      cutting_ = id;
      // stop() waits for a connect or TLS handshake in progress (bounded by its timeout), so
      // it runs without the lock; Forget(id) waits for it, so the client stays the caller's.
      lock.unlock();
      client->stop();
      lock.lock();
      cutting_ = 0;
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, Watched> watched_ ABSL_GUARDED_BY(mu_);
  std::set<uint64_t> fired_ ABSL_GUARDED_BY(mu_);
  uint64_t cutting_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // When the watchdog thread is asleep, the time it wakes at; min() while it is awake (it then
  // scans the watched calls before sleeping again, so it needs no wake-up).
  Clock::time_point sleeping_until_ ABSL_GUARDED_BY(mu_) = Clock::time_point::min();
  std::thread thread_;
};

// Sets a client's timeout setter from a duration, at least 1 ms (0 would mean "no wait").
template <typename Setter>
void SetTimeout(Setter setter, Clock::duration d) {
  auto us =
      std::max<int64_t>(1000, std::chrono::duration_cast<std::chrono::microseconds>(d).count());
  setter(static_cast<time_t>(us / 1000000), static_cast<time_t>(us % 1000000));
}

bool IsJsonContentType(absl::string_view value) {
  absl::string_view media = value.substr(0, value.find(';'));
  media = absl::StripAsciiWhitespace(media);
  return absl::EqualsIgnoreCase(media, "application/json");
}

}  // namespace

// ---------------------------------------------------------------------------- the hook

struct WebhookPolicyHook::Impl {
  WebhookPolicyOptions options;
  WebhookUrl url;
  std::unique_ptr<Resolver> resolver;  // null for an IP literal
  Watchdog watchdog;

  std::mutex mu;
  std::condition_variable returned;
  std::vector<std::unique_ptr<httplib::Client>> idle ABSL_GUARDED_BY(mu);
  size_t created ABSL_GUARDED_BY(mu) = 0;

  absl::StatusOr<std::unique_ptr<httplib::Client>> NewClient() const;
  absl::StatusOr<std::unique_ptr<httplib::Client>> Acquire(Clock::time_point deadline);
  void Release(std::unique_ptr<httplib::Client> client);
  absl::StatusOr<PolicyDecision> Call(httplib::Client& client, const std::string& body,
                                      Clock::time_point deadline, bool* retry);
};

absl::StatusOr<std::unique_ptr<httplib::Client>> WebhookPolicyHook::Impl::NewClient() const {
  std::unique_ptr<httplib::Client> client;
  try {
    client = std::make_unique<httplib::Client>(url.origin, options.client_cert_file,
                                               options.client_key_file);
  } catch (const std::exception& e) {
    return Invalid(absl::StrCat("cannot make an HTTP client: ", HookText(e.what())));
  }
  if (!client->is_valid()) {
    return Invalid("cannot make an HTTP client (unusable URL or client certificate and key)");
  }
  client->set_keep_alive(true);
  client->set_follow_location(false);  // a redirect could lead anywhere
  client->set_decompress(false);       // the answer is read as sent: no compression bombs
  client->set_compress(false);
  client->set_url_encode(false);  // the target was checked at construction and is sent as is
  client->set_tcp_nodelay(true);
  if (url.https) {
    client->enable_server_certificate_verification(true);
    if (!options.ca_file.empty()) client->set_ca_cert_path(options.ca_file);
  }
  return client;
}

absl::StatusOr<std::unique_ptr<httplib::Client>> WebhookPolicyHook::Impl::Acquire(
    Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu);
  while (idle.empty() && created >= options.max_connections) {
    if (returned.wait_until(lock, deadline) == std::cv_status::timeout && idle.empty()) {
      return absl::DeadlineExceededError(
          absl::StrCat("policy hook webhook: all ", options.max_connections,
                       " connections stayed busy until the deadline"));
    }
  }
  if (!idle.empty()) {
    // The most recently used connection: the one most likely still open.
    std::unique_ptr<httplib::Client> client = std::move(idle.back());
    idle.pop_back();
    return client;
  }
  ++created;
  lock.unlock();
  absl::StatusOr<std::unique_ptr<httplib::Client>> client = NewClient();
  if (!client.ok()) {
    lock.lock();
    --created;
    returned.notify_one();
  }
  return client;
}

void WebhookPolicyHook::Impl::Release(std::unique_ptr<httplib::Client> client) {
  std::lock_guard<std::mutex> lock(mu);
  idle.push_back(std::move(client));
  returned.notify_one();
}

absl::StatusOr<PolicyDecision> WebhookPolicyHook::Impl::Call(httplib::Client& client,
                                                             const std::string& body,
                                                             Clock::time_point deadline,
                                                             bool* retry) {
  *retry = false;
  const bool reused = client.is_socket_open();
  if (!reused && resolver != nullptr) {
    ASSIGN_OR_RETURN(std::string address, resolver->Resolve(deadline));
    client.set_hostname_addr_map({{url.host, address}});
  }
  const Clock::duration left = deadline - Clock::now();
  if (left <= Clock::duration::zero()) {
    return absl::DeadlineExceededError("policy hook webhook: the deadline passed before the call");
  }
  // Connecting and the TLS handshake each wait up to the connection timeout: half the time left
  // for each keeps both within it. Reads and writes get a little more than the time left, so
  // that a call still waiting at the deadline is ended by the watchdog and reported as such.
  SetTimeout([&](time_t s, time_t us) { client.set_connection_timeout(s, us); }, left / 2);
  SetTimeout([&](time_t s, time_t us) { client.set_read_timeout(s, us); }, left + kIoSlack);
  SetTimeout([&](time_t s, time_t us) { client.set_write_timeout(s, us); }, left + kIoSlack);

  int status = 0;
  bool too_large = false;
  bool wrong_type = false;
  std::string answer;
  httplib::Request request;
  request.method = "POST";
  request.path = url.target;
  request.headers = {{"Content-Type", "application/json"}, {"Accept", "application/json"}};
  request.body = body;
  request.response_handler = [&](const httplib::Response& response) {
    status = response.status;
    const bool success = status >= 200 && status <= 299;
    if (success && !IsJsonContentType(response.get_header_value("Content-Type"))) {
      wrong_type = true;
      return false;
    }
    // Refused from its header, before a byte of the body is read.
    const std::string length = response.get_header_value("Content-Length");
    uint64_t declared = 0;
    if (!length.empty() && absl::SimpleAtoi(length, &declared) &&
        declared > kMaxWebhookAnswerBytes) {
      too_large = true;
      return false;
    }
    return true;
  };
  request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
    if (answer.size() + size > kMaxWebhookAnswerBytes) {
      too_large = true;
      return false;
    }
    answer.append(data, size);
    return true;
  };

  httplib::Response response;
  httplib::Error error = httplib::Error::Success;
  const uint64_t watch = watchdog.Watch(&client, deadline);
  const bool sent = client.send(request, response, error);
  const bool cut_off = watchdog.Forget(watch);

  if (cut_off || (!sent && Clock::now() >= deadline)) {
    return absl::DeadlineExceededError("policy hook webhook: no answer before the deadline");
  }
  if (status != 0 && (status < 200 || status > 299)) {
    // The body (OPA's error object, perhaps cut short) helps an operator; it is not parsed.
    return absl::UnavailableError(
        absl::StrCat("policy hook webhook: answered HTTP ", status, ": ", HookText(answer)));
  }
  if (too_large) {
    return Invalid(absl::StrCat("the answer is larger than ", kMaxWebhookAnswerBytes, " bytes"));
  }
  if (wrong_type) {
    return Invalid(absl::StrCat("the answer is not application/json (Content-Type \"",
                                HookText(response.get_header_value("Content-Type")), "\")"));
  }
  if (!sent) {
    // A kept-alive connection the hook closed meanwhile fails on its first use; one more try
    // on a fresh connection, within the same deadline.
    *retry = reused && (error == httplib::Error::Read || error == httplib::Error::Write ||
                        error == httplib::Error::Connection);
    return absl::UnavailableError(
        absl::StrCat("policy hook webhook: ", url.origin, ": ", httplib::to_string(error)));
  }
  absl::StatusOr<nlohmann::json> document = jose::ParseStrictJson(answer);
  if (!document.ok()) {
    return Invalid(absl::StrCat("the answer is not JSON: ", document.status().message()));
  }
  if (!document->is_object()) return Invalid("the answer is not a JSON object");
  auto result = document->find("result");
  if (result == document->end()) {
    return Invalid("policy undefined: the answer has no \"result\" (is the URL the rule's?)");
  }
  absl::StatusOr<PolicyDecision> decision = ParsePolicyDecision(*result);
  if (!decision.ok()) {
    return Invalid(absl::StrCat("the result is not a decision: ", decision.status().message()));
  }
  return decision;
}

absl::StatusOr<std::unique_ptr<WebhookPolicyHook>> WebhookPolicyHook::Create(
    WebhookPolicyOptions options) {
  ASSIGN_OR_RETURN(WebhookUrl url, ParseWebhookUrl(options.url));
  if (options.max_connections == 0) return Invalid("max_connections must be at least 1");
  if (options.resolve_ttl.count() <= 0) return Invalid("resolve_ttl must be positive");
  const bool any_tls_file = !options.ca_file.empty() || !options.client_cert_file.empty() ||
                            !options.client_key_file.empty();
  if (!url.https && any_tls_file) return Invalid("TLS files were given for an http:// URL");
  if (options.client_cert_file.empty() != options.client_key_file.empty()) {
    return Invalid("a client certificate needs its key, and a key its certificate");
  }
  if (!options.ca_file.empty()) RETURN_IF_ERROR(CheckPemFile(options.ca_file, false, "CA file"));
  if (!options.client_cert_file.empty()) {
    RETURN_IF_ERROR(CheckPemFile(options.client_cert_file, false, "client certificate"));
    RETURN_IF_ERROR(CheckPemFile(options.client_key_file, true, "client key"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  impl->url = std::move(url);
  if (!IsIpLiteral(impl->url.host)) {
    impl->resolver = std::make_unique<Resolver>(impl->url.host, impl->options.resolve_ttl);
  }
  // One client made now checks that the library accepts the URL and the client certificate;
  // it connects on first use.
  ASSIGN_OR_RETURN(std::unique_ptr<httplib::Client> first, impl->NewClient());
  impl->idle.push_back(std::move(first));
  impl->created = 1;
  return std::unique_ptr<WebhookPolicyHook>(new WebhookPolicyHook(std::move(impl)));
}

WebhookPolicyHook::WebhookPolicyHook(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WebhookPolicyHook::~WebhookPolicyHook() = default;

absl::StatusOr<PolicyDecision> WebhookPolicyHook::Check(const PolicyInput& input,
                                                        Clock::time_point deadline) {
  if (Clock::now() >= deadline) {
    return absl::DeadlineExceededError("policy hook webhook: the deadline passed before the call");
  }
  // Agent-controlled text was checked to be UTF-8 upstream; replacing invalid bytes keeps a
  // slip there from throwing here.
  const std::string body = nlohmann::json{{"input", PolicyInputJson(input)}}.dump(
      -1, ' ', false, nlohmann::json::error_handler_t::replace);
  ASSIGN_OR_RETURN(std::unique_ptr<httplib::Client> client, impl_->Acquire(deadline));
  bool retry = false;
  absl::StatusOr<PolicyDecision> decision = impl_->Call(*client, body, deadline, &retry);
  if (!decision.ok() && retry && Clock::now() < deadline) {
    decision = impl_->Call(*client, body, deadline, &retry);
  }
  impl_->Release(std::move(client));
  return decision;
}

}  // namespace mandate::broker::policy
