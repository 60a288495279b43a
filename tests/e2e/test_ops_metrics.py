#!/usr/bin/env python3
"""Operations features of `snitun server` and `snitun client`, part 1:
what an operator reads. With both engines where the engine matters.

- /metrics moves LIVE after known traffic, while the tunnel and the channel
  are still open: tunnels (total, by version and cipher), handshakes,
  channels open/opened, payload bytes per direction equal to the bodies
  sent (the counters count DATA payload, so they are exact), frames by type
  (exact counts of NEW, DATA, PING), channel and tunnel closes by reason,
  handoffs (equal to the shards' own handoffs_out), connections accepted;
  failed handshakes by reason (expired, bad_answer, bad_mac), device
  rejects (unknown_name, not_tls), connections_dropped_total by reason;
  /healthz 200, /readyz 200, engine_info, shards, fernet_keys;
- the client's /metrics: connected, bytes per direction (exact), channels,
  endpoint failures, reconnects after a gateway restart, /readyz 503 while
  disconnected;
- aes-gcm key reuse: the same token (or another token with the same key)
  is refused with nothing sent while the first token is valid, counted as
  handshakes_total{result="gcm_key_reused"}, logged; a fresh key works;
  aes-cbc tokens may be reused;
- --log-format json: every line of the gateway's and the client's stderr is
  a JSON object; the one start-up line carries the configuration (engine,
  listeners, timeouts, limits, admin, key count) and no secret appears;
- `snitun version`, `--version`, `snitun server --version`,
  `snitun client --version`;
- --admin-listen on a non-loopback address: refused without --admin-public,
  accepted with --admin-public, --admin-allow-remote or their environment
  variables (in a network namespace of our own, so nothing is exposed).
"""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

HELLO = L.read_data("clienthello", "openssl_tls13_sni.bin")
UNKNOWN_HELLO = L.read_data("clienthello", "curl_tls12_sni.bin")
K3 = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8="  # not known to the gateway
ASAN = "asan" in os.environ.get("SNITUN_BUILD_DIR", "").lower()
LAG = 3.0  # metrics are folded every second; allow a slow (ASan) machine


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def no_sanitizer(proc_text, who):
    bad = [ln for ln in proc_text.splitlines() if "Sanitizer" in ln or "runtime error:" in ln]
    check(not bad, "%s: sanitizer report:\n%s" % (who, "\n".join(bad[:20])))


def stop_checked(gw, who="gateway"):
    rc = gw.stop()
    no_sanitizer(gw.text(), who)
    check(rc == 0, "%s exit status %s" % (who, rc))


# ---- metrics -----------------------------------------------------------------------

def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def http_get(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port):
    code, body = http_get(port, "/metrics")
    check(code == 200, "/metrics status %d" % code)
    return parse_metrics(body)


def wait_metrics(port, want, base=None, timeout=LAG):
    """Poll until every series in want has its value (an absolute value, or
    a delta from base when base is given). Returns the last scrape."""
    deadline = time.time() + timeout
    while True:
        m = scrape(port)
        bad = []
        for k, v in want.items():
            got = m.get(k, 0.0) - (base.get(k, 0.0) if base is not None else 0.0)
            if got != v:
                bad.append("%s: %s%g, want %g" % (k, "+" if base is not None else "", got, v))
        if not bad:
            return m
        if time.time() > deadline:
            raise AssertionError("metrics after %.1f s:\n  %s" % (timeout, "\n  ".join(bad)))
        time.sleep(0.1)


def settle(gw):
    """L.Gateway probes each listener once (connect + close), counted as an
    accepted and a dropped connection; wait until every probe is accepted
    and accounted for, so that a baseline taken now is final."""
    deadline = time.time() + 5
    while True:
        m = scrape(gw.admin_port)
        acc = sum(v for k, v in m.items() if k.startswith("snitun_connections_accepted_total"))
        drop = sum(v for k, v in m.items() if k.startswith("snitun_connections_dropped_total"))
        if (acc >= len(gw.listen) and acc == drop) or time.time() > deadline:
            return m
        time.sleep(0.05)


