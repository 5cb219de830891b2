// Agent::Match: which registration entries a caller's selectors satisfy, with and without the
// snapshot's selector index (both must give the same answer, in entry order).
#include <string>
#include <vector>

#include "broker/agent/agent.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::agent {
namespace {

AssignedEntry Entry(std::string id, std::vector<std::string> selectors) {
  AssignedEntry entry;
  entry.id = id;
  entry.spiffe_id = "spiffe://example.org/" + id;
  entry.selectors = spiffe::SelectorSet(std::move(selectors));
  return entry;
}

std::vector<std::string> Ids(const std::vector<const AssignedEntry*>& matches) {
  std::vector<std::string> ids;
  for (const AssignedEntry* e : matches) ids.push_back(e->id);
  return ids;
}

Snapshot MakeSnapshot() {
  Snapshot snapshot;
  snapshot.entries = {
      Entry("uid", {"unix:uid:1000"}),
      Entry("uid-and-path", {"unix:uid:1000", "unix:path:/usr/bin/bot"}),
      Entry("other-uid", {"unix:uid:1001"}),
      Entry("none", {}),
      Entry("path-and-gid", {"unix:path:/usr/bin/bot", "unix:gid:50"}),
      Entry("uid-again", {"unix:uid:1000"}),
  };
  return snapshot;
}

TEST(MatchTest, IndexedAndScannedMatchAgreeInEntryOrder) {
  Snapshot scanned = MakeSnapshot();
  Snapshot indexed = MakeSnapshot();
  Agent::IndexEntries(indexed);
  ASSERT_EQ(indexed.indexed_entries, indexed.entries.size());
  const std::vector<std::vector<std::string>> callers = {
      {"unix:uid:1000"},
      {"unix:uid:1000", "unix:path:/usr/bin/bot"},
      {"unix:uid:1000", "unix:path:/usr/bin/bot", "unix:gid:50"},
      {"unix:gid:50", "unix:path:/usr/bin/bot"},
      {"unix:uid:1002"},
      {},
  };
  for (const auto& selectors : callers) {
    spiffe::SelectorSet caller(selectors);
    EXPECT_EQ(Ids(Agent::Match(indexed, caller)), Ids(Agent::Match(scanned, caller)))
        << ::testing::PrintToString(selectors);
  }
  spiffe::SelectorSet full(
      std::vector<std::string>{"unix:uid:1000", "unix:path:/usr/bin/bot", "unix:gid:50"});
  EXPECT_THAT(Ids(Agent::Match(indexed, full)),
              ::testing::ElementsAre("uid", "uid-and-path", "path-and-gid", "uid-again"));
  // An entry without selectors matches no one, not even a caller without selectors.
  EXPECT_TRUE(Agent::Match(indexed, spiffe::SelectorSet()).empty());
}

TEST(MatchTest, ScansWhenTheIndexDoesNotCoverTheEntries) {
  Snapshot snapshot = MakeSnapshot();
  Agent::IndexEntries(snapshot);
  snapshot.entries.push_back(Entry("added-later", {"unix:uid:1000"}));
  spiffe::SelectorSet caller(std::vector<std::string>{"unix:uid:1000"});
  EXPECT_THAT(Ids(Agent::Match(snapshot, caller)),
              ::testing::ElementsAre("uid", "uid-again", "added-later"));
}

TEST(NeedsExeHashTest, OnlyWhenAnEntryWithADigestCouldMatchOnEverythingElse) {
  Snapshot snapshot;
  snapshot.entries = {
      Entry("uid-only", {"unix:uid:1000"}),
      Entry("bot-by-hash", {"unix:uid:1000", "unix:path:/usr/bin/bot", "unix:sha256:ab12"}),
      Entry("hash-only", {"unix:sha256:cd34"}),
  };
  Snapshot indexed = snapshot;
  Agent::IndexEntries(indexed);
  auto needs = [&](std::vector<std::string> caller) {
    spiffe::SelectorSet set(std::move(caller));
    bool scanned = Agent::NeedsExeHash(snapshot, set);
    EXPECT_EQ(Agent::NeedsExeHash(indexed, set), scanned);
    return scanned;
  };
  // "hash-only" could match anyone: every caller needs its digest.
  EXPECT_TRUE(needs({"unix:uid:2000"}));
  indexed.entries.pop_back();
  Agent::IndexEntries(indexed);
  snapshot.entries.pop_back();
  // Now only the bot's uid and path lead to an entry with a digest.
  EXPECT_FALSE(needs({"unix:uid:2000", "unix:path:/usr/bin/bot"}));
  EXPECT_FALSE(needs({"unix:uid:1000", "unix:path:/usr/bin/other"}));
  EXPECT_TRUE(needs({"unix:uid:1000", "unix:path:/usr/bin/bot", "unix:gid:5"}));
  EXPECT_FALSE(needs({}));
}

}  // namespace
}  // namespace mandate::agent
