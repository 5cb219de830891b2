#include "mandate/workload_client.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/jose/jose.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/clock.h"
#include "broker/common/util/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "mandate/jwtsvid.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"
#include "spiffe/workload.grpc.pb.h"

namespace mandate {
namespace {

constexpr char kSecurityHeaderKey[] = "workload.spiffe.io";
constexpr char kSecurityHeaderValue[] = "true";

// What every call needs: the target (for messages), options and the shared stub. Watchers keep
// a copy so they may outlive the client.
struct Connection {
  std::string target;
  WorkloadClientOptions options;
  std::shared_ptr<SpiffeWorkloadAPI::Stub> stub;
};

void PrepareContext(grpc::ClientContext& ctx, const Connection& conn, bool with_deadline) {
  ctx.AddMetadata(kSecurityHeaderKey, kSecurityHeaderValue);
  if (with_deadline) {
    ctx.set_deadline(std::chrono::system_clock::now() + conn.options.timeout);
  }
}

// gRPC and absl share code numbering (both follow google.rpc.Code).
absl::Status FromGrpc(const grpc::Status& status, absl::string_view what,
                      const std::string& target) {
  auto code = static_cast<absl::StatusCode>(status.error_code());
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    return absl::UnavailableError(absl::StrCat(
        what, ": cannot reach the Workload API at ", target,
        " (is mandate-agent running and is the socket path right?): ", status.error_message()));
  }
  if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::DeadlineExceededError(
        absl::StrCat(what, ": the Workload API at ", target,
                     " did not answer in time: ", status.error_message()));
  }
  return absl::Status(code, absl::StrCat(what, ": ", status.error_message()));
}

absl::StatusOr<std::vector<std::string>> SplitDerCerts(std::string_view concatenated,
                                                       absl::string_view what) {
  auto certs = crypto::Certificate::ParseDerChain(concatenated);
  if (!certs.ok()) {
    return absl::InternalError(
        absl::StrCat("the agent sent a malformed ", what, ": ", certs.status().message()));
  }
  std::vector<std::string> out;
  out.reserve(certs->size());
  for (const crypto::Certificate& cert : *certs) {
    out.push_back(cert.Der());
  }
  return out;
}

absl::StatusOr<X509Svid> ConvertSvid(const X509SVID& in) {
  auto id = spiffe::SpiffeId::Parse(in.spiffe_id());
  if (!id.ok()) {
    return absl::InternalError(
        absl::StrCat("the agent sent an X509-SVID with an invalid SPIFFE ID '", in.spiffe_id(),
                     "': ", id.status().message()));
  }
  auto chain = crypto::Certificate::ParseDerChain(in.x509_svid());
  if (!chain.ok()) {
    return absl::InternalError(absl::StrCat("the agent sent a malformed certificate chain for ",
                                            id->str(), ": ", chain.status().message()));
  }
  const crypto::Certificate& leaf = chain->front();
  std::vector<std::string> uris = leaf.UriSans();
  if (uris.size() != 1 || uris.front() != id->str()) {
    return absl::InternalError(absl::StrCat("the agent sent an X509-SVID for ", id->str(),
                                            " whose certificate does not carry that ID"));
  }
  auto key = crypto::PrivateKey::FromPkcs8Der(in.x509_svid_key());
  if (!key.ok()) {
    return absl::InternalError(absl::StrCat("the agent sent a malformed private key for ",
                                            id->str(), ": ", key.status().message()));
  }
  if (!key->public_key().Equals(leaf.public_key())) {
    return absl::InternalError(absl::StrCat("the agent sent a private key for ", id->str(),
                                            " that does not match its certificate"));
  }
  X509Svid out;
  out.spiffe_id = id->str();
  for (const crypto::Certificate& cert : *chain) {
    out.chain_der.push_back(cert.Der());
  }
  out.private_key_pkcs8_der = in.x509_svid_key();
  out.hint = in.hint();
  out.expires_at = leaf.not_after();
  return out;
}

