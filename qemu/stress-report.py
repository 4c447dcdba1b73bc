#!/usr/bin/env python3
"""Turn qemu/stress.sh's results into a markdown report and an SVG plot.

    qemu/stress-report.py DIR

reads DIR/stress.txt (the guests' `STRESS key=value ...` lines, each prefixed by stress.sh with
stack=, config=, guest= and status=, plus `DAEMON ...` lease metrics lines) and DIR/meta.txt, and
writes DIR/results.md and DIR/results.svg. Standard library only.
"""

import math
import os
import sys
from xml.sax.saxutils import escape

COLOURS = {"leasefsd": "#2166ac", "virtiofsd": "#e6862e"}
LIGHT = {"leasefsd": "#9ecae1", "virtiofsd": "#fdd0a2"}


def parse_kv(tokens):
    d = {}
    for t in tokens:
        if "=" in t:
            k, v = t.split("=", 1)
            d[k] = v
    return d


def load(path):
    """{run key: {"meta": {...}, "total": {...}, "kinds": [...], "daemon": str}} in file order."""
    runs = {}
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("STRESS "):
                d = parse_kv(line.split(" ")[1:])
            elif line.startswith("DAEMON "):
                head, _, rest = line.partition(" leases: ")
                d = parse_kv(head.split(" ")[1:])
                d["kind"] = "daemon"
                d["text"] = "leases: " + rest
            else:
                continue
            key = (d.get("stack", "?"), d.get("config", "?"), d.get("guest", ""))
            r = runs.setdefault(key, {"meta": {k: d.get(k, "") for k in ("stack", "config", "guest", "status")},
                                      "total": None, "kinds": [], "daemon": None})
            if d.get("kind") == "run":
                r["meta"]["status"] = d.get("status", "")
            elif d.get("kind") == "total":
                r["total"] = d
            elif d.get("kind") == "daemon":
                r["daemon"] = d["text"]
            else:
                r["kinds"].append(d)
    return runs


def fnum(v):
    """'inf' -> inf, '-'/missing -> None, else float."""
    if v is None or v in ("-", ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def fms(v, cap=None):
    x = fnum(v)
    if x is None:
        return "-"
    if math.isinf(x):
        return f">{cap}" if cap else "never"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}"


def daemon_of(config):
    return "virtiofsd" if config.startswith("virtiofsd") else "leasefsd"


def run_label(key):
    stack, config, guest = key
    return f"{stack} / {config}" + (f" / guest {guest}" if guest else "")


def late_key(total, prefix):
    """The late namespace look's keys (…_50ms normally)."""
    late = total.get("late_ms", "50")
    return f"{prefix}_{late}ms", late


