#!/usr/bin/env python3
"""Plot qemu/host-cost.sh results as an SVG bar chart (no plotting library needed).

Usage: qemu/plot-host-cost.py RESULTS.txt OUT.svg

One group of bars per workload, one bar per configuration: the time the host tool's calls
were blocked, on a log scale (1 ms to the largest value), with the value and the stale
reads written on each bar. host-cost.sh calls it when python3 is there.
"""

import math
import sys


def load(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("HOSTCOST "):
                continue
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            rows.append(fields)
    return rows


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    rows = load(sys.argv[1])
    if not rows:
        sys.exit(f"no HOSTCOST lines in {sys.argv[1]}")
    configs = list(dict.fromkeys(r["config"] for r in rows))
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    value = {(r["config"], r["workload"]): r for r in rows}
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]

    width, height = 900, 420
    left, right, top, bottom = 70, 20, 40, 90
    plot_w, plot_h = width - left - right, height - top - bottom
    top_ms = max(max(float(r["blocked_ms"]) for r in rows), 10.0)
    decades = math.ceil(math.log10(top_ms))

    def y(ms):
        ms = max(ms, 1.0)
        return top + plot_h - plot_h * math.log10(ms) / decades

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14">'
        "Host tool blocked time per workload (ms, log scale); s = stale guest reads</text>",
    ]
    for d in range(decades + 1):
        yy = y(10**d)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{yy}" y2="{yy}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{yy + 4}" text-anchor="end">{10**d:g}</text>')
    group_w = plot_w / len(workloads)
    bar_w = group_w * 0.8 / len(configs)
    for wi, w in enumerate(workloads):
        gx = left + wi * group_w + group_w * 0.1
        out.append(
            f'<text x="{left + wi * group_w + group_w / 2}" y="{top + plot_h + 18}" '
            f'text-anchor="middle" font-size="13">{w}</text>'
        )
        for ci, c in enumerate(configs):
            r = value.get((c, w))
            if r is None:
                continue
            ms = float(r["blocked_ms"])
            x = gx + ci * bar_w
            yy = y(ms)
            out.append(
                f'<rect x="{x:.1f}" y="{yy:.1f}" width="{bar_w * 0.9:.1f}" '
                f'height="{top + plot_h - yy:.1f}" fill="{colours[ci % len(colours)]}"/>'
            )
            label = f'{ms:.0f}' + (f' s{r["stale_reads"]}' if r["stale_reads"] != "0" else "")
            out.append(
                f'<text x="{x + bar_w * 0.45:.1f}" y="{yy - 3:.1f}" text-anchor="middle" '
                f'font-size="9">{label}</text>'
            )
    for ci, c in enumerate(configs):
        lx = left + ci * (plot_w / len(configs))
        ly = height - 30
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" '
                   f'fill="{colours[ci % len(colours)]}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly}">{c}</text>')
    out.append("</svg>")
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
