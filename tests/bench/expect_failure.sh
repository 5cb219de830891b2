#!/usr/bin/env bash
# Runs mandate-bench against a target where every operation fails (entry matching on a node that
# holds no entry) and passes only when the driver exits 1 naming the failed scenario: the
# benchmark must not report figures measured on failures.
#   tests/bench/expect_failure.sh PATH/TO/mandate-bench
set -uo pipefail
err=$("$1" match --count 0 --quick 2>&1 >/dev/null)
rc=$?
echo "$err"
if [[ $rc != 1 ]]; then
  echo "expected exit code 1 from a run whose every operation failed, got $rc" >&2
  exit 1
fi
if [[ $err != *"FAILED match: "*"operation error(s)"* ]]; then
  echo "expected the failed scenario to be named on stderr" >&2
  exit 1
fi
