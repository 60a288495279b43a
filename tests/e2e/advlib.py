"""Helpers for the adversary and fault tests (tests/e2e/test_adversary_*.py,
test_faults.py, test_netem.py). Builds on e2elib.py (gateway process,
tokens, certificates) and protoclient.py (raw tunnel); changes neither.

What is here:

* Runner: the "N passed, M failed" runner with a list of EXPECTED_BUGS:
  a case named there that fails prints a "KNOWN BUG" line (with its
  one-line description and the failure) and does not fail the file; one
  that passes says the bug no longer reproduces. Every known-bug line is
  printed again in the summary, so none is hidden.
* sanitizer checks on a child's log (ASan/UBSan/LSan reports);
* processes: nginx as a TLS endpoint, the real `snitun client`;
* devices: curl downloads hashed on the fly, sockets bound to a chosen
  loopback source address (127.0.0.x) before connect;
* gateway observation: fd count polled until stable, VmRSS, counters;
* ClientHello and PROXY header builders for malformed inputs;
* CountTunnel: a protoclient.Tunnel that counts the frames it writes by
  type, so a test knows what the gateway's frames_received counters must
  show once the tunnel is gone.
"""

import atexit
import hashlib
import os
import re
import resource
import shlex
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

FRAME_LABEL = {P.NEW: "new", P.DATA: "data", P.CLOSE: "close", P.PING: "ping",
               P.PAUSE: "pause", P.RESUME: "resume"}


def _stop_leftovers():
    """At exit, whatever way the script ends: no child of ours outlives it
    (each stopped by its own PID)."""
    for p in L.PROCS:
        try:
            if p.p.poll() is None:
                p.stop(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_stop_leftovers)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# ---- runner with known bugs ---------------------------------------------------

class Runner:
    """run(name, fn, *args): one case. Names in expected_bugs (matched on
    the name without its "<engine>: " prefix, or on the full name) are
    known bugs: a failure is reported, not counted as failed."""

    def __init__(self, expected_bugs=None):
        self.passed = 0
        self.failed = []
        self.skipped = 0
        self.known = []
        self.expected = dict(expected_bugs or {})

    def bug_of(self, name):
        if name in self.expected:
            return self.expected[name]
        short = name.split(": ", 1)[1] if ": " in name else name
        return self.expected.get(short)

    def run(self, name, fn, *args):
        t0 = time.time()
        nprocs = len(L.PROCS)
        try:
            fn(*args)
            err = None
        except Exception as e:  # noqa: BLE001 - every failure is reported
            err = e
            tb = traceback.format_exc()
        return self.record(name, err, time.time() - t0, tb if err else "", nprocs)

    def record(self, name, err, elapsed, tb="", nprocs=None, note=""):
        """Report one case whose outcome is known (err None = passed)."""
        bug = self.bug_of(name)
        if err is None:
            self.passed += 1
            if bug:
                note += " (KNOWN BUG NO LONGER REPRODUCES: %s)" % bug
            print("ok   %s (%.1fs)%s" % (name, elapsed, note), flush=True)
            if nprocs is not None:
                for p in L.PROCS[nprocs:]:
                    if p.p.poll() is not None:
                        p.remove_log()
            return True
        first = ("%s: %s" % (type(err).__name__, err)).splitlines()[0][:300]
        if bug:
            line = "KNOWN BUG %s: %s -- %s" % (name, bug, first)
            self.known.append(line)
            print(line, flush=True)
            return False
        self.failed.append(name)
        print("FAIL %s (%.1fs): %s" % (name, elapsed, first), flush=True)
        if tb:
            print(tb, flush=True)
        if nprocs is not None:
            for p in L.PROCS[nprocs:]:
                p.keep = True
                print("---- %s (log kept: %s), last lines:" % (p.argv[0], p.logpath))
                print("\n".join(p.text().splitlines()[-25:]), flush=True)
        return False

    def skip(self, name, why):
        self.skipped += 1
        print("skip %s: %s" % (name, why), flush=True)

    def finish(self):
        for p in L.PROCS:
            if p.p.poll() is not None:
                p.remove_log()
        for line in self.known:
            print(line)
        tail = ""
        if self.skipped:
            tail += ", %d skipped" % self.skipped
        if self.known:
            tail += ", %d known bugs" % len(self.known)
        print("%d passed, %d failed%s" % (self.passed, len(self.failed), tail), flush=True)
        if self.failed:
            print("failed: " + ", ".join(self.failed))
        sys.exit(1 if self.failed else 0)


# ---- sanitizers ---------------------------------------------------------------------

SAN_RE = re.compile(r"(ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                    r"WARNING: ThreadSanitizer|SUMMARY: \w+Sanitizer)")


