#!/usr/bin/env bash
# Print the path of a guest kernel (vmlinuz), downloading it once.
#
# Usage: qemu/fetch-kernel.sh [--refresh]
#
# The kernel is Debian's cloud 6.12 kernel: small, and it builds FUSE,
# VIRTIO_FS, VIRTIO_PCI, VIRTIO_CONSOLE and ACPI in (=y), so the guest needs
# no modules. We resolve the concrete package through the meta package
# (exact versions leave the archive after security updates), download the
# -unsigned flavour with apt-get download and unpack it with dpkg-deb -x.
#
# Cached under build/vm/kernel/. The first resolved kernel keeps being used
# (reproducible test runs); --refresh re-resolves the meta package and
# fetches a newer kernel if there is one.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

META="${LEASEFS_KERNEL_META:-linux-image-6.12-cloud-amd64}"
KDIR="$LEASEFS_VM_DIR/kernel"
refresh=0

while [ $# -gt 0 ]; do
    case "$1" in
        --refresh) refresh=1 ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

mkdir -p "$KDIR"

# Fast path: a kernel was fetched before.
if [ "$refresh" -eq 0 ] && [ -f "$KDIR/current" ]; then
    cur="$KDIR/$(cat "$KDIR/current")"
    if [ -s "$cur" ]; then
        echo "$cur"
        exit 0
    fi
fi

# "linux-image-6.12.117+deb12-cloud-amd64" from the meta package's Depends.
# Prints nothing (and succeeds) when apt does not know $META yet: on a fresh machine with no
# package lists apt-cache fails, which under set -e and pipefail would end the script silently.
resolve_dep() {
    { apt-cache depends "$META" 2>/dev/null || true; } \
        | sed -n 's/^ *|\{0,1\}Depends: <\{0,1\}\(linux-image-[^ >]*\)>\{0,1\}$/\1/p' \
        | head -n 1
}
dep="$(resolve_dep)"
if [ -z "$dep" ]; then
    # Fresh machine: package lists may be missing or stale.
    apt_update_once
    dep="$(resolve_dep)"
fi
[ -n "$dep" ] || die "cannot resolve $META through apt-cache depends (is it in the apt sources?)"

release="${dep#linux-image-}"          # e.g. 6.12.117+deb12-cloud-amd64
vmlinuz="vmlinuz-$release"

if [ -s "$KDIR/$vmlinuz" ]; then
    echo "$vmlinuz" > "$KDIR/current"
    echo "$KDIR/$vmlinuz"
    exit 0
fi

# Prefer the -unsigned package (the signed one only adds a Secure Boot
# signature); fall back to the package the meta package names.
pkg="$dep-unsigned"
if ! apt-cache show "$pkg" >/dev/null 2>&1; then
    pkg="$dep"
fi

log "downloading $pkg"
tmp="$(mktemp -d "$KDIR/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# apt-get download writes into the cwd; as root it warns that the download
# is unsandboxed (the _apt user cannot write here), which is harmless.
(cd "$tmp" && apt-get download -q "$pkg" >&2 2> >(grep -v 'unsandboxed' >&2)) \
    || die "apt-get download $pkg failed"
deb="$(ls "$tmp"/*.deb 2>/dev/null | head -n 1)"
[ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
dpkg-deb -x "$deb" "$tmp/x"
[ -s "$tmp/x/boot/$vmlinuz" ] || die "$deb has no boot/$vmlinuz"

# Keep just the kernel and its config (handy to check CONFIG_* options);
# modules are not needed, everything the guest uses is built in.
cp "$tmp/x/boot/config-$release" "$KDIR/config-$release" 2>/dev/null || true
cp "$tmp/x/boot/$vmlinuz" "$tmp/$vmlinuz"
mv -f "$tmp/$vmlinuz" "$KDIR/$vmlinuz"
echo "$vmlinuz" > "$KDIR/current"
log "kernel: $KDIR/$vmlinuz"
echo "$KDIR/$vmlinuz"
