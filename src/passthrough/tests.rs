//! Tests drive the `FileSystem` trait directly against a fresh directory under the host's
//! temporary directory. They run as root (as the daemon does).

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, CreateIn, FsOptions, OpenOptions, SetattrValid};
use fuse_backend_rs::api::filesystem::{
    Context, Entry, FileLock, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::file_buf::FileVolatileSlice;
use fuse_backend_rs::file_traits::FileReadWriteVolatile;

use super::*;

struct TestDir(PathBuf);

impl TestDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "leasefs-pt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).unwrap();
        TestDir(p)
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(root: &Path) -> Config {
    Config {
        root_dir: root.to_path_buf(),
        entry_timeout: Duration::from_secs(1),
        attr_timeout: Duration::from_secs(1),
        cache: CachePolicy::Auto,
        writeback: false,
        xattr: true,
        posix_acl: false,
        inode_file_handles: FileHandleMode::Never,
        allow_direct_io: false,
        announce_submounts: true,
        host_posix_locks: true,
        host_flock: true,
        readdirplus: true,
        killpriv_v2: false,
        guest_descriptors: usize::MAX,
        uids: Default::default(),
        gids: Default::default(),
        allow_mmap: false,
        xattrmap: None,
        security_label: false,
        security_label_required: false,
    }
}

fn setup_with(f: impl FnOnce(&mut Config)) -> (TestDir, PassthroughFs) {
    let dir = TestDir::new();
    let mut cfg = config(&dir.0);
    f(&mut cfg);
    let fs = PassthroughFs::new(cfg).unwrap();
    fs.init(FsOptions::all()).unwrap();
    (dir, fs)
}

fn setup() -> (TestDir, PassthroughFs) {
    setup_with(|_| {})
}

fn ctx() -> Context {
    Context::new()
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn err<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.raw_os_error().unwrap(),
    }
}

struct VecWriter(Vec<u8>);

impl Write for VecWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ZeroCopyWriter for VecWriter {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        let mut buf = vec![0u8; count];
        // SAFETY: `buf` outlives the slice.
        let n = f.read_at_volatile(unsafe { FileVolatileSlice::from_mut_slice(&mut buf) }, off)?;
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn available_bytes(&self) -> usize {
        usize::MAX
    }
}

struct SliceReader(Vec<u8>);

impl io::Read for SliceReader {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let n = b.len().min(self.0.len());
        b[..n].copy_from_slice(&self.0[..n]);
        self.0.drain(..n);
        Ok(n)
    }
}

impl ZeroCopyReader for SliceReader {
    fn read_to(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        let n = count.min(self.0.len());
        let mut buf = self.0[..n].to_vec();
        // SAFETY: `buf` outlives the slice.
        let n = f.write_at_volatile(unsafe { FileVolatileSlice::from_mut_slice(&mut buf) }, off)?;
        self.0.drain(..n);
        Ok(n)
    }
}

fn lookup(fs: &PassthroughFs, parent: u64, name: &str) -> Entry {
    fs.lookup(&ctx(), parent, &c(name)).unwrap()
}

fn create(fs: &PassthroughFs, parent: u64, name: &str, flags: i32) -> (Entry, u64) {
    let (e, h, _, _) = fs
        .create(
            &ctx(),
            parent,
            &c(name),
            CreateIn {
                flags: flags as u32,
                mode: libc::S_IFREG | 0o644,
                umask: 0o022,
                fuse_flags: 0,
            },
        )
        .unwrap();
    (e, h.unwrap())
}

fn write(fs: &PassthroughFs, inode: u64, h: u64, data: &[u8], off: u64) -> usize {
    let mut r = SliceReader(data.to_vec());
    fs.write(
        &ctx(),
        inode,
        h,
        &mut r,
        data.len() as u32,
        off,
        None,
        false,
        0,
        0,
    )
    .unwrap()
}

fn read(fs: &PassthroughFs, inode: u64, h: u64, size: u32, off: u64) -> io::Result<Vec<u8>> {
    let mut w = VecWriter(Vec::new());
    fs.read(&ctx(), inode, h, &mut w, size, off, None, 0)?;
    Ok(w.0)
}

fn open(fs: &PassthroughFs, inode: u64, flags: i32) -> io::Result<u64> {
    fs.open(&ctx(), inode, flags as u32, 0)
        .map(|(h, _, _)| h.unwrap())
}

fn release(fs: &PassthroughFs, inode: u64, h: u64) {
    fs.release(&ctx(), inode, 0, h, false, false, None).unwrap();
}

fn lock(start: u64, end: u64, t: i32) -> FileLock {
    FileLock {
        start,
        end,
        lock_type: t as u32,
        pid: 0,
    }
}

#[test]
fn guest_local_locks_are_not_offered() {
    // libvirt's <lock posix='off' flock='off'/>: -o no_posix_lock,no_flock.
    let (_d, fs) = setup_with(|c| {
        c.host_posix_locks = false;
        c.host_flock = false;
    });
    let got = fs.init(FsOptions::all()).unwrap();
    assert!(!got.contains(FsOptions::POSIX_LOCKS), "{got:?}");
    assert!(!got.contains(FsOptions::FLOCK_LOCKS), "{got:?}");
    let (_d, fs) = setup_with(|c| c.host_flock = false);
    let got = fs.init(FsOptions::all()).unwrap();
    assert!(got.contains(FsOptions::POSIX_LOCKS) && !got.contains(FsOptions::FLOCK_LOCKS));
}

#[test]
fn init_negotiates_virtiofsd_options() {
    let (_d, fs) = setup();
    let got = fs.init(FsOptions::all()).unwrap();
    for f in [
        FsOptions::ASYNC_READ,
        FsOptions::PARALLEL_DIROPS,
        FsOptions::BIG_WRITES,
        FsOptions::ATOMIC_O_TRUNC,
        FsOptions::EXPORT_SUPPORT,
        FsOptions::DO_READDIRPLUS,
        FsOptions::READDIRPLUS_AUTO,
        FsOptions::MAX_PAGES,
        FsOptions::POSIX_LOCKS,
        FsOptions::FLOCK_LOCKS,
        FsOptions::AUTO_INVAL_DATA,
        FsOptions::SUBMOUNTS,
        FsOptions::CACHE_SYMLINKS,
    ] {
        assert!(got.contains(f), "{f:?} missing from {got:?}");
    }
    for f in [
        FsOptions::ZERO_MESSAGE_OPEN,
        FsOptions::ZERO_MESSAGE_OPENDIR,
        FsOptions::WRITEBACK_CACHE,
        FsOptions::POSIX_ACL,
        FsOptions::DONT_MASK,
        FsOptions::HANDLE_KILLPRIV_V2,
    ] {
        assert!(!got.contains(f), "{f:?} must not be offered");
    }
    // Only what the guest offers is accepted.
    let got = fs.init(FsOptions::ASYNC_READ).unwrap();
    assert_eq!(got, FsOptions::ASYNC_READ);

    let (_d, fs) = setup_with(|c| {
        c.cache = CachePolicy::Always;
        c.writeback = true;
        c.posix_acl = true;
    });
    let got = fs.init(FsOptions::all()).unwrap();
    assert!(!got.contains(FsOptions::AUTO_INVAL_DATA));
    assert!(got.contains(FsOptions::WRITEBACK_CACHE | FsOptions::POSIX_ACL | FsOptions::DONT_MASK));

    // --no-readdirplus: the guest is not offered READDIRPLUS at all.
    let (_d, fs) = setup_with(|c| c.readdirplus = false);
    let got = fs.init(FsOptions::all()).unwrap();
    assert!(!got.intersects(FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO));
    assert!(got.contains(FsOptions::ASYNC_READ | FsOptions::MAX_PAGES));

    let (_d, fs) = setup_with(|c| c.killpriv_v2 = true);
    assert!(fs
        .init(FsOptions::all())
        .unwrap()
        .contains(FsOptions::HANDLE_KILLPRIV_V2));
}

