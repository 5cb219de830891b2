#include "broker/common/store/credential_index.h"

#include "absl/strings/str_cat.h"

namespace mandate::store {

bool IsCredentialKind(std::string_view kind) {
  return kind == kCredentialKindX509Svid || kind == kCredentialKindJwtSvid ||
         kind == kCredentialKindTaskToken || kind == kCredentialKindDelegatedToken;
}

absl::Status ValidateIssuedCredential(const IssuedCredential& c) {
  if (c.id.empty() || c.spiffe_id.empty()) {
    return absl::InvalidArgumentError("issued credential needs an id and a spiffe_id");
  }
  if (!IsCredentialKind(c.kind)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown credential kind '", c.kind, "'"));
  }
  if (c.expires_at < c.issued_at) {
    return absl::InvalidArgumentError("issued credential expires before it was issued");
  }
  return absl::OkStatus();
}

absl::Status ValidateCredentialQuery(const CredentialQuery& query) {
  if (query.limit < 1 || query.limit > kMaxCredentialListLimit) {
    return absl::InvalidArgumentError(
        absl::StrCat("credential list limit must be 1..", kMaxCredentialListLimit));
  }
  return absl::OkStatus();
}

}  // namespace mandate::store
