#!/usr/bin/env bash
# Mandate's end-to-end benchmark (docs/performance.md).
#
#   tests/bench/run.sh [--quick | --smoke] [--curve] [--policy HOOK] [--only LIST] [--build-dir DIR]
#   tests/bench/run.sh --profile SCENARIO [--build-dir DIR]
#
# Builds mandate-broker, mandate-agent, mandate and mandate-bench in Release (build-bench/, tests
# off) unless --build-dir names an existing build, starts a broker and a join-token agent in a
# temp dir, runs the baseline and every scenario, the audit log alone (audit_append), then
# measures a broker holding 100,000 registration entries (cold start, RSS) and an agent on one of
# its nodes. Prints progress on stderr and one JSON document as the last line of stdout:
#   {"machine": {...}, "baseline": {...}, "scenarios": {...}, "targets": {...}}
# --quick: about 2 s per scenario (under a minute once built). --smoke: tiny runs that only check
# that every scenario works (ctest runs this against the Debug build). --curve: also ops/s
# against concurrency 1-64 and memory against 1k-100k entries (the full run does both).
# --policy none|rules|webhook|grpc: the broker's policy hook during the scenarios (default none):
# rules loads tests/bench/policy_rules.toml (50 rules, the bench's matched late, no execution
# cap); webhook and grpc start mandate-bench-hook (loopback, answers allow at once) and point
# --policy-webhook / --policy-grpc --policy-grpc-plaintext at it. The report's "policy" object
# names the hook and, for the external ones, the calls the hook answered and the connections it
# accepted (kept alive: the pool's size, whatever the number of calls).
# --only LIST: only these scenarios (comma-separated), no audit or scale measurements; used to
# compare hooks (docs/performance.md "Policy hook cost"). --concurrency N: client threads per
# scenario (default 16).
# --profile SCENARIO: run only that scenario (quick length) under a system-wide perf recording;
# prints CPU by process and the top symbols of broker, agent and client, and keeps the data in
# BUILD/perf-SCENARIO.data.
# Every process started here is stopped by pid and the temp dir removed on every exit path.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MODE=full
CURVE=0
BUILD=""
PROFILE=""
POLICY=none
ONLY=""
CONCURRENCY=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --quick) MODE=quick ;;
    --smoke) MODE=smoke ;;
    --curve) CURVE=1 ;;
    --build-dir)
      BUILD=$2
      shift
      ;;
    --policy)
      POLICY=$2
      shift
      ;;
    --only)
      ONLY=$2
      shift
      ;;
    --concurrency)
      CONCURRENCY=$2
      shift
      ;;
    --profile)
      PROFILE=$2
      MODE=quick
      shift
      ;;
    *)
      echo "usage: $0 [--quick|--smoke] [--curve] [--policy none|rules|webhook|grpc]" \
        "[--only SCENARIO,...] [--build-dir DIR]" >&2
      exit 2
      ;;
  esac
  shift
done
case $POLICY in
  none | rules | webhook | grpc) ;;
  *)
    echo "bench: --policy must be none, rules, webhook or grpc" >&2
    exit 2
    ;;
esac
[[ $MODE == full && -z $PROFILE && -z $ONLY ]] && CURVE=1

log() { echo "bench: $*" >&2; }

if [[ -z $BUILD ]]; then
  BUILD=$ROOT/build-bench
  export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
  export CCACHE_BASEDIR=$ROOT
  export CCACHE_NOHASHDIR=1
  log "building Release binaries in $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMANDATE_BUILD_TESTS=OFF >/dev/null
  cmake --build "$BUILD" -j"${MANDATE_JOBS:-2}" \
    --target mandate-broker mandate-agent mandate mandate-bench mandate-bench-hook >/dev/null
fi
BUILD=$(cd "$BUILD" && pwd)
BENCH=$BUILD/tests/bench/mandate-bench
HOOK_BIN=$BUILD/tests/bench/mandate-bench-hook
[[ -x $BENCH ]] || { echo "bench: $BENCH is missing" >&2; exit 1; }
[[ $POLICY == webhook || $POLICY == grpc ]] && [[ ! -x $HOOK_BIN ]] &&
  { echo "bench: $HOOK_BIN is missing" >&2; exit 1; }

