#!/usr/bin/env python3
"""bench/report.py - Markdown table and gnuplot PNGs from a run's JSON.

    python3 bench/report.py bench/results/run-YYYYmmdd-HHMMSS.json [OUT_DIR]

writes OUT_DIR/latest.md and OUT_DIR/<scenario>.png (OUT_DIR defaults to
the JSON's directory). bench/harness.py calls build() after every run.
"""

import json
import os
import subprocess
import sys

FORWARDERS = ("gateway", "client", "haproxy")


def fmt(v, digits=None):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if digits is not None:
            return f"{v:.{digits}f}"
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def times(v):
    return "n/a" if v is None else f"×{v:.2f}"


def cpu_cols(m, key, names):
    d = (m or {}).get(key) or {}
    return [fmt(d.get(n)) if d.get(n) is not None else "–" for n in names]


def extra_head(unit):
    return [f"forwarder CPU-s/{unit}", "other CPU %"]


def extra_cols(m):
    """Forwarder CPU (gateway + client, or haproxy) per unit, and the share
    of machine CPU used by processes outside the sitting (noise)."""
    o = m.get("other_cpu_share")
    return [fmt(m.get("fwd_cpu")), "n/a" if o is None else f"{100 * o:.0f}"]


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def relevant(sc, key, cand):
    """CPU columns worth showing: the processes that spent something."""
    seen = set()
    for m in (sc.get("median") or {}).values():
        for n, v in ((m or {}).get(key) or {}).items():
            if v and v > 0:
                seen.add(n)
    return [n for n in cand if n in seen]


def rounds_line(sc, primary):
    parts = []
    for t in sc.get("targets", []):
        vals = [fmt((m or {}).get(primary)) for m in sc["rounds"].get(t, [])]
        parts.append(f"{t} [{', '.join(vals)}]")
    return f"Rounds ({primary}): " + "; ".join(parts)


def ratio_line(sc):
    parts = []
    for name, d in (sc.get("ratios") or {}).items():
        parts.append(f"{name}: " + ", ".join(f"{k} {times(v)}" for k, v in d.items()
                                             if v is not None))
    return ("Ratios (median/median): " + "; ".join(parts)) if parts else None


def spliced_line(sc):
    """How much of the payload the pair moved with splice(2) (their
    snitun_spliced_bytes_total against the bytes they relayed)."""
    share = ((sc.get("median") or {}).get("snitun") or {}).get("spliced_share")
    if not isinstance(share, dict):
        return None
    parts = [f"{proc} {100 * v:.1f} %" for proc, v in share.items() if v is not None]
    return ("Spliced instead of copied (snitun, share of the payload bytes each process "
            "relayed, median): " + ", ".join(parts)) if parts else None


def skipped_line(sc):
    sk = sc.get("skipped") or {}
    return ("Not measured: " + "; ".join(f"{k}: {v}" for k, v in sk.items())) if sk else None


def md_wrk(sc):
    bulk = sc["median"] and any((m or {}).get("mib_per_s", 0) > 500 for m in sc["median"].values())
    ckey, clabel = ("cpu_per_gib", "CPU-s/GiB") if bulk else ("cpu_per_10k_req", "CPU-s/10k req")
    names = relevant(sc, ckey, FORWARDERS + ("nginx", "load"))
    head = ["path", "req/s", "MiB/s", "p50 ms", "p99 ms", "errors"] + \
        [f"{clabel} {n if n != 'load' else 'wrk'}" for n in names] + \
        extra_head("GiB" if bulk else "10k req")
    rows = []
    for t in sc["targets"]:
        m = sc["median"].get(t)
        if not m:
            rows.append([t] + ["n/a"] * (len(head) - 1))
            continue
        rows.append([t, fmt(m["rps"]), fmt(m["mib_per_s"]), fmt(m["lat_p50_ms"]),
                     fmt(m["lat_p99_ms"]), fmt(m["errors"])] + cpu_cols(m, ckey, names) +
                    extra_cols(m))
    return table(head, rows), ("mib_per_s" if bulk else "rps")


def md_stream(sc):
    names = relevant(sc, "cpu_per_gib", FORWARDERS + ("sink", "load"))
    head = ["path", "GiB/s"] + [f"CPU-s/GiB {n if n != 'load' else 'loadgen'}" for n in names] \
        + extra_head("GiB")
    rows = []
    for t in sc["targets"]:
        m = sc["median"].get(t)
        rows.append([t, fmt(m["gib_per_s"])] + cpu_cols(m, "cpu_per_gib", names) +
                    extra_cols(m) if m
                    else [t] + ["n/a"] * (len(head) - 1))
    return table(head, rows), "gib_per_s"


