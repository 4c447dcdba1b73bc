//! Every open of a host file the passthrough makes, in one place.
//!
//! Opening a file for writing has effects beyond the file: it breaks the host read lease the
//! coherence engine took on it (our own included, which would then hold us up like any host
//! writer), and it is the moment a stale guest name would make the guest write into the wrong
//! file. So there are exactly two ways to get a descriptor of a file here:
//!
//! * [`PassthroughFs::open_read`] with [`ReadOnly`] flags, which cannot express write access
//!   or truncation (the type refuses them when it is made);
//! * [`PassthroughFs::open_for_write`] (an existing inode: OPEN for writing, SETATTR's
//!   truncate, a POSIX lock's descriptor) and [`PassthroughFs::create_for_write`] (CREATE and
//!   TMPFILE, which may open an existing name), which first tell the lease keeper
//!   (`LeaseKeeper::begin_write`) and only then open.
//!
//! The system call that opens with write access, [`open_writable`], is private to this module,
//! and `util::openat` refuses write access and truncation, so no other path can open a file for
//! writing without passing here.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::Ordering;

use super::inode::InodeData;
use super::util::{check, ebadf, einval, fd_name, is_safe_inode, openat};
use super::PassthroughFs;

/// Flags that write: access mode other than O_RDONLY, truncation, creation.
const WRITE_FLAGS: i32 = libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_CREAT;

/// Whether `flags` open for writing or change the file (what must pass the choke point).
pub(crate) fn writes(flags: i32) -> bool {
    flags & WRITE_FLAGS != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE
}

/// Open flags that neither write nor truncate. Made only by [`ReadOnly::new`], which refuses
/// anything else, so a `ReadOnly` can be handed to [`PassthroughFs::open_read`] safely.
#[derive(Clone, Copy, Debug)]
pub struct ReadOnly(i32);

impl ReadOnly {
    /// `O_RDONLY` plus `extra` (e.g. O_NONBLOCK, O_NOATIME, O_DIRECTORY); EINVAL if `extra`
    /// asks for write access, truncation or creation.
    pub fn new(extra: i32) -> io::Result<Self> {
        if writes(extra) {
            return Err(einval());
        }
        Ok(ReadOnly(extra | libc::O_RDONLY))
    }

    fn flags(self) -> i32 {
        self.0
    }
}

/// Flags we never pass when reopening an existing inode through /proc: creation and O_PATH
/// make no sense there, and O_NOFOLLOW would refuse the magic link itself.
const REOPEN_STRIP: i32 = libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_NOFOLLOW
    | libc::O_PATH
    | (libc::O_TMPFILE & !libc::O_DIRECTORY);

/// `open(O_RDONLY|O_TRUNC)`: Linux truncates without breaking read leases (it calls
/// `break_lease` only for write access), so other node ids of the file (aliases the guest
/// caches apart) would keep serving the old bytes.
fn truncates_read_only(flags: i32) -> bool {
    flags & libc::O_ACCMODE == libc::O_RDONLY && flags & libc::O_TRUNC != 0
}

/// Break every read lease on `name` in `dir` (a regular file) and wait, as a host writer
/// would, by opening it for writing once; for [`truncates_read_only`]. A failure is left to
/// the real open that follows (it needs write permission just the same).
fn break_read_leases(dir: RawFd, name: &CStr) {
    let _ = open_writable(dir, name, libc::O_WRONLY | libc::O_NOCTTY, 0);
}

