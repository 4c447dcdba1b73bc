//! Coherence with the host, checked through the host agent.
//!
//! host_sees_*: a guest change (no fsync) must be visible on the host as
//! soon as the guest's system call returned.
//! coherence_host_*: a host change must be visible to the guest's next
//! system call (a stale view is reported with how long it lasted).

use std::time::{Duration, Instant};

use crate::client::Agent;
use crate::harness::{skip, Ctx, TErr, TResult};
use crate::proto::fnv1a64;
use crate::sys::{self, cmp_bytes, expect_errno, pattern, Mmap, OpExt};
use crate::{ensure, ensure_eq};
use libc::{O_RDONLY, O_RDWR, S_IFDIR, S_IFMT, S_IFREG};

const GIB: u64 = 1 << 30;

/// The host's view of `rel` must be exactly `data`.
fn host_has(a: &mut Agent, rel: &[u8], data: &[u8], when: &str) -> Result<(), String> {
    match a.hash(rel)? {
        None => Err(format!("{when}: the host does not see the file (ENOENT)")),
        Some((size, h)) => {
            if size != data.len() as u64 {
                return Err(format!(
                    "{when}: host sees size {size}, guest wrote {} bytes",
                    data.len()
                ));
            }
            ensure!(
                h == fnv1a64(data),
                "{when}: host content differs (fnv {h:016x}, guest's {:016x}, size {size})",
                fnv1a64(data)
            );
            Ok(())
        }
    }
}