def S(name, **labels):
    if not labels:
        return name
    return name + "{" + ",".join('%s="%s"' % kv for kv in labels.items()) + "}"


# ---- tunnel helpers -------------------------------------------------------------------

def ping(t):
    pid = t.send_ping()
    while True:
        f = t.recv_frame()
        if f.flow in (P.PAUSE, P.RESUME):
            continue
        check(f.flow == P.PING and f.id == pid and f.extra[:4] == b"pong", "pong: %r" % f)
        return


def next_frame(t, skip=(P.PAUSE, P.RESUME)):
    while True:
        f = t.recv_frame()
        if f.flow not in skip:
            return f


def recv_exact(sock, n, timeout=20):
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        check(chunk, "EOF after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)


def tunnel(port, name=L.HELLO_NAME, cipher="aes-cbc", version=2, key=L.AES_KEY):
    tok = L.issue_token(name, version=version, cipher=cipher, key=key)
    t = P.connect("127.0.0.1", port, tok, cipher, key, L.AES_IV, version)
    ping(t)
    return t


def engine_label(io):
    return "io_uring" if io == "uring" else "epoll"


# ---- gateway metrics ----------------------------------------------------------------

def gateway_metrics(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--handshake-timeout", "1", "--challenge-timeout", "1",
                          "--drain-timeout", "3"])
    try:
        gateway_metrics_run(gw, port, io)
    finally:
        stop_checked(gw)


