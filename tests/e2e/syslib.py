"""tests/e2e/syslib.py - helpers for the whole-system tests (test_system_*.py):
the real `snitun server` and `snitun client` on both ends of the tunnel, a
real TLS endpoint (nginx, private prefix, run as a child) and real TLS
devices (curl, or Python ssl for many parallel connections).

    device --TLS--> snitun server ==tunnel== snitun client --> nginx

Pieces:
* Snitun: a snitun process (e2elib.Proc) whose log is scanned for sanitizer
  reports when it stops (ASan+UBSan builds); Gateway and Client on top.
* Nginx: nginx in the foreground with a private prefix in a temp dir:
  a file server (1 B, 64 KiB, 64 MiB random files, sha256 known), "tagged"
  servers answering "ep-<i> <sni>" (one port each, so a response names the
  endpoint it came from) and a `proxy_protocol` server answering
  $proxy_protocol_addr.
* Devices: HttpsConn / https_get (Python ssl, streaming sha256, optional
  small receive buffer and paced reads), curl_get (curl with --resolve),
  parallel() (a thread pool returning results or exceptions).
* Tokens: token JSON through `snitun token issue` (fresh AES key material),
  token files, a --token-command that counts its runs in a file.
* settle_fds(): poll /proc/PID/fd until it reaches a target (or is stable).

Every process is stopped by its own PID. Nothing here is a test by itself.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as el  # noqa: E402

BIN = el.BIN
FKEY = el.K1
DOMAIN = "sys.test"
MiB = 1 << 20
SANITIZER_MARKS = ("Sanitizer", "runtime error:")

free_port = el.free_port
wait_port = el.wait_port
Runner = el.Runner


def name(label):
    """A host name under the test domain (the certificate covers *.sys.test)."""
    return "%s.%s" % (label, DOMAIN)


def engines():
    """--io engines to run each scenario with: uring (unless the kernel
    disables it) and epoll; SNITUN_E2E_ENGINES narrows the list."""
    out = []
    for e in el.engines():
        if e == "uring":
            try:
                with open("/proc/sys/kernel/io_uring_disabled") as f:
                    if f.read().strip() not in ("", "0"):
                        print("skip uring: kernel.io_uring_disabled is set", flush=True)
                        continue
            except OSError:
                pass
        out.append(e)
    return out


def is_asan():
    """True when $SNITUN_BIN is linked with AddressSanitizer (longer bounds)."""
    try:
        r = subprocess.run(["ldd", BIN], capture_output=True, text=True, timeout=10)
        return "libasan" in r.stdout
    except (OSError, subprocess.SubprocessError):
        return False


ASAN = is_asan()


# ---- snitun processes ----------------------------------------------------------

class Snitun(el.Proc):
    """A snitun process; stop() fails on a sanitizer report in its log or an
    unexpected exit status."""

    def __init__(self, argv, logname, env=None):
        self.checked = False
        self.signalled = False
        self.stopped = False
        super().__init__(argv, logname, env=env)

    def sanitizer_report(self):
        """The first sanitizer report in the log (its first 16 lines), or
        None."""
        lines = self.text().splitlines()
        for i, l in enumerate(lines):
            if any(m in l for m in SANITIZER_MARKS):
                return "\n".join(lines[i:i + 16])
        return None

    def check_sanitizer(self):
        bad = self.sanitizer_report()
        if bad and not self.checked:
            self.checked = True
            raise AssertionError("sanitizer report from snitun %s (log %s):\n%s"
                                 % (self.argv[1], self.logpath, bad))

    def alive(self):
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=15.0, expect_rc=0):
        """Stop by PID; check the log for sanitizer reports; check the exit
        status (expect_rc None: any)."""
        if self.stopped:                    # stopped and checked before
            return self.p.returncode
        self.stopped = True
        was_running = self.p.poll() is None
        if self.signalled and sig == signal.SIGTERM:
            # stop_all() sent it already: a second SIGTERM means "stop now"
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = super().stop(sig, timeout)
        self.check_sanitizer()
        if expect_rc is not None and rc != expect_rc and not self.checked:
            self.checked = True
            raise AssertionError("%s exited with %s (expected %s, %s signal)"
                                 % (" ".join(self.argv[:2]), rc, expect_rc,
                                    "after a" if was_running else "without"))
        return rc

    def kill(self):
        """SIGKILL (a crash, as far as the peer can tell)."""
        return self.stop(signal.SIGKILL, expect_rc=None)

    def count(self, pattern):
        return len(re.findall(pattern, self.text()))

    def fds(self):
        return el.fd_count(self.pid)


def metrics_text(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        return r.read().decode()


def metric_value(text, name, labels=None):
    """Sum of the series of `name` whose labels include every k=v of labels
    (a dict); None when no series matches."""
    total = None
    for m in re.finditer(r"^%s(\{[^}]*\})? (\S+)$" % re.escape(name), text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if labels and any(have.get(k) != v for k, v in labels.items()):
            continue
        total = (total or 0.0) + float(m.group(2))
    return total


class AdminMixin:
    admin_port = None

    def metrics(self):
        return metrics_text(self.admin_port)

    def metric(self, name, labels=None):
        return metric_value(self.metrics(), name, labels)

    def wait_metric(self, name, pred, timeout=10.0, labels=None):
        """Poll a metric until pred(value) holds; returns the last value."""
        deadline = time.time() + timeout
        v = None
        while time.time() < deadline:
            v = self.metric(name, labels)
            if v is not None and pred(v):
                return v
            time.sleep(0.1)
        return v


class Gateway(Snitun, AdminMixin):
    """`snitun server`. mode "dual": devices on 127.0.0.1:sni_port and
    [::1]:sni_port, tunnels on 127.0.0.1:peer_port; mode "single": both on
    127.0.0.1:port and [::1]:port (sni_port == peer_port)."""

    def __init__(self, io, mode="dual", threads=1, extra=(), sni_port=None, peer_port=None,
                 admin=True, log_level="info"):
        self.io, self.mode, self.threads, self.extra = io, mode, threads, list(extra)
        self.sni_port = sni_port or free_port()
        if mode == "single":
            self.peer_port = self.sni_port
            listen = [("listen", "127.0.0.1:%d" % self.sni_port),
                      ("listen", "[::1]:%d" % self.sni_port)]
        else:
            self.peer_port = peer_port or free_port()
            listen = [("sni-listen", "127.0.0.1:%d" % self.sni_port),
                      ("sni-listen", "[::1]:%d" % self.sni_port),
                      ("peer-listen", "127.0.0.1:%d" % self.peer_port)]
        argv = [BIN, "server", "--io", io, "--threads", str(threads), "--log-level", log_level,
                "--fernet-key", FKEY]
        for flag, addr in listen:
            argv += ["--" + flag, addr]
        if admin:
            self.admin_port = free_port()
            argv += ["--admin-listen", "127.0.0.1:%d" % self.admin_port]
        argv += list(extra)
        super().__init__(argv, "sys-gw")
        if not self.wait_log(r"msg\"?[=:]\"?gateway started", timeout=20 if ASAN else 10):
            self.stop(expect_rc=None)
            raise AssertionError("gateway did not start:\n" + self.text()[-3000:])
        if admin:
            wait_port("127.0.0.1", self.admin_port, proc=self.p)

    @property
    def server(self):
        """What the client's --server takes."""
        return "127.0.0.1:%d" % self.peer_port

    def restart(self):
        """A new gateway on the same ports (after this one stopped)."""
        return Gateway(self.io, self.mode, self.threads, self.extra, self.sni_port,
                       self.peer_port, admin=self.admin_port is not None)


