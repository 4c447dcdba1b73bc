#!/usr/bin/env python3
"""Instructions per request from benches/instructions.sh's callgrind profiles.

    benches/instructions.py DIR [--top N]

reads DIR/runs.jsonl (per run: config, workload, short|long, ops, callgrind files in DIR/cg/)
and writes DIR/instructions.md and DIR/instructions.json. Per config and workload:

    per request = (Ir of the long run - Ir of the short run) / (ops long - ops short)

and the same per function (self cost, "exclusive", and self plus callees, "inclusive") and
per component (libc malloc/free, memcpy, vm-memory, virtio-queue, leasefs::coherence, ...).
Cost that is the same in both runs (start-up, INIT, the bench's set-up, exit) cancels.
Standard library only; the callgrind files are parsed here, not with callgrind_annotate.
"""

import json
import os
import re
import sys

from report import load as load_jsonl, load_meta   # benches/report.py's readers

WORKLOAD_ORDER = ["getattr", "lookup", "read4k", "write4k", "read1m", "create-unlink", "readdirplus"]
CONFIG_ORDER = ["leasefsd-default", "leasefsd-always", "leasefsd-auto", "virtiofsd-auto", "virtiofsd-always"]
CONFIG_LABEL = {
    "leasefsd-default": "leasefsd default (coherent)",
    "leasefsd-always": "leasefsd --cache always",
    "leasefsd-auto": "leasefsd --cache auto",
    "virtiofsd-auto": "virtiofsd --cache auto",
    "virtiofsd-always": "virtiofsd --cache always",
}
# (a, b, title): where a spends more than b. Pairs with a missing config are skipped.
PAIRS = [
    ("leasefsd-default", "leasefsd-always", "leasefsd default over leasefsd --cache always"),
    ("leasefsd-always", "virtiofsd-always", "leasefsd --cache always over virtiofsd --cache always"),
    ("leasefsd-default", "virtiofsd-auto", "leasefsd default over virtiofsd --cache auto"),
]
# Cost ratios shown in the main table (a ÷ b; below 1 means a executes fewer instructions).
RATIOS = [
    ("leasefsd-default", "virtiofsd-auto"),
    ("leasefsd-default", "virtiofsd-always"),
    ("leasefsd-always", "virtiofsd-always"),
    ("leasefsd-default", "leasefsd-always"),
]

MALLOC = {"malloc", "free", "_int_malloc", "_int_free", "realloc", "_int_realloc", "calloc",
          "malloc_consolidate", "unlink_chunk", "tcache_get", "tcache_put", "cfree",
          "__libc_malloc", "__libc_free", "__libc_calloc", "__libc_realloc", "sysmalloc",
          "_int_free_merge_chunk", "_int_free_create_chunk", "_int_free_maybe_consolidate",
          "__rdl_alloc", "__rdl_dealloc", "__rdl_realloc", "__rdl_alloc_zeroed",
          "__rust_alloc", "__rust_dealloc", "__rust_realloc", "__rust_alloc_zeroed",
          "__rustc::__rdl_alloc", "__rustc::__rdl_dealloc", "__rustc::__rdl_realloc",
          "__rustc::__rdl_alloc_zeroed", "__rustc::__rust_alloc", "__rustc::__rust_dealloc",
          "__rustc::__rust_realloc", "__rustc::__rust_alloc_zeroed",
          "alloc::alloc::exchange_malloc", "alloc::raw_vec::finish_grow"}
STRING_RE = re.compile(r"^__(mem|str|wmem|stp)\w*|^(memcpy|memmove|memset|memcmp|bcmp|strlen)$")


# --- callgrind files ---------------------------------------------------------------------

