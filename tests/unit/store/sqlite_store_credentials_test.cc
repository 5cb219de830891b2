// SqliteStore credential index (schema migration 9): rows written with their audit records in
// one transaction (all or nothing), lookups by id and by each filter, paging, limits, and
// durability across reopen.
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "broker/common/store/credential_index.h"
#include "broker/common/store/sqlite_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/unit/store/store_test_util.h"

namespace mandate::store {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

AuditRecord Record(int64_t seq, std::string credential_id) {
  AuditRecord r;
  r.chain_id = "b1";
  r.seq = seq;
  r.time = 1700000000 + seq;
  r.event = "task_token";
  r.outcome = "issued";
  r.spiffe_id = "spiffe://example.org/agent/bot";
  r.credential_id = std::move(credential_id);
  r.prev_hash = seq == 1 ? "" : "h" + std::to_string(seq - 1);
  r.hash = "h" + std::to_string(seq);
  return r;
}

IssuedCredential Row(std::string id, std::string parent = "") {
  IssuedCredential c;
  c.id = std::move(id);
  c.kind = std::string(kCredentialKindDelegatedToken);
  c.spiffe_id = "spiffe://example.org/agent/bot";
  c.node_id = "spiffe://example.org/node/join/web-1";
  c.subject_issuer = "https://idp.example.com";
  c.subject = "alice";
  c.task_id = "task_1";
  c.parent_id = std::move(parent);
  c.issued_at = 1700000000;
  c.expires_at = 1700000300;
  return c;
}

std::vector<std::string> Ids(const std::vector<IssuedCredential>& rows) {
  std::vector<std::string> out;
  for (const auto& r : rows) out.push_back(r.id);
  return out;
}

class SqliteStoreCredentialsTest : public test_util::SqliteStoreFixture {};

TEST_F(SqliteStoreCredentialsTest, RowsAreStoredWithTheirRecordsAndReadBack) {
  auto store = OpenStore();
  IssuedCredential root = Row("jti-1");
  IssuedCredential child = Row("jti-2", "jti-1");
  child.kind = std::string(kCredentialKindTaskToken);
  ASSERT_TRUE(
      store->AppendAuditBatch({Record(1, "jti-1"), Record(2, "jti-2")}, {root, child}).ok());
  auto got = store->GetCredential("jti-2");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, child);
  EXPECT_EQ(store->ListAuditRecords({})->size(), 2u);
  EXPECT_TRUE(absl::IsNotFound(store->GetCredential("jti-3").status()));
}

TEST_F(SqliteStoreCredentialsTest, ADuplicateIdFailsTheWholeBatch) {
  auto store = OpenStore();
  ASSERT_TRUE(store->AppendAuditBatch({Record(1, "jti-1")}, {Row("jti-1")}).ok());
  absl::Status status = store->AppendAuditBatch({Record(2, "jti-2"), Record(3, "jti-1")},
                                                {Row("jti-2"), Row("jti-1")});
  EXPECT_TRUE(absl::IsAlreadyExists(status)) << status;
  // Neither the records nor the new row of the failed batch were stored.
  EXPECT_EQ(store->ListAuditRecords({})->size(), 1u);
  EXPECT_TRUE(absl::IsNotFound(store->GetCredential("jti-2").status()));
}

TEST_F(SqliteStoreCredentialsTest, AFailedAuditAppendStoresNoRow) {
  auto store = OpenStore();
  ASSERT_TRUE(store->AppendAuditBatch({Record(1, "jti-1")}, {Row("jti-1")}).ok());
  // seq 1 again: the chain already has it.
  absl::Status status = store->AppendAuditBatch({Record(1, "jti-2")}, {Row("jti-2")});
  EXPECT_TRUE(absl::IsAlreadyExists(status)) << status;
  EXPECT_TRUE(absl::IsNotFound(store->GetCredential("jti-2").status()));
}

