#include "broker/common/grpcutil/uds_listener.h"

#include <fcntl.h>
#include <grpcpp/server.h>
#include <grpcpp/server_context.h>
#include <grpcpp/server_posix.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <iterator>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77  // Linux >= 6.5; glibc 2.36 lacks the define.
#endif

namespace mandate::grpcutil {
namespace {

int OpenPidfd(int conn_fd, pid_t pid, bool* from_socket) {
  int pidfd = -1;
  socklen_t len = sizeof(pidfd);
  if (::getsockopt(conn_fd, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0 && pidfd >= 0) {
    *from_socket = true;
    return pidfd;
  }
  *from_socket = false;
  // Only a kernel without SO_PEERPIDFD may fall back to pidfd_open: any other failure (the peer
  // already exited, ESRCH) must leave us without a pidfd, which refuses the caller.
  if (errno != ENOPROTOOPT && errno != EINVAL) return -1;
  // Older kernels (< 6.5): the process may have exited and its pid been reused between
  // connect() and here, and nothing detects that (no start time is known from connect() to
  // compare with). Another uid's process under that pid is refused later (its uid/gid differ
  // from SO_PEERCRED); a same-uid one is not (docs/threat-model.md).
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  return fd >= 0 ? fd : -1;
}

}  // namespace

ConnectionCaps CapsForFileLimit(uint64_t open_files_limit) {
  constexpr uint64_t kMaxTotal = 4096;
  constexpr uint64_t kMaxPerUid = 512;
  uint64_t reserve = std::max<uint64_t>(64, open_files_limit / 8);
  uint64_t total = open_files_limit > reserve ? (open_files_limit - reserve) / 2 : 1;
  total = std::clamp<uint64_t>(total, 1, kMaxTotal);
  uint64_t per_uid = std::clamp<uint64_t>(total / 4, 1, kMaxPerUid);
  return {static_cast<size_t>(total), static_cast<size_t>(per_uid)};
}

bool PidfdAlive(int pidfd) {
  if (pidfd < 0) return false;
  // A pidfd becomes readable when its process exits.
  pollfd p{pidfd, POLLIN, 0};
  int rc = ::poll(&p, 1, 0);
  return rc == 0;
}

absl::StatusOr<std::unique_ptr<UdsListener>> UdsListener::Start(grpc::Server* server,
                                                                const std::string& path,
                                                                unsigned mode, AcceptFilter filter,
                                                                StartTimeReader start_time_reader) {
  Options options;
  options.filter = std::move(filter);
  options.start_time_reader = std::move(start_time_reader);
  return Start(server, path, mode, std::move(options));
}

absl::StatusOr<std::unique_ptr<UdsListener>> UdsListener::Start(grpc::Server* server,
                                                                const std::string& path,
                                                                unsigned mode, Options options) {
  if (options.max_connections == 0 || options.max_connections_per_uid == 0) {
    rlimit limit{};
    uint64_t soft = ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
                        ? limit.rlim_cur
                        : 1024;
    ConnectionCaps caps = CapsForFileLimit(soft);
    if (options.max_connections == 0) options.max_connections = caps.total;
    if (options.max_connections_per_uid == 0) options.max_connections_per_uid = caps.per_uid;
  }
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("socket path must be 1-", sizeof(addr.sun_path) - 1, " bytes: ", path));
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " exists and is not a socket; refusing to replace it"));
    }
    ::unlink(path.c_str());
  }
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  // The socket appears with the process umask and gets its mode right after; connections in
  // between are still identified and filtered, so the window grants nothing. (Changing the
  // umask here would race with files other threads create.)
  int rc = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int bind_errno = errno;
  if (rc != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("bind ", path, ": ", std::strerror(bind_errno)));
  }
  if (::chmod(path.c_str(), mode) != 0 || ::listen(fd, 512) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(path.c_str());
    return absl::InternalError(absl::StrCat("listen ", path, ": ", std::strerror(err)));
  }
  std::unique_ptr<UdsListener> listener(new UdsListener(server, path, fd, std::move(options)));
  listener->accept_thread_ = std::thread([l = listener.get()] { l->AcceptLoop(); });
  return listener;
}

UdsListener::UdsListener(grpc::Server* server, std::string path, int listen_fd, Options options)
    : server_(server),
      path_(std::move(path)),
      listen_fd_(listen_fd),
      options_(std::move(options)),
      max_connections_(options_.max_connections),
      max_connections_per_uid_(options_.max_connections_per_uid) {}

UdsListener::~UdsListener() {
  Stop();
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [fd, conn] : connections_) {
    if (conn.creds.pidfd >= 0) ::close(conn.creds.pidfd);
  }
  connections_.clear();
}

void UdsListener::Stop() {
  if (stopped_.exchange(true)) return;
  ::shutdown(listen_fd_, SHUT_RDWR);
  if (accept_thread_.joinable()) accept_thread_.join();
  ::close(listen_fd_);
  ::unlink(path_.c_str());
}

void UdsListener::PinPeer(int conn, const ucred& cred, PeerCredentials& creds) const {
  creds.pid = cred.pid;
  creds.uid = cred.uid;
  creds.gid = cred.gid;
  creds.pidfd = OpenPidfd(conn, cred.pid, &creds.pidfd_from_socket);
  // The executable, as close to connect() as we get: what the process runs now is what later
  // calls are held to. It belongs to the process that connected only if that process is still
  // alive once it has been read (its pidfd pins the pid: no reuse while it lives).
  if (options_.executable_reader && creds.pidfd >= 0) {
    auto exe = options_.executable_reader(cred.pid);
    if (exe.ok() && PidfdAlive(creds.pidfd)) {
      creds.exe_pinned = true;
      creds.exe = *exe;
    }
  }
}

