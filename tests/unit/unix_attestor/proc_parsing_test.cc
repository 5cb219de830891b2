#include "attestors/workload/unix/proc_parsing.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::unix_attestor {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

// A realistic stat line; starttime (field 22) is 98765.
constexpr char kStat[] =
    "4242 (python3) S 1 4242 4242 0 -1 4194560 2045 0 0 0 12 3 0 0 20 0 1 0 98765 "
    "25000000 3000 18446744073709551615 1 1 0 0 0 0 0 16781312 2 0 0 0 17 1 0 0 0 0 0\n";

TEST(ParseStatStartTimeTest, ReadsField22) {
  absl::StatusOr<uint64_t> start = ParseStatStartTime(kStat);
  ASSERT_TRUE(start.ok()) << start.status();
  EXPECT_EQ(*start, 98765u);
}

TEST(ParseStatStartTimeTest, CommWithSpacesAndParensIsSkippedFromLastParen) {
  // A process can name itself ") S 1 2 3 ..." to try to shift the fields.
  std::string stat =
      "77 (evil) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 11111 x) R 1 1 1 0 -1 0 0 0 0 0 0 0 "
      "0 0 20 0 1 0 55555 100 200\n";
  absl::StatusOr<uint64_t> start = ParseStatStartTime(stat);
  ASSERT_TRUE(start.ok()) << start.status();
  EXPECT_EQ(*start, 55555u);
}

TEST(ParseStatStartTimeTest, RejectsMissingParens) {
  EXPECT_EQ(ParseStatStartTime("4242 python3 S 1").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ParseStatStartTime(")( S 1").ok());
  EXPECT_FALSE(ParseStatStartTime("").ok());
}

TEST(ParseStatStartTimeTest, RejectsTooFewFields) {
  EXPECT_FALSE(ParseStatStartTime("1 (a) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0").ok());
}

TEST(ParseStatStartTimeTest, RejectsNonNumericOrOverflowingStartTime) {
  EXPECT_FALSE(ParseStatStartTime("1 (a) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 12x 5").ok());
  EXPECT_FALSE(ParseStatStartTime("1 (a) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 -5 5").ok());
  EXPECT_FALSE(
      ParseStatStartTime("1 (a) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 18446744073709551616 5")
          .ok());
  absl::StatusOr<uint64_t> max =
      ParseStatStartTime("1 (a) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 18446744073709551615 5");
  ASSERT_TRUE(max.ok()) << max.status();
  EXPECT_EQ(*max, UINT64_MAX);
}

constexpr char kStatus[] =
    "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\nPid:\t4242\n"
    "Uid:\t1000\t1001\t1002\t1003\nGid:\t2000\t2001\t2002\t2003\nFDSize:\t64\n"
    "Groups:\t4 24 27 2000 \nNStgid:\t4242\n";

TEST(ParseStatusIdsTest, ReadsRealEffectiveAndGroups) {
  absl::StatusOr<StatusIds> ids = ParseStatusIds(kStatus);
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(ids->real_uid, 1000u);
  EXPECT_EQ(ids->effective_uid, 1001u);
  EXPECT_EQ(ids->real_gid, 2000u);
  EXPECT_EQ(ids->effective_gid, 2001u);
  EXPECT_THAT(ids->supplementary_gids, ElementsAre(4u, 24u, 27u, 2000u));
}

