#include "broker/server/entry_registry.h"

#include "absl/strings/str_cat.h"
#include "broker/common/log/log.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

void EraseIndexed(std::multimap<std::string, std::string, std::less<>>& index,
                  const std::string& key, const std::string& id) {
  auto range = index.equal_range(key);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == id) {
      index.erase(it);
      return;
    }
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<EntryRegistry>> EntryRegistry::Load(store::Store& store) {
  std::unique_ptr<EntryRegistry> registry(new EntryRegistry(store));
  ASSIGN_OR_RETURN(auto entries, store.ListEntries());
  std::lock_guard<std::mutex> lock(registry->mu_);
  for (auto& entry : entries) {
    registry->IndexLocked(entry);
    std::string id = entry.id;
    registry->by_id_.emplace(std::move(id), std::move(entry));
  }
  return registry;
}

absl::StatusOr<store::RegistrationEntry> EntryRegistry::Create(store::RegistrationEntry entry) {
  ASSIGN_OR_RETURN(store::RegistrationEntry stored, store_.CreateEntry(std::move(entry)));
  std::lock_guard<std::mutex> lock(mu_);
  if (auto old = by_id_.find(stored.id); old != by_id_.end()) UnindexLocked(old->second);
  IndexLocked(stored);
  by_id_[stored.id] = stored;
  BumpLocked();
  return stored;
}

absl::Status EntryRegistry::Delete(std::string_view id) {
  RETURN_IF_ERROR(store_.DeleteEntry(id));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = by_id_.find(id);
  if (it != by_id_.end()) {
    UnindexLocked(it->second);
    by_id_.erase(it);
  }
  BumpLocked();
  return absl::OkStatus();
}

absl::StatusOr<store::RegistrationEntry> EntryRegistry::GetAssigned(std::string_view node_id,
                                                                    std::string_view id) const {
  // Entry IDs are made by the admin API (a few dozen bytes).
  constexpr size_t kMaxEntryIdBytes = 128;
  if (id.size() > kMaxEntryIdBytes) {
    return absl::PermissionDeniedError(absl::StrCat(
        "registration entry IDs are at most ", kMaxEntryIdBytes, " bytes; no entry has this one"));
  }
  auto entry = Get(id);
  if (!entry.ok() || entry->parent_id != node_id) {
    return absl::PermissionDeniedError(absl::StrCat("registration entry ", log::EscapeForLog(id),
                                                    " is not assigned to this node"));
  }
  return entry;
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
  return LookupLocked(ids_by_parent_, node_id);
}

std::vector<store::RegistrationEntry> EntryRegistry::ForSpiffeId(std::string_view spiffe_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  return LookupLocked(ids_by_spiffe_id_, spiffe_id);
}

std::vector<store::RegistrationEntry> EntryRegistry::LookupLocked(
    const std::multimap<std::string, std::string, std::less<>>& index, std::string_view key) const {
  std::vector<store::RegistrationEntry> out;
  auto range = index.equal_range(key);
  for (auto it = range.first; it != range.second; ++it) {
    auto entry = by_id_.find(it->second);
    if (entry != by_id_.end()) out.push_back(entry->second);
  }
  return out;
}

void EntryRegistry::IndexLocked(const store::RegistrationEntry& entry) {
  ids_by_parent_.emplace(entry.parent_id, entry.id);
  ids_by_spiffe_id_.emplace(entry.spiffe_id, entry.id);
}

void EntryRegistry::UnindexLocked(const store::RegistrationEntry& entry) {
  EraseIndexed(ids_by_parent_, entry.parent_id, entry.id);
  EraseIndexed(ids_by_spiffe_id_, entry.spiffe_id, entry.id);
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