def gateway_metrics_run(gw, port, io):
    ap = gw.admin_port
    check(http_get(ap, "/healthz") == (200, "ok\n"), "/healthz")
    check(http_get(ap, "/readyz") == (200, "ready\n"), "/readyz while serving")
    base = settle(gw)
    check(base.get(S("snitun_engine_info", engine=engine_label(io))) == 1,
          "engine_info names %s" % engine_label(io))
    check(base.get("snitun_shards") == 2, "shards 2")
    check(base.get("snitun_fernet_keys") == 1, "fernet_keys 1")
    check(base.get("snitun_draining") == 0, "not draining")

    # a tunnel: gauges and counters move at once
    t = tunnel(port)
    m = wait_metrics(ap, {
        "snitun_tunnels_connected": 1,
        S("snitun_tunnels_connected_by_version", version="2"): 1,
        S("snitun_tunnels_connected_by_cipher", cipher="aes-cbc"): 1,
        S("snitun_tunnels_connected_by_cipher", cipher="aes-gcm"): 0}, timeout=0.5)
    wait_metrics(ap, {"snitun_tunnels_total": 1, S("snitun_handshakes_total", result="ok"): 1,
                      S("snitun_connections_accepted_total", listener="single"): 1},
                 base, timeout=0.5)

    # a channel with known bodies both ways, left open: the byte and frame
    # counters must move while it is open (folded every second)
    base = scrape(ap)
    up = os.urandom((1 << 20) + 3)
    down = os.urandom(3 * (1 << 20) + 5)
    d = L.connect("127.0.0.1", port)
    d.sendall(HELLO + up)
    f = next_frame(t)
    check(f.flow == P.NEW, "NEW expected, got %r" % f)
    fid = f.id
    got, n_in = b"", 0
    while len(got) < len(HELLO) + len(up):
        f = next_frame(t)
        check(f.flow == P.DATA and f.id == fid, "DATA expected, got %r" % f)
        got += f.data
        n_in += 1
    check(got == HELLO + up, "the tunnel got the device's bytes")
    reader = {}

    def read_down():
        try:
            reader["data"] = recv_exact(d, len(down))
        except Exception as e:  # noqa: BLE001 - reported below
            reader["error"] = e

    th = threading.Thread(target=read_down, daemon=True)
    th.start()
    t.send_data(fid, down)
    n_out = (len(down) + 65535) // 65536
    th.join(30)
    check("data" in reader and reader["data"] == down,
          "the device got the tunnel's bytes (%r)" % reader.get("error"))
    t0 = time.time()
    m = wait_metrics(ap, {
        S("snitun_bytes_total", direction="device_to_tunnel"): len(HELLO) + len(up),
        S("snitun_bytes_total", direction="tunnel_to_device"): len(down),
        S("snitun_frames_sent_total", type="new"): 1,
        S("snitun_frames_sent_total", type="data"): n_in,
        S("snitun_frames_received_total", type="data"): n_out,
        S("snitun_frames_received_total", type="new"): 0,
        "snitun_channels_opened_total": 1}, base)
    lag = time.time() - t0
    check(m["snitun_channels_open"] == 1, "channels_open 1 while open")
    writes = m.get("snitun_tunnel_writes_total", 0) - base.get("snitun_tunnel_writes_total", 0)
    sent = sum(m.get(S("snitun_frames_sent_total", type=x), 0) -
               base.get(S("snitun_frames_sent_total", type=x), 0) for x in ("new", "data"))
    check(1 <= writes <= sent, "tunnel writes %d within 1..%d frames sent" % (writes, sent))
    for dirn, cap in (("from_tunnel", len(down)), ("to_tunnel", len(HELLO) + len(up))):
        key = S("snitun_spliced_bytes_total", direction=dirn)
        check(key in m, "%s exported" % key)
        spliced = m[key] - base.get(key, 0)
        check(0 <= spliced <= cap, "%s: %d bytes spliced, at most %d relayed" % (dirn, spliced, cap))
    check(lag < LAG, "metrics caught up within %.1f s" % lag)
    base = m
    ping(t)   # skips the PAUSE/RESUME the slow device may have caused
    wait_metrics(ap, {S("snitun_frames_received_total", type="ping"): 1,
                      S("snitun_frames_sent_total", type="ping"): 1}, base)

    # the device leaves: CLOSE on the tunnel, the channel is gone
    base = scrape(ap)
    d.close()
    f = next_frame(t)
    check(f.flow == P.CLOSE and f.id == fid, "CLOSE expected, got %r" % f)
    wait_metrics(ap, {"snitun_channels_open": 0}, timeout=2)
    wait_metrics(ap, {S("snitun_channel_closes_total", reason="local_eof"): 1,
                      S("snitun_frames_sent_total", type="close"): 1}, base)

    # handoffs: 16 devices over 2 shards; the metric equals the shards' own
    # handoffs_out (SIGUSR1 stats lines), and some must have moved
    base = scrape(ap)
    devs = []
    for _ in range(16):
        x = L.connect("127.0.0.1", port)
        x.sendall(HELLO)
        devs.append(x)
    news, hellos = set(), {}
    for _ in range(32):   # the channels' NEW and DATA interleave
        f = next_frame(t)
        if f.flow == P.NEW:
            news.add(f.id)
        else:
            check(f.flow == P.DATA and f.id in news, "DATA after its NEW, got %r" % f)
            hellos[f.id] = hellos.get(f.id, b"") + f.data
    check(len(news) == 16 and all(v == HELLO for v in hellos.values()) and len(hellos) == 16,
          "16 NEW, each followed by the hello")
    m = wait_metrics(ap, {"snitun_channels_opened_total": 16}, base)
    moved = m["snitun_handoffs_total"] - base.get("snitun_handoffs_total", 0)
    stats = gw.stats()
    out = sum(int(s["handoffs_out"]) for s in stats
              if "handoffs_out" in s and s.get("shard") not in (None, "all"))
    check(moved >= 1, "some of 16 devices were handed to the tunnel's shard (%g)" % moved)
    check(m["snitun_handoffs_total"] == out, "handoffs_total %g == stats handoffs_out %d"
          % (m["snitun_handoffs_total"], out))
    for x in devs:
        x.close()
    closed = set()
    while len(closed) < 16:   # read them all: unread bytes would turn our close into RST
        f = next_frame(t)
        check(f.flow == P.CLOSE and f.id in news, "CLOSE expected, got %r" % f)
        closed.add(f.id)
    wait_metrics(ap, {"snitun_channels_open": 0}, timeout=5)

    # failed handshakes, by reason
    base = scrape(ap)
    expired = L.issue_token(L.HELLO_NAME, valid_for=60, now=time.time() - 3600)
    s = L.connect("127.0.0.1", port)
    s.sendall(expired.encode())
    check(L.closed_without_data(s), "expired token: closed, nothing sent")
    s.close()
    try:
        P.connect("127.0.0.1", port, L.issue_token("other.example"), "aes-cbc", L.AES_KEY,
                  L.AES_IV, 2, answer=lambda c: bytes(32))
    except (EOFError, OSError):
        pass
    unknown = L.issue_token(L.HELLO_NAME, fernet_key=K3)
    s = L.connect("127.0.0.1", port)
    s.sendall(unknown.encode())
    check(L.closed_without_data(s, 4), "token under an unknown key: closed at the deadline")
    # counted as what it is (bad_mac), not as a timeout
    s.close()
    for payload in (UNKNOWN_HELLO, b"GET / HTTP/1.0\r\n\r\n"):
        s = L.connect("127.0.0.1", port)
        s.sendall(payload)
        check(L.closed_without_data(s), "device refused: closed, nothing sent")
        s.close()
    wait_metrics(ap, {
        S("snitun_handshakes_total", result="expired"): 1,
        S("snitun_handshakes_total", result="bad_answer"): 1,
        S("snitun_handshakes_total", result="bad_mac"): 1,
        S("snitun_handshakes_total", result="timeout"): 0,
        S("snitun_handshakes_total", result="ok"): 0,
        S("snitun_sni_rejects_total", reason="unknown_name"): 1,
        S("snitun_sni_rejects_total", reason="not_tls"): 1,
        S("snitun_connections_dropped_total", reason="bad_token"): 2,
        S("snitun_connections_dropped_total", reason="bad_answer"): 1,
        S("snitun_connections_dropped_total", reason="timeout"): 0,
        S("snitun_connections_dropped_total", reason="unknown_name"): 1,
        S("snitun_connections_dropped_total", reason="not_tls_or_token"): 1,
        S("snitun_connections_accepted_total", listener="single"): 5}, base)
    check(re.search(r"reason=bad_answer", gw.text()), "bad answer logged")

    # the tunnel goes: closes by reason, gauges back to 0
    base = scrape(ap)
    t.close()
    wait_metrics(ap, {"snitun_tunnels_connected": 0,
                      S("snitun_tunnels_connected_by_version", version="2"): 0,
                      S("snitun_tunnels_connected_by_cipher", cipher="aes-cbc"): 0})
    wait_metrics(ap, {S("snitun_tunnel_closes_total", reason="eof"): 1}, base)


