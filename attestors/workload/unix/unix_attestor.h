// The unix process attestor: turns a caller's pid into the selectors of DESIGN.md §3 by reading
// /proc (or an injected stand-in for it, so tests can use a fake process tree).
//
// Selectors produced, in this order:
//   unix:uid:<n> unix:gid:<n>         the EFFECTIVE ids ("Uid:"/"Gid:" second field): the kernel
//                                     decides what the process may do by its effective ids, so
//                                     they are the identity it acts with (a setuid program runs
//                                     with the file owner's rights). SPIRE's unix attestor also
//                                     uses the effective ids.
//   unix:user:<name> unix:group:<name>  names of those ids, only when the UserDb resolves them
//   unix:supplementary_gid:<n>        one per "Groups:" entry of /proc/<pid>/status
//   unix:path:<exe>                   readlink of <proc_root>/<pid>/exe, only when that path,
//                                     resolved in the attestor's own mount namespace, is the
//                                     very file (device, inode) the process runs: the link reads
//                                     as the path in the caller's namespace, where a private
//                                     bind mount can put any file at /usr/bin/<anything>.
//                                     Omitted (with a note) when the link ends in " (deleted)",
//                                     cannot be read, or names another file here
//   unix:sha256:<hex>                 SHA-256 of the file opened through <proc_root>/<pid>/exe;
//                                     omitted (with a note) when larger than max_hash_bytes,
//                                     when the executable is deleted, when hashing is disabled,
//                                     or, unless the digest is cached, when the caller's
//                                     HashNeed says no entry could use it or the uid is over
//                                     its hashing budget (HashBudget)
//   systemd:unit:<name>               the system service the process runs in (see
//                                     ParseSystemdUnits in proc_parsing.h for the rules)
//   systemd:user_unit:<name>          the per-user service, when under user@<uid>.service
// Every selector emitted passes spiffe::ValidateSelector; a value that would not (an odd user
// name from NSS, an exe path with control characters) is omitted with a note. Omitting a
// selector can only make fewer registration entries match, never more, so every "cannot tell"
// case omits rather than fails.
//
// pid reuse: the process's start time (field 22 of /proc/<pid>/stat) is read before and after
// everything else; if it changed, or differs from the caller-supplied expected start time, the
// pid now names a different process and attestation fails with PermissionDenied.
//
// Known limit (shared with SPIRE): execve() keeps the pid and start time, so path and sha256
// describe the program image at the moment of attestation. ProcessIdentity.exe_device/exe_inode
// name the image that was described, and ReadExecutable gives the image a process runs now, so
// the Workload API server can pin the image at connect and refuse a process that exec'd since
// (see broker/agent/caller_identity.h).
#ifndef MANDATE_ATTESTORS_WORKLOAD_UNIX_UNIX_ATTESTOR_H_
#define MANDATE_ATTESTORS_WORKLOAD_UNIX_UNIX_ATTESTOR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "attestors/workload/unix/exe_hash_cache.h"
#include "attestors/workload/unix/hash_budget.h"
#include "attestors/workload/unix/user_db.h"
#include "broker/common/spiffe/selector.h"

namespace mandate::unix_attestor {

struct UnixAttestorOptions {
  // Where the per-process directories live; tests point this at a fake tree.
  std::string proc_root = "/proc";
  // Executables larger than this are not hashed (unix:sha256 is omitted): hashing huge files on
  // demand is a denial-of-service lever. 64 MiB covers ordinary programs (statically linked Go
  // and Rust services are typically 10-60 MiB) at about 0.1-0.2 s of one core per hash.
  uint64_t max_hash_bytes = 64ull * 1024 * 1024;
  // Per effective uid: bytes that may be hashed at once, and how fast that budget comes back
  // (cache hits are free). The defaults allow four maximal hashes at once, then one 64 MiB
  // executable every 16 s. 0 burst disables the limit.
  uint64_t hash_burst_bytes_per_uid = 256ull * 1024 * 1024;
  uint64_t hash_refill_bytes_per_second = 4ull * 1024 * 1024;
  size_t hash_budget_max_uids = 4096;
  // The budget's clock (milliseconds, monotonic); empty for the real one. Tests inject it.
  HashBudget::NowMillis hash_budget_clock;
  // When false, unix:sha256 is never produced.
  bool hash_executables = true;
  // Number of executable digests remembered; 0 disables the cache.
  size_t hash_cache_capacity = 1024;
};

// Everything the attestor learned about one process. Empty strings mean "not known".
struct ProcessIdentity {
  int pid = 0;
  uint64_t start_time_ticks = 0;  // field 22 of /proc/<pid>/stat
  uint32_t uid = 0;               // effective uid
  uint32_t gid = 0;               // effective gid
  std::vector<uint32_t> supplementary_gids;
  std::string user_name;
  std::string group_name;
  std::string exe_path;        // only when it names the executable in our namespace
  std::string exe_sha256_hex;  // lowercase hex
  // The file the process runs (fstat of <proc_root>/<pid>/exe as opened); valid when exe_known.
  // Path and sha256 above describe exactly this file.
  bool exe_known = false;
  uint64_t exe_device = 0;
  uint64_t exe_inode = 0;
  std::string systemd_unit;
  std::string systemd_user_unit;
};

struct Attestation {
  ProcessIdentity identity;
  std::vector<spiffe::Selector> selectors;
  // Why expected selectors are missing (e.g. "executable is 300000000 bytes, over the 268435456
  // byte hash limit; unix:sha256 omitted"); for logs, never for decisions.
  std::vector<std::string> notes;
  // True when unix:sha256 was not computed only because the HashNeed said no entry needs it.
  bool hash_not_needed = false;
};

// The executable a process runs: device and inode of <proc_root>/<pid>/exe.
struct ExecutableFile {
  uint64_t device = 0;
  uint64_t inode = 0;
  friend bool operator==(const ExecutableFile&, const ExecutableFile&) = default;
};

// Decides, from the selectors a caller has without unix:sha256, whether any registration entry
// could match it once its unix:sha256 is known; only then is an executable whose digest is not
// cached hashed. Called at most once per attestation, from the attesting thread.
using HashNeed = std::function<bool(const std::vector<spiffe::Selector>& selectors_without_hash)>;

// Thread-safe: Attest may be called concurrently from many connection threads. Reads no global
// state except the files under proc_root and the UserDb.
class UnixAttestor {
 public:
  // `user_db` resolves names; when null the system database (SystemUserDb) is used.
  explicit UnixAttestor(UnixAttestorOptions options = {},
                        std::unique_ptr<UserDb> user_db = nullptr);
  UnixAttestor(const UnixAttestor&) = delete;
  UnixAttestor& operator=(const UnixAttestor&) = delete;

