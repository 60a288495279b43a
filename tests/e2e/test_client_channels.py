# snitun-test: cpu-heavy (moves real load: runs alone under ctest -j)
"""tests/e2e/test_client_channels.py - `snitun client` channels against
protogw.py (PROTOCOL.md 4, 5.2, 6.2-6.4, 8.1, 8.2).

* data flow on aes-cbc v2 / v1 / v0 and aes-gcm v2 / v0: NEW with IPv4 and
  IPv6 callers (v2 block; v0/v1 EXTRA, IPv6 as 0.0.0.0), DATA both ways byte
  for byte, PING answered with the same id, CLOSE from the gateway closes the
  endpoint connection, endpoint EOF sends CLOSE;
* access list: --allow / --block; a refused NEW gets CLOSE at once and no
  endpoint connection;
* endpoint down: CLOSE, the tunnel stays up;
* --endpoint-proxy-protocol v1 / v2: the endpoint parses the header and finds
  the caller (IPv4, IPv6, 0.0.0.0 on v0) and its own address;
* --route: the endpoint is chosen by the SNI in the first bytes (also when
  the ClientHello comes in two DATA frames), unknown names and non-TLS bytes
  go to --endpoint;
* flow control: the endpoint stops reading, the client's incoming queue
  passes --in-high: PAUSE; the endpoint reads again: RESUME; every byte
  arrives. Protocol 0 sends neither.

Each scenario runs with --io uring and --io epoll.
"""

import hashlib
import os
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protogw as pg  # noqa: E402

HOST = "myname.ui.nabu.casa"
TMP = tempfile.mkdtemp(prefix="snitun_client_ch_")
HELLO_A = open(pg.data_path("clienthello/openssl_tls13_sni.bin"), "rb").read()   # myname...
HELLO_B = open(pg.data_path("clienthello/curl_tls12_sni.bin"), "rb").read()      # www.myname...
HELLO_NOSNI = open(pg.data_path("clienthello/curl_ipv6_literal_nosni.bin"), "rb").read()


class Setup:
    """A proven tunnel: protogw + client (+ token file) ready for channels."""

    def __init__(self, io, cipher="aes-cbc", version=2, extra=(), endpoint=None, bare=False):
        self.vec = pg.vector(cipher, version)
        tok = pg.issue_token(self.vec.fernet_key, HOST, self.vec.aes_key, self.vec.aes_iv,
                             version, cipher)
        self.gw = pg.ProtoGW(self.vec.fernet_key)
        self.ep = endpoint if endpoint is not None else pg.Endpoint()
        if bare:
            src = ["--token", tok["token"], "--aes-key", self.vec.aes_key,
                   "--aes-iv", self.vec.aes_iv]
        else:
            path = os.path.join(TMP, "tok_%d.json" % os.getpid())
            with open(path, "w") as f:
                f.write(pg.json.dumps(tok))
            src = ["--token-file", path]
        self.cl = pg.Client(["--server", self.gw.addr, "--endpoint", self.ep.addr, "--io", io,
                             "--endpoint-timeout", "2"] + src + list(extra))
        try:
            self.conn = self.gw.accept()
            self.conn.handshake(self.vec)
            f = self.conn.expect(pg.PING, skip=())
            self.conn.send_ping(f.id, reply=True)
            self.cl.wait_line("msg=connected")
        except Exception:
            self.close()
            raise

    def alive(self):
        """The tunnel still answers a ping."""
        pid = os.urandom(16)
        self.conn.send_ping(pid)
        f = self.conn.expect(pg.PING, skip=())
        assert f.id == pid and f.extra[:4] == b"pong", f

    def close(self):
        rc = self.cl.stop()
        self.gw.close()
        self.ep.close()
        return rc


