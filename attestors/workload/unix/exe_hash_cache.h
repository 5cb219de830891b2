// A bounded, thread-safe cache of executable SHA-256 digests.
//
// Hashing a large binary on every Workload API call would be slow and a denial-of-service lever,
// so digests are cached. The key is everything that changes when the file's content can have
// changed: (device, inode, size, mtime, ctime) - never inode and mtime alone (DESIGN.md §10),
// because mtime can be set back with utimensat() after rewriting a file, while ctime cannot be set
// by unprivileged users and changes on every write. Inode numbers are reused after deletion, which
// the other fields guard against.
#ifndef MANDATE_ATTESTORS_WORKLOAD_UNIX_EXE_HASH_CACHE_H_
#define MANDATE_ATTESTORS_WORKLOAD_UNIX_EXE_HASH_CACHE_H_

#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace mandate::unix_attestor {

// What identifies one version of a file's content.
struct FileVersion {
  uint64_t device = 0;
  uint64_t inode = 0;
  int64_t size = 0;
  int64_t mtime_sec = 0;
  int64_t mtime_nsec = 0;
  int64_t ctime_sec = 0;
  int64_t ctime_nsec = 0;

  static FileVersion FromStat(const struct stat& st);

  friend bool operator==(const FileVersion&, const FileVersion&) = default;
  template <typename H>
  friend H AbslHashValue(H h, const FileVersion& v) {
    return H::combine(std::move(h), v.device, v.inode, v.size, v.mtime_sec, v.mtime_nsec,
                      v.ctime_sec, v.ctime_nsec);
  }
};

// Least-recently-used cache from FileVersion to lowercase hex SHA-256. All methods are
// thread-safe; a capacity of 0 disables caching.
class ExeHashCache {
 public:
  explicit ExeHashCache(size_t capacity) : capacity_(capacity) {}
  ExeHashCache(const ExeHashCache&) = delete;
  ExeHashCache& operator=(const ExeHashCache&) = delete;

  // The cached digest for `version`, marking it most recently used; nullopt on a miss.
  std::optional<std::string> Lookup(const FileVersion& version) ABSL_LOCKS_EXCLUDED(mu_);
  // Stores `sha256_hex`, evicting the least recently used entry when full.
  void Insert(const FileVersion& version, std::string sha256_hex) ABSL_LOCKS_EXCLUDED(mu_);
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  using Entry = std::pair<FileVersion, std::string>;

  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Entry> entries_ ABSL_GUARDED_BY(mu_);  // front = most recently used
  absl::flat_hash_map<FileVersion, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mandate::unix_attestor

#endif  // MANDATE_ATTESTORS_WORKLOAD_UNIX_EXE_HASH_CACHE_H_