absl::StatusOr<X509Context> ConvertX509Response(const X509SVIDResponse& resp) {
  X509Context context;
  for (const X509SVID& in : resp.svids()) {
    ASSIGN_OR_RETURN(X509Svid svid, ConvertSvid(in));
    // Checked by ConvertSvid already, so this parse cannot fail.
    ASSIGN_OR_RETURN(spiffe::SpiffeId id, spiffe::SpiffeId::Parse(svid.spiffe_id));
    const std::string& td = id.trust_domain().name();
    if (!in.bundle().empty() && !context.bundles.contains(td)) {
      X509Bundle bundle;
      bundle.trust_domain = td;
      ASSIGN_OR_RETURN(bundle.ca_der, SplitDerCerts(in.bundle(), "X.509 bundle"));
      context.bundles.emplace(td, std::move(bundle));
    }
    context.svids.push_back(std::move(svid));
  }
  for (const auto& [td_key, der] : resp.federated_bundles()) {
    auto td = NormalizeTrustDomain(td_key);
    if (!td.ok()) {
      return absl::InternalError(absl::StrCat("the agent sent a federated bundle for '", td_key,
                                              "': ", td.status().message()));
    }
    X509Bundle bundle;
    bundle.trust_domain = *td;
    ASSIGN_OR_RETURN(bundle.ca_der, SplitDerCerts(der, "federated X.509 bundle"));
    context.bundles.insert_or_assign(*td, std::move(bundle));
  }
  return context;
}

// Reads the first message of a server stream under the call deadline, then cancels the stream.
template <typename Response, typename Reader>
absl::StatusOr<Response> ReadFirst(grpc::ClientContext& ctx, Reader reader, absl::string_view what,
                                   const std::string& target) {
  Response resp;
  if (!reader->Read(&resp)) {
    grpc::Status status = reader->Finish();
    if (status.ok()) {
      return absl::UnavailableError(
          absl::StrCat(what, ": the Workload API at ", target, " ended the stream without data"));
    }
    return FromGrpc(status, what, target);
  }
  ctx.TryCancel();
  (void)reader->Finish();  // CANCELLED, by us.
  return resp;
}

// Lets Close() (or a polled flag) interrupt a blocked stream read and a backoff sleep.
class StopSignal {
 public:
  void Stop() {
    std::lock_guard<std::mutex> lock(mu_);
    stopped_ = true;
    if (active_ != nullptr) {
      active_->TryCancel();
    }
    cv_.notify_all();
  }
  // Registers the context of the stream about to start; false when already stopped.
  bool Begin(grpc::ClientContext* ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) {
      return false;
    }
    active_ = ctx;
    return true;
  }
  // Unregisters the finished stream's context; false when stopped meanwhile.
  bool End() {
    std::lock_guard<std::mutex> lock(mu_);
    active_ = nullptr;
    return !stopped_;
  }
  // Sleeps for `d` unless stopped first; returns true when stopped.
  bool SleepFor(std::chrono::milliseconds d) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, d, [this] { return stopped_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopped_ = false;                   // GUARDED_BY(mu_)
  grpc::ClientContext* active_ = nullptr;  // GUARDED_BY(mu_)
};

// Watches FetchX509SVID until stopped (OK) or a permanent error (returned).
absl::Status WatchLoop(const Connection& conn, const WorkloadClient::X509ContextCallback& on_update,
                       const WorkloadClient::ErrorCallback& on_error, StopSignal& stop) {
  std::chrono::milliseconds backoff = conn.options.watch_initial_backoff;
  while (true) {
    grpc::ClientContext ctx;
    PrepareContext(ctx, conn, /*with_deadline=*/false);
    if (!stop.Begin(&ctx)) {
      return absl::OkStatus();
    }
    auto reader = conn.stub->FetchX509SVID(&ctx, X509SVIDRequest());
    X509SVIDResponse resp;
    while (reader->Read(&resp)) {
      auto context = ConvertX509Response(resp);
      if (!context.ok()) {
        // A bad snapshot is reported and skipped; the next one may be fine.
        if (on_error) {
          on_error(context.status());
        }
        continue;
      }
      backoff = conn.options.watch_initial_backoff;
      on_update(*context);
    }
    grpc::Status status = reader->Finish();
    if (!stop.End()) {
      return absl::OkStatus();
    }
    absl::Status error =
        status.ok() ? absl::UnavailableError(absl::StrCat("the Workload API at ", conn.target,
                                                          " ended the X509-SVID stream"))
                    : FromGrpc(status, "watching X509-SVIDs", conn.target);
    if (on_error) {
      on_error(error);
    }
    // The SPIFFE Workload API says clients must not retry InvalidArgument; Unimplemented will
    // not change either.
    if (error.code() == absl::StatusCode::kInvalidArgument ||
        error.code() == absl::StatusCode::kUnimplemented) {
      return error;
    }
    if (stop.SleepFor(backoff)) {
      return absl::OkStatus();
    }
    backoff = std::min(backoff * 2, conn.options.watch_max_backoff);
  }
}

