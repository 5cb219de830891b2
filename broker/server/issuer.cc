#include "broker/server/issuer.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "broker/common/log/log.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/audit/audit_detail.h"

namespace mandate::broker {
namespace {

constexpr size_t kMaxAudiences = 16;
constexpr size_t kMaxAudienceLength = 512;
// Entry IDs are made by the admin API (a few dozen bytes); longer ones are refused unread.
constexpr size_t kMaxEntryIdBytes = 128;

absl::StatusOr<crypto::PublicKey> KeyFromCsr(std::string_view csr_der) {
  auto csr = crypto::ParseAndVerifyCsrDer(csr_der);
  if (!csr.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid CSR: ", csr.status().message()));
  }
  return csr->key;
}

}  // namespace

absl::StatusOr<store::RegistrationEntry> Issuer::AuthorizeEntryAudited(
    const std::string& node_id, const std::string& entry_id, std::string_view event) const {
  absl::StatusOr<store::RegistrationEntry> entry = AuthorizeEntry(node_id, entry_id);
  if (entry.ok()) return entry;
  // The ID comes from the node: a refused one is recorded only up to the longest a real ID can
  // be, so a node cannot grow the audit log by megabytes per call.
  nlohmann::json detail = {{"entry_id", entry_id.substr(0, kMaxEntryIdBytes)},
                           {"reason", std::string(entry.status().message())}};
  if (entry_id.size() > kMaxEntryIdBytes) detail["entry_id_bytes"] = entry_id.size();
  absl::Status audited = audit_.Record({.event = std::string(event),
                                        .outcome = "denied",
                                        .node_id = node_id,
                                        .detail = AuditDetail(detail)});
  if (!audited.ok()) spdlog::error("refusal not audited: {}", std::string(audited.message()));
  return entry.status();
}

absl::StatusOr<store::RegistrationEntry> Issuer::AuthorizeEntry(const std::string& node_id,
                                                                const std::string& entry_id) const {
  if (entry_id.size() > kMaxEntryIdBytes) {
    return absl::PermissionDeniedError(absl::StrCat(
        "registration entry IDs are at most ", kMaxEntryIdBytes, " bytes; no entry has this one"));
  }
  auto entry = entries_.Get(entry_id);
  if (!entry.ok() || entry->parent_id != node_id) {
    // The same answer for "absent" and "not yours", so a node cannot probe other nodes' entries.
    return absl::PermissionDeniedError(
        absl::StrCat("registration entry ", entry_id, " is not assigned to this node"));
  }
  return entry;
}

absl::StatusOr<IssuedX509Svid> Issuer::SignX509Svid(const std::string& node_id,
                                                    const std::string& entry_id,
                                                    std::string_view csr_der) const {
  ASSIGN_OR_RETURN(store::RegistrationEntry entry,
                   AuthorizeEntryAudited(node_id, entry_id, "x509_svid"));
  ASSIGN_OR_RETURN(crypto::PublicKey key, KeyFromCsr(csr_der));
  int64_t ttl = entry.x509_ttl_s > 0 ? entry.x509_ttl_s : defaults_.x509_svid_ttl_seconds;
  ASSIGN_OR_RETURN(crypto::IssuedCertificate cert,
                   authority_.SignX509SvidDer(key, entry.spiffe_id, ttl));
  spdlog::debug("issued x509-svid spiffe_id={} serial={} entry={} node={} expires_at={}",
                entry.spiffe_id, cert.serial_hex, entry.id, node_id, cert.not_after);
  return IssuedX509Svid{entry.id, entry.spiffe_id, std::move(cert)};
}

AuditEvent Issuer::X509SvidIssued(const std::string& node_id, const IssuedX509Svid& svid) {
  return {.event = "x509_svid",
          .outcome = "issued",
          .spiffe_id = svid.spiffe_id,
          .node_id = node_id,
          .credential_id = svid.certificate.serial_hex,
          .detail = AuditDetail(
              {{"entry_id", svid.entry_id}, {"expires_at", svid.certificate.not_after}})};
}

absl::StatusOr<IssuedX509Svid> Issuer::IssueX509Svid(const std::string& node_id,
                                                     const std::string& entry_id,
                                                     std::string_view csr_der) const {
  ASSIGN_OR_RETURN(IssuedX509Svid svid, SignX509Svid(node_id, entry_id, csr_der));
  RETURN_IF_ERROR(audit_.Record(X509SvidIssued(node_id, svid)));
  return svid;
}

absl::StatusOr<std::vector<IssuedX509Svid>> Issuer::IssueX509Svids(
    const std::string& node_id, const std::vector<X509SvidRequest>& requests) const {
  std::vector<IssuedX509Svid> out;
  out.reserve(requests.size());
  std::vector<AuditEvent> events;
  events.reserve(requests.size());
  for (const X509SvidRequest& request : requests) {
    ASSIGN_OR_RETURN(IssuedX509Svid svid, SignX509Svid(node_id, request.entry_id, request.csr_der));
    events.push_back(X509SvidIssued(node_id, svid));
    out.push_back(std::move(svid));
  }
  RETURN_IF_ERROR(audit_.RecordAll(std::move(events)));
  return out;
}

absl::StatusOr<IssuedJwtSvid> Issuer::IssueJwtSvid(
    const std::string& node_id, const std::string& entry_id,
    const std::vector<std::string>& audiences) const {
  if (audiences.empty()) return absl::InvalidArgumentError("JWT-SVID audience is required");
  if (audiences.size() > kMaxAudiences) {
    return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxAudiences, " audiences"));
  }
  for (const auto& aud : audiences) {
    if (aud.empty() || aud.size() > kMaxAudienceLength) {
      return absl::InvalidArgumentError("JWT-SVID audience must be 1-512 bytes");
    }
  }
  ASSIGN_OR_RETURN(store::RegistrationEntry entry,
                   AuthorizeEntryAudited(node_id, entry_id, "jwt_svid"));
  int64_t ttl = entry.jwt_ttl_s > 0 ? entry.jwt_ttl_s : defaults_.jwt_svid_ttl_seconds;
  int64_t now = clock_.NowSeconds();
  ASSIGN_OR_RETURN(std::string id, crypto::TimeOrderedId());
  IssuedJwtSvid out;
  out.spiffe_id = entry.spiffe_id;
  out.jti = crypto::HexEncode(id);
  out.expires_at = now + ttl;
  nlohmann::json payload = {{"sub", entry.spiffe_id},
                            {"aud", audiences},
                            {"iat", now},
                            {"exp", out.expires_at},
                            {"jti", out.jti}};
  ASSIGN_OR_RETURN(out.token, authority_.SignJws("JWT", payload.dump()));
  RETURN_IF_ERROR(audit_.Record(
      {.event = "jwt_svid",
       .outcome = "issued",
       .spiffe_id = entry.spiffe_id,
       .node_id = node_id,
       .credential_id = out.jti,
       .detail = AuditDetail(
           {{"entry_id", entry.id}, {"aud", audiences}, {"expires_at", out.expires_at}})}));
  spdlog::debug("issued jwt-svid spiffe_id={} jti={} entry={} node={} expires_at={}",
                entry.spiffe_id, out.jti, entry.id, node_id, out.expires_at);
  return out;
}

