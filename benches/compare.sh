#!/usr/bin/env bash
# Compare leasefsd with virtiofsd 1.14 through leasefs's own vhost-user frontend
# (target/release/leasefs-bench): same machine, same share directory, one run.
#
#   benches/compare.sh [--seconds S] [--repeat N] [--threads "1 2"] [--workloads "getattr lookup ..."]
#                      [--caches "default always"] [--virtiofsd-caches "auto always"]
#                      [--out DIR] [--pin CPUS] [--leasefsd BIN --bench BIN [--label TEXT]]
#
# For every workload x thread count T it runs, interleaved (the order rotates per cell):
#   virtiofsd --cache auto and --cache always   (it offers one request queue)
#   leasefsd (no --cache: coherent, its default) and --cache always,
#            each with leasefs-bench --queues 1 (as many queues as virtiofsd) and,
#            when T > 1, --queues T (one queue per thread)
# each against a freshly started daemon (--sandbox none), and appends the bench's JSON line
# plus "daemon", "cache" and "loadavg" fields to DIR/results.jsonl. benches/report.py then
# writes DIR/results.md and DIR/results.svg. Run it on an otherwise idle machine: before each
# cell it waits (up to $WAIT_IDLE seconds, default 600) while rustc, cargo, a linker, QEMU or
# valgrind is running, and flags runs that overlapped one. With the defaults (7 workloads,
# 1 and 2 threads, 3 s, 3 repeats) that is 210 runs, about 17 minutes.
#
# --repeat N runs each cell's interleaved sequence N times (the order rotating each time);
# the report gives each configuration's median run. On this 2-core machine one run's figure
# depends on where the scheduler puts the daemon's and the bench's threads (the same CPU or
# two: 52-56k against 36-37k lookups/s in one measurement), which a single run cannot
# average out; --repeat 1 --seconds 5 is the old single-run matrix (about 8 minutes).
#
# --caches / --virtiofsd-caches choose the cache modes (leasefsd: default = no --cache flag).
# --leasefsd and --bench use given binaries instead of building the work tree (--label then
# names them in the report, e.g. a commit).
# --pin CPUS runs the daemon and the bench under `taskset -c CPUS`. On a VM whose idle vCPUs
# are slow to wake (see docs/performance.md), --pin 0 removes the scheduler's random choice
# of same-CPU or cross-CPU wake-ups, at the cost of measuring on one CPU.
set -euo pipefail

SECONDS_PER_RUN=3
REPEAT=3
THREADS="1 2"
ALL_WORKLOADS="getattr lookup read4k write4k read1m create-unlink readdirplus"
WORKLOADS="$ALL_WORKLOADS"
OUT=""
PIN=""
LEASEFSD_CACHES="default always"
LEASEFSD=""
BENCH=""
LABEL=""
VIRTIOFSD_CACHES="auto always"

usage() {
    awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
        --seconds=*) SECONDS_PER_RUN="${1#*=}"; shift ;;
        --repeat) REPEAT="$2"; shift 2 ;;
        --repeat=*) REPEAT="${1#*=}"; shift ;;
        --threads) THREADS="$2"; shift 2 ;;
        --threads=*) THREADS="${1#*=}"; shift ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --workloads=*) WORKLOADS="${1#*=}"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
        --caches) LEASEFSD_CACHES="$2"; shift 2 ;;
        --caches=*) LEASEFSD_CACHES="${1#*=}"; shift ;;
        --virtiofsd-caches) VIRTIOFSD_CACHES="$2"; shift 2 ;;
        --virtiofsd-caches=*) VIRTIOFSD_CACHES="${1#*=}"; shift ;;
        --leasefsd) LEASEFSD="$2"; shift 2 ;;
        --leasefsd=*) LEASEFSD="${1#*=}"; shift ;;
        --bench) BENCH="$2"; shift 2 ;;
        --bench=*) BENCH="${1#*=}"; shift ;;
        --label) LABEL="$2"; shift 2 ;;
        --label=*) LABEL="${1#*=}"; shift ;;
        --pin) PIN="$2"; shift 2 ;;
        --pin=*) PIN="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

for w in $WORKLOADS; do
    case " $ALL_WORKLOADS " in
        *" $w "*) ;;
        *) echo "compare.sh: unknown workload '$w' (known: $ALL_WORKLOADS)" >&2; exit 2 ;;
    esac
done
for c in $LEASEFSD_CACHES; do
    case "$c" in
        default|coherent|auto|always|metadata|never) ;;
        *) echo "compare.sh: bad leasefsd cache mode '$c'" >&2; exit 2 ;;
    esac
done
for c in $VIRTIOFSD_CACHES; do
    case "$c" in
        auto|always|metadata|never) ;;
        *) echo "compare.sh: bad virtiofsd cache mode '$c'" >&2; exit 2 ;;
    esac
