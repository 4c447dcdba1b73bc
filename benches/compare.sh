#!/usr/bin/env bash
# Compare leasefsd with virtiofsd 1.14 through leasefs's own vhost-user frontend
# (target/release/leasefs-bench): same machine, same share directory, one run.
#
#   benches/compare.sh [--seconds S] [--threads "1 2"] [--workloads "getattr lookup ..."]
#                      [--out DIR] [--pin CPUS]
#
# For every workload x thread count it runs, interleaved (the order rotates per cell):
#   virtiofsd              (it offers one request queue)
#   leasefsd  (leasefs-bench --queues 1: as many queues as virtiofsd)
#   leasefsd  (leasefs-bench --queues T: one queue per thread; only when T > 1)
# each against a freshly started daemon, and appends the bench's JSON line plus
# "daemon" and "loadavg" fields to DIR/results.jsonl. benches/report.py then writes
# DIR/results.md and DIR/results.svg. Run it on an otherwise idle machine: before each cell
# it waits (up to $WAIT_IDLE seconds, default 600) while rustc, cargo, a linker, QEMU or
# valgrind is running, and flags runs that overlapped one.
#
# --pin CPUS runs the daemon and the bench under `taskset -c CPUS`. On a VM whose idle vCPUs
# are slow to wake (see docs/performance.md), --pin 0 removes the scheduler's random choice
# of same-CPU or cross-CPU wake-ups, at the cost of measuring on one CPU.
set -euo pipefail

SECONDS_PER_RUN=5
THREADS="1 2"
ALL_WORKLOADS="getattr lookup read4k write4k read1m create-unlink readdirplus"
WORKLOADS="$ALL_WORKLOADS"
OUT=""
PIN=""

usage() {
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECONDS_PER_RUN="$2"; shift 2 ;;
        --seconds=*) SECONDS_PER_RUN="${1#*=}"; shift ;;
        --threads) THREADS="$2"; shift 2 ;;
        --threads=*) THREADS="${1#*=}"; shift ;;
        --workloads) WORKLOADS="$2"; shift 2 ;;
        --workloads=*) WORKLOADS="${1#*=}"; shift ;;
        --out) OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#*=}"; shift ;;
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
for t in $THREADS; do
    case "$t" in
        ''|*[!0-9]*|0) echo "compare.sh: bad thread count '$t'" >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
[ -n "$OUT" ] || OUT="$REPO/build/bench/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"

log() { echo "compare.sh: $*" >&2; }

# --- build -------------------------------------------------------------------------------
log "building leasefsd and leasefs-bench (release, target dir $TARGET_DIR)"
cargo build --release --bin leasefs-bench --bin leasefsd
LEASEFSD="$TARGET_DIR/release/leasefsd"
BENCH="$TARGET_DIR/release/leasefs-bench"

# --- virtiofsd ---------------------------------------------------------------------------
VIRTIOFSD=""
find_virtiofsd() {
    if command -v virtiofsd >/dev/null 2>&1; then
        VIRTIOFSD="$(command -v virtiofsd)"
    elif [ -x "$HOME/.cargo/bin/virtiofsd" ]; then
        VIRTIOFSD="$HOME/.cargo/bin/virtiofsd"
    fi
}
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
cleanup() {
    if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
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
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

LOAD_START="$(loadavg)"
case "$LOAD_START" in
    0.*|1.0*) ;;
    *) log "WARNING: load average is $LOAD_START; is something else running? (results will be noisy)" ;;
esac

# --- machine and versions (report.py reads meta.json) ------------------------------------
CPU_MODEL="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
[ -n "$CPU_MODEL" ] || CPU_MODEL="unknown"
GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# An uncommitted tree is named by a hash of its changes, so two runs can be told apart.
GIT_TREE=""
if [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    GIT_REV="$GIT_REV+dirty"
    GIT_TREE="$({ git diff HEAD -- src Cargo.toml Cargo.lock
                  git ls-files -o --exclude-standard -z -- src | xargs -0 -r cat; } |
                sha256sum | cut -c1-12)"
