// The agent against local callers that try to take another program's identity or exhaust it:
// exec after connect, exit before the call, a path faked in a private mount namespace, and a
// flood of watch streams. Real broker and agent, real processes; refusals checked with reasons.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "mandate/workload/v1/tasks.grpc.pb.h"
#include "mandate/workload_client.h"
#include "mandate/x509svid.h"
#include "spiffe/workload.grpc.pb.h"
#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

bool InCi() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string(ci) == "true";
}

// The value of "Key:" in /proc/<pid>/status (the first number), or -1.
int64_t StatusField(pid_t pid, const std::string& key) {
  for (absl::string_view line :
       absl::StrSplit(ReadFileOrEmpty("/proc/" + std::to_string(pid) + "/status"), '\n')) {
    if (!absl::ConsumePrefix(&line, key + ":")) continue;
    std::vector<absl::string_view> words =
        absl::StrSplit(absl::StripAsciiWhitespace(line), ' ', absl::SkipEmpty());
    int64_t value = -1;
    if (!words.empty() && absl::SimpleAtoi(words[0], &value)) return value;
  }
  return -1;
}

class AgentHardeningTest : public IntegrationTest {
 protected:
  void StartDaemons(std::vector<std::string> agent_args = {}) {
    auto broker = StartBroker();
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *broker;
    AgentOptions options;
    options.extra_args = std::move(agent_args);
    auto agent = StartAttestedAgent(broker_, "node-h", options);
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *agent;
  }
  void Entry(const std::string& path, const std::vector<std::string>& selectors) {
    auto entry = CreateEntry(broker_, broker_.JoinNodeId("node-h"), broker_.Id(path), selectors);
    ASSERT_TRUE(entry.ok()) << entry.status();
  }
  // A copy of the CLI at <temp>/bin/<name> that any user can run, with the temp dir and the
  // agent's socket directory opened for other users (the socket itself is 0666).
  std::string CliCopy(const std::string& name) {
    EXPECT_EQ(::chmod(temp_dir().c_str(), 0755), 0);
    EXPECT_EQ(::chmod((temp_dir() + "/run").c_str(), 0755), 0);
    fs::create_directories(temp_dir() + "/bin");
    EXPECT_EQ(::chmod((temp_dir() + "/bin").c_str(), 0755), 0);
    const std::string copy = temp_dir() + "/bin/" + name;
    fs::copy_file(CliBinary(), copy);
    EXPECT_EQ(::chmod(copy.c_str(), 0755), 0);
    return fs::canonical(copy).string();
  }
  static std::string RelayClient() {
    return fs::canonical(BuildDir() + "/tests/integration/exec_relay_client").string();
  }
  // The relay client's run once its own entry reached the agent (its first call is served).
  CommandResult RunRelay(const std::string& mode) {
    CommandResult run;
    EXPECT_TRUE(WaitUntil(
        [&] {
          run = RunCommand({RelayClient(), agent_.socket, mode});
          return run.out.find("first ok") != std::string::npos;
        },
        10s, 100ms))
        << run;
    return run;
  }

  // Waits (10 s at most) until this process's `fetch x509` succeeds: its entry reached the agent.
  void WaitUntilServed() {
    CommandResult first;
    ASSERT_TRUE(WaitUntil(
        [&] {
          first = Workload(agent_, {"fetch", "x509"});
          return first.exit_code == 0;
        },
        10s, 50ms))
        << first;
  }
  // `fetch x509` as uid 65534 (through a copy of the CLI it may run) gets the X509-SVID of the
  // entry at `path` within 10 s.
  void ExpectServedAsNobody(const std::string& path) {
    if (nobody_cli_.empty()) nobody_cli_ = CliCopy("mandate");
    CommandResult other;
    EXPECT_TRUE(WaitUntil(
        [&] {
          other = RunCommand({"/usr/bin/setpriv", "--reuid", "65534", "--regid", "65534",
                              "--clear-groups", nobody_cli_, "--socket", "unix://" + agent_.socket,
                              "fetch", "x509"});
          return other.exit_code == 0;
        },
        10s, 100ms))
        << other;
    EXPECT_THAT(other.out, HasSubstr("SPIFFE ID: " + broker_.Id(path))) << other;
  }