def md_rate(sc):
    names = relevant(sc, "cpu_per_10k", FORWARDERS + ("sink", "load"))
    head = ["path", "channels/s", "open p50 µs", "open p99 µs", "errors"] + \
        [f"CPU-s/10k ch {n if n != 'load' else 'loadgen'}" for n in names] + \
        extra_head("10k ch")
    rows = []
    for t in sc["targets"]:
        m = sc["median"].get(t)
        rows.append([t, fmt(m["channels_per_s"]), fmt(m["open_us_p50"]), fmt(m["open_us_p99"]),
                     fmt(m["errors"])] + cpu_cols(m, "cpu_per_10k", names) + extra_cols(m) if m
                    else [t] + ["n/a"] * (len(head) - 1))
    return table(head, rows), "channels_per_s"


def md_idle(sc):
    head = ["test", "tunnels ready", "channels", "connect time s", "tunnels/s", "channels/s",
            "gateway RSS start MiB", "RSS with tunnels MiB", "KiB/tunnel",
            "RSS with channels MiB", "KiB/channel", "gateway CPU ms/tunnel"]
    rows = []
    for name, r in (sc.get("results") or {}).items():
        t, c = r.get("tunnels", {}), r.get("channels")
        mib = lambda k: fmt(r[k] / 1024, 1) if r.get(k) is not None else "–"  # noqa: E731
        rows.append([
            name, f"{t.get('ready')}/{t.get('tunnels')}",
            f"{c['channels']}/{c['target']}" if c else "–",
            fmt(t.get("seconds")) + (f" + {fmt(c['seconds'])}" if c else ""),
            fmt(t.get("per_s")), fmt(c.get("per_s")) if c else "–", mib("rss_start_kib"), mib("rss_tunnels_kib"),
            fmt(r.get("rss_per_tunnel_kib")), mib("rss_channels_kib"),
            fmt(r.get("rss_per_channel_kib")) if c else "–",
            fmt(r.get("gateway_cpu_ms_per_tunnel")) if "gateway_cpu_ms_per_tunnel" in r else
            fmt(r.get("gateway_cpu_tunnels_s", 0) * 1e3 / max(t.get("ready") or 1, 1))])
    return table(head, rows), None


def ablation_rows(sc, head, cells):
    """One row per variant: cells(median) after its name, n/a when it has
    no median."""
    rows = []
    for t in sc.get("targets", []):
        m = sc["median"].get(t)
        rows.append([t] + (cells(m) if m else ["n/a"] * (len(head) - 1)))
    return rows


def md_ablation(sc):
    if sc.get("probe") == "rate":
        head = ["variant", "channels/s", "open p99 µs", "gateway CPU-s/10k channels",
                "client CPU-s/10k channels"]

        def cells(m):
            c = m.get("rate_cpu_per_10k") or {}
            return [fmt(m.get("rate_cps")), fmt(m.get("rate_p99_us")),
                    fmt(c.get("gateway")), fmt(c.get("client"))]
        return table(head, ablation_rows(sc, head, cells)), "rate_cps"
    head = ["variant", "HTTPS req/s", "HTTPS p99 ms", "raw GiB/s",
            "gateway CPU-s/10k req", "client CPU-s/10k req", "gateway CPU-s/GiB",
            "client CPU-s/GiB"]

    def cells(m):
        h, r = m.get("https_cpu_per_10k_req") or {}, m.get("raw_cpu_per_gib") or {}
        return [fmt(m.get("https_rps")), fmt(m.get("https_p99_ms")), fmt(m.get("raw_gib_per_s")),
                fmt(h.get("gateway")), fmt(h.get("client")), fmt(r.get("gateway")),
                fmt(r.get("client"))]
    return table(head, ablation_rows(sc, head, cells)), "https_rps"


RENDER = {"wrk": md_wrk, "stream": md_stream, "rate": md_rate, "idle": md_idle,
          "ablation": md_ablation}


# -- plots ---------------------------------------------------------------------

