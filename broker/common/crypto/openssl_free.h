// unique_ptr deleters for OpenSSL objects: std::unique_ptr<BIO, OpenSslFree<BIO_free>>.
// Internal to modules that use OpenSSL directly; not part of any public API.
#ifndef MANDATE_BROKER_COMMON_CRYPTO_OPENSSL_FREE_H_
#define MANDATE_BROKER_COMMON_CRYPTO_OPENSSL_FREE_H_

namespace mandate::crypto {

template <auto kFree>
struct OpenSslFree {
  template <typename T>
  void operator()(T* p) const {
    kFree(p);
  }
};

}  // namespace mandate::crypto

#endif  // MANDATE_BROKER_COMMON_CRYPTO_OPENSSL_FREE_H_
