"""tests/e2e/protogw.py - a protocol-level test GATEWAY for `snitun client`.

Plays the gateway side of PROTOCOL.md 2.7, 3 and 4 with python3-cryptography
only (no snitun code), so the client's bytes are checked against an
independent implementation:

* reads the token and decrypts it with Fernet to check its claims;
* sends the challenge: with the vectors' key material (tests/data/*_session.json)
  it sends the vector's challenge and expects the vector's answer byte for byte
  (CBC chain from the IV; GCM nonce prefix 00000000, counter 0); with fresh key
  material it draws a random challenge and checks the answer's plaintext and
  nonce;
* then speaks the multiplexer: NEW (v0/v1 EXTRA or v2 sealed block, IPv4 and
  IPv6 callers), DATA, CLOSE, PING, PAUSE, RESUME, and decodes every frame the
  client sends (GCM: checks prefix 00000000 and the counter sequence).

Also here: helpers shared by the tests/e2e/test_client_*.py scripts (token
issue through $SNITUN_BIN, running the client and watching its log, small
endpoint servers). Nothing here is a test by itself.
"""

import hashlib
import json
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NEW, DATA, CLOSE, PING, PAUSE, RESUME = 0x01, 0x02, 0x04, 0x08, 0x16, 0x32
FLOW_NAMES = {NEW: "NEW", DATA: "DATA", CLOSE: "CLOSE", PING: "PING", PAUSE: "PAUSE",
              RESUME: "RESUME"}

DATA_DIR = os.environ.get("SNITUN_TEST_DATA") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "data")


def data_path(rel):
    return os.path.join(DATA_DIR, rel)


def load_json(rel):
    with open(data_path(rel)) as f:
        return json.load(f)


def snitun_bin():
    b = os.environ.get("SNITUN_BIN")
    if b:
        return b
    build = os.environ.get("SNITUN_BUILD_DIR", os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "..", "..", "build"))
    return os.path.join(build, "snitun")


class ProtoError(AssertionError):
    pass


# ---- vectors ------------------------------------------------------------------

class Vector:
    """Key material and the first unit of each direction of one session."""

    def __init__(self, fname, version):
        doc = load_json(fname)
        sess = [s for s in doc["sessions"] if s["protocol_version"] == version][0]
        self.cipher = doc["cipher"]
        self.version = version
        self.fernet_key = doc["fernet_key"]
        self.aes_key = doc["aes_key_hex"]
        self.aes_iv = doc["aes_iv_hex"]
        s2c, c2s = sess["decoded"]["server_to_client"], sess["decoded"]["client_to_server"]
        chal = [i for i in s2c if i["kind"] == "challenge"][0]
        ans = [i for i in c2s if i["kind"] == "challenge_answer"][0]
        self.challenge_plain = bytes.fromhex(chal["plain_hex"])
        self.challenge_wire = bytes.fromhex(chal["wire_hex"])
        self.answer_wire = bytes.fromhex(ans["wire_hex"])


def vector(cipher, version):
    return Vector("cbc_session.json" if cipher == "aes-cbc" else "gcm_session.json", version)


