//! The notification queue through a real vhost-user socket: a frontend that negotiates
//! VIRTIO_FS_F_NOTIFICATION caches a file, a host process writes it, and the daemon revokes
//! the guest's cache with INVAL_INODE; the guest's own writes revoke nothing. The queue is
//! served like a request queue (EVENT_IDX, bursts far past the 64 buffers a Linux guest
//! posts), survives a paused VM with nothing lost, and is let go when the guest reboots into
//! a kernel without the feature.

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{Device, FrontendConfig, FuseClient, Notice, ROOT_ID};

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

/// WRITE `data` at 0 through handle `fh` of `node` as the guest, and check that no
/// INVAL_INODE follows within 300 ms: the guest's own write leaves its cache right.
fn own_write_revokes_nothing(
    device: &Device,
    fuse: &FuseClient,
    backend: &Backend,
    node: u64,
    fh: u64,
    data: &[u8],
) {
    fuse.write(node, fh, 0, data).expect("WRITE");
    let own = inval_inodes(device, backend, Duration::from_millis(300));
    assert!(
        own.is_empty(),
        "own write revoked {own:?}\ndaemon log:\n{}",
        backend.log()
    );
}

/// A coherent leasefsd logging at debug level, with `name` holding `contents` on its share.
fn with_host_file(name: &str, contents: &[u8]) -> (Backend, std::path::PathBuf) {
    let backend = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &["--cache", "coherent", "--log-level", "debug"],
    )
    .expect("starting leasefsd");
    let host_file = backend.share().join(name);
    fs::write(&host_file, contents).unwrap();
    (backend, host_file)
}

#[test]
fn host_write_revokes_the_guest_cache_and_own_writes_do_not() {
    let (backend, host_file) = with_host_file("cached.txt", b"version one");
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
    own_write_revokes_nothing(&device, &fuse, &backend, entry.nodeid, open.fh, b"VERSION");

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

/// The notifier's counters, from the line the daemon logs on SIGUSR1 (`--cache coherent`).
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    sent: u64,
    dropped: u64,
    queued: u64,
}

fn counters(backend: &Backend) -> Counters {
    let line = backend.counters_line("notifications: ");
    let words: Vec<&str> = line
        .split([' ', ',', ';', '(', ')'])
        .filter(|w| !w.is_empty())
        .collect();
    let number = |word: &str| {
        words
            .windows(2)
            .find(|w| w[1] == word && w[0].parse::<u64>().is_ok())
            .map(|w| w[0].parse().unwrap())
            .unwrap_or_else(|| panic!("no '{word}' in {line}"))
    };
    Counters {
        sent: number("sent"),
        dropped: number("dropped"),
        queued: number("queued"),
    }
}

/// Play the patched Linux driver's notification work item on its own thread: take what the
/// device wrote, confirm what asks for it, post the buffers again, kick only if the device
/// asked (EVENT_IDX); poll every `poll` when there was nothing. Returns every notice.
fn guest_driver(
    device: Arc<Device>,
    poll: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Notice>> {
    let fuse = FuseClient::new(device.clone());
    std::thread::spawn(move || {
        let mut all = Vec::new();
        loop {
            let stopping = stop.load(Ordering::SeqCst);
            let n = device
                .handle_notifications(|bytes| {
                    let notice = Notice::parse(bytes)
                        .unwrap_or_else(|| panic!("malformed notification {bytes:?}"));
                    if notice.unique != 0 {
                        fuse.confirm_notification(notice.unique, notice.node, 0)
                            .expect("NOTIFY_REPLY");
                    }
                    all.push(notice);
                })
                .expect("notification queue");
            if stopping && n == 0 {
                return all;
            }
            if n == 0 {
                std::thread::sleep(poll);
            }
        }
    })
}

fn start_notify(args: &[&str]) -> (Backend, Arc<Device>, FuseClient) {
    let backend = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &[&["--cache", "coherent"], args].concat(),
    )
    .expect("starting leasefsd");
    let (device, fuse) = connect(&backend, true);
    assert!(device.has_notification_queue());
    (backend, device, fuse)
}

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

