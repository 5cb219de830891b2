// DPoP (RFC 9449) for Mandate: creating proofs (SDK side), verifying them (broker /token, Workload
// API and resource-server verifier) and remembering their jti so a proof cannot be replayed.
//
// Every JWS operation goes through mandate::jose (DESIGN.md §8); this module only adds the DPoP
// rules on top of it.
//
// Error codes returned by VerifyProof, so callers can pick the OAuth error without parsing text:
// - Unauthenticated: the proof is not acceptable (map to `invalid_dpop_proof`). The message names
//   the rule that failed, e.g. "DPoP proof htm 'GET' does not match the request method 'POST'".
// - FailedPrecondition: the server requires a nonce and the proof carries none or a stale one.
//   The message starts with "use_dpop_nonce" (map to `use_dpop_nonce` plus a fresh DPoP-Nonce).
// - AlreadyExists: the proof was already used ("DPoP proof replayed"; map to
//   `invalid_dpop_proof`).
// - ResourceExhausted: the replay cache is full, or the proof's owner has used up its share of
//   it; the proof is refused (fail closed) rather than accepted unremembered. Not the proof's
//   fault: map to 503 `temporarily_unavailable`, never to `invalid_dpop_proof`.
// - Unavailable: now is still before not_before (the verifier has just started, see
//   FirstAcceptableIat), so every proof is refused until then; not the proof's fault: map to 503
//   `temporarily_unavailable`, the client retries with a new proof after not_before - now s.
// - InvalidArgument: the caller's own VerifyOptions are unusable (e.g. an expected htu that is
//   not an absolute http(s) URL).
//
// Thread-safety: free functions are reentrant; ReplayCache is internally synchronised and may be
// shared by any number of threads.
#ifndef MANDATE_BROKER_COMMON_DPOP_DPOP_H_
#define MANDATE_BROKER_COMMON_DPOP_DPOP_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "broker/common/crypto/keys.h"

