#include "attestors/workload/unix/unix_attestor.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "attestors/workload/unix/exe_hash_cache.h"
#include "attestors/workload/unix/hash_budget.h"
#include "attestors/workload/unix/user_db.h"
#include "broker/common/spiffe/selector.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::unix_attestor {
namespace {

namespace fs = std::filesystem;
using ::mandate::spiffe::Selector;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

constexpr char kAbcSha256[] = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

// Independent of the attestor's streaming code: OpenSSL's one-shot digest.
std::string Sha256Hex(const std::string& data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EXPECT_EQ(EVP_Digest(data.data(), data.size(), digest, &length, EVP_sha256(), nullptr), 1);
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<char*>(digest), length));
}

std::string ReadAll(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const fs::path& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
}

std::vector<std::string> Strings(const std::vector<Selector>& selectors) {
  std::vector<std::string> out;
  for (const Selector& s : selectors) {
    out.push_back(s.ToString());
  }
  return out;
}

std::string StatLine(int pid, const std::string& comm, uint64_t start_time) {
  return absl::StrCat(pid, " (", comm, ") S 1 ", pid, " ", pid,
                      " 0 -1 4194560 100 0 0 0 5 2 0 0 20 0 1 0 ", start_time,
                      " 10000000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0\n");
}

// A UserDb whose lookups run a hook first, to change the fake process mid-attestation.
class HookedUserDb final : public UserDb {
 public:
  explicit HookedUserDb(std::function<void()> hook) : hook_(std::move(hook)) {}
  std::optional<std::string> UserName(uint32_t) const override {
    hook_();
    return std::nullopt;
  }
  std::optional<std::string> GroupName(uint32_t) const override { return std::nullopt; }

 private:
  std::function<void()> hook_;
};

class UnixAttestorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "mandate-unix-attestor-XXXXXX").string();
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    root_ = pattern;
    fs::create_directories(root_ / "proc");
    fs::create_directories(root_ / "bin");
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(root_, ignored);
  }

  std::string ProcRoot() const { return (root_ / "proc").string(); }
  fs::path PidDir(int pid) const { return root_ / "proc" / std::to_string(pid); }

  // Creates a fake process: euid 1001 / egid 2001 (real ids differ on purpose), groups
  // 4 27 2001, unit agent.service, running <root>/bin/<exe_name> containing `exe_content`.
  fs::path AddProcess(int pid, uint64_t start_time, const std::string& exe_name = "agent",
                      const std::string& exe_content = "abc") {
    fs::path dir = PidDir(pid);
    fs::create_directories(dir);
    WriteFile(dir / "stat", StatLine(pid, "agent", start_time));
    WriteFile(dir / "status", "Name:\tagent\nUmask:\t0022\nState:\tS (sleeping)\nPid:\t" +
                                  std::to_string(pid) +
                                  "\nUid:\t1000\t1001\t1001\t1001\nGid:\t2000\t2001\t2001\t2001\n"
                                  "FDSize:\t64\nGroups:\t4 27 2001 \n");
    WriteFile(dir / "cgroup", "0::/system.slice/agent.service\n");
    fs::path exe = root_ / "bin" / exe_name;
    WriteFile(exe, exe_content);
    fs::create_symlink(exe, dir / "exe");
    return exe;
  }

  std::unique_ptr<UserDb> Names() const {
    return std::make_unique<MapUserDb>(std::map<uint32_t, std::string>{{1001, "alice"}},
                                       std::map<uint32_t, std::string>{{2001, "staff"}});
  }

  UnixAttestorOptions Options() const {
    UnixAttestorOptions options;
    options.proc_root = ProcRoot();
    return options;
  }

  fs::path root_;
};

