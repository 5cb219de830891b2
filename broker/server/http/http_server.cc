// The only translation unit that includes Boost.Beast and Asio (see http_server.h).
#include "broker/server/http/http_server.h"

#include <openssl/ssl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <cstdint>
#include <exception>
#include <map>
#include <optional>
#include <thread>
#include <type_traits>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace mandate::http {
namespace {

// ASCII case-insensitive equality (absl's takes absl::string_view, not std's, on this system).
bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return absl::ascii_tolower(static_cast<unsigned char>(x)) ==
                  absl::ascii_tolower(static_cast<unsigned char>(y));
         });
}

std::string_view TrimSpaces(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

}  // namespace

std::string_view HttpRequest::Header(std::string_view name) const {
  for (const HttpHeader& h : headers) {
    if (EqualsIgnoreCase(h.name, name)) return h.value;
  }
  return {};
}

std::vector<std::string_view> HttpRequest::HeaderValues(std::string_view name) const {
  std::vector<std::string_view> values;
  for (const HttpHeader& h : headers) {
    if (EqualsIgnoreCase(h.name, name)) values.push_back(h.value);
  }
  return values;
}

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;
using beast::error_code;

// After a refusal the server stops reading requests, but reads and discards what the client is
// still sending for a moment before closing: closing with unread data makes the kernel send a
// reset, which can destroy the refusal before the client reads it.
constexpr size_t kDrainMaxBytes = 256 * 1024;
constexpr std::chrono::milliseconds kDrainTime{1000};
// The first read of a request (its first byte ends the idle wait).
constexpr size_t kFirstReadBytes = 4096;
// Delay before accepting again after accept itself failed (e.g. out of descriptors).
constexpr std::chrono::milliseconds kAcceptRetry{50};

// One request as parsed, reused across the requests of a connection. Field names and values are
// copied back to back into one buffer, so a request costs a few allocations, not one per field.
struct RequestData {
  struct FieldAt {
    uint32_t name_at, name_size, value_at, value_size;
  };
  std::string method;
  std::string target;
  int version = 11;
  std::string field_bytes;
  std::vector<FieldAt> fields;
  std::vector<HttpHeader> headers;  // views into field_bytes, made once parsing is done
  std::string body;
  int refusal = 0;                // an HTTP status decided while parsing; 0: none
  bool expects_continue = false;  // "Expect: 100-continue"

  void Clear() {
    method.clear();
    target.clear();
    field_bytes.clear();
    fields.clear();
    headers.clear();
    body.clear();
    refusal = 0;
    expects_continue = false;
  }

  HttpRequest View() {
    headers.clear();
    for (const FieldAt& f : fields) {
      headers.push_back({std::string_view(field_bytes).substr(f.name_at, f.name_size),
                         std::string_view(field_bytes).substr(f.value_at, f.value_size)});
    }
    HttpRequest view;
    view.method = method;
    view.target = target;
    view.path = std::string_view(target).substr(0, target.find('?'));
    view.headers = headers;
    view.body = body;
    return view;
  }
};

// Beast's parser with the broker's rules: fields counted as they arrive, Transfer-Encoding (411;
// 400 together with Content-Length) and any Content-Encoding but identity (415) refused once the
// header is complete (before any body byte).
// The header byte limit and the body limit are Beast's own (header_limit, body_limit).
class RequestParser final : public bhttp::basic_parser<true> {
 public:
  RequestParser(const HttpLimits& limits, RequestData& data) : limits_(limits), data_(data) {
    header_limit(static_cast<std::uint32_t>(std::min<size_t>(limits.max_header_bytes, UINT32_MAX)));
    body_limit(limits.max_body_bytes);
    data_.Clear();
  }

 private:
  void on_request_impl(bhttp::verb, beast::string_view method, beast::string_view target,
                       int version, error_code&) override {
    data_.method.assign(method.data(), method.size());
    data_.target.assign(target.data(), target.size());
    data_.version = version;
  }

