#!/bin/sh
# Guest side of qemu/bench-guest.sh (busybox ash, run by /init with cwd /mnt).
#
# Usage: sh /mnt/.bench/inner.sh [--fio-size MIB] [--runtime SECS] [--reread-size MIB]
#                                [--parts "fio dev"] [--jobs "NAME..."]
#
# The host prepared the share: /mnt/.bench/root/ (static fio, GNU tar, grep, coreutils,
# findutils and the shared libraries they need), /mnt/fio/f0..f3 (--fio-size MiB each) and
# /mnt/fio/reread (--reread-size MiB), /mnt/src/tree.tar (the developer-workload tarball).
# The tools are copied into the guest's root file system (the initramfs, in RAM) before
# anything is timed, so no measured run executes from the share.
#
# fio jobs, each its own fio run (buffered I/O, 4 KiB blocks, --runtime SECS --time_based,
# fio's default invalidate=1: the guest's page cache of the file is dropped at the start):
#   {seqread,randread,seqwrite,randwrite}-{psync,libaio}-{1,4}
#   libaio with iodepth 16; 4 jobs use f0..f3, one file each; 1 job uses f0
#   reread-cold: read all of /mnt/fio/reread once (invalidate=1), a fresh fio process
#   reread-warm: read it again (invalidate=0, fresh process, so a fresh open): what the
#                cache mode keeps of the first read across close and open
# Results: fio's JSON per job in /mnt/.bench-out/fio-NAME.json (copied after each job,
# outside the timed part).
#
# Developer workload (times from GNU date, in /mnt/.bench-out/dev.txt):
#   unpack   tar -xf /mnt/src/tree.tar --no-same-owner   (into /mnt/dev)
#   grep1    grep -rn PATTERN over the tree (output to /tmp, so grep reads every file)
#   grep2    the same again
#   sha256   find -type f -print0 | xargs -0 sha256sum  (sums kept for the host to check)
#   rm       rm -rf /mnt/dev (the tree)
set -u
fio_size=512
runtime=5
reread_size=512
parts="fio dev"
jobs=""
while [ $# -gt 0 ]; do
    case "$1" in
        --fio-size) fio_size=$2; shift ;;
        --runtime) runtime=$2; shift ;;
        --reread-size) reread_size=$2; shift ;;
        --parts) parts=$2; shift ;;
        --jobs) jobs=$2; shift ;;
        *) echo "bench-guest-inner: unknown argument $1"; exit 2 ;;
    esac
    shift
done

B=/mnt/.bench
OUT=/mnt/.bench-out
T=/tmp/bench
mkdir -p "$T" "$OUT" || exit 1
# The tools go into the initramfs root (RAM): /usr/local/bin, /lib/x86_64-linux-gnu, /lib64.
cp -a "$B/root/." / || { echo "bench-guest-inner: copying the tools failed"; exit 1; }
# GNU xargs finds sha256sum through PATH. The shell itself runs busybox applets before
# PATH (Debian's static busybox prefers its applets), so the tools are named by full path.
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
G=/usr/local/bin
for t in fio tar grep sha256sum find xargs rm date; do
    "$G/$t" --version > /dev/null 2>&1 || { echo "bench-guest-inner: $G/$t does not run"; exit 1; }
done
echo "BENCH-GUEST tools: $("$G/fio" --version), $("$G/tar" --version | head -n 1), $("$G/grep" --version | head -n 1)"

echo "BENCH-GUEST kernel=$(uname -r) cpus=$(nproc) mem_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
grep ' /mnt ' /proc/mounts | sed 's/^/BENCH-GUEST mount: /'

