#!/usr/bin/env bash
# Run cargo integration tests (tests/*.rs) on a newer host kernel: Debian's
# cloud 7.3 kernel booted under QEMU (TCG) with a busybox initramfs. The VM
# plays the host: leasefsd, the test binaries (which spawn leasefsd and drive
# it through the project's own vhost-user frontend over a unix socket) and
# their host-side file operations all run inside it. No virtio-fs device and
# no nested QEMU. Made for Linux 6.19's delegations (F_SETDELEG), which this
# machine's kernel does not have.
#
# Usage: qemu/host-vm.sh [--test NAME]... [--lib] [--filter STR] [--timeout SECS] [--no-build]
#                        [--tmpdir tmpfs|ext4] [--guest-cmd CODE] [--add FILE]...
#                        [--memory MB] [--refresh]
#
#   --test NAME       a tests/NAME.rs binary, repeatable (default: leases names, and
#                     delegations when tests/delegations.rs exists)
#   --lib             also the library's unit tests (cargo test --lib), as test "lib";
#                     with --filter, e.g. --lib --filter host_lease
#   --filter STR      passed to every test binary (libtest's name filter)
#   --timeout SECS    kill the VM after SECS (default 900)
#   --no-build        no cargo: use the newest static test binaries and leasefsd
#                     already in target/x86_64-unknown-linux-gnu/release/
#   --tmpdir FS       where TMPDIR (the tests' share directories) lives: tmpfs (default,
#                     /tmp) or ext4 (an ext4 image on an NVMe disk, mounted on /ext4)
#   --guest-cmd CODE  shell code run in the VM before the tests, counted as "guest-cmd"
#   --add FILE        copy FILE (a static binary or script) into the VM's /bin, repeatable
#   --memory MB       VM RAM (default 1536)
#   --refresh         resolve the kernel through the package index again
#
# The kernel: the newest linux-binary-<series>.N+debNN-cloud-amd64 package in
# trixie-backports (LEASEFS_HOST_KERNEL_SERIES, default 7.3), found in the
# archive's Packages index; the chain InRelease (gpgv, debian-archive-keyring)
# -> Packages.xz (SHA256) -> .deb (SHA256) is checked. Cached under
# build/vm/host-kernel/ (the first kernel resolved keeps being used; --refresh
# looks again). LEASEFS_DEBIAN_MIRROR (default http://deb.debian.org/debian).
#
# The binaries: RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_DEBUG=0
# cargo test --release --target x86_64-unknown-linux-gnu --test NAME... --no-run (without
# debug info: a third faster to build; the environment's CARGO_PROFILE_RELEASE_DEBUG wins).
# The test binaries have leasefsd's absolute path built in (env!("CARGO_BIN_EXE_leasefsd")),
# so the initramfs has leasefsd at that very path (and /bin/leasefsd), the tests in /tests/.
# /init is qemu/host-vm-init.sh: /proc, /sys, devtmpfs, /tmp on tmpfs, then each
# binary with --test-threads=1, between HOST-VM-BEGIN / HOST-VM-RESULT marker lines.
#
# Prints the kernel release seen inside, what `leasefsd --print-capabilities` says
# of delegations there, and one PASS/FAIL line per test binary. Exit status 0 only
# if every test binary passed; 1 if one failed; 125 if the VM never reported
# (timeout, kernel panic). Logs: build/vm/logs/host-vm-<time>/ (console.log,
# qemu.log), or LEASEFS_LOG_DIR. LEASEFS_ACCEL (default tcg), LEASEFS_SMP (2).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

