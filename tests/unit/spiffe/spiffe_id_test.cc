#include "broker/common/spiffe/spiffe_id.h"

#include <set>
#include <string>
#include <unordered_set>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::spiffe {
namespace {

using ::testing::HasSubstr;

struct InvalidCase {
  std::string id;
  std::string rule;  // a substring the error message must contain
};

// Keeps ctest names readable and stable (the default prints raw object bytes).
void PrintTo(const InvalidCase& c, std::ostream* os) {
  *os << "\"" << absl::CHexEscape(c.id.substr(0, 48)) << (c.id.size() > 48 ? "...\"" : "\"");
}

class SpiffeIdRejectTest : public ::testing::TestWithParam<InvalidCase> {};

TEST_P(SpiffeIdRejectTest, ParseRejectsWithMessageNamingTheRule) {
  absl::StatusOr<SpiffeId> id = SpiffeId::Parse(GetParam().id);
  ASSERT_FALSE(id.ok()) << GetParam().id << " was accepted";
  EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(id.status().message()), HasSubstr(GetParam().rule));
}

INSTANTIATE_TEST_SUITE_P(
    Rules, SpiffeIdRejectTest,
    ::testing::Values(
        InvalidCase{"", "empty"}, InvalidCase{"example.org/a", "must start with \"spiffe://\""},
        InvalidCase{"https://example.org/a", "must start with \"spiffe://\""},
        InvalidCase{"SPIFFE://example.org/a", "scheme must be lowercase"},
        InvalidCase{"Spiffe://example.org/a", "scheme must be lowercase"},
        InvalidCase{"spiffe:/example.org/a", "must start with \"spiffe://\""},
        InvalidCase{"spiffe://", "trust domain is empty"},
        InvalidCase{"spiffe:///a", "trust domain is empty"},
        InvalidCase{"spiffe://Example.org/a", "must be lowercase"},
        InvalidCase{"spiffe://example.org:8443/a", "must not include a port"},
        InvalidCase{"spiffe://user@example.org/a", "must not include userinfo"},
        InvalidCase{"spiffe://exa%6dple.org/a", "percent-encoding"},
        InvalidCase{"spiffe://example.org?x=1", "query"},
        InvalidCase{"spiffe://example.org#frag", "fragment"},
        InvalidCase{"spiffe://exa mple.org/a", "only [a-z0-9._-]"},
        InvalidCase{"spiffe://example.org/", "must not end with '/'"},
        InvalidCase{"spiffe://example.org/a/", "must not end with '/'"},
        InvalidCase{"spiffe://example.org//a", "empty segments"},
        InvalidCase{"spiffe://example.org/a//b", "empty segments"},
        InvalidCase{"spiffe://example.org/a/./b", "path segment '.' is not allowed"},
        InvalidCase{"spiffe://example.org/a/../b", "path segment '..' is not allowed"},
        InvalidCase{"spiffe://example.org/..", "path segment '..' is not allowed"},
        InvalidCase{"spiffe://example.org/a%20b", "percent-encoding"},
        InvalidCase{"spiffe://example.org/a?x=1", "query"},
        InvalidCase{"spiffe://example.org/a#frag", "fragment"},
        InvalidCase{"spiffe://example.org/a b", "only [a-zA-Z0-9._-]"},
        InvalidCase{"spiffe://example.org/a:b", "only [a-zA-Z0-9._-]"},
        InvalidCase{"spiffe://example.org/caf\xc3\xa9", "byte 0xc3"},
        InvalidCase{std::string("spiffe://example.org/a\0b", 24), "byte 0x00"},
        InvalidCase{"spiffe://" + std::string(256, 'a'), "the limit is 255"},
        InvalidCase{"spiffe://example.org/" + std::string(2048, 'a'), "the limit is 2048"}));

TEST(SpiffeIdTest, ParseAcceptsValidIdAndSplitsParts) {
  absl::StatusOr<SpiffeId> id = SpiffeId::Parse("spiffe://example.org/agent/Research-bot_1.2");
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->trust_domain().name(), "example.org");
  EXPECT_EQ(id->path(), "/agent/Research-bot_1.2");
  EXPECT_EQ(id->str(), "spiffe://example.org/agent/Research-bot_1.2");
}

