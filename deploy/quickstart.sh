#!/usr/bin/env bash
# Sets up, builds and starts a local Mandate stack (broker + agent on loopback, state in
# ./.mandate/), registers the current user, and prints an X509-SVID and a JWT-SVID.
# The stack keeps running; the last lines say how to stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${MANDATE_BUILD_DIR:-$ROOT/build}
STATE=$ROOT/.mandate
TD=${MANDATE_TRUST_DOMAIN:-example.org}
AGENT_PORT=${MANDATE_AGENT_PORT:-8081}
HTTP_PORT=${MANDATE_HTTP_PORT:-8080}

./deploy/install-deps.sh
cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${MANDATE_BUILD_TYPE:-Debug} >/dev/null
cmake --build "$BUILD_DIR" -j2 --target mandate-broker mandate-agent mandate

BIN=$BUILD_DIR
MANDATE="$BIN/sdk/mandate"

# Stop a stack left over from an earlier run.
for p in agent broker; do
  if [ -f "$STATE/$p.pid" ] && kill -0 "$(cat "$STATE/$p.pid")" 2>/dev/null; then
    kill "$(cat "$STATE/$p.pid")" || true
    sleep 1
  fi
done
mkdir -p "$STATE"
chmod 700 "$STATE"

echo "==> starting mandate-broker (trust domain $TD)"
"$BIN/broker/server/mandate-broker" --data-dir "$STATE/broker" --trust-domain "$TD" \
  --agent-listen "127.0.0.1:$AGENT_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
  >"$STATE/broker.log" 2>&1 &
echo $! >"$STATE/broker.pid"
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || {
  echo "broker did not become ready; see $STATE/broker.log" >&2; exit 1; }

export MANDATE_ADMIN_SOCKET="$STATE/broker/admin.sock"
NODE_ID="spiffe://$TD/node/join/quickstart"
TOKEN=$("$MANDATE" token generate --spiffe-id "$NODE_ID" --ttl 600)
printf '%s\n' "$TOKEN" >"$STATE/join-token"
chmod 600 "$STATE/join-token"

echo "==> starting mandate-agent ($NODE_ID)"
mkdir -p "$STATE/agent"
"$BIN/broker/agent/mandate-agent" --data-dir "$STATE/agent" --broker "127.0.0.1:$AGENT_PORT" \
  --trust-bundle "$STATE/broker/bundle.pem" --join-token-file "$STATE/join-token" \
  >"$STATE/agent.log" 2>&1 &
echo $! >"$STATE/agent.pid"
for _ in $(seq 1 100); do
  [ -S "$STATE/agent/agent.sock" ] && break
  sleep 0.1
done
rm -f "$STATE/join-token"  # single use: spent now

USER_NAME=$(id -un)
WORKLOAD_ID="spiffe://$TD/agent/$USER_NAME"
echo "==> registering $WORKLOAD_ID for unix:uid:$(id -u)"
"$MANDATE" entry create --parent-id "$NODE_ID" --spiffe-id "$WORKLOAD_ID" \
  --selector "unix:uid:$(id -u)" --scope "demo:read" >/dev/null || true

export MANDATE_ENDPOINT_SOCKET="unix://$STATE/agent/agent.sock"
echo "==> X509-SVID"
for _ in $(seq 1 50); do
  "$MANDATE" fetch x509 >"$STATE/x509.txt" 2>"$STATE/fetch.err" && break
  sleep 0.2
done
cat "$STATE/x509.txt"
echo "==> JWT-SVID (audience demo)"
"$MANDATE" fetch jwt --audience demo

cat <<MSG

Mandate is running:
  broker  pid $(cat "$STATE/broker.pid")  http://127.0.0.1:$HTTP_PORT  (log $STATE/broker.log)
  agent   pid $(cat "$STATE/agent.pid")  $STATE/agent/agent.sock  (log $STATE/agent.log)
Try:
  export MANDATE_ADMIN_SOCKET=$MANDATE_ADMIN_SOCKET MANDATE_ENDPOINT_SOCKET=$MANDATE_ENDPOINT_SOCKET
  $MANDATE entry list
Stop it with:
  kill \$(cat $STATE/agent.pid) \$(cat $STATE/broker.pid)
MSG
