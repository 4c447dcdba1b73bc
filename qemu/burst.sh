#!/usr/bin/env bash
# Host change bursts against a caching guest: the guest looks up N names, the host removes
# them all at once (a chmod then an unlink of each: 2N changes), and the guest counts the
# names it still sees a set time after the host finished. One VM boot, two bursts:
#   300 names   (600 changes),    checked 50 ms after the host finished
#   5,000 names (10,000 changes), checked 1 s after
# Fails if any name is still there at its check (on a stack that negotiates the notification
# queue; on a stock stack names may lag a lease, so use --no-check there for information).
#
# Usage: qemu/burst.sh [--stack notify|stock] [--no-build] [--no-check] [--timeout SECS]
# The causal side channel is the share itself: the host creates "done-N" after its burst
# returned; the guest polls for it every 10 ms (the notify stack shows a host create within
# milliseconds), then sleeps the check delay and counts.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack=notify
build=1
check=1
timeout_secs=900
while [ $# -gt 0 ]; do
    case "$1" in
        --stack) [ $# -ge 2 ] || die "--stack needs notify or stock"; stack=$2; shift ;;
        --stack=*) stack=${1#*=} ;;
        --no-build) build=0 ;;
        --no-check) check=0 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
vm=()
case "$stack" in
    notify)
        [ -x "$LEASEFS_NOTIFY_DIR/qemu-system-x86_64" ] && [ -f "$LEASEFS_NOTIFY_DIR/bzImage" ] \
            || die "the notify stack is not built (qemu/build-notify-stack.sh $LEASEFS_NOTIFY_DIR)"
        vm=(--qemu "$LEASEFS_NOTIFY_DIR/qemu-system-x86_64" --kernel "$LEASEFS_NOTIFY_DIR/bzImage") ;;
    stock) ;;
    *) die "--stack is notify or stock, not $stack" ;;
esac
prepare_vm_runs "$build"

share=$(mktemp -d /tmp/leasefs-burst.XXXXXX)
host_pid=
cleanup() {
    [ -z "$host_pid" ] || kill "$host_pid" 2>/dev/null || true
    rm -rf "$share"
}
trap cleanup EXIT

# name:names:check delay (busybox usleep microseconds)
bursts=("small:300:50000" "large:5000:1000000")
for b in "${bursts[@]}"; do
    IFS=: read -r name n _ <<< "$b"
    mkdir -p "$share/$name"
    for ((i = 0; i < n; i++)); do : > "$share/$name/f$i"; done
done

# The host side: for each burst, wait until the guest says it cached the names, then change
# them all at once and say so.
(
    for b in "${bursts[@]}"; do
        IFS=: read -r name _ _ <<< "$b"
        while [ ! -e "$share/ready-$name" ]; do sleep 0.02; done
        chmod 600 "$share/$name"/f*
        rm -f "$share/$name"/f*
        : > "$share/done-$name"
    done
) &
host_pid=$!

# The guest side (busybox sh). Counting is a loop of [ -e ]: stat(2) of each cached name.
guest='
count() { n=0; i=0; while [ $i -lt $2 ]; do [ -e $1/f$i ] && n=$((n+1)); i=$((i+1)); done; echo $n; }
status=0
for b in '"${bursts[*]}"'; do
    name=${b%%:*}; rest=${b#*:}; n=${rest%%:*}; delay=${rest#*:}
    cached=$(count $name $n)
    echo "burst $name: $cached of $n names cached"
    : > ready-$name
    while [ ! -e done-$name ]; do usleep 10000; done
    usleep $delay
    stale=$(count $name $n)
    echo "BURST $name: $((n * 2)) host changes, $stale of $n names still seen $((delay / 1000)) ms after"
    [ "$stale" -eq 0 ] || status=1
done
exit $status'
status=0
LEASEFS_LOG_DIR="${LEASEFS_LOG_DIR:-$LEASEFS_VM_DIR/logs/burst-$stack-$(date +%Y%m%d-%H%M%S)}" \
    "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --share "$share" "${vm[@]}" \
    --daemon-arg=--sandbox=none --timeout "$timeout_secs" -- "$guest" || status=$?
if [ "$check" -eq 0 ]; then
    log "burst on the $stack stack finished with status $status (not checked)"
    exit 0
fi
exit "$status"
