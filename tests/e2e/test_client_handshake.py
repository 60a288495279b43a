"""tests/e2e/test_client_handshake.py - `snitun client` against protogw.py:
the tunnel's life (PROTOCOL.md 2.7, 3, 6.1, 8.3).

* the exact handshake bytes for aes-cbc v0/v1/v2 and aes-gcm v0/v2 (token as
  issued, the vectors' challenge, the vectors' answer byte for byte), PING
  right after the answer, "connected" logged only once the PONG arrives;
* a gateway that closes before the challenge (token refused): backoff, retry;
* reconnect after the gateway drops a proven tunnel, within the backoff bound;
* --token-command is run again before each reconnect (counter file);
* aes-gcm never reuses a key: token-command gives a new key per connection;
  an unchanged --token-file or a bare --token makes the client wait (logged)
  instead of reconnecting, until the file holds a fresh token;
* SIGTERM exits 0, connected or backing off; usage errors exit 2.

Each scenario runs with --io uring and --io epoll.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protogw as pg  # noqa: E402

HOST = "myname.ui.nabu.casa"
TMP = tempfile.mkdtemp(prefix="snitun_client_hs_")


def token_file(tok, name="token.json"):
    path = os.path.join(TMP, name)
    with open(path + ".tmp", "w") as f:
        f.write(pg.json.dumps(tok))
    os.replace(path + ".tmp", path)
    return path


def base_args(gw, io, extra=()):
    return ["--server", gw.addr, "--endpoint", "127.0.0.1:%d" % pg.free_port(), "--io", io,
            "--backoff-min", "1", "--backoff-max", "2", "--connect-timeout", "3"] + list(extra)


def prove(conn, cl):
    """After the answer: the first frame is a PING request; 'connected' is
    logged only after its PONG."""
    before = cl.count("msg=connected")
    f = conn.expect(pg.PING, skip=())
    assert f.size == 0 and f.extra[:4] == b"ping", f
    time.sleep(0.2)
    assert cl.count("msg=connected") == before, "connected logged before the pong"
    conn.send_ping(f.id, reply=True)
    return cl.wait_line("msg=connected")


def handshake_case(cipher, version):
    def run(io):
        vec = pg.vector(cipher, version)
        tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, version, cipher)
        gw = pg.ProtoGW(vec.fernet_key)
        cl = pg.Client(base_args(gw, io, ["--token-file", token_file(tok)]))
        try:
            conn = gw.accept()
            claims = conn.handshake(vec, expect_token=tok["token"])
            assert claims["hostname"] == HOST and claims["aes_key"] == vec.aes_key
            line = prove(conn, cl)
            assert "protocol=%d" % version in line and "cipher=%s" % cipher in line, line
            assert "hostname=%s" % HOST in line, line
            # the tunnel answers the gateway's pings too (4.8)
            pid = os.urandom(16)
            conn.send_ping(pid)
            f = conn.expect(pg.PING, skip=())
            assert f.id == pid and f.extra[:4] == b"pong", f
            assert cl.stop() == 0
            assert conn.is_closed(), "tunnel not closed at SIGTERM"
            assert cl.count("msg=connected") == 1
        finally:
            cl.stop()
            gw.close()
    return run


def bare_token(io):
    """--token/--aes-key/--aes-iv: protocol 0, aes-cbc (the reference
    client's defaults); the handshake is the v0 vector's."""
    vec = pg.vector("aes-cbc", 0)
    tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, 0, "aes-cbc")
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token", tok["token"], "--aes-key", vec.aes_key,
                                      "--aes-iv", vec.aes_iv]))
    try:
        conn = gw.accept()
        conn.handshake(vec, expect_token=tok["token"])
        line = prove(conn, cl)
        assert "protocol=0" in line and "cipher=aes-cbc" in line, line
    finally:
        cl.stop()
        gw.close()


def names_and_ipv6(io):
    """--server [::1]:PORT; --endpoint as a name (localhost: every address
    it resolves to is tried in order)."""
    vec = pg.vector("aes-cbc", 2)
    tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, 2, "aes-cbc")
    gw = pg.ProtoGW(vec.fernet_key, family=pg.socket.AF_INET6)
    ep = pg.Endpoint()
    cl = pg.Client(["--server", gw.addr, "--endpoint", "localhost:%d" % ep.port, "--io", io,
                    "--token-file", token_file(tok, "v6_%s.json" % io)])
    try:
        assert gw.addr.startswith("[::1]:")
        conn = gw.accept()
        conn.handshake(vec)
        prove(conn, cl)
        a = os.urandom(16)
        conn.send_new(a, "2001:db8::7")
        conn.send_data(a, b"over a name")
        assert ep.accept().wait_data(11) == b"over a name"
    finally:
        cl.stop()
        gw.close()
        ep.close()


def refused_then_retry(io):
    """The gateway closes right after the token (what a refused token
    looks like): the client backs off and tries again."""
    vec = pg.vector("aes-cbc", 2)
    tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, 2, "aes-cbc")
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token-file", token_file(tok)]))
    try:
        conn = gw.accept()
        conn.read_token()
        conn.close()
        line = cl.wait_line("msg=disconnected")
        assert "reason=closed_before_challenge" in line, line
        b = cl.wait_line("msg=backoff")
        secs = float(b.split("seconds=")[1].split()[0])
        assert 0 <= secs <= 1.0, b
        conn = gw.accept(timeout=secs + 2)
        conn.handshake(vec)
        prove(conn, cl)
    finally:
        cl.stop()
        gw.close()


def reconnect(io):
    vec = pg.vector("aes-cbc", 2)
    tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, 2, "aes-cbc")
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token-file", token_file(tok)]))
    try:
        for _ in range(3):
            conn = gw.accept()
            conn.handshake(vec)
            prove(conn, cl)
            t0 = time.monotonic()
            conn.close()
            line = cl.wait_line("msg=disconnected")
            assert "reason=peer_eof" in line, line
            b = cl.wait_line("msg=backoff")
            # a proven tunnel resets the backoff: at most --backoff-min
            secs = float(b.split("seconds=")[1].split()[0])
            assert 0 <= secs <= 1.0, b
            conn = gw.accept(timeout=3)
            assert time.monotonic() - t0 < 1.0 + 1.5
            conn.handshake(vec)
            prove(conn, cl)
            conn.close()
            cl.wait_line("msg=disconnected")
        assert cl.count("msg=connected") == 6
    finally:
        cl.stop()
        gw.close()


def counting_command(fernet_key, cipher, counter, key=None, iv=None, version=2):
    cmd = ("n=$(cat %s 2>/dev/null || echo 0); echo $((n+1)) > %s; "
           "exec %s token issue --fernet-key %s --hostname %s --protocol-version %d "
           "--cipher %s" % (counter, counter, pg.snitun_bin(), fernet_key, HOST, version, cipher))
    if key:
        cmd += " --aes-key %s --aes-iv %s" % (key, iv)
    return cmd


def token_command(io):
    vec = pg.vector("aes-cbc", 2)
    counter = os.path.join(TMP, "counter_%s" % io)
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token-command",
                                      counting_command(vec.fernet_key, "aes-cbc", counter,
                                                       vec.aes_key, vec.aes_iv)]))
    try:
        conn = gw.accept()
        conn.handshake(vec)
        prove(conn, cl)
        assert open(counter).read().strip() == "1"
        first = conn.token
        conn.close()
        conn = gw.accept(timeout=3)
        conn.handshake(vec)
        prove(conn, cl)
        assert open(counter).read().strip() == "2"
        assert conn.token != first or True  # same second may give the same token bytes
    finally:
        cl.stop()
        gw.close()


def gcm_command_fresh_keys(io):
    """aes-gcm via --token-command: every connection presents a new token
    with a new key, also when the first attempt failed after the token."""
    vec = pg.vector("aes-gcm", 2)
    counter = os.path.join(TMP, "gcm_counter_%s" % io)
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token-command",
                                      counting_command(vec.fernet_key, "aes-gcm", counter)]))
    seen_keys, seen_tokens = set(), set()
    try:
        # 1: refused after the token (the gateway may have sealed with it)
        conn = gw.accept()
        c = conn.read_token()
        seen_keys.add(c["aes_key"])
        seen_tokens.add(conn.token)
        conn.close()
        for _ in range(3):
            conn = gw.accept(timeout=4)
            c = conn.handshake()
            assert c["cipher"] == "aes-gcm"
            assert c["aes_key"] not in seen_keys, "aes-gcm key reused"
            assert conn.token not in seen_tokens, "token reused"
            seen_keys.add(c["aes_key"])
            seen_tokens.add(conn.token)
            prove(conn, cl)
            conn.close()
            cl.wait_line("msg=disconnected")
        assert open(counter).read().strip() == "4"
    finally:
        cl.stop()
        gw.close()


def gcm_file_waits(io):
    """aes-gcm via an unchanged --token-file: no second connection; the
    client says why; a fresh file lets it in with the new key."""
    vec = pg.vector("aes-gcm", 2)
    tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, 2, "aes-gcm")
    path = token_file(tok, "gcm_%s.json" % io)
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token-file", path]))
    try:
        conn = gw.accept()
        conn.handshake(vec)
        prove(conn, cl)
        conn.close()
        line = cl.wait_line("reason=gcm_key_used", timeout=5)
        assert "fresh aes-gcm token" in line, line
        assert gw.no_connection(2.5), "reconnected with a used aes-gcm key"
        fresh = pg.issue_token(vec.fernet_key, HOST, None, None, 2, "aes-gcm")
        token_file(fresh, "gcm_%s.json" % io)
        conn = gw.accept(timeout=5)
        c = conn.handshake()
        assert c["aes_key"] == fresh["aes_key"] != vec.aes_key
        prove(conn, cl)
    finally:
        cl.stop()
        gw.close()


def gcm_bare_token_waits(io):
    vec = pg.vector("aes-gcm", 2)
    tok = pg.issue_token(vec.fernet_key, HOST, vec.aes_key, vec.aes_iv, 2, "aes-gcm")
    gw = pg.ProtoGW(vec.fernet_key)
    cl = pg.Client(base_args(gw, io, ["--token", tok["token"], "--aes-key", vec.aes_key,
                                      "--aes-iv", vec.aes_iv, "--cipher", "aes-gcm",
                                      "--protocol-version", "2"]))
    try:
        cl.wait_line("serves one connection only")
        conn = gw.accept()
        conn.handshake(vec)
        prove(conn, cl)
        conn.close()
        line = cl.wait_line("reason=gcm_key_used", timeout=5)
        assert "cannot be renewed" in line, line
        assert gw.no_connection(2.5), "reconnected with a used aes-gcm key"
        assert cl.stop() == 0
    finally:
        cl.stop()
        gw.close()


def sigterm_in_backoff(io):
    cl = pg.Client(["--server", "127.0.0.1:%d" % pg.free_port(), "--endpoint", "127.0.0.1:1",
                    "--io", io, "--token", "gAAAA", "--aes-key", "00" * 32, "--aes-iv", "00" * 16,
                    "--backoff-min", "30", "--backoff-max", "60"])
    try:
        cl.wait_line("msg=backoff")
        t0 = time.monotonic()
        assert cl.stop() == 0
        assert time.monotonic() - t0 < 2
        assert cl.count("msg=stopped") == 1
    finally:
        cl.stop()


def usage_errors(io):
    ok = ["--server", "127.0.0.1:1", "--endpoint", "127.0.0.1:2", "--io", io]
    tok = ["--token", "gAAAA", "--aes-key", "00" * 32, "--aes-iv", "00" * 16]
    cases = [
        (ok, "give exactly one of"),
        (ok + tok + ["--token-file", "/x"], "several given"),
        (ok + ["--token-file", "/x", "--aes-key", "00" * 32], "go with --token"),
        (ok + tok + ["--allow", "10.0.0.0/8", "--block", "10.1.0.0/16"], "cannot be combined"),
        (ok + tok + ["--allow", "10.0.0.0/33"], "--allow 10.0.0.0/33"),
        (ok + tok + ["--cipher", "rot13"], "--cipher must be"),
        (ok + tok + ["--protocol-version", "3"], "--protocol-version"),
        (ok + tok + ["--endpoint-proxy-protocol", "v3"], "--endpoint-proxy-protocol"),
        (ok + tok + ["--route", "nohost"], "--route nohost"),
        (ok + tok + ["--backoff-min", "10", "--backoff-max", "5"], "--backoff-min"),
        (["--server", "::1:80", "--endpoint", "127.0.0.1:2", "--io", io] + tok, "brackets"),
        (["--server", "h:0", "--endpoint", "127.0.0.1:2", "--io", io] + tok, "PORT"),
        (ok + ["--token", "gAAAA", "--aes-key", "00", "--aes-iv", "00" * 16], "aes_key must be"),
        (ok + tok + ["--in-low", "5"], "--in-low needs --in-high"),
    ]
    for args, want in cases:
        r = pg.subprocess.run([pg.snitun_bin(), "client"] + args, capture_output=True,
                              text=True, timeout=10)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert want in r.stderr, (args, r.stderr)
    env = dict(os.environ, SNITUN_CLIENT_BLOCK="10.0.0.0/8", SNITUN_CLIENT_ALLOW="1.2.3.4")
    r = pg.subprocess.run([pg.snitun_bin(), "client"] + ok + tok, capture_output=True,
                          text=True, timeout=10, env=env)
    assert r.returncode == 2 and "cannot be combined" in r.stderr, r.stderr
    r = pg.subprocess.run([pg.snitun_bin(), "client", "--help"], capture_output=True,
                          text=True, timeout=10)
    assert r.returncode == 0 and "SNITUN_CLIENT_SERVER" in r.stdout


def main():
    r = pg.Runner()
    for cipher, version in [("aes-cbc", 2), ("aes-cbc", 1), ("aes-cbc", 0),
                            ("aes-gcm", 2), ("aes-gcm", 0)]:
        r.run("handshake %s v%d exact bytes" % (cipher, version), handshake_case(cipher, version))
    r.run("bare --token defaults to v0 aes-cbc", bare_token)
    r.run("[IPv6] gateway, endpoint by name", names_and_ipv6)
    r.run("closed before challenge -> backoff -> retry", refused_then_retry)
    r.run("reconnect after drop within backoff", reconnect)
    r.run("--token-command re-run on reconnect", token_command)
    r.run("aes-gcm: fresh key per connection (command)", gcm_command_fresh_keys)
    r.run("aes-gcm: unchanged token file -> wait", gcm_file_waits)
    r.run("aes-gcm: bare --token -> wait", gcm_bare_token_waits)
    r.run("SIGTERM during backoff exits 0", sigterm_in_backoff)
    r.run("usage errors exit 2", usage_errors)
    r.finish()


if __name__ == "__main__":
    main()