#[test]
fn create_write_read_and_forget() {
    let (d, fs) = setup();
    let (e, h) = create(&fs, ROOT_INODE, "f", libc::O_RDWR);
    assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(write(&fs, e.inode, h, b"hello world", 0), 11);
    assert_eq!(read(&fs, e.inode, h, 100, 6).unwrap(), b"world");
    assert_eq!(fs.getattr(&ctx(), e.inode, None).unwrap().0.st_size, 11);
    fs.flush(&ctx(), e.inode, h, 1).unwrap();
    fs.fsync(&ctx(), e.inode, false, h).unwrap();
    fs.fsync(&ctx(), e.inode, true, h).unwrap();
    release(&fs, e.inode, h);
    assert_eq!(fs.handle_count(), 0);
    assert_eq!(fs::read(d.path("f")).unwrap(), b"hello world");

    // A second lookup finds the same node id; two forgets drop it.
    let e2 = lookup(&fs, ROOT_INODE, "f");
    assert_eq!(e2.inode, e.inode);
    assert_eq!(fs.inode_count(), 2);
    fs.forget(&ctx(), e.inode, 1);
    assert_eq!(fs.inode_count(), 2);
    fs.batch_forget(&ctx(), vec![(e.inode, 1)]);
    assert_eq!(fs.inode_count(), 1);
    // The root survives any forget.
    fs.forget(&ctx(), ROOT_INODE, 100);
    assert_eq!(fs.inode_count(), 1);
    fs.getattr(&ctx(), ROOT_INODE, None).unwrap();
}

#[test]
fn open_flags_follow_cache_mode_and_writeback() {
    let (d, fs) = setup_with(|c| {
        c.cache = CachePolicy::Never;
        c.writeback = true;
    });
    fs::write(d.path("f"), b"abc").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    let (h, opts, _) = fs
        .open(&ctx(), e.inode, (libc::O_WRONLY | libc::O_APPEND) as u32, 0)
        .unwrap();
    let h = h.unwrap();
    assert_eq!(opts, OpenOptions::DIRECT_IO);
    // Writeback: write-only became read-write, and O_APPEND is the guest's business.
    assert_eq!(read(&fs, e.inode, h, 10, 0).unwrap(), b"abc");
    write(&fs, e.inode, h, b"X", 0);
    assert_eq!(fs::read(d.path("f")).unwrap(), b"Xbc");
    let (dh, dopts) = fs.opendir(&ctx(), ROOT_INODE, 0).unwrap();
    assert_eq!(dopts, OpenOptions::empty());
    fs.releasedir(&ctx(), ROOT_INODE, 0, dh.unwrap()).unwrap();

    let (d, fs) = setup_with(|c| c.cache = CachePolicy::Always);
    fs::write(d.path("f"), b"abc").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    let (_, opts, _) = fs.open(&ctx(), e.inode, libc::O_RDONLY as u32, 0).unwrap();
    assert_eq!(opts, OpenOptions::KEEP_CACHE);
    let (_, dopts) = fs.opendir(&ctx(), ROOT_INODE, 0).unwrap();
    assert_eq!(dopts, OpenOptions::CACHE_DIR);
    // Without writeback an O_WRONLY handle cannot read.
    let h = open(&fs, e.inode, libc::O_WRONLY).unwrap();
    assert_eq!(err(read(&fs, e.inode, h, 10, 0)), libc::EBADF);
}

#[test]
fn negative_entries_only_when_the_guest_owns_the_share() {
    let (_d, fs) = setup_with(|c| {
        c.cache = CachePolicy::Always;
        c.entry_timeout = Duration::from_secs(86400);
    });
    let e = lookup(&fs, ROOT_INODE, "missing");
    assert_eq!(e.inode, 0);
    assert_eq!(e.entry_timeout, Duration::from_secs(86400));
    for cache in [CachePolicy::Never, CachePolicy::Metadata, CachePolicy::Auto] {
        let (_d, fs) = setup_with(|c| c.cache = cache);
        assert_eq!(
            err(fs.lookup(&ctx(), ROOT_INODE, &c("missing"))),
            libc::ENOENT
        );
    }
}

