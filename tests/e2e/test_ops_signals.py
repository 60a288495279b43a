#!/usr/bin/env python3
"""Operations features of `snitun server`, part 2: signals and privileges,
with both engines.

- SIGHUP re-reads --fernet-keys-file: a K2 token is refused, K2 is added,
  SIGHUP, the K2 token is accepted; the K1 tunnel opened before is
  untouched (still pings, still carries a device channel); a bad file and a
  missing file are rejected (the old keys stay, the log line says why,
  key_reloads_total{result="error"}); a file without K1 makes K1 tokens
  fail while the K1 tunnel stays up;
- SIGTERM drains: the listeners close at once (new device connections and
  tunnels are refused by the kernel), /readyz says 503 while /healthz stays
  200, the tunnel keeps answering, a 24 MiB transfer in flight completes
  and the channel keeps flowing both ways; the process exits 0 as soon as
  the last channel closes, well before --drain-timeout;
- SIGTERM with a stuck channel and --drain-timeout 2: exit 0 after about
  2 s, the channel closed; a second SIGTERM/SIGINT ends the drain at once;
  with no channel open the exit is immediate;
- --user nobody (as root): listeners bound as root, then the ids of nobody
  (/proc/PID/status Uid/Gid), and a tunnel and a request still work; an
  unknown user refuses to start (exit 1, clear message); not root: a
  warning and nothing else changes.
"""

import hashlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

HELLO = L.read_data("clienthello", "openssl_tls13_sni.bin")
ASAN = "asan" in os.environ.get("SNITUN_BUILD_DIR", "").lower()
SLACK = 3.0 if ASAN else 1.5


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def no_sanitizer(text, who):
    bad = [ln for ln in text.splitlines() if "Sanitizer" in ln or "runtime error:" in ln]
    check(not bad, "%s: sanitizer report:\n%s" % (who, "\n".join(bad[:20])))


def http_get(port, path):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(port, series):
    code, body = http_get(port, "/metrics")
    check(code == 200, "/metrics status %d" % code)
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_metric(port, series, want, timeout=3.0):
    deadline = time.time() + timeout
    while True:
        v = metric(port, series)
        if v == want:
            return
        check(time.time() < deadline, "%s = %s, want %s" % (series, v, want))
        time.sleep(0.05)


def keygen():
    return subprocess.run([L.BIN, "keygen"], check=True, capture_output=True,
                          text=True).stdout.strip()


def write_keys(path, keys):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("# rotated by the test\n" + "".join(k + "\n" for k in keys))
    os.rename(tmp, path)


def next_frame(t, skip=(P.PAUSE, P.RESUME)):
    while True:
        f = t.recv_frame(10)
        if f.flow not in skip:
            return f


def ping(t):
    pid = t.send_ping()
    f = next_frame(t)
    check(f.flow == P.PING and f.id == pid and f.extra[:4] == b"pong", "pong: %r" % f)