  BrokerProcess broker_;
  AgentProcess agent_;
  std::string nobody_cli_;
};

// An entry for /usr/bin/sleep (uid, path and digest, as an operator would register it) must not
// be handed to a program that connected, forked, and exec'd sleep while its child relays gRPC
// over the inherited connection. Before the executable was pinned at accept, the second call
// got the sleep entry's X509-SVID.
TEST_F(AgentHardeningTest, ExecAfterConnectDoesNotHandOverTheExecdProgramsIdentity) {
  StartDaemons();
  CommandResult sha = RunCommand({"/usr/bin/sha256sum", "/usr/bin/sleep"});
  ASSERT_EQ(sha.exit_code, 0) << sha;
  std::string digest = sha.out.substr(0, sha.out.find(' '));
  ASSERT_EQ(digest.size(), 64u) << sha;
  Entry("/relay-client", {OwnUidSelector(), "unix:path:" + RelayClient()});
  Entry("/sleep", {OwnUidSelector(), "unix:path:/usr/bin/sleep", "unix:sha256:" + digest});

  CommandResult run = RunRelay("exec");
  // The connection works, and identifies the program that made it.
  EXPECT_THAT(run.out, HasSubstr("first ok " + broker_.Id("/relay-client"))) << run;
  // After the exec the same connection is refused, not served as sleep.
  EXPECT_THAT(run.out, HasSubstr("second error 7 "));
  EXPECT_THAT(run.out, HasSubstr("another executable than when it connected")) << run;
  EXPECT_THAT(run.out, Not(HasSubstr(broker_.Id("/sleep")))) << run;
  EXPECT_THAT(ReadFileOrEmpty(agent_.log_path), HasSubstr("exec after connect"));
}

// The same trick on a watch stream opened while the peer still ran its own program: the next
// update (here: a new entry) attests again and ends the stream instead of delivering it.
TEST_F(AgentHardeningTest, OpenWatchEndsWhenItsPeerExecsAnotherProgram) {
  StartDaemons();
  Entry("/relay-client", {OwnUidSelector(), "unix:path:" + RelayClient()});
  Entry("/sleep", {OwnUidSelector(), "unix:path:/usr/bin/sleep"});
  const std::string marker = temp_dir() + "/exec-marker";
  // Wait until the entry reached the agent, so the stream below starts with an identity.
  CommandResult ready = RunRelay("exit");
  ASSERT_THAT(ready.out, HasSubstr("first ok")) << ready;
  CommandResult run;
  std::thread relay([&] {
    run = RunCommand({RelayClient(), agent_.socket, "stream", marker}, {}, 30s);
  });
  bool execd = WaitUntil([&] { return !ReadFileOrEmpty(marker).empty(); }, 10s);
  if (execd) Entry("/later", {OwnUidSelector()});
  relay.join();
  ASSERT_TRUE(execd) << run;
  EXPECT_THAT(run.out, HasSubstr("first ok " + broker_.Id("/relay-client"))) << run;
  EXPECT_THAT(run.out, HasSubstr("stream error 7 caller runs another executable")) << run;
  EXPECT_THAT(run.out, Not(HasSubstr(broker_.Id("/sleep")))) << run;
  EXPECT_THAT(run.out, Not(HasSubstr(broker_.Id("/later")))) << run;
}

// The process that connected exits; its child calls over the inherited connection.
TEST_F(AgentHardeningTest, CallerThatExitedBeforeItsCallIsRefused) {
  StartDaemons();
  Entry("/relay-client", {OwnUidSelector(), "unix:path:" + RelayClient()});
  CommandResult run = RunRelay("exit");
  EXPECT_THAT(run.out, HasSubstr("first ok " + broker_.Id("/relay-client"))) << run;
  EXPECT_THAT(run.out, HasSubstr("second error 7 ")) << run;
  EXPECT_THAT(run.out, HasSubstr("exited")) << run;
}

