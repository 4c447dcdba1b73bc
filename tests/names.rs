//! A guest's names and pages against host changes, through a real vhost-user socket (stock
//! guest: no notification queue). FUSE's OPEN and SETATTR name only the inode, so a guest
//! holding a dentry the host made stale (renamed away, replaced, unlinked) must get ESTALE
//! before anything changes on the host, decided from the name's identity now, not from
//! timestamps; and a guest's cached pages may be kept across opens only while the host file is
//! unchanged, whatever the host did to its mtime.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{FrontendConfig, FuseClient, ROOT_ID};

const FOPEN_KEEP_CACHE: u32 = 1 << 1;
const FUSE_GETLK: u32 = 31;
const FUSE_SETLK: u32 = 32;

fn start(args: &[&str]) -> (Backend, FuseClient) {
    let mut all = vec!["--log-level", "debug"];
    all.extend_from_slice(args);
    let backend = Backend::spawn(env!("CARGO_BIN_EXE_leasefsd"), &all).expect("starting leasefsd");
    // A stock guest: no notification queue (the default).
    let fuse = backend.client(&FrontendConfig::default());
    (backend, fuse)
}

/// The default mode with a short lease, and virtiofsd's `auto` and `always`: the name check
/// holds in every mode (virtiofsd --cache auto truncates the renamed file here).
const MODES: [&[&str]; 3] = [
    &["--cache", "coherent", "--lease-timeout", "0.3"],
    &["--cache", "auto"],
    &["--cache", "always"],
];

fn assert_estale<T: std::fmt::Debug>(r: Result<T, leasefs::frontend::FuseError>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.errno(), Some(libc::ESTALE), "{what}: {e:?}"),
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected ESTALE"),
    }
}

#[test]
fn o_trunc_through_a_name_the_host_renamed_away_touches_nothing() {
    for mode in MODES {
        let (backend, fuse) = start(mode);
        let share = backend.share().to_path_buf();
        fs::write(share.join("a"), b"precious bytes").unwrap();
        let a = fuse.lookup(ROOT_ID, "a").expect("LOOKUP a");
        // The host moves the file away within the lease; the guest still holds the name.
        fs::rename(share.join("a"), share.join("a.bak")).unwrap();
        assert_estale(
            fuse.open(a.nodeid, libc::O_WRONLY | libc::O_TRUNC),
            &format!("{mode:?}: OPEN O_TRUNC through a stale name"),
        );
        assert_eq!(
            fs::read(share.join("a.bak")).unwrap(),
            b"precious bytes",
            "{mode:?}: the renamed file lost its bytes"
        );
        // The guest's retry looks the name up again: a is gone, so the shell creates it.
        assert_eq!(
            fuse.lookup(ROOT_ID, "a").unwrap_err().errno(),
            Some(libc::ENOENT)
        );
    }
}

#[test]
fn path_setattr_through_a_stale_name_changes_nothing() {
    for mode in MODES {
        let (backend, fuse) = start(mode);
        let share = backend.share().to_path_buf();
        fs::write(share.join("t"), b"0123456789").unwrap();
        fs::set_permissions(share.join("t"), fs::Permissions::from_mode(0o644)).unwrap();
        let t = fuse.lookup(ROOT_ID, "t").expect("LOOKUP t");
        fs::rename(share.join("t"), share.join("t.moved")).unwrap();
        assert_estale(fuse.truncate(t.nodeid, 0), &format!("{mode:?}: truncate"));
        let meta = fs::metadata(share.join("t.moved")).unwrap();
        assert_eq!(meta.len(), 10, "{mode:?}: truncated the renamed file");
        // Looked up under its new name, the file gets a node of its own (the old node still
        // carries the stale name). Move it away once more: neither node may chmod it.
        let moved = fuse.lookup(ROOT_ID, "t.moved").expect("LOOKUP t.moved");
        assert_ne!(moved.nodeid, t.nodeid);
        fs::rename(share.join("t.moved"), share.join("t.gone")).unwrap();
        assert_estale(fuse.chmod(moved.nodeid, 0o600), &format!("{mode:?}: chmod"));
        assert_estale(
            fuse.chmod(t.nodeid, 0o600),
            &format!("{mode:?}: chmod, old node"),
        );
        let meta = fs::metadata(share.join("t.gone")).unwrap();
        assert_eq!(
            meta.mode() & 0o777,
            0o644,
            "{mode:?}: chmod hit the renamed file"
        );
    }
}

