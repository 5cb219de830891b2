// Keys, certificates and tokens made inside the SDK tests (nothing is read from disk).
#ifndef MANDATE_TESTS_UNIT_SDK_TEST_PKI_H_
#define MANDATE_TESTS_UNIT_SDK_TEST_PKI_H_

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/jose/jose.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace mandate::testing {

// Setup failures throw so that gtest reports them and fixtures still unwind (removing temp
// dirs), instead of aborting on a bad StatusOr dereference.
template <typename T>
T ValueOrThrow(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    throw std::runtime_error(std::string(what) + ": " + v.status().ToString());
  }
  return *std::move(v);
}

inline constexpr int64_t kNow = 1'800'000'000;  // a fixed "now" for every test

struct TestCa {
  crypto::PrivateKey key;
  crypto::Certificate cert;
};

inline TestCa MakeCa(const std::string& trust_domain, int64_t now = kNow) {
  auto key = ValueOrThrow(crypto::PrivateKey::GenerateP256(), "CA key");
  crypto::CaOptions options;
  options.trust_domain_id = "spiffe://" + trust_domain;
  options.not_before = now - 3600;
  options.not_after = now + 86400;
  auto cert = ValueOrThrow(crypto::CreateSelfSignedCa(key, options), "CA certificate");
  return TestCa{std::move(key), std::move(cert)};
}

struct TestLeaf {
  crypto::PrivateKey key;
  crypto::Certificate cert;
};

inline TestLeaf MakeLeaf(const TestCa& ca, const std::string& spiffe_id, int64_t not_before,
                         int64_t not_after) {
  auto key = ValueOrThrow(crypto::PrivateKey::GenerateP256(), "leaf key");
  crypto::LeafOptions options;
  options.spiffe_id = spiffe_id;
  options.not_before = not_before;
  options.not_after = not_after;
  auto cert = ValueOrThrow(crypto::SignLeaf(ca.cert, ca.key, key.public_key(), options),
                           "leaf certificate");
  return TestLeaf{std::move(key), std::move(cert)};
}

// A JWKS document with one key for `key`, with `kid` and (when non-empty) `use`.
inline std::string MakeJwks(const crypto::PrivateKey& key, const std::string& kid,
                            const std::string& use = "jwt-svid") {
  nlohmann::json jwk = ValueOrThrow(jose::PublicKeyToJwk(key.public_key()), "JWK");
  jwk["kid"] = kid;
  if (!use.empty()) {
    jwk["use"] = use;
  }
  return nlohmann::json{{"keys", nlohmann::json::array({jwk})}}.dump();
}

// An ES256 compact JWS of `payload` under `header` (which must carry "alg": "ES256").
inline std::string SignEs256(const crypto::PrivateKey& key, const nlohmann::json& header,
                             const nlohmann::json& payload) {
  return ValueOrThrow(
      jose::SignCompact(key, jose::Algorithm::kES256, header.dump(), payload.dump()), "signing");
}

}  // namespace mandate::testing

#endif  // MANDATE_TESTS_UNIT_SDK_TEST_PKI_H_