class Client(Snitun, AdminMixin):
    """`snitun client` with the given token source ("--token-file", path)
    or ("--token-command", cmd)."""

    def __init__(self, io, server, endpoint, token, extra=(), admin=False, log_level="info"):
        argv = [BIN, "client", "--io", io, "--server", server, "--endpoint", endpoint,
                "--log-level", log_level, token[0], token[1]]
        if admin:
            self.admin_port = free_port()
            argv += ["--admin-listen", "127.0.0.1:%d" % self.admin_port]
        argv += list(extra)
        super().__init__(argv, "sys-cl")

    def wait_connected(self, count=1, timeout=None):
        timeout = timeout or (20 if ASAN else 10)
        if not self.wait_log(r"msg\"?[=:]\"?connected\b", timeout=timeout, count=count):
            raise AssertionError("client not connected (%d times) within %.0f s:\n%s"
                                 % (count, timeout, self.text()[-3000:]))

    def connected_count(self):
        return self.count(r"msg\"?[=:]\"?connected\b")

    def disconnected_count(self):
        return self.count(r"msg\"?[=:]\"?disconnected\b")


# ---- tokens ----------------------------------------------------------------------

def token_json(hostname, aliases=(), version=2, cipher="aes-cbc", valid_for=3600):
    """The JSON `snitun token issue` prints (fresh AES key and IV)."""
    argv = [BIN, "token", "issue", "--fernet-key", FKEY, "--hostname", hostname,
            "--protocol-version", str(version), "--cipher", cipher, "--valid-for", str(valid_for)]
    for a in aliases:
        argv += ["--alias", a]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout
    json.loads(out)
    return out


