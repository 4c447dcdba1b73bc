//! Thin, checked wrappers around the libc calls the tests use. Every wrapper
//! returns `SysResult<T>`; `OpExt::op` turns an error into a message naming
//! the operation (`open /mnt/x: ENOENT (No such file or directory)`).

use std::ffi::{CString, OsStr};
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::errno_name;

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0).to_string();
        let text = match text.rfind(" (os error") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        write!(f, "{} ({})", errno_name(self.0), text)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

pub type SysResult<T> = Result<T, Errno>;

/// Attaches the name of the failed operation to an error.
pub trait OpExt<T> {
    fn op<S: AsRef<str>>(self, what: S) -> Result<T, String>;
}

impl<T> OpExt<T> for SysResult<T> {
    fn op<S: AsRef<str>>(self, what: S) -> Result<T, String> {
        self.map_err(|e| format!("{}: {e}", what.as_ref()))
    }
}

impl<T> OpExt<T> for std::io::Result<T> {
    fn op<S: AsRef<str>>(self, what: S) -> Result<T, String> {
        self.map_err(|e| match e.raw_os_error() {
            Some(n) => format!("{}: {}", what.as_ref(), Errno(n)),
            None => format!("{}: {e}", what.as_ref()),
        })
    }
}

/// Succeeds only if `r` failed with one of `want`.
pub fn expect_errno<T: fmt::Debug>(
    r: SysResult<T>,
    want: &[i32],
    what: &str,
) -> Result<(), String> {
    let names = want
        .iter()
        .map(|&e| errno_name(e))
        .collect::<Vec<_>>()
        .join(" or ");
    match r {
        Ok(v) => {
            let mut shown = format!("{v:?}");
            if shown.len() > 60 {
                let mut cut = 57;
                while !shown.is_char_boundary(cut) {
                    cut -= 1;
                }
                shown.truncate(cut);
                shown.push_str("...");
            }
            Err(format!("{what}: succeeded ({shown}), expected {names}"))
        }
        Err(e) if want.contains(&e.0) => Ok(()),
        Err(e) => Err(format!("{what}: got {e}, expected {names}")),
    }
}

fn cvt(r: libc::c_int) -> SysResult<libc::c_int> {
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

fn cvt_l(r: isize) -> SysResult<usize> {
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

fn cvt_retry<F: FnMut() -> libc::c_int>(mut f: F) -> SysResult<libc::c_int> {
    loop {
        match cvt(f()) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r,
        }
    }
}

pub fn cpath<P: AsRef<Path>>(p: P) -> CString {
    CString::new(p.as_ref().as_os_str().as_bytes()).expect("NUL byte in path")
}

pub fn path_from_bytes(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

pub fn show<P: AsRef<Path>>(p: P) -> String {
    format!("{:?}", p.as_ref())
}

pub type Fd = OwnedFd;

pub fn fd_of(raw: RawFd) -> Fd {
    // SAFETY: callers pass a freshly returned, owned descriptor.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

// ---------------------------------------------------------------- files

pub fn open<P: AsRef<Path>>(p: P, flags: i32, mode: u32) -> SysResult<Fd> {
    let c = cpath(p);
    let fd = cvt_retry(|| unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    Ok(fd_of(fd))
}

pub fn openat<P: AsRef<Path>>(dir: &Fd, p: P, flags: i32, mode: u32) -> SysResult<Fd> {
    let c = cpath(p);
    let fd = cvt_retry(|| unsafe {
        libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, mode)
    })?;
    Ok(fd_of(fd))
}

pub fn create<P: AsRef<Path>>(p: P) -> SysResult<Fd> {
    open(p, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o644)
}

pub fn read(fd: &Fd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match cvt_l(r) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r,
        }
    }
}

pub fn pread(fd: &Fd, buf: &mut [u8], off: u64) -> SysResult<usize> {
    loop {
        let r = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off as i64,
            )
        };
        match cvt_l(r) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r,
        }
    }
}

pub fn write(fd: &Fd, buf: &[u8]) -> SysResult<usize> {
    loop {
        let r = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        match cvt_l(r) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r,
        }
    }
}

pub fn pwrite(fd: &Fd, buf: &[u8], off: u64) -> SysResult<usize> {
    loop {
        let r = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) };
        match cvt_l(r) {
            Err(Errno(libc::EINTR)) => continue,
            r => return r,
        }
    }
}

