#!/usr/bin/env python3
"""The exact frames `snitun server` sends, seen by a protocol-level client
(protoclient.py), with both engines:

- the Python codec first replays the reference session vectors, so that
  what it decodes from the gateway below can be trusted;
- challenge length and decryption (aes-cbc 32 bytes, aes-gcm 60 bytes);
- NEW for protocol 0, 1 and 2 with an IPv4 caller (127.0.0.1) and an IPv6
  caller (::1): v2 address block "4"/"6", v0/v1 EXTRA "4" + IPv4 or
  0.0.0.0; first DATA = the exact ClientHello bytes; DATA back to the
  device; CLOSE when the device disconnects;
- PING answered with "pong" and the same id;
- PAUSE/RESUME from the client (device reads stop) and from the gateway
  (a device that does not read: PAUSE, then RESUME once it drained);
- a token split over several writes; a tunnel replaced by a newer one;
- PROXY v1/v2 headers with --proxy-protocol (caller taken from them, header
  stripped) and without it (closed, nothing sent).
"""

import ipaddress
import os
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402
import protoclient as P  # noqa: E402

HELLO = L.read_data("clienthello", "openssl_tls13_sni.bin")
V4 = ipaddress.ip_address("127.0.0.1")
V6 = ipaddress.ip_address("::1")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# ---- codec self-check against the reference vectors --------------------------

def replay_vectors():
    """Decode each reference session's gateway->client stream as a client
    would and compare with the decoded plaintexts in the vector file."""
    for fname in ("cbc_session.json", "gcm_session.json"):
        vec = L.load_json(fname)
        for sess in vec["sessions"]:
            cl = sess["token_claims"]
            cipher = cl.get("cipher", "aes-cbc")
            stream = bytes.fromhex(sess["server_to_client_stream_hex"])

            class Src:
                def __init__(self, b):
                    self.b = b

                def recv(self, n):
                    out, self.b = self.b[:n], self.b[n:]
                    return out

                def settimeout(self, t):
                    pass

            t = P.Tunnel(Src(stream), cipher, bytes.fromhex(cl["aes_key"]),
                         bytes.fromhex(cl["aes_iv"]), cl.get("protocol_version", 0))
            items = sess["decoded"]["server_to_client"]
            ch = items[0]
            plain = t.opener.open(t.read_exact(32 + t.opener.overhead))
            check(plain.hex() == ch["plain_hex"], "%s challenge" % fname)
            for it in items[1:]:
                f = t.recv_frame()
                check(f.flow == it["flow"], "%s flow at %d" % (fname, it["offset"]))
                check(f.id.hex() == it["id_hex"], "%s id" % fname)
                check(f.size == it["size"], "%s size" % fname)
                if f.flow == P.NEW:
                    check(str(f.caller) == it["new_address"], "%s caller %s" % (fname, f.caller))
                elif f.flow == P.DATA:
                    check(f.data.hex() == it["data_hex"], "%s data" % fname)
            check(t.rbuf == b"" and Src, "%s: stream fully consumed" % fname)


# ---- helpers -------------------------------------------------------------------------

class Env:
    def __init__(self, io):
        self.io = io
        self.port = L.free_port()
        self.gw = L.Gateway([("listen", "127.0.0.1:%d" % self.port),
                             ("listen", "[::1]:%d" % self.port)], io=io, threads=1,
                            extra=["--handshake-timeout", "2"])
        self.tunnel = None

    def open_tunnel(self, version=2, cipher="aes-cbc", **hs):
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
            time.sleep(0.05)
        key = tunnel_key(cipher)
        tok = L.issue_token(L.HELLO_NAME, version=version, cipher=cipher, key=key)
        self.tunnel = P.connect("127.0.0.1", self.port, tok, cipher, key, L.AES_IV,
                                version, **hs)
        ping(self.tunnel)  # registered once the gateway answers
        return self.tunnel

    def stop(self):
        if self.tunnel is not None:
            self.tunnel.close()
        rc = self.gw.stop()
        check(rc == 0, "gateway exit status %s\n%s" % (rc, self.gw.text()[-3000:]))
        self.gw.cleanup()


def tunnel_key(cipher):
    """The vector key, except for aes-gcm: the gateway refuses a GCM key it
    has seen in a session that is still valid (PROTOCOL.md 3.3)."""
    return os.urandom(32).hex() if cipher == "aes-gcm" else L.AES_KEY


def ping(t):
    pid = t.send_ping()
    f = t.recv_frame()
    check(f.flow == P.PING, "PING answer flow %r" % f)
    check(f.extra[:4] == b"pong", "answer says pong: %r" % f.extra)
    check(f.id == pid, "pong carries the request's id")
    check(f.size == 0, "pong has no data")


