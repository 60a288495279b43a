"""A protocol-level SniTun tunnel client for end-to-end tests.

Written from PROTOCOL.md with python3-cryptography only (no snitun code):
it presents a token, answers the challenge, then speaks multiplexer frames.
Two ways to use it:

* frame level: ``recv_frame()`` returns every decrypted frame exactly as the
  gateway sent it (id, flow, size, extra, data, NEW caller address), and
  ``send_*`` writes frames, so tests can assert exact bytes;
* relay: ``start_relay(host, port)`` connects a TCP socket to an endpoint for
  every NEW and pumps bytes both ways (CLOSE on endpoint EOF), so a real TLS
  client (curl) works through the gateway.

Ciphers (PROTOCOL.md 3): aes-cbc is one continuing CBC chain per direction
(a cryptography encryptor/decryptor context kept for the whole tunnel);
aes-gcm is nonce = 4-byte prefix (client 00000000, gateway 00000001) ||
64-bit counter from 0, unit = nonce || ciphertext || tag.
"""

import hashlib
import ipaddress
import os
import socket
import struct
import threading
import time

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NEW, DATA, CLOSE, PING, PAUSE, RESUME = 0x01, 0x02, 0x04, 0x08, 0x16, 0x32
FLOW_NAMES = {NEW: "NEW", DATA: "DATA", CLOSE: "CLOSE", PING: "PING",
              PAUSE: "PAUSE", RESUME: "RESUME"}
HDR = 32
AEAD_OVERHEAD = 28
PREFIX_CLIENT = b"\x00\x00\x00\x00"
PREFIX_GATEWAY = b"\x00\x00\x00\x01"


class ProtocolError(Exception):
    pass


class Sealer:
    """One direction of a tunnel cipher (PROTOCOL.md 3.2, 3.3)."""

    def __init__(self, cipher, key, iv, encrypt, prefix):
        self.kind = cipher
        self.prefix = prefix
        self.counter = 0
        if cipher == "aes-cbc":
            c = Cipher(algorithms.AES(key), modes.CBC(iv))
            self.ctx = c.encryptor() if encrypt else c.decryptor()
        elif cipher == "aes-gcm":
            self.aead = AESGCM(key)
        else:
            raise ValueError("unsupported cipher " + cipher)

    @property
    def overhead(self):
        return 0 if self.kind == "aes-cbc" else AEAD_OVERHEAD

    def seal(self, plain):
        if self.kind == "aes-cbc":
            assert len(plain) % 16 == 0
            return self.ctx.update(plain)
        nonce = self.prefix + struct.pack(">Q", self.counter)
        self.counter += 1
        return nonce + self.aead.encrypt(nonce, plain, None)

    def open(self, wire):
        if self.kind == "aes-cbc":
            return self.ctx.update(wire)
        nonce, body = wire[:12], wire[12:]
        want = self.prefix + struct.pack(">Q", self.counter)
        if nonce != want:
            raise ProtocolError("nonce %s, expected %s" % (nonce.hex(), want.hex()))
        self.counter += 1
        return self.aead.decrypt(nonce, body, None)


class Frame:
    def __init__(self, fid, flow, size, extra, data=b"", caller=None, block=None):
        self.id = fid
        self.flow = flow
        self.size = size
        self.extra = extra
        self.data = data
        self.caller = caller    # NEW: ipaddress object
        self.block = block      # NEW v>=2: decrypted address block

    def __repr__(self):
        return "Frame(%s id=%s size=%d caller=%s)" % (
            FLOW_NAMES.get(self.flow, hex(self.flow)), self.id.hex()[:8], self.size,
            self.caller)


def decode_new_caller(version, extra, block):
    """Caller address of a NEW frame, as a receiver reads it (4.5)."""
    if version < 2:
        return ipaddress.IPv4Address(extra[1:5])
    if block[:1] == b"6":
        return ipaddress.IPv6Address(block[1:17])
    return ipaddress.IPv4Address(block[1:5])


