#include "broker/common/dpop/dpop.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace mandate::dpop {
namespace {

// Proof keys already imported, by their JWK's JSON text: a DPoP client signs every proof with the
// same key, and importing it (EVP_PKEY_fromdata) plus hashing its RFC 7638 thumbprint cost about
// a sixth of verifying a token and its proof. Bounded (emptied when full, so a flood of fresh
// keys only costs the import it would have cost anyway); thread-safe.
class ProofKeyCache {
 public:
  struct Entry {
    crypto::PublicKey key;
    std::string jkt;
  };

  static ProofKeyCache& Get() {
    static ProofKeyCache* cache = new ProofKeyCache();
    return *cache;
  }

  std::optional<Entry> Find(const std::string& jwk_json) {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(jwk_json);
    if (it == entries_.end()) return std::nullopt;
    return it->second;
  }

  void Insert(std::string jwk_json, Entry entry) {
    absl::MutexLock lock(&mu_);
    if (entries_.size() >= kMaxEntries) entries_.clear();
    entries_.emplace(std::move(jwk_json), std::move(entry));
  }

 private:
  static constexpr size_t kMaxEntries = 1024;
  absl::Mutex mu_;
  std::unordered_map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
};

using json = nlohmann::json;

// Debian's abseil has its own string_view type (not std::string_view), so std::string_view
// values are copied into std::string before reaching absl::StrCat.
std::string S(std::string_view view) { return std::string(view); }

std::string ToLower(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = absl::ascii_tolower(static_cast<unsigned char>(c));
  return out;
}

// ---------------------------------------------------------------------------- character classes

bool IsUnreserved(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_' ||
         c == '~';
}

bool IsSubDelim(char c) {
  return std::string_view("!$&'()*+,;=").find(c) != std::string_view::npos;
}

// RFC 3986 pchar minus pct-encoded (handled separately), plus "/" for whole paths.
bool IsPathChar(char c) {
  return IsUnreserved(c) || IsSubDelim(c) || c == ':' || c == '@' || c == '/';
}

// RFC 9110 §5.6.2 tchar (methods are tokens).
bool IsTokenChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
         std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

// RFC 9449 §8.1: nonce = 1*NQCHAR, NQCHAR = %x21 / %x23-5B / %x5D-7E.
bool IsValidNonce(std::string_view nonce) {
  if (nonce.empty()) return false;
  for (char c : nonce) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x21 || u > 0x7E || c == '"' || c == '\\') return false;
  }
  return true;
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// ---------------------------------------------------------------------------- URL pieces

// `digits` must be 1..5 ASCII digits (checked by the caller), so this cannot overflow.
uint32_t ParsePort(std::string_view digits) {
  uint32_t value = 0;
  for (char c : digits) value = value * 10 + static_cast<uint32_t>(c - '0');
  return value;
}

absl::StatusOr<std::string> NormalizeHost(std::string_view host) {
  if (host.empty()) return absl::InvalidArgumentError("htu has an empty host");
  if (host.front() == '[') {
    // IP literal (RFC 3986 §3.2.2); IPvFuture is not accepted.
    if (host.size() < 3 || host.back() != ']') {
      return absl::InvalidArgumentError(absl::StrCat("htu host '", S(host), "' is malformed"));
    }
    for (char c : host.substr(1, host.size() - 2)) {
      if (!absl::ascii_isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.') {
        return absl::InvalidArgumentError(
            absl::StrCat("htu IP literal '", S(host), "' contains '", std::string(1, c), "'"));
      }
    }
    return ToLower(host);
  }
  for (char c : host) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '.' && c != '_') {
      return absl::InvalidArgumentError(
          absl::StrCat("htu host '", S(host), "' contains '", std::string(1, c), "'"));
    }
  }
  return ToLower(host);
}

