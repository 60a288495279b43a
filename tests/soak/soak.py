#!/usr/bin/env python3
"""tests/soak/soak.py - the soak test (not in CI; `make soak`, 600 s by default).

    devices (worker threads) --TLS port--> snitun server ==tunnels==>
        snitun client x4 --> endpoint (a threaded Python sink/source/echo)

The real binaries on loopback: one `snitun server` (default engine,
--threads 2, admin listener for /metrics) and four `snitun client`
processes, each with its own host name and a different protocol version /
cipher (v2 aes-cbc, v1 aes-gcm, v0 aes-cbc, v2 aes-gcm; aes-gcm clients take
a fresh token from --token-command for every connection).

Channels: worker threads open device connections to the gateway's TLS port
without pause. Each sends a real-looking ClientHello for one client's name
(tests/data/clienthello/openssl_tls13_sni.bin with its SNI replaced, as
bench/loadgen.c does), then a 32-byte command, then raw bytes:
  up    device sends N bytes, the endpoint answers their SHA-256;
  down  the endpoint sends N bytes of a pool both sides derive from the seed,
        the device checks their SHA-256;
  echo  the device sends N bytes and checks the SHA-256 of what comes back.
N is 0 (5 %) or lognormal (median 16 KiB) capped at 8 MiB. Some channels are
aborted on purpose at a random point: the device closes, or resets (SO_LINGER
0), or the endpoint closes or resets; some stop reading for 0.5-3 s and then
finish. Either side may close first after a complete transfer. The endpoint
also checks that the ClientHello arrived byte-exact on the right client.

Tunnels: every --restart-every seconds one client (not client 0, which stays
up for the whole run so its own drift can be measured) is stopped, by
SIGKILL and SIGTERM in turn, and started again; it must reconnect, and the
reconnect time is from the signal until a probe channel is routed again.
Channels in flight on it when it goes are counted as "tunnel lost", not as
failures.

Resources: RSS (/proc/PID/status VmRSS) and fd count (/proc/PID/fd) of the
gateway and the clients are sampled every --sample-every seconds. Warm-up is
the first 20 % of the run (at least 30 s). At the end of warm-up and at the
end of the run the load is paused, every in-flight channel finishes, every
tunnel is up and the gateway reports 0 open channels; then fds and RSS are
read. Pass when: no checksum mismatch, no unexplained channel failure, every
restart reconnected, no process died unexpectedly, the gateway's and client
0's fd counts are equal to their warm-up values (after a settle wait), and
their RSS grew by at most max(5 %, 4 MiB) (a drop is fine).

Output: a markdown report (--out, default tests/soak/results/latest.md) and a
JSON next to it (same name, .json). Exit status 0 on pass, 1 on failure, 2 on
a setup error, 130 when interrupted. Every process is stopped by its PID at
the end, also on Ctrl-C.

    python3 tests/soak/soak.py --bin build/snitun --duration 600
"""

import argparse
import collections
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
MiB = 1 << 20
KiB = 1 << 10

MAX_SIZE = 8 * MiB
POOL_SIZE = 12 * MiB               # payloads are slices of one seeded pool
CMD = struct.Struct(">4sBBHQQQ")    # magic op flags pad size offset abort_at
MAGIC = b"SOAK"
OP_UP, OP_DOWN, OP_ECHO = 1, 2, 3
OP_NAME = {OP_UP: "up", OP_DOWN: "down", OP_ECHO: "echo"}
F_EP_CLOSES = 1                    # endpoint closes first after the transfer
F_EP_ABORT_CLOSE = 2               # endpoint closes at abort_at
F_EP_ABORT_RST = 4                 # endpoint resets at abort_at
CHUNK = 256 * KiB
NO_PROGRESS_S = 30.0               # a channel without progress for this long hangs
CHANNEL_MAX_S = 180.0              # hard bound for one channel
EP_WAIT_EOF_S = 60.0               # endpoint: device close expected within
# RSS growth rule: 5 %, or 4 MiB: each engine keeps up to 2 MiB of small
# and 2 MiB of big spare receive buffers (io/eng.h ENG_PBUF_SPARE_*),
# resident once a burst first fills them, which may happen after warm-up.
# Growth beyond that bound would be a leak.
RSS_REL, RSS_ABS = 0.05, 4 * MiB
DOMAIN = "soak.test"


# ---- shared helpers (endpoint process and driver) --------------------------------

