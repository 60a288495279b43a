#!/usr/bin/env python3
"""bench/harness.py - the snitun benchmark suite (entry point: bench/run).

One sitting on one machine, everything on loopback and started here:
nginx (TLS endpoint: 100-byte and 10 MiB files), HAProxy (SNI passthrough,
the baseline), the loadgen endpoint (sink/source/echo), the snitun gateway
and client from the build directory, and the load (wrk, loadgen).

Scenarios (names for --only):
  keepalive  HTTPS keep-alive, 100-byte responses, wrk -t2 -c50
  close      HTTPS, a new connection per request (Connection: close)
  bulk       HTTPS 10 MiB responses over 4 connections
  raw        loadgen byte stream without TLS ends, both directions
  rate       channel open rate: open, 1 KiB each way, close, C workers
  idle       10,000 idle tunnels (gateway RSS, connect time); 100 tunnels
             x 100 open channels
  ablation   --io uring/epoll, --threads 1/2, splice and header batching
             when the gateway has flags for them

Every comparison runs its paths alternately in the same sitting (the order
rotates per round) and reports medians over the rounds and ratios. CPU time
of every process comes from /proc/PID/stat (see services.py).
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402
import services  # noqa: E402
from services import BenchError, Services, run_tool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LUA = os.path.join(HERE, "conf", "wrk_report.lua")
GIB = float(1 << 30)

HTTPS_NAME = "bench.snitun.test"
RAW_NAME = "raw.snitun.test"

SCENARIOS = ["keepalive", "close", "bulk", "raw", "rate", "idle", "ablation"]

# Sizes chosen so the full suite fits 15 minutes on 2 cores (about 10
# minutes measured, the rest is margin for slower machines).
PROFILES = {
    "full": dict(rounds=3, wrk_secs=8, bulk_secs=8, warmup_secs=1, raw_bytes=4 << 30,
                 rate_secs=5, rate_workers=(16, 64), idle_tunnels=10000, chan_tunnels=100,
                 chan_per=100, abl_wrk_secs=5, abl_raw_bytes=2 << 30),
    "quick": dict(rounds=1, wrk_secs=2, bulk_secs=2, warmup_secs=0, raw_bytes=256 << 20,
                  rate_secs=2, rate_workers=(16, 64), idle_tunnels=500, chan_tunnels=10,
                  chan_per=10, abl_wrk_secs=2, abl_raw_bytes=256 << 20),
}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rotate(seq, k):
    k %= len(seq)
    return seq[k:] + seq[:k]


def median_tree(items):
    """Element-wise median of a list of equally shaped dicts of numbers."""
    items = [i for i in items if i is not None]
    if not items:
        return None
    out = {}
    for key in items[0]:
        vals = [i.get(key) for i in items if key in i]
        if isinstance(vals[0], dict):
            out[key] = median_tree(vals)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = statistics.median(vals)
        else:
            out[key] = vals[0]
    return out


def ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


class Bench:
    def __init__(self, args):
        self.args = args
        self.prof = dict(PROFILES["quick" if args.quick else "full"])
        if args.rounds:
            self.prof["rounds"] = args.rounds
        self.build = os.path.abspath(args.build)
        self.snitun_bin = os.path.join(self.build, "snitun")
        self.loadgen_bin = os.path.join(self.build, "loadgen")
        self.out_dir = os.path.abspath(args.out)
        base = args.port_base
        self.ports = {"nginx": base + 1, "haproxy": base + 2, "gw_sni": base + 3,
                      "gw_peer": base + 4, "sink": base + 5, "gw_admin": base + 6,
                      "cl_admin": base + 7}
        self.https_name = HTTPS_NAME
        self.work = tempfile.mkdtemp(prefix="snitun-bench-")
        self.hosts = None
        self.svc = None
        self.snitun_ok = False
        self.snitun_why = None
        self.server_help = ""
        self.client_help = ""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.json_path = os.path.join(self.out_dir, f"run-{stamp}{'-quick' if args.quick else ''}.json")
        self.result = {"meta": {}, "scenarios": {}}
        self.t_start = time.monotonic()

    # -- setup ----------------------------------------------------------------
    def check_tools(self):
        missing = [t for t in ("wrk", "haproxy", "nginx", "gnuplot", "openssl")
                   if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]
        if missing:
            raise BenchError(f"missing tools: {', '.join(missing)}; run ./deploy/deps.sh --bench")
        if not os.access(self.loadgen_bin, os.X_OK):
            raise BenchError(f"{self.loadgen_bin} not built (cmake --build {self.build})")
        for name, port in self.ports.items():
            if not services.port_free(port):
                raise BenchError(f"port {port} ({name}) is busy: pick --port-base")

    def raise_nofile(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(hard, 65536) if os.geteuid() == 0 else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    def probe_snitun(self):
        if self.args.no_snitun:
            return "disabled by --no-snitun"
        if not os.access(self.snitun_bin, os.X_OK):
            return f"{self.snitun_bin} not built"
        svc = self.svc
        self.server_help = svc.snitun_help("server") or ""
        self.client_help = svc.snitun_help("client") or ""
        if not self.server_help or not self.client_help:
            return "`snitun server --help` or `snitun client --help` fails"
        for flag in ("--sni-listen", "--peer-listen", "--fernet-key"):
            if flag not in self.server_help:
                return f"snitun server has no {flag}"
        for flag in ("--server", "--endpoint", "--token-file", "--route"):
            if flag not in self.client_help:
                return f"snitun client has no {flag}"
        return None

    def setup(self):
        self.check_tools()
        nofile = self.raise_nofile()
        self.hosts = services.Hosts([HTTPS_NAME])
        hosts_note = f"{HTTPS_NAME} added to /etc/hosts for the sitting"
        if self.args.no_hosts or not self.hosts.add():
            self.https_name = "localhost"
            hosts_note = ("--no-hosts" if self.args.no_hosts else
                          "/etc/hosts not writable") + \
                ": HTTPS name falls back to localhost (the tunnel token's hostname)"
            log(hosts_note)
        self.svc = Services(self.work, self.build, self.ports, self.https_name, RAW_NAME,
                            self.snitun_bin, self.loadgen_bin, threads=2)
        self.svc.start_nginx()
        self.svc.start_sink()
        self.svc.start_haproxy()
        self.snitun_why = self.probe_snitun()
        if self.snitun_why is None:
            try:
                self.svc.issue_token()
                self.svc.start_snitun()
                self.snitun_ok = True
            except (BenchError, subprocess.CalledProcessError) as e:
                self.snitun_why = f"snitun did not start: {e}"
        if not self.snitun_ok:
            log(f"snitun paths skipped: {self.snitun_why}")
        self.result["meta"] = self.meta(nofile, hosts_note)
        log(f"work dir {self.work}; snitun {'ready' if self.snitun_ok else 'n/a'}")

    def meta(self, nofile, hosts_note):
        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"model name\s*:\s*(.*)", f.read())
                cpu = m.group(1) if m else ""
        except OSError:
            pass
        try:
            rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            rev = ""
        return {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "mode": "quick" if self.args.quick else "full",
            "profile": self.prof,
            "host": platform.node(), "kernel": platform.release(), "cpu": cpu,
            "cpus": os.cpu_count(), "nofile": nofile,
            "git": rev, "build": self.build,
            "versions": {
                "nginx": services.tool_version(["nginx", "-v"]),
                "haproxy": services.tool_version(["haproxy", "-v"]),
                "wrk": services.tool_version(["wrk", "-v"]),
                "openssl": services.tool_version(["openssl", "version"]),
            },
            "https_name": self.https_name, "raw_name": RAW_NAME, "hosts": hosts_note,
            "snitun": "ok" if self.snitun_ok else self.snitun_why,
            "layout": "gateway dual-port (--sni-listen/--peer-listen), client --route "
                      "for the raw name, everything on 127.0.0.1",
        }

    def cleanup(self):
        if self.svc is not None:
            self.svc.stop_all()
        if self.hosts is not None:
            self.hosts.remove()
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"work dir kept: {self.work}")

    def save(self):
        os.makedirs(self.out_dir, exist_ok=True)
        self.result["meta"]["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, sort_keys=False)
        os.replace(tmp, self.json_path)

    # -- measuring ------------------------------------------------------------
    def measured(self, fn):
        """Run fn() -> (metrics, tool cpu); add the CPU seconds every
        running service spent meanwhile under metrics['cpu']."""
        before = self.svc.cpu_snapshot()
        busy0, total0 = services.system_busy()
        metrics, tool_cpu = fn()
        busy1, total1 = services.system_busy()
        after = self.svc.cpu_snapshot()
        if metrics is None:
            return None
        cpu = {n: round(after[n] - before.get(n, 0.0), 3) for n in after if n in before}
        cpu["load"] = round(tool_cpu, 3)
        metrics["cpu"] = cpu
        # CPU the rest of the machine used meanwhile (other tenants, builds):
        # a noise indicator, as a share of all CPU time in the interval.
        other = (busy1 - busy0) - sum(cpu.values())
        metrics["other_cpu_share"] = round(max(other, 0.0) / max(total1 - total0, 1e-9), 3)
        return metrics

    def wrk(self, url, secs, conns, threads=2, close=False):
        argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{secs}s",
                "--timeout", "10s", "-s", LUA]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(url)

        def go():
            rc, out, cpu = run_tool(argv, timeout=secs + 60,
                                    err_path=os.path.join(self.work, "wrk.err"))
            m = re.search(r"WRK_JSON (\{.*\})", out)
            if rc != 0 or m is None:
                log(f"wrk failed (rc {rc}): {' '.join(argv)}\n{out[-800:]}")
                return None, cpu
            w = json.loads(m.group(1))
            dur = w["duration_us"] / 1e6
            errors = sum(w[k] for k in w if k.startswith("err_"))
            return {
                "requests": w["requests"], "seconds": round(dur, 3),
                "rps": round(w["requests"] / dur, 1),
                "mib_per_s": round(w["bytes"] / dur / (1 << 20), 2),
                "bytes": w["bytes"],
                "lat_p50_ms": w["lat_p50_us"] / 1000, "lat_p90_ms": w["lat_p90_us"] / 1000,
                "lat_p99_ms": w["lat_p99_us"] / 1000, "lat_max_ms": w["lat_max_us"] / 1000,
                "lat_mean_ms": round(w["lat_mean_us"] / 1000, 3),
                "errors": errors,
                "errors_by": {k[4:]: w[k] for k in w if k.startswith("err_")},
            }, cpu

        m = self.measured(go)
        if m is not None:
            reqs, gib = max(m["requests"], 1), max(m["bytes"], 1) / GIB
            m["cpu_per_10k_req"] = {k: round(v / reqs * 1e4, 4) for k, v in m["cpu"].items()}
            m["cpu_per_gib"] = {k: round(v / gib, 4) for k, v in m["cpu"].items()}
        return m

    def loadgen(self, argv, timeout):
        def go():
            rc, out, cpu = run_tool([self.loadgen_bin] + argv, timeout=timeout,
                                    err_path=os.path.join(self.work, "loadgen.err"))
            try:
                res = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                res = None
            if rc != 0 or res is None or res.get("errors"):
                log(f"loadgen failed (rc {rc}): {' '.join(argv)}: {out.strip()[-400:]}")
                if res is None or rc == -9:
                    return None, cpu
            return res, cpu
        return self.measured(go)

    def https_url(self, target, path):
        port = {"snitun": self.ports["gw_sni"], "haproxy": self.ports["haproxy"],
                "direct": self.ports["nginx"]}[target]
        return f"https://{self.https_name}:{port}/{path}"

    def raw_addr(self, target):
        port = {"snitun": self.ports["gw_sni"], "haproxy": self.ports["haproxy"],
                "direct": self.ports["sink"]}[target]
        return f"127.0.0.1:{port}"

    def targets(self):
        return (["snitun"] if self.snitun_ok else []) + ["haproxy", "direct"]

    def ensure_snitun(self):
        """Restart the default pair if a previous step left it down."""
        if not self.snitun_ok:
            return False
        g, c = self.svc.procs.get("gateway"), self.svc.procs.get("client")
        if g is not None and c is not None and g.alive() and c.alive() \
                and not self.svc.gw_args and not self.svc.client_args:
            return True
        try:
            self.svc.start_snitun()
            return True
        except BenchError as e:
            log(f"snitun restart failed: {e}")
            return False

    # -- the splice path, proven by the pair's own counters ---------------------
    SPLICE_METRICS = {"gateway": ("gw_admin", "snitun_bytes_total"),
                      "client": ("cl_admin", "snitun_client_bytes_total")}

    def splice_counters(self):
        """Payload bytes relayed and spliced so far, per process (the
        metrics fold once a second: wait for the last run's to land)."""
        time.sleep(1.2)
        out = {}
        for proc, (key, relayed) in self.SPLICE_METRICS.items():
            got = self.svc.scrape(key, (relayed, "snitun_spliced_bytes_total"))
            if got is None:
                return None
            out[proc] = (got[relayed], got["snitun_spliced_bytes_total"])
        return out

    @staticmethod
    def splice_share(before, after):
        """Share of the payload bytes each process moved with splice(2)
        instead of copying them, between two splice_counters()."""
        if before is None or after is None:
            return None
        share = {}
        for proc in before:
            relayed = after[proc][0] - before[proc][0]
            spliced = after[proc][1] - before[proc][1]
            share[proc] = round(spliced / relayed, 3) if relayed > 0 else None
        return share

    # -- scenario skeleton ------------------------------------------------------
    def comparison(self, key, title, kind, load, run_one, primary, lower_better=(),
                   unit_key=None, spliced=False):
        """Alternate the targets for the configured rounds; store rounds,
        medians and ratios of snitun against the others. unit_key names the
        per-unit CPU dict whose forwarder share (gateway + client, or
        haproxy) becomes the metric fwd_cpu; spliced: record the pair's
        spliced_share around each snitun round (streams)."""
        targets = self.targets()
        sc = {"title": title, "kind": kind, "load": load, "targets": targets,
              "rounds": {t: [] for t in targets}, "median": {}, "ratios": {},
              "skipped": {} if self.snitun_ok else {"snitun": self.snitun_why}}
        self.result["scenarios"][key] = sc
        for r in range(self.prof["rounds"]):
            for t in rotate(targets, r):
                if t == "snitun" and not self.ensure_snitun():
                    sc["rounds"][t].append(None)
                    continue
                before = self.splice_counters() if spliced and t == "snitun" else None
                m = run_one(t)
                if m is not None and before is not None:
                    m["spliced_share"] = self.splice_share(before, self.splice_counters())
                if m is not None and unit_key:
                    per = m.get(unit_key) or {}
                    m["fwd_cpu"] = round(sum(per.get(n, 0.0) for n in
                                             ("gateway", "client", "haproxy")), 4)
                sc["rounds"][t].append(m)
                if m is not None:
                    log(f"  {key} round {r + 1} {t}: {primary}={m.get(primary)}")
            self.save()
        for t in targets:
            sc["median"][t] = median_tree(sc["rounds"][t])
        med = sc["median"]
        if med.get("snitun"):
            for other in ("direct", "haproxy"):
                if med.get(other):
                    sc["ratios"][f"snitun/{other}"] = {
                        k: ratio(med["snitun"].get(k), med[other].get(k))
                        for k in [primary] + list(lower_better) +
                        (["fwd_cpu"] if unit_key else [])}
        self.save()
        return sc

    # -- scenarios --------------------------------------------------------------
    def warmup(self, path, close=False, conns=50):
        if self.prof["warmup_secs"] <= 0:
            return
        for t in self.targets():
            if t != "snitun" or self.ensure_snitun():
                self.wrk(self.https_url(t, path), self.prof["warmup_secs"], conns, close=close)

    def sc_keepalive(self):
        s = self.prof["wrk_secs"]
        self.warmup("100b.bin")
        self.comparison(
            "keepalive", "HTTPS keep-alive, 100-byte responses", "wrk",
            f"wrk -t2 -c50 -d{s}s https://NAME/100b.bin",
            lambda t: self.wrk(self.https_url(t, "100b.bin"), s, 50),
            "rps", ("lat_p50_ms", "lat_p99_ms"), unit_key="cpu_per_10k_req")

    def sc_close(self):
        s = self.prof["wrk_secs"]
        self.warmup("100b.bin", close=True)
        self.comparison(
            "close", "HTTPS, new connection per request (Connection: close)", "wrk",
            f"wrk -t2 -c50 -d{s}s -H 'Connection: close' https://NAME/100b.bin",
            lambda t: self.wrk(self.https_url(t, "100b.bin"), s, 50, close=True),
            "rps", ("lat_p50_ms", "lat_p99_ms"), unit_key="cpu_per_10k_req")

    def sc_bulk(self):
        s = self.prof["bulk_secs"]
        self.warmup("10m.bin", conns=4)
        self.comparison(
            "bulk", "HTTPS bulk, 10 MiB responses, 4 connections", "wrk",
            f"wrk -t2 -c4 -d{s}s https://NAME/10m.bin",
            lambda t: self.wrk(self.https_url(t, "10m.bin"), s, 4),
            "mib_per_s", ("lat_p50_ms", "lat_p99_ms"), unit_key="cpu_per_gib", spliced=True)

    def stream(self, target, direction, nbytes):
        m = self.loadgen(["stream", "--connect", self.raw_addr(target), "--sni", RAW_NAME,
                          "--bytes", str(nbytes), "--conns", "1", "--dir", direction],
                         timeout=120)
        if m is not None:
            gib = max(m["bytes"], 1) / GIB
            m["cpu_per_gib"] = {k: round(v / gib, 4) for k, v in m["cpu"].items()}
        return m

    def sc_raw(self):
        n = self.prof["raw_bytes"]
        for direction, what in (("up", "device -> endpoint (sink)"),
                                ("down", "endpoint (source) -> device")):
            self.comparison(
                f"raw_{direction}", f"Raw forwarding, no TLS ends, {what}", "stream",
                f"loadgen stream --bytes {n} --conns 1 --dir {direction} "
                "(real ClientHello, then the byte stream)",
                lambda t, d=direction: self.stream(t, d, n),
                "gib_per_s", unit_key="cpu_per_gib", spliced=True)

    def sc_rate(self):
        """16 workers: each waits for its echo, so the rate is bound by the
        latency of the path (two hops more than HAProxy's). 64 workers: the
        two cores are saturated, so the rate is bound by CPU per channel."""
        s = self.prof["rate_secs"]
        for i, w in enumerate(self.prof["rate_workers"]):
            self.comparison(
                "rate" if i == 0 else f"rate_{w}",
                f"Channel open rate, {w} workers, 1 KiB each way", "rate",
                f"loadgen rate --workers {w} --seconds {s} --size 1024 "
                "(connect, ClientHello + 1 KiB, read the 1 KiB echo, close)",
                lambda t, w=w: self.rate(t, s, w),
                "channels_per_s", ("open_us_p50", "open_us_p99"), unit_key="cpu_per_10k")

    def rate(self, target, secs, workers):
        m = self.loadgen(["rate", "--connect", self.raw_addr(target), "--sni", RAW_NAME,
                          "--workers", str(workers), "--seconds", str(secs),
                          "--size", "1024"], timeout=secs + 60)
        if m is not None:
            k = max(m["channels"], 1)
            m["cpu_per_10k"] = {n: round(v / k * 1e4, 4) for n, v in m["cpu"].items()}
        return m

    # -- idle tunnels -----------------------------------------------------------
    def read_json_line(self, p, timeout):
        end = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < end:
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                c = os.read(p.stdout.fileno(), 1)
                if not c:
                    return None
                buf += c
                if c == b"\n":
                    try:
                        return json.loads(buf)
                    except ValueError:
                        buf = b""
            elif p.poll() is not None:
                return None
        return None

    def tunnels_run(self, extra, timeout, channels):
        """Start a fresh gateway, run `loadgen tunnels`, sample the gateway
        around its phases. Returns a dict of measurements."""
        svc = self.svc
        svc.stop_snitun()
        gw = svc.start_gateway(name="gateway")
        time.sleep(0.5)
        out = {"rss_start_kib": gw.rss_kib()}
        cpu0 = gw.cpu()
        argv = [self.loadgen_bin, "tunnels", "--connect", f"127.0.0.1:{self.ports['gw_peer']}",
                "--timeout", str(timeout)] + extra
        if channels:
            argv += ["--channels", str(channels), "--sni-connect",
                     f"127.0.0.1:{self.ports['gw_sni']}"]
        errf = open(os.path.join(self.work, "tunnels.err"), "ab")
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errf)
        try:
            ph = self.read_json_line(p, timeout + 30)
            if ph is None:
                raise BenchError(f"loadgen tunnels gave no result; gateway log:\n{gw.log_tail()}")
            time.sleep(1.0)     # let the gateway finish its bookkeeping
            out["tunnels"] = ph
            out["rss_tunnels_kib"] = gw.rss_kib()
            out["gateway_cpu_tunnels_s"] = round(gw.cpu() - cpu0, 3)
            out["loadgen_rss_kib"] = services.proc_rss_kib(p.pid)
            if channels:
                cpu1 = gw.cpu()
                p.stdin.write(b"go\n")
                p.stdin.flush()
                ph2 = self.read_json_line(p, timeout + 30)
                if ph2 is None:
                    raise BenchError("loadgen tunnels gave no channel result")
                time.sleep(1.0)
                out["channels"] = ph2
                out["rss_channels_kib"] = gw.rss_kib()
                out["gateway_cpu_channels_s"] = round(gw.cpu() - cpu1, 3)
        finally:
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            errf.close()
            svc.stop("gateway")
        return out

    def sc_idle(self):
        sc = {"title": "Idle tunnels and open channels (gateway memory)", "kind": "idle",
              "load": "loadgen tunnels: token + challenge + PING/PONG per tunnel, 48 in "
                      "flight; distinct hostnames", "results": {}, "skipped": {}}
        self.result["scenarios"]["idle"] = sc
        if not self.snitun_ok:
            sc["skipped"]["snitun"] = self.snitun_why
            self.save()
            return
        n = self.prof["idle_tunnels"]
        try:
            r = self.tunnels_run(["--fernet-key", self.svc.fernet_key, "--count", str(n),
                                  "--domain", "idle.bench.test"], timeout=240, channels=0)
            ready = r["tunnels"]["ready"]
            r["rss_per_tunnel_kib"] = round((r["rss_tunnels_kib"] - r["rss_start_kib"]) /
                                            max(ready, 1), 3)
            r["gateway_cpu_ms_per_tunnel"] = round(r["gateway_cpu_tunnels_s"] * 1e3 /
                                                   max(ready, 1), 4)
            sc["results"]["idle"] = r
            log(f"  idle: {ready}/{n} tunnels in {r['tunnels']['seconds']:.2f}s, "
                f"{r['rss_per_tunnel_kib']} KiB RSS per tunnel")
        except BenchError as e:
            sc["skipped"]["idle"] = str(e)
            log(f"  idle failed: {e}")
        self.save()

        nt, nc = self.prof["chan_tunnels"], self.prof["chan_per"]
        tok = os.path.join(self.work, "chan_tokens.jsonl")
        try:
            with open(tok, "w") as f:
                for i in range(nt):
                    f.write(subprocess.run(
                        [self.snitun_bin, "token", "issue", "--fernet-key", self.svc.fernet_key,
                         "--hostname", f"t{i:05d}.chan.bench.test", "--valid-for", "7200"],
                        capture_output=True, text=True, check=True).stdout.strip() + "\n")
            r = self.tunnels_run(["--tokens", tok], timeout=240, channels=nc)
            ch = r["channels"]["channels"]
            r["rss_per_tunnel_kib"] = round((r["rss_tunnels_kib"] - r["rss_start_kib"]) /
                                            max(r["tunnels"]["ready"], 1), 3)
            r["rss_per_channel_kib"] = round((r["rss_channels_kib"] - r["rss_tunnels_kib"]) /
                                             max(ch, 1), 3)
            sc["results"]["channels"] = r
            log(f"  channels: {ch} channels on {nt} tunnels in {r['channels']['seconds']:.2f}s, "
                f"{r['rss_per_channel_kib']} KiB RSS per channel")
        except (BenchError, subprocess.CalledProcessError) as e:
            sc["skipped"]["channels"] = str(e)
            log(f"  channels failed: {e}")
        self.save()

    # -- ablations --------------------------------------------------------------
    @staticmethod
    def flag_line(help_text, pattern):
        for line in help_text.splitlines():
            m = re.match(r"\s*(--[a-z0-9-]+)(?:\s+(\S+))?", line)
            if m and re.search(pattern, m.group(1)):
                return m.group(1), (m.group(2) if m.group(2) and
                                    (m.group(2).isupper() or "|" in m.group(2)) else None)
        return None, None

    def onoff_variants(self, pattern):
        """(flag, [(name, gateway args, client args)...]): on, off, then any
        other value the metavar lists (e.g. auto). The client gets the same
        flag when its --help has it (both ends run the multiplexer)."""
        flag, meta = self.flag_line(self.server_help, pattern)
        if flag is None:
            return None, None
        both = flag in (self.client_help or "")
        if meta is None:
            return flag, [("on", [flag], [flag] if both else []), ("off", [], [])]
        vals = meta.split("|") if "|" in meta else ["on", "off"]
        on = next((v for v in vals if v in ("on", "yes", "true", "1", "always")), vals[0])
        off = next((v for v in vals if v in ("off", "no", "false", "0", "never")), vals[-1])
        rest = [v for v in vals if v not in (on, off)]
        return flag, [(v, [flag, v], [flag, v] if both else []) for v in [on, off] + rest]

    def ablation_probe(self, gw_extra, client_extra, probe="https+raw"):
        self.svc.start_snitun(gw_extra, client_extra)
        if probe == "rate":
            return self.ablation_rate()
        s = self.prof["abl_wrk_secs"]
        w = self.wrk(self.https_url("snitun", "100b.bin"), s, 50)
        st = self.stream("snitun", "up", self.prof["abl_raw_bytes"])
        if w is None and st is None:
            return None
        m = {}
        if w is not None:
            m.update({"https_rps": w["rps"], "https_p99_ms": w["lat_p99_ms"],
                      "https_cpu_per_10k_req": {k: w["cpu_per_10k_req"].get(k)
                                                for k in ("gateway", "client")}})
        if st is not None:
            m.update({"raw_gib_per_s": st["gib_per_s"],
                      "raw_cpu_per_gib": {k: st["cpu_per_gib"].get(k)
                                          for k in ("gateway", "client")}})
        return m

    def ablation_rate(self):
        """Channel opens through snitun (16 workers), after a warm-up as
        long as the gateway's one-second look at where channels go."""
        s, w = self.prof["rate_secs"], self.prof["rate_workers"][0]
        self.rate("snitun", 2, w)
        m = self.rate("snitun", s, w)
        if m is None:
            return None
        return {"rate_cps": m["channels_per_s"], "rate_p99_us": m.get("open_us_p99"),
                "rate_cpu_per_10k": {k: m["cpu_per_10k"].get(k) for k in ("gateway", "client")}}

    def ablation(self, key, title, variants, note=None, probe="https+raw"):
        if probe == "rate":
            load = (f"loadgen rate --workers {self.prof['rate_workers'][0]} --seconds "
                    f"{self.prof['rate_secs']} through snitun, after 2 s of the same")
        else:
            load = (f"wrk -t2 -c50 -d{self.prof['abl_wrk_secs']}s 100-byte keep-alive through "
                    f"snitun + loadgen stream up {self.prof['abl_raw_bytes']} bytes")
        sc = {"title": title, "kind": "ablation", "probe": probe, "load": load,
              "targets": [v[0] for v in variants] if variants else [],
              "rounds": {}, "median": {}, "ratios": {}, "skipped": {}, "note": note}
        self.result["scenarios"][key] = sc
        if not variants:
            sc["skipped"]["all"] = note or "n/a"
            self.save()
            return
        for name, _, _ in variants:
            sc["rounds"][name] = []
        for r in range(self.prof["rounds"]):
            for name, gx, cx in rotate(variants, r):
                try:
                    m = self.ablation_probe(gx, cx, probe)
                except BenchError as e:
                    log(f"  {key} {name}: {e}")
                    sc["skipped"][name] = str(e).splitlines()[0]
                    m = None
                sc["rounds"][name].append(m)
                if m and probe == "rate":
                    log(f"  {key} round {r + 1} {name}: channels/s={m.get('rate_cps')}")
                elif m:
                    log(f"  {key} round {r + 1} {name}: rps={m.get('https_rps')} "
                        f"raw={m.get('raw_gib_per_s')} GiB/s")
                self.save()
        for name in sc["rounds"]:
            sc["median"][name] = median_tree(sc["rounds"][name])
        # every variant against the second one (on/off, auto/off; uring/epoll)
        b = variants[1][0]
        mb = sc["median"].get(b)
        for a in [v[0] for v in variants if v[0] != b]:
            ma = sc["median"].get(a)
            if not (ma and mb):
                continue
            if probe == "rate":
                r = {k: ratio(ma.get(k), mb.get(k)) for k in ("rate_cps", "rate_p99_us")}
                cpu_key, cpu_label = "rate_cpu_per_10k", "rate_cpu"
            else:
                r = {k: ratio(ma.get(k), mb.get(k))
                     for k in ("https_rps", "https_p99_ms", "raw_gib_per_s")}
                cpu_key, cpu_label = "raw_cpu_per_gib", "raw_cpu"
            for side in ("gateway", "client"):
                r[f"{cpu_label}_{side}"] = ratio((ma.get(cpu_key) or {}).get(side),
                                                 (mb.get(cpu_key) or {}).get(side))
            sc["ratios"][f"{a}/{b}"] = r
        self.save()

    def sc_ablation(self):
        if not self.snitun_ok:
            self.result["scenarios"]["ablation_io"] = {
                "title": "Ablations", "kind": "ablation", "targets": [],
                "skipped": {"snitun": self.snitun_why}}
            return
        io_c = ["--io", "uring"] if "--io" in self.client_help else []
        io_e = ["--io", "epoll"] if "--io" in self.client_help else []
        self.ablation("ablation_io", "I/O engine: --io uring vs --io epoll (gateway and client)",
                      [("uring", ["--io", "uring"], io_c), ("epoll", ["--io", "epoll"], io_e)])
        self.ablation("ablation_threads", "Gateway shards: --threads 1 vs --threads 2",
                      [("1", ["--threads", "1"], []), ("2", ["--threads", "2"], [])])
        flag, v = self.onoff_variants(r"splice")
        self.ablation("ablation_splice", "splice on vs off (vs auto)", v,
                      note=f"flag {flag}, gateway and client" if flag else
                      "n/a: `snitun server --help` has no splice flag")
        flag, v = self.onoff_variants(r"batch")
        self.ablation("ablation_batch", "header batching on vs off", v,
                      note=f"flag {flag}, gateway and client" if flag else
                      "n/a: `snitun server --help` has no header-batching flag")
        flag, v = self.onoff_variants(r"steer")
        if v:  # a gateway flag only
            v = [(n, g, []) for n, g, _ in v]
        self.ablation("ablation_steer", "device listener steering on vs off (channel opens)", v,
                      note=f"flag {flag}, gateway, 2 shards, one tunnel" if flag else
                      "n/a: `snitun server --help` has no steering flag", probe="rate")
        self.svc.stop_snitun()
        self.svc.gw_args = self.svc.client_args = []

    # -- main -------------------------------------------------------------------
    def run(self):
        only = self.args.only.split(",") if self.args.only else SCENARIOS
        bad = [s for s in only if s not in SCENARIOS]
        if bad:
            raise BenchError(f"unknown scenario(s) {bad}; known: {', '.join(SCENARIOS)}")
        self.setup()
        self.save()
        for name in SCENARIOS:
            if name not in only:
                continue
            log(f"scenario {name} (t+{time.monotonic() - self.t_start:.0f}s)")
            getattr(self, f"sc_{name}")()
        self.result["meta"]["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        self.save()
        log(f"done in {self.result['meta']['elapsed_s']:.0f}s: {self.json_path}")
        return self.json_path


def _on_term(signum, frame):
    raise KeyboardInterrupt


def main():
    ap = argparse.ArgumentParser(
        prog="bench/run", description="snitun benchmark suite (see bench/README.md)",
        epilog="bench/run itself also takes --no-deps (skip deploy/deps.sh --bench) and "
               "--no-build (use the build directory as it is).")
    ap.add_argument("--quick", action="store_true", help="a few seconds per scenario, 1 round")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"),
                    help="build directory with snitun and loadgen (default: build/)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="results directory (default: bench/results; --quick: .../quick)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--port-base", type=int, default=18400,
                    help="ports base+1..base+7 on 127.0.0.1 (default 18400)")
    ap.add_argument("--no-snitun", action="store_true", help="baselines only")
    ap.add_argument("--no-hosts", action="store_true",
                    help="leave /etc/hosts alone and use the name localhost for HTTPS")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work dir")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_term)
    if args.quick and args.out == os.path.join(HERE, "results"):
        args.out = os.path.join(HERE, "results", "quick")
    b = Bench(args)
    rc = 0
    try:
        path = b.run()
    except BenchError as e:
        log(f"error: {e}")
        rc = 1
        path = b.json_path if os.path.exists(b.json_path) else None
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
        path = b.json_path if os.path.exists(b.json_path) else None
    finally:
        b.cleanup()
    if path:
        md = report.build(path, os.path.dirname(path))
        log(f"report: {md}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