def data_flow_case(cipher, version):
    def run(io):
        s = Setup(io, cipher, version)
        try:
            c = s.conn
            a, b = os.urandom(16), os.urandom(16)
            c.send_new(a, "203.0.113.7")
            c.send_data(a, HELLO_A)
            ea = s.ep.accept()
            assert ea.wait_data(len(HELLO_A)) == HELLO_A
            reply = bytes(range(66))
            ea.send(reply)
            assert c.read_data(a, len(reply)) == reply
            # IPv6 caller (0.0.0.0 on v0/v1), a second channel interleaved
            c.send_new(b, "2001:db8::1234")
            c.send_data(b, HELLO_B)
            eb = s.ep.accept()
            assert eb.wait_data(len(HELLO_B)) == HELLO_B
            big = os.urandom(300000)
            c.send_data(a, big)
            assert ea.wait_data(len(HELLO_A) + len(big))[len(HELLO_A):] == big
            eb.send(big)
            assert c.read_data(b, len(big)) == big
            s.alive()
            # endpoint closes B -> CLOSE for B
            eb.close()
            f = c.expect(pg.CLOSE, b)
            assert f.size == 0
            # gateway closes A -> endpoint A sees EOF, no CLOSE answered
            c.send_close(a)
            assert ea.wait_eof(), "endpoint A not closed after CLOSE"
            c.expect_silence(0.3)
            s.alive()
            assert s.close() == 0
        finally:
            s.close()
    return run


def bare_token_v0(io):
    s = Setup(io, "aes-cbc", 0, bare=True)
    try:
        a = os.urandom(16)
        s.conn.send_new(a, "198.51.100.9")
        s.conn.send_data(a, HELLO_A)
        assert s.ep.accept().wait_data(len(HELLO_A)) == HELLO_A
    finally:
        s.close()


def acl_allow(io):
    s = Setup(io, extra=["--allow", "203.0.113.0/24", "--allow", "2001:db8::/32"])
    try:
        c = s.conn
        bad, bad6, good, good6 = (os.urandom(16) for _ in range(4))
        c.send_new(bad, "198.51.100.1")
        c.send_data(bad, HELLO_A)
        c.expect(pg.CLOSE, bad, timeout=2)
        c.send_new(bad6, "2001:db9::1")
        c.expect(pg.CLOSE, bad6, timeout=2)
        assert s.ep.no_connection(0.3)
        c.send_new(good, "203.0.113.77")
        c.send_data(good, HELLO_A)
        assert s.ep.accept().wait_data(len(HELLO_A)) == HELLO_A
        c.send_new(good6, "2001:db8::5")
        s.ep.accept()
        assert s.cl.count("msg=\"channel refused\"") == 2, s.cl.lines
        s.alive()
    finally:
        s.close()


def acl_block(io):
    s = Setup(io, cipher="aes-gcm", version=0, extra=["--block", "198.51.100.0/24",
                                                      "--block", "0.0.0.0/32"])
    try:
        c = s.conn
        bad, bad6, good = (os.urandom(16) for _ in range(3))
        c.send_new(bad, "198.51.100.200")
        c.expect(pg.CLOSE, bad, timeout=2)
        # protocol 0: an IPv6 caller travels as 0.0.0.0, which is blocked
        c.send_new(bad6, "2001:db8::1")
        c.expect(pg.CLOSE, bad6, timeout=2)
        assert s.ep.no_connection(0.3)
        c.send_new(good, "203.0.113.1")
        c.send_data(good, b"hello")
        assert s.ep.accept().wait_data(5) == b"hello"
        s.alive()
    finally:
        s.close()


def endpoint_down(io):
    class Dead:           # nobody listens on that port
        addr = "127.0.0.1:%d" % pg.free_port()

        def close(self):
            pass
    s = Setup(io, endpoint=Dead())
    try:
        c = s.conn
        for _ in range(3):
            a = os.urandom(16)
            c.send_new(a, "203.0.113.7")
            c.send_data(a, HELLO_A)
            c.expect(pg.CLOSE, a, timeout=3)
        s.alive()
        assert s.cl.count("endpoint connect failed") >= 1
        assert s.cl.count("msg=disconnected") == 0
    finally:
        s.close()