fi
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
    "threads": $(json_str "$THREADS"),
    "workloads": $(json_str "$WORKLOADS"),
    "leasefs_rev": $(json_str "$GIT_REV"),
    "leasefs_tree": $(json_str "$GIT_TREE"),
    "virtiofsd_version": $(json_str "$VIRTIOFSD_VERSION"),
    "share_fs": $(json_str "$SHARE_FS"),
    "daemon_args": "--cache always --sandbox none",
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
# run_one DAEMON WORKLOAD THREADS QUEUES
run_one() {
    local daemon="$1" workload="$2" threads="$3" queues="$4"
    local tag="$workload-t$threads-$daemon-q$queues"
    local sock="$WORK/$tag.sock"
    local bin
    case "$daemon" in
        leasefsd) bin="$LEASEFSD" ;;
        virtiofsd) bin="$VIRTIOFSD" ;;
    esac
    local pin=()
    [ -z "$PIN" ] || pin=(taskset -c "$PIN")
    rm -f "$sock"
    ${pin[@]+"${pin[@]}"} "$bin" --socket-path "$sock" --shared-dir "$SHARE" --cache always --sandbox none \
        >"$OUT/logs/$tag.daemon.log" 2>&1 &
    DAEMON_PID=$!
    local i=0
    while [ ! -S "$sock" ]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null || [ $i -ge 100 ]; then
            log "ERROR: $daemon did not create its socket (see $OUT/logs/$tag.daemon.log)"
            kill "$DAEMON_PID" 2>/dev/null || true
            wait "$DAEMON_PID" 2>/dev/null || true
            DAEMON_PID=""
            echo "{\"daemon\":\"$daemon\",\"workload\":\"$workload\",\"threads\":$threads,\"queues\":$queues,\"error\":\"daemon did not start\"}" >>"$RESULTS"
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done

    local load line status=0 others
    load="$(loadavg)"
    others="$(busy)"
    line="$(${pin[@]+"${pin[@]}"} "$BENCH" --socket "$sock" --workload "$workload" --threads "$threads" \
        --queues "$queues" --seconds "$SECONDS_PER_RUN" --json 2>"$OUT/logs/$tag.bench.log")" || status=$?

    # The daemon exits once the frontend disconnects; give it a moment, then stop it.
    i=0
    while kill -0 "$DAEMON_PID" 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        log "note: $daemon still running after the bench disconnected; sending SIGTERM"
        kill "$DAEMON_PID" 2>/dev/null || true
    fi
    wait "$DAEMON_PID" 2>/dev/null || true
    DAEMON_PID=""
    rm -f "$sock"

    if [ $status -ne 0 ] || [ "${line:0:1}" != "{" ]; then
        local why
        why="$(tail -n1 "$OUT/logs/$tag.bench.log" 2>/dev/null || true)"
        log "ERROR: $tag: leasefs-bench exit status $status: $why"
        echo "{\"daemon\":\"$daemon\",\"workload\":\"$workload\",\"threads\":$threads,\"queues\":$queues,\"loadavg\":\"$load\",\"error\":$(json_str "exit $status: $why")${line:+,\"partial\":$line}}" >>"$RESULTS"
        return 0
    fi
    others="$others $(busy)"
    others="$(echo $others | tr ' ' '\n' | sort -u | tr '\n' ' ' | sed 's/ $//')"
    [ -z "$others" ] || log "WARNING: $tag: ran while '$others' was running"
    echo "{\"daemon\":\"$daemon\",\"loadavg\":\"$load\",\"others\":\"$others\",${line:1}" >>"$RESULTS"
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("compare.sh:   %-10s q%-2s %12.1f ops/s  p50 %8.2f us  p99 %8.2f us" % (sys.argv[2], r["queues"], r["ops_per_sec"], r["p50_us"], r["p99_us"]), file=sys.stderr)' "$line" "$daemon"
}

# --- the matrix --------------------------------------------------------------------------
n_cells=0
for w in $WORKLOADS; do for t in $THREADS; do n_cells=$((n_cells + 1)); done; done
cell=0
for w in $WORKLOADS; do
    for t in $THREADS; do
        cell=$((cell + 1))
        configs=()
        [ -n "$VIRTIOFSD" ] && configs+=("virtiofsd:1")
        configs+=("leasefsd:1")
        [ "$t" -gt 1 ] && configs+=("leasefsd:$t")
        # Rotate the order per cell so that neither daemon always runs first.
        n=${#configs[@]}
        wait_idle
        log "[$cell/$n_cells] $w, $t thread(s) (load $(loadavg))"
        for ((k = 0; k < n; k++)); do
            c="${configs[$(((k + cell) % n))]}"
            run_one "${c%%:*}" "$w" "$t" "${c##*:}"
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
