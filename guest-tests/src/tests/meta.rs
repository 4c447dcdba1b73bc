//! Metadata: modes, owners, timestamps, stat fields, statfs.

use crate::harness::{note, skip, Ctx, TResult};
use crate::sys::{self, file_type, ts, type_name, OpExt};
use crate::{ensure, ensure_eq};
use libc::{O_RDONLY, O_RDWR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG};

fn perms(st: &sys::Stat) -> u32 {
    st.st_mode & 0o7777
}

pub fn chmod(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::create(&p).op("create")?;
    for mode in [0o640, 0o600, 0o777, 0o000, 0o4755, 0o2750, 0o1644, 0o644] {
        sys::chmod(&p, mode).op(format!("chmod {mode:o}"))?;
        let st = sys::stat(&p).op("stat")?;
        ensure_eq!(perms(&st), mode, "mode after chmod {mode:o}");
        ensure_eq!(file_type(&st), S_IFREG, "file type after chmod");
    }
    sys::fchmod(&fd, 0o751).op("fchmod 751")?;
    ensure_eq!(
        perms(&sys::fstat(&fd).op("fstat")?),
        0o751,
        "mode after fchmod"
    );
    ensure_eq!(
        perms(&sys::stat(&p).op("stat")?),
        0o751,
        "mode by path after fchmod"
    );
    // Directories too; root can still list a 000 directory.
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    sys::chmod(&d, 0o700).op("chmod dir 700")?;
    ensure_eq!(perms(&sys::stat(&d).op("stat dir")?), 0o700, "dir mode");
    sys::chmod(&d, 0o1777).op("chmod dir 1777")?;
    ensure_eq!(
        perms(&sys::stat(&d).op("stat dir")?),
        0o1777,
        "dir mode (sticky)"
    );
    // chmod of a missing file.
    sys::expect_errno(
        sys::chmod(c.p("missing"), 0o644),
        &[libc::ENOENT],
        "chmod missing",
    )?;
    Ok(())
}

pub fn chown(c: &mut Ctx) -> TResult {
    if unsafe { libc::geteuid() } != 0 {
        return skip("chown needs root");
    }
    let p = c.p("f");
    let fd = sys::create(&p).op("create")?;
    sys::chown(&p, 1234, 5678).op("chown 1234:5678")?;
    let st = sys::stat(&p).op("stat")?;
    ensure_eq!((st.st_uid, st.st_gid), (1234, 5678), "owner after chown");
    sys::fchown(&fd, u32::MAX, 42).op("fchown -1:42")?;
    let st = sys::fstat(&fd).op("fstat")?;
    ensure_eq!(
        (st.st_uid, st.st_gid),
        (1234, 42),
        "owner after fchown -1:42"
    );
    // lchown changes the link, not its target.
    let l = c.p("l");
    sys::symlink("f", &l).op("symlink")?;
    sys::lchown(&l, 7, 8).op("lchown")?;
    let lst = sys::lstat(&l).op("lstat")?;
    ensure_eq!(
        (lst.st_uid, lst.st_gid),
        (7, 8),
        "symlink owner after lchown"
    );
    let st = sys::stat(&p).op("stat target")?;
    ensure_eq!(
        (st.st_uid, st.st_gid),
        (1234, 42),
        "target owner after lchown of link"
    );
    // chown follows symlinks.
    sys::chown(&l, 99, 98).op("chown via symlink")?;
    let st = sys::stat(&p).op("stat target")?;
    ensure_eq!(
        (st.st_uid, st.st_gid),
        (99, 98),
        "target owner after chown via link"
    );
    // Linux clears set-user-ID/set-group-ID on chown of an executable file.
    sys::chmod(&p, 0o6755).op("chmod 6755")?;
    ensure_eq!(
        perms(&sys::stat(&p).op("stat")?),
        0o6755,
        "mode before chown"
    );
    sys::chown(&p, 1, 1).op("chown 1:1 of setuid file")?;
    let m = perms(&sys::stat(&p).op("stat")?);
    ensure!(
        m & 0o6000 == 0,
        "chown did not clear setuid/setgid: mode {m:o}, expected 755"
    );
    // Directories keep their owner change.
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    sys::chown(&d, 4321, 8765).op("chown dir")?;
    let st = sys::stat(&d).op("stat dir")?;
    ensure_eq!((st.st_uid, st.st_gid), (4321, 8765), "dir owner");
    // Back to root so cleanup cannot trip over anything.
    sys::chown(&p, 0, 0).op("chown back to root")?;
    Ok(())
}

fn times(st: &sys::Stat) -> ((i64, i64), (i64, i64)) {
    (
        (st.st_atime, st.st_atime_nsec),
        (st.st_mtime, st.st_mtime_nsec),
    )
}

