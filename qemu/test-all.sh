#!/usr/bin/env bash
# Run all tests: the cargo workspace tests, then guest-tests inside a QEMU
# guest against leasefsd in several daemon configurations.
#
# Usage: qemu/test-all.sh [--skip-cargo-test] [--no-virtiofsd] [--no-build] [--timeout SECS]
#
# VM runs (each with a fresh share directory and the host agent):
#   sandbox-none       --cache always --sandbox none --xattr
#   sandbox-namespace  --cache always --sandbox namespace --xattr
#   cache-default      --sandbox none --xattr   (the default cache mode, coherent: here the
#                      coherence_* checks run too)
# If virtiofsd is installed (command -v virtiofsd), guest-tests also runs
# against it once, for information only: it is not counted and cannot fail
# the build (the reference daemon lacks leasefs's coherence guarantees).
#
# The last line is the summary "N passed, M failed" (VM runs). Exits non-zero
# if cargo test or any VM run failed. Logs: build/vm/logs/test-all-<time>/.
# --no-build uses the binaries already in target/ (built by an earlier step).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cargo_test=1
try_virtiofsd=1
build=1
timeout_secs=${LEASEFS_VM_TIMEOUT:-600}
while [ $# -gt 0 ]; do
    case "$1" in
        --skip-cargo-test) cargo_test=0 ;;
        --no-virtiofsd) try_virtiofsd=0 ;;
        --no-build) build=0 ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout_secs=$2; shift ;;
        --timeout=*) timeout_secs=${1#*=} ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

require_cargo
cd "$LEASEFS_ROOT"
logs="$LEASEFS_VM_DIR/logs/test-all-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$logs"
# Keep the 10 newest test-all log trees.
find "$LEASEFS_VM_DIR/logs" -maxdepth 1 -name 'test-all-*' -printf '%T@ %p\n' \
    | sort -rn | tail -n +11 | cut -d' ' -f2- | xargs -r rm -rf

section() { printf '\n===== %s =====\n' "$*"; }

# ------------------------------------------------------------- cargo test
cargo_status=0
if [ "$cargo_test" -eq 1 ]; then
    section "cargo test --workspace"
    cargo test --workspace || cargo_status=$?
fi

# ------------------------------------------------------------- builds
# Build once here, then run the VMs with --no-build: a build failure is
# reported once instead of once per run.
section "build: leasefsd, guest-tests (host agent and static guest binary), guest images"
build_ok=1
mk_args=()
if [ "$build" -eq 1 ]; then
    cargo build --release --bin leasefsd || build_ok=0
    cargo build --release -p guest-tests || build_ok=0
else
    mk_args+=(--no-build)
fi
if [ "$build_ok" -eq 1 ]; then
    "$LEASEFS_QEMU_DIR/fetch-kernel.sh" >/dev/null || build_ok=0
    "$LEASEFS_QEMU_DIR/make-initramfs.sh" "${mk_args[@]}" >/dev/null || build_ok=0
fi

# ------------------------------------------------------------- VM runs
names=(sandbox-none sandbox-namespace cache-default)
declare -A run_args=(
    [sandbox-none]="--cache always --sandbox none --xattr"
    [sandbox-namespace]="--cache always --sandbox namespace --xattr"
    [cache-default]="--sandbox none --xattr"
)
# The coherence_* tests check that host changes reach a caching guest at once: the promise of
# the default coherent cache mode, which virtiofsd's modes do not make (cache=always is stale by
# design, auto for up to a second). Runs in those modes skip them.
declare -A run_skip=(
    [sandbox-none]='coherence_*'
    [sandbox-namespace]='coherence_*'
    [cache-default]=''
)
passed=0
failed=0
results=()

# vm_run NAME DAEMON "DAEMON ARGS" SKIP: one guest-tests run (SKIP: tests to leave out); returns its status.
vm_run() {
    local name=$1 daemon=$2 dargs=$3 skip=$4 share status=0 a args=()
    for a in $dargs; do args+=(--daemon-arg "$a"); done
    share=$(mktemp -d /tmp/leasefs-share.XXXXXX)
    section "VM run $name: $daemon $dargs"
    LEASEFS_LOG_DIR="$logs/$name" "$LEASEFS_QEMU_DIR/run-vm.sh" --no-build --agent \
        --share "$share" --daemon "$daemon" "${args[@]}" --timeout "$timeout_secs" \
        -- guest-tests run --skip "$skip" || status=$?
    rm -rf "$share"
    return "$status"
}

for name in "${names[@]}"; do
    if [ "$build_ok" -eq 0 ]; then
        results+=("FAIL  $name (not run: the build failed)")
        failed=$((failed + 1))
        continue
    fi
    status=0
    vm_run "$name" leasefsd "${run_args[$name]}" "${run_skip[$name]}" || status=$?
    if [ "$status" -eq 0 ]; then
        results+=("ok    $name")
        passed=$((passed + 1))
    else
        results+=("FAIL  $name (status $status, logs $logs/$name)")
        failed=$((failed + 1))
    fi
done

# Reference run against virtiofsd: informational only.
if [ "$try_virtiofsd" -eq 1 ] && [ "$build_ok" -eq 1 ] && command -v virtiofsd >/dev/null 2>&1; then
    status=0
    vm_run virtiofsd-reference virtiofsd "--cache always --sandbox none" 'coherence_*' || status=$?
    if [ "$status" -eq 0 ]; then
        results+=("info  virtiofsd-reference passed (not counted)")
    else
        results+=("info  virtiofsd-reference failed with status $status (not counted, logs $logs/virtiofsd-reference)")
    fi
fi

# ------------------------------------------------------------- summary
section "summary"
if [ "$cargo_test" -eq 1 ]; then
    if [ "$cargo_status" -eq 0 ]; then echo "ok    cargo test --workspace"
    else echo "FAIL  cargo test --workspace (status $cargo_status)"; fi
fi
[ "$build_ok" -eq 1 ] || echo "FAIL  build"
for r in "${results[@]}"; do echo "$r"; done
echo "logs: $logs"
echo "$passed passed, $failed failed"

[ "$cargo_status" -eq 0 ] && [ "$failed" -eq 0 ]
