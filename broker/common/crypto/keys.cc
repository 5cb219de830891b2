#include "broker/common/crypto/keys.h"

#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "broker/common/util/status_macros.h"

namespace mandate::crypto {
namespace {

struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
using BioPtr = std::unique_ptr<BIO, BioDeleter>;

struct MdCtxDeleter {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, MdCtxDeleter>;

std::string BioContents(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string();
}

}  // namespace

void EvpPkeyDeleter::operator()(EVP_PKEY* key) const { EVP_PKEY_free(key); }

std::string OpenSslErrors() {
  std::string out;
  unsigned long code;
  while ((code = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(code, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown OpenSSL error" : out;
}

namespace {
KeyType KeyTypeOf(EVP_PKEY* key) {
  if (EVP_PKEY_is_a(key, "EC")) {
    char group[64] = {0};
    size_t len = 0;
    if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof(group),
                                       &len) != 1) {
      return KeyType::kOther;
    }
    std::string_view name(group, len);
    if (name == "prime256v1" || name == "P-256") return KeyType::kEcP256;
    if (name == "secp384r1" || name == "P-384") return KeyType::kEcP384;
    return KeyType::kOther;
  }
  if (EVP_PKEY_is_a(key, "RSA")) return KeyType::kRsa;
  if (EVP_PKEY_is_a(key, "ED25519")) return KeyType::kEd25519;
  return KeyType::kOther;
}

bool UsesDigest(EVP_PKEY* key) { return !EVP_PKEY_is_a(key, "ED25519"); }
}  // namespace

// ---------------------------------------------------------------------------- PublicKey

absl::StatusOr<PublicKey> PublicKey::FromSpkiDer(std::string_view der) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  const unsigned char* end = p + der.size();
  EVP_PKEY* key = d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size()));
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid SubjectPublicKeyInfo: ", OpenSslErrors()));
  }
  EvpPkeyPtr owned(key);
  if (p != end) return absl::InvalidArgumentError("trailing bytes after SubjectPublicKeyInfo");
  return PublicKey(std::move(owned));
}

absl::StatusOr<PublicKey> PublicKey::FromPem(std::string_view pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return absl::InternalError("BIO_new_mem_buf failed");
  EVP_PKEY* key = PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr);
  if (key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("invalid PEM public key: ", OpenSslErrors()));
  }
  return PublicKey(EvpPkeyPtr(key));
}

PublicKey PublicKey::FromEvp(EVP_PKEY* key) {
  EVP_PKEY_up_ref(key);
  return PublicKey(EvpPkeyPtr(key));
}

PublicKey::PublicKey(const PublicKey& other) {
  EVP_PKEY_up_ref(other.key_.get());
  key_.reset(other.key_.get());
}

PublicKey& PublicKey::operator=(const PublicKey& other) {
  if (this != &other) {
    EVP_PKEY_up_ref(other.key_.get());
    key_.reset(other.key_.get());
  }
  return *this;
}

KeyType PublicKey::type() const { return KeyTypeOf(key_.get()); }

std::string PublicKey::SpkiDer() const {
  unsigned char* der = nullptr;
  int len = i2d_PUBKEY(key_.get(), &der);
  if (len <= 0) return {};
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_free(der);
  return out;
}

std::string PublicKey::ToPem() const {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), key_.get()) != 1) return {};
  return BioContents(bio.get());
}

bool PublicKey::VerifyDer(std::string_view data, std::string_view der_signature,
                          std::string_view digest) const {
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx) return false;
  std::string md(digest);
  if (EVP_DigestVerifyInit_ex(ctx.get(), nullptr, UsesDigest(key_.get()) ? md.c_str() : nullptr,
                              nullptr, nullptr, key_.get(), nullptr) <= 0) {
    ERR_clear_error();
    return false;
  }
  int rc = EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(der_signature.data()),
                            der_signature.size(),
                            reinterpret_cast<const unsigned char*>(data.data()), data.size());
  ERR_clear_error();
  return rc == 1;
}

bool PublicKey::Equals(const PublicKey& other) const {
  return EVP_PKEY_eq(key_.get(), other.key_.get()) == 1;
}