def issue_token(fernet_key, hostname, aes_key=None, aes_iv=None, version=2, cipher="aes-cbc",
                extra=()):
    """`snitun token issue` -> the JSON object it prints (dict)."""
    cmd = [snitun_bin(), "token", "issue", "--fernet-key", fernet_key, "--hostname", hostname,
           "--protocol-version", str(version), "--cipher", cipher] + list(extra)
    if aes_key:
        cmd += ["--aes-key", aes_key]
    if aes_iv:
        cmd += ["--aes-iv", aes_iv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


# ---- tunnel ciphers (PROTOCOL.md 3) -------------------------------------------

class CbcStream:
    overhead = 0

    def __init__(self, key, iv, encrypt):
        c = Cipher(algorithms.AES(key), modes.CBC(iv))
        self.ctx = c.encryptor() if encrypt else c.decryptor()

    def seal(self, pt):
        assert len(pt) % 16 == 0
        return self.ctx.update(pt)

    def open(self, wire):
        return self.ctx.update(wire)


class GcmStream:
    overhead = 28

    def __init__(self, key, prefix):
        self.aead = AESGCM(key)
        self.prefix = prefix
        self.counter = 0

    def seal(self, pt):
        nonce = self.prefix + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce + self.aead.encrypt(nonce, pt, None)

    def open(self, wire):
        nonce = wire[:12]
        if nonce[:4] != self.prefix:
            raise ProtoError("nonce prefix %s, want %s" % (nonce[:4].hex(), self.prefix.hex()))
        ctr = int.from_bytes(nonce[4:], "big")
        if ctr != self.counter:
            raise ProtoError("nonce counter %d, want %d" % (ctr, self.counter))
        self.counter += 1
        return self.aead.decrypt(nonce, wire[12:], None)


def streams(cipher, key, iv):
    """(seal = gateway->client, open = client->gateway)"""
    if cipher == "aes-cbc":
        return CbcStream(key, iv, True), CbcStream(key, iv, False)
    if cipher == "aes-gcm":
        return GcmStream(key, b"\x00\x00\x00\x01"), GcmStream(key, b"\x00\x00\x00\x00")
    raise ProtoError("cipher %s not supported by the test gateway" % cipher)


class Frame:
    def __init__(self, cid, flow, size, extra, data=b""):
        self.id, self.flow, self.size, self.extra, self.data = cid, flow, size, extra, data

    def __repr__(self):
        return "<%s id=%s size=%d extra=%s>" % (FLOW_NAMES.get(self.flow, hex(self.flow)),
                                                self.id.hex()[:8], self.size, self.extra.hex())


# ---- the gateway ----------------------------------------------------------------

class ProtoGW:
    """Listens on a free loopback port; accept() gives one Conn per client."""

    def __init__(self, fernet_key, family=socket.AF_INET):
        self.fernet = Fernet(fernet_key.encode())
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.addr = ("[::1]:%d" if family == socket.AF_INET6 else "127.0.0.1:%d") % self.port

    def accept(self, timeout=10.0):
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            raise ProtoError("no connection from the client within %.1f s" % timeout)
        s, _ = self.sock.accept()
        return Conn(self, s)

    def no_connection(self, duration):
        """True when nobody connects for `duration` seconds."""
        r, _, _ = select.select([self.sock], [], [], duration)
        return not r

    def close(self):
        self.sock.close()


class Conn:
    def __init__(self, gw, sock):
        self.gw = gw
        self.sock = sock
        # One frame at a time: a test may push DATA from a thread while the
        # main thread answers PINGs; interleaved seals break the CBC chain.
        self.send_lock = threading.Lock()
        self.buf = b""
        self.token = None
        self.claims = None
        self.version = 0
        self.seal = self.open = None

    # -- raw bytes --
    def _fill(self, n, timeout):
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtoError("timeout: have %d of %d bytes" % (len(self.buf), n))
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                continue
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("client closed the tunnel (have %d of %d bytes)"
                               % (len(self.buf), n))
            self.buf += chunk

    def read_exact(self, n, timeout=5.0):
        self._fill(n, timeout)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, b):
        self.sock.sendall(b)

    # -- handshake --
    def read_token(self, timeout=5.0):
        """Everything the client sends before the challenge is the token
        (2.7): read until Fernet verifies it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                plain = self.gw.fernet.decrypt(self.buf)
                break
            except Exception:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtoError("no valid token within %.1f s (%d bytes)" % (timeout,
                                                                             len(self.buf)))
            self._fill(len(self.buf) + 1, left)
        self.token, self.buf = self.buf.decode(), b""
        self.claims = json.loads(plain)
        return self.claims

    def handshake(self, vec=None, expect_token=None, timeout=5.0):
        """Token, challenge, answer. With vec (a Vector whose key material
        the token carries), the challenge and the expected answer are the
        vector's bytes. Returns the claims."""
        claims = self.read_token(timeout)
        if expect_token is not None and self.token != expect_token:
            raise ProtoError("token differs from the one issued")
        cipher = claims.get("cipher", "aes-cbc")
        key, iv = bytes.fromhex(claims["aes_key"]), bytes.fromhex(claims["aes_iv"])
        self.version = claims.get("protocol_version", 0)
        self.seal, self.open = streams(cipher, key, iv)
        if vec is not None:
            if claims["aes_key"] != vec.aes_key or cipher != vec.cipher:
                raise ProtoError("token key material is not the vector's")
            wire = self.seal.seal(vec.challenge_plain)
            if wire != vec.challenge_wire:
                raise ProtoError("test gateway sealed the vector challenge differently")
            self.send(wire)
            ans = self.read_exact(len(vec.answer_wire), timeout)
            if ans != vec.answer_wire:
                raise ProtoError("answer %s, want the vector's %s" % (ans.hex(),
                                                                     vec.answer_wire.hex()))
            self.open.open(ans)     # keep the chain / counter in step
        else:
            chal = hashlib.sha256(os.urandom(40)).digest()
            self.send(self.seal.seal(chal))
            ans = self.read_exact(32 + self.open.overhead, timeout)
            if self.open.open(ans) != hashlib.sha256(chal).digest():
                raise ProtoError("wrong answer to the challenge")
        return claims

    # -- frames out --
    def _hdr(self, cid, flow, size, extra):
        assert len(cid) == 16 and len(extra) == 11
        return self.seal.seal(cid + bytes([flow]) + size.to_bytes(4, "big") + extra)

    def send_frame(self, cid, flow, data=b"", extra=None):
        extra = extra if extra is not None else os.urandom(11)
        with self.send_lock:
            self.send(self._hdr(cid, flow, len(data), extra) + data)

    def send_new(self, cid, caller):
        """NEW for caller (text IPv4/IPv6) as the gateway of self.version
        encodes it (4.5): v2 sealed block, v0/v1 EXTRA (IPv6 -> 0.0.0.0)."""
        fam = socket.AF_INET6 if ":" in caller else socket.AF_INET
        packed = socket.inet_pton(fam, caller)
        with self.send_lock:
            if self.version >= 2:
                block = (b"6" if fam == socket.AF_INET6 else b"4") + packed
                block += os.urandom((16 - len(block) % 16) % 16)
                self.send(self._hdr(cid, NEW, len(block), os.urandom(11)) +
                          self.seal.seal(block))
            else:
                ip4 = packed if fam == socket.AF_INET else b"\x00" * 4
                self.send(self._hdr(cid, NEW, 0, b"4" + ip4 + os.urandom(6)))

    def send_data(self, cid, data, chunk=65536):
        for i in range(0, len(data), chunk):
            self.send_frame(cid, DATA, data[i:i + chunk])

    def send_close(self, cid):
        self.send_frame(cid, CLOSE)

    def send_ping(self, cid, reply=False):
        self.send_frame(cid, PING, extra=(b"pong" if reply else b"ping") + os.urandom(7))

    # -- frames in --
    def read_frame(self, timeout=5.0):
        hdr = self.open.open(self.read_exact(32 + self.open.overhead, timeout))
        cid, flow, size, extra = hdr[:16], hdr[16], int.from_bytes(hdr[17:21], "big"), hdr[21:]
        if flow == NEW:
            raise ProtoError("a client must never send NEW")
        data = self.read_exact(size, timeout) if size else b""
        return Frame(cid, flow, size, extra, data)

    def expect(self, flow, cid=None, timeout=5.0, skip=(PING,)):
        """The next frame of type flow (for cid); frames of the types in
        skip are answered/ignored on the way (a PING request gets its pong)."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.read_frame(max(0.01, deadline - time.monotonic()))
            if f.flow == flow and (cid is None or f.id == cid):
                return f
            if f.flow == PING and not f.extra.startswith(b"pong"):
                self.send_ping(f.id, reply=True)
            if f.flow not in skip:
                raise ProtoError("expected %s, got %r" % (FLOW_NAMES[flow], f))

    def expect_silence(self, duration):
        """No frame other than pings for duration seconds."""
        end = time.monotonic() + duration
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            try:
                f = self.read_frame(left)
            except ProtoError as e:
                if "timeout" in str(e):
                    return
                raise
            if f.flow == PING and not f.extra.startswith(b"pong"):
                self.send_ping(f.id, reply=True)
                continue
            raise ProtoError("expected silence, got %r" % f)

    def read_data(self, cid, n, timeout=5.0):
        """n payload bytes of DATA frames for cid (pings answered)."""
        out = b""
        while len(out) < n:
            out += self.expect(DATA, cid, timeout).data
        return out

    def is_closed(self, timeout=5.0):
        """True when the client closes the tunnel within timeout."""
        try:
            self._fill(len(self.buf) + 1, timeout)
        except EOFError:
            return True
        except ProtoError:
            return False
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---- the client under test --------------------------------------------------------

class Client:
    """`snitun client` with its log lines collected from stderr."""

    def __init__(self, args, env=None):
        e = dict(os.environ)
        e.update(env or {})
        self.proc = subprocess.Popen([snitun_bin(), "client"] + list(args), env=e,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reported = False
        self.q = queue.Queue()
        self.t = threading.Thread(target=self._reader, daemon=True)
        self.t.start()

    def _reader(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def wait_line(self, needle, timeout=5.0):
        """The first log line (from now on) containing needle."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProtoError("no log line with %r within %.1f s; log:\n%s"
                                 % (needle, timeout, "\n".join(self.lines[-30:])))
            try:
                line = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise ProtoError("client exited (%s) before logging %r; log:\n%s"
                                 % (self.proc.poll(), needle, "\n".join(self.lines[-30:])))
            if needle in line:
                return line

    def drain(self):
        """Forget queued lines (wait_line then only sees new ones)."""
        while True:
            try:
                if self.q.get_nowait() is None:
                    self.q.put(None)
                    return
            except queue.Empty:
                return

    def count(self, needle):
        return sum(1 for ln in self.lines if needle in ln)

    def stop(self, timeout=10.0):
        """SIGTERM; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ProtoError("client did not exit within %.1f s of SIGTERM" % timeout)
        self.t.join(5)
        bad = [ln for ln in self.lines if "Sanitizer" in ln or "runtime error:" in ln]
        if bad and not self.reported:
            self.reported = True
            raise ProtoError("sanitizer report (exit %d):\n%s" % (rc, "\n".join(self.lines[-40:])))
        return rc


# ---- endpoints --------------------------------------------------------------------

def parse_proxy(buf):
    """(header length, source ip text, dest ip text, sport, dport, version)
    of a complete PROXY v1/v2 header at the start of buf, or None if
    incomplete. Raises on anything malformed."""
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    if buf.startswith(sig):
        if len(buf) < 16:
            return None
        ln = int.from_bytes(buf[14:16], "big")
        if len(buf) < 16 + ln:
            return None
        if buf[12] != 0x21:
            raise ProtoError("v2 ver/cmd byte %02x" % buf[12])
        if buf[13] == 0x11 and ln == 12:
            b = buf[16:28]
            return (28, socket.inet_ntop(socket.AF_INET, b[0:4]),
                    socket.inet_ntop(socket.AF_INET, b[4:8]),
                    int.from_bytes(b[8:10], "big"), int.from_bytes(b[10:12], "big"), 2)
        if buf[13] == 0x21 and ln == 36:
            b = buf[16:52]
            return (52, socket.inet_ntop(socket.AF_INET6, b[0:16]),
                    socket.inet_ntop(socket.AF_INET6, b[16:32]),
                    int.from_bytes(b[32:34], "big"), int.from_bytes(b[34:36], "big"), 2)
        raise ProtoError("v2 family byte %02x with length %d" % (buf[13], ln))
    if buf.startswith(b"PROXY "):
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) >= 108:
                raise ProtoError("v1 line without CRLF")
            return None
        parts = buf[:end].decode().split(" ")
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            raise ProtoError("v1 line %r" % buf[:end])
        fam = socket.AF_INET if parts[1] == "TCP4" else socket.AF_INET6
        socket.inet_pton(fam, parts[2])
        socket.inet_pton(fam, parts[3])
        return (end + 2, parts[2], parts[3], int(parts[4]), int(parts[5]), 1)
    if len(buf) < 16 and (sig.startswith(buf) or b"PROXY ".startswith(buf[:6])):
        return None
    raise ProtoError("no PROXY header: %r" % buf[:16])


class EndpointConn:
    def __init__(self, sock, proxy):
        self.sock = sock
        self.proxy = proxy         # expect a PROXY header first
        self.header = None         # parse_proxy result
        self.data = b""
        self.eof = False
        self.lock = threading.Condition()

    def feed(self, chunk):
        with self.lock:
            if not chunk:
                self.eof = True
            else:
                self.data += chunk
                if self.proxy and self.header is None:
                    h = parse_proxy(self.data)
                    if h is not None:
                        self.header = h
                        self.data = self.data[h[0]:]
            self.lock.notify_all()

    def wait_data(self, n, timeout=5.0):
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.data) >= n or self.eof, timeout):
                raise ProtoError("endpoint got %d of %d bytes" % (len(self.data), n))
            if len(self.data) < n:
                raise ProtoError("endpoint saw EOF after %d of %d bytes" % (len(self.data), n))
            return self.data[:n]

    def wait_eof(self, timeout=5.0):
        with self.lock:
            return self.lock.wait_for(lambda: self.eof, timeout)

    def send(self, b):
        self.sock.sendall(b)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class Endpoint:
    """A TCP server on loopback recording each connection. reading=False
    leaves the bytes in the kernel (for PAUSE tests) until resume()."""

    def __init__(self, family=socket.AF_INET, proxy=False, reading=True, rcvbuf=0):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.addr = ("[::1]:%d" if family == socket.AF_INET6 else "127.0.0.1:%d") % self.port
        self.proxy = proxy
        self.reading = threading.Event()
        if reading:
            self.reading.set()
        self.conns = queue.Queue()
        self.all = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            c = EndpointConn(s, self.proxy)
            self.all.append(c)
            self.conns.put(c)
            threading.Thread(target=self._read, args=(c,), daemon=True).start()

    def _read(self, c):
        while True:
            self.reading.wait()
            try:
                chunk = c.sock.recv(65536)
            except OSError:
                chunk = b""
            c.feed(chunk)
            if not chunk:
                return

    def resume(self):
        self.reading.set()

    def accept(self, timeout=5.0):
        try:
            return self.conns.get(timeout=timeout)
        except queue.Empty:
            raise ProtoError("no connection at the endpoint within %.1f s" % timeout)

    def no_connection(self, duration):
        try:
            self.conns.get(timeout=duration)
            return False
        except queue.Empty:
            return True

    def close(self):
        self.stopped = True
        # shutdown() wakes the accept thread; close() alone would leave the
        # socket listening while that thread is blocked in accept().
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def free_port():
    """e2elib.free_port: never the same port twice in one process."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import e2elib
    return e2elib.free_port()