// `unshare -Urm sh -c 'mount --bind ./mine /usr/bin/tail && /usr/bin/tail ...'`: inside its
// own mount namespace the caller runs the mandate CLI under the path /usr/bin/tail, and
// /proc/<pid>/exe reads /usr/bin/tail. The entry for /usr/bin/tail must not match it.
TEST_F(AgentHardeningTest, PathFakedInAPrivateMountNamespaceGetsNoIdentity) {
  // The attacker's way (a user namespace) where the system allows it; root can also do it
  // without one.
  std::vector<std::string> unshare;
  for (std::vector<std::string> flavour : {std::vector<std::string>{"/usr/bin/unshare", "-Urm"},
                                           std::vector<std::string>{"/usr/bin/unshare", "-m"}}) {
    std::vector<std::string> probe = flavour;
    probe.push_back("/bin/true");
    if (RunCommand(probe).exit_code == 0) {
      unshare = flavour;
      break;
    }
  }
  if (unshare.empty()) {
    if (InCi()) FAIL() << "neither unshare -Urm nor unshare -m works here; CI=true needs this test";
    GTEST_SKIP() << "no private mount namespaces available (unshare -Urm and -m failed)";
  }
  StartDaemons();
  ASSERT_TRUE(fs::exists("/usr/bin/tail"));
  // The attacker's own program: a copy of the CLI.
  const std::string mine = CliCopy("mine");
  Entry("/tail", {OwnUidSelector(), "unix:path:/usr/bin/tail"});
  Entry("/mine", {OwnUidSelector(), "unix:path:" + mine});
  const std::string socket = "unix://" + agent_.socket;

  // Control: a private mount namespace by itself changes nothing; the honest path is served.
  std::vector<std::string> honest = unshare;
  honest.insert(honest.end(), {mine, "--socket", socket, "fetch", "x509"});
  CommandResult own;
  ASSERT_TRUE(WaitUntil(
      [&] {
        own = RunCommand(honest);
        return own.exit_code == 0;
      },
      10s, 100ms))
      << own;
  EXPECT_THAT(own.out, HasSubstr("SPIFFE ID: " + broker_.Id("/mine"))) << own;

  std::vector<std::string> spoof = unshare;
  spoof.insert(spoof.end(),
               {"/bin/sh", "-c", "mount --bind \"$0\" /usr/bin/tail && exec /usr/bin/tail \"$@\"",
                mine, "--socket", socket, "fetch", "x509"});
  CommandResult spoofed = RunCommand(spoof);
  EXPECT_NE(spoofed.exit_code, 0) << spoofed;
  // The CLI ran (it is what reports the refusal) and got nothing.
  EXPECT_THAT(spoofed.err, HasSubstr("no identity issued")) << spoofed;
  EXPECT_THAT(spoofed.out, Not(HasSubstr("BEGIN CERTIFICATE"))) << spoofed;
  EXPECT_THAT(spoofed.out, Not(HasSubstr(broker_.Id("/tail")))) << spoofed;
  // The host's /usr/bin/tail was never touched (unshare makes the mount private).
  EXPECT_EQ(RunCommand({"/usr/bin/tail", "--version"}).exit_code, 0);

  // The same as an unprivileged user (uid 65534), exactly as reported, where this test can
  // switch users and the system allows unprivileged user namespaces.
  const std::vector<std::string> as_nobody = {"/usr/bin/setpriv", "--reuid", "65534",
                                              "--regid",          "65534",   "--clear-groups",
                                              "/usr/bin/unshare", "-Urm"};
  std::vector<std::string> probe = as_nobody;
  probe.push_back("/bin/true");
  if (::geteuid() != 0 || RunCommand(probe).exit_code != 0) {
    std::cout << "unprivileged variant not run (needs root to switch to uid 65534, and "
                 "unprivileged user namespaces)"
              << std::endl;
    return;
  }
  Entry("/tail-for-nobody", {"unix:uid:65534", "unix:path:/usr/bin/tail"});
  Entry("/mine-for-nobody", {"unix:uid:65534", "unix:path:" + mine});
  // Control: uid 65534 in its own user and mount namespace reaches the agent and is served
  // under its honest path (so both entries have reached the agent).
  std::vector<std::string> nobody_honest = as_nobody;
  nobody_honest.insert(nobody_honest.end(), {mine, "--socket", socket, "fetch", "x509"});
  CommandResult nobody_own;
  ASSERT_TRUE(WaitUntil(
      [&] {
        nobody_own = RunCommand(nobody_honest);
        return nobody_own.exit_code == 0;
      },
      10s, 100ms))
      << nobody_own;
  EXPECT_THAT(nobody_own.out, HasSubstr("SPIFFE ID: " + broker_.Id("/mine-for-nobody")));
  std::vector<std::string> nobody_spoof = as_nobody;
  nobody_spoof.insert(
      nobody_spoof.end(),
      {"/bin/sh", "-c", "mount --bind \"$0\" /usr/bin/tail && exec /usr/bin/tail \"$@\"", mine,
       "--socket", socket, "fetch", "x509"});
  CommandResult nobody = RunCommand(nobody_spoof);
  EXPECT_NE(nobody.exit_code, 0) << nobody;
  EXPECT_THAT(nobody.err, HasSubstr("no identity issued")) << nobody;
  EXPECT_THAT(nobody.out, Not(HasSubstr(broker_.Id("/tail-for-nobody")))) << nobody;
}

