#include "broker/server/policy/grpc_policy.h"

#include <grpcpp/grpcpp.h>
#include <openssl/crypto.h>

#include <climits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/log/log.h"
#include "broker/common/util/status_macros.h"
#include "mandate/policy/v1/policy.grpc.pb.h"

namespace mandate::broker::policy {
namespace {

namespace pb = ::mandate::policy::v1;

// Error text from the hook is shortened before it reaches a status (and so a log line).
constexpr size_t kMaxHookMessageChars = 200;

std::string HookText(std::string_view text) {
  std::string escaped = log::EscapeForLog(text.substr(0, kMaxHookMessageChars));
  if (text.size() > kMaxHookMessageChars) escaped += "...";
  return escaped;
}

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  absl::StatusOr<std::string> pem = crypto::ReadFile(path);
  if (!pem.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy hook grpc: cannot read the ", what, ": ", pem.status().message()));
  }
  return pem;
}

pb::CheckRequest ToRequest(const PolicyInput& input) {
  pb::CheckRequest request;
  request.set_kind(std::string(IssuanceKindName(input.kind)));
  request.set_spiffe_id(input.spiffe_id);
  request.set_node_id(input.node_id);
  for (const auto& s : input.selectors) request.add_selectors(s);
  for (const auto& a : input.audience) request.add_audience(a);
  for (const auto& s : input.scopes) request.add_scopes(s);
  request.set_ttl(input.ttl_seconds);
  if (input.task.has_value()) {
    pb::Task* task = request.mutable_task();
    task->set_id(input.task->id);
    task->set_purpose(input.task->purpose);
    for (const auto& s : input.task->scopes) task->add_scopes(s);
    for (const auto& a : input.task->audiences) task->add_audiences(a);
  }
  request.set_subject(input.subject);
  for (const auto& a : input.actor_chain) request.add_actor_chain(a);
  // The same text as PolicyInputJson's "time".
  request.set_time(absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixSeconds(input.time),
                                    absl::UTCTimeZone()));
  return request;
}

absl::StatusOr<PolicyDecision> FromResponse(const pb::CheckResponse& response) {
  PolicyDecision decision;
  decision.allow = response.allow();
  decision.reason = response.reason();
  if (response.has_ttl_max()) {
    if (response.ttl_max() <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "policy hook grpc: the answer's ttl_max is not positive (", response.ttl_max(), ")"));
    }
    decision.ttl_max = response.ttl_max();
  }
  if (response.has_scopes()) {
    decision.scopes.emplace(response.scopes().scopes().begin(), response.scopes().scopes().end());
  }
  decision.require_approval = response.require_approval();
  return decision;
}

}  // namespace

struct GrpcPolicyHook::Impl {
  std::string target;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::PolicyHook::Stub> stub;
};

absl::StatusOr<std::unique_ptr<GrpcPolicyHook>> GrpcPolicyHook::Create(GrpcPolicyOptions options) {
  if (options.target.empty()) {
    return absl::InvalidArgumentError("policy hook grpc: no HOST:PORT given");
  }
  const bool any_tls_file = !options.ca_file.empty() || !options.client_cert_file.empty() ||
                            !options.client_key_file.empty() ||
                            !options.server_name_override.empty();
  if (options.plaintext && any_tls_file) {
    return absl::InvalidArgumentError(
        "policy hook grpc: plaintext was asked for together with TLS options");
  }
  if (!options.plaintext && options.ca_file.empty()) {
    return absl::InvalidArgumentError(
        "policy hook grpc: TLS needs a CA file (plaintext must be asked for explicitly)");
  }
  if (options.client_cert_file.empty() != options.client_key_file.empty()) {
    return absl::InvalidArgumentError(
        "policy hook grpc: a client certificate needs its key, and a key its certificate");
  }
  if (options.keepalive_time.count() <= 0 || options.keepalive_timeout.count() <= 0 ||
      options.max_reconnect_backoff.count() <= 0) {
    return absl::InvalidArgumentError("policy hook grpc: durations must be positive");
  }

  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.plaintext) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(options.ca_file, "CA file"));
    if (!options.client_cert_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem(options.client_cert_file, "client certificate"));
      ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem(options.client_key_file, "client key"));
    }
    credentials = grpc::SslCredentials(ssl);
    OPENSSL_cleanse(ssl.pem_private_key.data(), ssl.pem_private_key.size());
  }

  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxGrpcAnswerBytes);
  if (!options.server_name_override.empty()) {
    args.SetSslTargetNameOverride(options.server_name_override);
  }
  // Pings during and between calls, however long nothing else is sent, so a peer that vanished
  // is noticed within keepalive_time + keepalive_timeout.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, static_cast<int>(options.keepalive_time.count()));
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, static_cast<int>(options.keepalive_timeout.count()));
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  // Never let the channel go idle (and drop its connection) between decisions.
  args.SetInt(GRPC_ARG_CLIENT_IDLE_TIMEOUT_MS, INT_MAX);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(std::min<int64_t>(100, options.max_reconnect_backoff.count())));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(options.max_reconnect_backoff.count()));

  auto impl = std::make_unique<Impl>();
  impl->target = options.target;
  impl->channel = grpc::CreateCustomChannel(options.target, credentials, args);
  if (impl->channel == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("policy hook grpc: cannot make a channel to ", HookText(options.target)));
  }
  // Starts connecting in the background, so the first decision does not pay for it; returns at
  // once whether the hook is up or not.
  impl->channel->GetState(/*try_to_connect=*/true);
  impl->stub = pb::PolicyHook::NewStub(impl->channel);
  return std::unique_ptr<GrpcPolicyHook>(new GrpcPolicyHook(std::move(impl)));
}

GrpcPolicyHook::GrpcPolicyHook(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GrpcPolicyHook::~GrpcPolicyHook() = default;

absl::StatusOr<PolicyDecision> GrpcPolicyHook::Check(
    const PolicyInput& input, std::chrono::steady_clock::time_point deadline) {
  const auto now = std::chrono::steady_clock::now();
  if (deadline <= now) {
    return absl::DeadlineExceededError("policy hook grpc: the deadline passed before the call");
  }
  grpc::ClientContext context;
  // gRPC deadlines are wall-clock; the remaining time is what carries over.
  context.set_deadline(std::chrono::system_clock::now() + (deadline - now));
  // Fail fast (the default): a hook that is down answers Unavailable at once rather than
  // holding the caller until the deadline.
  context.set_wait_for_ready(false);
  pb::CheckResponse response;
  grpc::Status status = impl_->stub->Check(&context, ToRequest(input), &response);
  if (!status.ok()) {
    const std::string detail = absl::StrCat("code ", static_cast<int>(status.error_code()), ": ",
                                            HookText(status.error_message()));
    if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
      return absl::DeadlineExceededError(
          absl::StrCat("policy hook grpc: no answer before the deadline (", detail, ")"));
    }
    // Whatever the hook's code says (even PERMISSION_DENIED), a failed call is not a decision.
    return absl::UnavailableError(absl::StrCat("policy hook grpc: the call failed (", detail, ")"));
  }
  return FromResponse(response);
}

}  // namespace mandate::broker::policy
