#!/usr/bin/env bash
# DPoP interop test: Debian's python3-jwcrypto (dpop_verify.py, which uses no Mandate code)
# verifies a task token minted by a real mandate-broker and a DPoP proof made by the SDK through
# `mandate task token --dpop-request`, the way an upstream resource server would.
#
#   run_dpop_interop.sh BUILD_DIR
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
TD=dpop.test
NODE_ID=spiffe://$TD/node/join/n1
WORKLOAD_ID=spiffe://$TD/agent/upstream-caller
SCOPE=items:read
AUDIENCE=https://api.example.test
REQUEST_URL="https://api.example.test/v1/items?x=1"
EXPECTED_HTU=https://api.example.test/v1/items

interop_init "$1" dpop-interop
if ! "$PY" -c 'import jwcrypto.jwk, jwcrypto.jws, jwcrypto.jwt' 2>/dev/null; then
  echo "FAIL: $PY cannot import jwcrypto (Debian: python3-jwcrypto)"
  exit 1
fi

start_broker "$TD"
start_agent "$NODE_ID"
create_entry "$NODE_ID" "$WORKLOAD_ID" --scope "$SCOPE" --scope items:write

# ---- as the workload: declare a task, get a token and a proof for one upstream request ----
W=("$M" --socket "unix://$T/a/agent.sock" --output json)
if "${W[@]}" task start --purpose "list items for the interop test" --scope "$SCOPE" \
  --audience "$AUDIENCE" >"$T/task.json" 2>"$T/task.err" &&
  TASK_ID=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$T/task.json"); then
  pass "task $TASK_ID declared for $AUDIENCE with scope $SCOPE"
else
  fail "mandate task start failed: $(cat "$T/task.err")"
  exit 1
fi

if "${W[@]}" task token "$TASK_ID" --audience "$AUDIENCE" \
  --dpop-request "GET $REQUEST_URL" >"$T/token.json" 2>"$T/token.err"; then
  pass "task token with a DPoP proof for GET $REQUEST_URL"
else
  fail "mandate task token --dpop-request failed: $(cat "$T/token.err")"
  exit 1
fi
# A second run is a second process, hence a second DPoP key: its token must not accept the first
# run's proof (the script's negative checks).
if "${W[@]}" task token "$TASK_ID" --audience "$AUDIENCE" >"$T/token2.json" 2>"$T/token2.err"; then
  pass "second task token (another process, another key)"
else
  fail "second mandate task token failed: $(cat "$T/token2.err")"
  exit 1
fi

# ---- jwcrypto verifies both, as a resource server would ----
echo "---- dpop_verify.py ----"
if "$PY" "$HERE/dpop_verify.py" --http "http://$HTTP_ADDR" --task-json "$T/task.json" \
  --token-json "$T/token.json" --other-token-json "$T/token2.json" --audience "$AUDIENCE" \
  --spiffe-id "$WORKLOAD_ID" --scope "$SCOPE" --method GET --url "$REQUEST_URL" \
  --expected-htu "$EXPECTED_HTU"; then
  pass "jwcrypto verified the task token and the DPoP proof"
else
  fail "jwcrypto checks (see FAIL lines above)"
fi

check_daemons_alive "the verification"
finish