  void on_response_impl(int, beast::string_view, int, error_code& ec) override {
    ec = bhttp::error::bad_version;  // never called for a request parser
  }

  void on_field_impl(bhttp::field name, beast::string_view name_string, beast::string_view value,
                     error_code& ec) override {
    if (data_.fields.size() >= limits_.max_header_count) {
      data_.refusal = 431;
      ec = bhttp::error::header_limit;
      return;
    }
    if (name == bhttp::field::transfer_encoding) {
      saw_transfer_encoding_ = true;
    } else if (name == bhttp::field::content_length) {
      saw_content_length_ = true;
    } else if (name == bhttp::field::content_encoding &&
               !EqualsIgnoreCase(TrimSpaces(value), "identity")) {
      saw_content_encoding_ = true;
    } else if (name == bhttp::field::expect &&
               EqualsIgnoreCase(TrimSpaces(value), "100-continue")) {
      data_.expects_continue = true;
    }
    RequestData::FieldAt at;
    at.name_at = static_cast<uint32_t>(data_.field_bytes.size());
    at.name_size = static_cast<uint32_t>(name_string.size());
    data_.field_bytes.append(name_string.data(), name_string.size());
    at.value_at = static_cast<uint32_t>(data_.field_bytes.size());
    at.value_size = static_cast<uint32_t>(value.size());
    data_.field_bytes.append(value.data(), value.size());
    data_.fields.push_back(at);
  }

  void on_header_impl(error_code& ec) override {
    // Both framings at once is ambiguous (a request smuggling attempt, RFC 9112 §6.3): 400, as
    // Beast itself answers when the two come in the order it checks.
    if (saw_transfer_encoding_ && saw_content_length_) {
      data_.refusal = 400;
    } else if (saw_transfer_encoding_) {
      data_.refusal = 411;
    } else if (saw_content_encoding_) {
      data_.refusal = 415;
    }
    if (data_.refusal != 0) ec = bhttp::error::bad_value;
  }

  void on_body_init_impl(const boost::optional<std::uint64_t>& content_length,
                         error_code&) override {
    // Beast has already refused a length over body_limit.
    if (content_length) data_.body.reserve(static_cast<size_t>(*content_length));
  }

  size_t on_body_impl(beast::string_view body, error_code&) override {
    data_.body.append(body.data(), body.size());
    return body.size();
  }

  // Unreachable: Transfer-Encoding is refused in on_header_impl.
  void on_chunk_header_impl(std::uint64_t, beast::string_view, error_code& ec) override {
    ec = bhttp::error::bad_transfer_encoding;
  }
  size_t on_chunk_body_impl(std::uint64_t, beast::string_view, error_code& ec) override {
    ec = bhttp::error::bad_transfer_encoding;
    return 0;
  }

  void on_finish_impl(error_code&) override {}

  const HttpLimits& limits_;
  RequestData& data_;
  bool saw_transfer_encoding_ = false;
  bool saw_content_length_ = false;
  bool saw_content_encoding_ = false;
};

const char* ErrorName(int status) {
  switch (status) {
    case 400:
      return "bad_request";
    case 404:
      return "not_found";
    case 411:
      return "length_required";
    case 413:
      return "payload_too_large";
    case 415:
      return "unsupported_media_type";
    case 431:
      return "request_header_fields_too_large";
    default:
      return "server_error";
  }
}

void SetError(int status, HttpResponse& response) {
  response.status = status;
  response.content_type = "application/json";
  response.headers.clear();
  response.body = absl::StrCat("{\"error\":\"", ErrorName(status), "\"}");
}

