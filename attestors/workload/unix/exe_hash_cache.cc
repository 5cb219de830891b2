#include "attestors/workload/unix/exe_hash_cache.h"

#include <sys/stat.h>

#include <optional>
#include <string>
#include <utility>

#include "absl/synchronization/mutex.h"

namespace mandate::unix_attestor {

FileVersion FileVersion::FromStat(const struct stat& st) {
  FileVersion version;
  version.device = static_cast<uint64_t>(st.st_dev);
  version.inode = static_cast<uint64_t>(st.st_ino);
  version.size = static_cast<int64_t>(st.st_size);
  version.mtime_sec = static_cast<int64_t>(st.st_mtim.tv_sec);
  version.mtime_nsec = static_cast<int64_t>(st.st_mtim.tv_nsec);
  version.ctime_sec = static_cast<int64_t>(st.st_ctim.tv_sec);
  version.ctime_nsec = static_cast<int64_t>(st.st_ctim.tv_nsec);
  return version;
}

std::optional<std::string> ExeHashCache::Lookup(const FileVersion& version) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(version);
  if (it == index_.end()) {
    return std::nullopt;
  }
  entries_.splice(entries_.begin(), entries_, it->second);
  return it->second->second;
}

void ExeHashCache::Insert(const FileVersion& version, std::string sha256_hex) {
  if (capacity_ == 0) {
    return;
  }
  absl::MutexLock lock(&mu_);
  auto it = index_.find(version);
  if (it != index_.end()) {
    // Two threads hashed the same file at once; keep one entry.
    it->second->second = std::move(sha256_hex);
    entries_.splice(entries_.begin(), entries_, it->second);
    return;
  }
  if (entries_.size() >= capacity_) {
    index_.erase(entries_.back().first);
    entries_.pop_back();
  }
  entries_.emplace_front(version, std::move(sha256_hex));
  index_.emplace(version, entries_.begin());
}

size_t ExeHashCache::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

}  // namespace mandate::unix_attestor