namespace mandate::dpop {

// Proofs longer than this are refused before any parsing (an RSA-4096 proof with ath and nonce
// is well under 2 KiB).
inline constexpr size_t kMaxProofLength = 8192;
// jti length bounds: RFC 9449 asks for at least 96 random bits (16 base64url characters); the
// upper bound keeps replay-cache input small.
inline constexpr size_t kMinJtiLength = 16;
inline constexpr size_t kMaxJtiLength = 256;
// The JWS algorithms accepted for proofs (asymmetric only; RFC 9449 §4.3 step 5), as advertised
// in `dpop_signing_alg_values_supported`.
inline constexpr std::array<const char*, 5> kProofAlgorithms = {"ES256", "ES384", "RS256", "PS256",
                                                                "EdDSA"};

// Normalises an absolute http(s) URL for htu comparison (RFC 9449 §4.3 step 9, RFC 3986 §6.2.2
// syntax-based normalisation): scheme and host lowercased, the default port (80 for http, 443
// for https) removed, an empty path becomes "/", percent-encodings get uppercase hex and encoded
// unreserved characters are decoded, query and fragment dropped.
// InvalidArgument for: another scheme, a relative URL, userinfo ("user@host"), an empty or
// malformed host, a bad port, a malformed percent-encoding, a path with "." or ".." segments
// (refused rather than resolved, so two differently spelt paths never compare equal by
// accident), and control, space or non-ASCII characters anywhere.
absl::StatusOr<std::string> NormalizeHtu(std::string_view url);

// The `ath` value for an access token: base64url(SHA-256(token)) (RFC 9449 §4.2).
std::string AccessTokenHash(std::string_view access_token);

// Creates a proof signed with `key` (ES256 for P-256, ES384 for P-384, RS256 for RSA, EdDSA for
// Ed25519). Header {"typ":"dpop+jwt","alg":...,"jwk":<public JWK>}; claims jti (128 random
// bits, base64url), htm, htu (normalised with NormalizeHtu), iat, plus ath when `access_token`
// is non-empty and nonce when `nonce` is non-empty.
// InvalidArgument: `htm` not an RFC 9110 method token, `htu` refused by NormalizeHtu, `nonce`
// not 1*NQCHAR (RFC 9449 §8.1). Unimplemented: a key type without a JWS algorithm.
absl::StatusOr<std::string> CreateProof(const crypto::PrivateKey& key, std::string_view htm,
                                        std::string_view htu, int64_t iat,
                                        std::string_view access_token = "",
                                        std::string_view nonce = "");

// Remembers accepted proofs until they expire, so a proof is accepted once.
//
// Entries: a 128-bit hash (truncated SHA-256) of the length-prefixed (htu, jti) pair, filed in a
// time bucket per expiry second. Nothing attacker-chosen is retained, an entry costs at most
// kMaxBytesPerEntry bytes, and expired entries go a whole bucket at a time, so cleanup costs
// O(expired entries) and the hot path never scans the cache. A pair is a replay when it was
// recorded with the same expires_at: VerifyProof derives expires_at from the proof's own iat,
// so a replayed proof always lands in the bucket that holds its first use.
//
// Bounded twice, so that no client can lock the others out (issue: one workload's legitimate
// rate filled a shared 100,000-entry set and every other workload was refused):
// - at most `max_entries` live entries in all, i.e. about max_entries * kMaxBytesPerEntry bytes
//   (plus one small counter per owner with live entries);
// - at most `max_entries_per_owner` live entries per owner, the identity the caller charges a
//   proof to (the broker: the SPIFFE ID asking for a token; a resource server: the token's
//   client). An owner over its share is refused while every other owner keeps its own.
// Filling the whole cache therefore takes max_entries / max_entries_per_owner owners at full
// share. The cache is split into up to kMaxShards independently locked shards by entry hash;
// each shard enforces its proportional part of both limits, so the totals are never exceeded
// and an owner near its share is refused for the proofs that land in its fuller shards first.
// When a limit is reached, CheckAndRemember refuses with ResourceExhausted (fail closed:
// accepting a proof we cannot remember would allow a replay); callers answer 503
// temporarily_unavailable, never a proof error, since the proof itself is fine.
//
// In-memory only: after a restart the cache is empty, which is why callers refuse proofs whose
// iat could have been accepted before the start (FirstAcceptableIat, DESIGN.md §10).
//
// Thread-safe.
class ReplayCache {
 public:
  // 2^21 entries: about 80 MiB at most; at a 65 s proof lifetime it takes over 32,000 accepted
  // proofs per second to fill, far above what one broker serves.
  static constexpr size_t kDefaultMaxEntries = size_t{1} << 21;
  // Memory per live entry, worst case: a 16-byte key and a control byte in an open-addressing
  // table that is at least 7/16 full (absl::flat_hash_set grows at 7/8 by doubling).
  static constexpr size_t kMaxBytesPerEntry = 40;
  static constexpr size_t kMaxShards = 16;

  // `max_entries_per_owner` 0 means max_entries / 8 (at least 1): eight owners at full share are
  // needed to fill the cache. Both are clamped to at least 1.
  explicit ReplayCache(size_t max_entries = kDefaultMaxEntries, size_t max_entries_per_owner = 0);
  ~ReplayCache();

  ReplayCache(const ReplayCache&) = delete;
  ReplayCache& operator=(const ReplayCache&) = delete;

  // Records (htu, jti), charged to `owner`, to be remembered while now <= expires_at.
  // AlreadyExists "DPoP proof replayed" when the pair was recorded with this expires_at and has
  // not expired (the stored entry is left unchanged). ResourceExhausted when the cache is full
  // or `owner` has used up its share (the message says which); nothing is recorded then.
  absl::Status CheckAndRemember(std::string_view owner, std::string_view htu, std::string_view jti,
                                int64_t expires_at, int64_t now);

  // Number of entries currently held (expired ones included until their shard's next call).
  size_t size() const;
  size_t max_entries() const { return max_entries_; }
  size_t max_entries_per_owner() const { return max_entries_per_owner_; }
  // Bytes held by the tables (entry sets, per-owner counters, bucket index), estimated from
  // their capacities.
  size_t ApproximateMemoryBytes() const;
  // The shard (htu, jti) lands in: differs between instances (the entry hash is keyed).
  size_t ShardOfForTesting(std::string_view htu, std::string_view jti) const;

 private:
  struct Shard;

