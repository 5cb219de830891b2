// The broker's OAuth token endpoint, `POST /token` (DESIGN.md §6): RFC 8693 token exchange of a
// workload's JWT-SVID for a DPoP-bound (RFC 9449) task token, scoped to a task the workload
// declared earlier.
//
// The request is form-encoded:
//   grant_type=urn:ietf:params:oauth:grant-type:token-exchange
//   subject_token=<JWT-SVID whose only audience is the broker's issuer URL>
//   subject_token_type=urn:ietf:params:oauth:token-type:jwt
//   task_id=<task of that SPIFFE ID>           (extension parameter)
//   audience=<one of the task's audiences>     (optional when the task has exactly one)
//   scope=<space-separated subset of the task's scopes>  (optional: all of them)
// with exactly one `DPoP` header: a proof for POST <issuer>/token whose key the token is bound to.
//
// Errors are RFC 6749 §5.2 JSON bodies with status 400: invalid_request (malformed request, or a
// subject_token that is not an acceptable JWT-SVID, as RFC 8693 §2.2.2 prescribes),
// unsupported_grant_type, invalid_grant (unknown, ended or expired task, or another identity's; a
// policy denial), authorization_pending (the task awaits a human's approval), invalid_target
// (audience outside the task), invalid_scope (scope outside the task), invalid_dpop_proof and
// use_dpop_nonce (RFC 9449 §5, §8). A full replay cache, or one whose share for the requesting
// SPIFFE ID is used up, answers 503 temporarily_unavailable (the proof is fine; retry later) and a
// store failure 500 server_error. Nothing is minted on any refusal.
//
// A thin adapter: it parses the form and hands the request to the issuance pipeline, whose
// task-token exchange (exchange/task_token_exchange.h) runs the same checks as the node API's
// FetchTaskToken, so both give the same answer; every refusal, a malformed request included, is
// audited there. Transport-independent (HttpEndpoints serves it), so every rule is unit-tested
// without sockets.
//
// Ownership: borrows the pipeline, which must outlive it.
// Thread-safety: Handle may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_TOKEN_ENDPOINT_H_
#define MANDATE_BROKER_SERVER_TOKEN_ENDPOINT_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "broker/server/exchange/task_token_exchange.h"
#include "broker/server/issuance/pipeline.h"

namespace mandate::broker {

// Parses an application/x-www-form-urlencoded body (WHATWG URL §5.1): '&'-separated name=value
// pairs, '+' is a space, %XX escapes decoded. Empty pairs are skipped. InvalidArgument for a
// malformed escape, a NUL byte, more than `max_pairs` pairs, or a name or value that is not valid
// UTF-8 after decoding. Order and repetitions are kept.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseFormUrlEncoded(
    std::string_view body, size_t max_pairs = 64);

// A token request as the transport received it.
struct TokenRequest {
  std::string content_type;               // the Content-Type header ("" when absent)
  std::string body;                       // raw form body
  bool has_query = false;                 // the request URL had a query string
  std::vector<std::string> dpop_headers;  // every DPoP header value, in order
};

// What to send back. `body` is JSON; the transport adds Content-Type application/json and
// Cache-Control: no-store (RFC 6749 §5.1) to every answer.
struct TokenResponse {
  int status = 200;
  std::string body;
  std::string dpop_nonce;           // non-empty: send as the DPoP-Nonce header
  int64_t retry_after_seconds = 0;  // > 0: send as Retry-After (503 after a restart)
};

class TokenEndpoint {
 public:
  // `pipeline` must have a task-token exchange.
  explicit TokenEndpoint(const issuance::IssuancePipeline& pipeline);

  TokenEndpoint(const TokenEndpoint&) = delete;
  TokenEndpoint& operator=(const TokenEndpoint&) = delete;

  TokenResponse Handle(const TokenRequest& request) const;

  const std::string& url() const { return pipeline_.exchange()->token_endpoint_url(); }

 private:
  const issuance::IssuancePipeline& pipeline_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_TOKEN_ENDPOINT_H_
