#include "broker/server/token_endpoint.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "broker/common/log/log.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

constexpr size_t kMaxSubjectTokenBytes = 8192;
constexpr size_t kMaxTaskIdBytes = 128;

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

// A refused request: the OAuth error code, a description safe to show the caller (never
// echoing attacker bytes), and the HTTP status.
struct TokenEndpoint::Refusal {
  std::string error;
  std::string description;
  int status = 400;
};

std::string TokenEndpointUrl(std::string_view issuer_url) {
  if (issuer_url.ends_with('/')) issuer_url.remove_suffix(1);
  return absl::StrCat(std::string(issuer_url), "/token");
}

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

DpopNonceSource::DpopNonceSource(const Clock& clock, int64_t rotate_seconds)
    : clock_(clock), rotate_seconds_(std::max<int64_t>(1, rotate_seconds)) {}

void DpopNonceSource::RotateIfDueLocked() {
  int64_t now = clock_.NowSeconds();
  if (!current_.empty() && now < rotated_at_ + rotate_seconds_) return;
  // 128 random bits, base64url: within NQCHAR (RFC 9449 §8.1).
  auto random = crypto::RandomBytes(16);
  if (!random.ok()) {
    // Keep the old nonce rather than hand out a guessable one; an empty current_ means every
    // proof is asked for a nonce we cannot give, which fails closed.
    spdlog::error("cannot rotate the DPoP nonce: {}", random.status().ToString());
    return;
  }
  previous_ = std::move(current_);
  current_ = jose::Base64UrlEncode(*random);
  rotated_at_ = now;
}

std::string DpopNonceSource::Current() {
  absl::MutexLock lock(&mu_);
  RotateIfDueLocked();
  return current_;
}

std::vector<std::string> DpopNonceSource::Accepted() {
  absl::MutexLock lock(&mu_);
  RotateIfDueLocked();
  std::vector<std::string> out;
  if (!current_.empty()) out.push_back(current_);
  if (!previous_.empty()) out.push_back(previous_);
  return out;
}

TokenEndpoint::TokenEndpoint(const TrustAuthority& authority, const EntryRegistry& entries,
                             const TaskRegistry& tasks, const Issuer& issuer,
                             dpop::ReplayCache& replay_cache, const Clock& clock,
                             TokenEndpointOptions options)
    : authority_(authority),
      entries_(entries),
      tasks_(tasks),
      issuer_(issuer),
      replay_cache_(replay_cache),
      clock_(clock),
      options_(std::move(options)),
      url_(TokenEndpointUrl(options_.issuer_url)),
      proof_policy_{.token_endpoint_url = url_,
                    .started_at = options_.started_at,
                    .max_age_seconds = options_.proof_max_age_seconds,
                    .max_future_seconds = options_.proof_max_future_seconds,
                    .replay_cache = &replay_cache_,
                    .nonces = options_.nonces} {}

int64_t SecondsUntilProofsAccepted(const TokenProofPolicy& policy, const Clock& clock) {
  return std::max<int64_t>(
      0,
      dpop::FirstAcceptableIat(policy.started_at, policy.max_future_seconds) - clock.NowSeconds());
}

absl::StatusOr<dpop::VerifiedProof> VerifyTokenRequestProof(const TokenProofPolicy& policy,
                                                            const Clock& clock,
                                                            std::string_view proof,
                                                            std::string_view owner) {
  dpop::VerifyOptions options;
  options.htm = "POST";
  options.htu = policy.token_endpoint_url;
  options.now = clock.NowSeconds();
  options.max_age_seconds = policy.max_age_seconds;
  options.max_future_seconds = policy.max_future_seconds;
  options.not_before = dpop::FirstAcceptableIat(policy.started_at, policy.max_future_seconds);
  options.replay_owner = std::string(owner);
  if (policy.nonces != nullptr) options.nonces = policy.nonces->Accepted();
  return dpop::VerifyProof(proof, options, policy.replay_cache);
}