def token_file(dirpath, hostname, aliases=(), version=2, cipher="aes-cbc", valid_for=3600):
    """("--token-file", path) for Client."""
    path = os.path.join(dirpath, "tok-%s-%d.json" % (hostname, int(time.time() * 1e6)))
    with open(path, "w") as f:
        f.write(token_json(hostname, aliases, version, cipher, valid_for))
    return ("--token-file", path)


def token_command(counter, hostname, aliases=(), version=2, cipher="aes-cbc", valid_for=3600):
    """("--token-command", cmd): cmd adds 1 to the number in the file
    `counter` and prints a fresh token."""
    issue = [BIN, "token", "issue", "--fernet-key", FKEY, "--hostname", hostname,
             "--protocol-version", str(version), "--cipher", cipher, "--valid-for",
             str(valid_for)]
    for a in aliases:
        issue += ["--alias", a]
    c = shlex.quote(counter)
    cmd = ("n=$(cat %s 2>/dev/null || echo 0); echo $((n+1)) > %s; exec %s"
           % (c, c, " ".join(shlex.quote(x) for x in issue)))
    return ("--token-command", cmd)


def read_counter(path):
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except OSError:
        return 0


# ---- certificates and nginx -------------------------------------------------------

def make_cert(dirpath):
    """A self-signed certificate for sys.test and *.sys.test: (cert, key)."""
    return el.make_cert(dirpath, [DOMAIN, "*." + DOMAIN])


def make_files(docroot, sizes):
    """Random files named <size>.bin; returns {path: (size, sha256 hex)}."""
    os.makedirs(docroot, exist_ok=True)
    out = {}
    for size in sizes:
        data = os.urandom(size)
        fname = "%d.bin" % size
        with open(os.path.join(docroot, fname), "wb") as f:
            f.write(data)
        out["/" + fname] = (size, hashlib.sha256(data).hexdigest())
    return out


NGINX_CONF = """
%(user)s
worker_processes %(workers)d;
daemon off;
master_process on;
pid %(prefix)s/nginx.pid;
error_log %(prefix)s/error.log warn;
worker_rlimit_nofile 8192;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(prefix)s/tmp/body;
    proxy_temp_path %(prefix)s/tmp/proxy;
    fastcgi_temp_path %(prefix)s/tmp/fastcgi;
    uwsgi_temp_path %(prefix)s/tmp/uwsgi;
    scgi_temp_path %(prefix)s/tmp/scgi;
    types { application/octet-stream bin; }
    default_type text/plain;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65;
    send_timeout 120s;
    ssl_certificate %(cert)s;
    ssl_certificate_key %(key)s;
    ssl_protocols TLSv1.2 TLSv1.3;
%(servers)s
}
"""