class X509ContextWatcherImpl final : public X509ContextWatcher {
 public:
  X509ContextWatcherImpl(Connection conn, WorkloadClient::X509ContextCallback on_update,
                         WorkloadClient::ErrorCallback on_error) {
    thread_ = std::thread([this, conn = std::move(conn), on_update = std::move(on_update),
                           on_error = std::move(on_error)] {
      auto update = [this, &on_update](const X509Context& context) {
        on_update(context);
        std::lock_guard<std::mutex> lock(mu_);
        updated_ = true;
        cv_.notify_all();
      };
      absl::Status result = WatchLoop(conn, update, on_error, stop_);
      std::lock_guard<std::mutex> lock(mu_);
      finished_ = true;
      result_ = result;
      cv_.notify_all();
    });
  }
  ~X509ContextWatcherImpl() override { Close(); }

  absl::Status WaitUntilUpdated(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, timeout, [this] { return updated_ || finished_; })) {
      return absl::DeadlineExceededError("no X509-SVID update from the Workload API in time");
    }
    if (updated_) {
      return absl::OkStatus();
    }
    return result_.ok() ? absl::CancelledError("the watcher was closed") : result_;
  }

  void Close() override {
    stop_.Stop();
    if (thread_.joinable()) {
      thread_.join();
    }
  }

 private:
  StopSignal stop_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool updated_ = false;   // GUARDED_BY(mu_)
  bool finished_ = false;  // GUARDED_BY(mu_)
  absl::Status result_;    // GUARDED_BY(mu_)
  std::thread thread_;     // last: started after the fields above exist
};

const char* NonEmptyEnv(const char* name) {
  const char* value = std::getenv(name);
  return (value != nullptr && value[0] != '\0') ? value : nullptr;
}

}  // namespace

absl::StatusOr<std::string> ParseWorkloadEndpoint(std::string_view endpoint) {
  const std::string shown(endpoint);  // for messages
  if (endpoint.empty()) {
    return absl::InvalidArgumentError("the Workload API endpoint is empty");
  }
  std::string_view path;
  if (endpoint.starts_with("unix://")) {
    std::string_view rest = endpoint.substr(7);
    if (!rest.starts_with("/")) {
      return absl::InvalidArgumentError(
          absl::StrCat("Workload API endpoint '", shown,
                       "' names a host; write a Unix socket as unix:///absolute/path"));
    }
    path = rest;
  } else if (endpoint.starts_with("unix:")) {
    path = endpoint.substr(5);
    if (!path.starts_with("/")) {
      return absl::InvalidArgumentError(absl::StrCat("Workload API endpoint '", shown,
                                                     "' must use an absolute socket path "
                                                     "(unix:///absolute/path)"));
    }
  } else if (endpoint.starts_with("/")) {
    path = endpoint;
  } else if (size_t scheme_end = endpoint.find("://"); scheme_end != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Workload API endpoint scheme '", std::string(endpoint.substr(0, scheme_end)),
        "' is not supported; mandate-agent serves a Unix socket: use unix:///absolute/path"));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("Workload API endpoint '", shown,
                                                   "' is not an absolute socket path "
                                                   "(use unix:///absolute/path)"));
  }
  if (path.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("Workload API endpoint '", shown, "' has no socket path"));
  }
  if (path.find_first_of(std::string_view("?#\0", 3)) != std::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("Workload API endpoint '", shown,
                                                   "' must not contain a query, fragment or NUL"));
  }
  return absl::StrCat("unix:", std::string(path));
}

