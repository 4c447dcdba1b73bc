#!/usr/bin/env bash
# Coherency stress in VMs: host writers against guest readers (guest-tests
# stress), one fresh VM per daemon configuration and stack, one after another
# in one run, then a report.
#
# Usage: qemu/stress.sh [--out DIR] [--rounds N] [--seed S] [--configs "NAME..."]
#                       [--stack NAME]... [--qemu PATH] [--kernel PATH]
#                       [--strict-namespace-ms MS] [--two-guests] [--timeout SECS]
#                       [--no-build] [--stress-arg ARG]...
#
#   --out DIR       results directory (default build/stress/<time>)
#   --rounds N      rounds per guest run (default 48: four of each of the 12 kinds;
#                   about 40 to 80 s per VM under TCG)
#   --seed S        the guests' seed (default 1): same seed, same changes
#   --configs LIST  daemon configurations in order (default: the first four below)
#   --stack NAME    QEMU and guest kernel, repeatable, in order (default: stock):
#                     stock          Debian QEMU + Debian 6.12 cloud kernel
#                     notify         patched QEMU + patched kernel (alias: patched)
#                     qemu-only      patched QEMU + stock kernel (alias: patched-qemu)
#                     kernel-only    stock QEMU + patched kernel (alias: patched-kernel)
#   --qemu PATH     the patched QEMU (default $LEASEFS_NOTIFY_QEMU, else
#                   build/notify/qemu-system-x86_64 from qemu/build-notify-stack.sh)
#   --kernel PATH   the patched kernel (default $LEASEFS_NOTIFY_KERNEL, else
#                   build/notify/bzImage)
#   --strict-namespace-ms MS  leasefsd runs only: a namespace answer still stale
#                   MS ms after the change fails the run (for notify-capable stacks)
#   --two-guests    add the two-guest run (config two-leasefsd): two VMs at once,
#                   each on its own leasefsd (default mode) sharing one directory;
#                   each guest's changes are made by the other guest through its
#                   own mount, relayed by `guest-tests relay`
#   --timeout SECS  per VM (default 600)
#   --no-build      use the binaries already in target/
#   --stress-arg A  extra argument for `guest-tests stress`, repeatable
#
# Configurations (all with --sandbox none):
#   leasefsd-default   leasefsd (default cache mode: coherent, 1 s leases)
#   virtiofsd-always   virtiofsd --cache always (stale by design: proves the test can fail)
#   virtiofsd-auto     virtiofsd --cache auto
#   virtiofsd-never    virtiofsd --cache never
#   leasefsd-lease0    leasefsd --lease-timeout 0
#   leasefsd-always    leasefsd --cache always
#   two-leasefsd       (--two-guests) two guests, two leasefsd, one directory
#
# Each guest run: `guest-tests stress` with the host agent (qemu/run-vm.sh
# --agent) in a fresh scratch share. The guest primes its caches, asks the
# agent for one change, and looks only after the agent replied (after the
# host system calls returned); see guest-tests/README.md for the kinds.
#
# Output in DIR: stress.txt (every guest's STRESS lines, prefixed with stack,
# config and run status; the daemons' lease metrics lines), meta.txt,
# results.md (per run: stale data reads, stale namespace answers at 0/50 ms,
# host-writer hold p50/p99, revocation latency p50/p99, cached re-read
# throughput; then a per-kind table per run), results.svg (the same as bar
# charts; qemu/stress-report.py), logs/ (each VM's logs and output).
#
# Exit status: non-zero if a leasefsd run had a stale data read (or, with
# --strict-namespace-ms, a late stale namespace answer), or if any run did not
# complete. virtiofsd runs are reported, never failed, for staleness.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out=""
rounds=48
seed=1
configs="leasefsd-default virtiofsd-always virtiofsd-auto virtiofsd-never"
stacks=()
notify_qemu=${LEASEFS_NOTIFY_QEMU:-$LEASEFS_NOTIFY_DIR/qemu-system-x86_64}
notify_kernel=${LEASEFS_NOTIFY_KERNEL:-$LEASEFS_NOTIFY_DIR/bzImage}
strict_ms=""
two_guests=0
timeout_secs=600
build=1
stress_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift ;;
        --rounds) [ $# -ge 2 ] || die "--rounds needs a number"; rounds=$2; shift ;;
        --seed) [ $# -ge 2 ] || die "--seed needs a number"; seed=$2; shift ;;
        --configs) [ $# -ge 2 ] || die "--configs needs a list"; configs=$2; shift ;;
        --stack) [ $# -ge 2 ] || die "--stack needs a name"; stacks+=("$2"); shift ;;
        --qemu) [ $# -ge 2 ] || die "--qemu needs a path"; notify_qemu=$2; shift ;;
        --kernel) [ $# -ge 2 ] || die "--kernel needs a path"; notify_kernel=$2; shift ;;
        --strict-namespace-ms) [ $# -ge 2 ] || die "--strict-namespace-ms needs ms"; strict_ms=$2; shift ;;
        --two-guests) two_guests=1 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --no-build) build=0 ;;
        --stress-arg) [ $# -ge 2 ] || die "--stress-arg needs an argument"; stress_args+=("$2"); shift ;;
        --stress-arg=*) stress_args+=("${1#*=}") ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