#[test]
fn directory_operations() {
    let (d, fs) = setup();
    let dir = fs
        .mkdir(&ctx(), ROOT_INODE, &c("sub"), libc::S_IFDIR | 0o755, 0)
        .unwrap();
    assert!(d.path("sub").is_dir());
    let (f, h) = create(&fs, dir.inode, "a", libc::O_RDWR);
    release(&fs, f.inode, h);
    let l = fs.link(&ctx(), f.inode, ROOT_INODE, &c("hard")).unwrap();
    assert_eq!(l.inode, f.inode);
    assert_eq!(l.attr.st_nlink, 2);
    let s = fs
        .symlink(&ctx(), &c("sub/a"), ROOT_INODE, &c("sym"))
        .unwrap();
    assert_eq!(s.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(fs.readlink(&ctx(), s.inode).unwrap(), b"sub/a");
    let fifo = fs
        .mknod(&ctx(), ROOT_INODE, &c("fifo"), libc::S_IFIFO | 0o600, 0, 0)
        .unwrap();
    assert_eq!(fifo.attr.st_mode & libc::S_IFMT, libc::S_IFIFO);
    // Neither FIFOs nor symlinks are ever opened by the daemon.
    assert_eq!(err(open(&fs, fifo.inode, libc::O_RDONLY)), libc::EBADF);
    assert_eq!(err(open(&fs, s.inode, libc::O_RDONLY)), libc::EBADF);
    assert_eq!(err(fs.opendir(&ctx(), f.inode, 0)), libc::ENOTDIR);

    assert_eq!(
        err(fs.rmdir(&ctx(), ROOT_INODE, &c("sub"))),
        libc::ENOTEMPTY
    );
    fs.unlink(&ctx(), dir.inode, &c("a")).unwrap();
    fs.rmdir(&ctx(), ROOT_INODE, &c("sub")).unwrap();
    fs.unlink(&ctx(), ROOT_INODE, &c("hard")).unwrap();
    assert!(!d.path("sub").exists() && !d.path("hard").exists());

    let st = fs.statfs(&ctx(), ROOT_INODE).unwrap();
    assert!(st.f_bsize > 0 && st.f_namemax > 0);
    fs.syncfs().unwrap();
}

/// While the guest executes a file (an OPEN with __FMODE_EXEC is open), no open of it may
/// write or truncate: the guest kernel refuses O_WRONLY itself, but with ATOMIC_O_TRUNC it
/// sends an O_RDONLY|O_TRUNC here before checking, and a CREATE of the existing name (its
/// dentry expired) before it knows the file exists. Either would empty the running program.
#[test]
fn a_running_program_is_neither_truncated_nor_opened_for_writing() {
    const FMODE_EXEC: i32 = super::ops::FMODE_EXEC as i32;
    let (d, fs) = setup();
    fs::write(d.path("prog"), b"#!program text").unwrap();
    let e = lookup(&fs, ROOT_INODE, "prog");
    let exec = open(&fs, e.inode, libc::O_RDONLY | FMODE_EXEC).unwrap();
    for flags in [
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_WRONLY | libc::O_TRUNC,
    ] {
        assert_eq!(err(open(&fs, e.inode, flags)), libc::ETXTBSY, "{flags:#o}");
    }
    let create = |flags: i32| {
        let args = CreateIn {
            flags: (libc::O_CREAT | flags) as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        fs.create(&ctx(), ROOT_INODE, &c("prog"), args)
            .map(|(e, h, _, _)| (e.inode, h.unwrap()))
    };
    assert_eq!(err(create(libc::O_WRONLY | libc::O_TRUNC)), libc::ETXTBSY);
    assert_eq!(err(create(libc::O_RDONLY | libc::O_TRUNC)), libc::ETXTBSY);
    assert_eq!(fs::read(d.path("prog")).unwrap(), b"#!program text");
    // Reading it is fine, and so is a second program run.
    let reader = open(&fs, e.inode, libc::O_RDONLY).unwrap();
    let exec2 = open(&fs, e.inode, libc::O_RDONLY | FMODE_EXEC).unwrap();
    release(&fs, e.inode, exec);
    assert_eq!(err(open(&fs, e.inode, libc::O_WRONLY)), libc::ETXTBSY);
    release(&fs, e.inode, exec2);
    release(&fs, e.inode, reader);

    // Once no run is left, truncating works again.
    let h = open(&fs, e.inode, libc::O_RDONLY | libc::O_TRUNC).unwrap();
    release(&fs, e.inode, h);
    assert_eq!(fs::read(d.path("prog")).unwrap(), b"");
    let (node, h) = create(libc::O_WRONLY | libc::O_TRUNC).unwrap();
    release(&fs, node, h);
}

/// Names of 255 bytes: a READDIRPLUS reply holds more entries than one batch of host entries
/// read for it (`dirents_for_reply`), so listing goes on reading within one request; every
/// name comes exactly once, whether the reply is small or large, through READDIR too.
#[test]
fn long_names_list_once_whatever_the_reply_size() {
    let (d, fs) = setup();
    fs::create_dir(d.path("long")).unwrap();
    let mut expected = HashSet::new();
    for i in 0..200 {
        let name = format!("{i:03}{}", "x".repeat(252));
        fs::File::create(d.path("long").join(&name)).unwrap();
        expected.insert(name);
    }
    let dir = lookup(&fs, ROOT_INODE, "long");
    let (h, _) = fs.opendir(&ctx(), dir.inode, 0).unwrap();
    let h = h.unwrap();
    for size in [4096u32, 65_536, 1 << 20] {
        for plus in [true, false] {
            let mut names = HashSet::new();
            let mut offset = 0;
            loop {
                let start = offset;
                let mut room = size as usize;
                let mut emitted = 0;
                let mut add = |name: &[u8], off: u64, extra: usize| {
                    let need = ((24 + name.len() + 7) & !7) + extra;
                    if need > room {
                        return 0;
                    }
                    room -= need;
                    emitted += 1;
                    offset = off;
                    let name = String::from_utf8(name.to_vec()).unwrap();
                    if name != "." && name != ".." {
                        assert!(
                            names.insert(name),
                            "listed twice (size {size}, plus {plus})"
                        );
                    }
                    need
                };
                if plus {
                    fs.readdirplus(&ctx(), dir.inode, h, size, start, &mut |de, e| {
                        if e.inode != 0 {
                            fs.forget(&ctx(), e.inode, 1);
                        }
                        Ok(add(de.name, de.offset, 128))
                    })
                    .unwrap();
                } else {
                    fs.readdir(&ctx(), dir.inode, h, size, start, &mut |de| {
                        Ok(add(de.name, de.offset, 0))
                    })
                    .unwrap();
                }
                if emitted == 0 {
                    break;
                }
            }
            assert_eq!(names, expected, "size {size}, plus {plus}");
        }
    }
}

#[test]
fn readdirplus_pages_through_10000_entries() {
    let (d, fs) = setup();
    fs::create_dir(d.path("big")).unwrap();
    for i in 0..10_000 {
        fs::File::create(d.path(&format!("big/entry-{i:05}"))).unwrap();
    }
    let dir = lookup(&fs, ROOT_INODE, "big");
    let (h, _) = fs.opendir(&ctx(), dir.inode, 0).unwrap();
    let h = h.unwrap();

    let mut names = HashSet::new();
    let mut lookups: Vec<u64> = Vec::new();
    let mut offset = 0;
    let mut calls = 0;
    loop {
        calls += 1;
        // Mimic the server: a 4 KiB buffer that fills up (dirent + name padded + entry_out).
        let mut room = 4096usize;
        let mut emitted = 0;
        fs.readdirplus(&ctx(), dir.inode, h, 4096, offset, &mut |de, e| {
            let need = ((24 + de.name.len() + 7) & !7) + 128;
            if need > room {
                return Ok(0);
            }
            room -= need;
            emitted += 1;
            offset = de.offset;
            let name = String::from_utf8(de.name.to_vec()).unwrap();
            if name == "." || name == ".." {
                assert_eq!(e.inode, 0, "no lookup for {name}");
            } else {
                assert_ne!(e.inode, 0);
                assert_eq!(e.attr.st_ino, de.ino);
                lookups.push(e.inode);
                assert!(names.insert(name.clone()), "{name} listed twice");
            }
            Ok(need)
        })
        .unwrap();
        if emitted == 0 {
            break;
        }
    }
    assert_eq!(names.len(), 10_000);
    assert!(calls > 10, "paging happened ({calls} calls)");
    // Each listed entry is one lookup; entries that did not fit were not counted.
    assert_eq!(fs.inode_count(), 2 + 10_000);
    for i in lookups {
        fs.forget(&ctx(), i, 1);
    }
    assert_eq!(fs.inode_count(), 2);

    // Plain READDIR over the same handle, restarted from 0.
    let mut seen = 0;
    let mut offset = 0;
    loop {
        let mut n = 0;
        fs.readdir(&ctx(), dir.inode, h, 4096, offset, &mut |de| {
            if n == 100 {
                return Ok(0);
            }
            n += 1;
            offset = de.offset;
            Ok(1)
        })
        .unwrap();
        if n == 0 {
            break;
        }
        seen += n;
    }
    assert_eq!(seen, 10_002);
    fs.releasedir(&ctx(), dir.inode, 0, h).unwrap();
    fs.forget(&ctx(), dir.inode, 1);
    assert_eq!(fs.inode_count(), 1);
}

#[test]
fn rename_flags() {
    let (d, fs) = setup();
    fs::write(d.path("a"), b"A").unwrap();
    fs::write(d.path("b"), b"B").unwrap();
    let r = |old: &str, new: &str, flags: u32| {
        fs.rename(&ctx(), ROOT_INODE, &c(old), ROOT_INODE, &c(new), flags)
    };
    assert_eq!(err(r("a", "b", libc::RENAME_NOREPLACE)), libc::EEXIST);
    r("a", "b", libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(d.path("a")).unwrap(), b"B");
    assert_eq!(fs::read(d.path("b")).unwrap(), b"A");
    r("a", "c", libc::RENAME_NOREPLACE).unwrap();
    r("c", "b", 0).unwrap();
    assert_eq!(fs::read(d.path("b")).unwrap(), b"B");
    assert!(!d.path("a").exists() && !d.path("c").exists());
    r("b", "w", libc::RENAME_WHITEOUT).unwrap();
    let wh = fs::symlink_metadata(d.path("b")).unwrap();
    assert_eq!(
        wh.mode() & libc::S_IFMT,
        libc::S_IFCHR,
        "whiteout left behind"
    );
    assert_eq!(err(r("w", "x", 0x80)), libc::EINVAL);
    assert_eq!(err(r("w", "../x", 0)), libc::EINVAL);
    assert_eq!(err(r("..", "x", 0)), libc::EINVAL);
}

#[test]
fn setattr_mode_owner_size_times() {
    let (d, fs) = setup();
    fs::write(d.path("f"), b"0123456789").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    // SAFETY: stat64 is plain old data.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };

    attr.st_mode = 0o600;
    let (st, _) = fs
        .setattr(&ctx(), e.inode, attr, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o600);

    attr.st_uid = 1234;
    attr.st_gid = 5678;
    let (st, _) = fs
        .setattr(
            &ctx(),
            e.inode,
            attr,
            None,
            SetattrValid::UID | SetattrValid::GID,
        )
        .unwrap();
    assert_eq!((st.st_uid, st.st_gid), (1234, 5678));

    attr.st_size = 4;
    let (st, _) = fs
        .setattr(&ctx(), e.inode, attr, None, SetattrValid::SIZE)
        .unwrap();
    assert_eq!(st.st_size, 4);
    let h = open(&fs, e.inode, libc::O_RDWR).unwrap();
    attr.st_size = 2;
    let (st, _) = fs
        .setattr(&ctx(), e.inode, attr, Some(h), SetattrValid::SIZE)
        .unwrap();
    assert_eq!(st.st_size, 2);
    assert_eq!(fs::read(d.path("f")).unwrap(), b"01");

    attr.st_atime = 1_000_000;
    attr.st_atime_nsec = 5;
    attr.st_mtime = 2_000_000;
    attr.st_mtime_nsec = 7;
    let (st, _) = fs
        .setattr(
            &ctx(),
            e.inode,
            attr,
            None,
            SetattrValid::ATIME | SetattrValid::MTIME,
        )
        .unwrap();
    assert_eq!((st.st_atime, st.st_atime_nsec), (1_000_000, 5));
    assert_eq!((st.st_mtime, st.st_mtime_nsec), (2_000_000, 7));
    // MTIME_NOW sets mtime to now and leaves atime alone (UTIME_OMIT).
    let (st, _) = fs
        .setattr(
            &ctx(),
            e.inode,
            attr,
            Some(h),
            SetattrValid::MTIME | SetattrValid::MTIME_NOW,
        )
        .unwrap();
    assert_eq!(st.st_atime, 1_000_000);
    assert!(st.st_mtime > 2_000_000);
    // A handle of another inode is refused.
    assert_eq!(
        err(fs.setattr(&ctx(), ROOT_INODE, attr, Some(h), SetattrValid::SIZE)),
        libc::EBADF
    );
}

#[test]
fn posix_locks_between_owners() {
    let (d, fs) = setup();
    fs::write(d.path("f"), b"data").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    let h1 = open(&fs, e.inode, libc::O_RDWR).unwrap();
    let h2 = open(&fs, e.inode, libc::O_RDWR).unwrap();
    let (a, b) = (0xa, 0xb);

    fs.setlk(&ctx(), e.inode, h1, a, lock(0, 99, libc::F_WRLCK), 0)
        .unwrap();
    // The same owner may relock; another owner conflicts.
    fs.setlk(&ctx(), e.inode, h1, a, lock(50, 60, libc::F_RDLCK), 0)
        .unwrap();
    assert_eq!(
        err(fs.setlk(&ctx(), e.inode, h2, b, lock(10, 20, libc::F_WRLCK), 0)),
        libc::EAGAIN
    );
    let got = fs
        .getlk(&ctx(), e.inode, h2, b, lock(0, u64::MAX, libc::F_WRLCK), 0)
        .unwrap();
    assert_ne!(got.lock_type, libc::F_UNLCK as u32);
    assert!(got.start <= 10);
    // Beyond the locked range there is no conflict.
    let got = fs
        .getlk(&ctx(), e.inode, h2, b, lock(100, 200, libc::F_WRLCK), 0)
        .unwrap();
    assert_eq!(got.lock_type, libc::F_UNLCK as u32);

    // A blocking request waits until the holder's close (FLUSH) drops its locks.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| fs.setlkw(&ctx(), e.inode, h2, b, lock(0, 9, libc::F_WRLCK), 0));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished());
        fs.flush(&ctx(), e.inode, h1, a).unwrap();
        waiter.join().unwrap().unwrap();
    });
    assert_eq!(
        err(fs.setlk(&ctx(), e.inode, h1, a, lock(5, 5, libc::F_RDLCK), 0)),
        libc::EAGAIN
    );
    fs.setlk(&ctx(), e.inode, h2, b, lock(0, 9, libc::F_UNLCK), 0)
        .unwrap();
    fs.setlk(&ctx(), e.inode, h1, a, lock(5, 5, libc::F_RDLCK), 0)
        .unwrap();
    // RELEASE with a lock owner drops that owner's locks too.
    fs.release(&ctx(), e.inode, 0, h1, true, false, Some(a))
        .unwrap();
    fs.setlk(&ctx(), e.inode, h2, b, lock(0, 9, libc::F_WRLCK), 0)
        .unwrap();
    assert_eq!(
        err(fs.setlk(&ctx(), e.inode, h1, a, lock(0, 1, libc::F_RDLCK), 0)),
        libc::EBADF,
        "released handle"
    );
    assert_eq!(
        err(fs.setlk(&ctx(), e.inode, h2, b, lock(9, 1, libc::F_RDLCK), 0)),
        libc::EINVAL,
        "end before start"
    );
}

