#include "attestors/workload/unix/unix_attestor.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "attestors/workload/unix/proc_parsing.h"
#include "broker/common/util/status_macros.h"

namespace mandate::unix_attestor {
namespace {

using ::mandate::spiffe::Selector;

// /proc/<pid>/status is about 1.5 KiB, but "Groups:" may list up to 65536 gids.
constexpr size_t kMaxStatusBytes = 1024 * 1024;
// /proc/<pid>/stat is a few hundred bytes; /proc/<pid>/cgroup a line per v1 hierarchy.
constexpr size_t kMaxStatBytes = 64 * 1024;
constexpr size_t kMaxCgroupBytes = 64 * 1024;
// PATH_MAX plus room for the " (deleted)" suffix; a link filling the buffer counts as truncated.
constexpr size_t kMaxExeLinkBytes = 4096 + 64;
constexpr size_t kReadChunkBytes = 64 * 1024;

constexpr absl::string_view kDeletedSuffix = " (deleted)";

// A file descriptor closed on scope exit.
class ScopedFd {
 public:
  explicit ScopedFd(int fd) : fd_(fd) {}
  ~ScopedFd() {
    if (fd_ >= 0) {
      close(fd_);
    }
  }
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  int get() const { return fd_; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

absl::Status ErrnoStatus(int error, absl::string_view what) {
  std::string message = absl::StrCat(what, ": ", std::strerror(error));
  switch (error) {
    case ENOENT:
    case ESRCH:
    case ENOTDIR:
      return absl::NotFoundError(message);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(message);
    default:
      return absl::InternalError(message);
  }
}

// Reads a whole file, refusing more than `max_bytes`. /proc files report size 0, so this reads
// until end of file rather than trusting fstat.
absl::StatusOr<std::string> ReadBoundedFile(const std::string& path, size_t max_bytes) {
  ScopedFd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  if (fd.get() < 0) {
    return ErrnoStatus(errno, absl::StrCat("cannot open ", path));
  }
  std::string content;
  std::array<char, 4096> buffer;
  while (true) {
    ssize_t n = read(fd.get(), buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return ErrnoStatus(errno, absl::StrCat("cannot read ", path));
    }
    if (n == 0) {
      return content;
    }
    if (content.size() + static_cast<size_t>(n) > max_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat(path, " is larger than the ", max_bytes, " bytes allowed"));
    }
    content.append(buffer.data(), static_cast<size_t>(n));
  }
}

struct EvpMdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

// Lowercase hex SHA-256 of everything readable from `fd`, refusing more than `max_bytes`.
absl::StatusOr<std::string> Sha256OfFd(int fd, uint64_t max_bytes) {
  std::unique_ptr<EVP_MD_CTX, EvpMdCtxDeleter> ctx(EVP_MD_CTX_new());
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("cannot initialise SHA-256");
  }
  std::vector<unsigned char> buffer(kReadChunkBytes);
  uint64_t total = 0;
  while (true) {
    ssize_t n = read(fd, buffer.data(), buffer.size());
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return ErrnoStatus(errno, "cannot read executable");
    }
    if (n == 0) {
      break;
    }
    total += static_cast<uint64_t>(n);
    if (total > max_bytes) {
      return absl::ResourceExhaustedError("executable grew past the hash limit while hashing");
    }
    if (EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(n)) != 1) {
      return absl::InternalError("SHA-256 update failed");
    }
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int digest_len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), digest, &digest_len) != 1 || digest_len != 32) {
    return absl::InternalError("SHA-256 finalisation failed");
  }
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), digest_len));
}

void AddIfValid(std::vector<Selector>& selectors, std::vector<std::string>* notes, std::string type,
                std::string value) {
  Selector selector{std::move(type), std::move(value)};
  absl::Status status = spiffe::ValidateSelector(selector);
  if (!status.ok()) {
    if (notes != nullptr) {
      notes->push_back(absl::StrCat("omitted: ", status.message()));
    }
    return;
  }
  selectors.push_back(std::move(selector));
}

}  // namespace

