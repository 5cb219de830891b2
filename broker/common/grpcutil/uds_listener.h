// A Unix-socket listener for gRPC servers that knows who is calling.
//
// gRPC's own Unix-socket listener gives handlers no peer credentials, so this class owns the
// listening socket, accepts connections itself, records each caller's credentials (SO_PEERCRED)
// and a pidfd (SO_PEERPIDFD, or pidfd_open on older kernels) at accept time, and only then hands
// the connection to gRPC with AddInsecureChannelFromFd. Handlers call PeerOf(context) to learn
// who is on the other end.
//
// Thread-safety: PeerOf may be called concurrently from any handler thread.
#ifndef MANDATE_BROKER_COMMON_GRPCUTIL_UDS_LISTENER_H_
#define MANDATE_BROKER_COMMON_GRPCUTIL_UDS_LISTENER_H_

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace grpc {
class Server;
class ServerContext;
}  // namespace grpc

namespace mandate::grpcutil {

// Credentials of the process at the other end of a connection, captured when it was accepted.
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  // A pidfd for `pid`, owned by the listener; -1 when none could be opened. Valid only during
  // the RPC that obtained it.
  int pidfd = -1;
  // True when the pidfd came from SO_PEERPIDFD (race-free: the kernel took it at connect()).
  bool pidfd_from_socket = false;
  // The process start time read right after accept (0 when no reader was given or it failed),
  // so a later check can tell whether the pid still names the same process.
  uint64_t start_time = 0;
};

// Returns true when the process behind `pidfd` is still running (so its pid was not reused).
bool PidfdAlive(int pidfd);

class UdsListener {
 public:
  // Decides whether a freshly accepted connection may be handed to gRPC (e.g. same-uid only for
  // the admin socket). Connections refused here are closed at once.
  using AcceptFilter = std::function<bool(const PeerCredentials&)>;
  // Reads a process's start time (e.g. field 22 of /proc/<pid>/stat).
  using StartTimeReader = std::function<absl::StatusOr<uint64_t>(pid_t)>;

  // Creates the socket at `path` (a stale socket file is replaced; any other file is an error),
  // sets its mode, and starts accepting connections for `server`, which must have been built
  // without listening ports and must outlive Stop(). `filter` and `start_time_reader` may be
  // empty.
  static absl::StatusOr<std::unique_ptr<UdsListener>> Start(
      grpc::Server* server, const std::string& path, unsigned mode, AcceptFilter filter,
      StartTimeReader start_time_reader = nullptr);
  ~UdsListener();
  UdsListener(const UdsListener&) = delete;
  UdsListener& operator=(const UdsListener&) = delete;

  // The credentials of the connection carrying `context`'s call. Unauthenticated when the call
  // did not arrive through this listener or the connection cannot be matched.
  absl::StatusOr<PeerCredentials> PeerOf(const grpc::ServerContext& context) const;

  // Connections from one uid beyond this many open ones are closed at accept.
  void SetMaxConnectionsPerUidForTesting(size_t n) { max_connections_per_uid_ = n; }

  // Stops accepting and removes the socket file. Call before grpc::Server::Shutdown(). Idempotent.
  void Stop();

 private:
  struct Connection {
    PeerCredentials creds;
    ino_t inode = 0;
  };
  UdsListener(grpc::Server* server, std::string path, int listen_fd, AcceptFilter filter,
              StartTimeReader start_time_reader);
  void AcceptLoop();
  void PruneClosedLocked();  // REQUIRES(mu_)

  static constexpr size_t kDefaultMaxConnectionsPerUid = 512;
  std::atomic<size_t> max_connections_per_uid_{kDefaultMaxConnectionsPerUid};

  grpc::Server* const server_;
  const std::string path_;
  const int listen_fd_;
  const AcceptFilter filter_;
  const StartTimeReader start_time_reader_;
  std::atomic<bool> stopped_{false};
  std::thread accept_thread_;
  mutable std::mutex mu_;
  // fd number -> connection accepted on it; an entry is replaced when the fd number is reused.
  std::map<int, Connection> connections_;  // GUARDED_BY(mu_)
};

}  // namespace mandate::grpcutil

#endif  // MANDATE_BROKER_COMMON_GRPCUTIL_UDS_LISTENER_H_