def markdown(runs, meta):
    lines = ["# Coherency stress: host writers, guest readers (guest-tests stress)", ""]
    for m in meta:
        lines.append(f"- {m}")
    lines.append("")
    lines.append(
        "Each run is one fresh VM. The guest primes its caches, asks the host agent for one change, and "
        "looks only after the agent replied, i.e. after the host system calls returned. **Data** answers "
        "(read(2) on a descriptor kept open, open + fstat + read, stat(2) size after overwrite/append/"
        "truncate; open of a replaced or removed name) must show the new state at once: any old byte, "
        "old size, or successful open of a removed name is a *stale data read*. **Namespace** answers "
        "(stat(2) of a replaced or removed name, a created name, chmod mode, mtime, readdir listings) are "
        "counted at 0 ms and again at 50 ms after the reply; a stock guest may see them late by up to the "
        "lease (docs/coherency.md, guarantee 3). *Revocation latency*: how long after the reply the guest "
        "first saw the new state (polled every 1 ms, up to the max wait; `>2000` = never). *Hold*: how long "
        "the host's open-for-write + write (or ftruncate) took on files the guest caches (overwrite, "
        "append, truncate), where leasefsd holds the writer until the guest's lease has ended. *Re-reads*: "
        "open + read + close of 16 unchanged 16 KiB files between rounds, files per second.")
    lines.append("")
    lines.append("| stack | config | result | stale data reads | stale namespace @0 ms | @50 ms | "
                 "hold p50 / p99 ms | ns revocation p50 / p99 ms | data revocation p50 / p99 ms | "
                 "re-reads files/s | rounds, s |")
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in runs.items():
        t = r["total"]
        stack, config, guest = key
        cfg = config + (f" (guest {guest})" if guest else "")
        if not t or t.get("result") in (None, "error") or "stale_data" not in t:
            lines.append(f"| {stack} | {cfg} | **did not complete** (status {r['meta'].get('status')}) "
                         "| | | | | | | | |")
            continue
        cap = t.get("max_wait_ms")
        lk, late = late_key(t, "ns_stale")
        lc, _ = late_key(t, "ns_checks")
        res = t["result"]
        if res == "fail" and daemon_of(config) == "virtiofsd":
            res = "stale (expected)"
        elif res == "fail":
            res = "**FAIL**"
        lines.append(
            f"| {stack} | {cfg} | {res} | {t['stale_data']} of {t['data_checks']} | "
            f"{t['ns_stale_0ms']} of {t['ns_checks_0ms']} | {t.get(lk, '-')} of {t.get(lc, '-')}"
            f"{'' if late == '50' else f' (at {late} ms)'} | "
            f"{fms(t['hold_p50_ms'])} / {fms(t['hold_p99_ms'])} | "
            f"{fms(t['ns_lat_p50_ms'], cap)} / {fms(t['ns_lat_p99_ms'], cap)} | "
            f"{fms(t['data_lat_p50_ms'], cap)} / {fms(t['data_lat_p99_ms'], cap)} | "
            f"{float(t['reads_per_s']):.0f} | {t['rounds']}, {t['seconds']} |")
    lines.append("")
    for key, r in runs.items():
        if not r["kinds"]:
            continue
        t = r["total"] or {}
        cap = t.get("max_wait_ms")
        late = t.get("late_ms", "50")
        lines.append(f"## {run_label(key)}")
        lines.append("")
        lines.append(f"| kind | class | rounds | answers | stale @0 ms | stale @{late} ms | latency p50 | p90 | "
                     "p99 | max ms | unseen | hold p50 | p99 | max ms |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for k in r["kinds"]:
            data = k.get("class") == "data"
            lines.append(
                f"| {k['kind']} | {k.get('class')} | {k['rounds']} | {k['checks_0ms']} | {k['stale_0ms']} | "
                f"{'-' if data else k.get(f'stale_{late}ms', '-')} | {fms(k['lat_p50_ms'], cap)} | "
                f"{fms(k['lat_p90_ms'], cap)} | {fms(k['lat_p99_ms'], cap)} | {fms(k['lat_max_ms'], cap)} | "
                f"{k['unseen']} | {fms(k['hold_p50_ms'])} | {fms(k['hold_p99_ms'])} | {fms(k['hold_max_ms'])} |")
        if t:
            lines.append("")
            lines.append(f"Re-reads: {float(t['reads_per_s']):.0f} files/s between rounds "
                         f"({float(t['mib_per_s']):.1f} MiB/s), background reader {float(t['bg_reads_per_s']):.0f} "
                         f"files/s; unchanged files read wrong: {t['ro_bad']}.")
        if r["daemon"]:
            lines.append("")
            lines.append(f"Daemon at exit: `{r['daemon']}`")
        lines.append("")
    return "\n".join(lines) + "\n"


# --- SVG ----------------------------------------------------------------------------------

def nice_max(v):
    if v <= 0:
        return 1
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= v:
            return m * mag
    return 10 * mag


def short(x):
    if x >= 1e3:
        return f"{x / 1e3:.1f}".rstrip("0").rstrip(".") + "k"
    return f"{x:.1f}".rstrip("0").rstrip(".")


def svg(runs, meta):
    rows = [(k, r) for k, r in runs.items() if r["total"] and "stale_data" in r["total"]]
    # (title, [(field, label, shade)], kind): kind "count" | "ms" | "rate"
    panels = [
        ("stale data reads (leasefsd: must be 0)", [("stale_data", "", 0)], "count"),
        ("stale namespace answers", [("ns_stale_0ms", "at 0 ms", 1), ("LATE", "at 50 ms", 0)], "count"),
        ("namespace revocation latency, ms", [("ns_lat_p50_ms", "p50", 1), ("ns_lat_p99_ms", "p99", 0)], "ms"),
        ("host-writer hold, ms", [("hold_p50_ms", "p50", 1), ("hold_p99_ms", "p99", 0)], "ms"),
        ("cached re-reads, files/s", [("reads_per_s", "", 0)], "rate"),
    ]
    label_w, pw, gap = 250, 200, 44
    row_h, top = 34, 96
    width = label_w + len(panels) * (pw + gap) + 10
    height = top + max(len(rows), 1) * row_h + 40
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
         f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
         '<text x="10" y="22" font-size="16" font-weight="bold">Coherency stress: host writers, guest readers '
         '(guest-tests stress, one VM per row)</text>']
    sub = "; ".join(m for m in meta if m.startswith(("date", "machine", "rounds")))
    o.append(f'<text x="10" y="40" font-size="11" fill="#444">{escape(sub)}</text>')
    o.append('<text x="10" y="56" font-size="11" fill="#444">dark bar: p99 / at 50 ms; light bar: p50 / at 0 ms. '
             'A latency bar ending in » never saw the change within the max wait.</text>')
    for pi, (title, fields, kind) in enumerate(panels):
        x0 = label_w + pi * (pw + gap)
        o.append(f'<text x="{x0 + pw / 2}" y="{top - 14}" font-size="12" font-weight="bold" '
                 f'text-anchor="middle">{escape(title)}</text>')
        vals = []
        caps = []
        for _, r in rows:
            t = r["total"]
            caps.append(fnum(t.get("max_wait_ms")) or 2000)
            for f, _, _ in fields:
                f = late_key(t, "ns_stale")[0] if f == "LATE" else f
                v = fnum(t.get(f))
                if v is not None:
                    vals.append(min(v, caps[-1]) if math.isinf(v) else v)
        vmax = nice_max(max(vals) if vals else 1)
        o.append(f'<line x1="{x0}" y1="{top - 6}" x2="{x0}" y2="{top + len(rows) * row_h}" stroke="#888"/>')
        for frac in (0.5, 1.0):
            gx = x0 + pw * frac
            o.append(f'<line x1="{gx:.1f}" y1="{top - 6}" x2="{gx:.1f}" y2="{top + len(rows) * row_h}" '
                     f'stroke="#e3e3e3"/>')
            o.append(f'<text x="{gx:.1f}" y="{top + len(rows) * row_h + 14}" font-size="10" fill="#555" '
                     f'text-anchor="middle">{short(vmax * frac)}</text>')
        for ri, (key, r) in enumerate(rows):
            t = r["total"]
            d = daemon_of(key[1])
            y = top + ri * row_h
            bh = (row_h - 10) / len(fields)
            for fi, (f, flabel, shade) in enumerate(fields):
                f = late_key(t, "ns_stale")[0] if f == "LATE" else f
                v = fnum(t.get(f))
                by = y + 2 + fi * bh
                if v is None:
                    continue
                never = math.isinf(v)
                shown = caps[ri] if never else v
                w = pw * min(shown / vmax, 1.0)
                colour = LIGHT[d] if shade else COLOURS[d]
                if kind == "count" and f == "stale_data" and v > 0 and d == "leasefsd":
                    colour = "#b00020"
                tip = f"{run_label(key)}: {flabel + ' ' if flabel else ''}{'never' if never else short(v)}"
                o.append(f'<rect x="{x0}" y="{by:.1f}" width="{max(w, 0.5):.1f}" height="{bh - 1:.1f}" '
                         f'fill="{colour}"><title>{escape(tip)}</title></rect>')
                if never:
                    txt = f">{caps[ri]:.0f}»"
                elif kind == "ms":
                    txt = fms(v)
                elif kind == "rate":
                    txt = f"{v:.0f}"
                else:
                    txt = short(v)
                o.append(f'<text x="{x0 + w + 3:.1f}" y="{by + bh - 3:.1f}" font-size="9" fill="#333">'
                         f'{escape(txt)}</text>')
    for ri, (key, r) in enumerate(rows):
        y = top + ri * row_h
        res = r["total"].get("result")
        mark = "" if res == "pass" else (" (stale)" if daemon_of(key[1]) == "virtiofsd" else " FAIL")
        o.append(f'<text x="{label_w - 8}" y="{y + row_h / 2 + 2}" font-size="11" text-anchor="end">'
                 f'{escape(run_label(key) + mark)}</text>')
        if ri:
            o.append(f'<line x1="10" y1="{y - 1}" x2="{width - 10}" y2="{y - 1}" stroke="#f0f0f0"/>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    d = sys.argv[1]
    try:
        runs = load(os.path.join(d, "stress.txt"))
    except OSError as e:
        print(f"stress-report.py: {e}", file=sys.stderr)
        return 1
    meta = []
    try:
        with open(os.path.join(d, "meta.txt")) as f:
            meta = [line.strip() for line in f if line.strip()]
    except OSError:
        pass
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write(markdown(runs, meta))
    with open(os.path.join(d, "results.svg"), "w") as f:
        f.write(svg(runs, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
