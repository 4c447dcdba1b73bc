#!/usr/bin/env bash
# Boot a Linux guest under QEMU against a virtio-fs daemon and run a command.
#
# Usage: qemu/run-vm.sh [options] [-- COMMAND...]
#
#   --share DIR         host directory to export (default build/vm/share)
#   --daemon D          leasefsd (default, built with cargo), virtiofsd, or a path
#   --daemon-arg ARG    extra daemon argument, repeatable; when given they replace
#                       the default extra args "--cache always --sandbox none"
#   --agent             start the host agent (guest-tests host-agent) and give
#                       the guest a virtio-serial port named leasefs.agent; QEMU
#                       then also gets a QMP socket the agent uses to pause the
#                       VM (the agent's PAUSE request: `stop`, host change, `cont`)
#   --qemu PATH         QEMU binary (default qemu-system-x86_64); it also gets
#                       -L for Debian's firmware directories (/usr/share/seabios,
#                       /usr/lib/ipxe/qemu, /usr/share/qemu: bios-256k.bin,
#                       linuxboot_dma.bin, kvmvapic.bin), which a QEMU built
#                       from source may not search, e.g. one run from its build
#                       tree; qemu/build-notify-qemu.sh builds the patched one
#   --kernel PATH       guest kernel (default: qemu/fetch-kernel.sh)
#   --memory MB         guest RAM (default 512)
#   --queues N          virtio-fs request queues (num-request-queues=N)
#   --timeout SECS      kill the VM after SECS (default 600; none for an
#                       interactive shell unless given)
#   --no-build          do not run cargo; use the binaries already in target/
#
# COMMAND runs in the guest with cwd /mnt (the share) via /bin/sh, e.g.
#   -- guest-tests run        -- sh -c 'ls /mnt'
# A single argument containing spaces is taken as shell code:  -- 'ls; exit 3'
# Without COMMAND: an interactive shell if stdin is a terminal (exit powers off,
# Ctrl-A x kills QEMU), else "ls -la /mnt".
#
# Exit status: the guest command's (from the LEASEFS-GUEST-EXIT= console
# marker); 125 if the marker never appeared (guest crash, timeout, daemon
# died under the guest, KVM failure); 122 if the guest succeeded but the
# daemon did not exit cleanly after QEMU quit.
# Console output goes to stdout and to build/vm/logs/<run>/console.log, next
# to daemon.log, agent.log and qemu.log (QEMU's stderr); build/vm/logs/latest
# points at the last run.
#
# Environment: LEASEFS_ACCEL (default tcg; "kvm" only where KVM really works),
# LEASEFS_SMP (default 2), LEASEFS_KERNEL_APPEND (extra kernel arguments),
# LEASEFS_QEMU_ARGS (extra QEMU arguments),
# LEASEFS_GUEST_TESTS=PATH|none (see make-initramfs.sh), LEASEFS_LOG_DIR.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

EXIT_NO_MARKER=125
EXIT_DAEMON_FAILED=122

share="$LEASEFS_VM_DIR/share"
share_given=0
daemon=leasefsd
daemon_args=(--cache always --sandbox none)
daemon_args_given=0
agent=0
qemu=""
kernel=""
memory=512
queues=""
timeout_secs=""
build=1
cmd=()
have_cmd=0

