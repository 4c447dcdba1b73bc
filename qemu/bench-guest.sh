#!/usr/bin/env bash
# Guest-level benchmarks: fio and a developer workload in a VM, one fresh VM per daemon
# configuration, every configuration in one invocation.
#
# Usage: qemu/bench-guest.sh [--out DIR] [--configs "NAME..."] [--fio-size MIB]
#                            [--reread-size MIB] [--runtime SECS] [--memory MB]
#                            [--parts "fio dev"] [--jobs "JOB..."] [--repeat N] [--timeout SECS]
#                            [--qemu PATH] [--kernel PATH] [--no-build] [--update-docs]
#
# Configurations (all --sandbox none, as in qemu/lib.sh; NAME@notify = the same daemon on
# the notify stack, patched QEMU + patched kernel from qemu/build-notify-stack.sh):
#   leasefsd-default          leasefsd, default cache mode (coherent), stock stack
#   virtiofsd-auto            virtiofsd 1.14 --cache auto, stock stack
#   virtiofsd-always          virtiofsd 1.14 --cache always, stock stack
#   leasefsd-default@notify   leasefsd default on the notify stack
#   virtiofsd-always@notify   virtiofsd --cache always on the notify stack (the notify
#                             stack's kernel is a tinyconfig build, not Debian's: this
#                             separates the kernel's share of a difference from the daemon's)
# (the default list; any name of lib.sh's cfg_daemon works, with or without @notify)
#
# In each guest (qemu/bench-guest-inner.sh says exactly what runs):
#   fio 3.33 (a static build of Debian's source, cached in build/bench-guest/cache/):
#     {seqread,randread,seqwrite,randwrite} x {psync, libaio iodepth 16} x {1, 4 jobs},
#     4 KiB blocks, buffered, --runtime SECS (default 5) --time_based, one file of
#     --fio-size MiB (default 512) per job, laid out on the host before the VM boots
#     (random data); fio drops the guest's page cache of the file at the start and at
#     each wrap (invalidate=1), so these are reads from the daemon, and one pass over a
#     file takes longer than a lease (1 s) in every job;
#     reread-cold / reread-warm: one file of --reread-size MiB (default 512) read whole,
#     twice, by two fio processes (the second read is the cached re-read).
#   developer workload on a source tarball: QEMU 7.2's Debian source (qemu_7.2+dfsg.orig,
#     which qemu/build-notify-qemu.sh also uses) without roms/: about 10,000 files,
#     100 MiB. Phases unpack (tar -x), grep1 and grep2 (grep -rn), sha256 (find | xargs
#     sha256sum, checked against the host's sums), rm (rm -rf). GNU tools copied from the
#     host with their libraries.
#
#   --out DIR       results (default build/bench-guest/<time>/)
#   --memory MB     guest RAM (default 2048: the re-read file fits in the page cache)
#   --parts LIST    "fio dev" (default), "fio" or "dev"
#   --jobs LIST     only these fio jobs (e.g. "seqread-psync-1 reread"), default all
#   --repeat N      run the configuration sequence N times, interleaved (A B C A B C for
#                   N=2; default 1); the table shows each figure's median over the runs
#                   and the number of runs, results.jsonl every run
#   --timeout SECS  per VM (default 1500)
#   --no-build      do not run cargo build --release --bin leasefsd first
#   --update-docs   write the table and plot into docs/performance.md ("Guest benchmarks",
#                   between its bench-guest markers) and docs/bench-guest.svg
#
# Each VM runs under `flock /tmp/leasefs-vm.lock` (one VM at a time on the machine). The
# share is a fresh directory per VM (deleted afterwards).
#
# Output in DIR: results.jsonl (one line per configuration and fio job or workload phase),
# results.md (the table: MiB/s and IOPS per fio job, seconds per phase, per configuration,
# and the ratios leasefsd-default / virtiofsd-auto, leasefsd-default@notify /
# virtiofsd-always and leasefsd-default@notify / virtiofsd-always@notify, >1 = leasefsd
# faster), bench-guest.svg (the plot, by
# qemu/bench-guest-report.py), meta.txt, logs/ (each VM's console and daemon logs).
# Exit status non-zero if a VM run failed or a checksum did not match.
#
# Timing on the 2-core TCG machine: about 4 minutes per configuration with the defaults,
# plus any wait for the VM lock. TCG guest: absolute numbers are low; compare configurations within one run.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

