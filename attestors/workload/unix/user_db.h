// User and group name lookup for the unix attestor, behind an interface so tests need not depend
// on the machine's /etc/passwd or NSS configuration.
#ifndef MANDATE_ATTESTORS_WORKLOAD_UNIX_USER_DB_H_
#define MANDATE_ATTESTORS_WORKLOAD_UNIX_USER_DB_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>

namespace mandate::unix_attestor {

// Thread-safety: implementations must be safe to call concurrently from many threads.
class UserDb {
 public:
  virtual ~UserDb() = default;
  // The name of user `uid`, or nullopt when it has none (or the lookup failed).
  virtual std::optional<std::string> UserName(uint32_t uid) const = 0;
  // The name of group `gid`, or nullopt when it has none (or the lookup failed).
  virtual std::optional<std::string> GroupName(uint32_t gid) const = 0;
};

// The system's user database through NSS, via the reentrant getpwuid_r / getgrgid_r. A lookup may
// block on a remote directory service (LDAP, SSSD) when NSS is configured that way.
class SystemUserDb final : public UserDb {
 public:
  std::optional<std::string> UserName(uint32_t uid) const override;
  std::optional<std::string> GroupName(uint32_t gid) const override;
};

// Fixed maps, for tests and for hosts where names must not be resolved. Immutable after
// construction, hence thread-safe.
class MapUserDb final : public UserDb {
 public:
  MapUserDb(std::map<uint32_t, std::string> users, std::map<uint32_t, std::string> groups)
      : users_(std::move(users)), groups_(std::move(groups)) {}
  std::optional<std::string> UserName(uint32_t uid) const override;
  std::optional<std::string> GroupName(uint32_t gid) const override;

 private:
  const std::map<uint32_t, std::string> users_;
  const std::map<uint32_t, std::string> groups_;
};

}  // namespace mandate::unix_attestor

#endif  // MANDATE_ATTESTORS_WORKLOAD_UNIX_USER_DB_H_