# ---- aes-gcm key reuse ---------------------------------------------------------------

def gcm_reuse(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--drain-timeout", "3"])
    try:
        ap = gw.admin_port
        base = settle(gw)
        key = os.urandom(32).hex()
        tok = L.issue_token(L.HELLO_NAME, cipher="aes-gcm", key=key)
        t1 = P.connect("127.0.0.1", port, tok, "aes-gcm", key, L.AES_IV, 2)
        ping(t1)
        wait_metrics(ap, {S("snitun_tunnels_connected_by_cipher", cipher="aes-gcm"): 1})

        def refused(token, what):
            s = L.connect("127.0.0.1", port)
            s.sendall(token.encode())
            check(L.closed_without_data(s), "%s: closed with nothing sent" % what)
            s.close()

        refused(tok, "the same token again")
        wait_metrics(ap, {S("snitun_handshakes_total", result="gcm_key_reused"): 1,
                          S("snitun_connections_dropped_total", reason="gcm_key_reused"): 1,
                          S("snitun_handshakes_total", result="ok"): 1}, base)
        check(gw.wait_log(r"level=warn msg=\"connection rejected\".*reason=gcm_key_reused"),
              "the reuse is logged at warn")
        refused(L.issue_token(L.HELLO_NAME, cipher="aes-gcm", key=key, valid_for=7200),
                "another token with the same key")
        ping(t1)  # the first session is untouched
        t1.close()
        wait_metrics(ap, {"snitun_tunnels_connected": 0})
        refused(tok, "the same token after its session closed")
        wait_metrics(ap, {S("snitun_handshakes_total", result="gcm_key_reused"): 3}, base)
        key2 = os.urandom(32).hex()
        t2 = tunnel(port, cipher="aes-gcm", key=key2)  # a fresh key works
        t2.close()
        # aes-cbc has no counter to repeat: the same token twice is fine
        cbc = L.issue_token(L.HELLO_NAME)
        for _ in range(2):
            t = P.connect("127.0.0.1", port, cbc, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
            ping(t)
            t.close()
        wait_metrics(ap, {S("snitun_handshakes_total", result="gcm_key_reused"): 3,
                          S("snitun_handshakes_total", result="ok"): 4}, base)
        check(key not in gw.text() and tok not in gw.text(), "no key or token in the log")
    finally:
        stop_checked(gw)


# ---- client metrics -------------------------------------------------------------------

class Endpoint:
    """A TCP endpoint: reads `want` bytes, answers `reply`, keeps the
    connection until the peer closes."""

    def __init__(self, want, reply):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.want, self.reply = want, reply
        self.got = []
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            data = recv_exact(c, self.want)
            self.got.append(data)
            c.sendall(self.reply)
            while c.recv(65536):
                pass
        except (OSError, AssertionError):
            pass
        c.close()

    def close(self):
        # shutdown first: a thread blocked in accept() keeps a closed
        # listening socket alive
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def token_file(path, cipher="aes-cbc"):
    out = subprocess.run([L.BIN, "token", "issue", "--fernet-key", L.K1, "--hostname",
                          L.HELLO_NAME, "--protocol-version", "2", "--cipher", cipher,
                          "--valid-for", "3600"], check=True, capture_output=True,
                         text=True).stdout
    with open(path, "w") as f:
        f.write(out)
    return json.loads(out)


class Client(L.Proc):
    def __init__(self, gw_port, ep_port, tokfile, io, extra=()):
        self.admin_port = L.free_port()
        argv = [L.BIN, "client", "--server", "127.0.0.1:%d" % gw_port, "--endpoint",
                "127.0.0.1:%d" % ep_port, "--token-file", tokfile, "--io", io,
                "--admin-listen", "127.0.0.1:%d" % self.admin_port, "--backoff-min", "1",
                "--backoff-max", "1", "--log-level", "debug"] + list(extra)
        super().__init__(argv, "snitun-client")
        L.wait_port("127.0.0.1", self.admin_port, proc=self.p)


def wait_ready(port, want, timeout=10):
    deadline = time.time() + timeout
    while True:
        code, _ = http_get(port, "/readyz")
        if code == want:
            return
        check(time.time() < deadline, "/readyz never %d (last %d)" % (want, code))
        time.sleep(0.1)


def client_metrics(io):
    d = L.tmpdir()
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=1,
                   extra=["--drain-timeout", "3"])
    up = os.urandom(700 * 1024 + 1)
    down = os.urandom(2 * (1 << 20) + 7)
    ep = Endpoint(len(HELLO) + len(up), down)
    cl = None
    try:
        tf = os.path.join(d, "token.json")
        token_file(tf)
        cl = Client(port, ep.port, tf, io)
        cp = cl.admin_port
        wait_ready(cp, 200)
        base = scrape(cp)
        check(base.get("snitun_client_connected") == 1, "client_connected 1")
        check(base.get(S("snitun_engine_info", engine=engine_label(io))) == 1, "client engine")
        check(http_get(cp, "/healthz") == (200, "ok\n"), "client /healthz")

        dev = L.connect("127.0.0.1", port)
        dev.sendall(HELLO + up)
        check(recv_exact(dev, len(down)) == down, "device got the endpoint's reply")
        check(ep.got and ep.got[0] == HELLO + up, "endpoint got the device's bytes")
        wait_metrics(cp, {
            S("snitun_client_bytes_total", direction="tunnel_to_endpoint"): len(HELLO) + len(up),
            S("snitun_client_bytes_total", direction="endpoint_to_tunnel"): len(down),
            S("snitun_frames_received_total", type="new"): 1,
            "snitun_channels_opened_total": 1}, base)
        wait_metrics(cp, {"snitun_channels_open": 1})
        wait_metrics(gw.admin_port, {
            S("snitun_bytes_total", direction="device_to_tunnel"): len(HELLO) + len(up),
            S("snitun_bytes_total", direction="tunnel_to_device"): len(down)})

        base = scrape(cp)
        dev.close()
        wait_metrics(cp, {"snitun_channels_open": 0})
        wait_metrics(cp, {S("snitun_channel_closes_total", reason="remote_close"): 1,
                          S("snitun_frames_received_total", type="close"): 1}, base)

        # the endpoint goes away: the channel fails, counted
        ep.close()
        base = scrape(cp)
        dev = L.connect("127.0.0.1", port)
        dev.sendall(HELLO)
        check(L.closed_without_data(dev, 10), "device closed when the endpoint is down")
        dev.close()
        wait_metrics(cp, {"snitun_client_endpoint_failures_total": 1,
                          S("snitun_channel_closes_total", reason="connect_failed"): 1}, base)

        # the gateway restarts: disconnected (503), then reconnected
        base = scrape(cp)
        stop_checked(gw)
        wait_ready(cp, 503)
        wait_metrics(cp, {"snitun_client_connected": 0})
        gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=1,
                   extra=["--drain-timeout", "3"])
        wait_ready(cp, 200, timeout=15)
        m = wait_metrics(cp, {"snitun_client_connected": 1})
        check(m["snitun_client_reconnects_total"] - base["snitun_client_reconnects_total"] >= 1,
              "reconnects counted")
        check(m[S("snitun_tunnel_closes_total", reason="eof")] >= 1, "tunnel close by eof")
        rc = cl.stop()
        no_sanitizer(cl.text(), "client")
        check(rc == 0, "client exit status %s" % rc)
    finally:
        if cl is not None:
            cl.stop()
        ep.close()
        stop_checked(gw)
        L.rmtree(d)