std::vector<Selector> SelectorsFor(const ProcessIdentity& identity,
                                   std::vector<std::string>* notes) {
  std::vector<Selector> selectors;
  AddIfValid(selectors, notes, "unix", absl::StrCat("uid:", identity.uid));
  AddIfValid(selectors, notes, "unix", absl::StrCat("gid:", identity.gid));
  if (!identity.user_name.empty()) {
    AddIfValid(selectors, notes, "unix", absl::StrCat("user:", identity.user_name));
  }
  if (!identity.group_name.empty()) {
    AddIfValid(selectors, notes, "unix", absl::StrCat("group:", identity.group_name));
  }
  for (uint32_t gid : identity.supplementary_gids) {
    AddIfValid(selectors, notes, "unix", absl::StrCat("supplementary_gid:", gid));
  }
  if (!identity.exe_path.empty()) {
    AddIfValid(selectors, notes, "unix", absl::StrCat("path:", identity.exe_path));
  }
  if (!identity.exe_sha256_hex.empty()) {
    AddIfValid(selectors, notes, "unix", absl::StrCat("sha256:", identity.exe_sha256_hex));
  }
  if (!identity.systemd_unit.empty()) {
    AddIfValid(selectors, notes, "systemd", absl::StrCat("unit:", identity.systemd_unit));
  }
  if (!identity.systemd_user_unit.empty()) {
    AddIfValid(selectors, notes, "systemd", absl::StrCat("user_unit:", identity.systemd_user_unit));
  }
  return selectors;
}

UnixAttestor::UnixAttestor(UnixAttestorOptions options, std::unique_ptr<UserDb> user_db)
    : options_(std::move(options)),
      user_db_(user_db != nullptr ? std::move(user_db) : std::make_unique<SystemUserDb>()),
      hash_cache_(options_.hash_cache_capacity),
      hash_budget_(options_.hash_burst_bytes_per_uid, options_.hash_refill_bytes_per_second,
                   options_.hash_budget_max_uids, options_.hash_budget_clock) {}

std::string UnixAttestor::ProcPath(int pid, const char* entry) const {
  return absl::StrCat(options_.proc_root, "/", pid, "/", entry);
}

absl::StatusOr<uint64_t> UnixAttestor::ReadStartTime(int pid) const {
  if (pid <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid pid ", pid));
  }
  std::string path = ProcPath(pid, "stat");
  ASSIGN_OR_RETURN(std::string content, ReadBoundedFile(path, kMaxStatBytes));
  absl::StatusOr<uint64_t> start_time = ParseStatStartTime(content);
  if (!start_time.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", path, ": ", start_time.status().message()));
  }
  return *start_time;
}

absl::StatusOr<std::vector<Selector>> UnixAttestor::Attest(int pid,
                                                           uint64_t expected_start_time) const {
  ASSIGN_OR_RETURN(Attestation attestation, AttestDetailed(pid, expected_start_time));
  return std::move(attestation.selectors);
}

absl::Status UnixAttestor::VanishedOr(int pid, absl::Status status) const {
  // A process that exits mid-read can make a read fail in ways other than ENOENT (ESRCH, short
  // content); whenever its directory is gone, report the one true reason.
  if (absl::IsNotFound(status) || access(ProcPath(pid, "").c_str(), F_OK) != 0) {
    return absl::PermissionDeniedError(absl::StrCat("caller process ", pid, " no longer exists"));
  }
  return status;
}