EXIT_NO_MARKER=125
SERIES=${LEASEFS_HOST_KERNEL_SERIES:-7.3}
MIRROR=${LEASEFS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie-backports
KDIR="$LEASEFS_VM_DIR/host-kernel"

tests=()
lib=0
filter=""
timeout_secs=900
build=1
tmpdir_fs=tmpfs
guest_cmd=""
adds=()
memory=1536
refresh=0
orig_args=("$@")
need_arg() { [ "$2" -ge 2 ] || die "$1 needs an argument (try --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --test) need_arg "$1" $#; tests+=("$2"); shift ;;
        --test=*) tests+=("${1#*=}") ;;
        --lib) lib=1 ;;
        --filter) need_arg "$1" $#; filter=$2; shift ;;
        --filter=*) filter=${1#*=} ;;
        --timeout) need_arg "$1" $#; timeout_secs=$2; shift ;;
        --timeout=*) timeout_secs=${1#*=} ;;
        --no-build) build=0 ;;
        --tmpdir) need_arg "$1" $#; tmpdir_fs=$2; shift ;;
        --tmpdir=*) tmpdir_fs=${1#*=} ;;
        --guest-cmd) need_arg "$1" $#; guest_cmd=$2; shift ;;
        --guest-cmd=*) guest_cmd=${1#*=} ;;
        --add) need_arg "$1" $#; adds+=("$2"); shift ;;
        --add=*) adds+=("${1#*=}") ;;
        --memory) need_arg "$1" $#; memory=$2; shift ;;
        --memory=*) memory=${1#*=} ;;
        --refresh) refresh=1 ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
[[ "$timeout_secs" =~ ^[0-9]+$ ]] || die "--timeout wants seconds, got '$timeout_secs'"
[[ "$memory" =~ ^[0-9]+$ ]] || die "--memory wants MiB, got '$memory'"
case "$tmpdir_fs" in tmpfs|ext4) ;; *) die "--tmpdir is tmpfs or ext4, not '$tmpdir_fs'" ;; esac
for f in "${adds[@]}"; do [ -f "$f" ] || die "--add: no such file: $f"; done

cd "$LEASEFS_ROOT"
if [ "${#tests[@]}" -eq 0 ] && [ "$lib" -eq 0 ]; then
    tests=(leases names)
    # Picked up as soon as it exists.
    [ -f tests/delegations.rs ] && tests+=(delegations)
fi
for t in "${tests[@]}"; do
    [[ "$t" =~ ^[A-Za-z0-9_-]+$ ]] || die "--test wants a test target name, got '$t'"
    [ -f "tests/$t.rs" ] || [ -f "tests/$t/main.rs" ] || die "no integration test tests/$t.rs"
done
# The crate's name, which its unit-test binary is called by (deps/<crate>-<hash>).
crate=$(sed -n '/^\[package\]/,/^\[/ s/^name *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
all=("${tests[@]}")
[ "$lib" -eq 0 ] || all+=(lib)

ensure_vm_tools
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v xz >/dev/null 2>&1 || missing+=(xz-utils)
command -v gpgv >/dev/null 2>&1 || missing+=(gpgv)
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
if [ "$tmpdir_fs" = ext4 ]; then command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs); fi
install_pkgs "${missing[@]}"

