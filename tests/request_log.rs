//! `--log-level trace` logs every FUSE request, as virtiofsd's does, whether or not the
//! request would have taken the fast path (src/fast_path.rs): qemu/bench-tree.sh
//! --count-requests and anyone debugging a guest rely on it.

use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{FrontendConfig, ROOT_ID};

/// How many logged requests of `opcode` the daemon's log holds.
fn logged(backend: &Backend, opcode: &str) -> usize {
    backend.log().matches(&format!("new req {opcode}")).count()
}

/// Wait up to 5 s for the daemon's threads to log a first `opcode` request.
fn await_logged(backend: &Backend, opcode: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while logged(backend, opcode) < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn trace_logs_every_request_including_fast_path_ones() {
    let backend = Backend::spawn(env!("CARGO_BIN_EXE_leasefsd"), &["--log-level", "trace"])
        .expect("starting leasefsd");
    std::fs::write(backend.share().join("f"), b"x").unwrap();
    let fuse = backend.client(&FrontendConfig::default());
    fuse.init().expect("INIT");
    for _ in 0..5 {
        fuse.getattr(ROOT_ID).expect("GETATTR");
    }
    let entry = fuse.lookup(ROOT_ID, "f").expect("LOOKUP");
    let open = fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(fuse.read(entry.nodeid, open.fh, 0, 10).unwrap(), b"x");
    await_logged(&backend, "Read");
    assert_eq!(logged(&backend, "Getattr"), 5, "{}", backend.log());
    assert_eq!(logged(&backend, "Lookup"), 1);
    assert_eq!(logged(&backend, "Open"), 1);
    assert_eq!(logged(&backend, "Read"), 1);
    // READDIRPLUS is answered by leasefs's own encoder, not the crate's server.
    let dir = fuse.opendir(ROOT_ID).expect("OPENDIR");
    fuse.readdirplus(ROOT_ID, dir.fh, 0, 4096)
        .expect("READDIRPLUS");
    await_logged(&backend, "Readdirplus");
    assert_eq!(logged(&backend, "Readdirplus"), 1, "{}", backend.log());
}

#[test]
fn without_trace_requests_are_not_logged() {
    let backend = Backend::spawn(env!("CARGO_BIN_EXE_leasefsd"), &["--log-level", "debug"])
        .expect("starting leasefsd");
    let fuse = backend.client(&FrontendConfig::default());
    fuse.init().expect("INIT");
    fuse.getattr(ROOT_ID).expect("GETATTR");
    assert_eq!(logged(&backend, "Getattr"), 0, "{}", backend.log());
}