// Normalises percent-encodings (uppercase hex, unreserved characters decoded) and checks that
// every other character is a legal path character.
absl::StatusOr<std::string> NormalizePath(std::string_view path) {
  if (path.empty()) return std::string("/");
  std::string out;
  out.reserve(path.size());
  for (size_t i = 0; i < path.size(); ++i) {
    char c = path[i];
    if (c == '%') {
      if (i + 2 >= path.size()) {
        return absl::InvalidArgumentError("htu path has a truncated percent-encoding");
      }
      int hi = HexValue(path[i + 1]);
      int lo = HexValue(path[i + 2]);
      if (hi < 0 || lo < 0) {
        return absl::InvalidArgumentError("htu path has a malformed percent-encoding");
      }
      char decoded = static_cast<char>(hi * 16 + lo);
      if (IsUnreserved(decoded)) {
        out.push_back(decoded);
      } else {
        static constexpr char kHex[] = "0123456789ABCDEF";
        out.push_back('%');
        out.push_back(kHex[hi]);
        out.push_back(kHex[lo]);
      }
      i += 2;
      continue;
    }
    if (!IsPathChar(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("htu path contains '", std::string(1, c), "'"));
    }
    out.push_back(c);
  }
  for (size_t start = 0; start <= out.size();) {
    size_t end = out.find('/', start);
    if (end == std::string::npos) end = out.size();
    std::string_view segment = std::string_view(out).substr(start, end - start);
    start = end + 1;
    if (segment == "." || segment == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat("htu path segment '", S(segment), "' is not allowed"));
    }
  }
  return out;
}

// ---------------------------------------------------------------------------- verification

absl::Status Refuse(const std::string& why) {
  return absl::UnauthenticatedError(absl::StrCat("invalid DPoP proof: ", why));
}

bool SecretEquals(std::string_view a, std::string_view b) {
  return a.size() == b.size() && crypto::ConstantTimeEquals(a, b);
}

// The algorithms RFC 9449 proofs may use here: kProofAlgorithms, spelled out rather than
// "whatever jose parses" so that adding an algorithm to jose does not silently widen DPoP.
bool IsAllowedDpopAlgorithm(jose::Algorithm alg) {
  std::string_view name = jose::AlgorithmName(alg);
  for (const char* allowed : kProofAlgorithms) {
    if (name == allowed) return true;
  }
  return false;
}

// Reads a NumericDate (RFC 7519 §2: may be fractional) as whole seconds.
absl::StatusOr<int64_t> ReadIat(const json& payload) {
  auto it = payload.find("iat");
  if (it == payload.end()) return Refuse("iat claim is missing");
  if (it->is_number_integer() && !it->is_number_unsigned()) return it->get<int64_t>();
  if (it->is_number_unsigned()) {
    uint64_t value = it->get<uint64_t>();
    if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max() / 2)) {
      return Refuse("iat claim is out of range");
    }
    return static_cast<int64_t>(value);
  }
  if (it->is_number_float()) {
    double value = it->get<double>();
    // 1e15 s is ~31 million years: any real iat fits, and the cast below cannot overflow.
    if (!std::isfinite(value) || std::fabs(value) > 1e15)
      return Refuse("iat claim is out of range");
    return static_cast<int64_t>(std::floor(value));
  }
  return Refuse("iat claim is not a number");
}

absl::StatusOr<std::string> ReadStringClaim(const json& payload, const char* name) {
  auto it = payload.find(name);
  if (it == payload.end()) return Refuse(absl::StrCat(name, " claim is missing"));
  if (!it->is_string()) return Refuse(absl::StrCat(name, " claim is not a string"));
  return it->get<std::string>();
}

}  // namespace

// ---------------------------------------------------------------------------- public functions

