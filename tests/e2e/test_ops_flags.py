#!/usr/bin/env python3
"""Data-path flags of `snitun server` and `snitun client`: --splice,
--batch, --max-channel-queue, --max-tunnel-queue.

- every bad value is refused before anything starts: exit status 2, one
  line on stderr naming the flag, nothing on stdout;
- the same values from the environment (SNITUN_*, SNITUN_CLIENT_*) are
  checked the same way;
- good values reach the gateway's start line (which is how an operator
  sees what runs).
"""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2elib as L  # noqa: E402


def check(cond, what):
    if not cond:
        raise AssertionError(what)


SERVER = [L.BIN, "server", "--listen", "127.0.0.1:9", "--fernet-key", L.K1, "--threads", "1"]
CLIENT = [L.BIN, "client", "--server", "127.0.0.1:9", "--endpoint", "127.0.0.1:9",
          "--token", "gAAAA", "--aes-key", L.AES_KEY[:32], "--aes-iv", L.AES_IV]

BAD = [
    (SERVER, ["--splice", "sometimes"], "--splice"),
    (SERVER, ["--batch", "maybe"], "--batch"),
    (SERVER, ["--max-channel-queue", "1000"], "--max-channel-queue"),
    (SERVER, ["--max-tunnel-queue", "4194303"], "--max-tunnel-queue"),
    (SERVER, ["--max-tunnel-queue", "-1"], "--max-tunnel-queue"),
    (CLIENT, ["--splice", "yes please"], "--splice"),
    (CLIENT, ["--batch", "2"], "--batch"),
]

BAD_ENV = [
    (SERVER, {"SNITUN_SPLICE": "never"}, "--splice"),
    (SERVER, {"SNITUN_MAX_TUNNEL_QUEUE": "12"}, "--max-tunnel-queue"),
    (CLIENT, {"SNITUN_CLIENT_BATCH": "sometimes"}, "--batch"),
]


def refused(argv, env=None):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                       env=dict(os.environ, **(env or {})))
    return r.returncode, r.stdout, r.stderr


def bad_values():
    for base, extra, flag in BAD:
        rc, out, err = refused(base + extra)
        check(rc == 2 and out == "" and flag in err and len(err.splitlines()) == 1,
              "%s: exit %d, stderr %r" % (extra, rc, err))
    for base, env, flag in BAD_ENV:
        rc, out, err = refused(base, env)
        check(rc == 2 and out == "" and flag in err, "%s: exit %d, stderr %r" % (env, rc, err))


def start_line(extra, env=None):
    port = L.free_port()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        gw = L.Gateway([("listen", "127.0.0.1:%d" % port)], extra=extra)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        lines = [ln for ln in gw.text().splitlines() if 'msg="gateway started"' in ln]
        check(len(lines) == 1, "one start line: %r" % lines)
        return dict(re.findall(r"(\w+)=(\S+)", lines[0]))
    finally:
        check(gw.stop() == 0, "gateway exit status")
        gw.cleanup()


def good_values():
    kv = start_line([])
    check(kv.get("splice") == "auto" and kv.get("batch") == "on", "defaults: %r" % kv)
    check(kv.get("max_channel_queue") == "0" and kv.get("max_tunnel_queue") == "268435456",
          "default queues: %r" % kv)
    kv = start_line(["--splice", "off", "--batch", "off", "--max-channel-queue", "8388608",
                     "--max-tunnel-queue", "0"])
    check((kv.get("splice"), kv.get("batch"), kv.get("max_channel_queue"),
           kv.get("max_tunnel_queue")) == ("off", "off", "8388608", "0"), "flags: %r" % kv)
    kv = start_line([], {"SNITUN_SPLICE": "on", "SNITUN_MAX_TUNNEL_QUEUE": "4194304"})
    check(kv.get("splice") == "on" and kv.get("max_tunnel_queue") == "4194304",
          "environment: %r" % kv)


def main():
    r = L.Runner()
    r.run("bad values refused with exit 2 and the flag's name", bad_values)
    r.run("values shown in the gateway's start line", good_values)
    r.finish()


if __name__ == "__main__":
    main()
