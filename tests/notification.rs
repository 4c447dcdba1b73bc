//! The notification queue through a real vhost-user socket: a frontend that negotiates
//! VIRTIO_FS_F_NOTIFICATION caches a file, a host process writes it, and the daemon revokes
//! the guest's cache with INVAL_INODE; the guest's own writes revoke nothing.

use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{Device, FrontendConfig, FuseClient, ROOT_ID};

const FUSE_NOTIFY_INVAL_INODE: i32 = 2;

fn connect(backend: &Backend, want_notification: bool) -> (Arc<Device>, FuseClient) {
    let config = FrontendConfig {
        want_notification,
        ..FrontendConfig::default()
    };
    let device = Arc::new(
        Device::connect(backend.socket(), &config)
            .unwrap_or_else(|e| panic!("connecting: {e}\ndaemon log:\n{}", backend.log())),
    );
    let fuse = FuseClient::new(device.clone());
    fuse.init().expect("INIT");
    (device, fuse)
}

/// INVAL_INODE node ids received within `wait`.
fn inval_inodes(device: &Device, backend: &Backend, wait: Duration) -> Vec<u64> {
    let deadline = Instant::now() + wait;
    let mut nodes = Vec::new();
    loop {
        for message in device.notifications().expect("draining notifications") {
            assert!(
                message.len() >= 16,
                "short notification: {message:?}\ndaemon log:\n{}",
                backend.log()
            );
            let len = u32::from_le_bytes(message[0..4].try_into().unwrap()) as usize;
            let code = i32::from_le_bytes(message[4..8].try_into().unwrap());
            let unique = u64::from_le_bytes(message[8..16].try_into().unwrap());
            // Non-zero: a lease break awaiting confirmation (tests/revocation.rs).
            let _ = unique;
            assert_eq!(len, message.len(), "header length matches what was written");
            if code == FUSE_NOTIFY_INVAL_INODE {
                nodes.push(u64::from_le_bytes(message[16..24].try_into().unwrap()));
            }
        }
        if !nodes.is_empty() || Instant::now() > deadline {
            return nodes;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn host_write_revokes_the_guest_cache_and_own_writes_do_not() {
    let backend = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &["--cache", "coherent", "--log-level", "debug"],
    )
    .expect("starting leasefsd");
    let host_file = backend.share().join("cached.txt");
    fs::write(&host_file, b"version one").unwrap();
    let (device, fuse) = connect(&backend, true);
    assert!(
        device.has_notification_queue(),
        "leasefsd offers VIRTIO_FS_F_NOTIFICATION"
    );

    let entry = fuse.lookup(ROOT_ID, "cached.txt").expect("LOOKUP");
    let open = fuse.open(entry.nodeid, libc::O_RDWR).expect("OPEN");
    assert_eq!(
        fuse.read(entry.nodeid, open.fh, 0, 64).unwrap(),
        b"version one"
    );

    // The guest's own write goes through the daemon: nothing to revoke.
    fuse.write(entry.nodeid, open.fh, 0, b"VERSION")
        .expect("WRITE");
    let own = inval_inodes(&device, &backend, Duration::from_millis(300));
    assert!(own.is_empty(), "own write revoked {own:?}");

    // Another process writes the file on the host.
    let started = Instant::now();
    fs::write(&host_file, b"version two, from the host").unwrap();
    let revoked = inval_inodes(&device, &backend, Duration::from_secs(5));
    let latency = started.elapsed();
    assert!(
        revoked.contains(&entry.nodeid),
        "expected INVAL_INODE for node {}, got {revoked:?}\ndaemon log:\n{}",
        entry.nodeid,
        backend.log()
    );
    eprintln!("host write -> INVAL_INODE received in {latency:?}");
    assert_eq!(
        fuse.read(entry.nodeid, open.fh, 0, 64).unwrap(),
        b"version two, from the host"
    );
}

#[test]
fn without_the_feature_the_request_queues_start_at_one() {
    // A driver that does not negotiate the bit (every stock guest) must find the request
    // queues where they always were, and still be served.
    let backend = Backend::spawn(env!("CARGO_BIN_EXE_leasefsd"), &[]).expect("starting leasefsd");
    fs::write(backend.share().join("f"), b"data").unwrap();
    let (device, fuse) = connect(&backend, false);
    assert!(!device.has_notification_queue());
    let entry = fuse.lookup(ROOT_ID, "f").expect("LOOKUP");
    let open = fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(fuse.read(entry.nodeid, open.fh, 0, 16).unwrap(), b"data");
}

#[test]
fn a_guest_that_never_refills_loses_nothing_it_can_still_get() {
    // The guest posts its buffers once and never drains them: revocations past the posted
    // buffers wait in the bounded backlog; request processing is not held up.
    let backend = Backend::spawn(env!("CARGO_BIN_EXE_leasefsd"), &["--cache", "coherent"])
        .expect("starting leasefsd");
    let share = backend.share().to_path_buf();
    let (_device, fuse) = connect(&backend, true);
    let mut nodes = Vec::new();
    for i in 0..600 {
        let name = format!("f{i}");
        fs::write(share.join(&name), b"x").unwrap();
        nodes.push(fuse.lookup(ROOT_ID, &name).expect("LOOKUP").nodeid);
    }
    for i in 0..600 {
        fs::write(share.join(format!("f{i}")), b"changed").unwrap();
    }
    // Requests are still answered promptly while notifications back up.
    let started = Instant::now();
    for _ in 0..100 {
        fuse.getattr(ROOT_ID)
            .expect("GETATTR while the notification queue is full");
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}