def parse_callgrind(path):
    """(total Ir, {fn: self Ir}, {fn: inclusive Ir}, {fn: object}, {fn: calls into it})."""
    names = {"ob": {}, "fl": {}, "fn": {}}
    kind_of = {"ob": "ob", "cob": "ob", "fl": "fl", "fi": "fl", "fe": "fl", "cfi": "fl",
               "cfl": "fl", "fn": "fn", "cfn": "fn"}
    self_cost, incl, objs, calls = {}, {}, {}, {}
    cur_fn, cur_ob, cur_cfn = "?", "?", "?"
    call_pending = False
    total = None

    def name(kind, value):
        value = value.strip()
        m = re.match(r"^\((\d+)\)\s*(.*)$", value)
        if not m:
            return value
        table = names[kind_of[kind]]
        if m.group(2):
            table[m.group(1)] = m.group(2)
            return m.group(2)
        return table.get(m.group(1), "(%s)" % m.group(1))

    with open(path, errors="replace") as f:
        for line in f:
            if not line or line == "\n":
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                cost = int(parts[-1]) if len(parts) >= 2 else 0
                if call_pending:
                    incl[cur_fn] = incl.get(cur_fn, 0) + cost
                    call_pending = False
                else:
                    self_cost[cur_fn] = self_cost.get(cur_fn, 0) + cost
                    incl[cur_fn] = incl.get(cur_fn, 0) + cost
                continue
            key, sep, value = line.partition("=")
            if sep:
                if key == "fn":
                    cur_fn = name("fn", value)
                    objs.setdefault(cur_fn, cur_ob)
                elif key == "ob":
                    cur_ob = name("ob", value)
                elif key == "cfn":
                    cur_cfn = name("cfn", value)
                elif key in kind_of:
                    name(key, value)
                elif key == "calls":
                    call_pending = True
                    n = value.split()
                    if n and n[0].isdigit():
                        calls[cur_cfn] = calls.get(cur_cfn, 0) + int(n[0])
                continue
            if line.startswith("totals:") or line.startswith("summary:"):
                v = int(line.split(":", 1)[1].split()[0])
                if line.startswith("totals:") or total is None:
                    total = v
    if total is None:
        total = sum(self_cost.values())
    return total, self_cost, incl, objs, calls


def component(fn, obj):
    """A coarse owner of a function, the same for both daemons where they share code."""
    base = os.path.basename(obj or "")
    bare = fn.split("'")[0]
    if base.startswith("libc.so") or base.startswith("libc-"):
        if bare in MALLOC:
            return "libc malloc/free"
        if STRING_RE.match(bare):
            return "libc memcpy/memset"
        return "libc other (syscall wrappers, locks)"
    if base.startswith("ld-linux") or base.startswith("ld-"):
        return "ld.so"
    if base.startswith("vgpreload") or base.startswith("setgroups-shim"):
        return "valgrind preload"
    if bare in MALLOC:
        return "libc malloc/free"
    # A Rust path: strip "<", "&", "dyn ", "impl " and take the crate (two segments for the
    # daemons' own crates).
    s = bare.lstrip("<&*").replace("dyn ", "").replace("mut ", "")
    if s.startswith("impl "):
        s = s[5:]
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:::([A-Za-z_][A-Za-z0-9_]*))?", s)
    if not m:
        return "other"
    crate, second = m.group(1), m.group(2)
    if crate in ("leasefs", "leasefsd", "virtiofsd") and second:
        return f"{crate}::{second}"
    if crate in ("core", "alloc", "std", "__rustc", "hashbrown"):
        return "Rust std/core/alloc"
    return crate


# --- runs --------------------------------------------------------------------------------

def load_runs(d):
    return load_jsonl(os.path.join(d, "runs.jsonl"))


def add_into(dst, src):
    for k, v in src.items():
        dst[k] = dst.get(k, 0) + v


def profile(d, run):
    """A run's profiles (one per process) added up: total, self, inclusive, objects, calls."""
    total, selfc, incl, objs, calls = 0, {}, {}, {}, {}
    for name in run.get("files", []):
        t, s, i, o, c = parse_callgrind(os.path.join(d, "cg", name))
        total += t
        add_into(selfc, s)
        add_into(incl, i)
        add_into(calls, c)
        for k, v in o.items():
            objs.setdefault(k, v)
    return total, selfc, incl, objs, calls


