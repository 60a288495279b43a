"""bench/services.py - the processes of a benchmark sitting.

Starts, watches and stops everything on loopback: nginx (TLS endpoint),
HAProxy (SNI-passthrough baseline), the loadgen endpoint (sink/source/echo),
the snitun gateway and client. Every process is a child of the harness and
is stopped by its own PID (SIGTERM, then SIGKILL), never by name.

CPU time comes from /proc/PID/stat (utime + stime of every thread, plus the
same for the process's children such as nginx workers); short-lived tools
(wrk, loadgen clients) are measured with wait4() rusage.
"""

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
HERE = os.path.dirname(os.path.abspath(__file__))
HOSTS_FILE = "/etc/hosts"
HOSTS_MARK = "# snitun-bench"


class BenchError(Exception):
    """A setup step failed; the message says which and where the log is."""


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    # comm may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def proc_cpu(pid):
    """utime + stime of pid (all its threads), in seconds; 0 if gone."""
    try:
        f = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    return (int(f[11]) + int(f[12])) / CLK_TCK


def system_busy():
    """(busy, total) CPU seconds of the whole machine from /proc/stat.
    busy = user + nice + system + steal: irq/softirq time is left out
    because loopback packet processing for our own traffic lands there
    and is charged to no process."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]] + [0] * 8
    busy = v[0] + v[1] + v[2] + v[7]
    total = sum(v[:8])                            # guest time is inside user
    return busy / CLK_TCK, total / CLK_TCK


def proc_children(pid):
    """PIDs whose parent is pid."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if int(_stat_fields(int(name))[1]) == pid:
                kids.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def proc_rss_kib(pid):
    """VmRSS of pid in KiB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def wait_port(port, timeout, proc=None):
    """Until something accepts on 127.0.0.1:port. False on timeout or if
    proc exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def run_tool(argv, timeout, err_path=None, stdin=None):
    """Run a short-lived tool to completion.

    Returns (rc, stdout text, cpu seconds of the tool from wait4 rusage).
    rc is -9 when the tool had to be killed at the deadline. stderr goes
    to err_path (appended) or nowhere.
    """
    with tempfile.TemporaryFile("w+") as out, open(err_path or os.devnull, "a") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err,
                             stdin=stdin if stdin is not None else subprocess.DEVNULL)
        end = time.monotonic() + timeout
        killed = False
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            if time.monotonic() > end and not killed:
                p.kill()
                killed = True
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    return (-9 if killed else p.returncode), text, ru.ru_utime + ru.ru_stime


class Proc:
    """A long-running child: argv, its log file, CPU and RSS probes."""

    def __init__(self, name, argv, log_path, tree=False, env=None, stdin=None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.tree = tree
        self.log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                      stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                      env=env)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def pids(self):
        return [self.pid] + (proc_children(self.pid) if self.tree else [])

    def cpu(self):
        return sum(proc_cpu(p) for p in self.pids())

    def rss_kib(self):
        return sum(proc_rss_kib(p) for p in self.pids())

    def log_tail(self, n=15):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join(lines[-n:])
        except OSError:
            return ""

    def stop(self, grace=5.0):
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
            except ProcessLookupError:
                pass
        self.log.close()


class Hosts:
    """Adds 127.0.0.1 NAME to /etc/hosts for the sitting and removes it
    afterwards (lines carry HOSTS_MARK, so a crashed run is cleaned up by
    the next one)."""

    def __init__(self, names):
        self.names = names
        self.added = False

    @staticmethod
    def resolves_local(name):
        try:
            return {a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET)} == {"127.0.0.1"}
        except OSError:
            return False

    def add(self):
        """True when every name resolves to 127.0.0.1 afterwards."""
        if all(self.resolves_local(n) for n in self.names):
            return True
        try:
            self._rewrite(extra=[f"127.0.0.1 {' '.join(self.names)} {HOSTS_MARK}"])
            self.added = True
        except OSError:
            return False
        return all(self.resolves_local(n) for n in self.names)

    def _rewrite(self, extra):
        with open(HOSTS_FILE) as f:
            keep = [line for line in f.read().splitlines() if HOSTS_MARK not in line]
        text = "\n".join(keep + extra) + "\n"
        # Rewrite in place: /etc/hosts may be a bind mount (containers), so
        # no rename over it.
        with open(HOSTS_FILE, "w") as f:
            f.write(text)

    def remove(self):
        if self.added:
            try:
                self._rewrite(extra=[])
            except OSError:
                pass
            self.added = False