# The interop helpers own daemon start/stop and cleanup; their PASS lines go to stderr here.
# shellcheck source=../interop/lib.sh
source "$ROOT/tests/interop/lib.sh"
exec 3>&1 1>&2
interop_init "$BUILD" bench
TD=bench.test
NODE_ID=spiffe://$TD/node/join/bench
EXTRA_PIDS=""
cleanup_extra() {
  local pid
  for pid in $EXTRA_PIDS; do stop_pid "$pid"; done
  EXTRA_PIDS=""
}
trap 'exit 130' INT TERM
# errexit off inside the trap: `(exit $rc)` only hands the status on to interop_cleanup.
trap 'rc=$?; set +e; cleanup_extra; (exit $rc); interop_cleanup' EXIT

# Resident and peak memory of a process, in MiB.
rss_mib() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
hwm_mib() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
now_ms() { date +%s%3N; }

# ---------------------------------------------------------------------------- policy hook
# The hook is up before the broker: the agent's node SVID is already a decision.
BROKER_POLICY_ARGS=()
HOOK_PID=""
HOOK_ADDR=""
case $POLICY in
  rules) BROKER_POLICY_ARGS=(--policy-file "$ROOT/tests/bench/policy_rules.toml") ;;
  webhook | grpc)
    "$HOOK_BIN" "--$POLICY" >"$T/hook.out" 2>"$T/hook.log" &
    HOOK_PID=$!
    EXTRA_PIDS="$EXTRA_PIDS $HOOK_PID"
    if ! wait_for test -s "$T/hook.out"; then
      log "mandate-bench-hook --$POLICY did not start"
      cat "$T/hook.log" >&2
      exit 1
    fi
    HOOK_ADDR=$(head -n 1 "$T/hook.out")
    if [[ $POLICY == webhook ]]; then
      BROKER_POLICY_ARGS=(--policy-webhook "http://$HOOK_ADDR/v1/data/mandate/issuance")
    else
      BROKER_POLICY_ARGS=(--policy-grpc "$HOOK_ADDR" --policy-grpc-plaintext)
    fi
    ;;
esac
log "policy hook: $POLICY${HOOK_ADDR:+ at $HOOK_ADDR}"

# Established TCP connections to the hook's port (either end counted once: the hook's side).
hook_established() {
  ss -Htn state established "( sport = :${HOOK_ADDR##*:} )" 2>/dev/null | wc -l
}

# ---------------------------------------------------------------------------- scenarios
start_broker "$TD" "${BROKER_POLICY_ARGS[@]}"
start_agent "$NODE_ID"
log "running scenarios ($MODE)"
RUN_ARGS=(run --socket "$T/a/agent.sock" --admin-socket "$T/b/admin.sock"
  --issuer "http://$HTTP_ADDR" --http "$HTTP_ADDR" --broker "$AGENT_ADDR"
  --bundle "$T/b/bundle.pem" --agent-data-dir "$T/a" --node-id "$NODE_ID")
[[ $MODE == quick ]] && RUN_ARGS+=(--quick)
[[ -n $ONLY ]] && RUN_ARGS+=(--only "$ONLY")
[[ -n $CONCURRENCY ]] && RUN_ARGS+=(--concurrency "$CONCURRENCY")
if [[ -n $PROFILE ]]; then
  command -v perf >/dev/null || { log "perf is missing (Debian: linux-perf)"; exit 1; }
  # System-wide: gRPC starts handler threads on demand, which a per-pid recording would miss.
  # PERF_CALL_GRAPH=1 adds DWARF call graphs (slower to record and report, but attributes time
  # to Mandate's functions).
  perf_args=(-q -a -F 499 -o "$T/all.perf")
  [[ ${PERF_CALL_GRAPH:-0} == 1 ]] && perf_args+=(--call-graph dwarf,8192 -F 149)
  perf record "${perf_args[@]}" &
  PERF_ALL=$!
  EXTRA_PIDS="$EXTRA_PIDS $PERF_ALL"
  sleep 1
  "$BENCH" "${RUN_ARGS[@]}" --only "$PROFILE" >&3
  kill -INT "$PERF_ALL"
  wait "$PERF_ALL" 2>/dev/null || true
  cp "$T/all.perf" "$BUILD/perf-$PROFILE.data"
  log "---- CPU by process ----"
  log "broker pid $BROKER_PID, agent pid $AGENT_PID (gRPC threads are all named grpcpp_sync_ser)"
  perf report -i "$T/all.perf" --sort pid --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -8 >&2 || true
  for who in "$BROKER_PID" "$AGENT_PID"; do
    log "---- pid $who: top symbols ----"
    perf report -i "$T/all.perf" --pid "$who" --sort sym --stdio \
      $([[ ${PERF_CALL_GRAPH:-0} == 1 ]] && echo "--children -g none") 2>/dev/null |
      grep -E '^ +[0-9]' | head -25 >&2 || true
  done
  log "---- mandate-bench (the client): top symbols ----"
  perf report -i "$T/all.perf" --comms mandate-bench --sort dso,sym --stdio 2>/dev/null |
    grep -E '^ +[0-9]' | head -25 >&2 || true
  exit 0
