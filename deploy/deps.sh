#!/usr/bin/env bash
# Install the Debian packages snitun needs to build, test and run its demo.
# Idempotent: checks what is present first and is quiet when nothing is
# missing. Uses sudo when not root. Pass --bench to add the benchmark tools.
set -euo pipefail

pkgs=(
  build-essential cmake pkg-config clang libclang-rt-dev
  libssl-dev openssl liburing-dev libjemalloc-dev liburcu-dev libjansson-dev
  libcriterion-dev libmicrohttpd-dev
  python3 python3-cryptography python3-yaml systemd
  curl iproute2 procps nginx-light haproxy
)
if [ "${1:-}" = "--bench" ]; then
  pkgs+=(wrk gnuplot-nox linux-perf)
fi

missing=()
for p in "${pkgs[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  case "$status" in
    *"install ok installed"*) ;;
    *) missing+=("$p") ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "deps.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
echo "deps.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
