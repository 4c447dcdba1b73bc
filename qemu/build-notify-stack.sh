#!/usr/bin/env bash
# Build the notify-capable VM stack: Debian's QEMU 7.2 and Linux 6.12, each
# with the project's virtio-fs notification queue patch (qemu/patches/).
#
# Usage: qemu/build-notify-stack.sh [--force] [OUTDIR]
#
#   OUTDIR    where the two results go (default build/notify):
#               OUTDIR/qemu-system-x86_64   (qemu/build-notify-qemu.sh)
#               OUTDIR/bzImage              (qemu/build-notify-kernel.sh)
#   --force   rebuild both even when their stamps match the patches
#
# On a fresh Debian bookworm machine it installs the build dependencies,
# fetches the two Debian source packages (apt-get source qemu, apt-get
# download linux-source-6.12), applies the patches and builds. Each half
# rebuilds only when its patches (or its build script) changed: a stamp
# beside each result names its inputs. From scratch about 8 minutes on 2
# cores (measured in CI: 474 to 488 s, QEMU about 3.8 min, kernel 4.3,
# downloads included); seconds when both stamps match. Progress goes to stderr; stdout is the two paths, one per line.
#
# Use the result with qemu/run-vm.sh --qemu OUTDIR/qemu-system-x86_64
# --kernel OUTDIR/bzImage, or qemu/stress.sh --stack notify (whose defaults
# are build/notify/...).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=()
outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=(--force) ;;
        -h|--help) print_header "$0"; exit 0 ;;
        -*) die "unknown option: $1 (try --help)" ;;
        *) [ -z "$outdir" ] || die "only one OUTDIR, got '$outdir' and '$1'"; outdir=$1 ;;
    esac
    shift
done
[ -n "$outdir" ] || outdir="$LEASEFS_NOTIFY_DIR"

start=$SECONDS
qemu=$("$LEASEFS_QEMU_DIR/build-notify-qemu.sh" "${force[@]}" "$outdir") \
    || die "building the patched QEMU failed"
kernel=$("$LEASEFS_QEMU_DIR/build-notify-kernel.sh" "${force[@]}" "$outdir") \
    || die "building the patched kernel failed"
log "notify stack ready in $((SECONDS - start))s"
echo "$qemu"
echo "$kernel"