class Nginx:
    """nginx on 127.0.0.1 with a private prefix:
    * port: files of docroot (GET /<size>.bin), /sni answers the SNI name;
    * tag_ports[i]: every path answers "ep-<i> <sni>\\n";
    * proxy_port (proxy=True): `listen ... ssl proxy_protocol`, every path
      answers "<$proxy_protocol_addr>\\n".
    Ports survive stop()/start(), so a restart comes back on the same ones."""

    def __init__(self, workdir, cert, key, docroot=None, tagged=0, proxy=False, workers=2,
                 label="nginx"):
        self.prefix = os.path.join(workdir, "%s-%d" % (label, free_port()))
        for d in ("tmp", "www"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        self.docroot = docroot or os.path.join(self.prefix, "www")
        self.port = free_port()
        self.tag_ports = [free_port() for _ in range(tagged)]
        self.proxy_port = free_port() if proxy else None
        servers = ["    server { listen 127.0.0.1:%d ssl; root %s; location / { }\n"
                   "             location = /sni { return 200 \"$ssl_server_name\\n\"; } }"
                   % (self.port, self.docroot)]
        for i, p in enumerate(self.tag_ports):
            servers.append("    server { listen 127.0.0.1:%d ssl; location / "
                           "{ return 200 \"ep-%d $ssl_server_name\\n\"; } }" % (p, i))
        if proxy:
            servers.append("    server { listen 127.0.0.1:%d ssl proxy_protocol; location / "
                           "{ return 200 \"$proxy_protocol_addr\\n\"; } }" % self.proxy_port)
        self.conf = os.path.join(self.prefix, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(NGINX_CONF % {
                "user": "user root;" if os.geteuid() == 0 else "", "workers": workers,
                "prefix": self.prefix, "cert": cert, "key": key, "servers": "\n".join(servers)})
        self.proc = None
        self.start()

    def ports(self):
        return [self.port] + self.tag_ports + ([self.proxy_port] if self.proxy_port else [])

    def start(self):
        nginx = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else "nginx"
        self.proc = el.Proc([nginx, "-p", self.prefix, "-c", self.conf, "-e",
                             os.path.join(self.prefix, "error.log")], "sys-nginx")
        for p in self.ports():
            wait_port("127.0.0.1", p, proc=self.proc.p)

    def stop(self):
        """Fast shutdown (SIGTERM to the master); returns when every port is
        closed."""
        if self.proc is not None:
            self.proc.stop()
            self.proc.remove_log()
            self.proc = None

    def addr(self, port=None):
        return "127.0.0.1:%d" % (port or self.port)


# ---- devices ------------------------------------------------------------------------

def ssl_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    return ctx


class HttpError(AssertionError):
    pass


class HttpsConn:
    """One HTTPS GET over Python ssl, read in steps: connect() (TCP + TLS
    handshake), request(path), head(), then body(limit) as often as wanted.
    The body is hashed as it streams; the first keep bytes are kept."""

    def __init__(self, sni, port, cafile, host="127.0.0.1", timeout=30.0, rcvbuf=0, keep=4096):
        self.sni, self.port, self.host = sni, port, host
        self.ctx = ssl_context(cafile) if isinstance(cafile, str) else cafile
        self.timeout, self.rcvbuf, self.keep = timeout, rcvbuf, keep
        self.sock = None
        self.buf = b""
        self.status = None
        self.length = None
        self.got = 0
        self.sha = hashlib.sha256()
        self.kept = b""
        self.t0 = None

    def connect(self):
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        raw = socket.socket(fam, socket.SOCK_STREAM)
        if self.rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        raw.settimeout(self.timeout)
        try:
            raw.connect((self.host, self.port))
            self.sock = self.ctx.wrap_socket(raw, server_hostname=self.sni)
        except BaseException:
            raw.close()
            raise
        return self

    def request(self, path):
        self.t0 = time.monotonic()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                           % (path, self.sni)).encode())
        return self

    def head(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HttpError("EOF before the response head (%d bytes)" % len(self.buf))
            self.buf += chunk
            if len(self.buf) > 65536:
                raise HttpError("response head too long")
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        for l in lines[1:]:
            k, _, v = l.partition(":")
            if k.strip().lower() == "content-length":
                self.length = int(v.strip())
        self.buf = b""
        self._take(rest)
        return self.status

    def _take(self, data):
        self.sha.update(data)
        if len(self.kept) < self.keep:
            self.kept += data[:self.keep - len(self.kept)]
        self.got += len(data)

    def body(self, limit=None, chunk=256 * 1024):
        """Read until the body is complete (or `limit` more bytes); returns
        True once complete."""
        stop_at = None if limit is None else self.got + limit
        while self.length is None or self.got < self.length:
            if stop_at is not None and self.got >= stop_at:
                return False
            want = chunk if stop_at is None else min(chunk, stop_at - self.got)
            if self.length is not None:
                want = min(want, self.length - self.got)
            data = self.sock.recv(want)
            if not data:
                if self.length is None:
                    return True
                raise HttpError("EOF after %d of %d body bytes" % (self.got, self.length))
            self._take(data)
        return True

    def digest(self):
        return self.sha.hexdigest()

    def seconds(self):
        return time.monotonic() - self.t0

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class Result:
    def __init__(self, c):
        self.status, self.length, self.got = c.status, c.length, c.got
        self.sha, self.body, self.seconds = c.digest(), c.kept, c.seconds()

    def mbps(self):
        return self.got / MiB / max(self.seconds, 1e-6)


def https_get(sni, port, path, cafile, host="127.0.0.1", timeout=30.0, rcvbuf=0):
    """GET https://sni:port/path at host; a Result (raises on any error)."""
    c = HttpsConn(sni, port, cafile, host, timeout, rcvbuf)
    try:
        c.connect().request(path).head()
        c.body()
        return Result(c)
    finally:
        c.close()


def expect_file(res, files, path):
    size, sha = files[path]
    if res.status != 200 or res.got != size or res.sha != sha:
        raise AssertionError("GET %s: status %s, %d of %d bytes, sha %s (want %s)"
                             % (path, res.status, res.got, size, res.sha[:16], sha[:16]))


def refused(sni, port, cafile, host="127.0.0.1", timeout=10.0):
    """True when a TLS handshake through the gateway fails because the
    connection is closed (no tunnel, ACL refusal, endpoint down); raises if
    the handshake succeeds or nothing happens within timeout."""
    c = HttpsConn(sni, port, cafile, host, timeout)
    t0 = time.monotonic()
    try:
        c.connect()
    except (ssl.SSLError, ConnectionError, OSError) as e:
        if isinstance(e, socket.timeout) or "timed out" in str(e):
            raise AssertionError("handshake neither completed nor refused in %.0f s" % timeout)
        return time.monotonic() - t0
    finally:
        c.close()
    raise AssertionError("TLS handshake with %s succeeded, expected a refusal" % sni)


def curl_get(sni, port, path, cafile, outpath, host="127.0.0.1", timeout=60):
    """curl https://sni:port/path with --resolve to host; returns
    (rc, http_code, size, bytes_per_second, sha256 hex of the file)."""
    h = "[%s]" % host if ":" in host else host
    r = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "--cacert", cafile,
                        "--resolve", "%s:%d:%s" % (sni, port, h), "-o", outpath, "-w",
                        "%{http_code} %{size_download} %{speed_download}",
                        "https://%s:%d%s" % (sni, port, path)],
                       capture_output=True, text=True, timeout=timeout + 10)
    code, size, speed = (r.stdout.split() + ["0", "0", "0"])[:3]
    sha = ""
    if os.path.exists(outpath):
        h = hashlib.sha256()
        with open(outpath, "rb") as f:
            for block in iter(lambda: f.read(MiB), b""):
                h.update(block)
        sha = h.hexdigest()
        os.unlink(outpath)
    return r.returncode, int(code), int(float(size)), float(speed), sha, r.stderr.strip()