out=""
configs="leasefsd-default virtiofsd-auto virtiofsd-always leasefsd-default@notify virtiofsd-always@notify"
fio_size=512
reread_size=512
runtime=5
memory=2048
parts="fio dev"
jobs=""
timeout_secs=1500
repeat=1
build=1
update_docs=0
notify_qemu=${LEASEFS_NOTIFY_QEMU:-$LEASEFS_NOTIFY_DIR/qemu-system-x86_64}
notify_kernel=${LEASEFS_NOTIFY_KERNEL:-$LEASEFS_NOTIFY_DIR/bzImage}
need() { [ "$2" -ge 2 ] || die "$1 needs an argument (try --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --out) need "$1" $#; out=$2; shift ;;
        --configs) need "$1" $#; configs=$2; shift ;;
        --fio-size) need "$1" $#; fio_size=$2; shift ;;
        --reread-size) need "$1" $#; reread_size=$2; shift ;;
        --runtime) need "$1" $#; runtime=$2; shift ;;
        --memory) need "$1" $#; memory=$2; shift ;;
        --parts) need "$1" $#; parts=$2; shift ;;
        --jobs) need "$1" $#; jobs=$2; shift ;;
        --timeout) need "$1" $#; timeout_secs=$2; shift ;;
        --repeat) need "$1" $#; repeat=$2; shift ;;
        --qemu) need "$1" $#; notify_qemu=$2; shift ;;
        --kernel) need "$1" $#; notify_kernel=$2; shift ;;
        --no-build) build=0 ;;
        --update-docs) update_docs=1 ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
for v in fio_size reread_size runtime memory timeout_secs repeat; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} wants a positive number, got '${!v}'"
done
read -r -a config_list <<< "$configs"
[ "${#config_list[@]}" -gt 0 ] || die "--configs is empty"
for c in "${config_list[@]}"; do
    base=${c%@*}
    [ -n "${cfg_daemon[$base]:-}" ] && [ "$base" != two-leasefsd ] \
        || die "unknown configuration '$c' (try --help)"
    case "$c" in *@*) stack_spec "${c#*@}" x y >/dev/null || die "unknown stack in '$c'" ;; esac
done

cd "$LEASEFS_ROOT"
[ -n "$out" ] || out="$LEASEFS_ROOT/build/bench-guest/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out/logs"
out=$(cd "$out" && pwd -P)
cache="$LEASEFS_ROOT/build/bench-guest/cache"
mkdir -p "$cache"
command -v python3 >/dev/null 2>&1 || install_pkgs python3

# ------------------------------------------------------------- builds
require_cargo
if [ "$build" -eq 1 ]; then
    log "cargo build --release --bin leasefsd"
    cargo build --release --bin leasefsd >&2 || die "cargo build --release --bin leasefsd failed"
fi
[ -x "$LEASEFS_TARGET/release/leasefsd" ] || die "leasefsd not built: $LEASEFS_TARGET/release/leasefsd"
ensure_vm_tools
# The guests need no guest-tests: the base initramfs without it (make-initramfs.sh
# --no-guest-tests; run-vm.sh passes this through).
export LEASEFS_GUEST_TESTS=none
"$LEASEFS_QEMU_DIR/fetch-kernel.sh" >/dev/null || die "fetch-kernel.sh failed"
"$LEASEFS_QEMU_DIR/make-initramfs.sh" >/dev/null || die "make-initramfs.sh failed"
for c in "${config_list[@]}"; do
    if [ "${cfg_daemon[${c%@*}]}" = virtiofsd ]; then ensure_virtiofsd >/dev/null || exit 1; fi
done

# fio: a static build (the guest has no libc; Debian's fio links ceph, gluster and RDMA
# libraries), without SysV shm (the notify kernel has no SYSVIPC; fio then uses threads).
fio_bin="$cache/fio-static"
build_fio() {
    local missing=() p tmp
    for p in libaio-dev zlib1g-dev gcc make; do pkg_installed "$p" || missing+=("$p"); done
    install_pkgs "${missing[@]}"
    tmp=$(mktemp -d "$cache/.fio.XXXXXX")
    log "building a static fio from Debian's source (about a minute)"
    (
        cd "$tmp"
        # The host release's fio (3.33 on bookworm), not a newer one from other suites in
        # the apt sources (the current stack's build adds trixie's, whose pool files are
        # not all on the mirror).
        apt-get source --download-only "fio/$(. /etc/os-release && echo "$VERSION_CODENAME")" >&2 \
            || die "apt-get source fio failed (needs deb-src in the apt sources, as qemu/build-notify-qemu.sh sets up)"
        tar xzf fio_*.orig.tar.gz
        cd fio-*/
        ./configure --build-static --disable-native --disable-shm --disable-numa --disable-rdma \
            --disable-rados --disable-rbd --disable-http --disable-gfapi --disable-libnfs \
            --disable-pmem --disable-xnvme --disable-libzbc --disable-tcmalloc --disable-dfs \
            > ../configure.log 2>&1 || { tail -n 20 ../configure.log >&2; exit 1; }
        grep -q 'Linux AIO support *yes' ../configure.log || die "fio configure found no libaio"
        make -j"$(nproc)" fio > ../make.log 2>&1 || { tail -n 20 ../make.log >&2; exit 1; }
        strip fio
        if ldd fio 2>/dev/null | grep -q '=>'; then die "fio came out dynamically linked"; fi
        mv fio "$fio_bin"
    ) || { rm -rf "$tmp"; die "building fio failed"; }
    rm -rf "$tmp"
}
[ -x "$fio_bin" ] || build_fio

