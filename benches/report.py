#!/usr/bin/env python3
"""Turn benches/compare.sh's results into a markdown table and an SVG plot.

    benches/report.py DIR

reads DIR/results.jsonl (one leasefs-bench JSON line per run, plus "daemon", "cache" and
"loadavg") and DIR/meta.json (machine and versions, written by compare.sh), and writes
DIR/results.md (runs, ratios, targets) and DIR/results.svg (ops/s and p99 latency, one panel
per workload). Results without "cache" (older runs) count as --cache always for both
daemons. Standard library only.
"""

import json
import math
import os
import sys
from xml.sax.saxutils import escape

WORKLOAD_ORDER = ["getattr", "lookup", "read4k", "write4k", "read1m", "create-unlink", "readdirplus"]
# "Small metadata operations" for the 1.3x multi-queue target (issue 3).
METADATA = {"getattr", "lookup", "create-unlink"}
MQ_TARGET = 1.3
# Issue 13: the coherent default within 5% of --cache always on these.
COHERENT_TARGET = 0.95
COHERENT_WORKLOADS = {"getattr", "lookup", "read4k"}

# Configurations: virtiofsd-<cache> (one request queue) and leasefsd-<cache>-1q / -mq.
# Results from before leasefsd's default was measured carry no "cache": both daemons then
# ran --cache always.
COLOURS = {
    "virtiofsd-auto": "#fdb863", "leasefsd-default-1q": "#a6dba0", "leasefsd-default-mq": "#1b7837",
    "virtiofsd-always": "#e66101", "leasefsd-always-1q": "#92c5de", "leasefsd-always-mq": "#2166ac",
}
LEGEND = [
    ("virtiofsd-auto", "virtiofsd 1.14 --cache auto"),
    ("leasefsd-default-1q", "leasefsd default (coherent), 1 queue"),
    ("leasefsd-default-mq", "leasefsd default, 1 queue per thread"),
    ("virtiofsd-always", "virtiofsd 1.14 --cache always"),
    ("leasefsd-always-1q", "leasefsd --cache always, 1 queue"),
    ("leasefsd-always-mq", "leasefsd --cache always, 1 queue per thread"),
]
# What each leasefsd configuration is set against on the plot (the ratio over its bar).
PLOT_BASE = {
    "leasefsd-default-1q": "virtiofsd-auto", "leasefsd-default-mq": "virtiofsd-auto",
    "leasefsd-always-1q": "virtiofsd-always", "leasefsd-always-mq": "virtiofsd-always",
}


def load(path):
    runs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"report.py: {path}:{n}: skipping bad line: {e}", file=sys.stderr)
    return runs


def load_meta(d, who):
    """DIR/meta.json (what the run was: machine, versions, options), or {} with a note."""
    try:
        with open(os.path.join(d, "meta.json")) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"{who}: no meta.json ({e})", file=sys.stderr)
        return {}


def config_of(run):
    """virtiofsd-<cache> / leasefsd-<cache>-1q / leasefsd-<cache>-mq."""
    cache = run.get("cache", "always")
    if run["daemon"] != "leasefsd":
        return f"{run['daemon']}-{cache}"
    return f"leasefsd-{cache}-" + ("1q" if int(run["queues"]) == 1 else "mq")


def workload_key(w):
    return (WORKLOAD_ORDER.index(w) if w in WORKLOAD_ORDER else len(WORKLOAD_ORDER), w)


def config_key(c):
    order = [k for k, _ in LEGEND]
    return (order.index(c) if c in order else len(order), c)


def label_of(c):
    return dict(LEGEND).get(c, c)


