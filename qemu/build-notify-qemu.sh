#!/usr/bin/env bash
# Build Debian's QEMU with the virtio-fs notification queue patches and put
# qemu-system-x86_64 in OUTDIR.
#
# Usage: qemu/build-notify-qemu.sh [--stack 7.2|current] [--force] OUTDIR
#
#   --stack 7.2      (default) bookworm's QEMU 7.2 + qemu/patches/qemu-7.2/
#   --stack current  trixie's QEMU 10.0 + qemu/patches/qemu-10.0/ (the
#                    upstream-style series; trixie-backports' 11.1 source is
#                    listed in the archive index but its files are not on the
#                    mirror, see docs/notify-patches.md)
#   --force          rebuild even when OUTDIR's binary matches the patches
#
# Prints OUTDIR/qemu-system-x86_64 on stdout; progress goes to stderr.
#
# Steps, on a fresh Debian bookworm machine (as root or with sudo):
# installs the build dependencies, enables deb-src in the apt sources if
# none is (Types: deb deb-src; for current a deb-src entry for trixie in
# /etc/apt/sources.list.d/leasefs-trixie.sources), fetches the source with
# `apt-get source qemu` (current: qemu/trixie; what the build uses is
# Debian's tree with Debian's patches applied), applies our patches with
# `patch -p1` in name order and builds x86_64-softmmu (TCG, KVM, vhost-user,
# system libfdt, no docs, no -Werror) out of tree.
#
# QEMU 10.0 needs meson >= 1.5 (bookworm has 1.0.1) and Debian's +ds
# tarball drops the meson wheel QEMU bundles: current installs meson 1.5.2
# with pip into a venv in its cache (venv/, python3-venv) and configures
# with --python=venv/bin/python3 (QEMU's own pyvenv picks meson up from
# there) and --disable-install-blobs (the +ds tarball has no firmware).
#
# Rebuilds only when needed: OUTDIR/qemu-system-x86_64.stamp holds a hash of
# the patch files and of this script; when it matches, nothing is done.
# Cache (gitignored): build/notify-qemu/ (7.2) or build/notify-current-qemu/
# (current); LEASEFS_NOTIFY_QEMU_CACHE overrides:
#   dl/   the source package as apt-get source downloaded it (kept)
#   src/  Debian's tree plus our patches; a changed patch rewrites only the
#         files whose content changed, so ninja rebuilds only what it must
#   obj/  the meson/ninja build directory
# Timing on the 2-core CI machine: 7.2 about 2.5 min from scratch (source
# already downloaded: 23 MB), current 601 s on a busy 2-core machine
# (configure 70 s, ninja 1611 steps; 5.8 min of CPU; source 40 MB);
# seconds when the stamp matches.
#
# The binary looks for firmware in Debian's directories (configured with
# --firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu, which
# lie outside its /usr/local prefix and so stay absolute wherever the binary
# sits): SeaBIOS bios-256k.bin from seabios, linuxboot_dma.bin and kvmvapic.bin
# from qemu-system-data, NIC option ROMs from ipxe-qemu. Those packages are
# installed here; run-vm.sh --qemu passes the same directories with -L too.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

stack=7.2
force=0
outdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --stack) [ $# -ge 2 ] || die "--stack needs 7.2 or current"; stack=$2; shift ;;
        --stack=*) stack=${1#--stack=} ;;
        --force) force=1 ;;
        -h|--help) print_header "$0"; exit 0 ;;
        -*) die "unknown option: $1 (try --help)" ;;
        *) [ -z "$outdir" ] || die "only one OUTDIR, got '$outdir' and '$1'"; outdir=$1 ;;
    esac
    shift
done
[ -n "$outdir" ] || die "usage: $0 [--stack 7.2|current] [--force] OUTDIR (try --help)"

FIRMWAREPATH=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu
CONFIGURE_ARGS=(
    --target-list=x86_64-softmmu --without-default-features
    --enable-tcg --enable-kvm --enable-vhost-user --enable-fdt=system
    --disable-docs --disable-werror
)
BUILD_DEPS=(ninja-build libglib2.0-dev libpixman-1-dev pkg-config libfdt-dev
            zlib1g-dev gcc make python3 dpkg-dev xz-utils patch rsync
            seabios qemu-system-data ipxe-qemu)
