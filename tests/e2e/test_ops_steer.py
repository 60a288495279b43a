#!/usr/bin/env python3
"""--steer: a dual-port gateway with 2 shards and one tunnel sends device
connections to the tunnel's shard (core/gw_steer.c).

- --steer on (the default): device connections are spread by the kernel's
  hash at first (handoffs happen); once a second's worth of channels is
  counted, the gateway logs "device listeners steered" state=on with all of
  the share on one shard, and from then on 100 more devices are opened
  with no handoff at all; every one of them still reaches the tunnel;
- --steer off: 100 devices over 2 shards cause handoffs (all 100 hashed to
  one shard has probability 2^-99) and nothing is steered;
- a single-port --listen gateway never steers (its listeners also accept
  tunnels, which live where they land).
"""

import os
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

HELLO = L.read_data("clienthello", "openssl_tls13_sni.bin")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Tunnel:
    """A tunnel whose frames are read (and dropped) by a thread, so the
    gateway never waits on it; counts the NEW frames."""

    def __init__(self, port):
        tok = L.issue_token(L.HELLO_NAME)
        self.t = P.connect("127.0.0.1", port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
        # The pong comes after the registration: devices find the name.
        pid = self.t.send_ping()
        f = self.t.recv_frame()
        check(f.flow == P.PING and f.id == pid, "pong: %r" % (f,))
        self.news = 0
        self.lock = threading.Lock()
        self.th = threading.Thread(target=self._read, daemon=True)
        self.th.start()

    def _read(self):
        try:
            while True:
                f = self.t.recv_frame(timeout=120)
                if f.flow == P.NEW:
                    with self.lock:
                        self.news += 1
        except Exception:  # the socket is closed at the end
            return

    def count(self):
        with self.lock:
            return self.news

    def close(self):
        self.t.close()


def devices(port, n):
    """n device connections: connect, the ClientHello, close."""
    for _ in range(n):
        x = L.connect("127.0.0.1", port)
        x.sendall(HELLO)
        x.close()


def metric(gw, name):
    return gw.metric(name) or 0.0


def wait_news(tun, want, timeout=10):
    deadline = time.time() + timeout
    while tun.count() < want:
        check(time.time() < deadline, "NEW frames: %d of %d" % (tun.count(), want))
        time.sleep(0.05)


def load(tun, port):
    """300 devices over more than a second (past a steering look), all
    seen by the tunnel."""
    for _ in range(3):
        devices(port, 100)
        time.sleep(0.4)
    wait_news(tun, 300)


def finish(gw, tun):
    if tun is not None:
        tun.close()
    gw.stop()
    gw.cleanup()


def dual(io, extra=()):
    sni, peer = L.free_port(), L.free_port()
    gw = L.Gateway([("sni-listen", "127.0.0.1:%d" % sni),
                    ("peer-listen", "127.0.0.1:%d" % peer)], io=io, threads=2, extra=extra)
    return gw, sni, peer


def steered(io):
    gw, sni, peer = dual(io)
    tun = None
    try:
        tun = Tunnel(peer)
        sent = 0
        deadline = time.time() + 15
        while "device listeners steered" not in gw.text():
            check(time.time() < deadline, "not steered after %d devices" % sent)
            devices(sni, 40)
            sent += 40
            time.sleep(0.2)
        line = [l for l in gw.text().splitlines() if "device listeners steered" in l][-1]
        m = re.search(r"state=on shares_pct=(\d+),(\d+)", line)
        check(m and sorted(int(v) for v in m.groups()) == [0, 100], "one shard has it all: " + line)
        wait_news(tun, sent)
        base = metric(gw, "snitun_handoffs_total")
        devices(sni, 100)
        wait_news(tun, sent + 100)
        moved = metric(gw, "snitun_handoffs_total") - base
        check(moved == 0, "steered: no handoff, got %g of 100" % moved)
        check(base >= 1, "before steering, hashing handed some over (%g)" % base)
    finally:
        finish(gw, tun)


def not_steered(io):
    gw, sni, peer = dual(io, extra=("--steer", "off"))
    tun = None
    try:
        tun = Tunnel(peer)
        load(tun, sni)
        check(metric(gw, "snitun_handoffs_total") >= 1, "--steer off: hashed, some handed over")
        check("steer=off" in gw.text(), "the start-up line says steer=off")
        check("device listeners steered" not in gw.text(), "--steer off: never steered")
    finally:
        finish(gw, tun)


def single_port(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2)
    tun = None
    try:
        tun = Tunnel(port)
        load(tun, port)
        time.sleep(1.2)  # past a steering look
        check("device listeners steered" not in gw.text(), "--listen: never steered")
    finally:
        finish(gw, tun)


def main():
    r = L.Runner()
    for io in L.engines():
        r.run("%s: one tunnel, 2 shards: devices steered to its shard" % io, steered, io)
        r.run("%s: --steer off: hashed and handed over" % io, not_steered, io)
        r.run("%s: single-port listeners are never steered" % io, single_port, io)
    r.finish()


if __name__ == "__main__":
    main()