class Blackhole:
    """A listener whose accept queue is full: connects to it hang (SYNs are
    dropped), so an endpoint connect stays in flight."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.addr = "127.0.0.1:%d" % self.port
        self.fill = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", self.port))
            self.fill.append(c)
        time.sleep(0.2)

    def close(self):
        for c in self.fill:
            c.close()
        self.sock.close()


def connect_timeout(io):
    s = Setup(io, endpoint=Blackhole())
    try:
        c = s.conn
        a = os.urandom(16)
        t0 = time.monotonic()
        c.send_new(a, "203.0.113.7")
        c.send_data(a, HELLO_A)
        c.expect(pg.CLOSE, a, timeout=5)
        took = time.monotonic() - t0
        assert 1.5 < took < 4, "CLOSE after %.2f s, --endpoint-timeout is 2" % took
        s.cl.wait_line("error=timeout")
        s.alive()
    finally:
        s.close()


def close_while_connecting(io):
    s = Setup(io, endpoint=Blackhole())
    try:
        c = s.conn
        a = os.urandom(16)
        c.send_new(a, "203.0.113.7")
        c.send_data(a, HELLO_A)
        time.sleep(0.3)
        c.send_close(a)             # the connect is still in flight
        c.expect_silence(3.0)       # past --endpoint-timeout: no CLOSE back
        assert s.cl.count("endpoint connect failed") == 0
        s.alive()
        # and the tunnel going down while connecting is clean too
        b = os.urandom(16)
        c.send_new(b, "203.0.113.7")
        time.sleep(0.3)
        c.close()
        s.cl.wait_line("msg=disconnected")
        assert s.cl.stop() == 0
    finally:
        s.close()


def proxy_case(ppv, version, family=socket.AF_INET):
    def run(io):
        ep = pg.Endpoint(family=family, proxy=True)
        s = Setup(io, "aes-cbc", version, endpoint=ep,
                  extra=["--endpoint-proxy-protocol", "v%d" % ppv])
        try:
            c = s.conn
            ep_ip = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            for caller in ("203.0.113.7", "2001:db8::1234"):
                a = os.urandom(16)
                c.send_new(a, caller)
                c.send_data(a, HELLO_A)
                e = ep.accept()
                assert e.wait_data(len(HELLO_A)) == HELLO_A
                hlen, src, dst, sport, dport, v = e.header
                want = caller if version >= 2 or ":" not in caller else "0.0.0.0"
                if ":" in want and family == socket.AF_INET:
                    # IPv6 caller to an IPv4 endpoint: TCP6 with v4-mapped dst
                    assert dst == "::ffff:127.0.0.1", e.header
                elif ":" not in want and family == socket.AF_INET6:
                    assert dst == "0.0.0.0", e.header
                else:
                    assert dst == ep_ip, e.header
                assert (src, sport, dport, v) == (want, 0, ep.port, ppv), e.header
                e.send(b"ok")
                assert c.read_data(a, 2) == b"ok"
        finally:
            s.close()
    return run


def routes(io):
    ep_a, ep_b = pg.Endpoint(), pg.Endpoint()
    s = Setup(io, extra=["--route", "MyName.UI.nabu.casa.=%s" % ep_a.addr,
                         "--route", "www.myname.ui.nabu.casa=%s" % ep_b.addr])
    try:
        c = s.conn
        cases = [(HELLO_A, ep_a, 1), (HELLO_B, ep_b, 1), (HELLO_NOSNI, s.ep, 1),
                 (b"GET / HTTP/1.1\r\n\r\n", s.ep, 1), (HELLO_A, ep_a, 2), (HELLO_B, ep_b, 3)]
        for hello, ep, pieces in cases:
            a = os.urandom(16)
            c.send_new(a, "203.0.113.7")
            cut = [len(hello) * k // pieces for k in range(pieces + 1)]
            for k in range(pieces):
                c.send_data(a, hello[cut[k]:cut[k + 1]])
                if k + 1 < pieces:
                    time.sleep(0.05)   # the client sees an incomplete hello first
            e = ep.accept()
            assert e.wait_data(len(hello)) == hello
        # nothing arrives: the deadline (--endpoint-timeout 2) sends it to --endpoint
        a = os.urandom(16)
        c.send_new(a, "203.0.113.7")
        c.send_data(a, HELLO_A[:20])
        assert s.ep.no_connection(1.0)
        e = s.ep.accept(timeout=3)
        assert e.wait_data(20) == HELLO_A[:20]
        # the peer closes a channel still waiting for its SNI: nothing connects
        a = os.urandom(16)
        c.send_new(a, "203.0.113.7")
        c.send_data(a, HELLO_A[:20])
        c.send_close(a)
        assert s.ep.no_connection(2.5) and ep_a.no_connection(0.1)
        s.alive()
    finally:
        s.close()
        ep_a.close()
        ep_b.close()


def pause_resume_case(version):
    def run(io):
        ep = pg.Endpoint(reading=False, rcvbuf=4096)
        s = Setup(io, "aes-cbc", version, endpoint=ep,
                  extra=["--in-high", "65536", "--in-low", "16384"])
        try:
            c = s.conn
            a = os.urandom(16)
            c.send_new(a, "203.0.113.7")
            blob = os.urandom(8 << 20)
            c.send_data(a, blob)
            e = ep.accept()
            if version >= 1:
                c.expect(pg.PAUSE, a, timeout=10)
            else:
                c.expect_silence(1.0)
            ep.resume()
            got = e.wait_data(len(blob), timeout=20)
            assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
            if version >= 1:
                # the queue may cross the watermarks again while the endpoint
                # catches up: PAUSE/RESUME alternate and end with RESUME
                flows = [c.expect(pg.RESUME, a, timeout=5).flow]
                while True:
                    try:
                        f = c.read_frame(0.5)
                    except pg.ProtoError:
                        break
                    assert f.id == a and f.flow in (pg.PAUSE, pg.RESUME), f
                    assert f.flow != flows[-1], "two %s in a row" % pg.FLOW_NAMES[f.flow]
                    flows.append(f.flow)
                assert flows[-1] == pg.RESUME
            c.expect_silence(0.3)
            e.send(b"done")
            assert c.read_data(a, 4) == b"done"
        finally:
            s.close()
    return run


def http_get(port, path):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return line
    raise pg.ProtoError("metric %s missing" % name)


def admin(io):
    """--admin-listen: /readyz follows the tunnel, /metrics counts refusals,
    endpoint failures and channels."""
    port = pg.free_port()
    s = Setup(io, extra=["--admin-listen", "127.0.0.1:%d" % port, "--block", "198.51.100.0/24"])
    try:
        c = s.conn
        assert http_get(port, "/healthz")[0] == 200
        assert http_get(port, "/readyz")[0] == 200
        assert metric(http_get(port, "/metrics")[1], "snitun_client_connected").endswith(" 1")
        bad, good = os.urandom(16), os.urandom(16)
        c.send_new(bad, "198.51.100.1")
        c.expect(pg.CLOSE, bad)
        c.send_new(good, "203.0.113.1")
        s.ep.accept()
        s.alive()
        text = http_get(port, "/metrics")[1]
        assert metric(text, "snitun_client_acl_refused_total").endswith(" 1"), text
        assert metric(text, "snitun_channels_opened_total").endswith(" 2"), text
        c.close()
        s.cl.wait_line("msg=disconnected")
        assert http_get(port, "/readyz")[0] == 503
        assert metric(http_get(port, "/metrics")[1], "snitun_client_connected").endswith(" 0")
    finally:
        s.close()


def main():
    r = pg.Runner()
    for cipher, version in [("aes-cbc", 2), ("aes-cbc", 1), ("aes-cbc", 0),
                            ("aes-gcm", 2), ("aes-gcm", 0)]:
        r.run("data flow %s v%d" % (cipher, version), data_flow_case(cipher, version))
    r.run("bare --token v0 channel", bare_token_v0)
    r.run("ACL allow", acl_allow)
    r.run("ACL block (v0, 0.0.0.0 caller)", acl_block)
    r.run("endpoint down -> CLOSE, tunnel stays", endpoint_down)
    r.run("endpoint connect timeout -> CLOSE", connect_timeout)
    r.run("CLOSE / tunnel down while connecting", close_while_connecting)
    r.run("PROXY v1 to endpoint (protocol 2)", proxy_case(1, 2))
    r.run("PROXY v2 to endpoint (protocol 2)", proxy_case(2, 2))
    r.run("PROXY v1 to endpoint (protocol 0)", proxy_case(1, 0))
    r.run("PROXY v2 to IPv6 endpoint (protocol 2)", proxy_case(2, 2, socket.AF_INET6))
    r.run("--route by SNI", routes)
    r.run("--admin-listen: readyz and metrics", admin)
    r.run("PAUSE/RESUME v2", pause_resume_case(2))
    r.run("PAUSE/RESUME v1", pause_resume_case(1))
    r.run("no PAUSE on v0", pause_resume_case(0))
    r.finish()


if __name__ == "__main__":
    main()
