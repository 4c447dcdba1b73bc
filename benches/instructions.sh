#!/usr/bin/env bash
# Instructions per request: the daemon's user-space instructions under
# `valgrind --tool=callgrind`, for leasefsd and virtiofsd 1.14, driven by leasefs-bench.
#
#   benches/instructions.sh [--seconds S] [--workloads "getattr lookup read4k create-unlink"]
#                           [--configs "leasefsd-default leasefsd-always virtiofsd-auto virtiofsd-always"]
#                           [--out DIR] [--top N]
#                           [--leasefsd BIN] [--bench BIN] [--virtiofsd BIN] [--label TEXT]
#
# For every config x workload it runs the daemon three times under callgrind, each time with
# a fresh daemon and one leasefs-bench thread on one request queue: a base run of 0 seconds
# (start-up, FUSE_INIT, the bench's set-up and tear-down, exit: a handful of requests), one
# of S seconds and one of 3S (default S = 2). The base cost is the same in every run, so
#     instructions per request = (Ir of a run - Ir of the base run) / (ops - base ops)
# pooled over the S and 3S runs (their two estimates show the spread), and likewise per
# function. Callgrind counts every thread of the process (and, with
# --trace-children, any child; the per-run file list in runs.jsonl shows there is none).
# It counts user space only: system calls cost the daemon kernel time that is not in these
# figures. The result hardly depends on the machine's load (callgrind counts instructions,
# not time); the one timing-dependent part is how often the daemon's queue thread sleeps and
# is woken per request, which the report shows ("queue events per request"). So unlike
# compare.sh it can run while other work is going on, but it is CPU-heavy: run it under
# `flock /tmp/leasefs-vm.lock` when others measure on the same machine.
#
# Configs: leasefsd-default (no --cache: coherent), leasefsd-always (--cache always),
# virtiofsd-auto (--cache auto), virtiofsd-always (--cache always); all with
# --sandbox none --seccomp none (a seccomp filter runs in the kernel, so it would not show,
# and valgrind's own system calls could trip it); leasefsd also with --queue-poll-us 0: a
# queue thread spinning on an empty ring executes instructions for as long as it waits
# (under valgrind, the bench's next request comes much later), which is idle time, not the
# cost of a request, and would make the figure depend on timing.
#
# --leasefsd/--bench use given binaries instead of building; --label then says what they are
# (e.g. a commit), for the report.
#
# Output in build/instructions/<timestamp>/ unless --out says otherwise: runs.jsonl (one line
# per run: ops, Ir, callgrind files), cg/*.out (callgrind profiles; open them with
# callgrind_annotate or kcachegrind), logs/, and instructions.md / instructions.json
# written by benches/instructions.py (per-request table, ratios and per-function breakdowns).
set -euo pipefail

SECONDS_PER_RUN=2
WORKLOADS="getattr lookup read4k create-unlink"
CONFIGS="leasefsd-default leasefsd-always virtiofsd-auto virtiofsd-always"
OUT=""
TOP=15
LEASEFSD=""
BENCH=""
VIRTIOFSD=""
LABEL=""

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
        --seconds=*) SECONDS_PER_RUN="${1#*=}"; shift ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --workloads=*) WORKLOADS="${1#*=}"; shift ;;
        --configs) CONFIGS="$2"; shift 2 ;;
        --configs=*) CONFIGS="${1#*=}"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --top) TOP="$2"; shift 2 ;;
        --top=*) TOP="${1#*=}"; shift ;;
        --leasefsd) LEASEFSD="$2"; shift 2 ;;
        --leasefsd=*) LEASEFSD="${1#*=}"; shift ;;
        --bench) BENCH="$2"; shift 2 ;;
        --bench=*) BENCH="${1#*=}"; shift ;;
        --virtiofsd) VIRTIOFSD="$2"; shift 2 ;;
        --virtiofsd=*) VIRTIOFSD="${1#*=}"; shift ;;
        --label) LABEL="$2"; shift 2 ;;
        --label=*) LABEL="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "instructions.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

ALL_WORKLOADS="getattr lookup read4k write4k read1m create-unlink readdirplus"
for w in $WORKLOADS; do
    case " $ALL_WORKLOADS " in
        *" $w "*) ;;
        *) echo "instructions.sh: unknown workload '$w' (known: $ALL_WORKLOADS)" >&2; exit 2 ;;
    esac