#[test]
fn flock_locks_per_open_file() {
    let (d, fs) = setup();
    fs::write(d.path("f"), b"data").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    let h1 = open(&fs, e.inode, libc::O_RDONLY).unwrap();
    let h2 = open(&fs, e.inode, libc::O_RDONLY).unwrap();
    let flk = fuse_backend_rs::abi::fuse_abi::LK_FLOCK;
    fs.setlk(&ctx(), e.inode, h1, 1, lock(0, 0, libc::F_WRLCK), flk)
        .unwrap();
    assert_eq!(
        err(fs.setlk(&ctx(), e.inode, h2, 2, lock(0, 0, libc::F_RDLCK), flk)),
        libc::EAGAIN
    );
    fs.release(&ctx(), e.inode, 0, h1, false, true, Some(1))
        .unwrap();
    fs.setlk(&ctx(), e.inode, h2, 2, lock(0, 0, libc::F_RDLCK), flk)
        .unwrap();
}

#[test]
fn copy_file_range_between_handles() {
    let (d, fs) = setup();
    let (a, ha) = create(&fs, ROOT_INODE, "a", libc::O_RDWR);
    let (b, hb) = create(&fs, ROOT_INODE, "b", libc::O_RDWR);
    write(&fs, a.inode, ha, b"0123456789", 0);
    let n = fs
        .copy_file_range(&ctx(), a.inode, ha, 2, b.inode, hb, 1, 5, 0)
        .unwrap();
    assert_eq!(n, 5);
    assert_eq!(fs::read(d.path("b")).unwrap(), b"\x0023456");
    assert_eq!(
        err(fs.copy_file_range(&ctx(), a.inode, hb, 0, b.inode, hb, 0, 1, 0)),
        libc::EBADF
    );
}