absl::StatusOr<TokenEndpoint::Subject> TokenEndpoint::AuthenticateSubject(
    std::string_view jwt_svid) const {
  ASSIGN_OR_RETURN(jose::ParsedJws jws, jose::ParseCompact(jwt_svid, kMaxSubjectTokenBytes));
  // A JWT-SVID (typ absent, JWT or JOSE): never a task token or a DPoP proof.
  auto typ = jws.header.find("typ");
  if (typ != jws.header.end() && (!typ->is_string() || (*typ != "JWT" && *typ != "JOSE"))) {
    return absl::InvalidArgumentError("subject_token is not a JWT-SVID (typ)");
  }
  auto kid = jws.header.find("kid");
  if (jws.alg != jose::Algorithm::kES256 || kid == jws.header.end() || !kid->is_string() ||
      *kid != authority_.jwt_key_id()) {
    return absl::InvalidArgumentError("subject_token is not signed by this broker");
  }
  RETURN_IF_ERROR(jose::VerifySignature(jws, authority_.jwt_public_key()));
  // The broker signed it on this clock: no leeway.
  RETURN_IF_ERROR(jose::CheckTimeClaims(jws.payload, clock_.NowSeconds(), 0, true));
  // Its only audience must be this broker. A JWT-SVID also addressed to some service would let
  // that service exchange it for tokens in the workload's name.
  auto aud = jws.payload.find("aud");
  bool only_us = aud != jws.payload.end() &&
                 ((aud->is_string() && *aud == options_.issuer_url) ||
                  (aud->is_array() && aud->size() == 1 && (*aud)[0] == options_.issuer_url));
  if (!only_us) {
    return absl::InvalidArgumentError(
        "subject_token audience must be exactly the broker's issuer URL");
  }
  auto sub = jws.payload.find("sub");
  if (sub == jws.payload.end() || !sub->is_string()) {
    return absl::InvalidArgumentError("subject_token has no sub");
  }
  ASSIGN_OR_RETURN(spiffe::SpiffeId id, spiffe::SpiffeId::Parse(sub->get<std::string>()));
  if (!id.MemberOf(authority_.trust_domain())) {
    return absl::InvalidArgumentError("subject_token sub is outside the trust domain");
  }
  // The identity must still be registered: deleting its entries stops exchanges at once, not
  // when the last JWT-SVID expires.
  std::vector<store::RegistrationEntry> entries = entries_.ForSpiffeId(id.str());
  if (entries.empty()) {
    return absl::InvalidArgumentError("subject_token sub has no registration entry");
  }
  Subject subject{id.str(), 0};
  for (const auto& e : entries) {
    if (e.token_ttl_s > 0 &&
        (subject.token_ttl_seconds == 0 || e.token_ttl_s < subject.token_ttl_seconds)) {
      subject.token_ttl_seconds = e.token_ttl_s;
    }
  }
  return subject;
}

