# snitun-test: cpu-heavy (moves real load: runs alone under ctest -j)
"""tests/e2e/test_system_flow.py - whole system, flow control and resources
(real `snitun server`, `snitun client`, nginx, TLS devices):

* slow readers do not stall the tunnel: on one tunnel, one device stops
  reading its 64 MiB body and another reads it in small slow steps, while a
  third downloads 64 MiB at full speed: the fast one completes intact within
  a generous bound (30 s; its time next to an unloaded run is printed, not
  asserted), then both slow ones drain their bodies intact (RESUME works);
  protocol 2 aes-cbc, 1 aes-gcm (PAUSE/RESUME) and 0 aes-cbc (no flow
  control, bounded queues only);
* no fd leak: after a mixed load (complete downloads over IPv4 and IPv6,
  downloads aborted midway with FIN and with RST, unknown names, garbage and
  silent connections, TLS handshakes without a request, channels refused by
  an unreachable --route endpoint) and after a client restart, the
  gateway's and the client's /proc/PID/fd counts return to their baseline
  (polled until they settle).

Every scenario runs with --io uring and --io epoll on the gateway and the
client; the processes' logs must hold no sanitizer report.
"""

import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syslib as sl  # noqa: E402

TMP = sl.el.tmpdir()
CERT, KEY = sl.make_cert(TMP)
DOCROOT = os.path.join(TMP, "www")
BIG = 64 * sl.MiB
FILES = sl.make_files(DOCROOT, [65536, BIG])
BIGP = "/%d.bin" % BIG
NGINX = sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT)
CTX = sl.ssl_context(CERT)
FAST_BOUND = 30.0
FIGURES = []


def get_ok(host, port, path, dev="127.0.0.1", timeout=30.0):
    res = sl.https_get(host, port, path, CTX, host=dev, timeout=timeout)
    sl.expect_file(res, FILES, path)
    return res


def slow_readers(version, cipher):
    def run(io):
        host = sl.name("slow-v%d-%s-%s" % (version, cipher, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io))
            cl = g.add(sl.Client(io, gw.server, NGINX.addr(),
                                 sl.token_file(TMP, host, version=version, cipher=cipher)))
            cl.wait_connected()
            unloaded = get_ok(host, gw.sni_port, BIGP)

            # A: reads 256 KiB, then nothing until the fast download is done.
            stalled = sl.HttpsConn(host, gw.sni_port, CTX, rcvbuf=65536, timeout=60)
            stalled.connect().request(BIGP).head()
            stalled.body(limit=256 * 1024)
            # B: 16 KiB every 20 ms (~0.8 MiB/s) until told to hurry.
            trickle = sl.HttpsConn(host, gw.sni_port, CTX, rcvbuf=65536, timeout=60)
            trickle.connect().request(BIGP).head()
            hurry = threading.Event()
            trickle_err = []

            def trickle_reader():
                try:
                    while not hurry.is_set():
                        if trickle.body(limit=16384, chunk=16384):
                            return
                        time.sleep(0.02)
                    trickle.body()
                except Exception as e:  # noqa: BLE001 - checked below
                    trickle_err.append(e)

            th = threading.Thread(target=trickle_reader, daemon=True)
            th.start()
            time.sleep(1.0)                 # the queues behind A and B fill up
            try:
                fast = get_ok(host, gw.sni_port, BIGP, timeout=FAST_BOUND)
                assert fast.seconds < FAST_BOUND, \
                    "fast download took %.1f s next to slow readers" % fast.seconds
                at_fast = (stalled.got, trickle.got)
                hurry.set()
                t0 = time.monotonic()
                assert stalled.body(), "stalled body incomplete"
                th.join(60)
                assert not th.is_alive() and not trickle_err, trickle_err
                drain = time.monotonic() - t0
            finally:
                hurry.set()
                stalled.close()
                trickle.close()
            for c, what in ((stalled, "stalled"), (trickle, "trickling")):
                assert (c.status, c.got, c.digest()) == (200, BIG, FILES[BIGP][1]), \
                    "%s reader: status %s, %d bytes, sha %s" % (what, c.status, c.got,
                                                                c.digest()[:16])
            fig = ("slow readers v%d %s [%s]: fast 64 MiB in %.2f s next to them (%.0f MiB/s) "
                   "vs %.2f s unloaded (%.0f MiB/s); meanwhile the stalled one had %.1f MiB, "
                   "the trickling one %.1f MiB; both drained in %.2f s"
                   % (version, cipher, io, fast.seconds, fast.mbps(), unloaded.seconds,
                      unloaded.mbps(), at_fast[0] / sl.MiB, at_fast[1] / sl.MiB, drain))
            FIGURES.append(fig)
            sl.report(fig)
            assert cl.disconnected_count() == 0, "tunnel dropped"
            assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0
            # the gateway's queue toward the stalled device crossed its high
            # watermark: PAUSE on protocol >= 1, never on protocol 0
            pauses = gw.wait_metric("snitun_frames_sent_total",
                                    (lambda v: v >= 1) if version else (lambda v: False),
                                    timeout=5 if version else 1.5, labels={"type": "pause"})
            assert (pauses >= 1) if version else (pauses == 0), "PAUSE frames sent: %s" % pauses
    return run


