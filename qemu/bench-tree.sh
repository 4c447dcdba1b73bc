#!/usr/bin/env bash
# Cached re-reads of a small file tree in a guest: leasefsd against
# virtiofsd 1.14, every configuration in the same run.
#
# Usage: qemu/bench-tree.sh [--rounds R] [--repeat N] [--out DIR] [--configs "NAME..."]
#                           [--files N] [--size BYTES] [--timeout SECS] [--no-build]
#                           [--stack NAME] [--qemu PATH] [--kernel PATH]
#
#   --stack NAME   the VM stack (default stock): stock, notify, qemu-only,
#                  kernel-only, as for qemu/stress.sh; --qemu and --kernel name
#                  the patched parts (default build/notify/, from
#                  qemu/build-notify-stack.sh)
#   --rounds R     warm passes per guest run (default 20); the guest reports
#                  their median, p10 and p90
#   --repeat N     run the whole configuration sequence N times, interleaved
#                  (A B C D A B C D for N=2, the default) to even out drift
#   --out DIR      results directory (default build/bench-tree/<time>)
#   --configs LIST configurations in order (default: the first four below)
#   --files N / --size BYTES   the tree (default 200 files of 16384 bytes)
#   --timeout SECS per VM (default 900)
#   --no-build     use the binaries already in target/
#   --count-requests  after the timed runs, boot each configuration twice more
#                  with the daemon logging every FUSE request (--log-level
#                  trace) and bench-tree --rounds 1 and 3; the difference / 2
#                  is the request mix of one warm pass (requests.md, appended
#                  to results.md). Explains the timings; slow, not timed.
#
# Configurations (all with --sandbox none):
#   leasefsd-default         leasefsd (default cache mode: coherent, 1 s leases with
#                            host writers held)
#   virtiofsd-auto           virtiofsd --cache auto
#   virtiofsd-always         virtiofsd --cache always (fast, but serves stale data)
#   leasefsd-always          leasefsd --cache always
#   leasefsd-lease0          leasefsd --lease-timeout 0 (coherent without leases: the
#                            guest revalidates every use, host writers never wait)
#   virtiofsd-never          virtiofsd --cache never
#
# It builds once (leasefsd release, guest-tests for the host and static for
# the guest, the initramfs), creates the tree once on the host in a scratch
# share (guest-tests bench-tree --create), then boots one fresh VM per run,
# never two at a time, each running `guest-tests bench-tree` against
# /mnt/tree: a checked cold pass, then R timed warm passes (readdir, stat,
# open, read, close of every file).
#
# Output in DIR: results.jsonl (the guest's JSON line per run plus config,
# daemon arguments, repeat index and the load average before it),
# results.md (table per configuration: warm median/p10/p90 and cold ms, the
# median over the repeats, ratio of warm medians to virtiofsd-auto; the
# individual runs; machine load at start and end), logs/ (each VM's logs).
# The table is printed at the end. Exits non-zero if any guest run failed
# (its results are then missing from the table).
#
# TCG guests are slow and noisy: run on an otherwise idle machine, and read
# the p10/p90 spread and the per-run rows before trusting a small difference.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rounds=20
repeat=2
out=""
configs="leasefsd-default virtiofsd-auto virtiofsd-always leasefsd-always"
files=200
size=16384
timeout_secs=900
build=1
count_requests=0
stack=stock
notify_qemu=${LEASEFS_NOTIFY_QEMU:-$LEASEFS_NOTIFY_DIR/qemu-system-x86_64}
notify_kernel=${LEASEFS_NOTIFY_KERNEL:-$LEASEFS_NOTIFY_DIR/bzImage}
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) [ $# -ge 2 ] || die "--rounds needs a number"; rounds=$2; shift ;;
        --repeat) [ $# -ge 2 ] || die "--repeat needs a number"; repeat=$2; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift ;;
        --configs) [ $# -ge 2 ] || die "--configs needs a list"; configs=$2; shift ;;
        --files) [ $# -ge 2 ] || die "--files needs a number"; files=$2; shift ;;
        --size) [ $# -ge 2 ] || die "--size needs a number"; size=$2; shift ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --no-build) build=0 ;;
        --count-requests) count_requests=1 ;;
        --stack) [ $# -ge 2 ] || die "--stack needs a name"; stack=$2; shift ;;
        --qemu) [ $# -ge 2 ] || die "--qemu needs a path"; notify_qemu=$2; shift ;;
        --kernel) [ $# -ge 2 ] || die "--kernel needs a path"; notify_kernel=$2; shift ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
for v in rounds repeat files size timeout_secs; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${v%_secs} wants a positive number, got '${!v}'"
done

spec=$(stack_spec "$stack" "$notify_qemu" "$notify_kernel") \
    || die "unknown stack '$stack' (stock, notify, qemu-only, kernel-only)"
read -r stack_qemu stack_kernel <<< "$spec"
check_stack "$stack" "$stack_qemu" "$stack_kernel"
mapfile -t vm_args < <(stack_vm_args "$stack_qemu" "$stack_kernel")

read -r -a config_list <<< "$configs"
[ "${#config_list[@]}" -gt 0 ] || die "--configs is empty"
for c in "${config_list[@]}"; do
    [ -n "${cfg_daemon[$c]:-}" ] && [ "$c" != two-leasefsd ] \
        || die "unknown configuration '$c' (try --help)"
done

require_cargo
command -v jq >/dev/null 2>&1 || install_pkgs jq
cd "$LEASEFS_ROOT"
[ -n "$out" ] || out="$LEASEFS_ROOT/build/bench-tree/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/logs"
out=$(cd "$out" && pwd -P)
load_start="$(uptime)"
log "load at start: $load_start"

# ------------------------------------------------------------- builds
prepare_vm_runs "$build"
host_gt="$LEASEFS_TARGET/release/guest-tests"
[ -x "$host_gt" ] || die "host guest-tests binary missing: $host_gt"
for c in "${config_list[@]}"; do
    if [ "${cfg_daemon[$c]}" = virtiofsd ]; then
        ensure_virtiofsd >/dev/null || exit 1
    fi
done

# ------------------------------------------------------------- the tree
share=$(mktemp -d /tmp/leasefs-bench-tree.XXXXXX)
trap 'rm -rf "$share"' EXIT
"$host_gt" bench-tree --create --dir "$share/tree" --files "$files" --size "$size" \
    || die "creating the tree failed"

# ------------------------------------------------------------- runs
: > "$out/results.jsonl"
failed=()
runs=0
total=$(( repeat * ${#config_list[@]} ))
for ((rep = 1; rep <= repeat; rep++)); do
    for c in "${config_list[@]}"; do
        runs=$((runs + 1))
        daemon=${cfg_daemon[$c]}
        dargs=()
        for a in ${cfg_args[$c]}; do dargs+=(--daemon-arg "$a"); done
        load=$(cut -d' ' -f1-3 /proc/loadavg)
        logdir="$out/logs/$rep-$c"
        log "run $runs/$total: $c ($daemon ${cfg_args[$c]}), load $load"
        status=0
        LEASEFS_LOG_DIR="$logdir" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build "${vm_args[@]}" \
            --share "$share" --daemon "$daemon" "${dargs[@]}" --timeout "$timeout_secs" \
            -- guest-tests bench-tree --dir /mnt/tree --files "$files" --size "$size" \
               --rounds "$rounds" > "$logdir.out" 2>&1 || status=$?
        line=$(tr -d '\r' < "$logdir.out" | grep -a -o '{"files":[^}]*}' | tail -n 1 || true)
        if [ "$status" -ne 0 ] || [ -z "$line" ]; then
            log "run $runs/$total: $c FAILED (status $status); output in $logdir.out:"
            tail -n 20 "$logdir.out" >&2
            failed+=("$rep-$c (status $status)")
            continue
        fi
        log "run $runs/$total: $c: $line"
        jq -c --arg config "$c" --arg daemon "$daemon" --arg args "${cfg_args[$c]}" \
            --argjson repeat "$rep" --arg load "$load" \
            '{config: $config, daemon: $daemon, args: $args, repeat: $repeat, load_before: $load} + .' \
            <<< "$line" >> "$out/results.jsonl"
    done
done
load_end="$(uptime)"
log "load at end: $load_end"

# ------------------------------------------------------------- request counts
# Opcode counts from a daemon log: leasefsd (fuse-backend-rs) logs
# "fuse: new req Lookup: ...", virtiofsd "Received request: opcode=Lookup (1)".
count_ops() {
    grep -a -oE 'new req [A-Za-z]+|Received request: opcode=[A-Za-z]+' "$1" \
        | sed -E 's/.*(req |opcode=)//' | sort | uniq -c | awk '{print $2, $1}'
}
requests_md=""
if [ "$count_requests" -eq 1 ]; then
    requests_md="$out/requests.md"
    {
        echo "FUSE requests of one warm pass (from daemon logs: (requests with --rounds 3) - (--rounds 1), / 2;"
        echo "one run each, so a LOOKUP/GETATTR count that depends on a 1 s timeout expiring is approximate)."
        echo
        echo "| config | requests per pass | per file | mix per pass |"
        echo "|---|---|---|---|"
    } > "$requests_md"
    for c in "${config_list[@]}"; do
        dargs=()
        for a in ${cfg_args[$c]} --log-level trace; do dargs+=(--daemon-arg "$a"); done
        for r in 1 3; do
            logdir="$out/logs/requests-$c-r$r"
            log "request count: $c, --rounds $r"
            status=0
            LEASEFS_LOG_DIR="$logdir" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build "${vm_args[@]}" \
                --share "$share" --daemon "${cfg_daemon[$c]}" "${dargs[@]}" --timeout "$timeout_secs" \
                -- guest-tests bench-tree --dir /mnt/tree --files "$files" --size "$size" \
                   --rounds "$r" > "$logdir.out" 2>&1 || status=$?
            if [ "$status" -ne 0 ]; then
                failed+=("requests-$c-r$r (status $status)")
                continue 2
            fi
            count_ops "$logdir/daemon.log" > "$logdir.ops"
        done
        join -a1 -a2 -e 0 -o 0,1.2,2.2 <(sort "$out/logs/requests-$c-r1.ops") \
            <(sort "$out/logs/requests-$c-r3.ops") \
            | awk -v c="$c" -v files="$files" '
                { d = ($3 - $2) / 2; if (d != 0) { tot += d; mix = mix sprintf("%s %g, ", $1, d) } }
                END { sub(/, $/, "", mix)
                      printf "| %s | %g | %.1f | %s |\n", c, tot, tot / files, mix }' >> "$requests_md"
    done
fi

# ------------------------------------------------------------- report
# Per configuration: the median over its runs of each metric (the mean of the
# two for --repeat 2); ratio = warm median / virtiofsd-auto's warm median.
summary=$(jq -rs --argjson order "$(printf '%s\n' "${config_list[@]}" | jq -R . | jq -cs .)" '
    def med: sort | if length == 0 then null
             elif length % 2 == 1 then .[length / 2 | floor]
             else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def f: if . == null then "-" else (. * 10 | round / 10 | tostring) end;
    def ratio($m; $b): if $m == null or $b == null then "-" else ($m / $b * 100 | round / 100 | tostring) end;
    (map(select(.config == "virtiofsd-auto")) | map(.warm_ms_median) | med) as $base
    | (map(select(.config == "virtiofsd-always")) | map(.warm_ms_median) | med) as $always
    | $order[] as $c
    | map(select(.config == $c)) as $r
    | ($r | map(.warm_ms_median) | med) as $m
    | "| \($c) | \($r[0].args // "-") | \($r | length) | \($m | f) | \($r | map(.warm_ms_p10) | med | f) | \($r | map(.warm_ms_p90) | med | f) | \($r | map(.cold_ms) | med | f) | \(ratio($m; $base)) | \(ratio($m; $always)) |"
' "$out/results.jsonl")
per_run=$(jq -r '
    def f: . * 10 | round / 10 | tostring;
    "| \(.repeat) | \(.config) | \(.warm_ms_median | f) | \(.warm_ms_p10 | f) | \(.warm_ms_p90 | f) | \(.cold_ms | f) | \(.load_before) |"
' "$out/results.jsonl")

{
    echo "# bench-tree: cached re-reads of a $files-file tree, stack $stack"
    echo
    qemu_bin=qemu-system-x86_64
    [ "$stack_qemu" = - ] || qemu_bin=$stack_qemu
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, QEMU $("$qemu_bin" --version | head -n1 | sed 's/.*version //'), guest kernel ${stack_kernel/#-/Debian 6.12 cloud}, accel ${LEASEFS_ACCEL:-tcg}, guest SMP ${LEASEFS_SMP:-2}."
    echo "Tree: $files files of $size bytes in $(( files < 10 ? files : 10 )) directories. Each guest run: one cold pass (checked content),"
    echo "then $rounds warm passes (readdir, stat, open, read to EOF, close of every file, by full path)."
    echo "Sequence repeated $repeat times, interleaved; each run in a fresh VM."
    echo
    echo "- load at start: \`$load_start\`"
    echo "- load at end: \`$load_end\`"
    echo
    echo "Per configuration, the median over its runs of each run's figure (ms, one pass over the tree);"
    echo "ratios = warm median / virtiofsd-auto's or virtiofsd-always' warm median (lower is faster)."
    echo
    echo "| config | daemon args | runs | warm median ms | p10 | p90 | cold ms | vs virtiofsd-auto | vs virtiofsd-always |"
    echo "|---|---|---|---|---|---|---|---|---|"
    echo "$summary"
    echo
    echo "Individual runs:"
    echo
    echo "| repeat | config | warm median ms | p10 | p90 | cold ms | load before |"
    echo "|---|---|---|---|---|---|---|"
    echo "$per_run"
    if [ -n "$requests_md" ]; then
        echo
        cat "$requests_md"
    fi
    if [ "${#failed[@]}" -gt 0 ]; then
        echo
        echo "FAILED runs (not in the tables; logs in logs/):"
        for f in "${failed[@]}"; do echo "- $f"; done
    fi
} > "$out/results.md"

echo
cat "$out/results.md"
echo
echo "results: $out"
[ "${#failed[@]}" -eq 0 ]