TokenResponse TokenEndpoint::Handle(const TokenRequest& request) const {
  std::string subject_for_log = "-";
  auto refuse = [&](Refusal r) {
    spdlog::info("token request refused error={} reason=\"{}\" sub={}", r.error,
                 log::EscapeForLog(r.description), log::EscapeForLog(subject_for_log));
    TokenResponse response;
    response.status = r.status;
    response.body = nlohmann::json{{"error", r.error}, {"error_description", r.description}}.dump(
        -1, ' ', false, nlohmann::json::error_handler_t::replace);
    return response;
  };

  // RFC 6749 §3.2: form-encoded POST body; parameters in the URL are not accepted (they end up
  // in logs and caches).
  if (MediaType(request.content_type) != "application/x-www-form-urlencoded") {
    return refuse({"invalid_request", "Content-Type must be application/x-www-form-urlencoded"});
  }
  if (request.has_query) {
    return refuse({"invalid_request", "parameters must be sent in the request body"});
  }
  auto form = ParseFormUrlEncoded(request.body);
  if (!form.ok()) return refuse({"invalid_request", std::string(form.status().message())});

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
        return refuse({"invalid_target", "one audience per token request"});
      }
      return refuse(
          {"invalid_request", absl::StrCat("parameter ", std::string(*known), " is repeated")});
    }
  }
  auto param = [&](std::string_view name) -> const std::string* {
    auto it = params.find(name);
    return it == params.end() ? nullptr : &it->second;
  };

  const std::string* grant_type = param("grant_type");
  if (grant_type == nullptr) return refuse({"invalid_request", "grant_type is required"});
  if (*grant_type != kTokenExchangeGrantType) {
    return refuse({"unsupported_grant_type", absl::StrCat("only ", kTokenExchangeGrantType)});
  }
  // Fail fast on the DPoP header shape; the proof itself is checked last.
  auto proof_header = dpop::ExtractSingleDpopHeader(request.dpop_headers);
  if (!proof_header.ok()) {
    return refuse({"invalid_dpop_proof", std::string(proof_header.status().message())});
  }
  if (param("actor_token") != nullptr || param("actor_token_type") != nullptr) {
    return refuse({"invalid_request", "actor_token is not supported yet"});
  }
  if (param("resource") != nullptr) {
    return refuse({"invalid_target", "resource is not supported; name the audience"});
  }
  if (const std::string* requested = param("requested_token_type");
      requested != nullptr && *requested != kAccessTokenType) {
    return refuse(
        {"invalid_request", absl::StrCat("requested_token_type must be ", kAccessTokenType)});
  }
  const std::string* subject_token = param("subject_token");
  const std::string* subject_token_type = param("subject_token_type");
  if (subject_token == nullptr || subject_token_type == nullptr) {
    return refuse({"invalid_request", "subject_token and subject_token_type are required"});
  }
  if (*subject_token_type != kJwtTokenType) {
    return refuse({"invalid_request", absl::StrCat("subject_token_type must be ", kJwtTokenType)});
  }
  auto subject = AuthenticateSubject(*subject_token);
  if (!subject.ok()) {
    return refuse(
        {"invalid_request", absl::StrCat("subject_token rejected: ", subject.status().message())});
  }
  subject_for_log = subject->spiffe_id;

  const std::string* task_id = param("task_id");
  if (task_id == nullptr || task_id->empty() || task_id->size() > kMaxTaskIdBytes) {
    return refuse({"invalid_request", "task_id is required"});
  }
  auto task = tasks_.GetUsable(subject->spiffe_id, *task_id);
  if (!task.ok()) {
    if (task.status().code() == absl::StatusCode::kNotFound ||
        task.status().code() == absl::StatusCode::kFailedPrecondition) {
      return refuse({"invalid_grant", std::string(task.status().message())});
    }
    return refuse({"server_error", "task store unavailable", 500});
  }

  std::string audience;
  if (const std::string* requested = param("audience"); requested != nullptr) {
    audience = *requested;
  } else if (task->audiences.size() == 1) {
    audience = task->audiences[0];
  } else {
    return refuse({"invalid_request", "audience is required: the task has several"});
  }
  if (std::find(task->audiences.begin(), task->audiences.end(), audience) ==
      task->audiences.end()) {
    return refuse({"invalid_target", "audience outside the task"});
  }
  std::vector<std::string> requested_scopes;
  if (const std::string* scope = param("scope"); scope != nullptr) {
    for (std::string_view s : SplitNonEmpty(*scope, ' ')) {
      if (!IsScopeToken(s)) return refuse({"invalid_scope", "malformed scope"});
      requested_scopes.emplace_back(s);
    }
    if (requested_scopes.empty()) return refuse({"invalid_scope", "empty scope"});
  }
  auto scopes = TokenScopesForTask(*task, audience, requested_scopes);
  if (!scopes.ok()) return refuse({"invalid_scope", std::string(scopes.status().message())});

  auto proof = VerifyTokenRequestProof(proof_policy_, clock_, *proof_header, subject->spiffe_id);
  if (!proof.ok()) {
    switch (proof.status().code()) {
      case absl::StatusCode::kFailedPrecondition: {
        TokenResponse response =
            refuse({"use_dpop_nonce", "the DPoP proof must carry the nonce in DPoP-Nonce"});
        response.dpop_nonce = options_.nonces != nullptr ? options_.nonces->Current() : "";
        return response;
      }
      case absl::StatusCode::kResourceExhausted:  // cache full, or this identity's share used up
      case absl::StatusCode::kUnavailable:        // just restarted (FirstAcceptableIat)
        // Nothing is wrong with the proof; the broker cannot accept it right now, and a retry
        // with a new proof (once older proofs expire, or the restart window has passed) can.
        return refuse({"temporarily_unavailable", std::string(proof.status().message()), 503});
      case absl::StatusCode::kInvalidArgument:
        return refuse({"server_error", "token endpoint misconfigured", 500});
      default:
        return refuse({"invalid_dpop_proof", std::string(proof.status().message())});
    }
  }

  TaskTokenGrant grant;
  grant.spiffe_id = subject->spiffe_id;
  grant.task_id = task->id;
  grant.task_purpose = task->purpose;
  grant.task_expires_at = task->expires_at;
  grant.audience = audience;
  grant.scopes = *scopes;
  grant.jkt = proof->jkt;
  grant.ttl_seconds = subject->token_ttl_seconds;
  auto token = issuer_.IssueTaskToken(grant);
  if (!token.ok()) {
    if (token.status().code() == absl::StatusCode::kFailedPrecondition) {
      return refuse({"invalid_grant", std::string(token.status().message())});
    }
    return refuse({"server_error", "cannot mint the token", 500});
  }

  nlohmann::json body = {
      {"access_token", token->token},
      {"issued_token_type", kAccessTokenType},
      {"token_type", "DPoP"},
      {"expires_in", std::max<int64_t>(0, token->expires_at - clock_.NowSeconds())},
  };
  // RFC 6749 §5.1: scope is required when it differs from what was asked; we include it then,
  // and whenever the client left the choice to us.
  std::vector<std::string> asked = requested_scopes, granted = *scopes;
  std::sort(asked.begin(), asked.end());
  asked.erase(std::unique(asked.begin(), asked.end()), asked.end());
  std::sort(granted.begin(), granted.end());
  if (requested_scopes.empty() || asked != granted) {
    std::string scope;
    for (const auto& s : *scopes) absl::StrAppend(&scope, scope.empty() ? "" : " ", s);
    body["scope"] = scope;
  }
  TokenResponse response;
  response.body = body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (options_.nonces != nullptr) response.dpop_nonce = options_.nonces->Current();
  return response;
}

}  // namespace mandate::broker