fi
[[ $MODE == smoke ]] && RUN_ARGS+=(--smoke)
((CURVE)) && [[ $MODE != smoke ]] && RUN_ARGS+=(--curve)
# mandate-bench exits 1 when an operation of a scenario failed or a scenario did none; its
# results are still shown, then the run fails (a figure measured on failures means nothing).
if ! "$BENCH" "${RUN_ARGS[@]}" >"$T/scenarios.json"; then
  log "scenarios failed; their results:"
  cat "$T/scenarios.json" >&2
  exit 1
fi
SCENARIO_BROKER_RSS=$(rss_mib "$BROKER_PID")
SCENARIO_AGENT_RSS=$(rss_mib "$AGENT_PID")
check_daemons_alive "the scenarios"
# The hook's own count of calls and connections, once it has stopped; and the connections open
# to it now, from outside (ss).
echo "{\"hook\": \"$POLICY\"}" >"$T/policy.json"
# The broker's own timing of the hook calls (mandate_policy_hook_duration_seconds): the mean time
# one decision took inside the broker, apart from everything else on the path.
HOOK_MEAN_US=$(curl -fsS "http://$HTTP_ADDR/metrics" | awk '
  /^mandate_policy_hook_duration_seconds_sum/ { s += $2 }
  /^mandate_policy_hook_duration_seconds_count/ { c += $2 }
  END { if (c > 0) printf "%.1f", s / c * 1e6; else print 0 }')
if [[ $POLICY == rules ]]; then
  echo "{\"hook\": \"rules\", \"hook_call_mean_us\": $HOOK_MEAN_US}" >"$T/policy.json"
fi
if [[ -n $HOOK_PID ]]; then
  HOOK_OPEN=$(hook_established)
  stop_pid "$HOOK_PID"
  EXTRA_PIDS=${EXTRA_PIDS/ $HOOK_PID/}
  HOOK_STATS=$(sed -n 2p "$T/hook.out")
  [[ -n $HOOK_STATS ]] || { log "mandate-bench-hook printed no counts"; exit 1; }
  "$PY" -c '
import json, sys
stats = json.loads(sys.argv[2])
out = {"hook": sys.argv[1], "hook_requests": stats["requests"],
       "hook_connections": stats["connections"], "hook_connections_open": int(sys.argv[3])}
out["hook_call_mean_us"] = float(sys.argv[4])
print(json.dumps(out))' "$POLICY" "$HOOK_STATS" "$HOOK_OPEN" "$HOOK_MEAN_US" >"$T/policy.json"
  log "policy hook: $(cat "$T/policy.json")"
  # A hook that was never asked measured nothing.
  [[ $(echo "$HOOK_STATS" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["requests"])') \
    -gt 0 ]] || { log "the $POLICY hook answered no call"; exit 1; }
  # Kept alive: at most the webhook pool's 8 connections (gRPC: one channel), however many
  # calls; a connection per decision would show one per call.
  [[ $(echo "$HOOK_STATS" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["connections"])') -le \
    8 ]] || { log "the $POLICY hook accepted more than 8 connections: $HOOK_STATS"; exit 1; }
fi
# Free the machine for the scale measurements.
stop_pid "$AGENT_PID"
stop_pid "$BROKER_PID"

# ---------------------------------------------------------------------------- durability alone
if [[ -n $ONLY ]]; then
  "$PY" - "$T/scenarios.json" "$T/policy.json" "$MODE" >&3 <<'PYEOF'
import json, os, sys
run = json.load(open(sys.argv[1]))
run["policy"] = json.load(open(sys.argv[2]))
run["machine"] = {"cpus": os.cpu_count(), "mode": sys.argv[3]}
print(json.dumps(run, sort_keys=True))
PYEOF
  exit 0
fi
# audit_append: the broker's audit log in process on its own SQLite file, 16 threads, every
# record fsynced (group commit) before its call returns.
mkdir -p "$T/audit"
audit_args=(audit --dir "$T/audit" --concurrency 16)
[[ $MODE != full ]] && audit_args+=(--quick)
"$BENCH" "${audit_args[@]}" >"$T/audit.json" || { log "audit_append failed"; exit 1; }
rm -rf "$T/audit"

# ---------------------------------------------------------------------------- entries at scale
# measure_entries N: a broker whose store holds N entries over 10 nodes, and an agent on one of
# those nodes (N / 10 entries). Appends one JSON line to $T/scale.jsonl.
measure_entries() {
  local n=$1 dir=$T/scale-$1 nodes=10
  mkdir -p "$dir/b"
  chmod 0700 "$dir/b"
  local seed_start seed_ms
  seed_start=$(now_ms)
  "$BENCH" seed --db "$dir/b/mandate.db" --trust-domain "$TD" --count "$n" --nodes "$nodes" \
    >/dev/null
  seed_ms=$(($(now_ms) - seed_start))
  local start broker_pid http agent_addr ready_ms
  start=$(now_ms)
  "$B" --data-dir "$dir/b" --trust-domain "$TD" --agent-listen 127.0.0.1:0 \
    --http-listen 127.0.0.1:0 >"$dir/broker.log" 2>&1 &
  broker_pid=$!
  EXTRA_PIDS="$EXTRA_PIDS $broker_pid"
  until [[ -s $dir/b/endpoints.json ]] && http=$("$PY" -c '
import json, sys
e = json.load(open(sys.argv[1])); print(e["http_address"], e["agent_address"], e["pid"])' \
    "$dir/b/endpoints.json" 2>/dev/null) && [[ ${http##* } == "$broker_pid" ]] &&
    curl -fsS -o /dev/null "http://${http%% *}/readyz" 2>/dev/null; do
    kill -0 "$broker_pid" 2>/dev/null || { log "broker with $n entries exited"; tail "$dir/broker.log"; exit 1; }
    (($(now_ms) - start > 60000)) && { log "broker with $n entries not ready in 60 s"; exit 1; }
    sleep 0.01
  done
  ready_ms=$(($(now_ms) - start))
  agent_addr=$(echo "$http" | awk '{print $2}')
  local broker_rss token agent_pid agent_start agent_ready_ms=0 last="" stable=0
  broker_rss=$(rss_mib "$broker_pid")
  token=$("$M" --admin-socket "$dir/b/admin.sock" token generate \
    --spiffe-id "spiffe://$TD/node/join/seed-0")
  agent_start=$(now_ms)
  MANDATE_JOIN_TOKEN=$token "$A" --data-dir "$dir/a" --broker "$agent_addr" \
    --trust-bundle "$dir/b/bundle.pem" >"$dir/agent.log" 2>&1 &
  agent_pid=$!
  EXTRA_PIDS="$EXTRA_PIDS $agent_pid"
  # The agent has its SVIDs when the socket exists and its memory stops growing.
  until [[ -S $dir/a/agent.sock ]]; do
    kill -0 "$agent_pid" 2>/dev/null || { log "agent exited"; tail "$dir/agent.log"; exit 1; }
    (($(now_ms) - agent_start > 60000)) && { log "agent socket never appeared"; exit 1; }
    sleep 0.02
  done
  agent_ready_ms=$(($(now_ms) - agent_start))
  while ((stable < 10)) && (($(now_ms) - agent_start < 60000)); do
    local rss
    rss=$(rss_mib "$agent_pid")
    if [[ $rss == "$last" ]]; then stable=$((stable + 1)); else stable=0; fi
    last=$rss
    sleep 0.1
  done
  local match match_args=(match --count "$((n / nodes))")
  [[ $MODE != full ]] && match_args+=(--quick)
  match=$("$BENCH" "${match_args[@]}")
  "$PY" -c '
import json, sys
n, seed, ready, brss, bhwm, aready, arss, ahwm, match = sys.argv[1:10]
print(json.dumps({"entries": int(n), "nodes": 10, "seed_ms": int(seed), "cold_start_ms": int(ready),
  "broker_rss_mb": float(brss), "broker_peak_rss_mb": float(bhwm),
  "agent_entries": int(n) // 10, "agent_start_ms": int(aready), "agent_rss_mb": float(arss),
  "agent_peak_rss_mb": float(ahwm), "match": json.loads(match)}))' \
    "$n" "$seed_ms" "$ready_ms" "$broker_rss" "$(hwm_mib "$broker_pid")" "$agent_ready_ms" \
    "$(rss_mib "$agent_pid")" "$(hwm_mib "$agent_pid")" "$match" >>"$T/scale.jsonl"
  cleanup_extra
  log "entries=$n: $(tail -n 1 "$T/scale.jsonl")"
}

if [[ $MODE == smoke ]]; then
  measure_entries 1000
elif ((CURVE)); then
  for n in 1000 10000 100000; do measure_entries "$n"; done
else
  measure_entries 100000
fi

# ---------------------------------------------------------------------------- report
"$PY" - "$T/scenarios.json" "$T/scale.jsonl" "$MODE" "$SCENARIO_BROKER_RSS" \
  "$SCENARIO_AGENT_RSS" "$T/audit.json" "$T/policy.json" >&3 <<'PYEOF'
import json, os, platform, sys

scenarios_path, scale_path, mode, broker_rss, agent_rss, audit_path, policy_path = sys.argv[1:8]
run = json.load(open(scenarios_path))
run["scenarios"]["audit_append"] = json.load(open(audit_path))
scale = [json.loads(line) for line in open(scale_path) if line.strip()]
largest = max(scale, key=lambda s: s["entries"])
model = ""
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
mem_kb = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
scenarios = run["scenarios"]
scenarios["entries_100k" if largest["entries"] == 100000 else "entries_%d" % largest["entries"]] = {
    "entries": largest["entries"],
    "cold_start_ms": largest["cold_start_ms"],
    "entry_match_us_p50": largest["match"]["p50_us"],
    "entry_match_us_p99": largest["match"]["p99_us"],
    "agent_entries": largest["agent_entries"],
    "broker_rss_mb": largest["broker_rss_mb"],
    "agent_rss_mb": largest["agent_rss_mb"],
    "agent_peak_rss_mb": largest["agent_peak_rss_mb"],
    "errors": 0,
    "concurrency": 1,
}
base = run["baseline"]
sign, verify = base["es256_sign_per_s"], base["es256_verify_per_s"]

def ratio(name, key, denominator):
    value = scenarios.get(name, {}).get(key, 0)
    return round(value / denominator, 3) if denominator else 0

entries = scenarios.get("entries_100k", {})
targets = {
    "jwt_svid_mint_x_sign": {"value": ratio("jwt_svid_mint", "ops_per_s", sign), "target": 0.15},
    "jwt_svid_mint_p99_ms": {"value": scenarios["jwt_svid_mint"]["p99_us"] / 1000, "target": 5,
                             "lower_is_better": True},
    "jwt_svid_cached_x_sign": {"value": ratio("jwt_svid_cached", "ops_per_s", sign), "target": 0.4},
    "task_token_x_sign": {"value": ratio("task_token", "ops_per_s", sign), "target": 0.1},
    "verify_task_token_x_verify": {"value": ratio("verify_task_token", "ops_per_s", verify),
                                   "target": 0.4},
    "revocation_propagation_p99_ms": {"value": scenarios["revocation_propagation"]["p99_ms"],
                                      "target": 250, "lower_is_better": True},
}
if entries:
    targets["entries_100k_cold_start_ms"] = {"value": entries["cold_start_ms"], "target": 1000,
                                             "lower_is_better": True}
    targets["entries_100k_agent_rss_mb"] = {"value": entries["agent_rss_mb"], "target": 40,
                                            "lower_is_better": True}
    targets["entries_100k_broker_rss_mb"] = {"value": entries["broker_rss_mb"], "target": 200,
                                             "lower_is_better": True}
for t in targets.values():
    t["value"] = round(t["value"], 3)
    t["met"] = t["value"] <= t["target"] if t.get("lower_is_better") else t["value"] >= t["target"]

doc = {
    "machine": {"cpus": os.cpu_count(), "cpu_model": model, "mem_gb": round(mem_kb / 1048576, 1),
                "kernel": platform.release(), "mode": mode},
    "baseline": base,
    "policy": json.load(open(policy_path)),
    "scenarios": scenarios,
    "targets": targets,
    "memory": {"scenario_broker_rss_mb": float(broker_rss),
               "scenario_agent_rss_mb": float(agent_rss), "by_entries": scale},
}
if "curve" in run:
    doc["curve"] = run["curve"]
for name, t in targets.items():
    print("bench: %-32s %10s  target %s%s  %s" % (name, t["value"],
          "<= " if t.get("lower_is_better") else ">= ", t["target"], "met" if t["met"] else "MISSED"),
          file=sys.stderr)
print(json.dumps(doc, sort_keys=True))
PYEOF