done
for c in $CONFIGS; do
    case "$c" in
        leasefsd-default|leasefsd-always|leasefsd-auto|virtiofsd-auto|virtiofsd-always) ;;
        *) echo "instructions.sh: unknown config '$c'" >&2; exit 2 ;;
    esac
done
case "$SECONDS_PER_RUN" in
    ''|*[!0-9.]*) echo "instructions.sh: bad --seconds '$SECONDS_PER_RUN'" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null 2>&1 || { echo "instructions.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=benches/common.sh
. "$REPO/benches/common.sh"
[ -n "$OUT" ] || OUT="$REPO/build/instructions/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT/logs" "$OUT/cg"
OUT="$(cd "$OUT" && pwd)"

log() { echo "instructions.sh: $*" >&2; }

# --- binaries ----------------------------------------------------------------------------
build_binaries
[ -n "$VIRTIOFSD" ] || find_virtiofsd
case " $CONFIGS " in
    *" virtiofsd-"*)
        if [ -z "$VIRTIOFSD" ]; then
            log "WARNING: virtiofsd not found (benches/compare.sh installs it); leaving it out"
            CONFIGS="$(echo "$CONFIGS" | tr ' ' '\n' | grep -v '^virtiofsd-' | tr '\n' ' ')"
        fi ;;
esac
VIRTIOFSD_VERSION="none"
[ -z "$VIRTIOFSD" ] || VIRTIOFSD_VERSION="$("$VIRTIOFSD" --version 2>/dev/null | head -n1 || echo unknown)"

# --- scratch share, and the setgroups shim ------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/leasefs-instructions.XXXXXX")"
SHARE="$WORK/share"
mkdir "$SHARE"
DAEMON_PID=""
trap stop_daemon_and_clean EXIT
trap 'exit 130' INT TERM

# Callgrind 3.19 aborts ("Assertion 'sigNum == vgCallgrind_current_state.sig' failed") when
# glibc's setgroups() signals every thread to change its groups too (the SIGSETXID
# broadcast), which both daemons do at start-up with threads already running. The shim makes
# setgroups() the plain system call, for the calling thread only; the daemon runs as root
# with no supplementary groups to drop, and nothing per request changes.
SHIM=""
if command -v cc >/dev/null 2>&1; then
    cat >"$WORK/setgroups-shim.c" <<'EOF'
#define _GNU_SOURCE
#include <grp.h>
#include <sys/syscall.h>
#include <unistd.h>
int setgroups(size_t size, const gid_t *list) { return syscall(SYS_setgroups, size, list); }
EOF
    if cc -O2 -shared -fPIC -o "$WORK/setgroups-shim.so" "$WORK/setgroups-shim.c" 2>"$OUT/logs/shim.log"; then
        SHIM="$WORK/setgroups-shim.so"
    fi
fi
[ -n "$SHIM" ] || log "WARNING: no C compiler for the setgroups shim; callgrind may abort at start-up"

