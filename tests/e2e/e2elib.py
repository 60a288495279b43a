"""Shared helpers for the end-to-end tests in tests/e2e/.

Environment (set by ctest, see CMakeLists.txt): SNITUN_BIN (the binary),
SNITUN_TEST_DATA (tests/data), SNITUN_BUILD_DIR. Run by hand:
    SNITUN_BIN=build/snitun python3 tests/e2e/test_gateway_frames.py

Helpers: free ports, the gateway as a subprocess with its log in a file,
waiting for ports, fd counting through /proc, throw-away certificates and
`openssl s_server` endpoints, tokens via `snitun token issue`, and a tiny
test runner that prints "N passed, M failed" and sets the exit status.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("SNITUN_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))
DATA = os.environ.get("SNITUN_TEST_DATA", os.path.join(SRC, "tests", "data"))
BIN = os.environ.get("SNITUN_BIN", os.path.join(SRC, "build", "snitun"))

# Vector key material (tests/data/README.md): Fernet key K1, tunnel key/IV.
K1 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
AES_KEY = "00112233445566778899aabbccddeeff102132435465768798a9babbdcddfeef"
AES_IV = "0f0e0d0c0b0a09080706050403020100"
HELLO_NAME = "myname.ui.nabu.casa"


def data_path(*parts):
    return os.path.join(DATA, *parts)


def read_data(*parts):
    with open(data_path(*parts), "rb") as f:
        return f.read()


def load_json(*parts):
    with open(data_path(*parts)) as f:
        return json.load(f)


# ---- ports and processes -------------------------------------------------

_PORTS_GIVEN = set()


def free_port(family=socket.AF_INET):
    """A TCP port free on both 127.0.0.1 and ::1 right now, and never handed
    out before in this process: the kernel may offer a just-released port
    again, and two listeners configured on one port (nginx merges them into
    one, the first server block answering both) make tests misroute."""
    for _ in range(200):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        try:
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s6.bind(("::1", port))
            s6.close()
            s4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s4.bind(("127.0.0.1", port))
            s4.close()
        except OSError:
            continue
        if port in _PORTS_GIVEN:
            continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free port")


def wait_port(host, port, timeout=10.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %d" % proc.returncode)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("%s:%d not listening" % (host, port))


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


PROCS = []  # every Proc started, for the runner's failure report


class Proc:
    """A subprocess with stdout+stderr in a log file."""

    def __init__(self, argv, logname, env=None, cwd=None):
        PROCS.append(self)
        self.keep = False
        self.logpath = os.path.join(tempfile.gettempdir(),
                                    "%s-%d-%d.log" % (logname, os.getpid(), int(time.time() * 1e6)))
        self.log = open(self.logpath, "wb")
        self.argv = argv
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=e,
                                  cwd=cwd)

    @property
    def pid(self):
        return self.p.pid

    def text(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, pattern, timeout=5.0, count=1):
        """Wait until the log matches pattern (a regex) count times."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(re.findall(pattern, self.text())) >= count:
                return True
            time.sleep(0.05)
        return False

    def send_signal(self, sig):
        self.p.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode

    def cleanup(self):
        """Logs are removed by the runner once the test that made them has
        passed (a failing test prints and keeps them)."""

    def remove_log(self):
        if self.keep:
            return
        try:
            os.unlink(self.logpath)
        except OSError:
            pass


class Gateway(Proc):
    """`snitun server` on loopback ports. listen: list of (flag, addr)."""

    def __init__(self, listen, io="epoll", threads=1, extra=(), keys=(K1,), admin=True):
        argv = [BIN, "server", "--io", io, "--threads", str(threads), "--log-level", "debug"]
        for k in keys:
            argv += ["--fernet-key", k]
        for flag, addr in listen:
            argv += ["--" + flag, addr]
        self.admin_port = free_port() if admin else None
        if admin:
            argv += ["--admin-listen", "127.0.0.1:%d" % self.admin_port]
        argv += list(extra)
        self.listen = listen
        super().__init__(argv, "snitun-gw")
        for flag, addr in listen:
            host, port = split_addr(addr)
            wait_port(host, port, proc=self.p)
        if admin:
            wait_port("127.0.0.1", self.admin_port, proc=self.p)

    def metrics(self):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.admin_port,
                                    timeout=5) as r:
            return r.read().decode()

    def metric(self, name, labels=""):
        """Value of one series, e.g. metric('snitun_handoffs_total')."""
        pat = re.escape(name + (("{" + labels + "}") if labels else "")) + r" (\S+)"
        m = re.search("^" + pat + "$", self.metrics(), re.M)
        return float(m.group(1)) if m else None

    def stats(self, timeout=5.0):
        """SIGUSR1, then the per-shard 'stats' lines as dicts."""
        before = self.text().count('msg=stats')
        self.send_signal(signal.SIGUSR1)
        deadline = time.time() + timeout
        while time.time() < deadline:
            lines = [l for l in self.text().splitlines() if "msg=stats" in l]
            if len(lines) > before:
                time.sleep(0.2)
                break
            time.sleep(0.05)
        out = []
        for l in self.text().splitlines()[-200:]:
            if "msg=stats" in l:
                out.append(dict(re.findall(r"(\w+)=(\S+)", l)))
        return out


