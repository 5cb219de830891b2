#include "broker/common/spiffe/selector.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::spiffe {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::string kHex64 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

TEST(SelectorParseTest, SplitsAtFirstColon) {
  absl::StatusOr<Selector> s = Selector::Parse("tpm:pcr:sha256:7:abc");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->type, "tpm");
  EXPECT_EQ(s->value, "pcr:sha256:7:abc");
  EXPECT_EQ(s->ToString(), "tpm:pcr:sha256:7:abc");
}

TEST(SelectorParseTest, RejectsMissingColon) {
  absl::StatusOr<Selector> s = Selector::Parse("unix");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("type:value"));
}

TEST(SelectorParseTest, RejectsEmptyType) {
  EXPECT_THAT(std::string(Selector::Parse(":uid:1").status().message()),
              HasSubstr("type must not be empty"));
}

TEST(SelectorParseTest, RejectsTypeOutsideLowercaseAlnumUnderscore) {
  for (const char* text : {"Unix:uid:1", "un-ix:uid:1", "un ix:uid:1", "un.ix:a"}) {
    absl::StatusOr<Selector> s = Selector::Parse(text);
    ASSERT_FALSE(s.ok()) << text;
    EXPECT_THAT(std::string(s.status().message()), HasSubstr("[a-z0-9_]")) << text;
  }
  EXPECT_TRUE(Selector::Parse("k8s_v2:x").ok());
}

TEST(SelectorParseTest, RejectsEmptyValue) {
  EXPECT_THAT(std::string(Selector::Parse("unix:").status().message()),
              HasSubstr("value must not be empty"));
}

TEST(SelectorTest, EqualityAndOrdering) {
  EXPECT_EQ((Selector{"unix", "uid:1"}), *Selector::Parse("unix:uid:1"));
  EXPECT_LT((Selector{"join", "name:a"}), (Selector{"unix", "uid:1"}));
}

absl::Status Validate(const std::string& text) {
  absl::StatusOr<Selector> s = Selector::Parse(text);
  if (!s.ok()) {
    return s.status();
  }
  return ValidateSelector(*s);
}

class ValidSelectorTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ValidSelectorTest, ValidateAccepts) {
  absl::Status status = Validate(GetParam());
  EXPECT_TRUE(status.ok()) << GetParam() << ": " << status;
}

INSTANTIATE_TEST_SUITE_P(
    Known, ValidSelectorTest,
    ::testing::Values("unix:uid:0", "unix:uid:1000", "unix:uid:4294967295", "unix:gid:42",
                      "unix:supplementary_gid:27", "unix:user:www-data", "unix:user:svc$",
                      "unix:group:docker", "unix:path:/usr/bin/python3.11", "unix:path:/",
                      "unix:path:/opt/my agent/bin", "unix:sha256:" + kHex64,
                      "systemd:unit:nginx.service", "systemd:unit:getty@tty1.service",
                      "systemd:unit:foo\\x2dbar.service", "systemd:user_unit:bar.service",
                      "join:name:worker-1", "tpm:ek_hash:" + kHex64, "tpm:ek_ca:" + kHex64,
                      "tpm:manufacturer:id:53544D20", "tpm:pcr:sha256:0:" + kHex64,
                      "tpm:pcr:sha256:23:" + kHex64));

struct InvalidSelector {
  std::string text;
  std::string rule;
};

// Keeps ctest names readable and stable (the default prints raw object bytes).
void PrintTo(const InvalidSelector& c, std::ostream* os) {
  *os << "\"" << absl::CHexEscape(c.text.substr(0, 48)) << (c.text.size() > 48 ? "...\"" : "\"");
}

class InvalidSelectorTest : public ::testing::TestWithParam<InvalidSelector> {};

TEST_P(InvalidSelectorTest, ValidateRejectsWithRule) {
  absl::Status status = Validate(GetParam().text);
  ASSERT_FALSE(status.ok()) << GetParam().text << " was accepted";
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr(GetParam().rule));
}