# ---- the runner -------------------------------------------------------------------

class Runner:
    """Runs scenarios under every engine; prints one line per case and the
    'N passed, M failed' summary; exit status 0 only without failures."""

    def __init__(self):
        self.passed = self.failed = self.skipped = 0
        self.engines = ["uring", "epoll"]
        self.no_uring = None
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                if f.read().strip() not in ("", "0"):
                    self.no_uring = "kernel.io_uring_disabled is set"
        except OSError:
            pass

    def run(self, name, fn):
        for io in self.engines:
            label = "%s [%s]" % (name, io)
            if io == "uring" and self.no_uring:
                self.skipped += 1
                print("skip %s: %s" % (label, self.no_uring), flush=True)
                continue
            t0 = time.monotonic()
            try:
                fn(io)
            except Exception as e:   # noqa: BLE001 - report every failure
                self.failed += 1
                print("FAIL %s: %s: %s" % (label, type(e).__name__, e), flush=True)
                continue
            self.passed += 1
            print("ok   %s (%.2f s)" % (label, time.monotonic() - t0), flush=True)

    def finish(self):
        tail = ", %d skipped" % self.skipped if self.skipped else ""
        print("%d passed, %d failed%s" % (self.passed, self.failed, tail), flush=True)
        sys.exit(1 if self.failed else 0)
