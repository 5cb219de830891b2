// An upstream service (an API an agent calls) that accepts Mandate task tokens.
//
//   mandate-example-upstream --issuer http://127.0.0.1:8080 --audience https://api.example.org
//       --listen 127.0.0.1:0 [--required-scope S]
//
// GET /whoami answers 200 {"subject", "task_id", "scopes", "actor_chain"} for a request carrying
// `Authorization: DPoP <task token>` and a matching `DPoP` proof, 401 or 400 with a
// WWW-Authenticate challenge otherwise, 403 when the token lacks --required-scope, and 503 when
// the broker's keys cannot be fetched. The first line on stdout is `listening on HOST:PORT`.
// SIGTERM or SIGINT stops it with exit code 0.
//
// Only the public SDK header is used: this file is what an integration looks like.
#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mandate/token_verifier.h"

namespace {

int Usage(const std::string& problem) {
  std::cerr << "mandate-example-upstream: " << problem << "\n"
            << "usage: mandate-example-upstream --issuer URL --audience A "
               "--listen HOST:PORT [--required-scope S]\n";
  return 2;
}

// Every value of a request header (Authorization and DPoP must each appear once; the verifier
// needs to see duplicates to refuse them).
std::vector<std::string> HeaderValues(const httplib::Request& req, const std::string& name) {
  std::vector<std::string> values;
  for (size_t i = 0; i < req.get_header_value_count(name); ++i) {
    values.push_back(req.get_header_value(name, i));
  }
  return values;
}

// A JSON string literal; the values come from a verified token but are still escaped.
std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string QuoteAll(const std::vector<std::string>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i > 0 ? "," : "") + Quote(values[i]);
  return out + "]";
}

}  // namespace

int main(int argc, char** argv) {
  mandate::TokenVerifierOptions options;
  std::string listen;
  std::string required_scope;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) return Usage(flag + " needs a value");
    std::string value = argv[++i];
    if (flag == "--issuer") {
      options.issuer = value;
    } else if (flag == "--audience") {
      options.audience = value;
    } else if (flag == "--listen") {
      listen = value;
    } else if (flag == "--required-scope") {
      required_scope = value;
    } else {
      return Usage("unknown flag " + flag);
    }
  }
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos) return Usage("--listen must be HOST:PORT");
  const std::string host = listen.substr(0, colon);
  int port = std::atoi(listen.substr(colon + 1).c_str());

  // Keys are fetched from the broker on the first request, so the broker may start later.
  auto verifier = mandate::TokenVerifier::Create(options);
  if (!verifier.ok()) return Usage(std::string(verifier.status().message()));

  httplib::Server server;
  if (port == 0) {
    port = server.bind_to_any_port(host);
  } else if (!server.bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) return Usage("cannot listen on " + listen);
  // The proof's htu must equal the URL the client addressed. That is this address only when
  // clients connect directly; behind a proxy or load balancer, use the external URL instead.
  const std::string base_url = "http://" + host + ":" + std::to_string(port);

  server.Get("/whoami", [&](const httplib::Request& req, httplib::Response& res) {
    const std::string url = base_url + req.path;
    mandate::HttpRequestView view{req.method, url, HeaderValues(req, "Authorization"),
                                  HeaderValues(req, "DPoP")};
    absl::StatusOr<mandate::VerifiedTaskToken> token = (*verifier)->Verify(view);
    absl::Status status = token.ok() ? absl::OkStatus() : token.status();
    if (status.ok() && !required_scope.empty()) {
      status = mandate::RequireScope(*token, required_scope);
    }
    if (!status.ok()) {
      std::cerr << "refused " << req.method << " " << req.path << ": " << status << "\n";
      res.status = mandate::HttpStatusForError(status);
      res.set_header("WWW-Authenticate",
                     mandate::WwwAuthenticateChallenge(status, options.algorithms));
      std::string error = mandate::OAuthErrorCode(status);
      res.set_content("{\"error\":" + Quote(error.empty() ? "unauthorized" : error) + "}",
                      "application/json");
      return;
    }
    res.set_content("{\"subject\":" + Quote(token->subject()) + ",\"task_id\":" +
                        Quote(token->task_id()) + ",\"scopes\":" + QuoteAll(token->scopes()) +
                        ",\"actor_chain\":" + QuoteAll(token->actor_chain()) + "}",
                    "application/json");
  });

  // Signals are taken by a thread with sigwait, since server.stop() is not async-signal-safe.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any thread starts, so all inherit it
  std::atomic<bool> signalled{false};
  std::atomic<bool> served{false};
  std::thread stopper([&] {
    int signal = 0;
    sigwait(&signals, &signal);
    signalled = true;
    // stop() does nothing before listen_after_bind has started, so repeat it until that returned.
    while (!served) {
      server.stop();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });

  std::cout << "listening on " << host << ":" << port << std::endl;
  server.listen_after_bind();
  served = true;
  const bool stopped_by_signal = signalled;
  if (!stopped_by_signal) kill(getpid(), SIGTERM);  // the server failed: wake the stopper thread
  stopper.join();
  return stopped_by_signal ? 0 : 1;
}
