#include "mandate/token_verifier.h"

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/cord.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/dpop/dpop.h"
#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/unit/jose/test_keys.h"

namespace mandate {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr int64_t kNow = 1700000000;
constexpr char kIssuer[] = "https://broker.example";
constexpr char kAudience[] = "https://api.example.org";
constexpr char kUrl[] = "https://api.example.org/v1/items";

crypto::PrivateKey NewP256() {
  auto key = crypto::PrivateKey::GenerateP256();
  EXPECT_TRUE(key.ok()) << key.status();
  return *std::move(key);
}

jose::JwsSigner NewSigner(std::string kid, crypto::PrivateKey key = NewP256()) {
  auto signer = jose::JwsSigner::Create(std::move(key), std::move(kid));
  EXPECT_TRUE(signer.ok()) << signer.status();
  return *std::move(signer);
}

// The JWK the broker publishes at /keys for `signer`.
json PublishedJwk(const jose::JwsSigner& signer, std::string use = "sig") {
  json jwk = *jose::PublicKeyToJwk(signer.public_key());
  jwk["kid"] = signer.kid();
  jwk["alg"] = std::string(jose::AlgorithmName(signer.algorithm()));
  if (!use.empty()) jwk["use"] = use;
  return jwk;
}

std::string Jwks(const std::vector<json>& keys) { return json{{"keys", keys}}.dump(); }

std::string Jkt(const crypto::PrivateKey& key) { return *jose::JwkThumbprint(key.public_key()); }

// The claims IssueTaskToken writes, bound to `dpop_key`.
json TaskClaims(const crypto::PrivateKey& dpop_key, std::string issuer = kIssuer) {
  return json{{"iss", issuer},
              {"sub", "spiffe://example.org/agent/research-bot"},
              {"aud", kAudience},
              {"client_id", "spiffe://example.org/agent/research-bot"},
              {"scope", "items:read items:write"},
              {"jti", "0123456789abcdef0123456789abcdef"},
              {"iat", kNow},
              {"exp", kNow + 300},
              {"cnf", {{"jkt", Jkt(dpop_key)}}},
              {"task", {{"id", "task-42"}, {"purpose", "summarise the quarterly report"}}}};
}

std::string Sign(const jose::JwsSigner& signer, const json& claims,
                 const json& header = json{{"typ", "at+jwt"}}) {
  auto token = signer.Sign(header, claims);
  EXPECT_TRUE(token.ok()) << token.status();
  return *token;
}

std::string Proof(const crypto::PrivateKey& key, const std::string& token, int64_t iat = kNow,
                  std::string_view method = "GET", std::string_view url = kUrl) {
  auto proof = dpop::CreateProof(key, method, url, iat, token);
  EXPECT_TRUE(proof.ok()) << proof.status();
  return *proof;
}

// A JWS with arbitrary header and claims and an arbitrary signature, for proofs no signer makes.
std::string HandMade(const json& header, const json& claims, std::string_view signature) {
  return jose::Base64UrlEncode(header.dump()) + "." + jose::Base64UrlEncode(claims.dump()) + "." +
         jose::Base64UrlEncode(signature);
}

HttpRequestView Request(const std::string& token, const std::string& proof) {
  return HttpRequestView{"GET", kUrl, {"DPoP " + token}, {proof}};
}

TokenVerifierOptions Options(int64_t now = kNow) {
  TokenVerifierOptions options;
  options.issuer = kIssuer;
  options.audience = kAudience;
  options.clock = [now] { return now; };
  return options;
}

// Options whose clock reads an hour earlier until `created` is set: a verifier created with
// them has been running for an hour when the test starts using it, so the restart rule (no
// proofs until creation + proof_max_future_seconds + 1) is long behind it, as for a service
// that has been up for a while.
TokenVerifierOptions StartedAnHourAgo(TokenVerifierOptions options,
                                      std::shared_ptr<std::atomic<bool>> created) {
  options.clock = [clock = options.clock, created] {
    return created->load() ? clock() : clock() - 3600;
  };
  return options;
}

std::unique_ptr<TokenVerifier> StaticVerifier(const std::string& jwks,
                                              TokenVerifierOptions options = Options()) {
  auto created = std::make_shared<std::atomic<bool>>(false);
  auto verifier =
      TokenVerifier::CreateWithJwks(StartedAnHourAgo(std::move(options), created), jwks);
  *created = true;
  EXPECT_TRUE(verifier.ok()) << verifier.status();
  return *std::move(verifier);
}

std::string SignaturePart(const std::string& jws) { return jws.substr(jws.rfind('.') + 1); }

// Asserts a refusal with `oauth_code` and `code`, whose message names `message_part` and echoes
// neither the token nor the proof.
void ExpectRefused(const absl::StatusOr<VerifiedTaskToken>& result, std::string_view oauth_code,
                   std::string_view message_part, const HttpRequestView& request,
                   absl::StatusCode code = absl::StatusCode::kUnauthenticated) {
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), code) << result.status();
  EXPECT_EQ(OAuthErrorCode(result.status()), oauth_code) << result.status();
  const std::string message(result.status().message());
  EXPECT_THAT(message, HasSubstr(std::string(message_part)));
  for (const std::string& value : request.authorization) {
    if (value.size() > 40) {
      EXPECT_THAT(message, Not(HasSubstr(SignaturePart(value))));
    }
  }
  for (const std::string& value : request.dpop) {
    if (value.size() > 40) {
      EXPECT_THAT(message, Not(HasSubstr(SignaturePart(value))));
    }
  }
}

// One broker signing key, one agent DPoP key and a verifier trusting the former.
class TokenVerifierTest : public ::testing::Test {
 protected:
  TokenVerifierTest() : signer_(NewSigner("k1")), dpop_key_(NewP256()) {
    verifier_ = StaticVerifier(Jwks({PublishedJwk(signer_)}));
  }

  // Signs `claims` (default: a valid task token) and returns a request with a fresh proof.
  HttpRequestView SignedRequest(const json& claims) {
    token_ = Sign(signer_, claims);
    return Request(token_, Proof(dpop_key_, token_));
  }
  HttpRequestView ValidRequest() { return SignedRequest(TaskClaims(dpop_key_)); }

