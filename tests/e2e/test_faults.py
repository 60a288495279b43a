#!/usr/bin/env python3
# snitun-test: cpu-heavy (moves real load: runs alone under ctest -j)
"""Faults around a working tunnel (both engines): real `snitun server`,
real `snitun client`, nginx as the endpoint, curl / sockets as devices.

* client SIGKILLed mid-transfer: the gateway closes the device connections
  at once (curl ends short, well before any idle timer), the tunnel's
  counters say why, its fds return to the baseline without the tunnel, and
  a new client registers and serves the full body;
* endpoint resetting connections (RST, SO_LINGER 0), before and after
  answering: each channel closes (device sees the close, gateway counts a
  CLOSE from the client), the tunnel stays up and serves a full transfer
  meanwhile, the client never reconnects;
* endpoint that stops reading: a device uploads into it until backpressure
  stops the device (bounded bytes accepted), while a 64 MiB download on
  another channel of the same tunnel completes intact; the client's PAUSE
  is seen by the gateway (frames_received_total{type="pause"});
* client SIGSTOPped longer than the gateway's --tunnel-idle-timeout (3 s):
  the gateway closes the tunnel (devices for the name are then refused),
  after SIGCONT the client notices and reconnects, and serves again;
  while running, its pings (--ping-interval 1) keep the tunnel from idling;
* gateway restarted under load (SIGTERM with --drain-timeout 2, then
  SIGKILL) on the same port: three clients reconnect by themselves and
  serve full transfers again;
* 900 devices that abort (RST after the ClientHello, RST mid-hello, close
  without reading) on two shards while a download runs: no channel left
  open on either side, fds back on both;
* the name registered again and again by a raw tunnel while the real
  client reconnects and devices keep arriving (replacement racing with
  handoffs): the real client ends up serving, nothing leaks.

Each child's output is checked for sanitizer reports (ASan build).
"""

import hashlib
import os
import signal
import socket
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

LEGIT = "legit.faults.example"
RST = "rst.faults.example"
STALL = "stall.faults.example"
NAMES = [LEGIT, "a.faults.example", "b.faults.example", "c.faults.example"]
BIG = 64 << 20
check = A.check


class Shared:
    def __init__(self):
        self.dir = L.tmpdir()
        self.cert, self.key = L.make_cert(self.dir, NAMES)
        self.www = os.path.join(self.dir, "www")
        os.makedirs(self.www)
        body = os.urandom(BIG)
        with open(os.path.join(self.www, "big"), "wb") as f:
            f.write(body)
        self.sha = hashlib.sha256(body).hexdigest()
        self.ng = A.Nginx(self.dir, self.cert, self.key, self.www)

    def close(self):
        self.ng.stop()
        L.rmtree(self.dir)


def full_ok(sh, name, port, what):
    r = A.curl_get(name, port, "big", sh.cert)
    check(r["rc"] == 0 and r["size"] == BIG and r["sha256"] == sh.sha,
          "%s: rc %s, %d bytes, err %s" % (what, r["rc"], r["size"], r.get("err")))
    return r


def start_gw(io, port, extra=()):
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2, extra=list(extra))
    A.wait_settled(gw, 1)
    return gw


def finish(procs):
    """Stop every process (clients first), then check their output."""
    rcs = {}
    for p in procs:
        rcs[p] = p.stop()
    for p in procs:
        A.check_no_sanitizer(p)
    return rcs


def gw_series(gw, name, labels=""):
    return A.snapshot(gw).get(A.series(name, labels), 0)


# ---- endpoints that misbehave ----------------------------------------------------------

class BadEndpoint:
    """Accepts on loopback; mode 'rst': read the first bytes (optionally
    answer), then reset; mode 'stall': never read (small receive buffer)."""

    def __init__(self, mode, answer=b""):
        self.mode, self.answer = mode, answer
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mode == "stall":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held = []
        self.accepted = 0
        self.stopped = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "stall":
                self.held.append(c)
                continue
            try:
                c.settimeout(5)
                c.recv(100)
                if self.answer:
                    c.sendall(self.answer)
            except OSError:
                pass
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    def close(self):
        self.stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.held:
            c.close()