absl::StatusOr<std::string> ResolveWorkloadEndpoint(std::string_view endpoint) {
  if (!endpoint.empty()) {
    return ParseWorkloadEndpoint(endpoint);
  }
  for (const char* name : {kMandateEndpointEnv, kSpiffeEndpointEnv}) {
    if (const char* value = NonEmptyEnv(name)) {
      auto target = ParseWorkloadEndpoint(value);
      if (!target.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("$", name, ": ", target.status().message()));
      }
      return target;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("no Workload API socket given: set ",
                                                 kMandateEndpointEnv, " or ", kSpiffeEndpointEnv,
                                                 " (e.g. unix:///run/mandate/agent.sock)"));
}

// Longest a FetchTaskToken waits for a restarted broker to accept proofs again (its window is
// --dpop-proof-max-future + 1 s, 6 s by default).
constexpr int kMaxRestartWaitSeconds = 10;

struct WorkloadClient::Impl {
  Connection conn;
  std::shared_ptr<mandate::workload::v1::Tasks::Stub> tasks;
  std::mutex dpop_mu;
  std::optional<crypto::PrivateKey> dpop_key;  // GUARDED_BY(dpop_mu); generated on first use
  // The broker's last DPoP nonce (its dpop-nonce trailer under --dpop-nonce); GUARDED_BY(dpop_mu).
  std::string broker_nonce;

  std::string BrokerNonce() {
    std::lock_guard<std::mutex> lock(dpop_mu);
    return broker_nonce;
  }
  void SetBrokerNonce(std::string nonce) {
    std::lock_guard<std::mutex> lock(dpop_mu);
    broker_nonce = std::move(nonce);
  }

  absl::StatusOr<const crypto::PrivateKey*> DpopKey() {
    std::lock_guard<std::mutex> lock(dpop_mu);
    if (!dpop_key.has_value()) {
      ASSIGN_OR_RETURN(crypto::PrivateKey key, crypto::PrivateKey::GenerateP256());
      dpop_key.emplace(std::move(key));
    }
    // The key is never replaced once set, so the pointer stays valid for the client's life.
    return &*dpop_key;
  }
};

namespace {

TaskInfo ConvertTask(const mandate::workload::v1::Task& in) {
  TaskInfo out;
  out.id = in.id();
  out.spiffe_id = in.spiffe_id();
  out.purpose = in.purpose();
  out.scopes.assign(in.scopes().begin(), in.scopes().end());
  out.audiences.assign(in.audiences().begin(), in.audiences().end());
  out.status = in.status();
  out.approval_id = in.approval_id();
  out.created_at = in.created_at();
  out.expires_at = in.expires_at();
  out.token_endpoint = in.token_endpoint();
  return out;
}

}  // namespace

WorkloadClient::WorkloadClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WorkloadClient::~WorkloadClient() = default;

absl::StatusOr<std::unique_ptr<WorkloadClient>> WorkloadClient::Connect(
    std::string endpoint, WorkloadClientOptions options) {
  ASSIGN_OR_RETURN(std::string target, ResolveWorkloadEndpoint(endpoint));
  if (options.timeout <= std::chrono::milliseconds::zero()) {
    return absl::InvalidArgumentError("WorkloadClientOptions::timeout must be positive");
  }
  if (options.watch_initial_backoff <= std::chrono::milliseconds::zero() ||
      options.watch_max_backoff < options.watch_initial_backoff) {
    return absl::InvalidArgumentError(
        "watch backoffs must be positive and the maximum at least the initial one");
  }
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto impl = std::make_unique<Impl>();
  impl->conn.target = std::move(target);
  impl->conn.options = options;
  impl->conn.stub = std::shared_ptr<SpiffeWorkloadAPI::Stub>(SpiffeWorkloadAPI::NewStub(channel));
  impl->tasks = std::shared_ptr<mandate::workload::v1::Tasks::Stub>(
      mandate::workload::v1::Tasks::NewStub(channel));
  return std::unique_ptr<WorkloadClient>(new WorkloadClient(std::move(impl)));
}

const std::string& WorkloadClient::target() const { return impl_->conn.target; }

