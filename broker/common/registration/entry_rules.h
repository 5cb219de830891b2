// What a registration entry and an OAuth scope may be: the one definition the broker's admin
// API enforces and the `mandate` CLI checks before it sends (so the CLI's early errors and the
// broker's refusals never disagree).
#ifndef MANDATE_BROKER_COMMON_REGISTRATION_ENTRY_RULES_H_
#define MANDATE_BROKER_COMMON_REGISTRATION_ENTRY_RULES_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "mandate/common/v1/types.pb.h"

namespace mandate::registration {

inline constexpr size_t kMaxEntrySelectors = 64;
inline constexpr size_t kMaxEntryScopes = 64;
inline constexpr size_t kMaxEntryScopeBytes = 256;
// Below a minute, half-life rotation would outpace the broker round trip.
inline constexpr int64_t kMinEntryTtlSeconds = 60;

// RFC 6749 §3.3 scope-token = 1*( %x21 / %x23-5B / %x5D-7E ): the one definition used for
// entry entitlements, task declarations and token requests.
bool IsScopeToken(std::string_view scope);

// Checks an entry as `mandate entry create` sends it. Messages name the CLI flag at fault.
// With a trust domain, both IDs must be in it; with max_ttl_seconds > 0 every TTL must be 0
// (the broker's default) or within [kMinEntryTtlSeconds, max_ttl_seconds] (without it only the
// lower bound is checked: the broker knows its own limit).
absl::Status ValidateEntry(const mandate::common::v1::Entry& entry,
                           const spiffe::TrustDomain* trust_domain, int64_t max_ttl_seconds);

}  // namespace mandate::registration

#endif  // MANDATE_BROKER_COMMON_REGISTRATION_ENTRY_RULES_H_