def device(env, host):
    d = L.connect(host, env.port)
    d.sendall(HELLO)
    return d


def expect_new(t, caller):
    f = t.recv_frame()
    check(f.flow == P.NEW, "NEW expected, got %r" % f)
    if t.version >= 2:
        size = 16 if caller.version == 4 else 32
        check(f.size == size, "v2 NEW SIZE %d, want %d" % (f.size, size))
        fam = b"4" if caller.version == 4 else b"6"
        check(f.block[:1] == fam and f.block[1:1 + len(caller.packed)] == caller.packed,
              "v2 block %s for %s" % (f.block.hex(), caller))
    else:
        check(f.size == 0, "v%d NEW has no data" % t.version)
        want = caller.packed if caller.version == 4 else b"\0\0\0\0"
        check(f.extra[:5] == b"4" + want, "v%d EXTRA %s for %s" % (t.version, f.extra.hex(),
                                                                   caller))
    return f


def expect_data(t, fid, want, timeout=5.0):
    got = b""
    while len(got) < len(want):
        f = t.recv_frame(timeout)
        check(f.flow == P.DATA and f.id == fid, "DATA for the channel expected, got %r" % f)
        got += f.data
    check(got == want, "DATA bytes differ (%d vs %d)" % (len(got), len(want)))


def expect_close(t, fid):
    f = t.recv_frame()
    check(f.flow == P.CLOSE and f.id == fid and f.size == 0, "CLOSE expected, got %r" % f)


# ---- scenarios ---------------------------------------------------------------------

def challenge(env, cipher, wire_len):
    t = env.open_tunnel(2, cipher)
    check(len(t.challenge_wire) == wire_len, "challenge is %d bytes" % len(t.challenge_wire))
    check(len(t.challenge_plain) == 32, "challenge plaintext is 32 bytes")
    if cipher == "aes-gcm":
        check(t.challenge_wire[:12] == b"\0\0\0\1" + b"\0" * 8,
              "gateway nonce prefix 00000001, counter 0")
    # a second tunnel gets a fresh challenge
    first = t.challenge_plain
    t2 = env.open_tunnel(2, cipher)
    check(t2.challenge_plain != first, "challenges differ")


def channel_roundtrip(env, version, host, caller):
    t = env.open_tunnel(version)
    d = device(env, host)
    f = expect_new(t, caller)
    expect_data(t, f.id, HELLO)
    reply = os.urandom(3000)
    t.send_data(f.id, reply)
    got = b""
    d.settimeout(5)
    while len(got) < len(reply):
        chunk = d.recv(65536)
        check(chunk, "device got EOF")
        got += chunk
    check(got == reply, "device receives the DATA bytes exactly")
    more = os.urandom(777)
    d.sendall(more)
    expect_data(t, f.id, more)
    d.close()
    expect_close(t, f.id)
    ping(t)  # tunnel still fine


def new_v2_gcm(env):
    t = env.open_tunnel(2, "aes-gcm")
    d = device(env, "::1")
    f = expect_new(t, V6)
    expect_data(t, f.id, HELLO)
    d.close()
    expect_close(t, f.id)


def client_pause(env):
    """PAUSE from the client stops device reads (at most the read already
    in flight still arrives, PROTOCOL.md 5.2); RESUME restarts them."""
    t = env.open_tunnel(1)
    d = device(env, "127.0.0.1")
    f = expect_new(t, V4)
    expect_data(t, f.id, HELLO)
    t.send_pause(f.id)
    ping(t)  # the gateway has processed the PAUSE
    a, b = b"A" * 100, b"B" * 100
    d.sendall(a)
    got = []
    try:
        fr = t.recv_frame(0.5)  # the recv armed before PAUSE may deliver once
        check(fr.flow == P.DATA and fr.id == f.id, "only DATA may come: %r" % fr)
        got.append(fr.data)
    except socket.timeout:
        pass
    d.sendall(b)
    try:
        fr = t.recv_frame(0.7)
        raise AssertionError("frame while paused: %r (%r)" % (fr, fr.data[:8]))
    except socket.timeout:
        pass
    t.send_resume(f.id)
    want = a + b
    while len(b"".join(got)) < len(want):
        fr = t.recv_frame()
        check(fr.flow == P.DATA and fr.id == f.id, "DATA after RESUME: %r" % fr)
        got.append(fr.data)
    check(b"".join(got) == want, "device bytes in order after RESUME")
    d.close()
    expect_close(t, f.id)