absl::StatusOr<TaskInfo> WorkloadClient::DeclareTask(std::string purpose,
                                                     std::vector<std::string> scopes,
                                                     std::vector<std::string> audiences,
                                                     std::chrono::seconds ttl,
                                                     std::string spiffe_id) {
  mandate::workload::v1::DeclareTaskRequest req;
  req.set_purpose(std::move(purpose));
  for (std::string& s : scopes) req.add_scopes(std::move(s));
  for (std::string& a : audiences) req.add_audiences(std::move(a));
  req.set_ttl_seconds(ttl.count());
  req.set_spiffe_id(std::move(spiffe_id));
  grpc::ClientContext ctx;
  PrepareContext(ctx, impl_->conn, /*with_deadline=*/true);
  mandate::workload::v1::Task resp;
  grpc::Status status = impl_->tasks->DeclareTask(&ctx, req, &resp);
  if (!status.ok()) return FromGrpc(status, "declaring a task", impl_->conn.target);
  return ConvertTask(resp);
}

absl::StatusOr<TaskInfo> WorkloadClient::GetTask(std::string task_id, std::string spiffe_id) {
  mandate::workload::v1::GetTaskRequest req;
  req.set_task_id(std::move(task_id));
  req.set_spiffe_id(std::move(spiffe_id));
  grpc::ClientContext ctx;
  PrepareContext(ctx, impl_->conn, /*with_deadline=*/true);
  mandate::workload::v1::Task resp;
  grpc::Status status = impl_->tasks->GetTask(&ctx, req, &resp);
  if (!status.ok()) return FromGrpc(status, "looking up the task", impl_->conn.target);
  return ConvertTask(resp);
}

absl::StatusOr<TaskInfo> WorkloadClient::EndTask(std::string task_id, std::string spiffe_id) {
  mandate::workload::v1::EndTaskRequest req;
  req.set_task_id(std::move(task_id));
  req.set_spiffe_id(std::move(spiffe_id));
  grpc::ClientContext ctx;
  PrepareContext(ctx, impl_->conn, /*with_deadline=*/true);
  mandate::workload::v1::Task resp;
  grpc::Status status = impl_->tasks->EndTask(&ctx, req, &resp);
  if (!status.ok()) return FromGrpc(status, "ending the task", impl_->conn.target);
  return ConvertTask(resp);
}

absl::StatusOr<TaskToken> WorkloadClient::FetchTaskToken(const TaskInfo& task, std::string audience,
                                                         std::vector<std::string> scopes) {
  if (task.token_endpoint.empty()) {
    return absl::InvalidArgumentError(
        "the task has no token endpoint; use a TaskInfo from DeclareTask or GetTask");
  }
  mandate::workload::v1::FetchTaskTokenRequest req;
  req.set_task_id(task.id);
  req.set_audience(std::move(audience));
  for (std::string& s : scopes) req.add_scopes(std::move(s));
  req.set_spiffe_id(task.spiffe_id);
  mandate::workload::v1::FetchTaskTokenResponse resp;
  std::string nonce = impl_->BrokerNonce();
  bool retried_for_nonce = false;
  bool retried_after_restart = false;
  while (true) {
    ASSIGN_OR_RETURN(std::string proof, CreateProof("POST", task.token_endpoint, "", nonce));
    req.set_dpop_proof(std::move(proof));
    grpc::ClientContext ctx;
    PrepareContext(ctx, impl_->conn, /*with_deadline=*/true);
    grpc::Status status = impl_->tasks->FetchTaskToken(&ctx, req, &resp);
    const auto& trailers = ctx.GetServerTrailingMetadata();
    auto trailer = [&trailers](const char* name) {
      auto it = trailers.find(name);
      return it == trailers.end() ? std::string()
                                  : std::string(it->second.data(), it->second.size());
    };
    std::string fresh_nonce = trailer("dpop-nonce");
    if (!fresh_nonce.empty()) impl_->SetBrokerNonce(fresh_nonce);
    if (status.ok()) break;
    // RFC 9449 §8: a broker requiring nonces refuses a proof without its current one and hands
    // that one out; sign once more with it.
    if (!retried_for_nonce && status.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
        absl::StartsWith(status.error_message(), "use_dpop_nonce") && !fresh_nonce.empty() &&
        fresh_nonce != nonce) {
      retried_for_nonce = true;
      nonce = std::move(fresh_nonce);
      continue;
    }
    // A broker that has just restarted refuses every proof for a few seconds (it cannot tell
    // them from ones accepted before): wait as long as it says, once, and sign a new one.
    int retry_after = 0;
    if (!retried_after_restart && status.error_code() == grpc::StatusCode::UNAVAILABLE &&
        absl::SimpleAtoi(trailer("retry-after"), &retry_after) && retry_after > 0 &&
        retry_after <= kMaxRestartWaitSeconds) {
      retried_after_restart = true;
      std::this_thread::sleep_for(std::chrono::seconds(retry_after));
      continue;
    }
    return FromGrpc(status, "fetching a task token", impl_->conn.target);
  }
  TaskToken out;
  out.access_token = resp.access_token();
  out.token_type = resp.token_type();
  out.expires_in = resp.expires_in();
  out.scopes.assign(resp.scopes().begin(), resp.scopes().end());
  out.jkt = resp.jkt();
  return out;
}