absl::StatusOr<IssuedTaskToken> Issuer::IssueTaskToken(const TaskTokenGrant& grant) const {
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
                            {"sub", grant.spiffe_id},
                            {"aud", grant.audience},
                            {"client_id", grant.spiffe_id},
                            {"scope", scope},
                            {"jti", out.jti},
                            {"iat", now},
                            {"exp", out.expires_at},
                            {"cnf", {{"jkt", grant.jkt}}},
                            {"task", {{"id", grant.task_id}, {"purpose", grant.task_purpose}}}};
  ASSIGN_OR_RETURN(out.token, authority_.SignJws("at+jwt", payload.dump()));
  RETURN_IF_ERROR(audit_.Record({.event = "task_token",
                                 .outcome = "issued",
                                 .spiffe_id = grant.spiffe_id,
                                 .task_id = grant.task_id,
                                 .credential_id = out.jti,
                                 .detail = AuditDetail({{"aud", grant.audience},
                                                        {"scope", scope},
                                                        {"jkt", grant.jkt},
                                                        {"expires_at", out.expires_at}})}));
  spdlog::debug("issued task token sub={} task={} aud=\"{}\" jti={} expires_at={}", grant.spiffe_id,
                grant.task_id, log::EscapeForLog(grant.audience), out.jti, out.expires_at);
  return out;
}

absl::StatusOr<crypto::Certificate> Issuer::IssueNodeSvid(const std::string& node_id,
                                                          std::string_view csr_der) const {
  ASSIGN_OR_RETURN(crypto::PublicKey key, KeyFromCsr(csr_der));
  ASSIGN_OR_RETURN(crypto::Certificate cert,
                   authority_.SignX509Svid(key, node_id, defaults_.agent_svid_ttl_seconds));
  RETURN_IF_ERROR(audit_.Record({.event = "node_svid",
                                 .outcome = "issued",
                                 .spiffe_id = node_id,
                                 .node_id = node_id,
                                 .credential_id = cert.SerialHex(),
                                 .detail = AuditDetail({{"expires_at", cert.not_after()}})}));
  spdlog::info("issued node x509-svid spiffe_id={} serial={} expires_at={}", node_id,
               cert.SerialHex(), cert.not_after());
  return cert;
}

}  // namespace mandate::broker
