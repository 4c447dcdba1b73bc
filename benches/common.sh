# Shared by benches/compare.sh and benches/instructions.sh (sourced, not run). The caller
# sets REPO (and cd's there) and defines log(); LEASEFSD, BENCH and LABEL may be preset
# from its options.
# shellcheck shell=bash disable=SC2034  # the variables set here are the callers'

json_str() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

# Build leasefsd and leasefs-bench (release) unless both binaries were given: sets BUILT
# (yes when built here), TARGET_DIR, LEASEFSD and BENCH.
build_binaries() {
    BUILT=""
    TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
    case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$REPO/$TARGET_DIR" ;; esac
    if [ -n "${LEASEFSD:-}" ] && [ -n "${BENCH:-}" ]; then
        return 0
    fi
    BUILT=yes
    log "building leasefsd and leasefs-bench (release, target dir $TARGET_DIR)"
    cargo build --release --bin leasefs-bench --bin leasefsd
    [ -n "${LEASEFSD:-}" ] || LEASEFSD="$TARGET_DIR/release/leasefsd"
    [ -n "${BENCH:-}" ] || BENCH="$TARGET_DIR/release/leasefs-bench"
}

# VIRTIOFSD: the one on PATH or in ~/.cargo/bin (where `cargo install` puts it), if any.
find_virtiofsd() {
    if command -v virtiofsd >/dev/null 2>&1; then
        VIRTIOFSD="$(command -v virtiofsd)"
    elif [ -x "$HOME/.cargo/bin/virtiofsd" ]; then
        VIRTIOFSD="$HOME/.cargo/bin/virtiofsd"
    fi
}

# GIT_REV and GIT_TREE: what leasefsd was built from. Given binaries are named by LABEL; an
# uncommitted tree by a hash of its changes, so two runs can be told apart.
leasefs_rev() {
    GIT_REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    GIT_TREE=""
    if [ -z "$BUILT" ]; then
        GIT_REV="${LABEL:-binary $LEASEFSD}"
    elif [ -n "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]; then
        GIT_REV="$GIT_REV+dirty"
        GIT_TREE="$({ git diff HEAD -- src Cargo.toml Cargo.lock
                      git ls-files -o --exclude-standard -z -- src | xargs -0 -r cat; } |
                    sha256sum | cut -c1-12)"
    fi
}

# start_daemon SOCKET TENTHS LOG COMMAND...: run COMMAND in the background (DAEMON_PID) with
# its output in LOG and wait up to TENTHS tenths of a second for it to create SOCKET.
# Fails (having stopped it) if it exits or does not make it in time.
start_daemon() {
    local sock="$1" tenths="$2" logfile="$3" i=0
    shift 3
    rm -f "$sock"
    "$@" >"$logfile" 2>&1 &
    DAEMON_PID=$!
    while [ ! -S "$sock" ]; do
        if ! kill -0 "$DAEMON_PID" 2>/dev/null || [ $i -ge "$tenths" ]; then
            kill "$DAEMON_PID" 2>/dev/null || true
            wait "$DAEMON_PID" 2>/dev/null || true
            DAEMON_PID=""
            return 1
        fi
        sleep 0.1
        i=$((i + 1))
    done
}

# stop_daemon TENTHS WHAT: the daemon exits once the frontend disconnects; give it TENTHS
# tenths of a second, then SIGTERM. DAEMON_STATUS gets its exit status.
stop_daemon() {
    local tenths="$1" what="$2" i=0
    while kill -0 "$DAEMON_PID" 2>/dev/null && [ $i -lt "$tenths" ]; do
        sleep 0.1
        i=$((i + 1))
    done
    if kill -0 "$DAEMON_PID" 2>/dev/null; then
        log "note: $what still running after the bench disconnected; sending SIGTERM"
        kill "$DAEMON_PID" 2>/dev/null || true
    fi
    DAEMON_STATUS=0
    wait "$DAEMON_PID" 2>/dev/null || DAEMON_STATUS=$?
    DAEMON_PID=""
}

# The EXIT trap: stop a daemon left running and remove the scratch directory WORK.
stop_daemon_and_clean() {
    if [ -n "${DAEMON_PID:-}" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill "$DAEMON_PID" 2>/dev/null || true
        wait "$DAEMON_PID" 2>/dev/null || true
    fi
    [ -z "${WORK:-}" ] || rm -rf "$WORK"
}