fn show(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

pub fn sees_write(c: &mut Ctx) -> TResult {
    let (p, rel) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    let mut data = pattern(90, 100_123);
    let fd = sys::create(&p).op("create")?;
    sys::write_all(&fd, &data).op("write")?;
    host_has(a, &rel, &data, "after write (fd open, no fsync)")?;
    sys::pwrite_all(&fd, b"0123456789", 5000).op("pwrite")?;
    data[5000..5010].copy_from_slice(b"0123456789");
    host_has(a, &rel, &data, "after overwrite in place (no fsync)")?;
    sys::pwrite_all(&fd, b"tail", data.len() as u64).op("append")?;
    data.extend_from_slice(b"tail");
    host_has(a, &rel, &data, "after extending write (no fsync)")?;
    drop(fd);
    host_has(a, &rel, &data, "after close")?;
    // Small file, via write_file (open/write/close).
    let (q, qrel) = (c.p("small"), c.relp(b"small"));
    let a = c.agent()?;
    sys::write_file(&q, b"x").op("write small")?;
    host_has(a, &qrel, b"x", "1-byte file after close")?;
    Ok(())
}

pub fn sees_rename(c: &mut Ctx) -> TResult {
    let (f, g) = (c.p("f"), c.p("g"));
    let (rf, rg) = (c.relp(b"f"), c.relp(b"g"));
    let (d, e) = (c.p("d"), c.p("e"));
    let (rdx, rex) = (c.relp(b"d/x"), c.relp(b"e/x"));
    let a = c.agent()?;
    let data = pattern(91, 5000);
    sys::write_file(&f, &data).op("create f")?;
    sys::rename(&f, &g).op("rename f g")?;
    ensure!(
        a.stat(&rf)?.is_none(),
        "host still sees {} after rename",
        show(&rf)
    );
    host_has(a, &rg, &data, "renamed file")?;
    // Rename over an existing file.
    sys::write_file(&f, b"new f").op("create f again")?;
    sys::rename(&f, &g).op("rename f over g")?;
    ensure!(
        a.stat(&rf)?.is_none(),
        "host still sees {} after rename over g",
        show(&rf)
    );
    host_has(a, &rg, b"new f", "file renamed over another")?;
    // A directory with content.
    sys::mkdir(&d, 0o755).op("mkdir d")?;
    sys::write_file(d.join("x"), b"in d").op("create d/x")?;
    sys::rename(&d, &e).op("rename d e")?;
    ensure!(a.stat(&rdx)?.is_none(), "host still sees {}", show(&rdx));
    host_has(a, &rex, b"in d", "file inside renamed dir")?;
    Ok(())
}

pub fn sees_unlink(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let (d, rd) = (c.p("d"), c.relp(b"d"));
    let a = c.agent()?;
    sys::write_file(&f, b"doomed").op("create")?;
    ensure!(a.stat(&rf)?.is_some(), "host does not see the new file");
    let fd = sys::open(&f, O_RDONLY, 0).op("open")?;
    sys::unlink(&f).op("unlink")?;
    ensure!(
        a.stat(&rf)?.is_none(),
        "host still sees the file after unlink (guest fd open)"
    );
    drop(fd);
    ensure!(
        a.stat(&rf)?.is_none(),
        "host sees the file again after close"
    );
    sys::mkdir(&d, 0o755).op("mkdir")?;
    ensure!(a.stat(&rd)?.is_some(), "host does not see the new dir");
    sys::rmdir(&d).op("rmdir")?;
    ensure!(
        a.stat(&rd)?.is_none(),
        "host still sees the dir after rmdir"
    );
    Ok(())
}

pub fn sees_chmod(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    let fd = sys::create(&f).op("create")?;
    for mode in [0o751, 0o600, 0o4755, 0o644] {
        sys::chmod(&f, mode).op(format!("chmod {mode:o}"))?;
        let st = a.stat(&rf)?.ok_or("host does not see the file")?;
        ensure_eq!(st.mode, S_IFREG | mode, "host mode after chmod {mode:o}");
    }
    sys::fchmod(&fd, 0o640).op("fchmod")?;
    let st = a.stat(&rf)?.ok_or("host does not see the file")?;
    ensure_eq!(st.mode, S_IFREG | 0o640, "host mode after fchmod");
    Ok(())
}

pub fn sees_mkdir(c: &mut Ctx) -> TResult {
    let d = c.p("d");
    let (rd, rsub) = (c.relp(b"d"), c.relp(b"d/sub"));
    let a = c.agent()?;
    sys::mkdir(&d, 0o755).op("mkdir")?;
    let st = a.stat(&rd)?.ok_or("host does not see the new dir")?;
    ensure_eq!(st.mode, S_IFDIR | 0o755, "host mode of new dir");
    ensure_eq!(a.list(&rd)?, 0, "host entries in new dir");
    for n in ["one", "two", "three"] {
        sys::write_file(d.join(n), n.as_bytes()).op(format!("create d/{n}"))?;
    }
    sys::mkdir(d.join("sub"), 0o700).op("mkdir d/sub")?;
    ensure_eq!(
        a.list(&rd)?,
        4,
        "host entries in dir after 3 creates + mkdir"
    );
    let st = a.stat(&rsub)?.ok_or("host does not see d/sub")?;
    ensure_eq!(st.mode, S_IFDIR | 0o700, "host mode of d/sub");
    Ok(())
}

pub fn sees_xattr(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    sys::write_file(&f, b"").op("create")?;
    let val = b"hello\0world\xff";
    match sys::setxattr(&f, "user.leasefs", val, 0) {
        Ok(()) => {}
        Err(sys::Errno(libc::EOPNOTSUPP)) => {
            return skip("user xattrs refused with EOPNOTSUPP (xattr support off?)")
        }
        Err(e) => return Err(TErr::Fail(format!("setxattr: {e}"))),
    }
    ensure_eq!(
        a.xattr(&rf, b"user.leasefs")?,
        Some(val.to_vec()),
        "host value of user.leasefs"
    );
    sys::setxattr(&f, "user.leasefs", b"v2", libc::XATTR_REPLACE).op("replace")?;
    ensure_eq!(
        a.xattr(&rf, b"user.leasefs")?,
        Some(b"v2".to_vec()),
        "host value after replace"
    );
    sys::removexattr(&f, "user.leasefs").op("removexattr")?;
    ensure_eq!(
        a.xattr(&rf, b"user.leasefs")?,
        None,
        "host value after removexattr"
    );
    Ok(())
}

pub fn sees_truncate(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    let data = pattern(92, 10_000);
    sys::write_file(&f, &data).op("create")?;
    let fd = sys::open(&f, O_RDWR, 0).op("open")?;
    sys::ftruncate(&fd, 3000).op("ftruncate 3000")?;
    host_has(a, &rf, &data[..3000], "after ftruncate to 3000")?;
    sys::truncate(&f, 50_000).op("truncate 50000")?;
    let mut want = data[..3000].to_vec();
    want.resize(50_000, 0);
    host_has(a, &rf, &want, "after truncate up to 50000")?;
    sys::ftruncate(&fd, 0).op("ftruncate 0")?;
    host_has(a, &rf, b"", "after ftruncate to 0")?;
    Ok(())
}

pub fn sees_5gib(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("big"), c.relp(b"big"));
    let a = c.agent()?;
    let off = 5 * GIB + 123;
    let data = pattern(93, 1000);
    let fd = sys::create(&f).op("create")?;
    sys::pwrite_all(&fd, &data, off).op("pwrite at 5GiB+123")?;
    let st = a.stat(&rf)?.ok_or("host does not see the file")?;
    ensure_eq!(
        st.size,
        off + 1000,
        "host size after pwrite at 5GiB+123 (no fsync)"
    );
    let got = a.read(&rf, off, 1000)?;
    cmp_bytes(&got, &data, "host read at 5GiB+123")?;
    let before = a.read(&rf, off - 16, 16)?;
    cmp_bytes(&before, &[0u8; 16], "host read just below 5GiB+123")?;
    Ok(())
}

