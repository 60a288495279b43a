#!/usr/bin/env bash
# The README's first command stays true: deploy/demo.sh (what `make demo`
# runs) fetches its page through gateway and client.
set -euo pipefail
out=$("$SNITUN_SOURCE_DIR/deploy/demo.sh" "$SNITUN_BUILD_DIR")
echo "$out"
grep -q '<h1>Hello through the tunnel</h1>' <<<"$out"
grep -q '^demo: ok' <<<"$out"
echo "1 passed, 0 failed"