#[test]
fn tmpfile_then_link() {
    let (d, fs) = setup();
    let (e, h, _) = fs
        .tmpfile(
            &ctx(),
            ROOT_INODE,
            libc::S_IFREG | 0o600,
            0,
            libc::O_RDWR as u32,
        )
        .unwrap();
    let h = h.unwrap();
    assert_eq!(e.attr.st_nlink, 0);
    write(&fs, e.inode, h, b"tmp", 0);
    let l = fs.link(&ctx(), e.inode, ROOT_INODE, &c("named")).unwrap();
    assert_eq!(l.inode, e.inode);
    assert_eq!(fs::read(d.path("named")).unwrap(), b"tmp");
    // O_EXCL: this one may never get a name.
    let (e, _, _) = fs
        .tmpfile(
            &ctx(),
            ROOT_INODE,
            0o600,
            0,
            (libc::O_RDWR | libc::O_EXCL) as u32,
        )
        .unwrap();
    assert_eq!(
        err(fs.link(&ctx(), e.inode, ROOT_INODE, &c("never"))),
        libc::ENOENT
    );
}

#[test]
fn lseek_data_and_hole() {
    let (_d, fs) = setup();
    let (e, h) = create(&fs, ROOT_INODE, "sparse", libc::O_RDWR);
    write(&fs, e.inode, h, &[1u8; 4096], 0);
    write(&fs, e.inode, h, &[2u8; 4096], 1 << 20);
    let hole = fs
        .lseek(&ctx(), e.inode, h, 0, libc::SEEK_HOLE as u32)
        .unwrap();
    assert_eq!(hole, 4096);
    let data = fs
        .lseek(&ctx(), e.inode, h, 8192, libc::SEEK_DATA as u32)
        .unwrap();
    assert_eq!(data, 1 << 20);
    assert_eq!(
        err(fs.lseek(&ctx(), e.inode, h, 0, libc::SEEK_END as u32)),
        libc::EINVAL
    );
    // Preallocation reserves blocks (ext4 still reports unwritten extents as holes).
    let before = fs.getattr(&ctx(), e.inode, None).unwrap().0.st_blocks;
    fs.fallocate(&ctx(), e.inode, h, 0, 8192, 65536).unwrap();
    let after = fs.getattr(&ctx(), e.inode, None).unwrap().0.st_blocks;
    assert!(after >= before + 128, "{before} -> {after}");
    // Punching a hole gives data back.
    let mode = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32;
    fs.fallocate(&ctx(), e.inode, h, mode, 0, 4096).unwrap();
    let data = fs
        .lseek(&ctx(), e.inode, h, 0, libc::SEEK_DATA as u32)
        .unwrap();
    assert_ne!(data, 0);
}

#[test]
fn xattrs_with_and_without_the_option() {
    let (d, fs) = setup();
    fs::write(d.path("f"), b"").unwrap();
    std::os::unix::fs::symlink("f", d.path("l")).unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    fs.setxattr(&ctx(), e.inode, &c("user.k"), b"value", 0)
        .unwrap();
    match fs.getxattr(&ctx(), e.inode, &c("user.k"), 0).unwrap() {
        GetxattrReply::Count(n) => assert_eq!(n, 5),
        _ => panic!("size query"),
    }
    match fs.getxattr(&ctx(), e.inode, &c("user.k"), 100).unwrap() {
        GetxattrReply::Value(v) => assert_eq!(v, b"value"),
        _ => panic!("value"),
    }
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("user.k"), 2)),
        libc::ERANGE
    );
    match fs.listxattr(&ctx(), e.inode, 1000).unwrap() {
        ListxattrReply::Names(v) => assert!(v.split(|&b| b == 0).any(|n| n == b"user.k")),
        _ => panic!("names"),
    }
    assert_eq!(
        err(fs.setxattr(
            &ctx(),
            e.inode,
            &c("user.k"),
            b"x",
            libc::XATTR_CREATE as u32
        )),
        libc::EEXIST
    );
    fs.removexattr(&ctx(), e.inode, &c("user.k")).unwrap();
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("user.k"), 100)),
        libc::ENODATA
    );

    // A symlink's own xattrs (trusted.* is allowed on symlinks), never its target's.
    let l = lookup(&fs, ROOT_INODE, "l");
    fs.setxattr(&ctx(), l.inode, &c("trusted.k"), b"link", 0)
        .unwrap();
    match fs.getxattr(&ctx(), l.inode, &c("trusted.k"), 100).unwrap() {
        GetxattrReply::Value(v) => assert_eq!(v, b"link"),
        _ => panic!("value"),
    }
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("trusted.k"), 100)),
        libc::ENODATA
    );
    // The thread's working directory went back to the share's root.
    assert_eq!(
        fs::canonicalize(".").unwrap(),
        fs::canonicalize(&d.0).unwrap()
    );

    let (d, fs) = setup_with(|c| c.xattr = false);
    fs::write(d.path("f"), b"").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    assert_eq!(
        err(fs.setxattr(&ctx(), e.inode, &c("user.k"), b"v", 0)),
        libc::ENOSYS
    );
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("user.k"), 10)),
        libc::ENOSYS
    );
    assert_eq!(err(fs.listxattr(&ctx(), e.inode, 10)), libc::ENOSYS);
    assert_eq!(
        err(fs.removexattr(&ctx(), e.inode, &c("user.k"))),
        libc::ENOSYS
    );
}