  jose::JwsSigner signer_;
  crypto::PrivateKey dpop_key_;
  std::unique_ptr<TokenVerifier> verifier_;
  std::string token_;
};

// ---------------------------------------------------------------------------- acceptance

TEST_F(TokenVerifierTest, AcceptsTaskTokenWithMatchingProof) {
  json claims = TaskClaims(dpop_key_);
  claims["act"] = {{"sub", "spiffe://example.org/agent/sub-agent"},
                   {"act", {{"sub", "spiffe://example.org/agent/research-bot"}}}};
  claims["sub"] = "alice@example.org";
  HttpRequestView request = SignedRequest(claims);

  auto token = verifier_->Verify(request);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(token->issuer(), kIssuer);
  EXPECT_EQ(token->subject(), "alice@example.org");
  EXPECT_EQ(token->client_id(), "spiffe://example.org/agent/research-bot");
  EXPECT_THAT(token->audience(), ::testing::ElementsAre(kAudience));
  EXPECT_THAT(token->scopes(), ::testing::ElementsAre("items:read", "items:write"));
  EXPECT_TRUE(token->HasScope("items:write"));
  EXPECT_FALSE(token->HasScope("items:delete"));
  EXPECT_FALSE(token->HasScope("items"));
  EXPECT_EQ(token->task_id(), "task-42");
  EXPECT_EQ(token->task_purpose(), "summarise the quarterly report");
  EXPECT_EQ(token->jti(), "0123456789abcdef0123456789abcdef");
  EXPECT_EQ(token->jkt(), Jkt(dpop_key_));
  EXPECT_EQ(token->issued_at(), kNow);
  EXPECT_EQ(token->expires_at(), kNow + 300);
  EXPECT_THAT(token->actor_chain(),
              ::testing::ElementsAre("spiffe://example.org/agent/sub-agent",
                                     "spiffe://example.org/agent/research-bot"));
  EXPECT_EQ(json::parse(token->claims_json())["task"]["id"], "task-42");
}

TEST_F(TokenVerifierTest, AcceptsUndelegatedTokenWithEmptyActorChain) {
  auto token = verifier_->Verify(ValidRequest());
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_TRUE(token->actor_chain().empty());
}

TEST_F(TokenVerifierTest, AcceptsSchemeAndMediaTypeInAnyCase) {
  std::string token = Sign(signer_, TaskClaims(dpop_key_), {{"typ", "application/AT+JWT"}});
  HttpRequestView request{"GET", kUrl, {"dpop " + token}, {Proof(dpop_key_, token)}};
  auto verified = verifier_->Verify(request);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(TokenVerifierTest, AcceptsAudienceArrayContainingOurs) {
  json claims = TaskClaims(dpop_key_);
  claims["aud"] = {"https://other.example", kAudience};
  auto verified = verifier_->Verify(SignedRequest(claims));
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->audience().size(), 2u);
}

// ---------------------------------------------------------------------------- Authorization

TEST_F(TokenVerifierTest, NoAuthorizationHeaderGetsBareChallenge) {
  HttpRequestView request = ValidRequest();
  request.authorization.clear();
  auto result = verifier_->Verify(request);
  ExpectRefused(result, "", "no Authorization header", request);
  EXPECT_EQ(HttpStatusForError(result.status()), 401);
  EXPECT_EQ(WwwAuthenticateChallenge(result.status()), "DPoP algs=\"ES256\"");
}

