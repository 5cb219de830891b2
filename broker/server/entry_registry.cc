#include "broker/server/entry_registry.h"

#include "broker/common/util/status_macros.h"

namespace mandate::broker {

absl::StatusOr<std::unique_ptr<EntryRegistry>> EntryRegistry::Load(store::Store& store) {
  std::unique_ptr<EntryRegistry> registry(new EntryRegistry(store));
  ASSIGN_OR_RETURN(auto entries, store.ListEntries());
  std::lock_guard<std::mutex> lock(registry->mu_);
  for (auto& entry : entries) {
    registry->ids_by_parent_.emplace(entry.parent_id, entry.id);
    std::string id = entry.id;
    registry->by_id_.emplace(std::move(id), std::move(entry));
  }
  return registry;
}

absl::StatusOr<store::RegistrationEntry> EntryRegistry::Create(store::RegistrationEntry entry) {
  ASSIGN_OR_RETURN(store::RegistrationEntry stored, store_.CreateEntry(std::move(entry)));
  std::lock_guard<std::mutex> lock(mu_);
  ids_by_parent_.emplace(stored.parent_id, stored.id);
  by_id_[stored.id] = stored;
  BumpLocked();
  return stored;
}

absl::Status EntryRegistry::Delete(std::string_view id) {
  RETURN_IF_ERROR(store_.DeleteEntry(id));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = by_id_.find(id);
  if (it != by_id_.end()) {
    auto range = ids_by_parent_.equal_range(it->second.parent_id);
    for (auto p = range.first; p != range.second; ++p) {
      if (p->second == id) {
        ids_by_parent_.erase(p);
        break;
      }
    }
    by_id_.erase(it);
  }
  BumpLocked();
  return absl::OkStatus();
}

absl::StatusOr<store::RegistrationEntry> EntryRegistry::Get(std::string_view id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = by_id_.find(id);
  if (it == by_id_.end()) {
    return absl::NotFoundError(std::string("no registration entry with id ") + std::string(id));
  }
  return it->second;
}

std::vector<store::RegistrationEntry> EntryRegistry::List() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<store::RegistrationEntry> out;
  out.reserve(by_id_.size());
  for (const auto& [id, entry] : by_id_) out.push_back(entry);
  return out;
}

std::vector<store::RegistrationEntry> EntryRegistry::ForParent(std::string_view node_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<store::RegistrationEntry> out;
  auto range = ids_by_parent_.equal_range(node_id);
  for (auto it = range.first; it != range.second; ++it) {
    auto entry = by_id_.find(it->second);
    if (entry != by_id_.end()) out.push_back(entry->second);
  }
  return out;
}

size_t EntryRegistry::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return by_id_.size();
}

uint64_t EntryRegistry::generation() const {
  std::lock_guard<std::mutex> lock(mu_);
  return generation_;
}

void EntryRegistry::NotifyNodeChanged() {
  std::lock_guard<std::mutex> lock(mu_);
  BumpLocked();
}

void EntryRegistry::BumpLocked() {
  ++generation_;
  changed_.notify_all();
}

uint64_t EntryRegistry::WaitForChange(uint64_t seen, std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait_for(lock, timeout, [&] { return generation_ != seen; });
  return generation_;
}

}  // namespace mandate::broker
