"""tests/e2e/test_system_reconnect.py - `snitun client` reconnecting, with
real processes on both ends (snitun server, nginx, TLS devices):

* gateway restarted: killed (SIGKILL; a download in flight ends at the
  device), then in a second round stopped with SIGTERM, which drains
  (listeners closed at once, an in-flight 64 MiB download finishes intact,
  then exit 0); each time a new gateway starts on the same ports and the
  client reconnects by itself within its backoff bound (--backoff-min 1
  --backoff-max 2: at most 2 s after the new gateway listens, plus slack)
  and serves again; the reconnect time is printed; the client's fd count
  is back at its baseline after each reconnect (the endpoint connection of
  the dead tunnel's channel is closed); one --token-command run (aes-gcm:
  fresh key) per connection attempt;
* token renewal: tokens from --token-command are valid for 3 s; the gateway
  closes the tunnel at expiry, the client runs the command again (counted in
  a file) and reconnects with the fresh token: twice with aes-gcm (a fresh
  key for every connection, protocol 2), once with aes-cbc (protocol 1).

Every scenario runs with --io uring and --io epoll on the gateway and the
client; the processes' logs must hold no sanitizer report.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syslib as sl  # noqa: E402

TMP = sl.el.tmpdir()
CERT, KEY = sl.make_cert(TMP)
DOCROOT = os.path.join(TMP, "www")
BIGP = "/%d.bin" % (64 * sl.MiB)
FILES = sl.make_files(DOCROOT, [65536, 64 * sl.MiB])
NGINX = sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT)
CTX = sl.ssl_context(CERT)
PATH = "/65536.bin"
BACKOFF_MAX = 2.0
SLACK = 3.0 if sl.ASAN else 2.0
FIGURES = []


def get_ok(host, port, dev="127.0.0.1"):
    res = sl.https_get(host, port, PATH, CTX, host=dev)
    sl.expect_file(res, FILES, PATH)


def wait_serving(host, port, timeout):
    """Poll a GET through the gateway until it succeeds; seconds taken."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        try:
            get_ok(host, port)
            return time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
            time.sleep(0.05)
    raise AssertionError("not serving within %.1f s: %r" % (timeout, last))


