//! `--security-label`: the security context the guest's LSM (SELinux) computed for an object
//! it creates (FUSE_SECURITY_CTX), stored on the new host object as the xattr it names, as
//! virtiofsd does. The label is set after the object is created; if it cannot be set, the
//! object is removed again and the request fails, so no unlabelled object is left behind.
//!
//! fuse-backend-rs knows neither the flag nor FUSE request extensions, so the FUSE layer
//! (`crate::fuse`) parses the context out of CREATE, MKDIR, MKNOD and SYMLINK and hands it to
//! the filesystem through a per-thread slot for the one request the thread is serving
//! ([`with_security_context`]).

use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::util::{check, fd_name, openat, ScopedCwd};
use super::PassthroughFs;

/// One security context from a request: the xattr name (`security.selinux`) and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityContext {
    pub name: CString,
    pub value: Vec<u8>,
}

thread_local! {
    static PENDING: RefCell<Option<SecurityContext>> = const { RefCell::new(None) };
}

/// Serve one request with `context` as the security context of what it creates; the slot is
/// empty again afterwards, whatever the request did with it.
pub fn with_security_context<R>(context: Option<SecurityContext>, serve: impl FnOnce() -> R) -> R {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            PENDING.with(|p| p.borrow_mut().take());
        }
    }
    PENDING.with(|p| *p.borrow_mut() = context);
    let _clear = Clear;
    serve()
}

/// The context of the request this thread serves, taken (each request labels one object).
pub(super) fn take_security_context() -> Option<SecurityContext> {
    PENDING.with(|p| p.borrow_mut().take())
}

impl PassthroughFs {
    /// Label the regular file CREATE just made (`file` is open on it); on failure remove
    /// `name` from `dir` again.
    pub(super) fn label_created_file(
        &self,
        dir: RawFd,
        name: &CStr,
        file: &File,
        context: &SecurityContext,
    ) -> io::Result<()> {
        let result = self.label_open_file(file, context);
        self.undo_unless_labelled(dir, name, result)
    }

    /// Label an open regular file (CREATE's, or TMPFILE's, which has no name to undo: it
    /// goes with its descriptor).
    pub(super) fn label_open_file(
        &self,
        file: &File,
        context: &SecurityContext,
    ) -> io::Result<libc::c_int> {
        let host = self.host_xattr_name(&context.name, libc::EPERM)?;
        // SAFETY: `value` is read for exactly its length; the name is NUL-terminated.
        check(unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                host.as_ptr(),
                context.value.as_ptr().cast(),
                context.value.len(),
                0,
            )
        })
    }

    /// Label what MKDIR, MKNOD or SYMLINK just made as `name` in `dir`: a device node or
    /// symlink must not be opened, so the xattr is set through /proc/self/fd on an O_PATH
    /// descriptor. On failure remove it again.
    pub(super) fn label_created_node(
        &self,
        dir: RawFd,
        name: &CStr,
        context: &SecurityContext,
    ) -> io::Result<()> {
        let result = self
            .host_xattr_name(&context.name, libc::EPERM)
            .and_then(|host| {
                let node = openat(
                    dir,
                    name,
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0,
                )?;
                let _cwd = ScopedCwd::new(&self.proc_self_fd, &self.root)?;
                let path = fd_name(node.as_raw_fd());
                // SAFETY: as above; `path` names the O_PATH descriptor inside /proc/self/fd.
                check(unsafe {
                    libc::setxattr(
                        path.as_ptr(),
                        host.as_ptr(),
                        context.value.as_ptr().cast(),
                        context.value.len(),
                        0,
                    )
                })
            });
        self.undo_unless_labelled(dir, name, result)
    }

    fn undo_unless_labelled(
        &self,
        dir: RawFd,
        name: &CStr,
        result: io::Result<libc::c_int>,
    ) -> io::Result<()> {
        let Err(e) = result else {
            return Ok(());
        };
        // SAFETY (both): a valid directory descriptor and a NUL-terminated name.
        let mut rc = unsafe { libc::unlinkat(dir, name.as_ptr(), 0) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EISDIR) {
            rc = unsafe { libc::unlinkat(dir, name.as_ptr(), libc::AT_REMOVEDIR) };
        }
        if rc < 0 {
            log::warn!(
                "security label: could not remove {name:?} after failing to label it: {}",
                io::Error::last_os_error()
            );
        }
        log::debug!("security label: cannot set it on {name:?}: {e}");
        Err(e)
    }
}
