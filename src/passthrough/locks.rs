//! Guest file locks.
//!
//! POSIX (fcntl) locks belong to a lock owner (the guest's `files_struct`), not to one open
//! file. Each (inode, owner) pair gets its own host descriptor and the owner's locks are
//! open-file-description (OFD) locks on it: conflicts between owners are the host kernel's,
//! shared with every other host user of the file, and an owner's locks all vanish when its
//! descriptor is closed at FLUSH/RELEASE, as close(2) drops a process's locks.
//!
//! flock locks belong to an open file description, so they are `flock(2)` on the handle's own
//! descriptor and go away with it.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::LK_FLOCK;
use fuse_backend_rs::api::filesystem::FileLock;

use super::inode::InodeData;
use super::util::{check, einval, errno};
use super::PassthroughFs;

/// Bound on lock owners per inode, so a guest cannot pin unbounded descriptors.
const MAX_OWNERS_PER_INODE: usize = 1024;

/// The guest's lock range (inclusive end; OFFSET_MAX for "to the end") as a `struct flock`.
fn to_flock(lock: &FileLock) -> io::Result<libc::flock> {
    let l_type = match lock.lock_type as i32 {
        t @ (libc::F_RDLCK | libc::F_WRLCK | libc::F_UNLCK) => t as libc::c_short,
        _ => return Err(einval()),
    };
    let start = i64::try_from(lock.start).map_err(|_| einval())?;
    let len = if lock.end >= i64::MAX as u64 {
        0
    } else if lock.end < lock.start {
        return Err(einval());
    } else {
        (lock.end - lock.start + 1) as i64
    };
    // SAFETY: flock is plain old data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // OFD lock requests must carry pid 0.
    fl.l_pid = 0;
    Ok(fl)
}

fn from_flock(fl: &libc::flock) -> FileLock {
    if fl.l_type as i32 == libc::F_UNLCK {
        return FileLock {
            start: 0,
            end: 0,
            lock_type: libc::F_UNLCK as u32,
            pid: 0,
        };
    }
    let start = fl.l_start.max(0) as u64;
    let end = if fl.l_len == 0 {
        i64::MAX as u64
    } else {
        start.saturating_add(fl.l_len as u64 - 1)
    };
    FileLock {
        start,
        end,
        lock_type: fl.l_type as u32,
        // An OFD lock has no owning process; the host reports -1. 0 tells the guest "unknown"
        // instead of naming some unrelated guest process.
        pid: if fl.l_pid > 0 { fl.l_pid as u32 } else { 0 },
    }
}

impl PassthroughFs {
    /// The descriptor carrying `owner`'s POSIX locks on `data`, opened on first use.
    fn owner_file(&self, data: &InodeData, owner: u64) -> io::Result<Arc<std::fs::File>> {
        let mut owners = data.plocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = owners.get(&owner) {
            return Ok(f.clone());
        }
        if owners.len() >= MAX_OWNERS_PER_INODE {
            return Err(errno(libc::ENOLCK));
        }
        // Write locks need a writable descriptor (through the write-open choke point, which
        // gives up the daemon's own host lease first instead of breaking it); a read-only
        // share or file still allows read locks.
        let file = match self.open_for_write(data, libc::O_RDWR) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EROFS | libc::EACCES | libc::ETXTBSY | libc::EISDIR)
                ) =>
            {
                self.open_read(data, super::ReadOnly::new(libc::O_NONBLOCK)?)?
            }
            r => r?,
        };
        let file = Arc::new(file);
        owners.insert(owner, file.clone());
        Ok(file)
    }

    /// Drop `owner`'s POSIX locks on `inode` (FLUSH and RELEASE).
    pub(super) fn release_owner_locks(&self, inode: u64, owner: u64) {
        if let Some(data) = self.inodes.get(inode) {
            data.plocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&owner);
        }
    }

    pub(super) fn do_getlk(
        &self,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        let data = self.inode(inode)?;
        self.handle(handle, inode)?;
        if flags & LK_FLOCK != 0 {
            // flock(2) cannot test for a conflict.
            return Err(einval());
        }
        let mut fl = to_flock(&lock)?;
        let file = self.owner_file(&data, owner)?;
        // SAFETY: `fl` is a valid, writable struct flock.
        check(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
        Ok(from_flock(&fl))
    }

    pub(super) fn do_setlk(
        &self,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
        wait: bool,
    ) -> io::Result<()> {
        let data = self.inode(inode)?;
        let h = self.handle(handle, inode)?;
        if flags & LK_FLOCK != 0 {
            let op = match lock.lock_type as i32 {
                libc::F_RDLCK => libc::LOCK_SH,
                libc::F_WRLCK => libc::LOCK_EX,
                libc::F_UNLCK => libc::LOCK_UN,
                _ => return Err(einval()),
            };
            let op = if wait { op } else { op | libc::LOCK_NB };
            return retry_eintr(|| {
                // SAFETY: flock on a descriptor we own.
                check(unsafe { libc::flock(h.as_raw_fd(), op) })
            });
        }
        let fl = to_flock(&lock)?;
        if fl.l_type as i32 == libc::F_UNLCK && !has_owner(&data, owner) {
            // Nothing to unlock; avoid opening a descriptor just to close it.
            return Ok(());
        }
        // The owner map's mutex is not held while waiting: other owners must be able to
        // unlock (and thereby wake us) meanwhile.
        let file = self.owner_file(&data, owner)?;
        let cmd = if wait {
            libc::F_OFD_SETLKW
        } else {
            libc::F_OFD_SETLK
        };
        retry_eintr(|| {
            // SAFETY: `fl` is a valid struct flock.
            check(unsafe { libc::fcntl(file.as_raw_fd(), cmd, &fl) })
        })
    }
}

fn has_owner(data: &InodeData, owner: u64) -> bool {
    data.plocks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&owner)
}

fn retry_eintr(mut f: impl FnMut() -> io::Result<libc::c_int>) -> io::Result<()> {
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            r => return r.map(drop),
        }
    }
}