// The status that answers a failed read, or 0 when the connection just ends (the peer left, a
// deadline passed, the server stops).
int StatusForReadError(const error_code& ec, const RequestData& data) {
  if (data.refusal != 0) return data.refusal;
  if (ec == bhttp::error::header_limit || ec == bhttp::error::buffer_overflow) return 431;
  if (ec == bhttp::error::body_limit) return 413;
  if (ec == bhttp::error::end_of_stream || ec == bhttp::error::partial_message) return 0;
  if (ec.category() == bhttp::make_error_code(bhttp::error::bad_target).category())
    return 400;  // malformed request
  return 0;
}

// IPv4 addresses as IPv4-mapped IPv6, so one key type serves both.
using IpKey = std::array<unsigned char, 16>;

// The key the per-address cap counts a client under (see ClientKeyForCap in the header).
IpKey KeyOf(const asio::ip::address& address) {
  if (address.is_v4()) {
    return asio::ip::make_address_v6(asio::ip::v4_mapped, address.to_v4()).to_bytes();
  }
  IpKey key = address.to_v6().to_bytes();
  // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: those keep their whole address.
  if (!address.to_v6().is_v4_mapped()) std::fill(key.begin() + 8, key.end(), 0);
  return key;
}

// What a connection is doing, for choosing which one to close at the global cap: its phase and
// when that phase began, packed in one word so that a reader on another thread sees a matching
// pair. Written on the connection's strand (and, once, by the pool thread that starts writing an
// answer: Advance), read by the accept path and by the eviction on the strand.
class ConnectionActivity {
 public:
  enum class Phase : uint64_t {
    kIdle = 0,       // waiting for the first byte of a request (new or kept-alive connection)
    kReading = 1,    // a request (or the TLS handshake) begun but not read whole, or the
                     // discarding of what a refused client still sends
    kAnswering = 2,  // a request being handled (maybe on a pool thread): never evicted
    kWriting = 3,    // its answer being written (a client not reading it holds it up to the
                     // write deadline): evictable
  };
  struct Snapshot {
    Phase phase;
    uint64_t since;  // when the phase began (steady clock, nanoseconds)
  };

  ConnectionActivity() { Set(Phase::kIdle); }

  // Returns the word stored, for Advance.
  uint64_t Set(Phase phase) {
    const uint64_t word = Word(phase);
    state_.store(word, std::memory_order_release);
    return word;
  }
  // Moves to `phase` only if nothing was Set since `from` (the value a Set returned).
  void Advance(uint64_t from, Phase phase) {
    state_.compare_exchange_strong(from, Word(phase), std::memory_order_acq_rel);
  }
  Snapshot Load() const {
    const uint64_t word = state_.load(std::memory_order_acquire);
    return {static_cast<Phase>(word & 3), word >> 2};
  }

 private:
  static uint64_t Word(Phase phase) {
    const auto now = std::chrono::steady_clock::now().time_since_epoch();
    const auto nanos =
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(now).count());
    return (nanos << 2) | static_cast<uint64_t>(phase);
  }

  std::atomic<uint64_t> state_{0};
};

// A connection the table may close to make room for a new one.
class Evictable {
 public:
  virtual ~Evictable() = default;
  // From any thread: closes the connection on its strand (after its answer, if by then a request
  // is being handled).
  virtual void Evict() = 0;
};

// Open connections, in all and per address, and what each is doing. Thread-safe. Its mutex is
// held to count, and only at the global cap for one pass over the connections to pick a victim
// (phases are read from ConnectionActivity's atomics, no session is touched under the mutex).
class ConnectionTable {
 public:
  struct Admission {
    bool admitted = false;
    uint64_t id = 0;  // when admitted: for Attach and Remove
    // When admitted at the global cap: the connection it replaces, already uncounted, which the
    // caller must Evict (outside the table's lock).
    std::weak_ptr<Evictable> replaces;
  };

  ConnectionTable(int max_total, int max_per_ip) : max_total_(max_total), max_per_ip_(max_per_ip) {}

