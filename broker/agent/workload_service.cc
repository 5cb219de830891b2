#include "broker/agent/workload_service.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <set>

#include "absl/strings/str_cat.h"
#include "broker/common/grpcutil/status.h"
#include "mandate/bundle.h"
#include "mandate/jwtsvid.h"

namespace mandate::agent {
namespace {

using grpcutil::ToGrpcStatus;

constexpr auto kStreamWake = std::chrono::milliseconds(500);

grpc::Status NotServing() {
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "agent is not synchronised with the broker; retry shortly");
}

grpc::Status NoIdentity() {
  return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, "no identity issued");
}

std::string TrustDomainId(const Snapshot& snapshot) {
  return absl::StrCat("spiffe://", snapshot.trust_domain);
}

}  // namespace

template <typename Message, typename Build>
grpc::Status WorkloadService::StreamUpdates(grpc::ServerContext* context,
                                            grpc::ServerWriter<Message>* writer, Build build) {
  auto caller = identifier_.Identify(context);
  if (!caller.ok()) return ToGrpcStatus(caller.status());
  std::optional<StreamLimiter::Slot> slot = streams_.Acquire(caller->uid);
  if (!slot.has_value()) {
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("too many open Workload API streams (at most ", streams_.max_per_uid(),
                     " per uid and ", streams_.max_total(), " in all); close some and retry"));
  }
  std::string last_sent;
  uint64_t seen = 0;
  auto snapshot = agent_.Current();
  while (!context->IsCancelled() && !shutting_down_) {
    if (snapshot->generation != seen) {
      // Every update is a fresh answer to whoever is on the connection now: attest again, so a
      // process that exited, exec'd or changed user since the stream began ends it, and a
      // digest that a new entry needs is computed.
      if (seen != 0) {
        caller = identifier_.Identify(context);
        if (!caller.ok()) return ToGrpcStatus(caller.status());
      }
      seen = snapshot->generation;
      Message message;
      grpc::Status status = build(*snapshot, *caller, &message);
      if (!status.ok()) return status;
      std::string serialized;
      message.SerializeToString(&serialized);
      if (serialized != last_sent) {
        if (!writer->Write(message)) return grpc::Status::OK;
        last_sent = std::move(serialized);
      }
    }
    snapshot = agent_.WaitForChange(seen, kStreamWake);
  }
  return grpc::Status::OK;
}

grpc::Status WorkloadService::FetchX509SVID(grpc::ServerContext* context, const X509SVIDRequest*,
                                            grpc::ServerWriter<X509SVIDResponse>* writer) {
  return StreamUpdates(
      context, writer,
      [](const Snapshot& snapshot, const Caller& caller, X509SVIDResponse* out) -> grpc::Status {
        if (!snapshot.serving) return NotServing();
        auto matches = Agent::Match(snapshot, caller.selectors);
        if (matches.empty()) return NoIdentity();
        for (const AssignedEntry* entry : matches) {
          auto it = snapshot.svids.find(entry->id);
          if (it == snapshot.svids.end()) continue;
          X509SVID* svid = out->add_svids();
          svid->set_spiffe_id(it->second->spiffe_id);
          svid->set_x509_svid(it->second->chain_der);
          svid->set_x509_svid_key(it->second->key_pkcs8_der);
          svid->set_bundle(snapshot.bundle_der);
        }
        if (out->svids().empty()) {
          return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                              "X509-SVID not issued yet; retry shortly");
        }
        return grpc::Status::OK;
      });
}

grpc::Status WorkloadService::FetchX509Bundles(grpc::ServerContext* context,
                                               const X509BundlesRequest*,
                                               grpc::ServerWriter<X509BundlesResponse>* writer) {
  return StreamUpdates(
      context, writer,
      [](const Snapshot& snapshot, const Caller& caller, X509BundlesResponse* out) -> grpc::Status {
        if (!snapshot.serving) return NotServing();
        if (Agent::Match(snapshot, caller.selectors).empty()) {
          return NoIdentity();
        }
        (*out->mutable_bundles())[TrustDomainId(snapshot)] = snapshot.bundle_der;
        return grpc::Status::OK;
      });
}

grpc::Status WorkloadService::FetchJWTBundles(grpc::ServerContext* context,
                                              const JWTBundlesRequest*,
                                              grpc::ServerWriter<JWTBundlesResponse>* writer) {
  return StreamUpdates(
      context, writer,
      [](const Snapshot& snapshot, const Caller& caller, JWTBundlesResponse* out) -> grpc::Status {
        if (!snapshot.serving) return NotServing();
        if (Agent::Match(snapshot, caller.selectors).empty()) {
          return NoIdentity();
        }
        (*out->mutable_bundles())[TrustDomainId(snapshot)] = snapshot.jwt_bundle;
        return grpc::Status::OK;
      });
}

grpc::Status WorkloadService::FetchJWTSVID(grpc::ServerContext* context,
                                           const JWTSVIDRequest* request,
                                           JWTSVIDResponse* response) {
  auto admitted = identifier_.IdentifyWithin(context, unary_);
  if (!admitted.ok()) return ToGrpcStatus(admitted.status());
  const Caller& caller = admitted->caller;
  if (request->audience().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "audience must be specified");
  }
  auto snapshot = agent_.Current();
  if (!snapshot->serving) return NotServing();
  std::vector<std::string> audiences(request->audience().begin(), request->audience().end());
  std::set<std::string> served;
  for (const AssignedEntry* entry : Agent::Match(*snapshot, caller.selectors)) {
    if (!request->spiffe_id().empty() && entry->spiffe_id != request->spiffe_id()) continue;
    if (!served.insert(entry->spiffe_id).second) continue;
    auto jwt = agent_.JwtSvid(*entry, audiences);
    if (!jwt.ok()) return ToGrpcStatus(jwt.status());
    JWTSVID* out = response->add_svids();
    out->set_spiffe_id(jwt->spiffe_id);
    out->set_svid(jwt->token);
  }
  if (response->svids().empty()) return NoIdentity();
  return grpc::Status::OK;
}

grpc::Status WorkloadService::ValidateJWTSVID(grpc::ServerContext* context,
                                              const ValidateJWTSVIDRequest* request,
                                              ValidateJWTSVIDResponse* response) {
  auto admitted = identifier_.IdentifyWithin(context, unary_);
  if (!admitted.ok()) return ToGrpcStatus(admitted.status());
  const Caller& caller = admitted->caller;
  if (request->audience().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "audience must be specified");
  }
  if (request->svid().empty()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "svid must be specified");
  }
  auto snapshot = agent_.Current();
  if (!snapshot->serving) return NotServing();
  BundleSet bundles;
  auto jwt_bundle = JwtBundle::FromJwks(snapshot->trust_domain, snapshot->jwt_bundle);
  if (!jwt_bundle.ok()) return ToGrpcStatus(jwt_bundle.status());
  if (auto s = bundles.AddJwtBundle(std::move(*jwt_bundle)); !s.ok()) return ToGrpcStatus(s);
  auto verified = ParseAndValidateJwtSvid(request->svid(), bundles, {request->audience()});
  if (!verified.ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("invalid JWT-SVID: ", verified.status().message()));
  }
  response->set_spiffe_id(verified->spiffe_id);
  auto parsed = google::protobuf::util::JsonStringToMessage(verified->claims_json,
                                                            response->mutable_claims());
  if (!parsed.ok()) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "cannot convert JWT claims");
  }
  return grpc::Status::OK;
}

}  // namespace mandate::agent