absl::StatusOr<std::string> NormalizeHtu(std::string_view url) {
  for (char c : url) {
    unsigned char u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u >= 0x7F) {
      return absl::InvalidArgumentError("htu contains a control, space or non-ASCII character");
    }
  }
  size_t scheme_end = url.find("://");
  if (scheme_end == std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("htu '", S(url), "' is not an absolute http(s) URL"));
  }
  std::string scheme = ToLower(url.substr(0, scheme_end));
  if (scheme != "http" && scheme != "https") {
    return absl::InvalidArgumentError(
        absl::StrCat("htu scheme '", scheme, "' is not http or https"));
  }
  std::string_view rest = url.substr(scheme_end + 3);
  size_t authority_end = rest.find_first_of("/?#");
  std::string_view authority = rest.substr(0, authority_end);
  std::string_view path_and_more =
      authority_end == std::string_view::npos ? std::string_view() : rest.substr(authority_end);
  std::string_view path = path_and_more.substr(0, path_and_more.find_first_of("?#"));

  if (authority.find('@') != std::string_view::npos) {
    return absl::InvalidArgumentError("htu must not contain userinfo");
  }
  std::string_view host = authority;
  std::string_view port;
  size_t colon = authority.rfind(':');
  size_t bracket = authority.rfind(']');
  if (colon != std::string_view::npos && (bracket == std::string_view::npos || colon > bracket)) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
    if (!host.empty() && host.front() != '[' && host.find(':') != std::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("htu authority '", S(authority), "' has more than one ':'"));
    }
  }
  ASSIGN_OR_RETURN(std::string normalized_host, NormalizeHost(host));

  std::string normalized_port;
  if (!port.empty()) {  // "host:" with an empty port means the default (RFC 3986 §6.2.3)
    uint32_t number = 0;
    if (port.size() > 5 ||
        !std::all_of(port.begin(), port.end(),
                     [](char c) { return absl::ascii_isdigit(static_cast<unsigned char>(c)); }) ||
        (number = ParsePort(port)) == 0 || number > 65535) {
      return absl::InvalidArgumentError(absl::StrCat("htu port '", S(port), "' is invalid"));
    }
    bool is_default = (scheme == "http" && number == 80) || (scheme == "https" && number == 443);
    if (!is_default) normalized_port = absl::StrCat(":", number);
  }
  ASSIGN_OR_RETURN(std::string normalized_path, NormalizePath(path));
  return absl::StrCat(scheme, "://", normalized_host, normalized_port, normalized_path);
}

std::string AccessTokenHash(std::string_view access_token) {
  return jose::Base64UrlEncode(crypto::Sha256(access_token));
}

absl::StatusOr<std::string> CreateProof(const crypto::PrivateKey& key, std::string_view htm,
                                        std::string_view htu, int64_t iat,
                                        std::string_view access_token, std::string_view nonce) {
  if (htm.empty() || !std::all_of(htm.begin(), htm.end(), IsTokenChar)) {
    return absl::InvalidArgumentError(absl::StrCat("htm '", S(htm), "' is not an HTTP method"));
  }
  if (!nonce.empty() && !IsValidNonce(nonce)) {
    return absl::InvalidArgumentError("nonce contains characters outside NQCHAR");
  }
  ASSIGN_OR_RETURN(std::string normalized_htu, NormalizeHtu(htu));
  crypto::PublicKey public_key = key.public_key();
  ASSIGN_OR_RETURN(jose::Algorithm alg, jose::AlgorithmForKey(public_key));
  ASSIGN_OR_RETURN(json jwk, jose::PublicKeyToJwk(public_key));
  ASSIGN_OR_RETURN(std::string jti_bytes, crypto::RandomBytes(16));

  json header = json::object();
  header["typ"] = "dpop+jwt";
  header["alg"] = std::string(jose::AlgorithmName(alg));
  header["jwk"] = std::move(jwk);
  json claims = json::object();
  claims["jti"] = jose::Base64UrlEncode(jti_bytes);
  claims["htm"] = std::string(htm);
  claims["htu"] = normalized_htu;
  claims["iat"] = iat;
  if (!access_token.empty()) claims["ath"] = AccessTokenHash(access_token);
  if (!nonce.empty()) claims["nonce"] = std::string(nonce);
  // Every string above is ASCII (validated or base64url), so "replace" never fires; it only
  // guarantees dump() cannot throw.
  return jose::SignCompact(key, alg, header.dump(-1, ' ', false, json::error_handler_t::replace),
                           claims.dump(-1, ' ', false, json::error_handler_t::replace));
}