TEST(SpiffeIdTest, ParseAcceptsTrustDomainIdWithEmptyPath) {
  absl::StatusOr<SpiffeId> id = SpiffeId::Parse("spiffe://my-td_1.example");
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->trust_domain().name(), "my-td_1.example");
  EXPECT_EQ(id->path(), "");
}

TEST(SpiffeIdTest, ParseAcceptsSegmentsThatOnlyContainDots) {
  // "..." is not a dot segment; only "." and ".." are.
  EXPECT_TRUE(SpiffeId::Parse("spiffe://example.org/.../.a/a.").ok());
}

TEST(SpiffeIdTest, ParseAcceptsExactlyTheMaximumLengths) {
  std::string id = "spiffe://example.org/";
  id += std::string(kMaxSpiffeIdBytes - id.size(), 'x');
  ASSERT_EQ(id.size(), kMaxSpiffeIdBytes);
  EXPECT_TRUE(SpiffeId::Parse(id).ok());
  EXPECT_TRUE(SpiffeId::Parse("spiffe://" + std::string(kMaxTrustDomainBytes, 'a') + "/x").ok());
}

TEST(SpiffeIdTest, PathViewSurvivesCopyAndMove) {
  absl::StatusOr<SpiffeId> parsed = SpiffeId::Parse("spiffe://example.org/a/b");
  ASSERT_TRUE(parsed.ok());
  SpiffeId copy = *parsed;
  SpiffeId moved = std::move(*parsed);
  EXPECT_EQ(copy.path(), "/a/b");
  EXPECT_EQ(moved.path(), "/a/b");
}

TEST(SpiffeIdTest, FromPathBuildsIdAndValidatesPath) {
  absl::StatusOr<TrustDomain> td = TrustDomain::Parse("example.org");
  ASSERT_TRUE(td.ok());
  absl::StatusOr<SpiffeId> id = SpiffeId::FromPath(*td, "/agent/x");
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->str(), "spiffe://example.org/agent/x");
  EXPECT_EQ(id->path(), "/agent/x");
  EXPECT_TRUE(SpiffeId::FromPath(*td, "").ok());

  absl::StatusOr<SpiffeId> relative = SpiffeId::FromPath(*td, "agent/x");
  ASSERT_FALSE(relative.ok());
  EXPECT_THAT(std::string(relative.status().message()), HasSubstr("must start with '/'"));
  absl::StatusOr<SpiffeId> dotdot = SpiffeId::FromPath(*td, "/a/..");
  ASSERT_FALSE(dotdot.ok());
  EXPECT_THAT(std::string(dotdot.status().message()), HasSubstr("'..' is not allowed"));
  EXPECT_FALSE(SpiffeId::FromPath(*td, "/" + std::string(2048, 'a')).ok());
}

TEST(SpiffeIdTest, ComparisonsUseTheFullString) {
  SpiffeId a = *SpiffeId::Parse("spiffe://example.org/a");
  SpiffeId a2 = *SpiffeId::Parse("spiffe://example.org/a");
  SpiffeId b = *SpiffeId::Parse("spiffe://example.org/b");
  SpiffeId other_td = *SpiffeId::Parse("spiffe://example.com/a");
  EXPECT_EQ(a, a2);
  EXPECT_NE(a, b);
  EXPECT_NE(a, other_td);
  EXPECT_LT(a, b);
  std::set<SpiffeId> ordered = {b, a, a2};
  EXPECT_EQ(ordered.size(), 2u);
  absl::flat_hash_set<SpiffeId> hashed = {a, a2, b};
  EXPECT_EQ(hashed.size(), 2u);
  std::unordered_set<SpiffeId> std_hashed = {a, a2, b};
  EXPECT_EQ(std_hashed.size(), 2u);
}

TEST(SpiffeIdTest, MemberOfComparesTrustDomains) {
  SpiffeId id = *SpiffeId::Parse("spiffe://example.org/a");
  EXPECT_TRUE(id.MemberOf(*TrustDomain::Parse("example.org")));
  EXPECT_FALSE(id.MemberOf(*TrustDomain::Parse("example.com")));
  EXPECT_FALSE(id.MemberOf(*TrustDomain::Parse("org")));
}

