// ChooseEntry: which identity a Tasks API caller acts as.
#include "broker/agent/tasks_service.h"

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::agent {
namespace {

using ::testing::HasSubstr;

AssignedEntry Entry(std::string id, std::string spiffe_id, std::vector<std::string> selectors) {
  AssignedEntry entry;
  entry.id = std::move(id);
  entry.spiffe_id = std::move(spiffe_id);
  entry.selectors = spiffe::SelectorSet(std::move(selectors));
  return entry;
}

const spiffe::SelectorSet kCaller(std::vector<std::string>{"unix:uid:1000", "unix:gid:1000"});

TEST(ChooseEntryTest, SingleMatchIsTheDefault) {
  Snapshot snapshot;
  snapshot.entries = {Entry("e1", "spiffe://td/a", {"unix:uid:1000"}),
                      Entry("e2", "spiffe://td/b", {"unix:uid:2000"})};
  auto chosen = ChooseEntry(snapshot, kCaller, "");
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  EXPECT_EQ((*chosen)->id, "e1");
}

TEST(ChooseEntryTest, SeveralIdentitiesNeedASpiffeId) {
  Snapshot snapshot;
  snapshot.entries = {Entry("e1", "spiffe://td/a", {"unix:uid:1000"}),
                      Entry("e2", "spiffe://td/b", {"unix:gid:1000"})};
  auto ambiguous = ChooseEntry(snapshot, kCaller, "");
  EXPECT_EQ(ambiguous.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ambiguous.status().message(), HasSubstr("several identities"));
  auto named = ChooseEntry(snapshot, kCaller, "spiffe://td/b");
  ASSERT_TRUE(named.ok()) << named.status();
  EXPECT_EQ((*named)->id, "e2");
}

TEST(ChooseEntryTest, NamedIdentityMustBeOneTheCallerMatches) {
  Snapshot snapshot;
  snapshot.entries = {Entry("e1", "spiffe://td/a", {"unix:uid:1000"}),
                      Entry("e2", "spiffe://td/b", {"unix:uid:2000"})};
  auto other = ChooseEntry(snapshot, kCaller, "spiffe://td/b");
  EXPECT_EQ(other.status().code(), absl::StatusCode::kPermissionDenied);
}

TEST(ChooseEntryTest, NoMatchIsPermissionDenied) {
  Snapshot snapshot;
  snapshot.entries = {Entry("e2", "spiffe://td/b", {"unix:uid:2000"})};
  auto none = ChooseEntry(snapshot, kCaller, "");
  EXPECT_EQ(none.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(none.status().message(), HasSubstr("no identity issued"));
}

}  // namespace
}  // namespace mandate::agent