INSTANTIATE_TEST_SUITE_P(
    Rules, InvalidSelectorTest,
    ::testing::Values(
        InvalidSelector{"unix:uid:abc", "selector \"unix:uid:abc\": uid must be a decimal number"},
        InvalidSelector{"unix:uid:-1", "uid must be a decimal number"},
        InvalidSelector{"unix:uid:+1", "uid must be a decimal number"},
        InvalidSelector{"unix:uid: 1", "uid must be a decimal number"},
        InvalidSelector{"unix:uid:", "uid must be a decimal number"},
        InvalidSelector{"unix:uid:007", "uid must not have leading zeros"},
        InvalidSelector{"unix:uid:4294967296", "uid must fit in 32 bits"},
        InvalidSelector{"unix:uid:99999999999999999999999", "uid must fit in 32 bits"},
        InvalidSelector{"unix:gid:x", "gid must be a decimal number"},
        InvalidSelector{"unix:supplementary_gid:1.5", "supplementary_gid must be a decimal"},
        InvalidSelector{"unix:user:", "user name must not be empty"},
        InvalidSelector{"unix:user:a b", "user name must be printable ASCII"},
        InvalidSelector{"unix:group:a:b", "group name must be printable ASCII"},
        InvalidSelector{"unix:path:usr/bin/x", "path must be an absolute path"},
        InvalidSelector{"unix:path:/usr//bin", "must not contain '//'"},
        InvalidSelector{"unix:path:/usr/bin/", "must not end with '/'"},
        InvalidSelector{"unix:path:/usr/../bin", "'.' or '..' segments"},
        InvalidSelector{"unix:path:/usr/bin/.", "'.' or '..' segments"},
        InvalidSelector{"unix:path:/a\nb", "control characters"},
        InvalidSelector{"unix:sha256:abc", "sha256 must be 64 lowercase hex"},
        InvalidSelector{"unix:sha256:" + std::string(64, 'A'), "sha256 must be 64 lowercase hex"},
        InvalidSelector{"unix:sha256:" + std::string(64, 'g'), "sha256 must be 64 lowercase hex"},
        InvalidSelector{"unix:shoe:1", "unknown unix selector key \"shoe\""},
        InvalidSelector{"unix:1000", "value must have the form key:value"},
        InvalidSelector{"systemd:unit:foo.scope", "must name a .service unit"},
        InvalidSelector{"systemd:unit:.service", "must name a .service unit"},
        InvalidSelector{"systemd:unit:a/b.service", "must contain only"},
        InvalidSelector{"systemd:slice:a.slice", "unknown systemd selector key"},
        InvalidSelector{"join:name:a/b", "single SPIFFE ID path segment"},
        InvalidSelector{"join:name:..", "single SPIFFE ID path segment"},
        InvalidSelector{"join:token:x", "unknown join selector key"},
        InvalidSelector{"tpm:ek_hash:" + kHex64.substr(1), "ek_hash must be 64 lowercase hex"},
        InvalidSelector{"tpm:ek_ca:xyz", "ek_ca must be 64 lowercase hex"},
        InvalidSelector{"tpm:manufacturer:a b", "manufacturer must contain only"},
        InvalidSelector{"tpm:manufacturer:" + std::string(65, 'a'), "manufacturer must be 1 to"},
        InvalidSelector{"tpm:pcr:sha1:0:" + kHex64, "pcr must be sha256:<index 0-23>"},
        InvalidSelector{"tpm:pcr:sha256:24:" + kHex64, "index must be between 0 and 23"},
        InvalidSelector{"tpm:pcr:sha256:100:" + kHex64, "index must be between 0 and 23"},
        InvalidSelector{"tpm:pcr:sha256:07:" + kHex64, "index must not have leading zeros"},
        InvalidSelector{"tpm:pcr:sha256:x:" + kHex64, "index must be a decimal number"},
        InvalidSelector{"tpm:pcr:sha256:7:" + kHex64 + "0", "digest must be 64 lowercase hex"},
        InvalidSelector{"docker:label:a", "unknown selector type \"docker\""}));

TEST(ValidateSelectorTest, RejectsHandBuiltTypeContainingColon) {
  EXPECT_FALSE(ValidateSelector(Selector{"unix:uid", "1"}).ok());
  EXPECT_FALSE(ValidateSelector(Selector{"", "uid:1"}).ok());
}

TEST(SelectorSetTest, SortsAndDeduplicates) {
  SelectorSet set(std::vector<std::string>{"unix:uid:1", "join:name:a", "unix:uid:1"});
  EXPECT_THAT(set.strings(), ElementsAre("join:name:a", "unix:uid:1"));
  EXPECT_EQ(set.size(), 2u);
}

TEST(SelectorSetTest, BuildsFromSelectorStructs) {
  SelectorSet set(std::vector<Selector>{{"unix", "uid:1"}, {"unix", "gid:2"}, {"unix", "uid:1"}});
  EXPECT_THAT(set.strings(), ElementsAre("unix:gid:2", "unix:uid:1"));
  EXPECT_TRUE(set.Contains("unix:gid:2"));
  EXPECT_FALSE(set.Contains("unix:gid:3"));
}

TEST(SelectorSetTest, EntryMatchesWhenItsSelectorsAreASubsetOfCallers) {
  SelectorSet caller(std::vector<std::string>{
      "unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/agent", "systemd:unit:a.service"});
  SelectorSet entry(std::vector<std::string>{"unix:uid:1000", "unix:path:/usr/bin/agent"});
  EXPECT_TRUE(caller.ContainsAll(entry));
  EXPECT_TRUE(caller.ContainsAll(caller));
}

TEST(SelectorSetTest, EntryWithSelectorCallerLacksDoesNotMatch) {
  SelectorSet caller(std::vector<std::string>{"unix:uid:1000"});
  SelectorSet entry(std::vector<std::string>{"unix:uid:1000", "unix:gid:1000"});
  EXPECT_FALSE(caller.ContainsAll(entry));  // entry is a superset of the caller
  SelectorSet other(std::vector<std::string>{"unix:uid:1001"});
  EXPECT_FALSE(caller.ContainsAll(other));
}

TEST(SelectorSetTest, EntryWithNoSelectorsNeverMatches) {
  SelectorSet caller(std::vector<std::string>{"unix:uid:1000"});
  EXPECT_FALSE(caller.ContainsAll(SelectorSet()));
  EXPECT_FALSE(SelectorSet().ContainsAll(SelectorSet()));
}

TEST(SelectorSetTest, DuplicatesInEntryDoNotMatterForMatching) {
  SelectorSet caller(std::vector<std::string>{"unix:uid:1000", "unix:gid:5"});
  SelectorSet entry(std::vector<std::string>{"unix:uid:1000", "unix:uid:1000"});
  EXPECT_TRUE(caller.ContainsAll(entry));
}

TEST(SelectorSetTest, MatchingIsExactStringComparison) {
  SelectorSet caller(std::vector<std::string>{"unix:uid:1000"});
  EXPECT_FALSE(caller.ContainsAll(SelectorSet(std::vector<std::string>{"unix:uid:100"})));
  EXPECT_FALSE(caller.ContainsAll(SelectorSet(std::vector<std::string>{"UNIX:uid:1000"})));
}

}  // namespace
}  // namespace mandate::spiffe