TEST_F(SqliteStoreCredentialsTest, InvalidRowsAreRefusedBeforeAnythingIsWritten) {
  auto store = OpenStore();
  IssuedCredential no_id = Row("");
  IssuedCredential bad_kind = Row("jti-1");
  bad_kind.kind = "cookie";
  IssuedCredential backwards = Row("jti-2");
  backwards.expires_at = backwards.issued_at - 1;
  IssuedCredential no_spiffe_id = Row("jti-3");
  no_spiffe_id.spiffe_id.clear();
  for (const IssuedCredential& row : {no_id, bad_kind, backwards, no_spiffe_id}) {
    absl::Status status = store->AppendAuditBatch({Record(1, row.id)}, {row});
    EXPECT_TRUE(absl::IsInvalidArgument(status)) << row.id << ": " << status;
  }
  EXPECT_THAT(*store->ListAuditRecords({}), IsEmpty());
  EXPECT_THAT(*store->ListCredentials({}), IsEmpty());
}

TEST_F(SqliteStoreCredentialsTest, ListsByEachFilter) {
  auto store = OpenStore();
  IssuedCredential a = Row("a");
  IssuedCredential b = Row("b", "a");
  b.spiffe_id = "spiffe://example.org/agent/helper";
  b.task_id = "task_2";
  IssuedCredential c = Row("c", "a");
  c.subject = "bob";
  IssuedCredential d = Row("d");
  d.subject_issuer = "https://other.example.com";
  ASSERT_TRUE(store->AppendAuditBatch({Record(1, "a")}, {a, b, c, d}).ok());

  EXPECT_THAT(Ids(*store->ListCredentials({})), ElementsAre("a", "b", "c", "d"));
  EXPECT_THAT(Ids(*store->ListCredentials({.spiffe_id = "spiffe://example.org/agent/helper"})),
              ElementsAre("b"));
  EXPECT_THAT(Ids(*store->ListCredentials({.subject = "alice"})), ElementsAre("a", "b", "d"));
  EXPECT_THAT(Ids(*store->ListCredentials(
                  {.subject = "alice", .subject_issuer = "https://idp.example.com"})),
              ElementsAre("a", "b"));
  EXPECT_THAT(Ids(*store->ListCredentials({.task_id = "task_2"})), ElementsAre("b"));
  EXPECT_THAT(Ids(*store->ListCredentials({.parent_id = "a"})), ElementsAre("b", "c"));
  EXPECT_THAT(Ids(*store->ListCredentials({.parent_id = "zzz"})), IsEmpty());
}

TEST_F(SqliteStoreCredentialsTest, PagesByIdWithinTheLimit) {
  auto store = OpenStore();
  std::vector<IssuedCredential> rows;
  for (const char* id : {"a", "b", "c", "d", "e"}) rows.push_back(Row(id));
  ASSERT_TRUE(store->AppendAuditBatch({Record(1, "a")}, rows).ok());
  EXPECT_THAT(Ids(*store->ListCredentials({.limit = 2})), ElementsAre("a", "b"));
  EXPECT_THAT(Ids(*store->ListCredentials({.after_id = "b", .limit = 2})), ElementsAre("c", "d"));
  EXPECT_THAT(Ids(*store->ListCredentials({.after_id = "d", .limit = 2})), ElementsAre("e"));
  for (int64_t limit : {int64_t{0}, int64_t{-1}, kMaxCredentialListLimit + 1}) {
    auto listed = store->ListCredentials({.limit = limit});
    EXPECT_TRUE(absl::IsInvalidArgument(listed.status())) << limit;
  }
}

TEST_F(SqliteStoreCredentialsTest, RowsSurviveReopen) {
  {
    auto store = OpenStore();
    ASSERT_TRUE(store->AppendAuditBatch({Record(1, "jti-1")}, {Row("jti-1")}).ok());
  }
  auto store = OpenStore();
  auto got = store->GetCredential("jti-1");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, Row("jti-1"));
}

TEST_F(SqliteStoreCredentialsTest, AppendAuditRecordsAloneStillWorks) {
  auto store = OpenStore();
  ASSERT_TRUE(store->AppendAuditRecords({Record(1, "jti-1")}).ok());
  EXPECT_EQ(store->ListAuditRecords({})->size(), 1u);
  EXPECT_THAT(*store->ListCredentials({}), IsEmpty());
  EXPECT_THAT(std::string(store->AppendAuditBatch({}, {Row("")}).message()), HasSubstr("id"));
}

}  // namespace
}  // namespace mandate::store