def gateway_pause(env):
    """A device that does not read: the gateway's queue passes 2 MiB and it
    sends PAUSE; once the device drained it, RESUME."""
    t = env.open_tunnel(2)
    dev = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    dev.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    dev.settimeout(10)
    dev.connect(("127.0.0.1", env.port))
    dev.sendall(HELLO)
    f = expect_new(t, V4)
    expect_data(t, f.id, HELLO)
    payload = os.urandom(12 << 20)
    sent = threading.Event()

    def writer():
        t.send_data(f.id, payload)
        sent.set()

    th = threading.Thread(target=writer, daemon=True)
    th.start()
    fr = t.recv_frame(10)
    check(fr.flow == P.PAUSE and fr.id == f.id and fr.size == 0, "PAUSE expected: %r" % fr)
    got = bytearray()
    while len(got) < len(payload):
        chunk = dev.recv(1 << 20)
        check(chunk, "device EOF after %d bytes" % len(got))
        got += chunk
    th.join(10)
    check(sent.is_set(), "client wrote everything")
    check(bytes(got) == payload, "device got the 12 MiB exactly")
    fr = t.recv_frame(5)
    check(fr.flow == P.RESUME and fr.id == f.id, "RESUME expected: %r" % fr)
    dev.close()
    expect_close(t, f.id)


def answer_pipelined(env, cipher):
    """Frames in the same segment as the answer reach the multiplexer."""
    key = tunnel_key(cipher)
    tok = L.issue_token(L.HELLO_NAME, version=2, cipher=cipher, key=key)
    pid = os.urandom(16)
    t = P.connect("127.0.0.1", env.port, tok, cipher, key, L.AES_IV, 2, then_ping=pid)
    f = t.recv_frame()
    check(f.flow == P.PING and f.id == pid and f.extra[:4] == b"pong", "pong: %r" % f)
    if env.tunnel is not None:
        env.tunnel.close()
    env.tunnel = t


def unknown_cipher(env):
    """A token naming an unknown cipher runs aes-cbc, with a warning
    (PROTOCOL.md 2.5), as the reference. Made with cryptography's Fernet,
    since `snitun token issue` refuses unknown ciphers."""
    import json
    from cryptography.fernet import Fernet
    claims = {"valid": time.time() + 600, "hostname": L.HELLO_NAME, "aes_key": L.AES_KEY,
              "aes_iv": L.AES_IV, "protocol_version": 2, "cipher": "aes-foo"}
    tok = Fernet(L.K1.encode()).encrypt(json.dumps(claims).encode())
    t = P.connect("127.0.0.1", env.port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
    ping(t)
    check(env.gw.wait_log(r"level=warn msg=\"token names an unknown cipher"), "warning logged")
    if env.tunnel is not None:
        env.tunnel.close()
    env.tunnel = t


def token_split(env):
    tok = L.issue_token(L.HELLO_NAME, version=2)
    t = P.connect("127.0.0.1", env.port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2,
                  split=[1, 2, 50, 150])
    ping(t)
    d = device(env, "127.0.0.1")
    f = expect_new(t, V4)
    expect_data(t, f.id, HELLO)
    d.close()
    expect_close(t, f.id)
    t.close()


def replaced(env):
    t1 = env.open_tunnel(2)
    tok = L.issue_token(L.HELLO_NAME, version=2)
    t2 = P.connect("127.0.0.1", env.port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
    ping(t2)
    try:
        t1.recv_frame(3)
        raise AssertionError("old tunnel still sends frames")
    except EOFError:
        pass
    d = device(env, "127.0.0.1")
    f = expect_new(t2, V4)
    expect_data(t2, f.id, HELLO)
    d.close()
    expect_close(t2, f.id)
    env.tunnel = t2


def proxy_refused(env):
    """Without --proxy-protocol a PROXY header fails classification."""
    env.open_tunnel(2)
    d = L.connect("127.0.0.1", env.port)
    d.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n" + HELLO)
    check(L.closed_without_data(d), "closed without a byte")
    ping(env.tunnel)


def proxy_v2_header(src6):
    block = src6.packed + ipaddress.ip_address("2001:db8::1").packed + struct.pack(">HH", 5555, 443)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + struct.pack(">H", len(block)) +
            block)


def proxy_accepted(io):
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, extra=["--proxy-protocol"])
    try:
        tok = L.issue_token(L.HELLO_NAME, version=2)
        s = L.connect("127.0.0.1", port)
        # the token may follow a PROXY header too (single port)
        s.sendall(b"PROXY TCP4 198.51.100.9 10.0.0.1 1234 443\r\n")
        t = P.Tunnel(s, "aes-cbc", bytes.fromhex(L.AES_KEY), bytes.fromhex(L.AES_IV), 2)
        t.handshake(tok)
        ping(t)
        for hdr, caller in (
                (b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n", "203.0.113.7"),
                (proxy_v2_header(ipaddress.ip_address("2001:db8::1234")), "2001:db8::1234"),
                (b"PROXY UNKNOWN\r\n", "127.0.0.1"),
                (b"", "127.0.0.1")):
            d = L.connect("127.0.0.1", port)
            d.sendall(hdr + HELLO)
            f = expect_new(t, ipaddress.ip_address(caller))
            expect_data(t, f.id, HELLO)
            d.close()
            expect_close(t, f.id)
        d = L.connect("127.0.0.1", port)
        d.sendall(b"PROXY TCP4 300.1.2.3 10.0.0.1 1 2\r\n" + HELLO)
        check(L.closed_without_data(d), "bad PROXY header: closed without a byte")
        t.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)
        gw.cleanup()