# The guest's tool root: fio plus GNU tar, grep, coreutils and findutils from the host with
# the shared libraries they load (the initramfs has only busybox).
tools="$cache/tools-root"
rm -rf "$tools"
mkdir -p "$tools/usr/local/bin" "$tools/lib/x86_64-linux-gnu" "$tools/lib64"
cp "$fio_bin" "$tools/usr/local/bin/fio"
for t in tar grep sha256sum find xargs rm date; do
    p=$(command -v "$t") || die "$t not found on the host"
    cp -L "$p" "$tools/usr/local/bin/$t"
    ldd "$p" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
        cp -L "$lib" "$tools/lib/x86_64-linux-gnu/"
    done
done
cp -L /lib64/ld-linux-x86-64.so.2 "$tools/lib64/"

# The developer-workload tarball: QEMU 7.2's Debian source without roms/ (firmware
# sources), uncompressed, and the sha256 of every file as the guest will list them.
tree_tar="$cache/tree.tar"
tree_sums="$cache/tree.sha256"
if [ ! -s "$tree_tar" ] || [ ! -s "$tree_sums" ]; then
    orig=$(ls "$cache"/qemu_7.2*.orig.tar.xz 2>/dev/null | head -n 1 || true)
    if [ -z "$orig" ]; then
        orig=$(ls "$LEASEFS_ROOT"/build/notify-qemu/qemu_7.2*.orig.tar.xz 2>/dev/null | head -n 1 || true)
        if [ -n "$orig" ]; then
            cp "$orig" "$cache/"
        else
            log "apt-get source --download-only qemu (the tarball's source)"
            (cd "$cache" && apt-get source --download-only qemu >&2) || die "apt-get source qemu failed"
        fi
        orig=$(ls "$cache"/qemu_7.2*.orig.tar.xz 2>/dev/null | head -n 1 || true)
        [ -n "$orig" ] || die "no qemu_7.2*.orig.tar.xz in $cache"
    fi
    log "making $tree_tar from $(basename "$orig") without roms/"
    tmp=$(mktemp -d "$cache/.tree.XXXXXX")
    xz -dc "$orig" | tar -x -C "$tmp" --exclude='qemu-*/roms' --no-same-owner
    (cd "$tmp" && tar -cf "$tree_tar.tmp" --sort=name --owner=0 --group=0 --numeric-owner -- *)
    (cd "$tmp" && find . -type f -print0 | xargs -0 sha256sum | sort -k2) > "$tree_sums.tmp"
    rm -rf "$tmp"
    mv -f "$tree_tar.tmp" "$tree_tar"
    mv -f "$tree_sums.tmp" "$tree_sums"
fi
tree_files=$(wc -l < "$tree_sums")
tree_mib=$(( $(stat -c %s "$tree_tar") / 1048576 ))
log "developer tarball: $tree_files files, $tree_mib MiB"

commit=$(git -C "$LEASEFS_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$LEASEFS_ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null \
    | awk '{ print $2 }' | tr '\n' ' ' | sed 's/ $//')
[ -z "$dirty" ] || commit="$commit, with uncommitted changes in: $dirty"
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "leasefs commit: $commit (leasefsd built $(date -u -r "$LEASEFS_TARGET/release/leasefsd" '+%Y-%m-%d %H:%M UTC'))"
    echo "virtiofsd: $("$(ensure_virtiofsd)" --version 2>/dev/null | head -n 1 || echo '?')"
    echo "host: $(nproc) CPUs, $(uname -r); accel ${LEASEFS_ACCEL:-tcg}, guest SMP ${LEASEFS_SMP:-2}, guest RAM $memory MiB"
    echo "stock QEMU: $(qemu-system-x86_64 --version | head -n 1)"
    [ ! -x "$notify_qemu" ] || echo "notify QEMU: $notify_qemu, kernel: $notify_kernel"
    echo "fio: $("$fio_bin" --version); --fio-size $fio_size MiB per job file, --reread-size $reread_size MiB, --runtime $runtime s"
    echo "tarball: QEMU 7.2 source (qemu_7.2+dfsg.orig) without roms/: $tree_files files, $tree_mib MiB"
    echo "configs: ${config_list[*]}, $repeat run(s) each, interleaved"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} > "$out/meta.txt"