// ---------------------------------------------------------------------------- PrivateKey

absl::StatusOr<PrivateKey> PrivateKey::GenerateP256() {
  // One key generation context per thread, set up once: looking the EC implementation up by
  // name on every call (what EVP_PKEY_Q_keygen does) took longer than generating the key. A
  // context is not thread-safe, hence one per thread.
  struct CtxFree {
    void operator()(EVP_PKEY_CTX* ctx) const { EVP_PKEY_CTX_free(ctx); }
  };
  thread_local std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx;
  if (ctx == nullptr) {
    std::unique_ptr<EVP_PKEY_CTX, CtxFree> fresh(
        EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    if (fresh == nullptr || EVP_PKEY_keygen_init(fresh.get()) <= 0 ||
        EVP_PKEY_CTX_set_group_name(fresh.get(), "P-256") <= 0) {
      return absl::InternalError(
          absl::StrCat("P-256 key generation setup failed: ", OpenSslErrors()));
    }
    ctx = std::move(fresh);
  }
  EVP_PKEY* key = nullptr;
  if (EVP_PKEY_generate(ctx.get(), &key) <= 0 || key == nullptr) {
    EVP_PKEY_free(key);
    return absl::InternalError(absl::StrCat("P-256 key generation failed: ", OpenSslErrors()));
  }
  return PrivateKey(EvpPkeyPtr(key));
}

absl::StatusOr<PrivateKey> PrivateKey::FromPkcs8Der(std::string_view der) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  EVP_PKEY* key = d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der.size()));
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid PKCS#8 private key: ", OpenSslErrors()));
  }
  return PrivateKey(EvpPkeyPtr(key));
}

absl::StatusOr<PrivateKey> PrivateKey::FromPem(std::string_view pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (!bio) return absl::InternalError("BIO_new_mem_buf failed");
  EVP_PKEY* key = PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr);
  if (key == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("invalid PEM private key: ", OpenSslErrors()));
  }
  return PrivateKey(EvpPkeyPtr(key));
}

KeyType PrivateKey::type() const { return KeyTypeOf(key_.get()); }

PublicKey PrivateKey::public_key() const { return PublicKey::FromEvp(key_.get()); }

absl::StatusOr<std::string> PrivateKey::SignDer(std::string_view data,
                                                std::string_view digest) const {
  MdCtxPtr ctx(EVP_MD_CTX_new());
  if (!ctx) return absl::InternalError("EVP_MD_CTX_new failed");
  std::string md(digest);
  if (EVP_DigestSignInit_ex(ctx.get(), nullptr, UsesDigest(key_.get()) ? md.c_str() : nullptr,
                            nullptr, nullptr, key_.get(), nullptr) <= 0) {
    return absl::InternalError(absl::StrCat("sign init failed: ", OpenSslErrors()));
  }
  size_t len = 0;
  const auto* in = reinterpret_cast<const unsigned char*>(data.data());
  if (EVP_DigestSign(ctx.get(), nullptr, &len, in, data.size()) <= 0) {
    return absl::InternalError(absl::StrCat("sign failed: ", OpenSslErrors()));
  }
  std::string sig(len, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, in,
                     data.size()) <= 0) {
    return absl::InternalError(absl::StrCat("sign failed: ", OpenSslErrors()));
  }
  sig.resize(len);
  return sig;
}

std::string PrivateKey::ExportPkcs8DerSecret() const {
  unsigned char* der = nullptr;
  PKCS8_PRIV_KEY_INFO* info = EVP_PKEY2PKCS8(key_.get());
  if (info == nullptr) return {};
  int len = i2d_PKCS8_PRIV_KEY_INFO(info, &der);
  PKCS8_PRIV_KEY_INFO_free(info);
  if (len <= 0) return {};
  std::string out(reinterpret_cast<char*>(der), static_cast<size_t>(len));
  OPENSSL_clear_free(der, static_cast<size_t>(len));
  return out;
}