def tunnel(port, name, fernet_key=L.K1):
    tok = L.issue_token(name, fernet_key=fernet_key)
    t = P.connect("127.0.0.1", port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
    ping(t)
    return t


def refused_token(port, name, fernet_key):
    tok = L.issue_token(name, fernet_key=fernet_key)
    s = L.connect("127.0.0.1", port)
    s.sendall(tok.encode())
    ok = L.closed_without_data(s, 5)
    s.close()
    return ok


def recv_exact(sock, n, timeout=30):
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        check(chunk, "EOF after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)


def open_channel(port, t):
    """A device connection for L.HELLO_NAME: (device socket, channel id)."""
    d = L.connect("127.0.0.1", port)
    d.sendall(HELLO)
    f = next_frame(t)
    check(f.flow == P.NEW, "NEW expected, got %r" % f)
    got = b""
    while len(got) < len(HELLO):
        g = next_frame(t)
        check(g.flow == P.DATA and g.id == f.id, "DATA expected, got %r" % g)
        got += g.data
    check(got == HELLO, "the hello arrives unchanged")
    return d, f.id


def roundtrip(port, t):
    d, fid = open_channel(port, t)
    reply = os.urandom(5000)
    t.send_data(fid, reply)
    check(recv_exact(d, len(reply)) == reply, "the device gets the tunnel's reply")
    d.close()
    f = next_frame(t)
    check(f.flow == P.CLOSE and f.id == fid, "CLOSE expected, got %r" % f)


def refused(port, timeout=3.0):
    """True once a new connection to port is refused by the kernel."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=1)
        except ConnectionRefusedError:
            return True
        except (ConnectionResetError, socket.timeout):
            # queued while the listener closed, or a SYN the closing
            # listener dropped (seen under load): ask again
            continue
        s.close()
        time.sleep(0.05)
    return False


def wait_exit(gw, timeout):
    try:
        gw.p.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    return gw.p.returncode


def finish(gw):
    rc = gw.stop()
    no_sanitizer(gw.text(), "gateway")
    return rc


# ---- SIGHUP ------------------------------------------------------------------------

def sighup_rotation(io):
    d = L.tmpdir()
    keys = os.path.join(d, "keys.txt")
    k2 = keygen()
    write_keys(keys, [L.K1])
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2, keys=(),
                   extra=["--fernet-keys-file", keys, "--handshake-timeout", "1",
                          "--drain-timeout", "3"])
    ap = gw.admin_port
    tunnels = []
    try:
        t1 = tunnel(port, L.HELLO_NAME)          # K1, serves the hello's name
        tunnels.append(t1)
        check(refused_token(port, "k2.example", k2), "K2 refused before the reload")
        write_keys(keys, [L.K1, k2])
        gw.send_signal(signal.SIGHUP)
        check(gw.wait_log(r'msg="Fernet keys reloaded" keys=2'), "reload logged")
        wait_metric(ap, "snitun_fernet_keys", 2)
        wait_metric(ap, 'snitun_key_reloads_total{result="ok"}', 1)
        tunnels.append(tunnel(port, "k2.example", k2))   # K2 accepted now
        ping(t1)                                         # K1 tunnel untouched
        roundtrip(port, t1)

        # a bad file: old keys kept, the line says why
        with open(keys, "w") as f:
            f.write("%s\nnot-a-key\n" % L.K1)
        gw.send_signal(signal.SIGHUP)
        check(gw.wait_log(r'msg="Fernet keys not reloaded, keeping the old ones" '
                          r'error=".*keys\.txt:2: [^"]+" keys=2'), "bad file logged with line")
        wait_metric(ap, 'snitun_key_reloads_total{result="error"}', 1)
        wait_metric(ap, "snitun_fernet_keys", 2)
        tunnels.append(tunnel(port, "k2b.example", k2))  # K2 still good
        # a missing file: the same
        os.unlink(keys)
        gw.send_signal(signal.SIGHUP)
        check(gw.wait_log(r'keeping the old ones" error=".*keys\.txt[^"]*(No such file|'
                          r'cannot)[^"]*"'), "missing file logged")
        wait_metric(ap, 'snitun_key_reloads_total{result="error"}', 2)
        tunnels.append(tunnel(port, "k1b.example", L.K1))  # K1 still good

        # K1 retired: new K1 tokens fail, the K1 tunnel stays
        write_keys(keys, [k2])
        gw.send_signal(signal.SIGHUP)
        check(gw.wait_log(r'msg="Fernet keys reloaded" keys=1'), "second reload logged")
        check(refused_token(port, "k1c.example", L.K1), "K1 refused once retired")
        ping(t1)
        roundtrip(port, t1)
        check(L.K1 not in gw.text() and k2 not in gw.text(), "no key in the log")
        for t in tunnels:
            t.close()
        check(finish(gw) == 0, "exit status")
    finally:
        for t in tunnels:
            t.close()
        gw.stop()
        L.rmtree(d)


# ---- SIGTERM drain ---------------------------------------------------------------------

def drain_transfer(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--drain-timeout", "20"])
    ap = gw.admin_port
    t = tunnel(port, L.HELLO_NAME)
    try:
        d, fid = open_channel(port, t)
        body = os.urandom(24 << 20)
        sender = threading.Thread(target=t.send_data, args=(fid, body), daemon=True)
        sender.start()
        sender.join(30)
        check(not sender.is_alive(), "the body left the tunnel")
        check(http_get(ap, "/readyz")[0] == 200, "/readyz 200 while serving")
        t0 = time.time()
        gw.send_signal(signal.SIGTERM)
        check(refused(port), "new connections refused during the drain")
        check(http_get(ap, "/readyz") == (503, "not ready\n"), "/readyz 503 during the drain")
        check(http_get(ap, "/healthz") == (200, "ok\n"), "/healthz 200 during the drain")
        wait_metric(ap, "snitun_draining", 1)
        check(gw.p.poll() is None, "still running with a channel open")
        ping(t)   # the tunnel keeps answering
        got = recv_exact(d, len(body))
        check(hashlib.sha256(got).digest() == hashlib.sha256(body).digest(),
              "the 24 MiB transfer completed during the drain")
        up = os.urandom(100000)
        d.sendall(up)     # and the channel still flows the other way
        got = b""
        while len(got) < len(up):
            f = next_frame(t)
            check(f.flow == P.DATA and f.id == fid, "DATA expected, got %r" % f)
            got += f.data
        check(got == up, "device bytes reach the tunnel during the drain")
        check(gw.p.poll() is None, "still running while the channel is open")
        t1 = time.time()
        d.close()
        f = next_frame(t)
        check(f.flow == P.CLOSE and f.id == fid, "CLOSE expected, got %r" % f)
        rc = wait_exit(gw, 10)
        t2 = time.time()
        check(rc == 0, "exit status %s" % rc)
        check(t2 - t1 < SLACK + 1, "exit %.2f s after the last channel closed" % (t2 - t1))
        check(t2 - t0 < 20, "exit before the drain timeout (%.1f s)" % (t2 - t0))
        check("drained: no channel left" in gw.text(), "drain end logged")
        check(L.closed_without_data(t.sock, 5) if not t.rbuf else True, "tunnel closed")
    finally:
        t.close()
        finish(gw)


def drain_timeout(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--drain-timeout", "2"])
    t = tunnel(port, L.HELLO_NAME)
    try:
        d, _ = open_channel(port, t)     # open and silent: stuck
        t0 = time.time()
        gw.send_signal(signal.SIGTERM)
        check(refused(port), "listeners closed")
        ping(t)
        rc = wait_exit(gw, 15)
        el = time.time() - t0
        check(rc == 0, "exit status %s" % rc)
        check(1.8 <= el <= 2 + SLACK + 1, "exit after %.2f s, want ~2" % el)
        check(re.search(r"drain timeout: closing the remaining channels.*channels=1", gw.text()),
              "timeout logged with the channel count")
        check(L.closed_without_data(d, 5), "the stuck device connection is closed")
        d.close()
    finally:
        t.close()
        finish(gw)


def drain_second_signal(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--drain-timeout", "30"])
    t = tunnel(port, L.HELLO_NAME)
    try:
        d, _ = open_channel(port, t)
        gw.send_signal(signal.SIGTERM)
        check(gw.wait_log(r"msg=draining signal=TERM timeout=30 tunnels=1 channels=1"),
              "drain start logged")
        check(refused(port), "listeners closed")
        time.sleep(0.3)
        check(gw.p.poll() is None, "still draining")
        t0 = time.time()
        gw.send_signal(signal.SIGINT)
        rc = wait_exit(gw, 10)
        check(rc == 0, "exit status %s" % rc)
        check(time.time() - t0 < SLACK + 1, "second signal ends the drain at once")
        check("second signal: stopping now" in gw.text(), "logged")
        d.close()
    finally:
        t.close()
        finish(gw)


def drain_nothing_open(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--drain-timeout", "30"])
    t = tunnel(port, L.HELLO_NAME)
    try:
        roundtrip(port, t)               # a channel that has finished
        t0 = time.time()
        gw.send_signal(signal.SIGINT)
        rc = wait_exit(gw, 10)
        check(rc == 0, "exit status %s" % rc)
        check(time.time() - t0 < SLACK, "no channel open: exit at once (%.2f s)"
              % (time.time() - t0))
        check(L.closed_without_data(t.sock, 5), "the tunnel is closed")
    finally:
        t.close()
        finish(gw)


# ---- --user --------------------------------------------------------------------------------

def proc_ids(pid):
    ids = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("Uid", "Gid", "Groups"):
                ids[k] = v.split()
    return ids


def user_nobody(io):
    if os.geteuid() != 0:
        print("     (not root: --user drop not testable here)")
        return
    nobody = pwd.getpwnam("nobody")
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2,
                   extra=["--user", "nobody", "--drain-timeout", "3"])
    t = None
    try:
        check(gw.wait_log(r'msg="privileges dropped" user=nobody uid=%d gid=%d'
                          % (nobody.pw_uid, nobody.pw_gid)), "drop logged")
        ids = proc_ids(gw.pid)
        check(ids["Uid"] == [str(nobody.pw_uid)] * 4, "Uid %r" % ids["Uid"])
        check(ids["Gid"] == [str(nobody.pw_gid)] * 4, "Gid %r" % ids["Gid"])
        check(ids.get("Groups", []) in ([], [str(nobody.pw_gid)]), "Groups %r" % ids["Groups"])
        # every thread, not only the main one
        for tid in os.listdir("/proc/%d/task" % gw.pid):
            with open("/proc/%d/task/%s/status" % (gw.pid, tid)) as f:
                uid = [ln.split()[1:] for ln in f if ln.startswith("Uid:")][0]
            check(uid == [str(nobody.pw_uid)] * 4, "thread %s Uid %r" % (tid, uid))
        check(re.search(r"msg=\"gateway started\".* engine=%s .*user=nobody"
                        % ("io_uring" if io == "uring" else "epoll"), gw.text()),
              "start-up line names the user and the engine asked for")
        t = tunnel(port, L.HELLO_NAME)
        roundtrip(port, t)
        check(http_get(gw.admin_port, "/readyz")[0] == 200, "admin still serves")
        t.close()
        t = None
        check(finish(gw) == 0, "exit status")
    finally:
        if t is not None:
            t.close()
        gw.stop()


def user_unknown():
    port = L.free_port()
    r = subprocess.run([L.BIN, "server", "--listen", "127.0.0.1:%d" % port, "--fernet-key",
                        L.K1, "--threads", "1", "--user", "no-such-user-snitun"],
                       capture_output=True, text=True, timeout=20)
    check(r.returncode == 1, "exit status %d" % r.returncode)
    check("--user no-such-user-snitun: no such user" in r.stderr, "message: %r" % r.stderr)
    check(refused(port, 0.5), "nothing listening")
    no_sanitizer(r.stderr, "gateway")


def user_not_root():
    """As an ordinary user, --user only warns (nothing to drop)."""
    if os.geteuid() != 0:
        return
    nobody = pwd.getpwnam("nobody")
    port = L.free_port()

    def become_nobody():
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    p = subprocess.Popen([L.BIN, "server", "--listen", "127.0.0.1:%d" % port, "--fernet-key",
                          L.K1, "--threads", "1", "--io", "epoll", "--user", "nobody"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=become_nobody, cwd="/")
    try:
        L.wait_port("127.0.0.1", port, proc=p)
        t = tunnel(port, L.HELLO_NAME)
        roundtrip(port, t)
        t.close()
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            out = p.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            out = p.communicate()[1]
    no_sanitizer(out, "gateway")
    check(p.returncode == 0, "exit status %s" % p.returncode)
    check(re.search(r'level=warn msg="--user ignored: not running as root, no privileges to '
                    r'drop" user=nobody uid=%d' % nobody.pw_uid, out), "warning:\n" + out[-2000:])


def main():
    r = L.Runner()
    r.run("--user with an unknown user: exit 1", user_unknown)
    r.run("--user when not root: a warning", user_not_root)
    for io in L.engines():
        r.run("%s: SIGHUP key rotation" % io, sighup_rotation, io)
        r.run("%s: SIGTERM drains a transfer in flight" % io, drain_transfer, io)
        r.run("%s: SIGTERM with a stuck channel: exit at --drain-timeout" % io, drain_timeout,
              io)
        r.run("%s: second signal ends the drain" % io, drain_second_signal, io)
        r.run("%s: SIGINT with no channel open: exit at once" % io, drain_nothing_open, io)
        r.run("%s: --user nobody drops root and keeps working" % io, user_nobody, io)
    r.finish()


if __name__ == "__main__":
    main()