TEST_F(TokenVerifierTest, RefusesTwoAuthorizationHeaders) {
  HttpRequestView request = ValidRequest();
  request.authorization.push_back(request.authorization.front());
  auto result = verifier_->Verify(request);
  ExpectRefused(result, "invalid_request", "more than one Authorization", request,
                absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(HttpStatusForError(result.status()), 400);
}

TEST_F(TokenVerifierTest, RefusesDpopBoundTokenPresentedAsBearer) {
  HttpRequestView request = ValidRequest();
  request.authorization = {"Bearer " + token_};
  ExpectRefused(verifier_->Verify(request), "invalid_token", "presented as Bearer", request);
  request.authorization = {"bearer " + token_};
  request.dpop.clear();
  ExpectRefused(verifier_->Verify(request), "invalid_token", "presented as Bearer", request);
}

TEST_F(TokenVerifierTest, RefusesOtherSchemesAsMissingCredentials) {
  HttpRequestView request = ValidRequest();
  request.authorization = {"Basic dXNlcjpwYXNz"};
  ExpectRefused(verifier_->Verify(request), "", "scheme is not DPoP", request);
  request.authorization = {"DPoPx " + token_};
  ExpectRefused(verifier_->Verify(request), "", "scheme is not DPoP", request);
}

TEST_F(TokenVerifierTest, RefusesMalformedAuthorizationValue) {
  HttpRequestView request = ValidRequest();
  for (std::string value :
       std::vector<std::string>{"DPoP", "DPoP ", "DPoP  " + token_, "DPoP " + token_ + " ",
                                "DPoP " + token_ + ",x", "DPoP =" + token_}) {
    request.authorization = {value};
    ExpectRefused(verifier_->Verify(request), "invalid_request", "DPoP", request,
                  absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(TokenVerifierTest, RefusesOversizedToken) {
  HttpRequestView request = ValidRequest();
  request.authorization = {"DPoP " + std::string(16385, 'a')};
  ExpectRefused(verifier_->Verify(request), "invalid_token", "longer than 16384", request);
}

// ---------------------------------------------------------------------------- the token

TEST_F(TokenVerifierTest, RefusesExpiredToken) {
  json claims = TaskClaims(dpop_key_);
  claims["iat"] = kNow - 400;
  claims["exp"] = kNow - 31;  // beyond the 30 s skew
  HttpRequestView request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "expired", request);
  // Within the skew it is still accepted (so the refusal above is about the time).
  claims["exp"] = kNow - 29;
  EXPECT_TRUE(verifier_->Verify(SignedRequest(claims)).ok());
}

TEST_F(TokenVerifierTest, RefusesTokenNotYetValid) {
  json claims = TaskClaims(dpop_key_);
  claims["nbf"] = kNow + 100;
  HttpRequestView request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "not yet valid", request);
}

TEST_F(TokenVerifierTest, RefusesTokenWithoutExpOrIat) {
  for (const char* claim : {"exp", "iat"}) {
    json claims = TaskClaims(dpop_key_);
    claims.erase(claim);
    HttpRequestView request = SignedRequest(claims);
    ExpectRefused(verifier_->Verify(request), "invalid_token", claim, request);
  }
}

TEST_F(TokenVerifierTest, RefusesWrongIssuer) {
  HttpRequestView request = SignedRequest(TaskClaims(dpop_key_, "https://evil.example"));
  ExpectRefused(verifier_->Verify(request), "invalid_token", "iss", request);
}

TEST_F(TokenVerifierTest, RefusesWrongAudience) {
  json claims = TaskClaims(dpop_key_);
  claims["aud"] = "https://other-api.example.org";
  HttpRequestView request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "aud", request);
}

TEST_F(TokenVerifierTest, RefusesJwtSvidAndUntypedTokens) {
  for (json header : {json{{"typ", "JWT"}}, json::object(), json{{"typ", "dpop+jwt"}}}) {
    token_ = Sign(signer_, TaskClaims(dpop_key_), header);
    HttpRequestView request = Request(token_, Proof(dpop_key_, token_));
    ExpectRefused(verifier_->Verify(request), "invalid_token", "typ", request);
  }
}

TEST_F(TokenVerifierTest, RefusesAlgorithmNotInOptions) {
  jose::JwsSigner p384 = NewSigner("k384", jose::test_keys::GenerateEc("P-384"));
  std::string jwks = Jwks({PublishedJwk(signer_), PublishedJwk(p384)});
  token_ = Sign(p384, TaskClaims(dpop_key_));
  HttpRequestView request = Request(token_, Proof(dpop_key_, token_));
  ExpectRefused(StaticVerifier(jwks)->Verify(request), "invalid_token", "ES384", request);

  // The same token passes once ES384 is allowed: the refusal was about the algorithm.
  TokenVerifierOptions options = Options();
  options.algorithms = {"ES256", "ES384"};
  request = Request(token_, Proof(dpop_key_, token_));
  auto verified = StaticVerifier(jwks, options)->Verify(request);
  EXPECT_TRUE(verified.ok()) << verified.status();
}

TEST_F(TokenVerifierTest, RefusesTamperedToken) {
  HttpRequestView request = ValidRequest();
  // Swap in a payload granting more scopes, keeping the original signature.
  json claims = TaskClaims(dpop_key_);
  claims["scope"] = "items:read items:write admin";
  std::string forged_payload = jose::Base64UrlEncode(claims.dump());
  size_t first = token_.find('.');
  size_t second = token_.find('.', first + 1);
  std::string forged = token_.substr(0, first + 1) + forged_payload + token_.substr(second);
  request = Request(forged, Proof(dpop_key_, forged));
  ExpectRefused(verifier_->Verify(request), "invalid_token", "signature", request);
}

TEST_F(TokenVerifierTest, RefusesTokenSignedByAnotherKeyUnderKnownKid) {
  jose::JwsSigner impostor = NewSigner("k1");
  token_ = Sign(impostor, TaskClaims(dpop_key_));
  HttpRequestView request = Request(token_, Proof(dpop_key_, token_));
  ExpectRefused(verifier_->Verify(request), "invalid_token", "signature", request);
}

TEST_F(TokenVerifierTest, RefusesUnknownOrMissingKid) {
  jose::JwsSigner other = NewSigner("k2");
  token_ = Sign(other, TaskClaims(dpop_key_));
  HttpRequestView request = Request(token_, Proof(dpop_key_, token_));
  ExpectRefused(verifier_->Verify(request), "invalid_token", "kid", request);

  jose::JwsSigner no_kid = NewSigner("");
  token_ = Sign(no_kid, TaskClaims(dpop_key_));
  request = Request(token_, Proof(dpop_key_, token_));
  ExpectRefused(verifier_->Verify(request), "invalid_token", "no kid", request);
}

TEST_F(TokenVerifierTest, IgnoresKeysPublishedForAnotherUse) {
  auto verifier = StaticVerifier(Jwks({PublishedJwk(signer_, "enc")}));
  HttpRequestView request = ValidRequest();
  ExpectRefused(verifier->Verify(request), "invalid_token", "kid", request);
  // A key without "use" is unrestricted (RFC 7517 §4.2).
  verifier = StaticVerifier(Jwks({PublishedJwk(signer_, "")}));
  EXPECT_TRUE(verifier->Verify(ValidRequest()).ok());
}

TEST_F(TokenVerifierTest, RefusesKeyWhoseAlgDiffersFromToken) {
  json jwk = PublishedJwk(signer_);
  jwk["alg"] = "ES384";
  HttpRequestView request = ValidRequest();
  ExpectRefused(StaticVerifier(Jwks({jwk}))->Verify(request), "invalid_token", "alg", request);
}

TEST_F(TokenVerifierTest, RefusesTokenWithoutCnf) {
  for (json cnf : {json(), json::object(), json{{"jkt", ""}}, json{{"jkt", 7}}}) {
    json claims = TaskClaims(dpop_key_);
    if (cnf.is_null()) {
      claims.erase("cnf");
    } else {
      claims["cnf"] = cnf;
    }
    HttpRequestView request = SignedRequest(claims);
    ExpectRefused(verifier_->Verify(request), "invalid_token", "cnf.jkt", request);
  }
}

TEST_F(TokenVerifierTest, RefusesTokenMissingRequiredClaims) {
  for (const char* claim : {"sub", "client_id", "jti", "task"}) {
    json claims = TaskClaims(dpop_key_);
    claims.erase(claim);
    HttpRequestView request = SignedRequest(claims);
    ExpectRefused(verifier_->Verify(request), "invalid_token", claim, request);
  }
  json claims = TaskClaims(dpop_key_);
  claims["task"] = {{"purpose", "no id"}};
  HttpRequestView request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "task.id", request);
  claims = TaskClaims(dpop_key_);
  claims["scope"] = json::array({"items:read"});
  request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "scope", request);
}

