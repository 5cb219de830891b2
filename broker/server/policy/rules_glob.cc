#include "broker/server/policy/rules_glob.h"

#include "absl/strings/str_cat.h"

namespace mandate::broker::policy {
namespace {

enum class Result {
  kMatch,
  kNoMatch,
  // The text ran out before the pattern: no later choice of an enclosing star can help, since
  // each only leaves less text.
  kAbortAll,
  // A `*` would have had to cross a '/': only an enclosing `**` can help.
  kAbortToDoubleStar,
};

// Matches `pattern` against all of `text`. Stars try their shortest extent first, and the
// two abort results cut the search the way rsync's wildmatch does, which keeps the work
// polynomial in the lengths (a naive backtracker is exponential in the number of stars).
// Recursion depth is at most the number of stars.
Result MatchFrom(std::string_view pattern, std::string_view text) {
  size_t p = 0, t = 0;
  while (p < pattern.size()) {
    const char c = pattern[p];
    if (c != '*') {
      if (t >= text.size()) return Result::kAbortAll;
      if (text[t] != c) return Result::kNoMatch;
      ++p;
      ++t;
      continue;
    }
    const bool double_star = p + 1 < pattern.size() && pattern[p + 1] == '*';
    p += double_star ? 2 : 1;
    const std::string_view rest = pattern.substr(p);
    const std::string_view remaining = text.substr(t);
    if (rest.empty()) {
      if (!double_star && remaining.find('/') != std::string_view::npos) {
        return Result::kAbortToDoubleStar;
      }
      return Result::kMatch;
    }
    // `rest` starts with a literal character (Compile refuses "***"), so it needs at least one
    // character of text: the star's extent runs over positions that leave some.
    for (size_t i = 0; i < remaining.size(); ++i) {
      const Result r = MatchFrom(rest, remaining.substr(i));
      if (r != Result::kNoMatch) {
        if (!double_star || r != Result::kAbortToDoubleStar) return r;
      } else if (!double_star && remaining[i] == '/') {
        return Result::kAbortToDoubleStar;
      }
    }
    return Result::kAbortAll;
  }
  return t == text.size() ? Result::kMatch : Result::kNoMatch;
}

}  // namespace

absl::StatusOr<Glob> Glob::Compile(std::string_view pattern) {
  if (pattern.empty()) return absl::InvalidArgumentError("empty pattern");
  if (pattern.size() > kMaxLength) {
    return absl::InvalidArgumentError(
        absl::StrCat("pattern longer than ", kMaxLength, " characters"));
  }
  size_t run = 0;
  for (char c : pattern) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return absl::InvalidArgumentError("pattern contains a control character");
    }
    run = c == '*' ? run + 1 : 0;
    if (run > 2) {
      return absl::InvalidArgumentError(
          "pattern has three or more '*' in a row (use '*' within a segment, '**' across)");
    }
  }
  const size_t first = pattern.find('*');
  if (first == std::string_view::npos) {
    return Glob(std::string(pattern), Shape::kExact, pattern.size(), 0);
  }
  const size_t last = pattern.rfind('*');
  const size_t suffix = pattern.size() - last - 1;
  if (last == pattern.size() - 1 && first + 2 == pattern.size() && pattern[first + 1] == '*') {
    return Glob(std::string(pattern), Shape::kPrefix, first, 0);
  }
  return Glob(std::string(pattern), Shape::kGeneral, first, suffix);
}

bool Glob::Matches(std::string_view text) const {
  const std::string_view pattern = pattern_;
  switch (shape_) {
    case Shape::kExact:
      return text == pattern;
    case Shape::kPrefix:
      return text.substr(0, prefix_) == pattern.substr(0, prefix_);
    case Shape::kGeneral:
      break;
  }
  // The literal ends are cheap to test and settle most non-matches.
  if (text.size() < prefix_ + suffix_) return false;
  if (text.substr(0, prefix_) != pattern.substr(0, prefix_)) return false;
  if (text.substr(text.size() - suffix_) != pattern.substr(pattern.size() - suffix_)) {
    return false;
  }
  return MatchFrom(pattern.substr(prefix_), text.substr(prefix_)) == Result::kMatch;
}

}  // namespace mandate::broker::policy