absl::StatusOr<std::string> WorkloadClient::CreateProof(std::string_view method,
                                                        std::string_view url,
                                                        std::string_view access_token,
                                                        std::string_view nonce) {
  ASSIGN_OR_RETURN(const crypto::PrivateKey* key, impl_->DpopKey());
  return dpop::CreateProof(*key, method, url, Clock::Real().NowSeconds(), access_token, nonce);
}

absl::StatusOr<std::string> WorkloadClient::DpopKeyThumbprint() {
  ASSIGN_OR_RETURN(const crypto::PrivateKey* key, impl_->DpopKey());
  return jose::JwkThumbprint(key->public_key());
}

absl::StatusOr<X509Context> WorkloadClient::FetchX509Context() {
  const Connection& conn = impl_->conn;
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, /*with_deadline=*/true);
  ASSIGN_OR_RETURN(X509SVIDResponse resp,
                   ReadFirst<X509SVIDResponse>(ctx, conn.stub->FetchX509SVID(&ctx, {}),
                                               "fetching X509-SVIDs", conn.target));
  return ConvertX509Response(resp);
}

absl::StatusOr<X509Svid> WorkloadClient::FetchX509Svid() {
  ASSIGN_OR_RETURN(X509Context context, FetchX509Context());
  if (context.svids.empty()) {
    return absl::NotFoundError("the Workload API returned no X509-SVID for this process");
  }
  return std::move(context.svids.front());
}

absl::StatusOr<JwtSvid> WorkloadClient::FetchJwtSvid(std::vector<std::string> audiences,
                                                     std::string spiffe_id) {
  if (audiences.empty()) {
    return absl::InvalidArgumentError("a JWT-SVID needs at least one audience");
  }
  const Connection& conn = impl_->conn;
  JWTSVIDRequest req;
  for (std::string& aud : audiences) {
    req.add_audience(std::move(aud));
  }
  req.set_spiffe_id(spiffe_id);
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, /*with_deadline=*/true);
  JWTSVIDResponse resp;
  grpc::Status status = conn.stub->FetchJWTSVID(&ctx, req, &resp);
  if (!status.ok()) {
    return FromGrpc(status, "fetching a JWT-SVID", conn.target);
  }
  const JWTSVID* chosen = nullptr;
  for (const JWTSVID& svid : resp.svids()) {
    if (spiffe_id.empty() || svid.spiffe_id() == spiffe_id) {
      chosen = &svid;
      break;
    }
  }
  if (chosen == nullptr) {
    return absl::NotFoundError(
        spiffe_id.empty() ? std::string("the Workload API returned no JWT-SVID")
                          : absl::StrCat("the Workload API returned no JWT-SVID for ", spiffe_id));
  }
  auto parsed = ParseInsecureJwtSvid(chosen->svid());
  if (!parsed.ok()) {
    return absl::InternalError(
        absl::StrCat("the agent sent a malformed JWT-SVID: ", parsed.status().message()));
  }
  if (parsed->spiffe_id != chosen->spiffe_id()) {
    return absl::InternalError(absl::StrCat("the agent sent a JWT-SVID for ", parsed->spiffe_id,
                                            " labelled as ", chosen->spiffe_id()));
  }
  JwtSvid out;
  out.spiffe_id = chosen->spiffe_id();
  out.token = chosen->svid();
  out.hint = chosen->hint();
  out.expiry = parsed->expiry;
  return out;
}

