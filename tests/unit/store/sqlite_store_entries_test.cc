// Registration entries in SqliteStore: CRUD, duplicate refusal, parent lookup, revisions.
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::mandate::store::test_util::MakeEntry;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kNodeA[] = "spiffe://example.org/node/join/a";
constexpr char kNodeB[] = "spiffe://example.org/node/join/b";

class SqliteStoreEntriesTest : public test_util::SqliteStoreFixture {
 protected:
  void SetUp() override {
    SqliteStoreFixture::SetUp();
    store_ = OpenStore();
    ASSERT_NE(store_, nullptr);
  }
  void TearDown() override {
    store_.reset();
    SqliteStoreFixture::TearDown();
  }
  std::unique_ptr<SqliteStore> store_;
};

TEST_F(SqliteStoreEntriesTest, CreateThenGetRoundTripsEveryField) {
  RegistrationEntry entry = MakeEntry("e1", kNodeA, {"unix:uid:1000", "unix:path:/usr/bin/bot"});
  entry.scopes = {"tickets:write", "tickets:read"};
  absl::StatusOr<RegistrationEntry> created = store_->CreateEntry(entry);
  ASSERT_TRUE(created.ok()) << created.status();

  absl::StatusOr<RegistrationEntry> got = store_->GetEntry("e1");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, *created);
  EXPECT_EQ(got->id, "e1");
  EXPECT_EQ(got->spiffe_id, "spiffe://example.org/agent/bot");
  EXPECT_EQ(got->parent_id, kNodeA);
  // Sets come back sorted.
  EXPECT_THAT(got->selectors, ElementsAre("unix:path:/usr/bin/bot", "unix:uid:1000"));
  EXPECT_THAT(got->scopes, ElementsAre("tickets:read", "tickets:write"));
  EXPECT_EQ(got->x509_ttl_s, 3600);
  EXPECT_EQ(got->jwt_ttl_s, 300);
  EXPECT_EQ(got->token_ttl_s, 600);
  EXPECT_EQ(got->created_at, 1700000000);
  EXPECT_EQ(got->revision, 1);
}

TEST_F(SqliteStoreEntriesTest, CreateDeduplicatesSelectorsAndScopes) {
  RegistrationEntry entry = MakeEntry("e1", kNodeA, {"unix:uid:1", "unix:uid:1", "unix:gid:2"});
  entry.scopes = {"a", "a"};
  absl::StatusOr<RegistrationEntry> created = store_->CreateEntry(entry);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_THAT(created->selectors, ElementsAre("unix:gid:2", "unix:uid:1"));
  EXPECT_THAT(created->scopes, ElementsAre("a"));
  EXPECT_EQ(*store_->GetEntry("e1"), *created);
}

TEST_F(SqliteStoreEntriesTest, CreateKeepsEntryWithoutSelectorsOrScopes) {
  RegistrationEntry entry = MakeEntry("e1", kNodeA, {});
  entry.scopes.clear();
  ASSERT_TRUE(store_->CreateEntry(entry).ok());
  absl::StatusOr<RegistrationEntry> got = store_->GetEntry("e1");
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->selectors.empty());
  EXPECT_TRUE(got->scopes.empty());
}

TEST_F(SqliteStoreEntriesTest, CreateRejectsEmptyRequiredFields) {
  EXPECT_EQ(store_->CreateEntry(MakeEntry("", kNodeA, {"unix:uid:1"})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->CreateEntry(MakeEntry("e1", "", {"unix:uid:1"})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"}, "")).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1", ""})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*store_->EntriesRevision(), 0);
  EXPECT_TRUE(store_->ListEntries()->empty());
}

TEST_F(SqliteStoreEntriesTest, CreateRefusesDuplicateId) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
  absl::StatusOr<RegistrationEntry> dup =
      store_->CreateEntry(MakeEntry("e1", kNodeB, {"unix:uid:2"}, "spiffe://example.org/x"));
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(dup.status().message(), HasSubstr("'e1' already exists"));
  // The original is untouched.
  EXPECT_EQ(store_->GetEntry("e1")->parent_id, kNodeA);
}