#[test]
fn the_name_check_is_by_identity_not_by_timestamps() {
    let (backend, fuse) = start(MODES[0]);
    let share = backend.share().to_path_buf();

    // Renamed away, then written: ctime equals mtime again, which fooled a timestamp guess.
    fs::write(share.join("r"), b"original").unwrap();
    let r = fuse.lookup(ROOT_ID, "r").expect("LOOKUP r");
    fs::rename(share.join("r"), share.join("r.away")).unwrap();
    thread::sleep(Duration::from_millis(400)); // the held writer waits out the 0.3 s lease
    let mut f = OpenOptions::new()
        .append(true)
        .open(share.join("r.away"))
        .unwrap();
    f.write_all(b" plus").unwrap();
    drop(f);
    let meta = fs::metadata(share.join("r.away")).unwrap();
    assert_eq!(
        (meta.ctime(), meta.ctime_nsec()),
        (meta.mtime(), meta.mtime_nsec()),
        "the write should have made ctime equal mtime"
    );
    assert_estale(
        fuse.open(r.nodeid, libc::O_RDWR | libc::O_TRUNC),
        "OPEN after rename-away-then-write",
    );
    assert_eq!(fs::read(share.join("r.away")).unwrap(), b"original plus");

    // Replaced by a rename within the same timestamp tick as the guest's lookup.
    fs::write(share.join("s"), b"old").unwrap();
    fs::write(share.join("s.new"), b"new").unwrap();
    let s = fuse.lookup(ROOT_ID, "s").expect("LOOKUP s");
    fs::rename(share.join("s.new"), share.join("s")).unwrap();
    assert_estale(
        fuse.open(s.nodeid, libc::O_RDONLY),
        "OPEN of a replaced file",
    );

    // A host chmod or write leaves the name where it was: no ESTALE.
    fs::write(share.join("c"), b"c").unwrap();
    let c = fuse.lookup(ROOT_ID, "c").expect("LOOKUP c");
    fs::set_permissions(share.join("c"), fs::Permissions::from_mode(0o600)).unwrap();
    fuse.open(c.nodeid, libc::O_RDONLY)
        .expect("OPEN after a host chmod: the name still leads here");

    // The guest's own rename moves the name it holds: no ESTALE either.
    fuse.rename(ROOT_ID, "c", ROOT_ID, "c2")
        .expect("guest RENAME");
    fuse.open(c.nodeid, libc::O_RDONLY)
        .expect("OPEN after the guest's own rename");

    // Two names for one inode: the host removes one. An OPEN of the inode gets ESTALE (it
    // may have come through the removed name); the retry's LOOKUP of the name that still
    // leads here gives a node that goes through.
    fs::write(share.join("h1"), b"linked").unwrap();
    fs::hard_link(share.join("h1"), share.join("h2")).unwrap();
    let h1 = fuse.lookup(ROOT_ID, "h1").expect("LOOKUP h1");
    let h2 = fuse.lookup(ROOT_ID, "h2").expect("LOOKUP h2");
    assert_eq!(h1.nodeid, h2.nodeid);
    fs::remove_file(share.join("h1")).unwrap();
    assert_estale(
        fuse.open(h2.nodeid, libc::O_WRONLY),
        "OPEN for writing after one link went",
    );
    let retry = fuse
        .lookup(ROOT_ID, "h2")
        .expect("the guest's retry: LOOKUP h2");
    fuse.open(retry.nodeid, libc::O_WRONLY)
        .expect("OPEN through the remaining name");
}

/// Host: rewrite `path` with `data` (same size), then set its mtime back to `mtime` as
/// rsync -t, cp -p and touch -r do.
fn rewrite_restoring_mtime(path: &Path, data: &[u8]) {
    let before = fs::metadata(path).unwrap();
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(data).unwrap();
    let times = [
        libc::timespec {
            tv_sec: before.atime(),
            tv_nsec: before.atime_nsec(),
        },
        libc::timespec {
            tv_sec: before.mtime(),
            tv_nsec: before.mtime_nsec(),
        },
    ];
    use std::os::fd::AsRawFd;
    // SAFETY: two valid timespecs, our own descriptor.
    assert_eq!(unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) }, 0);
    let after = fs::metadata(path).unwrap();
    assert_eq!(
        (after.mtime(), after.mtime_nsec(), after.len()),
        (before.mtime(), before.mtime_nsec(), before.len())
    );
}

