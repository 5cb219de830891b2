#!/usr/bin/env bash
# A throwaway swtpm for manual runs and shell-driven tests (the C++ tests use swtpm_fixture.h).
#   eval "$(tests/tpm/swtpm.sh start [--without-rsa-ek-cert])"   # exports SWTPM_DIR SWTPM_PID
#                                                                 #   TPM2TOOLS_TCTI SWTPM_EK_CA
#   ... mandate-agent --tpm-tcti "$TPM2TOOLS_TCTI" / broker --tpm-ek-ca "$SWTPM_EK_CA" ...
#   tests/tpm/swtpm.sh stop "$SWTPM_DIR"                          # kills swtpm, removes the dir
# Uses a private config (never Debian's /etc/swtpm_setup.conf, whose CA dir is tss-owned).
set -euo pipefail

start() {
  local without_rsa=0
  [[ "${1:-}" == "--without-rsa-ek-cert" ]] && without_rsa=1
  local dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/swtpm.XXXXXX")
  mkdir -p "$dir/state" "$dir/ca"
  cat >"$dir/swtpm-localca.conf" <<C
statedir = $dir/ca
signingkey = $dir/ca/signkey.pem
issuercert = $dir/ca/issuercert.pem
certserial = $dir/ca/certserial
C
  printf -- '--platform-manufacturer Mandate\n--platform-version 2.1\n--platform-model swtpm\n' \
    >"$dir/swtpm-localca.options"
  cat >"$dir/swtpm_setup.conf" <<C
create_certs_tool = swtpm_localca
create_certs_tool_config = $dir/swtpm-localca.conf
create_certs_tool_options = $dir/swtpm-localca.options
active_pcr_banks = sha256
C
  if ! swtpm_setup --tpm2 --tpmstate "$dir/state" --config "$dir/swtpm_setup.conf" \
      --create-ek-cert --create-platform-cert --overwrite --logfile "$dir/setup.log" >&2; then
    cat "$dir/setup.log" >&2; rm -rf "$dir"; exit 1
  fi
  cat "$dir/ca/swtpm-localca-rootca-cert.pem" "$dir/ca/issuercert.pem" >"$dir/ek-ca-bundle.pem"
  swtpm socket --tpm2 --tpmstate dir="$dir/state" \
    --server type=unixio,path="$dir/tpm.sock" --ctrl type=unixio,path="$dir/tpm.sock.ctrl" \
    --flags not-need-init,startup-clear --log file="$dir/swtpm.log" </dev/null >/dev/null 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/swtpm.pid"
  for _ in $(seq 200); do [[ -S "$dir/tpm.sock" ]] && break; sleep 0.025; done
  if [[ ! -S "$dir/tpm.sock" ]]; then
    echo "swtpm did not start" >&2; kill "$pid" 2>/dev/null || true; rm -rf "$dir"; exit 1
  fi
  if ((without_rsa)); then
    # Platform auth is empty on a fresh swtpm; the agent then falls back to the ECC (P-384) EK.
    tpm2_nvundefine -T "swtpm:path=$dir/tpm.sock" -C p 0x01c00002 >&2
  fi
  printf 'export SWTPM_DIR=%q SWTPM_PID=%q TPM2TOOLS_TCTI=%q SWTPM_EK_CA=%q\n' \
    "$dir" "$pid" "swtpm:path=$dir/tpm.sock" "$dir/ek-ca-bundle.pem"
}

stop() {
  local dir="${1:?usage: swtpm.sh stop DIR}"
  [[ "$dir" == */swtpm.* && -f "$dir/swtpm.pid" ]] || { echo "not a swtpm.sh dir: $dir" >&2; exit 1; }
  local pid
  pid=$(cat "$dir/swtpm.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
  kill -9 "$pid" 2>/dev/null || true
  rm -rf "$dir"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) echo "usage: $0 start [--without-rsa-ek-cert] | stop DIR" >&2; exit 2 ;;
esac