failed=0
now() { "$G/date" +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# run_fio NAME ARGS...: one fio run, JSON to $T then to the share.
run_fio() {
    name=$1; shift
    echo "BENCH-GUEST fio $name: $*"
    if "$G/fio" --name="$name" --directory=/mnt/fio --bs=4k --thread --output-format=json \
            --output="$T/fio-$name.json" "$@"; then
        cp "$T/fio-$name.json" "$OUT/fio-$name.json"
        # One summary line on the console (bw in KiB/s from fio's JSON).
        tr -d ' \n' < "$T/fio-$name.json" | grep -o '"\(read\|write\)":{"io_bytes":[0-9]*,"io_kbytes":[0-9]*,"bw_bytes":[0-9]*,"bw":[0-9.]*,"iops":[0-9.]*' \
            | grep -v '"io_bytes":0,' | sed "s/^/BENCH-GUEST fio $name /"
    else
        echo "BENCH-GUEST fio $name FAILED"
        failed=1
    fi
}

want_job() {
    [ -z "$jobs" ] && return 0
    case " $jobs " in *" $1 "*) return 0 ;; esac
    return 1
}

case " $parts " in *" fio "*)
    for rw in seqread randread seqwrite randwrite; do
        case $rw in
            seqread) mode='read' ;; randread) mode='randread' ;;
            seqwrite) mode='write' ;; randwrite) mode='randwrite' ;;
        esac
        extra=""
        case $rw in *write) extra="--end_fsync=1" ;; esac
        for eng in psync libaio; do
            qd=1
            [ "$eng" = libaio ] && qd=16
            for nj in 1 4; do
                name=$rw-$eng-$nj
                want_job "$name" || continue
                # f$jobnum: job clone k of --numjobs uses its own file fK (laid out by the host).
                # shellcheck disable=SC2086,SC2016
                run_fio "$name" --filename_format='f$jobnum' --size="${fio_size}M" --rw=$mode \
                    --ioengine=$eng --iodepth=$qd --numjobs=$nj --group_reporting \
                    --time_based --runtime="$runtime" $extra
            done
        done
    done
    if want_job reread; then
        run_fio reread-cold --filename=reread --size="${reread_size}M" --rw=read --ioengine=psync \
            --invalidate=1
        run_fio reread-warm --filename=reread --size="${reread_size}M" --rw=read --ioengine=psync \
            --invalidate=0
    fi
    ;;
esac

case " $parts " in *" dev "*)
    mkdir -p /mnt/dev && cd /mnt/dev || exit 1
    : > "$T/dev.txt"
    phase() {   # phase NAME START END [extra fields]
        n=$1; s=$(secs "$2" "$3"); shift 3
        echo "phase=$n seconds=$s $*" >> "$T/dev.txt"
        echo "BENCH-GUEST dev $n ${s}s $*"
    }
    t0=$(now)
    "$G/tar" -xf /mnt/src/tree.tar --no-same-owner || { echo "BENCH-GUEST dev unpack FAILED"; failed=1; }
    t1=$(now)
    phase unpack "$t0" "$t1" "files=$(find . -type f | wc -l)"
    # The pattern occurs in a few hundred files of the QEMU tree; grep reads every file.
    for g in 1 2; do
        t0=$(now)
        "$G/grep" -rn virtio_notify . > "$T/grep$g.out"
        st=$?
        t1=$(now)
        [ "$st" -le 1 ] || { echo "BENCH-GUEST dev grep$g FAILED ($st)"; failed=1; }
        phase "grep$g" "$t0" "$t1" "matches=$(wc -l < "$T/grep$g.out")"
    done
    t0=$(now)
    "$G/find" . -type f -print0 | "$G/xargs" -0 "$G/sha256sum" > "$T/sha256.txt" \
        || { echo "BENCH-GUEST dev sha256 FAILED"; failed=1; }
    t1=$(now)
    phase sha256 "$t0" "$t1" "files=$(wc -l < "$T/sha256.txt")"
    cd /mnt || exit 1
    t0=$(now)
    "$G/rm" -rf /mnt/dev || { echo "BENCH-GUEST dev rm FAILED"; failed=1; }
    t1=$(now)
    phase rm "$t0" "$t1" "left=$(find /mnt/dev 2>/dev/null | wc -l)"
    cp "$T/dev.txt" "$T/sha256.txt" "$OUT/"
    ;;
esac

echo "BENCH-GUEST done failed=$failed"
exit "$failed"
