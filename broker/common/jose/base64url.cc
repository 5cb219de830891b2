// base64url (RFC 4648 §5, unpadded) plus the small helpers shared by the jose sources.
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "broker/common/jose/internal.h"
#include "broker/common/jose/jose.h"

namespace mandate::jose {
namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// Reverse table: 6-bit value of each alphabet character, -1 for everything else.
constexpr std::array<int8_t, 256> MakeDecodeTable() {
  std::array<int8_t, 256> table{};
  for (auto& v : table) v = -1;
  for (int i = 0; i < 64; ++i)
    table[static_cast<unsigned char>(kAlphabet[i])] = static_cast<int8_t>(i);
  return table;
}
constexpr std::array<int8_t, 256> kDecode = MakeDecodeTable();

}  // namespace

std::string Base64UrlEncode(std::string_view bytes) {
  const auto* in = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  std::string out;
  out.reserve((n / 3) * 4 + 3);
  size_t i = 0;
  for (; i + 2 < n; i += 3) {
    const uint32_t v = (uint32_t{in[i]} << 16) | (uint32_t{in[i + 1]} << 8) | in[i + 2];
    out.push_back(kAlphabet[v >> 18]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(kAlphabet[(v >> 6) & 63]);
    out.push_back(kAlphabet[v & 63]);
  }
  if (n - i == 1) {
    const uint32_t v = uint32_t{in[i]} << 16;
    out.push_back(kAlphabet[v >> 18]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
  } else if (n - i == 2) {
    const uint32_t v = (uint32_t{in[i]} << 16) | (uint32_t{in[i + 1]} << 8);
    out.push_back(kAlphabet[v >> 18]);
    out.push_back(kAlphabet[(v >> 12) & 63]);
    out.push_back(kAlphabet[(v >> 6) & 63]);
  }
  return out;
}

absl::StatusOr<std::string> Base64UrlDecode(std::string_view encoded) {
  std::string out;
  out.reserve(encoded.size() / 4 * 3 + 2);
  uint32_t acc = 0;  // only the low `bits` bits are meaningful
  int bits = 0;
  for (size_t i = 0; i < encoded.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(encoded[i]);
    const int v = kDecode[c];
    if (v < 0) {
      if (c == '=') {
        return absl::InvalidArgumentError(
            absl::StrCat("base64url must not be padded ('=' at offset ", i, ")"));
      }
      return absl::InvalidArgumentError(absl::StrCat("invalid base64url character ",
                                                     internal::QuoteForError(encoded.substr(i, 1)),
                                                     " at offset ", i));
    }
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  // Checked after the characters so that the error names the more specific problem.
  if (encoded.size() % 4 == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("base64url length ", encoded.size(), " is impossible (length % 4 == 1)"));
  }
  // 2 or 4 bits are left over after a 3- or 2-character final group; a canonical encoder
  // writes zeros there. Accepting anything else would give one byte string several encodings.
  if (bits > 0 && (acc & ((1u << bits) - 1)) != 0) {
    return absl::InvalidArgumentError(
        "non-canonical base64url: unused bits of the last character are not zero");
  }
  return out;
}

namespace internal {

std::string QuoteForError(std::string_view text) {
  constexpr size_t kMax = 64;
  std::string out = absl::StrCat("'", absl::CHexEscape(Sv(text.substr(0, kMax))), "'");
  if (text.size() > kMax) out += "...";
  return out;
}

absl::StatusOr<std::string> DumpCompact(const nlohmann::json& value) {
  try {
    return value.dump();
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot serialise JSON: ", e.what()));
  }
}

bool KeyTypeMatches(crypto::KeyType type, Algorithm alg) {
  switch (alg) {
    case Algorithm::kES256:
      return type == crypto::KeyType::kEcP256;
    case Algorithm::kES384:
      return type == crypto::KeyType::kEcP384;
    case Algorithm::kRS256:
    case Algorithm::kPS256:
      return type == crypto::KeyType::kRsa;
    case Algorithm::kEdDSA:
      return type == crypto::KeyType::kEd25519;
  }
  return false;
}

std::string_view KeyTypeName(crypto::KeyType type) {
  switch (type) {
    case crypto::KeyType::kEcP256:
      return "EC P-256";
    case crypto::KeyType::kEcP384:
      return "EC P-384";
    case crypto::KeyType::kRsa:
      return "RSA";
    case crypto::KeyType::kEd25519:
      return "Ed25519";
    case crypto::KeyType::kOther:
      break;
  }
  return "unsupported";
}

}  // namespace internal
}  // namespace mandate::jose
