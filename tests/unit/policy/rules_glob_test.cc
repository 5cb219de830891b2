#include "broker/server/policy/rules_glob.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

namespace mandate::broker::policy {
namespace {

bool Matches(const std::string& pattern, const std::string& text) {
  absl::StatusOr<Glob> glob = Glob::Compile(pattern);
  EXPECT_TRUE(glob.ok()) << pattern << ": " << glob.status();
  return glob.ok() && glob->Matches(text);
}

TEST(GlobTest, ExactPatternsMatchOnlyThemselves) {
  EXPECT_TRUE(Matches("spiffe://td/agent/bot", "spiffe://td/agent/bot"));
  EXPECT_FALSE(Matches("spiffe://td/agent/bot", "spiffe://td/agent/bot2"));
  EXPECT_FALSE(Matches("spiffe://td/agent/bot", "spiffe://td/agent/bo"));
  EXPECT_FALSE(Matches("spiffe://td/agent/bot", "SPIFFE://td/agent/bot"));
  // Characters other than '*' are literal, also those special elsewhere.
  EXPECT_TRUE(Matches("a.b?c[d]", "a.b?c[d]"));
  EXPECT_FALSE(Matches("a.b", "axb"));
  EXPECT_FALSE(Matches("a?", "ab"));
}

TEST(GlobTest, StarStaysWithinOneSegment) {
  EXPECT_TRUE(Matches("spiffe://td/agent/*", "spiffe://td/agent/bot"));
  EXPECT_FALSE(Matches("spiffe://td/agent/*", "spiffe://td/agent/bot/x"));
  EXPECT_FALSE(Matches("spiffe://td/agent/*", "spiffe://td/agent"));
  EXPECT_TRUE(Matches("spiffe://td/*/reader", "spiffe://td/a/reader"));
  EXPECT_FALSE(Matches("spiffe://td/*/reader", "spiffe://td/a/b/reader"));
  EXPECT_TRUE(Matches("spiffe://td/agent/research-*", "spiffe://td/agent/research-7"));
  EXPECT_FALSE(Matches("spiffe://td/agent/research-*", "spiffe://td/agent/payments-7"));
  EXPECT_TRUE(Matches("*:read", "docs:read"));
  EXPECT_FALSE(Matches("*:read", "docs:write"));
  EXPECT_TRUE(Matches("a*b*c", "aXbYc"));
  EXPECT_TRUE(Matches("a*b*c", "abc"));
  EXPECT_FALSE(Matches("a*b*c", "aXb/c"));
  EXPECT_TRUE(Matches("*", ""));
  EXPECT_FALSE(Matches("*", "a/b"));
  // The star may not cross the '//' of a URL either.
  EXPECT_FALSE(Matches("https:*", "https://api.example.org"));
}

TEST(GlobTest, DoubleStarCrossesSegments) {
  EXPECT_TRUE(Matches("spiffe://td/agent/**", "spiffe://td/agent/a"));
  EXPECT_TRUE(Matches("spiffe://td/agent/**", "spiffe://td/agent/a/b/c"));
  // The '/' before ** is literal: the parent itself is not inside.
  EXPECT_FALSE(Matches("spiffe://td/agent/**", "spiffe://td/agent"));
  EXPECT_FALSE(Matches("spiffe://td/agent/**", "spiffe://td/agents/a"));
  EXPECT_TRUE(Matches("spiffe://td/**/reader", "spiffe://td/a/b/reader"));
  EXPECT_TRUE(Matches("spiffe://td/**/reader", "spiffe://td/a/reader"));
  EXPECT_FALSE(Matches("spiffe://td/**/reader", "spiffe://td/reader"));
  EXPECT_FALSE(Matches("spiffe://td/**/reader", "spiffe://td/a/reader/x"));
  EXPECT_TRUE(Matches("**", "anything/at/all"));
  EXPECT_TRUE(Matches("https://**.example.org/*", "https://a.b.example.org/v1"));
  EXPECT_FALSE(Matches("https://**.example.org/*", "https://a.b.example.org/v1/x"));
  EXPECT_TRUE(Matches("**/*/x", "a/b/c/x"));
  EXPECT_FALSE(Matches("**/*/x", "c/x/"));
}

TEST(GlobTest, CompileRefusesBadPatterns) {
  EXPECT_FALSE(Glob::Compile("").ok());
  EXPECT_FALSE(Glob::Compile("spiffe://td/***").ok());
  EXPECT_FALSE(Glob::Compile("a****b").ok());
  EXPECT_FALSE(Glob::Compile(std::string("a\nb")).ok());
  EXPECT_FALSE(Glob::Compile(std::string(Glob::kMaxLength + 1, 'a')).ok());
  EXPECT_TRUE(Glob::Compile(std::string(Glob::kMaxLength, 'a')).ok());
  EXPECT_TRUE(Glob::Compile("*/**").ok());
}

// Plain exhaustive backtracking: obviously right, exponential, fine for tiny inputs.
bool Reference(std::string_view p, std::string_view t) {
  if (p.empty()) return t.empty();
  if (p.substr(0, 2) == "**") {
    for (size_t i = 0; i <= t.size(); ++i) {
      if (Reference(p.substr(2), t.substr(i))) return true;
    }
    return false;
  }
  if (p[0] == '*') {
    for (size_t i = 0; i <= t.size(); ++i) {
      if (Reference(p.substr(1), t.substr(i))) return true;
      if (i < t.size() && t[i] == '/') break;
    }
    return false;
  }
  return !t.empty() && t[0] == p[0] && Reference(p.substr(1), t.substr(1));
}

TEST(GlobTest, AgreesWithExhaustiveSearchOnRandomInputs) {
  std::mt19937 rng(12345);
  const std::string pattern_atoms[] = {"a", "b", "/", "*", "**"};
  const char text_chars[] = {'a', 'b', '/'};
  int compared = 0;
  for (int round = 0; round < 20000; ++round) {
    std::string pattern;
    const int atoms = 1 + static_cast<int>(rng() % 7);
    for (int i = 0; i < atoms; ++i) pattern += pattern_atoms[rng() % 5];
    absl::StatusOr<Glob> glob = Glob::Compile(pattern);
    if (!glob.ok()) continue;  // "***" and longer runs
    std::string text;
    const int length = static_cast<int>(rng() % 9);
    for (int i = 0; i < length; ++i) text += text_chars[rng() % 3];
    ASSERT_EQ(glob->Matches(text), Reference(pattern, text))
        << "pattern '" << pattern << "' text '" << text << "'";
    ++compared;
  }
  EXPECT_GT(compared, 10000);
}

TEST(GlobTest, ManyStarsStayFast) {
  // A naive backtracker takes exponential time here; the abort rules keep it polynomial.
  std::string pattern;
  for (int i = 0; i < 20; ++i) pattern += "a**";
  pattern += "b";
  absl::StatusOr<Glob> glob = Glob::Compile(pattern);
  ASSERT_TRUE(glob.ok());
  EXPECT_FALSE(glob->Matches(std::string(200, 'a')));
  EXPECT_TRUE(glob->Matches(std::string(200, 'a') + "b"));
}

}  // namespace
}  // namespace mandate::broker::policy
