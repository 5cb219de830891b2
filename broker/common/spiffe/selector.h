// Selectors ("type:value" facts an attestor established about a caller) and selector matching.
//
// Selectors are compared as exact strings. Two levels of checking exist on purpose:
//   - Selector::Parse is the structural check for any "type:value" string (from the wire, the
//     store, or an attestor);
//   - ValidateSelector is the strict check for operator input (`mandate entry create`): it knows
//     every selector type Mandate's attestors emit and refuses values that no attestor would ever
//     produce, so that a typo is reported instead of creating an entry that can never match.
// Every selector Mandate's attestors emit passes ValidateSelector.
//
// All types here are plain values; functions are pure and thread-safe.
#ifndef MANDATE_BROKER_COMMON_SPIFFE_SELECTOR_H_
#define MANDATE_BROKER_COMMON_SPIFFE_SELECTOR_H_

#include <compare>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::spiffe {

struct Selector {
  std::string type;   // e.g. "unix"; non-empty, [a-z0-9_]
  std::string value;  // e.g. "uid:1000"; non-empty, may itself contain ':'

  // "type:value", the form used in the CLI, JSON outputs and the store.
  std::string ToString() const;
  // Splits "type:value" at the first ':'. Fails with InvalidArgument when there is no ':', the type
  // is empty or has characters outside [a-z0-9_], or the value is empty.
  static absl::StatusOr<Selector> Parse(std::string_view selector);

  friend bool operator==(const Selector&, const Selector&) = default;
  friend std::strong_ordering operator<=>(const Selector&, const Selector&) = default;
  friend std::ostream& operator<<(std::ostream& os, const Selector& s) {
    return os << s.type << ':' << s.value;
  }
};

// Strict validation of an operator-supplied selector. Known types and values:
//   unix:uid:<n>  unix:gid:<n>  unix:supplementary_gid:<n>   (n: decimal uint32, no sign, no
//                                                             leading zeros)
//   unix:user:<name>  unix:group:<name>                      (printable ASCII, no space or ':')
//   unix:path:<absolute path>                                (canonical: no "//", ".", "..",
//                                                             trailing '/' or control characters)
//   unix:sha256:<64 lowercase hex>
//   systemd:unit:<unit>       a unit of the system manager, e.g. "nginx.service"
//   systemd:user_unit:<unit>  a unit of a per-user manager (user@<uid>.service); kept apart from
//                             systemd:unit because any user can name their own units freely
//   join:name:<name>          a single SPIFFE ID path segment
//   tpm:ek_hash:<64 lowercase hex>  tpm:ek_ca:<64 lowercase hex>
//   tpm:manufacturer:<id>     1..64 of [A-Za-z0-9._:-]
//   tpm:pcr:sha256:<0-23>:<64 lowercase hex>
// Returns InvalidArgument whose message quotes the selector and states the rule, e.g.
// `selector "unix:uid:abc": uid must be a decimal number`.
absl::Status ValidateSelector(const Selector& selector);

// A sorted, de-duplicated set of selector strings ("type:value").
//
// Matching follows SPIRE: a registration entry matches a caller when every selector of the entry
// is among the caller's selectors; the caller may have more. An entry with zero selectors never
// matches anyone - an empty requirement would otherwise be satisfied by every caller, turning a
// half-written entry into a wildcard.
class SelectorSet {
 public:
  SelectorSet() = default;
  // O(n log n); duplicates are dropped. Strings are taken as given (not parsed or validated).
  explicit SelectorSet(std::vector<std::string> selectors);
  explicit SelectorSet(const std::vector<Selector>& selectors);

  // True when `required` is non-empty and every one of its selectors is in this set.
  // O(|this| + |required|). Call it on the caller's set with the entry's set as `required`.
  bool ContainsAll(const SelectorSet& required) const;
  bool Contains(std::string_view selector) const;

  // The selectors in ascending byte order, without duplicates.
  const std::vector<std::string>& strings() const { return selectors_; }
  size_t size() const { return selectors_.size(); }
  bool empty() const { return selectors_.empty(); }

  friend bool operator==(const SelectorSet&, const SelectorSet&) = default;

 private:
  std::vector<std::string> selectors_;  // sorted, unique
};

}  // namespace mandate::spiffe

#endif  // MANDATE_BROKER_COMMON_SPIFFE_SELECTOR_H_
