#!/usr/bin/env python3
"""The admin listener (/healthz, /readyz, /metrics) cannot be held by idle
or trickling connections for longer than its deadline (io/admin.h:
"Connection limits"; 2.5 s from accept, libmicrohttpd's 3 s idle timeout
as the backstop), so a Kubernetes probe never sees a healthy pod as dead.

`snitun server` (both engines; the admin listener runs on its own thread,
so the engine should not matter, which is what is checked):
- 32 idle TCP connections from 127.0.0.1: 8 are held (the per-IP share),
  24 are closed at once; /healthz and /metrics from another address answer
  at once; from 127.0.0.1 itself, /healthz answers within the deadline
  + 1 s of the idle connections' arrival; every idle connection is closed
  by then; snitun_admin_connections_dropped_total counts exactly 24
  "limit" and 8 "deadline"; the refusal log lines are rate-limited;
- meanwhile a client trickling a request header (a byte every 200 ms,
  never idle) is cut at the deadline and counted;
- every slot taken (64 connections from 8 addresses): a probe from a
  ninth address is answered as soon as the slots free up, within the
  deadline + 1 s.
`snitun client`: the same counter on its own admin listener.
No sanitizer report in any process's output. About 15 s.
"""

import http.client
import os
import re
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import advlib as A  # noqa: E402
import e2elib as L  # noqa: E402