for v in rounds timeout_secs; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${v%_secs} wants a positive number, got '${!v}'"
done
[[ "$seed" =~ ^[0-9]+$ ]] || die "--seed wants a number, got '$seed'"
[ -z "$strict_ms" ] || [[ "$strict_ms" =~ ^[0-9]+$ ]] || die "--strict-namespace-ms wants ms, got '$strict_ms'"
[ "${#stacks[@]}" -gt 0 ] || stacks=(stock)

read -r -a config_list <<< "$configs"
if [ "$two_guests" -eq 1 ] && [[ " $configs " != *" two-leasefsd "* ]]; then
    config_list+=(two-leasefsd)
fi
[ "${#config_list[@]}" -gt 0 ] || die "--configs is empty"
for c in "${config_list[@]}"; do
    [ -n "${cfg_daemon[$c]:-}" ] || die "unknown configuration '$c' (try --help)"
done

for s in "${stacks[@]}"; do
    spec=$(stack_spec "$s" "$notify_qemu" "$notify_kernel") \
        || die "unknown stack '$s' (stock, notify, qemu-only, kernel-only)"
    read -r sq sk <<< "$spec"
    check_stack "$s" "$sq" "$sk"
done

require_cargo
cd "$LEASEFS_ROOT"
[ -n "$out" ] || out="$LEASEFS_ROOT/build/stress/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/logs"
out=$(cd "$out" && pwd -P)

# ------------------------------------------------------------- builds
prepare_vm_runs "$build"
host_gt="$LEASEFS_TARGET/release/guest-tests"
[ -x "$host_gt" ] || die "host guest-tests binary missing: $host_gt"
virtiofsd_version="-"
for c in "${config_list[@]}"; do
    if [ "${cfg_daemon[$c]}" = virtiofsd ]; then
        vfs=$(ensure_virtiofsd) || exit 1
        virtiofsd_version=$("$vfs" --version 2>/dev/null | head -n 1 || echo "?")
        break
    fi
done

# ------------------------------------------------------------- meta
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(nproc) CPUs, host kernel $(uname -r), accel ${LEASEFS_ACCEL:-tcg}, guest SMP ${LEASEFS_SMP:-2}"
    echo "leasefs: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src guest-tests 2>/dev/null || echo ' (uncommitted changes)')"
    echo "virtiofsd: $virtiofsd_version"
    echo "stock QEMU: $(qemu-system-x86_64 --version | head -n 1)"
    echo "stock kernel: $(basename "$("$LEASEFS_QEMU_DIR/fetch-kernel.sh" 2>/dev/null)")"
    for s in "${stacks[@]}"; do
        read -r sq sk <<< "$(stack_spec "$s" "$notify_qemu" "$notify_kernel")"
        if [ "$sq" != - ] || [ "$sk" != - ]; then
            echo "stack $s: QEMU ${sq/#-/stock}$([ "$sq" = - ] || echo " ($("$sq" --version | head -n 1))"), kernel ${sk/#-/stock}"
        fi
    done
    echo "rounds: $rounds per guest, seed $seed${strict_ms:+, strict namespace at $strict_ms ms for leasefsd}"
    echo "stress args: ${stress_args[*]:-none}"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/meta.txt"

