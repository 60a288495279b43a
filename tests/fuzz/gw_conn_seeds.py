#!/usr/bin/env python3
"""Write the seed corpus of tests/fuzz/fuzz_gw_conn.c into
tests/fuzz/seeds/gw_conn/ (input layout: the comment at the top of
fuzz_gw_conn.c). Tokens are made with K1 of tests/data (the gateway's key
in the harness) and are valid until 2100, so the fuzzer starts past the
Fernet layer, in the challenge and the multiplexer. Re-run it after a
change of the layout; the seeds are small and committed.

    python3 tests/fuzz/gw_conn_seeds.py
"""

import base64
import json
import os
import struct

from cryptography.fernet import Fernet

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "seeds", "gw_conn")
HELLOS = os.path.join(SRC, "tests", "data", "clienthello")

K1 = b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
K3 = b"QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8="   # not known to the gateway
VALID = 4102444800                                    # 2100-01-01
HOST = "myname.ui.nabu.casa"

# mode bits
SINGLE, SNI, PEER = 0, 1, 2
PP, PRE, ANSWER, EXPIRE, HALF, V6 = 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
# flows
NEW, DATA, CLOSE, PING, PAUSE, RESUME = 0x01, 0x02, 0x04, 0x08, 0x16, 0x32


def token(version=2, cipher="aes-cbc", host=HOST, aliases=(), key=K1, claims=None):
    c = {"valid": VALID, "hostname": host, "aes_key": os.urandom(32).hex(),
         "aes_iv": os.urandom(16).hex(), "protocol_version": version}
    if cipher != "aes-cbc":
        c["cipher"] = cipher
    if aliases:
        c["alias"] = list(aliases)
    plain = claims if claims is not None else json.dumps(c).encode()
    return Fernet(key).encrypt(plain)


def seed(mode, hs, ops=b"", split=0, am=0):
    return bytes([mode, split, am]) + struct.pack(">H", len(hs)) + hs + ops


# ---- ops -------------------------------------------------------------------------

def frame(flow, payload=b"", sel=0, extra=None, size=None, sealed=False, pre=False):
    flags = (0x10 if extra is not None else 0) | (0x20 if size is not None else 0) | \
            (0x40 if sealed else 0) | (0x80 if pre else 0)
    b = bytes([0x00 | flags, flow, sel]) + struct.pack(">H", len(payload))
    if extra is not None:
        b += extra.ljust(11, b"\0")[:11]
    if size is not None:
        b += struct.pack(">I", size)
    return b + payload


def raw(b, pre=False):
    return bytes([0x01 | (0x80 if pre else 0), len(b)]) + b


def device(name=0, split=False, src=1, half=False, v6=False):
    return bytes([0x02 | (0x10 if split else 0) | (0x20 if half else 0),
                  name | src << 2 | (0x80 if v6 else 0)])


def dev_write(d, b):
    return bytes([0x03, d, len(b)]) + b


def dev_close(d, half=False, rd=False):
    return bytes([0x04 | (0x10 if half else 0) | (0x20 if rd else 0), d])


def dev_reads(d):
    return bytes([0x05, d])


def tun_reads(pre=False):
    return bytes([0x06 | (0x80 if pre else 0)])


def tun_shut(pre=False, rd=False):
    return bytes([0x07 | (0x20 if rd else 0) | (0x80 if pre else 0)])


def expire(tunnels=False):
    return bytes([0x08 | (0x10 if tunnels else 0)])


def flood(n, sel=0, pre=False):
    return bytes([0x09 | (0x80 if pre else 0), sel, n])


def turns():
    return bytes([0x0a])


def replay():
    return bytes([0x0b])


def burst(n, pre=False):
    return bytes([0x0c | (0x80 if pre else 0), n])


def big_hello(name, pad):
    """A TLS 1.2 ClientHello for name with a padding extension of pad bytes
    (one record; larger than the gateway's first 4 KiB buffer)."""
    n = name.encode()
    sni = struct.pack(">HHHBH", 0, len(n) + 5, len(n) + 3, 0, len(n)) + n
    ext = sni + struct.pack(">HH", 21, pad) + bytes(pad)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\xc0\x2f" + b"\x01\x00" + \
        struct.pack(">H", len(ext)) + ext
    hs = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def hello(name):
    with open(os.path.join(HELLOS, name), "rb") as f:
        return f.read()