orig_args=("$@")
need_arg() { [ "$2" -ge 2 ] || die "$1 needs an argument (try --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --share) need_arg "$1" $#; share=$2; share_given=1; shift ;;
        --share=*) share=${1#*=}; share_given=1 ;;
        --daemon) need_arg "$1" $#; daemon=$2; shift ;;
        --daemon=*) daemon=${1#*=} ;;
        --daemon-arg|--daemon-arg=*)
            if [ "$1" = --daemon-arg ]; then need_arg "$1" $#; a=$2; shift; else a=${1#*=}; fi
            [ "$daemon_args_given" -eq 1 ] || daemon_args=()
            daemon_args+=("$a"); daemon_args_given=1 ;;
        --agent) agent=1 ;;
        --qemu) need_arg "$1" $#; qemu=$2; shift ;;
        --qemu=*) qemu=${1#*=} ;;
        --kernel) need_arg "$1" $#; kernel=$2; shift ;;
        --kernel=*) kernel=${1#*=} ;;
        --memory) need_arg "$1" $#; memory=$2; shift ;;
        --memory=*) memory=${1#*=} ;;
        --queues) need_arg "$1" $#; queues=$2; shift ;;
        --queues=*) queues=${1#*=} ;;
        --timeout) need_arg "$1" $#; timeout_secs=$2; shift ;;
        --timeout=*) timeout_secs=${1#*=} ;;
        --no-build) build=0 ;;
        -h|--help) print_header "$0"; exit 0 ;;
        --) shift; cmd=("$@"); have_cmd=$(( $# > 0 )); break ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac
    shift
done

[[ "$memory" =~ ^[0-9]+$ ]] || die "--memory wants a number of MiB, got '$memory'"
[ -z "$queues" ] || [[ "$queues" =~ ^[1-9][0-9]*$ ]] || die "--queues wants a positive number, got '$queues'"
[ -z "$timeout_secs" ] || [[ "$timeout_secs" =~ ^[0-9]+$ ]] || die "--timeout wants seconds, got '$timeout_secs'"

interactive=0
if [ "$have_cmd" -eq 0 ]; then
    if [ -t 0 ]; then
        interactive=1
    else
        cmd=(ls -la /mnt)
        have_cmd=1
    fi
fi
# An interactive shell has no deadline unless one was asked for.
if [ -z "$timeout_secs" ] && [ "$interactive" -eq 0 ]; then
    timeout_secs=600
fi

# ---------------------------------------------------------------- host tools
ensure_vm_tools
if [ -n "$qemu" ]; then
    qemu_bin=$(command -v "$qemu" 2>/dev/null) || die "QEMU binary not found: $qemu"
else
    qemu_bin=$(command -v qemu-system-x86_64)
fi

if [ "$share_given" -eq 0 ]; then mkdir -p "$share"; fi
[ -d "$share" ] || die "share directory does not exist: $share"
share=$(cd "$share" && pwd -P)

cargo_build() {
    [ "$build" -eq 1 ] || return 0
    require_cargo
    log "cargo build --release $*"
    (cd "$LEASEFS_ROOT" && cargo build --release "$@" >&2) || die "cargo build --release $* failed"
}

# ---------------------------------------------------------------- daemon binary
case "$daemon" in
    leasefsd)
        cargo_build --bin leasefsd
        daemon_bin="$LEASEFS_TARGET/release/leasefsd" ;;
    virtiofsd)
        # cargo install puts it in ~/.cargo/bin; Debian's package in /usr/libexec.
        daemon_bin=""
        for c in "$(command -v virtiofsd 2>/dev/null || true)" "$HOME/.cargo/bin/virtiofsd" \
                 /usr/libexec/virtiofsd /usr/lib/qemu/virtiofsd; do
            if [ -n "$c" ] && [ -x "$c" ]; then daemon_bin=$c; break; fi
        done
        [ -n "$daemon_bin" ] || die "virtiofsd not found; install it with: apt-get install -y libseccomp-dev libcap-ng-dev && cargo install virtiofsd --version 1.14.0" ;;
    *)
        daemon_bin=$daemon ;;
esac
[ -x "$daemon_bin" ] || die "daemon binary is missing or not executable: $daemon_bin"

if [ "$agent" -eq 1 ]; then
    # The host agent is the host build of guest-tests (not the static one).
    cargo_build -p guest-tests
    agent_bin="$LEASEFS_TARGET/release/guest-tests"
    [ -x "$agent_bin" ] || die "host agent binary missing: $agent_bin"
fi

# ---------------------------------------------------------------- guest images
if [ -z "$kernel" ]; then
    kernel=$("$LEASEFS_QEMU_DIR/fetch-kernel.sh")
fi
[ -s "$kernel" ] || die "kernel not found: $kernel"
mk_args=()
[ "$build" -eq 1 ] || mk_args+=(--no-build)
base_initrd=$("$LEASEFS_QEMU_DIR/make-initramfs.sh" "${mk_args[@]}")

# ---------------------------------------------------------------- run state
RUN_TMP=$(mktemp -d /tmp/leasefs-vm.XXXXXX)
if [ -n "${LEASEFS_LOG_DIR:-}" ]; then
    LOG_DIR=$LEASEFS_LOG_DIR
else
    LOG_DIR="$LEASEFS_VM_DIR/logs/$(date +%Y%m%d-%H%M%S)-$$"
fi
mkdir -p "$LOG_DIR"
CONSOLE_LOG="$LOG_DIR/console.log"
DAEMON_LOG="$LOG_DIR/daemon.log"
AGENT_LOG="$LOG_DIR/agent.log"
QEMU_LOG="$LOG_DIR/qemu.log"
: > "$CONSOLE_LOG"
if [ -z "${LEASEFS_LOG_DIR:-}" ]; then
    ln -sfn "$(basename "$LOG_DIR")" "$LEASEFS_VM_DIR/logs/latest"
    # Keep the 30 newest run logs.
    ls -1dt "$LEASEFS_VM_DIR"/logs/[0-9]*-* 2>/dev/null | tail -n +31 | xargs -r rm -rf
