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
BUILD=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=/usr/bin/python3
B=$BUILD/broker/server/mandate-broker
A=$BUILD/broker/agent/mandate-agent
M=$BUILD/sdk/mandate
TD=interop.test
NODE_ID=spiffe://$TD/node/join/n1
WORKLOAD_ID=spiffe://$TD/agent/py

FAILURES=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  FAILURES=$((FAILURES + 1))
}

for bin in "$B" "$A" "$M"; do
  if [[ ! -x $bin ]]; then
    echo "FAIL: $bin is missing; build mandate-broker, mandate-agent and mandate first"
    exit 1
  fi
done
if ! "$PY" -c 'import grpc, google.protobuf' 2>/dev/null; then
  echo "FAIL: $PY cannot import grpc/google.protobuf (Debian: python3-grpcio python3-protobuf)"
  exit 1
fi
command -v protoc >/dev/null || { echo "FAIL: protoc missing (Debian: protobuf-compiler)"; exit 1; }

T=$(mktemp -d /tmp/mandate-interop.XXXXXX)
BROKER_PID=""
AGENT_PID=""
cleanup() {
  local rc=$?
  # Kill only the daemons this script started, by pid.
  for pid in $AGENT_PID $BROKER_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [[ $rc -ne 0 ]]; then
    for log in "$T/broker.log" "$T/agent.log"; do
      [[ -f $log ]] || continue
      echo "---- last lines of $(basename "$log") ----"
      tail -n 30 "$log"
    done
  fi
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wait until "$@" succeeds, up to $WAIT_SECONDS; returns non-zero on timeout.
wait_for() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until "$@" 2>/dev/null; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 0.2
  done
}
WAIT_SECONDS=30

# ---- broker ----
"$B" --data-dir "$T/b" --trust-domain "$TD" --agent-listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 >"$T/broker.log" 2>&1 &
BROKER_PID=$!
if wait_for test -s "$T/b/endpoints.json"; then
  pass "broker wrote endpoints.json"
else
  fail "broker did not write $T/b/endpoints.json within ${WAIT_SECONDS}s"
  exit 1
fi
read -r AGENT_ADDR HTTP_ADDR < <("$PY" -c '
import json, sys
e = json.load(open(sys.argv[1]))
print(e["agent_address"], e["http_address"])' "$T/b/endpoints.json")
if wait_for curl -fsS -o /dev/null "http://$HTTP_ADDR/readyz"; then
  pass "broker /readyz answers 200 (agent $AGENT_ADDR, http $HTTP_ADDR)"
else
  fail "broker /readyz at http://$HTTP_ADDR did not answer 200"
  exit 1
fi

# ---- agent ----
if TOKEN=$("$M" --admin-socket "$T/b/admin.sock" token generate --spiffe-id "$NODE_ID") &&
  [[ -n $TOKEN ]]; then
  pass "join token generated for $NODE_ID"
else
  fail "mandate token generate failed"
  exit 1
fi
MANDATE_JOIN_TOKEN=$TOKEN "$A" --data-dir "$T/a" --broker "$AGENT_ADDR" \
  --trust-bundle "$T/b/bundle.pem" >"$T/agent.log" 2>&1 &
AGENT_PID=$!
if wait_for test -S "$T/a/agent.sock"; then
  pass "agent serves the Workload API socket $T/a/agent.sock"
else
  fail "agent socket $T/a/agent.sock did not appear"
  exit 1
fi

# ---- registration entry for this uid ----
if "$M" --admin-socket "$T/b/admin.sock" entry create --parent-id "$NODE_ID" \
  --spiffe-id "$WORKLOAD_ID" --selector "unix:uid:$(id -u)" >"$T/entry.out" 2>&1; then
  pass "entry created: $WORKLOAD_ID for unix:uid:$(id -u)"
else
  fail "mandate entry create failed: $(cat "$T/entry.out")"
  exit 1
fi

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
for name_pid in "broker:$BROKER_PID" "agent:$AGENT_PID"; do
  if kill -0 "${name_pid#*:}" 2>/dev/null; then
    pass "${name_pid%%:*} still running after the client runs"
  else
    fail "${name_pid%%:*} exited during the test"
  fi
done

if ((FAILURES > 0)); then
  echo "RESULT: FAIL ($FAILURES failing step(s))"
  exit 1
fi
echo "RESULT: PASS"
