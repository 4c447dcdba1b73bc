#!/usr/bin/env bash
# Run all tests: the cargo workspace tests, guest-tests inside QEMU guests
# against leasefsd in several daemon configurations and VM stacks, and the
# coherency stress on every pairing of stock and patched QEMU and kernel.
#
# Usage: qemu/test-all.sh [--skip-cargo-test] [--no-virtiofsd] [--no-build]
#                         [--no-notify] [--no-current] [--timeout SECS]
#
# VM runs of guest-tests (each with a fresh share directory and the host agent):
#   sandbox-none       --cache always --sandbox none --xattr
#   sandbox-namespace  --cache always --sandbox namespace --xattr
#   cache-default      --sandbox none --xattr   (the default cache mode, coherent: here the
#                      coherence_* checks run too)
#   notify-default     the same on the notify stack: patched QEMU + patched
#                      kernel (qemu/build-notify-stack.sh builds them into
#                      build/notify/), with the notification queue negotiated
#   notify-virtiofsd   virtiofsd 1.14 --cache always on the notify stack: with
#                      a backend that lacks the bit, both patches must behave
#                      as before
# Queue checks (a shell script in the guest reads sysfs and /proc/interrupts):
#   queues-notify          notify stack: bit 0 acked, queues hiprio, notification,
#                          requests.0, an MSI-X vector for the notification queue
#   queues-patched-qemu    patched QEMU + stock kernel: bit 0 not acked, hiprio,
#   queues-patched-kernel  requests.0 (and stock QEMU + patched kernel: the same)
# Coherency stress (qemu/stress.sh, leasefsd default mode, one VM per run):
#   stress-notify      notify stack, one guest and two guests on two leasefsd
#                      sharing a directory; fails on any stale data read and
#                      on a namespace answer still stale 50 ms after a change
#   stress-fallback    stock, qemu-only and kernel-only stacks (the bit is not
#                      negotiated: leases alone), one and two guests; fails on
#                      any stale data read
# Model-based randomized coherence test (guest-tests model, one VM per stack, default mode):
#   model-stock        stock stack: LEASEFS_MODEL_OPS (2000) host and guest operations from
#   model-notify       seed LEASEFS_MODEL_SEED (default 20261206: CI is reproducible; set
#                      it to $(date +%Y%m%d) to walk a new sequence each day), VM pauses
#                      and a burst of 1000 host changes; fails on any answer the guarantee
#                      does not allow. Host op kinds reported, not failed: LEASEFS_MODEL_KNOWN
#                      (default on the stock stack: rdtrunc,restore, the stated limits of a
#                      host open(O_RDONLY|O_TRUNC) and of a restored mtime seen through a
#                      descriptor kept open, docs/coherency.md; none on the notify stack)
# libvirt (qemu/libvirt.sh, as root): virsh start with libvirt running leasefsd itself, plain,
#   libvirt             with <cache>/<sandbox>/<lock>/<thread_pool>, found through
#                       contrib/50-leasefs.json, and virsh destroy leaving no daemon
# virtme-ng (qemu/virtme-ng.sh): vng 1.42 boots the cloud kernel, root and --rwdir served by
#   virtme-ng           leasefsd found as "virtiofsd" on PATH
# Conformance (qemu/conformance.sh): pjdfstest 0.2.2 and fsx 0.3.2 (20,000 ops, mmap, fixed
#   conformance         seed) in a guest, leasefsd default and hardened (--sandbox namespace
#                       --seccomp kill) beside virtiofsd 1.14; fails on any pjdfstest case that
#                       passes on virtiofsd and fails on leasefsd, and on any fsx failure
# Burst (qemu/burst.sh, notify stack): 300 and 5,000 cached names, each removed on the host
#   burst-notify       in one burst (chmod + unlink: 600 and 10,000 changes); fails if a
#                      name is still seen 50 ms (300) or 1 s (5,000) after the host finished
# Host changes as guest inotify events (guest-tests inotify, notify stack, default mode):
#   inotify-notify     20 rounds of 8 host changes (create+write, write, chmod, rename,
#                      unlink, mkdir, rmdir, chmod of the directory) under a guest inotify
#                      watch; fails on any event missing, doubled, out of order or misnamed
# Newer host kernel (qemu/host-vm.sh): Debian's cloud 7.3 kernel from trixie-backports booted
#   host-7.3           as the host (TCG, no virtio-fs): static leasefsd and the cargo test
#                      binaries tests/leases.rs, names.rs, and delegations.rs once it exists,
#                      run inside it (Linux 6.19's F_SETDELEG delegations); fails if any does
# The current notify stack (qemu/build-notify-stack.sh --stack current: trixie's QEMU 10.0 and
# trixie-backports' Linux 7.3 with the upstream-style series in qemu/patches/qemu-10.0 and
# linux-7.3, built into build/notify-current/), the same checks on current trees:
#   current-default    guest-tests, leasefsd default mode, the notification queue negotiated
#   current-virtiofsd  virtiofsd 1.14 --cache always on it: both patches fall back cleanly
#   queues-current, queues-current-qemu (patched QEMU 10.0 + stock 6.12 kernel),
#   queues-current-kernel (stock QEMU 7.2 + patched 7.3 kernel), and across the two series:
#   queues-cross-qemu7.2 (patched QEMU 7.2 + patched 7.3 kernel) and queues-cross-qemu10.0
#   (patched QEMU 10.0 + patched 6.12 kernel): the same want as above, per pair
#   stress-current     the coherency stress on it (one guest, 50 ms namespace bound)
#   stress-current-fallback  the stress on each current part with a stock one (qemu-only,
#                      kernel-only): leases alone, no stale data
#   inotify-current    guest-tests inotify on Linux 7.3 with patch 0005
# --no-notify leaves out both notify stacks (their builds and every run on them);
# --no-current leaves out only the current one.
# If virtiofsd is on PATH or in ~/.cargo/bin, guest-tests also runs against
# it on the stock stack once, for information only (not counted). The
# notify-virtiofsd run installs virtiofsd if it is missing.
#
# The last line is the summary "N passed, M failed" (VM and stress runs).
# Exits non-zero if cargo test or any counted run failed.
# Logs: build/vm/logs/test-all-<time>/.
# --no-build uses the binaries already in target/ (built by an earlier step).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cargo_test=1
try_virtiofsd=1
notify=1
current=1
build=1
timeout_secs=${LEASEFS_VM_TIMEOUT:-600}
while [ $# -gt 0 ]; do
    case "$1" in
        --skip-cargo-test) cargo_test=0 ;;
        --no-virtiofsd) try_virtiofsd=0 ;;
        --no-build) build=0 ;;
        --no-notify) notify=0 ;;
        --no-current) current=0 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --timeout=*) timeout_secs=${1#*=} ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

require_cargo
cd "$LEASEFS_ROOT"
logs="$LEASEFS_VM_DIR/logs/test-all-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$logs"
# Keep the 10 newest test-all log trees.
find "$LEASEFS_VM_DIR/logs" -maxdepth 1 -name 'test-all-*' -printf '%T@ %p\n' \
    | sort -rn | tail -n +11 | cut -d' ' -f2- | xargs -r rm -rf

section() { printf '\n===== %s =====\n' "$*"; }

# ------------------------------------------------------------- cargo test
cargo_status=0
if [ "$cargo_test" -eq 1 ]; then
    section "cargo test --workspace"
    cargo test --workspace || cargo_status=$?
fi

# ------------------------------------------------------------- builds
# Build once here, then run the VMs with --no-build: a build failure is
# reported once instead of once per run.
section "build: leasefsd, guest-tests (host agent and static guest binary), guest images"
build_ok=1
mk_args=()
if [ "$build" -eq 1 ]; then
    cargo build --release --bin leasefsd || build_ok=0
    cargo build --release -p guest-tests || build_ok=0
else
    mk_args+=(--no-build)
fi
if [ "$build_ok" -eq 1 ]; then
    "$LEASEFS_QEMU_DIR/fetch-kernel.sh" >/dev/null || build_ok=0
    "$LEASEFS_QEMU_DIR/make-initramfs.sh" "${mk_args[@]}" >/dev/null || build_ok=0
fi
notify_ok=0
if [ "$notify" -eq 1 ] && [ "$build_ok" -eq 1 ]; then
    section "build: the notify stack (Debian's QEMU 7.2 and Linux 6.12 with qemu/patches/)"
    notify_ok=1
    "$LEASEFS_QEMU_DIR/build-notify-stack.sh" "$LEASEFS_NOTIFY_DIR" || notify_ok=0
fi
notify_vm=(--qemu "$LEASEFS_NOTIFY_DIR/qemu-system-x86_64" --kernel "$LEASEFS_NOTIFY_DIR/bzImage")
[ "$notify" -eq 1 ] || current=0
current_ok=0
current_dir="$LEASEFS_ROOT/build/notify-current"
if [ "$current" -eq 1 ] && [ "$build_ok" -eq 1 ]; then
    section "build: the current notify stack (Debian's QEMU 10.0 and Linux 7.3 with qemu/patches/)"
    current_ok=1
    "$LEASEFS_QEMU_DIR/build-notify-stack.sh" --stack current "$current_dir" || current_ok=0
fi
current_vm=(--qemu "$current_dir/qemu-system-x86_64" --kernel "$current_dir/bzImage")

# ------------------------------------------------------------- VM runs
# The coherence_* tests check that host changes reach a caching guest at once: the promise of
# the default coherent cache mode, which virtiofsd's modes do not make (cache=always is stale by
# design, auto for up to a second). Runs in those modes skip them.
passed=0
failed=0
results=()

# count NAME STATUS: record a counted run's result.
count() {
    if [ "$2" -eq 0 ]; then
        results+=("ok    $1")
        passed=$((passed + 1))
    else
        results+=("FAIL  $1 (status $2, logs $logs/$1)")
        failed=$((failed + 1))
    fi
}

# vm_run NAME DAEMON "DAEMON ARGS" SKIP [RUN-VM ARGS...]: one guest-tests run (SKIP: tests to
# leave out); returns its status.
vm_run() {
    local name=$1 daemon=$2 dargs=$3 skip=$4 share status=0 a args=()
    shift 4
    for a in $dargs; do args+=(--daemon-arg "$a"); done
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    section "VM run $name: $daemon $dargs${*:+ ($*)}"
    LEASEFS_LOG_DIR="$logs/$name" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --agent \
        --share "$share" --daemon "$daemon" "${args[@]}" "$@" --timeout "$timeout_secs" \
        -- guest-tests run --skip "$skip" || status=$?
    rm -rf "$share"
    return "$status"
}

# queue_check NAME WANT RUN-VM-ARGS...: boot a guest and check from inside what the device
# negotiated: WANT "notify" (feature bit 0 acked; queues hiprio, notification, requests.0, the
# notification queue with an MSI-X vector of its own) or "plain" (bit 0 not acked; hiprio,
# requests.0). Returns the guest's status.
queue_check() {
    local name=$1 want=$2 share status=0 expect_bit expect_queues
    shift 2
    if [ "$want" = notify ]; then
        expect_bit=1 expect_queues="hiprio notification requests.0"
    else
        expect_bit=0 expect_queues="hiprio requests.0"
    fi
    # shellcheck disable=SC2016  # expands in the guest
    local script='
dev=$(readlink -f /sys/fs/virtiofs/*/device)
bit=$(cut -c1 "$dev/features")
queues=$(cat /sys/fs/virtiofs/*/mqs/*/name | tr "\n" " ")
echo "virtio-fs: feature bit 0 = $bit, queues: $queues"
[ "$bit" = '"$expect_bit"' ] || { echo "CHECK FAILED: feature bit 0 is $bit"; exit 1; }
[ "$queues" = "'"$expect_queues"' " ] || { echo "CHECK FAILED: queues"; exit 1; }
if [ '"$expect_bit"' = 1 ]; then
    grep -- "-notification" /proc/interrupts \
        || { echo "CHECK FAILED: no MSI-X vector of its own for the notification queue"; cat /proc/interrupts; exit 1; }
fi
echo "queue layout as expected"'
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    section "VM run $name: what the device negotiated (want: $want) ($*)"
    LEASEFS_LOG_DIR="$logs/$name" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --share "$share" \
        --daemon-arg=--sandbox=none "$@" --timeout "$timeout_secs" -- "$script" || status=$?
    rm -rf "$share"
    return "$status"
}

# stress NAME STRESS-ARGS...: one qemu/stress.sh invocation, counted as one run.
stress() {
    local name=$1 status=0
    shift
    section "coherency stress $name: $*"
    "$LEASEFS_QEMU_DIR/stress.sh" --no-build --configs leasefsd-default \
        --timeout "$timeout_secs" --out "$logs/$name" "$@" || status=$?
    return "$status"
}

# inotify_run NAME RUN-VM-ARGS...: guest-tests inotify (host changes as guest inotify events)
# on a notify stack; returns its status.
inotify_run() {
    local name=$1 share status=0
    shift
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    section "VM run $name: guest-tests inotify ($*)"
    LEASEFS_LOG_DIR="$logs/$name" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --agent \
        --share "$share" --daemon-arg=--sandbox=none "$@" \
        --timeout "$timeout_secs" -- guest-tests inotify || status=$?
    rm -rf "$share"
    return "$status"
}

# model NAME STACK [RUN-VM ARGS...]: one guest-tests model run; returns its status.
model_seed=${LEASEFS_MODEL_SEED:-20261206}
model_run() {
    local name=$1 stack=$2 share status=0 known=() kinds
    shift 2
    if [ "$stack" = stock ]; then
        kinds=${LEASEFS_MODEL_KNOWN-rdtrunc,restore}
    else
        kinds=${LEASEFS_MODEL_KNOWN:-}
    fi
    [ -z "$kinds" ] || known=(--known-limit "$kinds")
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    section "VM run $name: guest-tests model, ${LEASEFS_MODEL_OPS:-2000} ops, seed $model_seed${*:+ ($*)}"
    # The stock stack holds host writers for the lease: about 0.2 s per op under TCG.
    LEASEFS_LOG_DIR="$logs/$name" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --agent \
        --share "$share" --daemon-arg=--sandbox=none "$@" \
        --timeout "$(( timeout_secs > 1800 ? timeout_secs : 1800 ))" \
        -- guest-tests model --ops "${LEASEFS_MODEL_OPS:-2000}" --seed "$model_seed" \
        --stack "$stack" "${known[@]}" || status=$?
    rm -rf "$share"
    return "$status"
}

# What virtiofsd is not run against: the coherence tests (it promises none), and
# exec_keeps_running_program, a data loss of virtiofsd 1.14 leasefsd fixes (it truncates a
# running program on open(O_RDONLY|O_TRUNC); docs/architecture.md).
virtiofsd_skip='coherence_*,exec_keeps_running_program'

# name|daemon|daemon args|skip|stack (notify, current: needs that notify stack)
runs=(
    "sandbox-none|leasefsd|--cache always --sandbox none --xattr|coherence_*|stock"
    "sandbox-namespace|leasefsd|--cache always --sandbox namespace --xattr|coherence_*|stock"
    "cache-default|leasefsd|--sandbox none --xattr||stock"
    "notify-default|leasefsd|--sandbox none --xattr||notify"
    "notify-virtiofsd|virtiofsd|--cache always --sandbox none|$virtiofsd_skip|notify"
    "current-default|leasefsd|--sandbox none --xattr||current"
    "current-virtiofsd|virtiofsd|--cache always --sandbox none|$virtiofsd_skip|current"
)
for run in "${runs[@]}"; do
    IFS='|' read -r name daemon dargs skip stack <<< "$run"
    vm=()
    case "$stack" in
        notify) wanted=$notify built=$notify_ok what="the notify stack" vm=("${notify_vm[@]}") ;;
        current) wanted=$current built=$current_ok what="the current notify stack" vm=("${current_vm[@]}") ;;
        *) wanted=1 built=1 ;;
    esac
    [ "$wanted" -eq 1 ] || continue
    if [ "$built" -eq 0 ]; then
        results+=("FAIL  $name (not run: $what did not build)")
        failed=$((failed + 1))
        continue
    fi
    if [ "$build_ok" -eq 0 ]; then
        results+=("FAIL  $name (not run: the build failed)")
        failed=$((failed + 1))
        continue
    fi
    if [ "$daemon" = virtiofsd ] && ! ensure_virtiofsd >/dev/null; then
        count "$name" 1
        continue
    fi
    status=0
    vm_run "$name" "$daemon" "$dargs" "$skip" "${vm[@]}" || status=$?
    count "$name" "$status"
done

if [ "$build_ok" -eq 1 ] && [ "$notify" -eq 1 ] && [ "$notify_ok" -eq 1 ]; then
    # Both patches negotiate the queue; each alone falls back to the layout of old.
    for check in "queues-notify|notify|${notify_vm[*]}" \
                 "queues-patched-qemu|plain|${notify_vm[*]:0:2}" \
                 "queues-patched-kernel|plain|${notify_vm[*]:2:2}"; do
        IFS='|' read -r name want vmargs <<< "$check"
        status=0
        # shellcheck disable=SC2086  # two or four words, paths without spaces
        queue_check "$name" "$want" $vmargs || status=$?
        count "$name" "$status"
    done
fi

if [ "$build_ok" -eq 1 ]; then
    if [ "$notify" -eq 1 ] && [ "$notify_ok" -eq 1 ]; then
        status=0
        stress stress-notify --two-guests --stack notify --strict-namespace-ms 50 || status=$?
        count stress-notify "$status"
    fi
    fallback=(--stack stock)
    [ "$notify" -eq 0 ] || [ "$notify_ok" -eq 0 ] || fallback+=(--stack qemu-only --stack kernel-only)
    status=0
    stress stress-fallback --two-guests "${fallback[@]}" || status=$?
    count stress-fallback "$status"
fi

if [ "$build_ok" -eq 1 ]; then
    status=0
    model_run model-stock stock || status=$?
    count model-stock "$status"
    if [ "$notify" -eq 1 ] && [ "$notify_ok" -eq 1 ]; then
        status=0
        model_run model-notify notify "${notify_vm[@]}" || status=$?
        count model-notify "$status"
        status=0
        section "burst-notify: qemu/burst.sh --stack notify"
        LEASEFS_LOG_DIR="$logs/burst-notify" "$LEASEFS_QEMU_DIR/burst.sh" --stack notify \
            --no-build --timeout "$timeout_secs" || status=$?
        count burst-notify "$status"
        status=0
        inotify_run inotify-notify "${notify_vm[@]}" || status=$?
        count inotify-notify "$status"
    fi
fi

# The current stack (QEMU 10.0, Linux 7.3): queue layout per pairing, including the pairs across
# the two series (both patched: the queue is negotiated whichever QEMU meets whichever kernel),
# the coherency stress on it and on each of its parts beside a stock one, guest inotify events.
if [ "$build_ok" -eq 1 ] && [ "$current" -eq 1 ]; then
    if [ "$current_ok" -eq 1 ]; then
        checks=("queues-current|notify|${current_vm[*]}"
                "queues-current-qemu|plain|${current_vm[*]:0:2}"
                "queues-current-kernel|plain|${current_vm[*]:2:2}")
        [ "$notify_ok" -eq 0 ] || checks+=(
                "queues-cross-qemu7.2|notify|${notify_vm[*]:0:2} ${current_vm[*]:2:2}"
                "queues-cross-qemu10.0|notify|${current_vm[*]:0:2} ${notify_vm[*]:2:2}")
        for check in "${checks[@]}"; do
            IFS='|' read -r name want vmargs <<< "$check"
            status=0
            # shellcheck disable=SC2086  # two or four words, paths without spaces
            queue_check "$name" "$want" $vmargs || status=$?
            count "$name" "$status"
        done
        status=0
        # One guest here: the two-guest run's 50 ms bound is a latency measured with two TCG
        # guests on two cores, which stress-notify already runs; the patches do the same.
        stress stress-current --stack notify "${current_vm[@]}" --strict-namespace-ms 50 || status=$?
        count stress-current "$status"
        status=0
        stress stress-current-fallback --two-guests --stack qemu-only --stack kernel-only "${current_vm[@]}" \
            || status=$?
        count stress-current-fallback "$status"
        status=0
        inotify_run inotify-current "${current_vm[@]}" || status=$?
        count inotify-current "$status"
    else
        for name in queues-current stress-current stress-current-fallback inotify-current; do
            results+=("FAIL  $name (not run: the current notify stack did not build)")
            failed=$((failed + 1))
        done
    fi
fi

# The cargo integration tests on a Linux 7.3 host kernel (qemu/host-vm.sh): leasefsd and the
# test binaries built static and run inside a VM booting Debian's 7.3 cloud kernel.
if [ "$build_ok" -eq 1 ]; then
    status=0
    section "host-7.3: qemu/host-vm.sh (cargo integration tests on a Linux 7.3 host kernel)"
    host_vm=()
    [ "$build" -eq 1 ] || host_vm+=(--no-build)
    LEASEFS_LOG_DIR="$logs/host-7.3" LEASEFS_HOST_KERNEL_SERIES=7.3 \
        "$LEASEFS_QEMU_DIR/host-vm.sh" "${host_vm[@]}" --timeout "$timeout_secs" || status=$?
    count host-7.3 "$status"
fi

# libvirt starts leasefsd itself (qemu/libvirt.sh: virsh start with <binary path>, with
# cache/sandbox/xattr/lock/thread_pool, through the vhost-user description file, and virsh
# destroy leaving no daemon behind). Needs root, as CI has.
if [ "$build_ok" -eq 1 ]; then
    status=0
    section "libvirt: qemu/libvirt.sh"
    if [ "$(id -u)" -eq 0 ]; then
        LEASEFS_LOG_DIR="$logs/libvirt" "$LEASEFS_QEMU_DIR/libvirt.sh" --no-build \
            --timeout "$timeout_secs" || status=$?
        count libvirt "$status"
    else
        results+=("info  libvirt not run (needs root)")
    fi
fi

# virtme-ng starts leasefsd as its "virtiofsd" (qemu/virtme-ng.sh): the cloud kernel boots
# with its root and an --rwdir served by leasefsd.
if [ "$build_ok" -eq 1 ]; then
    status=0
    section "virtme-ng: qemu/virtme-ng.sh"
    LEASEFS_LOG_DIR="$logs/virtme-ng" "$LEASEFS_QEMU_DIR/virtme-ng.sh" --no-build \
        --timeout "$timeout_secs" || status=$?
    count virtme-ng "$status"
fi

# Third-party conformance (qemu/conformance.sh): pjdfstest and 20,000 fsx operations in a
# guest, leasefsd default and --sandbox namespace --seccomp kill beside virtiofsd 1.14.
if [ "$build_ok" -eq 1 ]; then
    status=0
    section "conformance: qemu/conformance.sh (pjdfstest, fsx)"
    "$LEASEFS_QEMU_DIR/conformance.sh" --no-build --out "$logs/conformance" || status=$?
    count conformance "$status"
fi

# Reference run against virtiofsd on the stock stack: informational only.
if [ "$try_virtiofsd" -eq 1 ] && [ "$build_ok" -eq 1 ] \
        && { command -v virtiofsd >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/virtiofsd" ]; }; then
    status=0
    vm_run virtiofsd-reference virtiofsd "--cache always --sandbox none" "$virtiofsd_skip" || status=$?
    if [ "$status" -eq 0 ]; then
        results+=("info  virtiofsd-reference passed (not counted)")
    else
        results+=("info  virtiofsd-reference failed with status $status (not counted, logs $logs/virtiofsd-reference)")
    fi
fi

# ------------------------------------------------------------- summary
section "summary"
if [ "$cargo_test" -eq 1 ]; then
    if [ "$cargo_status" -eq 0 ]; then echo "ok    cargo test --workspace"
    else echo "FAIL  cargo test --workspace (status $cargo_status)"; fi
fi
[ "$build_ok" -eq 1 ] || echo "FAIL  build"
for r in "${results[@]}"; do echo "$r"; done
echo "logs: $logs"
echo "$passed passed, $failed failed"

[ "$cargo_status" -eq 0 ] && [ "$failed" -eq 0 ]