def aggregate(runs):
    """{(workload, threads, config): result}; repeated runs of a cell give the median run
    (of the undisturbed ones, if any)."""
    cells = {}
    for r in runs:
        cells.setdefault((r["workload"], int(r["threads"]), config_of(r)), []).append(r)
    out = {}
    for key, rs in cells.items():
        ok = [r for r in rs if "error" not in r]
        # Runs that overlapped other CPU-heavy work count only when there is nothing better.
        quiet = [r for r in ok if not r.get("others")]
        if quiet:
            ok = quiet
        if not ok:
            out[key] = dict(rs[-1], n=len(rs), failed=len(rs))
            continue
        ok.sort(key=lambda r: r["ops_per_sec"])
        med = dict(ok[(len(ok) - 1) // 2])
        med["n"] = len(rs)
        med["failed"] = len(rs) - len(ok)
        out[key] = med
    return out


def ratio(cells, w, t, a, b):
    """ops/s of configuration a ÷ ops/s of b in the same cell, or None."""
    ra, rb = cells.get((w, t, a)), cells.get((w, t, b))
    if not ra or not rb or "error" in ra or "error" in rb or not rb["ops_per_sec"]:
        return None
    return ra["ops_per_sec"] / rb["ops_per_sec"]


def fmt_ops(x):
    return f"{x:,.0f}"


def fmt_size(n):
    if not isinstance(n, int):
        return ""
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return str(n)


def fmt_us(x):
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def fmt_ratio(x, bold=True):
    if x is None:
        return "—"
    return f"**{x:.2f}×**" if bold else f"{x:.2f}×"


def markdown(cells, meta, runs):
    workloads = sorted({k[0] for k in cells}, key=workload_key)
    threads = sorted({k[1] for k in cells})
    configs = {k[2] for k in cells}
    lines = []
    lines.append("# leasefsd vs virtiofsd (leasefs-bench)")
    lines.append("")
    m = meta
    loads = [float(r["loadavg"].split()[0]) for r in runs if r.get("loadavg")]
    repeat = str(m.get("repeat", "1"))
    per_cell = "one run per cell" if repeat == "1" else f"{repeat} runs per cell, interleaved, the median shown"
    lines.append(f"- date: {m.get('date', '?')}; {m.get('seconds', '?')} s per run, {per_cell}, "
                 f"a fresh daemon per run, all runs on one scratch share ({m.get('share_fs', '?')})")
    lines.append(f"- machine: {m.get('cpu_model', '?')}, nproc {m.get('nproc', '?')}, kernel {m.get('kernel', '?')}")
    load_line = f"- load average (1/5/15 min): {m.get('load_start', '?')} at start, {m.get('load_end', '?')} at end"
    if loads:
        load_line += f"; 1-min load before each run {min(loads):.2f} to {max(loads):.2f}"
    lines.append(load_line)
    modes = ""
    if m.get("leasefsd_caches") or m.get("virtiofsd_caches"):
        modes = (f"; leasefsd {', '.join('no --cache (coherent)' if c == 'default' else '--cache ' + c for c in m.get('leasefsd_caches', '').split())}"
                 f"; virtiofsd {', '.join('--cache ' + c for c in m.get('virtiofsd_caches', '').split())}")
    lines.append(f"- leasefs {m.get('leasefs_rev', '?')}{' (uncommitted tree ' + m['leasefs_tree'] + ')' if m.get('leasefs_tree') else ''}; {m.get('virtiofsd_version', '?')}; "
                 f"both daemons `{m.get('daemon_args', '')}`{modes}")
    if m.get("pin"):
        lines.append(f"- pinned: daemon and bench ran under `taskset -c {m['pin']}`")
    else:
        lines.append("- not pinned: the scheduler placed the daemon's and the bench's threads")
    lines.append("")
    lines.append("| workload | threads | daemon | cache | queues | ops/s | p50 µs | p99 µs | max_write |")
    lines.append("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for w in workloads:
        for t in threads:
            for c in sorted({k[2] for k in cells if k[0] == w and k[1] == t}, key=config_key):
                r = cells[(w, t, c)]
                daemon = r["daemon"]
                cache = r.get("cache", "always")
                q = r.get("queues", "?")
                if "error" in r:
                    lines.append(f"| {w} | {t} | {daemon} | {cache} | {q} | failed: {escape(str(r['error']))[:80]} | | | |")
                    continue
                note = " †" if r.get("others") else ""
                if r.get("failed"):
                    note = f" ({r['failed']} of {r['n']} runs failed)"
                elif r.get("n", 1) > 1:
                    note = f" (median of {r['n']})"
                lines.append(f"| {w} | {t} | {daemon} | {cache} | {q} | {fmt_ops(r['ops_per_sec'])}{note} | "
                             f"{fmt_us(r['p50_us'])} | {fmt_us(r['p99_us'])} | {fmt_size(r.get('max_write'))} |")
    disturbed = sorted({r["others"] for r in cells.values() if r.get("others")})
    if disturbed:
        lines.append("")
        lines.append(f"† other CPU-heavy programs were running during this run ({'; '.join(disturbed)}): "
                     "treat it with suspicion.")
    lines.append("")

    # Ratios: one row per workload, thread count and leasefsd queue count.
    cols = [("leasefsd-default", "virtiofsd-auto", "default ÷ virtiofsd auto"),
            ("leasefsd-default", "virtiofsd-always", "default ÷ virtiofsd always"),
            ("leasefsd-always", "virtiofsd-always", "always ÷ virtiofsd always"),
            ("leasefsd-default", "leasefsd-always", "default ÷ always")]

    def conf(name, q):
        return name if name.startswith("virtiofsd") else f"{name}-{q}"

    cols = [c for c in cols if any(k.startswith(c[0]) for k in configs) and any(k.startswith(c[1]) for k in configs)]
    if cols:
        lines.append("## Ratios")
        lines.append("")
        lines.append("ops/s ÷ ops/s in the same cell (above 1: the first is faster). virtiofsd always "
                     "uses one request queue; \"leasefsd queues\" is the queue count of the leasefsd "
                     "runs in the row (for default ÷ always both use it). One run per cell: a few per "
                     "cent either way is within run-to-run noise.")
        lines.append("")
        lines.append("| workload | threads | leasefsd queues | " + " | ".join(c[2] for c in cols) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(cols))
        for w in workloads:
            for t in threads:
                for q in (["1q", "mq"] if t > 1 else ["1q"]):
                    vals = [ratio(cells, w, t, conf(a, q), conf(b, q)) for a, b, _ in cols]
                    if all(v is None for v in vals):
                        continue
                    lines.append(f"| {w} | {t} | {1 if q == '1q' else t} | " +
                                 " | ".join(fmt_ratio(v) for v in vals) + " |")
        lines.append("")

    if any(k.startswith("virtiofsd") for k in configs) or ("leasefsd-default-1q" in configs and "leasefsd-always-1q" in configs):
        lines.append("## Against the targets")
        lines.append("")
        lines.append("Issue 3: at least 1.0× virtiofsd on every workload (leasefsd on one request queue, "
                     f"like virtiofsd), and {MQ_TARGET}× on small metadata operations "
                     f"({', '.join(sorted(METADATA))}) with one request queue per thread (threads > 1); "
                     "judged for leasefsd --cache always against virtiofsd --cache always and for "
                     "leasefsd's default against virtiofsd's (--cache auto). Issue 13: leasefsd's "
                     f"default at least {COHERENT_TARGET}× its --cache always on "
                     f"{', '.join(sorted(COHERENT_WORKLOADS))} (same queue count).")
        lines.append("")
        lines.append("| workload | threads | target | always ÷ virtiofsd always | met | default ÷ virtiofsd auto | met "
                     f"| default ÷ always (1 queue) | ≥ {COHERENT_TARGET}× |")
        lines.append("|---|---:|---|---:|---|---:|---|---:|---|")
        for w in workloads:
            for t in threads:
                if w in METADATA and t > 1:
                    target, goal, q = f"{MQ_TARGET}× (multi-queue)", MQ_TARGET, "mq"
                else:
                    target, goal, q = "1.0×", 1.0, "1q"
                ra = ratio(cells, w, t, f"leasefsd-always-{q}", "virtiofsd-always")
                rd = ratio(cells, w, t, f"leasefsd-default-{q}", "virtiofsd-auto")
                rc = ratio(cells, w, t, "leasefsd-default-1q", "leasefsd-always-1q")
                met = lambda x, g: "?" if x is None else ("yes" if x >= g else "**no**")
                coh = (met(rc, COHERENT_TARGET) if w in COHERENT_WORKLOADS else "") if rc is not None else ""
                lines.append(f"| {w} | {t} | {target} | {fmt_ratio(ra, False)} | {met(ra, goal)} | "
                             f"{fmt_ratio(rd, False)} | {met(rd, goal)} | {fmt_ratio(rc, False)} | {coh} |")
        lines.append("")
    else:
        lines.append("virtiofsd was not available: no ratios against it.")
        lines.append("")
    return "\n".join(lines)


# --- SVG ---------------------------------------------------------------------------------

def nice_ticks(vmax, n=4):
    if vmax <= 0:
        return [0, 1]
    raw = vmax / n
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        step = m * mag
        if step >= raw:
            break
    top = step * math.ceil(vmax / step)
    k = int(round(top / step))
    return [i * step for i in range(k + 1)]


def short(x):
    if x >= 1e6:
        s = f"{x / 1e6:.1f}".rstrip("0").rstrip(".") + "M"
    elif x >= 1e3:
        s = f"{x / 1e3:.1f}".rstrip("0").rstrip(".") + "k"
    else:
        s = f"{x:.1f}".rstrip("0").rstrip(".")
    return s


def svg(cells, meta):
    workloads = sorted({k[0] for k in cells}, key=workload_key)
    threads = sorted({k[1] for k in cells})
    rows = [("ops_per_sec", "ops/s (higher is better)"), ("p99_us", "p99 latency, µs (lower is better)")]
    per_row = min(4, max(len(workloads), 1))     # panels per row; workloads wrap
    wrows = [workloads[i:i + per_row] for i in range(0, len(workloads), per_row)] or [[]]
    nbars = max((len({k[2] for k in cells if k[0] == w and k[1] == t}) for w in workloads for t in threads),
                default=1)
    pw = max(190, 70 + len(threads) * (nbars * 12 + 14))    # panel size
    ph = 230
    left, gap_x, gap_y = 70, 18, 56
    plot_top, plot_bottom, plot_left = 34, 36, 44   # inside a panel
    width = max(left + per_row * (pw + gap_x) + 10, 900)
    # The legend: one column per cache family (the default ones, then --cache always and
    # anything else).
    present = [(k, label) for k, label in LEGEND if any(c[2] == k for c in cells)]
    present += [(k, k) for k in sorted({c[2] for c in cells} - {k for k, _ in LEGEND})]
    family = lambda k: 0 if ("-auto" in k or "-default" in k) else 1
    placed, used = [], [0, 0]
    for k, label in present:
        f = family(k)
        placed.append((k, label, f, used[f]))
        used[f] += 1
    legend_lines = max(used)
    top = 62 + legend_lines * 16 + 16
    height = top + len(rows) * len(wrows) * (ph + gap_y) + 10
    o = []
    o.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">')
    o.append(f'<rect width="{width}" height="{height}" fill="#ffffff"/>')
    o.append(f'<text x="{left}" y="24" font-size="17" font-weight="bold">leasefsd vs virtiofsd 1.14, '
             f'driven by leasefs-bench (no VM)</text>')
    sub = (f"{meta.get('cpu_model', '?')}, {meta.get('nproc', '?')} CPUs, {meta.get('kernel', '?')}; "
           f"{meta.get('seconds', '?')} s per run, median of {meta.get('repeat', '1')}; {'taskset -c ' + meta['pin'] if meta.get('pin') else 'not pinned'}; load {meta.get('load_start', '?')} → {meta.get('load_end', '?')}; "
           f"{meta.get('date', '')}")
    o.append(f'<text x="{left}" y="42" font-size="11" fill="#444">{escape(sub)}</text>')
    for key, label, col, row in placed:
        lx = left + col * 380
        ly = 54 + row * 16
        o.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{COLOURS.get(key, "#999")}"/>')
        o.append(f'<text x="{lx + 17}" y="{ly + 10}" font-size="12">{escape(label)}</text>')

    band = 0
    for field, rlabel in rows:
        for wrow in wrows:
            y0 = top + band * (ph + gap_y)
            band += 1
            cy = y0 + ph / 2
            o.append(f'<text x="18" y="{cy}" font-size="12" text-anchor="middle" '
                     f'transform="rotate(-90 18 {cy})">{escape(rlabel)}</text>')
            for wi, w in enumerate(wrow):
                x0 = left + wi * (pw + gap_x)
                px0, px1 = x0 + plot_left, x0 + pw
                py0, py1 = y0 + plot_top, y0 + ph - plot_bottom
                vals = [r[field] for (ww, _, _), r in cells.items() if ww == w and "error" not in r]
                # Headroom above the tallest bar for the rotated ratio labels.
                ticks = nice_ticks((max(vals) if vals else 1) * (1.2 if field == "ops_per_sec" else 1.0))
                vmax = ticks[-1] or 1
                ys = lambda v: py1 - (py1 - py0) * v / vmax
                o.append(f'<text x="{(px0 + px1) / 2}" y="{y0 + 16}" font-size="13" font-weight="bold" '
                         f'text-anchor="middle">{escape(w)}</text>')
                for tv in ticks:
                    ty = ys(tv)
                    o.append(f'<line x1="{px0}" y1="{ty:.1f}" x2="{px1}" y2="{ty:.1f}" stroke="#e3e3e3"/>')
                    o.append(f'<text x="{px0 - 4}" y="{ty + 4:.1f}" font-size="10" text-anchor="end" '
                             f'fill="#555">{short(tv)}</text>')
                o.append(f'<line x1="{px0}" y1="{py1}" x2="{px1}" y2="{py1}" stroke="#888"/>')
                gw = (px1 - px0) / max(len(threads), 1)
                for ti, t in enumerate(threads):
                    gx = px0 + ti * gw
                    configs = sorted({k[2] for k in cells if k[0] == w and k[1] == t}, key=config_key)
                    bw = min(22, (gw - 8) / max(len(configs), 3))
                    start = gx + (gw - bw * len(configs)) / 2
                    for ci, c in enumerate(configs):
                        r = cells[(w, t, c)]
                        bx = start + ci * bw
                        if "error" in r:
                            o.append(f'<text x="{bx + bw / 2:.1f}" y="{py1 - 4}" font-size="10" '
                                     f'text-anchor="middle" fill="#c00">✗</text>')
                            continue
                        v = r[field]
                        by = ys(v)
                        tip = (f"{w}, {t} thread(s), {r['daemon']} cache {r.get('cache', 'always')}, "
                               f"{r.get('queues')} queue(s): "
                               f"{fmt_ops(r['ops_per_sec'])} ops/s, p50 {fmt_us(r['p50_us'])} µs, "
                               f"p99 {fmt_us(r['p99_us'])} µs")
                        o.append(f'<rect x="{bx + 1:.1f}" y="{by:.1f}" width="{max(bw - 2, 1):.1f}" '
                                 f'height="{py1 - by:.1f}" fill="{COLOURS.get(c, "#999")}">'
                                 f'<title>{escape(tip)}</title></rect>')
                        if field == "ops_per_sec" and c in PLOT_BASE:
                            rt = ratio(cells, w, t, c, PLOT_BASE[c])
                            if rt is not None:
                                tx, ty = bx + bw / 2 + 3, by - 4
                                colour = "#1a7f1a" if rt >= 1.0 else "#b00020"
                                o.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="9" fill="{colour}" '
                                         f'transform="rotate(-90 {tx:.1f} {ty:.1f})">{rt:.2f}×</text>')
                    o.append(f'<text x="{gx + gw / 2:.1f}" y="{py1 + 14}" font-size="11" '
                             f'text-anchor="middle">{t} thread{"s" if t > 1 else ""}</text>')
    o.append(f'<text x="{width - 10}" y="{height - 4}" font-size="9" fill="#777" text-anchor="end">'
             f'ratios over the leasefsd bars: ops/s ÷ virtiofsd\'s in the same cache family '
             f'(default ÷ virtiofsd auto, always ÷ virtiofsd always)</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    d = sys.argv[1]
    runs = load(os.path.join(d, "results.jsonl"))
    if not runs:
        print(f"report.py: no results in {d}/results.jsonl", file=sys.stderr)
        return 1
    meta = load_meta(d, "report.py")
    cells = aggregate(runs)
    with open(os.path.join(d, "results.md"), "w") as f:
        f.write(markdown(cells, meta, runs))
    with open(os.path.join(d, "results.svg"), "w") as f:
        f.write(svg(cells, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