  // Counts a new connection from `ip` whose phases `activity` tracks. Past the per-address cap it
  // is refused. At the global cap it replaces the connection whose handler is not running from
  // the address holding the most connections, the longest in its phase among those (an idle or
  // slow one, or one writing an answer), or is refused when every connection's handler is running.
  Admission Admit(const IpKey& ip, std::shared_ptr<const ConnectionActivity> activity) {
    absl::MutexLock lock(&mu_);
    if (auto from_ip = per_ip_.find(ip); from_ip != per_ip_.end() && from_ip->second >= max_per_ip_)
      return {};
    Admission admission;
    if (static_cast<int>(entries_.size()) >= max_total_) {
      auto victim = PickVictimLocked();
      if (victim == entries_.end()) return {};
      admission.replaces = victim->second.session;
      EraseLocked(victim);
    }
    admission.admitted = true;
    admission.id = next_id_++;
    entries_.emplace(admission.id, Entry{ip, std::move(activity), {}});
    ++per_ip_[ip];
    return admission;
  }

  // The session serving admitted connection `id`; until then the connection is never a victim.
  void Attach(uint64_t id, std::weak_ptr<Evictable> session) {
    absl::MutexLock lock(&mu_);
    if (auto it = entries_.find(id); it != entries_.end()) it->second.session = std::move(session);
  }

  // Connection `id` closed (nothing to do when it was replaced: it was uncounted then).
  void Remove(uint64_t id) {
    absl::MutexLock lock(&mu_);
    if (auto it = entries_.find(id); it != entries_.end()) EraseLocked(it);
  }

 private:
  struct Entry {
    IpKey ip;
    std::shared_ptr<const ConnectionActivity> activity;
    std::weak_ptr<Evictable> session;
  };
  using Entries = std::map<uint64_t, Entry>;

  Entries::iterator PickVictimLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto best = entries_.end();
    int best_count = 0;
    uint64_t best_since = 0;
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      const Entry& e = it->second;
      const ConnectionActivity::Snapshot activity = e.activity->Load();
      if (e.session.expired() || activity.phase == ConnectionActivity::Phase::kAnswering) continue;
      const int count = per_ip_[e.ip];
      const uint64_t since = activity.since;
      if (best == entries_.end() || count > best_count ||
          (count == best_count && since < best_since)) {
        best = it;
        best_count = count;
        best_since = since;
      }
    }
    return best;
  }

  void EraseLocked(Entries::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto from_ip = per_ip_.find(it->second.ip);
    if (from_ip != per_ip_.end() && --from_ip->second <= 0) per_ip_.erase(from_ip);
    entries_.erase(it);
  }

  const int max_total_;
  const int max_per_ip_;
  absl::Mutex mu_;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  Entries entries_ ABSL_GUARDED_BY(mu_);  // by id: in the order admitted
  std::map<IpKey, int> per_ip_ ABSL_GUARDED_BY(mu_);
};

struct Route {
  std::string method;
  std::string path;
  Execution execution;
  HttpHandler handler;
};

// Everything the sessions share. Member order matters: the io_context is destroyed (taking the
// sessions it still holds with it) before the routes, the TLS context and the table they use.
struct ServerCore {
  HttpServerOptions options;
  std::vector<Route> routes;
  std::optional<ConnectionTable> connections;
  std::optional<asio::ssl::context> tls;
  std::unique_ptr<asio::thread_pool> workers;
  std::unique_ptr<asio::io_context> io;
  std::unique_ptr<tcp::acceptor> acceptor;
  std::unique_ptr<asio::steady_timer> accept_retry;
  std::vector<std::thread> io_threads;
  int port = 0;
  bool started = false;
  bool stopped = false;
  std::atomic<int64_t> open{0};
  std::atomic<int64_t> refused_at_accept{0};
  std::atomic<int64_t> evicted{0};
  std::atomic<int64_t> requests_refused{0};
  std::atomic<int64_t> deadlines_missed{0};