absl::StatusOr<std::string> ExtractSingleDpopHeader(const std::vector<std::string>& header_values) {
  if (header_values.empty() || (header_values.size() == 1 && header_values[0].empty())) {
    return absl::UnauthenticatedError("missing DPoP header");
  }
  if (header_values.size() > 1) return absl::UnauthenticatedError("more than one DPoP header");
  return header_values[0];
}

// ---------------------------------------------------------------------------- ReplayCache

namespace {

// 128 bits of HMAC-SHA256 under the cache's random key: unpredictable to clients (who choose jti
// and know htu), so neither collisions, a crafted hash-table layout nor a chosen shard can be
// forced.
struct EntryKey {
  uint64_t high = 0;
  uint64_t low = 0;
  bool operator==(const EntryKey& other) const { return high == other.high && low == other.low; }
};

// The key is already uniformly distributed: use its bits as they are.
struct EntryKeyHash {
  size_t operator()(const EntryKey& key) const { return static_cast<size_t>(key.low); }
};

uint64_t ReadUint64(const std::string& bytes, size_t offset) {
  uint64_t value = 0;
  for (size_t i = 0; i < 8; ++i) {
    value = (value << 8) | static_cast<unsigned char>(bytes[offset + i]);
  }
  return value;
}

EntryKey MakeEntryKey(std::string_view hash_key, std::string_view htu, std::string_view jti) {
  // Length-prefixing htu makes the hashed encoding unambiguous: ("a", "bc") != ("ab", "c").
  std::string digest = crypto::HmacSha256(hash_key, absl::StrCat(htu.size(), ":", S(htu), S(jti)));
  if (digest.size() < 16) return EntryKey{};
  return EntryKey{ReadUint64(digest, 0), ReadUint64(digest, 8)};
}

uint64_t MakeOwnerId(std::string_view owner) {
  return ReadUint64(crypto::Sha256(absl::StrCat("owner:", S(owner))), 0);
}

// Bytes an absl flat table of `capacity` slots of `slot_bytes` holds: the slots plus one
// control byte each (the group padding is ignored).
size_t FlatTableBytes(size_t capacity, size_t slot_bytes) {
  return capacity == 0 ? 0 : capacity * (slot_bytes + 1);
}

}  // namespace

// The entries whose hash selects this shard. Buckets are keyed by expiry second and popped from
// the front once expired, so eviction touches expired entries only.
struct ReplayCache::Shard {
  struct Bucket {
    absl::flat_hash_set<EntryKey, EntryKeyHash> keys;
    // Entries of this bucket per owner, subtracted from owner_live when the bucket expires.
    absl::flat_hash_map<uint64_t, uint32_t> per_owner;
  };

  void EvictExpiredLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while (!buckets.empty() && buckets.begin()->first < now) {
      Bucket& bucket = buckets.begin()->second;
      for (const auto& [owner, count] : bucket.per_owner) {
        auto it = owner_live.find(owner);
        if (it == owner_live.end()) continue;  // cannot happen: counted on insert
        it->second -= std::min<size_t>(it->second, count);
        if (it->second == 0) owner_live.erase(it);
      }
      live -= std::min(live, bucket.keys.size());
      buckets.erase(buckets.begin());
    }
  }

  mutable absl::Mutex mu;
  std::map<int64_t, Bucket> buckets ABSL_GUARDED_BY(mu);
  // Live entries per owner, across this shard's buckets.
  absl::flat_hash_map<uint64_t, size_t> owner_live ABSL_GUARDED_BY(mu);
  size_t live ABSL_GUARDED_BY(mu) = 0;
};

