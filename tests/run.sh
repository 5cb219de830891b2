#!/usr/bin/env bash
# Sets up, builds and runs every test (unit, integration, interop) with ctest.
#   ./tests/run.sh            # everything
#   ./tests/run.sh -R jose    # extra arguments go to ctest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${MANDATE_BUILD_DIR:-$ROOT/build}
JOBS=${MANDATE_JOBS:-2}

./deploy/install-deps.sh

# ccache: paths relative to the checkout and no cwd in the hash, so a fresh clone elsewhere
# (as CI makes) reuses the cache of earlier builds.
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
export CCACHE_BASEDIR=$ROOT
export CCACHE_NOHASHDIR=1

cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=${MANDATE_BUILD_TYPE:-Debug} >/dev/null
cmake --build "$BUILD_DIR" -j"$JOBS"

cd "$BUILD_DIR"
ctest --output-on-failure --timeout 300 -j"$JOBS" "$@"
