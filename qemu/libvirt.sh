#!/usr/bin/env bash
# Boot TCG guests through libvirt (virsh start), with libvirt itself starting
# leasefsd for a <filesystem> device, exactly as it starts virtiofsd.
#
# Usage: qemu/libvirt.sh [--no-build] [--timeout SECS]
#
# Runs, each a fresh domain and share (direct kernel boot of build/vm's kernel and
# initramfs; the guest mounts the share, runs a command, powers off):
#   plain       <binary path='target/release/leasefsd'/>: libvirt runs
#               `leasefsd --fd=N -o source=SHARE` (the coherent default)
#   options     <binary ... xattr='on'> with <cache mode='always'/>, <sandbox
#               mode='chroot'/>, <lock posix='off' flock='off'/> and <thread_pool
#               size='16'/>: `-o source=...,cache=always,sandbox=chroot,xattr,
#               no_flock,no_posix_lock --thread-pool-size=16`; the share's path
#               holds a comma, which libvirt escapes as ",,"
#   json        no <binary>: libvirt finds leasefsd through a vhost-user
#               description file, contrib/50-leasefs.json installed in
#               /etc/qemu/vhost-user/ with its "binary" pointing at target/release
#   destroy     the guest keeps the share busy; `virsh destroy` must leave no
#               leasefsd behind
# In each booting run the guest reads a file the host wrote, writes one the host
# then checks, and for `plain` sees a host change made while it had the file cached.
#
# Needs root. Installs Debian's libvirt-daemon-system and libvirt-clients when
# missing, starts virtlogd and libvirtd when they are not running (no systemd
# here), and makes libvirt run QEMU as root without a security driver (lines
# marked "leasefs" in /etc/libvirt/qemu.conf), so it can read build/ and target/.
# Logs: $LEASEFS_LOG_DIR or build/vm/logs/libvirt-<time>/ (console, the daemon's log libvirt keeps,
# the domain XML). Exit status 0 when every run passed.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build=1
timeout_secs=300
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
[ "$(id -u)" -eq 0 ] || die "libvirt's system instance needs root"

# ---------------------------------------------------------------- host side
missing=()
command -v virsh >/dev/null 2>&1 || missing+=(libvirt-clients)
command -v libvirtd >/dev/null 2>&1 || missing+=(libvirt-daemon-system)
install_pkgs "${missing[@]}"

conf=/etc/libvirt/qemu.conf
if ! grep -q '^# leasefs' "$conf"; then
    cat >> "$conf" <<'EOF'
# leasefs: qemu/libvirt.sh runs QEMU as root so it reads the build tree's kernel
user = "root"
group = "root"
security_driver = "none"
EOF
    # A running libvirtd reads qemu.conf only at start.
    if pkill -x libvirtd 2>/dev/null; then
        for ((i = 0; i < 100; i++)); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
    fi
fi
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
    libvirtd -d
