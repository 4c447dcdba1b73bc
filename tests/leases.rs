//! Leases for stock guests through a real vhost-user socket (no notification queue): a host
//! writer waits until the guest's attribute lease has run out, the guest's own writes never
//! wait, a file that lost its name answers ESTALE once at OPEN, and cached pages are kept
//! across opens only while the file is unchanged.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{Device, FrontendConfig, FuseClient, ROOT_ID};

const FOPEN_KEEP_CACHE: u32 = 1 << 1;
const LEASE: Duration = Duration::from_millis(600);

fn start(lease: &str) -> (Backend, FuseClient) {
    let backend = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &[
            "--cache",
            "coherent",
            "--lease-timeout",
            lease,
            "--log-level",
            "debug",
        ],
    )
    .expect("starting leasefsd");
    let config = FrontendConfig {
        want_notification: false,
        ..FrontendConfig::default()
    };
    let device = Arc::new(
        Device::connect(backend.socket(), &config)
            .unwrap_or_else(|e| panic!("connecting: {e}\ndaemon log:\n{}", backend.log())),
    );
    let fuse = FuseClient::new(device);
    fuse.init().expect("INIT");
    (backend, fuse)
}

fn valid(secs: u64, nsec: u32) -> Duration {
    Duration::new(secs, nsec)
}

/// Open the host file for writing and write `data` at 0, as a host editor would; returns how
/// long the open took.
fn host_write(path: &std::path::Path, data: &[u8]) -> Duration {
    let start = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("host open");
    let waited = start.elapsed();
    f.write_all(data).expect("host write");
    waited
}

#[test]
fn host_writer_waits_for_the_guest_lease_and_the_guest_then_sees_the_write() {
    let (backend, fuse) = start("0.6");
    let path = backend.share().join("f");
    fs::write(&path, b"old contents").unwrap();

    let entry = fuse.lookup(ROOT_ID, "f").expect("LOOKUP");
    assert_eq!(
        valid(entry.attr_valid, entry.attr_valid_nsec),
        LEASE,
        "a regular file under a host lease gets the full attribute lease"
    );
    assert_eq!(valid(entry.entry_valid, entry.entry_valid_nsec), LEASE);
    let granted = Instant::now();

    let waited = host_write(&path, b"NEW CONTENTS, longer");
    let since_grant = granted.elapsed();
    assert!(
        since_grant >= LEASE,
        "the host writer got through {since_grant:?} after the grant, inside the guest's {LEASE:?} lease (it waited {waited:?})\n{}",
        backend.log()
    );
    assert!(
        waited < LEASE + Duration::from_secs(2),
        "the host writer was held {waited:?}, far past the lease"
    );

    // The writer still has the file open: no lease can be had, so no attribute time either.
    let mut writer = OpenOptions::new().append(true).open(&path).unwrap();
    let attr = fuse.getattr(entry.nodeid).expect("GETATTR");
    assert_eq!(attr.attr.size, 20, "the guest sees the host's write");
    assert_eq!(
        valid(attr.attr_valid, attr.attr_valid_nsec),
        Duration::ZERO,
        "while a host writer has the file open, the guest must revalidate every use"
    );
    writer.write_all(b"!").unwrap();
    drop(writer);
    let attr = fuse.getattr(entry.nodeid).expect("GETATTR");
    assert_eq!(attr.attr.size, 21);
    assert_eq!(
        valid(attr.attr_valid, attr.attr_valid_nsec),
        LEASE,
        "once the writer closed, the lease is taken again"
    );
}

#[test]
fn the_guests_own_writes_are_never_held() {
    let (backend, fuse) = start("5");
    fs::write(backend.share().join("g"), b"0123456789").unwrap();
    let entry = fuse.lookup(ROOT_ID, "g").expect("LOOKUP");
    assert_eq!(entry.attr_valid, 5);
    let start = Instant::now();
    let open = fuse
        .open(entry.nodeid, libc::O_RDWR)
        .expect("OPEN for write");
    fuse.write(entry.nodeid, open.fh, 0, b"abc").expect("WRITE");
    let truncated = fuse.truncate(entry.nodeid, 4).expect("SETATTR size");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the guest's own open for writing waited {:?} on its own lease",
        start.elapsed()
    );
    assert_eq!(truncated.attr.size, 4);
    assert_eq!(fs::read(backend.share().join("g")).unwrap(), b"abc3");
}

