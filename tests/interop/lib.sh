# shellcheck shell=bash
# Shared by the interop drivers (run_interop.sh, run_dpop_interop.sh): PASS/FAIL accounting, a
# temp dir, and a real mandate-broker plus a join-token mandate-agent on loopback. Source it from a
# script running under `set -euo pipefail`, then:
#
#   interop_init BUILD_DIR NAME   # binaries B A M, PY; temp dir T; cleanup trap on every exit
#   start_broker TRUST_DOMAIN [broker options...]  # BROKER_PID, AGENT_ADDR, HTTP_ADDR (exits on failure)
#   start_agent NODE_ID           # AGENT_PID; join token from the broker's admin socket
#   create_entry PARENT_ID SPIFFE_ID [entry create options...]
#   check_daemons_alive WHAT
#   finish                        # RESULT line; exit status 1 if any check failed
#
# The trap kills only the daemons started here (by pid), prints the end of their logs when the
# script fails, and removes the temp dir.

PY=/usr/bin/python3
# Tests leave nothing behind, not even bytecode caches next to the scripts.
export PYTHONDONTWRITEBYTECODE=1
FAILURES=0
WAIT_SECONDS=30
BROKER_PID=""
AGENT_PID=""
T=""

pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  FAILURES=$((FAILURES + 1))
}

# interop_init BUILD_DIR NAME: checks the binaries, makes the temp dir and installs the trap.
interop_init() {
  local build
  build=$(cd "$1" && pwd)
  B=$build/broker/server/mandate-broker
  A=$build/broker/agent/mandate-agent
  M=$build/sdk/mandate
  local bin
  for bin in "$B" "$A" "$M"; do
    if [[ ! -x $bin ]]; then
      echo "FAIL: $bin is missing; build mandate-broker, mandate-agent and mandate first"
      exit 1
    fi
  done
  command -v curl >/dev/null || { echo "FAIL: curl missing (Debian: curl)"; exit 1; }
  T=$(mktemp -d "/tmp/mandate-$2.XXXXXX")
  trap interop_cleanup EXIT
  trap 'exit 130' INT TERM
}

# stop_pid PID: SIGTERM, up to 5 s to exit, then SIGKILL; reaps it. No-op for a dead pid.
stop_pid() {
  if kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
  fi
}

interop_cleanup() {
  local rc=$?
  local pid log
  # Kill only the daemons this script started, by pid.
  for pid in $AGENT_PID $BROKER_PID; do stop_pid "$pid"; done
  if [[ $rc -ne 0 && -n $T ]]; then
    for log in "$T/broker.log" "$T/agent.log"; do
      [[ -f $log ]] || continue
      echo "---- last lines of $(basename "$log") ----"
      tail -n 30 "$log"
    done
  fi
  if [[ -n $T ]]; then rm -rf "$T"; fi
  exit "$rc"
}

# Wait until "$@" succeeds, up to $WAIT_SECONDS; returns non-zero on timeout.
wait_for() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until "$@" 2>/dev/null; do
    if ((SECONDS >= deadline)); then return 1; fi
    sleep 0.2
  done
}

# start_broker TRUST_DOMAIN [OPTION...]: data dir $T/b, ports chosen by the kernel (read from
# endpoints.json); further broker options (a policy hook) after the trust domain.
start_broker() {
  "$B" --data-dir "$T/b" --trust-domain "$1" --agent-listen 127.0.0.1:0 \
    --http-listen 127.0.0.1:0 "${@:2}" >"$T/broker.log" 2>&1 &
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
}

# start_agent NODE_ID: a join token for NODE_ID, then the agent with data dir $T/a; its Workload
# API socket is $T/a/agent.sock.
start_agent() {
  local token
  if token=$("$M" --admin-socket "$T/b/admin.sock" token generate --spiffe-id "$1") &&
    [[ -n $token ]]; then
    pass "join token generated for $1"
  else
    fail "mandate token generate failed"
    exit 1
  fi
  MANDATE_JOIN_TOKEN=$token "$A" --data-dir "$T/a" --broker "$AGENT_ADDR" \
    --trust-bundle "$T/b/bundle.pem" >"$T/agent.log" 2>&1 &
  AGENT_PID=$!
  if wait_for test -S "$T/a/agent.sock"; then
    pass "agent serves the Workload API socket $T/a/agent.sock"
  else
    fail "agent socket $T/a/agent.sock did not appear"
    exit 1
  fi
}

# create_entry PARENT_ID SPIFFE_ID [options...]: an entry for this uid (exits on failure).
create_entry() {
  local parent=$1 id=$2
  shift 2
  if "$M" --admin-socket "$T/b/admin.sock" entry create --parent-id "$parent" \
    --spiffe-id "$id" --selector "unix:uid:$(id -u)" "$@" >"$T/entry.out" 2>&1; then
    pass "entry created: $id for unix:uid:$(id -u)"
  else
    fail "mandate entry create failed: $(cat "$T/entry.out")"
    exit 1
  fi
}

# check_daemons_alive WHAT: both daemons must have survived WHAT.
check_daemons_alive() {
  local name_pid
  for name_pid in "broker:$BROKER_PID" "agent:$AGENT_PID"; do
    if kill -0 "${name_pid#*:}" 2>/dev/null; then
      pass "${name_pid%%:*} still running after $1"
    else
      fail "${name_pid%%:*} exited during the test"
    fi
  done
}

finish() {
  if ((FAILURES > 0)); then
    echo "RESULT: FAIL ($FAILURES failing step(s))"
    exit 1
  fi
  echo "RESULT: PASS"
}
