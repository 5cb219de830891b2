// Raw HTTP/1.1 over loopback TCP for tests that must send what no HTTP client library would
// (malformed, huge, slow or from a chosen source address) and read the answer byte for byte.
#ifndef MANDATE_TESTS_INTEGRATION_RAW_HTTP_H_
#define MANDATE_TESTS_INTEGRATION_RAW_HTTP_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <string_view>

#include "absl/strings/numbers.h"

namespace mandate::testing_http {

// An open TCP connection to `host_port` (127.0.0.1:PORT) from `source_ip`, with 5 s send and
// receive timeouts; -1 on failure.
inline int Connect(const std::string& host_port, const std::string& source_ip = "127.0.0.1") {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  timeval tv{.tv_sec = 5, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  sockaddr_in source{};
  source.sin_family = AF_INET;
  ::inet_pton(AF_INET, source_ip.c_str(), &source.sin_addr);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port =
      htons(static_cast<uint16_t>(std::stoi(host_port.substr(host_port.rfind(':') + 1))));
  ::inet_pton(AF_INET, host_port.substr(0, host_port.rfind(':')).c_str(), &addr.sin_addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&source), sizeof(source)) != 0 ||
      ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

inline bool SendAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data.remove_prefix(static_cast<size_t>(n));
  }
  return true;
}

// Reads until the peer closes, a whole response (by Content-Length) has arrived, or the receive
// timeout passes; returns what arrived.
inline std::string ReadResponse(int fd) {
  std::string raw;
  char buf[4096];
  while (true) {
    size_t header_end = raw.find("\r\n\r\n");
    if (header_end != std::string::npos) {
      size_t at = raw.find("Content-Length: ");
      size_t length = 0;
      if (at != std::string::npos && at < header_end &&
          absl::SimpleAtoi(raw.substr(at + 16, raw.find("\r\n", at) - at - 16), &length) &&
          raw.size() >= header_end + 4 + length) {
        return raw;
      }
    }
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return raw;
    raw.append(buf, static_cast<size_t>(n));
  }
}

// The status of a raw response ("HTTP/1.1 431 ..."), 0 when there is none.
inline int StatusOf(const std::string& raw) {
  int status = 0;
  if (raw.rfind("HTTP/1.", 0) != 0 || raw.size() < 12 ||
      !absl::SimpleAtoi(raw.substr(9, 3), &status)) {
    return 0;
  }
  return status;
}

// True once the peer has closed `fd` (EOF or reset), without blocking.
inline bool PeerClosed(int fd) {
  char c;
  ssize_t n = ::recv(fd, &c, 1, MSG_DONTWAIT | MSG_PEEK);
  if (n == 0) return true;
  return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

}  // namespace mandate::testing_http

#endif  // MANDATE_TESTS_INTEGRATION_RAW_HTTP_H_
