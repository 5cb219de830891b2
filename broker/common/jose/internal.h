// Helpers shared by the jose sources; not part of the module's API.
#ifndef MANDATE_BROKER_COMMON_JOSE_INTERNAL_H_
#define MANDATE_BROKER_COMMON_JOSE_INTERNAL_H_

#include <openssl/bn.h>
#include <openssl/evp.h>

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/jose/jose.h"
#include "nlohmann/json.hpp"

namespace mandate::jose::internal {

struct BnDeleter {
  void operator()(BIGNUM* bn) const { BN_free(bn); }
};
using BnPtr = std::unique_ptr<BIGNUM, BnDeleter>;

struct PkeyCtxDeleter {
  void operator()(EVP_PKEY_CTX* ctx) const { EVP_PKEY_CTX_free(ctx); }
};
using PkeyCtxPtr = std::unique_ptr<EVP_PKEY_CTX, PkeyCtxDeleter>;

// Debian's abseil is built with its own absl::string_view (not std::string_view), so
// std::string_view values go through this before reaching absl::StrCat.
inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// Attacker-supplied text made safe and short for an error message: at most 64 bytes, C-escaped.
std::string QuoteForError(std::string_view text);

// json::dump() without whitespace. nlohmann throws on invalid UTF-8; that becomes
// InvalidArgument here so no exception leaves the module.
absl::StatusOr<std::string> DumpCompact(const nlohmann::json& value);

// True when `type` is the one key type `alg` may be used with.
bool KeyTypeMatches(crypto::KeyType type, Algorithm alg);
std::string_view KeyTypeName(crypto::KeyType type);

}  // namespace mandate::jose::internal

#endif  // MANDATE_BROKER_COMMON_JOSE_INTERNAL_H_
