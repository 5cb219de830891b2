#include "mandate/token_verifier.h"

#include <httplib.h>

#include <algorithm>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/clock.h"
#include "broker/common/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace mandate {
namespace {

using nlohmann::json;

constexpr size_t kMaxTaskTokenBytes = 16384;
// Discovery documents and JWKS are small; a larger answer is a misconfigured or hostile server.
constexpr size_t kMaxHttpResponseBytes = 1 << 20;
// RFC 8693 does not bound `act` nesting; a bound keeps a hostile (validly signed) token from
// costing unbounded work and matches what any policy would allow.
constexpr int kMaxActorDepth = 16;
// Longest error_description put in a challenge.
constexpr size_t kMaxDescriptionChars = 200;

// The OAuth classification of an error travels as a payload, so callers never parse messages.
constexpr char kOAuthErrorPayload[] = "type.mandate.dev/oauth-error";
constexpr char kOAuthScopePayload[] = "type.mandate.dev/oauth-scope";

// This absl build keeps absl::string_view distinct from std::string_view.
absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

absl::Status Classified(absl::Status status, absl::string_view oauth_code) {
  status.SetPayload(kOAuthErrorPayload, absl::Cord(oauth_code));
  return status;
}
absl::Status InvalidToken(absl::string_view message) {
  return Classified(absl::UnauthenticatedError(message), "invalid_token");
}
absl::Status InvalidProof(absl::string_view message) {
  return Classified(absl::UnauthenticatedError(message), "invalid_dpop_proof");
}
absl::Status InvalidRequest(absl::string_view message) {
  return Classified(absl::InvalidArgumentError(message), "invalid_request");
}
// The request may be fine but cannot be judged now (the replay cache is full or the client's
// share of it used up): 503, and the client may retry.
absl::Status TemporarilyUnavailable(absl::string_view message) {
  return Classified(absl::UnavailableError(message), "temporarily_unavailable");
}
// No usable credentials at all: RFC 6750 §3.1 asks for a challenge without an error code.
absl::Status NoCredentials(absl::string_view message) {
  return absl::UnauthenticatedError(message);
}

// ---------------------------------------------------------------------------- URLs

struct HttpUrl {
  std::string scheme;  // "http" or "https", lowercase
  std::string host;    // as written, brackets kept for IPv6
  std::string origin;  // scheme://authority, what httplib::Client takes
  std::string target;  // path and query, at least "/"
};

bool IsLoopbackHost(absl::string_view host) {
  std::string lower = absl::AsciiStrToLower(host);
  return lower == "localhost" || lower == "[::1]" || absl::StartsWith(lower, "127.");
}

// Splits an absolute http(s) URL. Refuses userinfo, fragments, whitespace and control or
// non-ASCII characters; `allow_query` false also refuses a query (RFC 8414 §2 for issuers).
absl::StatusOr<HttpUrl> ParseHttpUrl(absl::string_view url, bool allow_query,
                                     bool allow_insecure_http) {
  for (char c : url) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7F) {
      return absl::InvalidArgumentError("URL contains a space, control or non-ASCII character");
    }
  }
  size_t scheme_end = url.find("://");
  if (scheme_end == absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("'", url, "' is not an absolute URL"));
  }
  HttpUrl out;
  out.scheme = absl::AsciiStrToLower(url.substr(0, scheme_end));
  if (out.scheme != "http" && out.scheme != "https") {
    return absl::InvalidArgumentError(absl::StrCat("'", url, "' is not an http(s) URL"));
  }
  absl::string_view rest = url.substr(scheme_end + 3);
  size_t authority_end = rest.find_first_of("/?#");
  absl::string_view authority = rest.substr(0, authority_end);
  absl::string_view target =
      authority_end == absl::string_view::npos ? absl::string_view() : rest.substr(authority_end);
  if (authority.empty() || authority.find('@') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", url, "' must have a host and no user information"));
  }
  if (target.find('#') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("'", url, "' must not have a fragment"));
  }
  if (!allow_query && target.find('?') != absl::string_view::npos) {
    return absl::InvalidArgumentError(absl::StrCat("'", url, "' must not have a query"));
  }
  // The host is the authority without its port; IPv6 literals keep their brackets.
  absl::string_view host = authority;
  size_t colon = authority.rfind(':');
  size_t bracket = authority.rfind(']');
  if (colon != absl::string_view::npos && (bracket == absl::string_view::npos || colon > bracket)) {
    host = authority.substr(0, colon);
  }
  if (host.empty()) return absl::InvalidArgumentError(absl::StrCat("'", url, "' has no host"));
  out.host = std::string(host);
  if (out.scheme == "http" && !allow_insecure_http && !IsLoopbackHost(out.host)) {
    // Keys fetched over plain http from another machine can be replaced by anyone on the path.
    return absl::InvalidArgumentError(absl::StrCat(
        "'", url, "' uses plain http to a non-loopback host; use https or allow_insecure_http"));
  }
  out.origin = absl::StrCat(out.scheme, "://", authority);
  out.target =
      target.empty() || target.front() == '?' ? absl::StrCat("/", target) : std::string(target);
  return out;
}