// Executables are hashed only when an entry could use the digest, so a watch opened before any
// unix:sha256 entry exists was attested without one. When such an entry is created, the open
// stream must attest again (it does on every update) and deliver it.
TEST_F(AgentHardeningTest, OpenWatchReceivesAnEntryThatNeedsItsDigest) {
  StartDaemons();
  Entry("/by-uid", {OwnUidSelector()});
  auto client = WorkloadClient::Connect("unix://" + agent_.socket);
  ASSERT_TRUE(client.ok()) << client.status();
  std::mutex mu;
  std::condition_variable cv;
  std::set<std::string> latest;
  auto watcher = (*client)->WatchX509Context([&](const X509Context& update) {
    std::lock_guard<std::mutex> lock(mu);
    latest.clear();
    for (const X509Svid& svid : update.svids) latest.insert(svid.spiffe_id);
    cv.notify_all();
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, 10s, [&] { return latest.contains(broker_.Id("/by-uid")); }));
  }
  CommandResult sha = RunCommand({"/usr/bin/sha256sum", fs::read_symlink("/proc/self/exe")});
  ASSERT_EQ(sha.exit_code, 0) << sha;
  Entry("/by-digest", {OwnUidSelector(), "unix:sha256:" + sha.out.substr(0, sha.out.find(' '))});
  {
    std::unique_lock<std::mutex> lock(mu);
    EXPECT_TRUE(cv.wait_for(lock, 10s, [&] { return latest.contains(broker_.Id("/by-digest")); }))
        << "the open watch never delivered the unix:sha256 entry";
  }
  watcher->Close();
}

