// Key generation for the jose tests (the crypto module only generates P-256 keys).
#ifndef MANDATE_TESTS_UNIT_JOSE_TEST_KEYS_H_
#define MANDATE_TESTS_UNIT_JOSE_TEST_KEYS_H_

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <cstddef>
#include <string>

#include "broker/common/crypto/keys.h"
#include "gtest/gtest.h"

namespace mandate::jose::test_keys {

// Wraps a freshly generated EVP_PKEY (taking ownership) as a crypto::PrivateKey via PEM.
inline crypto::PrivateKey WrapGenerated(EVP_PKEY* raw) {
  EXPECT_NE(raw, nullptr);
  crypto::EvpPkeyPtr key(raw);
  BIO* bio = BIO_new(BIO_s_mem());
  EXPECT_EQ(PEM_write_bio_PrivateKey(bio, key.get(), nullptr, nullptr, 0, nullptr, nullptr), 1);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(len));
  BIO_free(bio);
  auto parsed = crypto::PrivateKey::FromPem(pem);
  EXPECT_TRUE(parsed.ok()) << parsed.status();
  return *std::move(parsed);
}

inline crypto::PrivateKey GenerateEc(const char* curve) {
  return WrapGenerated(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", curve));
}
inline crypto::PrivateKey GenerateRsa(size_t bits) {
  return WrapGenerated(EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", bits));
}
inline crypto::PrivateKey GenerateEd25519() {
  return WrapGenerated(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
}

}  // namespace mandate::jose::test_keys

#endif  // MANDATE_TESTS_UNIT_JOSE_TEST_KEYS_H_
