#!/usr/bin/env bash
# Build a small guest kernel whose virtio-fs driver uses the notification
# queue (VIRTIO_FS_F_NOTIFICATION), and print the path of its bzImage.
#
# Usage: qemu/build-notify-kernel.sh [--stack 7.2|current] [--force] OUTDIR
#
#   --stack 7.2      (default) Debian's linux-source-6.12 (bookworm) with
#                    qemu/patches/linux-6.12/, cache build/notify-src/
#   --stack current  linux-source-7.3 from trixie-backports with
#                    qemu/patches/linux-7.3/, cache build/notify-current-src/;
#                    adds a `deb` entry for trixie-backports in
#                    /etc/apt/sources.list.d/leasefs-trixie-backports.sources
#                    if apt does not know the package (backports have
#                    priority 100: nothing is installed from it by accident)
#
# Source: the linux-source package (apt-get download; the .deb and the
# tarball inside it are cached in the cache directory). It is unpacked into
# CACHE/work/, patched with the stack's *.patch (patch -p1, in name order),
# configured with `make tinyconfig` plus the stack's guest.config and `make
# olddefconfig` (every CONFIG_...=y of the fragment must survive, or the
# build stops), and built with `make -j2 bzImage`. The result is
# OUTDIR/bzImage, with its .config as OUTDIR/bzImage.config and the full
# make log in CACHE/work/make.log.
#
# The build is skipped when OUTDIR/bzImage.stamp names the same inputs
# (the patches, the fragment, this script); --force rebuilds anyway.
# On a fresh Debian bookworm machine it installs the build dependencies
# (build-essential flex bison bc libelf-dev libssl-dev ...). About 3 to 4
# minutes on 2 cores (6.12); 7.3: 494 s on a busy 2-core machine (7.4
# min of CPU; the .deb is 167 MB). Messages go to
# stderr; stdout is the bzImage path.
#
# Use it with: qemu/run-vm.sh --kernel OUTDIR/bzImage ...
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SELF="$LEASEFS_QEMU_DIR/build-notify-kernel.sh"

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
        *) [ -z "$outdir" ] || die "only one OUTDIR, got '$outdir' and '$1'"
           outdir=$1 ;;
    esac
    shift
done
[ -n "$outdir" ] || die "missing OUTDIR (try --help)"
case "$stack" in
    7.2)     PKG=linux-source-6.12; SUITE=bookworm
             PATCH_DIR="$LEASEFS_QEMU_DIR/patches/linux-6.12"
             SRC_CACHE="$LEASEFS_ROOT/build/notify-src" ;;
    current) PKG=linux-source-7.3; SUITE=trixie-backports
             PATCH_DIR="$LEASEFS_QEMU_DIR/patches/linux-7.3"
             SRC_CACHE="$LEASEFS_ROOT/build/notify-current-src" ;;
    *) die "--stack: 7.2 or current, not '$stack'" ;;
esac
FRAGMENT="$PATCH_DIR/guest.config"
WORK="$SRC_CACHE/work"
[ -f "$FRAGMENT" ] || die "config fragment not found: $FRAGMENT"
mkdir -p "$outdir" "$SRC_CACHE"
outdir=$(cd "$outdir" && pwd -P)
out="$outdir/bzImage"

# One build at a time per OUTDIR.
exec 9>"$outdir/.build-notify-kernel.lock"
flock 9

shopt -s nullglob
patches=("$PATCH_DIR"/*.patch)
shopt -u nullglob
[ "${#patches[@]}" -gt 0 ] || die "no patches in $PATCH_DIR"

# --- up to date? ---
key="$(
    cd "$PATCH_DIR"
    sha256sum "${patches[@]##*/}" "${FRAGMENT##*/}"
    sha256sum < "$SELF"
)"
key="$(printf '%s\n' "$key" | sha256sum | cut -d' ' -f1)"
if [ "$force" -eq 0 ] && [ -s "$out" ] && [ -f "$out.stamp" ] \
        && [ "$(head -n 1 "$out.stamp")" = "$key" ]; then
    log "up to date: $out (inputs unchanged; --force rebuilds)"
    echo "$out"
    exit 0
fi

# --- build dependencies ---
missing=()
for p in build-essential flex bison bc libelf-dev libssl-dev xz-utils patch; do
    pkg_installed "$p" || missing+=("$p")
done
install_pkgs "${missing[@]}"

