//! Thin, checked wrappers around the system calls the passthrough needs, plus the thread-local
//! guards (credentials, umask, working directory, CAP_FSETID) that requests run under.
//!
//! Every guard here changes only the *calling thread*: credentials through raw `setresuid` /
//! `setresgid` system calls (glibc's wrappers would broadcast the change to every thread of
//! the process), capabilities through raw `capset`, and umask / working directory after the
//! thread has left the process-wide `fs_struct` with `unshare(CLONE_FS)`.

use std::cell::Cell;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use fuse_backend_rs::abi::fuse_abi::stat64;

pub(crate) fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

pub(crate) fn ebadf() -> io::Error {
    errno(libc::EBADF)
}

pub(crate) fn einval() -> io::Error {
    errno(libc::EINVAL)
}

/// Turn a `-1 / errno` return into an `io::Error`.
pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_ssize(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

pub(crate) const EMPTY: &CStr = c"";

/// A name the guest wants created, removed or renamed must be a single path component:
/// anything else would let it reach outside the directory the request names.
pub(crate) fn validate_name(name: &CStr) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(einval());
    }
    Ok(())
}

/// `openat` that always adds O_CLOEXEC; `flags` carry O_NOFOLLOW where it matters. It never
/// opens for writing, truncates or creates (EINVAL): that goes through `open.rs`, the one
/// place that tells the coherence engine first.
pub(crate) fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<File> {
    if super::open::writes(flags) {
        return Err(einval());
    }
    // SAFETY: `name` is NUL-terminated; the returned descriptor is ours alone.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The name of a descriptor of ours inside /proc/self/fd.
pub(crate) fn fd_name(fd: RawFd) -> FdName {
    FdName::new(fd)
}

/// Run `f` on `bytes` as a C string (`None` if they hold a NUL): on the stack for a name of
/// up to NAME_MAX bytes, the longest a host filesystem gives, else in a `CString`.
pub(crate) fn with_cstr<R>(bytes: &[u8], f: impl FnOnce(&CStr) -> R) -> Option<R> {
    let mut buf = [0u8; 256];
    if bytes.len() < buf.len() {
        buf[..bytes.len()].copy_from_slice(bytes);
        return CStr::from_bytes_with_nul(&buf[..=bytes.len()]).ok().map(f);
    }
    std::ffi::CString::new(bytes).ok().map(|c| f(&c))
}

/// A descriptor's decimal name, NUL-terminated on the stack: many requests open or link
/// through `/proc/self/fd/N`, and a `CString` of `N` cost two allocations and the formatter.
#[derive(Clone, Copy)]
pub(crate) struct FdName {
    /// The digits (a minus sign first for a negative number) end at `buf[11]`, the NUL.
    buf: [u8; 12],
    start: usize,
}

impl FdName {
    fn new(fd: RawFd) -> Self {
        let mut buf = [0u8; 12];
        let mut at = buf.len() - 1;
        let mut n = fd.unsigned_abs();
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if fd < 0 {
            at -= 1;
            buf[at] = b'-';
        }
        FdName { buf, start: at }
    }
}

impl std::ops::Deref for FdName {
    type Target = CStr;

    fn deref(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.buf[self.start..]).expect("digits and one NUL")
    }
}

/// Only regular files and directories may be opened for I/O: opening a FIFO would block the
/// request thread, and opening a device node would hand the guest a host device.
pub(crate) fn is_safe_inode(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR)
}

pub(crate) fn is_dir(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFDIR
}

/// What `statx` tells us about an inode: its attributes in the FUSE wire format and the mount
/// it lives on (part of its identity: a bind mount can show the same (dev, ino) twice).
pub(crate) struct StatxInfo {
    pub st: stat64,
    pub mnt_id: u64,
}

/// `statx` of the inode `fd` refers to itself (never a symlink's target).
pub(crate) fn statx_fd(fd: RawFd) -> io::Result<StatxInfo> {
    statx_at(fd, EMPTY, libc::AT_EMPTY_PATH)
}

