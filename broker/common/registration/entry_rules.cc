#include "broker/common/registration/entry_rules.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "broker/common/log/log.h"
#include "broker/common/spiffe/selector.h"

namespace mandate::registration {

bool IsScopeToken(std::string_view scope) {
  return !scope.empty() && std::all_of(scope.begin(), scope.end(), [](char ch) {
    const unsigned char c = static_cast<unsigned char>(ch);
    return c == 0x21 || (c >= 0x23 && c <= 0x5B) || (c >= 0x5D && c <= 0x7E);
  });
}

absl::Status ValidateEntry(const mandate::common::v1::Entry& entry,
                           const spiffe::TrustDomain* trust_domain, int64_t max_ttl_seconds) {
  auto id = spiffe::SpiffeId::Parse(entry.spiffe_id());
  if (!id.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--spiffe-id: ", id.status().message()));
  }
  if (trust_domain != nullptr && !id->MemberOf(*trust_domain)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--spiffe-id must be in this broker's trust domain ", trust_domain->IdString()));
  }
  if (spiffe::IsReservedPath(*id)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--spiffe-id ", id->str(),
                     " is reserved (/broker and /node/... belong to the broker "
                     "and node agents); pick another path, e.g. /agent/<name>"));
  }
  auto parent = spiffe::SpiffeId::Parse(entry.parent_id());
  if (!parent.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--parent-id: ", parent.status().message()));
  }
  if (trust_domain != nullptr && !parent->MemberOf(*trust_domain)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--parent-id must be in this broker's trust domain ", trust_domain->IdString()));
  }
  if (entry.selectors().empty()) {
    return absl::InvalidArgumentError("at least one --selector type:value is required");
  }
  if (static_cast<size_t>(entry.selectors_size()) > kMaxEntrySelectors) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxEntrySelectors, " --selector values"));
  }
  for (const auto& text : entry.selectors()) {
    auto selector = spiffe::Selector::Parse(text);
    if (!selector.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--selector: ", selector.status().message()));
    }
    if (absl::Status s = spiffe::ValidateSelector(*selector); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--selector: ", s.message()));
    }
  }
  if (static_cast<size_t>(entry.scopes_size()) > kMaxEntryScopes) {
    return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxEntryScopes, " --scope values"));
  }
  for (const auto& scope : entry.scopes()) {
    if (scope.size() > kMaxEntryScopeBytes || !IsScopeToken(scope)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--scope \"", log::EscapeForLog(scope),
          "\" is not an OAuth scope token (1-256 printable ASCII characters, no spaces, quotes "
          "or backslashes)"));
    }
  }
  for (auto [name, value] : {std::pair{"--x509-ttl", entry.x509_ttl_seconds()},
                             std::pair{"--jwt-ttl", entry.jwt_ttl_seconds()},
                             std::pair{"--token-ttl", entry.token_ttl_seconds()}}) {
    const bool too_long = max_ttl_seconds > 0 && value > max_ttl_seconds;
    if (value < 0 || (value > 0 && value < kMinEntryTtlSeconds) || too_long) {
      return absl::InvalidArgumentError(
          max_ttl_seconds > 0
              ? absl::StrCat(name, " must be 0 (broker default) or between ", kMinEntryTtlSeconds,
                             " and ", max_ttl_seconds, " seconds")
              : absl::StrCat(name, " must be 0 (broker default) or at least ", kMinEntryTtlSeconds,
                             " seconds"));
    }
  }
  return absl::OkStatus();
}

}  // namespace mandate::registration