def parallel(fns, workers=None):
    """Run the callables at once; a list of results or the exceptions they
    raised, in order."""
    workers = workers or len(fns)
    out = [None] * len(fns)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
        futs = {ex.submit(f): i for i, f in enumerate(fns)}
        for fu in concurrent.futures.as_completed(futs):
            i = futs[fu]
            try:
                out[i] = fu.result()
            except Exception as e:  # noqa: BLE001 - the caller reports them
                out[i] = e
    return out


def errors(results):
    return [r for r in results if isinstance(r, BaseException)]


# ---- fds ---------------------------------------------------------------------------

def settle_fds(pid, target=None, timeout=15.0, stable_for=1.0):
    """Poll /proc/PID/fd: returns as soon as the count equals target, or
    (target None) once it has not changed for stable_for seconds; else the
    last count when timeout ends."""
    deadline = time.time() + timeout
    last, since = el.fd_count(pid), time.time()
    while time.time() < deadline:
        n = el.fd_count(pid)
        if target is not None and n == target:
            return n
        if n != last:
            last, since = n, time.time()
        elif target is None and time.time() - since >= stable_for:
            return n
        time.sleep(0.1)
    return last


def fd_list(pid):
    """readlink of every fd, for a failure message."""
    out = []
    d = "/proc/%d/fd" % pid
    for fd in sorted(os.listdir(d), key=int):
        try:
            out.append("%s -> %s" % (fd, os.readlink(os.path.join(d, fd))))
        except OSError:
            pass
    return out


def report(line):
    """An informational figure in the test output (never asserted)."""
    print("  # " + line, flush=True)


# ---- process groups -----------------------------------------------------------------

class Group:
    """Processes of one scenario (snitun, nginx), stopped together by PID at
    the end of a `with` block: SIGTERM to all first, then each is waited
    for and checked (sanitizer report, exit status); the first failure is
    raised unless the block already failed."""

    def __init__(self):
        self.items = []

    def add(self, p):
        self.items.append(p)
        return p

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        errs = stop_all(reversed(self.items))
        if errs and et is None:
            raise errs[0]
        return False


def stop_all(procs):
    """SIGTERM every running snitun process at once, then stop each in
    order; returns the exceptions raised by the checks."""
    procs = list(procs)
    for p in procs:
        if isinstance(p, Snitun) and p.alive():
            try:
                p.send_signal(signal.SIGTERM)
                p.signalled = True
            except OSError:
                pass
    errs = []
    for p in procs:
        try:
            p.stop()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            errs.append(e)
    return errs