// One workload opens 3,000 FetchX509SVID streams. The agent refuses those past its per-uid cap
// with RESOURCE_EXHAUSTED, keeps its thread count and memory bounded, and still serves another
// uid. Without the caps every stream held an agent thread (4,000 streams: 4,015 threads,
// +146 MB).
TEST_F(AgentHardeningTest, WatchStreamFloodIsBoundedAndAnotherUidIsServed) {
  if (::geteuid() != 0) {
    if (InCi()) FAIL() << "needs root (a second client as uid 65534); CI=true forbids skipping";
    GTEST_SKIP() << "running a client as uid 65534 needs root";
  }
  constexpr int kPerUid = 32;
  StartDaemons(
      {"--max-watch-streams", "64", "--max-watch-streams-per-uid", std::to_string(kPerUid)});
  Entry("/flooder", {OwnUidSelector()});
  Entry("/other", {"unix:uid:65534"});
  ASSERT_NO_FATAL_FAILURE(WaitUntilServed());
  const int64_t threads_before = StatusField(agent_.pid, "Threads");
  const int64_t rss_before_kb = StatusField(agent_.pid, "VmRSS");
  ASSERT_GT(threads_before, 0);

  // 3,000 streams over 100 connections, all started at once on one completion queue.
  constexpr int kConnections = 100;
  constexpr int kStreamsPerConnection = 30;
  struct Stream {
    grpc::ClientContext context;
    X509SVIDResponse response;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncReader<X509SVIDResponse>> reader;
    enum { kStarting, kReading, kFinishing, kOpen, kDone } state = kStarting;
  };
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<SpiffeWorkloadAPI::Stub>> stubs;
  std::vector<std::unique_ptr<Stream>> streams;
  for (int c = 0; c < kConnections; ++c) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
    stubs.push_back(SpiffeWorkloadAPI::NewStub(grpc::CreateCustomChannel(
        "unix:" + agent_.socket, grpc::InsecureChannelCredentials(), args)));
    for (int i = 0; i < kStreamsPerConnection; ++i) {
      auto stream = std::make_unique<Stream>();
      stream->context.AddMetadata("workload.spiffe.io", "true");
      stream->reader =
          stubs.back()->PrepareAsyncFetchX509SVID(&stream->context, X509SVIDRequest(), &cq);
      stream->reader->StartCall(stream.get());
      streams.push_back(std::move(stream));
    }
  }
  // Drive every stream until it delivered its first message (open) or ended.
  size_t settled = 0;
  auto step = [&](Stream* s, bool ok) {
    switch (s->state) {
      case Stream::kStarting:
      case Stream::kReading:
        if (ok && s->state == Stream::kReading) {
          s->state = Stream::kOpen;
          ++settled;
          return;
        }
        if (ok) {
          s->state = Stream::kReading;
          s->reader->Read(&s->response, s);
        } else {
          s->state = Stream::kFinishing;
          s->reader->Finish(&s->status, s);
        }
        return;
      case Stream::kFinishing:
        s->state = Stream::kDone;
        ++settled;
        return;
      default:
        return;
    }
  };
  auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(60);
  while (settled < streams.size()) {
    void* tag = nullptr;
    bool ok = false;
    if (cq.AsyncNext(&tag, &ok, deadline) != grpc::CompletionQueue::GOT_EVENT) break;
    step(static_cast<Stream*>(tag), ok);
  }
  ASSERT_EQ(settled, streams.size()) << "streams still pending after 60 s";
  size_t open = 0, exhausted = 0;
  for (const auto& s : streams) {
    if (s->state == Stream::kOpen) ++open;
    if (s->state == Stream::kDone &&
        s->status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      ++exhausted;
    }
  }
  EXPECT_LE(open, static_cast<size_t>(kPerUid));
  EXPECT_GT(open, 0u);
  EXPECT_EQ(open + exhausted, streams.size());

  // Bounds: the open streams' threads plus the handler quota's headroom (64 unary threads);
  // memory well below what 3,000 threads and streams took (~110 MB).
  const int64_t threads_during = StatusField(agent_.pid, "Threads");
  const int64_t rss_during_kb = StatusField(agent_.pid, "VmRSS");
  std::cout << "agent threads " << threads_before << " -> " << threads_during << ", RSS "
            << rss_before_kb << " -> " << rss_during_kb << " kB with " << open
            << " open streams and " << exhausted << " refused" << std::endl;
  EXPECT_LE(threads_during, threads_before + kPerUid + 64 + 16);
  EXPECT_LT(rss_during_kb - rss_before_kb, 64 * 1024);

  // Another uid is still served while the flood holds its streams.
  ExpectServedAsNobody("/other");

  for (auto& s : streams) {
    if (s->state == Stream::kOpen) {
      s->context.TryCancel();
      s->state = Stream::kFinishing;
      s->reader->Finish(&s->status, s.get());
    }
  }
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

