#include "broker/server/exchange/task_token_exchange.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <iterator>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

using issuance::OAuthRefusal;
using issuance::Refusal;
using issuance::Step;

constexpr size_t kMaxSubjectTokenBytes = 8192;
constexpr size_t kMaxTaskIdBytes = 128;

}  // namespace

std::string TokenEndpointUrl(std::string_view issuer_url) {
  if (issuer_url.ends_with('/')) issuer_url.remove_suffix(1);
  return absl::StrCat(std::string(issuer_url), "/token");
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

absl::StatusOr<std::string> TaskTokenExchange::AuthenticateSubject(
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
  return id.str();
}

TaskTokenExchange::TaskTokenExchange(const TrustAuthority& authority, const EntryRegistry& entries,
                                     const TaskRegistry& tasks, store::Store& store,
                                     const Clock& clock, ExchangeOptions options)
    : authority_(authority),
      entries_(entries),
      tasks_(tasks),
      store_(store),
      clock_(clock),
      options_(std::move(options)) {
  if (options_.proof.token_endpoint_url.empty()) {
    options_.proof.token_endpoint_url = TokenEndpointUrl(options_.issuer_url);
  }
}

std::string TaskTokenExchange::CurrentNonce() const {
  return options_.proof.nonces != nullptr ? options_.proof.nonces->Current() : "";
}

issuance::Result<AuthorizedTaskToken> TaskTokenExchange::Authorize(const TaskTokenAsk& ask) const {
  // 1. Request shape.
  if (ask.task_id.empty() || ask.task_id.size() > kMaxTaskIdBytes) {
    return OAuthRefusal(Step::kRequest, "invalid_request", absl::StatusCode::kInvalidArgument,
                        "task_id is required");
  }
  for (const std::string& s : ask.scopes) {
    if (!IsScopeToken(s)) {
      return OAuthRefusal(Step::kRequest, "invalid_scope", absl::StatusCode::kInvalidArgument,
                          "malformed scope");
    }
  }
  if (ask.dpop_proof.empty()) {
    return OAuthRefusal(Step::kRequest, "invalid_dpop_proof", absl::StatusCode::kInvalidArgument,
                        "a DPoP proof is required");
  }

  // 2. The caller.
  AuthorizedTaskToken out;
  std::optional<store::RegistrationEntry> calling_entry;
  if (!ask.node_id.empty()) {
    auto entry = entries_.GetAssigned(ask.node_id, ask.entry_id);
    if (!entry.ok()) {
      return OAuthRefusal(Step::kAuthorize, "invalid_grant", absl::StatusCode::kPermissionDenied,
                          "the registration entry is not assigned to this node");
    }
    out.spiffe_id = entry->spiffe_id;
    calling_entry = std::move(*entry);
  } else {
    auto subject = AuthenticateSubject(ask.subject_token);
    if (!subject.ok()) {
      // RFC 8693 §2.2.2: an unacceptable subject_token is invalid_request.
      return OAuthRefusal(Step::kAuthenticate, "invalid_request",
                          absl::StatusCode::kUnauthenticated,
                          absl::StrCat("subject_token rejected: ", subject.status().message()));
    }
    out.spiffe_id = std::move(*subject);
  }
  // From here on the caller is known: every refusal names it (for the audit record).
  issuance::Result<AuthorizedTaskToken> result = AuthorizeKnownCaller(ask, calling_entry, out);
  if (!result.ok()) result.refusal().spiffe_id = out.spiffe_id;
  return result;
}

issuance::Result<AuthorizedTaskToken> TaskTokenExchange::AuthorizeKnownCaller(
    const TaskTokenAsk& ask, const std::optional<store::RegistrationEntry>& calling_entry,
    AuthorizedTaskToken& out) const {
  // The TTL rule comes from every entry issuing the SPIFFE ID, so both paths apply the same.
  std::vector<store::RegistrationEntry> registrations = entries_.ForSpiffeId(out.spiffe_id);
  if (registrations.empty()) {
    return OAuthRefusal(Step::kAuthorize, "invalid_grant", absl::StatusCode::kPermissionDenied,
                        "the SPIFFE ID has no registration entry");
  }
  int64_t ttl = 0;
  for (const auto& e : registrations) {
    if (e.token_ttl_s > 0 && (ttl == 0 || e.token_ttl_s < ttl)) ttl = e.token_ttl_s;
  }
  out.ttl_seconds = ttl > 0 ? ttl : options_.default_token_ttl_seconds;
  if (calling_entry.has_value()) {
    // The node API knows which node and which entry: the policy sees exactly those.
    out.node_id = calling_entry->parent_id;
    out.selectors = calling_entry->selectors;
  } else {
    // POST /token: a JWT-SVID names no node, so the identity must still run on a node that is
    // attested and not banned (the node API checks the caller's node on every call), and the
    // policy sees only what holds for every registration: the selectors they all have and the
    // node they share (none when they differ).
    bool on_good_node = false;
    for (const auto& e : registrations) {
      auto node = store_.GetNode(e.parent_id);
      if (node.ok() && !node->banned) {
        on_good_node = true;
        break;
      }
      if (!node.ok() && !absl::IsNotFound(node.status())) {
        return OAuthRefusal(Step::kAuthorize, "server_error", absl::StatusCode::kUnavailable,
                            "node store unavailable", 500);
      }
    }
    if (!on_good_node) {
      return OAuthRefusal(Step::kAuthorize, "invalid_grant", absl::StatusCode::kPermissionDenied,
                          "the SPIFFE ID runs on no attested node that is not banned");
    }
    out.node_id = registrations.front().parent_id;
    std::vector<std::string> common = registrations.front().selectors;
    std::sort(common.begin(), common.end());
    for (const auto& e : registrations) {
      if (e.parent_id != out.node_id) out.node_id.clear();
      std::vector<std::string> mine = e.selectors, kept;
      std::sort(mine.begin(), mine.end());
      std::set_intersection(common.begin(), common.end(), mine.begin(), mine.end(),
                            std::back_inserter(kept));
      common = std::move(kept);
    }
    out.selectors = std::move(common);
  }

  // 3. The task.
  auto task = tasks_.GetUsable(out.spiffe_id, ask.task_id);
  if (!task.ok()) {
    const absl::Status& s = task.status();
    const std::string message(s.message());
    if (s.code() == absl::StatusCode::kFailedPrecondition &&
        message.starts_with("authorization_pending")) {
      // RFC 8628 §3.5 style: keep polling; an operator has not decided yet.
      std::string_view why = message;
      why.remove_prefix(std::string_view("authorization_pending").size());
      while (!why.empty() && (why.front() == ':' || why.front() == ' ')) why.remove_prefix(1);
      return OAuthRefusal(Step::kAuthorize, "authorization_pending",
                          absl::StatusCode::kFailedPrecondition,
                          why.empty() ? "the task awaits approval" : std::string(why));
    }
    if (s.code() == absl::StatusCode::kNotFound ||
        s.code() == absl::StatusCode::kFailedPrecondition) {
      return OAuthRefusal(Step::kAuthorize, "invalid_grant", s.code(), std::string(s.message()));
    }
    return OAuthRefusal(Step::kAuthorize, "server_error", absl::StatusCode::kUnavailable,
                        "task store unavailable", 500);
  }
  out.task = std::move(*task);

  // 4. Audience and scopes within the task.
  if (ask.audience.has_value()) {
    out.audience = *ask.audience;
  } else if (out.task.audiences.size() == 1) {
    out.audience = out.task.audiences[0];
  } else {
    return OAuthRefusal(Step::kRequest, "invalid_request", absl::StatusCode::kInvalidArgument,
                        "audience is required: the task has several");
  }
  if (std::find(out.task.audiences.begin(), out.task.audiences.end(), out.audience) ==
      out.task.audiences.end()) {
    return OAuthRefusal(Step::kAuthorize, "invalid_target", absl::StatusCode::kInvalidArgument,
                        "audience outside the task");
  }
  auto scopes = TokenScopesForTask(out.task, out.audience, ask.scopes);
  if (!scopes.ok()) {
    return OAuthRefusal(Step::kAuthorize, "invalid_scope", absl::StatusCode::kInvalidArgument,
                        std::string(scopes.status().message()));
  }
  out.scopes = std::move(*scopes);
  out.scopes_requested = !ask.scopes.empty();

  // 5. The DPoP proof, charged to the SPIFFE ID in the replay cache.
  auto proof = VerifyTokenRequestProof(options_.proof, clock_, ask.dpop_proof, out.spiffe_id);
  if (!proof.ok()) {
    switch (proof.status().code()) {
      case absl::StatusCode::kFailedPrecondition: {
        Refusal r =
            OAuthRefusal(Step::kProof, "use_dpop_nonce", absl::StatusCode::kFailedPrecondition,
                         "the DPoP proof must carry the broker's current DPoP nonce");
        r.send_nonce = true;
        return r;
      }
      case absl::StatusCode::kUnavailable: {  // just restarted (FirstAcceptableIat)
        Refusal r =
            OAuthRefusal(Step::kProof, "temporarily_unavailable", absl::StatusCode::kUnavailable,
                         std::string(proof.status().message()), 503);
        r.retry_after_seconds =
            std::max<int64_t>(1, SecondsUntilProofsAccepted(options_.proof, clock_));
        return r;
      }
      case absl::StatusCode::kResourceExhausted:  // cache full, or this identity's share used up
        // Nothing is wrong with the proof; the broker cannot accept it right now.
        return OAuthRefusal(Step::kProof, "temporarily_unavailable", absl::StatusCode::kUnavailable,
                            std::string(proof.status().message()), 503);
      case absl::StatusCode::kInvalidArgument:
        return OAuthRefusal(Step::kProof, "server_error", absl::StatusCode::kInternal,
                            "token endpoint misconfigured", 500);
      default:
        return OAuthRefusal(Step::kProof, "invalid_dpop_proof", absl::StatusCode::kInvalidArgument,
                            std::string(proof.status().message()));
    }
  }
  out.jkt = std::move(proof->jkt);
  return out;
}

}  // namespace mandate::broker
