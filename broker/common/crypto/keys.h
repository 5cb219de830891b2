// Asymmetric keys on OpenSSL 3 EVP, plus the few digest/random/file helpers every module needs.
//
// Keys are held as EVP_PKEY behind value types that cannot be invalid: the only way in is a
// static factory returning StatusOr. Private key bytes are reachable only through functions
// whose names say so (ExportPkcs8DerSecret), so secret handling stays greppable.
//
// Thread-safety: PublicKey and PrivateKey are immutable after creation; const methods may be
// called concurrently (OpenSSL 3 EVP_PKEY is safe for concurrent signing/verifying with
// separate EVP_MD_CTX objects, which every method here creates per call).
#ifndef MANDATE_BROKER_COMMON_CRYPTO_KEYS_H_
#define MANDATE_BROKER_COMMON_CRYPTO_KEYS_H_

#include <openssl/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::crypto {

struct EvpPkeyDeleter {
  void operator()(EVP_PKEY* key) const;
};
using EvpPkeyPtr = std::unique_ptr<EVP_PKEY, EvpPkeyDeleter>;

enum class KeyType { kEcP256, kEcP384, kRsa, kEd25519, kOther };

class PublicKey {
 public:
  // Parses a DER SubjectPublicKeyInfo. Rejects trailing bytes.
  static absl::StatusOr<PublicKey> FromSpkiDer(std::string_view der);
  // Parses a PEM "PUBLIC KEY" block.
  static absl::StatusOr<PublicKey> FromPem(std::string_view pem);
  // Takes shared ownership of `key` (increments its reference count). `key` must not be null.
  static PublicKey FromEvp(EVP_PKEY* key);

  PublicKey(const PublicKey& other);
  PublicKey& operator=(const PublicKey& other);
  PublicKey(PublicKey&&) noexcept = default;
  PublicKey& operator=(PublicKey&&) noexcept = default;
  ~PublicKey() = default;

  KeyType type() const;
  // DER SubjectPublicKeyInfo.
  std::string SpkiDer() const;
  std::string ToPem() const;
  // Verifies an ASN.1 DER signature over `data` with SHA-256 (or the key's native scheme for
  // Ed25519). Returns false on any mismatch or malformed signature.
  bool VerifyDer(std::string_view data, std::string_view der_signature,
                 std::string_view digest = "SHA256") const;
  bool Equals(const PublicKey& other) const;

  // Borrowed pointer, valid as long as this object lives.
  EVP_PKEY* evp() const { return key_.get(); }

 private:
  explicit PublicKey(EvpPkeyPtr key) : key_(std::move(key)) {}
  EvpPkeyPtr key_;
};

class PrivateKey {
 public:
  // Generates a fresh ECDSA P-256 key.
  static absl::StatusOr<PrivateKey> GenerateP256();
  static absl::StatusOr<PrivateKey> FromPkcs8Der(std::string_view der);
  static absl::StatusOr<PrivateKey> FromPem(std::string_view pem);

  PrivateKey(PrivateKey&&) noexcept = default;
  PrivateKey& operator=(PrivateKey&&) noexcept = default;
  PrivateKey(const PrivateKey&) = delete;
  PrivateKey& operator=(const PrivateKey&) = delete;
  ~PrivateKey() = default;

  KeyType type() const;
  PublicKey public_key() const;

  // Signs `data` with SHA-256 and returns the ASN.1 DER signature (ECDSA-Sig-Value for EC).
  absl::StatusOr<std::string> SignDer(std::string_view data,
                                      std::string_view digest = "SHA256") const;

  // Secret material: only for writing the key to its 0600 file or handing an X509-SVID key to
  // the workload that owns it.
  std::string ExportPkcs8DerSecret() const;
  std::string ExportPemSecret() const;

  // Borrowed pointer, valid as long as this object lives.
  EVP_PKEY* evp() const { return key_.get(); }

 private:
  explicit PrivateKey(EvpPkeyPtr key) : key_(std::move(key)) {}
  EvpPkeyPtr key_;
};

// SHA-256 of `data`, 32 raw bytes.
std::string Sha256(std::string_view data);
// HMAC-SHA256 of `data` under `key` (32 bytes).
std::string HmacSha256(std::string_view key, std::string_view data);
// Standard base64 with padding (RFC 4648 §4), e.g. for JWK x5c members.
std::string Base64Encode(std::string_view bytes);
// Lowercase hex.
std::string HexEncode(std::string_view bytes);
absl::StatusOr<std::string> HexDecode(std::string_view hex);
// `n` bytes from the OpenSSL CSPRNG.
absl::StatusOr<std::string> RandomBytes(size_t n);
// 16 bytes for a credential identifier (jti, certificate serial): the wall-clock time in
// milliseconds since the Unix epoch as 6 big-endian bytes, then 10 bytes (80 bits) from the
// CSPRNG. Unique and unguessable like 16 random bytes, but ordered by issuance time, so an index
// over identifiers (the audit log's) grows at one end instead of dirtying a random page per
// insert. The first byte is non-zero until the year 10889 (so it is also a positive serial).
absl::StatusOr<std::string> TimeOrderedId();
// Constant-time equality for secrets of equal length.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// Writes `contents` to `path` atomically and durably (temp file, fsync, rename, fsync dir)
// with the given mode (default 0600 for secrets).
absl::Status WriteFileAtomic(const std::string& path, std::string_view contents,
                             uint32_t mode = 0600);
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Loads the PEM private key at `path`, or generates a P-256 key and writes it there (0600)
// when the file does not exist. Refuses a key file readable by group or others.
absl::StatusOr<PrivateKey> LoadOrCreateP256Key(const std::string& path);

// The OpenSSL error queue as text (and clears it); for error messages.
std::string OpenSslErrors();

}  // namespace mandate::crypto

#endif  // MANDATE_BROKER_COMMON_CRYPTO_KEYS_H_
