// JWT (RFC 7519) time and audience claim checks. Pure functions: the caller supplies `now`.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"

namespace mandate::jose {
namespace {

using nlohmann::json;

// A NumericDate claim (RFC 7519 §2): absent -> nullopt; otherwise a finite JSON number.
// long double holds every int64/uint64 exactly on x86-64 and adding a leeway cannot overflow.
absl::StatusOr<std::optional<long double>> NumericDate(const json& payload, const char* name) {
  auto it = payload.find(name);
  if (it == payload.end()) return std::optional<long double>();
  if (it->is_number_unsigned()) return std::optional<long double>(it->get<uint64_t>());
  if (it->is_number_integer()) return std::optional<long double>(it->get<int64_t>());
  if (it->is_number_float()) {
    const double value = it->get<double>();
    if (std::isfinite(value)) return std::optional<long double>(value);
  }
  return absl::InvalidArgumentError(absl::StrCat("claim '", name, "' must be a finite number"));
}

std::string Seconds(long double value) { return absl::StrCat(static_cast<double>(value)); }

}  // namespace

absl::Status CheckTimeClaims(const json& payload, int64_t now, int64_t leeway, bool require_exp) {
  if (!payload.is_object()) return absl::InvalidArgumentError("JWT claims are not a JSON object");
  if (leeway < 0) return absl::InvalidArgumentError("clock-skew leeway must not be negative");
  ASSIGN_OR_RETURN(std::optional<long double> exp, NumericDate(payload, "exp"));
  ASSIGN_OR_RETURN(std::optional<long double> nbf, NumericDate(payload, "nbf"));
  ASSIGN_OR_RETURN(std::optional<long double> iat, NumericDate(payload, "iat"));
  const long double t = static_cast<long double>(now);
  const long double skew = static_cast<long double>(leeway);
  if (!exp.has_value() && require_exp) {
    return absl::InvalidArgumentError("token has no exp claim");
  }
  // RFC 7519 §4.1.4: the current time must be before exp.
  if (exp.has_value() && t >= *exp + skew) {
    return absl::UnauthenticatedError(absl::StrCat("token expired (exp ", Seconds(*exp), ", now ",
                                                   now, ", leeway ", leeway, "s)"));
  }
  // RFC 7519 §4.1.5: the current time must be at or after nbf.
  if (nbf.has_value() && *nbf > t + skew) {
    return absl::UnauthenticatedError(absl::StrCat("token not yet valid (nbf ", Seconds(*nbf),
                                                   ", now ", now, ", leeway ", leeway, "s)"));
  }
  // Not required by RFC 7519, but a token from the future means a broken or lying issuer clock.
  if (iat.has_value() && *iat > t + skew) {
    return absl::UnauthenticatedError(absl::StrCat("token issued in the future (iat ",
                                                   Seconds(*iat), ", now ", now, ", leeway ",
                                                   leeway, "s)"));
  }
  return absl::OkStatus();
}

bool AudienceContains(const json& payload, std::string_view aud) {
  if (!payload.is_object()) return false;
  auto it = payload.find("aud");
  if (it == payload.end()) return false;
  if (it->is_string()) return it->get_ref<const std::string&>() == aud;
  if (!it->is_array()) return false;
  bool found = false;
  for (const json& element : *it) {
    if (!element.is_string()) return false;  // a malformed aud matches nothing
    if (element.get_ref<const std::string&>() == aud) found = true;
  }
  return found;
}

}  // namespace mandate::jose