/// The one `openat` allowed to open for writing or truncate (see the module documentation).
fn open_writable(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> io::Result<File> {
    // SAFETY: `name` is NUL-terminated; the returned descriptor is ours alone.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

impl PassthroughFs {
    /// Open the inode for reading through its /proc/self/fd entry (the magic link leads to the
    /// inode itself, never through a symlink's text). Only regular files and directories.
    pub(crate) fn open_read(&self, data: &InodeData, flags: ReadOnly) -> io::Result<File> {
        if !is_safe_inode(data.mode) {
            return Err(ebadf());
        }
        if let Some(keeper) = self.leases.get() {
            keeper.before_read_open(data);
        }
        let fd = data.fd()?;
        openat(
            self.proc_self_fd.as_raw_fd(),
            &fd_name(fd.as_raw_fd()),
            flags.flags() & !REOPEN_STRIP,
            0,
        )
    }

    /// Open the existing inode `data` with `flags`, which may write or truncate: the lease
    /// keeper hears of it first (it gives up the daemon's own host lease, unless a host writer
    /// is already held for the guest's lease: then this open waits in the kernel like that
    /// writer, see `LeaseKeeper::begin_write`). Read-only flags are fine too.
    pub(crate) fn open_for_write(&self, data: &InodeData, flags: i32) -> io::Result<File> {
        if !is_safe_inode(data.mode) {
            return Err(ebadf());
        }
        self.refuse_if_executing(data)?;
        let fd = data.fd()?;
        let path = fd_name(fd.as_raw_fd());
        self.writing(data, || {
            if truncates_read_only(flags) {
                break_read_leases(self.proc_self_fd.as_raw_fd(), &path);
            }
            open_writable(
                self.proc_self_fd.as_raw_fd(),
                &path,
                flags & !REOPEN_STRIP,
                0,
            )
        })
    }

    /// ETXTBSY while the guest executes the host inode of `data` (through this node or an
    /// alias of it): what the guest's kernel answers for a write open of a running program,
    /// answered here as well since an OPEN with O_TRUNC reaches us before the guest checks
    /// (ATOMIC_O_TRUNC), and a CREATE of an existing name before it knows the file exists.
    fn refuse_if_executing(&self, data: &InodeData) -> io::Result<()> {
        let executing = |d: &InodeData| d.exec_handles.load(Ordering::SeqCst) > 0;
        if executing(data)
            || self
                .inodes
                .nodes_of(&data.id)
                .into_iter()
                .filter(|&n| n != data.inode)
                .any(|n| self.inodes.get(n).is_some_and(|d| executing(&d)))
        {
            return Err(io::Error::from_raw_os_error(libc::ETXTBSY));
        }
        Ok(())
    }

    /// CREATE and TMPFILE: open `name` in `dir` (whose descriptor is `dir_fd`) with `flags`
    /// (O_CREAT, O_TMPFILE...) and `mode`. Without O_EXCL the name may already lead to a file
    /// the guest or the lease keeper knows: then that inode passes
    /// [`open_for_write`](Self::open_for_write)'s gate too. Runs with the caller's
    /// credentials, which the caller has set: so `dir_fd` is taken before (a node held by
    /// file handle is opened with CAP_DAC_READ_SEARCH, which the guest's user lacks).
    pub(crate) fn create_for_write(
        &self,
        dir: &InodeData,
        dir_fd: &impl AsRawFd,
        name: &CStr,
        flags: i32,
        mode: u32,
    ) -> io::Result<File> {
        let tmpfile = flags & libc::O_TMPFILE == libc::O_TMPFILE;
        let existing = if tmpfile || flags & libc::O_EXCL != 0 {
            None
        } else {
            self.node_at(dir, name)
                .and_then(|node| self.inodes.get(node))
        };
        let dir = dir_fd;
        if let Some(data) = &existing {
            if flags & (libc::O_TRUNC | libc::O_ACCMODE) != 0 {
                self.refuse_if_executing(data)?;
            }
        }
        match existing {
            Some(data) => self.writing(&data, || {
                if truncates_read_only(flags) && data.mode == libc::S_IFREG {
                    break_read_leases(dir.as_raw_fd(), name);
                }
                open_writable(dir.as_raw_fd(), name, flags, mode)
            }),
            None => open_writable(dir.as_raw_fd(), name, flags, mode),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_flags_cannot_write() {
        assert!(ReadOnly::new(libc::O_NONBLOCK | libc::O_NOATIME).is_ok());
        assert!(ReadOnly::new(libc::O_DIRECTORY).is_ok());
        for bad in [
            libc::O_WRONLY,
            libc::O_RDWR,
            libc::O_TRUNC,
            libc::O_CREAT,
            libc::O_TMPFILE,
        ] {
            assert!(ReadOnly::new(bad).is_err(), "flags {bad:#o} accepted");
        }
    }

    #[test]
    fn the_general_openat_refuses_to_write() {
        let dir = tempfile_dir();
        let f = openat(libc::AT_FDCWD, &dir, libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        for bad in [
            libc::O_WRONLY | libc::O_CREAT,
            libc::O_RDWR | libc::O_CREAT,
            libc::O_RDONLY | libc::O_TRUNC | libc::O_CREAT,
        ] {
            let e = openat(f.as_raw_fd(), c"x", bad, 0o600).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "flags {bad:#o}");
        }
        let _ = std::fs::remove_dir_all(std::path::Path::new(dir.to_str().unwrap()));
    }

    fn tempfile_dir() -> std::ffi::CString {
        let p = std::env::temp_dir().join(format!("leasefs-open-test-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        std::ffi::CString::new(p.to_str().unwrap()).unwrap()
    }
}