# ---- JSON logs and the start-up line ------------------------------------------------------

GW_START_FIELDS = ("version", "engine", "threads", "listen", "proxy_protocol", "admin", "keys",
                   "keys_file", "user", "handshake_timeout", "challenge_timeout",
                   "tunnel_idle_timeout", "channel_idle_timeout", "drain_timeout",
                   "max_handshakes", "max_handshakes_per_ip", "max_channels", "max_frame",
                   "backlog", "cpu_affinity", "log_rate")
CL_START_FIELDS = ("version", "engine", "server", "endpoint", "routes", "token_source",
                   "protocol", "cipher", "connect_timeout", "endpoint_timeout", "backoff_min",
                   "backoff_max", "ping_interval", "pong_timeout", "admin")


def json_lines(text, who):
    out = []
    for i, line in enumerate(text.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise AssertionError("%s line %d is not JSON (%s): %r" % (who, i + 1, e, line))
        check(isinstance(obj, dict) and {"ts", "level", "msg"} <= set(obj),
              "%s line %d lacks ts/level/msg: %r" % (who, i + 1, line))
        out.append(obj)
    check(out, "%s logged nothing" % who)
    return out


def json_logs(io):
    d = L.tmpdir()
    keys = os.path.join(d, "keys.txt")
    with open(keys, "w") as f:
        f.write("# test keys\n%s\n" % L.K1)
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2, keys=(),
                   extra=["--fernet-keys-file", keys, "--log-format", "json",
                          "--drain-timeout", "7", "--max-channels", "321"])
    ep = Endpoint(len(HELLO), b"pong")
    cl = None
    try:
        tf = os.path.join(d, "token.json")
        tj = token_file(tf)
        cl = Client(port, ep.port, tf, io, extra=["--log-format", "json"])
        wait_ready(cl.admin_port, 200)
        dev = L.connect("127.0.0.1", port)
        dev.sendall(HELLO)
        check(recv_exact(dev, 4) == b"pong", "a channel works")
        dev.close()
        s = L.connect("127.0.0.1", port)
        s.sendall(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\xff")   # refused hello
        L.closed_without_data(s)
        s.close()
        with open(keys, "w") as f:
            f.write("not-a-key\n")
        gw.send_signal(signal.SIGHUP)
        check(gw.wait_log("keeping the old ones"), "bad keys file logged")
        gw.send_signal(signal.SIGUSR1)
        check(gw.wait_log('"msg":"stats"'), "stats logged")
        rc = cl.stop()
        check(rc == 0, "client exit %s" % rc)
        stop_checked(gw)
        lines = json_lines(gw.text(), "gateway")
        start = [o for o in lines if o["msg"] == "gateway started"]
        check(len(start) == 1, "one start-up line, got %d" % len(start))
        st = start[0]
        missing = [k for k in GW_START_FIELDS if k not in st]
        check(not missing, "start-up line lacks %s: %r" % (missing, st))
        check(st["engine"] == engine_label(io), "engine=%s" % st["engine"])
        check(st["threads"] == "2" and st["keys"] == "1" and st["drain_timeout"] == "7" and
              st["max_channels"] == "321" and st["keys_file"] == keys,
              "start-up values: %r" % st)
        check(st["listen"] == "single:127.0.0.1:%d" % port, "listen=%s" % st["listen"])
        check(st["admin"] == "127.0.0.1:%d" % gw.admin_port, "admin=%s" % st["admin"])
        check([o for o in lines if o["msg"] == "io engine"], "engine lines")
        bad = [o for o in lines if o["msg"].startswith("Fernet keys not reloaded")]
        check(bad and "keys.txt:1" in bad[0].get("error", ""), "reload error names the line: %r"
              % bad)
        clines = json_lines(cl.text(), "client")
        cs = [o for o in clines if o["msg"] == "snitun client starting"]
        check(len(cs) == 1, "one client start-up line")
        missing = [k for k in CL_START_FIELDS if k not in cs[0]]
        check(not missing, "client start-up line lacks %s: %r" % (missing, cs[0]))
        check(cs[0]["engine"] == engine_label(io) and cs[0]["token_source"] == "file",
              "client start-up values: %r" % cs[0])
        check([o for o in clines if o["msg"] == "connected"], "client logged connected")
        everything = gw.text() + cl.text()
        for secret in (L.K1, tj["token"], tj["aes_key"]):
            check(secret not in everything, "a secret appears in the logs")
    finally:
        if cl is not None:
            cl.stop()
        ep.close()
        gw.stop()
        L.rmtree(d)


# ---- version and admin exposure ----------------------------------------------------------

def versions():
    outs = []
    for argv in (["version"], ["--version"], ["server", "--version"], ["client", "--version"],
                 ["server", "--threads", "1", "--version"]):
        r = subprocess.run([L.BIN] + argv, capture_output=True, text=True, timeout=10)
        check(r.returncode == 0, "%s: exit %d %s" % (argv, r.returncode, r.stderr))
        check(re.fullmatch(r"snitun \d+\.\d+\.\d+\n", r.stdout), "%s: %r" % (argv, r.stdout))
        outs.append(r.stdout)
    check(len(set(outs)) == 1, "one version everywhere: %r" % outs)
    # the environment never turns a deployment into a version print
    r = subprocess.run([L.BIN, "server", "--threads", "0"], capture_output=True, text=True,
                       env=dict(os.environ, SNITUN_VERSION="1"), timeout=10)
    check(r.returncode == 2 and r.stdout == "", "SNITUN_VERSION is no flag")


def netns_ok():
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def in_netns(argv, env=None, timeout=10, needle=None):
    """Run argv in a fresh network namespace (lo up) until its log shows
    needle, then SIGTERM; returns (exit status, output)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.Popen(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
                         + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e)
    out = []
    deadline = time.time() + timeout

    def rd():
        for line in p.stdout:
            out.append(line.decode(errors="replace"))

    th = threading.Thread(target=rd, daemon=True)
    th.start()
    while time.time() < deadline and p.poll() is None:
        if needle is not None and needle in "".join(out):
            break
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    th.join(5)
    return p.returncode, "".join(out)


def admin_exposure():
    gw_argv = [L.BIN, "server", "--listen", "127.0.0.1:18443", "--fernet-key", L.K1,
               "--threads", "1", "--admin-listen", "0.0.0.0:19090"]
    cl_argv = [L.BIN, "client", "--server", "127.0.0.1:9", "--endpoint", "127.0.0.1:9",
               "--token", "gAAAA", "--aes-key", L.AES_KEY[:32], "--aes-iv", L.AES_IV,
               "--admin-listen", "0.0.0.0:19091", "--backoff-min", "60"]
    for argv, flag in ((gw_argv, "--admin-public"), (cl_argv, "--admin-public")):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        check(r.returncode == 2 and flag in r.stderr,
              "non-loopback admin refused without %s: %d %r" % (flag, r.returncode, r.stderr))
    if not netns_ok():
        print("     (no network namespace: acceptance cases skipped)")
        return
    cases = [(gw_argv + ["--admin-public"], {}, "gateway started"),
             (gw_argv + ["--admin-allow-remote"], {}, "gateway started"),
             (gw_argv, {"SNITUN_ADMIN_PUBLIC": "true"}, "gateway started"),
             (gw_argv, {"SNITUN_ADMIN_ALLOW_REMOTE": "true"}, "gateway started"),
             (cl_argv + ["--admin-public"], {}, "snitun client starting"),
             (cl_argv + ["--admin-allow-remote"], {}, "snitun client starting"),
             (cl_argv, {"SNITUN_CLIENT_ADMIN_PUBLIC": "1"}, "snitun client starting"),
             (cl_argv, {"SNITUN_CLIENT_ADMIN_ALLOW_REMOTE": "true"}, "snitun client starting")]
    for argv, env, needle in cases:
        rc, out = in_netns(argv, env, needle=needle)
        check(needle in out and "admin=0.0.0.0:1909" in out,
              "%s %s: not started on 0.0.0.0:\n%s" % (argv[1:2], env or argv[-1:], out[-2000:]))
        no_sanitizer(out, argv[1])
        check(rc == 0, "exit %s after SIGTERM:\n%s" % (rc, out[-2000:]))


def main():
    r = L.Runner()
    r.run("version and --version", versions)
    r.run("admin listener: non-loopback needs --admin-public (or the old name)",
          admin_exposure)
    for io in L.engines():
        r.run("%s: gateway metrics move live after known traffic" % io, gateway_metrics, io)
        r.run("%s: aes-gcm key reuse refused and counted" % io, gcm_reuse, io)
        r.run("%s: client metrics, readiness, reconnects" % io, client_metrics, io)
        r.run("%s: JSON logs parse, start-up lines carry the config" % io, json_logs, io)
    r.finish()


if __name__ == "__main__":
    main()