# ------------------------------------------------------------- runs
: > "$out/stress.txt"
failed=()
stale_leasefsd=()
runs=0
total=$(( ${#stacks[@]} * ${#config_list[@]} ))

# record STACK CONFIG GUEST STATUS OUTFILE LOGDIR: append its STRESS lines and
# the daemon's lease metrics; echo the result (pass/fail/error/missing).
record() {
    local stack=$1 config=$2 guest=$3 status=$4 outf=$5 logdir=$6 res
    echo "STRESS stack=$stack config=$config guest=$guest status=$status kind=run" >> "$out/stress.txt"
    tr -d '\r' < "$outf" | grep -a -o 'STRESS kind=.*' \
        | sed "s|^STRESS |STRESS stack=$stack config=$config guest=$guest status=$status |" >> "$out/stress.txt" || true
    if [ -f "$logdir/daemon.log" ]; then
        grep -a -o 'leases: .*' "$logdir/daemon.log" | tail -n 1 \
            | sed "s|^|DAEMON stack=$stack config=$config guest=$guest |" >> "$out/stress.txt" || true
    fi
    res=$(tr -d '\r' < "$outf" | grep -a -o 'STRESS kind=total .*' | tail -n 1 | grep -o 'result=[a-z]*' | cut -d= -f2 || true)
    echo "${res:-missing}"
}

# judge STACK CONFIG GUEST STATUS RESULT OUTFILE
judge() {
    local stack=$1 config=$2 guest=$3 status=$4 res=$5 outf=$6 name="$1/$2${3:+/$3}"
    if [ "$res" = pass ] || [ "$res" = fail ]; then
        log "run $name: $res (status $status)"
        if [ "$res" = fail ] && [ "${cfg_daemon[$config]}" = leasefsd ]; then
            stale_leasefsd+=("$name")
        fi
    else
        log "run $name did not complete (status $status, result ${res}); last lines of $outf:"
        tail -n 25 "$outf" >&2 || true
        failed+=("$name (status $status, result $res)")
    fi
}

stress_cmd() {   # the guest command line for a config (words)
    local config=$1
    local cmd=(guest-tests stress --rounds "$rounds" --seed "$seed")
    if [ -n "$strict_ms" ] && [ "${cfg_daemon[$config]}" = leasefsd ]; then
        cmd+=(--strict-namespace-ms "$strict_ms")
    fi
    cmd+=("${stress_args[@]}")
    printf '%s\n' "${cmd[@]}"
}

run_single() {   # STACK CONFIG QEMU KERNEL
    local stack=$1 config=$2 q=$3 k=$4 share status=0 a dargs=() vm=() res
    for a in ${cfg_args[$config]}; do dargs+=(--daemon-arg "$a"); done
    mapfile -t vm < <(stack_vm_args "$q" "$k")
    local logdir="$out/logs/$stack-$config"
    share=$(mktemp -d /tmp/leasefs-stress.XXXXXX)
    mapfile -t cmd < <(stress_cmd "$config")
    LEASEFS_LOG_DIR="$logdir" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --agent \
        --share "$share" --daemon "${cfg_daemon[$config]}" "${dargs[@]}" "${vm[@]}" \
        --timeout "$timeout_secs" -- "${cmd[@]}" > "$logdir.out" 2>&1 || status=$?
    rm -rf "$share"
    res=$(record "$stack" "$config" "" "$status" "$logdir.out" "$logdir")
    judge "$stack" "$config" "" "$status" "$res" "$logdir.out"
}

# Two guests at once, each on its own leasefsd, one share. QEMU connects each
# guest's leasefs.agent and leasefs.peer ports to the relay, which joins A's
# agent port to B's peer port and B's agent port to A's peer port.
run_two() {   # STACK CONFIG QEMU KERNEL
    local stack=$1 config=$2 q=$3 k=$4 share rdir a dargs=() vm=() g pids=() st res relay_pid
    for a in ${cfg_args[$config]}; do dargs+=(--daemon-arg "$a"); done
    mapfile -t vm < <(stack_vm_args "$q" "$k")
    share=$(mktemp -d /tmp/leasefs-stress.XXXXXX)
    rdir=$(mktemp -d /tmp/leasefs-relay.XXXXXX)
    local base="$out/logs/$stack-$config"
    mkdir -p "$base"
    "$host_gt" relay --pair "$rdir/a-agent.sock" "$rdir/b-peer.sock" \
        --pair "$rdir/b-agent.sock" "$rdir/a-peer.sock" > "$base/relay.log" 2>&1 &
    relay_pid=$!
    for a in a-agent a-peer b-agent b-peer; do
        wait_for_socket "$rdir/$a.sock" "$relay_pid" 30 relay "$base/relay.log" \
            || { failed+=("$stack/$config (relay did not start)"); rm -rf "$share" "$rdir"; return 0; }
    done
    for g in a b; do
        mapfile -t cmd < <(stress_cmd "$config")
        # Guest b gets the next seed (the last --seed counts): different changes.
        [ "$g" = a ] || cmd+=(--seed "$((seed + 1))")
        cmd+=(--peer --name "stress-$g")
        # shellcheck disable=SC2054  # QEMU option syntax
        local qa="-device virtio-serial-pci -chardev socket,id=gtagent,path=$rdir/$g-agent.sock"
        qa+=" -device virtserialport,chardev=gtagent,name=leasefs.agent"
        qa+=" -chardev socket,id=gtpeer,path=$rdir/$g-peer.sock"
        qa+=" -device virtserialport,chardev=gtpeer,name=leasefs.peer"
        LEASEFS_LOG_DIR="$base/$g" LEASEFS_QEMU_ARGS="${LEASEFS_QEMU_ARGS:+$LEASEFS_QEMU_ARGS }$qa" \
            "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --share "$share" \
            --daemon "${cfg_daemon[$config]}" "${dargs[@]}" "${vm[@]}" \
            --timeout "$timeout_secs" -- "${cmd[@]}" > "$base/$g.out" 2>&1 &
        pids+=($!)
    done
    local statuses=()
    for p in "${pids[@]}"; do
        st=0
        wait "$p" || st=$?
        statuses+=("$st")
    done
    # The relay ends when both QEMUs have gone; do not wait on a stuck one.
    for ((a = 0; a < 50; a++)); do kill -0 "$relay_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$relay_pid" 2>/dev/null || true
    wait "$relay_pid" 2>/dev/null || true
    rm -rf "$share" "$rdir"
    local i=0
    for g in a b; do
        res=$(record "$stack" "$config" "$g" "${statuses[$i]}" "$base/$g.out" "$base/$g")
        judge "$stack" "$config" "$g" "${statuses[$i]}" "$res" "$base/$g.out"
        i=$((i + 1))
    done
}

for stack in "${stacks[@]}"; do
    read -r sq sk <<< "$(stack_spec "$stack" "$notify_qemu" "$notify_kernel")"
    for c in "${config_list[@]}"; do
        runs=$((runs + 1))
        log "run $runs/$total: stack $stack, $c (${cfg_daemon[$c]} ${cfg_args[$c]}), load $(cut -d' ' -f1-3 /proc/loadavg)"
        if [ "$c" = two-leasefsd ]; then
            run_two "$stack" "$c" "$sq" "$sk"
        else
            run_single "$stack" "$c" "$sq" "$sk"
        fi
    done
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/meta.txt"

# ------------------------------------------------------------- report
python3 "$LEASEFS_QEMU_DIR/stress-report.py" "$out" || die "stress-report.py failed"
if [ "${#failed[@]}" -gt 0 ] || [ "${#stale_leasefsd[@]}" -gt 0 ]; then
    {
        echo
        for f in "${failed[@]}"; do echo "- run did not complete: $f (logs in logs/)"; done
        for f in "${stale_leasefsd[@]}"; do echo "- **FAILED**: $f: stale data read (or late namespace answer under --strict-namespace-ms)"; done
    } >> "$out/results.md"
fi
echo
cat "$out/results.md"
echo
echo "results: $out"
[ "${#failed[@]}" -eq 0 ] && [ "${#stale_leasefsd[@]}" -eq 0 ]
