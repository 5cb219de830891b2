#include "broker/common/grpcutil/uds_listener.h"

#include <fcntl.h>
#include <grpcpp/server.h>
#include <grpcpp/server_context.h>
#include <grpcpp/server_posix.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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
  // Older kernels: the process may have exited (and its pid been reused) between connect() and
  // here; the start time taken right after is re-checked after attestation.
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  return fd >= 0 ? fd : -1;
}

}  // namespace

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
  std::unique_ptr<UdsListener> listener(
      new UdsListener(server, path, fd, std::move(filter), std::move(start_time_reader)));
  listener->accept_thread_ = std::thread([l = listener.get()] { l->AcceptLoop(); });
  return listener;
}

UdsListener::UdsListener(grpc::Server* server, std::string path, int listen_fd, AcceptFilter filter,
                         StartTimeReader start_time_reader)
    : server_(server),
      path_(std::move(path)),
      listen_fd_(listen_fd),
      filter_(std::move(filter)),
      start_time_reader_(std::move(start_time_reader)) {}

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
    Connection c;
    ucred cred{};
    socklen_t len = sizeof(cred);
    struct stat st {};
    if (::getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || ::fstat(conn, &st) != 0) {
      ::close(conn);
      continue;
    }
    c.creds.pid = cred.pid;
    c.creds.uid = cred.uid;
    c.creds.gid = cred.gid;
    c.creds.pidfd = OpenPidfd(conn, cred.pid, &c.creds.pidfd_from_socket);
    c.inode = st.st_ino;
    if (start_time_reader_) {
      if (auto start = start_time_reader_(cred.pid); start.ok()) c.creds.start_time = *start;
    }
    if (filter_ && !filter_(c.creds)) {
      if (c.creds.pidfd >= 0) ::close(c.creds.pidfd);
      ::close(conn);
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = connections_.find(conn);
      if (it != connections_.end() && it->second.creds.pidfd >= 0) ::close(it->second.creds.pidfd);
      connections_.erase(conn);
      PruneClosedLocked();
      size_t from_uid = 0;
      for (const auto& [fd, other] : connections_) from_uid += other.creds.uid == cred.uid;
      if (from_uid >= max_connections_per_uid_.load()) {
        // One local user must not exhaust the daemon's descriptors for everyone else.
        if (c.creds.pidfd >= 0) ::close(c.creds.pidfd);
        ::close(conn);
        continue;
      }
      connections_[conn] = c;
    }
    grpc::AddInsecureChannelFromFd(server_, conn);  // gRPC owns `conn` from here on.
  }
}

void UdsListener::PruneClosedLocked() {
  // gRPC closes connections without telling us; an fd that is gone or now names another file
  // is a closed connection whose record (and pidfd) can go.
  for (auto it = connections_.begin(); it != connections_.end();) {
    struct stat st {};
    if (::fstat(it->first, &st) != 0 || st.st_ino != it->second.inode) {
      if (it->second.creds.pidfd >= 0) ::close(it->second.creds.pidfd);
      it = connections_.erase(it);
    } else {
      ++it;
    }
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
