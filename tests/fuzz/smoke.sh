#!/usr/bin/env bash
# Run every fuzz target in BUILD_DIR for SECONDS each, seeded from
# tests/fuzz/seeds/<target>/. Fails if any target crashes, leaks or trips
# a sanitizer; prints executions per second for each.
set -euo pipefail
build=${1:?usage: smoke.sh BUILD_DIR SECONDS}
secs=${2:-20}
here=$(cd "$(dirname "$0")" && pwd)
status=0
for bin in "$build"/fuzz_*; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  seeds="$here/seeds/${name#fuzz_}"
  work=$(mktemp -d)
  [ -d "$seeds" ] && cp -r "$seeds"/. "$work"/
  log=$(mktemp)
  if "$bin" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
       "$work" >"$log" 2>&1; then
    runs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    eps=$(grep -m1 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
    cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+' || true)
    echo "fuzz $name: ok, $runs runs, $eps exec/s, $cov"
  else
    echo "fuzz $name: FAILED"; tail -50 "$log"; status=1
  fi
  rm -rf "$work" "$log"
done
exit $status
