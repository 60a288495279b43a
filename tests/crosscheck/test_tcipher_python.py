#!/usr/bin/env python3
"""Cross-check crypto/tcipher against implementations not written here.

aes-cbc: our stream (one tc_seal per unit, or one tc_seal_batch) must equal
`openssl enc -aes-N-cbc -nopad -K .. -iv ..` over the concatenated units
(one continuous chain), and must open what openssl produced.
aes-gcm: every unit must equal python cryptography's AESGCM with the nonce
prefix || counter (client 00000000, gateway 00000001), and we must open
cryptography's units and refuse them when a bit is flipped, when the prefix
is the other side's, or when a counter is skipped. Counter exhaustion at
2^64-1 is checked too, and `tc_tool alloc-check` proves seal/open do not
allocate. Key sizes 16, 24 and 32.

Needs SNITUN_BUILD_DIR (tc_tool lives there). Prints `N passed, 0 failed`
and exits non-zero on any failure.
"""
import os
import random
import subprocess
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

BUILD = os.environ.get("SNITUN_BUILD_DIR", os.path.join(os.path.dirname(__file__), "../../build"))
TOOL = os.path.join(BUILD, "tc_tool")
PREFIX = {"client": b"\x00\x00\x00\x00", "gateway": b"\x00\x00\x00\x01"}

passed = 0
failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what, flush=True)


class Tool:
    """One tc_tool process answering one line per request."""

    def __init__(self):
        self.p = subprocess.Popen([TOOL], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1)

    def ask(self, *words):
        self.p.stdin.write(" ".join(words) + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().split()

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def hx(b):
    return b.hex() if b else "-"


def openssl_cbc(key, iv, data, decrypt=False):
    args = ["openssl", "enc", "-aes-%d-cbc" % (len(key) * 8), "-nopad", "-K", key.hex(),
            "-iv", iv.hex()]
    if decrypt:
        args.append("-d")
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def gcm_units(key, side, start, units):
    aead = AESGCM(key)
    out = []
    for i, u in enumerate(units):
        nonce = PREFIX[side] + (start + i).to_bytes(8, "big")
        out.append(nonce + aead.encrypt(nonce, u, None))
    return out


def cbc_cases(tool, rng, count):
    for case in range(count):
        key = rng.randbytes(rng.choice([16, 24, 32]))
        iv = rng.randbytes(16)
        side = rng.choice(["client", "gateway"])
        units = [rng.randbytes(16 * rng.randint(0, 6)) for _ in range(rng.randint(1, 40))]
        whole = b"".join(units)
        want = openssl_cbc(key, iv, whole) if whole else b""
        for mode in ("single", "batch"):
            r = tool.ask("seal", "aes-cbc", side, key.hex(), iv.hex(), mode, "0",
                         *[hx(u) for u in units])
            got = bytes.fromhex(r[1]) if r[0] == "ok" and len(r) > 1 else b""
            check(r[0] == "ok" and got == want,
                  "cbc %s case %d key %d units %d" % (mode, case, len(key), len(units)))
        # Open what openssl sealed, cut into different unit boundaries.
        if whole:
            cut = rng.randrange(0, len(whole) // 16 + 1) * 16
            parts = [p for p in (want[:cut], want[cut:]) if p]
            r = tool.ask("open", "aes-cbc", side, key.hex(), iv.hex(), "0", *[p.hex() for p in parts])
            plain = bytes.fromhex("".join(x for x in r[1:] if x != "-"))
            check(r[0] == "ok" and plain == whole, "cbc open case %d" % case)
            check(openssl_cbc(key, iv, want, decrypt=True) == whole, "openssl round trip %d" % case)
    # Misaligned units are refused.
    r = tool.ask("seal", "aes-cbc", "client", "00" * 32, "00" * 16, "single", "0", "00" * 15)
    check(r == ["err"], "cbc 15-byte unit refused")


def gcm_cases(tool, rng, count):
    for case in range(count):
        key = rng.randbytes(rng.choice([16, 24, 32]))
        side = rng.choice(["client", "gateway"])
        start = rng.choice([0, 0, 0, rng.randrange(0, 2 ** 64 - 64)])
        units = [rng.randbytes(rng.choice([32, 16, 32, rng.randint(1, 200)]))
                 for _ in range(rng.randint(1, 30))]
        want = gcm_units(key, side, start, units)
        for mode in ("single", "batch"):
            r = tool.ask("seal", "aes-gcm", side, key.hex(), "-", mode, str(start),
                         *[hx(u) for u in units])
            check(r[0] == "ok" and bytes.fromhex(r[1]) == b"".join(want),
                  "gcm %s case %d key %d start %d" % (mode, case, len(key), start))
        r = tool.ask("open", "aes-gcm", side, key.hex(), "-", str(start), *[w.hex() for w in want])
        check(r[0] == "ok" and [bytes.fromhex(x) for x in r[1:]] == units,
              "gcm open case %d" % case)
        # Refusals: a flipped bit anywhere, the other side's prefix, a gap.
        bad = bytearray(want[-1])
        bit = rng.randrange(len(bad) * 8)
        bad[bit // 8] ^= 1 << (bit % 8)
        r = tool.ask("open", "aes-gcm", side, key.hex(), "-", str(start),
                     *[w.hex() for w in want[:-1]], bytes(bad).hex())
        check(r == ["err", str(len(want) - 1)], "gcm flipped bit %d case %d" % (bit, case))
        other = "client" if side == "gateway" else "gateway"
        r = tool.ask("open", "aes-gcm", other, key.hex(), "-", str(start), want[0].hex())
        check(r == ["err", "0"], "gcm wrong prefix case %d" % case)
        if len(want) > 1:
            r = tool.ask("open", "aes-gcm", side, key.hex(), "-", str(start), want[1].hex())
            check(r == ["err", "0"], "gcm skipped counter case %d" % case)


def gcm_exhaustion(tool):
    key = bytes(range(32))
    units = [b"\x11" * 32, b"\x22" * 32]
    want = gcm_units(key, "gateway", 2 ** 64 - 2, units)
    for mode in ("single", "batch"):
        r = tool.ask("seal", "aes-gcm", "gateway", key.hex(), "-", mode, str(2 ** 64 - 2),
                     *[u.hex() for u in units])
        check(r[0] == "ok" and bytes.fromhex(r[1]) == b"".join(want), "gcm last counters " + mode)
        r = tool.ask("seal", "aes-gcm", "gateway", key.hex(), "-", mode, str(2 ** 64 - 2),
                     *[u.hex() for u in units + units[:1]])
        check(r == ["err"], "gcm counter wrap refused " + mode)
    r = tool.ask("open", "aes-gcm", "gateway", key.hex(), "-", str(2 ** 64 - 2),
                 *[w.hex() for w in want])
    check(r[0] == "ok", "gcm open up to 2^64-1")


def main():
    if not os.access(TOOL, os.X_OK):
        print("tc_tool not found at %s (set SNITUN_BUILD_DIR)" % TOOL)
        return 1
    rng = random.Random(int(os.environ.get("TC_SEED", "20250615")))
    tool = Tool()
    try:
        cbc_cases(tool, rng, 60)
        gcm_cases(tool, rng, 60)
        gcm_exhaustion(tool)
    finally:
        tool.close()
    r = subprocess.run([TOOL, "alloc-check"], capture_output=True, text=True)
    check(r.returncode == 0 and "allocations 0" in r.stdout, "alloc-check: " + r.stdout.strip())
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