case "$stack" in
    7.2)
        PATCH_DIR="$LEASEFS_QEMU_DIR/patches/qemu-7.2"
        CACHE="${LEASEFS_NOTIFY_QEMU_CACHE:-$LEASEFS_ROOT/build/notify-qemu}"
        # apt-get source argument: bookworm's, by name, so that deb-src entries for newer
        # suites (the current stack adds trixie's) cannot make it pick another version.
        SOURCE=qemu/bookworm
        DSC_GLOB='qemu_7.2*.dsc'
        CONFIGURE_ARGS+=(--meson=meson --with-git-submodules=ignore)
        BUILD_DEPS+=(meson)
        ;;
    current)
        PATCH_DIR="$LEASEFS_QEMU_DIR/patches/qemu-10.0"
        CACHE="${LEASEFS_NOTIFY_QEMU_CACHE:-$LEASEFS_ROOT/build/notify-current-qemu}"
        SOURCE=qemu/trixie
        DSC_GLOB='qemu_10.0.*.dsc'
        MESON_VERSION=1.5.2
        CONFIGURE_ARGS+=(--disable-install-blobs --python="$CACHE/venv/bin/python3")
        BUILD_DEPS+=(python3-venv)
        ;;
    *) die "--stack: 7.2 or current, not '$stack'" ;;
esac
CONFIGURE_ARGS+=(--firmwarepath="$FIRMWAREPATH")

