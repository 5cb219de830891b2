// JWKS documents (RFC 7517 §5).
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "broker/common/jose/internal.h"
#include "broker/common/jose/jose.h"

namespace mandate::jose {
namespace {

using nlohmann::json;

// An optional string member: "" when absent, InvalidArgument when present with another type.
absl::Status OptionalString(const json& entry, const char* name, size_t index, std::string& out) {
  auto it = entry.find(name);
  if (it == entry.end()) return absl::OkStatus();
  if (!it->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWKS key #", index, " member '", name, "' is not a string"));
  }
  out = it->get<std::string>();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<JwkSet> JwkSet::Parse(std::string_view text) {
  absl::StatusOr<json> doc = ParseStrictJson(text);
  if (!doc.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWKS document: ", doc.status().message()));
  }
  return FromJson(*doc);
}

absl::StatusOr<JwkSet> JwkSet::FromJson(const json& doc) {
  if (!doc.is_object()) return absl::InvalidArgumentError("JWKS document is not a JSON object");
  auto keys = doc.find("keys");
  if (keys == doc.end() || !keys->is_array()) {
    return absl::InvalidArgumentError("JWKS document has no 'keys' array");
  }
  JwkSet set;
  set.keys_.reserve(keys->size());
  size_t index = 0;
  for (const json& entry : *keys) {
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat("JWKS key #", index, " is not a JSON object"));
    }
    std::string kid, use, alg;
    if (absl::Status s = OptionalString(entry, "kid", index, kid); !s.ok()) return s;
    if (absl::Status s = OptionalString(entry, "use", index, use); !s.ok()) return s;
    if (absl::Status s = OptionalString(entry, "alg", index, alg); !s.ok()) return s;
    std::vector<std::string> x5c;
    if (auto it = entry.find("x5c"); it != entry.end()) {
      if (!it->is_array()) {
        return absl::InvalidArgumentError(
            absl::StrCat("JWKS key #", index, " member 'x5c' is not an array"));
      }
      for (const json& cert : *it) {
        if (!cert.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat("JWKS key #", index, " member 'x5c' holds a non-string"));
        }
        x5c.push_back(cert.get<std::string>());
      }
    }
    auto key = PublicKeyFromJwk(entry);
    if (!key.ok()) {
      // Unsupported types are expected in third-party JWKS (e.g. "oct" or P-521 keys used
      // elsewhere); malformed keys of types we do support mean the document is broken.
      if (absl::IsUnimplemented(key.status())) {
        ++set.skipped_;
        ++index;
        continue;
      }
      return absl::InvalidArgumentError(absl::StrCat("JWKS key #", index, " (kid ",
                                                     internal::QuoteForError(kid),
                                                     "): ", key.status().message()));
    }
    set.keys_.push_back(
        JwkSetKey{std::move(kid), std::move(use), std::move(alg), *std::move(key), std::move(x5c)});
    ++index;
  }
  return set;
}

const JwkSetKey* JwkSet::FindByKid(std::string_view kid, std::string_view use) const {
  for (const JwkSetKey& key : keys_) {
    if (key.kid != kid) continue;
    if (!use.empty() && !key.use.empty() && key.use != use) continue;
    return &key;
  }
  return nullptr;
}

}  // namespace mandate::jose