# --- kernel source: the .deb and its tarball, cached ---
tarball="$SRC_CACHE/$PKG.tar.xz"
if [ ! -s "$tarball" ]; then
    if [ -s "/usr/src/$PKG.tar.xz" ]; then
        # The package is installed (apt-get install linux-source-6.12).
        log "using /usr/src/$PKG.tar.xz"
        cp "/usr/src/$PKG.tar.xz" "$tarball.tmp"
    else
        deb=$(ls -1t "$SRC_CACHE"/"${PKG}"_*.deb 2>/dev/null | head -n 1 || true)
        if [ -z "$deb" ]; then
            apt-cache show "$PKG" >/dev/null 2>&1 || apt_update_once
            if [ "$SUITE" = trixie-backports ] && ! apt-cache show "$PKG" >/dev/null 2>&1; then
                f=/etc/apt/sources.list.d/leasefs-trixie-backports.sources
                log "adding trixie-backports to $f (for $PKG)"
                printf '%s\n' "# leasefs (qemu/build-notify-kernel.sh --stack current): $PKG" \
                    'Types: deb deb-src' 'URIs: http://deb.debian.org/debian' \
                    'Suites: trixie-backports' 'Components: main' \
                    'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
                    | as_root tee "$f" >/dev/null
                _LEASEFS_APT_UPDATED=0
                apt_update_once
            fi
            log "downloading $PKG (about 150 MB)"
            # As root apt warns that the download is unsandboxed; harmless.
            (cd "$SRC_CACHE" && apt-get download -q "$PKG" >&2 2> >(grep -v 'unsandboxed' >&2)) \
                || die "apt-get download $PKG failed"
            deb=$(ls -1t "$SRC_CACHE"/"${PKG}"_*.deb 2>/dev/null | head -n 1 || true)
            [ -n "$deb" ] || die "apt-get download $PKG produced no .deb in $SRC_CACHE"
        fi
        log "extracting the source tarball from ${deb##*/}"
        dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/src/$PKG.tar.xz" > "$tarball.tmp" \
            || die "${deb##*/} has no usr/src/$PKG.tar.xz"
    fi
    mv -f "$tarball.tmp" "$tarball"
fi

# --- fresh tree, patched ---
start=$SECONDS
log "unpacking $tarball into $WORK"
rm -rf "$WORK"
mkdir -p "$WORK"
tar -xf "$tarball" -C "$WORK"
tree="$WORK/$PKG"
[ -f "$tree/Makefile" ] || die "unexpected tarball layout: no $PKG/Makefile"
for p in "${patches[@]}"; do
    log "applying ${p##*/}"
    patch -d "$tree" -p1 --batch --forward --quiet < "$p" >&2 \
        || die "${p##*/} does not apply to $PKG"
done

# --- configure ---
jobs=$(nproc)
[ "$jobs" -le 2 ] || jobs=2   # shared 2-core build machines: no more than -j2
mk=(make -C "$tree" -j"$jobs" KBUILD_BUILD_USER=leasefs KBUILD_BUILD_HOST=leasefs)
MAKE_LOG="$WORK/make.log"
: > "$MAKE_LOG"
run_make() {
    "${mk[@]}" "$@" >>"$MAKE_LOG" 2>&1 && return 0
    tail -n 60 "$MAKE_LOG" >&2
    die "make $* failed (full log: $MAKE_LOG)"
}
log "configuring: tinyconfig + ${FRAGMENT#"$LEASEFS_ROOT"/} + olddefconfig"
run_make tinyconfig
(cd "$tree" && scripts/kconfig/merge_config.sh -m .config "$FRAGMENT" >>"$MAKE_LOG" 2>&1) \
    || die "merge_config.sh failed (log: $MAKE_LOG)"
run_make olddefconfig
# Every option the fragment sets must have stuck (a missing dependency makes
# olddefconfig drop it silently).
lost=()
while IFS= read -r line; do
    grep -qxF "$line" "$tree/.config" || lost+=("$line")
done < <(grep -E '^CONFIG_[A-Za-z0-9_]+=' "$FRAGMENT")
if [ "${#lost[@]}" -gt 0 ]; then
    for line in "${lost[@]}"; do
        opt=${line%%=*}
        log "not in .config: $line (have: $(grep -E "^$opt=|^# $opt is not set" "$tree/.config" || echo nothing))"
    done
    die "${#lost[@]} option(s) of the fragment did not survive olddefconfig"
fi

# --- build ---
log "make -j$jobs bzImage (log: $MAKE_LOG)"
run_make bzImage
img="$tree/arch/x86/boot/bzImage"
[ -s "$img" ] || die "make succeeded but $img is missing"

cp "$img" "$out.tmp"
cp "$tree/.config" "$out.config"
mv -f "$out.tmp" "$out"
{
    echo "$key"
    echo "$PKG $(make -s -C "$tree" kernelrelease 2>/dev/null || true)"
    for p in "${patches[@]}"; do echo "${p##*/}"; done
} > "$out.stamp"
log "built $out ($(du -h "$out" | cut -f1)) in $((SECONDS - start))s"
echo "$out"