/// Writes all of `buf`; a zero-length write counts as an error (EIO).
pub fn write_all(fd: &Fd, mut buf: &[u8]) -> SysResult<()> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(Errno(libc::EIO));
        }
        buf = &buf[n..];
    }
    Ok(())
}

pub fn pwrite_all(fd: &Fd, mut buf: &[u8], mut off: u64) -> SysResult<()> {
    while !buf.is_empty() {
        let n = pwrite(fd, buf, off)?;
        if n == 0 {
            return Err(Errno(libc::EIO));
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Reads up to `len` bytes from `off`, stopping early only at end of file.
pub fn pread_full(fd: &Fd, off: u64, len: usize) -> SysResult<Vec<u8>> {
    let mut v = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = pread(fd, &mut v[got..], off + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    v.truncate(got);
    Ok(v)
}

/// Reads from the current position to end of file.
pub fn read_to_end(fd: &Fd) -> SysResult<Vec<u8>> {
    let mut v = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = read(fd, &mut buf)?;
        if n == 0 {
            return Ok(v);
        }
        v.extend_from_slice(&buf[..n]);
    }
}

/// Opens `p` read-only and returns its whole content.
pub fn read_file<P: AsRef<Path>>(p: P) -> SysResult<Vec<u8>> {
    let fd = open(p, libc::O_RDONLY, 0)?;
    read_to_end(&fd)
}

/// Creates/truncates `p` and writes `data` into it.
pub fn write_file<P: AsRef<Path>>(p: P, data: &[u8]) -> SysResult<()> {
    let fd = open(p, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    write_all(&fd, data)
}

pub fn lseek(fd: &Fd, off: i64, whence: i32) -> SysResult<i64> {
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

pub fn ftruncate(fd: &Fd, len: u64) -> SysResult<()> {
    cvt_retry(|| unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }).map(drop)
}

pub fn truncate<P: AsRef<Path>>(p: P, len: u64) -> SysResult<()> {
    let c = cpath(p);
    cvt_retry(|| unsafe { libc::truncate(c.as_ptr(), len as i64) }).map(drop)
}

pub fn fsync(fd: &Fd) -> SysResult<()> {
    cvt_retry(|| unsafe { libc::fsync(fd.as_raw_fd()) }).map(drop)
}

pub fn fdatasync(fd: &Fd) -> SysResult<()> {
    cvt_retry(|| unsafe { libc::fdatasync(fd.as_raw_fd()) }).map(drop)
}

pub fn syncfs(fd: &Fd) -> SysResult<()> {
    cvt_retry(|| unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

pub fn fallocate(fd: &Fd, mode: i32, off: u64, len: u64) -> SysResult<()> {
    cvt_retry(|| unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
}

pub fn copy_file_range(
    fd_in: &Fd,
    off_in: Option<&mut i64>,
    fd_out: &Fd,
    off_out: Option<&mut i64>,
    len: usize,
) -> SysResult<usize> {
    let pi = off_in.map_or(std::ptr::null_mut(), |p| p as *mut i64);
    let po = off_out.map_or(std::ptr::null_mut(), |p| p as *mut i64);
    let r = unsafe {
        libc::syscall(
            libc::SYS_copy_file_range,
            fd_in.as_raw_fd(),
            pi,
            fd_out.as_raw_fd(),
            po,
            len,
            0u32,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as usize)
    }
}

pub fn dup(fd: &Fd) -> SysResult<Fd> {
    Ok(fd_of(cvt(unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0)
    })?))
}

// ---------------------------------------------------------------- metadata

pub type Stat = libc::stat;

fn zeroed_stat() -> Stat {
    // SAFETY: libc::stat is plain old data.
    unsafe { std::mem::zeroed() }
}

pub fn stat<P: AsRef<Path>>(p: P) -> SysResult<Stat> {
    let c = cpath(p);
    let mut st = zeroed_stat();
    cvt(unsafe { libc::stat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn lstat<P: AsRef<Path>>(p: P) -> SysResult<Stat> {
    let c = cpath(p);
    let mut st = zeroed_stat();
    cvt(unsafe { libc::lstat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

pub fn fstat(fd: &Fd) -> SysResult<Stat> {
    let mut st = zeroed_stat();
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn fstatat<P: AsRef<Path>>(dir: &Fd, p: P, flags: i32) -> SysResult<Stat> {
    let c = cpath(p);
    let mut st = zeroed_stat();
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

pub fn exists<P: AsRef<Path>>(p: P) -> bool {
    lstat(p).is_ok()
}

pub fn file_type(st: &Stat) -> u32 {
    st.st_mode & libc::S_IFMT
}

pub fn type_name(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "regular file",
        libc::S_IFDIR => "directory",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "char device",
        libc::S_IFBLK => "block device",
        _ => "unknown type",
    }
}

pub fn statfs<P: AsRef<Path>>(p: P) -> SysResult<libc::statfs> {
    let c = cpath(p);
    // SAFETY: plain old data.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statfs(c.as_ptr(), &mut s) })?;
    Ok(s)
}

pub fn fstatfs(fd: &Fd) -> SysResult<libc::statfs> {
    // SAFETY: plain old data.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut s) })?;
    Ok(s)
}

pub fn chmod<P: AsRef<Path>>(p: P, mode: u32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::chmod(c.as_ptr(), mode) }).map(drop)
}

pub fn fchmod(fd: &Fd, mode: u32) -> SysResult<()> {
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// `u32::MAX` leaves the id unchanged.
pub fn chown<P: AsRef<Path>>(p: P, uid: u32, gid: u32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::chown(c.as_ptr(), uid, gid) }).map(drop)
}

pub fn lchown<P: AsRef<Path>>(p: P, uid: u32, gid: u32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(drop)
}

pub fn fchown(fd: &Fd, uid: u32, gid: u32) -> SysResult<()> {
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

pub fn utimensat<P: AsRef<Path>>(p: P, times: [libc::timespec; 2], flags: i32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) }).map(drop)
}

pub fn futimens(fd: &Fd, times: [libc::timespec; 2]) -> SysResult<()> {
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

// ---------------------------------------------------------------- namespace

pub fn mkdir<P: AsRef<Path>>(p: P, mode: u32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mkdir(c.as_ptr(), mode) }).map(drop)
}

pub fn mkdirat<P: AsRef<Path>>(dir: &Fd, p: P, mode: u32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

pub fn rmdir<P: AsRef<Path>>(p: P) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::rmdir(c.as_ptr()) }).map(drop)
}

pub fn unlink<P: AsRef<Path>>(p: P) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::unlink(c.as_ptr()) }).map(drop)
}

pub fn unlinkat<P: AsRef<Path>>(dir: &Fd, p: P, flags: i32) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

pub fn rename<P: AsRef<Path>, Q: AsRef<Path>>(a: P, b: Q) -> SysResult<()> {
    let (ca, cb) = (cpath(a), cpath(b));
    cvt(unsafe { libc::rename(ca.as_ptr(), cb.as_ptr()) }).map(drop)
}

pub fn renameat2<P: AsRef<Path>, Q: AsRef<Path>>(a: P, b: Q, flags: u32) -> SysResult<()> {
    let (ca, cb) = (cpath(a), cpath(b));
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

pub fn link<P: AsRef<Path>, Q: AsRef<Path>>(a: P, b: Q) -> SysResult<()> {
    let (ca, cb) = (cpath(a), cpath(b));
    cvt(unsafe { libc::link(ca.as_ptr(), cb.as_ptr()) }).map(drop)
}

pub fn linkat<P: AsRef<Path>, Q: AsRef<Path>>(
    olddir: RawFd,
    a: P,
    newdir: RawFd,
    b: Q,
    flags: i32,
) -> SysResult<()> {
    let (ca, cb) = (cpath(a), cpath(b));
    cvt(unsafe { libc::linkat(olddir, ca.as_ptr(), newdir, cb.as_ptr(), flags) }).map(drop)
}

pub fn symlink<P: AsRef<Path>, Q: AsRef<Path>>(target: P, linkpath: Q) -> SysResult<()> {
    let (ct, cl) = (cpath(target), cpath(linkpath));
    cvt(unsafe { libc::symlink(ct.as_ptr(), cl.as_ptr()) }).map(drop)
}

pub fn readlink<P: AsRef<Path>>(p: P) -> SysResult<Vec<u8>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 8192];
    let n = cvt_l(unsafe { libc::readlink(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn mknod<P: AsRef<Path>>(p: P, mode: u32, dev: u64) -> SysResult<()> {
    let c = cpath(p);
    cvt(unsafe { libc::mknod(c.as_ptr(), mode, dev) }).map(drop)
}

pub struct DirEnt {
    pub name: Vec<u8>,
    pub ino: u64,
    pub dtype: u8,
}

/// All entries of a directory except `.` and `..`, via readdir(3).
pub fn list_dir<P: AsRef<Path>>(p: P) -> SysResult<Vec<DirEnt>> {
    let fd = open(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    list_dir_fd(fd)
}

pub fn list_dir_fd(fd: Fd) -> SysResult<Vec<DirEnt>> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    let dir = unsafe { libc::fdopendir(raw) };
    if dir.is_null() {
        let e = Errno::last();
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let mut out = Vec::new();
    let res = loop {
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            let e = unsafe { *libc::__errno_location() };
            break if e == 0 { Ok(()) } else { Err(Errno(e)) };
        }
        let ent = unsafe { &*ent };
        let name = unsafe { std::ffi::CStr::from_ptr(ent.d_name.as_ptr()) }
            .to_bytes()
            .to_vec();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(DirEnt {
            name,
            ino: ent.d_ino,
            dtype: ent.d_type,
        });
    };
    unsafe { libc::closedir(dir) };
    res.map(|_| out)
}

/// Removes a tree (files, dirs, symlinks) without following symlinks.
pub fn remove_tree<P: AsRef<Path>>(p: P) -> Result<(), String> {
    let p = p.as_ref();
    match lstat(p) {
        Err(Errno(libc::ENOENT)) => Ok(()),
        Err(e) => Err(format!("lstat {}: {e}", show(p))),
        Ok(st) if file_type(&st) == libc::S_IFDIR => {
            std::fs::remove_dir_all(p).op(format!("remove tree {}", show(p)))
        }
        Ok(_) => unlink(p).op(format!("unlink {}", show(p))),
    }
}

// ---------------------------------------------------------------- xattrs

pub fn setxattr<P: AsRef<Path>>(p: P, name: &str, val: &[u8], flags: i32) -> SysResult<()> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    cvt(unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn lsetxattr<P: AsRef<Path>>(p: P, name: &str, val: &[u8], flags: i32) -> SysResult<()> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn fsetxattr(fd: &Fd, name: &str, val: &[u8], flags: i32) -> SysResult<()> {
    let n = CString::new(name).unwrap();
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            n.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            flags,
        )
    })
    .map(drop)
}

/// getxattr with a caller-sized buffer (`size` 0 asks for the length).
pub fn getxattr_sized<P: AsRef<Path>>(p: P, name: &str, size: usize) -> SysResult<Vec<u8>> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let r = cvt_l(unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, size) })?;
    if size == 0 {
        return Ok(vec![0u8; r]);
    }
    buf.truncate(r);
    Ok(buf)
}