done
case "$REPEAT" in
    ''|*[!0-9]*|0) echo "compare.sh: bad --repeat '$REPEAT' (a count of 1 or more)" >&2; exit 2 ;;
esac
for t in $THREADS; do
    case "$t" in
        ''|*[!0-9]*|0) echo "compare.sh: bad thread count '$t'" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# shellcheck source=benches/common.sh
. "$REPO/benches/common.sh"
[ -n "$OUT" ] || OUT="$REPO/build/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"

log() { echo "compare.sh: $*" >&2; }

# --- build -------------------------------------------------------------------------------
build_binaries

# --- virtiofsd ---------------------------------------------------------------------------
VIRTIOFSD=""
find_virtiofsd
if [ -z "$VIRTIOFSD" ]; then
    log "virtiofsd not found; installing virtiofsd 1.14.0 with cargo (about a minute)"
    if { apt-get install -y libseccomp-dev libcap-ng-dev &&
         cargo install virtiofsd --version 1.14.0 --locked; } >"$OUT/logs/virtiofsd-install.log" 2>&1; then
        find_virtiofsd
    fi
    if [ -z "$VIRTIOFSD" ]; then
        log "WARNING: could not install virtiofsd (see $OUT/logs/virtiofsd-install.log);"
        log "WARNING: benchmarking leasefsd alone, the report will have no ratios"
    fi
fi
VIRTIOFSD_VERSION="none"
if [ -n "$VIRTIOFSD" ]; then
    VIRTIOFSD_VERSION="$("$VIRTIOFSD" --version 2>/dev/null | head -n1 || echo unknown)"
    case "$VIRTIOFSD_VERSION" in
        *1.14.*) ;;
        *) log "WARNING: $VIRTIOFSD is '$VIRTIOFSD_VERSION', not 1.14" ;;
    esac
fi

# --- scratch share and sockets -----------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/leasefs-compare.XXXXXX")"
SHARE="$WORK/share"
mkdir "$SHARE"
DAEMON_PID=""
trap stop_daemon_and_clean EXIT
trap 'exit 130' INT TERM

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# Other CPU-heavy programs that spoil a measurement (builds, VM tests, profilers).
BUSY_NAMES="rustc cargo cc1 cc1plus ld qemu-system-x86 callgrind-amd64 memcheck-amd64"
busy() {
    local n found=""
    for n in $BUSY_NAMES; do
        if pgrep -x "$n" >/dev/null 2>&1; then found="$found${found:+ }$n"; fi
    done
    echo "$found"
}
# Wait (up to WAIT_IDLE seconds, default 600) until none of them runs.
wait_idle() {
    local waited=0 b
    b="$(busy)"
    [ -z "$b" ] && return 0
    log "waiting for other work to finish ($b) ..."
    while [ -n "$b" ] && [ $waited -lt "${WAIT_IDLE:-600}" ]; do
        sleep 5
        waited=$((waited + 5))
        b="$(busy)"
    done
    if [ -n "$b" ]; then
        log "WARNING: still running after ${WAIT_IDLE:-600} s: $b; measuring anyway"
    else
        sleep 2
    fi
}

LOAD_START="$(loadavg)"
case "$LOAD_START" in
    0.*|1.0*) ;;
    *) log "WARNING: load average is $LOAD_START; is something else running? (results will be noisy)" ;;
esac