TEST_F(TokenVerifierTest, RefusesMalformedOrTooDeepActorChain) {
  json claims = TaskClaims(dpop_key_);
  claims["act"] = {{"act", {{"sub", 42}}}, {"sub", "spiffe://example.org/agent/a"}};
  HttpRequestView request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "act.sub", request);

  claims["act"] = "spiffe://example.org/agent/a";
  request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "act", request);

  auto chain = [](int depth) {
    json act;
    for (int i = depth; i > 0; --i) {
      json outer = {{"sub", "spiffe://example.org/agent/a" + std::to_string(i)}};
      if (!act.is_null()) outer["act"] = act;
      act = outer;
    }
    return act;
  };
  claims["act"] = chain(16);
  auto accepted = verifier_->Verify(SignedRequest(claims));
  ASSERT_TRUE(accepted.ok()) << accepted.status();
  EXPECT_EQ(accepted->actor_chain().size(), 16u);
  EXPECT_EQ(accepted->actor_chain().front(), "spiffe://example.org/agent/a1");
  claims["act"] = chain(17);
  request = SignedRequest(claims);
  ExpectRefused(verifier_->Verify(request), "invalid_token", "deeper than 16", request);
}

// ---------------------------------------------------------------------------- the proof

TEST_F(TokenVerifierTest, RefusesMissingOrDoubleDpopHeader) {
  HttpRequestView request = ValidRequest();
  request.dpop.clear();
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "missing DPoP header", request);
  request.dpop = {Proof(dpop_key_, token_), Proof(dpop_key_, token_)};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "more than one DPoP", request);
}

TEST_F(TokenVerifierTest, RefusesUnsignedAndHmacProofs) {
  HttpRequestView request = ValidRequest();
  json jwk = *jose::PublicKeyToJwk(dpop_key_.public_key());
  json claims = {{"jti", "abcdefghijklmnopqrstuv"},
                 {"htm", "GET"},
                 {"htu", kUrl},
                 {"iat", kNow},
                 {"ath", dpop::AccessTokenHash(token_)}};
  for (const char* alg : {"none", "HS256"}) {
    request.dpop = {HandMade({{"typ", "dpop+jwt"}, {"alg", alg}, {"jwk", jwk}}, claims,
                             std::string(32, '\x01'))};
    ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", alg, request);
  }
}

TEST_F(TokenVerifierTest, RefusesProofCarryingPrivateKey) {
  HttpRequestView request = ValidRequest();
  json jwk = *jose::PublicKeyToJwk(dpop_key_.public_key());
  jwk["d"] = jose::Base64UrlEncode(std::string(32, '\x07'));
  json header = {{"typ", "dpop+jwt"}, {"alg", "ES256"}, {"jwk", jwk}};
  json claims = {{"jti", "abcdefghijklmnopqrstuv"},
                 {"htm", "GET"},
                 {"htu", kUrl},
                 {"iat", kNow},
                 {"ath", dpop::AccessTokenHash(token_)}};
  auto proof = jose::SignCompact(dpop_key_, jose::Algorithm::kES256, header.dump(), claims.dump());
  ASSERT_TRUE(proof.ok()) << proof.status();
  request.dpop = {*proof};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "private member", request);
}

TEST_F(TokenVerifierTest, RefusesProofForAnotherMethodOrUrl) {
  HttpRequestView request = ValidRequest();
  request.dpop = {Proof(dpop_key_, token_, kNow, "POST")};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "htm", request);
  request.dpop = {Proof(dpop_key_, token_, kNow, "GET", "https://api.example.org/v1/admin")};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "htu", request);
}

TEST_F(TokenVerifierTest, RefusesStaleAndFutureProofs) {
  HttpRequestView request = ValidRequest();
  request.dpop = {Proof(dpop_key_, token_, kNow - 61)};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "in the past", request);
  request.dpop = {Proof(dpop_key_, token_, kNow + 6)};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "in the future", request);
  request.dpop = {Proof(dpop_key_, token_, kNow + 5)};
  EXPECT_TRUE(verifier_->Verify(request).ok());
}

TEST_F(TokenVerifierTest, RefusesReplayedProof) {
  HttpRequestView request = ValidRequest();
  ASSERT_TRUE(verifier_->Verify(request).ok());
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "replayed", request);
  // A fresh proof for the same token is fine: tokens are reusable, proofs are not.
  request.dpop = {Proof(dpop_key_, token_)};
  EXPECT_TRUE(verifier_->Verify(request).ok());
}

TEST_F(TokenVerifierTest, RefusesProofBoundToAnotherToken) {
  HttpRequestView request = ValidRequest();
  json other_claims = TaskClaims(dpop_key_);
  other_claims["scope"] = "items:read";
  request.dpop = {Proof(dpop_key_, Sign(signer_, other_claims))};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "ath", request);
}

TEST_F(TokenVerifierTest, RefusesProofByKeyOtherThanCnfJkt) {
  HttpRequestView request = ValidRequest();
  crypto::PrivateKey thief = NewP256();
  request.dpop = {Proof(thief, token_)};
  ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "cnf.jkt", request);
}

// Issue item 7: a proof dated into the future (within proof_max_future_seconds) that the
// previous instance of the service accepted is refused by a verifier created right after.
TEST_F(TokenVerifierTest, ARestartedVerifierRefusesAFutureDatedProofTheLastOneAccepted) {
  HttpRequestView request = ValidRequest();
  request.dpop = {Proof(dpop_key_, token_, kNow + 4)};  // the allowed 5 s ahead, minus one
  ASSERT_TRUE(verifier_->Verify(request).ok());
  // The restart: a new verifier (empty replay cache), created now.
  std::atomic<int64_t> now{kNow};
  TokenVerifierOptions options = Options();
  options.clock = [&now] { return now.load(); };
  auto restarted = TokenVerifier::CreateWithJwks(options, Jwks({PublishedJwk(signer_)}));
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  // While the window is open every proof is refused with a 503 the client may retry.
  auto during = (*restarted)->Verify(request);
  ExpectRefused(during, "temporarily_unavailable", "restarted", request,
                absl::StatusCode::kUnavailable);
  EXPECT_EQ(HttpStatusForError(during.status()), 503);
  // After it, the replayed proof is refused for good; a fresh one is accepted.
  now = kNow + 6;
  ExpectRefused((*restarted)->Verify(request), "invalid_dpop_proof",
                "before the verifier restarted", request);
  request.dpop = {Proof(dpop_key_, token_, kNow + 6)};
  EXPECT_TRUE((*restarted)->Verify(request).ok());
}

