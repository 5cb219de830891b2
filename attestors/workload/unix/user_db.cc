#include "attestors/workload/unix/user_db.h"

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace mandate::unix_attestor {
namespace {

// getpw*_r / getgr*_r report ERANGE when the buffer is too small; grow it up to this limit.
constexpr size_t kInitialBufferBytes = 4096;
constexpr size_t kMaxBufferBytes = 1 << 20;

// Calls `lookup(buffer, size, &found)` (returning an errno value) with growing buffers.
template <typename Entry, typename Lookup>
std::optional<std::string> LookupName(Lookup lookup) {
  std::vector<char> buffer(kInitialBufferBytes);
  while (true) {
    Entry entry{};
    Entry* found = nullptr;
    int error = lookup(&entry, buffer.data(), buffer.size(), &found);
    if (error == EINTR) {
      continue;
    }
    if (error == ERANGE && buffer.size() < kMaxBufferBytes) {
      buffer.resize(buffer.size() * 2);
      continue;
    }
    if (error != 0 || found == nullptr) {
      return std::nullopt;
    }
    if constexpr (std::is_same_v<Entry, passwd>) {
      if (found->pw_name == nullptr || found->pw_name[0] == '\0') return std::nullopt;
      return std::string(found->pw_name);
    } else {
      if (found->gr_name == nullptr || found->gr_name[0] == '\0') return std::nullopt;
      return std::string(found->gr_name);
    }
  }
}

template <typename Map>
std::optional<std::string> Find(const Map& map, uint32_t id) {
  auto it = map.find(id);
  if (it == map.end()) {
    return std::nullopt;
  }
  return it->second;
}

}  // namespace

std::optional<std::string> SystemUserDb::UserName(uint32_t uid) const {
  return LookupName<passwd>([uid](passwd* entry, char* buffer, size_t size, passwd** found) {
    return getpwuid_r(static_cast<uid_t>(uid), entry, buffer, size, found);
  });
}

std::optional<std::string> SystemUserDb::GroupName(uint32_t gid) const {
  return LookupName<group>([gid](group* entry, char* buffer, size_t size, group** found) {
    return getgrgid_r(static_cast<gid_t>(gid), entry, buffer, size, found);
  });
}

std::optional<std::string> MapUserDb::UserName(uint32_t uid) const { return Find(users_, uid); }

std::optional<std::string> MapUserDb::GroupName(uint32_t gid) const { return Find(groups_, gid); }

}  // namespace mandate::unix_attestor