// GET `url`, requiring 200 and at most kMaxHttpResponseBytes. Network and HTTP failures are
// Unavailable: the caller cannot tell a down broker from a broken one, and either way the answer
// is "try again later", never "accept".
absl::StatusOr<std::string> HttpGet(const HttpUrl& url, const TokenVerifierOptions& options) {
  try {
    httplib::Client client(url.origin);
    if (!client.is_valid()) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot make an HTTP client for ", url.origin));
    }
    const time_t sec = options.http_timeout_ms / 1000;
    const time_t usec = (options.http_timeout_ms % 1000) * 1000;
    client.set_connection_timeout(sec, usec);
    client.set_read_timeout(sec, usec);
    client.set_write_timeout(sec, usec);
    // A redirect could lead anywhere; the broker never sends one.
    client.set_follow_location(false);
    if (url.scheme == "https") {
      client.enable_server_certificate_verification(true);
      if (!options.ca_file.empty()) client.set_ca_cert_path(options.ca_file);
    }
    std::string body;
    bool too_large = false;
    httplib::Result result =
        client.Get(url.target, httplib::Headers{{"Accept", "application/json"}},
                   [&](const char* data, size_t length) {
                     if (body.size() + length > kMaxHttpResponseBytes) {
                       too_large = true;
                       return false;
                     }
                     body.append(data, length);
                     return true;
                   });
    const std::string where = absl::StrCat(url.origin, url.target);
    if (too_large) {
      return absl::UnavailableError(
          absl::StrCat("GET ", where, ": response larger than ", kMaxHttpResponseBytes, " bytes"));
    }
    if (!result) {
      return absl::UnavailableError(
          absl::StrCat("GET ", where, " failed: ", httplib::to_string(result.error())));
    }
    if (result->status != 200) {
      return absl::UnavailableError(
          absl::StrCat("GET ", where, " answered HTTP ", result->status, ", want 200"));
    }
    return body;
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("GET ", url.origin, url.target, ": ", e.what()));
  }
}

// ---------------------------------------------------------------------------- claims

bool IsToken68(std::string_view value) {
  size_t end = value.find_last_not_of('=');
  if (value.empty() || end == std::string_view::npos) return false;
  return std::all_of(value.begin(), value.begin() + end + 1, [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_' ||
           c == '~' || c == '+' || c == '/';
  });
}

absl::StatusOr<std::string> RequiredString(const json& object, const char* name,
                                           absl::string_view what) {
  auto it = object.find(name);
  if (it == object.end() || !it->is_string() || it->get_ref<const std::string&>().empty()) {
    return InvalidToken(absl::StrCat("token ", what, " is missing or not a non-empty string"));
  }
  return it->get<std::string>();
}