namespace {

size_t ShardCountFor(size_t max_entries, size_t max_entries_per_owner) {
  // Small caches stay in one shard so their limits are exact; large ones spread the lock. Never
  // more shards than an owner's share, so each shard's part of it is at least one entry and the
  // parts never add up to more than the share.
  constexpr size_t kMinEntriesPerShard = 4096;
  return std::clamp<size_t>(std::min(max_entries / kMinEntriesPerShard, max_entries_per_owner), 1,
                            ReplayCache::kMaxShards);
}

size_t DividedAtLeastOne(size_t total, size_t parts) { return std::max<size_t>(1, total / parts); }

}  // namespace

ReplayCache::ReplayCache(size_t max_entries, size_t max_entries_per_owner)
    : max_entries_(std::max<size_t>(1, max_entries)),
      max_entries_per_owner_(std::min(max_entries_, max_entries_per_owner == 0
                                                        ? DividedAtLeastOne(max_entries_, 8)
                                                        : max_entries_per_owner)),
      shard_count_(ShardCountFor(max_entries_, max_entries_per_owner_)),
      shard_max_entries_(DividedAtLeastOne(max_entries_, shard_count_)),
      shard_max_entries_per_owner_(DividedAtLeastOne(max_entries_per_owner_, shard_count_)),
      hash_key_(crypto::RandomBytes(32).value_or("")),
      shards_(new Shard[shard_count_]) {}

ReplayCache::~ReplayCache() = default;

size_t ReplayCache::size() const {
  size_t total = 0;
  for (size_t i = 0; i < shard_count_; ++i) {
    absl::MutexLock lock(&shards_[i].mu);
    total += shards_[i].live;
  }
  return total;
}

size_t ReplayCache::ApproximateMemoryBytes() const {
  size_t bytes = sizeof(Shard) * shard_count_;
  for (size_t i = 0; i < shard_count_; ++i) {
    const Shard& shard = shards_[i];
    absl::MutexLock lock(&shard.mu);
    bytes += FlatTableBytes(shard.owner_live.capacity(), sizeof(std::pair<uint64_t, size_t>));
    for (const auto& [expiry, bucket] : shard.buckets) {
      // A std::map node: the value plus three pointers and a colour.
      bytes += sizeof(std::pair<const int64_t, Shard::Bucket>) + 4 * sizeof(void*);
      bytes += FlatTableBytes(bucket.keys.capacity(), sizeof(EntryKey));
      bytes += FlatTableBytes(bucket.per_owner.capacity(), sizeof(std::pair<uint64_t, uint32_t>));
    }
  }
  return bytes;
}

size_t ReplayCache::ShardOfForTesting(std::string_view htu, std::string_view jti) const {
  return MakeEntryKey(hash_key_, htu, jti).high % shard_count_;
}

absl::Status ReplayCache::CheckAndRemember(std::string_view owner, std::string_view htu,
                                           std::string_view jti, int64_t expires_at, int64_t now) {
  if (hash_key_.empty()) {
    return absl::UnavailableError("DPoP replay cache has no key (CSPRNG failed)");
  }
  const EntryKey key = MakeEntryKey(hash_key_, htu, jti);
  const uint64_t owner_id = MakeOwnerId(owner);
  Shard& shard = shards_[key.high % shard_count_];
  absl::MutexLock lock(&shard.mu);
  shard.EvictExpiredLocked(now);
  auto bucket = shard.buckets.find(expires_at);
  if (bucket != shard.buckets.end() && bucket->second.keys.contains(key)) {
    return absl::AlreadyExistsError("DPoP proof replayed");
  }
  // Already past its lifetime: nothing to remember (the caller's iat window refuses replays).
  if (expires_at < now) return absl::OkStatus();
  if (shard.live >= shard_max_entries_) {
    return absl::ResourceExhaustedError(
        "DPoP replay cache is full; refusing the proof rather than accepting it unremembered");
  }
  auto owned = shard.owner_live.find(owner_id);
  if (owned != shard.owner_live.end() && owned->second >= shard_max_entries_per_owner_) {
    return absl::ResourceExhaustedError(
        "this client's share of the DPoP replay cache is used up; retry when older proofs "
        "expire");
  }
  if (bucket == shard.buckets.end()) bucket = shard.buckets.try_emplace(expires_at).first;
  bucket->second.keys.insert(key);
  ++bucket->second.per_owner[owner_id];
  ++shard.owner_live[owner_id];
  ++shard.live;
  return absl::OkStatus();
}