TEST(ParseStatusIdsTest, EmptyGroupsLineMeansNoGroups) {
  absl::StatusOr<StatusIds> ids = ParseStatusIds("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_THAT(ids->supplementary_gids, IsEmpty());
}

TEST(ParseStatusIdsTest, RejectsMissingUidOrGid) {
  EXPECT_FALSE(ParseStatusIds("Gid:\t0\t0\t0\t0\n").ok());
  EXPECT_FALSE(ParseStatusIds("Uid:\t0\t0\t0\t0\n").ok());
  EXPECT_FALSE(ParseStatusIds("Uid:\t0\nGid:\t0\t0\t0\t0\n").ok());
}

TEST(ParseStatusIdsTest, RejectsDuplicateLines) {
  EXPECT_FALSE(ParseStatusIds("Uid:\t0\t0\t0\t0\nUid:\t5\t5\t5\t5\nGid:\t0\t0\t0\t0\n").ok());
}

TEST(ParseStatusIdsTest, RejectsNonNumericAndOverflowingIds) {
  EXPECT_FALSE(ParseStatusIds("Uid:\t0\tx\t0\t0\nGid:\t0\t0\t0\t0\n").ok());
  EXPECT_FALSE(ParseStatusIds("Uid:\t0\t4294967296\t0\t0\nGid:\t0\t0\t0\t0\n").ok());
  EXPECT_FALSE(ParseStatusIds("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t1 -2\n").ok());
}

struct CgroupCase {
  std::string content;
  std::string unit;
  std::string user_unit;
};

// Keeps ctest names readable and stable (the default prints raw object bytes).
void PrintTo(const CgroupCase& c, std::ostream* os) {
  *os << "\"" << absl::CHexEscape(c.content) << "\"";
}

class ParseSystemdUnitsTest : public ::testing::TestWithParam<CgroupCase> {};

TEST_P(ParseSystemdUnitsTest, FindsUnits) {
  absl::StatusOr<SystemdUnits> units = ParseSystemdUnits(GetParam().content);
  ASSERT_TRUE(units.ok()) << units.status();
  EXPECT_EQ(units->unit, GetParam().unit);
  EXPECT_EQ(units->user_unit, GetParam().user_unit);
}

INSTANTIATE_TEST_SUITE_P(
    Paths, ParseSystemdUnitsTest,
    ::testing::Values(
        CgroupCase{"0::/system.slice/foo.service\n", "foo.service", ""},
        CgroupCase{"0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty@tty1.service",
                   ""},
        // A delegated service's own sub-cgroups still belong to the service.
        CgroupCase{"0::/system.slice/foo.service/worker/bar.service\n", "foo.service", ""},
        CgroupCase{"0::/user.slice/user-1000.slice/user@1000.service/app.slice/bar.service\n",
                   "user@1000.service", "bar.service"},
        CgroupCase{"0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-x-1.scope\n",
                   "user@1000.service", ""},
        CgroupCase{"0::/user.slice/user-1000.slice/session-3.scope\n", "", ""},
        CgroupCase{"0::/system.slice/docker-0123abcd.scope\n", "", ""},
        // A container's own systemd cannot pose as a host unit: a scope breaks the slice chain.
        CgroupCase{"0::/system.slice/docker-01.scope/system.slice/sshd.service\n", "", ""},
        CgroupCase{"0::/docker/01/system.slice/sshd.service\n", "", ""},
        CgroupCase{"0::/\n", "", ""}, CgroupCase{"0::/init.scope\n", "", ""},
        CgroupCase{"0::/system.slice/_cpu.service\n", "cpu.service", ""},
        // cgroup v1 host: the name=systemd hierarchy carries the unit.
        CgroupCase{"12:cpu,cpuacct:/system.slice/foo.service\n1:name=systemd:/system.slice/"
                   "v1.service\n",
                   "v1.service", ""},
        // Hybrid host: the unified (v2) line wins.
        CgroupCase{"1:name=systemd:/system.slice/old.service\n0::/system.slice/new.service\n",
                   "new.service", ""},
        CgroupCase{"", "", ""}));

TEST(ParseSystemdUnitsMalformedTest, RejectsLineWithoutThreeFields) {
  EXPECT_FALSE(ParseSystemdUnits("garbage\n").ok());
  EXPECT_FALSE(ParseSystemdUnits("0:/system.slice/foo.service\n").ok());
}

TEST(ParseSystemdUnitsMalformedTest, RejectsRelativePathAndDuplicateUnifiedLine) {
  EXPECT_FALSE(ParseSystemdUnits("0::system.slice/foo.service\n").ok());
  EXPECT_FALSE(ParseSystemdUnits("0::/a.slice/a.service\n0::/b.slice/b.service\n").ok());
}

}  // namespace
}  // namespace mandate::unix_attestor