// A NumericDate already checked by jose::CheckTimeClaims (finite), as whole seconds.
int64_t Seconds(const json& value) {
  if (value.is_number_unsigned()) {
    return static_cast<int64_t>(std::min<uint64_t>(value.get<uint64_t>(), INT64_MAX));
  }
  if (value.is_number_integer()) return value.get<int64_t>();
  // Clamped before the cast, which would be undefined out of range.
  return static_cast<int64_t>(std::clamp(value.get<double>(), -9.0e18, 9.0e18));
}

// The token's claims that VerifiedTaskToken exposes, read from a payload whose signature,
// issuer, audience and times were already checked.
struct TaskClaims {
  std::string subject;
  std::string client_id;
  std::vector<std::string> audience;
  std::vector<std::string> scopes;
  std::string task_id;
  std::string task_purpose;
  std::string jti;
  std::string jkt;
  int64_t issued_at = 0;
  int64_t expires_at = 0;
  std::vector<std::string> actor_chain;
};

absl::StatusOr<TaskClaims> ReadTaskClaims(const json& payload) {
  TaskClaims out;
  ASSIGN_OR_RETURN(out.subject, RequiredString(payload, "sub", "sub"));
  ASSIGN_OR_RETURN(out.client_id, RequiredString(payload, "client_id", "client_id"));
  ASSIGN_OR_RETURN(out.jti, RequiredString(payload, "jti", "jti"));

  // Checked before by jose::AudienceContains and CheckTimeClaims; read defensively all the same,
  // since a const json lookup of a missing member would assert.
  auto aud = payload.find("aud");
  if (aud != payload.end() && aud->is_string()) {
    out.audience.push_back(aud->get<std::string>());
  } else if (aud != payload.end() && aud->is_array()) {
    for (const json& a : *aud) {
      if (a.is_string()) out.audience.push_back(a.get<std::string>());
    }
  }
  // RFC 9068 §2.2 requires iat as well as exp.
  auto iat = payload.find("iat");
  auto exp = payload.find("exp");
  if (iat == payload.end() || !iat->is_number()) return InvalidToken("token has no iat claim");
  if (exp == payload.end() || !exp->is_number()) return InvalidToken("token has no exp claim");
  out.issued_at = Seconds(*iat);
  out.expires_at = Seconds(*exp);

  auto cnf = payload.find("cnf");
  if (cnf == payload.end() || !cnf->is_object()) {
    return InvalidToken("token is not DPoP-bound (no cnf.jkt claim)");
  }
  ASSIGN_OR_RETURN(out.jkt, RequiredString(*cnf, "jkt", "cnf.jkt"));

  // RFC 9068 §2.2.3: scope is optional; absent means no scopes, which HasScope then reflects.
  if (auto scope = payload.find("scope"); scope != payload.end()) {
    if (!scope->is_string()) return InvalidToken("token scope claim is not a string");
    for (absl::string_view s :
         absl::StrSplit(scope->get_ref<const std::string&>(), ' ', absl::SkipEmpty())) {
      out.scopes.emplace_back(s);
    }
  }

  auto task = payload.find("task");
  if (task == payload.end() || !task->is_object()) {
    return InvalidToken("token has no task claim (object); it is not a Mandate task token");
  }
  ASSIGN_OR_RETURN(out.task_id, RequiredString(*task, "id", "task.id"));
  if (auto purpose = task->find("purpose"); purpose != task->end()) {
    if (!purpose->is_string()) return InvalidToken("token task.purpose is not a string");
    out.task_purpose = purpose->get<std::string>();
  }

  // RFC 8693 §4.1: act nests, the outermost act being the current actor.
  const json* act = nullptr;
  if (auto it = payload.find("act"); it != payload.end()) act = &*it;
  while (act != nullptr) {
    if (out.actor_chain.size() >= kMaxActorDepth) {
      return InvalidToken(absl::StrCat("token act chain is deeper than ", kMaxActorDepth));
    }
    if (!act->is_object()) return InvalidToken("token act claim is not a JSON object");
    ASSIGN_OR_RETURN(std::string actor, RequiredString(*act, "sub", "act.sub"));
    out.actor_chain.push_back(std::move(actor));
    auto next = act->find("act");
    act = next == act->end() ? nullptr : &*next;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------- Impl

class TokenVerifier::Impl {
 public:
  Impl(TokenVerifierOptions options, std::vector<jose::Algorithm> algorithms,
       std::optional<HttpUrl> discovery, std::shared_ptr<const jose::JwkSet> static_keys)
      : options_(std::move(options)),
        algorithms_(std::move(algorithms)),
        discovery_(std::move(discovery)),
        static_keys_(std::move(static_keys)),
        replay_cache_(options_.replay_cache_entries, options_.replay_cache_entries_per_client),
        created_at_(Now()) {}

  int64_t Now() const { return options_.clock ? options_.clock() : Clock::Real().NowSeconds(); }

  // The signing key named `kid`, fetching the JWKS when needed (see the header).
  absl::StatusOr<jose::JwkSetKey> FindKey(const std::string& kid, int64_t now) const;

  // Discovery, then the JWKS it names. Called without mu_ held.
  absl::StatusOr<jose::JwkSet> FetchKeys() const;

  const TokenVerifierOptions options_;
  const std::vector<jose::Algorithm> algorithms_;
  const std::optional<HttpUrl> discovery_;                 // unset for CreateWithJwks
  const std::shared_ptr<const jose::JwkSet> static_keys_;  // set for CreateWithJwks
  mutable dpop::ReplayCache replay_cache_;
  // Proofs the previous instance of this service may have accepted (iat up to created_at_ +
  // proof_max_future_seconds) are refused: this replay cache cannot know them, so a restart
  // would otherwise reopen the replay window (DESIGN.md §10, as in the broker).
  const int64_t created_at_;

  mutable absl::Mutex mu_;
  mutable absl::CondVar fetch_done_;
  mutable std::shared_ptr<const jose::JwkSet> keys_ ABSL_GUARDED_BY(mu_);
  mutable int64_t fetched_at_ ABSL_GUARDED_BY(mu_) = 0;  // last successful fetch
  mutable bool attempted_ ABSL_GUARDED_BY(mu_) = false;
  mutable int64_t attempted_at_ ABSL_GUARDED_BY(mu_) = 0;  // last fetch, successful or not
  mutable absl::Status last_fetch_ ABSL_GUARDED_BY(mu_);
  mutable bool fetching_ ABSL_GUARDED_BY(mu_) = false;
};

absl::StatusOr<jose::JwkSet> TokenVerifier::Impl::FetchKeys() const {
  ASSIGN_OR_RETURN(std::string discovery_body, HttpGet(*discovery_, options_));
  absl::StatusOr<json> parsed = jose::ParseStrictJson(discovery_body);
  if (!parsed.ok() || !parsed->is_object()) {
    return absl::UnavailableError("issuer discovery document is not a JSON object");
  }
  const json& doc = *parsed;
  auto issuer = doc.find("issuer");
  // RFC 8414 §3.3: a document naming another issuer must not be used, or one issuer could
  // publish keys for another.
  if (issuer == doc.end() || !issuer->is_string() ||
      issuer->get_ref<const std::string&>() != options_.issuer) {
    return absl::UnavailableError(
        absl::StrCat("issuer discovery document's issuer is not '", options_.issuer, "'"));
  }
  auto jwks_uri = doc.find("jwks_uri");
  if (jwks_uri == doc.end() || !jwks_uri->is_string()) {
    return absl::UnavailableError("issuer discovery document has no jwks_uri");
  }
  absl::StatusOr<HttpUrl> jwks_url =
      ParseHttpUrl(jwks_uri->get_ref<const std::string&>(),
                   /*allow_query=*/true, options_.allow_insecure_http);
  if (!jwks_url.ok()) {
    return absl::UnavailableError(
        absl::StrCat("issuer discovery jwks_uri is unusable: ", jwks_url.status().message()));
  }
  ASSIGN_OR_RETURN(std::string jwks_body, HttpGet(*jwks_url, options_));
  absl::StatusOr<jose::JwkSet> keys = jose::JwkSet::Parse(jwks_body);
  if (!keys.ok()) {
    return absl::UnavailableError(
        absl::StrCat("issuer JWKS is malformed: ", keys.status().message()));
  }
  return keys;
}

absl::StatusOr<jose::JwkSetKey> TokenVerifier::Impl::FindKey(const std::string& kid,
                                                             int64_t now) const {
  if (static_keys_ != nullptr) {
    const jose::JwkSetKey* key = static_keys_->FindByKid(kid, "sig");
    if (key == nullptr) return InvalidToken("token kid names no signing key of the issuer");
    return *key;
  }
  // Set once this call fetched or waited for another caller's fetch: one fetch per call at most,
  // so a zero refresh interval cannot loop.
  bool fetched = false;
  absl::MutexLock lock(&mu_);
  while (true) {
    if (keys_ != nullptr && now - fetched_at_ > options_.jwks_max_stale_seconds) {
      // Keys this old may include ones the issuer retired long ago: fail closed instead.
      keys_.reset();
    }
    const jose::JwkSetKey* key = keys_ == nullptr ? nullptr : keys_->FindByKid(kid, "sig");
    const bool stale = keys_ != nullptr && now - fetched_at_ >= options_.jwks_max_age_seconds;
    // A clock stepped back by more than the interval does not block fetching until it catches
    // up; a caller whose `now` is merely a little behind (read before it got the lock) still
    // counts as within the interval.
    const int64_t interval = options_.jwks_refresh_min_interval_seconds;
    const bool may_fetch = !fetched && (!attempted_ || now - attempted_at_ >= interval ||
                                        attempted_at_ - now > interval);
    // Known key: use it, unless it is due for a refresh that this caller may do now. Callers
    // arriving during someone else's refresh keep using the old keys instead of waiting.
    if (key != nullptr && (!stale || !may_fetch || fetching_)) return *key;
    if (fetching_) {
      while (fetching_) fetch_done_.Wait(&mu_);
      fetched = true;
      continue;
    }
    if (!may_fetch) {
      if (keys_ == nullptr) {
        return absl::UnavailableError(
            absl::StrCat("the issuer's keys are unavailable: ", last_fetch_.message()));
      }
      if (!last_fetch_.ok()) {
        // The kid may be a new key we cannot fetch: not the client's fault, so not invalid_token.
        return absl::UnavailableError(
            absl::StrCat("token kid is unknown and the issuer's keys cannot be refreshed: ",
                         last_fetch_.message()));
      }
      return InvalidToken("token kid names no signing key of the issuer");
    }
    fetching_ = true;
    attempted_ = true;
    attempted_at_ = now;
    mu_.Unlock();
    absl::StatusOr<jose::JwkSet> fresh = FetchKeys();
    mu_.Lock();
    fetching_ = false;
    fetched = true;
    if (fresh.ok()) {
      keys_ = std::make_shared<const jose::JwkSet>(*std::move(fresh));
      fetched_at_ = now;
      last_fetch_ = absl::OkStatus();
    } else {
      last_fetch_ = fresh.status();
    }
    fetch_done_.SignalAll();
  }
}

// ---------------------------------------------------------------------------- TokenVerifier

namespace {

absl::StatusOr<std::vector<jose::Algorithm>> CheckOptions(const TokenVerifierOptions& options) {
  if (options.issuer.empty()) return absl::InvalidArgumentError("TokenVerifier needs an issuer");
  if (options.audience.empty()) {
    // Without an audience a token minted for any service would be accepted here.
    return absl::InvalidArgumentError("TokenVerifier needs an audience");
  }
  if (options.algorithms.empty()) {
    return absl::InvalidArgumentError("TokenVerifier needs at least one algorithm");
  }
  std::vector<jose::Algorithm> algorithms;
  for (const std::string& name : options.algorithms) {
    // AlgorithmFromName cannot represent "none" or HMAC, so they are refused here.
    absl::StatusOr<jose::Algorithm> alg = jose::AlgorithmFromName(name);
    if (!alg.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "TokenVerifier algorithm '", name, "' is not accepted: ", alg.status().message()));
    }
    algorithms.push_back(*alg);
  }
  if (options.clock_skew_seconds < 0 || options.proof_max_age_seconds < 0 ||
      options.proof_max_future_seconds < 0 || options.jwks_refresh_min_interval_seconds < 0 ||
      options.jwks_max_age_seconds < 0 || options.jwks_max_stale_seconds < 0 ||
      options.http_timeout_ms <= 0) {
    return absl::InvalidArgumentError(
        "TokenVerifier durations must not be negative (and http_timeout_ms must be positive)");
  }
  if (options.replay_cache_entries == 0) {
    return absl::InvalidArgumentError("TokenVerifier replay_cache_entries must be positive");
  }
  return algorithms;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TokenVerifier>> TokenVerifier::Create(TokenVerifierOptions options) {
  ASSIGN_OR_RETURN(std::vector<jose::Algorithm> algorithms, CheckOptions(options));
  absl::StatusOr<HttpUrl> issuer =
      ParseHttpUrl(options.issuer, /*allow_query=*/false, options.allow_insecure_http);
  if (!issuer.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("TokenVerifier issuer: ", issuer.status().message()));
  }
  // OIDC Discovery §4: the well-known path is appended to the issuer minus a trailing slash.
  HttpUrl discovery = *std::move(issuer);
  if (absl::EndsWith(discovery.target, "/")) discovery.target.pop_back();
  discovery.target += "/.well-known/openid-configuration";
  return std::unique_ptr<TokenVerifier>(new TokenVerifier(std::make_unique<Impl>(
      std::move(options), std::move(algorithms), std::move(discovery), nullptr)));
}

absl::StatusOr<std::unique_ptr<TokenVerifier>> TokenVerifier::CreateWithJwks(
    TokenVerifierOptions options, std::string_view jwks_json) {
  ASSIGN_OR_RETURN(std::vector<jose::Algorithm> algorithms, CheckOptions(options));
  absl::StatusOr<jose::JwkSet> keys = jose::JwkSet::Parse(jwks_json);
  if (!keys.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("TokenVerifier JWKS is malformed: ", keys.status().message()));
  }
  return std::unique_ptr<TokenVerifier>(new TokenVerifier(
      std::make_unique<Impl>(std::move(options), std::move(algorithms), std::nullopt,
                             std::make_shared<const jose::JwkSet>(*std::move(keys)))));
}