// One workload keeps 200 DeclareTask calls in flight while the broker does not answer (stopped:
// each call the agent forwards waits for its 15 s deadline). The agent admits 16 of them (its
// per-uid cap), refuses the rest with RESOURCE_EXHAUSTED at once, and another uid is still
// served. Without the per-uid cap the held calls took all of gRPC's handler threads
// (--max-watch-streams 16 + 64) and gRPC answered every uid RESOURCE_EXHAUSTED.
TEST_F(AgentHardeningTest, SlowUnaryCallsOfOneUidDoNotStarveAnotherUid) {
  if (::geteuid() != 0) {
    if (InCi()) FAIL() << "needs root (a second client as uid 65534); CI=true forbids skipping";
    GTEST_SKIP() << "running a client as uid 65534 needs root";
  }
  constexpr size_t kPerUid = 16;
  StartDaemons({"--max-watch-streams", "16", "--max-watch-streams-per-uid", "16",
                "--max-unary-calls-per-uid", std::to_string(kPerUid)});
  Entry("/flooder", {OwnUidSelector()});
  Entry("/other", {"unix:uid:65534"});
  ASSERT_NO_FATAL_FAILURE(WaitUntilServed());
  ExpectServedAsNobody("/other");  // both entries have reached the agent

  ASSERT_EQ(::kill(broker_.pid, SIGSTOP), 0);
  struct Resume {
    pid_t pid;
    ~Resume() { ::kill(pid, SIGCONT); }
  } resume{broker_.pid};

  // Two waves of 200 calls over 8 connections (at most 32 concurrent calls each), each wave
  // started at once when the previous one's refusals are back: the second takes whatever
  // handler threads the first left.
  constexpr int kConnections = 8;
  constexpr int kCallsPerWave = 200;
  constexpr int kWaves = 2;
  struct Call {
    grpc::ClientContext context;
    mandate::workload::v1::Task response;
    grpc::Status status;
    std::unique_ptr<grpc::ClientAsyncResponseReader<mandate::workload::v1::Task>> reader;
  };
  grpc::CompletionQueue cq;
  std::vector<std::unique_ptr<mandate::workload::v1::Tasks::Stub>> stubs;
  for (int c = 0; c < kConnections; ++c) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
    stubs.push_back(mandate::workload::v1::Tasks::NewStub(grpc::CreateCustomChannel(
        "unix:" + agent_.socket, grpc::InsecureChannelCredentials(), args)));
  }
  std::vector<std::unique_ptr<Call>> calls;
  mandate::workload::v1::DeclareTaskRequest request;
  request.set_purpose("hold a handler thread");
  request.add_audiences("aud");
  size_t finished = 0, exhausted = 0;
  for (int wave = 0; wave < kWaves; ++wave) {
    for (int i = 0; i < kCallsPerWave; ++i) {
      auto call = std::make_unique<Call>();
      call->context.AddMetadata("workload.spiffe.io", "true");
      call->context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
      call->reader = stubs[i % kConnections]->AsyncDeclareTask(&call->context, request, &cq);
      call->reader->Finish(&call->response, &call->status, call.get());
      calls.push_back(std::move(call));
    }
    // All but the admitted ones come back, refused, well before the agent's 15 s broker
    // deadline.
    auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(5);
    while (finished < calls.size() - kPerUid) {
      void* tag = nullptr;
      bool ok = false;
      if (cq.AsyncNext(&tag, &ok, deadline) != grpc::CompletionQueue::GOT_EVENT) break;
      ++finished;
      const grpc::Status& status = static_cast<Call*>(tag)->status;
      if (status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED &&
          status.error_message().find("too many Workload API calls in flight") !=
              std::string::npos) {
        ++exhausted;
      }
    }
  }
  EXPECT_EQ(finished, calls.size() - kPerUid) << "refusals still pending";
  EXPECT_EQ(exhausted, calls.size() - kPerUid) << "refused by the agent's per-uid cap";

  // Another uid is served while the 16 admitted calls still hold their threads.
  ExpectServedAsNobody("/other");

  for (auto& call : calls) call->context.TryCancel();
  ::kill(broker_.pid, SIGCONT);
  while (finished < calls.size()) {
    void* tag = nullptr;
    bool ok = false;
    if (!cq.Next(&tag, &ok)) break;
    ++finished;
  }
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
}

}  // namespace
}  // namespace mandate::integration
