#!/usr/bin/env bash
# Boot Debian's cloud kernel with virtme-ng (vng), its virtio-fs root and an --rwdir served by
# leasefsd, which vng finds as "virtiofsd" on PATH and starts unchanged, as it starts
# virtiofsd.
#
# Usage: qemu/virtme-ng.sh [--no-build] [--timeout SECS]
#
# virtme-ng has no option for the daemon's path: it runs the first "virtiofsd" it finds,
# PATH first. A directory holding only a symlink virtiofsd -> target/release/leasefsd goes
# first on PATH. vng runs `virtiofsd --version` and `--help`, then one daemon for the root
# (`--readonly --cache always`) and one per --rwdir (`--cache auto`), each with --syslog and
# --no-announce-submounts, and waits for each `<socket>.pid`.
#
# Checks: the guest command runs (exit status 0) and sees the host's file through the
# read-only root, writes a file into the --rwdir that the host then reads, and cannot write
# the root's top directory (vng lays tmpfs overlays over /tmp, /var, /etc...); while it runs,
# the processes serving the sockets are leasefsd.
#
# Installs virtme-ng 1.42 from PyPI and kmod (depmod) from Debian when missing; fetches the
# cloud kernel's package and unpacks it under build/vm/vng-kernel/ (vng builds its initramfs
# from the modules beside the image). Logs: $LEASEFS_LOG_DIR or build/vm/logs/vng-<time>/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build=1
timeout_secs=600
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --timeout=*) timeout_secs=${1#*=} ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

missing=()
command -v depmod >/dev/null 2>&1 || missing+=(kmod)
command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
install_pkgs "${missing[@]}"
# pip puts vng in the interpreter's scripts directory, which a pyenv shim reaches only after a
# rehash: look there too.
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
if ! command -v vng >/dev/null 2>&1; then
    log "installing virtme-ng 1.42 from PyPI"
    python3 -m pip install -q virtme-ng==1.42 >&2 || die "pip install virtme-ng failed"
fi
command -v vng >/dev/null 2>&1 || die "vng is not on PATH after installing virtme-ng"

if [ "$build" -eq 1 ]; then
    cargo build --release --bin leasefsd >&2
fi
daemon="$LEASEFS_TARGET/release/leasefsd"
[ -x "$daemon" ] || die "$daemon is missing (build it, or drop --no-build)"
daemon=$(realpath "$daemon")

# The kernel with its modules: vng looks for lib/modules/<version> above the image.
kernel=$("$LEASEFS_QEMU_DIR/fetch-kernel.sh")
release=${kernel##*/vmlinuz-}
kroot="$LEASEFS_VM_DIR/vng-kernel/$release"
if [ ! -s "$kroot/boot/vmlinuz-$release" ] || [ ! -d "$kroot/lib/modules/$release" ]; then
    log "unpacking linux-image-$release with its modules"
    rm -rf "$kroot.tmp"
    mkdir -p "$kroot.tmp"
    pkg="linux-image-$release-unsigned"
    apt-cache show "$pkg" >/dev/null 2>&1 || pkg="linux-image-$release"
    (cd "$kroot.tmp" && apt-get download -q "$pkg" >&2) || die "apt-get download $pkg failed"
    dpkg-deb -x "$kroot.tmp"/*.deb "$kroot.tmp/x"
    # vng's initramfs loads modules with busybox insmod, which takes no .ko.xz: without
    # virtio_console the guest has no script ports and vng cannot report the exit status.
    find "$kroot.tmp/x/lib/modules" -name '*.ko.xz' -exec xz -d {} +
    depmod -b "$kroot.tmp/x" "$release"
    rm -rf "$kroot"
    mv "$kroot.tmp/x" "$kroot"
    rm -rf "$kroot.tmp"
fi

logs="${LEASEFS_LOG_DIR:-$LEASEFS_VM_DIR/logs/vng-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$logs"
work=$(mktemp -d /tmp/leasefs-vng.XXXXXX)
vng_pid=""
cleanup() {
    [ -z "$vng_pid" ] || kill -TERM "$vng_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/bin" "$work/rw"
ln -s "$daemon" "$work/bin/virtiofsd"
echo "the host wrote this" > "$work/from-host"

# The guest: its root is the host's /, read-only; $work/rw is writable. One vCPU: under TCG
# with two, the kernel's live code patching (int3) now and then oopses at boot (seen here).
guest_cmd="set -e
test \"\$(cat $work/from-host)\" = 'the host wrote this'
echo 'the guest wrote this' > $work/rw/from-guest
if touch /.leasefs-vng-probe 2>/dev/null; then echo 'the root is writable'; exit 3; fi
grep -c virtiofs /proc/mounts
sleep 3
echo LEASEFS-VNG-OK"

log "vng --run $kroot/boot/vmlinuz-$release (virtiofsd -> $daemon)"
(
    cd "$work"
    PATH="$work/bin:$PATH" exec timeout "$timeout_secs" vng --run "$kroot/boot/vmlinuz-$release" \
        --disable-kvm --disable-microvm --cpus 1 --memory 1G --rwdir "$work/rw" --verbose \
        --exec "$guest_cmd"
) >"$logs/vng.out" 2>"$logs/vng.err" &
vng_pid=$!

# While the guest runs: every virtio-fs daemon vng started is leasefsd.
seen=""
status=0
while kill -0 "$vng_pid" 2>/dev/null; do
    for pid in $(pgrep -f -- '--no-announce-submounts' || true); do
        exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
        case " $seen " in *" $pid "*) continue ;; esac
        [ -n "$exe" ] || continue
        seen+=" $pid"
        echo "$pid $exe $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" >> "$logs/daemons"
    done
    sleep 0.2
done
wait "$vng_pid" || status=$?
vng_pid=""

fail=0
# Without udev in the guest, virtme-ng-init may find no script ports and run the command on
# the console: vng then exits 255 whatever the command did, and the init prints its status.
if [ "$status" -ne 0 ] && ! grep -q 'script exited with code 0' "$logs/vng.err"; then
    log "vng exited with status $status, and the guest command did not exit with 0"
    fail=1
fi
if ! grep -q LEASEFS-VNG-OK "$logs/vng.out" "$logs/vng.err"; then
    log "the guest command did not finish"
    fail=1
fi
if [ "$(cat "$work/rw/from-guest" 2>/dev/null)" != "the guest wrote this" ]; then
    log "the guest's file is not in the --rwdir on the host"
    fail=1
fi
if [ -e /.leasefs-vng-probe ]; then
    rm -f /.leasefs-vng-probe
    log "the guest wrote into the read-only root"
    fail=1
fi
daemons=$(wc -l < "$logs/daemons" 2>/dev/null || echo 0)
if [ "$daemons" -lt 2 ]; then
    log "expected two virtio-fs daemons (root and --rwdir), saw $daemons"
    fail=1
fi
if [ -f "$logs/daemons" ] && grep -qv " $daemon " "$logs/daemons"; then
    log "a virtio-fs daemon that is not leasefsd served the guest:"
    grep -v " $daemon " "$logs/daemons" >&2
    fail=1
fi
if grep -qi '9p\|falling back' "$logs/vng.err"; then
    log "vng fell back to 9p:"
    grep -i '9p\|falling back' "$logs/vng.err" >&2
    fail=1
fi
if [ "$fail" -ne 0 ]; then
    tail -n 40 "$logs/vng.err" >&2
    tail -n 20 "$logs/vng.out" >&2
    echo "FAIL  virtme-ng (logs $logs)"
    exit 1
fi
echo "ok    virtme-ng: root and --rwdir served by leasefsd ($daemons daemons)"