// Issue item 5 at the verifier: fresh proofs for one token used to fill the shared cache in
// ~17 s, after which every client got 401 invalid_dpop_proof. Now each client (client_id) has
// its own share; a client over it gets 503 temporarily_unavailable and the others keep working.
TEST_F(TokenVerifierTest, OneClientFloodingFreshProofsCannotLockAnotherOut) {
  TokenVerifierOptions options = Options();
  options.replay_cache_entries = 64;
  options.replay_cache_entries_per_client = 8;
  auto verifier = StaticVerifier(Jwks({PublishedJwk(signer_)}), options);
  HttpRequestView flood = ValidRequest();
  int accepted = 0;
  absl::Status refused;
  for (int i = 0; i < 20; ++i) {
    flood.dpop = {Proof(dpop_key_, token_)};
    auto result = verifier->Verify(flood);
    if (result.ok()) {
      ++accepted;
    } else {
      refused = result.status();
    }
  }
  EXPECT_EQ(accepted, 8);
  EXPECT_EQ(refused.code(), absl::StatusCode::kUnavailable) << refused;
  EXPECT_EQ(OAuthErrorCode(refused), "temporarily_unavailable");
  EXPECT_EQ(HttpStatusForError(refused), 503);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("share"));
  // Another client, with its own key and token, is served.
  crypto::PrivateKey other_key = NewP256();
  json other = TaskClaims(other_key);
  other["client_id"] = "spiffe://example.org/agent/other";
  other["sub"] = "spiffe://example.org/agent/other";
  std::string other_token = Sign(signer_, other);
  for (int i = 0; i < 8; ++i) {
    auto result = verifier->Verify(Request(other_token, Proof(other_key, other_token)));
    EXPECT_TRUE(result.ok()) << result.status();
  }
  // A full cache answers the same way, never with a proof error.
  TokenVerifierOptions tiny = Options();
  tiny.replay_cache_entries = 1;
  auto full = StaticVerifier(Jwks({PublishedJwk(signer_)}), tiny);
  ASSERT_TRUE(full->Verify(Request(other_token, Proof(other_key, other_token))).ok());
  auto refused_full = full->Verify(ValidRequest());
  EXPECT_EQ(OAuthErrorCode(refused_full.status()), "temporarily_unavailable");
  EXPECT_EQ(HttpStatusForError(refused_full.status()), 503);
}

