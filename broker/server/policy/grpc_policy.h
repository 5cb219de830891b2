// The external gRPC policy hook (`--policy-grpc HOST:PORT`): every Check is one unary call to
// mandate.policy.v1.PolicyHook/Check (proto/mandate/policy/v1/policy.proto), with the caller's
// deadline as the call's deadline.
//
// Connection: one channel, made at construction without waiting for the hook (the broker starts
// while the hook is down; calls fail with Unavailable until it comes up, and the channel retries
// the connection at most `max_reconnect_backoff` apart). The connection is kept open between
// calls (no idle timeout) and HTTP/2 keepalive pings every `keepalive_time` notice a peer that
// vanished without closing it, so calls do not wait for a dead connection's deadline forever.
// The hook server must accept pings that often (gRPC servers refuse pings more often than every
// 5 minutes by default; docs/policy-hooks.md says how to allow them).
//
// Errors (never a denial; the caller denies and counts them apart): DeadlineExceeded when the
// deadline passes, Unavailable for every other non-OK gRPC status (the hook down, refusing, an
// answer over kMaxGrpcAnswerBytes), InvalidArgument for an answer that breaks the contract
// (ttl_max <= 0). Messages carry the hook's own error text escaped and shortened, never the
// input document.
//
// Thread-safety: Check may be called concurrently (gRPC channels are thread-safe).
#ifndef MANDATE_BROKER_SERVER_POLICY_GRPC_POLICY_H_
#define MANDATE_BROKER_SERVER_POLICY_GRPC_POLICY_H_

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "broker/server/policy/policy_hook.h"

namespace mandate::broker::policy {

struct GrpcPolicyOptions {
  std::string target;  // HOST:PORT
  // Plaintext gRPC, for a hook on loopback during development only. Must be asked for: the
  // default is TLS, and TLS options together with plaintext are refused.
  bool plaintext = false;
  std::string ca_file;           // PEM roots that sign the hook's certificate (required for TLS)
  std::string client_cert_file;  // PEM chain: presented to the hook (mTLS); with client_key_file
  std::string client_key_file;
  // The name checked in the hook's certificate (and sent as SNI) instead of HOST.
  std::string server_name_override;
  std::chrono::milliseconds keepalive_time{30000};
  std::chrono::milliseconds keepalive_timeout{10000};
  // Reconnection backoff cap while the hook is down: how soon after it comes up calls succeed.
  std::chrono::milliseconds max_reconnect_backoff{2000};
};

// The largest answer accepted; a larger one fails the call (Unavailable).
inline constexpr int kMaxGrpcAnswerBytes = 64 * 1024;

class GrpcPolicyHook : public PolicyHook {
 public:
  // InvalidArgument for unusable options (empty target, TLS without a CA file, plaintext with
  // TLS files, a certificate without its key) or unreadable files. Never contacts the hook.
  static absl::StatusOr<std::unique_ptr<GrpcPolicyHook>> Create(GrpcPolicyOptions options);
  ~GrpcPolicyHook() override;
  GrpcPolicyHook(const GrpcPolicyHook&) = delete;
  GrpcPolicyHook& operator=(const GrpcPolicyHook&) = delete;

  std::string_view name() const override { return "grpc"; }
  absl::StatusOr<PolicyDecision> Check(const PolicyInput& input,
                                       std::chrono::steady_clock::time_point deadline) override;

 private:
  struct Impl;  // keeps generated gRPC headers out of this one
  explicit GrpcPolicyHook(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mandate::broker::policy

#endif  // MANDATE_BROKER_SERVER_POLICY_GRPC_POLICY_H_
