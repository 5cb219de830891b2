// The `detail` member of an audit record: a JSON object. Kept apart from audit_log.h so that
// nlohmann/json stays out of the headers that include the log.
#ifndef MANDATE_BROKER_SERVER_AUDIT_AUDIT_DETAIL_H_
#define MANDATE_BROKER_SERVER_AUDIT_AUDIT_DETAIL_H_

#include <nlohmann/json.hpp>
#include <string>

namespace mandate::broker {

// Compact JSON text. Invalid UTF-8 is replaced rather than thrown on: much of what is recorded
// (entry IDs, audiences, purposes) comes from callers.
inline std::string AuditDetail(const nlohmann::json& detail) {
  return detail.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace mandate::broker

#endif  // MANDATE_BROKER_SERVER_AUDIT_AUDIT_DETAIL_H_
