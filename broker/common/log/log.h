// Process-wide logging setup (spdlog). Daemons call InitLogging once in main(); modules log with
// spdlog::info/warn/error directly. Never log secrets or whole tokens: log a token's jti or a
// short fingerprint instead.
#ifndef MANDATE_BROKER_COMMON_LOG_LOG_H_
#define MANDATE_BROKER_COMMON_LOG_LOG_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace mandate::log {

// format: "text" or "json" (one JSON object per line); level: trace|debug|info|warn|error.
absl::Status InitLogging(std::string_view program, std::string_view format,
                         std::string_view level = "info");

// Escapes `text` so that it can be embedded in a log line (or a JSON string) without breaking
// the line structure: control characters, quotes and backslashes are escaped.
std::string EscapeForLog(std::string_view text);

}  // namespace mandate::log

#endif  // MANDATE_BROKER_COMMON_LOG_LOG_H_
