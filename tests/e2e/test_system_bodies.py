# snitun-test: cpu-heavy (moves real load: runs alone under ctest -j)
"""tests/e2e/test_system_bodies.py - whole system, bodies and listener modes.

device (curl / Python ssl) --TLS--> snitun server ==tunnel== snitun client
--> nginx, all real processes on loopback:

* bodies of 1 B, 64 KiB and 64 MiB arrive intact (sha256) for protocol 0,
  1 and 2 with aes-cbc and aes-gcm (64 MiB for v2 aes-cbc and v0 aes-gcm;
  MiB/s through the tunnel and direct to nginx are printed, not asserted);
* single-port and dual-port gateway layouts, with IPv4 (127.0.0.1) and
  IPv6 ([::1]) devices (1 B, 64 KiB; 64 MiB over IPv6 in single-port mode),
  the tunnel itself over IPv4 (dual) or IPv6 (single);
* the client on another engine than the gateway;
* --splice on and off on both ends (auto is the default everywhere else):
  small and 64 MiB bodies intact whichever path moves the payloads.

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
FILES = sl.make_files(DOCROOT, [1, 65536, BIG])
SMALL = ["/1.bin", "/65536.bin"]
BIGP = "/%d.bin" % BIG
NGINX = sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT)
FIGURES = []


def get_py(sni, port, path, host="127.0.0.1"):
    res = sl.https_get(sni, port, path, CERT, host)
    sl.expect_file(res, FILES, path)
    return res


def get_curl(sni, port, path, host="127.0.0.1"):
    rc, code, size, speed, sha, err = sl.curl_get(sni, port, path, CERT,
                                                  os.path.join(TMP, "out.bin"), host)
    want_size, want_sha = FILES[path]
    assert (rc, code, size, sha) == (0, 200, want_size, want_sha), \
        "curl %s via %s:%d: rc %d code %d size %d sha %s (%s)" % (path, host, port, rc, code,
                                                                  size, sha[:16], err)
    return speed / sl.MiB


def direct_speed():
    """curl straight to nginx (no tunnel), for comparison."""
    return get_curl(sl.name("direct"), NGINX.port, BIGP)


def bodies(version, cipher, big):
    def run(io):
        host = sl.name("b%d-%s-%s" % (version, cipher, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io))
            cl = g.add(sl.Client(io, gw.server, NGINX.addr(),
                                 sl.token_file(TMP, host, version=version, cipher=cipher)))
            cl.wait_connected()
            line = [l for l in cl.text().splitlines() if "msg=connected" in l][0]
            assert "protocol=%d" % version in line and "cipher=%s" % cipher in line, line
            for path in SMALL:
                for _ in range(3):
                    get_py(host, gw.sni_port, path)
                get_curl(host, gw.sni_port, path)
            if big:
                tun = get_curl(host, gw.sni_port, BIGP)
                direct = direct_speed()
                pyres = get_py(host, gw.sni_port, BIGP)
                fig = ("64 MiB v%d %s [%s]: curl %.0f MiB/s through the tunnel, %.0f MiB/s direct "
                       "to nginx; python ssl %.0f MiB/s through the tunnel"
                       % (version, cipher, io, tun, direct, pyres.mbps()))
                FIGURES.append(fig)
                sl.report(fig)
            assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0
            assert cl.disconnected_count() == 0, "tunnel dropped during the transfers"
    return run


def modes(mode):
    def run(io):
        host = sl.name("m-%s-%s" % (mode, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io, mode=mode))
            # single port: the tunnel goes over IPv6 to the same port as devices
            server = "[::1]:%d" % gw.peer_port if mode == "single" else gw.server
            cl = g.add(sl.Client(io, server, NGINX.addr(), sl.token_file(TMP, host)))
            cl.wait_connected()
            for dev in ("127.0.0.1", "::1"):
                for path in SMALL:
                    get_py(host, gw.sni_port, path, host=dev)
                    get_curl(host, gw.sni_port, path, host=dev)
            if mode == "single":
                get_py(host, gw.sni_port, BIGP, host="::1")
            up = [l for l in gw.text().splitlines() if "tunnel up" in l]
            assert len(up) == 1 and ("peer=[::1]:" if mode == "single" else "peer=127.0.0.1:") \
                in up[0], up
            n = gw.metric("snitun_channels_opened_total")
            assert n == (9 if mode == "single" else 8), n
    return run


def splice(mode):
    def run(io):
        host = sl.name("spl-%s-%s" % (mode, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io, extra=["--splice", mode]))
            cl = g.add(sl.Client(io, gw.server, NGINX.addr(), sl.token_file(TMP, host),
                                 extra=["--splice", mode]))
            cl.wait_connected()
            start = [l for l in gw.text().splitlines() if "gateway started" in l]
            assert len(start) == 1 and " splice=%s " % mode in start[0], start
            for path in SMALL + [BIGP]:
                get_curl(host, gw.sni_port, path)
            get_py(host, gw.sni_port, BIGP)
            assert gw.wait_metric("snitun_channels_open", lambda v: v == 0) == 0
            assert cl.disconnected_count() == 0, "tunnel dropped during the transfers"
    return run


def mixed(gw_io, cl_io):
    def run():
        host = sl.name("mix-%s-%s" % (gw_io, cl_io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(gw_io))
            cl = g.add(sl.Client(cl_io, gw.server, NGINX.addr(),
                                 sl.token_file(TMP, host, version=1, cipher="aes-gcm")))
            cl.wait_connected()
            for path in SMALL:
                get_py(host, gw.sni_port, path)
                get_py(host, gw.sni_port, path, host="::1")
    return run


def main():
    r = sl.Runner()
    engines = sl.engines()
    try:
        for io in engines:
            for version, cipher in [(0, "aes-cbc"), (1, "aes-cbc"), (2, "aes-cbc"),
                                    (0, "aes-gcm"), (1, "aes-gcm"), (2, "aes-gcm")]:
                big = (version, cipher) in ((2, "aes-cbc"), (0, "aes-gcm"))
                r.run("bodies 1B/64KiB%s v%d %s [%s]" % ("/64MiB" if big else "", version,
                                                         cipher, io),
                      bodies(version, cipher, big), io)
            for mode in ("dual", "single"):
                r.run("%s-port gateway, IPv4 and IPv6 devices [%s]" % (mode, io), modes(mode), io)
            for mode in ("on", "off"):
                r.run("--splice %s on both ends, 64 MiB [%s]" % (mode, io), splice(mode), io)
        if "uring" in engines and "epoll" in engines:
            r.run("gateway uring, client epoll", mixed("uring", "epoll"))
            r.run("gateway epoll, client uring", mixed("epoll", "uring"))
    finally:
        NGINX.stop()
    print("figures:")
    for f in FIGURES:
        print("  " + f)
    sl.el.rmtree(TMP)
    r.finish()


if __name__ == "__main__":
    main()
