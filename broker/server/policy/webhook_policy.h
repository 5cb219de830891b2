// The HTTP webhook policy hook (`--policy-webhook URL`), in the shape of OPA's data API:
// `POST URL` with `{"input": <PolicyInputJson>}` (application/json), answered by
// `{"result": {...}}` whose result is read by ParsePolicyDecision. Point it at an OPA rule that
// evaluates to the answer object, e.g. http://opa:8181/v1/data/mandate/issuance.
//
// Connections: a pool of at most `max_connections` HTTP/1.1 keep-alive connections, each used by
// one call at a time, so a decision costs no TCP or TLS handshake once the pool is warm. A call
// that finds every connection busy waits for one until its deadline. Nothing is connected at
// construction: the broker starts while the hook is down, and the first call after it comes up
// connects.
//
// Deadline: the whole call (waiting for a connection, resolving the host, connecting, the TLS
// handshake, writing, reading) ends by the caller's deadline. Socket timeouts are set from the
// time left, and a watchdog thread shuts down the socket of a call still running at its deadline,
// so a hook that trickles bytes cannot hold the caller either. Host names are resolved on a
// background thread that the caller waits for at most until its deadline (the last answer is
// reused for a while), since getaddrinfo cannot be interrupted.
//
// Errors (never a denial; the caller denies and counts them apart): DeadlineExceeded when the
// deadline passes or every connection stayed busy; Unavailable when the hook cannot be reached,
// answers a non-2xx status, or the TLS handshake fails; InvalidArgument for an answer that is not
// `application/json`, larger than kMaxWebhookAnswerBytes (refused without reading it whole), not
// JSON, JSON with a duplicate member name, without "result" (OPA's answer for an undefined rule:
// "policy undefined"), or whose result ParsePolicyDecision refuses. Messages never carry the
// input document; text from the hook in them is escaped.
//
// Thread-safety: Check may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_POLICY_WEBHOOK_POLICY_H_
#define MANDATE_BROKER_SERVER_POLICY_WEBHOOK_POLICY_H_

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "broker/server/policy/policy_hook.h"

namespace mandate::broker::policy {

struct WebhookPolicyOptions {
  // http://HOST[:PORT]/PATH[?QUERY] or https://... (no user information, no fragment).
  std::string url;
  // https only. PEM roots for the hook's certificate; empty: the system's default roots.
  std::string ca_file;
  // https only: a client certificate (PEM chain) and its key, presented to the hook (mTLS).
  std::string client_cert_file;
  std::string client_key_file;
  // Keep-alive connections held at most (and so calls in flight at once).
  size_t max_connections = 8;
  // How long a resolved host address is reused before it is resolved again.
  std::chrono::seconds resolve_ttl{30};
};

// The largest answer body accepted.
inline constexpr size_t kMaxWebhookAnswerBytes = 64 * 1024;

class WebhookPolicyHook : public PolicyHook {
 public:
  // InvalidArgument for an unusable URL or options (TLS files with http://, a certificate
  // without its key, unreadable or unparsable PEM files, max_connections 0). Never connects.
  static absl::StatusOr<std::unique_ptr<WebhookPolicyHook>> Create(WebhookPolicyOptions options);
  ~WebhookPolicyHook() override;  // Every Check must have returned.
  WebhookPolicyHook(const WebhookPolicyHook&) = delete;
  WebhookPolicyHook& operator=(const WebhookPolicyHook&) = delete;

  std::string_view name() const override { return "webhook"; }
  absl::StatusOr<PolicyDecision> Check(const PolicyInput& input,
                                       std::chrono::steady_clock::time_point deadline) override;

 private:
  struct Impl;  // keeps the HTTP client library out of this header
  explicit WebhookPolicyHook(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mandate::broker::policy

#endif  // MANDATE_BROKER_SERVER_POLICY_WEBHOOK_POLICY_H_