pub fn utimensat(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::create(&p).op("create")?;
    let a = ts(1_000_000_000, 123_456_789);
    let m = ts(1_500_000_000, 987_654_321);
    sys::utimensat(&p, [a, m], 0).op("utimensat")?;
    let st = sys::stat(&p).op("stat")?;
    ensure_eq!(
        times(&st),
        ((1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321)),
        "(atime, mtime) after utimensat"
    );
    // UTIME_OMIT keeps atime, sets mtime.
    sys::utimensat(&p, [ts(0, libc::UTIME_OMIT), ts(1_600_000_000, 1)], 0)
        .op("utimensat UTIME_OMIT")?;
    let st = sys::stat(&p).op("stat")?;
    ensure_eq!(
        times(&st),
        ((1_000_000_000, 123_456_789), (1_600_000_000, 1)),
        "(atime, mtime) after UTIME_OMIT for atime"
    );
    // futimens on the descriptor.
    sys::futimens(&fd, [ts(1_100_000_000, 5), ts(1_200_000_000, 999_999_999)]).op("futimens")?;
    let st = sys::fstat(&fd).op("fstat")?;
    ensure_eq!(
        times(&st),
        ((1_100_000_000, 5), (1_200_000_000, 999_999_999)),
        "(atime, mtime) after futimens"
    );
    // UTIME_NOW: somewhere near the current time (clocks of guest and host
    // may differ a little, so allow a day).
    sys::utimensat(&p, [ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)], 0)
        .op("utimensat UTIME_NOW")?;
    let st = sys::stat(&p).op("stat")?;
    let (now, _) = sys::now_realtime();
    ensure!(
        (st.st_mtime - now).abs() < 86_400,
        "mtime after UTIME_NOW is {} but now is {now}",
        st.st_mtime
    );
    ensure_eq!(
        st.st_atime,
        1_100_000_000,
        "atime after UTIME_NOW for mtime only"
    );
    // AT_SYMLINK_NOFOLLOW sets the link's own times.
    let l = c.p("l");
    sys::symlink("f", &l).op("symlink")?;
    sys::utimensat(
        &l,
        [ts(1_300_000_000, 0), ts(1_300_000_000, 42)],
        libc::AT_SYMLINK_NOFOLLOW,
    )
    .op("utimensat AT_SYMLINK_NOFOLLOW")?;
    let lst = sys::lstat(&l).op("lstat")?;
    ensure_eq!(
        (lst.st_mtime, lst.st_mtime_nsec),
        (1_300_000_000, 42),
        "symlink mtime"
    );
    let st = sys::stat(&p).op("stat target")?;
    ensure!(
        st.st_mtime != 1_300_000_000,
        "utimensat(AT_SYMLINK_NOFOLLOW) changed the target's mtime"
    );
    // Directory.
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    sys::utimensat(&d, [a, m], 0).op("utimensat dir")?;
    ensure_eq!(
        times(&sys::stat(&d).op("stat dir")?),
        ((1_000_000_000, 123_456_789), (1_500_000_000, 987_654_321)),
        "dir (atime, mtime)"
    );
    Ok(())
}

pub fn dir_mtime(c: &mut Ctx) -> TResult {
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    let old = [ts(1_000_000_000, 0), ts(1_000_000_000, 0)];
    let check = |what: &str| -> Result<(), String> {
        let st = sys::stat(&d).op("stat dir")?;
        ensure!(
            st.st_mtime > 1_000_000_000 && st.st_ctime > 1_000_000_000,
            "directory mtime/ctime not updated by {what}: mtime {} ctime {}",
            st.st_mtime,
            st.st_ctime
        );
        sys::utimensat(&d, old, 0).op("reset dir times")?;
        Ok(())
    };
    sys::utimensat(&d, old, 0).op("utimensat dir")?;
    sys::write_file(d.join("a"), b"x").op("create d/a")?;
    check("create")?;
    sys::rename(d.join("a"), d.join("b")).op("rename a b")?;
    check("rename within")?;
    sys::mkdir(d.join("sub"), 0o755).op("mkdir sub")?;
    check("mkdir")?;
    sys::unlink(d.join("b")).op("unlink b")?;
    check("unlink")?;
    sys::rmdir(d.join("sub")).op("rmdir sub")?;
    check("rmdir")?;
    Ok(())
}