# ---------------------------------------------------------------- the kernel
# fetch_kernel: print the path of the cached vmlinuz, resolving and downloading it first if
# need be.
fetch_kernel() {
    mkdir -p "$KDIR"
    if [ "$refresh" -eq 0 ] && [ -f "$KDIR/current-$SERIES" ]; then
        local cur
        cur="$KDIR/$(cat "$KDIR/current-$SERIES")"
        if [ -s "$cur" ]; then echo "$cur"; return 0; fi
    fi
    local tmp
    tmp=$(mktemp -d "$KDIR/.fetch.XXXXXX")
    # Runs in a command substitution's subshell: this EXIT trap is that subshell's.
    # shellcheck disable=SC2064  # expand now: tmp is local
    trap "rm -rf '$tmp'" EXIT
    local dist="$MIRROR/dists/$SUITE"
    log "resolving the newest $SERIES cloud kernel in $dist"
    curl -fsSL --retry 3 -o "$tmp/InRelease" "$dist/InRelease" || die "cannot fetch $dist/InRelease"
    gpgv --keyring /usr/share/keyrings/debian-archive-keyring.gpg "$tmp/InRelease" 2>"$tmp/gpgv.log" \
        || { cat "$tmp/gpgv.log" >&2; die "$dist/InRelease: bad or unknown signature"; }
    local want_idx
    want_idx=$(awk '/^SHA256:/ { s = 1; next } /^[^ ]/ { s = 0 }
                    s && $3 == "main/binary-amd64/Packages.xz" { print $1; exit }' "$tmp/InRelease")
    [ -n "$want_idx" ] || die "InRelease lists no main/binary-amd64/Packages.xz"
    curl -fsSL --retry 3 -o "$tmp/Packages.xz" "$dist/main/binary-amd64/Packages.xz" \
        || die "cannot fetch $dist/main/binary-amd64/Packages.xz"
    [ "$(sha256sum < "$tmp/Packages.xz" | cut -d' ' -f1)" = "$want_idx" ] \
        || die "Packages.xz does not match its SHA256 in InRelease"
    # One "package version filename size sha256" line per linux-binary-SERIES.N cloud kernel.
    xz -dc "$tmp/Packages.xz" | awk -v re="^linux-binary-${SERIES//./\\.}\\.[0-9]+\\+deb[0-9]+-cloud-amd64\$" '
        /^Package: / { p = $2; v = f = s = h = "" }
        /^Version: / { v = $2 } /^Filename: / { f = $2 } /^Size: / { s = $2 } /^SHA256: / { h = $2 }
        /^$/ { if (p ~ re && f != "") print p, v, f, s, h; p = "" }
        END { if (p ~ re && f != "") print p, v, f, s, h }' > "$tmp/candidates"
    [ -s "$tmp/candidates" ] || die "no linux-binary-$SERIES.*-cloud-amd64 package in $SUITE"
    local best="" line ver
    while read -r line; do
        ver=$(cut -d' ' -f2 <<< "$line")
        if [ -z "$best" ] || dpkg --compare-versions "$ver" gt "$(cut -d' ' -f2 <<< "$best")"; then
            best=$line
        fi
    done < "$tmp/candidates"
    local pkg version filename size sha
    read -r pkg version filename size sha <<< "$best"
    local release=${pkg#linux-binary-}
    local vmlinuz="vmlinuz-$release"
    if [ -s "$KDIR/$vmlinuz" ]; then
        echo "$vmlinuz" > "$KDIR/current-$SERIES"
        echo "$KDIR/$vmlinuz"
        return 0
    fi
    log "downloading $pkg $version ($((size / 1048576)) MiB): $filename"
    curl -fsSL --retry 3 -o "$tmp/k.deb" "$MIRROR/$filename" || die "cannot fetch $MIRROR/$filename"
    [ "$(stat -c %s "$tmp/k.deb")" = "$size" ] || die "$filename: size is not $size"
    [ "$(sha256sum < "$tmp/k.deb" | cut -d' ' -f1)" = "$sha" ] \
        || die "$filename does not match its SHA256 in the Packages index"
    dpkg-deb -x "$tmp/k.deb" "$tmp/x"
    local img
    img=$(find "$tmp/x/usr/lib/modules" "$tmp/x/boot" -name 'vmlinuz*' -type f 2>/dev/null | head -n 1)
    [ -n "$img" ] || die "$pkg has no vmlinuz"
    cp "$img" "$tmp/$vmlinuz"
    mv -f "$tmp/$vmlinuz" "$KDIR/$vmlinuz"
    echo "$vmlinuz" > "$KDIR/current-$SERIES"
    log "kernel: $KDIR/$vmlinuz"
    echo "$KDIR/$vmlinuz"
}
kernel=$(fetch_kernel)

# ---------------------------------------------------------------- the binaries
triple=$LEASEFS_GUEST_TRIPLE
reldir="$LEASEFS_TARGET/$triple/release"
declare -A test_bin=()
leasefsd="$reldir/leasefsd"
if [ "$build" -eq 1 ]; then
    require_cargo
    targs=()
    for t in "${tests[@]}"; do targs+=(--test "$t"); done
    [ "$lib" -eq 0 ] || targs+=(--lib)
    log "building leasefsd and ${all[*]} (static, $triple)"
    start=$SECONDS
    # No debug info (the release profile's debug = 1 makes the cold build take 190 s instead
    # of 120 s here, and the VM gets stripped binaries anyway); CARGO_PROFILE_RELEASE_DEBUG
    # set in the environment wins.
    static_cargo() {
        RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
            CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-0} \
            cargo "$1" --release --target "$triple" "${@:2}" --message-format=json
    }
    json=$(static_cargo test "${targs[@]}" --no-run) || die "cargo test --no-run failed"
    # Integration tests build leasefsd with them; the unit tests alone do not.
    if [ "${#tests[@]}" -eq 0 ]; then
        json+=$'\n'$(static_cargo build --bin leasefsd) || die "cargo build --bin leasefsd failed"
    fi
    log "built in $((SECONDS - start)) s"
    # compiler-artifact lines: "target":{"kind":["test"],...,"name":"leases",...},...,"executable":"..."
    for t in "${tests[@]}"; do
        test_bin[$t]=$(grep -F '"reason":"compiler-artifact"' <<< "$json" \
            | grep -F '"kind":["test"]' | grep -F "\"name\":\"$t\"" \
            | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1 || true)
        [ -n "${test_bin[$t]}" ] || die "cargo named no executable for test $t"
    done
    if [ "$lib" -eq 1 ]; then
        test_bin[lib]=$(grep -F '"reason":"compiler-artifact"' <<< "$json" \
            | grep -F '"kind":["lib"]' | grep -F '"test":true' \
            | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1 || true)
        [ -n "${test_bin[lib]}" ] || die "cargo named no executable for the unit tests (--lib)"
    fi
    exe=$(grep -F '"kind":["bin"]' <<< "$json" | grep -F '"name":"leasefsd"' \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1 || true)
    [ -z "$exe" ] || leasefsd=$exe
else
    for t in "${tests[@]}"; do
        # The newest deps/NAME-<hash> executable (no extension: not the .d files).
        test_bin[$t]=$(find "$reldir/deps" -maxdepth 1 -type f -perm -u+x -regex ".*/$t-[0-9a-f]+" \
            -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2- || true)
        [ -n "${test_bin[$t]}" ] || die "no static build of test $t in $reldir/deps (run without --no-build)"
    done
    if [ "$lib" -eq 1 ]; then
        test_bin[lib]=$(find "$reldir/deps" -maxdepth 1 -type f -perm -u+x -regex ".*/${crate//-/_}-[0-9a-f]+" \
            -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2- || true)
        [ -n "${test_bin[lib]}" ] || die "no static build of the unit tests in $reldir/deps (run without --no-build)"
    fi
fi
[ -x "$leasefsd" ] || die "leasefsd not found: $leasefsd"
case "$leasefsd" in /*) ;; *) die "leasefsd path is not absolute: $leasefsd" ;; esac
for b in "$leasefsd" "${test_bin[@]}"; do
    if ldd "$b" 2>/dev/null | grep -q '=>'; then
        die "$b is dynamically linked; build it with -C target-feature=+crt-static"
    fi
done
for t in "${tests[@]}"; do
    # The path the test binary spawns (env!("CARGO_BIN_EXE_leasefsd")) must be ours.
    grep -qaF "$leasefsd" "${test_bin[$t]}" \
        || warn "${test_bin[$t]} does not name $leasefsd: its leasefsd is elsewhere"
done

# ---------------------------------------------------------------- run state
if [ -n "${LEASEFS_LOG_DIR:-}" ]; then
    LOG_DIR=$LEASEFS_LOG_DIR
else
    LOG_DIR="$LEASEFS_VM_DIR/logs/host-vm-$(date +%Y%m%d-%H%M%S)-$$"
    mkdir -p "$LEASEFS_VM_DIR/logs"
    # Keep the 10 newest.
    find "$LEASEFS_VM_DIR/logs" -maxdepth 1 -name 'host-vm-*' -printf '%T@ %p\n' 2>/dev/null \
        | sort -rn | tail -n +11 | cut -d' ' -f2- | xargs -r rm -rf
fi
mkdir -p "$LOG_DIR"
CONSOLE_LOG="$LOG_DIR/console.log"
QEMU_LOG="$LOG_DIR/qemu.log"
: > "$CONSOLE_LOG"
RUN_TMP=$(mktemp -d /tmp/leasefs-host-vm.XXXXXX)
QEMU_PID=""
# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    trap - EXIT INT TERM
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    rm -rf "$RUN_TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- initramfs
root="$RUN_TMP/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc/host-vm,root,tests}
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$LEASEFS_QEMU_DIR/host-vm-init.sh" "$root/init"
# put_bin SRC DEST: without debug info (release builds carry it: 30 MB a binary, which TCG
# would have to unpack); symbols stay, so backtraces keep their function names.
put_bin() {
    mkdir -p "$(dirname "$2")"
    if ! objcopy --strip-debug "$1" "$2" 2>/dev/null; then cp "$1" "$2"; fi
    chmod 0755 "$2"
}
# /init mounts a tmpfs on /tmp, which would hide a leasefsd under /tmp (a CARGO_TARGET_DIR
# there): such files wait in /.tmp-seed and /init copies them in.
case "$leasefsd" in
    /tmp/*) put_bin "$leasefsd" "$root/.tmp-seed/${leasefsd#/tmp/}" ;;
    *) put_bin "$leasefsd" "$root$leasefsd" ;;
esac
ln -sf "$leasefsd" "$root/bin/leasefsd"
for t in "${all[@]}"; do
    put_bin "${test_bin[$t]}" "$root/tests/$t"
    printf '%s\n' "$t" >> "$root/etc/host-vm/tests"
done
for f in "${adds[@]}"; do install -m 0755 "$f" "$root/bin/${f##*/}"; done
printf '%s\n' "$filter" > "$root/etc/host-vm/filter"
printf '%s\n' "$tmpdir_fs" > "$root/etc/host-vm/tmpdir"
# The descriptor limit of this shell, which `cargo test` would run them with here: the kernel
# starts init with 1024, under which tests that make thousands of nodes hit the daemon's
# descriptor budget (passthrough::tests::readdirplus_pages_through_10000_entries).
ulimit -n > "$root/etc/host-vm/nofile"
[ -z "$guest_cmd" ] || printf '%s\n' "$guest_cmd" > "$root/etc/host-vm/guest-cmd"
# gzip -1: the VM unpacks it under TCG; speed matters more than size.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0) \
    | gzip -1 > "$RUN_TMP/initrd.gz"