#[test]
fn lookups_cannot_escape_the_share() {
    let (d, fs) = setup();
    let outside = TestDir::new();
    fs::write(outside.path("secret"), b"secret").unwrap();
    let old = fs::symlink_metadata(outside.path("secret")).unwrap();
    std::os::unix::fs::symlink(outside.path("secret"), d.path("evil")).unwrap();

    assert_eq!(lookup(&fs, ROOT_INODE, "..").inode, ROOT_INODE);
    assert_eq!(lookup(&fs, ROOT_INODE, ".").inode, ROOT_INODE);
    fs.forget(&ctx(), ROOT_INODE, 2);
    for bad in ["a/b", "../x", "/etc", ""] {
        assert_eq!(
            err(fs.lookup(&ctx(), ROOT_INODE, &c(bad))),
            libc::EINVAL,
            "{bad}"
        );
    }
    assert_eq!(
        err(fs.mkdir(&ctx(), ROOT_INODE, &c("x/y"), 0o755, 0)),
        libc::EINVAL
    );
    assert_eq!(
        err(fs.mkdir(&ctx(), ROOT_INODE, &c(".."), 0o755, 0)),
        libc::EINVAL
    );
    assert_eq!(err(fs.unlink(&ctx(), ROOT_INODE, &c("../x"))), libc::EINVAL);

    // ".." of a subdirectory is the root again, same node id.
    let sub = fs.mkdir(&ctx(), ROOT_INODE, &c("sub"), 0o755, 0).unwrap();
    assert_eq!(lookup(&fs, sub.inode, "..").inode, ROOT_INODE);

    let e = lookup(&fs, ROOT_INODE, "evil");
    assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        fs.readlink(&ctx(), e.inode).unwrap(),
        outside.path("secret").as_os_str().as_encoded_bytes()
    );
    let (st, _) = fs.getattr(&ctx(), e.inode, None).unwrap();
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(err(open(&fs, e.inode, libc::O_RDWR)), libc::EBADF);
    assert_eq!(
        err(open(&fs, e.inode, libc::O_RDONLY | libc::O_TRUNC)),
        libc::EBADF
    );
    // SAFETY: stat64 is plain old data.
    let mut attr: stat64 = unsafe { std::mem::zeroed() };
    attr.st_size = 0;
    assert_eq!(
        err(fs.setattr(&ctx(), e.inode, attr, None, SetattrValid::SIZE)),
        libc::EBADF
    );
    attr.st_uid = 4321;
    attr.st_mtime = 12345;
    fs.setattr(
        &ctx(),
        e.inode,
        attr,
        None,
        SetattrValid::UID | SetattrValid::MTIME,
    )
    .unwrap();
    let link = fs::symlink_metadata(d.path("evil")).unwrap();
    assert_eq!(
        (link.uid(), link.mtime()),
        (4321, 12345),
        "the link itself changed"
    );
    let now = fs::symlink_metadata(outside.path("secret")).unwrap();
    assert_eq!(
        (now.uid(), now.mtime(), now.mtime_nsec(), now.len()),
        (old.uid(), old.mtime(), old.mtime_nsec(), old.len()),
        "the target was not touched"
    );
    // Creating through the symlink's name does not follow it either.
    assert!(fs
        .create(
            &ctx(),
            ROOT_INODE,
            &c("evil"),
            CreateIn {
                flags: (libc::O_RDWR | libc::O_TRUNC) as u32,
                mode: 0o644,
                umask: 0,
                fuse_flags: 0,
            },
        )
        .is_err());
    assert_eq!(fs::read(outside.path("secret")).unwrap(), b"secret");
    // And a lookup below a symlink fails instead of following it.
    assert_eq!(err(fs.lookup(&ctx(), e.inode, &c("x"))), libc::ENOTDIR);

    fs.forget(&ctx(), e.inode, 1);
    fs.forget(&ctx(), sub.inode, 1);
    assert_eq!(fs.inode_count(), 1);
}

#[test]
fn hostile_ids_are_ebadf() {
    let (d, fs) = setup();
    fs::write(d.path("f"), b"x").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    let h = open(&fs, e.inode, libc::O_RDONLY).unwrap();
    assert_eq!(err(fs.getattr(&ctx(), 0, None)), libc::EBADF);
    assert_eq!(err(fs.getattr(&ctx(), 999_999, None)), libc::EBADF);
    assert_eq!(err(fs.lookup(&ctx(), 999_999, &c("f"))), libc::EBADF);
    assert_eq!(err(read(&fs, e.inode, 999_999, 1, 0)), libc::EBADF);
    // A real handle with the wrong inode.
    assert_eq!(err(read(&fs, ROOT_INODE, h, 1, 0)), libc::EBADF);
    assert_eq!(
        err(fs.release(&ctx(), ROOT_INODE, 0, h, false, false, None)),
        libc::EBADF
    );
    assert_eq!(err(fs.releasedir(&ctx(), e.inode, 0, 424242)), libc::EBADF);
    assert_eq!(
        err(fs.link(&ctx(), 999_999, ROOT_INODE, &c("n"))),
        libc::EBADF
    );
    fs.forget(&ctx(), 999_999, 1);
    fs.batch_forget(&ctx(), vec![(0, u64::MAX), (e.inode, u64::MAX)]);
    assert_eq!(fs.inode_count(), 1);
    // The handle outlives its inode's table entry and still works.
    assert_eq!(read(&fs, e.inode, h, 1, 0).unwrap(), b"x");
    release(&fs, e.inode, h);
}

