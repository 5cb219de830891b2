// The globs of the policy rules file (docs/policy.md): `*` matches any run of characters
// without a '/', `**` any run of characters at all (slashes included), every other character
// only itself. A glob matches the whole text, never a part of it.
//
// Patterns are compiled once, when the rules file is loaded; Matches allocates nothing and is
// cheap for the shapes rules use most (exact text, a prefix followed by `**`).
//
// Thread-safety: immutable after Compile; Matches may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_POLICY_RULES_GLOB_H_
#define MANDATE_BROKER_SERVER_POLICY_RULES_GLOB_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace mandate::broker::policy {

class Glob {
 public:
  // The longest pattern accepted (match time grows with pattern and text length).
  static constexpr size_t kMaxLength = 1024;

  // InvalidArgument (saying why) for an empty pattern, one longer than kMaxLength, three or
  // more '*' in a row, or a control character.
  static absl::StatusOr<Glob> Compile(std::string_view pattern);

  bool Matches(std::string_view text) const;
  const std::string& pattern() const { return pattern_; }

 private:
  enum class Shape {
    kExact,    // no wildcard: text == pattern
    kPrefix,   // literal + "**": text starts with the literal
    kGeneral,  // anything else: the backtracking matcher, after the literal prefix/suffix test
  };
  Glob(std::string pattern, Shape shape, size_t prefix, size_t suffix)
      : pattern_(std::move(pattern)), shape_(shape), prefix_(prefix), suffix_(suffix) {}

  std::string pattern_;
  Shape shape_;
  size_t prefix_;  // length of the literal text before the first '*'
  size_t suffix_;  // length of the literal text after the last '*'
};

}  // namespace mandate::broker::policy

#endif  // MANDATE_BROKER_SERVER_POLICY_RULES_GLOB_H_
