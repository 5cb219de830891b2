#ifndef MANDATE_BROKER_COMMON_STORE_CREDENTIAL_INDEX_H_
#define MANDATE_BROKER_COMMON_STORE_CREDENTIAL_INDEX_H_

// Rules of the credential index (issued_credentials) that every Store implementation applies the
// same way: the kind names, what a row must carry, and the query limits. Stateless; thread-safe.

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "broker/common/store/store.h"

namespace mandate::store {

inline constexpr std::string_view kCredentialKindX509Svid = "x509_svid";
inline constexpr std::string_view kCredentialKindJwtSvid = "jwt_svid";
inline constexpr std::string_view kCredentialKindTaskToken = "task_token";
inline constexpr std::string_view kCredentialKindDelegatedToken = "delegated_token";

inline constexpr int64_t kDefaultCredentialListLimit = 100;
inline constexpr int64_t kMaxCredentialListLimit = 1000;

// True for the four kinds above.
bool IsCredentialKind(std::string_view kind);

// InvalidArgument when `c` cannot be stored: an empty id or spiffe_id, an unknown kind, or
// expires_at before issued_at.
absl::Status ValidateIssuedCredential(const IssuedCredential& c);

// InvalidArgument when query.limit is outside 1..kMaxCredentialListLimit.
absl::Status ValidateCredentialQuery(const CredentialQuery& query);

}  // namespace mandate::store

#endif  // MANDATE_BROKER_COMMON_STORE_CREDENTIAL_INDEX_H_