pub fn getxattr<P: AsRef<Path>>(p: P, name: &str) -> SysResult<Vec<u8>> {
    getxattr_sized(p, name, 65536)
}

pub fn fgetxattr(fd: &Fd, name: &str) -> SysResult<Vec<u8>> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    let r = cvt_l(unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            n.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(r);
    Ok(buf)
}

pub fn listxattr<P: AsRef<Path>>(p: P) -> SysResult<Vec<Vec<u8>>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    let r = cvt_l(unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(r);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect())
}

pub fn removexattr<P: AsRef<Path>>(p: P, name: &str) -> SysResult<()> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    cvt(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(drop)
}

// ---------------------------------------------------------------- locks

pub fn flock(fd: &Fd, op: i32) -> SysResult<()> {
    cvt(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

pub fn mk_flock(ty: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: plain old data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// F_SETLK / F_SETLKW (no EINTR retry: a blocked F_SETLKW must be able to
/// be interrupted) / F_GETLK.
pub fn fcntl_lock(fd: &Fd, cmd: i32, fl: &mut libc::flock) -> SysResult<()> {
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock) }).map(drop)
}

pub fn setlk(fd: &Fd, ty: i32, start: i64, len: i64) -> SysResult<()> {
    let mut fl = mk_flock(ty, start, len);
    fcntl_lock(fd, libc::F_SETLK, &mut fl)
}