pub fn stat(c: &mut Ctx) -> TResult {
    // umask is 022 for the whole run.
    let f = c.p("f");
    let fd = sys::open(&f, O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o666).op("create")?;
    sys::write_all(&fd, &[7u8; 8192]).op("write 8192")?;
    sys::fsync(&fd).op("fsync")?;
    let st = sys::stat(&f).op("stat file")?;
    ensure_eq!(st.st_mode, S_IFREG | 0o644, "file mode (0666 & ~022)");
    ensure_eq!(st.st_size, 8192, "file size");
    ensure_eq!(st.st_nlink, 1, "file nlink");
    ensure!(st.st_blksize > 0, "st_blksize is {}", st.st_blksize);
    ensure!(
        st.st_blocks * 512 >= 8192,
        "st_blocks {} too small for 8192 written bytes",
        st.st_blocks
    );
    ensure_eq!(
        (st.st_uid, st.st_gid),
        unsafe { (libc::geteuid(), libc::getegid()) },
        "new file owner"
    );
    let st2 = sys::stat(&f).op("stat again")?;
    ensure_eq!(st2.st_ino, st.st_ino, "inode number stable");
    ensure_eq!(st2.st_dev, st.st_dev, "st_dev stable");

    let d = c.p("d");
    sys::mkdir(&d, 0o777).op("mkdir")?;
    let dst = sys::stat(&d).op("stat dir")?;
    ensure_eq!(dst.st_mode, S_IFDIR | 0o755, "dir mode (0777 & ~022)");
    ensure!(
        dst.st_ino != st.st_ino,
        "file and dir share inode {}",
        st.st_ino
    );
    sys::mkdir(d.join("sub"), 0o755).op("mkdir sub")?;
    let n1 = sys::stat(&d).op("stat dir")?.st_nlink;
    // Filesystems that count subdirectories: 2 -> 3; others report 1.
    ensure!(
        (dst.st_nlink == 2 && n1 == 3) || (dst.st_nlink == 1 && n1 == 1),
        "dir nlink {} then {} after mkdir of a subdir (expected 2 then 3)",
        dst.st_nlink,
        n1
    );

    let l = c.p("l");
    sys::symlink("some/target", &l).op("symlink")?;
    let lst = sys::lstat(&l).op("lstat symlink")?;
    ensure_eq!(file_type(&lst), S_IFLNK, "symlink type");
    ensure_eq!(lst.st_size, 11, "symlink size (target length)");
    let ff = c.p("fifo");
    sys::mknod(&ff, S_IFIFO | 0o666, 0).op("mkfifo")?;
    ensure_eq!(
        sys::stat(&ff).op("stat fifo")?.st_mode,
        S_IFIFO | 0o644,
        "fifo mode"
    );
    // stat via symlink follows it.
    sys::symlink("f", c.p("lf")).op("symlink to f")?;
    let via = sys::stat(c.p("lf")).op("stat via symlink")?;
    ensure!(
        via.st_ino == st.st_ino && file_type(&via) == S_IFREG,
        "stat through symlink gave a {} with ino {}, expected the file (ino {})",
        type_name(via.st_mode),
        via.st_ino,
        st.st_ino
    );
    // fstatat on a dir fd.
    let dfd = c.dirfd()?;
    let at = sys::fstatat(&dfd, "f", 0).op("fstatat")?;
    ensure_eq!(at.st_ino, st.st_ino, "fstatat ino");
    Ok(())
}

pub fn fstat_after_write(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::create(&p).op("create")?;
    sys::futimens(&fd, [ts(1_000_000_000, 0), ts(1_000_000_000, 0)]).op("futimens")?;
    sys::write_all(&fd, &[1u8; 12345]).op("write 12345")?;
    let st = sys::fstat(&fd).op("fstat")?;
    ensure_eq!(st.st_size, 12345, "fstat size after write (fd still open)");
    ensure!(
        st.st_mtime > 1_000_000_000,
        "write did not update mtime: {}",
        st.st_mtime
    );
    sys::pwrite_all(&fd, b"z", 20_000).op("pwrite at 20000")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        20_001,
        "fstat size after pwrite"
    );
    ensure_eq!(
        sys::stat(&p).op("stat")?.st_size,
        20_001,
        "stat size after pwrite"
    );
    // Another descriptor sees the size too.
    let fd2 = sys::open(&p, O_RDONLY, 0).op("open 2")?;
    ensure_eq!(
        sys::fstat(&fd2).op("fstat 2")?.st_size,
        20_001,
        "size via second fd"
    );
    Ok(())
}

pub fn statfs(c: &mut Ctx) -> TResult {
    let s = sys::statfs(&c.dir).op("statfs")?;
    ensure!(s.f_bsize > 0, "f_bsize is {}", s.f_bsize);
    ensure!(s.f_blocks > 0, "f_blocks is 0");
    ensure!(
        s.f_bfree <= s.f_blocks,
        "f_bfree {} > f_blocks {}",
        s.f_bfree,
        s.f_blocks
    );
    ensure!(
        s.f_bavail <= s.f_bfree,
        "f_bavail {} > f_bfree {}",
        s.f_bavail,
        s.f_bfree
    );
    ensure!(s.f_namelen >= 255, "f_namelen is {}", s.f_namelen);
    if s.f_files > 0 {
        ensure!(
            s.f_ffree <= s.f_files,
            "f_ffree {} > f_files {}",
            s.f_ffree,
            s.f_files
        );
    }
    let fd = c.dirfd()?;
    let s2 = sys::fstatfs(&fd).op("fstatfs")?;
    ensure_eq!(s2.f_blocks, s.f_blocks, "fstatfs f_blocks vs statfs");
    ensure_eq!(s2.f_bsize, s.f_bsize, "fstatfs f_bsize vs statfs");
    let r = sys::statfs(&c.root).op("statfs of the mount root")?;
    ensure_eq!(r.f_type, s.f_type, "f_type of root vs subdir");
    note(format!(
        "f_type {:#x} bsize {} blocks {} bfree {} namelen {}",
        s.f_type, s.f_bsize, s.f_blocks, s.f_bfree, s.f_namelen
    ));
    Ok(())
}
