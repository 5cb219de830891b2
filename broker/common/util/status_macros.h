// Small helpers for propagating absl::Status values without exceptions.
#ifndef MANDATE_BROKER_COMMON_UTIL_STATUS_MACROS_H_
#define MANDATE_BROKER_COMMON_UTIL_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MANDATE_CONCAT_INNER_(a, b) a##b
#define MANDATE_CONCAT_(a, b) MANDATE_CONCAT_INNER_(a, b)

// Returns from the current function with the status of `expr` when it is not OK.
#define RETURN_IF_ERROR(expr)                          \
  do {                                                 \
    ::absl::Status mandate_status_ = (expr);           \
    if (!mandate_status_.ok()) return mandate_status_; \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr): evaluates the StatusOr `expr`; on error returns its status,
// otherwise moves the value into `lhs` (which may be a declaration: `auto x`).
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(MANDATE_CONCAT_(mandate_statusor_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                           \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()

#endif  // MANDATE_BROKER_COMMON_UTIL_STATUS_MACROS_H_
