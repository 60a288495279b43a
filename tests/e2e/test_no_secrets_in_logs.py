"""tests/e2e/test_no_secrets_in_logs.py - tokens, keys and challenge bytes
never reach a log line, at any level.

Gateway and client run at --log-level debug (both formats) while a tunnel
comes up, a request goes through, a bad token and a wrong key are refused,
and the client reconnects once. Then every line of both logs is searched
for the Fernet key (base64url and hex of both halves), the token (whole and
any 32-character piece of it), and the tunnel's AES key and IV (hex, both
cases, and base64). Nothing may match.
"""

import base64
import json
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import syslib as sl  # noqa: E402

TMP = sl.el.tmpdir()
CERT, KEY = sl.make_cert(TMP)
DOCROOT = os.path.join(TMP, "www")
FILES = sl.make_files(DOCROOT, [65536])
CTX = sl.ssl_context(CERT)


def secrets_of(tok):
    """Every spelling of a secret that a careless log line could carry."""
    out = []
    fkey = sl.FKEY
    raw = base64.urlsafe_b64decode(fkey)
    out += [fkey, fkey.rstrip("="), raw.hex(), raw[:16].hex(), raw[16:].hex()]
    t = tok["token"]
    out += [t] + [t[i:i + 32] for i in range(0, len(t) - 32, 16)]
    for name in ("aes_key", "aes_iv"):
        b = bytes.fromhex(tok[name])
        out += [tok[name].lower(), tok[name].upper(), base64.b64encode(b).decode(),
                base64.urlsafe_b64encode(b).decode()]
    return [s for s in out if len(s) >= 16]


def scenario(io, fmt):
    host = sl.name("secrets-%s-%s" % (io, fmt))
    ep = sl.Nginx(TMP, CERT, KEY, docroot=DOCROOT, workers=1, label="ep")
    try:
        with sl.Group() as g:
            gw = g.add(sl.Gateway(io, log_level="debug",
                                  extra=["--log-format", fmt, "--handshake-timeout", "2"]))
            tokpath = os.path.join(TMP, "tok-%s-%s.json" % (io, fmt))
            with open(tokpath, "w") as f:
                f.write(sl.token_json(host))
            with open(tokpath) as f:
                tok = json.load(f)
            cl = g.add(sl.Client(io, gw.server, ep.addr(), ("--token-file", tokpath),
                                 log_level="debug",
                                 extra=["--log-format", fmt, "--backoff-min", "1",
                                        "--backoff-max", "1"]))
            cl.wait_connected()
            res = sl.https_get(host, gw.sni_port, "/65536.bin", CTX)
            sl.expect_file(res, FILES, "/65536.bin")
            # refusals log at their own level: a token under an unknown key
            # (its bytes must not be echoed) and a wrong challenge answer.
            stranger = subprocess.run([sl.BIN, "keygen"], check=True, capture_output=True,
                                      text=True).stdout.strip()
            other = sl.el.issue_token(host, fernet_key=stranger)
            for payload in (other, tok["token"][:-8] + "AAAAAAA=", tok["token"] + "garbage!"):
                s = socket.create_connection(("127.0.0.1", gw.peer_port), timeout=5)
                s.sendall(payload.encode())
                s.settimeout(5)
                try:
                    s.recv(64)
                except OSError:
                    pass
                s.close()
            # a reconnect re-reads the token file and logs the new session
            gw_text_before = gw.text()
            gw.stop()
            g.items.remove(gw)
            gw2 = g.add(gw.restart())
            cl.wait_connected(count=2, timeout=20)
            texts = {"gateway": gw_text_before + gw2.text(), "client": cl.text()}
        for who, text in texts.items():
            assert text.strip(), "%s wrote no log lines" % who
            for line in text.splitlines():
                if fmt == "json" and line.startswith("{"):
                    json.loads(line)
                for s in secrets_of(tok):
                    assert s not in line, "%s log carries a secret (%s...): %s" % (
                        who, s[:6], line[:200])
        debug = sum(1 for t in texts.values() for ln in t.splitlines() if "debug" in ln)
        assert debug > 0, "no debug lines were written: the test would prove nothing"
    finally:
        ep.stop()


def main():
    r = sl.Runner()
    for io in sl.engines():
        for fmt in ("logfmt", "json"):
            r.run("no secret in %s logs at debug level [%s]" % (fmt, io), scenario, io, fmt)
    sl.el.rmtree(TMP)
    r.finish()


if __name__ == "__main__":
    main()