pub fn getlk(fd: &Fd, ty: i32, start: i64, len: i64) -> SysResult<libc::flock> {
    let mut fl = mk_flock(ty, start, len);
    fcntl_lock(fd, libc::F_GETLK, &mut fl)?;
    Ok(fl)
}

// ---------------------------------------------------------------- memory

pub struct Mmap {
    ptr: *mut u8,
    len: usize,
}

impl Mmap {
    pub fn new(fd: &Fd, len: usize, prot: i32, flags: i32) -> SysResult<Mmap> {
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(Mmap { ptr: p.cast(), len })
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: mapping of len bytes, alive while self is.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; callers map writable where they write.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn msync(&self, flags: i32) -> SysResult<()> {
        cvt(unsafe { libc::msync(self.ptr.cast(), self.len, flags) }).map(drop)
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A zeroed heap buffer with the given alignment (for O_DIRECT).
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, align).expect("layout");
        // SAFETY: len > 0 for every caller.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: owned allocation of layout.size() bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

// ---------------------------------------------------------------- processes, pipes, time

pub fn pipe() -> SysResult<(Fd, Fd)> {
    let mut fds = [0; 2];
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fd_of(fds[0]), fd_of(fds[1])))
}

/// poll() one descriptor; Ok(revents), 0 on timeout. EINTR is retried with
/// the remaining time.
pub fn poll_fd(fd: RawFd, events: i16, timeout: Duration) -> SysResult<i16> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = Errno::last();
            if e.0 == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        return Ok(if r == 0 { 0 } else { p.revents });
    }
}

