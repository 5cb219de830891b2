#include "broker/common/dpop/dpop.h"

#include <malloc.h>

#include <atomic>
#include <cstdint>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/jose/test_keys.h"

namespace mandate::dpop {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

constexpr int64_t kNow = 1700000000;
constexpr char kTokenUrl[] = "https://broker.example/token";

// RFC 9449 §4.1 example proof (POST https://server.example.com/token, iat 1562262616).
constexpr char kRfcProof[] =
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0Vj"
    "NoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5"
    "VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVC"
    "IsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP"
    "4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
constexpr char kRfcJkt[] = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";

crypto::PrivateKey NewKey() {
  auto key = crypto::PrivateKey::GenerateP256();
  EXPECT_TRUE(key.ok()) << key.status();
  return *std::move(key);
}

VerifyOptions Options() {
  VerifyOptions options;
  options.htm = "POST";
  options.htu = kTokenUrl;
  options.now = kNow;
  return options;
}

json PublicJwk(const crypto::PrivateKey& key) { return *jose::PublicKeyToJwk(key.public_key()); }

json ValidHeader(const crypto::PrivateKey& key) {
  return json{{"typ", "dpop+jwt"}, {"alg", "ES256"}, {"jwk", PublicJwk(key)}};
}

json ValidClaims() {
  return json{
      {"jti", "abcdefghijklmnopqrstuv"}, {"htm", "POST"}, {"htu", kTokenUrl}, {"iat", kNow}};
}

// Signs arbitrary header/claims with an ES256 key, for proofs CreateProof would never make.
std::string SignRaw(const crypto::PrivateKey& key, const json& header, const json& claims) {
  auto jws = jose::SignCompact(key, jose::Algorithm::kES256, header.dump(), claims.dump());
  EXPECT_TRUE(jws.ok()) << jws.status();
  return *jws;
}

// A token with the given header and claims and an arbitrary signature part.
std::string Unsigned(const json& header, const json& claims, std::string_view signature) {
  return jose::Base64UrlEncode(header.dump()) + "." + jose::Base64UrlEncode(claims.dump()) + "." +
         jose::Base64UrlEncode(signature);
}

void ExpectRefused(const absl::StatusOr<VerifiedProof>& result, std::string_view message_part) {
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kUnauthenticated) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(std::string(message_part)));
}

// ---------------------------------------------------------------------------- RFC vectors

TEST(AccessTokenHashTest, MatchesRfc9449Example) {
  EXPECT_EQ(AccessTokenHash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"),
            "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
}

TEST(VerifyProofTest, AcceptsRfc9449ExampleProof) {
  VerifyOptions options;
  options.htm = "POST";
  options.htu = "https://server.example.com/token";
  options.now = 1562262616;
  ReplayCache cache;
  auto verified = VerifyProof(kRfcProof, options, &cache);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->jkt, kRfcJkt);
  EXPECT_EQ(verified->jti, "-BwC3ESc6acc2lTc");
  EXPECT_EQ(verified->iat, 1562262616);
  EXPECT_EQ(*jose::JwkThumbprint(verified->key), kRfcJkt);
}

TEST(VerifyProofTest, AcceptsRfc9449ExampleWithMatchingExpectedJkt) {
  VerifyOptions options;
  options.htm = "POST";
  options.htu = "https://server.example.com/token";
  options.now = 1562262616;
  options.expected_jkt = kRfcJkt;
  EXPECT_TRUE(VerifyProof(kRfcProof, options, nullptr).ok());
}

// ---------------------------------------------------------------------------- round trips

TEST(CreateProofTest, RoundTripsThroughVerifyProof) {
  crypto::PrivateKey key = NewKey();
  auto proof = CreateProof(key, "POST", kTokenUrl, kNow);
  ASSERT_TRUE(proof.ok()) << proof.status();
  ReplayCache cache;
  auto verified = VerifyProof(*proof, Options(), &cache);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->jkt, *jose::JwkThumbprint(key.public_key()));
  EXPECT_TRUE(verified->key.Equals(key.public_key()));
  EXPECT_EQ(verified->iat, kNow);
  EXPECT_EQ(cache.size(), 1u);
}

