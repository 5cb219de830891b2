// The one issuance pipeline: every credential the broker mints goes through here, so that
// authorisation, (later) the policy hook, and the record of what was issued cannot be skipped.
//
// Today's steps: authorise (the entry exists and its parent is the calling node) -> mint ->
// audit (durable, group-committed; see audit/audit_log.h) -> respond. A refusal by the issuer is
// audited too. A credential whose audit record could not be stored is not returned (Unavailable):
// nothing leaves the broker without a record. The policy hook and the credential index slot in
// without changing callers.
//
// Thread-safety: all methods may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_ISSUER_H_
#define MANDATE_BROKER_SERVER_ISSUER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/util/clock.h"
#include "broker/server/audit/audit_log.h"
#include "broker/server/entry_registry.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {

struct IssuerDefaults {
  std::string issuer_url;  // `iss` of access tokens
  int64_t task_token_ttl_seconds = 300;
  int64_t x509_svid_ttl_seconds = 3600;
  int64_t jwt_svid_ttl_seconds = 300;
  int64_t agent_svid_ttl_seconds = 3600;
};

struct IssuedX509Svid {
  std::string entry_id;
  std::string spiffe_id;
  crypto::IssuedCertificate certificate;  // DER, serial, validity
};

struct X509SvidRequest {
  std::string entry_id;
  std::string csr_der;
};

struct IssuedJwtSvid {
  std::string spiffe_id;
  std::string token;
  std::string jti;
  int64_t expires_at = 0;
};

// What a task token is minted for, after the caller, the task, the audience and the DPoP proof
// were checked by the caller of IssueTaskToken.
struct TaskTokenGrant {
  std::string spiffe_id;  // the agent: `sub` and `client_id`
  std::string task_id;
  std::string task_purpose;
  int64_t task_expires_at = 0;  // the token never outlives its task
  std::string audience;
  std::vector<std::string> scopes;  // already narrowed
  std::string jkt;                  // RFC 7638 thumbprint of the DPoP key (cnf.jkt)
  int64_t ttl_seconds = 0;          // 0 = broker default
};

struct IssuedTaskToken {
  std::string token;
  std::string jti;
  int64_t expires_at = 0;
};

class Issuer {
 public:
  // All references must outlive the issuer.
  Issuer(const TrustAuthority& authority, const EntryRegistry& entries, AuditLog& audit,
         const Clock& clock, IssuerDefaults defaults)
      : authority_(authority),
        entries_(entries),
        audit_(audit),
        clock_(clock),
        defaults_(std::move(defaults)) {}

  // Signs the CSR for registration entry `entry_id` on behalf of node `node_id`.
  // PermissionDenied when the entry does not belong to the node; InvalidArgument for a bad CSR.
  absl::StatusOr<IssuedX509Svid> IssueX509Svid(const std::string& node_id,
                                               const std::string& entry_id,
                                               std::string_view csr_der) const;
  // IssueX509Svid for each request, with all their audit records in one commit. All or nothing:
  // the first refusal fails the call and nothing is returned.
  absl::StatusOr<std::vector<IssuedX509Svid>> IssueX509Svids(
      const std::string& node_id, const std::vector<X509SvidRequest>& requests) const;
  // Mints a JWT-SVID for entry `entry_id` with the given audiences (at least one).
  absl::StatusOr<IssuedJwtSvid> IssueJwtSvid(const std::string& node_id,
                                             const std::string& entry_id,
                                             const std::vector<std::string>& audiences) const;
  // Mints an RFC 9068 access token (typ at+jwt) bound to `grant.jkt` (DESIGN §4).
  // FailedPrecondition when the task has expired; InvalidArgument for an empty audience, scope list
  // or jkt.
  absl::StatusOr<IssuedTaskToken> IssueTaskToken(const TaskTokenGrant& grant) const;
  // The registration entry `entry_id` if it is assigned to node `node_id`; PermissionDenied
  // otherwise (the same answer for an absent entry, so a node cannot probe others' entries).
  // For callers that act on an entry's behalf without minting through this class (tasks).
  absl::StatusOr<store::RegistrationEntry> AuthorizedEntry(const std::string& node_id,
                                                           const std::string& entry_id) const {
    return AuthorizeEntry(node_id, entry_id);
  }
  // Signs the node agent's own X509-SVID.
  absl::StatusOr<crypto::Certificate> IssueNodeSvid(const std::string& node_id,
                                                    std::string_view csr_der) const;

 private:
  absl::StatusOr<store::RegistrationEntry> AuthorizeEntry(const std::string& node_id,
                                                          const std::string& entry_id) const;
  // Authorises (refusals audited) and signs, without the issuance's own audit record.
  absl::StatusOr<IssuedX509Svid> SignX509Svid(const std::string& node_id,
                                              const std::string& entry_id,
                                              std::string_view csr_der) const;
  static AuditEvent X509SvidIssued(const std::string& node_id, const IssuedX509Svid& svid);
  // AuthorizeEntry, with a refusal audited as `event` "denied".
  absl::StatusOr<store::RegistrationEntry> AuthorizeEntryAudited(const std::string& node_id,
                                                                 const std::string& entry_id,
                                                                 std::string_view event) const;

  const TrustAuthority& authority_;
  const EntryRegistry& entries_;
  AuditLog& audit_;
  const Clock& clock_;
  const IssuerDefaults defaults_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_ISSUER_H_
