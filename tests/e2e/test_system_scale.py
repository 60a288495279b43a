# snitun-test: cpu-heavy (moves real load: runs alone under ctest -j)
"""tests/e2e/test_system_scale.py - whole system under many connections and
many tunnels (real `snitun server`, `snitun client`, nginx, TLS devices):

* 200 HTTPS connections through ONE tunnel at the same time: every device
  completes its TLS handshake with nginx (so 200 channels are open at once,
  checked with snitun_channels_open), then all request their body together;
  every body arrives intact (64 KiB, every tenth 1 B), for v2 aes-cbc and
  v1 aes-gcm;
* 50 tunnels at once: 50 client processes, each with its own hostname and
  alias, protocol 0/1/2 and aes-cbc/aes-gcm mixed, each connected to its own
  nginx server ("ep-<i> <sni>"); both names of every client reach that
  client's endpoint and no other;
* cross-shard: a gateway with --threads 2, 100 devices (64 KiB) and four
  64 MiB downloads at once; all intact and snitun_handoffs_total > 0.

Every scenario runs with --io uring and --io epoll on the gateway and the
clients; the processes' logs must hold no sanitizer report.
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syslib as sl  # noqa: E402

TMP = sl.el.tmpdir()
CERT, KEY = sl.make_cert(TMP)
DOCROOT = os.path.join(TMP, "www")
BIG = 64 * sl.MiB
FILES = sl.make_files(DOCROOT, [1, 65536, BIG])
NTUN = 50
NGINX = sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT, tagged=NTUN)
CTX = sl.ssl_context(CERT)
# All devices come from 127.0.0.1: lift the per-source-IP cap on connections
# still in their handshake (default 64 per shard), or a burst of 200 hits it.
GW_EXTRA = ["--max-handshakes-per-ip", "0"]


def parallel_one_tunnel(version, cipher):
    def run(io):
        n = 200
        host = sl.name("par-%d-%s-%s" % (version, cipher, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io, extra=GW_EXTRA))
            cl = g.add(sl.Client(io, gw.server, NGINX.addr(),
                                 sl.token_file(TMP, host, version=version, cipher=cipher)))
            cl.wait_connected()
            open_at_barrier = []

            def all_open():
                open_at_barrier.append(gw.metric("snitun_channels_open"))

            barrier = threading.Barrier(n, action=all_open, timeout=60)

            def device(i):
                path = "/1.bin" if i % 10 == 0 else "/65536.bin"
                c = sl.HttpsConn(host, gw.sni_port, CTX, timeout=60)
                try:
                    c.connect()          # TLS with nginx done: the channel is open
                    barrier.wait()
                    c.request(path).head()
                    c.body()
                    res = sl.Result(c)
                finally:
                    c.close()
                sl.expect_file(res, FILES, path)
                return res

            results = sl.parallel([lambda i=i: device(i) for i in range(n)])
            errs = sl.errors(results)
            assert not errs, "%d of %d devices failed, first: %r" % (len(errs), n, errs[0])
            assert open_at_barrier == [n], "channels open at the barrier: %s" % open_at_barrier
            assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0
            assert cl.disconnected_count() == 0
    return run


def many_tunnels(io):
    with sl.Group() as g:
        gw = g.add(sl.Gateway(io, mode="single", threads=2, extra=GW_EXTRA))
        names = []
        clients = []
        for i in range(NTUN):
            host, alias = sl.name("t%02d-%s" % (i, io)), sl.name("a%02d-%s" % (i, io))
            names.append((host, alias))
            tok = sl.token_file(TMP, host, [alias], version=i % 3,
                                cipher="aes-gcm" if i % 2 else "aes-cbc")
            clients.append(g.add(sl.Client(io, gw.server, NGINX.addr(NGINX.tag_ports[i]), tok)))
        for c in clients:
            c.wait_connected(timeout=60)
        assert gw.wait_metric("snitun_tunnels_connected", lambda v: v == NTUN) == NTUN

        def device(i, which):
            sni = names[i][which]
            res = sl.https_get(sni, gw.sni_port, "/who", CTX, host="::1" if which else "127.0.0.1")
            want = ("ep-%d %s\n" % (i, sni)).encode()
            assert res.status == 200 and res.body == want, \
                "%s reached %r, expected %r" % (sni, res.body, want)
            return res

        jobs = [lambda i=i, w=w: device(i, w) for i in range(NTUN) for w in (0, 1)]
        results = sl.parallel(jobs, workers=25)
        errs = sl.errors(results)
        assert not errs, "%d of %d names misrouted or failed, first: %r" % (len(errs), len(jobs),
                                                                           errs[0])
        for c in clients:
            assert c.disconnected_count() == 0 and c.connected_count() == 1, c.text()[-2000:]


def cross_shard(io):
    host = sl.name("xs-%s" % io)
    with sl.Group() as g:
        gw = g.add(sl.Gateway(io, threads=2, extra=GW_EXTRA))
        cl = g.add(sl.Client(io, gw.server, NGINX.addr(), sl.token_file(TMP, host)))
        cl.wait_connected()

        def small(i):
            res = sl.https_get(host, gw.sni_port, "/65536.bin", CTX,
                               host="::1" if i % 2 else "127.0.0.1", timeout=60)
            sl.expect_file(res, FILES, "/65536.bin")
            return res

        def big():
            res = sl.https_get(host, gw.sni_port, "/%d.bin" % BIG, CTX, timeout=60)
            sl.expect_file(res, FILES, "/%d.bin" % BIG)
            return res

        results = sl.parallel([big] * 4 + [lambda i=i: small(i) for i in range(100)], workers=24)
        errs = sl.errors(results)
        assert not errs, "%d of %d devices failed, first: %r" % (len(errs), len(results), errs[0])
        handoffs = gw.metric("snitun_handoffs_total")
        sl.report("cross-shard [%s]: %d of 104 connections handed to the tunnel's shard; "
                  "4 x 64 MiB at %.0f MiB/s each (mean)"
                  % (io, handoffs, sum(r.mbps() for r in results[:4]) / 4))
        assert handoffs > 0, "no handoff in 104 connections over 2 shards"
        assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0


def main():
    r = sl.Runner()
    try:
        for io in sl.engines():
            for version, cipher in ((2, "aes-cbc"), (1, "aes-gcm")):
                r.run("200 parallel HTTPS through one tunnel v%d %s [%s]" % (version, cipher, io),
                      parallel_one_tunnel(version, cipher), io)
            r.run("%d tunnels at once, names and aliases routed [%s]" % (NTUN, io),
                  many_tunnels, io)
            r.run("cross-shard handoffs, --threads 2 [%s]" % io, cross_shard, io)
    finally:
        NGINX.stop()
    sl.el.rmtree(TMP)
    r.finish()


if __name__ == "__main__":
    main()