  const size_t max_entries_;
  const size_t max_entries_per_owner_;
  const size_t shard_count_;
  const size_t shard_max_entries_;
  const size_t shard_max_entries_per_owner_;
  // Random per instance: entries are placed by HMAC-SHA256 under it, so a client, who chooses
  // jti and knows htu, cannot aim its proofs at one shard or at colliding table slots. Empty
  // when the CSPRNG failed; every proof is then refused (Unavailable).
  const std::string hash_key_;
  // Each shard has its own mutex and state (see Shard in dpop.cc).
  std::unique_ptr<Shard[]> shards_;
};

// The smallest iat a verifier that started at `started_at` may accept. Proofs the previous
// instance accepted (up to its last second, which may be started_at) have iat up to
// started_at + max_future_seconds; this instance's empty replay cache cannot know them, so they
// are all refused. The cost: for max_future_seconds + 1 after a start, fresh proofs are refused
// too (VerifyProof: Unavailable) and clients retry with a new one. A verifier that knows it has
// no previous instance (e.g. a broker whose data directory is new) passes started_at 0.
int64_t FirstAcceptableIat(int64_t started_at, int64_t max_future_seconds);

struct VerifyOptions {
  // The request's method, compared case-sensitively (RFC 9110 methods are case-sensitive).
  std::string htm;
  // The request's absolute URL; compared with the proof's htu after NormalizeHtu on both.
  std::string htu;
  // Current time, seconds since the epoch (from mandate::Clock, so tests control it).
  int64_t now = 0;
  // Accepted iat window: [now - max_age_seconds, now + max_future_seconds] (DESIGN.md §10).
  int64_t max_age_seconds = 60;
  int64_t max_future_seconds = 5;
  // Set: the proof must carry ath = AccessTokenHash(*access_token). Unset: ath must be absent
  // (a proof bound to some token is not a token-request proof).
  std::optional<std::string> access_token;
  // Non-empty: the RFC 7638 thumbprint of the proof's jwk must equal it (the token's cnf.jkt).
  std::string expected_jkt;
  // Non-empty: the proof's nonce must equal one of these (a server rotating its nonce accepts the
  // current and the previous one), else FailedPrecondition "use_dpop_nonce".
  std::vector<std::string> nonces;
  // Proofs with iat before this are refused: the verifier's replay cache does not know proofs
  // accepted before it started. Set it to FirstAcceptableIat(start, max_future_seconds).
  int64_t not_before = 0;
  // The owner the proof is charged to in the replay cache (its share, see ReplayCache): the
  // authenticated identity making the request. Empty: the proof key's thumbprint.
  std::string replay_owner;
};

struct VerifiedProof {
  std::string jti;
  std::string jkt;  // RFC 7638 SHA-256 thumbprint of the proof key (for cnf.jkt)
  crypto::PublicKey key;
  int64_t iat = 0;
};

// Verifies a DPoP proof against the request described by `options` (RFC 9449 §4.3): size cap,
// well-formed compact JWS, typ "dpop+jwt", an allowed asymmetric alg (ES256, ES384, RS256, PS256,
// EdDSA), a public-only jwk that the signature verifies with, jti (string of 16..256 chars), htm,
// htu, iat window and not_before, the ath rule, expected_jkt, the nonce and finally the replay
// cache. `cache` may be null (no replay protection; only for callers that remember jti
// elsewhere). The cache is consulted last, so proofs failing any other check are never
// remembered. The (normalised htu, jti) pair is remembered until iat + max_age_seconds, charged
// to options.replay_owner (or the proof key's thumbprint).
// Error codes: see the top of this file.
absl::StatusOr<VerifiedProof> VerifyProof(std::string_view proof, const VerifyOptions& options,
                                          ReplayCache* cache);

// Returns the single DPoP header value of a request given all its values (RFC 9449 §4.3 step 1).
// Unauthenticated "missing DPoP header" for none (or one empty value), "more than one DPoP
// header" for several.
absl::StatusOr<std::string> ExtractSingleDpopHeader(const std::vector<std::string>& header_values);

}  // namespace mandate::dpop

#endif  // MANDATE_BROKER_COMMON_DPOP_DPOP_H_
