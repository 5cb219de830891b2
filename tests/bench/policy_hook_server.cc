// mandate-bench-hook: the external policy hook the benchmark measures against (tests/bench/run.sh
// --policy webhook|grpc; docs/performance.md "Policy hook cost"). It answers "allow" at once, so
// what the bench sees is the broker's cost of asking, not a policy engine's.
//
//   mandate-bench-hook --webhook   HTTP/1.1 on 127.0.0.1, POST /v1/data/mandate/issuance answered
//                                  {"result":{"allow":true}} (OPA's data-API shape)
//   mandate-bench-hook --grpc      mandate.policy.v1.PolicyHook/Check, plaintext, answered
//                                  allow = true
//
// Listens on a port chosen by the kernel, loopback only, and prints `127.0.0.1:PORT` as its first
// line of stdout once it accepts calls. On SIGTERM or SIGINT it stops and prints one JSON line:
//   {"requests": N, "connections": M}
// where connections counts the distinct client endpoints (address and port) that sent a call:
// with connections kept alive it stays at the broker's pool size however many calls were made.
// Writes no files.
#include <grpcpp/grpcpp.h>
#include <httplib.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "mandate/policy/v1/policy.grpc.pb.h"

namespace {

// Calls and the distinct client endpoints they came from. Thread-safe.
class Counter {
 public:
  void Saw(const std::string& peer) {
    requests_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu_);
    peers_.insert(peer);
  }
  std::string Json() {
    std::lock_guard<std::mutex> lock(mu_);
    return "{\"requests\": " + std::to_string(requests_.load()) +
           ", \"connections\": " + std::to_string(peers_.size()) + "}";
  }

 private:
  std::atomic<long long> requests_{0};
  std::mutex mu_;
  std::set<std::string> peers_;  // guarded by mu_
};

class AllowService final : public mandate::policy::v1::PolicyHook::Service {
 public:
  explicit AllowService(Counter* counter) : counter_(counter) {}
  grpc::Status Check(grpc::ServerContext* context, const mandate::policy::v1::CheckRequest*,
                     mandate::policy::v1::CheckResponse* response) override {
    counter_->Saw(context->peer());
    response->set_allow(true);
    return grpc::Status::OK;
  }

 private:
  Counter* counter_;
};

// Blocks SIGTERM and SIGINT in every thread (call before starting any) and returns once one
// arrives, so the servers can be stopped from the main thread.
void BlockStopSignals(sigset_t* set) {
  sigemptyset(set);
  sigaddset(set, SIGTERM);
  sigaddset(set, SIGINT);
  pthread_sigmask(SIG_BLOCK, set, nullptr);
}

int ServeWebhook() {
  sigset_t stop;
  BlockStopSignals(&stop);
  Counter counter;
  httplib::Server server;
  // The broker's pool holds its connections open; the library's defaults (5 calls or 5 s idle
  // per connection) would make the bench measure reconnects instead.
  server.set_keep_alive_max_count(1000000000);
  server.set_keep_alive_timeout(3600);
  // As OPA's server does: without it the answer waits for the client's delayed ACK (~40 ms).
  server.set_tcp_nodelay(true);
  // One thread per kept-alive connection, with room above the broker's pool size.
  server.new_task_queue = [] { return new httplib::ThreadPool(32); };
  server.Post("/v1/data/mandate/issuance",
              [&](const httplib::Request& req, httplib::Response& res) {
                counter.Saw(req.remote_addr + ":" + std::to_string(req.remote_port));
                res.set_content(R"({"result":{"allow":true}})", "application/json");
              });
  int port = server.bind_to_any_port("127.0.0.1");
  if (port <= 0) {
    std::cerr << "mandate-bench-hook: cannot listen on 127.0.0.1\n";
    return 1;
  }
  std::thread([&] { server.listen_after_bind(); }).detach();
  while (!server.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::cout << "127.0.0.1:" << port << std::endl;
  int signal = 0;
  sigwait(&stop, &signal);
  // Counted before stopping: the pool's threads sit in kept-alive connections, and the bench
  // wants the counts, not a graceful close (there is nothing to flush or remove).
  std::cout << counter.Json() << std::endl;
  std::_Exit(0);
}

int ServeGrpc() {
  sigset_t stop;
  BlockStopSignals(&stop);
  Counter counter;
  AllowService service(&counter);
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port <= 0) {
    std::cerr << "mandate-bench-hook: cannot listen on 127.0.0.1\n";
    return 1;
  }
  std::cout << "127.0.0.1:" << port << std::endl;
  int signal = 0;
  sigwait(&stop, &signal);
  std::cout << counter.Json() << std::endl;
  std::_Exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 2 ? argv[1] : "";
  if (mode == "--webhook") return ServeWebhook();
  if (mode == "--grpc") return ServeGrpc();
  std::cerr << "usage: mandate-bench-hook --webhook | --grpc\n";
  return 2;
}