TEST_F(SqliteStoreEntriesTest, CreateRefusesSameSpiffeIdParentAndSelectorSetInAnyOrder) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1", "unix:gid:2"})).ok());
  absl::StatusOr<RegistrationEntry> dup =
      store_->CreateEntry(MakeEntry("e2", kNodeA, {"unix:gid:2", "unix:uid:1", "unix:uid:1"}));
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(dup.status().message(), HasSubstr("'e1'"));
  EXPECT_EQ(store_->GetEntry("e2").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SqliteStoreEntriesTest, CreateAllowsEntriesDifferingInSelectorsParentOrSpiffeId) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
  EXPECT_TRUE(store_->CreateEntry(MakeEntry("e2", kNodeA, {"unix:uid:1", "unix:gid:1"})).ok());
  EXPECT_TRUE(store_->CreateEntry(MakeEntry("e3", kNodeB, {"unix:uid:1"})).ok());
  EXPECT_TRUE(
      store_->CreateEntry(MakeEntry("e4", kNodeA, {"unix:uid:1"}, "spiffe://example.org/other"))
          .ok());
  // Selector sets whose naive concatenations would collide are still different sets.
  EXPECT_TRUE(store_->CreateEntry(MakeEntry("e5", kNodeA, {"a:b;c"})).ok());
  EXPECT_TRUE(store_->CreateEntry(MakeEntry("e6", kNodeA, {"a:b", "c"})).ok());
  EXPECT_EQ(store_->ListEntries()->size(), 6u);
}

TEST_F(SqliteStoreEntriesTest, RefusedDuplicateCreateChangesNothing) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
  ASSERT_FALSE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:9"})).ok());
  ASSERT_FALSE(store_->CreateEntry(MakeEntry("e2", kNodeA, {"unix:uid:1"})).ok());
  EXPECT_EQ(*store_->EntriesRevision(), 1);
  absl::StatusOr<std::vector<RegistrationEntry>> all = store_->ListEntries();
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 1u);
  EXPECT_THAT(all->front().selectors, ElementsAre("unix:uid:1"));
}

TEST_F(SqliteStoreEntriesTest, GetUnknownEntryIsNotFound) {
  absl::StatusOr<RegistrationEntry> got = store_->GetEntry("missing");
  EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(got.status().message(), HasSubstr("missing"));
}

TEST_F(SqliteStoreEntriesTest, ListEntriesIsOrderedById) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("c", kNodeA, {"unix:uid:3"})).ok());
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("a", kNodeB, {"unix:uid:1"})).ok());
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("b", kNodeA, {"unix:uid:2"})).ok());
  absl::StatusOr<std::vector<RegistrationEntry>> all = store_->ListEntries();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 3u);
  EXPECT_EQ((*all)[0].id, "a");
  EXPECT_EQ((*all)[1].id, "b");
  EXPECT_EQ((*all)[2].id, "c");
  // Each entry carries its own selectors, not its neighbours'.
  EXPECT_THAT((*all)[0].selectors, ElementsAre("unix:uid:1"));
  EXPECT_THAT((*all)[1].selectors, ElementsAre("unix:uid:2"));
  EXPECT_THAT((*all)[2].selectors, ElementsAre("unix:uid:3"));
}