pub(crate) fn statx_at(dir: RawFd, name: &CStr, extra: i32) -> io::Result<StatxInfo> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `stx` is a properly sized, writable statx buffer; `name` is NUL-terminated.
    check(unsafe {
        libc::statx(
            dir,
            name.as_ptr(),
            extra | libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_SYNC_AS_STAT,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled the buffer (which was zeroed to begin with anyway).
    let stx = unsafe { stx.assume_init() };
    // SAFETY: stat64 is plain old data; all-zero is a valid value.
    let mut st: stat64 = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    st.st_ino = stx.stx_ino;
    st.st_nlink = stx.stx_nlink as _;
    st.st_mode = stx.stx_mode as _;
    st.st_uid = stx.stx_uid;
    st.st_gid = stx.stx_gid;
    st.st_rdev = libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor);
    st.st_size = stx.stx_size as _;
    st.st_blksize = stx.stx_blksize as _;
    st.st_blocks = stx.stx_blocks as _;
    st.st_atime = stx.stx_atime.tv_sec;
    st.st_atime_nsec = stx.stx_atime.tv_nsec as _;
    st.st_mtime = stx.stx_mtime.tv_sec;
    st.st_mtime_nsec = stx.stx_mtime.tv_nsec as _;
    st.st_ctime = stx.stx_ctime.tv_sec;
    st.st_ctime_nsec = stx.stx_ctime.tv_nsec as _;
    let mnt_id = if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        stx.stx_mnt_id
    } else {
        0
    };
    Ok(StatxInfo { st, mnt_id })
}

/// One batch of `getdents64` output into `buf`, replacing what it held: up to its capacity,
/// which is never zeroed first (READDIR reuses one buffer of up to 64 KiB per request, and
/// clearing it cost more than the entries it returns).
pub(crate) fn getdents(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    let room = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most `room.len()` bytes into `room`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd,
            room.as_mut_ptr(),
            room.len() as libc::c_ulong,
        )
    };
    let n = check_long(n)? as usize;
    // SAFETY: the kernel initialised the first `n` bytes (n <= capacity).
    unsafe { buf.set_len(n.min(buf.capacity())) };
    Ok(())
}

/// A directory entry decoded from `getdents64` output.
pub(crate) struct RawDirent<'a> {
    pub ino: u64,
    pub off: u64,
    pub type_: u32,
    pub name: &'a [u8],
}

/// Iterate over `linux_dirent64` records. The kernel produced the buffer, but every length is
/// still checked so a short or odd buffer ends the iteration instead of reading out of bounds.
pub(crate) fn parse_dirents(buf: &[u8]) -> impl Iterator<Item = RawDirent<'_>> {
    // d_ino (8), d_off (8), d_reclen (2), d_type (1), then the NUL-terminated name.
    const HEADER: usize = 19;
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let rest = buf.get(pos..)?;
        if rest.len() < HEADER {
            return None;
        }
        let ino = u64::from_ne_bytes(rest[0..8].try_into().ok()?);
        let off = u64::from_ne_bytes(rest[8..16].try_into().ok()?);
        let reclen = u16::from_ne_bytes(rest[16..18].try_into().ok()?) as usize;
        let type_ = rest[18] as u32;
        if reclen < HEADER || reclen > rest.len() {
            return None;
        }
        let raw_name = &rest[HEADER..reclen];
        let len = raw_name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(raw_name.len());
        pos += reclen;
        Some(RawDirent {
            ino,
            off,
            type_,
            name: &raw_name[..len],
        })
    })
}