# --- machine and versions (report.py reads meta.json) ------------------------------------
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
[ -n "$CPU_MODEL" ] || CPU_MODEL="unknown"
leasefs_rev
SHARE_FS="$(findmnt -n -o FSTYPE -T "$SHARE" 2>/dev/null || stat -f -c %T "$SHARE")"
write_meta() {
    python3 - "$OUT/meta.json" <<EOF
import json, sys
meta = {
    "date": $(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)"),
    "nproc": $(nproc),
    "cpu_model": $(json_str "$CPU_MODEL"),
    "kernel": $(json_str "$(uname -srm)"),
    "load_start": $(json_str "$LOAD_START"),
    "load_end": $(json_str "${LOAD_END:-}"),
    "seconds": $(json_str "$SECONDS_PER_RUN"),
    "repeat": $(json_str "$REPEAT"),
    "threads": $(json_str "$THREADS"),
    "workloads": $(json_str "$WORKLOADS"),
    "leasefs_rev": $(json_str "$GIT_REV"),
    "leasefs_tree": $(json_str "$GIT_TREE"),
    "virtiofsd_version": $(json_str "$VIRTIOFSD_VERSION"),
    "share_fs": $(json_str "$SHARE_FS"),
    "daemon_args": "--sandbox none",
    "leasefsd_caches": $(json_str "$LEASEFSD_CACHES"),
    "virtiofsd_caches": $(json_str "$VIRTIOFSD_CACHES"),
    "pin": $(json_str "$PIN"),
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
EOF
}
write_meta

RESULTS="$OUT/results.jsonl"
: >"$RESULTS"

# --- one run -----------------------------------------------------------------------------
# run_one DAEMON CACHE WORKLOAD THREADS QUEUES   (CACHE "default": no --cache flag)
run_one() {
    local daemon="$1" cache="$2" workload="$3" threads="$4" queues="$5"
    local tag="$workload-t$threads-$daemon-$cache-q$queues"
    local sock="$WORK/$tag.sock"
    local bin
    case "$daemon" in
        leasefsd) bin="$LEASEFSD" ;;
        virtiofsd) bin="$VIRTIOFSD" ;;
    esac
    local args=(--sandbox none)
    [ "$cache" = default ] || args+=(--cache "$cache")
    local pin=()
    [ -z "$PIN" ] || pin=(taskset -c "$PIN")
    if ! start_daemon "$sock" 100 "$OUT/logs/$tag.daemon.log" \
        ${pin[@]+"${pin[@]}"} "$bin" --socket-path "$sock" --shared-dir "$SHARE" "${args[@]}"; then
            log "ERROR: $daemon did not create its socket (see $OUT/logs/$tag.daemon.log)"
            echo "{\"daemon\":\"$daemon\",\"cache\":\"$cache\",\"workload\":\"$workload\",\"threads\":$threads,\"queues\":$queues,\"error\":\"daemon did not start\"}" >>"$RESULTS"
            return 0
    fi

    local load line status=0 others
    load="$(loadavg)"
    others="$(busy)"
    line="$(${pin[@]+"${pin[@]}"} "$BENCH" --socket "$sock" --workload "$workload" --threads "$threads" \
        --queues "$queues" --seconds "$SECONDS_PER_RUN" --json 2>"$OUT/logs/$tag.bench.log")" || status=$?

    stop_daemon 50 "$daemon"
    rm -f "$sock"

    if [ $status -ne 0 ] || [ "${line:0:1}" != "{" ]; then
        local why
        why="$(tail -n1 "$OUT/logs/$tag.bench.log" 2>/dev/null || true)"
        log "ERROR: $tag: leasefs-bench exit status $status: $why"
        echo "{\"daemon\":\"$daemon\",\"cache\":\"$cache\",\"workload\":\"$workload\",\"threads\":$threads,\"queues\":$queues,\"loadavg\":\"$load\",\"error\":$(json_str "exit $status: $why")${line:+,\"partial\":$line}}" >>"$RESULTS"
        return 0
    fi
    others="$others $(busy)"
    # shellcheck disable=SC2086 # split on purpose
    others="$(echo $others | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/ $//')"
    [ -z "$others" ] || log "WARNING: $tag: ran while '$others' was running"
    echo "{\"daemon\":\"$daemon\",\"cache\":\"$cache\",\"loadavg\":\"$load\",\"others\":\"$others\",${line:1}" >>"$RESULTS"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("compare.sh:   %-10s %-8s q%-2s %12.1f ops/s  p50 %8.2f us  p99 %8.2f us" % (sys.argv[2], sys.argv[3], r["queues"], r["ops_per_sec"], r["p50_us"], r["p99_us"]), file=sys.stderr)' "$line" "$daemon" "$cache"
}

# --- the matrix --------------------------------------------------------------------------
n_cells=0
for w in $WORKLOADS; do for t in $THREADS; do n_cells=$((n_cells + 1)); done; done
cell=0
for w in $WORKLOADS; do
    for t in $THREADS; do
        cell=$((cell + 1))
        # daemon:cache:queues, interleaved so that a drift in the machine's speed during
        # the cell does not favour one daemon.
        configs=()
        for c in $VIRTIOFSD_CACHES; do
            [ -z "$VIRTIOFSD" ] || configs+=("virtiofsd:$c:1")
        done
        for c in $LEASEFSD_CACHES; do
            configs+=("leasefsd:$c:1")
        done
        if [ "$t" -gt 1 ]; then
            for c in $LEASEFSD_CACHES; do
                configs+=("leasefsd:$c:$t")
            done
        fi
        # Rotate the order per cell and repeat so that no configuration always runs first.
        n=${#configs[@]}
        wait_idle
        for ((r = 0; r < REPEAT; r++)); do
            log "[$cell/$n_cells] $w, $t thread(s), run $((r + 1)) of $REPEAT (load $(loadavg))"
            for ((k = 0; k < n; k++)); do
                c="${configs[$(((k + cell + r) % n))]}"
                IFS=: read -r c_daemon c_cache c_queues <<<"$c"
                run_one "$c_daemon" "$c_cache" "$w" "$t" "$c_queues"
            done
        done
    done
done

LOAD_END="$(loadavg)"
write_meta

python3 "$REPO/benches/report.py" "$OUT"
echo
cat "$OUT/results.md"
echo
log "results in $OUT (results.jsonl, results.md, results.svg)"