def ping():
    return frame(PING, sel=0x99, extra=b"ping")


def channel_life(pre=False):
    """Open a device, talk both ways, pause, resume, close from each side."""
    return (device(0) + frame(DATA, b"hello device", pre=pre) + dev_write(1, b"hello tunnel")
            + frame(PAUSE, pre=pre) + dev_write(1, b"more") + frame(RESUME, pre=pre)
            + frame(CLOSE, pre=pre) + device(1, split=True) + dev_close(2)
            + device(2) + dev_close(3, half=True) + frame(0x40, b"unknown flow", pre=pre)
            + frame(DATA, b"to nobody", sel=0xee, pre=pre))


PPV1 = b"PROXY TCP4 203.0.113.7 198.51.100.1 51000 443\r\n"
PPV2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack(">H", 12)
        + bytes([203, 0, 113, 7, 198, 51, 100, 1]) + struct.pack(">HH", 51000, 443))


def seeds():
    s = {}
    for v in (0, 1, 2):
        for c in ("aes-cbc", "aes-gcm"):
            tok = token(v, c)
            s["tunnel_v%d_%s" % (v, c)] = seed(PEER | ANSWER, tok, ping() + channel_life()
                                                 + tun_shut())
    tok = token(2)
    s["tunnel_single_port"] = seed(SINGLE | ANSWER, tok, ping() + channel_life())
    s["tunnel_split_7"] = seed(PEER | ANSWER, tok, ping(), split=7)
    s["tunnel_split_1"] = seed(PEER | ANSWER, tok[:40], ping(), split=1)
    s["tunnel_wrong_answer"] = seed(PEER | ANSWER, tok, ping(), am=1)
    s["tunnel_half_answer"] = seed(PEER | ANSWER | EXPIRE, tok, ping(), am=2)
    s["tunnel_answer_and_frames"] = seed(PEER | ANSWER, tok, ping() + ping(), am=4)
    s["tunnel_no_answer_deadline"] = seed(PEER | EXPIRE, tok)
    s["tunnel_replaces_pre"] = seed(PEER | PRE | ANSWER, tok, channel_life() + ping())
    s["tunnel_aliases"] = seed(PEER | ANSWER, token(2, aliases=("localhost", "a.example")),
                               device(2) + frame(DATA, b"x") + device(3))
    s["tunnel_flood_pause"] = seed(PEER | ANSWER, tok, device(0) + dev_reads(1) + flood(40)
                                   + dev_reads(1) + turns() + frame(CLOSE))
    s["tunnel_gw_not_read"] = seed(PEER | ANSWER, tok, device(0) + tun_reads() + dev_write(
        1, b"z" * 200) + tun_reads())
    s["tunnel_client_new_v2"] = seed(PEER | ANSWER, tok, frame(NEW, b"4" + bytes([10, 0, 0, 1])
                                                                + bytes(11), sealed=True))
    s["tunnel_size_lie"] = seed(PEER | ANSWER, tok, device(0) + frame(DATA, b"abc", size=100))
    s["tunnel_size_huge"] = seed(PEER | ANSWER, tok, frame(DATA, b"", size=0xffffffff))
    s["tunnel_raw_garbage"] = seed(PEER | ANSWER, tok, raw(os.urandom(48)))
    s["tunnel_expires"] = seed(PEER | ANSWER | PRE, token(2, host="other.example"),
                               device(0) + frame(DATA, b"x", pre=True) + expire(True) + ping())
    s["tunnel_unknown_cipher"] = seed(PEER | ANSWER, token(2, "aes-xyz"), ping() + device(0))
    s["tunnel_alias_takeover"] = seed(PEER | PRE | ANSWER, token(2, host="own.example",
                                                                 aliases=("localhost",)),
                                      device(2) + frame(DATA, b"x") + device(2, src=2))
    s["tunnel_names_refused"] = seed(PEER | ANSWER, token(2, aliases=("", "x" * 300)), ping())
    s["tunnel_replayed"] = seed(PEER | PRE | ANSWER, tok, replay() + ping() + replay())
    s["gcm_replayed"] = seed(PEER | ANSWER, token(2, "aes-gcm"), replay() + ping())
    s["tunnel_channel_limit"] = seed(PEER | ANSWER, tok, device(0) + device(0, src=2)
                                     + device(0, src=3) + dev_close(1) + device(0))
    s["ip_limit"] = seed(SNI | PRE, b"\x16\x03\x01", device(0, half=True, src=0)
                         + device(1, half=True, src=0) + device(0, src=0) + replay())
    s["handshake_limit"] = seed(PEER, tok[:50], device(0, half=True, src=1) + device(
        0, half=True, src=2) + device(0, half=True, src=3) + replay() + replay())
    s["challenge_send_fails"] = seed(PEER | ANSWER, tok, ping(), am=8)
    s["device_stops_reading"] = seed(PEER | ANSWER, tok, device(0) + dev_close(1, rd=True)
                                     + frame(DATA, b"y" * 100) + flood(4))
    s["tunnel_stops_reading"] = seed(PEER | ANSWER, tok, device(0) + tun_shut(rd=True)
                                     + dev_write(1, b"z" * 100) + ping())
    s["ping_burst_not_read"] = seed(PEER | ANSWER, tok, tun_reads() + burst(255) + burst(255)
                                    + tun_reads() + ping())
    s["tunnel_half_close"] = seed(PEER | ANSWER | HALF | V6, tok, device(0x80) + ping())
    # devices (ClientHellos), routed to the pre-tunnel
    for name in sorted(os.listdir(HELLOS)):
        s["hello_" + name[:-4]] = seed(SNI | PRE, hello(name),
                                       dev_write(0, b"after hello") + frame(DATA, b"back", pre=True)
                                       + frame(CLOSE, pre=True))
    h = hello("openssl_tls13_sni.bin")
    s["hello_big"] = seed(SNI | PRE, big_hello(HOST, 9000), dev_write(0, b"after")
                          + frame(DATA, b"back", pre=True), split=200)
    s["hello_single_split"] = seed(SINGLE | PRE, h, dev_write(0, b"x") + dev_close(0), split=50)
    s["hello_unrouted"] = seed(SINGLE, h)
    s["hello_deadline"] = seed(SNI | EXPIRE, h[:100])
    s["proxy_v1_hello"] = seed(SINGLE | PP | PRE, PPV1 + h, channel_life(pre=True))
    s["proxy_v2_hello"] = seed(SNI | PP | PRE | V6, PPV2 + h, split=9)
    s["proxy_v1_token"] = seed(SINGLE | PP | ANSWER, PPV1 + tok, ping())
    s["proxy_bad"] = seed(SNI | PP, b"PROXY TCP4 1.2.3.4\r\n" + h)
    # tokens refused
    s["token_unknown_key_deadline"] = seed(PEER | EXPIRE, token(2, key=K3))
    s["token_cut_deadline"] = seed(PEER | EXPIRE, tok[:100])
    s["idle_peer_deadline"] = seed(PEER | EXPIRE, b"")
    s["idle_single_deadline"] = seed(SINGLE | EXPIRE, b"g")
    s["token_expired"] = seed(PEER, Fernet(K1).encrypt(json.dumps(
        {"valid": 1000, "hostname": HOST, "aes_key": "00" * 32, "aes_iv": "00" * 16}).encode()))
    s["token_not_json"] = seed(PEER, token(claims=b"not json"))
    s["token_bad_claims"] = seed(SINGLE, token(claims=b'{"valid": 4102444800}'))
    s["token_bad_mac"] = seed(PEER | EXPIRE, tok[:-6] + (b"AAAA==" if tok[-6:] != b"AAAA==" else
                                                         b"BBBB=="))
    s["token_too_long"] = seed(PEER, b"gA" + b"A" * 4200)
    s["not_tls_or_token"] = seed(SINGLE, b"GET / HTTP/1.0\r\n\r\n")
    s["gcm_reuse"] = seed(PEER | ANSWER | PRE, token(2, "aes-gcm"), device(0) + ping())
    return s


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, b in seeds().items():
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(b)
    print("%d seeds in %s" % (len(seeds()), OUT))


if __name__ == "__main__":
    main()