TEST(CreateProofTest, HeaderAndClaimsHaveTheRfcShape) {
  crypto::PrivateKey key = NewKey();
  auto proof = CreateProof(key, "GET", "HTTPS://Broker.Example:443/r?q=1#f", kNow, "tok", "n-1");
  ASSERT_TRUE(proof.ok()) << proof.status();
  auto parsed = jose::ParseCompact(*proof);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->header["typ"], "dpop+jwt");
  EXPECT_EQ(parsed->header["alg"], "ES256");
  EXPECT_EQ(parsed->header["jwk"], PublicJwk(key));
  EXPECT_FALSE(parsed->header["jwk"].contains("d"));
  EXPECT_EQ(parsed->payload["htm"], "GET");
  EXPECT_EQ(parsed->payload["htu"], "https://broker.example/r");
  EXPECT_EQ(parsed->payload["iat"], kNow);
  EXPECT_EQ(parsed->payload["ath"], AccessTokenHash("tok"));
  EXPECT_EQ(parsed->payload["nonce"], "n-1");
  // 128 random bits -> 22 base64url characters, fresh each time.
  EXPECT_EQ(parsed->payload["jti"].get<std::string>().size(), 22u);
  auto other = jose::ParseCompact(*CreateProof(key, "GET", kTokenUrl, kNow));
  EXPECT_NE(other->payload["jti"], parsed->payload["jti"]);
}

TEST(CreateProofTest, OmitsAthAndNonceWhenNotGiven) {
  auto parsed = jose::ParseCompact(*CreateProof(NewKey(), "POST", kTokenUrl, kNow));
  ASSERT_TRUE(parsed.ok());
  EXPECT_FALSE(parsed->payload.contains("ath"));
  EXPECT_FALSE(parsed->payload.contains("nonce"));
}

TEST(CreateProofTest, RoundTripsWithRsaEd25519AndP384Keys) {
  std::vector<crypto::PrivateKey> keys;
  keys.push_back(jose::test_keys::GenerateRsa(2048));
  keys.push_back(jose::test_keys::GenerateEd25519());
  keys.push_back(jose::test_keys::GenerateEc("P-384"));
  for (const auto& key : keys) {
    auto proof = CreateProof(key, "POST", kTokenUrl, kNow);
    ASSERT_TRUE(proof.ok()) << proof.status();
    auto verified = VerifyProof(*proof, Options(), nullptr);
    EXPECT_TRUE(verified.ok()) << verified.status();
  }
}