def sanitizer_report(text):
    """The lines of a sanitizer report in a child's output, or ''."""
    lines = [ln for ln in text.splitlines() if SAN_RE.search(ln)]
    return "\n".join(lines[:10])


def check_no_sanitizer(proc, who=None):
    rep = sanitizer_report(proc.text())
    check(not rep, "sanitizer report in %s's output:\n%s" % (who or proc.argv[0], rep))


# ---- limits and /proc ---------------------------------------------------------------

def raise_nofile(want=20000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def wait_fds(pid, base, timeout=10.0, stable=0.5):
    """Poll until the process has exactly `base` fds for `stable` seconds;
    returns the last count seen (== base on success)."""
    deadline = time.time() + timeout
    since = None
    n = fd_count(pid)
    while time.time() < deadline:
        n = fd_count(pid)
        if n == base:
            since = since or time.time()
            if time.time() - since >= stable:
                return n
        else:
            since = None
        time.sleep(0.05)
    return n


def stable_fds(pid, stable=0.5, timeout=5.0):
    """The fd count once it has not changed for `stable` seconds (a
    baseline must not include a connection that is still being closed)."""
    deadline = time.time() + timeout
    n = fd_count(pid)
    since = time.time()
    while time.time() < deadline:
        time.sleep(0.05)
        m = fd_count(pid)
        if m != n:
            n, since = m, time.time()
        elif time.time() - since >= stable:
            break
    return n


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---- sockets ---------------------------------------------------------------------------

def connect_from(src, host, port, timeout=5.0):
    """TCP connection to host:port from the loopback address src."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    s.bind((src, 0))
    s.connect((host, port))
    return s


def closed_silently(sock, timeout):
    """(closed with nothing received, seconds until then)."""
    t0 = time.time()
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True, time.time() - t0
    except socket.timeout:
        return False, time.time() - t0
    return data == b"", time.time() - t0


def still_open(sock, wait):
    """True when nothing arrives and the peer does not close for wait s."""
    sock.settimeout(wait)
    try:
        data = sock.recv(1)
    except socket.timeout:
        return True
    except OSError:
        return False
    return False if data == b"" else None


# ---- metrics ------------------------------------------------------------------------------

def parse_metrics(text):
    """{'name{labels}': value} for every series of a /metrics page."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            pass
    return out


def series(name, labels=""):
    return name + ("{" + labels + "}" if labels else "")


def snapshot(gw):
    return parse_metrics(gw.metrics())


def wait_settled(gw, nprobes, timeout=5.0):
    """L.Gateway probes each listener with a connect + close; wait until
    those show up as eof rejects, so a baseline taken now is final."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = snapshot(gw)
        n = sum(v for k, v in m.items() if k.endswith('="eof"}') and (
            k.startswith("snitun_sni_rejects_total") or k.startswith("snitun_handshakes_total")
            or k.startswith("snitun_proxy_rejects_total")))
        if n >= nprobes:
            return m
        time.sleep(0.05)
    return snapshot(gw)


# ---- endpoint: nginx ----------------------------------------------------------------------

def listening(pid, port):
    """True when the network namespace of process pid has a TCP socket
    listening on port (read from /proc/pid/net/tcp, so it works for a
    process in another namespace too)."""
    for name in ("tcp", "tcp6"):
        try:
            with open("/proc/%d/net/%s" % (pid, name)) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except OSError:
            pass
    return False


def wait_listen(proc, port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.p.poll() is not None:
            raise RuntimeError("%s exited with %d" % (proc.argv[0], proc.p.returncode))
        if listening(proc.pid, port):
            return
        time.sleep(0.05)
    raise TimeoutError("port %d not listening" % port)


class Nginx(L.Proc):
    """nginx (one worker) serving docroot over TLS on 127.0.0.1:port.
    prefix: argv prefix (e.g. ip netns exec NS) to run it elsewhere."""

    def __init__(self, workdir, cert, key, docroot, port=None, prefix=()):
        self.port = port or L.free_port()
        self.dir = os.path.join(workdir, "nginx-%d" % self.port)
        os.makedirs(self.dir, exist_ok=True)
        conf = os.path.join(self.dir, "nginx.conf")
        d = self.dir
        with open(conf, "w") as f:
            f.write("""worker_processes 1;
%s
error_log %s/error.log;
pid %s/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  client_body_temp_path %s/b; proxy_temp_path %s/p; fastcgi_temp_path %s/f;
  uwsgi_temp_path %s/u; scgi_temp_path %s/s;
  keepalive_timeout 5;
  server {
    listen 127.0.0.1:%d ssl;
    ssl_certificate %s;
    ssl_certificate_key %s;
    root %s;
    location / { }
  }
}
""" % ("user root;" if os.geteuid() == 0 else "", d, d, d, d, d, d, d, self.port, cert, key,
       docroot))
        super().__init__(list(prefix) + ["nginx", "-p", d, "-c", conf, "-g", "daemon off;"],
                         "nginx")
        if prefix:
            wait_listen(self, self.port)
        else:
            L.wait_port("127.0.0.1", self.port, proc=self.p)


# ---- the real client -----------------------------------------------------------------------

def token_command(hostname, aliases=(), version=2, cipher="aes-cbc", fernet_key=L.K1,
                  valid_for=3600):
    """A --token-command that issues a fresh token (and key) every time."""
    argv = [L.BIN, "token", "issue", "--fernet-key", fernet_key, "--hostname", hostname,
            "--protocol-version", str(version), "--cipher", cipher, "--valid-for",
            str(valid_for)]
    for a in aliases:
        argv += ["--alias", a]
    return " ".join(shlex.quote(a) for a in argv)


class Client(L.Proc):
    """`snitun client` with its log in a file (e2elib.Proc)."""

    def __init__(self, server, endpoint, hostname, io="epoll", aliases=(), version=2,
                 cipher="aes-cbc", routes=(), extra=(), admin=True, prefix=(),
                 connect_timeout=5):
        argv = list(prefix) + [
            L.BIN, "client", "--server", server, "--endpoint", endpoint, "--io", io,
            "--token-command", token_command(hostname, aliases, version, cipher),
            "--backoff-min", "1", "--backoff-max", "1", "--connect-timeout", str(connect_timeout),
            "--log-level", "debug"]
        for name, addr in routes:
            argv += ["--route", "%s=%s" % (name, addr)]
        self.admin_port = L.free_port() if admin else None
        if admin:
            argv += ["--admin-listen", "127.0.0.1:%d" % self.admin_port]
        argv += list(extra)
        self.hostname = hostname
        super().__init__(argv, "snitun-client")

    def connected(self):
        return len(re.findall(r"msg=connected", self.text()))

    def wait_connected(self, count=1, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline and self.p.poll() is None and self.connected() < count:
            time.sleep(0.05)
        check(self.connected() >= count,
              "client not connected (%d times) within %.0fs; log tail:\n%s"
              % (count, timeout, "\n".join(self.text().splitlines()[-15:])))

    def metrics(self):
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.admin_port,
                                    timeout=5) as r:
            return parse_metrics(r.read().decode())


# ---- devices: curl -------------------------------------------------------------------------

def curl_get(name, port, path, cacert, host="127.0.0.1", timeout=60, limit_rate=None,
             extra=(), max_bytes=None, prefix=()):
    """Download https://name:port/path through the gateway, hashing on the
    fly. Returns dict(rc, size, sha256, seconds, err); with max_bytes, it
    returns dict(proc, size, t0) once that much has arrived."""
    argv = list(prefix) + ["curl", "-sS", "--max-time", str(timeout), "--cacert", cacert,
                           "--resolve",
            "%s:%d:%s" % (name, port, host), "-o", "-"]
    if limit_rate:
        argv += ["--limit-rate", str(limit_rate)]
    argv += list(extra) + ["https://%s:%d/%s" % (name, port, path)]
    t0 = time.time()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    h = hashlib.sha256()
    size = 0
    while True:
        chunk = p.stdout.read(1 << 20)
        if not chunk:
            break
        h.update(chunk)
        size += len(chunk)
        if max_bytes is not None and size >= max_bytes:
            break
    if max_bytes is not None and size >= max_bytes:
        return {"proc": p, "size": size, "t0": t0}
    err = p.stderr.read().decode(errors="replace").strip()
    rc = p.wait()
    return {"rc": rc, "size": size, "sha256": h.hexdigest(), "seconds": time.time() - t0,
            "err": err}


class Downloader:
    """Repeats a download in a thread until stop(); every result kept."""

    def __init__(self, name, port, path, cacert, want_sha, want_size, limit_rate=None):
        self.args = (name, port, path, cacert)
        self.want = (want_sha, want_size)
        self.limit_rate = limit_rate
        self.results = []
        self.stopping = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while not self.stopping.is_set():
            r = curl_get(*self.args, timeout=120, limit_rate=self.limit_rate)
            self.results.append(r)

    def stop(self, timeout=150):
        self.stopping.set()
        self.t.join(timeout)
        check(not self.t.is_alive(), "downloader did not finish")

    def verdict(self):
        """(good transfers, bytes, seconds); raises on any bad one."""
        check(self.results, "no transfer finished")
        for i, r in enumerate(self.results):
            check(r["rc"] == 0, "transfer %d: curl rc %d (%s) after %d bytes"
                  % (i, r["rc"], r["err"], r["size"]))
            check(r["size"] == self.want[1] and r["sha256"] == self.want[0],
                  "transfer %d: %d bytes, sha256 %s: body corrupted" % (i, r["size"],
                                                                        r["sha256"][:16]))
        return (len(self.results), sum(r["size"] for r in self.results),
                sum(r["seconds"] for r in self.results))


def mib_s(nbytes, seconds):
    return nbytes / (1 << 20) / max(seconds, 1e-6)


# ---- malformed TLS and PROXY input -------------------------------------------------------

def client_hello(name=b"example.com", name_len=None, hs_type=1, version=b"\x03\x01",
                 sni=True, name_type=0, frag=None, list_len_delta=0, padding=0, cs_pad=0):
    """A TLS 1.2-style ClientHello. name: bytes; name_len: declared length
    (default len(name)); frag: split the handshake over records of at most
    frag bytes; padding: an extra extension of that many bytes."""
    body = b"\x03\x03" + os.urandom(32) + b"\x20" + os.urandom(32)
    cs = b"\x13\x01\xc0\x2f" + b"\x00\xff" * (cs_pad // 2)
    body += struct.pack(">H", len(cs)) + cs + b"\x01\x00"
    exts = b""
    if sni:
        nl = len(name) if name_len is None else name_len
        entry = bytes([name_type]) + struct.pack(">H", nl) + name
        sn = struct.pack(">H", len(entry) + list_len_delta) + entry
        exts += b"\x00\x00" + struct.pack(">H", len(sn)) + sn
    exts += b"\x00\x0a\x00\x04\x00\x02\x00\x1d"          # supported_groups x25519
    exts += b"\x00\x0d\x00\x04\x00\x02\x04\x03"          # signature_algorithms
    while padding > 0:
        n = min(padding, 60000)
        exts += b"\x00\x15" + struct.pack(">H", n) + bytes(n)
        padding -= n
    body += struct.pack(">H", len(exts)) + exts
    hs = bytes([hs_type]) + len(body).to_bytes(3, "big") + body
    return records(hs, version, frag)


def records(hs, version=b"\x03\x01", frag=None):
    frag = frag or 16384
    out = b""
    for i in range(0, len(hs), frag):
        piece = hs[i:i + frag]
        out += b"\x16" + version + struct.pack(">H", len(piece)) + piece
    return out


PP2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(ver_cmd=0x21, fam=0x11, block=None, length=None):
    if block is None:
        block = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack(">HH", 5555, 443)
    ln = len(block) if length is None else length
    return PP2_SIG + bytes([ver_cmd, fam]) + struct.pack(">H", ln) + block


# ---- a counting raw tunnel -----------------------------------------------------------------

class CountTunnel(P.Tunnel):
    """protoclient.Tunnel that counts the frames it seals, by type label."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent = {}
        self.ping_requests = 0   # PINGs that are not "pong": each gets a pong

    def frame_bytes(self, fid, flow, data=b"", extra=None):
        lab = FRAME_LABEL.get(flow, "unknown")
        self.sent[lab] = self.sent.get(lab, 0) + 1
        if flow == P.PING and (extra is None or extra[:4] != b"pong"):
            self.ping_requests += 1
        return super().frame_bytes(fid, flow, data, extra)

    def uncount_ping(self):
        """The last PING request will not be decoded by the peer."""
        self.sent["ping"] -= 1
        self.ping_requests -= 1

    def raw_header(self, fid, flow, size, extra=None):
        """A sealed header with an arbitrary SIZE (no data appended), not
        counted: the caller says whether the gateway will count it."""
        extra = (extra or os.urandom(11))[:11].ljust(11, b"\0")
        return self.seal.seal(fid + bytes([flow]) + struct.pack(">I", size) + extra)

    def count(self, label, n=1):
        self.sent[label] = self.sent.get(label, 0) + n


def open_tunnel(port, hostname, cipher="aes-cbc", version=2, src="127.0.0.1", timeout=5.0,
                key=None, iv=None, **hs):
    """A CountTunnel through the handshake (token from `snitun token issue`)."""
    key = key or os.urandom(32).hex()
    iv = iv or os.urandom(16).hex()
    tok = L.issue_token(hostname, version=version, cipher=cipher, key=key, iv=iv)
    s = connect_from(src, "127.0.0.1", port, timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = CountTunnel(s, cipher, bytes.fromhex(key), bytes.fromhex(iv), version)
    t.handshake(tok, timeout, **hs)
    return t


def ping_ok(t, timeout=5.0):
    """Send a PING; the next frame must be its pong."""
    pid = t.send_ping()
    f = t.recv_frame(timeout)
    check(f.flow == P.PING and f.id == pid and f.extra[:4] == b"pong",
          "pong with the request's id expected, got %r" % f)
