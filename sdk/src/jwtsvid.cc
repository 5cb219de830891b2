#include "mandate/jwtsvid.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "broker/common/jose/jose.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/clock.h"
#include "broker/common/util/status_macros.h"
#include "nlohmann/json.hpp"

namespace mandate {
namespace {

using nlohmann::json;

// The structurally checked parts of a JWT-SVID, before any signature check.
struct ParsedJwtSvid {
  jose::ParsedJws jws;
  spiffe::SpiffeId id;
  std::vector<std::string> audience;
  int64_t expiry;
};

absl::StatusOr<std::vector<std::string>> ReadAudience(const json& payload) {
  if (!payload.contains("aud")) {
    return absl::InvalidArgumentError("JWT-SVID has no aud claim");
  }
  const json& aud = payload["aud"];
  std::vector<std::string> out;
  if (aud.is_string()) {
    out.push_back(aud.get<std::string>());
  } else if (aud.is_array()) {
    for (const json& a : aud) {
      if (!a.is_string()) {
        return absl::InvalidArgumentError("JWT-SVID aud array holds a non-string element");
      }
      out.push_back(a.get<std::string>());
    }
  } else {
    return absl::InvalidArgumentError("JWT-SVID aud claim must be a string or an array");
  }
  if (out.empty()) {
    return absl::InvalidArgumentError("JWT-SVID aud claim is empty");
  }
  return out;
}

absl::StatusOr<ParsedJwtSvid> ParseStructure(std::string_view token) {
  auto jws = jose::ParseCompact(token, kMaxJwtSvidBytes);
  if (!jws.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWT-SVID is not a valid compact JWS: ", jws.status().message()));
  }
  const json& header = jws->header;
  if (header.contains("typ")) {
    const json& typ = header["typ"];
    if (!typ.is_string() || (typ.get<std::string>() != "JWT" && typ.get<std::string>() != "JOSE")) {
      return absl::InvalidArgumentError(
          absl::StrCat("JWT-SVID header typ must be absent, \"JWT\" or \"JOSE\", got ",
                       typ.dump(-1, ' ', false, json::error_handler_t::replace)));
    }
  }
  // SPIFFE JWT-SVID allows RS/ES/PS 256/384/512; the JOSE module implements the subset below.
  switch (jws->alg) {
    case jose::Algorithm::kES256:
    case jose::Algorithm::kES384:
    case jose::Algorithm::kRS256:
    case jose::Algorithm::kPS256:
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("JWT-SVID alg ",
                                                     std::string(jose::AlgorithmName(jws->alg)),
                                                     " is not allowed by the SPIFFE standard"));
  }
  const json& payload = jws->payload;
  if (!payload.contains("sub") || !payload["sub"].is_string()) {
    return absl::InvalidArgumentError("JWT-SVID has no sub claim (string)");
  }
  auto id = spiffe::SpiffeId::Parse(payload["sub"].get<std::string>());
  if (!id.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("JWT-SVID sub is not a SPIFFE ID: ", id.status().message()));
  }
  if (!payload.contains("exp")) {
    return absl::InvalidArgumentError("JWT-SVID has no exp claim");
  }
  const json& exp = payload["exp"];
  if (!exp.is_number()) {
    return absl::InvalidArgumentError("JWT-SVID exp claim is not a number");
  }
  // Range check before converting: a huge float would make the int64 conversion undefined.
  double exp_value = exp.get<double>();
  if (!(exp_value >= 0 && exp_value < 9.0e15)) {
    return absl::InvalidArgumentError("JWT-SVID exp claim is out of range");
  }
  ASSIGN_OR_RETURN(std::vector<std::string> audience, ReadAudience(payload));
  return ParsedJwtSvid{*std::move(jws), *std::move(id), std::move(audience),
                       static_cast<int64_t>(exp_value)};
}

}  // namespace

absl::StatusOr<VerifiedJwtSvid> ParseAndValidateJwtSvid(std::string_view token,
                                                        const JwtBundleSource& bundles,
                                                        const std::vector<std::string>& audiences,
                                                        int64_t now) {
  if (audiences.empty()) {
    return absl::InvalidArgumentError(
        "ParseAndValidateJwtSvid needs at least one expected audience");
  }
  ASSIGN_OR_RETURN(ParsedJwtSvid svid, ParseStructure(token));
  const json& header = svid.jws.header;
  if (!header.contains("kid") || !header["kid"].is_string() ||
      header["kid"].get<std::string>().empty()) {
    return absl::InvalidArgumentError("JWT-SVID header has no kid");
  }
  const std::string kid = header["kid"].get<std::string>();
  const std::string& td = svid.id.trust_domain().name();
  auto bundle = bundles.GetJwtBundleForTrustDomain(td);
  if (!bundle.ok()) {
    return absl::NotFoundError(absl::StrCat("no JWT bundle for trust domain '", td,
                                            "' of JWT-SVID subject ", svid.id.str(), ": ",
                                            bundle.status().message()));
  }
  auto keys = jose::JwkSet::Parse(bundle->jwks_json);
  if (!keys.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("JWT bundle of trust domain '", td,
                                                   "' is malformed: ", keys.status().message()));
  }
  // Bundle keys published for X509-SVIDs must not verify JWTs.
  const jose::JwkSetKey* key = keys->FindByKid(kid, "jwt-svid");
  if (key == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no JWT key with kid '", kid, "' in the bundle of trust domain '", td, "'"));
  }
  RETURN_IF_ERROR(jose::VerifySignature(svid.jws, key->key));

  if (now == 0) {
    now = Clock::Real().NowSeconds();
  }
  RETURN_IF_ERROR(jose::CheckTimeClaims(svid.jws.payload, now, kJwtSvidLeewaySeconds,
                                        /*require_exp=*/true));
  for (const std::string& expected : audiences) {
    if (!jose::AudienceContains(svid.jws.payload, expected)) {
      return absl::UnauthenticatedError(
          absl::StrCat("JWT-SVID audience [", absl::StrJoin(svid.audience, ", "),
                       "] does not contain expected audience '", expected, "'"));
    }
  }
  VerifiedJwtSvid out;
  out.spiffe_id = svid.id.str();
  out.audience = std::move(svid.audience);
  out.expiry = svid.expiry;
  out.claims_json = svid.jws.payload.dump(-1, ' ', false, json::error_handler_t::replace);
  return out;
}

absl::StatusOr<UnverifiedJwtSvid> ParseInsecureJwtSvid(std::string_view token) {
  ASSIGN_OR_RETURN(ParsedJwtSvid svid, ParseStructure(token));
  UnverifiedJwtSvid out;
  out.spiffe_id = svid.id.str();
  out.audience = std::move(svid.audience);
  out.expiry = svid.expiry;
  out.claims_json = svid.jws.payload.dump(-1, ' ', false, json::error_handler_t::replace);
  return out;
}

}  // namespace mandate