def load_e2elib():
    """tests/e2e/e2elib.py, imported by path without writing bytecode there."""
    sys.dont_write_bytecode = True
    path = os.path.join(SRC, "tests", "e2e", "e2elib.py")
    spec = importlib.util.spec_from_file_location("e2elib", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_pool(seed):
    return hashlib.shake_256(b"snitun-soak-%d" % seed).digest(POOL_SIZE)


def hello_for(template, name):
    """The template ClientHello with its server_name extension replaced by
    one for name, put first (the Python twin of bench/loadgen.c lg_hello)."""
    t = template
    nb = name.encode()
    p = 9 + 2 + 32
    p += 1 + t[p]                                      # session id
    p += 2 + int.from_bytes(t[p:p + 2], "big")         # cipher suites
    p += 1 + t[p]                                      # compression
    ext_at = p
    ext_end = ext_at + 2 + int.from_bytes(t[p:p + 2], "big")
    exts = struct.pack(">HHHBH", 0, len(nb) + 5, len(nb) + 3, 0, len(nb)) + nb
    p = ext_at + 2
    while p + 4 <= ext_end:
        typ, ln = struct.unpack(">HH", t[p:p + 4])
        if typ != 0:
            exts += t[p:p + 4 + ln]
        p += 4 + ln
    body = t[9:ext_at] + struct.pack(">H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return t[:3] + struct.pack(">H", len(hs)) + hs


def read_template():
    with open(os.path.join(SRC, "tests", "data", "clienthello", "openssl_tls13_sni.bin"),
              "rb") as f:
        return f.read()


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        d = sock.recv(min(n - len(buf), CHUNK))
        if not d:
            raise EOFError("eof after %d of %d bytes" % (len(buf), n))
        buf += d
    return bytes(buf)


def rss_bytes(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fd_count(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


def mib(n):
    return "-" if n is None else "%.2f MiB" % (n / MiB)


# ---- the endpoint (a child process: python3 soak.py --serve-endpoint ...) -------

class Endpoint:
    """One listener per client name; one thread per connection (at most
    MAX_CONNS at once). Stats go to a JSON file twice a second."""

    MAX_CONNS = 512

    def __init__(self, seed, routes, stats_path):
        self.pool = memoryview(make_pool(seed))
        tmpl = read_template()
        self.routes = [(name, port, hello_for(tmpl, name)) for name, port in routes]
        self.hellos = {h: n for n, _, h in self.routes}
        self.stats_path = stats_path
        self.lock = threading.Lock()
        self.st = collections.Counter()
        self.open = 0
        self.stop = threading.Event()

    def count(self, key, n=1):
        with self.lock:
            self.st[key] += n

    def serve(self):
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        for name, port, hello in self.routes:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", port))
            ls.listen(256)
            ls.settimeout(0.5)
            threading.Thread(target=self.accept_loop, args=(ls, name, hello),
                             daemon=True).start()
        while not self.stop.wait(0.5):
            self.write_stats()
        self.write_stats()

    def write_stats(self):
        with self.lock:
            d = dict(self.st)
            d["open"] = self.open
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f)
        os.replace(tmp, self.stats_path)

    def accept_loop(self, ls, name, hello):
        while not self.stop.is_set():
            try:
                c, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                if self.open >= self.MAX_CONNS:
                    self.st["refused_full"] += 1
                    c.close()
                    continue
                self.open += 1
                self.st["accepted"] += 1
            threading.Thread(target=self.conn, args=(c, name, hello), daemon=True).start()

    def conn(self, c, name, hello):
        try:
            c.settimeout(NO_PROGRESS_S)
            self.handle(c, name, hello)
        except (EOFError, ConnectionError):
            self.count("peer_gone")           # device abort, tunnel loss
        except socket.timeout:
            self.count("timeout")             # would point at a leak/hang
        except OSError:
            self.count("os_error")
        finally:
            c.close()
            with self.lock:
                self.open -= 1

    def handle(self, c, name, hello):
        hdr = recv_exact(c, 5)
        if hdr[0] != 0x16:
            self.count("not_hello")
            return
        got = hdr + recv_exact(c, int.from_bytes(hdr[3:5], "big"))
        if got != hello:
            self.count("misrouted" if got in self.hellos else "hello_mismatch")
            return
        magic, op, flags, _, size, off, abort_at = CMD.unpack(recv_exact(c, CMD.size))
        if magic != MAGIC or op not in OP_NAME or size > MAX_SIZE or off + size > POOL_SIZE:
            self.count("bad_command")
            return
        self.count("cmd_" + OP_NAME[op])
        abort = flags & (F_EP_ABORT_CLOSE | F_EP_ABORT_RST)
        done = self.transfer(c, op, size, off, abort_at if abort else None)
        if not done:                          # abort point reached
            if flags & F_EP_ABORT_RST:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.count("aborted")
            return
        self.count("done")
        if flags & F_EP_CLOSES:
            self.count("closed_first")
            return
        c.settimeout(EP_WAIT_EOF_S)
        if c.recv(1) != b"":
            self.count("extra_data")
        else:
            self.count("eof_seen")

    def transfer(self, c, op, size, off, abort_at):
        """Run the operation; False when abort_at was reached first."""
        moved = 0
        if op == OP_UP:
            h = hashlib.sha256()
            while moved < size:
                if abort_at is not None and moved >= abort_at:
                    return False
                d = c.recv(min(CHUNK, size - moved))
                if not d:
                    raise EOFError("up")
                h.update(d)
                moved += len(d)
            if abort_at is not None:
                return False                  # abort point at size: before the answer
            c.sendall(h.digest())
        elif op == OP_DOWN:
            while moved < size:
                if abort_at is not None and moved >= abort_at:
                    return False
                n = min(64 * KiB, size - moved)
                c.sendall(self.pool[off + moved:off + moved + n])
                moved += n
        else:
            while moved < size:
                if abort_at is not None and moved >= abort_at:
                    return False
                d = c.recv(min(CHUNK, size - moved))
                if not d:
                    raise EOFError("echo")
                c.sendall(d)
                moved += len(d)
        return abort_at is None or moved < abort_at


def endpoint_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-endpoint", action="store_true")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--route", action="append", default=[], help="NAME=PORT")
    a = ap.parse_args(argv)
    routes = [(r.split("=")[0], int(r.split("=")[1])) for r in a.route]
    Endpoint(a.seed, routes, a.stats).serve()
    return 0


# ---- the driver ---------------------------------------------------------------

class Fatal(Exception):
    """Something that ends the run at once (a process died, no reconnect)."""


class Slot:
    """One `snitun client` position: its name, protocol and current process."""

    def __init__(self, idx, version, cipher, stable):
        self.idx, self.version, self.cipher, self.stable = idx, version, cipher, stable
        self.name = "c%d.%s" % (idx, DOMAIN)
        self.port = None                  # endpoint port
        self.proc = None
        self.up = False
        self.down = []                    # [signal time, routed-again time or None]
        self.lock = threading.Lock()
        self.starts = 0


class Soak:
    def __init__(self, args, el):
        self.a = args
        self.el = el
        self.bin = os.path.abspath(args.bin)
        el.BIN = self.bin
        self.work = tempfile.mkdtemp(prefix="snitun-soak-")
        self.pool = memoryview(make_pool(args.seed))
        self.tmpl = read_template()
        self.slots = [Slot(0, 2, "aes-cbc", True), Slot(1, 1, "aes-gcm", False),
                      Slot(2, 0, "aes-cbc", False), Slot(3, 2, "aes-gcm", False)]
        self.slots = self.slots[:args.clients]
        for s in self.slots:
            s.hello = hello_for(self.tmpl, s.name)
        self.lock = threading.Lock()
        self.c = collections.Counter()     # outcome counters
        self.by_op = collections.Counter()
        self.abort_kinds = collections.Counter()
        self.failures = []                 # unexplained channel failures (first 50)
        self.mismatches = []
        self.restarts = []
        self.problems = []                 # reasons for FAIL found on the way
        self.samples = []
        self.stop_evt = threading.Event()
        self.pause_evt = threading.Event()
        self.fatal = None
        self.active = 0
        self.churn_busy = False
        self.procs = []                    # everything started, for cleanup
        self.gw = None
        self.ep = None
        self.ep_stats = os.path.join(self.work, "endpoint.json")
        self.engine = "?"
        self.t0 = None
        self.wall0 = None
        self.warmup = 0.0
        self.t_load = None
        self.pause_s = 0.0
        self.base = None
        self.end = None
        self.cv = threading.Condition()

    # ---- processes ----

    def log(self, msg):
        t = "" if self.t0 is None else "[%6.1fs] " % (time.monotonic() - self.t0)
        print(t + msg, flush=True)

    def start_endpoint(self):
        for s in self.slots:
            s.port = self.el.free_port()
        argv = [sys.executable, os.path.abspath(__file__), "--serve-endpoint", "--seed",
                str(self.a.seed), "--stats", self.ep_stats]
        for s in self.slots:
            argv += ["--route", "%s=%d" % (s.name, s.port)]
        self.ep = self.el.Proc(argv, "soak-endpoint")
        self.procs.append(self.ep)
        for s in self.slots:
            self.el.wait_port("127.0.0.1", s.port, proc=self.ep.p)

    def ep_state(self):
        try:
            with open(self.ep_stats) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def start_gateway(self):
        self.sni_port = self.el.free_port()
        self.peer_port = self.el.free_port()
        self.admin_port = self.el.free_port()
        argv = [self.bin, "server", "--threads", "2", "--log-level", "info",
                "--fernet-key", self.el.K1,
                "--sni-listen", "127.0.0.1:%d" % self.sni_port,
                "--peer-listen", "127.0.0.1:%d" % self.peer_port,
                "--admin-listen", "127.0.0.1:%d" % self.admin_port]
        self.gw = self.el.Proc(argv, "soak-gw")
        self.procs.append(self.gw)
        if not self.gw.wait_log(r"msg=\"gateway started\"", timeout=10):
            raise Fatal("gateway did not start:\n" + self.gw.text()[-2000:])
        self.el.wait_port("127.0.0.1", self.admin_port, proc=self.gw.p)
        m = re.search(r"msg=\"io engine\" engine=(\S+)", self.gw.text())
        self.engine = m.group(1) if m else "?"

    def metrics(self):
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.admin_port,
                                    timeout=5) as r:
            text = r.read().decode()
        out = {}
        for m in re.finditer(r"^(snitun_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def token_issue(self, s):
        return [self.bin, "token", "issue", "--fernet-key", self.el.K1, "--hostname", s.name,
                "--protocol-version", str(s.version), "--cipher", s.cipher,
                "--valid-for", "86400"]

    def start_client(self, s):
        argv = [self.bin, "client", "--server", "127.0.0.1:%d" % self.peer_port,
                "--endpoint", "127.0.0.1:%d" % s.port, "--log-level", "info"]
        if s.cipher == "aes-gcm":           # a fresh key for every connection
            argv += ["--token-command", " ".join(self.token_issue(s))]
        else:
            path = os.path.join(self.work, "token-%d.json" % s.idx)
            if not os.path.exists(path):
                out = subprocess.run(self.token_issue(s), check=True, capture_output=True,
                                     timeout=30).stdout
                with open(path, "wb") as f:
                    f.write(out)
            argv += ["--token-file", path]
        s.proc = self.el.Proc(argv, "soak-cl%d" % s.idx)
        s.starts += 1
        self.procs.append(s.proc)

    def wait_connected(self, s, timeout=30.0):
        if not s.proc.wait_log(r"msg=connected\b", timeout=timeout):
            raise Fatal("client %d did not connect within %.0f s:\n%s"
                        % (s.idx, timeout, s.proc.text()[-2000:]))

    def probe(self, s, timeout=30.0):
        """Small echo channels until one is routed through s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spec = {"op": OP_ECHO, "size": 1024, "off": 0, "flags": 0, "dev_abort": None,
                    "abort_at": 0, "stall_at": None, "stall_s": 0}
            r = self.channel(s, spec)
            if r["result"] == "ok":
                return time.monotonic()
            time.sleep(0.05)
        raise Fatal("no channel routed through client %d within %.0f s" % (s.idx, timeout))

    def check_alive(self):
        if self.gw.p.poll() is not None:
            raise Fatal("gateway exited with %s:\n%s"
                        % (self.gw.p.returncode, self.gw.text()[-3000:]))
        if self.ep.p.poll() is not None:
            raise Fatal("endpoint exited with %s:\n%s"
                        % (self.ep.p.returncode, self.ep.text()[-3000:]))
        for s in self.slots:
            with s.lock:
                if s.up and s.proc.p.poll() is not None:
                    raise Fatal("client %d exited by itself with %s:\n%s"
                                % (s.idx, s.proc.p.returncode, s.proc.text()[-3000:]))

    # ---- one channel (device side) ----

    def channel(self, s, spec):
        """One device connection through the gateway to s's endpoint.
        Returns {"result": "ok" | "mismatch" | "aborted" | "fail", "reason",
        "moved" (payload bytes sent + received)}."""
        op, size, off = spec["op"], spec["size"], spec["off"]
        cmd = CMD.pack(MAGIC, op, spec["flags"], 0, size, off, spec["abort_at"])
        prefix = s.hello + cmd
        out = [memoryview(prefix)]
        if op in (OP_UP, OP_ECHO) and size:
            out.append(self.pool[off:off + size])
        prefix_left = len(prefix)
        expect = 32 if op == OP_UP else size
        h = hashlib.sha256()
        answer = bytearray()               # "up": the endpoint's SHA-256
        sent = recvd = 0
        res = {"result": "fail", "reason": "", "moved": 0}
        try:
            sock = socket.create_connection(("127.0.0.1", self.sni_port), timeout=10)
        except OSError as e:
            res["reason"] = "connect: %s" % e
            return res
        sel = selectors.DefaultSelector()
        try:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            now = start = last = time.monotonic()
            stall_until = None
            while True:
                progress = sent + recvd
                if spec["dev_abort"] and prefix_left == 0 and progress >= spec["abort_at"]:
                    if spec["dev_abort"] == "rst":
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    res.update(result="aborted", reason="device " + spec["dev_abort"])
                    return res
                if stall_until is None and spec["stall_at"] is not None \
                        and progress >= spec["stall_at"]:
                    stall_until = now + spec["stall_s"]
                if not out and recvd >= expect:
                    break
                reading = stall_until is None or now >= stall_until
                ev = (selectors.EVENT_READ if reading else 0) | \
                    (selectors.EVENT_WRITE if out else 0)
                if ev:
                    sel.modify(sock, ev)
                    events = sel.select(0.5)
                else:                       # stalled with nothing to send
                    events = []
                    time.sleep(min(0.2, max(0.0, stall_until - now)))
                now = time.monotonic()
                if now - start > CHANNEL_MAX_S:
                    res["reason"] = "channel still open after %.0f s" % CHANNEL_MAX_S
                    return res
                if not events and now - last > NO_PROGRESS_S + spec["stall_s"]:
                    res["reason"] = "no progress for %.0f s (sent %d, received %d of %d)" % (
                        now - last, sent, recvd, expect)
                    return res
                for _, mask in events:
                    if mask & selectors.EVENT_WRITE and out:
                        n = sock.send(out[0][:CHUNK])
                        if n == len(out[0]):
                            out.pop(0)
                        else:
                            out[0] = out[0][n:]
                        p = min(n, prefix_left)
                        prefix_left -= p
                        sent += n - p
                        if n:
                            last = now
                    if mask & selectors.EVENT_READ and reading:
                        d = sock.recv(CHUNK)
                        if not d:
                            res["reason"] = "eof after %d of %d bytes (sent %d)" % (
                                recvd, expect, sent)
                            return res
                        if recvd + len(d) > expect:
                            res["reason"] = "%d bytes more than expected" % (
                                recvd + len(d) - expect)
                            return res
                        if op == OP_UP:
                            answer += d
                        else:
                            h.update(d)
                        recvd += len(d)
                        last = now
            want = hashlib.sha256(self.pool[off:off + size]).digest()
            if (bytes(answer) if op == OP_UP else h.digest()) != want:
                res.update(result="mismatch", reason="sha256 differs")
                return res
            if spec["flags"] & F_EP_CLOSES:     # the endpoint's close must arrive
                sock.setblocking(True)
                sock.settimeout(NO_PROGRESS_S)
                if sock.recv(1):
                    res["reason"] = "data after the transfer"
                    return res
            res["result"] = "ok"
            return res
        except socket.timeout:
            res["reason"] = "the endpoint's close did not arrive within %.0f s" % NO_PROGRESS_S
            return res
        except OSError as e:               # resets, broken pipes
            res["reason"] = "%s after %d of %d bytes (sent %d)" % (
                type(e).__name__, recvd, expect, sent)
            return res
        finally:
            res["moved"] = sent + recvd
            sel.close()
            sock.close()

    def make_spec(self, rng):
        op = rng.choices((OP_UP, OP_DOWN, OP_ECHO), (35, 35, 30))[0]
        if rng.random() < 0.05:
            size = 0
        else:
            size = min(MAX_SIZE, int(rng.lognormvariate(math.log(16 * KiB), 2.2)))
        spec = {"op": op, "size": size, "off": rng.randrange(0, POOL_SIZE - size + 1),
                "flags": F_EP_CLOSES if rng.random() < 0.3 else 0, "dev_abort": None,
                "abort_at": 0, "stall_at": None, "stall_s": 0, "kind": None}
        # device progress: payload sent + bytes received
        total = {OP_UP: size + 32, OP_DOWN: size, OP_ECHO: 2 * size}[op]
        if rng.random() < self.a.abort_rate:
            kind = rng.choice(("device close", "device rst", "endpoint close", "endpoint rst"))
            spec["kind"] = kind
            if kind.startswith("device"):
                spec["dev_abort"] = kind.split()[1]
                spec["abort_at"] = rng.randrange(0, total) if total else 0
            else:
                spec["flags"] |= F_EP_ABORT_RST if kind.endswith("rst") else F_EP_ABORT_CLOSE
                spec["abort_at"] = rng.randrange(0, size + 1)
        if rng.random() < self.a.stall_rate:
            spec["stall_at"] = rng.randrange(0, total + 1)
            spec["stall_s"] = rng.uniform(0.5, 3.0)
        return spec

    def record(self, s, spec, r, t_start, t_end):
        res = r["result"]
        with self.lock:
            c = self.c
            c["started"] += 1
            c["bytes"] += r["moved"]
            if spec["stall_at"] is not None:
                c["stalled"] += 1
            if res == "ok":
                c["completed"] += 1
                c["bytes_completed"] += r["moved"]
                self.by_op[OP_NAME[spec["op"]]] += 1
                if spec["stall_at"] is not None:
                    c["stalled_completed"] += 1
                return
            detail = {"t": round(t_end - self.t0, 2), "client": s.idx,
                      "op": OP_NAME[spec["op"]], "size": spec["size"],
                      "abort": spec["kind"], "ep_closes_first": bool(spec["flags"] & F_EP_CLOSES),
                      "stall_s": round(spec["stall_s"], 2), "reason": r["reason"],
                      "seconds": round(t_end - t_start, 2)}
            if res == "mismatch":
                c["mismatch"] += 1
                self.mismatches.append(detail)
            elif res == "aborted" or (spec["kind"] or "").startswith("endpoint"):
                c["aborted"] += 1
                self.abort_kinds[spec["kind"]] += 1
            else:
                lost = None
                for k, u in list(s.down):
                    if k <= t_end and (u is None or u >= t_start):
                        lost = "tunnel_lost_inflight" if t_start < k else "tunnel_lost_down"
                if lost:
                    c["tunnel_lost"] += 1
                    c[lost] += 1
                    return
                c["failed"] += 1
                if len(self.failures) < 50:
                    self.failures.append(detail)
                self.log("FAILED channel: %s" % json.dumps(detail))

    # ---- threads ----

    def worker(self, i):
        rng = random.Random("%d-worker-%d" % (self.a.seed, i))
        while not self.stop_evt.is_set():
            with self.cv:
                while self.pause_evt.is_set() and not self.stop_evt.is_set():
                    self.cv.wait(0.2)
                if self.stop_evt.is_set():
                    return
                self.active += 1
            try:
                s = rng.choice(self.slots)      # also while its tunnel is down
                spec = self.make_spec(rng)
                t_start = time.monotonic()
                r = self.channel(s, spec)
                self.record(s, spec, r, t_start, time.monotonic())
            except Exception as e:  # noqa: BLE001 - a harness bug must end the run
                self.fatal = self.fatal or "worker %d: %r" % (i, e)
                self.stop_evt.set()
            finally:
                with self.cv:
                    self.active -= 1
                    self.cv.notify_all()

    def churn(self):
        order = [s for s in self.slots if not s.stable]
        k = 0
        while order and not self.stop_evt.wait(self.a.restart_every):
            with self.cv:
                while self.pause_evt.is_set() and not self.stop_evt.is_set():
                    self.cv.wait(0.2)
                if self.stop_evt.is_set():
                    return
                self.churn_busy = True
            try:
                self.restart(order[k % len(order)],
                             signal.SIGKILL if k % 2 == 0 else signal.SIGTERM)
            except Exception as e:  # noqa: BLE001 - Fatal or a harness bug
                self.fatal = self.fatal or "restart: %s" % e
                self.stop_evt.set()
            finally:
                with self.cv:
                    self.churn_busy = False
                    self.cv.notify_all()
            k += 1

    def restart(self, s, sig):
        with s.lock:
            s.up = False
            t_kill = time.monotonic()
            outage = [t_kill, None]
            s.down.append(outage)
            old = s.proc
            old.p.send_signal(sig)
        try:
            rc = old.p.wait(15)
        except subprocess.TimeoutExpired:
            old.p.kill()
            rc = old.p.wait()
            self.problems.append("client %d did not exit within 15 s of %s"
                                 % (s.idx, signal.Signals(sig).name))
        t_exit = time.monotonic()
        want = -signal.SIGKILL if sig == signal.SIGKILL else 0
        if rc != want:
            self.problems.append("client %d exited with %s after %s (expected %s)"
                                 % (s.idx, rc, signal.Signals(sig).name, want))
        self.start_client(s)
        self.wait_connected(s)
        t_conn = time.monotonic()
        t_route = self.probe(s)
        with s.lock:
            s.up = True
            outage[1] = t_route
        rec = {"t": round(t_kill - self.t0, 2), "client": s.idx,
               "signal": signal.Signals(sig).name, "exit_status": rc,
               "exit_s": round(t_exit - t_kill, 3), "connected_s": round(t_conn - t_kill, 3),
               "reconnect_s": round(t_route - t_kill, 3)}
        self.restarts.append(rec)
        self.log("restart client %d by %s: exited in %.2f s, connected %.2f s, routed %.2f s"
                 % (s.idx, rec["signal"], rec["exit_s"], rec["connected_s"], rec["reconnect_s"]))

    def sample(self):
        row = {"t": round(time.monotonic() - self.t0, 1), "gw_rss": rss_bytes(self.gw.pid),
               "gw_fds": fd_count(self.gw.pid),
               "clients": [[rss_bytes(s.proc.pid), fd_count(s.proc.pid)] for s in self.slots]}
        try:
            m = self.metrics()
            row["channels_open"] = m.get("snitun_channels_open")
            row["tunnels"] = m.get("snitun_tunnels_connected")
        except OSError:
            pass
        with self.lock:
            row["completed"] = self.c["completed"]
        self.samples.append(row)

    def sampler(self):
        while not self.stop_evt.wait(self.a.sample_every):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001
                self.log("sample failed: %r" % e)

    # ---- checkpoints ----

    def wait_until(self, t):
        while time.monotonic() < t:
            if self.fatal:
                raise Fatal(self.fatal)
            self.check_alive()
            time.sleep(0.5)

    def drain(self):
        """Wait for every in-flight channel and restart to finish."""
        deadline = time.monotonic() + CHANNEL_MAX_S + 90
        with self.cv:
            while (self.active or self.churn_busy) and time.monotonic() < deadline:
                self.cv.wait(0.5)
            if self.active or self.churn_busy:
                raise Fatal("load did not drain within %.0f s" % (CHANNEL_MAX_S + 90))
        if self.fatal:
            raise Fatal(self.fatal)
        self.check_alive()
        down = [s.idx for s in self.slots if not s.up]
        if down:
            raise Fatal("clients %s are not up at the checkpoint" % down)

    def procs_now(self):
        return [("gateway", self.gw)] + [("client %d" % s.idx, s.proc) for s in self.slots]

    def settle(self, target=None):
        """Idle state: 0 channels open at the gateway and at the endpoint,
        every tunnel connected; then fds stable (or equal to target's), then
        RSS as the median of three reads."""
        t_begin = time.monotonic()
        deadline = t_begin + 60
        m, ep = {}, {}
        while time.monotonic() < deadline:
            m, ep = self.metrics(), self.ep_state()
            if m.get("snitun_channels_open") == 0 and ep.get("open", 0) == 0 and \
                    m.get("snitun_tunnels_connected") == len(self.slots):
                break
            time.sleep(0.25)
        else:
            self.problems.append("not idle 60 s after the load stopped: gateway "
                                 "channels_open=%s tunnels=%s, endpoint open=%s"
                                 % (m.get("snitun_channels_open"),
                                    m.get("snitun_tunnels_connected"), ep.get("open")))
        deadline = time.monotonic() + 30
        history = []
        while True:
            fds = [fd_count(p.pid) for _, p in self.procs_now()]
            history.append(fds)
            if target is not None:
                want = [target["procs"][i]["fds"] for i in range(len(fds))]
                # the gateway and the never-restarted client must come back
                if fds[0] == want[0] and fds[1] == want[1]:
                    break
            elif len(history) >= 4 and history[-1] == history[-2] == history[-3] == history[-4]:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        rss = []
        for _ in range(3):
            rss.append([rss_bytes(p.pid) for _, p in self.procs_now()])
            time.sleep(0.5)
        procs = []
        for i, (label, p) in enumerate(self.procs_now()):
            procs.append({"label": label, "pid": p.pid, "fds": history[-1][i],
                          "rss": int(statistics.median(r[i] for r in rss))})
        return {"t": round(time.monotonic() - self.t0, 1),
                "settle_s": round(time.monotonic() - t_begin, 1), "procs": procs,
                "metrics": {k: v for k, v in self.metrics().items() if v},
                "endpoint": self.ep_state()}

    # ---- the run ----

    def run(self):
        a = self.a
        self.start_endpoint()
        self.start_gateway()
        for s in self.slots:
            self.start_client(s)
        self.t0 = time.monotonic()
        for s in self.slots:
            self.wait_connected(s)
            self.probe(s)
            s.up = True
        self.log("gateway pid %d (%s), %d clients up, endpoint pid %d; work dir %s"
                 % (self.gw.pid, self.engine, len(self.slots), self.ep.pid, self.work))
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True)
                   for i in range(a.workers)]
        churn = threading.Thread(target=self.churn, daemon=True)
        sampler = threading.Thread(target=self.sampler, daemon=True)
        for t in threads + [churn, sampler]:
            t.start()
        self.warmup = max(0.2 * a.duration, 30.0)
        if self.warmup >= a.duration:
            self.warmup = a.duration / 2.0
        self.wait_until(self.t0 + self.warmup)
        self.log("warm-up over: pausing the load for the baseline")
        self.pause_evt.set()
        t_pause = time.monotonic()
        self.drain()
        self.base = self.settle()
        self.base_counts = dict(self.c)
        self.pause_s = time.monotonic() - t_pause
        self.log("baseline: " + ", ".join("%s rss %s fds %d" % (p["label"], mib(p["rss"]),
                                                               p["fds"])
                                          for p in self.base["procs"]))
        with self.cv:
            self.pause_evt.clear()
            self.cv.notify_all()
        next_report = time.monotonic() + 30
        while time.monotonic() < self.t0 + a.duration:
            self.wait_until(min(self.t0 + a.duration, next_report))
            if time.monotonic() >= next_report:
                next_report += 30
                with self.lock:
                    c = dict(self.c)
                self.log("completed %d, aborted %d, tunnel lost %d, failed %d, mismatches %d, "
                         "%.1f MiB moved, restarts %d, gateway rss %s fds %s"
                         % (c.get("completed", 0), c.get("aborted", 0), c.get("tunnel_lost", 0),
                            c.get("failed", 0), c.get("mismatch", 0), c.get("bytes", 0) / MiB,
                            len(self.restarts), mib(rss_bytes(self.gw.pid)),
                            fd_count(self.gw.pid)))
        self.log("duration over: stopping the load")
        self.stop_evt.set()
        with self.cv:
            self.cv.notify_all()
        self.t_load = time.monotonic() - self.t0
        self.drain()
        for t in threads + [churn, sampler]:
            t.join(CHANNEL_MAX_S + 30)
        self.end = self.settle(target=self.base)
        self.log("end: " + ", ".join("%s rss %s fds %d" % (p["label"], mib(p["rss"]), p["fds"])
                                     for p in self.end["procs"]))
        self.stop_all(check=True)

    def stop_all(self, check=False):
        """SIGTERM to every process still running, by PID (SIGKILL after 15 s);
        with check, the exit statuses must be 0."""
        for label, p in [("client %d" % s.idx, s.proc) for s in self.slots if s.proc] + \
                [("gateway", self.gw), ("endpoint", self.ep)]:
            if p is None or p.p.poll() is not None:
                continue
            rc = p.stop(signal.SIGTERM, timeout=15)
            if check and rc != 0:
                self.problems.append("%s exited with %s after SIGTERM" % (label, rc))
        for p in self.procs:                  # restarted clients: already gone
            if p.p.poll() is None:
                p.stop(signal.SIGKILL, timeout=5)

    # ---- verdict and report ----

    def log_findings(self):
        """warn/error lines of every snitun log, by message."""
        out = collections.Counter()
        for p in self.procs:
            if p is self.ep:
                continue
            who = "gateway" if p is self.gw else "client"
            for line in p.text().splitlines():
                m = re.search(r"level=(warn|error) msg=(\"[^\"]*\"|\S+)", line)
                if m:
                    out["%s %s %s" % (who, m.group(1), m.group(2).strip('"'))] += 1
        return dict(out)

    def verdict(self):
        reasons = list(self.problems)
        c = self.c
        if self.fatal:
            reasons.insert(0, "fatal: " + self.fatal.splitlines()[0])
        if c["mismatch"]:
            reasons.append("%d checksum mismatches" % c["mismatch"])
        if c["failed"]:
            reasons.append("%d channels failed without a tunnel restart or a planned abort"
                           % c["failed"])
        if not c["completed"]:
            reasons.append("no transfer completed")
        ep = (self.end or {}).get("endpoint", {}) if self.end else self.ep_state()
        for k, what in (("misrouted", "connections reached the wrong client's endpoint"),
                        ("hello_mismatch", "ClientHellos arrived altered"),
                        ("bad_command", "commands arrived altered"),
                        ("extra_data", "connections carried data after the transfer"),
                        ("timeout", "endpoint connections waited 30-60 s for a close"),
                        ("refused_full", "endpoint connections refused (over 512 open)")):
            if ep.get(k):
                reasons.append("%d %s" % (ep[k], what))
        rows = []
        if self.base and self.end:
            for i, (b, e) in enumerate(zip(self.base["procs"], self.end["procs"])):
                allowed = max(RSS_REL * b["rss"], RSS_ABS)
                growth = e["rss"] - b["rss"]
                judged = i < 2                 # gateway and client 0 (never restarted)
                ok_fd = e["fds"] == b["fds"]
                ok_rss = growth <= allowed
                rows.append({"label": b["label"], "judged": judged, "pid_base": b["pid"],
                             "pid_end": e["pid"], "rss_base": b["rss"], "rss_end": e["rss"],
                             "rss_growth": growth, "rss_allowed": int(allowed),
                             "fds_base": b["fds"], "fds_end": e["fds"],
                             "ok": ok_fd and ok_rss})
                if judged and not ok_fd:
                    reasons.append("%s: fds %d at warm-up, %d at the end"
                                   % (b["label"], b["fds"], e["fds"]))
                if judged and not ok_rss:
                    reasons.append("%s: RSS grew by %s (allowed %s)"
                                   % (b["label"], mib(growth), mib(allowed)))
        elif not self.fatal:
            reasons.append("no resource comparison (the run did not reach its end)")
        return reasons, rows

    def report(self, out_md):
        reasons, rows = self.verdict()
        passed = not reasons
        c = dict(self.c)
        rec = [r["reconnect_s"] for r in self.restarts]
        con = [r["connected_s"] for r in self.restarts]
        gw_peak = max((r["gw_rss"] or 0 for r in self.samples), default=None)
        git = subprocess.run(["git", "-C", SRC, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip() or "?"
        dirty = [l[3:] for l in subprocess.run(
            ["git", "-C", SRC, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True).stdout.splitlines()
            if l[3:].startswith(("crypto/", "core/", "io/", "CMakeLists.txt"))]
        findings = self.log_findings() if self.gw else {}
        data = {
            "pass": passed, "reasons": reasons,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.wall0 or time.time())),
            "commit": git, "dirty": dirty, "binary": self.a.bin, "engine": self.engine,
            "cpus": os.cpu_count(), "kernel": os.uname().release,
            "params": {"duration": self.a.duration, "seed": self.a.seed,
                       "workers": self.a.workers, "restart_every": self.a.restart_every,
                       "abort_rate": self.a.abort_rate, "stall_rate": self.a.stall_rate,
                       "warmup": self.warmup, "clients": [
                           {"idx": s.idx, "name": s.name, "protocol": s.version,
                            "cipher": s.cipher, "restarted": not s.stable, "starts": s.starts}
                           for s in self.slots]},
            "load_seconds": round(self.t_load or 0, 1), "pause_seconds": round(self.pause_s, 1),
            "counts": c, "completed_by_op": dict(self.by_op),
            "aborted_by_kind": dict(self.abort_kinds), "failures": self.failures,
            "mismatches": self.mismatches, "restarts": self.restarts,
            "reconnect_s": {"median": statistics.median(rec) if rec else None,
                            "max": max(rec) if rec else None},
            "connected_s": {"median": statistics.median(con) if con else None,
                            "max": max(con) if con else None},
            "rss_rule": "fds equal; RSS growth <= max(5 %, 4 MiB); judged: gateway, client 0",
            "resources": rows, "gateway_peak_rss": gw_peak,
            "baseline": self.base, "end": self.end, "log_warn_error": findings,
            "samples": self.samples,
        }
        os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
        text = json.dumps({k: v for k, v in data.items() if k != "samples"}, indent=1)
        rows_json = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in self.samples)
        with open(os.path.splitext(out_md)[0] + ".json", "w") as f:
            f.write(text[:-2] + ',\n "samples": [\n' + rows_json + "\n ]\n}\n")
        with open(out_md, "w") as f:
            f.write(self.markdown(data, reasons, rows))
        return passed

    def markdown(self, d, reasons, rows):
        c = d["counts"]
        g = lambda k: c.get(k, 0)  # noqa: E731
        p = d["params"]
        L = []
        L.append("# Soak test: %s" % ("PASS" if d["pass"] else "FAIL"))
        L.append("")
        L.append("%s, commit %s%s, `%s` (engine %s), %d CPUs, Linux %s. Written by "
                 "`tests/soak/soak.py` (`make soak`); the raw figures and the RSS/fd time "
                 "series are in the JSON file next to this one."
                 % (d["date"], d["commit"],
                    " plus uncommitted changes to the binary's sources (%s)"
                    % ", ".join(d["dirty"]) if d["dirty"] else "",
                    d["binary"], d["engine"], d["cpus"], d["kernel"]))
        L.append("")
        L.append("    python3 tests/soak/soak.py --bin %s --duration %d --seed %d"
                 % (d["binary"], p["duration"], p["seed"]))
        L.append("")
        L.append("## Setup")
        L.append("")
        L.append("* `snitun server --threads 2` (default engine), dual port on loopback, "
                 "admin listener for /metrics; %d `snitun client` processes, each with its "
                 "own name and a threaded Python endpoint (sink/source/echo) behind it:"
                 % len(p["clients"]))
        L.append("")
        L.append("  | client | protocol | cipher | token | restarted | processes |")
        L.append("  | --- | --- | --- | --- | --- | --- |")
        for s in p["clients"]:
            L.append("  | %s | %d | %s | %s | %s | %d |"
                     % (s["name"], s["protocol"], s["cipher"],
                        "--token-command (fresh key per connection)" if s["cipher"] == "aes-gcm"
                        else "--token-file", "yes" if s["restarted"] else "never", s["starts"]))
        L.append("")
        L.append("* %d device workers without pause, each channel a real-looking ClientHello "
                 "then raw bytes: up (endpoint returns the SHA-256), down (device checks the "
                 "SHA-256), echo (both) in 35/35/30 %%; sizes 0 B (5 %%) or lognormal "
                 "(median 16 KiB) capped at 8 MiB; after a complete transfer the device or "
                 "(30 %%) the endpoint closes first." % p["workers"])
        L.append("* %.0f %% of the channels aborted on purpose at a random point (device "
                 "close, device RST, endpoint close, endpoint RST); %.0f %% stop reading for "
                 "0.5-3 s." % (100 * p["abort_rate"], 100 * p["stall_rate"]))
        L.append("* Every %.0f s one of the restarted clients is stopped, by SIGKILL and "
                 "SIGTERM in turn, and started again."
                 % p["restart_every"])
        L.append("* Warm-up: the first %.0f s. At its end and at the end of the run the load "
                 "pauses, in-flight channels finish, every tunnel is up and the gateway "
                 "reports 0 open channels; then fds and RSS are read."
                 % p["warmup"])
        L.append("")
        L.append("## Transfers (%.0f s of load)" % d["load_seconds"])
        L.append("")
        L.append("| | channels |")
        L.append("| --- | ---: |")
        L.append("| started | %d |" % g("started"))
        L.append("| completed, SHA-256 verified end to end | %d (up %d, down %d, echo %d) |"
                 % (g("completed"), d["completed_by_op"].get("up", 0),
                    d["completed_by_op"].get("down", 0), d["completed_by_op"].get("echo", 0)))
        L.append("| ... of which stopped reading for a while | %d |" % g("stalled_completed"))
        L.append("| **checksum mismatches** | **%d** |" % g("mismatch"))
        L.append("| aborted on purpose | %d (%s) |"
                 % (g("aborted"), ", ".join("%s %d" % kv for kv in
                                            sorted(d["aborted_by_kind"].items()))))
        L.append("| lost with a restarted tunnel (expected) | %d (in flight %d, opened "
                 "while it was down %d) |" % (g("tunnel_lost"), g("tunnel_lost_inflight"),
                                              g("tunnel_lost_down")))
        L.append("| **failed otherwise** | **%d** |" % g("failed"))
        L.append("")
        L.append("Bytes moved (payload, both directions, at the devices): %.2f GiB, of which "
                 "%.2f GiB in completed transfers; %.1f channels/s on average."
                 % (g("bytes") / (1 << 30), g("bytes_completed") / (1 << 30),
                    g("started") / max(d["load_seconds"], 1)))
        L.append("")
        L.append("## Tunnel restarts")
        L.append("")
        sig = collections.Counter(r["signal"] for r in d["restarts"])
        rs, cs = d["reconnect_s"], d["connected_s"]
        L.append("%d restarts (SIGKILL %d, SIGTERM %d), every one reconnected%s."
                 % (len(d["restarts"]), sig.get("SIGKILL", 0), sig.get("SIGTERM", 0),
                    "" if d["restarts"] else " (none)"))
        if d["restarts"]:
            L.append("Reconnect time, from the signal until a channel is routed through the "
                     "new process: median %.2f s, max %.2f s (until the client logs "
                     "`connected`: median %.2f s, max %.2f s)."
                     % (rs["median"], rs["max"], cs["median"], cs["max"]))
        L.append("")
        L.append("## Resources")
        L.append("")
        L.append("Rule: at the end the fd count must equal the warm-up value (after a settle "
                 "wait) and RSS may grow by at most max(5 %, 4 MiB) (a drop is fine); judged "
                 "for the gateway and for client 0, which is never restarted. The restarted "
                 "clients are new processes at the end, shown for information.")
        L.append("")
        L.append("| process | RSS warm-up | RSS end | change | allowed | fds warm-up | "
                 "fds end | |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in rows:
            L.append("| %s | %s | %s | %+.2f MiB | %s | %d | %d | %s |"
                     % (r["label"], mib(r["rss_base"]), mib(r["rss_end"]),
                        r["rss_growth"] / MiB, mib(r["rss_allowed"]) if r["judged"] else "-",
                        r["fds_base"], r["fds_end"],
                        ("ok" if r["ok"] else "**FAIL**") if r["judged"] else
                        "new process" if r["pid_base"] != r["pid_end"] else "same process"))
        L.append("")
        if d["gateway_peak_rss"]:
            L.append("Gateway peak RSS during the run: %s." % mib(d["gateway_peak_rss"]))
            L.append("")
        L.append("## Logs")
        L.append("")
        if d["log_warn_error"]:
            for k, v in sorted(d["log_warn_error"].items()):
                L.append("* %s: %d" % (k, v))
        else:
            L.append("No warn or error lines from the gateway or any client.")
        L.append("")
        L.append("## Verdict: %s" % ("PASS" if d["pass"] else "FAIL"))
        L.append("")
        if reasons:
            for r in reasons:
                L.append("* " + r)
        else:
            L.append("No checksum mismatch, no unexplained failure, every restart "
                     "reconnected, fds back to their warm-up values, RSS within the rule.")
        if d["failures"]:
            L.append("")
            L.append("First failures:")
            L.append("")
            for f in d["failures"][:10]:
                L.append("* " + json.dumps(f))
        L.append("")
        return "\n".join(L)


def main():
    if "--serve-endpoint" in sys.argv[1:]:
        return endpoint_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description="snitun soak test (see the module docstring)")
    ap.add_argument("--bin", default=os.environ.get("SNITUN_BIN",
                                                    os.path.join(SRC, "build", "snitun")))
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "latest.md"))
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--clients", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--restart-every", type=float, default=15.0)
    ap.add_argument("--abort-rate", type=float, default=0.15)
    ap.add_argument("--stall-rate", type=float, default=0.08)
    ap.add_argument("--sample-every", type=float, default=2.0)
    a = ap.parse_args()
    if not os.access(a.bin, os.X_OK):
        print("no snitun binary at %s (build first, or --bin)" % a.bin, file=sys.stderr)
        return 2
    el = load_e2elib()
    soak = Soak(a, el)
    tempfile.tempdir = soak.work            # every process log goes to the work dir

    def on_term(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    rc = 1
    try:
        try:
            soak.run()
        except Fatal as e:
            soak.fatal = soak.fatal or str(e)
            soak.log("FATAL: %s" % e)
        soak.stop_evt.set()
        soak.stop_all()
        passed = soak.report(a.out)
        print(open(a.out).read())
        print("report: %s (and %s)" % (a.out, os.path.splitext(a.out)[0] + ".json"))
        rc = 0 if passed else 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process, no report written", flush=True)
        rc = 130
    finally:
        soak.stop_evt.set()
        soak.stop_all()
        if rc == 0:
            el.rmtree(soak.work)
        else:
            print("logs kept in %s" % soak.work)
    return rc


if __name__ == "__main__":
    sys.exit(main())
