#!/usr/bin/env python3
"""The tunnel over a bad network (both engines).

Two network namespaces made by this test: G (the gateway and the devices)
and C (the client, nginx as its endpoint and a hashing sink). They are
joined by a veth pair impaired in both directions with
`tc qdisc add dev X root netem delay 40ms loss 1%` (addresses 10.203.0.1/30
and 10.203.0.2/30 exist only inside these namespaces). Where the kernel
has no netem qdisc, the same impairment is applied by a small userspace
forwarder instead: a TUN device in each namespace, packets copied between
them with a 40 ms delay and 1% random loss in both directions (mode
printed). Only the tunnel (client -> gateway TCP connection) crosses the
impaired link; device and endpoint connections stay on each namespace's
loopback.

Per engine: an 8 MiB download (endpoint -> device) and an 8 MiB upload
(device -> endpoint) run at the same time through the tunnel and arrive
intact (sha256); the tunnel survives (the client never reconnects, the
gateway still lists one tunnel) and serves one more request afterwards.
Throughput and the forwarder's drop count are printed.

Skipped, with a "0 passed, 0 failed, 1 skipped" line, only where the
namespaces cannot be made (no CAP_NET_ADMIN) or neither netem nor
/dev/net/tun is available. Namespaces are removed in every case (finally
and atexit).
"""

import atexit
import ctypes
import fcntl
import hashlib
import heapq
import multiprocessing
import os
import random
import select
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import advlib as A  # noqa: E402
import e2elib as L  # noqa: E402

# case name (without the "<engine>: " prefix) -> one-line description
EXPECTED_BUGS = {
}

NS_G = "snitun-e2e-g-%d" % os.getpid()
NS_C = "snitun-e2e-c-%d" % os.getpid()
IP_G, IP_C = "10.203.0.1", "10.203.0.2"
NAME = "netem.adv.example"
SINK = "sink.netem.adv.example"
SIZE = 8 << 20
GW_PORT, ADMIN_PORT, EP_PORT, SINK_PORT = 8443, 9100, 9443, 9444
DELAY, LOSS = 0.040, 0.01
check = A.check


def sh(*argv, check_rc=True):
    r = subprocess.run(argv, capture_output=True, text=True)
    if check_rc and r.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(argv), r.stderr.strip()))
    return r


def in_ns(ns):
    return ["ip", "netns", "exec", ns]


# ---- namespaces and the impaired link --------------------------------------------------

CLEANUP = []


def cleanup():
    while CLEANUP:
        fn = CLEANUP.pop()
        try:
            fn()
        except Exception:  # noqa: BLE001 - best effort, keep going
            pass


atexit.register(cleanup)


