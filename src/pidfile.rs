//! `<socket-path>.pid`, as virtiofsd keeps it: launchers (virtme-ng) wait for it to know the
//! daemon is listening and read from it the pid to send SIGTERM to at exit.
//!
//! The file is created (mode 0600) and `flock`ed before the socket is touched, so a second
//! daemon started on the same socket path refuses to start instead of replacing the first
//! one's socket; the pid is written once the socket listens and the daemon's SIGTERM handler is
//! in place (so a launcher that signals it at once still gets a clean exit); the file is removed when the
//! daemon ends, by whichever way: [`remove`] is async-signal-safe and works after the sandbox
//! has hidden the path, because it unlinks through a descriptor of the file's directory.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::OnceLock;

/// The directory holding the pid file (O_PATH), the locked file itself, and the pid of the
/// process that created it: only that process removes it (the namespace sandbox's serving
/// child shares the lock but must not unlink a successor's file after the parent has gone).
static DIR_FD: AtomicI32 = AtomicI32::new(-1);
static FILE_FD: AtomicI32 = AtomicI32::new(-1);
static OWNER: AtomicI32 = AtomicI32::new(0);
static INODE: AtomicU64 = AtomicU64::new(0);
static NAME: OnceLock<CString> = OnceLock::new();

/// The pid file's path for a socket path: the same path with `.pid` appended.
pub fn path_for(socket_path: &Path) -> PathBuf {
    let mut name = OsString::from(socket_path.as_os_str());
    name.push(".pid");
    PathBuf::from(name)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Create and lock the pid file of `socket_path`. Fails with a message naming the running
/// daemon's pid when another process holds the lock.
pub fn lock(socket_path: &Path) -> io::Result<()> {
    let path = path_for(socket_path);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = cstring(path.file_name().expect("ends in .pid").as_bytes())?;
    let dir_c = cstring(dir.as_os_str().as_bytes())?;
    // SAFETY: a valid C string.
    let dir_fd = unsafe {
        libc::open(
            dir_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dir_fd < 0 {
        return Err(last_error());
    }
    let fd = loop {
        // SAFETY: valid descriptor and C string. O_NOFOLLOW: a planted symlink is refused.
        let fd = unsafe {
            libc::openat(
                dir_fd,
                name.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            let e = last_error();
            // SAFETY: our descriptor.
            unsafe { libc::close(dir_fd) };
            return Err(e);
        }
        // SAFETY: our descriptor.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = last_error();
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            // SAFETY: our descriptors.
            unsafe {
                libc::close(fd);
                libc::close(dir_fd);
            }
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another daemon".to_string()
                } else {
                    format!("another daemon (pid {holder})")
                };
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("in use by {who}: {} is locked", path.display()),
                ));
            }
            return Err(e);
        }
        // The previous owner may have unlinked the file between our open and our lock: then
        // we locked a file nobody else will see. Lock the one at the path instead.
        let mut ours: libc::stat = unsafe { std::mem::zeroed() };
        let mut named: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptors, C string and out-pointers.
        let same = unsafe {
            libc::fstat(fd, &mut ours) == 0
                && libc::fstatat(dir_fd, name.as_ptr(), &mut named, libc::AT_SYMLINK_NOFOLLOW) == 0
        } && ours.st_ino == named.st_ino
            && ours.st_dev == named.st_dev;
        if same {
            INODE.store(ours.st_ino, Ordering::Relaxed);
            break fd;
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
    };
    // A file left by an earlier daemon keeps its old mode and contents otherwise.
    // SAFETY: our descriptor.
    if unsafe { libc::fchmod(fd, 0o600) } != 0 || unsafe { libc::ftruncate(fd, 0) } != 0 {
        let e = last_error();
        // SAFETY: our descriptors.
        unsafe {
            libc::unlinkat(dir_fd, name.as_ptr(), 0);
            libc::close(fd);
            libc::close(dir_fd);
        }
        return Err(e);
    }
    let _ = NAME.set(name);
    DIR_FD.store(dir_fd, Ordering::Relaxed);
    FILE_FD.store(fd, Ordering::Relaxed);
    // SAFETY: getpid cannot fail.
    OWNER.store(unsafe { libc::getpid() }, Ordering::Relaxed);
    Ok(())
}

/// Write the daemon's pid into the locked pid file, once it listens and SIGTERM to that pid
/// ends it cleanly. The pid is the host-visible one of the process that locked the file: in
/// the namespace sandbox, the parent that forwards signals to the serving child (which may
/// write it, and sees itself as pid 1).
pub fn write_pid() -> io::Result<()> {
    let fd = FILE_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return Ok(());
    }
    let text = format!("{}\n", OWNER.load(Ordering::Relaxed)).into_bytes();
    // SAFETY: our descriptor and a buffer of text.len() bytes.
    let n = unsafe { libc::pwrite(fd, text.as_ptr().cast(), text.len(), 0) };
    if n != text.len() as isize {
        return Err(last_error());
    }
    Ok(())
}

/// Remove the pid file, if this process created it. Async-signal-safe: only atomics and
/// system calls.
pub fn remove() {
    let dir_fd = DIR_FD.load(Ordering::Relaxed);
    // SAFETY: getpid cannot fail.
    if dir_fd < 0 || OWNER.load(Ordering::Relaxed) != unsafe { libc::getpid() } {
        return;
    }
    let Some(name) = NAME.get() else { return };
    let mut named: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out-pointer. Only our own file: we hold the lock,
    // so no successor can have replaced it, but someone may have removed it by hand.
    unsafe {
        if libc::fstatat(dir_fd, name.as_ptr(), &mut named, libc::AT_SYMLINK_NOFOLLOW) == 0
            && named.st_ino == INODE.load(Ordering::Relaxed)
        {
            libc::unlinkat(dir_fd, name.as_ptr(), 0);
        }
    }
    DIR_FD.store(-1, Ordering::Relaxed);
}

/// The pid file's path as given, for messages.
pub fn display(socket_path: &Path) -> String {
    let p = path_for(socket_path);
    String::from_utf8_lossy(&p.into_os_string().into_vec()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_sits_next_to_the_socket() {
        assert_eq!(
            path_for(Path::new("/run/vm0.sock")),
            Path::new("/run/vm0.sock.pid")
        );
        assert_eq!(display(Path::new("s")), "s.pid");
    }
}
