#!/usr/bin/env python3
"""Cross-check `snitun keygen` / `snitun token issue|inspect` against the
`cryptography` package's Fernet and MultiFernet (code not written here).

* keys from `snitun keygen` load in Fernet;
* tokens from `snitun token issue` decrypt with Fernet / MultiFernet and
  carry the claims that were asked for, in the reference's JSON shape;
* tokens made by Fernet (several keys, rotation, reference-shaped claims,
  every claim set of tests/data/fernet.json) get the reference's outcome
  from `snitun token inspect`;
* expired, tampered, foreign-key tokens exit 1 with a one-line reason;
  usage errors exit 2.

Environment: SNITUN_BIN (the binary), SNITUN_TEST_DATA (tests/data).
Prints one line per failure and ends with "N passed, M failed".
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import time

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

BIN = os.environ.get("SNITUN_BIN", "snitun")
DATA = os.environ.get("SNITUN_TEST_DATA",
                      os.path.join(os.path.dirname(__file__), "..", "data"))
NOW = 1750000000

passed = 0
failed = 0


def check(cond, what):
    global passed, failed
    if cond:
        passed += 1
    else:
        failed += 1
        print("FAIL:", what)


def run(*args, stdin=None, env=None):
    full_env = dict(os.environ)
    for k in list(full_env):
        if k.startswith("SNITUN_FERNET"):
            del full_env[k]
    full_env.update(env or {})
    p = subprocess.run([BIN, *args], input=stdin, capture_output=True, text=True,
                       env=full_env, timeout=30)
    return p.returncode, p.stdout, p.stderr


def keygen():
    rc, out, err = run("keygen")
    check(rc == 0 and err == "", f"keygen rc={rc} err={err!r}")
    return out.strip()


def issue(keys, *extra, env=None):
    args = ["token", "issue"]
    for k in keys:
        args += ["--fernet-key", k]
    rc, out, err = run(*args, *extra, env=env)
    check(rc == 0, f"issue {extra} rc={rc} err={err!r}")
    return json.loads(out) if rc == 0 else None


def inspect(keys, token, *extra, stdin=None):
    args = ["token", "inspect"]
    for k in keys:
        args += ["--fernet-key", k]
    return run(*args, *extra, token, stdin=stdin)


def test_keygen():
    keys = {keygen() for _ in range(5)}
    check(len(keys) == 5, "keygen gives different keys")
    for k in keys:
        check(len(k) == 44 and k.endswith("="), f"key shape {k!r}")
        check(len(base64.urlsafe_b64decode(k)) == 32, "32 raw bytes")
        Fernet(k)  # raises if cryptography refuses it
    rc, out, _ = run("keygen", "--help")
    check(rc == 0 and "usage: snitun keygen" in out, "keygen --help")
    rc, _, err = run("keygen", "--bogus")
    check(rc == 2 and "unknown flag '--bogus'" in err, f"keygen --bogus: {rc} {err!r}")


def test_issue_decrypts_with_fernet():
    k1, k2 = keygen(), keygen()
    before = int(time.time())
    out = issue([k1, k2], "--hostname", "myname.ui.nabu.casa",
                "--alias", "www.myname.ui.nabu.casa", "--alias", "alt.example.org",
                "--valid-for", "600", "--protocol-version", "1", "--cipher", "aes-gcm")
    after = int(time.time())
    token = out["token"].encode()
    # Encrypted with the FIRST key: k1 alone decrypts, k2 alone does not.
    plain = Fernet(k1).decrypt(token)
    try:
        Fernet(k2).decrypt(token)
        check(False, "second key must not decrypt")
    except InvalidToken:
        check(True, "")
    check(MultiFernet([Fernet(k2), Fernet(k1)]).decrypt(token) == plain, "MultiFernet")
    ts = Fernet(k1).extract_timestamp(token)
    check(before <= ts <= after, f"fernet timestamp {ts} in [{before}, {after}]")
    claims = json.loads(plain)
    check(list(claims) == ["valid", "hostname", "aes_key", "aes_iv", "protocol_version",
                           "cipher", "alias"], f"member order {list(claims)}")
    check(plain.decode().startswith('{"valid": '), "separators ', ' and ': '")
    check(claims["hostname"] == out["hostname"] == "myname.ui.nabu.casa", "hostname")
    check(claims["alias"] == out["alias"] == ["www.myname.ui.nabu.casa", "alt.example.org"],
          "alias")
    check(claims["valid"] == out["valid"] and before + 600 <= claims["valid"] <= after + 600,
          "valid = now + 600")
    check(claims["protocol_version"] == out["protocol_version"] == 1, "protocol_version")
    check(claims["cipher"] == out["cipher"] == "aes-gcm", "cipher")
    check(claims["aes_key"] == out["aes_key"] and len(bytes.fromhex(claims["aes_key"])) == 32,
          "aes_key 32 bytes")
    check(claims["aes_iv"] == out["aes_iv"] and len(bytes.fromhex(claims["aes_iv"])) == 16,
          "aes_iv 16 bytes")
    check(claims["aes_key"] == claims["aes_key"].lower(), "lower-case hex")


def test_issue_defaults_and_given_material():
    k = keygen()
    out = issue([k], "--hostname", "h.example", "--now", str(NOW),
                "--aes-key", "00112233445566778899aabbccddeeff",
                "--aes-iv", "0F0E0D0C0B0A09080706050403020100")
    token = out["token"].encode()
    claims = json.loads(Fernet(k).decrypt(token))
    # The reference generator's shape: no cipher member for aes-cbc, no alias.
    check(claims == {"valid": NOW + 3600, "hostname": "h.example",
                     "aes_key": "00112233445566778899aabbccddeeff",
                     "aes_iv": "0f0e0d0c0b0a09080706050403020100",
                     "protocol_version": 2}, f"default claims {claims}")
    check(out["cipher"] == "aes-cbc" and out["alias"] == [], "defaults in output")
    check(Fernet(k).extract_timestamp(token) == NOW, "--now sets the Fernet timestamp")
    # Fresh material each time when not given.
    a = issue([k], "--hostname", "h.example")
    b = issue([k], "--hostname", "h.example")
    check(a["aes_key"] != b["aes_key"] and a["aes_iv"] != b["aes_iv"], "fresh key and IV")
    check(a["token"] != b["token"], "fresh Fernet IV")


def test_keys_sources():
    k1, k2 = keygen(), keygen()
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write(f"# rotation list\n\n  {k2}  \n# old\n{k1}\n")
        path = f.name
    try:
        out = issue([], "--fernet-keys-file", path, "--hostname", "f.example")
        Fernet(k2).decrypt(out["token"].encode())
        check(True, "")
        out = issue([], "--hostname", "e.example", env={"SNITUN_FERNET_KEYS": f"{k1},{k2}"})
        Fernet(k1).decrypt(out["token"].encode())
        out = issue([], "--hostname", "e.example", env={"SNITUN_FERNET_KEYS_FILE": path})
        Fernet(k2).decrypt(out["token"].encode())
        # Inspect with the file accepts a token of either key.
        for k, idx in ((k2, 0), (k1, 1)):
            tok = Fernet(k).encrypt_at_time(json.dumps(
                {"valid": NOW + 10, "hostname": "x", "aes_key": "00" * 32,
                 "aes_iv": "00" * 16}).encode(), NOW).decode()
            rc, out, err = run("token", "inspect", "--fernet-keys-file", path, "--now",
                               str(NOW), tok)
            check(rc == 0 and json.loads(out)["key_index"] == idx,
                  f"inspect with keys file: {rc} {err!r}")
    finally:
        os.unlink(path)
    rc, _, err = run("token", "issue", "--fernet-keys-file", "/nonexistent", "--hostname", "x")
    check(rc == 1 and "/nonexistent" in err, f"missing keys file: {rc} {err!r}")


def make(key, claims, at=NOW):
    if isinstance(claims, (dict, list)):
        claims = json.dumps(claims)
    if isinstance(claims, str):
        claims = claims.encode()
    return Fernet(key).encrypt_at_time(claims, at).decode()


def test_fernet_tokens_rotation():
    k1, k2, k3 = keygen(), keygen(), keygen()
    claims = {"valid": NOW + 3600.5, "hostname": "myname.ui.nabu.casa",
              "aes_key": "00112233445566778899aabbccddeeff102132435465768798a9babbdcddfeef",
              "aes_iv": "0f0e0d0c0b0a09080706050403020100", "protocol_version": 2}
    # MultiFernet encrypts with its first key; the gateway tries its keys in order.
    for master, index in (([k1, k3], 0), ([k2, k1], 1)):
        tok = MultiFernet([Fernet(k) for k in master]).encrypt_at_time(
            json.dumps(claims).encode(), NOW).decode()
        rc, out, err = inspect([k1, k2], tok, "--now", str(NOW))
        check(rc == 0, f"rotation {index}: {rc} {err!r}")
        if rc == 0:
            got = json.loads(out)
            check(got["key_index"] == index, f"key_index {got['key_index']} != {index}")
            check(got["fernet_timestamp"] == NOW, "fernet_timestamp")
            check(got["hostname"] == claims["hostname"] and got["alias"] == [], "names")
            check(got["valid"] == claims["valid"], "fractional valid")
            check(got["aes_key"] == claims["aes_key"] and got["aes_iv"] == claims["aes_iv"],
                  "key material")
            check(got["cipher"] == "aes-cbc" and got["protocol_version"] == 2, "cipher/version")
    # MultiFernet.rotate re-encrypts an old token under the new first key.
    old = make(k3, claims)
    new = MultiFernet([Fernet(k1), Fernet(k3)]).rotate(old.encode()).decode()
    rc, out, _ = inspect([k1], new, "--now", str(NOW))
    check(rc == 0, "rotated token accepted")
    rc, _, err = inspect([k1, k2], old, "--now", str(NOW))
    check(rc == 1 and err.count("\n") == 1 and "bad_mac" in err,
          f"unknown key rejected with one line: {rc} {err!r}")
    # Token from stdin, with a trailing newline.
    rc, out, err = inspect([k1], "-", "--now", str(NOW), stdin=new + "\n")
    check(rc == 0, f"token from stdin: {rc} {err!r}")


def test_rejections():
    k = keygen()
    good = {"valid": NOW, "hostname": "h", "aes_key": "00" * 32, "aes_iv": "00" * 16}
    tok = make(k, good)
    rc, _, _ = inspect([k], tok, "--now", str(NOW))
    check(rc == 0, "valid == now accepted")
    cases = [
        ("expired", tok, ["--now", str(NOW + 1)]),
        ("bad_mac", tok[:-6] + ("A" if tok[-6] != "A" else "B") + tok[-5:], ["--now", str(NOW)]),
        ("bad_base64", tok[:-1], []),
        ("bad_length", base64.urlsafe_b64encode(b"\x80" + b"\0" * 60).decode(), []),
        ("bad_version", base64.urlsafe_b64encode(
            b"\x81" + base64.urlsafe_b64decode(tok)[1:]).decode(), []),
        ("not_json", make(k, "this is not json"), []),
        ("not_utf8", make(k, b"\xff\xfe{}"), []),
        ("not_object", make(k, [1, 2, 3]), []),
        ("hostname_not_string", make(k, dict(good, hostname=5)), ["--now", str(NOW)]),
        ("bad_protocol_version", make(k, dict(good, protocol_version=-1)), ["--now", str(NOW)]),
        ("aes_key_bad_size", make(k, dict(good, aes_key="00" * 31)), ["--now", str(NOW)]),
    ]
    for reason, token, extra in cases:
        rc, out, err = inspect([k], token, *extra)
        check(rc == 1 and out == "" and err.count("\n") == 1 and
              f"rejected: {reason}:" in err, f"{reason}: rc={rc} err={err!r}")
        check(k not in err, "the key is never printed")


def test_vector_claims():
    """Every claim set of fernet.json, re-encrypted by Fernet with K1, gets the
    reference's outcome from inspect at the vectors' clock."""
    with open(os.path.join(DATA, "fernet.json")) as f:
        doc = json.load(f)
    k1 = doc["keys"]["K1"]["key_b64url"]
    k2 = doc["keys"]["K2"]["key_b64url"]
    transports = {"CBCCryptoTransport": "aes-cbc", "GCMCryptoTransport": "aes-gcm",
                  "GCMSIVCryptoTransport": "aes-gcm-siv"}
    for case in doc["cases"]:
        name, sr = case["name"], case["server_result"]
        # The vector token itself, exactly as sent.
        rc, out, err = inspect([k1, k2], case["token"], "--now", str(doc["now_unix"]))
        want_ok = sr["outcome"] == "accepted"
        if name == "cipher_aes_gcm_siv" and rc == 0:
            want_ok = True  # this OpenSSL has AES-GCM-SIV; the reference's lacked it
        check((rc == 0) == want_ok, f"vector {name}: rc={rc} err={err!r}")
        if rc == 0 and "hostname" in sr:
            got = json.loads(out)
            check(got["hostname"] == sr["hostname"] and got["alias"] == sr["alias"],
                  f"{name}: names")
            check(got["protocol_version"] == sr["protocol_version"], f"{name}: version")
            check(got["cipher"] == transports[sr["crypto_transport"]], f"{name}: cipher")
        elif rc == 0:
            check(json.loads(out)["cipher"] == "aes-gcm-siv", f"{name}: siv")
        else:
            check(rc == 1 and err.count("\n") == 1, f"{name}: one-line reason {err!r}")


def test_usage_errors():
    k = keygen()
    rows = [
        (["token", "issue", "--fernet-key", k], "--hostname is required"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--valid-for", "abc"],
         "--valid-for must be an integer in 1..315360000, got 'abc'"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--protocol-version", "3"],
         "--protocol-version must be an integer in 0..2, got '3'"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--cipher", "rot13"],
         "--cipher must be aes-cbc, aes-gcm or aes-gcm-siv, got 'rot13'"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--aes-key", "0011"],
         "--aes-key must be 16, 24 or 32 bytes in hex"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--aes-iv", "zz" * 16],
         "--aes-iv must be 16 bytes in hex"),
        (["token", "issue", "--fernet-key", k, "--hostname", ""],
         "--hostname must be a non-empty UTF-8 name"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--alias", "\udcff"],
         "--alias must be a non-empty UTF-8 name"),
        (["token", "issue", "--fernet-key", "not-a-key", "--hostname", "x"],
         "--fernet-key #1 is not a Fernet key"),
        (["token", "issue", "--hostname", "x"], "no Fernet key"),
        (["token", "issue", "--fernet-key", k, "--hostname", "x", "--bogus"],
         "unknown flag '--bogus'"),
        (["token", "inspect", "--fernet-key", k], "missing argument TOKEN"),
        (["token", "frobnicate"], "unknown action 'frobnicate'"),
        (["token"], "usage: snitun token"),
    ]
    for args, msg in rows:
        rc, out, err = run(*args)
        check(rc == 2 and msg in err and out == "", f"{args[1:]}: rc={rc} err={err!r}")
        check(k not in err, "the key is never printed")
    for args in (["token", "--help"], ["token", "issue", "--help"],
                 ["token", "inspect", "--help"]):
        rc, out, err = run(*args)
        check(rc == 0 and out.startswith("usage: snitun token") and err == "", f"{args} help")


def main():
    for test in (test_keygen, test_issue_decrypts_with_fernet,
                 test_issue_defaults_and_given_material, test_keys_sources,
                 test_fernet_tokens_rotation, test_rejections, test_vector_claims,
                 test_usage_errors):
        try:
            test()
        except Exception as exc:  # a crash in one test is one failure
            check(False, f"{test.__name__}: {type(exc).__name__}: {exc}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