TEST(CreateProofTest, RejectsBadInputs) {
  crypto::PrivateKey key = NewKey();
  EXPECT_EQ(CreateProof(key, "", kTokenUrl, kNow).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateProof(key, "PO ST", kTokenUrl, kNow).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateProof(key, "POST", "/token", kNow).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CreateProof(key, "POST", kTokenUrl, kNow, "", "bad\"nonce").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(VerifyProofTest, AcceptsMatchingAccessTokenHashAndNonce) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  options.access_token = "the-token";
  options.nonces = {"older-nonce", "server-nonce"};
  options.expected_jkt = *jose::JwkThumbprint(key.public_key());
  auto proof = CreateProof(key, "POST", kTokenUrl, kNow, "the-token", "server-nonce");
  ASSERT_TRUE(proof.ok());
  auto verified = VerifyProof(*proof, options, nullptr);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

// ---------------------------------------------------------------------------- refusals: JWS

TEST(VerifyProofTest, RejectsAlgNone) {
  crypto::PrivateKey key = NewKey();
  json header = ValidHeader(key);
  header["alg"] = "none";
  // The classic unsecured JWS (empty signature) and one with a signature part, so the refusal
  // is seen to come from the algorithm itself.
  std::string unsecured = jose::Base64UrlEncode(header.dump()) + "." +
                          jose::Base64UrlEncode(ValidClaims().dump()) + ".";
  ExpectRefused(VerifyProof(unsecured, Options(), nullptr), "malformed");
  ExpectRefused(
      VerifyProof(Unsigned(header, ValidClaims(), std::string(64, 'x')), Options(), nullptr),
      "none");
}

TEST(VerifyProofTest, RejectsHs256) {
  crypto::PrivateKey key = NewKey();
  json header = ValidHeader(key);
  header["alg"] = "HS256";
  ExpectRefused(
      VerifyProof(Unsigned(header, ValidClaims(), std::string(32, 'x')), Options(), nullptr),
      "HS256");
}

TEST(VerifyProofTest, RejectsTypJwt) {
  crypto::PrivateKey key = NewKey();
  json header = ValidHeader(key);
  header["typ"] = "JWT";
  ExpectRefused(VerifyProof(SignRaw(key, header, ValidClaims()), Options(), nullptr), "typ");
}

TEST(VerifyProofTest, RejectsMissingTyp) {
  crypto::PrivateKey key = NewKey();
  json header = ValidHeader(key);
  header.erase("typ");
  ExpectRefused(VerifyProof(SignRaw(key, header, ValidClaims()), Options(), nullptr), "typ");
}

TEST(VerifyProofTest, RejectsMissingJwk) {
  crypto::PrivateKey key = NewKey();
  json header = ValidHeader(key);
  header.erase("jwk");
  ExpectRefused(VerifyProof(SignRaw(key, header, ValidClaims()), Options(), nullptr),
                "jwk header is missing");
}

TEST(VerifyProofTest, RejectsJwkWithPrivateMember) {
  crypto::PrivateKey key = NewKey();
  json header = ValidHeader(key);
  header["jwk"]["d"] = jose::Base64UrlEncode(std::string(32, '\x01'));
  ExpectRefused(VerifyProof(SignRaw(key, header, ValidClaims()), Options(), nullptr),
                "private member 'd'");
}

TEST(VerifyProofTest, RejectsSignatureByAnotherKey) {
  crypto::PrivateKey key = NewKey();
  crypto::PrivateKey other = NewKey();
  // The header names `key`, the signature comes from `other`.
  ExpectRefused(VerifyProof(SignRaw(other, ValidHeader(key), ValidClaims()), Options(), nullptr),
                "signature");
}

TEST(VerifyProofTest, RejectsTamperedPayload) {
  crypto::PrivateKey key = NewKey();
  std::string proof = *CreateProof(key, "GET", kTokenUrl, kNow);
  auto parsed = jose::ParseCompact(proof);
  json claims = parsed->payload;
  claims["htm"] = "POST";
  size_t first_dot = proof.find('.');
  size_t second_dot = proof.find('.', first_dot + 1);
  std::string tampered = proof.substr(0, first_dot + 1) + jose::Base64UrlEncode(claims.dump()) +
                         proof.substr(second_dot);
  ExpectRefused(VerifyProof(tampered, Options(), nullptr), "signature");
}

TEST(VerifyProofTest, RejectsGarbageAndOversizedProofs) {
  ExpectRefused(VerifyProof("not-a-jws", Options(), nullptr), "malformed");
  ExpectRefused(VerifyProof(std::string(kMaxProofLength + 1, 'a'), Options(), nullptr),
                "longer than");
}

// ---------------------------------------------------------------------------- refusals: claims

TEST(VerifyProofTest, RejectsShortAndMissingJti) {
  crypto::PrivateKey key = NewKey();
  json claims = ValidClaims();
  claims["jti"] = "short";
  ExpectRefused(VerifyProof(SignRaw(key, ValidHeader(key), claims), Options(), nullptr), "jti");
  claims.erase("jti");
  ExpectRefused(VerifyProof(SignRaw(key, ValidHeader(key), claims), Options(), nullptr),
                "jti claim is missing");
  claims["jti"] = 1234567890123456789;
  ExpectRefused(VerifyProof(SignRaw(key, ValidHeader(key), claims), Options(), nullptr),
                "jti claim is not a string");
}

TEST(VerifyProofTest, RejectsWrongHtm) {
  crypto::PrivateKey key = NewKey();
  ExpectRefused(VerifyProof(*CreateProof(key, "GET", kTokenUrl, kNow), Options(), nullptr), "htm");
}

TEST(VerifyProofTest, HtmComparisonIsCaseSensitive) {
  crypto::PrivateKey key = NewKey();
  ExpectRefused(VerifyProof(*CreateProof(key, "post", kTokenUrl, kNow), Options(), nullptr), "htm");
}

TEST(VerifyProofTest, RejectsWrongHtu) {
  crypto::PrivateKey key = NewKey();
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", "https://other.example/token", kNow),
                            Options(), nullptr),
                "htu");
}