TEST_F(SqliteStoreEntriesTest, ListEntriesByParentReturnsOnlyThatParentsEntries) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("a2", kNodeA, {"unix:uid:2"})).ok());
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("b1", kNodeB, {"unix:uid:1"})).ok());
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("a1", kNodeA, {"unix:uid:1", "unix:gid:5"})).ok());

  absl::StatusOr<std::vector<RegistrationEntry>> under_a = store_->ListEntriesByParent(kNodeA);
  ASSERT_TRUE(under_a.ok()) << under_a.status();
  ASSERT_EQ(under_a->size(), 2u);
  EXPECT_EQ((*under_a)[0].id, "a1");
  EXPECT_THAT((*under_a)[0].selectors, ElementsAre("unix:gid:5", "unix:uid:1"));
  EXPECT_EQ((*under_a)[1].id, "a2");
  EXPECT_THAT((*under_a)[1].selectors, ElementsAre("unix:uid:2"));

  absl::StatusOr<std::vector<RegistrationEntry>> under_b = store_->ListEntriesByParent(kNodeB);
  ASSERT_TRUE(under_b.ok());
  ASSERT_EQ(under_b->size(), 1u);
  EXPECT_EQ((*under_b)[0].id, "b1");

  EXPECT_TRUE(store_->ListEntriesByParent("spiffe://example.org/node/join/none")->empty());
  // Exact match only: a prefix of a parent ID matches nothing.
  EXPECT_TRUE(store_->ListEntriesByParent("spiffe://example.org/node/join/")->empty());
}

TEST_F(SqliteStoreEntriesTest, DeleteRemovesEntryAndItsSelectors) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
  ASSERT_TRUE(store_->DeleteEntry("e1").ok());
  EXPECT_EQ(store_->GetEntry("e1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store_->ListEntriesByParent(kNodeA)->empty());
  store_.reset();
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM registration_entry_selectors"), 0);
  EXPECT_EQ(QueryRawInt("SELECT count(*) FROM registration_entry_scopes"), 0);
}

TEST_F(SqliteStoreEntriesTest, DeletedIdentityCanBeCreatedAgain) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
  ASSERT_TRUE(store_->DeleteEntry("e1").ok());
  EXPECT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
}

TEST_F(SqliteStoreEntriesTest, DeleteUnknownEntryIsNotFoundAndKeepsRevision) {
  ASSERT_TRUE(store_->CreateEntry(MakeEntry("e1", kNodeA, {"unix:uid:1"})).ok());
  EXPECT_EQ(store_->DeleteEntry("missing").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*store_->EntriesRevision(), 1);
}

TEST_F(SqliteStoreEntriesTest, RevisionBumpsOnEveryCreateAndDelete) {
  EXPECT_EQ(*store_->EntriesRevision(), 0);
  absl::StatusOr<RegistrationEntry> e1 = store_->CreateEntry(MakeEntry("e1", kNodeA, {"x:1"}));
  ASSERT_TRUE(e1.ok());
  EXPECT_EQ(e1->revision, 1);
  EXPECT_EQ(*store_->EntriesRevision(), 1);
  absl::StatusOr<RegistrationEntry> e2 = store_->CreateEntry(MakeEntry("e2", kNodeA, {"x:2"}));
  ASSERT_TRUE(e2.ok());
  EXPECT_EQ(e2->revision, 2);
  ASSERT_TRUE(store_->DeleteEntry("e1").ok());
  EXPECT_EQ(*store_->EntriesRevision(), 3);
  // The revision never goes back, even when the entry set returns to an earlier state.
  ASSERT_TRUE(store_->DeleteEntry("e2").ok());
  EXPECT_EQ(*store_->EntriesRevision(), 4);
  absl::StatusOr<RegistrationEntry> again = store_->CreateEntry(MakeEntry("e1", kNodeA, {"x:1"}));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->revision, 5);
}

TEST_F(SqliteStoreEntriesTest, CallerSuppliedRevisionIsIgnored) {
  RegistrationEntry entry = MakeEntry("e1", kNodeA, {"x:1"});
  entry.revision = 999;
  absl::StatusOr<RegistrationEntry> created = store_->CreateEntry(entry);
  ASSERT_TRUE(created.ok());
  EXPECT_EQ(created->revision, 1);
  EXPECT_EQ(*store_->EntriesRevision(), 1);
}