class Tunnel:
    """A client tunnel over a connected socket (or any object with sendall /
    recv)."""

    def __init__(self, sock, cipher, key, iv, version):
        self.sock = sock
        self.version = version
        self.seal = Sealer(cipher, key, iv, True, PREFIX_CLIENT)
        self.opener = Sealer(cipher, key, iv, False, PREFIX_GATEWAY)
        self.rbuf = b""
        self.wlock = threading.Lock()
        self.challenge_wire = None
        self.challenge_plain = None

    # ---- raw I/O --------------------------------------------------------
    def read_exact(self, n, timeout=None):
        if timeout is not None:
            self.sock.settimeout(timeout)
        while len(self.rbuf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.rbuf)))
            if not chunk:
                raise EOFError("tunnel closed with %d of %d bytes" % (len(self.rbuf), n))
            self.rbuf += chunk
        out, self.rbuf = self.rbuf[:n], self.rbuf[n:]
        return out

    def send_raw(self, data):
        with self.wlock:
            self.sock.sendall(data)

    # ---- handshake ------------------------------------------------------
    def handshake(self, token, timeout=5.0, answer=None, split=None, then_ping=None):
        """Send the token (in one write, or split at the given offsets with
        a pause between pieces), read the challenge, answer it. answer: a
        function(challenge_plain) -> answer_plain to send a wrong one.
        then_ping: a PING id to send in the same write as the answer (the
        gateway must keep bytes that follow the answer)."""
        tok = token.encode() if isinstance(token, str) else token
        if split:
            last = 0
            for cut in list(split) + [len(tok)]:
                self.send_raw(tok[last:cut])
                last = cut
                time.sleep(0.15)
        else:
            self.send_raw(tok)
        wire = self.read_exact(32 + self.opener.overhead, timeout)
        self.challenge_wire = wire
        self.challenge_plain = self.opener.open(wire)
        reply = (answer or (lambda c: hashlib.sha256(c).digest()))(self.challenge_plain)
        with self.wlock:
            out = self.seal.seal(reply)
            if then_ping is not None:
                out += self.frame_bytes(then_ping, PING, extra=b"ping")
            self.sock.sendall(out)

    # ---- frames ---------------------------------------------------------
    def frame_bytes(self, fid, flow, data=b"", extra=None):
        if extra is None:
            extra = os.urandom(11)
        extra = (extra + os.urandom(11))[:11]
        hdr = fid + bytes([flow]) + struct.pack(">I", len(data)) + extra
        return self.seal.seal(hdr) + data

    def send_frame(self, fid, flow, data=b"", extra=None):
        # Seal and write under one lock: units must hit the wire in the
        # order they were sealed (CBC chain, GCM counter).
        with self.wlock:
            self.sock.sendall(self.frame_bytes(fid, flow, data, extra))

    def send_data(self, fid, data):
        for i in range(0, len(data), 65536):
            self.send_frame(fid, DATA, data[i:i + 65536])

    def send_close(self, fid):
        self.send_frame(fid, CLOSE)

    def send_ping(self, fid=None, reply=False):
        fid = fid or os.urandom(16)
        self.send_frame(fid, PING, extra=b"pong" if reply else b"ping")
        return fid

    def send_pause(self, fid):
        self.send_frame(fid, PAUSE)

    def send_resume(self, fid):
        self.send_frame(fid, RESUME)

    def recv_frame(self, timeout=5.0):
        plain = self.opener.open(self.read_exact(HDR + self.opener.overhead, timeout))
        fid, flow = plain[:16], plain[16]
        size = struct.unpack(">I", plain[17:21])[0]
        extra = plain[21:32]
        if flow == NEW and self.version >= 2 and size > 0:
            block = self.opener.open(self.read_exact(size + self.opener.overhead, timeout))
            return Frame(fid, flow, size, extra, b"", decode_new_caller(2, extra, block), block)
        data = self.read_exact(size, timeout) if size else b""
        caller = decode_new_caller(self.version, extra, None) if flow == NEW and \
            self.version < 2 else None
        return Frame(fid, flow, size, extra, data, caller)

    def close(self):
        # shutdown() wakes a relay thread blocked in recv() on this socket;
        # close() alone would leave the connection open until it returns.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- relay ----------------------------------------------------------
    def start_relay(self, host, port, on_frame=None):
        """Serve channels by connecting each NEW to host:port. Runs a reader
        thread; returns it. on_frame(frame) sees every frame first."""
        self.channels = {}
        self.relay_error = None
        t = threading.Thread(target=self._relay_loop, args=(host, port, on_frame),
                             daemon=True)
        t.start()
        self.relay_thread = t
        return t

    def _relay_loop(self, host, port, on_frame):
        try:
            while True:
                f = self.recv_frame(timeout=None)
                if on_frame:
                    on_frame(f)
                if f.flow == NEW:
                    self._relay_open(f.id, host, port)
                elif f.flow == DATA:
                    ep = self.channels.get(f.id)
                    if ep is not None:
                        try:
                            ep.sendall(f.data)
                        except OSError:
                            pass
                elif f.flow == CLOSE:
                    ep = self.channels.pop(f.id, None)
                    if ep is not None:
                        try:
                            ep.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                elif f.flow == PING and f.extra[:4] != b"pong":
                    self.send_ping(f.id, reply=True)
        except (EOFError, OSError) as e:
            self.relay_error = e
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.relay_error = e
        # shutdown() first: close() alone does not end a connection whose
        # pump thread is blocked in recv() (the blocked call holds the file),
        # so the endpoint would wait for a FIN that never comes.
        for ep in list(self.channels.values()):
            try:
                ep.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                ep.close()
            except OSError:
                pass

    def _relay_open(self, fid, host, port):
        try:
            ep = socket.create_connection((host, port), timeout=5)
            ep.settimeout(None)
        except OSError:
            self.send_close(fid)
            return
        self.channels[fid] = ep
        threading.Thread(target=self._relay_pump, args=(fid, ep), daemon=True).start()

    def _relay_pump(self, fid, ep):
        try:
            while True:
                chunk = ep.recv(4096)
                if not chunk:
                    break
                self.send_frame(fid, DATA, chunk)
        except OSError:
            pass
        if self.channels.pop(fid, None) is not None:
            try:
                self.send_close(fid)
            except OSError:
                pass
        try:
            ep.close()
        except OSError:
            pass


def connect(host, port, token, cipher, key, iv, version, timeout=5.0, **hs):
    """Open a tunnel: TCP connect, token, challenge. Returns the Tunnel."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = Tunnel(s, cipher, bytes.fromhex(key) if isinstance(key, str) else key,
               bytes.fromhex(iv) if isinstance(iv, str) else iv, version)
    t.handshake(token, timeout, **hs)
    return t