def listener_closed(host, port, timeout):
    """Poll until connecting to host:port is refused (the log line comes
    from main; the shards close their listeners right after)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            sl.el.connect(host, port, timeout=2).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def gateway_restart(io):
    host = sl.name("restart-%s" % io)
    counter = os.path.join(TMP, "restart-count-%s" % io)
    with sl.Group() as g:
        gw = g.add(sl.Gateway(io))
        cl = g.add(sl.Client(io, gw.server, NGINX.addr(),
                             sl.token_command(counter, host, cipher="aes-gcm"),
                             extra=["--backoff-min", "1", "--backoff-max", "%g" % BACKOFF_MAX]))
        cl.wait_connected()
        get_ok(host, gw.sni_port)
        base_cl = sl.settle_fds(cl.pid)
        for rnd, how in enumerate(("SIGKILL", "SIGTERM"), start=2):
            disc = cl.disconnected_count()
            # a download in flight when the gateway goes away
            inflight = sl.HttpsConn(host, gw.sni_port, CTX, rcvbuf=65536, timeout=10)
            inflight.connect().request(BIGP).head()
            inflight.body(limit=256 * 1024)
            t_kill = time.monotonic()
            try:
                if how == "SIGKILL":
                    gw.kill()               # the device's connection dies with it
                    try:
                        inflight.body()
                        raise AssertionError("64 MiB body complete after the gateway died")
                    except (sl.HttpError, OSError):
                        pass
                else:
                    # drain: listeners closed, the open channel finishes
                    gw.send_signal(signal.SIGTERM)
                    gw.signalled = True
                    assert gw.wait_log(r"msg=\"?draining", timeout=5), "no drain"
                    for dev in ("127.0.0.1", "::1"):
                        assert listener_closed(dev, gw.sni_port, 3.0), \
                            "listener %s still open 3 s into the drain" % dev
                    assert inflight.body(), "in-flight body cut by the drain"
                    assert (inflight.got, inflight.digest()) == FILES[BIGP], \
                        "in-flight body damaged during the drain"
                    assert gw.stop() == 0
            finally:
                inflight.close()
            assert cl.wait_log(r"msg=\"?disconnected\b", timeout=5, count=disc + 1), \
                "client did not notice the gateway going away"
            time.sleep(0.5)                 # down for a moment: a refused attempt or two
            gw = g.add(gw.restart())
            t_up = time.monotonic()
            cl.wait_connected(count=rnd, timeout=BACKOFF_MAX + SLACK + 5)
            t_conn = time.monotonic()
            serve = wait_serving(host, gw.sni_port, 5)
            # the dead tunnel's endpoint connection is gone
            n_cl = sl.settle_fds(cl.pid, target=base_cl)
            assert n_cl == base_cl, "client fds %d -> %d after the reconnect:\n%s" % (
                base_cl, n_cl, "\n".join(sl.fd_list(cl.pid)))
            fig = ("gateway %s [%s]: client reconnected %.2f s after the new gateway was up "
                   "(%.2f s after the old one was told to go), first request served %.2f s "
                   "later" % (how, io, t_conn - t_up, t_conn - t_kill, serve))
            FIGURES.append(fig)
            sl.report(fig)
            assert t_conn - t_up <= BACKOFF_MAX + SLACK, \
                "reconnect took %.2f s (backoff bound %.0f s)" % (t_conn - t_up, BACKOFF_MAX)
            assert "token_used" not in cl.text() and "gcm_key_used" not in cl.text()
        assert cl.stop() == 0               # the counts below are final now
        assert sl.read_counter(counter) == cl.count(r"msg=\"?connecting\b"), \
            "one token command run per connection attempt"


def token_renewal(cipher, version, conns):
    def run(io):
        host = sl.name("renew-%s-%s" % (cipher, io))
        counter = os.path.join(TMP, "renew-count-%s-%s" % (cipher, io))
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io))
            cl = g.add(sl.Client(io, gw.server, NGINX.addr(),
                                 sl.token_command(counter, host, version=version, cipher=cipher,
                                                  valid_for=3),
                                 extra=["--backoff-min", "1", "--backoff-max", "2"]))
            cl.wait_connected()
            get_ok(host, gw.sni_port)
            t0 = time.monotonic()
            for n in range(2, conns + 1):
                assert gw.wait_log("token expired, closing tunnel", timeout=8, count=n - 1), \
                    "the gateway did not close the tunnel at expiry"
                cl.wait_connected(count=n, timeout=8)
                get_ok(host, gw.sni_port)
                get_ok(host, gw.sni_port, "::1")
            assert cl.stop() == 0           # the counts below are final now
            runs = sl.read_counter(counter)
            sl.report("token renewal %s [%s]: %d connections in %.1f s, %d token command runs"
                      % (cipher, io, conns, time.monotonic() - t0, runs))
            assert runs >= conns, "token command ran %d times for %d connections" % (runs, conns)
            assert runs == cl.count(r"msg=\"?connecting\b")
            tunnels = [l for l in gw.text().splitlines() if "tunnel up" in l]
            valids = [l.split("valid=")[1].split()[0] for l in tunnels]
            expired = gw.count(r"tunnel down\"? .*reason=expired")
            assert expired >= conns - 1, "%d tunnels closed as expired" % expired
            assert len(tunnels) >= conns and len(set(valids)) == len(tunnels), \
                "tokens were not renewed: %s" % valids
    return run


def main():
    r = sl.Runner()
    try:
        for io in sl.engines():
            r.run("gateway killed and restarted, client reconnects [%s]" % io,
                  gateway_restart, io)
            for cipher, version, conns in (("aes-gcm", 2, 3), ("aes-cbc", 1, 2)):
                r.run("token expiry and renewal via --token-command %s [%s]" % (cipher, io),
                      token_renewal(cipher, version, conns), io)
    finally:
        NGINX.stop()
    print("figures:")
    for f in FIGURES:
        print("  " + f)
    sl.el.rmtree(TMP)
    r.finish()


if __name__ == "__main__":
    main()
