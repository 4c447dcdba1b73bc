#!/usr/bin/env bash
# Third-party conformance in a guest: pjdfstest (POSIX semantics, 398 cases) and fsx (random
# reads, writes, mmap reads and writes, truncates, fallocate, hole punching, copy_file_range,
# checked on every read), side by side with virtiofsd 1.14, one VM per daemon configuration.
#
# Usage: qemu/conformance.sh [--no-build] [--timeout SECS] [--fsx-ops N] [--seed S] [--out DIR]
#
# Configurations (stock QEMU and guest kernel, each with a fresh share):
#   virtiofsd            virtiofsd 1.14 --sandbox none (its default cache mode, auto): the
#                        reference
#   leasefsd-default     leasefsd --sandbox none (the default cache mode, coherent)
#   leasefsd-hardened    leasefsd --sandbox namespace --seccomp kill
# Verdict: fails if any pjdfstest case passes on virtiofsd and fails on a leasefsd
# configuration, if pjdfstest did not run to its summary, or if fsx reports any failure
# (--fsx-ops operations, default 20,000, mmap included, fixed seed, default 20261206). Cases
# failing on both are listed, not failed. A failed case runs twice more on its own in the same
# guest: it counts as failed if it fails again, and is listed as flaky (with its message) if
# both reruns pass; every failure's message is printed. The EXDEV cases use the guest's /tmp (tmpfs) as the
# second filesystem; the erofs cases (they remount the share read-only) are skipped.
#
# Tools: pjdfstest 0.2.2 and fsx 0.3.2 from crates.io, built static into build/tools/ once
# (cargo install; pjdfstest needs Debian's libacl1-dev), and a static `sleep` built from C
# (pjdfstest's ETXTBSY cases copy and run it). The guest side is qemu/conformance-guest.sh.
# Logs: --out DIR, else $LEASEFS_LOG_DIR, else build/vm/logs/conformance-<time>/.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build=1
timeout_secs=1800
fsx_ops=20000
seed=20261206
out=${LEASEFS_LOG_DIR:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --fsx-ops) [ $# -ge 2 ] || die "--fsx-ops needs a number"; fsx_ops=$2; shift ;;
        --seed) [ $# -ge 2 ] || die "--seed needs a number"; seed=$2; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done
[ -n "$out" ] || out="$LEASEFS_VM_DIR/logs/conformance-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
require_cargo

tools="$LEASEFS_ROOT/build/tools"
mkdir -p "$tools/bin"
static=(env RUSTFLAGS="-C target-feature=+crt-static")
if [ ! -x "$tools/bin/pjdfstest" ]; then
    pkg_installed libacl1-dev || install_pkgs libacl1-dev
    log "building pjdfstest 0.2.2 (static) into $tools"
    "${static[@]}" cargo install -q --locked --version 0.2.2 --target "$LEASEFS_GUEST_TRIPLE" \
        --root "$tools" pjdfstest >&2 || die "cargo install pjdfstest failed"
fi
if [ ! -x "$tools/bin/fsx" ]; then
    log "building fsx 0.3.2 (static) into $tools"
    "${static[@]}" cargo install -q --locked --version 0.3.2 --target "$LEASEFS_GUEST_TRIPLE" \
        --root "$tools" fsx >&2 || die "cargo install fsx failed"
fi
if [ ! -x "$tools/bin/sleep" ]; then
    printf '%s\n' '#include <stdlib.h>' '#include <unistd.h>' \
        'int main(int argc, char **argv) { sleep(argc > 1 ? atoi(argv[1]) : 1); return 0; }' \
        > "$tools/sleep.c"
    cc -static -O2 -o "$tools/bin/sleep" "$tools/sleep.c" || die "cannot build a static sleep (cc -static)"
fi
virtiofsd=$(ensure_virtiofsd)
if [ "$build" -eq 1 ]; then
    cargo build --release --bin leasefsd >&2
fi

# pjdfstest's opt-in features that Linux filesystems have (its own ci/linux-ext4.toml, and
# rename_ctime: Linux filesystems update a renamed file's ctime). Remounting the share
# read-only (its erofs cases) is not allowed, so those are skipped.
pjd_conf='[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
naptime = 0.01'
# fsx's defaults (read, write, mmap read, mmap write, truncate) and the operations a virtio-fs
# guest can pass on: reopen, msync(MS_INVALIDATE), fsync, fdatasync, fallocate, hole punching,
# copy_file_range, sendfile.
fsx_conf='[weights]
close_open = 1
invalidate = 1
fsync = 1
fdatasync = 1
posix_fallocate = 1
punch_hole = 1
copy_file_range = 1
sendfile = 1'

# run NAME DAEMON DAEMON-ARGS...: one VM; its console log is $out/NAME/console.log.
run() {
    local name=$1 daemon=$2 share status=0 a args=()
    shift 2
    for a in "$@"; do args+=(--daemon-arg "$a"); done
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    chmod 755 "$share"
    mkdir "$share/.conformance"
    cp "$tools/bin/pjdfstest" "$tools/bin/fsx" "$tools/bin/sleep" "$share/.conformance/"
    cp "$LEASEFS_QEMU_DIR/conformance-guest.sh" "$share/.conformance/guest.sh"
    printf '%s\n' "$pjd_conf" > "$share/.conformance/pjdfstest.toml"
    printf '%s\n' "$fsx_conf" > "$share/.conformance/fsx.toml"
    log "VM $name: $daemon $*"
    LEASEFS_LOG_DIR="$out/$name" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --memory 1024 \
        --share "$share" --daemon "$daemon" "${args[@]}" --timeout "$timeout_secs" \
        -- "sh /mnt/.conformance/guest.sh $seed $fsx_ops" > "$out/$name.out" 2>&1 || status=$?
    rm -rf "$share"
    # pjdfstest's lines: "<case> ok", "<case> FAILED", "<case> skipped". A case that failed
    # goes to the reruns: FAILED if it failed again in either, else "flaky" (it failed once).
    sed -n '/PJDFSTEST-BEGIN/,/PJDFSTEST-END/p' "$out/$name.out" | tr -d '\r' \
        | awk '$NF == "ok" || $NF == "FAILED" || $NF == "skipped" { print $1, $NF }' \
        | sort -u > "$out/$name.first"
    tr -d '\r' < "$out/$name.out" | awk '$1 == "PJDFSTEST-RERUN" { print $2, $3 }' \
        > "$out/$name.reruns"
    awk 'FILENAME == ARGV[1] { seen[$1] = 1; if ($2 == "FAILED") again[$1] = 1; next }
         $2 == "FAILED" && seen[$1] && !again[$1] { print $1, "flaky"; next }
         { print }' "$out/$name.reruns" "$out/$name.first" > "$out/$name.pjd"
    # Each failure's message (the tab-indented line pjdfstest prints after it).
    tr -d '\r' < "$out/$name.out" | awk '/ FAILED$/ { c = $1; next } c && /^\t/ { print c ":" $0 } { c = "" }' \
        | sort -u > "$out/$name.why"
    return "$status"
}

failed=0
summary=()
declare -A vm_status
for cfg in "virtiofsd|$virtiofsd|--sandbox none" \
           "leasefsd-default|leasefsd|--sandbox none" \
           "leasefsd-hardened|leasefsd|--sandbox namespace --seccomp kill"; do
    IFS='|' read -r name daemon dargs <<< "$cfg"
    s=0
    # shellcheck disable=SC2086  # the daemon arguments are words
    run "$name" "$daemon" $dargs || s=$?
    vm_status[$name]=$s
done

ref="$out/virtiofsd.pjd"
ref_ok=$(awk '$2 == "ok"' "$ref" | wc -l)
for name in virtiofsd leasefsd-default leasefsd-hardened; do
    pjd="$out/$name.pjd"
    passed=$(awk '$2 == "ok"' "$pjd" | wc -l)
    fails=$(awk '$2 == "FAILED"' "$pjd" | wc -l)
    skipped=$(awk '$2 == "skipped"' "$pjd" | wc -l)
    fsx=$(sed -n 's/^.*FSX-EXIT=\([0-9]*\).*$/\1/p' "$out/$name.out" | tail -1)
    line="$name: pjdfstest $passed passed, $fails failed, $skipped skipped; fsx ${fsx_ops} ops: "
    if [ "$fsx" = 0 ]; then line+="ok"; else line+="FAILED (${fsx:-did not run})"; fi
    bad=0
    if [ "${vm_status[$name]}" -ne 0 ]; then
        line+="; VM exited ${vm_status[$name]}"; bad=1
    fi
    [ "$fsx" = 0 ] || bad=1
    if [ "$passed" -lt 100 ]; then
        line+="; pjdfstest did not run to the end"; bad=1
    fi
    if [ "$name" != virtiofsd ]; then
        regress=$(join <(awk '$2 == "ok" || $2 == "flaky"' "$ref") <(awk '$2 == "FAILED"' "$pjd") \
            | awk '{print $1}')
        if [ -n "$regress" ]; then
            line+="; $(wc -l <<< "$regress") cases pass on virtiofsd and fail here: $(tr '\n' ' ' <<< "$regress")"
            bad=1
        fi
    elif [ "$ref_ok" -lt 100 ]; then
        bad=1
    fi
    both=$(join <(awk '$2 == "FAILED"' "$ref") <(awk '$2 == "FAILED"' "$pjd") | awk '{print $1}')
    if [ "$name" != virtiofsd ] && [ -n "$both" ]; then
        line+="; failing on virtiofsd too: $(tr '\n' ' ' <<< "$both")"
    fi
    flaky=$(awk '$2 == "flaky" { print $1 }' "$pjd")
    if [ -n "$flaky" ]; then
        line+="; failed once, passed both reruns (not counted as a failure): $(tr '\n' ' ' <<< "$flaky")"
    fi
    summary+=("$([ "$bad" -eq 0 ] && echo "ok  " || echo "FAIL") $line")
    # Why each case failed (also the flaky ones): what a CI log needs to find the cause.
    while IFS= read -r why; do
        summary+=("       $name: $why")
    done < "$out/$name.why"
    [ "$bad" -eq 0 ] || failed=1
done
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$failed"