class Services:
    """The fixed cast of a sitting plus the snitun pair, restartable with
    other flags (ablations)."""

    def __init__(self, work, build, ports, https_name, raw_name, snitun_bin, loadgen_bin,
                 threads=2):
        self.work = work
        self.build = build
        self.ports = ports
        self.https_name = https_name
        self.raw_name = raw_name
        self.snitun = snitun_bin
        self.loadgen = loadgen_bin
        self.threads = threads
        self.procs = {}
        self.fernet_key = None
        self.token_file = os.path.join(work, "token.json")
        self.gw_args = []
        self.client_args = []
        self.admin_ok = {}

    # -- the fixed cast -----------------------------------------------------
    def _render(self, template, dest, fields):
        with open(os.path.join(HERE, "conf", template)) as f:
            text = f.read()
        for k, v in fields.items():
            text = text.replace(f"@{k}@", str(v))
        with open(dest, "w") as f:
            f.write(text)

    def start_nginx(self):
        prefix = os.path.join(self.work, "nginx")
        for d in ("tmp", "www", "logs"):
            os.makedirs(os.path.join(prefix, d), exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                        "-subj", f"/CN={self.https_name}",
                        "-addext", f"subjectAltName=DNS:{self.https_name}",
                        "-keyout", os.path.join(prefix, "key.pem"),
                        "-out", os.path.join(prefix, "cert.pem")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(prefix, "www", "100b.bin"), "wb") as f:
            f.write(b"x" * 100)
        with open(os.path.join(prefix, "www", "10m.bin"), "wb") as f:
            f.write(os.urandom(10 << 20))
        user = ""
        if os.geteuid() == 0:
            import pwd
            user = f"user {pwd.getpwuid(os.geteuid()).pw_name};"
        conf = os.path.join(prefix, "nginx.conf")
        self._render("nginx.conf.in", conf, {
            "USER": user, "WORKERS": self.threads, "PREFIX": prefix,
            "LISTEN": f"127.0.0.1:{self.ports['nginx']}", "NAME": self.https_name,
            "NOFILE": resource.getrlimit(resource.RLIMIT_NOFILE)[0]})
        argv = ["nginx", "-p", prefix, "-c", conf, "-e", os.path.join(prefix, "error.log")]
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        argv[0] = nginx
        self._start("nginx", argv, tree=True, port=self.ports["nginx"])

    def start_haproxy(self):
        cfg = os.path.join(self.work, "haproxy.cfg")
        self._render("haproxy.cfg.in", cfg, {
            "THREADS": self.threads, "LISTEN": f"127.0.0.1:{self.ports['haproxy']}",
            "HTTPS_NAME": self.https_name, "RAW_NAME": self.raw_name,
            "NGINX": f"127.0.0.1:{self.ports['nginx']}",
            "SINK": f"127.0.0.1:{self.ports['sink']}",
            # HAProxy refuses to start when maxconn needs more descriptors
            # than the limit allows (2 per connection plus a margin).
            "MAXCONN": max(1000, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2)})
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self._start("haproxy", [haproxy, "-f", cfg, "-db"], port=self.ports["haproxy"])

    def start_sink(self):
        self._start("sink", [self.loadgen, "server", "--listen",
                             f"127.0.0.1:{self.ports['sink']}", "--threads", str(self.threads)],
                    port=self.ports["sink"])

    def _start(self, name, argv, tree=False, port=None, env=None):
        p = Proc(name, argv, os.path.join(self.work, f"{name}.log"), tree=tree, env=env)
        self.procs[name] = p
        if port is not None and not wait_port(port, 10, p.popen):
            raise BenchError(f"{name} did not start listening on 127.0.0.1:{port}; "
                             f"log {p.log_path}:\n{p.log_tail()}")
        return p

    # -- snitun ---------------------------------------------------------------
    def snitun_help(self, sub):
        try:
            r = subprocess.run([self.snitun, sub, "--help"], capture_output=True, text=True,
                               timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout if r.returncode == 0 else None

    def issue_token(self):
        self.fernet_key = subprocess.run([self.snitun, "keygen"], capture_output=True,
                                         text=True, check=True).stdout.strip()
        tok = subprocess.run([self.snitun, "token", "issue", "--fernet-key", self.fernet_key,
                              "--hostname", self.https_name, "--alias", self.raw_name,
                              "--valid-for", "86400"],
                             capture_output=True, text=True, check=True).stdout
        with open(self.token_file, "w") as f:
            f.write(tok)

    def admin_args(self, key, sub):
        """--admin-listen for the pair when the harness reserved a port and
        this build has the flag (its /metrics give the splice counters)."""
        if key not in self.ports:
            return []
        if sub not in self.admin_ok:
            self.admin_ok[sub] = "--admin-listen" in (self.snitun_help(sub) or "")
        return ["--admin-listen", f"127.0.0.1:{self.ports[key]}"] if self.admin_ok[sub] else []

    def start_gateway(self, extra=(), name="gateway"):
        argv = [self.snitun, "server",
                "--sni-listen", f"127.0.0.1:{self.ports['gw_sni']}",
                "--peer-listen", f"127.0.0.1:{self.ports['gw_peer']}",
                "--fernet-key", self.fernet_key] + self.admin_args("gw_admin", "server") + \
            list(extra)
        return self._start(name, argv, port=self.ports["gw_sni"])

    def start_client(self, extra=()):
        argv = [self.snitun, "client",
                "--server", f"127.0.0.1:{self.ports['gw_peer']}",
                "--endpoint", f"127.0.0.1:{self.ports['nginx']}",
                "--route", f"{self.raw_name}=127.0.0.1:{self.ports['sink']}",
                "--token-file", self.token_file] + self.admin_args("cl_admin", "client") + \
            list(extra)
        return self._start("client", argv)

    def scrape(self, key, names):
        """Sum of the /metrics samples whose name is in names, from the
        admin listener on ports[key]; None when there is none."""
        if key not in self.ports:
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[key]}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except (OSError, ValueError):
            return None
        out = dict.fromkeys(names, 0.0)
        for line in text.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            sample, val = line.rsplit(" ", 1)
            name = sample.split("{", 1)[0]
            if name in out:
                out[name] += float(val)
        return out

    def wait_tunnel(self, timeout=15.0):
        """Until a 1-byte stream through the gateway reaches the sink, i.e.
        the client's tunnel is registered and routes the raw name."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            rc, _, _ = run_tool([self.loadgen, "stream", "--connect",
                                 f"127.0.0.1:{self.ports['gw_sni']}", "--sni", self.raw_name,
                                 "--bytes", "1"], timeout=5)
            if rc == 0:
                return True
            for n in ("gateway", "client"):
                p = self.procs.get(n)
                if p is not None and not p.alive():
                    return False
            time.sleep(0.1)
        return False

    def start_snitun(self, gw_extra=(), client_extra=()):
        self.stop_snitun()
        self.gw_args, self.client_args = list(gw_extra), list(client_extra)
        self.start_gateway(gw_extra)
        self.start_client(client_extra)
        if not self.wait_tunnel():
            raise BenchError("the snitun tunnel did not come up; logs "
                             f"{self.procs['gateway'].log_path}, {self.procs['client'].log_path}:\n"
                             f"{self.procs['gateway'].log_tail()}\n{self.procs['client'].log_tail()}")

    def stop_snitun(self):
        for n in ("client", "gateway"):
            p = self.procs.pop(n, None)
            if p is not None:
                p.stop()

    def stop(self, name):
        p = self.procs.pop(name, None)
        if p is not None:
            p.stop()

    def stop_all(self):
        for n in list(self.procs):
            self.stop(n)

    # -- measurement ---------------------------------------------------------
    def cpu_snapshot(self):
        return {n: p.cpu() for n, p in self.procs.items()}


def tool_version(argv, pattern=r"[0-9]+\.[0-9]+(\.[0-9]+)?"):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(pattern, r.stdout + r.stderr)
    return m.group(0) if m else None