DEADLINE = 2.5   # io/admin.c ADMIN_DEADLINE_MS
SLACK = 1.0
DROPS = "snitun_admin_connections_dropped_total"


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def get(port, path, src="127.0.0.2", timeout=5):
    """GET from source address src: (status, body), or (None, None) when
    the connection is closed without an answer (refused)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(src, 0))
    try:
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        return r.status, r.read().decode()
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return None, None
    finally:
        c.close()


def get_retrying(port, path, src, limit):
    """Seconds until GET path answers 200 (refused attempts retried)."""
    t0 = time.time()
    while time.time() - t0 < limit:
        st, _ = get(port, path, src)
        if st == 200:
            return time.time() - t0
        check(st is None, "%s answered %s" % (path, st))
        time.sleep(0.05)
    raise AssertionError("%s from %s not answered within %.1fs" % (path, src, limit))


def drops(port, src="127.0.0.2"):
    st, body = get(port, "/metrics", src)
    check(st == 200, "/metrics status %s" % st)
    out = {}
    for reason in ("limit", "deadline", "other"):
        m = re.search(r'^%s\{reason="%s"\} (\S+)$' % (DROPS, reason), body, re.M)
        check(m, "%s{reason=%s} missing" % (DROPS, reason))
        out[reason] = float(m.group(1))
    return out


def idle_from(src, port, n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def closed(s, wait):
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def trickle(port, result):
    """A request header, one more byte every 200 ms: time until cut."""
    s = socket.socket()
    s.bind(("127.0.0.3", 0))
    s.connect(("127.0.0.1", port))
    t0 = time.time()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        while time.time() - t0 < DEADLINE + SLACK + 2:
            if closed(s, 0.2):
                break
            s.sendall(b"a")
    except (BrokenPipeError, ConnectionResetError):
        pass
    result.append(time.time() - t0)
    s.close()


def hold(port, who):
    base = drops(port)
    nlog = who.text().count("admin connection refused")
    tr = []
    th = threading.Thread(target=trickle, args=(port, tr))
    th.start()
    t0 = time.time()
    socks = idle_from("127.0.0.1", port, 32)
    time.sleep(0.3)
    gone = [s for s in socks if closed(s, 0.05)]
    check(len(gone) == 24, "%d of 32 idle connections closed at once, want 24" % len(gone))
    for path in ("/healthz", "/metrics", "/readyz"):
        took = get_retrying(port, path, "127.0.0.2", 1.0)
        check(took < 0.5, "%s from another address took %.2fs" % (path, took))
    get_retrying(port, "/healthz", "127.0.0.1", DEADLINE + SLACK)
    took = time.time() - t0
    check(took <= DEADLINE + SLACK, "/healthz from 127.0.0.1 after %.2fs" % took)
    for s in socks:
        check(closed(s, max(0.1, t0 + DEADLINE + SLACK - time.time())),
              "an idle connection still open after %.2fs" % (time.time() - t0))
        s.close()
    th.join()
    check(tr and DEADLINE - 0.2 <= tr[0] <= DEADLINE + 0.6,
          "trickling client cut after %s s" % tr)
    d = drops(port)
    check(d["deadline"] - base["deadline"] == 9, "deadline drops +%g, want +9 (8 idle + 1 slow)"
          % (d["deadline"] - base["deadline"]))
    # 24 at once, plus the retries from 127.0.0.1 while its share was full
    check(d["limit"] - base["limit"] >= 24, "limit drops +%g" % (d["limit"] - base["limit"]))
    # at most 5 lines a second (io/admin.c ADMIN_LOG_BURST), the rest counted
    lines = who.text().count("admin connection refused") - nlog
    most = 5 * (int(time.time() - t0) + 2)
    check(1 <= lines <= most and lines < d["limit"] - base["limit"],
          "%d refusal lines for %g refusals in %.1fs: not rate-limited?"
          % (lines, d["limit"] - base["limit"], time.time() - t0))
    check("suppressed=" in who.text(), "no suppressed= count on a refusal line")


def full_house(port):
    base = drops(port)
    socks = []
    t0 = time.time()
    for i in range(8):
        socks += idle_from("127.0.1.%d" % (i + 1), port, 8)
    time.sleep(0.3)
    check(not any(closed(s, 0.01) for s in socks), "a connection under the limits was refused")
    get_retrying(port, "/metrics", "127.0.2.1", DEADLINE + SLACK)
    took = time.time() - t0
    check(DEADLINE - 0.3 <= took <= DEADLINE + SLACK,
          "answered %.2fs after the slots were taken, want the deadline (%.1fs)" % (took, DEADLINE))
    for s in socks:
        check(closed(s, 1.0), "a connection still open")
        s.close()
    d = drops(port)
    check(d["deadline"] - base["deadline"] == 64, "deadline drops +%g, want +64"
          % (d["deadline"] - base["deadline"]))


def gateway(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io)
    try:
        hold(gw.admin_port, gw)
        full_house(gw.admin_port)
        st, body = get(gw.admin_port, "/readyz")
        check(st == 200 and body == "ready\n", "readyz %s %r" % (st, body))
    finally:
        rc = gw.stop()
        A.check_no_sanitizer(gw)
        check(rc == 0, "gateway exit status %s" % rc)


def client():
    gport = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % gport)], admin=False)
    cl = A.Client("127.0.0.1:%d" % gport, "127.0.0.1:%d" % L.free_port(), "hold.example")
    try:
        L.wait_port("127.0.0.1", cl.admin_port, proc=cl.p)
        base = drops(cl.admin_port)
        socks = idle_from("127.0.0.1", cl.admin_port, 10)
        time.sleep(0.3)
        check(sum(closed(s, 0.05) for s in socks) == 2, "2 of 10 refused")
        took = get_retrying(cl.admin_port, "/healthz", "127.0.0.2", 1.0)
        check(took < 0.5, "client /healthz took %.2fs" % took)
        d = drops(cl.admin_port)
        check(d["limit"] - base["limit"] == 2, "client limit drops +%g"
              % (d["limit"] - base["limit"]))
        for s in socks:
            s.close()
    finally:
        rc = cl.stop()
        A.check_no_sanitizer(cl)
        check(rc == 0, "client exit status %s" % rc)
        rc = gw.stop()
        A.check_no_sanitizer(gw)
        check(rc == 0, "gateway exit status %s" % rc)


def main():
    r = L.Runner()
    for io in L.engines():
        r.run("%s: admin probes answered through idle, trickling and full-house holds" % io,
              gateway, io)
    r.run("client: admin listener refuses beyond its per-IP share, counted", client)
    r.finish()


if __name__ == "__main__":
    main()
