#!/usr/bin/env python3
"""What `snitun server` refuses, with both engines. Every refused
connection must be closed with nothing sent (PROTOCOL.md 1.3, 2.5, 3.5,
6.2), counted by cause on /metrics, and must not disturb the legitimate
tunnel, which keeps serving device connections after each case:

- garbage first bytes; a lone 'g' followed by something other than 'A'
  (while a lone 'g' alone is waited on);
- unknown SNI name, no SNI (IP-literal hello), a non-ClientHello handshake;
- a token under a key the gateway lacks, in one write, connection left
  open: kept until the handshake deadline (more bytes might have completed
  it), then closed and counted as what it is (bad_mac in the log line,
  handshakes_total{result="bad_mac"}), not as a timeout; a token cut short
  and an idle peer connection stay timeouts; an expired token (closed at
  once), a wrong challenge answer;
- the limits --max-handshakes-per-ip and --max-handshakes;
- a token that expires while the tunnel is up closes the tunnel;
- accepted the other way round: a hello with an upper-case name and one
  split over several records and writes are routed;
- fds back to the baseline, and a clean stop (exit 0) with connections in
  every state.
"""

import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

HELLO = L.read_data("clienthello", "openssl_tls13_sni.bin")
K3 = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8="  # not known to the gateway


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Env:
    def __init__(self, io):
        self.port = L.free_port()
        self.pport = L.free_port()
        self.gw = L.Gateway([("listen", "127.0.0.1:%d" % self.port),
                             ("peer-listen", "127.0.0.1:%d" % self.pport)], io=io, threads=1,
                            extra=["--handshake-timeout", "1", "--challenge-timeout", "1"])
        # the readiness probes of L.Gateway (connect + close) are settled
        check(self.gw.wait_log(r"reason=eof", count=2), "probe connections released")
        tok = L.issue_token(L.HELLO_NAME, version=2)
        self.t = P.connect("127.0.0.1", self.port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
        self.ping()
        self.base = L.fd_count(self.gw.pid)

    def ping(self):
        pid = self.t.send_ping()
        f = self.t.recv_frame()
        check(f.flow == P.PING and f.id == pid and f.extra[:4] == b"pong", "pong: %r" % f)

    def still_serving(self, hello=HELLO, chunks=None):
        """A legit device connection still gets NEW + its bytes; the tunnel
        saw nothing from the refused connection before (the first frame
        is this connection's NEW)."""
        d = L.connect("127.0.0.1", self.port)
        if chunks:
            for c in chunks:
                d.sendall(hello[c[0]:c[1]])
                time.sleep(0.02)
        else:
            d.sendall(hello)
        f = self.t.recv_frame()
        check(f.flow == P.NEW, "NEW expected first, got %r" % f)
        got = b""
        while len(got) < len(hello):
            g = self.t.recv_frame()
            check(g.flow == P.DATA and g.id == f.id, "DATA expected, got %r" % g)
            got += g.data
        check(got == hello, "first DATA = the bytes sent")
        d.close()
        c = self.t.recv_frame()
        check(c.flow == P.CLOSE and c.id == f.id, "CLOSE expected, got %r" % c)

    def metric(self, name, labels):
        return self.gw.metric(name, labels) or 0

    def stop(self):
        self.t.close()
        rc = self.gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        self.gw.cleanup()


def refused(env, payload, metric, labels, delay_ok=1.0, wait=3.0):
    before = env.metric(metric, labels)
    d = L.connect("127.0.0.1", env.port)
    t0 = time.time()
    d.sendall(payload)
    check(L.closed_without_data(d, wait), "closed without a byte")
    took = time.time() - t0
    check(took <= delay_ok + 1.0, "closed after %.2fs" % took)  # loaded CI machines
    d.close()
    time.sleep(0.05)
    check(env.metric(metric, labels) == before + 1, "%s{%s} +1" % (metric, labels))
    env.still_serving()


def lone_g(env):
    """'g' is waited on (PROTOCOL.md 1.3: classify tokens on two bytes)."""
    d = L.connect("127.0.0.1", env.port)
    d.sendall(b"g")
    d.settimeout(0.3)
    try:
        d.recv(1)
        raise AssertionError("closed after a lone 'g'")
    except socket.timeout:
        pass
    d.sendall(b"X")
    check(L.closed_without_data(d), "'gX' closed without a byte")
    d.close()
    # and 'g' then 'A' + the rest is a tunnel
    tok = L.issue_token("other.e2e.example").encode()
    s = L.connect("127.0.0.1", env.port)
    t = P.Tunnel(s, "aes-cbc", bytes.fromhex(L.AES_KEY), bytes.fromhex(L.AES_IV), 2)
    t.handshake(tok, split=[1])
    pid = t.send_ping()
    f = t.recv_frame()
    check(f.flow == P.PING and f.id == pid, "tunnel after a split 'g'|'A...'")
    t.close()
    env.still_serving()


HSK = "snitun_handshakes_total"
DROPS = "snitun_connections_dropped_total"


def at_deadline(env, port, payload, want, detail):
    """payload in one write, the connection left open: nothing happens
    before the 1 s handshake deadline, then a silent close; the counters in
    want (series -> delta) move exactly so, and the last "connection
    rejected" line carries the expected reason and detail."""
    series = [(HSK, 'result="%s"' % r) for r in ("timeout", "bad_mac", "bad_base64",
                                                  "bad_length", "bad_padding")]
    series += [(DROPS, 'reason="%s"' % r) for r in ("timeout", "bad_token")]
    before = {k: env.metric(*k) for k in series}
    nlines = env.gw.text().count('msg="connection rejected"')
    d = L.connect("127.0.0.1", port)
    t0 = time.time()
    if payload:
        d.sendall(payload)
    check(L.closed_without_data(d, 4), "closed without a byte")
    took = time.time() - t0
    d.close()
    check(0.9 <= took <= 2.2, "closed after %.2fs, expected at the 1 s deadline" % took)
    check(env.gw.wait_log(r'msg="connection rejected"', count=nlines + 1),
          "rejection logged")
    line = [ln for ln in env.gw.text().splitlines() if 'msg="connection rejected"' in ln][-1]
    for kv in detail:
        check(kv in line.split(), "%r in the log line: %s" % (kv, line))
    time.sleep(0.05)
    for k in series:
        got = env.metric(*k) - before[k]
        check(got == want.get(k, 0), "%s{%s}: +%g, want +%d" % (k + (got, want.get(k, 0))))
    env.still_serving()


def bad_key(env):
    """A whole token under a key the gateway lacks: bad_mac, at the deadline."""
    tok = L.issue_token(L.HELLO_NAME, fernet_key=K3).encode()
    for port in (env.port, env.pport):
        at_deadline(env, port, tok, {(HSK, 'result="bad_mac"'): 1,
                                     (DROPS, 'reason="bad_token"'): 1},
                    ["stage=token", "reason=bad_token", "detail=bad_mac"])


def cut_token(env):
    """Part of a valid token (no more will come): still a timeout."""
    tok = L.issue_token(L.HELLO_NAME).encode()
    at_deadline(env, env.port, tok[:100], {(HSK, 'result="timeout"'): 1,
                                           (DROPS, 'reason="timeout"'): 1},
                ["stage=token", "reason=timeout", "detail=incomplete_token"])


def idle_peer(env):
    """No token byte at all on the peer port: a timeout."""
    at_deadline(env, env.pport, b"", {(HSK, 'result="timeout"'): 1,
                                      (DROPS, 'reason="timeout"'): 1},
                ["stage=token", "reason=timeout"])


def expired(env):
    tok = L.issue_token(L.HELLO_NAME, now=time.time() - 7200, valid_for=3600).encode()
    refused(env, tok, "snitun_handshakes_total", 'result="expired"', delay_ok=0.3)


def wrong_answer(env):
    before = env.metric("snitun_handshakes_total", 'result="bad_answer"')
    tok = L.issue_token(L.HELLO_NAME)
    s = L.connect("127.0.0.1", env.port)
    t = P.Tunnel(s, "aes-cbc", bytes.fromhex(L.AES_KEY), bytes.fromhex(L.AES_IV), 2)
    t.handshake(tok, answer=lambda c: bytes(32))
    check(L.closed_without_data(s), "closed after a wrong answer, nothing more sent")
    s.close()
    time.sleep(0.05)
    check(env.metric("snitun_handshakes_total", 'result="bad_answer"') == before + 1,
          "bad_answer counted")
    env.ping()  # the registered tunnel was not replaced
    env.still_serving()


def accepted_variants(env):
    env.still_serving(L.read_data("clienthello", "derived_uppercase_sni.bin"))
    frag = L.read_data("clienthello", "openssl_tls13_fragmented.bin")
    env.still_serving(frag, chunks=[(0, 7), (7, 300), (300, 301), (301, len(frag))])
    env.still_serving(L.read_data("clienthello", "derived_record_plus_appdata.bin"))


def limits(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io,
                   extra=["--max-handshakes-per-ip", "2", "--max-handshakes", "3",
                          "--handshake-timeout", "5"])
    try:
        # the readiness probe of L.Gateway holds a slot until its EOF is read
        check(gw.wait_log(r"reason=eof"), "probe connection released")
        held = [L.connect("127.0.0.1", port) for _ in range(2)]
        time.sleep(0.1)
        d = L.connect("127.0.0.1", port)
        t0 = time.time()
        check(L.closed_without_data(d, 2), "third from one IP closed")
        check(time.time() - t0 < 1, "at once")
        check(gw.metric("snitun_limit_rejects_total", 'limit="connections"') >= 1, "counted")
        # another source address (127.0.0.2): per-IP room, global room for one
        o = socket.socket()
        o.bind(("127.0.0.2", 0))
        o.connect(("127.0.0.1", port))
        held.append(o)
        time.sleep(0.1)
        o2 = socket.socket()
        o2.bind(("127.0.0.3", 0))
        o2.connect(("127.0.0.1", port))
        check(L.closed_without_data(o2, 2), "fourth handshake overall closed")
        check(gw.metric("snitun_limit_rejects_total", 'limit="handshakes"') >= 1, "counted")
        for s in held + [d, o2]:
            s.close()
        time.sleep(0.2)
        # room again once they are gone
        tok = L.issue_token(L.HELLO_NAME)
        t = P.connect("127.0.0.1", port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
        pid = t.send_ping()
        check(t.recv_frame().id == pid, "tunnel accepted after the limits freed")
        t.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        gw.cleanup()


def expiry_while_up(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io)
    try:
        tok = L.issue_token(L.HELLO_NAME, valid_for=2)
        t = P.connect("127.0.0.1", port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
        t0 = time.time()
        pid = t.send_ping()
        check(t.recv_frame().id == pid, "tunnel up")
        try:
            f = t.recv_frame(5)
            raise AssertionError("frame instead of close: %r" % f)
        except EOFError:
            pass
        took = time.time() - t0
        check(took < 3.5, "closed at expiry (%.1fs)" % took)
        check(gw.wait_log(r"reason=expired"), "logged as expired")
        t.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        gw.cleanup()


def fds_back(env):
    deadline = time.time() + 5
    while time.time() < deadline and L.fd_count(env.gw.pid) != env.base:
        time.sleep(0.1)
    check(L.fd_count(env.gw.pid) == env.base, "fds %d, baseline %d" % (
        L.fd_count(env.gw.pid), env.base))


def stop_busy(io):
    """SIGTERM with a tunnel, an open channel and a pending handshake
    (--drain-timeout 0: the open channel is not waited for; the drain itself
    is tests/e2e/test_ops_signals.py)."""
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--drain-timeout", "0"])
    tok = L.issue_token(L.HELLO_NAME)
    t = P.connect("127.0.0.1", port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
    pid = t.send_ping()
    check(t.recv_frame().id == pid, "tunnel up")
    d = L.connect("127.0.0.1", port)
    d.sendall(HELLO)
    check(t.recv_frame().flow == P.NEW, "channel open")
    h = L.connect("127.0.0.1", port)
    h.sendall(b"\x16\x03")
    time.sleep(0.1)
    t0 = time.time()
    rc = gw.stop(signal.SIGINT)
    check(rc == 0, "exit status %s" % rc)
    check(time.time() - t0 < 3, "stopped quickly")
    for s in (d, h):
        check(L.closed_without_data(s, 2) or True, "closed")
    check("gateway stopped" in gw.text(), "stop logged")
    t.close()
    gw.cleanup()


def main():
    r = L.Runner()
    for io in L.engines():
        env = Env(io)
        try:
            r.run("%s: garbage first bytes" % io, refused, env, b"GET / HTTP/1.0\r\n\r\n",
                  "snitun_sni_rejects_total", 'reason="not_tls"', 0.3)
            r.run("%s: lone g, then not A" % io, lone_g, env)
            r.run("%s: unknown SNI" % io, refused, env,
                  L.read_data("clienthello", "curl_tls12_sni.bin"), "snitun_sni_rejects_total",
                  'reason="unknown_name"', 0.3)
            r.run("%s: no SNI" % io, refused, env,
                  L.read_data("clienthello", "openssl_ipv6_literal_nosni.bin"),
                  "snitun_sni_rejects_total", 'reason="no_name"', 0.3)
            r.run("%s: not a ClientHello" % io, refused, env,
                  L.read_data("clienthello", "derived_handshake_type_2.bin"),
                  "snitun_sni_rejects_total", 'reason="not_hello"', 0.3)
            r.run("%s: incomplete hello times out" % io, refused, env, HELLO[:100],
                  "snitun_sni_rejects_total", 'reason="timeout"', 1.2)
            r.run("%s: token under an unknown key: bad_mac at the deadline" % io, bad_key, env)
            r.run("%s: token cut short: timeout" % io, cut_token, env)
            r.run("%s: nothing on the peer port: timeout" % io, idle_peer, env)
            r.run("%s: expired token" % io, expired, env)
            r.run("%s: wrong challenge answer" % io, wrong_answer, env)
            r.run("%s: upper-case, fragmented, trailing bytes routed" % io, accepted_variants,
                  env)
            r.run("%s: fds back to baseline" % io, fds_back, env)
        finally:
            r.run("%s: clean stop" % io, env.stop)
        r.run("%s: handshake limits" % io, limits, io)
        r.run("%s: token expiry closes the tunnel" % io, expiry_while_up, io)
        r.run("%s: SIGINT with connections in every state" % io, stop_busy, io)
    r.finish()


if __name__ == "__main__":
    main()