std::string PrivateKey::ExportPemSecret() const {
  BioPtr bio(BIO_new(BIO_s_secmem()));
  if (!bio) return {};
  if (PEM_write_bio_PKCS8PrivateKey(bio.get(), key_.get(), nullptr, nullptr, 0, nullptr, nullptr) !=
      1) {
    return {};
  }
  return BioContents(bio.get());
}

// ---------------------------------------------------------------------------- helpers

std::string Sha256(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<char*>(md), len);
}

std::string HmacSha256(std::string_view key, std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
           reinterpret_cast<const unsigned char*>(data.data()), data.size(), md, &len) == nullptr) {
    return std::string();
  }
  return std::string(reinterpret_cast<char*>(md), len);
}

std::string Base64Encode(std::string_view bytes) {
  std::string out(4 * ((bytes.size() + 2) / 3) + 1, '\0');
  int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(out.data()),
                          reinterpret_cast<const unsigned char*>(bytes.data()),
                          static_cast<int>(bytes.size()));
  out.resize(n > 0 ? static_cast<size_t>(n) : 0);
  return out;
}

std::string HexEncode(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 0xf]);
  }
  return out;
}

absl::StatusOr<std::string> HexDecode(std::string_view hex) {
  if (hex.size() % 2 != 0) return absl::InvalidArgumentError("hex string has odd length");
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(hex.size() / 2);
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return absl::InvalidArgumentError("invalid hex digit");
    out.push_back(static_cast<char>(hi << 4 | lo));
  }
  return out;
}

absl::StatusOr<std::string> RandomBytes(size_t n) {
  std::string out(n, '\0');
  if (n > 0 && RAND_bytes(reinterpret_cast<unsigned char*>(out.data()), static_cast<int>(n)) != 1) {
    return absl::InternalError(absl::StrCat("RAND_bytes failed: ", OpenSslErrors()));
  }
  return out;
}

absl::StatusOr<std::string> TimeOrderedId() {
  ASSIGN_OR_RETURN(std::string id, RandomBytes(16));
  const uint64_t ms = static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                std::chrono::system_clock::now().time_since_epoch())
                                                .count());
  for (int i = 0; i < 6; ++i) id[i] = static_cast<char>((ms >> (8 * (5 - i))) & 0xff);
  return id;
}

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

absl::Status WriteFileAtomic(const std::string& path, std::string_view contents, uint32_t mode) {
  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) {
    return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  }
  // The umask may have narrowed the mode; secrets must be exactly `mode`, others at most.
  ::fchmod(fd, mode);
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t w = ::write(fd, contents.data() + done, contents.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return absl::InternalError(absl::StrCat("cannot write ", tmp, ": ", std::strerror(err)));
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat("fsync ", tmp, ": ", std::strerror(err)));
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat("rename to ", path, ": ", std::strerror(err)));
  }
  std::string dir = ".";
  if (auto slash = path.rfind('/'); slash != std::string::npos) {
    dir = slash == 0 ? "/" : path.substr(0, slash);
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, " does not exist"));
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  std::string out;
  char buf[16384];
  for (;;) {
    ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot read ", path, ": ", std::strerror(err)));
    }
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  ::close(fd);
  return out;
}

absl::StatusOr<PrivateKey> LoadOrCreateP256Key(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if ((st.st_mode & 077) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("key file ", path, " is accessible by group or others; chmod 600 it"));
    }
    ASSIGN_OR_RETURN(std::string pem, ReadFile(path));
    auto key = PrivateKey::FromPem(pem);
    OPENSSL_cleanse(pem.data(), pem.size());
    if (!key.ok()) {
      return absl::DataLossError(absl::StrCat("key file ", path, ": ", key.status().message()));
    }
    return key;
  }
  if (errno != ENOENT) {
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", std::strerror(errno)));
  }
  ASSIGN_OR_RETURN(PrivateKey key, PrivateKey::GenerateP256());
  std::string pem = key.ExportPemSecret();
  if (pem.empty()) return absl::InternalError("cannot encode new private key");
  absl::Status written = WriteFileAtomic(path, pem, 0600);
  OPENSSL_cleanse(pem.data(), pem.size());
  RETURN_IF_ERROR(written);
  return key;
}

}  // namespace mandate::crypto
