"""tests/e2e/test_client_gateway.py - `snitun client` against our own gateway
(`snitun server`, dual-port layout) with real TCP devices and endpoints.

* relay for aes-cbc v0/v1/v2 and aes-gcm v0/v2: a device sends a ClientHello
  for the client's name plus 1 MiB, the endpoint gets exactly those bytes and
  answers 1 MiB back; a device EOF closes the endpoint connection and an
  endpoint EOF closes the device connection;
* several devices at once on one tunnel;
* the gateway restarts: the client reconnects, with aes-gcm taking a fresh
  token (and key) from --token-command each time;
* --endpoint-proxy-protocol v2: the endpoint learns the device's address.

Each scenario runs with --io uring and --io epoll (client and gateway).
"""

import hashlib
import os
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protogw as pg  # noqa: E402

HOST = "myname.ui.nabu.casa"
FKEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
TMP = tempfile.mkdtemp(prefix="snitun_client_gw_")
HELLO = open(pg.data_path("clienthello/openssl_tls13_sni.bin"), "rb").read()


class Gateway:
    def __init__(self, io, sni_port=None, peer_port=None):
        self.sni_port = sni_port or pg.free_port()
        self.peer_port = peer_port or pg.free_port()
        self.proc = pg.subprocess.Popen(
            [pg.snitun_bin(), "server", "--sni-listen", "127.0.0.1:%d" % self.sni_port,
             "--peer-listen", "127.0.0.1:%d" % self.peer_port, "--fernet-key", FKEY,
             "--threads", "2", "--io", io],
            stdout=pg.subprocess.DEVNULL, stderr=pg.subprocess.PIPE, text=True)
        self.lines = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(10):
            self.stop()
            raise pg.ProtoError("gateway did not start:\n" + "\n".join(self.lines))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "gateway started" in line:
                self.ready.set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except pg.subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def device(gw, payload, timeout=10):
    d = socket.create_connection(("127.0.0.1", gw.sni_port), timeout=timeout)
    d.sendall(payload)
    return d


def recv_exact(sock, n, timeout=10):
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            raise pg.ProtoError("EOF after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


def is_eof(sock, timeout=5):
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (socket.timeout, ConnectionResetError):
        return False


def tok_file(cipher, version, name):
    tok = pg.issue_token(FKEY, HOST, None, None, version, cipher)
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(pg.json.dumps(tok))
    return path


def relay_case(cipher, version):
    def run(io):
        gw = Gateway(io)
        ep = pg.Endpoint()
        cl = pg.Client(["--server", "127.0.0.1:%d" % gw.peer_port, "--endpoint", ep.addr,
                        "--io", io, "--token-file",
                        tok_file(cipher, version, "t_%s_%d_%s.json" % (cipher, version, io))])
        try:
            line = cl.wait_line("msg=connected")
            assert "protocol=%d" % version in line and "cipher=%s" % cipher in line, line
            up = os.urandom(1 << 20)
            d = device(gw, HELLO + up)
            e = ep.accept()
            got = e.wait_data(len(HELLO) + len(up), timeout=10)
            assert got[:len(HELLO)] == HELLO
            assert hashlib.sha256(got[len(HELLO):]).digest() == hashlib.sha256(up).digest()
            down = os.urandom(1 << 20)
            e.send(down)
            assert recv_exact(d, len(down)) == down
            d.close()                       # device EOF -> CLOSE -> endpoint closed
            assert e.wait_eof(), "endpoint not closed after the device left"
            d = device(gw, HELLO)
            e = ep.accept()
            assert e.wait_data(len(HELLO)) == HELLO
            e.close()                       # endpoint EOF -> CLOSE -> device closed
            assert is_eof(d), "device not closed after the endpoint left"
            d.close()
            assert cl.stop() == 0
        finally:
            cl.stop()
            gw.stop()
            ep.close()
    return run


def many_devices(io):
    gw = Gateway(io)
    ep = pg.Endpoint()
    cl = pg.Client(["--server", "127.0.0.1:%d" % gw.peer_port, "--endpoint", ep.addr, "--io", io,
                    "--token-file", tok_file("aes-cbc", 2, "many_%s.json" % io)])
    try:
        cl.wait_line("msg=connected")
        devs = []
        for i in range(20):
            tail = ("%04d" % i).encode() * 250
            devs.append((device(gw, HELLO + tail), tail))
        conns = [ep.accept() for _ in devs]
        for e in conns:
            e.wait_data(len(HELLO) + 1000, timeout=10)
        for d, tail in devs:
            e = [c for c in conns if c.data[len(HELLO):] == tail]
            assert len(e) == 1, "device bytes mixed up"
            e[0].send(tail[::-1])
            assert recv_exact(d, len(tail)) == tail[::-1]
            d.close()
    finally:
        cl.stop()
        gw.stop()
        ep.close()


def restart_gcm(io):
    counter = os.path.join(TMP, "restart_counter_%s" % io)
    cmd = ("n=$(cat %s 2>/dev/null || echo 0); echo $((n+1)) > %s; exec %s token issue "
           "--fernet-key %s --hostname %s --cipher aes-gcm" % (counter, counter, pg.snitun_bin(),
                                                             FKEY, HOST))
    gw = Gateway(io)
    ep = pg.Endpoint()
    cl = pg.Client(["--server", "127.0.0.1:%d" % gw.peer_port, "--endpoint", ep.addr, "--io", io,
                    "--token-command", cmd, "--backoff-min", "1", "--backoff-max", "2"])
    try:
        cl.wait_line("msg=connected")
        for i in range(2):
            gw.stop()
            cl.wait_line("msg=disconnected")
            gw = Gateway(io, gw.sni_port, gw.peer_port)
            cl.wait_line("msg=connected", timeout=10)
            d = device(gw, HELLO)
            assert ep.accept().wait_data(len(HELLO)) == HELLO
            d.close()
        assert int(open(counter).read()) >= 3
        assert cl.count("gcm_key_used") == 0
    finally:
        cl.stop()
        gw.stop()
        ep.close()


def proxy_v2(io):
    gw = Gateway(io)
    ep = pg.Endpoint(proxy=True)
    cl = pg.Client(["--server", "127.0.0.1:%d" % gw.peer_port, "--endpoint", ep.addr, "--io", io,
                    "--token-file", tok_file("aes-cbc", 2, "pp_%s.json" % io),
                    "--endpoint-proxy-protocol", "v2"])
    try:
        cl.wait_line("msg=connected")
        d = device(gw, HELLO)
        e = ep.accept()
        assert e.wait_data(len(HELLO)) == HELLO
        _, src, dst, sport, dport, v = e.header
        assert (src, dst, sport, dport, v) == ("127.0.0.1", "127.0.0.1", 0, ep.port, 2), e.header
        d.close()
    finally:
        cl.stop()
        gw.stop()
        ep.close()


def main():
    r = pg.Runner()
    for cipher, version in [("aes-cbc", 2), ("aes-cbc", 1), ("aes-cbc", 0),
                            ("aes-gcm", 2), ("aes-gcm", 0)]:
        r.run("relay via snitun server %s v%d" % (cipher, version), relay_case(cipher, version))
    r.run("20 devices on one tunnel", many_devices)
    r.run("gateway restart, aes-gcm fresh tokens", restart_gcm)
    r.run("PROXY v2 with the device address", proxy_v2)
    r.finish()


if __name__ == "__main__":
    main()