  // The route for `method` `path`; HEAD uses GET's (`*head` set). nullptr when none.
  const Route* Find(std::string_view method, std::string_view path, bool* head) const {
    *head = method == "HEAD";
    if (*head) method = "GET";
    for (const Route& r : routes) {
      if (r.method == method && r.path == path) return &r;
    }
    return nullptr;
  }

  void Accept();
};

// One connection: waits for a request (idle_timeout), reads it whole (request_deadline), runs
// its handler (here or on the worker pool), writes the answer (write_deadline), and again while
// keep-alive lasts. Every completion runs on the connection's strand; while a handler runs on the
// pool no operation is pending on the connection, so the request and response need no lock, and
// the pool thread itself starts the write of its answer.
//
// The session tells its ConnectionActivity what it is doing, on its strand; Evict posts the close
// to the strand, and a session whose handler is running is closed only once its answer is written.
template <class Stream>
class Session final : public Evictable, public std::enable_shared_from_this<Session<Stream>> {
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
  using Phase = ConnectionActivity::Phase;

 public:
  template <class... StreamArgs>
  Session(ServerCore& core, uint64_t id, std::shared_ptr<ConnectionActivity> activity,
          StreamArgs&&... stream_args)
      : core_(core),
        limits_(core.options.limits),
        id_(id),
        activity_(std::move(activity)),
        stream_(std::forward<StreamArgs>(stream_args)...),
        strand_(tcp().get_executor()),
        buffer_(std::max<size_t>(limits_.max_header_bytes, kFirstReadBytes) + kFirstReadBytes) {
    core_.open.fetch_add(1);
  }

  ~Session() override {
    core_.open.fetch_sub(1);
    core_.connections->Remove(id_);
  }

  void Start() {
    asio::dispatch(strand_, [self = this->shared_from_this()] { self->Begin(); });
  }

  void Evict() override {
    asio::post(strand_, [self = this->shared_from_this()] { self->OnEvicted(); });
  }

 private:
  beast::tcp_stream& tcp() { return beast::get_lowest_layer(stream_); }

  // An idle connection closed after idle_timeout is normal; these are not.
  void CountDeadline(const error_code& ec) {
    if (ec == beast::error::timeout) core_.deadlines_missed.fetch_add(1);
  }

  void Begin() {
    if constexpr (kTls) {
      activity_->Set(Phase::kReading);
      tcp().expires_after(limits_.request_deadline);
      stream_.async_handshake(asio::ssl::stream_base::server,
                              [self = this->shared_from_this()](error_code ec) {
                                if (!ec) {
                                  self->AwaitRequest();
                                } else {
                                  self->CountDeadline(ec);
                                }
                              });
    } else {
      AwaitRequest();
    }
  }

  // The idle wait: until the first byte of the next request.
  void AwaitRequest() {
    if (buffer_.size() > 0) {
      ReadRequest();
      return;
    }
    activity_->Set(Phase::kIdle);
    tcp().expires_after(limits_.idle_timeout);
    stream_.async_read_some(buffer_.prepare(kFirstReadBytes),
                            [self = this->shared_from_this()](error_code ec, size_t n) {
                              if (ec) return;  // idle timeout, peer gone, or stopping
                              self->buffer_.commit(n);
                              self->ReadRequest();
                            });
  }

  // The header, then (after "100 Continue" when the client waits for it) the body, all before
  // one deadline: tcp_stream's expiry is a point in time that holds for every operation.
  void ReadRequest() {
    activity_->Set(Phase::kReading);
    parser_.emplace(limits_, request_);
    tcp().expires_after(limits_.request_deadline);
    bhttp::async_read_header(stream_, buffer_, *parser_,
                             [self = this->shared_from_this()](error_code ec, size_t) {
                               if (ec || self->parser_->is_done()) {
                                 self->OnRead(ec);
                               } else if (self->request_.expects_continue) {
                                 self->SendContinue();
                               } else {
                                 self->ReadBody();
                               }
                             });
  }