absl::StatusOr<ExecutableFile> UnixAttestor::ReadExecutable(int pid) const {
  if (pid <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid pid ", pid));
  }
  std::string link = ProcPath(pid, "exe");
  struct stat st {};
  if (stat(link.c_str(), &st) != 0) {
    return ErrnoStatus(errno, absl::StrCat("cannot stat ", link));
  }
  return ExecutableFile{static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
}

absl::StatusOr<Attestation> UnixAttestor::AttestPinned(int pid, const HashNeed& need) const {
  if (pid <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid pid ", pid));
  }
  Attestation attestation;
  attestation.identity.pid = pid;
  if (absl::Status collected = Collect(attestation, need); !collected.ok()) {
    return VanishedOr(pid, collected);
  }
  return attestation;
}

absl::StatusOr<Attestation> UnixAttestor::AttestDetailed(int pid,
                                                         uint64_t expected_start_time) const {
  if (pid <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("invalid pid ", pid));
  }
  auto vanished_or = [&](absl::Status status) { return VanishedOr(pid, std::move(status)); };

  absl::StatusOr<uint64_t> before = ReadStartTime(pid);
  if (!before.ok()) {
    return vanished_or(before.status());
  }
  if (expected_start_time != 0 && *before != expected_start_time) {
    return absl::PermissionDeniedError(absl::StrCat(
        "process changed during attestation: pid ", pid, " has start time ", *before,
        " but the caller's process had start time ", expected_start_time, " (the pid was reused)"));
  }

  Attestation attestation;
  attestation.identity.pid = pid;
  attestation.identity.start_time_ticks = *before;
  absl::Status collected = Collect(attestation, nullptr);

  // Re-check even when collection failed: if the pid changed hands, that is the real reason.
  absl::StatusOr<uint64_t> after = ReadStartTime(pid);
  if (!after.ok()) {
    return vanished_or(after.status());
  }
  if (*after != *before) {
    return absl::PermissionDeniedError(absl::StrCat("process changed during attestation: pid ", pid,
                                                    " start time went from ", *before, " to ",
                                                    *after, " (the pid was reused)"));
  }
  if (!collected.ok()) {
    return vanished_or(collected);
  }
  return attestation;
}

absl::Status UnixAttestor::Collect(Attestation& attestation, const HashNeed& need) const {
  ProcessIdentity& identity = attestation.identity;
  std::string status_path = ProcPath(identity.pid, "status");
  ASSIGN_OR_RETURN(std::string status_content, ReadBoundedFile(status_path, kMaxStatusBytes));
  absl::StatusOr<StatusIds> ids = ParseStatusIds(status_content);
  if (!ids.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed ", status_path, ": ", ids.status().message()));
  }
  identity.uid = ids->effective_uid;
  identity.gid = ids->effective_gid;
  identity.supplementary_gids = std::move(ids->supplementary_gids);
  identity.user_name = user_db_->UserName(identity.uid).value_or("");
  identity.group_name = user_db_->GroupName(identity.gid).value_or("");

  CollectSystemdUnits(attestation);
  ScopedFd exe(OpenExecutable(attestation));
  if (exe.get() >= 0 && options_.hash_executables) HashExecutable(exe.get(), need, attestation);
  attestation.selectors = SelectorsFor(identity, &attestation.notes);
  return absl::OkStatus();
}

void UnixAttestor::CollectSystemdUnits(Attestation& attestation) const {
  absl::StatusOr<std::string> content =
      ReadBoundedFile(ProcPath(attestation.identity.pid, "cgroup"), kMaxCgroupBytes);
  if (!content.ok()) {
    attestation.notes.push_back(
        absl::StrCat("systemd selectors omitted: ", content.status().message()));
    return;
  }
  absl::StatusOr<SystemdUnits> units = ParseSystemdUnits(*content);
  if (!units.ok()) {
    attestation.notes.push_back(
        absl::StrCat("systemd selectors omitted: ", units.status().message()));
    return;
  }
  attestation.identity.systemd_unit = std::move(units->unit);
  attestation.identity.systemd_user_unit = std::move(units->user_unit);
}

