// A client of the SPIFFE Workload API served by mandate-agent (or any SPIFFE agent) on a Unix
// socket.
//
// Every call carries the `workload.spiffe.io: true` metadata the API requires and a deadline
// (WorkloadClientOptions::timeout, 10 s by default); watch streams are long-lived and have no
// deadline. gRPC status codes are mapped one to one onto absl status codes and the server's
// message is kept, prefixed with what the client was doing; UNAVAILABLE additionally names the
// socket and suggests checking that mandate-agent is running.
//
// Thread-safety: a WorkloadClient may be used from several threads at once (each call has its own
// gRPC context). A watcher shares the client's channel and may outlive the client.
#ifndef MANDATE_SDK_INCLUDE_MANDATE_WORKLOAD_CLIENT_H_
#define MANDATE_SDK_INCLUDE_MANDATE_WORKLOAD_CLIENT_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "mandate/bundle.h"
#include "mandate/svid.h"

namespace mandate {

// Environment variables naming the Workload API socket, in order of precedence.
inline constexpr char kMandateEndpointEnv[] = "MANDATE_ENDPOINT_SOCKET";
inline constexpr char kSpiffeEndpointEnv[] = "SPIFFE_ENDPOINT_SOCKET";

// Turns a Workload API address into a gRPC target "unix:/abs/path". Accepted forms:
// "unix:///abs/path", "unix:/abs/path" and a bare "/abs/path". Refused with InvalidArgument: an
// empty address, a relative path, "unix://host/path" (an authority), query or fragment parts, and
// other schemes such as "tcp://" (Mandate serves the Workload API on a Unix socket only).
absl::StatusOr<std::string> ParseWorkloadEndpoint(std::string_view endpoint);

// `endpoint` when non-empty, else $MANDATE_ENDPOINT_SOCKET, else $SPIFFE_ENDPOINT_SOCKET (empty
// variables count as unset), parsed with ParseWorkloadEndpoint. InvalidArgument naming both
// variables when none is set.
absl::StatusOr<std::string> ResolveWorkloadEndpoint(std::string_view endpoint);

struct WorkloadClientOptions {
  // Deadline of each unary call and of the first message of FetchX509Context / bundle fetches.
  std::chrono::milliseconds timeout{10000};
  // Watchers: first and maximum delay before reconnecting after the stream broke.
  std::chrono::milliseconds watch_initial_backoff{500};
  std::chrono::milliseconds watch_max_backoff{30000};
};

// The answer of the agent's ValidateJWTSVID: the agent checked signature, expiry and audience.
struct ValidatedJwtSvidResponse {
  std::string spiffe_id;
  std::string claims_json;  // the token's claims as a JSON object
};

// A task the broker accepted (DESIGN.md §4): what the caller declared, narrowed to what it is
// entitled to. `purpose` is agent-supplied text: escape it wherever it is shown.
struct TaskInfo {
  std::string id;
  std::string spiffe_id;  // the owner
  std::string purpose;
  std::vector<std::string> scopes;  // granted
  std::vector<std::string> audiences;
  std::string status;  // "active", "ended", ...
  std::string approval_id;
  int64_t created_at = 0;  // Unix seconds
  int64_t expires_at = 0;
  std::string token_endpoint;  // the broker's /token URL: the htu of token-request DPoP proofs
};

// A DPoP-bound access token (RFC 9068 at+jwt) for one task and audience. Present it with a
// proof from WorkloadClient::CreateProof (same key) for every upstream request.
struct TaskToken {
  std::string access_token;
  std::string token_type;  // "DPoP"
  int64_t expires_in = 0;  // seconds
  std::vector<std::string> scopes;
  std::string jkt;  // RFC 7638 thumbprint of the key the token is bound to (cnf.jkt)
};

// Delivers X509Context updates from a background thread until closed (go-spiffe's X509Source
// shape). Reconnects with exponential backoff when the stream breaks, except after
// InvalidArgument or Unimplemented, which a retry cannot fix.
class X509ContextWatcher {
 public:
  virtual ~X509ContextWatcher() = default;
  // Blocks until the first update was delivered, the watcher stopped on a permanent error, or
  // `timeout` passed; returns the corresponding status (DeadlineExceeded on timeout).
  virtual absl::Status WaitUntilUpdated(std::chrono::milliseconds timeout) = 0;
  // Stops watching and joins the background thread; no callback runs after it returns. Must not
  // be called from inside a callback. Idempotent; the destructor calls it.
  virtual void Close() = 0;
};

class WorkloadClient {
 public:
  using X509ContextCallback = std::function<void(const X509Context&)>;
  using ErrorCallback = std::function<void(const absl::Status&)>;