shopt -s nullglob
patches=("$PATCH_DIR"/*.patch)
shopt -u nullglob
[ "${#patches[@]}" -gt 0 ] || die "no patches in $PATCH_DIR"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd -P)
out="$outdir/qemu-system-x86_64"
stamp="$out.stamp"

# The stamp: this script and every patch, by name and content.
self="$LEASEFS_QEMU_DIR/build-notify-qemu.sh"
want=$(cd "$LEASEFS_QEMU_DIR" && sha256sum "${self#"$LEASEFS_QEMU_DIR"/}" \
           "${patches[@]#"$LEASEFS_QEMU_DIR"/}" | sha256sum | cut -d' ' -f1)
if [ "$force" -eq 0 ] && [ -x "$out" ] && [ -f "$stamp" ] \
        && [ "$(head -n 1 "$stamp")" = "$want" ]; then
    log "up to date: $out (stamp $stamp matches the patches)"
    echo "$out"
    exit 0
fi

start=$SECONDS
phase() { log "[$((SECONDS - start))s] $*"; }

# ---------------------------------------------------------------- build deps
missing=()
for p in "${BUILD_DEPS[@]}"; do pkg_installed "$p" || missing+=("$p"); done
install_pkgs "${missing[@]}"

# ---------------------------------------------------------------- source
have_deb_src() {
    grep -Eqs '^[[:space:]]*(Types:.*deb-src|deb-src[[:space:]])' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list
}
enable_deb_src() {
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -f "$f" ] && grep -q '^Types: deb$' "$f"; then
        log "enabling deb-src in $f"
        as_root sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"
    elif [ -f /etc/apt/sources.list ] && grep -Eq '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
        log "adding deb-src lines to /etc/apt/sources.list.d/leasefs-deb-src.list"
        sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' /etc/apt/sources.list \
            | as_root tee /etc/apt/sources.list.d/leasefs-deb-src.list >/dev/null
    else
        die "no deb-src in the apt sources and no 'Types: deb' or 'deb' line to copy; add deb-src for bookworm by hand"
    fi
    # The new source lists must be fetched even if apt-get update ran.
    _LEASEFS_APT_UPDATED=0
    apt_update_once
}

# current: trixie's sources, in a file of their own; deb-src only, so that
# nothing from trixie is ever installed from it.
TRIXIE_SOURCES=/etc/apt/sources.list.d/leasefs-trixie.sources
enable_trixie_src() {
    grep -qs '^Suites: trixie$' "$TRIXIE_SOURCES" && return 0
    log "adding a deb-src entry for trixie in $TRIXIE_SOURCES"
    printf '%s\n' '# leasefs (qemu/build-notify-qemu.sh --stack current): QEMU source' \
        'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: trixie' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
        | as_root tee "$TRIXIE_SOURCES" >/dev/null
    _LEASEFS_APT_UPDATED=0
    apt_update_once
}

dl="$CACHE/dl"
mkdir -p "$dl"
newest_dsc() {
    local found=()
    shopt -s nullglob
    # shellcheck disable=SC2206  # DSC_GLOB is a glob
    found=("$dl"/$DSC_GLOB)
    shopt -u nullglob
    [ "${#found[@]}" -eq 0 ] || printf '%s\n' "${found[@]}" | sort -V | tail -n 1
}
dsc=$(newest_dsc)
if [ -z "$dsc" ]; then
    if [ "$stack" = 7.2 ]; then
        have_deb_src || enable_deb_src
    else
        enable_trixie_src
    fi
    phase "apt-get source --download-only $SOURCE into $dl"
    # As root apt warns that the download is unsandboxed; harmless.
    if ! (cd "$dl" && apt-get source -q --download-only "$SOURCE" >&2 2> >(grep -v 'unsandboxed' >&2)); then
        apt_update_once
        (cd "$dl" && apt-get source -q --download-only "$SOURCE" >&2 2> >(grep -v 'unsandboxed' >&2)) \
            || die "apt-get source $SOURCE failed"
    fi
    dsc=$(newest_dsc)
    [ -n "$dsc" ] || die "apt-get source $SOURCE left no $DSC_GLOB in $dl"
fi
version=$(sed -n 's/^Version: //p' "$dsc")
phase "source: $(basename "$dsc") (Debian $version)"

# Unpack (dpkg-source applies Debian's own patches) and patch in a scratch
# tree, then bring src/ to it: rsync --checksum leaves unchanged files (and
# their mtimes) alone and gives rewritten ones the current time (no -t), so
# ninja sees them as new even when a patch change restores an older file.
stage="$CACHE/src.new"
rm -rf "$stage"
dpkg-source --no-check -x "$dsc" "$stage" >/dev/null \
    || die "dpkg-source -x $(basename "$dsc") failed"
for p in "${patches[@]}"; do
    phase "patch -p1 < ${p#"$LEASEFS_ROOT"/}"
    patch -p1 -d "$stage" --batch --forward --no-backup-if-mismatch -s < "$p" \
        || die "$(basename "$p") does not apply to Debian's qemu $version"
done
mkdir -p "$CACHE/src"
rsync -rlpD --checksum --delete "$stage"/ "$CACHE/src"/
rm -rf "$stage"

# ---------------------------------------------------------------- configure + build
# Debian's python3 and meson, not a python3 some version manager put first.
export PATH="/usr/bin:$PATH"
if [ "$stack" = current ] \
        && [ "$("$CACHE/venv/bin/meson" --version 2>/dev/null)" != "$MESON_VERSION" ]; then
    phase "meson $MESON_VERSION (pip) into $CACHE/venv"
    rm -rf "$CACHE/venv"
    /usr/bin/python3 -m venv "$CACHE/venv" || die "python3 -m venv failed (python3-venv?)"
    "$CACHE/venv/bin/pip" install -q --disable-pip-version-check "meson==$MESON_VERSION" >&2 \
        || die "pip install meson==$MESON_VERSION failed"
fi
obj="$CACHE/obj"
args_file="$obj/.leasefs-configure-args"
args="${CONFIGURE_ARGS[*]} $version"
if [ ! -f "$obj/build.ninja" ] || [ "$(cat "$args_file" 2>/dev/null)" != "$args" ]; then
    phase "configure (out of tree in $obj)"
    rm -rf "$obj"
    mkdir -p "$obj"
    (cd "$obj" && "$CACHE/src/configure" "${CONFIGURE_ARGS[@]}" \
        --with-pkgversion="leasefs-notify, Debian $version" >"$obj/configure.log" 2>&1) || {
        tail -n 30 "$obj/configure.log" >&2
        die "configure failed (log: $obj/configure.log)"
    }
    echo "$args" > "$args_file"
fi
jobs=$(nproc)
[ "$jobs" -le 2 ] || jobs=2   # shared 2-core build machines: no more than -j2
phase "ninja qemu-system-x86_64 (-j$jobs)"
ninja -C "$obj" -j "$jobs" qemu-system-x86_64 >"$obj/ninja.log" 2>&1 || {
    grep -E -B2 -A8 'error:|FAILED' "$obj/ninja.log" | head -n 60 >&2
    die "build failed (log: $obj/ninja.log)"
}

install -m 0755 "$obj/qemu-system-x86_64" "$out.tmp"
mv -f "$out.tmp" "$out"
{
    echo "$want"
    echo "qemu $version + ${patches[*]##*/}"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start))s"
} > "$stamp"
phase "done: $out"
echo "$out"
