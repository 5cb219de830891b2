// The registration entries, held in memory for fast matching and kept in step with the store.
//
// Every entry write goes through here: the store is written first (so an acknowledged change is
// durable), then the in-memory index, then waiters are woken so agents' sync streams push a
// new snapshot at once. Node evictions and bans also bump the generation so that a node's
// stream notices them without polling.
//
// Thread-safety: all methods may be called concurrently.
#ifndef MANDATE_BROKER_SERVER_ENTRY_REGISTRY_H_
#define MANDATE_BROKER_SERVER_ENTRY_REGISTRY_H_

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "broker/common/store/store.h"

namespace mandate::broker {

class EntryRegistry {
 public:
  // Loads every entry from `store`, which must outlive the registry.
  static absl::StatusOr<std::unique_ptr<EntryRegistry>> Load(store::Store& store);

  absl::StatusOr<store::RegistrationEntry> Create(store::RegistrationEntry entry);
  absl::Status Delete(std::string_view id);
  absl::StatusOr<store::RegistrationEntry> Get(std::string_view id) const;
  // The entry `id` if its parent is node `node_id`; PermissionDenied otherwise, with the same
  // answer for an absent entry, so a node cannot probe other nodes' entries. IDs longer than
  // any the admin API makes are refused unread. The one check every node API call makes.
  absl::StatusOr<store::RegistrationEntry> GetAssigned(std::string_view node_id,
                                                       std::string_view id) const;
  std::vector<store::RegistrationEntry> List() const;
  // Entries whose parent is `node_id`.
  std::vector<store::RegistrationEntry> ForParent(std::string_view node_id) const;
  // Entries that issue `spiffe_id` (several nodes may run the same workload).
  std::vector<store::RegistrationEntry> ForSpiffeId(std::string_view spiffe_id) const;
  size_t size() const;

  // A counter bumped by every change that may alter what some node is allowed to serve.
  uint64_t generation() const;
  // Marks a change not visible in the entries themselves (node evicted or banned).
  void NotifyNodeChanged();
  // Blocks until generation() != `seen` or `timeout` passes; returns the current generation.
  uint64_t WaitForChange(uint64_t seen, std::chrono::milliseconds timeout) const;

 private:
  explicit EntryRegistry(store::Store& store) : store_(store) {}
  void BumpLocked();
  void IndexLocked(const store::RegistrationEntry& entry);
  void UnindexLocked(const store::RegistrationEntry& entry);
  std::vector<store::RegistrationEntry> LookupLocked(
      const std::multimap<std::string, std::string, std::less<>>& index,
      std::string_view key) const;

  store::Store& store_;
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::map<std::string, store::RegistrationEntry, std::less<>> by_id_;     // GUARDED_BY(mu_)
  std::multimap<std::string, std::string, std::less<>> ids_by_parent_;     // GUARDED_BY(mu_)
  std::multimap<std::string, std::string, std::less<>> ids_by_spiffe_id_;  // GUARDED_BY(mu_)
  uint64_t generation_ = 1;                                                // GUARDED_BY(mu_)
};

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_ENTRY_REGISTRY_H_