log "initramfs: $(du -h "$RUN_TMP/initrd.gz" | cut -f1) (leasefsd at $leasefsd; tests: ${all[*]})"

# ---------------------------------------------------------------- QEMU
accel=${LEASEFS_ACCEL:-tcg}
# shellcheck disable=SC2054  # the commas are QEMU option syntax
qargs=(
    -accel "$accel" -smp "${LEASEFS_SMP:-2}" -m "$memory"
    -kernel "$kernel" -initrd "$RUN_TMP/initrd.gz"
    # panic=-1 + -no-reboot: a panic ends QEMU at once instead of at the timeout.
    -append "console=ttyS0 quiet panic=-1 ${LEASEFS_KERNEL_APPEND:-}"
    -display none -vga none -nic none -no-reboot
    -chardev "stdio,id=con,logfile=$CONSOLE_LOG" -serial chardev:con
)
if [ "$tmpdir_fs" = ext4 ]; then
    mkfs.ext4 -q -F "$RUN_TMP/ext4.img" 256M >"$LOG_DIR/mkfs.log" 2>&1 \
        || { cat "$LOG_DIR/mkfs.log" >&2; die "mkfs.ext4 failed"; }
    # shellcheck disable=SC2054
    qargs+=(-drive "file=$RUN_TMP/ext4.img,if=none,id=ext4,format=raw"
            -device "nvme,serial=leasefs-ext4,drive=ext4")
