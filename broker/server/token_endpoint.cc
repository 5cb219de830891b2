#include "broker/server/token_endpoint.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/log/log.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

absl::StatusOr<std::string> FormDecode(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    char c = in[i];
    if (c == '+') {
      out.push_back(' ');
    } else if (c == '%') {
      if (i + 2 >= in.size()) {
        return absl::InvalidArgumentError("truncated percent-encoding in the form body");
      }
      int hi = HexValue(in[i + 1]), lo = HexValue(in[i + 2]);
      if (hi < 0 || lo < 0)
        return absl::InvalidArgumentError("bad percent-encoding in the form body");
      out.push_back(static_cast<char>(hi * 16 + lo));
      i += 2;
    } else {
      out.push_back(c);
    }
  }
  if (out.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError("NUL byte in the form body");
  }
  return out;
}

// The media type of a Content-Type value, lowercased, without parameters or spaces.
std::string MediaType(std::string_view content_type) {
  std::string type(content_type.substr(0, content_type.find(';')));
  absl::StripAsciiWhitespace(&type);
  absl::AsciiStrToLower(&type);
  return type;
}

// Splits on `sep`, dropping empty pieces.
std::vector<std::string_view> SplitNonEmpty(std::string_view s, char sep) {
  std::vector<std::string_view> out;
  while (!s.empty()) {
    size_t end = s.find(sep);
    std::string_view piece = s.substr(0, end);
    if (!piece.empty()) out.push_back(piece);
    if (end == std::string_view::npos) break;
    s.remove_prefix(end + 1);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseFormUrlEncoded(
    std::string_view body, size_t max_pairs) {
  std::vector<std::pair<std::string, std::string>> out;
  for (std::string_view pair : SplitNonEmpty(body, '&')) {
    if (out.size() == max_pairs) {
      return absl::InvalidArgumentError(absl::StrCat("more than ", max_pairs, " form parameters"));
    }
    size_t eq = pair.find('=');
    std::string_view name = pair.substr(0, eq);
    std::string_view value = eq == std::string_view::npos ? "" : pair.substr(eq + 1);
    ASSIGN_OR_RETURN(std::string decoded_name, FormDecode(name));
    ASSIGN_OR_RETURN(std::string decoded_value, FormDecode(value));
    out.emplace_back(std::move(decoded_name), std::move(decoded_value));
  }
  return out;
}

TokenEndpoint::TokenEndpoint(const issuance::IssuancePipeline& pipeline) : pipeline_(pipeline) {}

TokenResponse TokenEndpoint::Handle(const TokenRequest& request) const {
  using issuance::OAuthRefusal;
  using issuance::Step;
  if (pipeline_.exchange() == nullptr) {
    TokenResponse response;
    response.status = 400;
    response.body =
        R"({"error":"unsupported_grant_type","error_description":"tasks are not enabled"})";
    return response;
  }
  const TaskTokenExchange& exchange = *pipeline_.exchange();
  auto render = [&](const issuance::Refusal& r) {
    TokenResponse response;
    response.status = r.http_status;
    response.body =
        nlohmann::json{{"error", r.oauth_error}, {"error_description", r.description}}.dump(
            -1, ' ', false, nlohmann::json::error_handler_t::replace);
    response.dpop_nonce = exchange.CurrentNonce();
    if (r.retry_after_seconds > 0) response.retry_after_seconds = r.retry_after_seconds;
    return response;
  };
  // A malformed request: refused (and audited) before the pipeline can say what kind it is.
  auto malformed = [&](std::string error, std::string description) {
    return render(pipeline_.RefuseRequest(
        policy::IssuanceKind::kTaskToken,
        OAuthRefusal(Step::kRequest, std::move(error), absl::StatusCode::kInvalidArgument,
                     std::move(description))));
  };

  // RFC 6749 §3.2: form-encoded POST body; parameters in the URL are not accepted (they end up
  // in logs and caches).
  if (MediaType(request.content_type) != "application/x-www-form-urlencoded") {
    return malformed("invalid_request", "Content-Type must be application/x-www-form-urlencoded");
  }
  if (request.has_query) {
    return malformed("invalid_request", "parameters must be sent in the request body");
  }
  auto form = ParseFormUrlEncoded(request.body);
  if (!form.ok()) return malformed("invalid_request", std::string(form.status().message()));

  // Known parameters, each at most once (RFC 6749 §3.2); unknown ones are ignored (§3.1).
  static constexpr std::string_view kKnown[] = {"grant_type",
                                                "subject_token",
                                                "subject_token_type",
                                                "actor_token",
                                                "actor_token_type",
                                                "audience",
                                                "resource",
                                                "scope",
                                                "task_id",
                                                "requested_token_type"};
  std::map<std::string_view, std::string> params;
  for (const auto& [name, value] : *form) {
    auto known = std::find(std::begin(kKnown), std::end(kKnown), name);
    if (known == std::end(kKnown)) continue;
    if (!params.emplace(*known, value).second) {
      if (*known == "audience" || *known == "resource") {
        return malformed("invalid_target", "one audience per token request");
      }
      return malformed("invalid_request",
                       absl::StrCat("parameter ", std::string(*known), " is repeated"));
    }
  }
  auto param = [&](std::string_view name) -> const std::string* {
    auto it = params.find(name);
    return it == params.end() ? nullptr : &it->second;
  };

  const std::string* grant_type = param("grant_type");
  if (grant_type == nullptr) return malformed("invalid_request", "grant_type is required");
  if (*grant_type != kTokenExchangeGrantType) {
    return malformed("unsupported_grant_type", absl::StrCat("only ", kTokenExchangeGrantType));
  }
  auto proof_header = dpop::ExtractSingleDpopHeader(request.dpop_headers);
  if (!proof_header.ok()) {
    return malformed("invalid_dpop_proof", std::string(proof_header.status().message()));
  }
  if (param("actor_token") != nullptr || param("actor_token_type") != nullptr) {
    // Delegation: its own kind in the pipeline.
    issuance::TokenExchangeRequest delegation;
    delegation.actor_token = param("actor_token") ? *param("actor_token") : "";
    delegation.actor_token_type = param("actor_token_type") ? *param("actor_token_type") : "";
    delegation.subject_token = param("subject_token") ? *param("subject_token") : "";
    delegation.subject_token_type = param("subject_token_type") ? *param("subject_token_type") : "";
    auto result = pipeline_.Issue(delegation);
    if (!result.ok()) return render(result.refusal());
    return malformed("server_error", "delegation is not available");
  }
  if (param("resource") != nullptr) {
    return malformed("invalid_target", "resource is not supported; name the audience");
  }
  if (const std::string* requested = param("requested_token_type");
      requested != nullptr && *requested != kAccessTokenType) {
    return malformed("invalid_request",
                     absl::StrCat("requested_token_type must be ", kAccessTokenType));
  }
  const std::string* subject_token = param("subject_token");
  const std::string* subject_token_type = param("subject_token_type");
  if (subject_token == nullptr || subject_token_type == nullptr) {
    return malformed("invalid_request", "subject_token and subject_token_type are required");
  }
  if (*subject_token_type != kJwtTokenType) {
    return malformed("invalid_request", absl::StrCat("subject_token_type must be ", kJwtTokenType));
  }
  if (subject_token->empty()) return malformed("invalid_request", "subject_token is empty");

  issuance::TaskTokenRequest issue;
  issue.ask.subject_token = *subject_token;
  issue.ask.task_id = param("task_id") ? *param("task_id") : "";
  // An empty audience means "the task's only one", as on the node API.
  if (const std::string* audience = param("audience"); audience != nullptr && !audience->empty()) {
    issue.ask.audience = *audience;
  }
  if (const std::string* scope = param("scope"); scope != nullptr) {
    for (std::string_view s : SplitNonEmpty(*scope, ' ')) issue.ask.scopes.emplace_back(s);
    if (issue.ask.scopes.empty()) return malformed("invalid_scope", "empty scope");
  }
  issue.ask.dpop_proof = std::string(*proof_header);
  auto token = pipeline_.IssueTaskToken(issue);
  if (!token.ok()) return render(token.refusal());

  nlohmann::json body = {
      {"access_token", token->token.token},
      {"issued_token_type", kAccessTokenType},
      {"token_type", "DPoP"},
      {"expires_in", token->expires_in},
  };
  // RFC 6749 §5.1: scope is required when it differs from what was asked; we include it then,
  // and whenever the client left the choice to us.
  std::vector<std::string> asked = token->requested_scopes, granted = token->scopes;
  std::sort(asked.begin(), asked.end());
  asked.erase(std::unique(asked.begin(), asked.end()), asked.end());
  std::sort(granted.begin(), granted.end());
  if (!token->scopes_requested || asked != granted) {
    std::string scope;
    for (const auto& s : token->scopes) absl::StrAppend(&scope, scope.empty() ? "" : " ", s);
    body["scope"] = scope;
  }
  TokenResponse response;
  response.body = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  response.dpop_nonce = exchange.CurrentNonce();
  return response;
}

}  // namespace mandate::broker
