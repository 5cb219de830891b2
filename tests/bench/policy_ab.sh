#!/usr/bin/env bash
# The policy hooks' cost, compared in one session (docs/performance.md "Policy hook cost"):
#
#   tests/bench/policy_ab.sh [--rounds N] [--concurrency C] [--only LIST] [--build-dir DIR] HOOK...
#
# Runs `run.sh --quick --policy HOOK --only LIST` for each HOOK (none, rules, webhook, grpc) in
# balanced order - A B C C B A per round, N rounds (default 3) - since a machine that drifts
# otherwise favours whichever runs first. Each run starts its own broker, agent and hook. Prints,
# per scenario and per hook after the first, the median over rounds of: ops/s as a ratio to the
# first hook (each round's two runs of a hook averaged), and the difference in p50 latency (ms);
# then the JSON of every run as its last line. Nothing is asserted here.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROUNDS=3
ONLY=jwt_svid_mint,broker_jwt_svid_mint,task_token,token_endpoint
PASS=()
HOOKS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) ROUNDS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --concurrency | --build-dir) PASS+=("$1" "$2"); shift ;;
    none | rules | webhook | grpc) HOOKS+=("$1") ;;
    *)
      echo "usage: $0 [--rounds N] [--concurrency C] [--only LIST] [--build-dir DIR] HOOK..." >&2
      exit 2
      ;;
  esac
  shift
done
((${#HOOKS[@]} >= 2)) || { echo "policy_ab: name at least two hooks" >&2; exit 2; }
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for ((round = 1; round <= ROUNDS; round++)); do
  for hook in "${HOOKS[@]}" $(printf '%s\n' "${HOOKS[@]}" | tac); do
    echo "policy_ab: round $round, $hook" >&2
    doc=$(bash "$HERE/run.sh" --quick --policy "$hook" --only "$ONLY" "${PASS[@]}" 2>/dev/null |
      tail -n 1)
    echo "{\"round\": $round, \"run\": $doc}" >>"$OUT"
  done
done
/usr/bin/python3 - "$OUT" "${HOOKS[@]}" <<'PYEOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
hooks = sys.argv[2:]
base = hooks[0]
by = {}  # (round, hook) -> [run, run]
for r in runs:
    by.setdefault((r["round"], r["run"]["policy"]["hook"]), []).append(r["run"])
rounds = sorted({r["round"] for r in runs})
scenarios = sorted(runs[0]["run"]["scenarios"])
def mean(rs, name, key):
    return statistics.mean(x["scenarios"][name][key] for x in rs)
for name in scenarios:
    for hook in hooks[1:]:
        ratios = [mean(by[(k, hook)], name, "ops_per_s") / mean(by[(k, base)], name, "ops_per_s")
                  for k in rounds]
        deltas = [(mean(by[(k, hook)], name, "p50_us") - mean(by[(k, base)], name, "p50_us")) / 1000
                  for k in rounds]
        print("%-22s %-8s vs %-5s ops/s ratio %.3f (rounds %s)  p50 %+.3f ms (rounds %s)" % (
            name, hook, base, statistics.median(ratios), " ".join("%.3f" % x for x in ratios),
            statistics.median(deltas), " ".join("%+.3f" % x for x in deltas)))
def per_run(hook, key):
    return [x["policy"].get(key) for (k, h), rs in sorted(by.items()) if h == hook for x in rs]
for h in hooks:
    if any(c is not None for c in per_run(h, "hook_connections")):
        print("%s hook: connections accepted per run %s, calls answered per run %s" % (
            h, per_run(h, "hook_connections"), per_run(h, "hook_requests")))
print(json.dumps(runs))
PYEOF
