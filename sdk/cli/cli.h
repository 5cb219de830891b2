// The `mandate` command line: admin commands (broker admin socket) and workload commands
// (Workload API socket), DESIGN.md §6 and §10.
//
// RunCli is the whole program behind main(): it parses `argv`, talks to the broker or agent, writes
// results to `out` and diagnostics to `err`, and returns the process exit code (0 on success, 1 on
// any error, including usage errors; `--help` returns 0). It never throws and never prompts.
// Environment read: MANDATE_ADMIN_SOCKET, MANDATE_ENDPOINT_SOCKET, SPIFFE_ENDPOINT_SOCKET.
//
// Thread-safety: RunCli keeps no global state and may run concurrently with itself (tests do).
#ifndef MANDATE_SDK_CLI_CLI_H_
#define MANDATE_SDK_CLI_CLI_H_

#include <ostream>

namespace mandate::cli {

// Where `mandate` looks for the broker's admin socket when neither --admin-socket nor
// MANDATE_ADMIN_SOCKET is given (the broker puts it at <data-dir>/admin.sock).
inline constexpr char kDefaultAdminSocket[] = "/var/lib/mandate/broker/admin.sock";

int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err);

}  // namespace mandate::cli

#endif  // MANDATE_SDK_CLI_CLI_H_
