# shellcheck shell=bash disable=SC2034
# Shared helpers for the qemu/ scripts. Source it; do not run it.
#
# Conventions:
#   LEASEFS_ROOT      repository root (derived from this file's location)
#   LEASEFS_VM_DIR    cache for kernels, initramfs, logs: build/vm/ (gitignored)
#   LEASEFS_NOTIFY_DIR  the patched QEMU and kernel: build/notify/ (gitignored)
#   LEASEFS_TARGET    cargo target dir (honours CARGO_TARGET_DIR, else target/)
# Messages go to stderr so scripts can print a single path on stdout.

LEASEFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LEASEFS_QEMU_DIR="$LEASEFS_ROOT/qemu"
LEASEFS_VM_DIR="${LEASEFS_VM_DIR:-$LEASEFS_ROOT/build/vm}"
LEASEFS_TARGET="${CARGO_TARGET_DIR:-$LEASEFS_ROOT/target}"
# The notify-capable stack (qemu/build-notify-stack.sh): patched QEMU and kernel.
LEASEFS_NOTIFY_DIR="${LEASEFS_NOTIFY_DIR:-$LEASEFS_ROOT/build/notify}"
# The triple the static guest binary is built for (see make-initramfs.sh).
LEASEFS_GUEST_TRIPLE=x86_64-unknown-linux-gnu
# The virtio-fs tag QEMU advertises and the guest mounts.
LEASEFS_TAG="${LEASEFS_TAG:-leasefs}"

# Cargo lives in ~/.cargo/bin on a rustup install; scripts may run from a
# shell (CI, sudo) that does not have it on PATH.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi

# Print a script's leading comment block (its usage text) without the "# ".
print_header() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

log()  { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "${0##*/}" "$*" >&2; }
die()  { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# Run a command as root (we are root on the CI machines; sudo elsewhere).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $*"
    fi
}

# apt-get update at most once per script run, and only when we actually
# need the package lists (installing or resolving the kernel).
_LEASEFS_APT_UPDATED=0
apt_update_once() {
    if [ "$_LEASEFS_APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq >&2 || die "apt-get update failed"
        _LEASEFS_APT_UPDATED=1
    fi
}

# install_pkgs PKG... : apt-get install the given packages (no-op if none).
install_pkgs() {
    [ "$#" -eq 0 ] && return 0
    apt_update_once
    log "installing: $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@" >&2 \
        || die "apt-get install $* failed"
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'
}

# Tools the VM scripts need on the host; installs only what is missing.
ensure_vm_tools() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
    # The package, not just a busybox binary: the dynamic "busybox" package
    # also provides /bin/busybox, and the guest needs the static one.
    pkg_installed busybox-static || missing+=(busybox-static)
    command -v cpio >/dev/null 2>&1 || missing+=(cpio)
    install_pkgs "${missing[@]}"
}

# prepare_vm_runs BUILD: what a script needs before it boots guests with
# run-vm.sh --no-build: leasefsd and guest-tests built (release) when BUILD is
# 1, the VM tools installed, the stock guest kernel fetched and the base
# initramfs made.
prepare_vm_runs() {
    local mk_args=()
    if [ "$1" -eq 1 ]; then
        log "building leasefsd and guest-tests (release)"
        cargo build --release --bin leasefsd >&2 || die "cargo build --release --bin leasefsd failed"
        cargo build --release -p guest-tests >&2 || die "cargo build --release -p guest-tests failed"
    else
        mk_args+=(--no-build)
    fi
    ensure_vm_tools
    "$LEASEFS_QEMU_DIR/fetch-kernel.sh" >/dev/null || die "fetch-kernel.sh failed"
    "$LEASEFS_QEMU_DIR/make-initramfs.sh" "${mk_args[@]}" >/dev/null || die "make-initramfs.sh failed"
}

require_cargo() {
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found (install Rust with rustup; ~/.cargo/bin is searched too)"
}

# Quote one word for a POSIX shell (busybox ash): 'it'\''s'.
sh_quote() {
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
}

# Wait (bounded) for a unix socket to appear while its creator is alive.
# wait_for_socket PATH PID SECONDS WHAT LOGFILE
wait_for_socket() {
    local sock=$1 pid=$2 secs=$3 what=$4 logf=$5 i status
    for ((i = 0; i < secs * 10; i++)); do
        [ -S "$sock" ] && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            log "error: $what exited (status $status) before creating $sock"
            show_log "$what" "$logf"
            return 1
        fi
        sleep 0.1
    done
    log "error: $what did not create $sock within ${secs}s"
    show_log "$what" "$logf"
    return 1
}