def per_request(d, runs):
    """{(config, workload): result}. With a base run (0 s): per request = sum over the timed
    runs of (Ir - Ir base) / sum of (ops - ops base), and each timed run's own estimate for
    the spread. Without one (older results): (Ir long - Ir short) / (ops long - ops short)."""
    groups = {}
    for r in runs:
        groups.setdefault((r["config"], r["workload"]), {})[r["label"]] = r   # the last of each
    out = {}
    for key, g in groups.items():
        ok = {k: r for k, r in g.items() if "error" not in r}
        base = ok.get("base")
        timed = [ok[k] for k in ("short", "long") if k in ok]
        if base is not None and timed:
            minus = base
        elif "short" in ok and "long" in ok:
            minus, timed = ok["short"], [ok["long"]]
        else:
            why = next((r["error"] for r in g.values() if "error" in r), "a run is missing")
            out[key] = {"error": why}
            continue
        dops = sum(r["ops"] - minus["ops"] for r in timed)
        if dops <= 0 or any(r["ops"] <= minus["ops"] for r in timed):
            out[key] = {"error": f"too few requests (ops {[r['ops'] for r in [minus] + timed]})"}
            continue
        try:
            tb, sb, ib, ob, cb = profile(d, minus)
            profs = [profile(d, r) for r in timed]
        except OSError as e:
            out[key] = {"error": f"profile missing: {e}"}
            continue
        objs = dict(ob)
        fn_self, fn_incl, fn_calls = {}, {}, {}
        for _, sr, ir, orr, cr in profs:
            objs.update(orr)
            add_into(fn_self, sr)
            add_into(fn_incl, ir)
            add_into(fn_calls, cr)
        n = len(timed)
        fn_self = {k: (fn_self.get(k, 0) - n * sb.get(k, 0)) / dops for k in set(fn_self) | set(sb)}
        fn_incl = {k: (fn_incl.get(k, 0) - n * ib.get(k, 0)) / dops for k in set(fn_incl) | set(ib)}
        fn_calls = {k: (fn_calls.get(k, 0) - n * cb.get(k, 0)) / dops for k in set(fn_calls) | set(cb)}
        comps = {}
        for k, v in fn_self.items():
            c = component(k, objs.get(k, ""))
            comps[c] = comps.get(c, 0.0) + v
        per = sum(r["ir"] - minus["ir"] for r in timed) / dops
        # Queue events handled per request: 1 when the queue thread sleeps and is woken for
        # every request, less when it finds the next one already waiting. Each pass costs
        # event-loop instructions, so this is the timing-dependent part of the figure.
        wakeups = max([v for k, v in fn_calls.items() if k.endswith("VhostUserBackend>::handle_event")],
                      default=None)
        estimates = [(r["ir"] - minus["ir"]) / (r["ops"] - minus["ops"]) for r in timed]
        out[key] = {
            "per_request": per,
            "estimates": estimates,
            "method": "base" if minus is base else "difference",
            "base": [minus["ops"], minus["ir"]],
            "timed": [[r["label"], r["ops"], r["ir"]] for r in timed],
            "fixed": minus["ir"] - per * minus["ops"],
            "self": fn_self,
            "inclusive": fn_incl,
            "calls": fn_calls,
            "wakeups": wakeups,
            "components": comps,
            "objects": objs,
        }
    return out


def fmt(x):
    return f"{x:,.0f}"


