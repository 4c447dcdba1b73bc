//! Host events the kernel gives no lease break for, and watches that could not be placed,
//! through a real vhost-user socket: a host `open(O_RDONLY | O_TRUNC)` (the kernel calls no
//! break_lease there) and an inode whose fanotify mark failed (max_user_marks, EMFILE).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{Device, FrontendConfig, FuseClient, Notice, ROOT_ID};

const FOPEN_KEEP_CACHE: u32 = 1 << 1;

fn start(notify: bool, args: &[&str]) -> (Backend, Arc<Device>, FuseClient) {
    let backend = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &[&["--cache", "coherent", "--log-level", "debug"], args].concat(),
    )
    .expect("starting leasefsd");
    let config = FrontendConfig {
        want_notification: notify,
        ..FrontendConfig::default()
    };
    let device = Arc::new(
        Device::connect(backend.socket(), &config)
            .unwrap_or_else(|e| panic!("connecting: {e}\ndaemon log:\n{}", backend.log())),
    );
    assert_eq!(device.has_notification_queue(), notify);
    let fuse = FuseClient::new(device.clone());
    fuse.init().expect("INIT");
    (backend, device, fuse)
}

fn entry_lease(e: &fuse_backend_rs::abi::fuse_abi::EntryOut) -> Duration {
    Duration::new(e.entry_valid, e.entry_valid_nsec)
}

/// Look `name` up until the daemon grants it the notify lease (the notification queue and
/// the root's watch are set up shortly after the device starts).
fn lookup_until_long_lease(fuse: &FuseClient, name: &str, long: Duration) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = fuse.lookup(ROOT_ID, name).expect("LOOKUP");
        if entry_lease(&e) == long {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no notify lease for {name}: {:?}",
            entry_lease(&e)
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Host truncation through a read-only open: `open(path, O_RDONLY | O_TRUNC)`. Where the
/// daemon holds a file delegation (a stock guest on Linux 6.19 and later) the kernel cannot
/// wait in that path: it starts the break and fails the open with EAGAIN, and a retry goes
/// through once the delegation is given back. How long until the truncate happened.
fn host_read_only_truncate(path: &std::path::Path) -> Duration {
    let started = Instant::now();
    loop {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_TRUNC)
            .open(path)
        {
            Ok(f) => {
                drop(f);
                return started.elapsed();
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "host open(O_RDONLY | O_TRUNC) still refused after 5 s"
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("host open(O_RDONLY | O_TRUNC): {e}"),
        }
    }
}

#[test]
fn a_host_read_only_truncate_revokes_at_once_for_a_notify_guest() {
    let (backend, device, fuse) = start(
        true,
        &["--lease-timeout", "1", "--notify-lease-timeout", "10"],
    );
    let path = backend.share().join("log");
    fs::write(&path, b"cached contents").unwrap();
    fs::write(backend.share().join("control"), b"").unwrap();
    lookup_until_long_lease(&fuse, "control", Duration::from_secs(10));
    let e = fuse.lookup(ROOT_ID, "log").expect("LOOKUP");
    let h = fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        fuse.read(e.nodeid, h.fh, 0, 64).unwrap(),
        b"cached contents"
    );
    let _ = device.notifications();

    host_read_only_truncate(&path);
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    // No lease break: the truncate is seen after the fact, by FAN_MODIFY on the file.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        for bytes in device.notifications().expect("notifications") {
            seen.push(Notice::parse(&bytes).expect("a well-formed notice"));
        }
        if seen
            .iter()
            .any(|n| n.code == Notice::INVAL_INODE && n.node == e.nodeid)
        {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!(
        "no INVAL_INODE for the truncated file within 2 s: {seen:?}\ndaemon log:\n{}",
        backend.log()
    );
}

#[test]
fn a_host_read_only_truncate_is_a_stated_limit_for_a_stock_guest() {
    // docs/coherency.md, limits: the kernel breaks no lease for open(O_RDONLY | O_TRUNC), so
    // a stock guest is not waited for; it may use its cached size and pages until its lease
    // ends (1 s here), and its next OPEN drops the pages (ctime moved). On a host with
    // delegations (Linux 6.19 and later) the file's delegation breaks there: the truncate
    // waits for the guest's lease like any host writer.
    let delegating = leasefs::frontend::process::delegations_in_use(env!("CARGO_BIN_EXE_leasefsd"));
    let (backend, _device, fuse) = start(false, &["--lease-timeout", "1"]);
    let path = backend.share().join("log");
    fs::write(&path, b"cached contents").unwrap();
    thread::sleep(Duration::from_millis(50));
    let asked_at = std::time::Instant::now();
    let e = fuse.lookup(ROOT_ID, "log").expect("LOOKUP");
    assert_eq!(
        Duration::new(e.attr_valid, e.attr_valid_nsec),
        Duration::from_secs(1),
        "the daemon holds a host lease, so the guest caches for the lease"
    );
    fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    let waited = host_read_only_truncate(&path);
    if delegating {
        assert!(
            asked_at.elapsed() >= Duration::from_secs(1),
            "a host with delegations holds the truncate until the guest's lease ran out ({waited:?})"
        );
    } else {
        assert!(
            waited < Duration::from_millis(500),
            "the kernel does not break the lease here, so nothing holds the truncate ({waited:?}); if it now does, docs/coherency.md's limit can go"
        );
    }
    thread::sleep(Duration::from_millis(50));
    let reopened = fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        reopened.open_flags & FOPEN_KEEP_CACHE,
        0,
        "the next open drops the truncated file's pages"
    );
    assert_eq!(fuse.getattr(e.nodeid).unwrap().attr.size, 0);
}

