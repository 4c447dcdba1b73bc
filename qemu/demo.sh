#!/usr/bin/env bash
# Demo: share a host directory with a QEMU guest through leasefsd.
#
# Usage: qemu/demo.sh [--shell] [--notify] [run-vm.sh options...]
#
# Recreates build/demo-share (a few text files and a subdirectory), boots a
# guest on it with leasefsd in its default mode (--cache coherent), and in
# the guest lists and prints the files. Then the coherence step: while the
# guest has numbers.txt cached, a host process rewrites it (the daemon holds
# that writer until the guest can no longer use its cached copy), and the
# guest, told only after the host write returned, reads the new contents.
# Last the guest writes hello-from-guest.txt and the host prints it. Exits 0
# on success.
#
# --notify   boot the notify-capable stack (patched QEMU and kernel, built
#            first by qemu/build-notify-stack.sh, about 8 minutes the first
#            time): the guest is told of the host write through the
#            notification queue and confirms, instead of waiting out its lease
# --shell (with a terminal on stdin): an interactive guest shell in /mnt
# instead of the scripted steps. Other options go to run-vm.sh, e.g.
# "--daemon virtiofsd" to compare with the reference daemon.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shell=0
run_args=(--daemon-arg=--cache=coherent)
for a in "$@"; do
    case "$a" in
        --shell) shell=1 ;;
        --notify)
            "$LEASEFS_QEMU_DIR/build-notify-stack.sh" "$LEASEFS_NOTIFY_DIR" >/dev/null \
                || die "building the notify stack failed"
            run_args+=(--qemu "$LEASEFS_NOTIFY_DIR/qemu-system-x86_64"
                       --kernel "$LEASEFS_NOTIFY_DIR/bzImage") ;;
        -h|--help) print_header "$0"; exit 0 ;;
        *) run_args+=("$a") ;;
    esac
done

share="$LEASEFS_ROOT/build/demo-share"
rm -rf "$share"
mkdir -p "$share/notes"
cat > "$share/README.txt" <<'EOF'
This directory lives on the host and is shared with the guest by leasefsd
over virtio-fs (vhost-user).
EOF
printf 'line 1\nline 2\nline 3\n' > "$share/numbers.txt"
echo "a note in a subdirectory" > "$share/notes/todo.txt"

if [ "$shell" -eq 1 ]; then
    [ -t 0 ] || die "--shell needs a terminal on stdin"
    log "interactive guest shell on $share (type 'exit' to power off)"
    exec "$LEASEFS_QEMU_DIR/run-vm.sh" --share "$share" "${run_args[@]}"
fi

# Runs in the guest (busybox sh), cwd /mnt = the share.
# shellcheck disable=SC2016  # expands in the guest, not here
guest_script='
set -e
echo "=== guest: $(uname -sr), share mounted on /mnt ==="
ls -laR /mnt
for f in README.txt numbers.txt notes/todo.txt; do
    echo "--- guest: cat $f"
    cat "$f"
done
echo "=== guest: numbers.txt is cached; asking the host to rewrite it ==="
touch .guest-ready
i=0
while [ ! -e .host-done ]; do
    i=$((i + 1)); [ "$i" -lt 600 ] || { echo "guest: the host never answered"; exit 1; }
    sleep 0.1
done
echo "--- guest: cat numbers.txt after the host write returned"
cat numbers.txt
grep -q "rewritten on the host" numbers.txt || { echo "guest: STALE numbers.txt"; exit 1; }
echo "=== guest: saw the host write at once ==="
rm -f .guest-ready .host-done
echo "hello from the guest ($(uname -n)), written through virtio-fs" > hello-from-guest.txt
sync
echo "=== guest: wrote hello-from-guest.txt ==="
'

# The host side of the coherence step: once the guest has numbers.txt
# cached, rewrite it in place (open for writing, as an editor would), timing
# how long leasefsd held the writer, then tell the guest.
host_writer() {
    local i start
    for ((i = 0; i < 6000; i++)); do
        [ -e "$share/.guest-ready" ] && break
        sleep 0.1
    done
    [ -e "$share/.guest-ready" ] || return 0
    start=$(date +%s%N)
    printf 'line 1, rewritten on the host\nline 2\nline 3\n' 1<> "$share/numbers.txt"
    log "host: rewrote numbers.txt; the write was held $(( ($(date +%s%N) - start) / 1000000 )) ms"
    touch "$share/.host-done"
}
host_writer &
writer=$!
trap 'kill "$writer" 2>/dev/null || true' EXIT

status=0
"$LEASEFS_QEMU_DIR/run-vm.sh" --share "$share" "${run_args[@]}" -- "$guest_script" || status=$?
wait "$writer" 2>/dev/null || true
if [ "$status" -ne 0 ]; then
    die "the guest run failed (status $status)"
fi

echo "=== host: $share/hello-from-guest.txt ==="
if [ ! -s "$share/hello-from-guest.txt" ]; then
    die "the host does not see hello-from-guest.txt"
fi
cat "$share/hello-from-guest.txt"
echo "=== demo OK: the host saw the guest's write ==="
