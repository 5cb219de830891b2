#!/usr/bin/env bash
# Installs every Debian bookworm package Mandate needs to build, test and run.
# Idempotent: packages already present are skipped; safe to run as root on a fresh machine.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config ccache git
  libgrpc++-dev libgrpc-dev libabsl-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev nlohmann-json3-dev libssl-dev openssl
  libsqlite3-dev sqlite3 libtomlplusplus-dev libcli11-dev libcpp-httplib-dev libboost1.81-dev zlib1g-dev prometheus-cpp-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcpp-jwt-dev
  libtss2-dev swtpm swtpm-tools tpm2-tools
  python3 python3-jwt python3-jwcrypto python3-grpcio python3-protobuf
  util-linux procps curl
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
