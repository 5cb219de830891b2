// The mint step of the issuance pipeline (issuance/pipeline.h): signs exactly what it is given.
// It decides nothing - who may have a credential, for how long and with which scopes was settled
// by the pipeline's earlier steps - and records nothing (the pipeline does, once).
//
// Thread-safety: all methods may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_ISSUANCE_MINTER_H_
#define MANDATE_BROKER_SERVER_ISSUANCE_MINTER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/util/clock.h"
#include "broker/server/trust_authority.h"

namespace mandate::broker {

struct IssuerDefaults {
  std::string issuer_url;  // `iss` of access tokens
  int64_t task_token_ttl_seconds = 300;
  int64_t x509_svid_ttl_seconds = 3600;
  int64_t jwt_svid_ttl_seconds = 300;
  int64_t agent_svid_ttl_seconds = 3600;
};

struct IssuedJwtSvid {
  std::string spiffe_id;
  std::string token;
  std::string jti;
  int64_t expires_at = 0;
};

// What a task token is minted for, after every check and narrowing. Carries the user subject
// and actor chain of a delegated token too (empty for an agent's own task token).
struct TaskTokenGrant {
  std::string spiffe_id;  // the agent: `client_id`, and `sub` when there is no user subject
  std::string task_id;
  std::string task_purpose;
  int64_t task_expires_at = 0;  // the token never outlives its task
  std::string audience;
  std::vector<std::string> scopes;       // final
  std::string jkt;                       // RFC 7638 thumbprint of the DPoP key (cnf.jkt)
  int64_t ttl_seconds = 0;               // final lifetime (> 0), before the task's deadline caps it
  std::string subject;                   // the user (`sub`), when delegated
  std::vector<std::string> actor_chain;  // current actor first, when delegated
};

struct IssuedTaskToken {
  std::string token;
  std::string jti;
  int64_t expires_at = 0;
};

class Minter {
 public:
  // All references must outlive the minter.
  Minter(const TrustAuthority& authority, const Clock& clock, IssuerDefaults defaults)
      : authority_(authority), clock_(clock), defaults_(std::move(defaults)) {}

  const IssuerDefaults& defaults() const { return defaults_; }

  // An X509-SVID for `spiffe_id` over `key`, valid `ttl_seconds`.
  absl::StatusOr<crypto::IssuedCertificate> X509Svid(const crypto::PublicKey& key,
                                                     const std::string& spiffe_id,
                                                     int64_t ttl_seconds) const;
  // A JWT-SVID (typ JWT) for `spiffe_id` with these audiences, valid `ttl_seconds`.
  absl::StatusOr<IssuedJwtSvid> JwtSvid(const std::string& spiffe_id,
                                        const std::vector<std::string>& audiences,
                                        int64_t ttl_seconds) const;
  // An RFC 9068 access token (typ at+jwt) bound to `grant.jkt` (DESIGN §4). FailedPrecondition
  // when the task has expired; InvalidArgument for an empty audience, scope list or jkt.
  absl::StatusOr<IssuedTaskToken> TaskToken(const TaskTokenGrant& grant) const;
  // A node agent's own X509-SVID.
  absl::StatusOr<crypto::Certificate> NodeSvid(const crypto::PublicKey& key,
                                               const std::string& node_id,
                                               int64_t ttl_seconds) const;

 private:
  const TrustAuthority& authority_;
  const Clock& clock_;
  const IssuerDefaults defaults_;
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_ISSUANCE_MINTER_H_
