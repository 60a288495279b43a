#!/usr/bin/env python3
"""The deployment files in deploy/ against each other and against the built
binary:

- every Kubernetes manifest parses (python3-yaml) and carries what the
  gateway needs: a DaemonSet on :443 (hostNetwork or hostPort), the Fernet
  keys Secret mounted where SNITUN_FERNET_KEYS_FILE points, options from
  the ConfigMap through envFrom, /healthz and /readyz probes on the admin
  port, resources, a locked-down securityContext, SNITUN_IO=auto, and a
  Service + ServiceMonitor that select what exists;
- every SNITUN_* variable named anywhere in deploy/ is the variable of a
  real flag (`snitun server --help` / `client --help`, "[env: ...]");
- the example settings start the real binary: the gateway with the
  ConfigMap's and server.env's values answers /healthz and /readyz, the
  connector with client.env's values keeps running;
- the systemd units have the hardening directives, pass
  `systemd-analyze verify` and score low on `systemd-analyze security`
  (both skipped when systemd-analyze is missing or cannot run);
- the Containerfile's stages, user, ports, entry point, and a runtime
  package list that covers the binary's shared libraries.

Environment (ctest): SNITUN_BIN, SNITUN_SOURCE_DIR. By hand:
    SNITUN_BIN=build/snitun python3 tests/e2e/test_deploy_files.py
Prints "N passed, M failed[, K skipped]" and exits 1 on any failure.
"""

import glob
import math
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
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.environ.get("SNITUN_SOURCE_DIR", os.path.dirname(os.path.dirname(HERE)))
DEPLOY = os.path.join(SRC, "deploy")
BIN = os.environ.get("SNITUN_BIN", os.path.join(SRC, "build", "snitun"))

try:
    import yaml
except ImportError:
    # A python3 other than Debian's (pyenv, venv) first on PATH does not see
    # the Debian package python3-yaml; PyYAML runs pure-Python if need be.
    sys.path.append("/usr/lib/python3/dist-packages")
try:
    import yaml
except ImportError:
    print("FAIL yaml: python3 module 'yaml' is missing; deploy/deps.sh must install "
          "the Debian package python3-yaml")
    print("0 passed, 1 failed")
    sys.exit(1)


class Skip(Exception):
    pass


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def read(*parts):
    with open(os.path.join(DEPLOY, *parts)) as f:
        return f.read()


# ---- Kubernetes ----------------------------------------------------------------