def replaced_cross_shard(io):
    """--threads 2: a newer tunnel for the same hostname closes the old one
    also when they live on different shards (a "replace" message to the
    old tunnel's shard); devices then reach the new one."""
    import re
    port = L.free_port()
    gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], io=io, threads=2)
    try:
        prev, prev_shard, crossed = None, None, 0
        for i in range(1, 25):
            tok = L.issue_token(L.HELLO_NAME, version=2)
            t = P.connect("127.0.0.1", port, tok, "aes-cbc", L.AES_KEY, L.AES_IV, 2)
            ping(t)
            check(gw.wait_log(r'msg="tunnel up"', count=i), "tunnel %d logged" % i)
            shard = re.findall(r'msg="tunnel up" shard=(\d+)', gw.text())[-1]
            if prev is not None:
                try:
                    prev.recv_frame(3)
                    raise AssertionError("old tunnel still open")
                except EOFError:
                    pass
                prev.close()
                if shard != prev_shard:
                    crossed += 1
            d = device_at(port)
            f = expect_new(t, V4)
            expect_data(t, f.id, HELLO)
            d.close()
            expect_close(t, f.id)
            prev, prev_shard = t, shard
            if crossed >= 2:
                break
        check(crossed >= 2, "replacements across shards seen: %d" % crossed)
        check(gw.wait_log(r"reason=replaced", count=i - 1), "old tunnels closed as replaced")
        prev.close()
    finally:
        rc = gw.stop()
        check(rc == 0, "gateway exit status %s" % rc)


def device_at(port):
    d = L.connect("127.0.0.1", port)
    d.sendall(HELLO)
    return d


def main():
    r = L.Runner()
    r.run("protoclient decodes the reference session vectors", replay_vectors)
    for io in L.engines():
        env = Env(io)
        try:
            r.run("%s: challenge aes-cbc 32 bytes" % io, challenge, env, "aes-cbc", 32)
            r.run("%s: challenge aes-gcm 60 bytes" % io, challenge, env, "aes-gcm", 60)
            for v in (0, 1, 2):
                r.run("%s: v%d NEW/DATA/CLOSE IPv4 caller" % (io, v), channel_roundtrip, env, v,
                      "127.0.0.1", V4)
                r.run("%s: v%d NEW/DATA/CLOSE IPv6 caller" % (io, v), channel_roundtrip, env, v,
                      "::1", V6)
            r.run("%s: v2 aes-gcm NEW IPv6" % io, new_v2_gcm, env)
            r.run("%s: client PAUSE/RESUME" % io, client_pause, env)
            r.run("%s: gateway PAUSE/RESUME" % io, gateway_pause, env)
            r.run("%s: token split over writes" % io, token_split, env)
            r.run("%s: unknown cipher runs aes-cbc" % io, unknown_cipher, env)
            r.run("%s: PING in the answer's segment (cbc)" % io, answer_pipelined, env,
                  "aes-cbc")
            r.run("%s: PING in the answer's segment (gcm)" % io, answer_pipelined, env,
                  "aes-gcm")
            r.run("%s: stale tunnel replaced" % io, replaced, env)
            r.run("%s: PROXY header refused when off" % io, proxy_refused, env)
        finally:
            r.run("%s: clean stop" % io, env.stop)
        r.run("%s: PROXY v1/v2 accepted when on" % io, proxy_accepted, io)
        r.run("%s: stale tunnel on another shard replaced" % io, replaced_cross_shard, io)
    r.finish()


if __name__ == "__main__":
    main()