def split_addr(addr):
    if addr.startswith("["):
        host, port = addr[1:].split("]:")
    else:
        host, port = addr.rsplit(":", 1)
    return host, int(port)


# ---- tokens, certificates, endpoints ---------------------------------------

def issue_token(hostname, aliases=(), version=2, cipher="aes-cbc", key=AES_KEY, iv=AES_IV,
                valid_for=3600, fernet_key=K1, now=None):
    argv = [BIN, "token", "issue", "--fernet-key", fernet_key, "--hostname", hostname,
            "--protocol-version", str(version), "--cipher", cipher, "--aes-key", key,
            "--aes-iv", iv, "--valid-for", str(valid_for)]
    if now is not None:
        argv += ["--now", str(int(now))]
    for a in aliases:
        argv += ["--alias", a]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["token"]


def make_cert(dirpath, names):
    """A self-signed certificate for names (a name or a list, the first is
    the CN); returns (cert, key) paths."""
    names = [names] if isinstance(names, str) else list(names)
    cert = os.path.join(dirpath, names[0] + ".crt")
    key = os.path.join(dirpath, names[0] + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=" + names[0], "-addext",
                    "subjectAltName=" + ",".join("DNS:" + n for n in names), "-keyout", key,
                    "-out", cert], check=True, capture_output=True)
    return cert, key


class SServer(Proc):
    """openssl s_server -WWW serving files from docroot on 127.0.0.1:port."""

    def __init__(self, cert, key, docroot, port=None):
        self.port = port or free_port()
        super().__init__(["openssl", "s_server", "-accept", "127.0.0.1:%d" % self.port, "-cert",
                          cert, "-key", key, "-WWW", "-quiet", "-naccept", "1000000"],
                         "s_server", cwd=docroot)
        wait_port("127.0.0.1", self.port, proc=self.p)


def curl(name, port, path, cacert, host="127.0.0.1", timeout=10):
    """GET https://name:port/path through the gateway; returns (rc, body)."""
    r = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "--cacert", cacert,
                        "--resolve", "%s:%d:%s" % (name, port, host),
                        "https://%s:%d/%s" % (name, port, path)],
                       capture_output=True)
    return r.returncode, r.stdout


def tmpdir():
    d = tempfile.mkdtemp(prefix="snitun-e2e-")
    return d


def rmtree(d):
    shutil.rmtree(d, ignore_errors=True)


# ---- sockets ------------------------------------------------------------------

def closed_without_data(sock, timeout=5.0):
    """True when the peer closes (EOF or reset) without sending one byte."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return data == b""


def connect(host, port, timeout=5.0):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    return s


# ---- runner ---------------------------------------------------------------------

class Runner:
    def __init__(self):
        self.passed = 0
        self.failed = []

    def run(self, name, fn, *args):
        t0 = time.time()
        nprocs = len(PROCS)
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - every failure is reported
            self.failed.append(name)
            print("FAIL %s (%.1fs)" % (name, time.time() - t0))
            traceback.print_exc()
            for p in PROCS[nprocs:]:
                p.keep = True
                print("---- %s (log kept: %s), last lines:" % (p.argv[0], p.logpath))
                print("\n".join(p.text().splitlines()[-30:]))
            sys.stdout.flush()
            return False
        for p in PROCS[nprocs:]:
            if p.p.poll() is not None:
                p.remove_log()
        self.passed += 1
        print("ok   %s (%.1fs)" % (name, time.time() - t0))
        sys.stdout.flush()
        return True

    def finish(self):
        for p in PROCS:
            if p.p.poll() is not None:
                p.remove_log()
        print("%d passed, %d failed" % (self.passed, len(self.failed)))
        if self.failed:
            print("failed: " + ", ".join(self.failed))
        sys.exit(1 if self.failed else 0)


def engines():
    """The engines to run every scenario with: uring (when the kernel lets
    us) and epoll."""
    want = os.environ.get("SNITUN_E2E_ENGINES", "uring,epoll").split(",")
    return [e for e in want if e]