/// Sets /proc/sys/fs/fanotify/max_user_marks for as long as it lives.
struct MarkLimit {
    old: String,
}

const MAX_USER_MARKS: &str = "/proc/sys/fs/fanotify/max_user_marks";

impl MarkLimit {
    fn set(limit: u64) -> MarkLimit {
        let old = fs::read_to_string(MAX_USER_MARKS)
            .unwrap_or_else(|e| panic!("{MAX_USER_MARKS}: {e} (this test needs root)"));
        fs::write(MAX_USER_MARKS, limit.to_string())
            .unwrap_or_else(|e| panic!("writing {MAX_USER_MARKS}: {e} (this test needs root)"));
        MarkLimit { old }
    }
}

impl Drop for MarkLimit {
    fn drop(&mut self) {
        let _ = fs::write(MAX_USER_MARKS, self.old.trim());
    }
}

#[test]
fn an_inode_whose_watch_failed_gets_the_short_lease() {
    let long = Duration::from_secs(7);
    let short = Duration::from_secs(1);
    let (backend, _device, fuse) = start(
        true,
        &["--lease-timeout", "1", "--notify-lease-timeout", "7"],
    );
    let share = backend.share().to_path_buf();
    fs::write(share.join("control"), b"").unwrap();
    fs::write(share.join("unwatched"), b"x").unwrap();
    fs::create_dir(share.join("dir")).unwrap();
    fs::write(share.join("dir").join("child"), b"y").unwrap();
    lookup_until_long_lease(&fuse, "control", long);

    let (file, dir) = {
        // No new fanotify mark can be placed while this lives (the limit is per user).
        let _limit = MarkLimit::set(0);
        (
            fuse.lookup(ROOT_ID, "unwatched").expect("LOOKUP"),
            fuse.lookup(ROOT_ID, "dir").expect("LOOKUP dir"),
        )
    };
    assert_eq!(entry_lease(&file), short, "a file without a mark");
    assert_eq!(Duration::new(file.attr_valid, file.attr_valid_nsec), short);
    assert_eq!(entry_lease(&dir), short, "a directory without a mark");
    // Its children's names are not watched either: short leases, even with marks possible
    // again for the children themselves.
    let child = fuse.lookup(dir.nodeid, "child").expect("LOOKUP child");
    assert_eq!(
        entry_lease(&child),
        short,
        "a name in an unwatched directory"
    );
    // Elsewhere, marks work again: the long lease.
    fs::write(share.join("later"), b"").unwrap();
    let later = fuse.lookup(ROOT_ID, "later").expect("LOOKUP later");
    assert_eq!(entry_lease(&later), long);
    assert!(
        backend.log().contains("cannot watch node"),
        "the failure is logged:\n{}",
        backend.log()
    );
}

#[test]
fn a_notify_guest_told_of_a_save_over_a_cached_temp_name_opens_at_the_first_retry() {
    let (backend, device, fuse) = start(
        true,
        &["--lease-timeout", "1", "--notify-lease-timeout", "10"],
    );
    let share = backend.share().to_path_buf();
    fs::write(share.join("control"), b"").unwrap();
    lookup_until_long_lease(&fuse, "control", Duration::from_secs(10));
    fs::write(share.join("doc"), b"old").unwrap();
    fs::write(share.join("doc.tmp"), b"new").unwrap();
    let doc = fuse.lookup(ROOT_ID, "doc").expect("LOOKUP doc");
    fuse.lookup(ROOT_ID, "doc.tmp").expect("LOOKUP doc.tmp");
    let _ = device.notifications();
    fs::rename(share.join("doc.tmp"), share.join("doc")).unwrap();
    // The guest hears that doc.tmp went (and drops that dentry).
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut told = false;
    while !told && Instant::now() < deadline {
        for bytes in device.notifications().expect("notifications") {
            let n = Notice::parse(&bytes).expect("a well-formed notice");
            told |= n.code != Notice::INVAL_INODE && n.name == b"doc.tmp";
        }
        thread::sleep(Duration::from_millis(5));
    }
    assert!(told, "no INVAL_ENTRY for doc.tmp");
    let e = fuse.open(doc.nodeid, libc::O_RDONLY).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ESTALE), "the old inode: {e:?}");
    let fresh = fuse.lookup(ROOT_ID, "doc").expect("the retry's LOOKUP");
    // The new name's node is an alias of the cached doc.tmp's file: opening it for writing
    // revokes what the guest caches under doc.tmp, and goes on once the guest confirms.
    let stop = Arc::new(AtomicBool::new(false));
    let confirmer = {
        let (device, stop) = (device.clone(), stop.clone());
        let fuse = FuseClient::new(device.clone());
        thread::spawn(move || {
            let mut confirmed = 0;
            while !stop.load(Ordering::SeqCst) {
                for bytes in device.notifications().expect("notifications") {
                    let n = Notice::parse(&bytes).expect("a well-formed notice");
                    if n.code == Notice::INVAL_INODE && n.unique != 0 {
                        fuse.confirm_notification(n.unique, n.node, 0).unwrap();
                        confirmed += 1;
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
            confirmed
        })
    };
    let started = Instant::now();
    fuse.open(fresh.nodeid, libc::O_WRONLY)
        .expect("the retry's OPEN: the guest was told doc.tmp is gone");
    let waited = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let confirmed = confirmer.join().unwrap();
    assert!(
        waited < Duration::from_secs(2),
        "the write-open waited {waited:?}: a confirmed revocation must end the hold"
    );
    assert!(
        confirmed >= 1,
        "no revocation of the doc.tmp alias was confirmed"
    );
}