#[test]
fn a_rewrite_that_restores_mtime_drops_the_cached_pages_at_the_next_open() {
    let (backend, fuse) = start(MODES[0]);
    let path = backend.share().join("k");
    fs::write(&path, b"stable").unwrap();
    thread::sleep(Duration::from_millis(50)); // past one timestamp tick
    let k = fuse.lookup(ROOT_ID, "k").expect("LOOKUP");
    let first = fuse.open(k.nodeid, libc::O_RDONLY).expect("OPEN");
    fuse.read(k.nodeid, first.fh, 0, 64).unwrap();
    let second = fuse.open(k.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_ne!(
        second.open_flags & FOPEN_KEEP_CACHE,
        0,
        "unchanged since the last open: keep the page cache"
    );
    rewrite_restoring_mtime(&path, b"STABLE");
    // Past the change's timestamp tick, so that the open below can vouch for what it sees.
    thread::sleep(Duration::from_millis(50));
    let third = fuse.open(k.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        third.open_flags & FOPEN_KEEP_CACHE,
        0,
        "a same-size rewrite with mtime set back: the pages must go"
    );
    assert_eq!(fuse.read(k.nodeid, third.fh, 0, 64).unwrap(), b"STABLE");
    // Validated by that open: kept again while nothing changes.
    let fourth = fuse.open(k.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_ne!(fourth.open_flags & FOPEN_KEEP_CACHE, 0);

    // A host chmod then a mtime-restoring rewrite while the guest is not looking: still
    // dropped (ctime moved; a later getattr does not make the old pages right).
    rewrite_restoring_mtime(&path, b"stable");
    fuse.getattr(k.nodeid).expect("GETATTR");
    let fifth = fuse.open(k.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        fifth.open_flags & FOPEN_KEEP_CACHE,
        0,
        "attributes fetched in between must not vouch for pages read before the change"
    );
}

#[test]
fn the_guests_own_writes_keep_its_pages_across_opens() {
    let (backend, fuse) = start(MODES[0]);
    let path = backend.share().join("own");
    fs::write(&path, b"0000").unwrap();
    thread::sleep(Duration::from_millis(50));
    let e = fuse.lookup(ROOT_ID, "own").expect("LOOKUP");
    let rd = fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    fuse.read(e.nodeid, rd.fh, 0, 4).unwrap();
    let w = fuse
        .open(e.nodeid, libc::O_WRONLY)
        .expect("OPEN for writing");
    fuse.write(e.nodeid, w.fh, 0, b"1111").unwrap();
    // Past the write's timestamp tick: a host change after the close would show in ctime.
    thread::sleep(Duration::from_millis(50));
    fuse.release(e.nodeid, w.fh, libc::O_WRONLY).unwrap();
    let again = fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_ne!(
        again.open_flags & FOPEN_KEEP_CACHE,
        0,
        "only the guest wrote: its pages are right"
    );
    // Closed within the tick of its last write: a host change right after could carry the
    // same ctime, so the next open drops the pages.
    let w = fuse
        .open(e.nodeid, libc::O_WRONLY)
        .expect("OPEN for writing");
    fuse.write(e.nodeid, w.fh, 0, b"2222").unwrap();
    fuse.release(e.nodeid, w.fh, libc::O_WRONLY).unwrap();
    let after_quick_close = fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(after_quick_close.open_flags & FOPEN_KEEP_CACHE, 0);
}

/// A `fuse_lk_in` for GETLK/SETLK on handle `fh`.
fn lk_in(fh: u64, owner: u64, lock_type: i32) -> Vec<u8> {
    let mut b = Vec::with_capacity(48);
    b.extend_from_slice(&fh.to_le_bytes());
    b.extend_from_slice(&owner.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // start
    b.extend_from_slice(&u64::MAX.to_le_bytes()); // end: to the end of the file
    b.extend_from_slice(&(lock_type as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // pid
    b.extend_from_slice(&0u32.to_le_bytes()); // lk_flags
    b.extend_from_slice(&0u32.to_le_bytes()); // padding
    b
}

#[test]
fn posix_locks_on_a_leased_read_only_file_work() {
    // SQLite's read-only readers: stat, open O_RDONLY, F_GETLK / F_SETLK F_RDLCK.
    let (backend, fuse) = start(MODES[0]);
    let path = backend.share().join("db");
    fs::write(&path, b"SQLite format 3\0").unwrap();
    let e = fuse.lookup(ROOT_ID, "db").expect("LOOKUP");
    fuse.getattr(e.nodeid)
        .expect("GETATTR: the daemon takes its host lease");
    let h = fuse.open(e.nodeid, libc::O_RDONLY).expect("OPEN");
    let started = Instant::now();
    fuse.call(FUSE_GETLK, e.nodeid, &[&lk_in(h.fh, 7, libc::F_RDLCK)], 24)
        .expect("GETLK on a leased file");
    fuse.call(FUSE_SETLK, e.nodeid, &[&lk_in(h.fh, 7, libc::F_RDLCK)], 0)
        .expect("SETLK F_RDLCK on a leased file");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "the lock waited {:?}: it broke the daemon's own lease",
        started.elapsed()
    );
    fuse.call(FUSE_SETLK, e.nodeid, &[&lk_in(h.fh, 7, libc::F_UNLCK)], 0)
        .expect("unlock");
}

#[test]
fn create_of_an_existing_leased_name_does_not_wait_for_the_daemons_own_lease() {
    let (backend, fuse) = start(&["--cache", "coherent", "--lease-timeout", "2"]);
    let path = backend.share().join("exists");
    fs::write(&path, b"old contents").unwrap();
    let e = fuse.lookup(ROOT_ID, "exists").expect("LOOKUP");
    fuse.getattr(e.nodeid).expect("GETATTR");
    let started = Instant::now();
    let created = fuse
        .create(ROOT_ID, "exists", libc::O_WRONLY | libc::O_TRUNC, 0o644)
        .expect("CREATE of an existing name");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "CREATE waited {:?} for the daemon's own lease",
        started.elapsed()
    );
    assert_eq!(created.0.nodeid, e.nodeid);
    assert_eq!(fs::read(&path).unwrap(), b"");
}

#[test]
fn a_guest_open_for_writing_does_not_let_a_held_host_writer_through_early() {
    let lease = Duration::from_millis(800);
    let (backend, fuse) = start(&["--cache", "coherent", "--lease-timeout", "0.8"]);
    let path = backend.share().join("held");
    fs::write(&path, b"v1").unwrap();
    let e = fuse.lookup(ROOT_ID, "held").expect("LOOKUP");
    let granted = Instant::now();
    let host_path = path.clone();
    let writer = thread::spawn(move || {
        let start = Instant::now();
        let f = OpenOptions::new().write(true).open(&host_path).unwrap();
        (start.elapsed(), f)
    });
    thread::sleep(Duration::from_millis(150)); // the host writer is held now
    let w = fuse
        .open(e.nodeid, libc::O_WRONLY)
        .expect("guest OPEN for writing");
    let (_waited, _f) = writer.join().unwrap();
    let released_after = granted.elapsed();
    assert!(
        released_after >= lease,
        "the host writer went on {released_after:?} after the grant, before the guest's {lease:?} lease ended"
    );
    fuse.release(e.nodeid, w.fh, libc::O_WRONLY).unwrap();
}

type DirOp = fn(&FuseClient, u64, u64) -> Result<(), leasefs::frontend::FuseError>;

#[test]
fn nothing_is_created_linked_or_removed_through_a_directory_name_the_host_moved() {
    // Each op through its own stale name: an ESTALE makes the daemon forget that name (the
    // guest's retry walks the path again), so a second op on it would be a different test.
    let ops: [(&str, DirOp); 6] = [
        ("CREATE", |fuse, d, _| {
            fuse.create(d, "new", libc::O_WRONLY, 0o644).map(drop)
        }),
        ("MKDIR", |fuse, d, _| fuse.mkdir(d, "sub", 0o755).map(drop)),
        ("UNLINK", |fuse, d, _| fuse.unlink(d, "keep")),
        ("RENAME within", |fuse, d, _| {
            fuse.rename(d, "keep", d, "renamed")
        }),
        ("LINK into", |fuse, d, f| {
            fuse.link(f, d, "f.link").map(drop)
        }),
        ("OPENDIR", |fuse, d, _| fuse.opendir(d).map(drop)),
    ];
    for mode in MODES {
        let (backend, fuse) = start(mode);
        let share = backend.share().to_path_buf();
        fs::write(share.join("f"), b"f").unwrap();
        let f = fuse.lookup(ROOT_ID, "f").expect("LOOKUP f");
        for (i, (what, op)) in ops.iter().enumerate() {
            let (name, moved) = (format!("d{i}"), format!("d{i}.moved"));
            fs::create_dir(share.join(&name)).unwrap();
            fs::write(share.join(&name).join("keep"), b"keep me").unwrap();
            let d = fuse.lookup(ROOT_ID, &name).expect("LOOKUP d");
            fs::rename(share.join(&name), share.join(&moved)).unwrap();
            assert_estale(
                op(&fuse, d.nodeid, f.nodeid),
                &format!("{mode:?}: {what} through a moved directory's old name"),
            );
            let left: Vec<_> = fs::read_dir(share.join(&moved))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            assert_eq!(
                left,
                ["keep"],
                "{mode:?}: {what} changed the moved directory"
            );
        }
        // LINK through a stale source name.
        fs::rename(share.join("f"), share.join("f.moved")).unwrap();
        assert_estale(
            fuse.link(f.nodeid, ROOT_ID, "f.link"),
            &format!("{mode:?}: LINK of a moved file"),
        );
        assert!(!share.join("f.link").exists());
    }
}

#[test]
fn setxattr_through_a_stale_name_changes_nothing() {
    const FUSE_SETXATTR: u32 = 21;
    let (backend, fuse) = start(&["--cache", "coherent", "--xattr"]);
    let share = backend.share().to_path_buf();
    fs::write(share.join("x"), b"x").unwrap();
    let x = fuse.lookup(ROOT_ID, "x").expect("LOOKUP x");
    fs::rename(share.join("x"), share.join("x.moved")).unwrap();
    let value = b"v";
    let mut arg = Vec::new();
    arg.extend_from_slice(&(value.len() as u32).to_le_bytes());
    arg.extend_from_slice(&0u32.to_le_bytes());
    assert_estale(
        fuse.call(
            FUSE_SETXATTR,
            x.nodeid,
            &[&arg, b"user.leasefs\0", value],
            0,
        ),
        "SETXATTR through a stale name",
    );
    let path = std::ffi::CString::new(share.join("x.moved").to_str().unwrap()).unwrap();
    let mut buf = [0u8; 16];
    // SAFETY: valid C strings and buffer.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.leasefs".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n < 0, "the moved file got the attribute");
}

#[test]
fn a_save_over_a_name_whose_temp_file_the_guest_cached_opens_at_the_first_retry() {
    // An editor on the host writes `doc.tmp` and renames it over `doc`; the guest had cached
    // both names (a listing with READDIRPLUS does that). Its open of `doc` reaches the old
    // inode (ESTALE); its retry looks `doc` up again. The new inode's node still carries the
    // stale `doc.tmp`, so the lookup answers with a new node id for it: the open goes through
    // at once (the kernel retries only once), and the stale `doc.tmp` keeps answering ESTALE.
    let (backend, fuse) = start(MODES[0]);
    let share = backend.share().to_path_buf();
    fs::write(share.join("doc"), b"old").unwrap();
    fs::write(share.join("doc.tmp"), b"new").unwrap();
    let doc = fuse.lookup(ROOT_ID, "doc").expect("LOOKUP doc");
    let tmp = fuse.lookup(ROOT_ID, "doc.tmp").expect("LOOKUP doc.tmp");
    fs::rename(share.join("doc.tmp"), share.join("doc")).unwrap();
    assert_estale(
        fuse.open(doc.nodeid, libc::O_RDONLY),
        "OPEN of the replaced inode",
    );
    let fresh = fuse.lookup(ROOT_ID, "doc").expect("the retry's LOOKUP");
    assert_ne!(fresh.nodeid, doc.nodeid);
    assert_ne!(
        fresh.nodeid, tmp.nodeid,
        "a node of its own for the new name"
    );
    let h = fuse
        .open(fresh.nodeid, libc::O_WRONLY | libc::O_APPEND)
        .expect("the retry's OPEN goes through");
    fuse.write(fresh.nodeid, h.fh, 0, b"+").unwrap();
    assert_eq!(fs::read(share.join("doc")).unwrap(), b"new+");
    // The guest's stale doc.tmp still leads to the old node: never to the file.
    assert_estale(
        fuse.open(tmp.nodeid, libc::O_WRONLY | libc::O_TRUNC),
        "OPEN through the stale doc.tmp",
    );
    assert_eq!(fs::read(share.join("doc")).unwrap(), b"new+");
}

#[test]
fn an_old_name_stays_checked_after_the_file_was_opened_under_its_new_name() {
    // Found by the randomized model test: the guest cached f09 (file X) and f13 (file Y); the
    // host renamed f09 over f13. The guest opens f13: ESTALE (Y), its retry finds X under f13
    // and opens it. Then the guest opens f09, which it still caches: that must not reach X.
    let (backend, fuse) = start(MODES[0]);
    let share = backend.share().to_path_buf();
    fs::write(share.join("f09"), b"x").unwrap();
    fs::write(share.join("f13"), b"y").unwrap();
    let f09 = fuse.lookup(ROOT_ID, "f09").expect("LOOKUP f09");
    let f13 = fuse.lookup(ROOT_ID, "f13").expect("LOOKUP f13");
    fs::rename(share.join("f09"), share.join("f13")).unwrap();
    assert_estale(
        fuse.open(f13.nodeid, libc::O_RDONLY),
        "OPEN of the replaced f13",
    );
    let fresh = fuse.lookup(ROOT_ID, "f13").expect("the retry's LOOKUP");
    fuse.open(fresh.nodeid, libc::O_RDONLY)
        .expect("the retry's OPEN");
    assert_estale(
        fuse.open(f09.nodeid, libc::O_WRONLY | libc::O_TRUNC),
        "OPEN through the old name f09",
    );
    assert_eq!(
        fs::read(share.join("f13")).unwrap(),
        b"x",
        "nothing truncated"
    );
    assert_eq!(
        fuse.lookup(ROOT_ID, "f09").unwrap_err().errno(),
        Some(libc::ENOENT)
    );
}

#[test]
fn a_stale_name_stays_checked_after_an_estale_through_another_name() {
    // Found by the randomized model test: one file under several names the guest caches; the
    // host removes one. The guest opens the file through a name that still leads there: ESTALE
    // (FUSE does not say which name), its retry looks that name up again and goes through.
    // The removed name's dentry still leads to the first node: opening through it must not
    // reach the file, however the ESTALE before was spent. In every cache mode, and also while
    // the guest has the file open (its retry must not get a second ESTALE then).
    for mode in MODES {
        for keep_open in [false, true] {
            let (backend, fuse) = start(mode);
            let share = backend.share().to_path_buf();
            let what = format!("{mode:?}, file open in the guest: {keep_open}");
            fs::write(share.join("h1"), b"linked").unwrap();
            fs::hard_link(share.join("h1"), share.join("h2")).unwrap();
            let h1 = fuse.lookup(ROOT_ID, "h1").expect("LOOKUP h1");
            let h2 = fuse.lookup(ROOT_ID, "h2").expect("LOOKUP h2");
            let _held = keep_open.then(|| fuse.open(h1.nodeid, libc::O_RDONLY).expect("OPEN h1"));
            fs::remove_file(share.join("h1")).unwrap();
            assert_estale(
                fuse.open(h2.nodeid, libc::O_RDONLY),
                &format!("{what}: OPEN through h2 after h1 went"),
            );
            let fresh = fuse.lookup(ROOT_ID, "h2").expect("the retry's LOOKUP h2");
            fuse.open(fresh.nodeid, libc::O_WRONLY | libc::O_APPEND)
                .unwrap_or_else(|e| panic!("{what}: the retry's OPEN of h2: {e:?}"));
            assert_estale(
                fuse.open(h1.nodeid, libc::O_WRONLY | libc::O_TRUNC),
                &format!("{what}: OPEN through the removed h1, after the ESTALE went to h2"),
            );
            assert_eq!(fs::read(share.join("h2")).unwrap(), b"linked", "{what}");
            fs::write(share.join("h1"), b"new h1").unwrap();
            let again = fuse.lookup(ROOT_ID, "h1").expect("LOOKUP of the new h1");
            assert_ne!(again.nodeid, h1.nodeid, "{what}");
            fuse.open(again.nodeid, libc::O_RDONLY)
                .unwrap_or_else(|e| panic!("{what}: OPEN of the new h1: {e:?}"));
        }
    }
}

#[test]
fn every_name_of_a_file_with_many_links_stays_checked() {
    // Past the bound on names remembered per node, a file's further names get a node of their
    // own instead of pushing an older name out unchecked.
    let (backend, fuse) = start(MODES[0]);
    let share = backend.share().to_path_buf();
    fs::write(share.join("l0"), b"many").unwrap();
    for i in 1..7 {
        fs::hard_link(share.join("l0"), share.join(format!("l{i}"))).unwrap();
    }
    let nodes: Vec<u64> = (0..7)
        .map(|i| {
            fuse.lookup(ROOT_ID, format!("l{i}"))
                .expect("LOOKUP")
                .nodeid
        })
        .collect();
    fs::remove_file(share.join("l0")).unwrap();
    fs::write(share.join("l0"), b"other").unwrap();
    assert_estale(
        fuse.open(nodes[0], libc::O_WRONLY | libc::O_TRUNC),
        "OPEN through the first of seven names after the host replaced it",
    );
    assert_eq!(fs::read(share.join("l6")).unwrap(), b"many");
    // The last names never shared a node with l0: no ESTALE for them.
    fuse.open(nodes[6], libc::O_RDONLY)
        .expect("OPEN through l6, on a node of its own");
}

#[test]
fn a_guest_write_through_one_alias_waits_for_the_others_cache() {
    // Two nodes for one file (an alias: the guest cached `a`, the host renamed it to `b`, the
    // guest looked `b` up). The guest caches each node's pages apart, like two clients, and a
    // descriptor it keeps open on the old node reads from that node's cache. A truncation
    // through the new node must therefore wait, like a host writer, until the old node's
    // attributes have run out (found by the randomized model test: a descriptor kept open read
    // the bytes the guest had just truncated away).
    // Every way the guest changes a file through the new node: truncating opens (O_RDONLY|
    // O_TRUNC too, which the kernel lets past read leases, host_events.rs), a plain write-open,
    // a SETATTR of the size without a handle, and a CREATE of the existing name with O_TRUNC
    // (a guest that had not cached `b` sends CREATE, not OPEN).
    #[derive(Debug, Clone, Copy)]
    enum Change {
        Open(i32),
        Truncate,
        CreateTrunc,
    }
    for change in [
        Change::Open(libc::O_WRONLY | libc::O_TRUNC),
        Change::Open(libc::O_RDONLY | libc::O_TRUNC),
        Change::Open(libc::O_RDWR),
        Change::Truncate,
        Change::CreateTrunc,
    ] {
        let lease = Duration::from_millis(800);
        let (backend, fuse) = start(&["--cache", "coherent", "--lease-timeout", "0.8"]);
        let share = backend.share().to_path_buf();
        fs::write(share.join("a"), b"cached under a").unwrap();
        let a = fuse.lookup(ROOT_ID, "a").expect("LOOKUP a");
        let granted = Instant::now();
        let kept = fuse.open(a.nodeid, libc::O_RDONLY).expect("OPEN a");
        fs::rename(share.join("a"), share.join("b")).unwrap();
        let b = fuse.lookup(ROOT_ID, "b").expect("LOOKUP b");
        assert_ne!(b.nodeid, a.nodeid, "an alias for the new name");
        let release = match change {
            Change::Open(flags) => {
                let w = fuse.open(b.nodeid, flags).expect("guest OPEN through b");
                Some((b.nodeid, w.fh, flags))
            }
            Change::Truncate => {
                fuse.truncate(b.nodeid, 0)
                    .expect("guest SETATTR size through b");
                None
            }
            Change::CreateTrunc => {
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
                let (e, o) = fuse
                    .create(ROOT_ID, "b", flags, 0o644)
                    .expect("guest CREATE b");
                Some((e.nodeid, o.fh, flags))
            }
        };
        let changed_after = granted.elapsed();
        assert!(
            changed_after >= lease,
            "{change:?}: the change went on {changed_after:?} after the old node's grant, before its {lease:?} lease ended"
        );
        if !matches!(change, Change::Open(libc::O_RDWR)) {
            assert_eq!(
                fs::metadata(share.join("b")).unwrap().len(),
                0,
                "{change:?}"
            );
        }
        if let Some((node, fh, flags)) = release {
            fuse.release(node, fh, flags).unwrap();
        }
        fuse.release(a.nodeid, kept.fh, libc::O_RDONLY).unwrap();
    }
}

#[test]
fn the_guests_own_renames_and_unlinks_never_make_its_other_names_stale() {
    // The guest moves or drops a dentry itself with RENAME and UNLINK: the node whose dentry
    // it was must follow, whichever node of the file that is (an older alias too), or the next
    // OPEN through another name of the file would get ESTALE for a name the guest itself
    // changed. Three ways: a rename through an older alias, an unlink of one hard link, and a
    // rename over a file whose other link the guest holds.
    for mode in MODES {
        let (backend, fuse) = start(mode);
        let share = backend.share().to_path_buf();

        // 1. Five links: the fifth name gets an alias, so the first four sit on an older node.
        fs::write(share.join("n1"), b"linked").unwrap();
        for i in 2..=5 {
            fs::hard_link(share.join("n1"), share.join(format!("n{i}"))).unwrap();
        }
        let older = fuse.lookup(ROOT_ID, "n1").unwrap().nodeid;
        for i in 2..=4 {
            assert_eq!(fuse.lookup(ROOT_ID, format!("n{i}")).unwrap().nodeid, older);
        }
        let newer = fuse.lookup(ROOT_ID, "n5").unwrap().nodeid;
        assert_ne!(newer, older, "a fifth name gets an alias");
        fuse.rename(ROOT_ID, "n1", ROOT_ID, "m1")
            .expect("guest RENAME n1 -> m1");
        let h = fuse.open(older, libc::O_RDONLY).unwrap_or_else(|e| {
            panic!("{mode:?}: OPEN through m1 after the guest's rename: {e:?}")
        });
        fuse.release(older, h.fh, libc::O_RDONLY).unwrap();

        // 2. Unlinking one of two links.
        fs::write(share.join("a"), b"two links").unwrap();
        fs::hard_link(share.join("a"), share.join("b")).unwrap();
        let node = fuse.lookup(ROOT_ID, "a").unwrap().nodeid;
        assert_eq!(fuse.lookup(ROOT_ID, "b").unwrap().nodeid, node);
        fuse.unlink(ROOT_ID, "a").expect("guest UNLINK a");
        let h = fuse.open(node, libc::O_RDONLY).unwrap_or_else(|e| {
            panic!("{mode:?}: OPEN through b after the guest unlinked a: {e:?}")
        });
        fuse.release(node, h.fh, libc::O_RDONLY).unwrap();

        // 3. A rename over x, whose other link x2 the guest holds.
        fs::write(share.join("x"), b"replaced name").unwrap();
        fs::hard_link(share.join("x"), share.join("x2")).unwrap();
        fs::write(share.join("y"), b"mover").unwrap();
        let x = fuse.lookup(ROOT_ID, "x").unwrap().nodeid;
        assert_eq!(fuse.lookup(ROOT_ID, "x2").unwrap().nodeid, x);
        fuse.lookup(ROOT_ID, "y").unwrap();
        fuse.rename(ROOT_ID, "y", ROOT_ID, "x")
            .expect("guest RENAME y -> x");
        let h = fuse
            .open(x, libc::O_RDONLY)
            .unwrap_or_else(|e| panic!("{mode:?}: OPEN through x2 after a rename over x: {e:?}"));
        fuse.release(x, h.fh, libc::O_RDONLY).unwrap();
    }
}