TEST(VerifyProofTest, AcceptsHtuWithQueryAfterNormalisationButNotAnotherPath) {
  crypto::PrivateKey key = NewKey();
  // Signed raw so the proof's htu really carries the query, fragment, port and upper case.
  json claims = ValidClaims();
  claims["htu"] = "HTTPS://BROKER.example:443/token?x=1#frag";
  VerifyOptions options = Options();
  options.htu = "https://broker.example/token?different=2";
  EXPECT_TRUE(VerifyProof(SignRaw(key, ValidHeader(key), claims), options, nullptr).ok());

  claims["htu"] = "https://broker.example/token/other";
  ExpectRefused(VerifyProof(SignRaw(key, ValidHeader(key), claims), options, nullptr), "htu");
}

TEST(VerifyProofTest, RejectsUnusableExpectedHtuAsCallerError) {
  VerifyOptions options = Options();
  options.htu = "/token";
  auto result = VerifyProof(*CreateProof(NewKey(), "POST", kTokenUrl, kNow), options, nullptr);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(VerifyProofTest, RejectsStaleIat) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  EXPECT_TRUE(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow - 60), options, nullptr).ok());
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow - 61), options, nullptr),
                "in the past");
}

TEST(VerifyProofTest, RejectsFutureIat) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  EXPECT_TRUE(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow + 5), options, nullptr).ok());
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow + 6), options, nullptr),
                "in the future");
}

TEST(VerifyProofTest, RejectsIatBeforeNotBefore) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  options.not_before = kNow - 10;
  EXPECT_TRUE(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow - 10), options, nullptr).ok());
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow - 11), options, nullptr),
                "before");
}

TEST(VerifyProofTest, RejectsNonNumericIat) {
  crypto::PrivateKey key = NewKey();
  json claims = ValidClaims();
  claims["iat"] = std::to_string(kNow);
  ExpectRefused(VerifyProof(SignRaw(key, ValidHeader(key), claims), Options(), nullptr),
                "iat claim is not a number");
  claims["iat"] = true;
  ExpectRefused(VerifyProof(SignRaw(key, ValidHeader(key), claims), Options(), nullptr),
                "iat claim is not a number");
}

TEST(VerifyProofTest, RejectsMissingAthWhenTokenPresented) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  options.access_token = "the-token";
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), options, nullptr),
                "ath claim is missing");
}

TEST(VerifyProofTest, RejectsWrongAth) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  options.access_token = "the-token";
  ExpectRefused(
      VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow, "another-token"), options, nullptr),
      "ath claim does not match");
}

TEST(VerifyProofTest, RejectsAthWhenNoTokenPresented) {
  crypto::PrivateKey key = NewKey();
  ExpectRefused(
      VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow, "the-token"), Options(), nullptr),
      "ath claim is present");
}

TEST(VerifyProofTest, RejectsWrongJkt) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  options.expected_jkt = *jose::JwkThumbprint(NewKey().public_key());
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), options, nullptr),
                "cnf.jkt");
}

TEST(VerifyProofTest, MissingOrWrongNonceAsksForUseDpopNonce) {
  crypto::PrivateKey key = NewKey();
  VerifyOptions options = Options();
  options.nonces = {"current-nonce", "previous-nonce"};
  ReplayCache cache;
  auto missing = VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), options, &cache);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("use_dpop_nonce"));
  auto wrong =
      VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow, "", "old-nonce"), options, &cache);
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  // Refused proofs take no cache slot.
  EXPECT_EQ(cache.size(), 0u);
  // The previous nonce is still accepted right after a rotation.
  auto previous = VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow, "", "previous-nonce"),
                              options, &cache);
  EXPECT_TRUE(previous.ok()) << previous.status();
}

// ---------------------------------------------------------------------------- replay

TEST(VerifyProofTest, RejectsReplayedJtiForSameHtuButAcceptsItForAnotherHtu) {
  crypto::PrivateKey key = NewKey();
  ReplayCache cache;
  json claims = ValidClaims();
  std::string proof = SignRaw(key, ValidHeader(key), claims);
  ASSERT_TRUE(VerifyProof(proof, Options(), &cache).ok());
  auto replay = VerifyProof(proof, Options(), &cache);
  EXPECT_EQ(replay.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(replay.status().message()), HasSubstr("DPoP proof replayed"));

  claims["htu"] = "https://broker.example/other";
  VerifyOptions other = Options();
  other.htu = "https://broker.example/other";
  EXPECT_TRUE(VerifyProof(SignRaw(key, ValidHeader(key), claims), other, &cache).ok());
}