# ---- fd leak ---------------------------------------------------------------------

def rst_close(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def aborted_download(host, port, dev, rst):
    c = sl.HttpsConn(host, port, CTX, host=dev, timeout=30)
    c.connect().request(BIGP).head()
    c.body(limit=sl.MiB)
    if rst:
        rst_close(c.sock)
        c.sock = None
    c.close()


def raw_conn(port, dev, payload):
    s = sl.el.connect(dev, port)
    if payload:
        s.sendall(payload)
    time.sleep(0.05)
    s.close()


def handshake_only(host, port, dev):
    c = sl.HttpsConn(host, port, CTX, host=dev, timeout=30)
    c.connect()
    c.close()


def expect_refused(host, port, dev):
    sl.refused(host, port, CTX, host=dev)


def fd_leak(io):
    host, dead = sl.name("fd-%s" % io), sl.name("fd-dead-%s" % io)
    closed_port = sl.free_port()            # nothing listens there
    with sl.Group() as g:
        gw = g.add(sl.Gateway(io, mode="single", threads=2,
                              extra=["--max-handshakes-per-ip", "0"]))
        tok = sl.token_file(TMP, host, [dead])
        route = ["--route", "%s=127.0.0.1:%d" % (dead, closed_port)]
        cl = g.add(sl.Client(io, gw.server, NGINX.addr(), tok, extra=route))
        cl.wait_connected()
        for dev in ("127.0.0.1", "::1"):
            get_ok(host, gw.sni_port, "/65536.bin", dev)
        expect_refused(dead, gw.sni_port, "127.0.0.1")
        base_gw, base_cl = sl.settle_fds(gw.pid), sl.settle_fds(cl.pid)
        p = gw.sni_port
        jobs = []
        for i in range(60):
            dev = "::1" if i % 2 else "127.0.0.1"
            jobs.append(lambda dev=dev: get_ok(host, p, "/65536.bin", dev))
        for i in range(8):
            jobs.append(lambda i=i: aborted_download(host, p, "::1" if i % 2 else "127.0.0.1",
                                                     rst=i < 4))
        for i in range(10):
            jobs.append(lambda: expect_refused(sl.name("nobody"), p, "127.0.0.1"))
            jobs.append(lambda: expect_refused(dead, p, "::1"))
            jobs.append(lambda: raw_conn(p, "127.0.0.1", b"GET / HTTP/1.0\r\n\r\n"))
            jobs.append(lambda: raw_conn(p, "::1", b""))
            jobs.append(lambda: raw_conn(p, "127.0.0.1", b"\x16\x03\x01\x00"))  # cut hello
        for i in range(5):
            jobs.append(lambda: handshake_only(host, p, "127.0.0.1"))
        peak = [0, 0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], gw.fds())
                    peak[1] = max(peak[1], cl.fds())
                except OSError:
                    pass
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            results = sl.parallel(jobs, workers=32)
        finally:
            stop.set()
            th.join(5)
        errs = sl.errors(results)
        assert not errs, "%d of %d jobs failed, first: %r" % (len(errs), len(jobs), errs[0])
        n_gw = sl.settle_fds(gw.pid, target=base_gw)
        n_cl = sl.settle_fds(cl.pid, target=base_cl)
        sl.report("fds [%s]: gateway %d at rest, %d at peak, %d after; client %d, %d, %d"
                  % (io, base_gw, peak[0], n_gw, base_cl, peak[1], n_cl))
        assert n_gw == base_gw, "gateway fds %d -> %d:\n%s" % (base_gw, n_gw,
                                                               "\n".join(sl.fd_list(gw.pid)))
        assert n_cl == base_cl, "client fds %d -> %d:\n%s" % (base_cl, n_cl,
                                                              "\n".join(sl.fd_list(cl.pid)))
        assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0
        assert cl.disconnected_count() == 0

        # a client restart: the gateway drops the old tunnel's fd
        cl.stop()
        cl2 = g.add(sl.Client(io, gw.server, NGINX.addr(), tok, extra=route))
        cl2.wait_connected()
        get_ok(host, gw.sni_port, "/65536.bin")
        n_gw = sl.settle_fds(gw.pid, target=base_gw)
        assert n_gw == base_gw, "gateway fds after a client restart %d -> %d:\n%s" % (
            base_gw, n_gw, "\n".join(sl.fd_list(gw.pid)))


def main():
    r = sl.Runner()
    try:
        for io in sl.engines():
            for version, cipher in ((2, "aes-cbc"), (1, "aes-gcm"), (0, "aes-cbc")):
                r.run("slow readers do not stall a fast one, v%d %s [%s]" % (version, cipher, io),
                      slow_readers(version, cipher), io)
            r.run("fd counts return to baseline [%s]" % io, fd_leak, io)
    finally:
        NGINX.stop()
    print("figures:")
    for f in FIGURES:
        print("  " + f)
    sl.el.rmtree(TMP)
    r.finish()


if __name__ == "__main__":
    main()
