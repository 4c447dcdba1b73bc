#!/usr/bin/env bash
# What a caching guest costs host tools: one VM per daemon configuration, in one run, each
# running `guest-tests hostcost` (guest-tests/src/hostcost.rs) against the host agent.
#
# Usage: qemu/host-cost.sh [--files N] [--out DIR] [--configs "NAME..."] [--timeout SECS]
#                          [--no-build]
#
# Workloads (the host agent plays the host tool; the guest the user of the tree):
#   idle     rewrite N files in place (open, write, close) one after another; the guest
#            read them before and is idle
#   loop     the same while the guest reads the tree in a loop (an IDE indexer)
#   save     write a temporary file and rename it over each file, guest reading in a loop
#   logger   append a line every 50 ms for 10 s, reopening the file (`echo >> log`), while
#            the guest polls it every 10 ms
# Each reports the host tool's wall time, how long its calls were blocked in all and their
# p50/p99/max, and stale reads: guest reads started after the host tool returned that still
# gave an older version.
#
# Configurations (stock QEMU and kernel, --sandbox none, fresh share each):
#   leasefsd-default    leasefsd (coherent, 1 s leases, adaptive)
#   leasefsd-fixed      leasefsd --lease-cooldown 0 (leases without adaptation: the cost
#                       before issue 12)
#   virtiofsd-auto      virtiofsd 1.14 --cache auto
#   virtiofsd-always    virtiofsd 1.14 --cache always
#
# Output: DIR/results.md (a table, also printed), DIR/host-cost.svg (the blocked time per
# workload and configuration, qemu/plot-host-cost.py) and DIR/logs/ (default
# build/host-cost/<time>/). Run on an otherwise idle machine: a TCG guest is slow and noisy.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

files=200
out=""
configs="leasefsd-default leasefsd-fixed virtiofsd-auto virtiofsd-always"
timeout_secs=1800
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --files) [ $# -ge 2 ] || die "--files needs a number"; files=$2; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift ;;
        --configs) [ $# -ge 2 ] || die "--configs needs names"; configs=$2; shift ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --no-build) build=0 ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
[ -n "$out" ] || out="$LEASEFS_ROOT/build/host-cost/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/logs"
require_cargo
mk_args=()
if [ "$build" -eq 1 ]; then
    cargo build --release --bin leasefsd >&2
    cargo build --release -p guest-tests >&2
else
    mk_args+=(--no-build)
fi
"$LEASEFS_QEMU_DIR/make-initramfs.sh" "${mk_args[@]}" >/dev/null

failed=0
: > "$out/results.txt"
for cfg in $configs; do
    case "$cfg" in
        leasefsd-default) daemon=leasefsd; dargs=(--sandbox none) ;;
        leasefsd-fixed) daemon=leasefsd; dargs=(--sandbox none --lease-cooldown 0) ;;
        virtiofsd-auto) daemon=$(ensure_virtiofsd); dargs=(--sandbox none --cache auto) ;;
        virtiofsd-always) daemon=$(ensure_virtiofsd); dargs=(--sandbox none --cache always) ;;
        *) die "unknown configuration $cfg (try --help)" ;;
    esac
    args=()
    for a in "${dargs[@]}"; do args+=(--daemon-arg "$a"); done
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    log "VM $cfg: $daemon ${dargs[*]}"
    status=0
    LEASEFS_LOG_DIR="$out/logs/$cfg" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --agent \
        --share "$share" --daemon "$daemon" "${args[@]}" --timeout "$timeout_secs" \
        -- guest-tests hostcost --files "$files" --label "$cfg" > "$out/logs/$cfg.out" 2>&1 \
        || status=$?
    rm -rf "$share"
    grep -a '^HOSTCOST ' "$out/logs/$cfg.out" | tr -d '\r' >> "$out/results.txt" || true
    if [ "$status" -ne 0 ]; then
        warn "$cfg: the guest run failed (status $status, $out/logs/$cfg.out)"
        failed=1
    fi
done

# The table: one row per configuration and workload.
{
    echo "| configuration | workload | host wall (ms) | blocked (ms) | hold p50 / p99 / max (ms) | host calls | guest reads | stale reads |"
    echo "|---|---|---|---|---|---|---|---|"
    awk '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
        printf "| %s | %s | %s | %s | %s / %s / %s | %s | %s | %s |\n", f["config"], f["workload"],
            f["host_wall_ms"], f["blocked_ms"], f["hold_p50_ms"], f["hold_p99_ms"], f["hold_max_ms"],
            f["calls"], f["guest_reads"], f["stale_reads"]
    }' "$out/results.txt"
} > "$out/results.md"
cat "$out/results.md"
if command -v python3 >/dev/null 2>&1 && [ -s "$out/results.txt" ]; then
    python3 "$LEASEFS_QEMU_DIR/plot-host-cost.py" "$out/results.txt" "$out/host-cost.svg" \
        && log "plot: $out/host-cost.svg"
fi
log "results: $out/results.md"
exit "$failed"