absl::StatusOr<BundleSet> WorkloadClient::FetchJwtBundles() {
  const Connection& conn = impl_->conn;
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, /*with_deadline=*/true);
  ASSIGN_OR_RETURN(JWTBundlesResponse resp,
                   ReadFirst<JWTBundlesResponse>(ctx, conn.stub->FetchJWTBundles(&ctx, {}),
                                                 "fetching JWT bundles", conn.target));
  BundleSet set;
  for (const auto& [td, jwks] : resp.bundles()) {
    auto bundle = JwtBundle::FromJwks(td, jwks);
    if (!bundle.ok()) {
      return absl::InternalError(
          absl::StrCat("the agent sent a malformed JWT bundle: ", bundle.status().message()));
    }
    RETURN_IF_ERROR(set.AddJwtBundle(*std::move(bundle)));
  }
  return set;
}

absl::StatusOr<BundleSet> WorkloadClient::FetchX509Bundles() {
  const Connection& conn = impl_->conn;
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, /*with_deadline=*/true);
  ASSIGN_OR_RETURN(X509BundlesResponse resp,
                   ReadFirst<X509BundlesResponse>(ctx, conn.stub->FetchX509Bundles(&ctx, {}),
                                                  "fetching X.509 bundles", conn.target));
  BundleSet set;
  for (const auto& [td_key, der] : resp.bundles()) {
    auto td = NormalizeTrustDomain(td_key);
    if (!td.ok()) {
      return absl::InternalError(absl::StrCat("the agent sent an X.509 bundle for '", td_key,
                                              "': ", td.status().message()));
    }
    X509Bundle bundle;
    bundle.trust_domain = *td;
    ASSIGN_OR_RETURN(bundle.ca_der, SplitDerCerts(der, "X.509 bundle"));
    RETURN_IF_ERROR(set.AddX509Bundle(std::move(bundle)));
  }
  return set;
}

absl::StatusOr<ValidatedJwtSvidResponse> WorkloadClient::ValidateJwtSvid(
    std::string_view token, std::string_view audience) {
  if (audience.empty()) {
    return absl::InvalidArgumentError("validating a JWT-SVID needs an audience");
  }
  if (token.empty()) {
    return absl::InvalidArgumentError("the JWT-SVID to validate is empty");
  }
  const Connection& conn = impl_->conn;
  ValidateJWTSVIDRequest req;
  req.set_audience(std::string(audience));
  req.set_svid(std::string(token));
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, /*with_deadline=*/true);
  ValidateJWTSVIDResponse resp;
  grpc::Status status = conn.stub->ValidateJWTSVID(&ctx, req, &resp);
  if (!status.ok()) {
    return FromGrpc(status, "validating the JWT-SVID", conn.target);
  }
  ValidatedJwtSvidResponse out;
  out.spiffe_id = resp.spiffe_id();
  auto converted = google::protobuf::util::MessageToJsonString(resp.claims(), &out.claims_json);
  if (!converted.ok()) {
    return absl::InternalError(
        absl::StrCat("the agent sent claims that are not valid JSON: ", converted.ToString()));
  }
  if (out.claims_json.empty()) {
    out.claims_json = "{}";
  }
  return out;
}

std::unique_ptr<X509ContextWatcher> WorkloadClient::WatchX509Context(X509ContextCallback on_update,
                                                                     ErrorCallback on_error) {
  return std::make_unique<X509ContextWatcherImpl>(impl_->conn, std::move(on_update),
                                                  std::move(on_error));
}

absl::Status WorkloadClient::WatchX509Context(X509ContextCallback on_update,
                                              const std::atomic<bool>& stop,
                                              ErrorCallback on_error) {
  StopSignal signal;
  std::atomic<bool> done{false};
  std::thread monitor([&] {
    while (!done.load()) {
      if (stop.load()) {
        signal.Stop();
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  absl::Status result = WatchLoop(impl_->conn, on_update, on_error, signal);
  done.store(true);
  monitor.join();
  return result;
}

}  // namespace mandate
