#include "broker/server/issuance/minter.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "broker/common/crypto/keys.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {

absl::StatusOr<crypto::IssuedCertificate> Minter::X509Svid(const crypto::PublicKey& key,
                                                           const std::string& spiffe_id,
                                                           int64_t ttl_seconds) const {
  return authority_.SignX509SvidDer(key, spiffe_id, ttl_seconds);
}

absl::StatusOr<IssuedJwtSvid> Minter::JwtSvid(const std::string& spiffe_id,
                                              const std::vector<std::string>& audiences,
                                              int64_t ttl_seconds) const {
  int64_t now = clock_.NowSeconds();
  ASSIGN_OR_RETURN(std::string id, crypto::TimeOrderedId());
  IssuedJwtSvid out;
  out.spiffe_id = spiffe_id;
  out.jti = crypto::HexEncode(id);
  out.expires_at = now + ttl_seconds;
  nlohmann::json payload = {{"sub", spiffe_id},
                            {"aud", audiences},
                            {"iat", now},
                            {"exp", out.expires_at},
                            {"jti", out.jti}};
  ASSIGN_OR_RETURN(out.token, authority_.SignJws("JWT", payload.dump()));
  return out;
}

absl::StatusOr<IssuedTaskToken> Minter::TaskToken(const TaskTokenGrant& grant) const {
  if (grant.audience.empty() || grant.scopes.empty() || grant.jkt.empty()) {
    return absl::InvalidArgumentError("task token needs an audience, scopes and a DPoP key");
  }
  int64_t now = clock_.NowSeconds();
  if (grant.task_expires_at <= now) return absl::FailedPreconditionError("task expired");
  int64_t ttl = grant.ttl_seconds > 0 ? grant.ttl_seconds : defaults_.task_token_ttl_seconds;
  IssuedTaskToken out;
  out.expires_at = std::min(now + ttl, grant.task_expires_at);
  ASSIGN_OR_RETURN(std::string id, crypto::TimeOrderedId());
  out.jti = crypto::HexEncode(id);
  std::string scope;
  for (const auto& s : grant.scopes) {
    if (!scope.empty()) scope += ' ';
    scope += s;
  }
  nlohmann::json payload = {{"iss", defaults_.issuer_url},
                            {"sub", grant.subject.empty() ? grant.spiffe_id : grant.subject},
                            {"aud", grant.audience},
                            {"client_id", grant.spiffe_id},
                            {"scope", scope},
                            {"jti", out.jti},
                            {"iat", now},
                            {"exp", out.expires_at},
                            {"cnf", {{"jkt", grant.jkt}}},
                            {"task", {{"id", grant.task_id}, {"purpose", grant.task_purpose}}}};
  if (!grant.actor_chain.empty()) {
    // RFC 8693 §4.1: the current actor outermost, each earlier one nested inside.
    nlohmann::json act;
    for (auto it = grant.actor_chain.rbegin(); it != grant.actor_chain.rend(); ++it) {
      nlohmann::json outer = {{"sub", *it}};
      if (!act.is_null()) outer["act"] = std::move(act);
      act = std::move(outer);
    }
    payload["act"] = std::move(act);
  }
  ASSIGN_OR_RETURN(out.token, authority_.SignJws("at+jwt", payload.dump()));
  return out;
}

absl::StatusOr<crypto::Certificate> Minter::NodeSvid(const crypto::PublicKey& key,
                                                     const std::string& node_id,
                                                     int64_t ttl_seconds) const {
  return authority_.SignX509Svid(key, node_id, ttl_seconds);
}

}  // namespace mandate::broker