// Issue item 11: a token or proof repeating a member name is refused, whichever value a
// last-wins parser would have kept.
TEST_F(TokenVerifierTest, RefusesTokensAndProofsWithDuplicateMemberNames) {
  const std::string claims = TaskClaims(dpop_key_).dump();
  const std::string header = R"({"typ":"at+jwt","alg":"ES256","kid":"k1"})";
  auto signed_with = [&](const std::string& h, const std::string& c) {
    auto token = jose::SignCompact(signer_.private_key(), jose::Algorithm::kES256, h, c);
    EXPECT_TRUE(token.ok());
    return token.value_or("");
  };
  auto with_member = [](std::string object, const std::string& member) {
    object.insert(1, member + ",");
    return object;
  };
  for (const std::string& token : {
           signed_with(with_member(header, R"("alg":"none")"), claims),
           signed_with(with_member(header, R"("typ":"JWT")"), claims),
           signed_with(header, with_member(claims, R"("aud":"https://evil.example")")),
           signed_with(header, with_member(claims, R"("cnf":{"jkt":"someone-else"})")),
           signed_with(header, with_member(claims, R"("jti":"another")")),
       }) {
    HttpRequestView request = Request(token, Proof(dpop_key_, token));
    ExpectRefused(verifier_->Verify(request), "invalid_token", "duplicate member name", request);
  }
  // The proof: a second htm, and a second x inside its jwk.
  std::string token = Sign(signer_, TaskClaims(dpop_key_));
  json jwk = *jose::PublicKeyToJwk(dpop_key_.public_key());
  std::string proof_claims = json{
      {"jti", "0123456789abcdefghij"},
      {"htm", "GET"},
      {"htu", kUrl},
      {"iat", kNow},
      {"ath", dpop::AccessTokenHash(
                  token)}}.dump();
  std::string proof_header = json{{"typ", "dpop+jwt"}, {"alg", "ES256"}, {"jwk", jwk}}.dump();
  std::string doubled_jwk = proof_header;
  doubled_jwk.insert(doubled_jwk.find(R"("crv")"), R"("x":"AAAA",)");
  for (const auto& [h, c] : std::vector<std::pair<std::string, std::string>>{
           {proof_header, with_member(proof_claims, R"("htm":"POST")")},
           {doubled_jwk, proof_claims},
       }) {
    auto proof = jose::SignCompact(dpop_key_, jose::Algorithm::kES256, h, c);
    ASSERT_TRUE(proof.ok());
    HttpRequestView request = Request(token, *proof);
    ExpectRefused(verifier_->Verify(request), "invalid_dpop_proof", "duplicate member name",
                  request);
  }
}

TEST_F(TokenVerifierTest, RefusesRelativeRequestUrlAsBadRequest) {
  HttpRequestView request = ValidRequest();
  request.url = "/v1/items";
  ExpectRefused(verifier_->Verify(request), "invalid_request", "request URL", request,
                absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------- options

TEST(TokenVerifierCreateTest, RefusesUnsafeOptions) {
  std::string jwks = Jwks({});
  auto expect_refused = [&](TokenVerifierOptions options, std::string_view why) {
    auto with_jwks = TokenVerifier::CreateWithJwks(options, jwks);
    ASSERT_FALSE(with_jwks.ok()) << why;
    EXPECT_EQ(with_jwks.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(with_jwks.status().message()), HasSubstr(std::string(why)));
    auto with_discovery = TokenVerifier::Create(options);
    ASSERT_FALSE(with_discovery.ok()) << why;
    EXPECT_EQ(with_discovery.status().code(), absl::StatusCode::kInvalidArgument);
  };
  TokenVerifierOptions options = Options();
  options.issuer.clear();
  expect_refused(options, "issuer");
  options = Options();
  options.audience.clear();
  expect_refused(options, "audience");
  for (const char* alg : {"none", "HS256", "HS512", "es256"}) {
    options = Options();
    options.algorithms = {"ES256", alg};
    expect_refused(options, alg);
  }
  options = Options();
  options.algorithms.clear();
  expect_refused(options, "algorithm");
  options = Options();
  options.clock_skew_seconds = -1;
  expect_refused(options, "negative");
  EXPECT_TRUE(TokenVerifier::CreateWithJwks(Options(), jwks).ok());
  EXPECT_TRUE(TokenVerifier::Create(Options()).ok());
}

TEST(TokenVerifierCreateTest, RefusesUnusableIssuerUrls) {
  for (const char* issuer :
       {"broker.example", "ftp://broker.example", "https://broker.example?x=1",
        "https://broker.example#f", "https://user@broker.example", "http://broker.example"}) {
    TokenVerifierOptions options = Options();
    options.issuer = issuer;
    auto verifier = TokenVerifier::Create(options);
    EXPECT_FALSE(verifier.ok()) << issuer;
  }
  // Plain http is fine on loopback, and elsewhere when explicitly allowed.
  TokenVerifierOptions options = Options();
  options.issuer = "http://127.0.0.1:8080";
  EXPECT_TRUE(TokenVerifier::Create(options).ok());
  options.issuer = "http://broker.example";
  options.allow_insecure_http = true;
  EXPECT_TRUE(TokenVerifier::Create(options).ok());
}

TEST(TokenVerifierCreateTest, RefusesMalformedJwks) {
  auto verifier = TokenVerifier::CreateWithJwks(Options(), "{\"keys\": 1}");
  ASSERT_FALSE(verifier.ok());
  EXPECT_EQ(verifier.status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------- challenges

TEST_F(TokenVerifierTest, ChallengeCarriesErrorDescriptionAndAlgs) {
  json claims = TaskClaims(dpop_key_);
  claims["aud"] = "https://other.example";
  auto result = verifier_->Verify(SignedRequest(claims));
  ASSERT_FALSE(result.ok());
  std::string challenge = WwwAuthenticateChallenge(result.status(), {"ES256", "ES384"});
  EXPECT_THAT(challenge,
              ::testing::StartsWith("DPoP error=\"invalid_token\", error_description=\""));
  EXPECT_THAT(challenge, ::testing::EndsWith(", algs=\"ES256 ES384\""));
  EXPECT_THAT(challenge, HasSubstr("aud does not contain"));
}

TEST(ChallengeTest, DescriptionKeepsOnlyCharactersRfc6750Allows) {
  absl::Status status = absl::UnauthenticatedError(
      std::string("bad \"quote\" back\\slash\r\nnew line \x01 caf\xc3\xa9 ") +
      std::string(300, 'x'));
  status.SetPayload("type.mandate.dev/oauth-error", absl::Cord("invalid_token"));
  std::string challenge = WwwAuthenticateChallenge(status);
  EXPECT_EQ(OAuthErrorCode(status), "invalid_token");
  std::string description = challenge.substr(challenge.find("error_description=\"") + 19);
  description = description.substr(0, description.find('"'));
  EXPECT_EQ(description.size(), 200u);
  for (char c : description) {
    EXPECT_TRUE(c >= 0x20 && c <= 0x7E && c != '"' && c != '\\') << static_cast<int>(c);
  }
  EXPECT_THAT(description, ::testing::StartsWith("bad 'quote' back'slash''new line"));
}

TEST_F(TokenVerifierTest, RequireScopeAnswersInsufficientScope) {
  auto token = verifier_->Verify(ValidRequest());
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_TRUE(RequireScope(*token, "items:read").ok());
  absl::Status missing = RequireScope(*token, "items:delete");
  EXPECT_EQ(missing.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(OAuthErrorCode(missing), "insufficient_scope");
  EXPECT_EQ(HttpStatusForError(missing), 403);
  EXPECT_THAT(WwwAuthenticateChallenge(missing),
              HasSubstr("error=\"insufficient_scope\", error_description=\"token lacks the scope "
                        "'items:delete'\", scope=\"items:delete\""));
}

TEST(ChallengeTest, HttpStatusForEachClass) {
  EXPECT_EQ(HttpStatusForError(absl::UnavailableError("keys")), 503);
  // A replay cache that cannot take the proof is a 503 even if classified like a 401 would be.
  absl::Status unavailable = absl::ResourceExhaustedError("full");
  unavailable.SetPayload("type.mandate.dev/oauth-error", absl::Cord("temporarily_unavailable"));
  EXPECT_EQ(HttpStatusForError(unavailable), 503);
  EXPECT_EQ(HttpStatusForError(absl::UnauthenticatedError("no credentials")), 401);
  EXPECT_EQ(HttpStatusForError(absl::InternalError("bug")), 500);
  EXPECT_EQ(OAuthErrorCode(absl::OkStatus()), "");
}

// ---------------------------------------------------------------------------- keys over HTTP

// A broker stand-in serving discovery and /keys on 127.0.0.1, counting requests.
class KeyServer {
 public:
  KeyServer() {
    server_.Get("/.well-known/openid-configuration", [this](const httplib::Request&,
                                                            httplib::Response& res) {
      discovery_fetches_++;
      std::lock_guard<std::mutex> lock(mu_);
      res.set_content(discovery_.empty() ? DefaultDiscovery() : discovery_, "application/json");
    });
    server_.Get("/keys", [this](const httplib::Request&, httplib::Response& res) {
      std::this_thread::sleep_for(std::chrono::milliseconds(keys_delay_ms_.load()));
      keys_fetches_++;
      std::lock_guard<std::mutex> lock(mu_);
      res.status = keys_status_;
      res.set_content(jwks_, "application/json");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    EXPECT_GT(port_, 0);
    thread_ = std::thread([this] { server_.listen_after_bind(); });
  }
  ~KeyServer() { Stop(); }

  void Stop() {
    // stop() does nothing until the listen loop runs, so wait for it first.
    while (thread_.joinable() && !server_.is_running()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }

  std::string issuer() const { return "http://127.0.0.1:" + std::to_string(port_); }
  void SetJwks(std::string jwks) {
    std::lock_guard<std::mutex> lock(mu_);
    jwks_ = std::move(jwks);
  }
  void SetKeysStatus(int status) {
    std::lock_guard<std::mutex> lock(mu_);
    keys_status_ = status;
  }
  void SetDiscovery(std::string discovery) {
    std::lock_guard<std::mutex> lock(mu_);
    discovery_ = std::move(discovery);
  }
  void SetKeysDelayMs(int ms) { keys_delay_ms_ = ms; }
  int discovery_fetches() const { return discovery_fetches_; }
  int keys_fetches() const { return keys_fetches_; }

 private:
  std::string DefaultDiscovery() const {
    return json{{"issuer", issuer()}, {"jwks_uri", issuer() + "/keys"}}.dump();
  }

  httplib::Server server_;
  int port_ = -1;
  std::thread thread_;
  std::mutex mu_;
  std::string jwks_ = "{\"keys\":[]}";  // guarded by mu_
  std::string discovery_;               // guarded by mu_; empty: the correct document
  int keys_status_ = 200;               // guarded by mu_
  std::atomic<int> keys_delay_ms_{0};
  std::atomic<int> discovery_fetches_{0};
  std::atomic<int> keys_fetches_{0};
};

class TokenVerifierHttpTest : public ::testing::Test {
 protected:
  TokenVerifierHttpTest() : k1_(NewSigner("k1")), dpop_key_(NewP256()) {
    server_.SetJwks(Jwks({PublishedJwk(k1_)}));
  }

  std::unique_ptr<TokenVerifier> NewVerifier() {
    TokenVerifierOptions options;
    options.issuer = server_.issuer();
    options.audience = kAudience;
    options.clock = [this] { return now_.load(); };
    options.jwks_refresh_min_interval_seconds = 30;
    options.jwks_max_age_seconds = 300;
    options.jwks_max_stale_seconds = 3600;
    auto created = std::make_shared<std::atomic<bool>>(false);
    auto verifier = TokenVerifier::Create(StartedAnHourAgo(options, created));
    *created = true;
    EXPECT_TRUE(verifier.ok()) << verifier.status();
    return *std::move(verifier);
  }

  // A request with a valid token from `signer` and a proof made now.
  HttpRequestView RequestSignedBy(const jose::JwsSigner& signer) {
    json claims = TaskClaims(dpop_key_, server_.issuer());
    claims["iat"] = now_.load();
    claims["exp"] = now_.load() + 300;
    std::string token = Sign(signer, claims);
    return Request(token, Proof(dpop_key_, token, now_.load()));
  }

  KeyServer server_;
  jose::JwsSigner k1_;
  crypto::PrivateKey dpop_key_;
  std::atomic<int64_t> now_{kNow};
};

TEST_F(TokenVerifierHttpTest, FetchesKeysLazilyAndCachesThem) {
  auto verifier = NewVerifier();
  EXPECT_EQ(server_.discovery_fetches(), 0);
  EXPECT_EQ(server_.keys_fetches(), 0);
  auto first = verifier->Verify(RequestSignedBy(k1_));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(server_.discovery_fetches(), 1);
  EXPECT_EQ(server_.keys_fetches(), 1);
  now_ += 299;
  auto second = verifier->Verify(RequestSignedBy(k1_));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(server_.keys_fetches(), 1);
}

TEST_F(TokenVerifierHttpTest, PicksUpRotatedKeyOnUnknownKid) {
  auto verifier = NewVerifier();
  ASSERT_TRUE(verifier->Verify(RequestSignedBy(k1_)).ok());
  jose::JwsSigner k2 = NewSigner("k2");
  server_.SetJwks(Jwks({PublishedJwk(k1_), PublishedJwk(k2)}));

  // Within the refresh interval the new kid is not fetched yet.
  now_ += 10;
  HttpRequestView request = RequestSignedBy(k2);
  ExpectRefused(verifier->Verify(request), "invalid_token", "kid", request);
  EXPECT_EQ(server_.keys_fetches(), 1);

  now_ += 21;
  auto rotated = verifier->Verify(RequestSignedBy(k2));
  ASSERT_TRUE(rotated.ok()) << rotated.status();
  EXPECT_EQ(server_.keys_fetches(), 2);
  // The old key keeps working during the overlap.
  EXPECT_TRUE(verifier->Verify(RequestSignedBy(k1_)).ok());
  EXPECT_EQ(server_.keys_fetches(), 2);
}

TEST_F(TokenVerifierHttpTest, FloodOfUnknownKidsFetchesAtMostOncePerInterval) {
  auto verifier = NewVerifier();
  ASSERT_TRUE(verifier->Verify(RequestSignedBy(k1_)).ok());
  now_ += 30;
  for (int i = 0; i < 50; ++i) {
    HttpRequestView request = RequestSignedBy(NewSigner("forged-" + std::to_string(i)));
    ExpectRefused(verifier->Verify(request), "invalid_token", "kid", request);
  }
  EXPECT_EQ(server_.keys_fetches(), 2);
  now_ += 29;
  HttpRequestView request = RequestSignedBy(NewSigner("forged-late"));
  ExpectRefused(verifier->Verify(request), "invalid_token", "kid", request);
  EXPECT_EQ(server_.keys_fetches(), 2);
  now_ += 1;
  request = RequestSignedBy(NewSigner("forged-later"));
  ExpectRefused(verifier->Verify(request), "invalid_token", "kid", request);
  EXPECT_EQ(server_.keys_fetches(), 3);
}

TEST_F(TokenVerifierHttpTest, ConcurrentFirstRequestsShareOneFetch) {
  auto verifier = NewVerifier();
  server_.SetKeysDelayMs(200);
  std::vector<HttpRequestView> requests;
  for (int i = 0; i < 8; ++i) requests.push_back(RequestSignedBy(k1_));
  std::atomic<int> accepted{0};
  std::vector<std::thread> threads;
  for (const HttpRequestView& request : requests) {
    threads.emplace_back([&verifier, &accepted, &request] {
      if (verifier->Verify(request).ok()) accepted++;
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(accepted, 8);
  EXPECT_EQ(server_.keys_fetches(), 1);
  EXPECT_EQ(server_.discovery_fetches(), 1);
}

TEST_F(TokenVerifierHttpTest, RefetchesOldKeysAndDropsRemovedOnes) {
  auto verifier = NewVerifier();
  ASSERT_TRUE(verifier->Verify(RequestSignedBy(k1_)).ok());
  jose::JwsSigner k2 = NewSigner("k2");
  server_.SetJwks(Jwks({PublishedJwk(k2)}));  // k1 retired
  now_ += 300;
  HttpRequestView request = RequestSignedBy(k1_);
  ExpectRefused(verifier->Verify(request), "invalid_token", "kid", request);
  EXPECT_EQ(server_.keys_fetches(), 2);
  EXPECT_TRUE(verifier->Verify(RequestSignedBy(k2)).ok());
}

TEST_F(TokenVerifierHttpTest, KeepsOldKeysWhileRefreshFailsUntilStaleLimit) {
  auto verifier = NewVerifier();
  ASSERT_TRUE(verifier->Verify(RequestSignedBy(k1_)).ok());
  server_.SetKeysStatus(500);
  now_ += 400;  // due for a refresh, which fails
  auto kept = verifier->Verify(RequestSignedBy(k1_));
  EXPECT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(server_.keys_fetches(), 2);

  // An unknown kid while the issuer cannot be reached is not the client's fault.
  now_ += 30;
  HttpRequestView request = RequestSignedBy(NewSigner("k2"));
  ExpectRefused(verifier->Verify(request), "", "cannot be refreshed", request,
                absl::StatusCode::kUnavailable);

  now_ = kNow + 3601;  // past jwks_max_stale_seconds: fail closed
  request = RequestSignedBy(k1_);
  ExpectRefused(verifier->Verify(request), "", "unavailable", request,
                absl::StatusCode::kUnavailable);
  server_.SetKeysStatus(200);
  now_ += 30;
  EXPECT_TRUE(verifier->Verify(RequestSignedBy(k1_)).ok());
}

TEST_F(TokenVerifierHttpTest, RefusesDiscoveryNamingAnotherIssuer) {
  server_.SetDiscovery(
      json{{"issuer", "https://evil.example"}, {"jwks_uri", server_.issuer() + "/keys"}}.dump());
  auto verifier = NewVerifier();
  HttpRequestView request = RequestSignedBy(k1_);
  auto result = verifier->Verify(request);
  ExpectRefused(result, "", "discovery document's issuer", request, absl::StatusCode::kUnavailable);
  EXPECT_EQ(HttpStatusForError(result.status()), 503);
  EXPECT_EQ(server_.keys_fetches(), 0);
}

TEST_F(TokenVerifierHttpTest, RefusesUnusableJwksUri) {
  for (std::string uri : {std::string("file:///etc/keys"), std::string("/keys"),
                          std::string("http://keys.example/keys")}) {
    server_.SetDiscovery(json{{"issuer", server_.issuer()}, {"jwks_uri", uri}}.dump());
    auto verifier = NewVerifier();
    HttpRequestView request = RequestSignedBy(k1_);
    ExpectRefused(verifier->Verify(request), "", "jwks_uri", request,
                  absl::StatusCode::kUnavailable);
  }
  EXPECT_EQ(server_.keys_fetches(), 0);
}

TEST_F(TokenVerifierHttpTest, RefusesOversizedOrFailedJwksResponses) {
  server_.SetJwks(std::string(2 << 20, ' '));
  auto verifier = NewVerifier();
  HttpRequestView request = RequestSignedBy(k1_);
  ExpectRefused(verifier->Verify(request), "", "larger than", request,
                absl::StatusCode::kUnavailable);

  server_.SetJwks(Jwks({PublishedJwk(k1_)}));
  server_.SetKeysStatus(404);
  verifier = NewVerifier();
  request = RequestSignedBy(k1_);
  ExpectRefused(verifier->Verify(request), "", "HTTP 404", request, absl::StatusCode::kUnavailable);
}

TEST_F(TokenVerifierHttpTest, ServerDownMeansUnavailableNotAccepted) {
  auto verifier = NewVerifier();
  server_.Stop();
  HttpRequestView request = RequestSignedBy(k1_);
  auto result = verifier->Verify(request);
  ExpectRefused(result, "", "unavailable", request, absl::StatusCode::kUnavailable);
  EXPECT_EQ(HttpStatusForError(result.status()), 503);
  EXPECT_EQ(WwwAuthenticateChallenge(result.status()), "DPoP algs=\"ES256\"");
}

TEST_F(TokenVerifierHttpTest, FailedFetchesAreRateLimitedToo) {
  server_.SetKeysStatus(500);
  auto verifier = NewVerifier();
  HttpRequestView request = RequestSignedBy(k1_);
  ExpectRefused(verifier->Verify(request), "", "HTTP 500", request, absl::StatusCode::kUnavailable);
  EXPECT_EQ(server_.keys_fetches(), 1);
  server_.SetKeysStatus(200);
  now_ += 29;  // no retry storm against a failing broker
  request = RequestSignedBy(k1_);
  ExpectRefused(verifier->Verify(request), "", "HTTP 500", request, absl::StatusCode::kUnavailable);
  EXPECT_EQ(server_.keys_fetches(), 1);
  now_ += 1;
  auto recovered = verifier->Verify(RequestSignedBy(k1_));
  EXPECT_TRUE(recovered.ok()) << recovered.status();
  EXPECT_EQ(server_.keys_fetches(), 2);
}

}  // namespace
}  // namespace mandate