TokenVerifier::TokenVerifier(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TokenVerifier::~TokenVerifier() = default;

const TokenVerifierOptions& TokenVerifier::options() const { return impl_->options_; }

absl::StatusOr<VerifiedTaskToken> TokenVerifier::Verify(const HttpRequestView& request) const {
  const TokenVerifierOptions& options = impl_->options_;
  const int64_t now = impl_->Now();

  // 1. Authorization: DPoP <token68> (RFC 9449 §7.1, RFC 7235 §2.1).
  if (request.authorization.empty()) return NoCredentials("no Authorization header");
  if (request.authorization.size() > 1) {
    return InvalidRequest("more than one Authorization header");
  }
  std::string_view authorization = request.authorization.front();
  size_t space = authorization.find(' ');
  std::string_view scheme = authorization.substr(0, space);
  if (absl::EqualsIgnoreCase(Sv(scheme), "Bearer")) {
    // Every task token is DPoP-bound; accepting it as Bearer would drop the key binding.
    return InvalidToken("DPoP-bound token presented as Bearer; use the DPoP scheme");
  }
  if (!absl::EqualsIgnoreCase(Sv(scheme), "DPoP")) {
    return NoCredentials("Authorization scheme is not DPoP");
  }
  if (space == std::string_view::npos) return InvalidRequest("Authorization: DPoP has no token");
  std::string_view token = authorization.substr(space + 1);
  if (token.size() > kMaxTaskTokenBytes) {
    return InvalidToken(absl::StrCat("token is longer than ", kMaxTaskTokenBytes, " bytes"));
  }
  if (!IsToken68(token)) {
    return InvalidRequest("Authorization: DPoP must be followed by one space and a token68");
  }

  // 2. The token.
  absl::StatusOr<jose::ParsedJws> jws = jose::ParseCompact(token, kMaxTaskTokenBytes);
  if (!jws.ok()) return InvalidToken(absl::StrCat("malformed token: ", jws.status().message()));
  const json& header = jws->header;
  const json& payload = jws->payload;
  // RFC 9068 §4: typ keeps JWT-SVIDs, ID tokens and DPoP proofs from passing as access tokens.
  auto typ = header.find("typ");
  if (typ == header.end() || !typ->is_string() ||
      (!absl::EqualsIgnoreCase(typ->get_ref<const std::string&>(), "at+jwt") &&
       !absl::EqualsIgnoreCase(typ->get_ref<const std::string&>(), "application/at+jwt"))) {
    return InvalidToken("token typ is not at+jwt: not an RFC 9068 access token");
  }
  if (std::find(impl_->algorithms_.begin(), impl_->algorithms_.end(), jws->alg) ==
      impl_->algorithms_.end()) {
    return InvalidToken(
        absl::StrCat("token alg ", Sv(jose::AlgorithmName(jws->alg)), " is not accepted"));
  }
  auto kid = header.find("kid");
  if (kid == header.end() || !kid->is_string() || kid->get_ref<const std::string&>().empty()) {
    return InvalidToken("token header has no kid");
  }
  ASSIGN_OR_RETURN(jose::JwkSetKey key, impl_->FindKey(kid->get<std::string>(), now));
  // A JWK that names its algorithm must not verify under another (RFC 7517 §4.4).
  if (!key.alg.empty() && key.alg != jose::AlgorithmName(jws->alg)) {
    return InvalidToken("token alg differs from the alg of its signing key");
  }
  if (absl::Status s = jose::VerifySignature(*jws, key.key); !s.ok()) {
    return InvalidToken("token signature verification failed");
  }
  auto iss = payload.find("iss");
  if (iss == payload.end() || !iss->is_string() ||
      iss->get_ref<const std::string&>() != options.issuer) {
    return InvalidToken(absl::StrCat("token iss is not '", options.issuer, "'"));
  }
  if (!jose::AudienceContains(payload, options.audience)) {
    return InvalidToken(absl::StrCat("token aud does not contain '", options.audience, "'"));
  }
  if (absl::Status s = jose::CheckTimeClaims(payload, now, options.clock_skew_seconds,
                                             /*require_exp=*/true);
      !s.ok()) {
    return InvalidToken(s.message());
  }
  ASSIGN_OR_RETURN(TaskClaims claims, ReadTaskClaims(payload));

  // 3. The proof (RFC 9449 §4.3, §7.1).
  absl::StatusOr<std::string> proof = dpop::ExtractSingleDpopHeader(request.dpop);
  if (!proof.ok()) return InvalidProof(proof.status().message());
  dpop::VerifyOptions proof_options;
  proof_options.htm = std::string(request.method);
  proof_options.htu = std::string(request.url);
  proof_options.now = now;
  proof_options.max_age_seconds = options.proof_max_age_seconds;
  proof_options.max_future_seconds = options.proof_max_future_seconds;
  proof_options.access_token = std::string(token);
  proof_options.expected_jkt = claims.jkt;
  proof_options.not_before =
      dpop::FirstAcceptableIat(impl_->created_at_, options.proof_max_future_seconds);
  // Each client (the token's client_id, an identity the issuer signed) is charged its own share
  // of the replay cache, so one client's flood of fresh proofs cannot crowd out the others.
  proof_options.replay_owner = claims.client_id;
  absl::StatusOr<dpop::VerifiedProof> verified =
      dpop::VerifyProof(*proof, proof_options, &impl_->replay_cache_);
  if (!verified.ok()) {
    switch (verified.status().code()) {
      case absl::StatusCode::kInvalidArgument:
        // The request URL itself is unusable, which is not the proof's fault.
        return InvalidRequest(absl::StrCat("request URL: ", verified.status().message()));
      case absl::StatusCode::kResourceExhausted:  // replay cache full or client's share used up
      case absl::StatusCode::kUnavailable:        // just created (FirstAcceptableIat)
        // Nothing is wrong with the proof; it cannot be accepted right now: a 503 the client may
        // retry with a new proof, not a 401.
        return TemporarilyUnavailable(verified.status().message());
      default:
        return InvalidProof(verified.status().message());
    }
  }

  VerifiedTaskToken out;
  out.issuer_ = options.issuer;
  out.subject_ = std::move(claims.subject);
  out.client_id_ = std::move(claims.client_id);
  out.audience_ = std::move(claims.audience);
  out.scopes_ = std::move(claims.scopes);
  out.task_id_ = std::move(claims.task_id);
  out.task_purpose_ = std::move(claims.task_purpose);
  out.jti_ = std::move(claims.jti);
  out.jkt_ = std::move(claims.jkt);
  out.issued_at_ = claims.issued_at;
  out.expires_at_ = claims.expires_at;
  out.actor_chain_ = std::move(claims.actor_chain);
  out.claims_json_ = payload.dump(-1, ' ', false, json::error_handler_t::replace);
  return out;
}

bool VerifiedTaskToken::HasScope(std::string_view scope) const {
  return std::find(scopes_.begin(), scopes_.end(), scope) != scopes_.end();
}

// ---------------------------------------------------------------------------- errors

std::string OAuthErrorCode(const absl::Status& status) {
  auto code = status.GetPayload(kOAuthErrorPayload);
  return code.has_value() ? std::string(*code) : std::string();
}

absl::Status RequireScope(const VerifiedTaskToken& token, std::string_view scope) {
  if (token.HasScope(scope)) return absl::OkStatus();
  absl::Status status = Classified(
      absl::PermissionDeniedError(absl::StrCat("token lacks the scope '", Sv(scope), "'")),
      "insufficient_scope");
  status.SetPayload(kOAuthScopePayload, absl::Cord(Sv(scope)));
  return status;
}

int HttpStatusForError(const absl::Status& status) {
  const std::string code = OAuthErrorCode(status);
  if (code == "invalid_request") return 400;
  if (code == "insufficient_scope") return 403;
  if (code == "temporarily_unavailable") return 503;
  if (status.code() == absl::StatusCode::kUnauthenticated) return 401;
  if (status.code() == absl::StatusCode::kUnavailable) return 503;
  return 500;
}

namespace {

// RFC 6750 §3: error_description and scope values are restricted to %x20-21 / %x23-5B / %x5D-7E,
// i.e. printable ASCII without '"' and '\', so nothing needs escaping inside the quotes.
std::string QuotedValue(absl::string_view text, size_t max_chars) {
  std::string out;
  for (char c : text.substr(0, max_chars)) {
    unsigned char u = static_cast<unsigned char>(c);
    out.push_back(u < 0x20 || u > 0x7E || c == '"' || c == '\\' ? '\'' : c);
  }
  return absl::StrCat("\"", out, "\"");
}

}  // namespace

std::string WwwAuthenticateChallenge(const absl::Status& status,
                                     const std::vector<std::string>& algorithms) {
  std::vector<std::string> params;
  const std::string code = OAuthErrorCode(status);
  if (!code.empty()) {
    params.push_back(absl::StrCat("error=", QuotedValue(code, kMaxDescriptionChars)));
    if (!status.message().empty()) {
      params.push_back(
          absl::StrCat("error_description=", QuotedValue(status.message(), kMaxDescriptionChars)));
    }
    if (auto scope = status.GetPayload(kOAuthScopePayload)) {
      params.push_back(absl::StrCat("scope=", QuotedValue(std::string(*scope), 1024)));
    }
  }
  if (!algorithms.empty()) {
    params.push_back(
        absl::StrCat("algs=", QuotedValue(absl::StrJoin(algorithms, " "), kMaxDescriptionChars)));
  }
  if (params.empty()) return "DPoP";
  return absl::StrCat("DPoP ", absl::StrJoin(params, ", "));
}

}  // namespace mandate