pub(crate) fn lseek(fd: RawFd, offset: i64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek touches no memory of ours.
    let r = unsafe { libc::lseek64(fd, offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

pub(crate) fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: usize,
    flags: u32,
) -> io::Result<usize> {
    let mut off_in = i64::try_from(off_in).map_err(|_| einval())?;
    let mut off_out = i64::try_from(off_out).map_err(|_| einval())?;
    // SAFETY: the offsets are valid, writable locals; no buffers of ours are involved.
    check_ssize(unsafe {
        libc::copy_file_range(fd_in, &mut off_in, fd_out, &mut off_out, len, flags)
    })
}

pub(crate) fn readlinkat(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = check_ssize(unsafe {
        libc::readlinkat(fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

// Credentials, capabilities, umask and working directory of the calling thread.

thread_local! {
    static FS_UNSHARED: Cell<bool> = const { Cell::new(false) };
}

/// Give this thread its own umask and working directory, so that the guards below do not
/// race with other request threads. Done lazily at the thread's first need, which is after
/// the daemon has set up its sandbox (a chroot taken afterwards would not reach this thread).
fn unshare_fs() -> io::Result<()> {
    if FS_UNSHARED.with(|u| u.get()) {
        return Ok(());
    }
    // SAFETY: unshare touches no memory of ours.
    check(unsafe { libc::unshare(libc::CLONE_FS) })?;
    FS_UNSHARED.with(|u| u.set(true));
    Ok(())
}

/// Run with the guest caller's effective uid/gid so new inodes get the right owner and the
/// host kernel applies the same permission checks. Root callers keep the daemon's identity.
pub(crate) struct ScopedCreds {
    uid: bool,
    gid: bool,
}

impl ScopedCreds {
    pub(crate) fn new(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<Self> {
        let mut me = ScopedCreds {
            uid: false,
            gid: false,
        };
        // gid first: once the euid is no longer 0 the thread may not change its gid.
        if gid != 0 {
            // SAFETY: raw syscall on this thread only; no memory involved.
            check_long(unsafe { libc::syscall(libc::SYS_setresgid, -1, gid, -1) })?;
            me.gid = true;
        }
        if uid != 0 {
            // SAFETY: as above.
            check_long(unsafe { libc::syscall(libc::SYS_setresuid, -1, uid, -1) })?;
            me.uid = true;
        }
        Ok(me)
    }
}

impl Drop for ScopedCreds {
    fn drop(&mut self) {
        // The saved set-user-ID stayed 0, so going back to euid 0 cannot fail for lack of
        // privilege; it also restores the effective capabilities the uid change cleared.
        if self.uid {
            // SAFETY: raw syscall on this thread only.
            if unsafe { libc::syscall(libc::SYS_setresuid, -1, 0, -1) } < 0 {
                log::error!("cannot restore euid 0: {}", io::Error::last_os_error());
            }
        }
        if self.gid {
            // SAFETY: raw syscall on this thread only.
            if unsafe { libc::syscall(libc::SYS_setresgid, -1, 0, -1) } < 0 {
                log::error!("cannot restore egid 0: {}", io::Error::last_os_error());
            }
        }
    }
}

/// Set this thread's umask for one operation and put the old one back afterwards.
pub(crate) struct ScopedUmask {
    old: libc::mode_t,
}

impl ScopedUmask {
    pub(crate) fn new(mask: u32) -> io::Result<Self> {
        unshare_fs()?;
        // SAFETY: umask cannot fail and touches no memory.
        let old = unsafe { libc::umask(mask & 0o777) };
        Ok(ScopedUmask { old })
    }
}

impl Drop for ScopedUmask {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::umask(self.old) };
    }
}

/// Make `dir` this thread's working directory, and `back` again afterwards. Used to reach an
/// O_PATH descriptor of a symlink or special file through its /proc/self/fd entry with
/// path-based calls (the xattr calls have no `*at` form that accepts O_PATH descriptors).
pub(crate) struct ScopedCwd {
    back: RawFd,
}

impl ScopedCwd {
    pub(crate) fn new(dir: &impl AsRawFd, back: &impl AsRawFd) -> io::Result<Self> {
        unshare_fs()?;
        // SAFETY: fchdir touches no memory of ours.
        check(unsafe { libc::fchdir(dir.as_raw_fd()) })?;
        Ok(ScopedCwd {
            back: back.as_raw_fd(),
        })
    }
}

impl Drop for ScopedCwd {
    fn drop(&mut self) {
        // SAFETY: as above.
        if unsafe { libc::fchdir(self.back) } < 0 {
            log::error!(
                "cannot restore the working directory: {}",
                io::Error::last_os_error()
            );
        }
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
const CAP_FSETID: u32 = 4;

/// Drop CAP_FSETID from this thread's effective set while alive, so that a write by root
/// clears the set-user-ID / set-group-ID bits as a write by the guest's unprivileged caller
/// would (the guest asks for this with FUSE_WRITE_KILL_SUIDGID).
pub(crate) struct ScopedNoFsetid {
    saved: Option<[CapData; 2]>,
}

impl ScopedNoFsetid {
    pub(crate) fn new() -> io::Result<Self> {
        let mut hdr = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: header and a two-element data array, as capability version 3 requires.
        check_long(unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) })?;
        if data[0].effective & (1 << CAP_FSETID) == 0 {
            return Ok(ScopedNoFsetid { saved: None });
        }
        let saved = data;
        data[0].effective &= !(1 << CAP_FSETID);
        // SAFETY: as above; pid 0 is this thread.
        check_long(unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) })?;
        Ok(ScopedNoFsetid { saved: Some(saved) })
    }
}

impl Drop for ScopedNoFsetid {
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            let mut hdr = CapHeader {
                version: CAP_VERSION_3,
                pid: 0,
            };
            // SAFETY: as in `new`.
            if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, saved.as_ptr()) } < 0 {
                log::error!("cannot restore CAP_FSETID: {}", io::Error::last_os_error());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_c_strings_unless_they_hold_a_nul() {
        let long = vec![b'x'; 300];
        for name in [&b""[..], b"a", &long[..255], &long[..256], &long] {
            let len = with_cstr(name, |c| c.to_bytes().len());
            assert_eq!(len, Some(name.len()));
        }
        assert_eq!(with_cstr(b"a\0b", |_| ()), None);
        let mut nul_long = long.clone();
        nul_long[280] = 0;
        assert_eq!(with_cstr(&nul_long, |_| ()), None);
    }

    #[test]
    fn descriptor_names_are_their_decimal_numbers() {
        for fd in [0, 7, 10, 255, 1_000_000, RawFd::MAX, -1, RawFd::MIN] {
            assert_eq!(fd_name(fd).to_str().unwrap(), fd.to_string());
        }
    }

    #[test]
    fn names_must_be_single_components() {
        for bad in [c"", c".", c"..", c"a/b", c"/", c"../x"] {
            assert_eq!(
                validate_name(bad).unwrap_err().raw_os_error(),
                Some(libc::EINVAL),
                "{bad:?}"
            );
        }
        for good in [c"a", c"...", c".hidden", c"a..b"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn dirent_parser_stops_at_malformed_records() {
        let mut buf = vec![0u8; 24];
        buf[0..8].copy_from_slice(&7u64.to_ne_bytes());
        buf[8..16].copy_from_slice(&42u64.to_ne_bytes());
        buf[16..18].copy_from_slice(&24u16.to_ne_bytes());
        buf[18] = libc::DT_REG;
        buf[19..21].copy_from_slice(b"ab");
        // A second record claiming more bytes than remain.
        buf.extend_from_slice(&[0u8; 19]);
        let l = buf.len();
        buf[l - 3..l - 1].copy_from_slice(&500u16.to_ne_bytes());
        let v: Vec<_> = parse_dirents(&buf).collect();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].ino, v[0].off, v[0].name), (7, 42, &b"ab"[..]));
    }
}
