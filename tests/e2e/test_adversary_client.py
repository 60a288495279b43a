#!/usr/bin/env python3
"""Hostile gateway frames against the real `snitun client` (both engines).

A test gateway (protogw.py) completes the handshake with the client (token
from --token-command, so every connection has a fresh key), then sends one
kind of malformed input per case. PROTOCOL.md 4.5, 4.10, 3.3 and 6.5 say
what the client must do:

* ignored, tunnel stays up (a PING is still answered, a channel still
  works): unknown FLOW values (with data), DATA / CLOSE / PAUSE / RESUME
  for unknown ids (no CLOSE answered for DATA), a flood of PINGs (every one
  answered with its id), DATA of exactly 16 MiB (delivered);
* the channel refused with CLOSE, tunnel stays up: a protocol-2 NEW whose
  address block is empty or too short for its family; a channel whose
  gateway ignores PAUSE (closed at the 65 MiB incoming limit, counted as
  channel_closes_total{overflow}); 300 NEW while the client may hold only
  64 fds (prlimit): the ones it cannot connect get CLOSE, and every fd is
  released once the gateway closes the rest;
* the tunnel closed, then the client reconnects (new handshake) and serves
  again: SIZE above the 16 MiB cap, a CBC NEW block that is not a multiple
  of 16, a NEW with an id already open, an AES-GCM header with a bad tag or
  a replayed nonce, a bad tag on the challenge, the stream cut mid-header
  (EOF, or silence until the pong deadline), no challenge at all (connect
  deadline).

After every case: the client process is alive, its fd count is back to its
baseline (one tunnel, no endpoint connection), and at the end it exits 0
on SIGTERM with no sanitizer report in its output (ASan build). Counters on
the client's /metrics (tunnel_closes_total by reason, frames_received_total
for unknown types) are checked where the case closes the tunnel.
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import advlib as A  # noqa: E402
import e2elib as L  # noqa: E402
import protogw as pg  # noqa: E402

# case name (without the "<engine>: " prefix) -> one-line description
EXPECTED_BUGS = {
}

HOST = "adv-client.example"
HELLO = A.client_hello(HOST.encode())
check = A.check


class Session:
    """protogw + endpoint + `snitun client`; conn is the live tunnel."""

    def __init__(self, io, cipher="aes-cbc", version=2):
        self.io, self.cipher, self.version = io, cipher, version
        self.gw = pg.ProtoGW(L.K1)
        self.ep = pg.Endpoint()
        self.admin = L.free_port()
        self.cl = pg.Client([
            "--server", self.gw.addr, "--endpoint", self.ep.addr, "--io", io,
            "--token-command", A.token_command(HOST, version=version, cipher=cipher),
            "--backoff-min", "1", "--backoff-max", "1", "--connect-timeout", "3",
            "--ping-interval", "2", "--pong-timeout", "3", "--endpoint-timeout", "3",
            "--admin-listen", "127.0.0.1:%d" % self.admin, "--log-level", "debug"])
        self.conns = 0
        self.keys = []
        try:
            self.up()
            self.fd_base = A.stable_fds(self.cl.proc.pid)
        except Exception:
            self.close()
            raise

    def up(self, timeout=10.0):
        """Accept the next tunnel and prove it (PING -> PONG)."""
        self.conn = self.gw.accept(timeout)
        self.conns += 1
        claims = self.conn.handshake()
        self.keys.append(claims["aes_key"])
        f = self.conn.expect(pg.PING, skip=())
        self.conn.send_ping(f.id, reply=True)
        self.cl.wait_line("msg=connected")
        return self.conn

    def alive(self, timeout=5.0):
        """Our PING gets its pong (the client's own pings are answered and
        PAUSE/RESUME skipped on the way)."""
        pid = os.urandom(16)
        self.conn.send_ping(pid)
        deadline = time.time() + timeout
        while True:
            f = self.conn.read_frame(max(0.01, deadline - time.time()))
            if f.flow == pg.PING and f.extra[:4] == b"pong":
                check(f.id == pid, "pong for another id: %r" % f)
                return
            if f.flow == pg.PING:
                self.conn.send_ping(f.id, reply=True)
            elif f.flow not in (pg.PAUSE, pg.RESUME):
                raise AssertionError("pong expected, got %r" % f)

    def channel_works(self):
        """A NEW + DATA reaches the endpoint; its answer comes back; CLOSE."""
        cid = os.urandom(16)
        self.conn.send_new(cid, "203.0.113.5")
        self.conn.send_data(cid, HELLO)
        e = self.ep.accept()
        check(e.wait_data(len(HELLO)) == HELLO, "endpoint got the hello")
        e.send(b"pong-from-endpoint")
        check(self.conn.read_data(cid, 18) == b"pong-from-endpoint", "answer relayed")
        self.conn.send_close(cid)
        check(e.wait_eof(), "endpoint closed after CLOSE")

    def wait_closed(self, timeout=8.0):
        """Frames the client still sends (decoded when possible) until it
        closes the tunnel; raises if it does not within timeout."""
        seen = []
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError("client did not close the unusable tunnel within %.0fs; "
                                     "it sent %r" % (timeout, seen[:10]))
            try:
                seen.append(self.conn.read_frame(left))
            except EOFError:
                return seen
            except pg.ProtoError as e:
                if "timeout" in str(e):
                    continue
                seen.append(str(e))        # undecodable: keep reading raw bytes
                try:
                    self.conn._fill(len(self.conn.buf) + 1, max(0.01, left))
                except EOFError:
                    return seen
            except Exception as e:  # noqa: BLE001 - e.g. an AEAD tag we cannot check
                seen.append(repr(e))
                self.conn.buf = b""

    def reconnects(self, timeout=10.0):
        """The client closed the tunnel: it must come back and serve."""
        self.wait_closed()
        self.conn.close()
        self.up(timeout)
        if self.cipher == "aes-gcm":
            check(self.keys[-1] != self.keys[-2], "aes-gcm reconnect with a fresh key")
        self.alive()
        self.channel_works()

    def metric(self, name, labels=""):
        return A.parse_metrics(urlget(self.admin)).get(A.series(name, labels), 0)

    def healthy(self):
        check(self.cl.proc.poll() is None, "client exited with %s" % self.cl.proc.poll())
        rep = A.sanitizer_report("\n".join(self.cl.lines))
        check(not rep, "sanitizer report:\n" + rep)
        n = A.wait_fds(self.cl.proc.pid, self.fd_base, 10)
        check(n == self.fd_base, "client fds %d, baseline %d" % (n, self.fd_base))

    def close(self):
        try:
            rc = self.cl.stop()
        finally:
            self.gw.close()
            self.ep.close()
        return rc


def urlget(port):
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


def hdr(conn, flow, size, cid=None, extra=None):
    return conn._hdr(cid or os.urandom(16), flow, size, extra or os.urandom(11))


# ---- cases: (name, cipher, fn(session)) ------------------------------------------

def closes_with(reason):
    """Decorator: the case makes the client close the tunnel with that
    tunnel_closes_total reason, then it must reconnect and serve."""
    def wrap(fn):
        def run(s):
            before = s.metric("snitun_tunnel_closes_total", 'reason="%s"' % reason)
            fn(s)
            s.reconnects()
            after = s.metric("snitun_tunnel_closes_total", 'reason="%s"' % reason)
            check(after == before + 1, "client tunnel_closes_total{reason=%s} %d -> %d" % (
                reason, before, after))
        return run
    return wrap


@closes_with("bad_frame")
def oversized_size(s):
    s.conn.send(hdr(s.conn, pg.DATA, 0x7FFFFFFF) + os.urandom(1000))


@closes_with("bad_frame")
def size_cap_plus_one(s):
    s.conn.send(hdr(s.conn, pg.DATA, (16 << 20) + 1) + os.urandom(1000))


def data_16mib(s):
    cid = os.urandom(16)
    s.conn.send_new(cid, "198.51.100.7")
    e = s.ep.accept()
    big = os.urandom(16 << 20)
    s.conn.send_frame(cid, pg.DATA, big)
    check(e.wait_data(len(big), 20) == big, "16 MiB DATA frame delivered intact")
    s.conn.send_close(cid)
    check(e.wait_eof(), "endpoint closed")
    s.alive()


def unknown_flags(s):
    before = s.metric("snitun_frames_received_total", 'type="unknown"')
    for flow in (0x05, 0x40, 0xFF, 0x03, 0x10):
        s.conn.send_frame(os.urandom(16), flow, os.urandom(100))
    s.alive()
    s.channel_works()
    # frame counters reach /metrics when the tunnel ends: end it ourselves
    s.conn.close()
    s.up()
    after = s.metric("snitun_frames_received_total", 'type="unknown"')
    check(after == before + 5, "client frames_received_total{type=unknown} %d -> %d" % (
        before, after))
    s.alive()


def data_unknown_ids(s):
    for _ in range(3):
        s.conn.send_frame(os.urandom(16), pg.DATA, os.urandom(500))
    s.conn.expect_silence(0.5)        # no CLOSE answered (4.10)
    check(s.ep.no_connection(0.1), "nothing connected to the endpoint")
    s.alive()


def ctl_unknown_ids(s):
    for flow in (pg.CLOSE, pg.PAUSE, pg.RESUME):
        s.conn.send_frame(os.urandom(16), flow)
    s.conn.expect_silence(0.5)
    s.alive()
    s.channel_works()


def data_after_close(s):
    """Frames for a channel the gateway closed itself are ignored."""
    cid = os.urandom(16)
    s.conn.send_new(cid, "203.0.113.8")
    s.conn.send_data(cid, HELLO)
    e = s.ep.accept()
    e.wait_data(len(HELLO))
    s.conn.send_close(cid)
    s.conn.send_frame(cid, pg.DATA, b"late")
    s.conn.send_frame(cid, pg.PAUSE)
    check(e.wait_eof(), "endpoint closed")
    check(e.data == HELLO, "nothing after CLOSE reached the endpoint")
    s.conn.expect_silence(0.5)
    s.alive()


def new_empty_block(s):
    """v2 NEW with SIZE 0 or a block too short for its family: not opened,
    answered with CLOSE (4.5 SHOULD); tunnel stays up."""
    a, b = os.urandom(16), os.urandom(16)
    s.conn.send(hdr(s.conn, pg.NEW, 0, a))
    blk = b"6" + os.urandom(15)           # "6" needs 16 more bytes: 15 present
    s.conn.send(hdr(s.conn, pg.NEW, 16, b) + s.conn.seal.seal(blk))
    got = {s.conn.expect(pg.CLOSE, timeout=3).id, s.conn.expect(pg.CLOSE, timeout=3).id}
    check(got == {a, b}, "CLOSE for both refused NEWs")
    check(s.ep.no_connection(0.3), "no endpoint connection for a bad NEW")
    s.alive()
    s.channel_works()


@closes_with("bad_frame")
def new_cbc_block_8(s):
    s.conn.send(hdr(s.conn, pg.NEW, 8) + os.urandom(16))


@closes_with("bad_frame")
def duplicate_new(s):
    cid = os.urandom(16)
    s.conn.send_new(cid, "203.0.113.9")
    s.ep.accept()
    s.conn.send_new(cid, "203.0.113.9")


@closes_with("eof")
def cut_mid_header_eof(s):
    s.conn.send(hdr(s.conn, pg.PING, 0)[:20])
    s.conn.sock.shutdown(socket.SHUT_WR)


@closes_with("ping_timeout")
def cut_mid_header_silence(s):
    """Header cut, then nothing: the client's pings get no pong (its pong
    deadline, 3 s here, closes the tunnel)."""
    s.conn.send(hdr(s.conn, pg.PING, 0)[:20])


@closes_with("bad_frame")
def gcm_bad_tag(s):
    unit = bytearray(hdr(s.conn, pg.PING, 0, extra=b"ping" + os.urandom(7)))
    unit[-3] ^= 0x10
    s.conn.send(bytes(unit))


@closes_with("bad_frame")
def gcm_replayed_nonce(s):
    s.conn.seal.counter -= 1
    s.conn.send_ping(os.urandom(16))


def gcm_bad_challenge(s):
    """The gateway's challenge fails its tag: the handshake fails, the
    client tries again with a fresh token and key."""
    s.conn.close()
    conn = s.gw.accept(10)
    claims = conn.read_token()
    seal, _ = pg.streams("aes-gcm", bytes.fromhex(claims["aes_key"]), None)
    wire = bytearray(seal.seal(os.urandom(32)))
    wire[20] ^= 1
    conn.send(bytes(wire))
    check(conn.is_closed(5), "client drops a challenge with a bad tag")
    conn.close()
    s.keys.append(claims["aes_key"])
    s.up()
    check(s.keys[-1] != s.keys[-2], "fresh key after the failed handshake")
    s.alive()
    s.channel_works()


def no_challenge(s):
    """Token read, no challenge ever: the client gives up at its connect
    deadline (3 s) and tries again."""
    s.conn.close()
    conn = s.gw.accept(10)
    conn.read_token()
    t0 = time.time()
    check(conn.is_closed(8), "client gives up without a challenge")
    took = time.time() - t0
    check(2.5 <= took <= 6, "gave up after %.1fs (deadline 3 s)" % took)
    conn.close()
    s.up()
    s.alive()


def ping_flood(s):
    n = 20000
    ids = [os.urandom(16) for _ in range(n)]
    blob = b"".join(hdr(s.conn, pg.PING, 0, i, b"ping" + os.urandom(7)) for i in ids)
    s.conn.send(blob)
    got = set()
    deadline = time.time() + 30
    while len(got) < n and time.time() < deadline:
        f = s.conn.read_frame(10)
        if f.flow == pg.PING and f.extra[:4] == b"pong":
            got.add(f.id)
        elif f.flow == pg.PING:
            s.conn.send_ping(f.id, reply=True)
    check(got == set(ids), "%d of %d pings answered with their ids" % (len(got & set(ids)), n))
    s.alive()


def ignores_pause(s):
    """The endpoint stops reading; the gateway pushes 80 MiB for the
    channel and ignores the client's PAUSE: the client closes the channel
    with CLOSE at its incoming limit (5.2: MUST NOT buffer without bound)
    and the tunnel stays up."""
    before = s.metric("snitun_channel_closes_total", 'reason="overflow"')
    s.ep.reading.clear()
    try:
        cid = os.urandom(16)
        s.conn.send_new(cid, "203.0.113.50")
        e = s.ep.accept()
        chunk = os.urandom(65536)
        saw = []
        stop = []

        def push():
            for _ in range(1280):
                if stop:
                    return
                try:
                    s.conn.send_frame(cid, pg.DATA, chunk)
                except OSError:
                    return
        import threading
        th = threading.Thread(target=push, daemon=True)
        th.start()
        deadline = time.time() + 30
        while time.time() < deadline and pg.CLOSE not in saw:
            f = s.conn.read_frame(max(0.01, deadline - time.time()))
            if f.flow == pg.PING and f.extra[:4] != b"pong":
                s.conn.send_ping(f.id, reply=True)
                continue
            check(f.id == cid and f.flow in (pg.PAUSE, pg.CLOSE, pg.RESUME),
                  "unexpected frame %r" % f)
            saw.append(f.flow)
        stop.append(1)
        th.join(30)
        check(saw[:1] == [pg.PAUSE] and saw[-1:] == [pg.CLOSE],
              "PAUSE then CLOSE expected, saw %r" % saw)
    finally:
        s.ep.resume()
    check(e.wait_eof(10), "endpoint connection closed after the overflow")
    s.alive()
    after = s.metric("snitun_channel_closes_total", 'reason="overflow"')
    check(after == before + 1, "client channel_closes_total{overflow} %d -> %d" % (before, after))
    s.channel_works()


def new_flood_fd_limit(s):
    """300 NEW while the client may hold only 64 fds: channels it cannot
    connect get CLOSE, the tunnel and the process survive, and once the
    gateway closes the rest every fd is released."""
    pid = s.cl.proc.pid
    import subprocess
    subprocess.run(["prlimit", "--pid", str(pid), "--nofile=64:"], check=True)
    try:
        ids = [os.urandom(16) for _ in range(300)]
        for cid in ids:
            s.conn.send_new(cid, "198.51.100.%d" % (1 + cid[0] % 200))
            s.conn.send_data(cid, HELLO)
        closed = set()
        deadline = time.time() + 20
        while time.time() < deadline:       # until 1.5 s without a CLOSE
            try:
                f = s.conn.read_frame(1.5)
            except pg.ProtoError as e:
                if "timeout" in str(e):
                    break
                raise
            if f.flow == pg.CLOSE:
                check(f.id in ids, "CLOSE for an id never opened")
                closed.add(f.id)
            elif f.flow == pg.PING and f.extra[:4] != b"pong":
                s.conn.send_ping(f.id, reply=True)
            elif f.flow not in (pg.PAUSE, pg.RESUME, pg.PING):
                raise AssertionError("unexpected %r" % f)
        check(len(closed) >= 200, "only %d of 300 channels refused with 64 fds" % len(closed))
        check(s.cl.proc.poll() is None, "client died")
        s.alive()
        for cid in ids:
            if cid not in closed:
                s.conn.send_close(cid)
        s.alive()
        print("     %d of 300 NEW refused with CLOSE at 64 fds, %d connected" % (
            len(closed), len(s.ep.all)), flush=True)
    finally:
        subprocess.run(["prlimit", "--pid", str(pid), "--nofile=20000:"], check=True)
    for e in list(s.ep.all):
        e.close()
    s.ep.all.clear()
    while not s.ep.conns.empty():     # accepted during the flood: all gone now
        s.ep.conns.get_nowait()
    n = A.wait_fds(pid, s.fd_base, 10)
    check(n == s.fd_base, "client fds %d, baseline %d" % (n, s.fd_base))
    s.channel_works()


CASES = [
    ("SIZE 0x7FFFFFFF: tunnel closed, client reconnects", "aes-cbc", oversized_size),
    ("SIZE 16 MiB + 1: tunnel closed, client reconnects", "aes-cbc", size_cap_plus_one),
    ("DATA of exactly 16 MiB delivered", "aes-cbc", data_16mib),
    ("unknown FLOW values ignored", "aes-cbc", unknown_flags),
    ("unknown FLOW values ignored (aes-gcm)", "aes-gcm", unknown_flags),
    ("DATA for unknown channels dropped, no CLOSE", "aes-cbc", data_unknown_ids),
    ("CLOSE/PAUSE/RESUME for unknown channels ignored", "aes-cbc", ctl_unknown_ids),
    ("frames after the gateway's CLOSE ignored", "aes-cbc", data_after_close),
    ("NEW with a truncated address block: CLOSE", "aes-cbc", new_empty_block),
    ("NEW with a truncated address block: CLOSE (aes-gcm)", "aes-gcm", new_empty_block),
    ("NEW with an 8-byte aes-cbc block: tunnel closed", "aes-cbc", new_cbc_block_8),
    ("NEW with an id already open: tunnel closed", "aes-cbc", duplicate_new),
    ("stream cut mid-header then EOF: reconnect", "aes-cbc", cut_mid_header_eof),
    ("stream cut mid-header then silence: pong deadline, reconnect", "aes-cbc",
     cut_mid_header_silence),
    ("aes-gcm header with a bad tag: tunnel closed", "aes-gcm", gcm_bad_tag),
    ("aes-gcm header with a replayed nonce: tunnel closed", "aes-gcm", gcm_replayed_nonce),
    ("aes-gcm challenge with a bad tag: retry with a fresh key", "aes-gcm", gcm_bad_challenge),
    ("no challenge: connect deadline, retry", "aes-cbc", no_challenge),
    ("flood of 20000 PINGs from the gateway", "aes-cbc", ping_flood),
    ("gateway ignores PAUSE: channel closed at the incoming limit", "aes-cbc", ignores_pause),
    ("300 NEW past the client's fd limit: CLOSE, tunnel survives", "aes-cbc",
     new_flood_fd_limit),
]


def main():
    r = A.Runner(EXPECTED_BUGS)
    for io in L.engines():
        # one client per cipher, its cases in a row (an idle session would
        # miss the client's pings and see it reconnect on its own)
        for cipher in ("aes-cbc", "aes-gcm"):
            box = {}

            def drop():
                s = box.pop("s", None)
                if s is not None:
                    try:
                        s.close()
                    except Exception:  # noqa: BLE001 - reported by the case that broke it
                        pass

            for name, c, fn in CASES:
                if c != cipher:
                    continue

                def case(fn=fn):
                    if "s" not in box:
                        box["s"] = Session(io, cipher)
                    s = box["s"]
                    try:
                        fn(s)
                        s.healthy()
                    except Exception:
                        print("---- client log tail:\n" + "\n".join(s.cl.lines[-20:]),
                              flush=True)
                        raise
                if not r.run("%s: %s" % (io, name), case):
                    drop()   # the next case starts from a fresh client

            def finish():
                s = box.pop("s", None)
                if s is None:
                    return
                s.healthy()
                rc = s.close()
                check(rc == 0, "client exit status %s on SIGTERM" % rc)
                print("     %s %s: %d tunnel connections served" % (io, cipher, s.conns),
                      flush=True)
            r.run("%s: %s client exits 0, no sanitizer report" % (io, cipher), finish)
    r.finish()


if __name__ == "__main__":
    main()