show_log() {
    local what=$1 logf=$2
    {
        echo "----- $what log ($logf) -----"
        if [ -s "$logf" ]; then tail -n 50 "$logf"; else echo "(empty)"; fi
        echo "----- end of $what log -----"
    } >&2
}

# The daemon configurations the benchmark and stress scripts name (all with
# --sandbox none, so that the runs compare the daemons, not their sandboxes):
# the daemon, and its arguments.
declare -A cfg_daemon=(
    [leasefsd-default]=leasefsd
    [virtiofsd-always]=virtiofsd
    [virtiofsd-auto]=virtiofsd
    [virtiofsd-never]=virtiofsd
    [leasefsd-lease0]=leasefsd
    [leasefsd-always]=leasefsd
    [leasefsd-nopoll]=leasefsd
    [leasefsd-trace]=leasefsd
    [virtiofsd-auto-trace]=virtiofsd
    [virtiofsd-always-trace]=virtiofsd
    [two-leasefsd]=leasefsd
)
declare -A cfg_args=(
    [leasefsd-default]="--sandbox none"
    [virtiofsd-always]="--cache always --sandbox none"
    [virtiofsd-auto]="--cache auto --sandbox none"
    [virtiofsd-never]="--cache never --sandbox none"
    [leasefsd-lease0]="--lease-timeout 0 --sandbox none"
    [leasefsd-always]="--cache always --sandbox none"
    [leasefsd-nopoll]="--queue-poll-us 0 --sandbox none"
    [leasefsd-trace]="--log-level trace --sandbox none"
    [virtiofsd-auto-trace]="--cache auto --log-level trace --sandbox none"
    [virtiofsd-always-trace]="--cache always --log-level trace --sandbox none"
    [two-leasefsd]="--sandbox none"
)

# stack_spec NAME NOTIFY_QEMU NOTIFY_KERNEL: the QEMU and guest kernel of a VM
# stack as "QEMU KERNEL", "-" for Debian's stock one; fails for an unknown name.
#   stock        Debian QEMU 7.2 + Debian 6.12 cloud kernel
#   notify       patched QEMU + patched kernel (alias: patched)
#   qemu-only    patched QEMU + stock kernel (alias: patched-qemu)
#   kernel-only  stock QEMU + patched kernel (alias: patched-kernel)
stack_spec() {
    case "$1" in
        stock) echo "- -" ;;
        notify|patched) echo "$2 $3" ;;
        qemu-only|patched-qemu) echo "$2 -" ;;
        kernel-only|patched-kernel) echo "- $3" ;;
        *) return 1 ;;
    esac
}

# stack_vm_args QEMU KERNEL: run-vm.sh's arguments for a stack_spec result,
# one per line.
stack_vm_args() {
    [ "$1" = - ] || printf '%s\n' --qemu "$1"
    [ "$2" = - ] || printf '%s\n' --kernel "$2"
}

# check_stack NAME QEMU KERNEL: die unless the stack's patched parts exist.
check_stack() {
    [ "$2" = - ] || [ -x "$2" ] || die "stack $1: patched QEMU not found: $2 (qemu/build-notify-stack.sh builds it, or give --qemu PATH)"
    [ "$3" = - ] || [ -s "$3" ] || die "stack $1: patched kernel not found: $3 (qemu/build-notify-stack.sh builds it, or give --kernel PATH)"
}

# ensure_virtiofsd: print the path of virtiofsd (the reference daemon),
# installing 1.14.0 with cargo (about a minute) if it is neither on PATH nor
# in ~/.cargo/bin. Fails if it cannot be had.
ensure_virtiofsd() {
    local v
    v=$(command -v virtiofsd 2>/dev/null || true)
    [ -n "$v" ] || v="$HOME/.cargo/bin/virtiofsd"
    if [ ! -x "$v" ]; then
        local missing=()
        for p in libseccomp-dev libcap-ng-dev; do pkg_installed "$p" || missing+=("$p"); done
        install_pkgs "${missing[@]}"
        log "installing virtiofsd 1.14.0 with cargo install (about a minute)"
        cargo install virtiofsd --version 1.14.0 --locked >&2 || die "cargo install virtiofsd failed"
    fi
    [ -x "$v" ] || die "virtiofsd is not at $v after cargo install"
    echo "$v"
}