TEST(VerifyProofTest, FailedProofsDoNotFillTheCache) {
  crypto::PrivateKey key = NewKey();
  ReplayCache cache(1);
  ExpectRefused(VerifyProof(*CreateProof(key, "GET", kTokenUrl, kNow), Options(), &cache), "htm");
  EXPECT_EQ(cache.size(), 0u);
  EXPECT_TRUE(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), Options(), &cache).ok());
}

TEST(ReplayCacheTest, FailsClosedWhenFullOfUnexpiredEntries) {
  ReplayCache cache(2, 2);
  EXPECT_TRUE(cache.CheckAndRemember("owner", kTokenUrl, "jti-1", kNow + 60, kNow).ok());
  EXPECT_TRUE(cache.CheckAndRemember("other", kTokenUrl, "jti-2", kNow + 60, kNow).ok());
  absl::Status full = cache.CheckAndRemember("third", kTokenUrl, "jti-3", kNow + 60, kNow);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.message()), HasSubstr("replay cache is full"));
  // Once the entries expire they are evicted and new proofs fit again.
  EXPECT_TRUE(cache.CheckAndRemember("third", kTokenUrl, "jti-3", kNow + 200, kNow + 61).ok());
  EXPECT_EQ(cache.size(), 1u);
}

TEST(ReplayCacheTest, VerifyProofFailsClosedWhenCacheIsFull) {
  crypto::PrivateKey key = NewKey();
  ReplayCache cache(1);
  ASSERT_TRUE(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), Options(), &cache).ok());
  auto refused = VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), Options(), &cache);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(ReplayCacheTest, RemembersUntilExpiryInclusiveThenForgets) {
  ReplayCache cache;
  ASSERT_TRUE(cache.CheckAndRemember("owner", kTokenUrl, "jti", kNow + 60, kNow).ok());
  EXPECT_EQ(cache.CheckAndRemember("owner", kTokenUrl, "jti", kNow + 60, kNow + 60).code(),
            absl::StatusCode::kAlreadyExists);
  // Charged to someone else, the same pair is still a replay.
  EXPECT_EQ(cache.CheckAndRemember("thief", kTokenUrl, "jti", kNow + 60, kNow + 30).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(cache.CheckAndRemember("owner", kTokenUrl, "jti", kNow + 121, kNow + 61).ok());
}

// Entries are placed by a hash keyed per instance: a client choosing jti values cannot predict
// (and so cannot aim at) the shard or table slot of its proofs. With an unkeyed hash two caches
// place every pair alike.
TEST(ReplayCacheTest, EntryPlacementIsKeyedPerInstance) {
  ReplayCache a, b;
  int differing = 0;
  for (int i = 0; i < 64; ++i) {
    const std::string jti = absl::StrCat("jti-", i);
    const size_t shard = a.ShardOfForTesting("https://broker/token", jti);
    EXPECT_EQ(shard, a.ShardOfForTesting("https://broker/token", jti));  // stable per instance
    if (shard != b.ShardOfForTesting("https://broker/token", jti)) ++differing;
  }
  // 16 shards: alike by chance for all 64 with probability 16^-64.
  EXPECT_GT(differing, 0);
}

TEST(ReplayCacheTest, PairEncodingIsUnambiguous) {
  ReplayCache cache;
  ASSERT_TRUE(cache.CheckAndRemember("owner", "a", "bc", kNow + 60, kNow).ok());
  EXPECT_TRUE(cache.CheckAndRemember("owner", "ab", "c", kNow + 60, kNow).ok());
}

TEST(ReplayCacheTest, ConcurrentUsesOfOneJtiAcceptExactlyOne) {
  ReplayCache cache;
  std::atomic<int> accepted{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      if (cache.CheckAndRemember(absl::StrCat("owner-", i), kTokenUrl, "same-jti", kNow + 60, kNow)
              .ok()) {
        ++accepted;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(accepted.load(), 1);
}

TEST(ReplayCacheTest, DefaultLimits) {
  ReplayCache cache;
  EXPECT_EQ(cache.max_entries(), size_t{1} << 21);
  EXPECT_EQ(cache.max_entries_per_owner(), size_t{1} << 18);
  EXPECT_EQ(ReplayCache(10, 100).max_entries_per_owner(), 10u);
  EXPECT_EQ(ReplayCache(0, 0).max_entries(), 1u);
  // A share smaller than the shard count is still exact.
  ReplayCache large(size_t{1} << 20, 4);
  int accepted = 0;
  for (int i = 0; i < 100; ++i) {
    accepted +=
        large.CheckAndRemember("owner", kTokenUrl, absl::StrCat("j", i), kNow + 60, kNow).ok();
  }
  EXPECT_EQ(accepted, 4);
}

// The red-team attack on one shared 100,000-entry set: one workload's legitimate rate (~2,300
// proofs/s for the 65 s a proof lives, ~150,000 entries) filled it and every other workload was
// refused. Now that workload is charged to its own share; others keep theirs.
TEST(ReplayCacheTest, OneOwnerFloodingCannotLockAnotherOut) {
  ReplayCache cache;
  size_t accepted = 0;
  absl::Status refused;
  // Flood for longer than it takes to use up the share, with expiries spread as live proofs'.
  for (size_t i = 0; i < cache.max_entries_per_owner() + 10000; ++i) {
    absl::Status status =
        cache.CheckAndRemember("spiffe://example.org/flooder", kTokenUrl, absl::StrCat("flood-", i),
                               kNow + 1 + i % 65, kNow);
    if (status.ok()) {
      ++accepted;
    } else {
      refused = status;
    }
    if (i == 150000) {
      // What filled the old cache: here it is well within the flooder's share.
      ASSERT_EQ(accepted, i + 1);
      ASSERT_TRUE(cache
                      .CheckAndRemember("spiffe://example.org/victim", kTokenUrl, "victim-early",
                                        kNow + 60, kNow)
                      .ok());
    }
  }
  // The flooder got at most its share (slightly less: each shard caps its part) ...
  EXPECT_LE(accepted, cache.max_entries_per_owner());
  EXPECT_GE(accepted, cache.max_entries_per_owner() * 9 / 10);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("share"));
  // ... and every fresh proof of another owner is still accepted.
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(cache
                    .CheckAndRemember("spiffe://example.org/victim", kTokenUrl,
                                      absl::StrCat("victim-", i), kNow + 60, kNow)
                    .ok())
        << i;
  }
  // Once the flood's proofs expire, the flooder's share is given back (each shard drops its
  // expired buckets on its next call).
  for (int i = 0; i < 5000; ++i) {
    ASSERT_TRUE(cache
                    .CheckAndRemember("spiffe://example.org/flooder", kTokenUrl,
                                      absl::StrCat("later-", i), kNow + 200, kNow + 66)
                    .ok())
        << i;
  }
  EXPECT_EQ(cache.size(), 5000u);
}

// The same attack through VerifyProof with real proofs: a key (the default owner) over its
// share is refused with ResourceExhausted, never a proof error, and another key is unaffected.
TEST(ReplayCacheTest, VerifyProofChargesEachKeyItsOwnShare) {
  crypto::PrivateKey flooder = NewKey();
  crypto::PrivateKey victim = NewKey();
  ReplayCache cache(64, 8);
  int accepted = 0;
  absl::Status refused;
  for (int i = 0; i < 20; ++i) {
    auto result = VerifyProof(*CreateProof(flooder, "POST", kTokenUrl, kNow), Options(), &cache);
    if (result.ok()) {
      ++accepted;
    } else {
      refused = result.status();
    }
  }
  EXPECT_EQ(accepted, 8);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  for (int i = 0; i < 8; ++i) {
    auto result = VerifyProof(*CreateProof(victim, "POST", kTokenUrl, kNow), Options(), &cache);
    EXPECT_TRUE(result.ok()) << result.status();
  }
  // With an explicit owner, two keys of one identity share one share.
  VerifyOptions as_identity = Options();
  as_identity.replay_owner = "spiffe://example.org/one-identity";
  ReplayCache shared(64, 2);
  EXPECT_TRUE(
      VerifyProof(*CreateProof(flooder, "POST", kTokenUrl, kNow), as_identity, &shared).ok());
  EXPECT_TRUE(
      VerifyProof(*CreateProof(victim, "POST", kTokenUrl, kNow), as_identity, &shared).ok());
  EXPECT_EQ(VerifyProof(*CreateProof(NewKey(), "POST", kTokenUrl, kNow), as_identity, &shared)
                .status()
                .code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(
      VerifyProof(*CreateProof(NewKey(), "POST", kTokenUrl, kNow), Options(), &shared).ok());
}

// The stated memory bound, checked against the allocator rather than the cache's own
// accounting: live entries cost at most kMaxBytesPerEntry each (plus small fixed tables).
TEST(ReplayCacheTest, MemoryPerEntryIsBounded) {
  constexpr size_t kEntries = size_t{1} << 19;
  const size_t before = mallinfo2().uordblks;
  {
    ReplayCache cache(size_t{1} << 20, size_t{1} << 20);
    for (size_t i = 0; i < kEntries; ++i) {
      ASSERT_TRUE(cache
                      .CheckAndRemember(absl::StrCat("owner-", i % 4), kTokenUrl,
                                        absl::StrCat("jti-", i), kNow + 1 + i % 65, kNow)
                      .ok());
    }
    const size_t used = mallinfo2().uordblks - before;
    const double per_entry = static_cast<double>(used) / kEntries;
    std::cout << "replay cache: " << per_entry << " bytes per entry (allocator), "
              << static_cast<double>(cache.ApproximateMemoryBytes()) / kEntries << " (estimate)\n";
    EXPECT_LE(per_entry, static_cast<double>(ReplayCache::kMaxBytesPerEntry));
    EXPECT_LE(cache.ApproximateMemoryBytes(), kEntries * ReplayCache::kMaxBytesPerEntry);
    // The estimate is within a third of what the allocator says.
    EXPECT_GE(cache.ApproximateMemoryBytes() * 3, used * 2);
  }
}

// The restart rule (issue item 7): a proof dated into the future by up to the allowed skew was
// acceptable to the previous instance, so a fresh instance refuses it.
TEST(VerifyProofTest, FreshVerifierRefusesFutureDatedProofsTheLastOneMayHaveAccepted) {
  crypto::PrivateKey key = NewKey();
  const int64_t kFuture = 5;
  // Instance 1 started long ago and accepts a proof dated kFuture - 1 s ahead.
  VerifyOptions first = Options();
  first.max_future_seconds = kFuture;
  first.not_before = FirstAcceptableIat(kNow - 3600, kFuture);
  ReplayCache first_cache;
  std::string proof = *CreateProof(key, "POST", kTokenUrl, kNow + kFuture - 1);
  ASSERT_TRUE(VerifyProof(proof, first, &first_cache).ok());
  // Instance 2 starts right after (same second, empty cache): while its window is open every
  // proof is refused as "not now" (Unavailable, a 503), ...
  VerifyOptions second = first;
  second.not_before = FirstAcceptableIat(kNow, kFuture);
  ReplayCache second_cache;
  auto during = VerifyProof(proof, second, &second_cache);
  EXPECT_EQ(during.status().code(), absl::StatusCode::kUnavailable) << during.status();
  EXPECT_THAT(std::string(during.status().message()), HasSubstr("retry with a new proof in 6 s"));
  // ... and after it the replay is refused for good, even dated the full skew ahead
  // (acceptable to instance 1 in its last second), while fresh proofs are accepted.
  second.now = kNow + kFuture + 1;
  ExpectRefused(VerifyProof(proof, second, &second_cache), "before the verifier restarted");
  ExpectRefused(VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow + kFuture), second, nullptr),
                "before the verifier restarted");
  EXPECT_TRUE(
      VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow + kFuture + 1), second, &second_cache)
          .ok());
  EXPECT_EQ(FirstAcceptableIat(100, 5), 106);
  EXPECT_EQ(FirstAcceptableIat(100, -1), 101);
}