def make_namespaces():
    for ns in (NS_G, NS_C):
        sh("ip", "netns", "add", ns)
        CLEANUP.append(lambda ns=ns: sh("ip", "netns", "del", ns, check_rc=False))
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def veth_netem():
    """veth pair with netem on both ends; False when netem is missing."""
    sh("ip", "link", "add", "snv-g", "netns", NS_G, "type", "veth", "peer", "name", "snv-c",
       "netns", NS_C)
    ok = True
    for ns, dev, ip, peer in ((NS_G, "snv-g", IP_G, IP_C), (NS_C, "snv-c", IP_C, IP_G)):
        sh("ip", "-n", ns, "addr", "add", ip + "/30", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        qd = ["netem", "delay", "%dms" % int(DELAY * 1000), "loss", "%g%%" % (LOSS * 100)]
        # (checking this path on a kernel without netem: another qdisc)
        qd = os.environ.get("SNITUN_NETEM_QDISC", "").split() or qd
        r = sh(*in_ns(ns), "tc", "qdisc", "add", "dev", dev, "root", *qd, check_rc=False)
        if r.returncode != 0:
            ok = False
            break
    if not ok:
        sh("ip", "-n", NS_G, "link", "del", "snv-g", check_rc=False)
    return ok


CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


def forwarder(stop, stats, ready):
    """Runs in a child process: a TUN device in each namespace, packets
    copied between them after DELAY, LOSS of them dropped."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = []
    for ns, dev in ((NS_G, "snt-g"), (NS_C, "snt-c")):
        nfd = os.open("/var/run/netns/" + ns, os.O_RDONLY)
        if libc.setns(nfd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev.encode(), IFF_TUN | IFF_NO_PI))
        fds.append(fd)
        os.close(nfd)
        libc.setns(home, CLONE_NEWNET)
    ready.set()
    a, b = fds
    heap, seq = [], 0
    rnd = random.Random(1)
    while not stop.is_set():
        now = time.monotonic()
        wait = min(0.05, max(0.0, heap[0][0] - now)) if heap else 0.05
        r, _, _ = select.select(fds, [], [], wait)
        now = time.monotonic()
        for fd in r:
            try:
                pkt = os.read(fd, 65536)
            except OSError:
                continue
            with stats.get_lock():
                stats[0] += 1
                if rnd.random() < LOSS:
                    stats[1] += 1
                    continue
            seq += 1
            heapq.heappush(heap, (now + DELAY, seq, b if fd == a else a, pkt))
        while heap and heap[0][0] <= time.monotonic():
            _, _, dst, pkt = heapq.heappop(heap)
            try:
                os.write(dst, pkt)
            except OSError:
                pass


def tun_forwarder():
    if not os.path.exists("/dev/net/tun"):
        return None
    ctx = multiprocessing.get_context("fork")
    stop, ready = ctx.Event(), ctx.Event()
    stats = ctx.Array("q", 2)
    p = ctx.Process(target=forwarder, args=(stop, stats, ready), daemon=True)
    p.start()

    def end():
        stop.set()
        p.join(5)
        if p.is_alive():
            p.terminate()
    CLEANUP.append(end)
    if not ready.wait(5):
        return None
    for ns, dev, ip, peer in ((NS_G, "snt-g", IP_G, IP_C), (NS_C, "snt-c", IP_C, IP_G)):
        sh("ip", "-n", ns, "addr", "add", ip, "peer", peer + "/30", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    return stats


# ---- processes in the namespaces -------------------------------------------------------

SINK_SRC = r"""
import hashlib, socket, sys
size = int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(8)
def exact(c, n):
    out = b""
    while len(out) < n:
        b = c.recv(n - len(out))
        if not b:
            raise EOFError
        out += b
    return out
while True:
    c, _ = srv.accept()
    hdr = exact(c, 5)                          # the ClientHello record: skip it
    exact(c, int.from_bytes(hdr[3:5], "big"))
    h, n = hashlib.sha256(), 0
    while n < size:
        b = c.recv(1 << 20)
        if not b:
            break
        h.update(b); n += len(b)
    c.sendall(h.hexdigest().encode())
    c.close()
"""


def gw_metrics():
    r = sh(*in_ns(NS_G), "curl", "-s", "--max-time", "5",
           "http://127.0.0.1:%d/metrics" % ADMIN_PORT, check_rc=False)
    return A.parse_metrics(r.stdout)


def run_engine(io, sh_files):
    gw = L.Proc(in_ns(NS_G) + [L.BIN, "server", "--io", io, "--threads", "2", "--log-level",
                               "debug", "--fernet-key", L.K1, "--listen",
                               "0.0.0.0:%d" % GW_PORT, "--admin-listen",
                               "127.0.0.1:%d" % ADMIN_PORT], "snitun-gw-netem")
    procs = [gw]
    try:
        A.wait_listen(gw, GW_PORT)
        A.wait_listen(gw, ADMIN_PORT)
        cl = A.Client("%s:%d" % (IP_G, GW_PORT), "127.0.0.1:%d" % EP_PORT, NAME, io=io,
                      aliases=[SINK], routes=[(SINK, "127.0.0.1:%d" % SINK_PORT)], admin=False,
                      prefix=in_ns(NS_C), connect_timeout=10)
        procs.insert(0, cl)
        cl.wait_connected(timeout=20)
        res = {}
        up = os.urandom(SIZE)

        def upload():
            s = subprocess.run(in_ns(NS_G) + [sys.executable, "-c", UPLOAD_SRC, str(GW_PORT),
                                              SINK, str(SIZE)], input=up, capture_output=True,
                               timeout=120)
            res["up"] = (s.returncode, s.stdout.decode().strip(), s.stderr.decode()[-300:])

        th = threading.Thread(target=upload, daemon=True)
        t0 = time.time()
        th.start()
        dl = A.curl_get(NAME, GW_PORT, "f8", sh_files.cert, timeout=120, prefix=in_ns(NS_G))
        th.join(130)
        took = time.time() - t0
        check(dl["rc"] == 0 and dl["sha256"] == sh_files.sha,
              "download over the impaired link: rc %s, %d bytes, %s" % (
                  dl["rc"], dl["size"], dl["err"]))
        check("up" in res, "upload did not finish")
        rc, digest, err = res["up"]
        check(rc == 0 and digest == hashlib.sha256(up).hexdigest(),
              "upload over the impaired link: rc %s, %r %s" % (rc, digest, err))
        print("     %s: 8 MiB down at %.2f MiB/s and 8 MiB up in %.1fs together, intact" % (
            io, A.mib_s(dl["size"], dl["seconds"]), took), flush=True)
        check(cl.connected() == 1, "the tunnel was re-established %d times" % (
            cl.connected() - 1))
        m = gw_metrics()
        check(m.get("snitun_tunnels_connected") == 1, "gateway lists %s tunnels" % m.get(
            "snitun_tunnels_connected"))
        again = A.curl_get(NAME, GW_PORT, "f8", sh_files.cert, timeout=120, prefix=in_ns(NS_G))
        check(again["rc"] == 0 and again["sha256"] == sh_files.sha, "a further request")
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            A.check_no_sanitizer(p)
    check(gw.p.returncode == 0, "gateway exit status %s" % gw.p.returncode)


UPLOAD_SRC = r"""
import socket, sys
sys.path.insert(0, %r)
import advlib as A
port, name, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data = sys.stdin.buffer.read()
s = socket.create_connection(("127.0.0.1", port), timeout=100)
s.sendall(A.client_hello(name.encode()) + data)
out = b""
while len(out) < 64:
    b = s.recv(64)
    if not b:
        break
    out += b
sys.stdout.write(out.decode())
""" % os.path.dirname(os.path.abspath(__file__))


class Files:
    def __init__(self):
        self.dir = L.tmpdir()
        self.cert, self.key = L.make_cert(self.dir, [NAME])
        self.www = os.path.join(self.dir, "www")
        os.makedirs(self.www)
        body = os.urandom(SIZE)
        with open(os.path.join(self.www, "f8"), "wb") as f:
            f.write(body)
        self.sha = hashlib.sha256(body).hexdigest()
        os.chmod(self.dir, 0o755)


def main():
    r = A.Runner(EXPECTED_BUGS)
    if os.geteuid() != 0:
        r.skip("netem", "needs CAP_NET_ADMIN (run as root) to make network namespaces")
        r.finish()
    files = Files()
    CLEANUP.append(lambda: L.rmtree(files.dir))
    try:
        try:
            make_namespaces()
        except RuntimeError as e:
            r.skip("netem", "cannot make network namespaces: %s" % e)
            return
        stats = None
        if veth_netem():
            mode = "veth + tc %s on both ends" % (os.environ.get("SNITUN_NETEM_QDISC") or
                                                    "netem delay 40ms loss 1%")
        else:
            stats = tun_forwarder()
            if stats is None:
                r.skip("netem", "no netem qdisc and no /dev/net/tun")
                return
            mode = ("no netem qdisc in this kernel: TUN pair with a userspace forwarder, "
                    "delay 40ms loss 1% both ways")
        print("     link: " + mode, flush=True)
        ep = A.Nginx(files.dir, files.cert, files.key, files.www, port=EP_PORT,
                     prefix=in_ns(NS_C))
        sink = L.Proc(in_ns(NS_C) + [sys.executable, "-c", SINK_SRC, str(SINK_PORT), str(SIZE)],
                      "sink")
        CLEANUP.append(ep.stop)
        CLEANUP.append(sink.stop)
        A.wait_listen(sink, SINK_PORT)
        for io in L.engines():
            r.run("%s: 8 MiB each way over a lossy, slow link; tunnel survives" % io,
                  run_engine, io, files)
        if stats is not None:
            print("     forwarder: %d packets, %d dropped (%.2f%%)" % (
                stats[0], stats[1], 100.0 * stats[1] / max(stats[0], 1)), flush=True)
    finally:
        cleanup()
        left = sh("ip", "netns", "list", check_rc=False).stdout
        if NS_G in left or NS_C in left:
            print("warning: namespaces left behind: " + left, flush=True)
        r.finish()


if __name__ == "__main__":
    main()
