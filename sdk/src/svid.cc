#include "mandate/svid.h"

#include <openssl/evp.h>

#include "sdk/src/pem.h"

namespace mandate {
namespace sdk_internal {

std::string PemEncode(std::string_view label, std::string_view der) {
  std::string out = "-----BEGIN " + std::string(label) + "-----\n";
  // 48 input bytes encode to one 64-column line.
  constexpr size_t kChunk = 48;
  unsigned char line[65];
  for (size_t pos = 0; pos < der.size(); pos += kChunk) {
    size_t n = std::min(kChunk, der.size() - pos);
    int written =
        EVP_EncodeBlock(line, reinterpret_cast<const unsigned char*>(der.data() + pos), n);
    out.append(reinterpret_cast<const char*>(line), written);
    out += '\n';
  }
  out += "-----END " + std::string(label) + "-----\n";
  return out;
}

}  // namespace sdk_internal

std::string X509Svid::ChainPem() const {
  std::string out;
  for (const std::string& der : chain_der) {
    out += sdk_internal::PemEncode("CERTIFICATE", der);
  }
  return out;
}

std::string X509Svid::KeyPem() const {
  return sdk_internal::PemEncode("PRIVATE KEY", private_key_pkcs8_der);
}

BundleSet X509Context::Bundles() const {
  BundleSet set;
  for (const auto& [name, bundle] : bundles) {
    // Keys were normalised when the context was built; a hand-made bad key is skipped rather
    // than failing a getter.
    (void)set.AddX509Bundle(bundle);
  }
  return set;
}

}  // namespace mandate