leasefs_rev
python3 - "$OUT/meta.json" <<EOF
import json, sys
meta = {
    "date": $(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)"),
    "seconds": $(json_str "$SECONDS_PER_RUN"),
    "long_seconds": $(json_str "$(python3 -c 'import sys; print(3 * float(sys.argv[1]))' "$SECONDS_PER_RUN")"),
    "workloads": $(json_str "$WORKLOADS"),
    "configs": $(json_str "$CONFIGS"),
    "leasefs_rev": $(json_str "$GIT_REV"),
    "leasefs_tree": $(json_str "$GIT_TREE"),
    "leasefsd": $(json_str "$LEASEFSD"),
    "leasefsd_sha256": $(json_str "$(sha256sum "$LEASEFSD" | cut -c1-12)"),
    "virtiofsd_version": $(json_str "$VIRTIOFSD_VERSION"),
    "valgrind": $(json_str "$(valgrind --version)"),
    "kernel": $(json_str "$(uname -srm)"),
    "top": $TOP,
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
EOF

RUNS="$OUT/runs.jsonl"
: >"$RUNS"

# --- one run -----------------------------------------------------------------------------
# run_one CONFIG WORKLOAD SECONDS LABEL   (LABEL: base, short or long)
run_one() {
    local config="$1" workload="$2" secs="$3" label="$4"
    local tag="$config-$workload-$label"
    local sock="$WORK/$tag.sock"
    local bin args=(--sandbox none --seccomp none)
    case "$config" in
        leasefsd-default) bin="$LEASEFSD"; args+=(--queue-poll-us 0) ;;
        leasefsd-*) bin="$LEASEFSD"; args+=(--queue-poll-us 0 --cache "${config#leasefsd-}") ;;
        virtiofsd-*) bin="$VIRTIOFSD"; args+=(--cache "${config#virtiofsd-}") ;;
    esac
    rm -f "$OUT/cg/$tag".*.out
    if ! start_daemon "$sock" 600 "$OUT/logs/$tag.daemon.log" \
        env ${SHIM:+LD_PRELOAD="$SHIM"} valgrind --tool=callgrind --trace-children=yes \
        --callgrind-out-file="$OUT/cg/$tag.%p.out" \
        "$bin" --socket-path "$sock" --shared-dir "$SHARE" "${args[@]}"; then
        log "ERROR: $tag: the daemon did not create its socket (see $OUT/logs/$tag.daemon.log)"
        echo "{\"config\":\"$config\",\"workload\":\"$workload\",\"label\":\"$label\",\"error\":\"daemon did not start\"}" >>"$RUNS"
        return 0
    fi
    local line status=0
    line="$("$BENCH" --socket "$sock" --workload "$workload" --threads 1 --queues 1 \
        --seconds "$secs" --json 2>"$OUT/logs/$tag.bench.log")" || status=$?
    # The daemon exits when the frontend disconnects; callgrind then writes its profile.
    stop_daemon 600 "$tag"
    local dstatus=$DAEMON_STATUS
    rm -f "$sock"
    local files=() f ir=0 t
    for f in "$OUT/cg/$tag".*.out; do
        [ -e "$f" ] || continue
        files+=("$(basename "$f")")
        t="$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$f" | head -n1)"
        [ -n "$t" ] || t="$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$f" | head -n1)"
        ir=$((ir + ${t:-0}))
    done
    local flist
    flist="$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))' ${files[@]+"${files[@]}"})"
    if [ $status -ne 0 ] || [ "${line:0:1}" != "{" ] || [ ${#files[@]} -eq 0 ] || [ "$ir" -eq 0 ]; then
        local why
        why="$(tail -n1 "$OUT/logs/$tag.bench.log" 2>/dev/null || true)"
        [ ${#files[@]} -gt 0 ] || why="no callgrind profile (daemon exit status $dstatus; see logs/$tag.daemon.log) $why"
        log "ERROR: $tag: bench exit status $status: $why"
        echo "{\"config\":\"$config\",\"workload\":\"$workload\",\"label\":\"$label\",\"error\":$(json_str "exit $status: $why"),\"files\":$flist}" >>"$RUNS"
        return 0
    fi
    echo "{\"config\":\"$config\",\"label\":\"$label\",\"ir\":$ir,\"daemon_exit\":$dstatus,\"files\":$flist,${line:1}" >>"$RUNS"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("instructions.sh:   %-17s %-13s %-5s %8d ops  %14s Ir" % (sys.argv[2], r["workload"], sys.argv[3], r["ops"], format(int(sys.argv[4]), ",")), file=sys.stderr)' "$line" "$config" "$label" "$ir"
}

# --- the matrix --------------------------------------------------------------------------
LONG="$(python3 -c 'import sys; print(3 * float(sys.argv[1]))' "$SECONDS_PER_RUN")"
n=0; total=0
for w in $WORKLOADS; do for c in $CONFIGS; do total=$((total + 1)); done; done
for w in $WORKLOADS; do
    for c in $CONFIGS; do
        n=$((n + 1))
        log "[$n/$total] $c, $w"
        run_one "$c" "$w" 0 base
        run_one "$c" "$w" "$SECONDS_PER_RUN" short
        run_one "$c" "$w" "$LONG" long
    done
done

python3 "$REPO/benches/instructions.py" "$OUT"
echo
cat "$OUT/instructions.md"
echo
log "results in $OUT (runs.jsonl, instructions.md, instructions.json, cg/)"