  void SendContinue() {
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    asio::async_write(stream_, asio::buffer(kContinue.data(), kContinue.size()),
                      [self = this->shared_from_this()](error_code ec, size_t) {
                        if (!ec) self->ReadBody();
                      });
  }

  void ReadBody() {
    bhttp::async_read(
        stream_, buffer_, *parser_,
        [self = this->shared_from_this()](error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(error_code ec) {
    answering_since_ = activity_->Set(Phase::kAnswering);
    response_ = HttpResponse{};
    if (ec) {
      CountDeadline(ec);
      int status = StatusForReadError(ec, request_);
      if (status == 0) return;  // the connection ends
      core_.requests_refused.fetch_add(1);
      SetError(status, response_);
      head_ = false;
      closing_ = true;
      refused_ = true;
      Write();
      return;
    }
    ++requests_;
    closing_ = !parser_->keep_alive() || requests_ >= limits_.max_requests_per_connection;
    view_ = request_.View();
    const Route* route = core_.Find(view_.method, view_.path, &head_);
    if (route == nullptr) {
      SetError(404, response_);
      Write();
      return;
    }
    if (route->execution == Execution::kIoThread) {
      RunHandler(*route);
      Write();
      return;
    }
    asio::post(*core_.workers, [self = this->shared_from_this(), route] {
      self->RunHandler(*route);
      // Started here, not posted back to the strand: no operation is pending on the connection,
      // so this thread may start the write, and Asio's first attempt at it (a non-blocking send)
      // puts the answer on the wire without waiting for an I/O thread to wake. Its completion
      // runs on the strand.
      self->Write();
    });
  }

  void RunHandler(const Route& route) {
    try {
      route.handler(view_, response_);
    } catch (const std::exception&) {
      SetError(500, response_);
    }
  }

  void Write() {
    response_message_ = {};
    response_message_.version(request_.version == 10 ? 10 : 11);
    response_message_.result(static_cast<unsigned>(response_.status));
    if (!response_.content_type.empty()) {
      response_message_.set(bhttp::field::content_type, response_.content_type);
    }
    for (const auto& [name, value] : response_.headers) response_message_.insert(name, value);
    response_message_.keep_alive(!closing_);
    const size_t length = response_.body.size();
    if (!head_) response_message_.body() = std::move(response_.body);
    response_message_.content_length(length);
    // Read before the write starts: after that, the strand may already be on the next request.
    const uint64_t answering_since = answering_since_;
    tcp().expires_after(limits_.write_deadline);
    bhttp::async_write(stream_, response_message_,
                       [self = this->shared_from_this()](error_code ec, size_t) {
                         if (ec) {
                           self->CountDeadline(ec);
                           return;
                         }
                         if (!self->closing_ && !self->evicted_) {
                           self->AwaitRequest();
                         } else {
                           self->Close();
                         }
                       });
    // Only now evictable: an eviction (on the strand) that sees kWriting closes the socket, which
    // must not happen while this thread is still starting the write. Advance leaves a phase the
    // strand has set since (the write may have completed already) alone.
    activity_->Advance(answering_since, Phase::kWriting);
  }

  // Ends the connection after its last answer; after a refusal, first discards what the client
  // is still sending (kDrainMaxBytes, kDrainTime) so the refusal reaches it.
  void Close() {
    error_code ignored;
    if constexpr (!kTls) tcp().socket().shutdown(tcp::socket::shutdown_send, ignored);
    if (!refused_ || evicted_) return;
    activity_->Set(Phase::kReading);  // evictable: the refusal is written
    tcp().expires_after(kDrainTime);
    buffer_.clear();
    Drain();
  }

  void Drain() {
    stream_.async_read_some(buffer_.prepare(kFirstReadBytes),
                            [self = this->shared_from_this()](error_code ec, size_t n) {
                              self->drained_ += n;
                              if (ec || self->drained_ >= kDrainMaxBytes) return;
                              self->Drain();
                            });
  }

  // On the strand. A connection whose handler is running is closed once the answer is written; any
  // other closes now (its pending read completes with operation_aborted, which ends it).
  void OnEvicted() {
    evicted_ = true;
    if (activity_->Load().phase == Phase::kAnswering) return;
    error_code ignored;
    tcp().socket().close(ignored);
  }

  ServerCore& core_;
  const HttpLimits& limits_;
  const uint64_t id_;
  const std::shared_ptr<ConnectionActivity> activity_;
  Stream stream_;
  const typename beast::tcp_stream::executor_type strand_;  // the connection's strand
  beast::flat_buffer buffer_;  // bounded: a header past max_header_bytes fails the read
  std::optional<RequestParser> parser_;
  RequestData request_;
  HttpRequest view_;
  HttpResponse response_;
  bhttp::response<bhttp::string_body> response_message_;
  int requests_ = 0;
  bool head_ = false;
  bool closing_ = false;
  bool refused_ = false;
  bool evicted_ = false;          // on the strand
  uint64_t answering_since_ = 0;  // set on the strand before the handler runs, for Advance
  size_t drained_ = 0;
};

void ServerCore::Accept() {
  acceptor->async_accept(asio::make_strand(*io), [this](error_code ec, tcp::socket socket) {
    if (ec == asio::error::operation_aborted) return;  // stopping
    if (ec) {
      accept_retry->expires_after(kAcceptRetry);
      accept_retry->async_wait([this](error_code wait_ec) {
        if (!wait_ec) Accept();
      });
      return;
    }
    error_code endpoint_ec;
    tcp::endpoint peer = socket.remote_endpoint(endpoint_ec);
    if (!endpoint_ec) {
      auto activity = std::make_shared<ConnectionActivity>();
      ConnectionTable::Admission admission = connections->Admit(KeyOf(peer.address()), activity);
      if (!admission.admitted) {
        // Closed here (socket's destructor), never read.
        refused_at_accept.fetch_add(1);
      } else {
        if (std::shared_ptr<Evictable> replaced = admission.replaces.lock()) {
          evicted.fetch_add(1);
          replaced->Evict();
        }
        error_code ignored;
        // Answers are written as header + body: without TCP_NODELAY, Nagle plus the client's
        // delayed ACK would stall keep-alive requests by ~40 ms.
        socket.set_option(tcp::no_delay(true), ignored);
        auto start = [&](auto session) {
          connections->Attach(admission.id, session);
          session->Start();
        };
        if (tls) {
          start(std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(
              *this, admission.id, std::move(activity), std::move(socket), *tls));
        } else {
          start(std::make_shared<Session<beast::tcp_stream>>(
              *this, admission.id, std::move(activity), std::move(socket)));
        }
      }
    }
    Accept();
  });
}

}  // namespace

struct HttpServer::Impl : ServerCore {};

HttpServer::HttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

HttpServer::~HttpServer() { Stop(); }

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Create(HttpServerOptions options) {
  const HttpLimits& l = options.limits;
  if (options.io_threads < 1 || options.worker_threads < 1 || l.max_header_bytes < 256 ||
      l.max_header_count < 1 || l.max_connections < 1 || l.max_connections_per_ip < 1 ||
      l.max_requests_per_connection < 1) {
    return absl::InvalidArgumentError("HTTP server: every limit and thread count must be positive");
  }
  auto impl = std::make_unique<Impl>();
  impl->options = std::move(options);
  const HttpServerOptions& o = impl->options;
  impl->connections.emplace(o.limits.max_connections, o.limits.max_connections_per_ip);
  if (!o.tls_cert_file.empty() || !o.tls_key_file.empty()) {
    impl->tls.emplace(asio::ssl::context::tls_server);
    asio::ssl::context& tls = *impl->tls;
    error_code ec;
    tls.set_options(asio::ssl::context::default_workarounds | asio::ssl::context::no_sslv2 |
                        asio::ssl::context::no_sslv3 | asio::ssl::context::single_dh_use,
                    ec);
    SSL_CTX_set_min_proto_version(tls.native_handle(), TLS1_2_VERSION);
    if (!ec) tls.use_certificate_chain_file(o.tls_cert_file, ec);
    if (!ec) tls.use_private_key_file(o.tls_key_file, asio::ssl::context::pem, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat("cannot load --http-tls-cert ",
                                                     o.tls_cert_file, " / --http-tls-key ",
                                                     o.tls_key_file, ": ", ec.message()));
    }
  }
  impl->workers = std::make_unique<asio::thread_pool>(o.worker_threads);
  impl->io = std::make_unique<asio::io_context>(o.io_threads);
  impl->accept_retry = std::make_unique<asio::steady_timer>(*impl->io);
  error_code ec;
  asio::ip::address address = asio::ip::make_address(o.host, ec);
  if (ec) {
    // A name, not an address: resolve it (e.g. "localhost").
    tcp::resolver resolver(*impl->io);
    auto results = resolver.resolve(o.host, "", ec);
    if (ec || results.empty()) {
      return absl::UnavailableError(absl::StrCat("cannot bind HTTP on ", o.host));
    }
    address = results.begin()->endpoint().address();
  }
  const tcp::endpoint endpoint(address, static_cast<unsigned short>(o.port));
  auto acceptor = std::make_unique<tcp::acceptor>(*impl->io);
  acceptor->open(endpoint.protocol(), ec);
  if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor->bind(endpoint, ec);
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot bind HTTP on ", o.host, ":", o.port, ": ", ec.message()));
  }
  impl->port = acceptor->local_endpoint().port();
  impl->acceptor = std::move(acceptor);
  return std::unique_ptr<HttpServer>(new HttpServer(std::move(impl)));
}

