#!/bin/sh
# /init of the leasefs test guest (busybox ash; copied in by make-initramfs.sh).
#
# Mounts the virtio-fs share on /mnt, runs /etc/leasefs-cmd (from a per-run
# cpio appended by run-vm.sh) with cwd /mnt, or an interactive shell when
# there is none, then prints LEASEFS-GUEST-EXIT=<status> and powers off.
# run-vm.sh takes the guest's exit status from that marker line.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=linux
# run-vm.sh tells a guest kernel that crashed while booting from one that
# crashed under the test by this line.
echo LEASEFS-GUEST-INIT

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
hostname leasefs-guest

# No udev here: create the /dev/virtio-ports/<name> links it would make, so
# the agent port is /dev/virtio-ports/leasefs.agent.
for d in /sys/class/virtio-ports/*; do
    [ -r "$d/name" ] || continue
    name=$(cat "$d/name")
    [ -n "$name" ] || continue
    mkdir -p /dev/virtio-ports
    ln -sf "../${d##*/}" "/dev/virtio-ports/$name"
done

# The tag comes from the kernel command line: leasefs.tag=NAME (the kernel
# ignores unknown dotted parameters, so it does not reach init's argv).
tag=leasefs
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        leasefs.tag=*) tag=${arg#leasefs.tag=} ;;
    esac
done

mkdir -p /mnt
if mount -t virtiofs "$tag" /mnt; then
    cd /mnt || echo "leasefs guest: warning: cannot cd to /mnt"
    if [ -f /etc/leasefs-cmd ]; then
        sh /etc/leasefs-cmd
        status=$?
    else
        echo "leasefs guest: virtio-fs '$tag' is mounted on /mnt; 'exit' powers off"
        setsid cttyhack sh
        status=$?
    fi
    cd /
    sync
    # A busy mount (a leftover background process) is worth a warning, but
    # the exit status stays the command's.
    umount /mnt || echo "leasefs guest: warning: umount /mnt failed"
else
    echo "leasefs guest: ERROR: 'mount -t virtiofs $tag /mnt' failed" \
         "(no vhost-user-fs device with tag '$tag', or the daemon refused; kernel messages:)"
    dmesg | grep -iE 'virtio|fuse' | tail -n 10
    status=1
fi

echo "LEASEFS-GUEST-EXIT=$status"
poweroff -f
