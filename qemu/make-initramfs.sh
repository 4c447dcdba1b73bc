#!/usr/bin/env bash
# Build the base guest initramfs and print its path.
#
# Usage: qemu/make-initramfs.sh [--guest-tests PATH | --no-guest-tests] [--no-build]
#
# Contents: static busybox with its applet symlinks, /init (qemu/guest-init.sh)
# and the static guest-tests binary as /bin/guest-tests. The per-run command
# is not in here: run-vm.sh appends a second small cpio with /etc/leasefs-cmd,
# so this image is reused across runs. Rebuilt only when an input changes
# (cached as build/vm/initramfs-base-<input hash>.cpio.gz).
#
# guest-tests is built with
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release -p guest-tests --target x86_64-unknown-linux-gnu
# (static glibc: the guest has no libc). --guest-tests PATH uses a prebuilt
# binary instead, --no-guest-tests leaves it out, --no-build uses whatever
# binary the last build left in target/. LEASEFS_GUEST_TESTS=PATH|none is the
# environment equivalent (run-vm.sh passes it through).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

gt_mode=build
gt_path=""
case "${LEASEFS_GUEST_TESTS:-}" in
    "") ;;
    none) gt_mode=none ;;
    *) gt_mode=path; gt_path=$LEASEFS_GUEST_TESTS ;;
esac

while [ $# -gt 0 ]; do
    case "$1" in
        --guest-tests) [ $# -ge 2 ] || die "--guest-tests needs a path"
                       gt_mode=path; gt_path=$2; shift ;;
        --guest-tests=*) gt_mode=path; gt_path=${1#*=} ;;
        --no-guest-tests) gt_mode=none ;;
        --no-build) [ "$gt_mode" = build ] && gt_mode=prebuilt ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

ensure_vm_tools

# --- the guest-tests binary ---
gt_default="$LEASEFS_TARGET/$LEASEFS_GUEST_TRIPLE/release/guest-tests"
case "$gt_mode" in
    build)
        require_cargo
        log "building guest-tests (static, $LEASEFS_GUEST_TRIPLE)"
        # --target keeps these static artifacts apart from the host build in
        # target/release (which the host agent uses), so neither invalidates
        # the other.
        (cd "$LEASEFS_ROOT" && \
            RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
            cargo build --release -p guest-tests --target "$LEASEFS_GUEST_TRIPLE" >&2) \
            || die "building guest-tests failed (use --no-guest-tests or LEASEFS_GUEST_TESTS=none to boot without it)"
        gt_path=$gt_default ;;
    prebuilt) gt_path=$gt_default ;;
esac
if [ "$gt_mode" != none ]; then
    [ -f "$gt_path" ] || die "guest-tests binary not found: $gt_path"
    # A dynamic binary would fail in the guest with a confusing "not found".
    # (ldd prints "statically linked" or "not a dynamic executable" otherwise.)
    if ldd "$gt_path" 2>/dev/null | grep -q '=>'; then
        die "$gt_path is dynamically linked; build it with -C target-feature=+crt-static"
    fi
fi

# --- cache check: rebuild only when an input changed ---
BUSYBOX=/bin/busybox
key="$(
    {
        sha256sum "$BUSYBOX" "$LEASEFS_QEMU_DIR/guest-init.sh" "${BASH_SOURCE[0]}" | cut -d' ' -f1
        if [ "$gt_mode" = none ]; then echo no-guest-tests; else sha256sum < "$gt_path" | cut -d' ' -f1; fi
    } | sha256sum | cut -d' ' -f1
)"
# The key is in the name, so a run that is still reading an older image
# (another guest-tests build) never sees it replaced under it.
out="$LEASEFS_VM_DIR/initramfs-base-${key:0:16}.cpio.gz"
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi

log "building $out"
mkdir -p "$LEASEFS_VM_DIR"
tmp="$(mktemp -d "$LEASEFS_VM_DIR/.initramfs.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,mnt,etc,root}
chmod 1777 "$root/tmp"

cp "$BUSYBOX" "$root/bin/busybox"
# One symlink per applet, at the path busybox itself lists (bin/sh, sbin/poweroff...).
"$BUSYBOX" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$LEASEFS_QEMU_DIR/guest-init.sh" "$root/init"
if [ "$gt_mode" != none ]; then
    install -m 0755 "$gt_path" "$root/bin/guest-tests"
fi
# /dev/console comes from the kernel's built-in initramfs (unpacked first).

# newc is the only cpio format the kernel reads; entries are owned by root.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio --quiet -o -H newc --owner=0:0) | gzip -6 > "$tmp/initramfs.cpio.gz"
mv -f "$tmp/initramfs.cpio.gz" "$out"
# Keep the 4 newest images.
ls -1t "$LEASEFS_VM_DIR"/initramfs-base-*.cpio.gz | tail -n +5 | xargs -r rm -f
log "initramfs: $out ($(du -h "$out" | cut -f1))"
echo "$out"