def manifests():
    """Every document of every deploy/k8s/*.yaml, as (file, doc)."""
    out = []
    for path in sorted(glob.glob(os.path.join(DEPLOY, "k8s", "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    out.append((os.path.basename(path), doc))
    return out


def one(kind):
    docs = [d for _, d in manifests() if d.get("kind") == kind]
    check(len(docs) == 1, "expected exactly one %s, found %d" % (kind, len(docs)))
    return docs[0]


def gw_container():
    ds = one("DaemonSet")
    cs = ds["spec"]["template"]["spec"]["containers"]
    check(len(cs) == 1, "the DaemonSet should run one container, has %d" % len(cs))
    return cs[0]


def gw_env():
    """The container's SNITUN_* environment: envFrom ConfigMaps, then env."""
    c = gw_container()
    cms = {d["metadata"]["name"]: d for _, d in manifests() if d.get("kind") == "ConfigMap"}
    env = {}
    for src in c.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref is not None:
            check(ref["name"] in cms, "envFrom names ConfigMap %r, not in deploy/k8s"
                  % ref["name"])
            env.update({k: str(v) for k, v in cms[ref["name"]].get("data", {}).items()})
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
    return env


def port_of(addr):
    m = re.fullmatch(r"(\[[^\]]*\]|[^:\[\]]+):(\d+)", addr)
    check(m is not None, "not ADDR:PORT: %r" % addr)
    return m.group(1).strip("[]"), int(m.group(2))


def container_port(c, port):
    """A probe/Service port (name or number) as a number."""
    if isinstance(port, int):
        return port
    for p in c.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError("no container port named %r" % port)


def cpu_cores(q):
    q = str(q)
    return int(q[:-1]) / 1000.0 if q.endswith("m") else float(q)


def mem_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    check(m is not None and m.group(2) in list(units) + [""], "bad memory quantity %r" % q)
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_yaml_parses():
    docs = manifests()
    files = {f for f, _ in docs}
    for want in ("daemonset.yaml", "configmap.yaml", "secret.example.yaml",
                 "service-monitor.yaml"):
        check(want in files, "deploy/k8s/%s missing or empty" % want)
    namespaces = set()
    for f, d in docs:
        check(isinstance(d, dict), "%s: a document is not a mapping" % f)
        for key in ("apiVersion", "kind", "metadata"):
            check(key in d, "%s: %s without %s" % (f, d.get("kind"), key))
        check(d["metadata"].get("name"), "%s: %s without metadata.name" % (f, d["kind"]))
        namespaces.add(d["metadata"].get("namespace"))
    check(len(namespaces) == 1, "manifests in several namespaces: %s" % namespaces)


def test_daemonset_listens_on_443():
    ds = one("DaemonSet")
    check(ds["apiVersion"] == "apps/v1", "DaemonSet apiVersion %r" % ds["apiVersion"])
    spec = ds["spec"]["template"]["spec"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    sel = ds["spec"]["selector"]["matchLabels"]
    check(all(labels.get(k) == v for k, v in sel.items()), "selector does not match the pod")
    c = gw_container()
    check(c.get("args", [None])[0] == "server", "container args should start with 'server'")
    check(len(c.get("args", [])) == 1, "flags in args would override the ConfigMap's "
          "variables; keep args to ['server']")
    ports = c.get("ports", [])
    host_net = spec.get("hostNetwork") is True
    on443 = [p for p in ports if p.get("hostPort") == 443
             or (host_net and p.get("containerPort") == 443)]
    check(on443, "no port 443 on the node (hostNetwork + containerPort 443, or hostPort 443)")
    _, lport = port_of(gw_env()["SNITUN_LISTEN"].split(",")[0].strip())
    check(lport == on443[0]["containerPort"], "SNITUN_LISTEN port %d is not the container "
          "port %d" % (lport, on443[0]["containerPort"]))
    if host_net:
        check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet",
              "hostNetwork pods need dnsPolicy ClusterFirstWithHostNet")
        for p in ports:
            check(p.get("hostPort", p["containerPort"]) == p["containerPort"],
                  "hostNetwork: hostPort must equal containerPort")


def test_keys_secret_mounted():
    ds = one("DaemonSet")
    secret = one("Secret")
    c = gw_container()
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"].get("volumes", [])}
    svols = [v for v in vols.values() if v.get("secret", {}).get("secretName")
             == secret["metadata"]["name"]]
    check(len(svols) == 1, "no volume of Secret %r" % secret["metadata"]["name"])
    vol = svols[0]
    mounts = [m for m in c.get("volumeMounts", []) if m["name"] == vol["name"]]
    check(len(mounts) == 1, "Secret volume %r not mounted in the container" % vol["name"])
    m = mounts[0]
    check(m.get("readOnly") is True, "the keys mount should be readOnly")
    check("subPath" not in m, "subPath mounts never see Secret updates (key rotation)")
    keys_file = gw_env().get("SNITUN_FERNET_KEYS_FILE")
    check(keys_file, "SNITUN_FERNET_KEYS_FILE not set for the container")
    items = vol["secret"].get("items")
    keys = ([(i["key"], i["path"]) for i in items] if items else
            [(k, k) for k in list(secret.get("stringData", {})) + list(secret.get("data", {}))])
    paths = {os.path.join(m["mountPath"], p): k for k, p in keys}
    check(keys_file in paths, "SNITUN_FERNET_KEYS_FILE=%s is none of the mounted files %s"
          % (keys_file, sorted(paths)))
    key = paths[keys_file]
    check(key in secret.get("stringData", {}) or key in secret.get("data", {}),
          "the Secret has no key %r" % key)


def test_envfrom_configmap():
    cm = one("ConfigMap")
    refs = [s["configMapRef"]["name"] for s in gw_container().get("envFrom", [])
            if "configMapRef" in s]
    check(cm["metadata"]["name"] in refs, "envFrom does not reference ConfigMap %r"
          % cm["metadata"]["name"])
    data = cm.get("data", {})
    check(data, "empty ConfigMap")
    for k, v in data.items():
        check(k.startswith("SNITUN_"), "ConfigMap key %r is not an SNITUN_* variable" % k)
        check(isinstance(v, str), "ConfigMap value of %s must be a string, got %r" % (k, v))
    check(data.get("SNITUN_IO") == "auto", "SNITUN_IO must be set to auto explicitly")


def test_probes_on_admin_port():
    c = gw_container()
    env = gw_env()
    host, aport = port_of(env["SNITUN_ADMIN_LISTEN"])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        p = c.get(probe)
        check(p is not None and "httpGet" in p, "%s must be an httpGet probe" % probe)
        check(p["httpGet"].get("path") == path, "%s path %r, want %s"
              % (probe, p["httpGet"].get("path"), path))
        got = container_port(c, p["httpGet"]["port"])
        check(got == aport, "%s on port %d, admin listens on %d" % (probe, got, aport))
    if host not in ("127.0.0.1", "::1", "localhost"):
        check(env.get("SNITUN_ADMIN_PUBLIC") == "true",
              "a non-loopback SNITUN_ADMIN_LISTEN needs SNITUN_ADMIN_PUBLIC=true "
              "(the gateway refuses to start otherwise)")


def test_resources():
    r = gw_container().get("resources", {})
    for part in ("requests", "limits"):
        for what in ("cpu", "memory"):
            check(what in r.get(part, {}), "resources.%s.%s missing" % (part, what))
    check(cpu_cores(r["requests"]["cpu"]) <= cpu_cores(r["limits"]["cpu"]), "cpu request > limit")
    check(mem_bytes(r["requests"]["memory"]) <= mem_bytes(r["limits"]["memory"]),
          "memory request > limit")
    threads = gw_env().get("SNITUN_THREADS")
    if threads is not None:
        check(int(threads) <= math.ceil(cpu_cores(r["limits"]["cpu"])),
              "SNITUN_THREADS=%s above the cpu limit" % threads)


def test_security_context():
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    sc = gw_container().get("securityContext", {})

    def eff(key):
        return sc.get(key, psc.get(key))

    check(eff("runAsNonRoot") is True, "runAsNonRoot must be true")
    check(eff("runAsUser") not in (None, 0), "runAsUser should be a fixed non-zero uid")
    check(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    check(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    caps = sc.get("capabilities", {})
    check(caps.get("drop") == ["ALL"], "capabilities.drop must be [ALL]")
    check(caps.get("add") == ["NET_BIND_SERVICE"], "capabilities.add must be [NET_BIND_SERVICE]")
    check((eff("seccompProfile") or {}).get("type") == "RuntimeDefault",
          "seccompProfile must be RuntimeDefault")
    check(pod.get("automountServiceAccountToken") is False,
          "the gateway needs no API token: automountServiceAccountToken false")


def test_service_and_monitor():
    ds = one("DaemonSet")
    svc = one("Service")
    sm = one("ServiceMonitor")
    c = gw_container()
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    check(svc["apiVersion"] == "v1", "Service apiVersion")
    check(all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
          "Service selector does not match the DaemonSet's pods")
    _, aport = port_of(gw_env()["SNITUN_ADMIN_LISTEN"])
    sports = {p["name"]: p for p in svc["spec"]["ports"]}
    check(sports, "Service without named ports")
    for p in sports.values():
        check(container_port(c, p.get("targetPort", p["port"])) == aport,
              "Service port %s does not target the admin port %d" % (p["name"], aport))
    check(sm["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion %r"
          % sm["apiVersion"])
    sel = sm["spec"]["selector"]["matchLabels"]
    check(all(svc["metadata"].get("labels", {}).get(k) == v for k, v in sel.items()),
          "ServiceMonitor selector does not match the Service's labels")
    ns = sm["spec"].get("namespaceSelector", {}).get("matchNames")
    if ns is not None:
        check(svc["metadata"]["namespace"] in ns, "namespaceSelector misses the Service")
    eps = sm["spec"]["endpoints"]
    check(eps, "ServiceMonitor without endpoints")
    for ep in eps:
        check(ep.get("port") in sports, "endpoint port %r is not a Service port name"
              % ep.get("port"))
        check(ep.get("path", "/metrics") == "/metrics", "endpoint path %r" % ep.get("path"))


# ---- SNITUN_* variables against the binary ------------------------------------

def bin_envs(sub):
    """The [env: ...] names of `snitun SUB --help`; Skip if there are none."""
    if not os.access(BIN, os.X_OK):
        raise Skip("no binary at SNITUN_BIN=%s" % BIN)
    p = subprocess.run([BIN, sub, "--help"], capture_output=True, text=True, timeout=10)
    names = set(re.findall(r"\[env: (SNITUN_[A-Z0-9_]+)", p.stdout))
    if p.returncode != 0 or not names:
        raise Skip("`snitun %s --help` lists no variables yet (exit %d: %s)"
                   % (sub, p.returncode, (p.stderr or p.stdout).strip()[:120]))
    return names


VAR_RE = re.compile(r"^\s*#?\s*(SNITUN_[A-Z0-9_]+)=", re.M)


def env_file(name):
    """KEY=VALUE lines of an EnvironmentFile (comments and blanks skipped)."""
    out = {}
    for line in read("systemd", name).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        k, sep, v = line.partition("=")
        check(sep == "=", "%s: not KEY=VALUE: %r" % (name, line))
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
            v = v[1:-1]
        out[k.strip()] = v
    return out


def unit_env(unit):
    """SNITUN_* from a unit's Environment= lines."""
    out = {}
    for v in unit_values(parse_unit(unit), "Service", "Environment"):
        for item in v.split():
            k, _, val = item.strip("\"").partition("=")
            out[k] = val
    return out


def test_server_vars_are_flags():
    names = bin_envs("server")
    used = {}
    for k in one("ConfigMap").get("data", {}):
        used[k] = "k8s/configmap.yaml"
    for e in gw_container().get("env", []):
        used[e["name"]] = "k8s/daemonset.yaml"
    for k in VAR_RE.findall(read("systemd", "snitun-server.env")):  # commented ones too
        used[k] = "systemd/snitun-server.env"
    for k in unit_env("snitun-server.service"):
        used[k] = "systemd/snitun-server.service"
    for ins in stages()[-1][1]:
        if ins.upper().startswith("ENV "):
            for k in re.findall(r"(SNITUN_[A-Z0-9_]+)=", ins):
                used[k] = "container/Containerfile"
    bad = sorted("%s (%s)" % (k, f) for k, f in used.items()
                 if k.startswith("SNITUN_") and k not in names)
    check(not bad, "not variables of `snitun server`: %s" % ", ".join(bad))
    check(len(used) >= 8, "suspiciously few variables found: %s" % sorted(used))


def test_client_vars_are_flags():
    names = bin_envs("client")
    used = set(VAR_RE.findall(read("systemd", "snitun-client.env")))
    used |= set(unit_env("snitun-client.service"))
    bad = sorted(used - names)
    check(not bad, "not variables of `snitun client`: %s" % ", ".join(bad))
    check(len(used) >= 4, "suspiciously few variables found: %s" % sorted(used))


# ---- the example values start the real binary ----------------------------------

def free_port():
    """e2elib.free_port: never the same port twice in one process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2elib
    return e2elib.free_port()


def clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("SNITUN_")}


def http_status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise AssertionError("no exit within 15 s of SIGTERM")
    return p.returncode


def run_server(settings, tmp):
    """Start the gateway with `settings` made local (free loopback ports, a
    fresh key): /healthz and /readyz must answer 200, SIGTERM exit 0."""
    bin_envs("server")
    key = subprocess.run([BIN, "keygen"], capture_output=True, text=True, timeout=10,
                         check=True).stdout.strip()
    keys = os.path.join(tmp, "fernet.keys")
    with open(keys, "w") as f:
        f.write("# test\n%s\n" % key)
    env = clean_env()
    env.update(settings)
    admin = free_port()
    for k in ("SNITUN_LISTEN", "SNITUN_SNI_LISTEN", "SNITUN_PEER_LISTEN"):
        env.pop(k, None)
    env["SNITUN_LISTEN"] = "127.0.0.1:%d" % free_port()
    env["SNITUN_ADMIN_LISTEN"] = "127.0.0.1:%d" % admin
    env["SNITUN_FERNET_KEYS_FILE"] = keys
    log = open(os.path.join(tmp, "server.log"), "w+")
    p = subprocess.Popen([BIN, "server"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 15
        codes = (None, None)
        while time.time() < deadline and p.poll() is None:
            codes = tuple(http_status("http://127.0.0.1:%d%s" % (admin, u))
                          for u in ("/healthz", "/readyz"))
            if codes == (200, 200):
                break
            time.sleep(0.1)
        log.seek(0)
        check(p.poll() is None, "the gateway exited (%s) with these settings:\n%s"
              % (p.returncode, log.read()[-2000:]))
        check(codes == (200, 200), "healthz/readyz answered %s" % (codes,))
        rc = stop(p)
        check(rc == 0, "exit %d after SIGTERM" % rc)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def test_configmap_values_start_gateway():
    with tempfile.TemporaryDirectory() as tmp:
        run_server(gw_env(), tmp)


def test_server_env_values_start_gateway():
    settings = env_file("snitun-server.env")
    settings = dict(unit_env("snitun-server.service"), **settings)
    with tempfile.TemporaryDirectory() as tmp:
        run_server(settings, tmp)


def test_client_env_values_start_connector():
    bin_envs("client")
    settings = env_file("snitun-client.env")
    with tempfile.TemporaryDirectory() as tmp:
        key = subprocess.run([BIN, "keygen"], capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        tok = subprocess.run([BIN, "token", "issue", "--fernet-key", key, "--hostname",
                              "deploy.example.com"], capture_output=True, text=True,
                             timeout=10, env=clean_env())
        if tok.returncode != 0:
            raise Skip("`snitun token issue` failed: %s" % tok.stderr.strip()[:120])
        token_file = os.path.join(tmp, "client-token.json")
        with open(token_file, "w") as f:
            f.write(tok.stdout)
        env = clean_env()
        env.update(settings)
        # A gateway port nobody listens on: the connector logs and retries.
        env["SNITUN_CLIENT_SERVER"] = "127.0.0.1:%d" % free_port()
        env["SNITUN_CLIENT_TOKEN_FILE"] = token_file
        log = open(os.path.join(tmp, "client.log"), "w+")
        p = subprocess.Popen([BIN, "client"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(1.5)
            log.seek(0)
            check(p.poll() is None, "the connector exited (%s) with client.env's settings:\n%s"
                  % (p.returncode, log.read()[-2000:]))
            rc = stop(p)
            check(rc == 0, "exit %d after SIGTERM" % rc)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()


# ---- systemd ---------------------------------------------------------------------

def parse_unit(name):
    """{section: [(key, value), ...]}: systemd's INI dialect, where keys
    repeat and a trailing backslash continues a line."""
    sections, cur, pending = {}, None, ""
    for raw in read("systemd", name).splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], [])
            continue
        check(cur is not None, "%s: %r before any section" % (name, line))
        k, sep, v = line.partition("=")
        check(sep == "=", "%s: not Key=Value: %r" % (name, line))
        cur.append((k.strip(), v.strip()))
    return sections


def unit_values(sections, section, key):
    return [v for k, v in sections.get(section, []) if k == key]


def unit_value(sections, section, key):
    vals = unit_values(sections, section, key)
    return vals[-1] if vals else None


COMMON = {
    "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
    "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native", "LimitNOFILE": "1048576", "Restart": "on-failure",
    "SystemCallErrorNumber": "EPERM",
}
URING = {"io_uring_setup", "io_uring_enter", "io_uring_register"}


def check_unit(name, sub, env_example):
    u = parse_unit(name)
    check("Service" in u and "Install" in u and "Unit" in u, "%s: sections missing" % name)
    for k, want in COMMON.items():
        got = unit_value(u, "Service", k)
        check(got == want, "%s: %s=%s, want %s" % (name, k, got, want))
    fams = set((unit_value(u, "Service", "RestrictAddressFamilies") or "").split())
    check(fams == {"AF_INET", "AF_INET6", "AF_UNIX"}, "%s: RestrictAddressFamilies=%s"
          % (name, " ".join(sorted(fams))))
    check(unit_value(u, "Service", "DynamicUser") == "yes"
          or unit_value(u, "Service", "User") not in (None, "", "root", "0"),
          "%s: needs DynamicUser=yes or a dedicated User=" % name)
    argv = unit_value(u, "Service", "ExecStart").split()
    check(os.path.basename(argv[0]) == "snitun" and argv[1:] == [sub],
          "%s: ExecStart should be '.../snitun %s' (options via the environment), got %r"
          % (name, sub, " ".join(argv)))
    envf = [v.lstrip("-") for v in unit_values(u, "Service", "EnvironmentFile")]
    check(envf == ["/etc/snitun/%s.env" % sub], "%s: EnvironmentFile=%s, want /etc/snitun/%s.env"
          % (name, envf, sub))
    check(os.path.exists(os.path.join(DEPLOY, "systemd", env_example)),
          "example %s missing" % env_example)
    # io_uring: allowed explicitly on top of @system-service, never denied.
    allowed, denied = set(), set()
    for v in unit_values(u, "Service", "SystemCallFilter"):
        (denied if v.startswith("~") else allowed).update(v.lstrip("~").split())
    check("@system-service" in allowed, "%s: SystemCallFilter=@system-service missing" % name)
    check(URING <= allowed and not (URING & denied),
          "%s: the io_uring calls should be allowed explicitly" % name)
    return u


def test_server_unit():
    u = check_unit("snitun-server.service", "server", "snitun-server.env")
    for k in ("CapabilityBoundingSet", "AmbientCapabilities"):
        check(unit_value(u, "Service", k) == "CAP_NET_BIND_SERVICE",
              "server: %s=%s" % (k, unit_value(u, "Service", k)))
    check(re.fullmatch(r"/bin/kill -HUP \$MAINPID", unit_value(u, "Service", "ExecReload") or ""),
          "server: ExecReload must be /bin/kill -HUP $MAINPID (key rotation)")
    env = dict(unit_env("snitun-server.service"), **env_file("snitun-server.env"))
    keys = env.get("SNITUN_FERNET_KEYS_FILE")
    check(keys == "/etc/snitun/fernet.keys", "server: SNITUN_FERNET_KEYS_FILE=%s" % keys)
    ro = " ".join(unit_values(u, "Service", "ReadOnlyPaths")).split()
    creds = unit_values(u, "Service", "LoadCredential")
    check(any(keys.startswith(p.lstrip("-+").rstrip("/") + "/") for p in ro) or creds,
          "server: the keys file must be reachable via ReadOnlyPaths= or LoadCredential=")


def test_client_unit():
    u = check_unit("snitun-client.service", "client", "snitun-client.env")
    check(unit_value(u, "Service", "CapabilityBoundingSet") == "",
          "client: CapabilityBoundingSet= must be empty")
    check(unit_value(u, "Service", "AmbientCapabilities") in (None, ""),
          "client: no AmbientCapabilities")
    env = env_file("snitun-client.env")
    sources = [k for k in ("SNITUN_CLIENT_TOKEN_FILE", "SNITUN_CLIENT_TOKEN_COMMAND",
                           "SNITUN_CLIENT_TOKEN") if k in env]
    check(len(sources) == 1, "client.env must set exactly one token source, sets %s" % sources)


def analyze_dir(tmp):
    """The units copied into tmp with ExecStart on the built binary."""
    out = []
    for name in ("snitun-server.service", "snitun-client.service"):
        text = read("systemd", name)
        exe = os.path.abspath(BIN) if os.access(BIN, os.X_OK) else "/bin/true"
        text = re.sub(r"^ExecStart=\S+", "ExecStart=" + exe, text, flags=re.M)
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        out.append(path)
    return out


def need_systemd_analyze(tmp):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        raise Skip("systemd-analyze not installed (Debian package systemd)")
    probe = os.path.join(tmp, "snitun-probe.service")
    with open(probe, "w") as f:
        f.write("[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n")
    p = subprocess.run([exe, "verify", "--man=no", probe], capture_output=True, text=True,
                       timeout=60)
    if p.returncode != 0:
        raise Skip("systemd-analyze cannot run in this sandbox: %s"
                   % (p.stderr or p.stdout).strip()[:200])
    os.unlink(probe)
    return exe


def test_systemd_analyze_verify():
    with tempfile.TemporaryDirectory() as tmp:
        exe = need_systemd_analyze(tmp)
        units = analyze_dir(tmp)
        p = subprocess.run([exe, "verify", "--man=no"] + units, capture_output=True,
                           text=True, timeout=60)
        out = (p.stdout + p.stderr).strip()
        # verify exits 0 on unknown keys and bad values ("..., ignoring"):
        # any line about our files counts as a failure.
        ours = [line for line in out.splitlines() if tmp in line]
        check(p.returncode == 0 and not ours, "systemd-analyze verify (exit %d):\n%s"
              % (p.returncode, out))


def test_systemd_analyze_security():
    with tempfile.TemporaryDirectory() as tmp:
        exe = need_systemd_analyze(tmp)
        for path in analyze_dir(tmp):
            p = subprocess.run([exe, "security", "--offline=yes", path], capture_output=True,
                               text=True, timeout=60)
            out = p.stdout + p.stderr
            m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
            if m is None:
                raise Skip("`systemd-analyze security --offline` unavailable: %s"
                           % out.strip()[:200])
            level = float(m.group(1))
            weak = [line.rstrip() for line in out.splitlines() if line.startswith("\u2717")]
            check(level <= 2.0, "%s: exposure %.1f (> 2.0), a hardening directive went "
                  "missing; exposed:\n%s" % (os.path.basename(path), level, "\n".join(weak)))


# ---- container -----------------------------------------------------------------

RUNTIME_PKGS = {"libssl3", "liburing2", "libjemalloc2", "liburcu8", "libjansson4",
                "libmicrohttpd12", "ca-certificates"}
# In debian:12-slim already; libasan/libubsan come only with sanitizer builds.
BASE_PKGS = {"libc6", "libgcc-s1", "libstdc++6", "libasan8", "libubsan1"}


def stages():
    """[(FROM line, [instructions])] with continuation lines joined."""
    text = re.sub(r"\\\n", " ", read("container", "Containerfile"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append((line, []))
        else:
            check(out, "instruction before FROM: %r" % line)
            out[-1][1].append(line)
    return out


def installed_pkgs(instrs):
    pkgs = set()
    for ins in instrs:
        for m in re.finditer(r"apt-get install ([^&;]*)", ins):
            pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs


def test_containerfile():
    st = stages()
    check(len(st) == 2, "want two stages (build, runtime), got %d" % len(st))
    (b_from, build), (r_from, run) = st
    check(re.fullmatch(r"FROM debian:12 AS build", b_from, re.I), "build stage: %r" % b_from)
    check(re.fullmatch(r"FROM debian:12-slim", r_from, re.I), "runtime stage: %r" % r_from)
    joined = "\n".join(build)
    check("deploy/deps.sh" in joined and "cmake" in joined, "build stage must run "
          "deploy/deps.sh and cmake")
    check(installed_pkgs(run) >= RUNTIME_PKGS, "runtime stage lacks %s"
          % sorted(RUNTIME_PKGS - installed_pkgs(run)))
    check(not any(p.endswith("-dev") for p in installed_pkgs(run)), "-dev package at runtime")
    users = [i.split(None, 1)[1] for i in run if i.upper().startswith("USER ")]
    check(users, "no USER in the runtime stage")
    uid = users[-1].split(":")[0]
    check(uid.isdigit() and int(uid) != 0, "USER should be a numeric non-root uid (for "
          "runAsNonRoot), got %r" % users[-1])
    ds_uid = (one("DaemonSet")["spec"]["template"]["spec"].get("securityContext", {})
              .get("runAsUser"))
    check(ds_uid is None or ds_uid == int(uid), "DaemonSet runAsUser %s != image uid %s"
          % (ds_uid, uid))
    exposed = set()
    for i in run:
        if i.upper().startswith("EXPOSE "):
            exposed |= set(i.split()[1:])
    check(exposed >= {"443", "8080", "9090"}, "EXPOSE %s" % sorted(exposed))
    check('ENTRYPOINT ["snitun"]' in run, "ENTRYPOINT must be [\"snitun\"]")
    cmds = [i for i in run if i.upper().startswith("CMD ")]
    check(cmds and re.match(r'CMD \["server"', cmds[-1]), "CMD must start with \"server\"")
    check(any("COPY --from=build" in i for i in run), "runtime stage copies nothing from build")


def test_runtime_pkgs_cover_binary():
    """Every library the binary loads directly belongs to a runtime package."""
    if not os.access(BIN, os.X_OK):
        raise Skip("no binary at SNITUN_BIN=%s" % BIN)
    with open(BIN, "rb") as f:
        if f.read(4) != b"\x7fELF":
            raise Skip("SNITUN_BIN=%s is not an ELF file" % BIN)
    for tool in ("readelf", "ldd", "dpkg-query"):
        if shutil.which(tool) is None:
            raise Skip("%s not installed" % tool)
    dyn = subprocess.run(["readelf", "-d", BIN], capture_output=True, text=True, timeout=30)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn.stdout)
    check(needed, "readelf found no NEEDED entries in %s" % BIN)
    ldd = subprocess.run(["ldd", BIN], capture_output=True, text=True, timeout=30).stdout
    where = dict(re.findall(r"^\s*(\S+) => (\S+)", ldd, re.M))
    pkgs = installed_pkgs(stages()[1][1])
    missing = []
    for so in needed:
        path = where.get(so)
        if path is None or not path.startswith("/"):
            continue
        owner = None
        for cand in (path, os.path.realpath(path), "/usr" + path if not path.startswith("/usr")
                     else path[4:]):
            q = subprocess.run(["dpkg-query", "-S", cand], capture_output=True, text=True)
            if q.returncode == 0:
                owner = q.stdout.split(":")[0].strip()
                break
        if owner is None:
            continue  # not from a Debian package (a local build): nothing to say
        if owner not in pkgs and owner not in BASE_PKGS:
            missing.append("%s (%s)" % (owner, so))
    check(not missing, "Containerfile runtime stage misses %s" % ", ".join(missing))


def test_readme():
    text = read("README.md")
    for word in ("snitun keygen", "snitun token issue", "systemctl enable", "systemctl reload",
                 "kubectl apply", "ServiceMonitor", "io_uring", "epoll", "RuntimeDefault",
                 "SystemCallFilter"):
        check(word in text, "deploy/README.md does not mention %r" % word)


TESTS = [
    test_yaml_parses,
    test_daemonset_listens_on_443,
    test_keys_secret_mounted,
    test_envfrom_configmap,
    test_probes_on_admin_port,
    test_resources,
    test_security_context,
    test_service_and_monitor,
    test_server_vars_are_flags,
    test_client_vars_are_flags,
    test_configmap_values_start_gateway,
    test_server_env_values_start_gateway,
    test_client_env_values_start_connector,
    test_server_unit,
    test_client_unit,
    test_systemd_analyze_verify,
    test_systemd_analyze_security,
    test_containerfile,
    test_runtime_pkgs_cover_binary,
    test_readme,
]


def main():
    passed = failed = skipped = 0
    for t in TESTS:
        try:
            t()
        except Skip as e:
            skipped += 1
            print("SKIP %s: %s" % (t.__name__, e))
        except Exception as e:  # noqa: BLE001 - report and go on
            failed += 1
            print("FAIL %s: %s" % (t.__name__, e))
            if not isinstance(e, AssertionError):
                traceback.print_exc()
        else:
            passed += 1
            print("ok   %s" % t.__name__)
        sys.stdout.flush()
    print("%d passed, %d failed%s" % (passed, failed,
                                       ", %d skipped" % skipped if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
