#!/bin/sh
# /init of the host VM (busybox ash; copied in by qemu/host-vm.sh).
#
# The VM plays the host: no virtio-fs here. leasefsd, the cargo integration
# test binaries (which spawn leasefsd and drive it through the project's own
# vhost-user frontend over a unix socket) and the host-side file operations
# all run inside it, on the kernel it booted (Debian's 7.3 cloud kernel).
#
# Reads /etc/host-vm/: tests (one binary name a line, each /tests/NAME),
# filter (passed to every test binary), tmpdir (tmpfs or ext4: where
# TMPDIR points, so where the tests make their share directories),
# guest-cmd (optional shell code run first, counted as "guest-cmd").
# Prints marker lines that host-vm.sh reads from the serial console:
#   HOST-VM-INIT, HOST-VM-UNAME=<release>, HOST-VM-CAPS <delegations value>,
#   HOST-VM-BEGIN <name>, HOST-VM-RESULT <name> PASS|FAIL status=<n> secs=<s>,
#   HOST-VM-DONE failed=<n>
# then powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=linux RUST_BACKTRACE=1
echo HOST-VM-INIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
# What host-vm.sh put under /tmp (a leasefsd built in a target dir there).
[ -d /.tmp-seed ] && cp -a /.tmp-seed/. /tmp/
hostname leasefs-host-vm

conf=/etc/host-vm
failed=0
# The descriptor limit the tests would have on the machine that ran host-vm.sh.
nofile=$(cat "$conf/nofile" 2>/dev/null)
# shellcheck disable=SC3045  # busybox ash has ulimit -n
if [ -n "$nofile" ] && ! ulimit -n "$nofile"; then
    echo "host-vm: warning: cannot set the descriptor limit to $nofile"
fi
echo "HOST-VM-UNAME=$(uname -r)"
echo "host-vm: $(uname -a)"
# shellcheck disable=SC3045
echo "host-vm: / is $(stat -f -c %T /), /tmp is $(stat -f -c %T /tmp)," \
     "lease-break-time $(cat /proc/sys/fs/lease-break-time) s, $(nproc) CPUs, ulimit -n $(ulimit -n)," \
     "$(awk '/MemTotal/ { print int($2 / 1024) " MiB" }' /proc/meminfo)"

export TMPDIR=/tmp
if [ "$(cat "$conf/tmpdir" 2>/dev/null)" = ext4 ]; then
    # host-vm.sh attached an ext4 image as an NVMe disk (NVMe is built into the cloud kernel).
    mkdir -p /ext4
    i=0
    while [ ! -b /dev/nvme0n1 ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if mount -t ext4 /dev/nvme0n1 /ext4; then
        mkdir -p /ext4/tmp
        chmod 1777 /ext4/tmp
        export TMPDIR=/ext4/tmp
    else
        echo "host-vm: ERROR: cannot mount the ext4 disk /dev/nvme0n1 on /ext4"
        echo "HOST-VM-RESULT ext4-mount FAIL status=1 secs=0"
        failed=$((failed + 1))
    fi
fi
echo "host-vm: TMPDIR=$TMPDIR ($(stat -f -c %T "$TMPDIR"))"

# What leasefsd itself makes of this kernel's delegations (probed on "/").
leasefsd=$(readlink /bin/leasefsd)
caps=$(leasefsd --print-capabilities 2>&1)
deleg=$(printf '%s\n' "$caps" | sed -n 's/.*"delegations": *"\([^"]*\)".*/\1/p')
echo "HOST-VM-CAPS ${deleg:-unknown}"
echo "host-vm: $leasefsd --print-capabilities: delegations \"${deleg:-?}\""

# run NAME CMD...: one counted step with its markers.
run() {
    name=$1
    shift
    echo "HOST-VM-BEGIN $name"
    start=$(date +%s)
    "$@" </dev/null
    status=$?
    secs=$(( $(date +%s) - start ))
    if [ "$status" -eq 0 ]; then
        echo "HOST-VM-RESULT $name PASS status=0 secs=$secs"
    else
        echo "HOST-VM-RESULT $name FAIL status=$status secs=$secs"
        failed=$((failed + 1))
    fi
}

cd /tmp || exit 1
if [ -s "$conf/guest-cmd" ]; then
    run guest-cmd sh "$conf/guest-cmd"
fi

filter=$(cat "$conf/filter" 2>/dev/null)
while read -r t; do
    [ -n "$t" ] || continue
    if [ -n "$filter" ]; then
        run "$t" "/tests/$t" --test-threads=1 "$filter"
    else
        run "$t" "/tests/$t" --test-threads=1
    fi
    # Leftover daemons of a failed test would skew the next binary.
    for p in $(pidof leasefsd 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
done < "$conf/tests"

echo "HOST-VM-DONE failed=$failed"
sync
poweroff -f
