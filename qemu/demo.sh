#!/usr/bin/env bash
# Demo: share a host directory with a QEMU guest through leasefsd.
#
# Usage: qemu/demo.sh [--shell] [run-vm.sh options...]
#
# Recreates build/demo-share (a few text files and a subdirectory), boots a
# guest on it, and in the guest lists and prints the files and writes
# hello-from-guest.txt; back on the host it prints that file to show the
# host saw the guest's write. Exits 0 on success.
#
# --shell (with a terminal on stdin): an interactive guest shell in /mnt
# instead of the scripted steps. Other options go to run-vm.sh, e.g.
# "--daemon virtiofsd" to compare with the reference daemon.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

shell=0
run_args=()
for a in "$@"; do
    case "$a" in
        --shell) shell=1 ;;
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
echo "hello from the guest ($(uname -n)), written through virtio-fs" > hello-from-guest.txt
sync
echo "=== guest: wrote hello-from-guest.txt ==="
'

status=0
"$LEASEFS_QEMU_DIR/run-vm.sh" --share "$share" "${run_args[@]}" -- "$guest_script" || status=$?
if [ "$status" -ne 0 ]; then
    die "the guest run failed (status $status)"
fi

echo "=== host: $share/hello-from-guest.txt ==="
if [ ! -s "$share/hello-from-guest.txt" ]; then
    die "the host does not see hello-from-guest.txt"
fi
cat "$share/hello-from-guest.txt"
echo "=== demo OK: the host saw the guest's write ==="