#[test]
fn creation_uses_caller_credentials_and_umask() {
    let (d, fs) = setup();
    let user = Context {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    let (e, _, _, _) = fs
        .create(
            &user,
            ROOT_INODE,
            &c("mine"),
            CreateIn {
                flags: libc::O_RDWR as u32,
                mode: 0o666,
                umask: 0o022,
                fuse_flags: 0,
            },
        )
        .unwrap();
    assert_eq!((e.attr.st_uid, e.attr.st_gid), (1000, 1000));
    // Without POSIX ACLs the guest has applied its umask already; we must not again.
    assert_eq!(e.attr.st_mode & 0o777, 0o666);
    let m = fs
        .mkdir(&user, ROOT_INODE, &c("dir"), 0o777, 0o077)
        .unwrap();
    assert_eq!(m.attr.st_mode & 0o777, 0o777);
    // The thread is root again afterwards.
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0);
    assert_eq!(fs::metadata(d.path("mine")).unwrap().uid(), 1000);
    // A user cannot create where the host would not let them.
    fs::create_dir(d.path("rootonly")).unwrap();
    fs::set_permissions(d.path("rootonly"), fs::Permissions::from_mode(0o755)).unwrap();
    let ro = lookup(&fs, ROOT_INODE, "rootonly");
    assert_eq!(
        err(fs.mkdir(&user, ro.inode, &c("x"), 0o755, 0)),
        libc::EACCES
    );
    assert_eq!(
        err(fs.access(&user, ro.inode, libc::W_OK as u32)),
        libc::EACCES
    );
    fs.access(&user, ro.inode, (libc::R_OK | libc::X_OK) as u32)
        .unwrap();
    fs.access(&ctx(), ro.inode, libc::W_OK as u32).unwrap();

    // With POSIX ACLs the guest leaves the umask to us.
    let (_d, fs) = setup_with(|c| c.posix_acl = true);
    let m = fs
        .mkdir(&user, ROOT_INODE, &c("dir"), 0o777, 0o027)
        .unwrap();
    assert_eq!(m.attr.st_mode & 0o777, 0o750);
}

#[test]
fn write_kill_priv_clears_setuid() {
    let (d, fs) = setup();
    fs::write(d.path("suid"), b"x").unwrap();
    fs::set_permissions(d.path("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    let e = lookup(&fs, ROOT_INODE, "suid");
    let h = open(&fs, e.inode, libc::O_RDWR).unwrap();
    // A privileged write keeps the bit...
    write(&fs, e.inode, h, b"y", 0);
    assert_eq!(
        fs::metadata(d.path("suid")).unwrap().mode() & 0o4000,
        0o4000
    );
    // ...a write the guest flags as unprivileged clears it.
    let mut r = SliceReader(b"z".to_vec());
    fs.write(
        &ctx(),
        e.inode,
        h,
        &mut r,
        1,
        0,
        None,
        false,
        0,
        fuse_backend_rs::abi::fuse_abi::WRITE_KILL_PRIV,
    )
    .unwrap();
    assert_eq!(fs::metadata(d.path("suid")).unwrap().mode() & 0o4000, 0);
}

#[test]
fn accessors_for_the_coherence_engine() {
    let (d, fs) = setup();
    fs::write(d.path("f"), b"x").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    let meta = fs::metadata(d.path("f")).unwrap();
    let id = fs.inode_id(e.inode).unwrap();
    assert_eq!((id.dev, id.ino), (meta.dev(), meta.ino()));
    assert_eq!(fs.find_inode(&id), Some(e.inode));
    assert_eq!(
        fs.find_inodes_by_dev_ino(meta.dev(), meta.ino()),
        vec![e.inode]
    );
    let data = fs.inode_fd(e.inode).unwrap();
    assert_eq!(data.inode, e.inode);
    let f = fs
        .reopen_inode(e.inode, crate::passthrough::ReadOnly::new(0).unwrap())
        .unwrap();
    assert_eq!(f.metadata().unwrap().ino(), meta.ino());
    let h = open(&fs, e.inode, libc::O_RDONLY).unwrap();
    assert_eq!(fs.handle_fd(h).unwrap().inode, e.inode);
    assert!(fs.inode_fd(12345).is_none());
    fs.import().unwrap();
}

/// Unmounts (lazily) on drop, so a failing assertion leaves no mount behind.
struct Mount(CString);

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: the path is NUL-terminated.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn submounts_are_announced() {
    let (d, fs) = setup();
    fs::create_dir(d.path("mnt")).unwrap();
    fs::create_dir(d.path("plain")).unwrap();
    let target = c(d.path("mnt").to_str().unwrap());
    // SAFETY: all strings are NUL-terminated; no mount data.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        eprintln!(
            "skipping: cannot mount tmpfs: {}",
            io::Error::last_os_error()
        );
        return;
    }
    let _m = Mount(target);
    let plain = lookup(&fs, ROOT_INODE, "plain");
    assert_eq!(
        plain.attr_flags & fuse_backend_rs::abi::fuse_abi::ATTR_SUBMOUNT,
        0
    );
    let sub = lookup(&fs, ROOT_INODE, "mnt");
    assert_ne!(
        sub.attr_flags & fuse_backend_rs::abi::fuse_abi::ATTR_SUBMOUNT,
        0
    );
    assert_ne!(
        fs.inode_id(sub.inode).unwrap().dev,
        fs.inode_id(ROOT_INODE).unwrap().dev
    );
    // Going back up is not entering a submount.
    let up = lookup(&fs, sub.inode, "..");
    assert_eq!(up.inode, ROOT_INODE);
    assert_eq!(up.attr_flags, 0);

    // Without the option nothing is announced.
    fs.init(FsOptions::all() - FsOptions::SUBMOUNTS).unwrap();
    let sub = lookup(&fs, ROOT_INODE, "mnt");
    assert_eq!(sub.attr_flags, 0);
}

#[test]
fn serves_through_the_crate_server() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<PassthroughFs>();
    let (_d, fs) = setup();
    let _server = fuse_backend_rs::api::server::Server::new(fs);
}