def short_fn(fn, width=120):
    fn = re.sub(r"\s+", " ", fn)
    fn = fn.replace("fuse_backend_rs::api::filesystem::sync_io::FileSystem", "FileSystem")
    fn = fn.replace("vhost_user_backend::backend::VhostUserBackend", "VhostUserBackend")
    if len(fn) <= width:
        return fn
    keep = width - 1
    return fn[: keep * 2 // 5] + "…" + fn[-(keep - keep * 2 // 5):]


def md_escape(s):
    return s.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def md_code(s):
    """A code span in a table cell: no HTML escapes (they would show), only the pipe."""
    return "`" + s.replace("`", "'").replace("|", "\\|") + "`"


def key_order(seq, order):
    return sorted(seq, key=lambda x: (order.index(x) if x in order else len(order), x))


def measured(res, workloads, configs):
    """(workload, config, result) of every cell that has a figure, in table order."""
    for w in workloads:
        for c in configs:
            r = res.get((c, w))
            if r and "error" not in r:
                yield w, c, r


def diff_table(L, ra, rb, a, b, field, keys, top):
    """The functions in keys on which a spends more than b ("self" or "inclusive" cost)."""
    diffs = sorted(((ra[field].get(k, 0) - rb[field].get(k, 0), k) for k in keys), reverse=True)
    L.append(f"| function ({field}) | {a} | {b} | difference | calls per request (a / b) |")
    L.append("|---|---:|---:|---:|---:|")
    for dv, k in diffs[:top]:
        if dv < 1:
            break
        L.append(f"| {md_code(short_fn(k))} | {fmt(ra[field].get(k, 0))} | {fmt(rb[field].get(k, 0))} | "
                 f"{dv:+,.0f} | {ra['calls'].get(k, 0):.2f} / {rb['calls'].get(k, 0):.2f} |")
    L.append("")


def markdown(res, meta, top):
    workloads = key_order({k[1] for k in res}, WORKLOAD_ORDER)
    configs = key_order({k[0] for k in res}, CONFIG_ORDER)
    L = []
    L.append("# Instructions per request (callgrind)")
    L.append("")
    L.append(f"- date: {meta.get('date', '?')}; leasefs {meta.get('leasefs_rev', '?')}"
             f"{' (uncommitted tree ' + meta['leasefs_tree'] + ')' if meta.get('leasefs_tree') else ''}"
             f" (leasefsd binary sha256 {meta.get('leasefsd_sha256', '?')}); {meta.get('virtiofsd_version', '?')}; "
             f"{meta.get('valgrind', '?')}; {meta.get('kernel', '?')}")
    L.append(f"- each cell: a 0 s (base), a {meta.get('seconds', '?')} s and a "
             f"{meta.get('long_seconds', '?')} s run of "
             "`leasefs-bench --threads 1 --queues 1`, each against a fresh daemon under callgrind "
             "(`--sandbox none --seccomp none`); per request = ΔIr ÷ Δops against the base run, "
             "pooled over the two timed runs, so start-up and set-up cancel")
    L.append("- user-space instructions of every daemon thread; kernel work (the system calls) is not counted")
    L.append("")
    head = "| workload | " + " | ".join(CONFIG_LABEL.get(c, c) for c in configs)
    ratios = [(a, b) for a, b in RATIOS if a in configs and b in configs]
    head += "".join(f" | {a.replace('leasefsd-', 'lfs ').replace('virtiofsd-', 'vfs ')} ÷ "
                    f"{b.replace('leasefsd-', 'lfs ').replace('virtiofsd-', 'vfs ')}" for a, b in ratios)
    L.append(head + " |")
    L.append("|---|" + "---:|" * (len(configs) + len(ratios)))
    for w in workloads:
        row = f"| {w} |"
        for c in configs:
            r = res.get((c, w))
            row += " — |" if r is None else (" failed |" if "error" in r else f" {fmt(r['per_request'])} |")
        for a, b in ratios:
            ra, rb = res.get((a, w)), res.get((b, w))
            if ra and rb and "error" not in ra and "error" not in rb and rb["per_request"] > 0:
                row += f" {ra['per_request'] / rb['per_request']:.2f} |"
            else:
                row += " — |"
        L.append(row)
    L.append("")
    L.append("Ratios are instruction counts (lower is cheaper): a ratio of 1.20 means the first "
             "executes 20% more instructions per request than the second.")
    errors = [(k, r["error"]) for k, r in sorted(res.items()) if "error" in r]
    if errors:
        L.append("")
        for (c, w), e in errors:
            L.append(f"- {c} {w}: failed: {md_escape(str(e))}")
    L.append("")
    L.append("Runs: the base run (0 s: start-up, INIT, the bench's set-up and tear-down) and the timed "
             "runs, each timed run's own estimate (ΔIr ÷ Δops against the base), their spread, and "
             "the queue events (`handle_event` calls) per request: 1.0 when the daemon sleeps and "
             "is woken for every request, less when it finds the next request already waiting. "
             "That is the timing-dependent part of the figure (each pass through the event loop "
             "costs instructions), the rest is fixed by the code path:")
    L.append("")
    L.append("| config | workload | base ops / Ir | timed runs: ops / Ir → per request | spread | queue events per request |")
    L.append("|---|---|---|---|---:|---:|")
    for w, c, r in measured(res, workloads, configs):
        timed = "; ".join(f"{lab} {ops:,} / {ir:,} → {fmt(e)}"
                          for (lab, ops, ir), e in zip(r["timed"], r["estimates"]))
        spread = ("—" if len(r["estimates"]) < 2 else
                  f"{(max(r['estimates']) - min(r['estimates'])) / r['per_request'] * 100:.1f}%")
        base = f"{r['base'][0]:,} / {r['base'][1]:,}" + ("" if r["method"] == "base" else " (short run)")
        wk = "?" if r.get("wakeups") is None else f"{r['wakeups']:.2f}"
        L.append(f"| {c} | {w} | {base} | {timed} | {spread} | {wk} |")
    L.append("")

    # Components.
    L.append("## Per request, by component")
    L.append("")
    for w in workloads:
        have = [c for c in configs if res.get((c, w)) and "error" not in res[(c, w)]]
        if not have:
            continue
        comps = set()
        for c in have:
            comps |= {k for k, v in res[(c, w)]["components"].items() if abs(v) >= 0.5}
        comps = sorted(comps, key=lambda k: -max(res[(c, w)]["components"].get(k, 0) for c in have))
        L.append(f"### {w}")
        L.append("")
        L.append("| component | " + " | ".join(CONFIG_LABEL.get(c, c) for c in have) + " |")
        L.append("|---|" + "---:|" * len(have))
        for k in comps:
            L.append(f"| {md_escape(k)} | " + " | ".join(fmt(res[(c, w)]["components"].get(k, 0)) for c in have) + " |")
        L.append("| **total** | " + " | ".join(f"**{fmt(res[(c, w)]['per_request'])}**" for c in have) + " |")
        L.append("")

    # Differences.
    L.append("## Where one spends more than the other (per request)")
    L.append("")
    L.append("Self cost (exclusive) per function, a minus b, largest first; functions present in "
             "only one daemon count as 0 in the other. For two leasefsd modes the inclusive "
             "(self + callees) differences of leasefs's own functions follow.")
    L.append("")
    for a, b, title in PAIRS:
        for w in workloads:
            ra, rb = res.get((a, w)), res.get((b, w))
            if not ra or not rb or "error" in ra or "error" in rb:
                continue
            L.append(f"### {w}: {title}")
            L.append("")
            L.append(f"Total: {fmt(ra['per_request'])} vs {fmt(rb['per_request'])} "
                     f"({ra['per_request'] - rb['per_request']:+,.0f} per request).")
            L.append("")
            diff_table(L, ra, rb, a, b, "self", set(ra["self"]) | set(rb["self"]), top)
            if a.split("-")[0] == b.split("-")[0]:
                own = {"leasefsd": "leasefs::"}.get(a.split("-")[0], a.split("-")[0] + "::")
                keys = {k for k in set(ra["inclusive"]) | set(rb["inclusive"]) if own in k}
                diff_table(L, ra, rb, a, b, "inclusive", keys, top)

    # Top functions of each.
    L.append("## Top functions per request (self cost)")
    L.append("")
    for w, c, r in measured(res, workloads, configs):
        L.append(f"### {w}, {CONFIG_LABEL.get(c, c)} ({fmt(r['per_request'])} per request)")
        L.append("")
        L.append("| Ir per request | calls per request | function |")
        L.append("|---:|---:|---|")
        for k, v in sorted(r["self"].items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
            L.append(f"| {fmt(v)} | {r['calls'].get(k, 0):.2f} | {md_code(short_fn(k))} |")
        L.append("")
    return "\n".join(L)


def main():
    args = sys.argv[1:]
    top = None
    if "--top" in args:
        i = args.index("--top")
        top = int(args[i + 1])
        del args[i:i + 2]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    d = args[0]
    meta = load_meta(d, "instructions.py")
    if top is None:
        top = int(meta.get("top", 15))
    runs = load_runs(d)
    if not runs:
        print(f"instructions.py: no runs in {d}/runs.jsonl", file=sys.stderr)
        return 1
    res = per_request(d, runs)
    with open(os.path.join(d, "instructions.md"), "w") as f:
        f.write(markdown(res, meta, top) + "\n")
    summary = {}
    for (c, w), r in sorted(res.items()):
        if "error" in r:
            summary.setdefault(c, {})[w] = {"error": r["error"]}
            continue
        summary.setdefault(c, {})[w] = {
            "per_request": round(r["per_request"], 1),
            "estimates": [round(e, 1) for e in r["estimates"]],
            "wakeups": None if r.get("wakeups") is None else round(r["wakeups"], 3),
            "method": r["method"],
            "base": r["base"],
            "timed": r["timed"],
            "components": {k: round(v, 1) for k, v in sorted(r["components"].items(), key=lambda kv: (-kv[1], kv[0]))
                           if abs(v) >= 0.5},
            "top_self": [[k, round(v, 1)] for k, v in sorted(r["self"].items(), key=lambda kv: (-kv[1], kv[0]))[:50]],
        }
    with open(os.path.join(d, "instructions.json"), "w") as f:
        json.dump({"meta": meta, "results": summary}, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