fi
virsh_() { virsh -q -c qemu:///system "$@"; }
for ((i = 0; i < 50; i++)); do virsh_ version >/dev/null 2>&1 && break; sleep 0.2; done
virsh_ version >/dev/null || die "libvirtd does not answer on qemu:///system"

mk_args=()
if [ "$build" -eq 1 ]; then
    cargo build --release --bin leasefsd >&2
else
    mk_args+=(--no-build)
fi
daemon="$LEASEFS_TARGET/release/leasefsd"
[ -x "$daemon" ] || die "$daemon is missing (build it, or drop --no-build)"
kernel=$("$LEASEFS_QEMU_DIR/fetch-kernel.sh")
base_initrd=$("$LEASEFS_QEMU_DIR/make-initramfs.sh" "${mk_args[@]}")

logs="${LEASEFS_LOG_DIR:-$LEASEFS_VM_DIR/logs/libvirt-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$logs"
work=$(mktemp -d /tmp/leasefs-libvirt.XXXXXX)
domains=()
cleanup() {
    local d
    for d in "${domains[@]}"; do
        virsh_ destroy "$d" >/dev/null 2>&1 || true
        virsh_ undefine "$d" >/dev/null 2>&1 || true
    done
    rm -f /etc/qemu/vhost-user/50-leasefs.json
    rm -rf "$work"
}
trap cleanup EXIT

# initrd DIR CMD: the base initramfs plus /etc/leasefs-cmd (see run-vm.sh).
initrd() {
    mkdir -p "$1/cmd/etc"
    printf '%s\n' "$2" > "$1/cmd/etc/leasefs-cmd"
    (cd "$1/cmd" && printf 'etc\netc/leasefs-cmd\n' | cpio --quiet -o -H newc --owner=0:0) \
        | gzip > "$1/cmd.cpio.gz"
    cat "$base_initrd" "$1/cmd.cpio.gz" > "$1/initrd.gz"
    echo "$1/initrd.gz"
}

# domain_xml NAME DIR SHARE BINARY_XML EXTRA_FS_XML
domain_xml() {
    cat <<EOF
<domain type='qemu'>
  <name>$1</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$kernel</kernel>
    <initrd>$2/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 leasefs.tag=fs0</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs'/>
      $4
      <source dir='$3'/>
      <target dir='fs0'/>
      $5
    </filesystem>
    <serial type='file'><source path='$2/console.log'/><target port='0'/></serial>
    <console type='file'><source path='$2/console.log'/><target type='serial' port='0'/></console>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# The guest's part of every booting run: read what the host wrote, write a file back.
guest_cmd='set -e
test "$(cat /mnt/from-host)" = "host wrote this"
echo "guest wrote this" > /mnt/from-guest
sync'
# For the coherent default: the guest caches the file, the host rewrites it (held until the
# guest's lease is over), the guest must read the new bytes at once afterwards.
coherent_cmd="$guest_cmd"'
cat /mnt/from-host >/dev/null
echo change > /mnt/.ask-host
for i in $(seq 1 300); do [ -e /mnt/.host-done ] && break; sleep 0.1; done
test -e /mnt/.host-done
test "$(cat /mnt/from-host)" = "host changed this"'

wait_state() { # DOMAIN STATE SECS
    local i
    for ((i = 0; i < $3 * 5; i++)); do
        [ "$(virsh_ domstate "$1" 2>/dev/null)" = "$2" ] && return 0
        sleep 0.2
    done
    return 1
}

daemons_of() { pgrep -f -- "source=$(printf '%s' "$1" | sed 's/,/,,/g')" || true; }

passed=0
failed=0
results=()
# run NAME GUEST_CMD BINARY_XML EXTRA_FS_XML [SHARE_SUFFIX]
run() {
    local name=$1 cmd=$2 bin=$3 extra=$4 dir share dom status=0 left
    dir="$work/$name"
    share="$work/share-$name${5:-}"
    dom="leasefs-$name-$$"
    mkdir -p "$dir" "$share"
    echo "host wrote this" > "$share/from-host"
    initrd "$dir" "$cmd" >/dev/null
    domain_xml "$dom" "$dir" "$share" "$bin" "$extra" > "$logs/$name.xml"
    log "$name: virsh start ($dom, share $share)"
    domains+=("$dom")
    if ! virsh_ define "$logs/$name.xml" >"$logs/$name.start" 2>&1 \
            || ! virsh_ start "$dom" >>"$logs/$name.start" 2>&1; then
        cat "$logs/$name.start" >&2
        status=1
    fi
    if [ "$status" -eq 0 ] && [ "$name" = destroy ]; then
        for ((i = 0; i < timeout_secs * 5; i++)); do
            [ -e "$share/busy" ] && break
            sleep 0.2
        done
        [ -e "$share/busy" ] || { log "$name: the guest never wrote 'busy'"; status=1; }
        [ -n "$(daemons_of "$share")" ] || { log "$name: no leasefsd runs for the share"; status=1; }
        virsh_ destroy "$dom" >/dev/null || status=1
        for ((i = 0; i < 50; i++)); do [ -z "$(daemons_of "$share")" ] && break; sleep 0.1; done
        left=$(daemons_of "$share")
        if [ -n "$left" ]; then
            log "$name: leasefsd still runs after virsh destroy: $left"
            status=1
        fi
    elif [ "$status" -eq 0 ]; then
        if [ "$name" = plain ]; then
            for ((i = 0; i < timeout_secs * 5; i++)); do
                [ -e "$share/.ask-host" ] && break
                [ "$(virsh_ domstate "$dom" 2>/dev/null)" = "shut off" ] && break
                sleep 0.2
            done
            if [ -e "$share/.ask-host" ]; then
                echo "host changed this" > "$share/from-host"
                touch "$share/.host-done"
            fi
        fi
        wait_state "$dom" "shut off" "$timeout_secs" || { log "$name: timed out"; status=1; }
        if ! grep -q 'LEASEFS-GUEST-EXIT=0' "$dir/console.log" 2>/dev/null; then
            log "$name: the guest command failed: $(grep -o 'LEASEFS-GUEST-EXIT=[0-9]*' \
                "$dir/console.log" 2>/dev/null || echo 'no exit marker')"
            status=1
        fi
        [ "$(cat "$share/from-guest" 2>/dev/null)" = "guest wrote this" ] \
            || { log "$name: the guest's file is not on the host"; status=1; }
    fi
    # A guest kernel that crashed while booting, before /init ran, never reached the daemon
    # (TCG flake; run-vm.sh boots such a guest once more too): boot it once more.
    if [ "$status" -ne 0 ] && [ -z "${boot_retried:-}" ] \
            && ! grep -aq 'LEASEFS-GUEST-INIT' "$dir/console.log" 2>/dev/null \
            && grep -aEq 'Kernel panic|Oops:' "$dir/console.log" 2>/dev/null; then
        cp "$dir/console.log" "$logs/$name.boot-crash.console.log" 2>/dev/null || true
        log "$name: the guest kernel crashed while booting, before /init ran (console: $logs/$name.boot-crash.console.log); booting once more"
        virsh_ destroy "$dom" >/dev/null 2>&1 || true
        virsh_ undefine "$dom" >/dev/null 2>&1 || true
        rm -rf "$dir" "$share"
        boot_retried=1 run "$@"
        return
    fi
    cp "$dir/console.log" "$logs/$name.console.log" 2>/dev/null || true
    cp /var/log/libvirt/qemu/"$dom"-fs0-virtiofsd.log "$logs/$name.daemon.log" 2>/dev/null || true
    grep -h 'leasefsd\|virtiofsd' /var/log/libvirt/qemu/"$dom".log > "$logs/$name.qemu-cmd" \
        2>/dev/null || true
    virsh_ destroy "$dom" >/dev/null 2>&1 || true
    virsh_ undefine "$dom" >/dev/null 2>&1 || true
    if [ "$status" -eq 0 ]; then
        results+=("ok    libvirt-$name")
        passed=$((passed + 1))
    else
        results+=("FAIL  libvirt-$name (logs $logs)")
        failed=$((failed + 1))
        [ -f "$logs/$name.daemon.log" ] && tail -n 20 "$logs/$name.daemon.log" >&2
        [ -f "$logs/$name.console.log" ] && tail -n 30 "$logs/$name.console.log" >&2
    fi
}

run plain "$coherent_cmd" "<binary path='$daemon'/>" ""
run options "$guest_cmd" \
    "<binary path='$daemon' xattr='on'><cache mode='always'/><sandbox mode='chroot'/><lock posix='off' flock='off'/><thread_pool size='16'/></binary>" \
    "" ",with,commas"
mkdir -p /etc/qemu/vhost-user
sed "s|\"binary\": *\"[^\"]*\"|\"binary\": \"$daemon\"|" "$LEASEFS_ROOT/contrib/50-leasefs.json" \
    > /etc/qemu/vhost-user/50-leasefs.json
run json "$guest_cmd" "" ""
rm -f /etc/qemu/vhost-user/50-leasefs.json
run destroy 'echo busy > /mnt/busy; sleep 3600' "<binary path='$daemon'/>" ""

for r in "${results[@]}"; do echo "$r"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
