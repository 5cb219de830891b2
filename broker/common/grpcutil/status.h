// Conversions between absl::Status and grpc::Status (the codes share numbering).
#ifndef MANDATE_BROKER_COMMON_GRPCUTIL_STATUS_H_
#define MANDATE_BROKER_COMMON_GRPCUTIL_STATUS_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace mandate::grpcutil {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

inline absl::Status ToAbslStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

}  // namespace mandate::grpcutil

#endif  // MANDATE_BROKER_COMMON_GRPCUTIL_STATUS_H_