fi
log "booting $(basename "$kernel"): accel=$accel smp=${LEASEFS_SMP:-2} memory=${memory}M timeout=${timeout_secs}s tmpdir=$tmpdir_fs"
start=$SECONDS
qemu_status=0
timeout -k 10 "$timeout_secs" qemu-system-x86_64 "${qargs[@]}" </dev/null 2> >(tee "$QEMU_LOG" >&2) &
QEMU_PID=$!
wait "$QEMU_PID" || qemu_status=$?
QEMU_PID=""
elapsed=$((SECONDS - start))

# ---------------------------------------------------------------- results
# A kernel that crashed while booting, before /init ran, ran nothing of ours (seen about once
# in a hundred TCG boots, see run-vm.sh): boot once more.
if ! grep -aq 'HOST-VM-INIT' "$CONSOLE_LOG" && grep -aEq 'Kernel panic|Oops:' "$CONSOLE_LOG" \
        && [ -z "${LEASEFS_BOOT_RETRIED:-}" ]; then
    mv -f "$CONSOLE_LOG" "$LOG_DIR/console-boot-crash.log"
    log "the kernel crashed while booting, before /init (console: $LOG_DIR/console-boot-crash.log); booting once more"
    cleanup
    LEASEFS_BOOT_RETRIED=1 LEASEFS_LOG_DIR="$LOG_DIR" exec "$0" --no-build "${orig_args[@]}"
