"""tests/e2e/test_system_client.py - `snitun client` behaviour with real
processes on both ends (snitun server, nginx endpoints, TLS devices):

* endpoint down: a download in flight ends with EOF at the device, new
  device connections are closed promptly (channel CLOSE), the tunnel stays
  up; once nginx is back on the same port a request works
  without restarting the client;
* --allow / --block: the caller is 127.0.0.1 or ::1 (protocol 2 carries
  IPv6): --allow 127.0.0.0/8 admits 127.0.0.1 and refuses ::1, --block
  127.0.0.0/8 refuses 127.0.0.1 and admits ::1 (families never match each
  other), --allow ::1/128 the reverse;
* --route NAME=HOST:PORT: the hostname goes to --endpoint, alias SNIs to
  their own endpoints (one route given in upper case: names match
  case-insensitively);
* --endpoint-proxy-protocol v1 and v2 to an nginx `proxy_protocol` listener:
  nginx sees the device's address (127.0.0.1, ::1; with protocol 1 an IPv6
  caller travels as 0.0.0.0).

Every scenario runs with --io uring and --io epoll on the gateway and the
client; the processes' logs must hold no sanitizer report.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syslib as sl  # noqa: E402

TMP = sl.el.tmpdir()
CERT, KEY = sl.make_cert(TMP)
DOCROOT = os.path.join(TMP, "www")
BIG = 64 * sl.MiB
FILES = sl.make_files(DOCROOT, [65536, BIG])
NGINX = sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT, tagged=3, proxy=True)
CTX = sl.ssl_context(CERT)
PATH = "/65536.bin"


def get_ok(host, port, dev="127.0.0.1"):
    res = sl.https_get(host, port, PATH, CTX, host=dev)
    sl.expect_file(res, FILES, PATH)


def body(host, port, dev="127.0.0.1"):
    res = sl.https_get(host, port, "/x", CTX, host=dev)
    assert res.status == 200, res.status
    return res.body.decode()


def endpoint_down(io):
    host = sl.name("epdown-%s" % io)
    with sl.Group() as g:
        ep = g.add(sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT, workers=1, label="ep"))
        gw = g.add(sl.Gateway(io))
        cl = g.add(sl.Client(io, gw.server, ep.addr(), sl.token_file(TMP, host), admin=True))
        cl.wait_connected()
        get_ok(host, gw.sni_port)
        pid = cl.pid
        # a download in flight when the endpoint dies: the device gets what
        # was already relayed, then EOF (CLOSE from the client)
        inflight = sl.HttpsConn(host, gw.sni_port, CTX, rcvbuf=65536, timeout=10)
        inflight.connect().request("/%d.bin" % BIG).head()
        inflight.body(limit=256 * 1024)
        ep.stop()
        try:
            inflight.body()
            raise AssertionError("64 MiB body complete although the endpoint died")
        except sl.HttpError:
            pass                            # EOF before the end of the body
        finally:
            inflight.close()
        assert inflight.got < BIG
        for dev in ("127.0.0.1", "::1"):
            for _ in range(3):
                took = sl.refused(host, gw.sni_port, CTX, host=dev)
                assert took < 5.0, "device waited %.1f s for the refused channel" % took
        fails = cl.wait_metric("snitun_client_endpoint_failures_total", lambda v: v >= 6)
        assert fails == 6, "endpoint failures counted: %s" % fails
        assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0
        assert cl.metric("snitun_client_connected") == 1
        assert gw.metric("snitun_tunnels_connected") == 1
        ep.start()                          # same ports as before
        get_ok(host, gw.sni_port)
        get_ok(host, gw.sni_port, "::1")
        assert cl.pid == pid and cl.alive()
        assert cl.connected_count() == 1 and cl.disconnected_count() == 0, cl.text()[-2000:]


def acl(io):
    cases = [("allow4", ["--allow", "127.0.0.0/8"], {"127.0.0.1": True, "::1": False}),
             ("block4", ["--block", "127.0.0.0/8"], {"127.0.0.1": False, "::1": True}),
             ("allow6", ["--allow", "::1/128"], {"127.0.0.1": False, "::1": True})]
    with sl.Group() as g:
        gw = g.add(sl.Gateway(io))
        clients = []
        for label, flags, _ in cases:
            host = sl.name("%s-%s" % (label, io))
            clients.append(g.add(sl.Client(io, gw.server, NGINX.addr(), sl.token_file(TMP, host),
                                           extra=flags, admin=True)))
        for c in clients:
            c.wait_connected()
        for (label, flags, want), c in zip(cases, clients):
            host = sl.name("%s-%s" % (label, io))
            for dev, ok in want.items():
                if ok:
                    get_ok(host, gw.sni_port, dev)
                else:
                    took = sl.refused(host, gw.sni_port, CTX, host=dev)
                    assert took < 5.0, "refusal took %.1f s" % took
            refusals = sum(1 for ok in want.values() if not ok)
            got = c.wait_metric("snitun_client_acl_refused_total", lambda v: v >= refusals)
            assert got == refusals, "%s: %s refusals counted, expected %d" % (label, got, refusals)
            assert c.metric("snitun_client_endpoint_failures_total") == 0
            assert c.connected_count() == 1 and c.disconnected_count() == 0
        assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0


def route(io):
    host, alt, up = (sl.name("r-main-%s" % io), sl.name("r-alt-%s" % io),
                     sl.name("r-up-%s" % io))
    with sl.Group() as g:
        gw = g.add(sl.Gateway(io))
        cl = g.add(sl.Client(io, gw.server, NGINX.addr(NGINX.tag_ports[0]),
                             sl.token_file(TMP, host, [alt, up]),
                             extra=["--route", "%s=%s" % (alt, NGINX.addr(NGINX.tag_ports[1])),
                                    "--route", "%s=%s" % (up.upper(),
                                                          NGINX.addr(NGINX.tag_ports[2]))]))
        cl.wait_connected()
        for dev in ("127.0.0.1", "::1"):
            for sni, ep in ((host, 0), (alt, 1), (up, 2), (host, 0)):
                got = body(sni, gw.sni_port, dev)
                assert got == "ep-%d %s\n" % (ep, sni), "%s reached %r" % (sni, got)


def endpoint_proxy(pp, version):
    def run(io):
        host = sl.name("pp%s-v%d-%s" % (pp, version, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io))
            cl = g.add(sl.Client(io, gw.server, NGINX.addr(NGINX.proxy_port),
                                 sl.token_file(TMP, host, version=version),
                                 extra=["--endpoint-proxy-protocol", pp]))
            cl.wait_connected()
            want6 = "::1" if version >= 2 else "0.0.0.0"
            for dev, want in (("127.0.0.1", "127.0.0.1"), ("::1", want6)):
                for _ in range(2):
                    got = body(host, gw.sni_port, dev)
                    assert got == want + "\n", "device %s: nginx saw %r, expected %r" % (
                        dev, got, want)
    return run


def main():
    r = sl.Runner()
    try:
        for io in sl.engines():
            r.run("endpoint down and back, tunnel stays up [%s]" % io, endpoint_down, io)
            r.run("--allow / --block with IPv4 and IPv6 callers [%s]" % io, acl, io)
            r.run("--route by alias SNI [%s]" % io, route, io)
            for pp in ("v1", "v2"):
                for version in (2, 1):
                    r.run("--endpoint-proxy-protocol %s, protocol %d [%s]" % (pp, version, io),
                          endpoint_proxy(pp, version), io)
    finally:
        NGINX.stop()
    sl.el.rmtree(TMP)
    r.finish()


if __name__ == "__main__":
    main()