TEST_F(UnixAttestorTest, AttestProducesEverySelectorInOrder) {
  fs::path exe = AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  EXPECT_THAT(Strings(*selectors),
              ElementsAre("unix:uid:1001", "unix:gid:2001", "unix:user:alice", "unix:group:staff",
                          "unix:supplementary_gid:4", "unix:supplementary_gid:27",
                          "unix:supplementary_gid:2001", "unix:path:" + exe.string(),
                          absl::StrCat("unix:sha256:", kAbcSha256), "systemd:unit:agent.service"));
  for (const Selector& s : *selectors) {
    EXPECT_TRUE(spiffe::ValidateSelector(s).ok()) << s;
  }
}

TEST_F(UnixAttestorTest, UsesEffectiveNotRealIds) {
  AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<Attestation> result = attestor.AttestDetailed(100);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->identity.uid, 1001u);
  EXPECT_EQ(result->identity.gid, 2001u);
  EXPECT_THAT(Strings(result->selectors), Not(Contains("unix:uid:1000")));
  EXPECT_EQ(result->identity.start_time_ticks, 5000u);
}

TEST_F(UnixAttestorTest, NamesOmittedWhenUnresolvable) {
  AddProcess(100, 5000);
  UnixAttestor attestor(Options(), std::make_unique<MapUserDb>(std::map<uint32_t, std::string>{},
                                                               std::map<uint32_t, std::string>{}));
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  for (const std::string& s : Strings(*selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:user:")));
    EXPECT_THAT(s, Not(HasSubstr("unix:group:")));
  }
  EXPECT_THAT(Strings(*selectors), Contains("unix:uid:1001"));
}

TEST_F(UnixAttestorTest, HashMatchesIndependentDigestOfLargerFile) {
  std::string content(300000, '\0');
  for (size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>(i * 7);
  AddProcess(100, 5000, "big", content);
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  EXPECT_THAT(Strings(*selectors), Contains("unix:sha256:" + Sha256Hex(content)));
}

TEST_F(UnixAttestorTest, HashOmittedWhenOverSizeCapButPathKept) {
  fs::path exe = AddProcess(100, 5000, "agent", "abcd");
  UnixAttestorOptions options = Options();
  options.max_hash_bytes = 3;
  UnixAttestor attestor(options, Names());
  absl::StatusOr<Attestation> result = attestor.AttestDetailed(100);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(Strings(result->selectors), Contains("unix:path:" + exe.string()));
  for (const std::string& s : Strings(result->selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:sha256:")));
  }
  EXPECT_THAT(result->notes, Contains(HasSubstr("hash limit")));
  EXPECT_EQ(attestor.HashComputationsForTesting(), 0u);
}

TEST_F(UnixAttestorTest, HashAtExactlyTheCapIsComputed) {
  AddProcess(100, 5000, "agent", "abc");
  UnixAttestorOptions options = Options();
  options.max_hash_bytes = 3;
  UnixAttestor attestor(options, Names());
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  EXPECT_THAT(Strings(*selectors), Contains(absl::StrCat("unix:sha256:", kAbcSha256)));
}

TEST_F(UnixAttestorTest, HashingCanBeDisabled) {
  AddProcess(100, 5000);
  UnixAttestorOptions options = Options();
  options.hash_executables = false;
  UnixAttestor attestor(options, Names());
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  for (const std::string& s : Strings(*selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:sha256:")));
  }
}

TEST_F(UnixAttestorTest, DeletedExecutableOmitsPathAndHashWithNote) {
  AddProcess(100, 5000);
  fs::remove(PidDir(100) / "exe");
  fs::create_symlink((root_ / "bin" / "agent").string() + " (deleted)", PidDir(100) / "exe");
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<Attestation> result = attestor.AttestDetailed(100);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const std::string& s : Strings(result->selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:path:")));
    EXPECT_THAT(s, Not(HasSubstr("unix:sha256:")));
  }
  EXPECT_THAT(result->notes, Contains(HasSubstr("deleted")));
  EXPECT_THAT(Strings(result->selectors), Contains("unix:uid:1001"));
}

TEST_F(UnixAttestorTest, UnreadableExeLinkOmitsPathAndHash) {
  AddProcess(100, 5000);
  fs::remove(PidDir(100) / "exe");  // like a kernel thread
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<Attestation> result = attestor.AttestDetailed(100);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const std::string& s : Strings(result->selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:path:")));
  }
  EXPECT_THAT(result->notes, Contains(HasSubstr("cannot read")));
}

TEST_F(UnixAttestorTest, PathWithControlCharacterIsOmittedButHashKept) {
  AddProcess(100, 5000, "bad\nname", "abc");
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<Attestation> result = attestor.AttestDetailed(100);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const std::string& s : Strings(result->selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:path:")));
  }
  EXPECT_THAT(Strings(result->selectors), Contains(absl::StrCat("unix:sha256:", kAbcSha256)));
  EXPECT_THAT(result->notes, Contains(HasSubstr("control characters")));
}

TEST_F(UnixAttestorTest, HashIsCachedForUnchangedFile) {
  AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  ASSERT_TRUE(attestor.Attest(100).ok());
  ASSERT_TRUE(attestor.Attest(100).ok());
  EXPECT_EQ(attestor.HashComputationsForTesting(), 1u);
  EXPECT_EQ(attestor.HashCacheSizeForTesting(), 1u);
}

TEST_F(UnixAttestorTest, CacheInvalidatedWhenContentChangesEvenWithSameSizeAndMtime) {
  fs::path exe = AddProcess(100, 5000, "agent", "abc");
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> first = attestor.Attest(100);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_THAT(Strings(*first), Contains(absl::StrCat("unix:sha256:", kAbcSha256)));

  struct stat original {};
  ASSERT_EQ(stat(exe.c_str(), &original), 0);
  // ctime has coarse (tick) granularity; make sure the rewrite lands in a later tick.
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  WriteFile(exe, "abd");  // same size, same inode
  struct timespec times[2] = {original.st_atim, original.st_mtim};
  ASSERT_EQ(utimensat(AT_FDCWD, exe.c_str(), times, 0), 0);  // put mtime back
  struct stat rewritten {};
  ASSERT_EQ(stat(exe.c_str(), &rewritten), 0);
  ASSERT_EQ(rewritten.st_ino, original.st_ino);
  ASSERT_EQ(rewritten.st_size, original.st_size);
  ASSERT_EQ(rewritten.st_mtim.tv_sec, original.st_mtim.tv_sec);
  ASSERT_EQ(rewritten.st_mtim.tv_nsec, original.st_mtim.tv_nsec);

  absl::StatusOr<std::vector<Selector>> second = attestor.Attest(100);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_THAT(Strings(*second), Contains("unix:sha256:" + Sha256Hex("abd")));
  EXPECT_EQ(attestor.HashComputationsForTesting(), 2u);
}

TEST_F(UnixAttestorTest, CacheInvalidatedWhenSizeChanges) {
  fs::path exe = AddProcess(100, 5000, "agent", "abc");
  UnixAttestor attestor(Options(), Names());
  ASSERT_TRUE(attestor.Attest(100).ok());
  WriteFile(exe, "abcdef");
  absl::StatusOr<std::vector<Selector>> second = attestor.Attest(100);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_THAT(Strings(*second), Contains("unix:sha256:" + Sha256Hex("abcdef")));
}

TEST_F(UnixAttestorTest, CacheIsBounded) {
  AddProcess(100, 5000, "a", "one");
  AddProcess(101, 5001, "b", "two");
  AddProcess(102, 5002, "c", "three");
  UnixAttestorOptions options = Options();
  options.hash_cache_capacity = 2;
  UnixAttestor attestor(options, Names());
  for (int pid : {100, 101, 102}) {
    ASSERT_TRUE(attestor.Attest(pid).ok());
  }
  EXPECT_EQ(attestor.HashCacheSizeForTesting(), 2u);
  // 102 and 101 are cached; 100 was evicted as least recently used.
  ASSERT_TRUE(attestor.Attest(102).ok());
  ASSERT_TRUE(attestor.Attest(101).ok());
  EXPECT_EQ(attestor.HashComputationsForTesting(), 3u);
  ASSERT_TRUE(attestor.Attest(100).ok());
  EXPECT_EQ(attestor.HashComputationsForTesting(), 4u);
}

TEST_F(UnixAttestorTest, CallerNoEntryNeedsIsNotHashed) {
  fs::path exe = AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  std::vector<std::string> asked_with;
  absl::StatusOr<Attestation> result =
      attestor.AttestPinned(100, [&](const std::vector<Selector>& without_hash) {
        asked_with = Strings(without_hash);
        return false;
      });
  ASSERT_TRUE(result.ok()) << result.status();
  // The decision sees everything but the digest, so it can match entries on uid, path, ...
  EXPECT_THAT(asked_with, Contains("unix:uid:1001"));
  EXPECT_THAT(asked_with, Contains("unix:path:" + exe.string()));
  for (const std::string& s : asked_with) EXPECT_THAT(s, Not(HasSubstr("unix:sha256:")));
  for (const std::string& s : Strings(result->selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("unix:sha256:")));
  }
  EXPECT_TRUE(result->hash_not_needed);
  EXPECT_EQ(attestor.HashComputationsForTesting(), 0u);
  EXPECT_EQ(attestor.HashCacheSizeForTesting(), 0u);

  // When an entry could use it, the same caller is hashed.
  absl::StatusOr<Attestation> needed =
      attestor.AttestPinned(100, [](const std::vector<Selector>&) { return true; });
  ASSERT_TRUE(needed.ok()) << needed.status();
  EXPECT_THAT(Strings(needed->selectors), Contains(absl::StrCat("unix:sha256:", kAbcSha256)));
  EXPECT_FALSE(needed->hash_not_needed);
  EXPECT_EQ(attestor.HashComputationsForTesting(), 1u);
}

TEST_F(UnixAttestorTest, RepeatedRewritesOfTheExecutableAreRateLimitedPerUid) {
  fs::path exe = AddProcess(100, 5000, "agent", "abc");
  // A second caller under another uid running its own executable.
  AddProcess(200, 6000, "other", "xyz");
  WriteFile(PidDir(200) / "status",
            "Name:\tother\nUid:\t3000\t3000\t3000\t3000\nGid:\t3000\t3000\t3000\t3000\n"
            "Groups:\t\n");
  int64_t now_ms = 1000;
  UnixAttestorOptions options = Options();
  options.hash_burst_bytes_per_uid = 10;
  options.hash_refill_bytes_per_second = 2;
  options.hash_budget_clock = [&now_ms] { return now_ms; };
  UnixAttestor attestor(options, Names());
  auto sha256_of = [&](int pid) -> std::string {
    absl::StatusOr<Attestation> result = attestor.AttestPinned(pid);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return "";
    return result->identity.exe_sha256_hex;
  };
  // Each rewrite (a new size: a new version for the cache) costs its size from uid 1001's
  // budget of 10 bytes: 3 + 4 fit, 5 more do not.
  EXPECT_EQ(sha256_of(100), kAbcSha256);
  WriteFile(exe, "abcd");
  EXPECT_EQ(sha256_of(100), Sha256Hex("abcd"));
  WriteFile(exe, "abcde");
  EXPECT_EQ(sha256_of(100), "");
  EXPECT_EQ(attestor.HashComputationsForTesting(), 2u);
  EXPECT_EQ(attestor.HashesRateLimitedForTesting(), 1u);
  absl::StatusOr<Attestation> limited = attestor.AttestPinned(100);
  ASSERT_TRUE(limited.ok());
  EXPECT_THAT(limited->notes, Contains(HasSubstr("hashing budget")));
  // Another uid has its own budget.
  EXPECT_EQ(sha256_of(200), Sha256Hex("xyz"));
  // The budget refills with time (2 bytes/s: 5 bytes after 1.5 s more than the 3 left).
  now_ms += 1500;
  EXPECT_EQ(sha256_of(100), Sha256Hex("abcde"));
  // A cache hit costs nothing.
  EXPECT_EQ(sha256_of(100), Sha256Hex("abcde"));
  EXPECT_EQ(attestor.HashComputationsForTesting(), 4u);
}

TEST_F(UnixAttestorTest, ExecutableIdentityNamesTheRunningFile) {
  fs::path exe = AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  struct stat st {};
  ASSERT_EQ(stat(exe.c_str(), &st), 0);
  absl::StatusOr<ExecutableFile> running = attestor.ReadExecutable(100);
  ASSERT_TRUE(running.ok()) << running.status();
  EXPECT_EQ(running->device, static_cast<uint64_t>(st.st_dev));
  EXPECT_EQ(running->inode, static_cast<uint64_t>(st.st_ino));
  absl::StatusOr<Attestation> result = attestor.AttestPinned(100);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->identity.exe_known);
  EXPECT_EQ(result->identity.exe_device, running->device);
  EXPECT_EQ(result->identity.exe_inode, running->inode);
  EXPECT_EQ(attestor.ReadExecutable(4321).status().code(), absl::StatusCode::kNotFound);
}

TEST(HashBudgetTest, RefillsOverTimeAndForgetsFullBucketsWhenFull) {
  int64_t now_ms = 0;
  HashBudget budget(100, 10, /*max_tracked_uids=*/2, [&now_ms] { return now_ms; });
  EXPECT_FALSE(budget.TryConsume(1, 101));  // never more than the burst
  EXPECT_TRUE(budget.TryConsume(1, 100));
  EXPECT_FALSE(budget.TryConsume(1, 1));
  now_ms += 1000;  // +10 bytes
  EXPECT_TRUE(budget.TryConsume(1, 10));
  EXPECT_FALSE(budget.TryConsume(1, 1));
  EXPECT_TRUE(budget.TryConsume(2, 50));
  // Two uids tracked, both below full: a third must wait rather than evict one of them.
  EXPECT_FALSE(budget.TryConsume(3, 1));
  now_ms += 10000;  // both full again: forgotten to make room
  EXPECT_TRUE(budget.TryConsume(3, 1));
  EXPECT_TRUE(budget.TryConsume(1, 100));
}

TEST_F(UnixAttestorTest, ReadStartTimeHandlesCommWithSpacesAndParens) {
  AddProcess(100, 5000);
  WriteFile(PidDir(100) / "stat", StatLine(100, "a) (b c) S 1 2 3", 424242));
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<uint64_t> start = attestor.ReadStartTime(100);
  ASSERT_TRUE(start.ok()) << start.status();
  EXPECT_EQ(*start, 424242u);
  EXPECT_TRUE(attestor.Attest(100, 424242).ok());
}

TEST_F(UnixAttestorTest, ReadStartTimeOfMissingPidIsNotFound) {
  UnixAttestor attestor(Options(), Names());
  EXPECT_EQ(attestor.ReadStartTime(999).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(UnixAttestorTest, ExpectedStartTimeMismatchIsPermissionDenied) {
  AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> result = attestor.Attest(100, 4999);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("process changed during attestation"));
  EXPECT_TRUE(attestor.Attest(100, 5000).ok());
}

TEST_F(UnixAttestorTest, StartTimeChangeDuringAttestationIsPermissionDenied) {
  AddProcess(100, 5000);
  fs::path stat_file = PidDir(100) / "stat";
  // The pid is reused by another process while the attestor is reading.
  UnixAttestor attestor(Options(), std::make_unique<HookedUserDb>([&] {
                          WriteFile(stat_file, StatLine(100, "other", 6000));
                        }));
  absl::StatusOr<std::vector<Selector>> result = attestor.Attest(100);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("process changed during attestation"));
}

TEST_F(UnixAttestorTest, MissingPidIsPermissionDenied) {
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> result = attestor.Attest(4321);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("caller process 4321 no longer exists"));
}

TEST_F(UnixAttestorTest, ProcessExitingDuringAttestationIsPermissionDenied) {
  AddProcess(100, 5000);
  fs::path dir = PidDir(100);
  UnixAttestor attestor(Options(), std::make_unique<HookedUserDb>([&] {
                          std::error_code ignored;
                          fs::remove_all(dir, ignored);
                        }));
  absl::StatusOr<std::vector<Selector>> result = attestor.Attest(100);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("no longer exists"));
}