fi

SOCK="$RUN_TMP/vhost-fs.sock"
AGENT_SOCK="$RUN_TMP/agent.sock"
QMP_SOCK="$RUN_TMP/qmp.sock"
DAEMON_PID=""
AGENT_PID=""
QEMU_PID=""

proc_alive() {   # running and not a zombie
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
    [ "$st" != Z ]
}

# Stop a process we started; the whole group when it leads one (daemon and
# agent run under setsid, QEMU under timeout), so helpers it forked go too.
stop_proc() {
    local pid=$1 name=$2 i target=$1
    [ -n "$pid" ] || return 0
    # /proc/PID/stat after the "(comm) ": state ppid pgrp ...
    if [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f3)" = "$pid" ]; then
        target=-$pid
    fi
    if proc_alive "$pid"; then
        kill -TERM -- "$target" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do proc_alive "$pid" || break; sleep 0.1; done
        if proc_alive "$pid"; then
            log "$name ($pid) ignored SIGTERM; killing it"
            kill -KILL -- "$target" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
    trap - EXIT INT TERM
    stop_proc "$QEMU_PID" qemu
    stop_proc "$AGENT_PID" agent
    stop_proc "$DAEMON_PID" daemon
    # QEMU puts the terminal in raw mode; a killed QEMU cannot undo that.
    if [ "$interactive" -eq 1 ] && [ -t 0 ]; then stty sane 2>/dev/null || true; fi
    rm -rf "$RUN_TMP"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# ---------------------------------------------------------------- per-run initrd
# Linux unpacks concatenated cpio archives in order, so the base image plus
# a tiny archive holding /etc/leasefs-cmd makes the run's initrd.
initrd=$base_initrd
if [ "$have_cmd" -eq 1 ]; then
    mkdir -p "$RUN_TMP/cmd/etc"
    {
        echo "# generated by qemu/run-vm.sh"
        if [ "${#cmd[@]}" -eq 1 ] && [[ "${cmd[0]}" =~ [[:space:]] ]]; then
            printf '%s\n' "${cmd[0]}"
        else
            line=""
            for w in "${cmd[@]}"; do line+="${line:+ }$(sh_quote "$w")"; done
            printf '%s\n' "$line"
        fi
    } > "$RUN_TMP/cmd/etc/leasefs-cmd"
    (cd "$RUN_TMP/cmd" && printf 'etc\netc/leasefs-cmd\n' \
        | cpio --quiet -o -H newc --owner=0:0) | gzip > "$RUN_TMP/cmd.cpio.gz"
    cat "$base_initrd" "$RUN_TMP/cmd.cpio.gz" > "$RUN_TMP/initrd.gz"
    initrd="$RUN_TMP/initrd.gz"
fi

# ---------------------------------------------------------------- daemon
# setsid: its own session/group, so a terminal ^C does not kill it before
# QEMU (we stop it ourselves) and stop_proc can signal its helpers too.
log "daemon: $daemon_bin --socket-path $SOCK --shared-dir $share --tag $LEASEFS_TAG ${daemon_args[*]}"
RUST_BACKTRACE=${RUST_BACKTRACE:-1} setsid "$daemon_bin" --socket-path "$SOCK" --shared-dir "$share" \
    --tag "$LEASEFS_TAG" "${daemon_args[@]}" </dev/null >"$DAEMON_LOG" 2>&1 &
DAEMON_PID=$!
wait_for_socket "$SOCK" "$DAEMON_PID" "${LEASEFS_SOCKET_WAIT:-30}" daemon "$DAEMON_LOG" \
    || die "the virtio-fs daemon did not start (see its log above)"

# ---------------------------------------------------------------- agent
if [ "$agent" -eq 1 ]; then
    log "agent: $agent_bin host-agent --share $share --listen $AGENT_SOCK"
    RUST_BACKTRACE=${RUST_BACKTRACE:-1} setsid "$agent_bin" host-agent --share "$share" \
        --listen "$AGENT_SOCK" --qmp "$QMP_SOCK" </dev/null >"$AGENT_LOG" 2>&1 &
    AGENT_PID=$!
    wait_for_socket "$AGENT_SOCK" "$AGENT_PID" "${LEASEFS_SOCKET_WAIT:-30}" agent "$AGENT_LOG" \
        || die "the host agent did not start (see its log above)"
fi

# ---------------------------------------------------------------- QEMU
accel=${LEASEFS_ACCEL:-tcg}
fs_dev="vhost-user-fs-pci,queue-size=1024,chardev=char0,tag=$LEASEFS_TAG"
[ -z "$queues" ] || fs_dev+=",num-request-queues=$queues"
# shellcheck disable=SC2054  # the commas are QEMU option syntax
qargs=(
    -accel "$accel" -smp "${LEASEFS_SMP:-2}" -m "$memory"
    # vhost-user needs guest RAM in shared memory the daemon can map.
    -object "memory-backend-memfd,id=mem,size=${memory}M,share=on" -numa node,memdev=mem
    -chardev "socket,id=char0,path=$SOCK"
    -device "$fs_dev"
    -kernel "$kernel" -initrd "$initrd"
    # panic=-1 + -no-reboot: a guest panic ends QEMU at once instead of
    # hanging until the timeout.
    -append "console=ttyS0 quiet panic=-1 leasefs.tag=$LEASEFS_TAG ${LEASEFS_KERNEL_APPEND:-}"
    -display none -vga none -nic none -no-reboot
)
# The serial console is stdio; logfile= tees it into console.log.
if [ "$interactive" -eq 1 ]; then
    # mux with the monitor: Ctrl-A x quits, ^C goes to the guest.
    qargs+=(-chardev "stdio,id=con,mux=on,signal=off,logfile=$CONSOLE_LOG"
            -serial chardev:con -mon chardev=con)
else
    qargs+=(-chardev "stdio,id=con,logfile=$CONSOLE_LOG" -serial chardev:con)
fi
if [ "$agent" -eq 1 ]; then
    # QEMU connects as a client to the agent's listening socket.
    # shellcheck disable=SC2054
    qargs+=(-device virtio-serial-pci -chardev "socket,id=agent,path=$AGENT_SOCK"
            -device virtserialport,chardev=agent,name=leasefs.agent
            -qmp "unix:$QMP_SOCK,server=on,wait=off")
fi
# A QEMU of our own (e.g. built from source) needs Debian's firmware paths.
if [ -n "$qemu" ]; then
    for d in /usr/share/seabios /usr/lib/ipxe/qemu /usr/share/qemu; do
        [ -d "$d" ] && qargs+=(-L "$d")
    done
fi

# Extra QEMU arguments for debugging (e.g. "-s" for gdb), split on spaces.
if [ -n "${LEASEFS_QEMU_ARGS:-}" ]; then
    read -r -a extra <<< "$LEASEFS_QEMU_ARGS"
    qargs+=("${extra[@]}")
fi

log "booting: accel=$accel kernel=$(basename "$kernel") share=$share${timeout_secs:+ timeout=${timeout_secs}s}"
[ "$interactive" -eq 0 ] || log "interactive shell: 'exit' powers the guest off; Ctrl-A x kills QEMU"
start=$SECONDS
if [ "$interactive" -eq 1 ]; then
    # Stays in our process group (no timeout's setpgid) so it may use the
    # terminal; the explicit <&0 keeps bash from giving it /dev/null.
    if [ -n "$timeout_secs" ]; then
        timeout --foreground -k 10 "$timeout_secs" "$qemu_bin" "${qargs[@]}" <&0 2> >(tee "$QEMU_LOG" >&2) &
    else
        "$qemu_bin" "${qargs[@]}" <&0 2> >(tee "$QEMU_LOG" >&2) &
    fi
else
    # timeout -k: SIGKILL if QEMU ignores the SIGTERM. QEMU's stderr is
    # also kept in qemu.log (watched below).
    timeout -k 10 "$timeout_secs" "$qemu_bin" "${qargs[@]}" </dev/null 2> >(tee "$QEMU_LOG" >&2) &
fi
QEMU_PID=$!

# Wait for QEMU, watching the daemon meanwhile: if it dies under a running
# guest, the guest's file system calls hang forever, so stop QEMU after a
# short grace period (QEMU's own exit also ends the daemon, hence the grace)
# instead of waiting for the timeout.
# Same for a KVM that cannot run the guest: QEMU reports "KVM internal
# error" and then sits paused forever.
daemon_status=""
daemon_died_at=""
kvm_failed=0
while proc_alive "$QEMU_PID"; do
    if grep -q 'KVM internal error' "$QEMU_LOG" 2>/dev/null; then
        sleep 0.5   # let QEMU finish its register dump
        log "ERROR: KVM cannot run this guest on this host (\"KVM internal error\"); use TCG: unset LEASEFS_ACCEL"
        kvm_failed=1
        stop_proc "$QEMU_PID" qemu
        break
    fi
    if [ -z "$daemon_died_at" ] && ! proc_alive "$DAEMON_PID"; then
        daemon_died_at=$SECONDS
    fi
    if [ -n "$daemon_died_at" ] && [ $((SECONDS - daemon_died_at)) -ge 5 ]; then
        daemon_status=0
        wait "$DAEMON_PID" || daemon_status=$?
        log "ERROR: the daemon exited (status $daemon_status) while the guest was running; stopping QEMU"
        stop_proc "$QEMU_PID" qemu
        break
    fi
    sleep 0.2
done
qemu_status=0
wait "$QEMU_PID" || qemu_status=$?
QEMU_PID=""
elapsed=$((SECONDS - start))

# ---------------------------------------------------------------- results
marker=$(grep -a -o 'LEASEFS-GUEST-EXIT=[0-9]*' "$CONSOLE_LOG" | tail -n 1 || true)
boot_crashed=0
if [ -z "$marker" ] && [ "$kvm_failed" -eq 0 ] && [ -z "$daemon_status" ] \
        && [ "$qemu_status" -ne 124 ] && [ "$qemu_status" -ne 137 ] \
        && ! grep -aq 'LEASEFS-GUEST-INIT' "$CONSOLE_LOG" \
        && grep -aEq 'Kernel panic|Oops:' "$CONSOLE_LOG"; then
    boot_crashed=1
fi
if [ -n "$marker" ]; then
    status=${marker#LEASEFS-GUEST-EXIT=}
    log "guest exited with status $status after ${elapsed}s"
else
    status=$EXIT_NO_MARKER
    if [ "$kvm_failed" -eq 1 ]; then
        log "ERROR: the guest never reported an exit status: KVM failed (status $status)"
    elif [ -n "$daemon_status" ]; then
        log "ERROR: the guest never reported an exit status: the daemon died under it (status $status)"
    elif [ "$qemu_status" -eq 124 ] || [ "$qemu_status" -eq 137 ]; then
        log "ERROR: timed out after ${timeout_secs}s: the guest never reported an exit status (status $status)"
    else
        log "ERROR: QEMU exited (status $qemu_status) after ${elapsed}s without the guest reporting an exit status: guest crash, kernel panic or QEMU failure (status $status)"
    fi
fi

# The agent has no more peer: stop it. Note if it had died on its own.
if [ -n "$AGENT_PID" ]; then
    if ! proc_alive "$AGENT_PID"; then
        agent_status=0
        wait "$AGENT_PID" || agent_status=$?
        [ "$agent_status" -eq 0 ] || { warn "the host agent exited early with status $agent_status"; show_log agent "$AGENT_LOG"; }
    else
        stop_proc "$AGENT_PID" agent
    fi
    AGENT_PID=""
fi

# The daemon should exit on its own once the VMM has disconnected.
daemon_ok=1
for ((i = 0; i < 100; i++)); do proc_alive "$DAEMON_PID" || break; sleep 0.1; done
if proc_alive "$DAEMON_PID"; then
    log "ERROR: the daemon was still running 10 s after QEMU exited; killing it"
    stop_proc "$DAEMON_PID" daemon
    daemon_ok=0
else
    if [ -z "$daemon_status" ]; then
        daemon_status=0
        wait "$DAEMON_PID" || daemon_status=$?
    fi
    if [ "$daemon_status" -ne 0 ]; then
        if [ "$daemon_status" -gt 128 ]; then
            log "ERROR: the daemon was killed by signal $((daemon_status - 128))"
        else
            log "ERROR: the daemon exited with status $daemon_status"
        fi
        daemon_ok=0
    fi
fi
DAEMON_PID=""
if [ "$daemon_ok" -eq 0 ]; then
    show_log daemon "$DAEMON_LOG"
    [ "$status" -ne 0 ] || status=$EXIT_DAEMON_FAILED
fi

# A guest kernel that crashed while booting, before /init ran, did not run anything of
# ours: seen once in about a hundred TCG boots of Debian's kernel on a loaded host ("Oops:
# int3" in sched_clock_cpu during the kernel's own code patching, a vCPU racing the other's
# text_poke). Boot once more, keeping the crashed console; a second crash fails the run.
if [ "$boot_crashed" -eq 1 ] && [ -z "${LEASEFS_BOOT_RETRIED:-}" ] && [ "$interactive" -eq 0 ]; then
    mv -f "$CONSOLE_LOG" "$LOG_DIR/console-boot-crash.log"
    log "the guest kernel crashed while booting, before /init ran (console: $LOG_DIR/console-boot-crash.log); booting once more"
    cleanup
    LEASEFS_BOOT_RETRIED=1 exec "$0" "${orig_args[@]}"
fi

log "logs: $LOG_DIR"
exit "$status"