int64_t FirstAcceptableIat(int64_t started_at, int64_t max_future_seconds) {
  return started_at + std::max<int64_t>(0, max_future_seconds) + 1;
}

// ---------------------------------------------------------------------------- VerifyProof

absl::StatusOr<VerifiedProof> VerifyProof(std::string_view proof, const VerifyOptions& options,
                                          ReplayCache* cache) {
  // The caller's own URL must be valid before the proof is looked at.
  absl::StatusOr<std::string> expected_htu = NormalizeHtu(options.htu);
  if (!expected_htu.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected htu is unusable: ", expected_htu.status().message()));
  }

  if (proof.size() > kMaxProofLength) {
    return Refuse(absl::StrCat("proof is longer than ", kMaxProofLength, " bytes"));
  }
  absl::StatusOr<jose::ParsedJws> parsed = jose::ParseCompact(proof, kMaxProofLength);
  if (!parsed.ok()) return Refuse(absl::StrCat("malformed JWS: ", parsed.status().message()));
  const json& header = parsed->header;
  const json& payload = parsed->payload;

  auto typ = header.find("typ");
  if (typ == header.end() || !typ->is_string() || typ->get<std::string>() != "dpop+jwt") {
    return Refuse("typ header must be \"dpop+jwt\"");
  }
  if (!IsAllowedDpopAlgorithm(parsed->alg)) {
    return Refuse(absl::StrCat("alg ", S(jose::AlgorithmName(parsed->alg)), " is not allowed"));
  }

  auto jwk = header.find("jwk");
  if (jwk == header.end()) return Refuse("jwk header is missing");
  if (!jwk->is_object()) return Refuse("jwk header is not a JSON object");
  for (const char* member : {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}) {
    if (jwk->contains(member)) {
      return Refuse(absl::StrCat("jwk header contains the private member '", member, "'"));
    }
  }
  std::string jwk_json = jwk->dump(-1, ' ', false, json::error_handler_t::replace);
  std::optional<ProofKeyCache::Entry> known = ProofKeyCache::Get().Find(jwk_json);
  if (!known.has_value()) {
    absl::StatusOr<crypto::PublicKey> imported = jose::PublicKeyFromJwk(*jwk);
    if (!imported.ok()) return Refuse(absl::StrCat("jwk header: ", imported.status().message()));
    // From the header's JWK members (RFC 9449 §6.1), which PublicKeyFromJwk has just checked to
    // be a well-formed key with full-length coordinates; re-exporting the parsed key would cost
    // as much as a quarter of a signature check.
    absl::StatusOr<std::string> thumbprint = jose::JwkThumbprint(*jwk);
    if (!thumbprint.ok()) {
      return Refuse(absl::StrCat("jwk thumbprint: ", thumbprint.status().message()));
    }
    known = ProofKeyCache::Entry{*std::move(imported), *std::move(thumbprint)};
    ProofKeyCache::Get().Insert(std::move(jwk_json), *known);
  }
  crypto::PublicKey& key = known->key;
  std::string& jkt = known->jkt;
  absl::Status signature = jose::VerifySignature(*parsed, key);
  if (!signature.ok()) return Refuse(std::string(signature.message()));

  ASSIGN_OR_RETURN(std::string jti, ReadStringClaim(payload, "jti"));
  if (jti.size() < kMinJtiLength || jti.size() > kMaxJtiLength) {
    return Refuse(
        absl::StrCat("jti must be ", kMinJtiLength, "..", kMaxJtiLength, " characters long"));
  }

  ASSIGN_OR_RETURN(std::string htm, ReadStringClaim(payload, "htm"));
  // Checked before the value is echoed in an error message (no control bytes into logs).
  if (htm.empty() || !std::all_of(htm.begin(), htm.end(), IsTokenChar)) {
    return Refuse("htm claim is not an HTTP method token");
  }
  if (htm != options.htm) {
    return Refuse(
        absl::StrCat("htm '", S(htm), "' does not match the request method '", options.htm, "'"));
  }

  ASSIGN_OR_RETURN(std::string htu, ReadStringClaim(payload, "htu"));
  absl::StatusOr<std::string> proof_htu = NormalizeHtu(htu);
  if (!proof_htu.ok()) return Refuse(std::string(proof_htu.status().message()));
  if (*proof_htu != *expected_htu) {
    return Refuse(absl::StrCat("htu '", *proof_htu, "' does not match the request URL '",
                               *expected_htu, "'"));
  }

  ASSIGN_OR_RETURN(int64_t iat, ReadIat(payload));
  if (iat < options.now - options.max_age_seconds) {
    return Refuse(
        absl::StrCat("iat ", iat, " is more than ", options.max_age_seconds, " s in the past"));
  }
  if (iat > options.now + options.max_future_seconds) {
    return Refuse(absl::StrCat("iat ", iat, " is more than ", options.max_future_seconds,
                               " s in the future"));
  }
  if (iat < options.not_before) {
    if (options.now < options.not_before) {
      // Every proof is refused until then: the verifier cannot tell a fresh one from one its
      // previous instance accepted. Nothing is wrong with the proof, so the caller answers 503.
      return absl::UnavailableError(absl::StrCat(
          "the verifier started less than ", options.max_future_seconds + 1,
          " s ago and cannot tell this proof from one accepted before it restarted; retry with a "
          "new proof in ",
          options.not_before - options.now, " s"));
    }
    return Refuse(absl::StrCat("iat ", iat, " is before ", options.not_before,
                               ": it may have been accepted before the verifier restarted"));
  }

  auto ath = payload.find("ath");
  if (options.access_token.has_value()) {
    if (ath == payload.end())
      return Refuse("ath claim is missing but an access token is presented");
    if (!ath->is_string()) return Refuse("ath claim is not a string");
    if (!SecretEquals(ath->get<std::string>(), AccessTokenHash(*options.access_token))) {
      return Refuse("ath claim does not match the access token");
    }
  } else if (ath != payload.end()) {
    return Refuse("ath claim is present but no access token is presented");
  }

  if (!options.expected_jkt.empty() && !SecretEquals(jkt, options.expected_jkt)) {
    return Refuse("proof key does not match the access token's cnf.jkt");
  }

  if (!options.nonces.empty()) {
    auto nonce = payload.find("nonce");
    if (nonce == payload.end()) {
      return absl::FailedPreconditionError("use_dpop_nonce: DPoP proof has no nonce");
    }
    bool current = false;
    if (nonce->is_string()) {
      const std::string& presented = nonce->get_ref<const std::string&>();
      for (const auto& accepted : options.nonces) current |= SecretEquals(presented, accepted);
    }
    if (!current) {
      return absl::FailedPreconditionError("use_dpop_nonce: DPoP proof nonce is not current");
    }
  }

  // Last, so only fully valid proofs take a cache slot.
  if (cache != nullptr) {
    RETURN_IF_ERROR(cache->CheckAndRemember(
        options.replay_owner.empty() ? std::string_view(jkt) : options.replay_owner, *expected_htu,
        jti, iat + options.max_age_seconds, options.now));
  }
  return VerifiedProof{std::move(jti), std::move(jkt), std::move(key), iat};
}

}  // namespace mandate::dpop