cat "$out/meta.txt" >&2

# ------------------------------------------------------------- runs
: > "$out/results.jsonl"
failed=()
runs=()
for ((rep = 1; rep <= repeat; rep++)); do
    for c in "${config_list[@]}"; do runs+=("$rep $c"); done
done
for run in "${runs[@]}"; do
    read -r rep c <<< "$run"
    base=${c%@*}
    stack=stock
    [[ "$c" != *@* ]] || stack=${c#*@}
    spec=$(stack_spec "$stack" "$notify_qemu" "$notify_kernel")
    read -r stack_qemu stack_kernel <<< "$spec"
    check_stack "$stack" "$stack_qemu" "$stack_kernel"
    mapfile -t vm_args < <(stack_vm_args "$stack_qemu" "$stack_kernel")
    daemon=${cfg_daemon[$base]}
    [ "$daemon" != virtiofsd ] || daemon=$(ensure_virtiofsd)
    dargs=()
    for a in ${cfg_args[$base]}; do dargs+=(--daemon-arg "$a"); done
    tag=${c//@/-}
    [ "$repeat" -eq 1 ] || tag="$rep-$tag"

    # A fresh share: the tools, the fio files (random data, so no layout phase in the
    # guest) and the tarball.
    share=$(mktemp -d /tmp/leasefs-bench-guest.XXXXXX)
    mkdir -p "$share/.bench" "$share/fio" "$share/src"
    cp -a "$tools" "$share/.bench/root"
    cp "$LEASEFS_QEMU_DIR/bench-guest-inner.sh" "$share/.bench/inner.sh"
    for i in 0 1 2 3; do head -c "${fio_size}M" /dev/urandom > "$share/fio/f$i"; done
    head -c "${reread_size}M" /dev/urandom > "$share/fio/reread"
    cp "$tree_tar" "$share/src/tree.tar"
    sync

    load=$(cut -d' ' -f1-3 /proc/loadavg)
    log "VM $c (run $rep of $repeat): $daemon ${cfg_args[$base]} (stack $stack), waiting for /tmp/leasefs-vm.lock; load $load"
    status=0
    LEASEFS_LOG_DIR="$out/logs/$tag" flock /tmp/leasefs-vm.lock \
        "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build "${vm_args[@]}" --memory "$memory" \
        --share "$share" --daemon "$daemon" "${dargs[@]}" --timeout "$timeout_secs" \
        -- sh /mnt/.bench/inner.sh --fio-size "$fio_size" --reread-size "$reread_size" \
           --runtime "$runtime" --parts "$parts" --jobs "$jobs" \
        > "$out/logs/$tag.out" 2>&1 || status=$?
    grep -a 'BENCH-GUEST' "$out/logs/$tag.out" | tr -d '\r' >&2 || true
    if [ "$status" -ne 0 ]; then
        warn "$c: the guest run failed (status $status, $out/logs/$tag.out)"
        failed+=("$c (status $status)")
    fi
    python3 "$LEASEFS_QEMU_DIR/bench-guest-report.py" collect --config "$c" --stack "$stack" \
        --daemon "$(basename "$daemon") ${cfg_args[$base]}" --load "$load" --repeat "$rep" \
        --dir "$share/.bench-out" >> "$out/results.jsonl" \
        || failed+=("$c (results unreadable)")
    if [ -s "$share/.bench-out/sha256.txt" ]; then
        if sort -k2 "$share/.bench-out/sha256.txt" | cmp -s - "$tree_sums"; then
            log "$c: all $tree_files checksums match the host's"
        else
            warn "$c: the guest's checksums differ from the host's"
            sort -k2 "$share/.bench-out/sha256.txt" | diff - "$tree_sums" | head -n 5 >&2 || true
            failed+=("$c (checksums differ)")
        fi
        cp "$share/.bench-out/sha256.txt" "$out/logs/$tag.sha256"
    fi
    rm -rf "$share"
done
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/meta.txt"

# ------------------------------------------------------------- report
report_args=(report --results "$out/results.jsonl" --meta "$out/meta.txt" --out "$out")
[ "$update_docs" -eq 0 ] || report_args+=(--update-docs "$LEASEFS_ROOT/docs/performance.md")
python3 "$LEASEFS_QEMU_DIR/bench-guest-report.py" "${report_args[@]}" || failed+=("report")
if [ "${#failed[@]}" -gt 0 ]; then
    {
        echo
        echo "FAILED (missing from the table or suspect; logs in logs/):"
        for f in "${failed[@]}"; do echo "- $f"; done
    } >> "$out/results.md"
fi
echo
cat "$out/results.md"
echo
echo "results: $out"
[ "${#failed[@]}" -eq 0 ]