TEST_F(UnixAttestorTest, PinnedAttestationGivesTheSameSelectorsWithoutStartTime) {
  AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<Attestation> detailed = attestor.AttestDetailed(100);
  absl::StatusOr<Attestation> pinned = attestor.AttestPinned(100);
  ASSERT_TRUE(detailed.ok()) << detailed.status();
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(Strings(pinned->selectors), Strings(detailed->selectors));
  EXPECT_EQ(pinned->identity.uid, 1001u);
  EXPECT_EQ(pinned->identity.start_time_ticks, 0u);
}

TEST_F(UnixAttestorTest, PinnedAttestationOfAMissingProcessIsPermissionDenied) {
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<Attestation> missing = attestor.AttestPinned(4321);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("4321 no longer exists"));
  EXPECT_EQ(attestor.AttestPinned(0).status().code(), absl::StatusCode::kInvalidArgument);

  // A process exiting after its reads began is the caller's to notice (its pidfd); the attestor
  // has no start time to compare in this mode.
}

TEST_F(UnixAttestorTest, NonPositivePidIsInvalidArgument) {
  UnixAttestor attestor(Options(), Names());
  EXPECT_EQ(attestor.Attest(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(attestor.Attest(-5).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(UnixAttestorTest, MalformedStatusFailsWithPathInMessage) {
  AddProcess(100, 5000);
  WriteFile(PidDir(100) / "status", "Name:\tagent\nUid:\tnope\n");
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> result = attestor.Attest(100);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("100/status"));
}

TEST_F(UnixAttestorTest, OversizedStatFileIsRefused) {
  AddProcess(100, 5000);
  WriteFile(PidDir(100) / "stat", StatLine(100, std::string(70000, 'x'), 5000));
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<uint64_t> start = attestor.ReadStartTime(100);
  ASSERT_FALSE(start.ok());
  EXPECT_EQ(start.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST_F(UnixAttestorTest, UserServiceYieldsSystemUnitAndUserUnit) {
  AddProcess(100, 5000);
  WriteFile(PidDir(100) / "cgroup",
            "0::/user.slice/user-1001.slice/user@1001.service/app.slice/bar.service\n");
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  EXPECT_THAT(Strings(*selectors), Contains("systemd:unit:user@1001.service"));
  EXPECT_THAT(Strings(*selectors), Contains("systemd:user_unit:bar.service"));
  EXPECT_THAT(Strings(*selectors), Not(Contains("systemd:unit:bar.service")));
}

TEST_F(UnixAttestorTest, ScopeYieldsNoSystemdSelector) {
  AddProcess(100, 5000);
  WriteFile(PidDir(100) / "cgroup", "0::/user.slice/user-1001.slice/session-4.scope\n");
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> selectors = attestor.Attest(100);
  ASSERT_TRUE(selectors.ok()) << selectors.status();
  for (const std::string& s : Strings(*selectors)) {
    EXPECT_THAT(s, Not(HasSubstr("systemd:")));
  }
}

TEST_F(UnixAttestorTest, MalformedOrMissingCgroupOmitsSystemdButAttests) {
  AddProcess(100, 5000);
  WriteFile(PidDir(100) / "cgroup", "garbage");
  AddProcess(101, 5001, "b");
  fs::remove(PidDir(101) / "cgroup");
  UnixAttestor attestor(Options(), Names());
  for (int pid : {100, 101}) {
    absl::StatusOr<Attestation> result = attestor.AttestDetailed(pid);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_THAT(result->notes, Contains(HasSubstr("systemd selectors omitted")));
    EXPECT_THAT(Strings(result->selectors), Contains("unix:uid:1001"));
  }
}

TEST_F(UnixAttestorTest, ConcurrentAttestationsAgree) {
  AddProcess(100, 5000);
  UnixAttestor attestor(Options(), Names());
  absl::StatusOr<std::vector<Selector>> expected = attestor.Attest(100);
  ASSERT_TRUE(expected.ok());
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        absl::StatusOr<std::vector<Selector>> got = attestor.Attest(100, 5000);
        if (!got.ok() || *got != *expected) ++mismatches[t];
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_THAT(mismatches, ElementsAre(0, 0, 0, 0));
  EXPECT_EQ(attestor.HashComputationsForTesting(), 1u);
}

TEST(ExeHashCacheTest, KeyIncludesEveryField) {
  ExeHashCache cache(16);
  FileVersion base{1, 2, 3, 4, 5, 6, 7};
  cache.Insert(base, "h");
  EXPECT_EQ(cache.Lookup(base), "h");
  for (int field = 0; field < 7; ++field) {
    FileVersion changed = base;
    int64_t* fields[] = {nullptr,
                         nullptr,
                         &changed.size,
                         &changed.mtime_sec,
                         &changed.mtime_nsec,
                         &changed.ctime_sec,
                         &changed.ctime_nsec};
    if (field == 0) {
      changed.device++;
    } else if (field == 1) {
      changed.inode++;
    } else {
      ++*fields[field];
    }
    EXPECT_EQ(cache.Lookup(changed), std::nullopt) << "field " << field;
  }
}

TEST(ExeHashCacheTest, ZeroCapacityCachesNothing) {
  ExeHashCache cache(0);
  cache.Insert(FileVersion{}, "h");
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_EQ(cache.Lookup(FileVersion{}), std::nullopt);
}

TEST(SystemUserDbTest, ResolvesRoot) {
  SystemUserDb db;
  EXPECT_EQ(db.UserName(0), "root");
  EXPECT_EQ(db.GroupName(0), "root");
  EXPECT_EQ(db.UserName(4000000000u), std::nullopt);
}

TEST(RealProcessTest, AttestsCurrentProcessThroughProc) {
  UnixAttestor attestor;  // /proc and the system user database
  absl::StatusOr<uint64_t> start = attestor.ReadStartTime(getpid());
  ASSERT_TRUE(start.ok()) << start.status();
  absl::StatusOr<Attestation> result = attestor.AttestDetailed(getpid(), *start);
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<std::string> selectors = Strings(result->selectors);

  // The attestor reports effective ids; in a test run they equal the real ones.
  EXPECT_THAT(selectors, Contains(absl::StrCat("unix:uid:", geteuid())));
  EXPECT_THAT(selectors, Contains(absl::StrCat("unix:gid:", getegid())));
  fs::path self_exe = fs::read_symlink("/proc/self/exe");
  EXPECT_THAT(selectors, Contains("unix:path:" + self_exe.string()));
  EXPECT_THAT(selectors, Contains("unix:sha256:" + Sha256Hex(ReadAll(self_exe))));
  for (const Selector& s : result->selectors) {
    EXPECT_TRUE(spiffe::ValidateSelector(s).ok()) << s;
  }
  EXPECT_FALSE(attestor.Attest(getpid(), *start + 1).ok());
}

}  // namespace
}  // namespace mandate::unix_attestor