def sysctl_max(name):
    """Third field of /proc/sys/net/ipv4/<name> (tcp_wmem, tcp_rmem)."""
    with open("/proc/sys/net/ipv4/" + name) as f:
        return int(f.read().split()[2])


def device(port, name, timeout=10):
    d = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    d.sendall(A.client_hello(name.encode()))
    return d


# ---- scenarios ---------------------------------------------------------------------------

def client_killed(io, sh):
    port = L.free_port()
    gw = start_gw(io, port)
    procs = []
    try:
        fd0 = A.stable_fds(gw.pid)    # no tunnel yet
        c1 = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io)
        procs.append(c1)
        c1.wait_connected()
        before = A.snapshot(gw)
        # three downloads, slowed down so that they are mid-transfer
        dls = [A.curl_get(LEGIT, port, "big", sh.cert, limit_rate="8M", max_bytes=4 << 20)
               for _ in range(3)]
        t_kill = time.time()
        c1.send_signal(signal.SIGKILL)
        c1.p.wait(5)
        ends = []
        for d in dls:
            p = d["proc"]
            size = d["size"]
            while True:
                chunk = p.stdout.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
            rc = p.wait(30)
            ends.append((rc, size, time.time() - t_kill))
        for rc, size, took in ends:
            check(rc != 0 and size < BIG, "download survived the client's death: rc %d, %d "
                  "bytes" % (rc, size))
            check(took < 3, "device connection closed %.1fs after the kill" % took)
        print("     %s: device connections closed %.2fs after SIGKILL (curl rc %s)" % (
            io, max(e[2] for e in ends), sorted(set(e[0] for e in ends))), flush=True)
        n = A.wait_fds(gw.pid, fd0, 10)
        check(n == fd0, "gateway fds %d, baseline without a tunnel %d" % (n, fd0))
        after = A.snapshot(gw)

        def d(name, labels=""):
            k = A.series(name, labels)
            return after.get(k, 0) - before.get(k, 0)
        closes = d("snitun_tunnel_closes_total", 'reason="eof"') + d(
            "snitun_tunnel_closes_total", 'reason="error"')
        check(closes == 1, "tunnel_closes_total{eof|error} +%d" % closes)
        check(d("snitun_channel_closes_total", 'reason="tunnel_down"') == 3,
              "channel_closes_total{tunnel_down} +%d, want 3" % d(
                  "snitun_channel_closes_total", 'reason="tunnel_down"'))
        check(gw.metric("snitun_tunnels_connected") == 0, "no tunnel left")
        c2 = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io)
        procs.append(c2)
        c2.wait_connected()
        full_ok(sh, LEGIT, port, "download through the new client")
    finally:
        rcs = finish(procs + [gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def endpoint_rst(io, sh):
    port = L.free_port()
    gw = start_gw(io, port)
    silent = BadEndpoint("rst")
    talker = BadEndpoint("rst", answer=os.urandom(3000))
    cl = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io,
                  aliases=[RST, "rst2.faults.example"],
                  routes=[(RST, "127.0.0.1:%d" % silent.port),
                          ("rst2.faults.example", "127.0.0.1:%d" % talker.port)])
    try:
        cl.wait_connected()
        before = gw_series(gw, "snitun_channel_closes_total", 'reason="remote_close"')
        res = {}
        th = threading.Thread(target=lambda: res.update(r=A.curl_get(LEGIT, port, "big",
                                                                     sh.cert)), daemon=True)
        th.start()
        n = 20
        for i in range(n):
            name = RST if i % 2 == 0 else "rst2.faults.example"
            d = device(port, name)
            got = b""
            t0 = time.time()
            try:
                while True:
                    chunk = d.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except ConnectionResetError:
                pass
            except socket.timeout:
                raise AssertionError("device %d not closed within 10 s" % i)
            d.close()
            check(time.time() - t0 < 5, "closed after %.1fs" % (time.time() - t0))
            if name == RST:
                check(got == b"", "nothing relayed from a silent endpoint")
            else:
                check(got == b"" or talker.answer.startswith(got),
                      "relayed bytes are a prefix of what the endpoint sent")
        th.join(60)
        r = res.get("r") or {}
        check(r.get("rc") == 0 and r.get("sha256") == sh.sha,
              "download beside the resetting channels: %r" % r.get("err"))
        check(silent.accepted + talker.accepted == n, "endpoints accepted %d of %d" % (
            silent.accepted + talker.accepted, n))
        deadline = time.time() + 5
        while time.time() < deadline and gw_series(
                gw, "snitun_channel_closes_total", 'reason="remote_close"') < before + n:
            time.sleep(0.1)
        got = gw_series(gw, "snitun_channel_closes_total", 'reason="remote_close"') - before
        # n resets, plus maybe the download beside them: whether nginx or
        # curl closes that one first is a race, so it ends as remote_close
        # or local_eof.
        check(n <= got <= n + 1, "gateway channel_closes_total{remote_close} +%d, want %d" %
              (got, n))
        cm = cl.metrics()
        lerr = cm.get('snitun_channel_closes_total{reason="local_error"}', 0)
        leof = cm.get('snitun_channel_closes_total{reason="local_eof"}', 0)
        check(lerr >= 1 and lerr + leof >= n, "client channel_closes local_error %d local_eof %d"
              % (lerr, leof))
        check(cl.connected() == 1, "client reconnected: the tunnel was disturbed")
        full_ok(sh, LEGIT, port, "download after the resets")
    finally:
        silent.close()
        talker.close()
        rcs = finish([cl, gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def endpoint_stalls(io, sh):
    port = L.free_port()
    gw = start_gw(io, port)
    stall = BadEndpoint("stall")
    cl = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io,
                  aliases=[STALL], routes=[(STALL, "127.0.0.1:%d" % stall.port)])
    d = None
    try:
        cl.wait_connected()
        d = device(port, STALL)
        d.setblocking(False)
        blob = os.urandom(1 << 20)
        pushed = 0
        res = {}
        th = threading.Thread(target=lambda: res.update(r=A.curl_get(LEGIT, port, "big",
                                                                     sh.cert)), daemon=True)
        started = False
        end = time.time() + 3
        last = time.time()
        while time.time() < end:
            try:
                pushed += d.send(blob)
                last = time.time()
            except BlockingIOError:
                time.sleep(0.01)
            if not started and pushed >= 4 << 20:
                th.start()
                started = True
        check(started, "upload did not even reach 4 MiB (%d bytes)" % pushed)
        stuck_for = time.time() - last
        # What may sit in kernel buffers on the way (device -> gateway, the
        # tunnel) grows with the machine's tcp_wmem/tcp_rmem maxima; past
        # that, only the client's queue (PAUSE at 2 MiB) and a few read
        # buffers and pipes. Without backpressure the device would push
        # hundreds of MiB in these 3 s.
        bound = 2 * (sysctl_max("tcp_wmem") + sysctl_max("tcp_rmem")) + (16 << 20)
        check(pushed < bound and stuck_for > 1,
              "device pushed %d MiB (bound %d MiB) and was last able to send %.1fs ago: no "
              "backpressure" % (pushed >> 20, bound >> 20, stuck_for))
        th.join(60)
        r = res.get("r") or {}
        check(r.get("rc") == 0 and r.get("sha256") == sh.sha,
              "download beside the stalled channel: %r" % r.get("err"))
        print("     %s: device upload into a stalled endpoint stopped at %.1f MiB; the other "
              "channel's 64 MiB at %.0f MiB/s" % (io, pushed / 1048576.0,
                                                 A.mib_s(r["size"], r["seconds"])), flush=True)
        check(stall.accepted == 1, "the stalled endpoint got its connection")
        d.close()
        d = None
        cl.stop()
        deadline = time.time() + 5
        while time.time() < deadline and gw_series(gw, "snitun_tunnels_connected") != 0:
            time.sleep(0.1)
        pauses = gw_series(gw, "snitun_frames_received_total", 'type="pause"')
        check(pauses >= 1, "gateway received no PAUSE from the client (frames_received_total"
              "{type=\"pause\"} = %d)" % pauses)
    finally:
        if d is not None:
            d.close()
        stall.close()
        rcs = finish([cl, gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def client_stopped(io, sh):
    port = L.free_port()
    gw = start_gw(io, port, ["--tunnel-idle-timeout", "3"])
    cl = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io,
                  extra=["--ping-interval", "1", "--pong-timeout", "3"])
    stopped = False
    try:
        cl.wait_connected()
        time.sleep(4.5)      # longer than the idle timeout: the pings keep it up
        check(cl.connected() == 1 and gw.metric("snitun_tunnels_connected") == 1,
              "an idle but pinging tunnel was closed")
        before = A.snapshot(gw)
        cl.send_signal(signal.SIGSTOP)
        stopped = True
        t0 = time.time()
        while time.time() - t0 < 8 and gw.metric("snitun_tunnels_connected") != 0:
            time.sleep(0.1)
        took = time.time() - t0
        check(gw.metric("snitun_tunnels_connected") == 0, "tunnel of a stopped client kept")
        check(1.5 <= took <= 6, "closed %.1fs after SIGSTOP (idle timeout 3 s)" % took)
        check(gw.wait_log(r'msg="tunnel down".*reason=tunnel_idle'), "logged as tunnel_idle")
        # a device for the name is refused while the client is away
        d = device(port, LEGIT)
        check(A.closed_silently(d, 5)[0], "device refused while the tunnel is gone")
        d.close()
        after = A.snapshot(gw)
        k = A.series("snitun_sni_rejects_total", 'reason="unknown_name"')
        check(after.get(k, 0) - before.get(k, 0) == 1, "refused as unknown_name")
        idle = [kk for kk in after if kk.startswith("snitun_tunnel_closes_total") and
                after[kk] - before.get(kk, 0) == 1]
        print("     %s: idle tunnel closed %.1fs after SIGSTOP, counted as %s" % (
            io, took, idle), flush=True)
        check(idle == ['snitun_tunnel_closes_total{reason="idle"}'],
              "idle close counted as %s" % idle)
        cl.send_signal(signal.SIGCONT)
        stopped = False
        cl.wait_connected(2, timeout=10)
        check(cl.wait_log(r"msg=disconnected", 1), "client logged the lost tunnel")
        full_ok(sh, LEGIT, port, "download after SIGCONT")
    finally:
        if stopped:
            cl.send_signal(signal.SIGCONT)
        rcs = finish([cl, gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def device_storm(io, sh):
    """900 device connections for the tunnel's name, from 8 threads, that
    all go away abruptly: RST right after a complete ClientHello (the
    channel may be opening or handed to the other shard), RST in the
    middle of the ClientHello, and a graceful close without reading the
    endpoint's answer. Meanwhile a 64 MiB download runs. Afterwards: the
    download is intact, the tunnel was not disturbed, no channel is left
    open on either side, and both processes are back to their fds."""
    port = L.free_port()
    gw = start_gw(io, port)
    cl = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io)
    try:
        cl.wait_connected()
        time.sleep(0.3)
        gfd, cfd = A.stable_fds(gw.pid), A.stable_fds(cl.pid)
        hello = A.client_hello(LEGIT.encode())
        rst = struct.pack("ii", 1, 0)
        errors = []

        def storm(k):
            for i in range(k, 900, 8):
                try:
                    d = socket.socket()
                    d.connect(("127.0.0.1", port))
                    mode = i % 3
                    if mode == 0:
                        d.sendall(hello)
                    elif mode == 1:
                        d.sendall(hello[:len(hello) // 2])
                    else:
                        d.sendall(hello)
                        time.sleep(0.002)
                        d.close()
                        continue
                    d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
                    d.close()
                except OSError as e:
                    errors.append(e)
        res = {}
        th = threading.Thread(target=lambda: res.update(r=A.curl_get(LEGIT, port, "big",
                                                                     sh.cert)), daemon=True)
        th.start()
        ths = [threading.Thread(target=storm, args=(k,), daemon=True) for k in range(8)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        th.join(60)
        check(not errors, "device side errors: %r" % errors[:3])
        r = res.get("r") or {}
        check(r.get("rc") == 0 and r.get("sha256") == sh.sha, "download during the storm: %r"
              % r.get("err"))
        check(cl.connected() == 1, "client reconnected during the storm")

        def settled():
            return (gw.metric("snitun_channels_open") == 0 and
                    cl.metrics().get("snitun_channels_open") == 0)
        deadline = time.time() + 15
        while time.time() < deadline and not settled():
            time.sleep(0.2)
        check(settled(), "channels still open: gateway %s, client %s" % (
            gw.metric("snitun_channels_open"), cl.metrics().get("snitun_channels_open")))
        n = A.wait_fds(gw.pid, gfd, 10)
        check(n == gfd, "gateway fds %d, baseline %d" % (n, gfd))
        n = A.wait_fds(cl.pid, cfd, 10)
        check(n == cfd, "client fds %d, baseline %d" % (n, cfd))
        print("     %s: storm of 900 aborted devices: gateway opened %d channels, handed %d "
              "to the other shard" % (io, gw.metric("snitun_channels_opened_total"),
                                      gw.metric("snitun_handoffs_total") or 0), flush=True)
        full_ok(sh, LEGIT, port, "download after the storm")
    finally:
        rcs = finish([cl, gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def replaced_storm(io, sh):
    """For 3 s a raw tunnel registers the same name again and again (each
    registration replaces the real client's tunnel, which reconnects and
    replaces it back) while devices for the name keep arriving and
    aborting, on two shards (handoffs race with replacements). Then the
    real client must own the name and serve, no channel may be left open,
    and the gateway's fds must be back at their baseline."""
    port = L.free_port()
    gw = start_gw(io, port)
    cl = A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, LEGIT, io=io)
    try:
        cl.wait_connected()
        time.sleep(0.3)
        gfd = A.stable_fds(gw.pid)
        hello = A.client_hello(LEGIT.encode())
        rst = struct.pack("ii", 1, 0)
        stop = threading.Event()
        errors = []
        regs = [0]

        def devices(k):
            i = k
            while not stop.is_set():
                i += 1
                try:
                    d = socket.socket()
                    d.connect(("127.0.0.1", port))
                    d.sendall(hello)
                    if i % 2:
                        d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
                    else:
                        time.sleep(0.005)
                    d.close()
                except OSError as e:
                    errors.append(e)

        def replacer():
            import protoclient as P
            while not stop.is_set():
                try:
                    t = A.open_tunnel(port, LEGIT, src="127.0.0.50")
                except (OSError, EOFError) as e:
                    errors.append(e)
                    continue
                regs[0] += 1
                pid = t.send_ping()
                try:
                    while True:     # NEW/DATA for routed devices come first
                        f = t.recv_frame(5)
                        if f.flow == P.PING and f.id == pid:
                            break
                except (OSError, EOFError):
                    pass            # replaced back already
                time.sleep(0.15)
                t.close()
        ths = [threading.Thread(target=devices, args=(k,), daemon=True) for k in range(4)]
        ths.append(threading.Thread(target=replacer, daemon=True))
        for t in ths:
            t.start()
        time.sleep(3)
        stop.set()
        for t in ths:
            t.join(30)
        check(not errors, "errors on the test's side: %r" % errors[:3])
        before = cl.connected()
        # the real client gets the name back within its backoff
        deadline = time.time() + 10
        ok = None
        while time.time() < deadline:
            r = A.curl_get(LEGIT, port, "big", sh.cert)
            if r["rc"] == 0 and r["sha256"] == sh.sha:
                ok = r
                break
            time.sleep(0.5)
        check(ok, "the real client never served again")
        deadline = time.time() + 15
        while time.time() < deadline and gw.metric("snitun_channels_open") != 0:
            time.sleep(0.2)
        check(gw.metric("snitun_channels_open") == 0, "gateway channels still open: %s" %
              gw.metric("snitun_channels_open"))
        check(gw.metric("snitun_tunnels_connected") == 1, "tunnels_connected %s" %
              gw.metric("snitun_tunnels_connected"))
        n = A.wait_fds(gw.pid, gfd, 10)
        check(n == gfd, "gateway fds %d, baseline %d" % (n, gfd))
        print("     %s: %d raw registrations and %d client reconnects replaced each other; "
              "tunnel_closes{replaced}=%d, channels opened %d, handoffs %d" % (
                  io, regs[0], before - 1,
                  gw.metric("snitun_tunnel_closes_total", 'reason="replaced"') or 0,
                  gw.metric("snitun_channels_opened_total") or 0,
                  gw.metric("snitun_handoffs_total") or 0), flush=True)
        check(regs[0] >= 3 and before >= 2, "too few replacements to mean anything")
    finally:
        rcs = finish([cl, gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def drain_flags():
    """--drain-timeout 2 where the gateway drains on SIGTERM."""
    out = subprocess.run([L.BIN, "server", "--help"], capture_output=True, text=True).stdout
    return ["--drain-timeout", "2"] if "--drain-timeout" in out else []


def gateway_restart(io, sh):
    """SIGTERM (a drain of at most 2 s where the gateway has one), then
    SIGKILL, each while three clients move data; the gateway comes back on
    the same port and the clients reconnect by themselves."""
    port = L.free_port()
    extra = drain_flags()
    gw = start_gw(io, port, extra)
    names = NAMES[1:]
    clients = [A.Client("127.0.0.1:%d" % port, "127.0.0.1:%d" % sh.ng.port, n, io=io)
               for n in names]
    try:
        for c in clients:
            c.wait_connected()
        for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=2):
            # 64 MiB at 8 MiB/s: mid-transfer when the signal comes
            dls = [A.curl_get(n, port, "big", sh.cert, limit_rate="8M", max_bytes=2 << 20)
                   for n in names]
            t0 = time.time()
            rc = gw.stop(sig)
            took = time.time() - t0
            if sig == signal.SIGTERM:
                check(rc == 0, "gateway exit status %s on SIGTERM under load" % rc)
                check(took < 6, "SIGTERM under load took %.1fs" % took)
            A.check_no_sanitizer(gw)
            for d in dls:
                rest = d["proc"].stdout.read()
                rc_dl = d["proc"].wait(30)
                check(rc_dl != 0 or d["size"] + len(rest) == BIG,
                      "a download ended 'successfully' with %d bytes" % (d["size"] + len(rest)))
            gw = start_gw(io, port, extra)
            t1 = time.time()
            for c in clients:
                c.wait_connected(round_, timeout=10)
            back = time.time() - t1
            print("     %s: %s stopped the gateway in %.1fs; the 3 clients were back %.1fs "
                  "after its restart" % (io, signal.Signals(sig).name, took, back), flush=True)
            results = {}
            ths = [threading.Thread(target=lambda n=n: results.update(
                {n: A.curl_get(n, port, "big", sh.cert)}), daemon=True) for n in names]
            for th in ths:
                th.start()
            for th in ths:
                th.join(60)
            for n in names:
                r = results.get(n) or {}
                check(r.get("rc") == 0 and r.get("sha256") == sh.sha,
                      "%s after the restart: %r" % (n, r.get("err")))
            check(gw.metric("snitun_tunnels_connected") == 3, "3 tunnels on the new gateway")
    finally:
        rcs = finish(clients + [gw])
    check(rcs[gw] == 0, "gateway exit status %s" % rcs[gw])


def main():
    A.raise_nofile(20000)
    r = A.Runner(EXPECTED_BUGS)
    sh = Shared()
    try:
        for io in L.engines():
            r.run("%s: client SIGKILLed mid-transfer" % io, client_killed, io, sh)
            r.run("%s: endpoint resets connections, tunnel stays usable" % io, endpoint_rst,
                  io, sh)
            r.run("%s: endpoint stops reading, other channels keep working" % io,
                  endpoint_stalls, io, sh)
            r.run("%s: client SIGSTOPped past the tunnel idle timeout" % io, client_stopped,
                  io, sh)
            r.run("%s: 900 devices abort mid-hello and mid-channel" % io, device_storm, io, sh)
            r.run("%s: tunnel replaced again and again while devices arrive" % io,
                  replaced_storm, io, sh)
            r.run("%s: gateway restarted under load" % io, gateway_restart, io, sh)
    finally:
        sh.close()
    r.finish()


if __name__ == "__main__":
    main()