  // The selectors of process `pid` (see the file comment). `expected_start_time` is the start time
  // recorded when the caller connected (0 = do not check). Fails with:
  //   InvalidArgument   pid <= 0;
  //   PermissionDenied  "caller process no longer exists" / "process changed during attestation"
  //                     (start time differs between reads or from expected_start_time);
  //   other codes       /proc/<pid>/status or stat unreadable or malformed.
  absl::StatusOr<std::vector<spiffe::Selector>> Attest(int pid,
                                                       uint64_t expected_start_time = 0) const;
  // As Attest, also returning what was learned and why selectors were omitted.
  absl::StatusOr<Attestation> AttestDetailed(int pid, uint64_t expected_start_time = 0) const;
  // As AttestDetailed for a process the caller has pinned: it holds a pidfd for `pid` and checks
  // that the process is still alive after this returns, so the pid cannot have changed hands in
  // between. The start-time reads AttestDetailed brackets its reads with are then redundant and
  // skipped (they were a third of the cost of a Workload API call); identity.start_time_ticks is
  // left 0. Same errors as AttestDetailed, minus "process changed during attestation".
  // `need` (may be empty: always hash) limits hashing to callers an entry could use it for.
  absl::StatusOr<Attestation> AttestPinned(int pid, const HashNeed& need = nullptr) const;

  // The executable `pid` runs now (stat of <proc_root>/<pid>/exe, which follows the kernel's
  // link to the running image even when deleted). NotFound / PermissionDenied from stat.
  absl::StatusOr<ExecutableFile> ReadExecutable(int pid) const;

  // Field 22 (starttime, clock ticks since boot) of <proc_root>/<pid>/stat. NotFound when the
  // process does not exist; InvalidArgument when the file is malformed.
  absl::StatusOr<uint64_t> ReadStartTime(int pid) const;

  // Test-only observers of the digest cache.
  size_t HashCacheSizeForTesting() const { return hash_cache_.size(); }
  uint64_t HashComputationsForTesting() const { return hash_computations_.load(); }
  // Hashes skipped because the uid was over its budget.
  uint64_t HashesRateLimitedForTesting() const { return hashes_rate_limited_.load(); }

 private:
  // `status` from reading /proc/<pid>, or PermissionDenied "no longer exists" when the process
  // directory is gone (the one true reason behind whatever the read reported).
  absl::Status VanishedOr(int pid, absl::Status status) const;
  // Reads everything but the start time; `identity.pid` and `start_time_ticks` are preset.
  absl::Status Collect(Attestation& attestation, const HashNeed& need) const;
  // Opens the executable (returned; -1 when it cannot be) and fills exe_known/device/inode and,
  // when it names that file here, exe_path.
  int OpenExecutable(Attestation& attestation) const;
  // Fills exe_sha256_hex from the open executable `fd`: from the cache, else (when `need`
  // allows) by hashing within the uid's budget.
  void HashExecutable(int fd, const HashNeed& need, Attestation& attestation) const;
  void CollectSystemdUnits(Attestation& attestation) const;
  std::string ProcPath(int pid, const char* entry) const;

  const UnixAttestorOptions options_;
  const std::unique_ptr<UserDb> user_db_;
  mutable ExeHashCache hash_cache_;
  mutable HashBudget hash_budget_;
  mutable std::atomic<uint64_t> hash_computations_{0};
  mutable std::atomic<uint64_t> hashes_rate_limited_{0};
};

// The selectors for `identity`, in the order listed in the file comment; values that would fail
// spiffe::ValidateSelector are left out and explained in `notes` (which may be null).
std::vector<spiffe::Selector> SelectorsFor(const ProcessIdentity& identity,
                                           std::vector<std::string>* notes);

}  // namespace mandate::unix_attestor

#endif  // MANDATE_ATTESTORS_WORKLOAD_UNIX_UNIX_ATTESTOR_H_