def datablock(name, cols, rows):
    lines = [f"${name} << EOD", " ".join(f'"{c}"' for c in cols)]
    for label, vals in rows:
        lines.append(f'"{label}" ' + " ".join("NaN" if v is None else repr(float(v))
                                             for v in vals))
    lines.append("EOD")
    return "\n".join(lines)


def bars(name, title, ylabel, cols, rows, log=False):
    """One clustered-bar panel: rows = [(label, [value per col])]. log: a
    logarithmic y axis (latency tails are 10-100x the medians)."""
    return "\n".join([
        datablock(name, ["path"] + cols, rows),
        f'set title "{title}"', f'set ylabel "{ylabel}"',
        "set logscale y; set yrange [*:*]" if log else "unset logscale y; set yrange [0:*]",
        "set key top right" if len(cols) > 1 else "unset key",
        f"plot for [i=2:{len(cols) + 1}] ${name} using i:xtic(1) title columnheader(i)",
    ])


def plot(png, panels):
    script = "\n".join([
        f"set terminal pngcairo size {max(620 * len(panels), 760)},440 font 'sans,10'",
        f"set output '{png}'",
        "set style data histogram", "set style histogram clustered gap 1",
        "set style fill solid 0.85 border -1", "set boxwidth 0.9",
        "set key top right", "set grid ytics",
        f"set multiplot layout 1,{len(panels)}",
    ] + panels + ["unset multiplot"])
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True,
                       capture_output=True, timeout=60)
        return True
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", "") or str(e)
        print(f"report: gnuplot failed for {png}: {err[-300:]}", file=sys.stderr)
        return False


def plot_scenario(key, sc, out_dir):
    kind, med = sc["kind"], sc.get("median") or {}
    targets = [t for t in sc.get("targets", []) if med.get(t)]
    if not targets:
        return None
    png = os.path.join(out_dir, f"{key}.png")
    g = lambda t, k: (med[t] or {}).get(k)  # noqa: E731
    if kind == "wrk":
        thr = "mib_per_s" if key == "bulk" else "rps"
        panels = [
            bars("thr", sc["title"], "MiB/s" if thr == "mib_per_s" else "requests/s",
                 ["median"], [(t, [g(t, thr)]) for t in targets]),
            bars("lat", "latency (wrk, log scale)", "ms", ["p50", "p90", "p99"],
                 [(t, [g(t, "lat_p50_ms"), g(t, "lat_p90_ms"), g(t, "lat_p99_ms")])
                  for t in targets], log=True),
        ]
    elif kind == "stream":
        names = [n for n in FORWARDERS if any((g(t, "cpu_per_gib") or {}).get(n) for t in targets)]
        panels = [bars("thr", sc["title"], "GiB/s", ["median"],
                       [(t, [g(t, "gib_per_s")]) for t in targets])]
        if names:
            panels.append(bars("cpu", "forwarder CPU per GiB", "CPU-s/GiB", names,
                               [(t, [(g(t, "cpu_per_gib") or {}).get(n) for n in names])
                                for t in targets]))
    elif kind == "rate":
        panels = [
            bars("thr", sc["title"], "channels/s", ["median"],
                 [(t, [g(t, "channels_per_s")]) for t in targets]),
            bars("lat", "open latency, connect to first echoed byte (log scale)", "µs",
                 ["p50", "p90", "p99"],
                 [(t, [g(t, "open_us_p50"), g(t, "open_us_p90"), g(t, "open_us_p99")])
                  for t in targets], log=True),
        ]
    elif kind == "ablation" and sc.get("probe") == "rate":
        panels = [
            bars("thr", sc["title"], "channels/s", ["16 workers"],
                 [(t, [g(t, "rate_cps")]) for t in targets]),
            bars("lat", "open latency p99", "µs", ["p99"],
                 [(t, [g(t, "rate_p99_us")]) for t in targets]),
        ]
    elif kind == "ablation":
        panels = [
            bars("thr", sc["title"], "requests/s", ["HTTPS keep-alive"],
                 [(t, [g(t, "https_rps")]) for t in targets]),
            bars("raw", "raw stream / HTTPS p99", "GiB/s | ms", ["raw GiB/s", "HTTPS p99 ms"],
                 [(t, [g(t, "raw_gib_per_s"), g(t, "https_p99_ms")]) for t in targets]),
        ]
    else:
        return None
    return png if plot(png, panels) else None