#[test]
fn open_of_a_replaced_or_renamed_file_answers_estale_once() {
    let (backend, fuse) = start("0.5");
    let share = backend.share().to_path_buf();
    fs::write(share.join("doc"), b"version 1").unwrap();
    fs::write(share.join("moved"), b"will move").unwrap();
    let doc = fuse.lookup(ROOT_ID, "doc").expect("LOOKUP doc");
    let moved = fuse.lookup(ROOT_ID, "moved").expect("LOOKUP moved");

    // An editor's save: write a new file, rename it over the old one.
    fs::write(share.join("doc.tmp"), b"version 2").unwrap();
    fs::rename(share.join("doc.tmp"), share.join("doc")).unwrap();
    fs::rename(share.join("moved"), share.join("elsewhere")).unwrap();

    for (node, what) in [(doc.nodeid, "replaced"), (moved.nodeid, "renamed")] {
        let e = fuse
            .open(node, libc::O_RDONLY)
            .expect_err("OPEN of a file that lost its name");
        assert_eq!(e.errno(), Some(libc::ESTALE), "{what}: {e:?}");
        // The guest's retry revalidates the name; if it cannot (an open through
        // /proc/self/fd), the second OPEN goes through.
        let again = fuse.open(node, libc::O_RDONLY);
        assert!(again.is_ok(), "{what}: second OPEN: {again:?}");
    }
    let fresh = fuse.lookup(ROOT_ID, "doc").expect("LOOKUP after the save");
    assert_ne!(
        fresh.nodeid, doc.nodeid,
        "the name now leads to the new file"
    );
    let open = fuse
        .open(fresh.nodeid, libc::O_RDONLY)
        .expect("OPEN new file");
    assert_eq!(
        fuse.read(fresh.nodeid, open.fh, 0, 64).unwrap(),
        b"version 2"
    );

    // A host chmod moves ctime without mtime, but the name still leads to the file: the
    // check is by identity, so no ESTALE.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(share.join("doc"), fs::Permissions::from_mode(0o600)).unwrap();
    fuse.open(fresh.nodeid, libc::O_RDONLY)
        .expect("OPEN after a host chmod");

    // A host data write moves mtime and ctime together: no ESTALE, the pages are dropped.
    host_write(&share.join("doc"), b"VERSION 3");
    let open = fuse
        .open(fresh.nodeid, libc::O_RDONLY)
        .expect("OPEN after a host write");
    assert_eq!(open.open_flags & FOPEN_KEEP_CACHE, 0);
}

#[test]
fn cached_pages_are_kept_across_opens_only_while_unchanged() {
    let (backend, fuse) = start("0.3");
    let path = backend.share().join("k");
    fs::write(&path, b"stable").unwrap();
    thread::sleep(Duration::from_millis(50)); // past the write's timestamp tick
    let entry = fuse.lookup(ROOT_ID, "k").expect("LOOKUP");
    fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    let first = fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_ne!(
        first.open_flags & FOPEN_KEEP_CACHE,
        0,
        "unchanged since the last open: keep the page cache"
    );
    host_write(&path, b"STABLE");
    thread::sleep(Duration::from_millis(50)); // past the write's timestamp tick
    let second = fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        second.open_flags & FOPEN_KEEP_CACHE,
        0,
        "the host changed the file since the guest's attributes: drop the pages"
    );
    // Once an open has dropped the pages, keeping the cache is safe again.
    let third = fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_ne!(third.open_flags & FOPEN_KEEP_CACHE, 0);
}

#[test]
fn without_leases_host_writers_never_wait() {
    let (backend, fuse) = start("0");
    let path = backend.share().join("n");
    fs::write(&path, b"x").unwrap();
    let entry = fuse.lookup(ROOT_ID, "n").expect("LOOKUP");
    assert_eq!(
        valid(entry.attr_valid, entry.attr_valid_nsec),
        Duration::ZERO
    );
    let writer = thread::spawn(move || host_write(&path, b"y"));
    let waited = writer.join().unwrap();
    assert!(
        waited < Duration::from_millis(300),
        "no lease, yet the host writer waited {waited:?}"
    );
}

#[test]
fn two_daemons_on_one_directory_hold_each_others_writers() {
    // VM A and VM B share one directory through two leasefsd instances.
    let (a, fuse_a) = start("0.6");
    let share = a.share().to_path_buf();
    // The helper passes its own --shared-dir first; a repeated flag's last value wins.
    let b = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &[
            "--cache",
            "coherent",
            "--lease-timeout",
            "0.6",
            "--shared-dir",
            share.to_str().unwrap(),
        ],
    )
    .expect("starting the second leasefsd");
    let device_b = Arc::new(
        Device::connect(
            b.socket(),
            &FrontendConfig {
                want_notification: false,
                ..FrontendConfig::default()
            },
        )
        .expect("connecting to the second daemon"),
    );
    let fuse_b = FuseClient::new(device_b);
    fuse_b.init().expect("INIT B");

    fs::write(share.join("shared"), b"written by nobody yet").unwrap();
    let in_a = fuse_a.lookup(ROOT_ID, "shared").expect("LOOKUP in A");
    assert_eq!(valid(in_a.attr_valid, in_a.attr_valid_nsec), LEASE);
    let granted = Instant::now();
    let open_a = fuse_a.open(in_a.nodeid, libc::O_RDONLY).expect("OPEN in A");

    // Guest B writes: its daemon's open for writing is a host writer to daemon A.
    let in_b = fuse_b.lookup(ROOT_ID, "shared").expect("LOOKUP in B");
    let open_b = fuse_b
        .with_timeout(Duration::from_secs(10))
        .open(in_b.nodeid, libc::O_RDWR)
        .expect("OPEN for writing in B");
    let through = granted.elapsed();
    fuse_b
        .write(in_b.nodeid, open_b.fh, 0, b"WRITTEN BY B")
        .expect("WRITE in B");
    assert!(
        through >= LEASE,
        "B's writer got through {through:?} after A's grant, inside A's {LEASE:?} lease\nA's log:\n{}",
        a.log()
    );
    assert!(
        a.log().contains("holding it"),
        "A held the writer:\n{}",
        a.log()
    );

    // Guest A, whose lease has run out, now sees B's bytes.
    let attr = fuse_a.getattr(in_a.nodeid).expect("GETATTR in A");
    assert_eq!(attr.attr.size, 21);
    assert_eq!(
        fuse_a.read(in_a.nodeid, open_a.fh, 0, 64).unwrap(),
        b"WRITTEN BY Bobody yet"
    );
}
