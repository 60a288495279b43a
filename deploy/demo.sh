#!/usr/bin/env bash
# The whole system on loopback, in one command (`make demo`):
#
#   curl ──TLS, SNI demo.snitun.test──► snitun server ══tunnel══ snitun client ──► openssl s_server
#
# Makes a Fernet key and a token, starts an HTTPS endpoint with a throw-away
# certificate, the gateway and the client, fetches a page through the
# tunnel by its SNI name, prints it with a one-line summary, and stops
# everything it started (also on Ctrl-C or failure).
set -euo pipefail

build=${1:-build}
case "$build" in
    /*) bin="$build/snitun" ;;
    *) bin="$(cd "$(dirname "$0")/.." && pwd)/$build/snitun" ;;
esac
[ -x "$bin" ] || { echo "demo: $bin not built (run 'make demo')" >&2; exit 1; }
name=demo.snitun.test
work=$(mktemp -d /tmp/snitun-demo.XXXXXX)
pids=()

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

fail() {
    echo "demo: $*" >&2
    for f in "$work"/*.log; do echo "--- $(basename "$f")"; tail -n 20 "$f"; done >&2
    exit 1
}

gw_port=$(free_port)
ep_port=$(free_port)

# 1. An HTTPS endpoint: the service behind NAT, with a throw-away certificate.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=$name" \
    -addext "subjectAltName=DNS:$name" -keyout "$work/key.pem" -out "$work/cert.pem" \
    >/dev/null 2>&1
mkdir -p "$work/www"
cat >"$work/www/index.html" <<EOF
<!doctype html>
<title>snitun demo</title>
<h1>Hello through the tunnel</h1>
<p>Served by openssl s_server on 127.0.0.1:$ep_port, reached by SNI name $name.</p>
EOF
(cd "$work/www" && exec openssl s_server -quiet -accept "127.0.0.1:$ep_port" \
    -cert "$work/cert.pem" -key "$work/key.pem" -WWW) >"$work/endpoint.log" 2>&1 &
pids+=($!)

# 2. The session master's job: a Fernet key shared with the gateway, and a
#    token (with fresh AES key material) for the client.
key=$("$bin" keygen)
"$bin" token issue --fernet-key "$key" --hostname "$name" --valid-for 600 >"$work/token.json"

# 3. The gateway, single-port mode; then the client next to the endpoint.
"$bin" server --listen "127.0.0.1:$gw_port" --fernet-key "$key" --threads 2 \
    >"$work/server.log" 2>&1 &
pids+=($!)
"$bin" client --server "127.0.0.1:$gw_port" --endpoint "127.0.0.1:$ep_port" \
    --token-file "$work/token.json" --backoff-min 1 --backoff-max 2 >"$work/client.log" 2>&1 &
pids+=($!)

# 4. A device: curl resolves the name to the gateway and sends its SNI.
for _ in $(seq 1 50); do
    grep -q 'msg="*connected' "$work/client.log" 2>/dev/null && break
    sleep 0.2
done
grep -q 'msg="*connected' "$work/client.log" || fail "the client did not connect"
start=$(date +%s%N)
curl -sS --fail --max-time 10 --resolve "$name:$gw_port:127.0.0.1" \
    --cacert "$work/cert.pem" "https://$name:$gw_port/index.html" -o "$work/page.html" \
    || fail "curl through the tunnel failed"
ms=$(( ($(date +%s%N) - start) / 1000000 ))

cat "$work/page.html"
proto=$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print("protocol %s, %s" % (t["protocol_version"], t["cipher"]))' "$work/token.json")
echo "demo: ok, $(wc -c <"$work/page.html") bytes in ${ms} ms: curl -> snitun server 127.0.0.1:$gw_port (SNI $name) => tunnel ($proto) => snitun client -> openssl s_server 127.0.0.1:$ep_port; TLS end to end"