// ---------------------------------------------------------------------------- helpers

TEST(ExtractSingleDpopHeaderTest, RequiresExactlyOneValue) {
  EXPECT_EQ(*ExtractSingleDpopHeader({"proof"}), "proof");
  auto none = ExtractSingleDpopHeader({});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(none.status().message(), "missing DPoP header");
  EXPECT_EQ(ExtractSingleDpopHeader({""}).status().message(), "missing DPoP header");
  EXPECT_EQ(ExtractSingleDpopHeader({"a", "b"}).status().message(), "more than one DPoP header");
}

struct HtuCase {
  const char* input;
  const char* normalized;  // nullptr: refused
};

TEST(NormalizeHtuTest, NormalizesOrRefusesTable) {
  const HtuCase kCases[] = {
      {"https://server.example.com/token", "https://server.example.com/token"},
      {"HTTPS://Server.Example.COM/Token", "https://server.example.com/Token"},
      {"https://server.example.com:443/token", "https://server.example.com/token"},
      {"http://server.example.com:80/token", "http://server.example.com/token"},
      {"http://server.example.com:443/token", "http://server.example.com:443/token"},
      {"https://server.example.com:8443/token", "https://server.example.com:8443/token"},
      {"https://server.example.com:08443/t", "https://server.example.com:8443/t"},
      {"https://server.example.com", "https://server.example.com/"},
      {"https://server.example.com?q=1", "https://server.example.com/"},
      {"https://server.example.com/token?a=b#frag", "https://server.example.com/token"},
      {"https://server.example.com/a%2fb%7e", "https://server.example.com/a%2Fb~"},
      {"https://[::1]:8443/token", "https://[::1]:8443/token"},
      {"https://[::1]/token", "https://[::1]/token"},
      {"https://127.0.0.1:443/", "https://127.0.0.1/"},
      {"https://server.example.com:/token", "https://server.example.com/token"},
      {"ftp://server.example.com/token", nullptr},
      {"/token", nullptr},
      {"server.example.com/token", nullptr},
      {"https://user@server.example.com/token", nullptr},
      {"https://user:pw@server.example.com/token", nullptr},
      {"https:///token", nullptr},
      {"https://server.example.com:0/", nullptr},
      {"https://server.example.com:65536/", nullptr},
      {"https://server.example.com:12a/", nullptr},
      {"https://a:1:2/", nullptr},
      {"https://server.example.com/a b", nullptr},
      {"https://server.example.com/a/../token", nullptr},
      {"https://server.example.com/./token", nullptr},
      {"https://server.example.com/%2e%2e/token", nullptr},
      {"https://server.example.com/a%zz", nullptr},
      {"https://server.example.com/a%4", nullptr},
      {"https://server.example.com/\xc3\xa9", nullptr},
      {"https://serv%65r.example.com/", nullptr},
      {"https://[::1/", nullptr}};
  for (const HtuCase& c : kCases) {
    auto result = NormalizeHtu(c.input);
    if (c.normalized == nullptr) {
      EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument) << c.input;
    } else {
      ASSERT_TRUE(result.ok()) << c.input << ": " << result.status();
      EXPECT_EQ(*result, c.normalized) << c.input;
    }
  }
}