TEST_F(SqliteStoreEntriesTest, SqlMetacharactersInValuesAreStoredVerbatim) {
  const std::string id = "x'); DROP TABLE registration_entries; --";
  RegistrationEntry entry = MakeEntry(id, "spiffe://example.org/node/join/'\"", {"unix:path:/a'b"});
  ASSERT_TRUE(store_->CreateEntry(entry).ok());
  absl::StatusOr<RegistrationEntry> got = store_->GetEntry(id);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->parent_id, "spiffe://example.org/node/join/'\"");
  EXPECT_THAT(got->selectors, ElementsAre("unix:path:/a'b"));
  EXPECT_EQ(store_->ListEntries()->size(), 1u);
}

TEST_F(SqliteStoreEntriesTest, CreateEntriesStoresABatchWithConsecutiveRevisions) {
  std::vector<RegistrationEntry> batch;
  for (int i = 0; i < 3; ++i) {
    RegistrationEntry e = MakeEntry("b" + std::to_string(i), kNodeA, {"unix:uid:1", "unix:uid:1"});
    e.spiffe_id = "spiffe://example.org/agent/b" + std::to_string(i);
    batch.push_back(e);
  }
  absl::StatusOr<std::vector<RegistrationEntry>> created = store_->CreateEntries(batch);
  ASSERT_TRUE(created.ok()) << created.status();
  ASSERT_EQ(created->size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ((*created)[i].revision, i + 1);
    EXPECT_THAT((*created)[i].selectors, ElementsAre("unix:uid:1"));
    EXPECT_EQ(*store_->GetEntry((*created)[i].id), (*created)[i]);
  }
  EXPECT_EQ(*store_->EntriesRevision(), 3);
  EXPECT_TRUE(store_->CreateEntries({})->empty());
}

TEST_F(SqliteStoreEntriesTest, CreateEntriesIsAllOrNothing) {
  RegistrationEntry first = MakeEntry("x1", kNodeA, {"unix:uid:1"});
  RegistrationEntry duplicate_of_first = MakeEntry("x2", kNodeA, {"unix:uid:1"});
  EXPECT_EQ(store_->CreateEntries({first, duplicate_of_first}).status().code(),
            absl::StatusCode::kAlreadyExists);
  RegistrationEntry invalid = MakeEntry("x3", kNodeB, {""});
  EXPECT_EQ(
      store_->CreateEntries({MakeEntry("x4", kNodeB, {"unix:uid:2"}), invalid}).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(store_->ListEntries()->empty());
  EXPECT_EQ(*store_->EntriesRevision(), 0);
}

// Prepared statements are cached per connection and reused: two connections to one file must
// each see the other's committed writes, and closing one must leave the other working.
TEST_F(SqliteStoreEntriesTest, ReusedStatementsServeSeveralConnectionsAndSurviveAClose) {
  std::unique_ptr<SqliteStore> second = OpenStore();
  ASSERT_NE(second, nullptr);
  for (int i = 0; i < 20; ++i) {
    SqliteStore& writer = i % 2 == 0 ? *store_ : *second;
    SqliteStore& reader = i % 2 == 0 ? *second : *store_;
    RegistrationEntry e = MakeEntry("r" + std::to_string(i), kNodeA, {"unix:uid:1"});
    e.spiffe_id = "spiffe://example.org/agent/r" + std::to_string(i);
    ASSERT_TRUE(writer.CreateEntry(e).ok());
    absl::StatusOr<RegistrationEntry> got = reader.GetEntry(e.id);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->spiffe_id, e.spiffe_id);
    EXPECT_EQ(reader.ListEntries()->size(), static_cast<size_t>(i + 1));
  }
  second.reset();
  EXPECT_EQ(store_->ListEntries()->size(), 20u);
  EXPECT_EQ(store_->GetEntry("r19")->spiffe_id, "spiffe://example.org/agent/r19");
}

}  // namespace
}  // namespace mandate::store