#[test]
fn a_guest_at_its_descriptor_budget_gets_enfile_before_anything_changes() {
    // Budget 6: the root node, the directory, its handle and three more.
    let (d, fs) = setup_with(|c| c.guest_descriptors = 6);
    fs::create_dir(d.path("dir")).unwrap();
    for i in 0..8 {
        fs::write(d.path(&format!("dir/f{i}")), b"kept").unwrap();
    }
    let dir = lookup(&fs, ROOT_INODE, "dir");
    let (h, _) = fs.opendir(&ctx(), dir.inode, 0).unwrap();
    let h = h.unwrap();
    // READDIRPLUS describes entries while they fit, then lists the rest without a node
    // (node id 0: the guest looks them up itself when it needs them).
    let mut described = Vec::new();
    let mut bare = 0;
    fs.readdirplus(&ctx(), dir.inode, h, 4096, 0, &mut |de, e| {
        if de.name != b"." && de.name != b".." {
            if e.inode == 0 {
                bare += 1;
            } else {
                described.push(e.inode);
            }
        }
        Ok(1)
    })
    .unwrap();
    assert_eq!((described.len(), bare), (3, 5));
    assert_eq!(fs.inode_count(), 5, "root, dir and three files");
    let enfile = |r: io::Result<()>| r.unwrap_err().raw_os_error() == Some(libc::ENFILE);
    // A known file: its LOOKUP costs nothing.
    let known = d.path("dir").join("f0");
    let mut known_node = None;
    for &n in &described {
        if fs.inode_id(n).unwrap().ino == fs::metadata(&known).unwrap().ino() {
            known_node = Some(n);
        }
    }
    if let Some(n) = known_node {
        assert_eq!(lookup(&fs, dir.inode, "f0").inode, n);
    }
    // A new one: ENFILE.
    let unknown = (0..8)
        .map(|i| format!("f{i}"))
        .find(|name| {
            let ino = fs::metadata(d.path("dir").join(name)).unwrap().ino();
            described
                .iter()
                .all(|&n| fs.inode_id(n).unwrap().ino != ino)
        })
        .unwrap();
    assert!(enfile(fs.lookup(&ctx(), dir.inode, &c(&unknown)).map(drop)));
    // Nothing is created or truncated when the node or handle would not fit.
    let args = CreateIn {
        flags: (libc::O_WRONLY | libc::O_TRUNC) as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    assert!(enfile(
        fs.create(&ctx(), dir.inode, &c("new"), args).map(drop)
    ));
    assert!(!d.path("dir/new").exists());
    assert!(enfile(
        fs.mkdir(&ctx(), dir.inode, &c("sub"), 0o755, 0).map(drop)
    ));
    assert!(!d.path("dir/sub").exists());
    let file = described[0];
    assert!(enfile(
        open(&fs, file, libc::O_WRONLY | libc::O_TRUNC).map(drop)
    ));
    for i in 0..8 {
        assert_eq!(fs::read(d.path(&format!("dir/f{i}"))).unwrap(), b"kept");
    }
    assert!(fs.descriptor_refusals() >= 4);
    // Forgetting frees room again.
    fs.forget(&ctx(), file, 1);
    assert!(open(&fs, described[1], libc::O_RDONLY).is_ok());
}

#[test]
fn xattrmap_renames_hides_and_refuses() {
    use super::XattrMap;
    fn host_names(path: &Path) -> Vec<String> {
        let p = CString::new(path.as_os_str().as_bytes()).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: the kernel writes at most buf.len() bytes.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0);
        buf.truncate(n as usize);
        buf.split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8(n.to_vec()).unwrap())
            .collect()
    }
    // Every guest name lives under user.virtiofs. on the host; host names without it are
    // hidden from the guest.
    let map = XattrMap::parse(":map::user.virtiofs.:").unwrap();
    let (d, fs) = setup_with(|c| c.xattrmap = Some(map));
    fs::write(d.path("f"), b"").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    fs.setxattr(&ctx(), e.inode, &c("trusted.overlay.x"), b"guest", 0)
        .unwrap();
    fs.setxattr(&ctx(), e.inode, &c("user.k"), b"v", 0).unwrap();
    let mut on_host = host_names(&d.path("f"));
    on_host.sort();
    assert_eq!(
        on_host,
        ["user.virtiofs.trusted.overlay.x", "user.virtiofs.user.k"]
    );
    // Set on the host directly: hidden, and unreachable by its own name.
    let p = CString::new(d.path("f").as_os_str().as_bytes()).unwrap();
    // SAFETY: valid C strings and value buffer.
    assert_eq!(
        unsafe {
            libc::setxattr(
                p.as_ptr(),
                c"user.host".as_ptr(),
                b"h".as_ptr().cast(),
                1,
                0,
            )
        },
        0
    );
    match fs
        .getxattr(&ctx(), e.inode, &c("trusted.overlay.x"), 100)
        .unwrap()
    {
        GetxattrReply::Value(v) => assert_eq!(v, b"guest"),
        _ => panic!("value"),
    }
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("user.host"), 100)),
        libc::ENODATA
    );
    let want = b"trusted.overlay.x\0user.k\0";
    match fs.listxattr(&ctx(), e.inode, 0).unwrap() {
        ListxattrReply::Count(n) => assert_eq!(n as usize, want.len()),
        _ => panic!("size query"),
    }
    match fs.listxattr(&ctx(), e.inode, 1000).unwrap() {
        ListxattrReply::Names(mut v) => {
            let mut names: Vec<&[u8]> = v.split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
            names.sort();
            let joined: Vec<u8> = names
                .iter()
                .flat_map(|n| n.iter().copied().chain([0]))
                .collect();
            v = joined;
            assert_eq!(v, want);
        }
        _ => panic!("names"),
    }
    assert_eq!(err(fs.listxattr(&ctx(), e.inode, 5)), libc::ERANGE);
    fs.removexattr(&ctx(), e.inode, &c("user.k")).unwrap();
    assert!(!host_names(&d.path("f")).contains(&"user.virtiofs.user.k".to_string()));

    // bad and unsupported rules.
    let map = XattrMap::parse(
        "/unsupported/all/security.selinux/security.selinux//bad/all/trusted./trusted.//ok/all///",
    )
    .unwrap();
    let (d, fs) = setup_with(|c| c.xattrmap = Some(map));
    fs::write(d.path("f"), b"").unwrap();
    let e = lookup(&fs, ROOT_INODE, "f");
    assert_eq!(
        err(fs.setxattr(&ctx(), e.inode, &c("trusted.a"), b"x", 0)),
        libc::EPERM
    );
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("trusted.a"), 100)),
        libc::ENODATA
    );
    assert_eq!(
        err(fs.setxattr(&ctx(), e.inode, &c("security.selinux"), b"x", 0)),
        libc::ENOTSUP
    );
    assert_eq!(
        err(fs.getxattr(&ctx(), e.inode, &c("security.selinux"), 100)),
        libc::ENOTSUP
    );
    fs.setxattr(&ctx(), e.inode, &c("user.ok"), b"x", 0)
        .unwrap();
    // SAFETY: valid C strings and value buffer.
    let p = CString::new(d.path("f").as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe {
            libc::setxattr(
                p.as_ptr(),
                c"trusted.host".as_ptr(),
                b"h".as_ptr().cast(),
                1,
                0,
            )
        },
        0
    );
    match fs.listxattr(&ctx(), e.inode, 1000).unwrap() {
        ListxattrReply::Names(v) => assert_eq!(v, b"user.ok\0", "trusted.* hidden"),
        _ => panic!("names"),
    }
}

#[test]
fn changed_nodes_are_sorted_and_distinct() {
    let (mut small, mut large) = ([0u64; 4], Vec::new());
    assert_eq!(sorted_distinct(&[7, 3, 7], &mut small, &mut large), [3, 7]);
    assert_eq!(sorted_distinct(&[5], &mut small, &mut large), [5]);
    assert!(sorted_distinct(&[], &mut small, &mut large).is_empty());
    let many = [9, 1, 9, 4, 1, 2];
    assert_eq!(sorted_distinct(&many, &mut small, &mut large), [1, 2, 4, 9]);
}