fi

marker() { grep -a -o "$1.*" "$CONSOLE_LOG" | tr -d '\r' || true; }
uname_in=$(marker 'HOST-VM-UNAME=' | tail -n 1)
uname_in=${uname_in#HOST-VM-UNAME=}
caps=$(marker 'HOST-VM-CAPS ' | tail -n 1)
done_line=$(marker 'HOST-VM-DONE ' | tail -n 1)
echo
echo "===== host-vm summary ($((elapsed)) s in the VM, logs $LOG_DIR)"
echo "kernel inside the VM: ${uname_in:-(never reported)}"
echo "leasefsd --print-capabilities, delegations: ${caps#HOST-VM-CAPS }"
status=0
for t in "${all[@]}"; do
    r=$(marker "HOST-VM-RESULT $t " | tail -n 1)
    if [ -z "$r" ]; then
        echo "FAIL  $t (no result: the VM stopped first)"
        status=1
    else
        read -r _ _ verdict st secs <<< "$r"
        printf '%-5s %s (%s, %s)\n' "$verdict" "$t" "$st" "$secs"
        [ "$verdict" = PASS ] || status=1
    fi
done
for extra in guest-cmd ext4-mount; do
    r=$(marker "HOST-VM-RESULT $extra " | tail -n 1)
    [ -n "$r" ] || continue
    read -r _ _ verdict st secs <<< "$r"
    printf '%-5s %s (%s, %s)\n' "$verdict" "$extra" "$st" "$secs"
    [ "$verdict" = PASS ] || status=1
done
case "$uname_in" in
    "$SERIES".*|"$SERIES"-*) ;;
    "") ;;
    *) echo "FAIL  the VM ran Linux $uname_in, not $SERIES"; status=1 ;;
esac
if [ -z "$done_line" ]; then
    if [ "$qemu_status" -eq 124 ] || [ "$qemu_status" -eq 137 ]; then
        echo "ERROR: timed out after ${timeout_secs} s before the VM reported"
    else
        echo "ERROR: QEMU exited (status $qemu_status) before the VM reported: kernel panic or QEMU failure"
    fi
    status=$EXIT_NO_MARKER
fi
echo "host-vm: exit status $status"
exit "$status"