void UdsListener::ForgetLocked(std::map<int, Connection>::iterator it) {
  if (it->second.creds.pidfd >= 0) ::close(it->second.creds.pidfd);
  auto from_uid = per_uid_.find(it->second.creds.uid);
  if (from_uid != per_uid_.end() && --from_uid->second.open == 0) per_uid_.erase(from_uid);
  connections_.erase(it);
}

UdsListener::CapCheck UdsListener::CheckCapsLocked(uid_t uid) const {
  auto from_uid = per_uid_.find(uid);
  return {.over_total = connections_.size() >= max_connections_,
          .over_uid = from_uid != per_uid_.end() &&
                      from_uid->second.open >= max_connections_per_uid_.load()};
}

bool UdsListener::PruneDueLocked(const CapCheck& over, uid_t uid, Clock::time_point now) const {
  // At the global cap every record is pruned (the uid's too); at the uid's cap only its own.
  if (over.over_total) return now - last_full_prune_ >= kPruneInterval;
  auto from_uid = per_uid_.find(uid);
  return from_uid == per_uid_.end() || now - from_uid->second.last_prune >= kPruneInterval;
}

void UdsListener::AcceptLoop() {
  while (!stopped_.load()) {
    int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (conn < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopped_.load()) break;  // shutdown(listen_fd_) ends the loop.
      // Out of descriptors or memory, or a transient network error: back off instead of
      // spinning, and keep serving.
      ::usleep(10000);
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
      ::close(conn);
      continue;
    }
    // Every connection waiting behind this one waits for what is done here, and an exec in
    // that wait is attested as the exec'd program: refuse a connection over a cap with no
    // more than this counter lookup (no /proc read, no pidfd, no prune), and for the others
    // pin the executable before any other work.
    CapCheck over;
    bool refused_at_once = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // accept4 handed out this fd number, so the connection recorded under it is closed.
      if (auto it = connections_.find(conn); it != connections_.end()) ForgetLocked(it);
      over = CheckCapsLocked(cred.uid);
      refused_at_once = over.any() && !PruneDueLocked(over, cred.uid, Clock::now());
    }
    if (refused_at_once) {
      ::close(conn);
      continue;
    }
    Connection c;
    PinPeer(conn, cred, c.creds);
    auto refuse = [&] {
      if (c.creds.pidfd >= 0) ::close(c.creds.pidfd);
      ::close(conn);
    };
    struct stat st {};
    if (::fstat(conn, &st) != 0 || (options_.filter && !options_.filter(c.creds))) {
      refuse();
      continue;
    }
    c.inode = st.st_ino;
    if (options_.start_time_reader) {
      if (auto start = options_.start_time_reader(cred.pid); start.ok())
        c.creds.start_time = *start;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (over.any()) {
        // Closed connections are noticed only here, when a cap would refuse (at most once per
        // kPruneInterval for the uid, and for everyone together), so a uid hammering its cap
        // costs the loop one prune of its own records per interval.
        const Clock::time_point now = Clock::now();
        if (over.over_total) {
          PruneClosedLocked(std::nullopt);
          last_full_prune_ = now;
        } else {
          PruneClosedLocked(cred.uid);
        }
        if (auto from_uid = per_uid_.find(cred.uid); from_uid != per_uid_.end()) {
          from_uid->second.last_prune = now;
        }
        if (CheckCapsLocked(cred.uid).any()) {
          refuse();
          continue;
        }
      }
      ++per_uid_[cred.uid].open;
      connections_[conn] = c;
    }
    grpc::AddInsecureChannelFromFd(server_, conn);  // gRPC owns `conn` from here on.
  }
}

void UdsListener::PruneClosedLocked(std::optional<uid_t> only_uid) {
  // gRPC closes connections without telling us; an fd that is gone or now names another file
  // is a closed connection whose record (and pidfd) can go.
  for (auto it = connections_.begin(); it != connections_.end();) {
    auto next = std::next(it);
    if (!only_uid.has_value() || it->second.creds.uid == *only_uid) {
      struct stat st {};
      if (::fstat(it->first, &st) != 0 || st.st_ino != it->second.inode) ForgetLocked(it);
    }
    it = next;
  }
}

absl::StatusOr<PeerCredentials> UdsListener::PeerOf(const grpc::ServerContext& context) const {
  std::string peer = context.peer();
  int fd = -1;
  if (!peer.starts_with("fd:") || !absl::SimpleAtoi(peer.substr(3), &fd) || fd < 0) {
    return absl::UnauthenticatedError("call did not arrive on the attested Unix socket");
  }
  // The fd number is only meaningful while this call is alive; confirm it is still the
  // connection that was accepted (same socket inode) and that its peer did not change.
  struct stat st {};
  ucred live{};
  socklen_t len = sizeof(live);
  if (::fstat(fd, &st) != 0 || ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &live, &len) != 0) {
    return absl::UnauthenticatedError("caller connection is gone");
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = connections_.find(fd);
  if (it == connections_.end() || it->second.inode != st.st_ino ||
      it->second.creds.pid != live.pid || it->second.creds.uid != live.uid) {
    return absl::UnauthenticatedError("caller connection cannot be matched to its credentials");
  }
  return it->second.creds;
}

}  // namespace mandate::grpcutil