int UnixAttestor::OpenExecutable(Attestation& attestation) const {
  ProcessIdentity& identity = attestation.identity;
  std::vector<std::string>& notes = attestation.notes;
  std::string link = ProcPath(identity.pid, "exe");

  std::vector<char> target(kMaxExeLinkBytes);
  ssize_t length = readlink(link.c_str(), target.data(), target.size());
  int readlink_errno = errno;
  // Open through the exe link, not the path: it names the very inode the process runs even if
  // the path has since been re-pointed, was deleted, or exists only in the caller's mount
  // namespace.
  ScopedFd fd(open(link.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  int open_errno = errno;
  struct stat running {};
  if (fd.get() >= 0 && fstat(fd.get(), &running) == 0) {
    identity.exe_known = true;
    identity.exe_device = static_cast<uint64_t>(running.st_dev);
    identity.exe_inode = static_cast<uint64_t>(running.st_ino);
  }
  if (length < 0) {
    // Kernel threads have no executable; other users' processes need ptrace access.
    notes.push_back(absl::StrCat("unix:path and unix:sha256 omitted: cannot read ", link, ": ",
                                 std::strerror(readlink_errno)));
    return -1;
  }
  if (static_cast<size_t>(length) >= target.size()) {
    notes.push_back(
        absl::StrCat("unix:path and unix:sha256 omitted: ", link, " target is too long"));
    return -1;
  }
  std::string exe_path(target.data(), static_cast<size_t>(length));
  if (absl::EndsWith(exe_path, kDeletedSuffix)) {
    // The file the process runs was deleted or replaced (e.g. by a package upgrade): no path names
    // it any more, and hashing whatever now sits at that path would describe another program.
    notes.push_back(absl::StrCat("unix:path and unix:sha256 omitted: executable \"",
                                 absl::CHexEscape(exe_path), "\" was deleted or replaced"));
    return -1;
  }
  if (!identity.exe_known) {
    notes.push_back(absl::StrCat("unix:path and unix:sha256 omitted: cannot open ", link, ": ",
                                 std::strerror(open_errno)));
    return -1;
  }
  // The link reads as the path in the caller's mount namespace. Only when that path, looked up
  // here, is the same file does it say anything an entry may rely on; a private bind mount (or
  // an exec between the open and the readlink above) fails this test.
  struct stat here {};
  if (stat(exe_path.c_str(), &here) != 0 || here.st_dev != running.st_dev ||
      here.st_ino != running.st_ino) {
    notes.push_back(
        absl::StrCat("unix:path omitted: \"", absl::CHexEscape(exe_path),
                     "\" is not the running executable in the agent's mount namespace"));
  } else {
    identity.exe_path = std::move(exe_path);
  }
  if (!S_ISREG(running.st_mode)) {
    notes.push_back("unix:sha256 omitted: executable is not a regular file");
    return -1;
  }
  return fd.release();
}

void UnixAttestor::HashExecutable(int fd, const HashNeed& need, Attestation& attestation) const {
  ProcessIdentity& identity = attestation.identity;
  std::vector<std::string>& notes = attestation.notes;
  struct stat before {};
  if (fstat(fd, &before) != 0) {
    notes.push_back(
        absl::StrCat("unix:sha256 omitted: cannot stat executable: ", std::strerror(errno)));
    return;
  }
  if (static_cast<uint64_t>(before.st_size) > options_.max_hash_bytes) {
    notes.push_back(absl::StrCat("unix:sha256 omitted: executable is ", before.st_size,
                                 " bytes, over the ", options_.max_hash_bytes, " byte hash limit"));
    return;
  }
  FileVersion version = FileVersion::FromStat(before);
  if (std::optional<std::string> cached = hash_cache_.Lookup(version); cached.has_value()) {
    identity.exe_sha256_hex = std::move(*cached);
    return;
  }
  // A known digest costs nothing to state; a new one is computed only when it can matter.
  if (need && !need(SelectorsFor(identity, nullptr))) {
    // Nothing registered could match this caller whatever its digest: hashing would only be
    // work an unregistered caller can make us do.
    attestation.hash_not_needed = true;
    notes.push_back("unix:sha256 not computed: no registration entry needs it");
    return;
  }
  // Every miss costs a read of the whole file; a caller that keeps changing its executable
  // (touch, rewrite) pays from its uid's budget.
  if (!hash_budget_.TryConsume(identity.uid, static_cast<uint64_t>(before.st_size))) {
    hashes_rate_limited_.fetch_add(1);
    notes.push_back(absl::StrCat("unix:sha256 omitted: uid ", identity.uid,
                                 " is over its executable hashing budget"));
    return;
  }
  hash_computations_.fetch_add(1);
  absl::StatusOr<std::string> digest = Sha256OfFd(fd, options_.max_hash_bytes);
  if (!digest.ok()) {
    notes.push_back(absl::StrCat("unix:sha256 omitted: ", digest.status().message()));
    return;
  }
  struct stat after {};
  if (fstat(fd, &after) != 0 || !(FileVersion::FromStat(after) == version)) {
    // Written to while we read it: the digest may mix two versions.
    notes.push_back("unix:sha256 omitted: executable changed while it was being hashed");
    return;
  }
  hash_cache_.Insert(version, *digest);
  identity.exe_sha256_hex = std::move(*digest);
}

}  // namespace mandate::unix_attestor