// Imported proof keys are remembered by their JWK: later proofs under the same JWK must still be
// checked against it, so a proof carrying a known JWK but signed by another key is refused.
TEST(VerifyProofTest, KnownKeysAreReusedButStillCheckTheSignature) {
  crypto::PrivateKey key = NewKey();
  const std::string jkt = *jose::JwkThumbprint(key.public_key());
  for (int i = 0; i < 3; ++i) {
    auto verified = VerifyProof(*CreateProof(key, "POST", kTokenUrl, kNow), Options(), nullptr);
    ASSERT_TRUE(verified.ok()) << verified.status();
    EXPECT_EQ(verified->jkt, jkt);
    EXPECT_TRUE(verified->key.Equals(key.public_key()));
  }
  crypto::PrivateKey other = NewKey();
  ExpectRefused(VerifyProof(SignRaw(other, ValidHeader(key), ValidClaims()), Options(), nullptr),
                "signature");
  auto fresh = VerifyProof(*CreateProof(other, "POST", kTokenUrl, kNow), Options(), nullptr);
  ASSERT_TRUE(fresh.ok()) << fresh.status();
  EXPECT_EQ(fresh->jkt, *jose::JwkThumbprint(other.public_key()));
}

}  // namespace
}  // namespace mandate::dpop