void HttpServer::Route(std::string_view method, std::string_view path, Execution execution,
                       HttpHandler handler) {
  impl_->routes.push_back({std::string(method), std::string(path), execution, std::move(handler)});
}

void HttpServer::Start() {
  if (impl_->started) return;
  impl_->started = true;
  impl_->Accept();
  for (int i = 0; i < impl_->options.io_threads; ++i) {
    impl_->io_threads.emplace_back([io = impl_->io.get()] {
      auto work = asio::make_work_guard(*io);
      io->run();
    });
  }
}

void HttpServer::Stop() {
  if (impl_ == nullptr || impl_->stopped) return;
  impl_->stopped = true;
  impl_->io->stop();
  for (std::thread& t : impl_->io_threads) t.join();
  impl_->io_threads.clear();
  // Handlers running on the pool finish; queued ones are dropped with their connections.
  impl_->workers->stop();
  impl_->workers->join();
  // Destroys the handlers still queued, and with them every connection (their sockets need the
  // io_context, so it goes last).
  impl_->workers.reset();
  impl_->accept_retry.reset();
  impl_->acceptor.reset();
  impl_->io.reset();
}

int HttpServer::port() const { return impl_->port; }

HttpServerStats HttpServer::stats() const {
  return {.connections_open = impl_->open.load(),
          .connections_refused = impl_->refused_at_accept.load(),
          .connections_evicted = impl_->evicted.load(),
          .requests_refused = impl_->requests_refused.load(),
          .deadlines_missed = impl_->deadlines_missed.load()};
}

absl::StatusOr<std::string> ClientKeyForCap(std::string_view ip) {
  error_code ec;
  const asio::ip::address address = asio::ip::make_address(std::string(ip), ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("not an IP address: ", std::string(ip)));
  const asio::ip::address_v6 key(KeyOf(address));
  if (key.is_v4_mapped()) return asio::ip::make_address_v4(asio::ip::v4_mapped, key).to_string();
  return absl::StrCat(key.to_string(), "/64");
}

}  // namespace mandate::http
