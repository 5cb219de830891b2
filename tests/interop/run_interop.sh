#!/usr/bin/env bash
# SPIFFE interop test: a Workload API client written from the SPIFFE specification alone
# (spiffe_client.py + spiffe_workload.proto, see their headers) against a real mandate-broker and
# mandate-agent on loopback.
#
#   run_interop.sh BUILD_DIR
#
# BUILD_DIR is the CMake binary dir holding broker/server/mandate-broker, broker/agent/mandate-agent
# and sdk/mandate. Prints PASS/FAIL per check and exits non-zero if any check fails. Both daemons
# are killed (by pid) and the temp dir removed on every exit path.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 MANDATE_BUILD_DIR" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$HERE/lib.sh"
TD=interop.test
NODE_ID=spiffe://$TD/node/join/n1
WORKLOAD_ID=spiffe://$TD/agent/py

interop_init "$1" interop
if ! "$PY" -c 'import grpc, google.protobuf' 2>/dev/null; then
  echo "FAIL: $PY cannot import grpc/google.protobuf (Debian: python3-grpcio python3-protobuf)"
  exit 1
fi
command -v protoc >/dev/null || { echo "FAIL: protoc missing (Debian: protobuf-compiler)"; exit 1; }

start_broker "$TD"
start_agent "$NODE_ID"
create_entry "$NODE_ID" "$WORKLOAD_ID"

# ---- the spec-only client, as the registered caller ----
echo "---- spiffe_client.py (full) ----"
if SPIFFE_ENDPOINT_SOCKET="unix://$T/a/agent.sock" "$PY" "$HERE/spiffe_client.py" --mode full \
  --expect-spiffe-id "$WORKLOAD_ID" --expect-bundle-pem "$T/b/bundle.pem"; then
  pass "spec-only client: all checks for the registered caller"
else
  fail "spec-only client: checks for the registered caller (see FAIL lines above)"
fi

# ---- the same client as a caller with no identity ----
if [[ $(id -u) -eq 0 ]] && command -v setpriv >/dev/null; then
  echo "---- spiffe_client.py (denied, uid 65534) ----"
  # The socket is 0666, but uid 65534 must be able to reach it and read the client files.
  chmod 0755 "$T" "$T/a"
  if SPIFFE_ENDPOINT_SOCKET="unix://$T/a/agent.sock" HOME=/ \
    setpriv --reuid 65534 --regid 65534 --clear-groups \
    "$PY" "$HERE/spiffe_client.py" --mode denied; then
    pass "spec-only client: PERMISSION_DENIED semantics for a caller with no identity"
  else
    fail "spec-only client: checks for a caller with no identity (see FAIL lines above)"
  fi
else
  echo "SKIP: the no-identity run needs root (to drop to uid 65534) and setpriv"
fi

# The daemons must have survived everything the client threw at them.
check_daemons_alive "the client runs"
finish
