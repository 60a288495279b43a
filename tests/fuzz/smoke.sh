#!/usr/bin/env bash
# Run every fuzz target in BUILD_DIR for SECONDS each. Fails if any target
# crashes, leaks or trips a sanitizer; prints executions per second and
# coverage for each.
#
# Corpus: each target works in tests/fuzz/corpus/<target>/ (created if
# missing), seeded from tests/fuzz/seeds/<target>/, so that what earlier
# runs found is kept and fuzzing resumes from there. At the end the corpus
# is minimised (-merge=1 into a fresh directory, which replaces it): only a
# minimal set covering every edge the whole corpus covered stays
# (-use_counters=0: edges, not hit counts, or fuzz_gw_conn keeps ~1000
# files where ~250 cover the same code). A crash or leak input goes to
# BUILD_DIR/fuzz-artifacts/.
set -euo pipefail
build=${1:?usage: smoke.sh BUILD_DIR SECONDS}
secs=${2:-20}
here=$(cd "$(dirname "$0")" && pwd)
artifacts="$(cd "$build" && pwd)/fuzz-artifacts"
mkdir -p "$artifacts"
status=0
for bin in "$build"/fuzz_*; do
  [ -x "$bin" ] || continue
  name=$(basename "$bin")
  target=${name#fuzz_}
  seeds="$here/seeds/$target"
  corpus="$here/corpus/$target"
  mkdir -p "$corpus"
  # two smoke runs on one tree (two build dirs) must not merge at once
  exec 9>"/tmp/snitun-fuzz-corpus-$target.lock"
  flock 9
  [ -d "$seeds" ] && cp -rn "$seeds"/. "$corpus"/
  log=$(mktemp)
  if "$bin" -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 \
       -artifact_prefix="$artifacts/$target-" "$corpus" >"$log" 2>&1; then
    runs=$(grep -m1 'stat::number_of_executed_units' "$log" | awk '{print $2}')
    eps=$(grep -m1 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
    cov=$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+' || true)
    fresh=$(mktemp -d)
    if "$bin" -merge=1 -use_counters=0 -rss_limit_mb=2048 -artifact_prefix="$artifacts/$target-" \
         "$fresh" "$corpus" >"$log.merge" 2>&1; then
      find "$corpus" -mindepth 1 -delete
      cp -r "$fresh"/. "$corpus"/
      kept="$(find "$corpus" -type f | wc -l) files, $(find "$corpus" -type f -printf '%s\n' |
             awk '{s += $1} END {print s + 0}') bytes"
    else
      kept="merge FAILED (corpus left as is)"; tail -20 "$log.merge"; status=1
    fi
    rm -rf "$fresh" "$log.merge"
    echo "fuzz $name: ok, $runs runs, $eps exec/s, $cov; corpus: $kept"
  else
    echo "fuzz $name: FAILED"; tail -50 "$log"; status=1
  fi
  flock -u 9
  rm -f "$log"
done
exit $status
