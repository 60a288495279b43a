#!/usr/bin/env python3
"""Real TLS through `snitun server`, with both engines: openssl s_server
(-WWW) is the endpoint behind protoclient.py acting as a relay, and curl
fetches https://NAME:PORT/file through the gateway (TLS end to end, the
gateway only reads the SNI).

- single-port layout (one --listen for devices and tunnels);
- dual-port layout (--sni-listen + --peer-listen);
- --threads 2: many device connections, so that SO_REUSEPORT lands some on
  the shard that does not own the tunnel; the handoff counter must move
  (snitun_handoffs_total on /metrics) and every request must succeed;
- the gateway's open fds return to their baseline once the connections
  are closed.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

NAME = "tls.e2e.example"
ALIAS = "alias.e2e.example"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Site:
    """Certificate, docroot with two files, s_server."""

    def __init__(self):
        self.dir = L.tmpdir()
        self.cert, self.key = L.make_cert(self.dir, [NAME, ALIAS])
        self.docroot = os.path.join(self.dir, "www")
        os.mkdir(self.docroot)
        self.small = b"hello through snitun\n"
        self.big = os.urandom(300 * 1024)
        with open(os.path.join(self.docroot, "small.txt"), "wb") as f:
            f.write(self.small)
        with open(os.path.join(self.docroot, "big.bin"), "wb") as f:
            f.write(self.big)
        self.server = L.SServer(self.cert, self.key, self.docroot)

    def stop(self):
        self.server.stop()
        self.server.cleanup()
        L.rmtree(self.dir)


def open_relay(port, site, version=2, cipher="aes-cbc"):
    tok = L.issue_token(NAME, aliases=[ALIAS], version=version, cipher=cipher)
    t = P.connect("127.0.0.1", port, tok, cipher, L.AES_KEY, L.AES_IV, version)
    t.start_relay("127.0.0.1", site.server.port)
    time.sleep(0.1)
    return t


def fetch_ok(site, port, path="small.txt", name=NAME):
    rc, body = L.curl(name, port, path, site.cert)
    want = site.small if path == "small.txt" else site.big
    check(rc == 0, "curl exit %d for %s" % (rc, path))
    check(body == want, "body of %s: %d bytes, want %d" % (path, len(body), len(want)))


def stable_fds(pid, quiet=0.5, timeout=5.0):
    """The gateway's fd count once it has not changed for `quiet` seconds:
    channels of a finished request close a little after curl returns."""
    deadline = time.time() + timeout
    n, since = L.fd_count(pid), time.time()
    while time.time() < deadline and time.time() - since < quiet:
        time.sleep(0.05)
        m = L.fd_count(pid)
        if m != n:
            n, since = m, time.time()
    return n


def settle_fds(pid, base, timeout=5.0):
    deadline = time.time() + timeout
    n = L.fd_count(pid)
    while time.time() < deadline and n != base:
        time.sleep(0.1)
        n = L.fd_count(pid)
    return n


def single_port(io, site):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=1)
    try:
        t = open_relay(port, site, version=2)
        fetch_ok(site, port)
        base = stable_fds(gw.pid)
        fetch_ok(site, port, "big.bin")
        fetch_ok(site, port, name=ALIAS)
        for _ in range(5):
            fetch_ok(site, port)
        check(settle_fds(gw.pid, base) == base, "fds back to %d" % base)
        check(t.relay_error is None, "relay: %r" % t.relay_error)
        t.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        gw.cleanup()


def dual_port(io, site, version, cipher):
    sni, peer = L.free_port(), L.free_port()
    gw = L.Gateway([("sni-listen", "127.0.0.1:%d" % sni), ("sni-listen", "[::1]:%d" % sni),
                    ("peer-listen", "127.0.0.1:%d" % peer)], io=io, threads=1)
    try:
        t = open_relay(peer, site, version=version, cipher=cipher)
        base = stable_fds(gw.pid)
        fetch_ok(site, sni)
        fetch_ok(site, sni, "big.bin")
        rc, body = L.curl(NAME, sni, "small.txt", site.cert, host="::1")
        check(rc == 0 and body == site.small, "curl over IPv6: rc %d" % rc)
        # each port takes only its own kind of connection
        rc, _ = L.curl(NAME, peer, "small.txt", site.cert, timeout=5)
        check(rc != 0, "TLS on the peer port must fail")
        s = L.connect("127.0.0.1", sni)
        s.sendall(L.issue_token(NAME).encode())
        check(L.closed_without_data(s), "token on the SNI port: closed, nothing sent")
        s.close()
        fetch_ok(site, sni)
        check(settle_fds(gw.pid, base) == base, "fds back to %d" % base)
        t.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        gw.cleanup()


def handoff(io, site):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2)
    try:
        t = open_relay(port, site)
        fetch_ok(site, port)
        base = stable_fds(gw.pid)
        n = 24
        for i in range(n):
            fetch_ok(site, port, "big.bin" if i % 6 == 0 else "small.txt")
        handoffs = gw.metric("snitun_handoffs_total")
        opened = gw.metric("snitun_channels_opened_total")
        check(opened == n + 1, "channels opened %s, want %d" % (opened, n + 1))
        check(handoffs is not None and 0 < handoffs < n + 1,
              "some (not all) connections handed off: %s of %d" % (handoffs, n + 1))
        st = gw.stats()
        total_in = sum(int(s.get("handoffs_in", 0)) for s in st if s.get("shard") != "all")
        check(total_in == handoffs, "handoffs_in %d == handoffs_total %s" % (total_in, handoffs))
        check(settle_fds(gw.pid, base) == base, "fds back to %d (now %d)" % (
            base, L.fd_count(gw.pid)))
        t.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        gw.cleanup()


def main():
    r = L.Runner()
    site = Site()
    try:
        for io in L.engines():
            r.run("%s: single port, curl via relay" % io, single_port, io, site)
            r.run("%s: dual port v2 aes-cbc" % io, dual_port, io, site, 2, "aes-cbc")
            r.run("%s: dual port v0 aes-gcm" % io, dual_port, io, site, 0, "aes-gcm")
            r.run("%s: --threads 2 cross-shard handoff" % io, handoff, io, site)
    finally:
        site.stop()
    r.finish()


if __name__ == "__main__":
    main()
