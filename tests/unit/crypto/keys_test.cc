#include "broker/common/crypto/keys.h"

#include <stdlib.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "gtest/gtest.h"

namespace mandate::crypto {
namespace {

class KeyFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string templ = (std::filesystem::temp_directory_path() / "mandate-keys-XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

TEST(KeysTest, GenerateP256HasP256Type) {
  auto key = PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok()) << key.status();
  EXPECT_EQ(key->type(), KeyType::kEcP256);
  EXPECT_EQ(key->public_key().type(), KeyType::kEcP256);
}

TEST(KeysTest, PemRoundTripKeepsTheKey) {
  auto key = PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok());
  auto again = PrivateKey::FromPem(key->ExportPemSecret());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->public_key().Equals(key->public_key()));
  auto pub = PublicKey::FromPem(key->public_key().ToPem());
  ASSERT_TRUE(pub.ok()) << pub.status();
  EXPECT_TRUE(pub->Equals(key->public_key()));
}

TEST(KeysTest, Pkcs8DerRoundTripKeepsTheKey) {
  auto key = PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok());
  auto again = PrivateKey::FromPkcs8Der(key->ExportPkcs8DerSecret());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->public_key().Equals(key->public_key()));
}

TEST(KeysTest, SpkiDerRejectsTrailingBytes) {
  auto key = PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok());
  std::string spki = key->public_key().SpkiDer();
  EXPECT_TRUE(PublicKey::FromSpkiDer(spki).ok());
  EXPECT_FALSE(PublicKey::FromSpkiDer(spki + "x").ok());
}

TEST(KeysTest, DifferentKeysAreNotEqual) {
  auto a = PrivateKey::GenerateP256();
  auto b = PrivateKey::GenerateP256();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_FALSE(a->public_key().Equals(b->public_key()));
}

// GenerateP256 reuses one generation context per thread: keys from one thread and from several
// must all differ and all sign.
TEST(KeysTest, GenerateP256GivesDistinctWorkingKeysAcrossCallsAndThreads) {
  std::vector<std::string> spkis;
  std::mutex mu;
  auto make = [&] {
    for (int i = 0; i < 20; ++i) {
      auto key = PrivateKey::GenerateP256();
      ASSERT_TRUE(key.ok()) << key.status();
      auto sig = key->SignDer("data");
      ASSERT_TRUE(sig.ok());
      EXPECT_TRUE(key->public_key().VerifyDer("data", *sig));
      std::lock_guard<std::mutex> lock(mu);
      spkis.push_back(key->public_key().SpkiDer());
    }
  };
  std::thread a(make), b(make);
  make();
  a.join();
  b.join();
  std::sort(spkis.begin(), spkis.end());
  EXPECT_EQ(std::unique(spkis.begin(), spkis.end()), spkis.end());
  EXPECT_EQ(spkis.size(), 60u);
}

TEST(KeysTest, SignDerVerifiesAndTamperedDataDoesNot) {
  auto key = PrivateKey::GenerateP256();
  ASSERT_TRUE(key.ok());
  auto sig = key->SignDer("payload");
  ASSERT_TRUE(sig.ok()) << sig.status();
  EXPECT_TRUE(key->public_key().VerifyDer("payload", *sig));
  EXPECT_FALSE(key->public_key().VerifyDer("payloaD", *sig));
  std::string bad = *sig;
  bad.back() ^= 0x01;
  EXPECT_FALSE(key->public_key().VerifyDer("payload", bad));
  auto other = PrivateKey::GenerateP256();
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->public_key().VerifyDer("payload", *sig));
}

TEST(KeysTest, Sha256MatchesKnownVector) {
  EXPECT_EQ(HexEncode(Sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(KeysTest, HexRoundTripAndRejectsBadInput) {
  std::string bytes("\x00\x01\xab\xff", 4);
  EXPECT_EQ(HexEncode(bytes), "0001abff");
  auto decoded = HexDecode("0001ABff");
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*decoded, bytes);
  EXPECT_FALSE(HexDecode("abc").ok());
  EXPECT_FALSE(HexDecode("zz").ok());
}

TEST(KeysTest, RandomBytesHaveRequestedLengthAndDiffer) {
  auto a = RandomBytes(32);
  auto b = RandomBytes(32);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->size(), 32u);
  EXPECT_NE(*a, *b);
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

TEST(KeysTest, TimeOrderedIdsCarryTheTimeThenRandomBytes) {
  const int64_t before = NowMs();
  auto id = TimeOrderedId();
  const int64_t after = NowMs();
  ASSERT_TRUE(id.ok());
  ASSERT_EQ(id->size(), 16u);
  int64_t ms = 0;
  for (int i = 0; i < 6; ++i) ms = (ms << 8) | static_cast<unsigned char>((*id)[i]);
  EXPECT_GE(ms, before);
  EXPECT_LE(ms, after);
  EXPECT_NE(static_cast<unsigned char>((*id)[0]), 0) << "a positive serial without a zero byte";
}

TEST(KeysTest, TimeOrderedIdsAreUniqueAndSortByTime) {
  std::set<std::string> seen;
  for (int i = 0; i < 20000; ++i) {
    auto id = TimeOrderedId();
    ASSERT_TRUE(id.ok());
    EXPECT_TRUE(seen.insert(*id).second) << "duplicate id";
  }
  // Ids from later milliseconds sort after earlier ones, as hex strings too (the index key).
  auto first = TimeOrderedId();
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  auto second = TimeOrderedId();
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_LT(HexEncode(*first), HexEncode(*second));
  // Within one millisecond the 80 random bits still differ.
  EXPECT_NE(first->substr(6), second->substr(6));
}

TEST(KeysTest, ConstantTimeEqualsComparesContentAndLength) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secreT"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret1"));
}

TEST_F(KeyFilesTest, WriteFileAtomicWritesContentsWithMode0600) {
  std::string path = Path("secret");
  ASSERT_TRUE(WriteFileAtomic(path, "hello").ok());
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto read = ReadFile(path);
  ASSERT_TRUE(read.ok());
  EXPECT_EQ(*read, "hello");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST_F(KeyFilesTest, ReadFileOfMissingFileIsNotFound) {
  EXPECT_EQ(ReadFile(Path("missing")).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(KeyFilesTest, LoadOrCreateP256KeyCreatesThenReusesTheSameKey) {
  std::string path = Path("key.pem");
  auto first = LoadOrCreateP256Key(path);
  ASSERT_TRUE(first.ok()) << first.status();
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto second = LoadOrCreateP256Key(path);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_TRUE(second->public_key().Equals(first->public_key()));
}

TEST_F(KeyFilesTest, LoadOrCreateP256KeyRefusesGroupReadableKeyFile) {
  std::string path = Path("key.pem");
  ASSERT_TRUE(LoadOrCreateP256Key(path).ok());
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  auto key = LoadOrCreateP256Key(path);
  EXPECT_EQ(key.status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace mandate::crypto