#[test]
fn a_burst_of_10000_host_changes_reaches_an_event_idx_guest_with_64_buffers() {
    // Issue 10, case 6. A 30 s lease: only the notification queue can tell the guest in time.
    let (backend, device, fuse) = start_notify(&["--notify-lease-timeout", "30"]);
    assert_ne!(
        device.negotiated().features & VIRTIO_RING_F_EVENT_IDX,
        0,
        "EVENT_IDX negotiated, as QEMU and Linux do"
    );
    let files = 5000;
    let share = backend.share().join("burst");
    fs::create_dir(&share).unwrap();
    for i in 0..files {
        fs::write(share.join(format!("f{i}")), b"x").unwrap();
    }
    let dir = fuse.lookup(ROOT_ID, "burst").expect("LOOKUP burst").nodeid;
    let mut nodes = std::collections::HashMap::new();
    for i in 0..files {
        let name = format!("f{i}");
        let node = fuse.lookup(dir, &name).expect("LOOKUP").nodeid;
        nodes.insert(node, name);
    }
    std::thread::sleep(Duration::from_millis(100));
    device.notifications().unwrap();
    let before = counters(&backend);

    let stop = Arc::new(AtomicBool::new(false));
    let driver = guest_driver(device.clone(), Duration::from_millis(1), stop.clone());
    // 10,000 host changes at once: a chmod and an unlink of every cached name.
    let t = Instant::now();
    for i in 0..files {
        fs::set_permissions(
            share.join(format!("f{i}")),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    for i in 0..files {
        fs::remove_file(share.join(format!("f{i}"))).unwrap();
    }
    let burst = t.elapsed();
    // The guest checks 50 ms later, and again later: all must be gone long before the lease.
    // Wait until the daemon has sent at least one message per change and then sent nothing
    // more for 300 ms with nothing queued: the count alone can be reached while the watcher
    // is still working through the events (directory listings are revoked too), which on a
    // loaded host left the last few hundred name revocations unread.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = counters(&backend);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = counters(&backend);
        if now.sent != after.sent || now.queued != 0 {
            quiet_since = Instant::now();
        }
        after = now;
        if after.sent - before.sent >= 2 * files as u64
            && quiet_since.elapsed() >= Duration::from_millis(300)
        {
            break;
        }
    }
    let settled = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let notices = driver.join().unwrap();
    let mut attrs = std::collections::HashSet::new();
    let mut names = std::collections::HashSet::new();
    for n in &notices {
        match n.code {
            Notice::INVAL_INODE if n.offset == -1 && nodes.contains_key(&n.node) => {
                attrs.insert(n.node);
            }
            Notice::DELETE | Notice::INVAL_ENTRY if n.node == dir => {
                names.insert(n.name.clone());
            }
            _ => {}
        }
    }
    eprintln!(
        "{} host changes in {burst:?}; {} notices, counters {after:?} (before {before:?}), settled after {settled:?}",
        2 * files,
        notices.len()
    );
    assert_eq!(
        attrs.len(),
        files,
        "attribute revocations: {} of {files} cached files\ncounters {after:?}",
        attrs.len()
    );
    assert_eq!(
        names.len(),
        files,
        "name revocations: {} of {files} removed names\ncounters {after:?}",
        names.len()
    );
    assert_eq!(after.dropped, 0, "no message dropped: {after:?}");
    assert_eq!(after.queued, 0, "the backlog drained: {after:?}");
}

#[test]
fn revocations_sent_while_the_vm_is_paused_arrive_when_it_resumes() {
    // Issue 10, case 5: QEMU `stop` stops every ring (GET_VRING_BASE); `cont` starts them.
    let (backend, device, fuse) = start_notify(&["--notify-lease-timeout", "30"]);
    let files = 100;
    for i in 0..files {
        fs::write(backend.share().join(format!("p{i}")), b"x").unwrap();
    }
    let mut nodes = std::collections::HashMap::new();
    for i in 0..files {
        let name = format!("p{i}");
        nodes.insert(
            name.clone().into_bytes(),
            fuse.lookup(ROOT_ID, &name).unwrap().nodeid,
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    device.notifications().unwrap();

    device.pause().expect("stopping the rings");
    let queue = device.all_queues()[1].clone();
    let used_before = queue.used_idx().unwrap();
    for i in 0..files {
        fs::remove_file(backend.share().join(format!("p{i}"))).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let paused = counters(&backend);
    assert_eq!(
        queue.used_idx().unwrap(),
        used_before,
        "the daemon wrote into a stopped ring"
    );
    assert!(
        paused.queued > 0,
        "revocations wait while paused: {paused:?}"
    );

    device.resume().expect("starting the rings again");
    let resumed = Instant::now();
    let mut gone = std::collections::HashSet::new();
    while gone.len() < files && resumed.elapsed() < Duration::from_secs(5) {
        for bytes in device.notifications().unwrap() {
            let n = Notice::parse(&bytes).expect("well-formed");
            if matches!(n.code, Notice::DELETE | Notice::INVAL_ENTRY) && n.node == ROOT_ID {
                gone.insert(n.name);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let after = counters(&backend);
    eprintln!(
        "{} of {files} names revoked {:?} after resuming; paused {paused:?}, after {after:?}",
        gone.len(),
        resumed.elapsed()
    );
    assert_eq!(
        gone.len(),
        files,
        "revocations lost across the pause: {after:?}\n{}",
        backend.log()
    );
    assert_eq!(after.dropped, 0, "{after:?}");
    assert_eq!(after.queued, 0, "{after:?}");
    assert!(!backend.log().contains("not ready"), "{}", backend.log());
    // Requests still work after the restart.
    assert!(fuse.getattr(ROOT_ID).is_ok());
}

#[test]
fn a_guest_rebooted_without_the_feature_gets_nothing_on_queue_1() {
    // Issue 10, case 8: after a reboot into a kernel without VIRTIO_FS_F_NOTIFICATION,
    // virtqueue 1 is the first request queue; no notification may land in it.
    let (backend, device, fuse) =
        start_notify(&["--lease-timeout", "1", "--notify-lease-timeout", "7"]);
    let files = 300;
    for i in 0..files {
        fs::write(backend.share().join(format!("r{i}")), b"x").unwrap();
    }
    for i in 0..files {
        let entry = fuse.lookup(ROOT_ID, format!("r{i}")).unwrap();
        assert_eq!(entry.attr_valid, 7, "the notify lease before the reboot");
    }
    std::thread::sleep(Duration::from_millis(100));
    device.notifications().unwrap();

    let stock = FrontendConfig {
        want_notification: false,
        ..FrontendConfig::default()
    };
    let rebooted = Arc::new(device.reboot(&stock).expect("rebooting"));
    assert!(!rebooted.has_notification_queue());
    let fuse2 = FuseClient::new(rebooted.clone());
    fuse2.init().expect("INIT after the reboot");
    fs::write(backend.share().join("after"), b"y").unwrap();
    let entry = fuse2
        .lookup(ROOT_ID, "after")
        .expect("LOOKUP after the reboot");
    assert_eq!(
        entry.attr_valid, 1,
        "a guest without the notification queue gets the stock lease"
    );
    let before = counters(&backend);

    // Host changes to what the old kernel had cached, while the new one uses queue 1.
    let share = backend.share().to_path_buf();
    let host = std::thread::spawn(move || {
        for i in 0..files {
            fs::set_permissions(
                share.join(format!("r{i}")),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
            fs::remove_file(share.join(format!("r{i}"))).unwrap();
        }
    });
    let mut requests = 0;
    while !host.is_finished() || requests < 200 {
        fuse2
            .getattr(ROOT_ID)
            .unwrap_or_else(|e| panic!("request {requests} on queue 1 after the reboot: {e}"));
        requests += 1;
    }
    host.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..50 {
        fuse2.getattr(ROOT_ID).expect("GETATTR");
    }
    let after = counters(&backend);
    let queue1 = rebooted.request_queue(0);
    assert_eq!(queue1.index(), 1);
    assert_eq!(
        queue1.bogus_used(),
        0,
        "used entries that were no request of ours"
    );
    assert_eq!(
        after.sent, before.sent,
        "notifications written after the reboot: {before:?} -> {after:?}"
    );
}

const FUSE_NOTIFY_FSNOTIFY: i32 = 10;
/// FUSE_HAS_FSNOTIFY (INIT bit 44, in `flags2`): the guest raises fsnotify events.
const HAS_FSNOTIFY_FLAGS2: u32 = 1 << (44 - 32);
use libc::{
    IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_ISDIR, IN_MODIFY, IN_MOVED_FROM,
    IN_MOVED_TO,
};

/// FUSE_NOTIFY_FSNOTIFY messages as (node, mask, cookie, name), until `want` of them came or
/// `wait` ran out.
fn fsnotify_events(
    device: &Device,
    backend: &Backend,
    want: usize,
    wait: Duration,
) -> Vec<(u64, u32, u32, String)> {
    let deadline = Instant::now() + wait;
    let mut events = Vec::new();
    while events.len() < want && Instant::now() < deadline {
        for message in device.notifications().expect("draining notifications") {
            let code = i32::from_le_bytes(message[4..8].try_into().unwrap());
            if code != FUSE_NOTIFY_FSNOTIFY {
                continue;
            }
            let word = |at: usize| u32::from_le_bytes(message[at..at + 4].try_into().unwrap());
            let namelen = word(32) as usize;
            assert_eq!(
                message.len(),
                40 + if namelen > 0 { namelen + 1 } else { 0 },
                "daemon log:\n{}",
                backend.log()
            );
            events.push((
                u64::from_le_bytes(message[16..24].try_into().unwrap()),
                word(24),
                word(28),
                String::from_utf8_lossy(&message[40..40 + namelen]).into_owned(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    events
}

#[test]
fn host_changes_become_fsnotify_events_only_for_a_guest_that_offers_them() {
    for offered in [true, false] {
        let backend = Backend::spawn(env!("CARGO_BIN_EXE_leasefsd"), &["--cache", "coherent"])
            .expect("starting leasefsd");
        let config = FrontendConfig {
            want_notification: true,
            ..FrontendConfig::default()
        };
        let device = Arc::new(Device::connect(backend.socket(), &config).unwrap());
        let fuse = FuseClient::new(device.clone());
        let flags2 = if offered { HAS_FSNOTIFY_FLAGS2 } else { 0 };
        let init = fuse
            .init_ext(leasefs::frontend::client::INIT_FLAGS, flags2)
            .expect("INIT");
        assert_eq!(init.flags2 & HAS_FSNOTIFY_FLAGS2 != 0, offered, "{init:?}");

        let dir = backend.share().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("f"), b"one").unwrap();
        let d = fuse.lookup(ROOT_ID, "d").expect("LOOKUP d").nodeid;
        fuse.lookup(d, "f").expect("LOOKUP f");
        std::thread::sleep(Duration::from_millis(100));
        let _ = device.notifications();

        // One host change at a time, each with the events a local change raises.
        use std::os::unix::fs::PermissionsExt;
        type Step<'a> = (Box<dyn Fn() + 'a>, Vec<(u32, &'static str)>);
        let steps: Vec<Step> = vec![
            (
                Box::new(|| fs::write(dir.join("new"), b"x").unwrap()),
                vec![
                    (IN_CREATE, "new"),
                    (IN_MODIFY, "new"),
                    (IN_CLOSE_WRITE, "new"),
                ],
            ),
            (
                Box::new(|| {
                    fs::set_permissions(dir.join("f"), fs::Permissions::from_mode(0o600)).unwrap()
                }),
                vec![(IN_ATTRIB, "f")],
            ),
            (
                Box::new(|| fs::rename(dir.join("new"), dir.join("moved")).unwrap()),
                vec![(IN_MOVED_FROM, "new"), (IN_MOVED_TO, "moved")],
            ),
            (
                Box::new(|| fs::remove_file(dir.join("moved")).unwrap()),
                vec![(IN_DELETE, "moved")],
            ),
            (
                Box::new(|| fs::create_dir(dir.join("sub")).unwrap()),
                vec![(IN_CREATE | IN_ISDIR, "sub")],
            ),
            (
                Box::new(|| fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap()),
                vec![(IN_ATTRIB, "")],
            ),
        ];
        for (change, want) in steps {
            change();
            let wait = Duration::from_millis(if offered { 2000 } else { 300 });
            let got = fsnotify_events(&device, &backend, want.len(), wait);
            if !offered {
                assert!(got.is_empty(), "a guest without the flag got {got:?}");
                continue;
            }
            let got_short: Vec<(u32, &str)> =
                got.iter().map(|(_, m, _, n)| (*m, n.as_str())).collect();
            assert_eq!(got_short, want, "daemon log:\n{}", backend.log());
            assert!(got.iter().all(|(node, ..)| *node == d), "{got:?}");
            let cookies: Vec<u32> = got
                .iter()
                .filter(|(_, m, ..)| m & (IN_MOVED_FROM | IN_MOVED_TO) != 0)
                .map(|(_, _, c, _)| *c)
                .collect();
            assert!(
                cookies.iter().all(|&c| c != 0 && c == cookies[0]),
                "{got:?}"
            );
        }
        // Nothing doubled behind the last change.
        let late = fsnotify_events(&device, &backend, 1, Duration::from_millis(300));
        assert!(late.is_empty(), "{late:?}");
    }
}

#[test]
fn a_host_writer_of_a_file_the_guest_is_writing_waits_only_for_its_confirmation() {
    // A file the guest created is leased on its own handle (a host write lease); on the
    // notify stack a host writer then waits for the guest's confirmation, not the 10 s lease.
    let (backend, device, fuse) = start_notify(&["--log-level", "debug"]);
    let (entry, open) = fuse
        .create(
            ROOT_ID,
            "written",
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o644,
        )
        .expect("CREATE");
    assert!(
        entry.attr_valid >= 1,
        "a file only the guest has open is leased\n{}",
        backend.log()
    );
    // The guest's own write revokes nothing (a watcher that was told of it by descriptor
    // once broke the lease itself here, and held its own thread for the guest's answer).
    own_write_revokes_nothing(&device, &fuse, &backend, entry.nodeid, open.fh, b"guest");
    let stop = Arc::new(AtomicBool::new(false));
    let driver = guest_driver(device.clone(), Duration::from_millis(1), stop.clone());
    let started = Instant::now();
    fs::write(backend.share().join("written"), b"host").unwrap();
    let waited = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let notices = driver.join().unwrap();
    assert!(
        notices
            .iter()
            .any(|n| n.unique != 0 && n.node == entry.nodeid),
        "no INVAL_INODE awaiting confirmation for node {}: {notices:?}\n{}",
        entry.nodeid,
        backend.log()
    );
    assert!(
        waited < Duration::from_secs(2),
        "the host writer waited {waited:?}: longer than a confirmation takes"
    );
    fuse.release(entry.nodeid, open.fh, libc::O_WRONLY)
        .expect("RELEASE");
}

#[test]
fn a_host_writer_that_opened_before_the_guest_is_told_after_each_write() {
    // No lease can be had on a file a host process already has open for writing: its writes
    // reach a notify-capable guest through the watcher's FAN_MODIFY (by file handle).
    let (backend, host_file) = with_host_file("log.txt", b"first line\n");
    let mut writer = fs::OpenOptions::new()
        .append(true)
        .open(&host_file)
        .unwrap();
    let (device, fuse) = connect(&backend, true);
    let entry = fuse.lookup(ROOT_ID, "log.txt").expect("LOOKUP");
    let open = fuse.open(entry.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        fuse.read(entry.nodeid, open.fh, 0, 64).unwrap(),
        b"first line\n"
    );
    let quiet = inval_inodes(&device, &backend, Duration::from_millis(200));
    assert!(quiet.is_empty(), "revoked before any change: {quiet:?}");
    std::io::Write::write_all(&mut writer, b"second line\n").unwrap();
    // The file's own watch revokes its pages too (offset 0); the directory's watch, which
    // also hears a child's modification, revokes attributes only (offset -1).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|n: &Notice| n.node == entry.nodeid && n.offset >= 0)
    {
        assert!(
            Instant::now() < deadline,
            "no INVAL_INODE of node {}'s pages after a write through a descriptor opened before the guest's lookup: {seen:?}\ndaemon log:\n{}",
            entry.nodeid,
            backend.log()
        );
        for message in device.notifications().expect("draining notifications") {
            seen.extend(Notice::parse(&message).filter(|n| n.code == FUSE_NOTIFY_INVAL_INODE));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
