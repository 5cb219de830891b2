#include "broker/server/entry_registry.h"

#include <gtest/gtest.h>

#include <thread>

#include "tests/unit/broker_server/test_env.h"

namespace mandate::broker {
namespace {

using testing::OpenStore;
using testing::TempDir;

store::RegistrationEntry Entry(std::string id, std::string parent) {
  store::RegistrationEntry e;
  e.id = std::move(id);
  e.spiffe_id = "spiffe://example.org/agent/" + e.id;
  e.parent_id = std::move(parent);
  e.selectors = {"unix:uid:1000"};
  return e;
}

TEST(EntryRegistryTest, IndexesEntriesByParentAndSurvivesReload) {
  TempDir dir;
  auto store = OpenStore(dir);
  {
    auto registry = EntryRegistry::Load(*store);
    ASSERT_TRUE(registry.ok());
    ASSERT_TRUE((*registry)->Create(Entry("a", "spiffe://example.org/node/join/n1")).ok());
    ASSERT_TRUE((*registry)->Create(Entry("b", "spiffe://example.org/node/join/n2")).ok());
    ASSERT_TRUE((*registry)->Create(Entry("c", "spiffe://example.org/node/join/n1")).ok());
  }
  auto reloaded = EntryRegistry::Load(*store);
  ASSERT_TRUE(reloaded.ok());
  auto n1 = (*reloaded)->ForParent("spiffe://example.org/node/join/n1");
  ASSERT_EQ(n1.size(), 2u);
  EXPECT_EQ((*reloaded)->ForParent("spiffe://example.org/node/join/n2").size(), 1u);
  EXPECT_TRUE((*reloaded)->ForParent("spiffe://example.org/node/join/n3").empty());
  EXPECT_EQ((*reloaded)->size(), 3u);
}

TEST(EntryRegistryTest, DeleteRemovesFromStoreAndIndex) {
  TempDir dir;
  auto store = OpenStore(dir);
  auto registry = EntryRegistry::Load(*store);
  ASSERT_TRUE((*registry)->Create(Entry("a", "spiffe://example.org/node/join/n1")).ok());
  ASSERT_TRUE((*registry)->Delete("a").ok());
  EXPECT_TRUE((*registry)->ForParent("spiffe://example.org/node/join/n1").empty());
  EXPECT_EQ((*registry)->Get("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->GetEntry("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*registry)->Delete("a").code(), absl::StatusCode::kNotFound);
}

TEST(EntryRegistryTest, FailedCreateChangesNothing) {
  TempDir dir;
  auto store = OpenStore(dir);
  auto registry = EntryRegistry::Load(*store);
  ASSERT_TRUE((*registry)->Create(Entry("a", "spiffe://example.org/node/join/n1")).ok());
  uint64_t generation = (*registry)->generation();
  auto duplicate = Entry("a2", "spiffe://example.org/node/join/n1");
  duplicate.spiffe_id = "spiffe://example.org/agent/a";  // same ID, parent, selectors as "a"
  EXPECT_EQ((*registry)->Create(duplicate).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ((*registry)->generation(), generation);
  EXPECT_EQ((*registry)->size(), 1u);
}

TEST(EntryRegistryTest, WaitersWakeOnChangeWithoutWaitingForTimeout) {
  TempDir dir;
  auto store = OpenStore(dir);
  auto registry = EntryRegistry::Load(*store);
  uint64_t seen = (*registry)->generation();
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    (void)(*registry)->Create(Entry("a", "spiffe://example.org/node/join/n1"));
  });
  auto start = std::chrono::steady_clock::now();
  uint64_t now = (*registry)->WaitForChange(seen, std::chrono::seconds(10));
  auto waited = std::chrono::steady_clock::now() - start;
  writer.join();
  EXPECT_NE(now, seen);
  EXPECT_LT(waited, std::chrono::seconds(5));
}

TEST(EntryRegistryTest, NodeChangesBumpGeneration) {
  TempDir dir;
  auto store = OpenStore(dir);
  auto registry = EntryRegistry::Load(*store);
  uint64_t before = (*registry)->generation();
  (*registry)->NotifyNodeChanged();
  EXPECT_GT((*registry)->generation(), before);
}

TEST(EntryRegistryTest, IndexesEntriesBySpiffeIdThroughCreateDeleteAndReload) {
  TempDir dir;
  auto store = OpenStore(dir);
  {
    auto registry = EntryRegistry::Load(*store);
    ASSERT_TRUE(registry.ok());
    // The same workload on two nodes, and another workload.
    for (const char* id : {"a", "b"}) {
      store::RegistrationEntry e = Entry(id, std::string("spiffe://example.org/node/join/") + id);
      e.spiffe_id = "spiffe://example.org/shared";
      ASSERT_TRUE((*registry)->Create(e).ok());
    }
    store::RegistrationEntry other = Entry("c", "spiffe://example.org/node/join/n1");
    other.spiffe_id = "spiffe://example.org/other";
    ASSERT_TRUE((*registry)->Create(other).ok());
  }
  auto registry = EntryRegistry::Load(*store);
  ASSERT_TRUE(registry.ok());
  const std::string shared = "spiffe://example.org/shared";
  EXPECT_EQ((*registry)->ForSpiffeId(shared).size(), 2u);
  ASSERT_EQ((*registry)->ForSpiffeId("spiffe://example.org/other").size(), 1u);
  EXPECT_EQ((*registry)->ForSpiffeId("spiffe://example.org/other")[0].id, "c");
  ASSERT_TRUE((*registry)->Delete("a").ok());
  auto left = (*registry)->ForSpiffeId(shared);
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].id, "b");
  EXPECT_TRUE((*registry)->ForSpiffeId("spiffe://example.org/nobody").empty());
}

}  // namespace
}  // namespace mandate::broker