  // Resolves `endpoint` (see ResolveWorkloadEndpoint) and creates a channel. Connecting is lazy:
  // an unreachable socket is reported by the first call, as UNAVAILABLE.
  static absl::StatusOr<std::unique_ptr<WorkloadClient>> Connect(
      std::string endpoint = "", WorkloadClientOptions options = {});
  ~WorkloadClient();
  WorkloadClient(const WorkloadClient&) = delete;
  WorkloadClient& operator=(const WorkloadClient&) = delete;

  // The gRPC target in use, e.g. "unix:/run/mandate/agent.sock".
  const std::string& target() const;

  // The first snapshot of the FetchX509SVID stream. Every SVID's chain and key are checked to
  // parse, and its SPIFFE ID to be valid; a malformed response is an Internal error.
  absl::StatusOr<X509Context> FetchX509Context();
  // The default (first) X509-SVID. NotFound when the response holds none.
  absl::StatusOr<X509Svid> FetchX509Svid();
  // A JWT-SVID for `audiences` (at least one). With `spiffe_id`, the SVID for that identity
  // (needed when the caller has several).
  absl::StatusOr<JwtSvid> FetchJwtSvid(std::vector<std::string> audiences,
                                       std::string spiffe_id = "");
  // The first snapshot of the FetchJWTBundles / FetchX509Bundles streams.
  absl::StatusOr<BundleSet> FetchJwtBundles();
  absl::StatusOr<BundleSet> FetchX509Bundles();
  // Asks the agent to validate `token` for `audience` (ValidateJWTSVID).
  absl::StatusOr<ValidatedJwtSvidResponse> ValidateJwtSvid(std::string_view token,
                                                           std::string_view audience);

  // ---- Tasks (mandate.workload.v1.Tasks on the same socket) ----
  // `spiffe_id` names the identity to act as; needed only when this process has several.

  // Declares a task. `ttl` zero means the broker's default.
  absl::StatusOr<TaskInfo> DeclareTask(std::string purpose, std::vector<std::string> scopes,
                                       std::vector<std::string> audiences,
                                       std::chrono::seconds ttl = std::chrono::seconds(0),
                                       std::string spiffe_id = "");
  // This identity's usable task `task_id` (NotFound for unknown and others' tasks).
  absl::StatusOr<TaskInfo> GetTask(std::string task_id, std::string spiffe_id = "");
  // Ends the task; returns it as stored.
  absl::StatusOr<TaskInfo> EndTask(std::string task_id, std::string spiffe_id = "");
  // A token for `task` and `audience` (one of the task's) with `scopes` (empty: all the task's),
  // bound to this client's DPoP key: the SDK signs the proof for task.token_endpoint and the
  // agent forwards it to the broker. The key is generated on first use (ES256), kept in memory
  // and never exported; every later token of this client is bound to the same key.
  absl::StatusOr<TaskToken> FetchTaskToken(const TaskInfo& task, std::string audience,
                                           std::vector<std::string> scopes = {});
  // A DPoP proof with this client's key for `method` `url`, with `ath` when `access_token` is
  // non-empty (RFC 9449 §7: what an upstream request carries next to the token) and `nonce`
  // when non-empty (the server's last DPoP-Nonce header, e.g. from the broker's /token with
  // --dpop-nonce or an upstream that asks for one).
  absl::StatusOr<std::string> CreateProof(std::string_view method, std::string_view url,
                                          std::string_view access_token = "",
                                          std::string_view nonce = "");
  // RFC 7638 thumbprint of this client's DPoP key (what its tokens' cnf.jkt holds).
  absl::StatusOr<std::string> DpopKeyThumbprint();

  // Starts watching FetchX509SVID in a background thread. `on_update` gets every snapshot;
  // `on_error` (optional) every stream failure before the retry. Callbacks run on the watcher's
  // thread, one at a time.
  std::unique_ptr<X509ContextWatcher> WatchX509Context(X509ContextCallback on_update,
                                                       ErrorCallback on_error = nullptr);
  // The same loop in the calling thread: returns OK once `stop` becomes true (checked at least
  // every 100 ms), or the permanent error that ended it.
  absl::Status WatchX509Context(X509ContextCallback on_update, const std::atomic<bool>& stop,
                                ErrorCallback on_error = nullptr);

 private:
  struct Impl;
  explicit WorkloadClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mandate

#endif  // MANDATE_SDK_INCLUDE_MANDATE_WORKLOAD_CLIENT_H_