def plot_idle(sc, out_dir):
    res = sc.get("results") or {}
    rows = []
    if "idle" in res:
        rows.append(("idle tunnel", [res["idle"].get("rss_per_tunnel_kib")]))
    if "channels" in res:
        rows.append(("tunnel (100 x 100 test)", [res["channels"].get("rss_per_tunnel_kib")]))
        rows.append(("open channel", [res["channels"].get("rss_per_channel_kib")]))
    if not rows:
        return None
    png = os.path.join(out_dir, "idle.png")
    t = (res.get("idle") or {}).get("tunnels") or {}
    title = sc["title"] + (f" ({t.get('ready')} tunnels in {fmt(t.get('seconds'))} s)" if t else "")
    return png if plot(png, [bars("mem", title, "gateway VmRSS KiB per item", ["gateway"], rows)]) \
        else None


# -- the document --------------------------------------------------------------

def summary(doc):
    rows = []
    for key, sc in doc["scenarios"].items():
        if sc.get("kind") not in ("wrk", "stream", "rate"):
            continue
        r = sc.get("ratios") or {}
        d, h = r.get("snitun/direct") or {}, r.get("snitun/haproxy") or {}
        prim = next(iter(d or h), None)
        lat = next((k for k in (d or h) if "p99" in k), None)
        rows.append([sc["title"], prim or "–", times(d.get(prim)) if prim else "n/a",
                     times(h.get(prim)) if prim else "n/a",
                     times(d.get(lat)) if lat else "–", times(h.get(lat)) if lat else "–",
                     times(h.get("fwd_cpu")) if "fwd_cpu" in h else "–"])
    return table(["scenario", "metric", "snitun / direct", "snitun / haproxy",
                  "p99 vs direct", "p99 vs haproxy", "forwarder CPU vs haproxy"], rows)


def build(json_path, out_dir=None):
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    with open(json_path) as f:
        doc = json.load(f)
    meta = doc["meta"]
    v = meta.get("versions", {})
    lines = [
        f"# snitun benchmark ({meta.get('mode')} run, {meta.get('date')})", "",
        f"Data: `{os.path.basename(json_path)}`; git `{meta.get('git')}`; "
        f"{meta.get('cpus')} CPUs ({meta.get('cpu')}), kernel {meta.get('kernel')}; "
        f"nginx {v.get('nginx')}, HAProxy {v.get('haproxy')}, wrk {v.get('wrk')}, "
        f"OpenSSL {v.get('openssl')}. Took {meta.get('elapsed_s')} s.", "",
        f"Setup: {meta.get('layout')}. HTTPS name `{meta.get('https_name')}` "
        f"({meta.get('hosts')}). snitun: {meta.get('snitun')}. "
        f"Rounds per comparison: {meta.get('profile', {}).get('rounds')}, paths alternated "
        "(order rotated per round); tables show medians over the rounds.", "",
        "Paths: **snitun** = device → gateway → tunnel → client → endpoint; **haproxy** = "
        "device → HAProxy (SNI passthrough, `mode tcp`) → endpoint; **direct** = device → "
        "endpoint. CPU columns are CPU-seconds (utime+stime from /proc/PID/stat) spent by "
        "that process during the measurement, divided by the work done; `load` is the load "
        "tool itself. Everything shares the same cores, so the load tool, nginx and the "
        "forwarders compete for CPU.", "",
        "## Summary (snitun relative to the baselines, medians)", "",
    ]
    lines += summary(doc) + [""]
    for key, sc in doc["scenarios"].items():
        lines += [f"## {key}: {sc.get('title')}", ""]
        if sc.get("load"):
            lines += [f"Load: `{sc['load']}`", ""]
        if sc.get("note"):
            lines += [f"Note: {sc['note']}", ""]
        render = RENDER.get(sc.get("kind"))
        if render and (sc.get("targets") or sc.get("results")):
            tbl, primary = render(sc)
            lines += tbl + [""]
            if primary and sc.get("rounds"):
                lines += [rounds_line(sc, primary), ""]
        for extra in (ratio_line(sc), spliced_line(sc), skipped_line(sc)):
            if extra:
                lines += [extra, ""]
        png = plot_idle(sc, out_dir) if sc.get("kind") == "idle" else \
            plot_scenario(key, sc, out_dir)
        if png:
            lines += [f"![{key}]({os.path.basename(png)})", ""]
    md = os.path.join(out_dir, "latest.md")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    return md


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(build(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
