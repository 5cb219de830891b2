// Slow HTTP clients for the benchmark's mixed scenarios: connections that trickle a request
// header a byte at a time and never finish it (slowloris), reopened whenever the server closes
// them, so that the server holds `count` of them throughout a measurement.
#ifndef MANDATE_TESTS_BENCH_SLOW_CLIENTS_H_
#define MANDATE_TESTS_BENCH_SLOW_CLIENTS_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace mandate::bench {

// Owns a thread and `count` sockets; both end with the object. Connections come from 127.0.0.2
// and up, `per_address` per address, so a per-address cap of the server does not refuse them and
// the measured client (127.0.0.1) is not counted with them.
class SlowClients {
 public:
  // `server` is "127.0.0.1:PORT".
  SlowClients(const std::string& server, int count, int per_address = 50,
              std::chrono::milliseconds byte_every = std::chrono::milliseconds(500))
      : byte_every_(byte_every) {
    server_.sin_family = AF_INET;
    server_.sin_port =
        htons(static_cast<uint16_t>(std::stoi(server.substr(server.rfind(':') + 1))));
    ::inet_pton(AF_INET, server.substr(0, server.rfind(':')).c_str(), &server_.sin_addr);
    for (int i = 0; i < count; ++i) {
      sources_.push_back("127.0.0." + std::to_string(2 + i / per_address));
      fds_.push_back(Open(sources_.back()));
    }
    thread_ = std::thread([this] { Run(); });
  }
  ~SlowClients() {
    stop_ = true;
    thread_.join();
    for (int fd : fds_) {
      if (fd >= 0) ::close(fd);
    }
  }
  SlowClients(const SlowClients&) = delete;
  SlowClients& operator=(const SlowClients&) = delete;

  // Connections the server closed (or refused) and that were opened again.
  int64_t reopened() const { return reopened_.load(); }

 private:
  int Open(const std::string& source) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    sockaddr_in from{};
    from.sin_family = AF_INET;
    ::inet_pton(AF_INET, source.c_str(), &from.sin_addr);
    static const char kStart[] = "GET /keys HTTP/1.1\r\nX-Slow: ";
    if (::bind(fd, reinterpret_cast<sockaddr*>(&from), sizeof(from)) != 0 ||
        ::connect(fd, reinterpret_cast<const sockaddr*>(&server_), sizeof(server_)) != 0 ||
        ::send(fd, kStart, sizeof(kStart) - 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  void Run() {
    while (!stop_) {
      for (size_t i = 0; i < fds_.size() && !stop_; ++i) {
        char c;
        const bool closed = fds_[i] < 0 || ::recv(fds_[i], &c, 1, MSG_DONTWAIT | MSG_PEEK) == 0 ||
                            ::send(fds_[i], "a", 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0;
        if (closed) {
          if (fds_[i] >= 0) ::close(fds_[i]);
          fds_[i] = Open(sources_[i]);
          reopened_.fetch_add(1);
        }
      }
      std::this_thread::sleep_for(byte_every_);
    }
  }

  const std::chrono::milliseconds byte_every_;
  sockaddr_in server_{};
  std::vector<std::string> sources_;
  std::vector<int> fds_;  // -1: to be opened again
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> reopened_{0};
  std::thread thread_;
};

}  // namespace mandate::bench

#endif  // MANDATE_TESTS_BENCH_SLOW_CLIENTS_H_