/// A single poll() call (EINTR is returned, not retried).
pub fn poll_fd_once(fd: RawFd, events: i16, timeout: Duration) -> SysResult<i16> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let r = cvt(unsafe { libc::poll(&mut p, 1, ms) })?;
    Ok(if r == 0 { 0 } else { p.revents })
}

/// Sends one byte on a sync pipe.
pub fn send_byte(fd: &Fd, b: u8) -> Result<(), String> {
    write_all(fd, &[b]).op("sync pipe write")
}

/// Waits up to `timeout` for one byte on a sync pipe.
pub fn recv_byte(fd: &Fd, timeout: Duration) -> Result<u8, String> {
    let ev = poll_fd(fd.as_raw_fd(), libc::POLLIN, timeout).op("poll sync pipe")?;
    if ev == 0 {
        return Err(format!("sync pipe: nothing within {timeout:?}"));
    }
    let mut b = [0u8];
    match read(fd, &mut b).op("sync pipe read")? {
        0 => Err("sync pipe: peer closed without a message".into()),
        _ => Ok(b[0]),
    }
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

pub fn now_realtime() -> (i64, i64) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i64)
}

/// 8 random bytes from the kernel, as a hex string.
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if r != b.len() as isize {
        // Fall back to something unique enough.
        let (s, ns) = now_realtime();
        let pid = std::process::id() as i64;
        b = ((s ^ ns.rotate_left(20) ^ pid.rotate_left(40)) as u64).to_le_bytes();
    }
    crate::proto::hex_encode(&b)
}

// ---------------------------------------------------------------- data helpers

/// Deterministic pseudorandom bytes (xorshift64*), never all-zero.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Compares two byte strings; the error names the first difference.
pub fn cmp_bytes(got: &[u8], want: &[u8], what: &str) -> Result<(), String> {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        return Err(format!(
            "{what}: read back 0x{:02x} at offset {i}, expected 0x{:02x}",
            got[i], want[i]
        ));
    }
    if got.len() != want.len() {
        return Err(format!(
            "{what}: got {} bytes, expected {}",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

/// Checks that every byte equals `b`.
pub fn all_bytes(got: &[u8], b: u8, what: &str) -> Result<(), String> {
    match got.iter().position(|&x| x != b) {
        Some(i) => Err(format!(
            "{what}: read back 0x{:02x} at offset {i}, expected 0x{b:02x}",
            got[i]
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_varied() {
        let a = pattern(1, 1000);
        assert_eq!(a, pattern(1, 1000));
        assert_ne!(a, pattern(2, 1000));
        assert_eq!(&pattern(1, 10)[..], &a[..10]);
        let distinct: std::collections::HashSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200);
    }

    #[test]
    fn cmp_bytes_reports_first_difference() {
        assert!(cmp_bytes(b"abc", b"abc", "x").is_ok());
        let e = cmp_bytes(b"abd", b"abc", "x").unwrap_err();
        assert!(
            e.contains("offset 2") && e.contains("0x64") && e.contains("0x63"),
            "{e}"
        );
        assert!(cmp_bytes(b"ab", b"abc", "x")
            .unwrap_err()
            .contains("2 bytes"));
    }

    #[test]
    fn errno_display() {
        let s = Errno(libc::ENOENT).to_string();
        assert!(s.starts_with("ENOENT (") && !s.contains("os error"), "{s}");
        assert!(expect_errno::<()>(Err(Errno(libc::EEXIST)), &[libc::EEXIST], "x").is_ok());
        let e = expect_errno(Ok(3), &[libc::EEXIST], "open O_EXCL").unwrap_err();
        assert!(e.contains("succeeded") && e.contains("EEXIST"), "{e}");
    }
}