pub fn sees_mtime(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    sys::write_file(&f, b"t").op("create")?;
    sys::utimensat(
        &f,
        [
            sys::ts(1_000_000_000, 0),
            sys::ts(1_500_000_000, 987_654_321),
        ],
        0,
    )
    .op("utimensat")?;
    let st = a.stat(&rf)?.ok_or("host does not see the file")?;
    ensure_eq!(
        (st.mtime_sec, st.mtime_nsec),
        (1_500_000_000, 987_654_321),
        "host mtime after utimensat"
    );
    // A later write moves mtime forward on the host too.
    let fd = sys::open(&f, O_RDWR, 0).op("open")?;
    sys::pwrite_all(&fd, b"u", 0).op("pwrite")?;
    let st = a.stat(&rf)?.ok_or("host does not see the file")?;
    ensure!(
        st.mtime_sec > 1_500_000_000,
        "host mtime {} not updated by a write (no fsync)",
        st.mtime_sec
    );
    Ok(())
}

pub fn sees_link(c: &mut Ctx) -> TResult {
    let (f, g) = (c.p("f"), c.p("g"));
    let (rf, rg) = (c.relp(b"f"), c.relp(b"g"));
    let a = c.agent()?;
    sys::write_file(&f, b"linked").op("create")?;
    sys::link(&f, &g).op("link")?;
    ensure_eq!(a.stat(&rf)?.map(|s| s.nlink), Some(2), "host nlink of f");
    host_has(a, &rg, b"linked", "second name")?;
    sys::unlink(&f).op("unlink f")?;
    ensure_eq!(
        a.stat(&rg)?.map(|s| s.nlink),
        Some(1),
        "host nlink after unlink"
    );
    sys::symlink("g", &f).op("symlink")?;
    let st = a.stat(&rf)?.ok_or("host does not see the symlink")?;
    ensure_eq!(
        st.mode & S_IFMT,
        libc::S_IFLNK,
        "host type of guest symlink"
    );
    ensure_eq!(st.size, 1, "host size of symlink");
    Ok(())
}

pub fn sees_mmap(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    let len = 2 * 4096;
    let fd = sys::create(&f).op("create")?;
    sys::ftruncate(&fd, len as u64).op("ftruncate")?;
    let mut m = Mmap::new(
        &fd,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .op("mmap MAP_SHARED")?;
    let d = pattern(94, len);
    m.as_mut_slice().copy_from_slice(&d);
    m.msync(libc::MS_SYNC).op("msync")?;
    host_has(a, &rf, &d, "after MAP_SHARED write + msync(MS_SYNC)")?;
    Ok(())
}

// ---------------------------------------------------------------- host -> guest

/// Runs `check` now; if it fails, polls for up to 3 s to tell "stale for a
/// while" from "never", and fails either way.
fn now_or_report<F: FnMut() -> Result<(), String>>(mut check: F) -> TResult {
    let first = match check() {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        sys::sleep_ms(100);
        if check().is_ok() {
            return Err(TErr::Fail(format!(
                "{first} (stale view: correct only after {:.1} s)",
                start.elapsed().as_secs_f64()
            )));
        }
    }
    Err(TErr::Fail(format!("{first} (still wrong after 3 s)")))
}

pub fn co_create(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("new"), c.relp(b"new"));
    let a = c.agent()?;
    // Prime a negative lookup in the guest.
    expect_errno(
        sys::stat(&f),
        &[libc::ENOENT],
        "stat before the host creates it",
    )?;
    let data = pattern(95, 3000);
    a.write(&rf, 0, &data)?;
    now_or_report(|| {
        let got = sys::read_file(&f).op("guest read of host-created file")?;
        cmp_bytes(&got, &data, "guest read of host-created file")
    })
}

