// A Unix-socket listener for gRPC servers that knows who is calling.
//
// gRPC's own Unix-socket listener gives handlers no peer credentials, so this class owns the
// listening socket, accepts connections itself, records each caller's credentials (SO_PEERCRED)
// and a pidfd (SO_PEERPIDFD, or pidfd_open on older kernels) at accept time, and only then hands
// the connection to gRPC with AddInsecureChannelFromFd. Handlers call PeerOf(context) to learn
// who is on the other end.
//
// One thread accepts, in order, so whatever it spends on one connection every queued one waits
// for (and an exec during that wait is attested as the exec'd program). Per connection it does:
// SO_PEERCRED and a counter lookup (a connection over a cap is closed right there), then the pin
// (pidfd, executable, alive check), then the rest. Records of connections gRPC closed are pruned
// only when a cap would refuse, at most once per kPruneInterval per uid (and for the global cap).
//
// Thread-safety: PeerOf may be called concurrently from any handler thread.
#ifndef MANDATE_BROKER_COMMON_GRPCUTIL_UDS_LISTENER_H_
#define MANDATE_BROKER_COMMON_GRPCUTIL_UDS_LISTENER_H_

#include <sys/socket.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace grpc {
class Server;
class ServerContext;
}  // namespace grpc

namespace mandate::grpcutil {

// A file by device and inode.
struct FileId {
  uint64_t device = 0;
  uint64_t inode = 0;
  friend bool operator==(const FileId&, const FileId&) = default;
};

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
  // The process start time read after accept (0 when no reader was given or it failed). For
  // information only: nothing known from connect() time can be compared with it, so it does not
  // detect a pid reused before accept (the pidfd and the uid/gid checks are what pin the peer).
  uint64_t start_time = 0;
  // The executable the process ran when it was accepted, read through the pidfd-pinned pid
  // right after accept (exe_pinned false when no reader was given, the read failed, or the
  // process was already gone). Lets a handler refuse a process that exec'd since it connected.
  bool exe_pinned = false;
  FileId exe;
};

// How many connections a listener holds at most, derived from the descriptor limit.
struct ConnectionCaps {
  size_t total = 0;
  size_t per_uid = 0;
};
// Each connection holds two descriptors (socket, pidfd). Leaves max(64, limit/8) descriptors for
// the process's own files, then allows (limit - reserve) / 2 connections, at most 4096 (which
// also bounds gRPC's per-connection memory); one uid may hold a quarter of those, at most 512,
// so one local user cannot take every slot. E.g. limit 1024: 448 total, 112 per uid; limit
// 65536: 4096 total, 512 per uid.
ConnectionCaps CapsForFileLimit(uint64_t open_files_limit);

// Returns true when the process behind `pidfd` is still running (so its pid was not reused).
bool PidfdAlive(int pidfd);

class UdsListener {
 public:
  // Decides whether a freshly accepted connection may be handed to gRPC (e.g. same-uid only for
  // the admin socket). Connections refused here are closed at once.
  using AcceptFilter = std::function<bool(const PeerCredentials&)>;
  // Reads a process's start time (e.g. field 22 of /proc/<pid>/stat).
  using StartTimeReader = std::function<absl::StatusOr<uint64_t>(pid_t)>;
  // Reads which executable a process runs (e.g. stat of /proc/<pid>/exe).
  using ExecutableReader = std::function<absl::StatusOr<FileId>(pid_t)>;

  struct Options {
    AcceptFilter filter;                 // may be empty
    StartTimeReader start_time_reader;   // may be empty
    ExecutableReader executable_reader;  // may be empty
    // 0: derived from RLIMIT_NOFILE at Start (CapsForFileLimit). Connections past either cap
    // are closed at accept.
    size_t max_connections = 0;
    size_t max_connections_per_uid = 0;
  };

  // Creates the socket at `path` (a stale socket file is replaced; any other file is an error),
  // sets its mode, and starts accepting connections for `server`, which must have been built
  // without listening ports and must outlive Stop(). `filter` and `start_time_reader` may be
  // empty.
  static absl::StatusOr<std::unique_ptr<UdsListener>> Start(
      grpc::Server* server, const std::string& path, unsigned mode, AcceptFilter filter,
      StartTimeReader start_time_reader = nullptr);
  static absl::StatusOr<std::unique_ptr<UdsListener>> Start(grpc::Server* server,
                                                            const std::string& path, unsigned mode,
                                                            Options options);
  ~UdsListener();
  UdsListener(const UdsListener&) = delete;
  UdsListener& operator=(const UdsListener&) = delete;

  // The credentials of the connection carrying `context`'s call. Unauthenticated when the call
  // did not arrive through this listener or the connection cannot be matched.
  absl::StatusOr<PeerCredentials> PeerOf(const grpc::ServerContext& context) const;

  // Connections from one uid beyond this many open ones are closed at accept.
  void SetMaxConnectionsPerUidForTesting(size_t n) { max_connections_per_uid_ = n; }
  ConnectionCaps caps() const { return {max_connections_, max_connections_per_uid_.load()}; }

  // Stops accepting and removes the socket file. Call before grpc::Server::Shutdown(). Idempotent.
  void Stop();

 private:
  using Clock = std::chrono::steady_clock;
  // How often a uid at its cap (or everyone at the global cap) makes the loop look for closed
  // connections: a uid hammering its cap costs one prune of its own records per interval, and
  // a slot freed by a closed connection is seen within it.
  static constexpr Clock::duration kPruneInterval = std::chrono::milliseconds(10);
  struct Connection {
    PeerCredentials creds;
    ino_t inode = 0;
  };
  struct UidConnections {
    size_t open = 0;
    Clock::time_point last_prune{};
  };
  struct CapCheck {
    bool over_total = false;
    bool over_uid = false;
    bool any() const { return over_total || over_uid; }
  };
  UdsListener(grpc::Server* server, std::string path, int listen_fd, Options options);
  void AcceptLoop();
  // Pins the process behind a freshly accepted connection: pidfd, then its executable.
  void PinPeer(int conn, const ucred& cred, PeerCredentials& creds) const;
  // REQUIRES(mu_) for the following.
  CapCheck CheckCapsLocked(uid_t uid) const;
  // Whether a connection the caps would refuse may first have closed records pruned.
  bool PruneDueLocked(const CapCheck& over, uid_t uid, Clock::time_point now) const;
  void ForgetLocked(std::map<int, Connection>::iterator it);
  // Drops the records of closed connections, of one uid or of all.
  void PruneClosedLocked(std::optional<uid_t> only_uid);

  grpc::Server* const server_;
  const std::string path_;
  const int listen_fd_;
  const Options options_;
  const size_t max_connections_;
  std::atomic<size_t> max_connections_per_uid_;
  std::atomic<bool> stopped_{false};
  std::thread accept_thread_;
  mutable std::mutex mu_;
  // fd number -> connection accepted on it; an entry is replaced when the fd number is reused.
  std::map<int, Connection> connections_;    // GUARDED_BY(mu_)
  std::map<uid_t, UidConnections> per_uid_;  // GUARDED_BY(mu_): open connections by uid
  Clock::time_point last_full_prune_{};      // GUARDED_BY(mu_)
};

}  // namespace mandate::grpcutil

#endif  // MANDATE_BROKER_COMMON_GRPCUTIL_UDS_LISTENER_H_