TEST(TrustDomainTest, ParseAcceptsBareName) {
  absl::StatusOr<TrustDomain> td = TrustDomain::Parse("prod.example-1_x.org");
  ASSERT_TRUE(td.ok()) << td.status();
  EXPECT_EQ(td->name(), "prod.example-1_x.org");
  EXPECT_EQ(td->IdString(), "spiffe://prod.example-1_x.org");
}

TEST(TrustDomainTest, ParseRejectsSpiffeUriWithHint) {
  absl::StatusOr<TrustDomain> td = TrustDomain::Parse("spiffe://example.org");
  ASSERT_FALSE(td.ok());
  EXPECT_THAT(std::string(td.status().message()), HasSubstr("bare trust domain name"));
}

TEST(TrustDomainTest, ParseRejectsUppercaseSayingItMustBeLowercase) {
  absl::StatusOr<TrustDomain> td = TrustDomain::Parse("Example.org");
  ASSERT_FALSE(td.ok());
  EXPECT_EQ(td.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(td.status().message()), HasSubstr("must be lowercase"));
}

TEST(TrustDomainTest, ParseRejectsEmptyTooLongPortSlash) {
  EXPECT_THAT(std::string(TrustDomain::Parse("").status().message()), HasSubstr("empty"));
  EXPECT_THAT(std::string(TrustDomain::Parse(std::string(256, 'a')).status().message()),
              HasSubstr("limit is 255"));
  EXPECT_TRUE(TrustDomain::Parse(std::string(255, 'a')).ok());
  EXPECT_THAT(std::string(TrustDomain::Parse("example.org:443").status().message()),
              HasSubstr("port"));
  EXPECT_THAT(std::string(TrustDomain::Parse("example.org/a").status().message()),
              HasSubstr("only [a-z0-9._-]"));
}

TEST(TrustDomainTest, EqualityAndOrdering) {
  TrustDomain a = *TrustDomain::Parse("a.org");
  TrustDomain b = *TrustDomain::Parse("b.org");
  EXPECT_EQ(a, *TrustDomain::Parse("a.org"));
  EXPECT_NE(a, b);
  EXPECT_LT(a, b);
}

TEST(ReservedPathTest, BrokerAndNodePathsAreReserved) {
  EXPECT_TRUE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/broker")));
  EXPECT_TRUE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/node")));
  EXPECT_TRUE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/node/join/a")));
  EXPECT_TRUE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/node/tpm/abc")));
}

TEST(ReservedPathTest, SimilarWorkloadPathsAreNotReserved) {
  EXPECT_FALSE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/nodes")));
  EXPECT_FALSE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/brokers")));
  EXPECT_FALSE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/agent/node")));
  EXPECT_FALSE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org/agent/broker")));
  EXPECT_FALSE(IsReservedPath(*SpiffeId::Parse("spiffe://example.org")));
}

TEST(ReservedPathTest, BrokerIdIsBrokerPath) {
  SpiffeId broker = BrokerId(*TrustDomain::Parse("example.org"));
  EXPECT_EQ(broker.str(), "spiffe://example.org/broker");
  EXPECT_TRUE(IsReservedPath(broker));
}

TEST(ReservedPathTest, JoinNodeIdBuildsNodeJoinPath) {
  TrustDomain td = *TrustDomain::Parse("example.org");
  absl::StatusOr<SpiffeId> id = JoinNodeId(td, "worker-1");
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->str(), "spiffe://example.org/node/join/worker-1");
  EXPECT_TRUE(IsReservedPath(*id));
}

TEST(ReservedPathTest, JoinNodeIdRejectsInvalidSegment) {
  TrustDomain td = *TrustDomain::Parse("example.org");
  for (const char* name : {"", ".", "..", "a/b", "a b", "a%2f"}) {
    absl::StatusOr<SpiffeId> id = JoinNodeId(td, name);
    EXPECT_FALSE(id.ok()) << "accepted join name '" << name << "'";
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(PathSegmentTest, ValidatePathSegmentRules) {
  EXPECT_TRUE(ValidatePathSegment("aZ0._-").ok());
  EXPECT_THAT(std::string(ValidatePathSegment("..").message()), HasSubstr("'..' is not allowed"));
  EXPECT_THAT(std::string(ValidatePathSegment("").message()), HasSubstr("empty"));
  EXPECT_THAT(std::string(ValidatePathSegment("a/b").message()), HasSubstr("'/'"));
}

}  // namespace
}  // namespace mandate::spiffe