pub fn co_write(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    let mut data = pattern(96, 8192);
    sys::write_file(&f, &data).op("create")?;
    // Pull it into the guest's caches.
    cmp_bytes(&sys::read_file(&f).op("read")?, &data, "first read")?;
    let _ = sys::stat(&f).op("stat")?;
    // Host overwrites in place (same size).
    a.write(&rf, 100, &[0x42; 50])?;
    data[100..150].fill(0x42);
    now_or_report(|| {
        let got = sys::read_file(&f).op("guest read after host overwrite")?;
        cmp_bytes(&got, &data, "guest read after host overwrite (fresh open)")
    })?;
    // Host appends: size and data.
    a.write(&rf, 8192, b"host tail")?;
    data.extend_from_slice(b"host tail");
    now_or_report(|| {
        let st = sys::stat(&f).op("stat")?;
        ensure_eq!(
            st.st_size,
            data.len() as i64,
            "guest size after host append"
        );
        let got = sys::read_file(&f).op("guest read after host append")?;
        cmp_bytes(&got, &data, "guest read after host append")
    })
}

pub fn co_truncate(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    let data = pattern(97, 10_000);
    sys::write_file(&f, &data).op("create")?;
    cmp_bytes(&sys::read_file(&f).op("read")?, &data, "first read")?;
    a.truncate(&rf, 100)?;
    now_or_report(|| {
        let st = sys::stat(&f).op("stat")?;
        ensure_eq!(st.st_size, 100, "guest size after host truncate");
        let got = sys::read_file(&f).op("read after host truncate")?;
        cmp_bytes(&got, &data[..100], "guest read after host truncate")
    })
}

pub fn co_unlink(c: &mut Ctx) -> TResult {
    let (f, rf) = (c.p("f"), c.relp(b"f"));
    let a = c.agent()?;
    sys::write_file(&f, b"soon gone").op("create")?;
    let _ = sys::stat(&f).op("stat")?;
    a.unlink(&rf)?;
    // open(2) first: it must fail at once. (A stat(2) first may still see the name for up to
    // the daemon's entry lease, which docs/coherency.md allows; the failed open revalidates
    // the name, so the stat after it is exact too.)
    now_or_report(|| {
        expect_errno(
            sys::open(&f, O_RDONLY, 0),
            &[libc::ENOENT],
            "guest open after host unlink",
        )?;
        expect_errno(
            sys::stat(&f),
            &[libc::ENOENT],
            "guest stat after host unlink",
        )
    })
}

pub fn co_rename(c: &mut Ctx) -> TResult {
    let (f, g) = (c.p("f"), c.p("g"));
    let (rf, rg) = (c.relp(b"f"), c.relp(b"g"));
    let a = c.agent()?;
    sys::write_file(&f, b"moving").op("create")?;
    let _ = sys::stat(&f).op("stat")?;
    a.rename(&rf, &rg)?;
    // open(2) of the old name first, as in co_unlink.
    now_or_report(|| {
        expect_errno(
            sys::open(&f, O_RDONLY, 0),
            &[libc::ENOENT],
            "guest open of old name after host rename",
        )?;
        expect_errno(
            sys::stat(&f),
            &[libc::ENOENT],
            "guest stat of old name after host rename",
        )?;
        let got = sys::read_file(&g).op("guest read of new name")?;
        cmp_bytes(&got, b"moving", "guest read after host rename")
    })
}

pub fn co_mkdir(c: &mut Ctx) -> TResult {
    let dir = c.dir.clone();
    let (rsub, rx) = (c.relp(b"sub"), c.relp(b"sub/x"));
    let a = c.agent()?;
    let _ = sys::list_dir(&dir).op("readdir")?;
    a.mkdir(&rsub)?;
    a.write(&rx, 0, b"made on the host")?;
    now_or_report(|| {
        let names: Vec<Vec<u8>> = sys::list_dir(&dir)
            .op("readdir")?
            .into_iter()
            .map(|e| e.name)
            .collect();
        ensure!(
            names.contains(&b"sub".to_vec()),
            "guest readdir misses host-made dir 'sub'"
        );
        let st = sys::stat(dir.join("sub")).op("stat sub")?;
        ensure_eq!(st.st_mode & S_IFMT, S_IFDIR, "type of host-made dir");
        let got = sys::read_file(dir.join("sub/x")).op("read sub/x")?;
        cmp_bytes(&got, b"made on the host", "file in host-made dir")
    })
}
