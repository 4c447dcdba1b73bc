#!/usr/bin/env bash
# Build the notify-capable VM stack: Debian's QEMU and Linux, each with the
# project's virtio-fs notification queue patches (qemu/patches/).
#
# Usage: qemu/build-notify-stack.sh [--stack 7.2|current] [--force] [OUTDIR]
#
#   --stack 7.2      (default) bookworm's QEMU 7.2 and linux-source-6.12 with
#                    patches/qemu-7.2 and patches/linux-6.12 (what CI uses)
#   --stack current  trixie's QEMU 10.0 and trixie-backports' linux-source-7.3
#                    with the upstream-style series in patches/qemu-10.0 and
#                    patches/linux-7.3 (docs/notify-patches.md)
#   OUTDIR           where the two results go (default build/notify, for
#                    current build/notify-current):
#                      OUTDIR/qemu-system-x86_64   (qemu/build-notify-qemu.sh)
#                      OUTDIR/bzImage              (qemu/build-notify-kernel.sh)
#   --force          rebuild both even when their stamps match the patches
#
# On a fresh Debian bookworm machine it installs the build dependencies,
# fetches the two Debian source packages (apt-get source qemu, apt-get
# download linux-source-6.12), applies the patches and builds. Each half
# rebuilds only when its patches (or its build script) changed: a stamp
# beside each result names its inputs. From scratch about 8 minutes on 2
# cores (measured in CI: 474 to 488 s, QEMU about 3.8 min, kernel 4.3,
# downloads included); current about 18 min from scratch on a busy 2-core
# machine (QEMU 601 s, kernel 494 s; about 13 min of CPU); seconds when both
# stamps match. Progress goes to stderr; stdout is the two paths, one per line.
#
# Use the result with qemu/run-vm.sh --qemu OUTDIR/qemu-system-x86_64
# --kernel OUTDIR/bzImage, or qemu/stress.sh --stack notify (whose defaults
# are build/notify/...; for current pass --qemu and --kernel).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=()
stack=7.2
outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --stack) [ $# -ge 2 ] || die "--stack needs 7.2 or current"; stack=$2; shift ;;
        --stack=*) stack=${1#--stack=} ;;
        --force) force=(--force) ;;
        -h|--help) print_header "$0"; exit 0 ;;
        -*) die "unknown option: $1 (try --help)" ;;
        *) [ -z "$outdir" ] || die "only one OUTDIR, got '$outdir' and '$1'"; outdir=$1 ;;
    esac
    shift
done
case "$stack" in
    7.2) [ -n "$outdir" ] || outdir="$LEASEFS_NOTIFY_DIR" ;;
    current) [ -n "$outdir" ] || outdir="$LEASEFS_ROOT/build/notify-current" ;;
    *) die "--stack: 7.2 or current, not '$stack'" ;;
esac

start=$SECONDS
qemu=$("$LEASEFS_QEMU_DIR/build-notify-qemu.sh" --stack "$stack" "${force[@]}" "$outdir") \
    || die "building the patched QEMU failed"
kernel=$("$LEASEFS_QEMU_DIR/build-notify-kernel.sh" --stack "$stack" "${force[@]}" "$outdir") \
    || die "building the patched kernel failed"
log "notify stack ($stack) ready in $((SECONDS - start))s"
echo "$qemu"
echo "$kernel"
