//! Extended attributes, passed through when `xattr` (or `posix_acl`) is configured; otherwise
//! ENOSYS, as virtiofsd, which makes the guest stop asking.
//!
//! The xattr system calls take no O_PATH descriptors, so regular files and directories are
//! reopened read-only through /proc, and other inodes (symlinks, device nodes, FIFOs, which
//! must not be opened) are reached by name inside /proc/self/fd with the thread's working
//! directory moved there: resolving that magic link lands on the inode itself.

use std::borrow::Cow;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;

use fuse_backend_rs::api::filesystem::{GetxattrReply, ListxattrReply};

use super::inode::InodeData;
use super::util::{check, errno, fd_name, is_safe_inode, ScopedCwd};
use super::xattrmap::GuestName;
use super::PassthroughFs;

/// The kernel's upper bound on an xattr value and on a name list.
const XATTR_SIZE_MAX: usize = 65536;

/// How to reach an inode for one xattr call.
enum Target {
    Fd(std::fs::File),
    Proc {
        name: super::util::FdName,
        /// The descriptor `name` refers to, open as long as the target.
        _fd: std::fs::File,
        _cwd: ScopedCwd,
    },
}

fn check_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

impl PassthroughFs {
    fn xattr_target(&self, inode: u64) -> io::Result<Target> {
        if !(self.cfg.xattr || self.cfg.posix_acl) {
            return Err(errno(libc::ENOSYS));
        }
        let data: std::sync::Arc<InodeData> = self.inode(inode)?;
        if is_safe_inode(data.mode) {
            return Ok(Target::Fd(
                self.open_read(&data, super::ReadOnly::new(libc::O_NONBLOCK)?)?,
            ));
        }
        let fd = data.owned_fd()?;
        let cwd = ScopedCwd::new(&self.proc_self_fd, &self.root)?;
        Ok(Target::Proc {
            name: fd_name(fd.as_raw_fd()),
            _fd: fd,
            _cwd: cwd,
        })
    }

    /// The host name for the guest's attribute `name` (`--xattrmap`); `refused` is the errno
    /// for a name a `bad` rule (or no rule) refuses: EPERM, or ENODATA for a get.
    pub(super) fn host_xattr_name<'a>(
        &self,
        name: &'a CStr,
        refused: i32,
    ) -> io::Result<Cow<'a, CStr>> {
        let Some(map) = &self.cfg.xattrmap else {
            return Ok(Cow::Borrowed(name));
        };
        match map.to_host(name.to_bytes()) {
            GuestName::Host(Cow::Borrowed(_)) => Ok(Cow::Borrowed(name)),
            GuestName::Host(Cow::Owned(host)) => Ok(Cow::Owned(
                CString::new(host).map_err(|_| errno(libc::EINVAL))?,
            )),
            GuestName::Denied => Err(errno(refused)),
            GuestName::Unsupported => Err(errno(libc::ENOTSUP)),
        }
    }

    pub(super) fn do_getxattr(
        &self,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let name = &*self.host_xattr_name(name, libc::ENODATA)?;
        let target = self.xattr_target(inode)?;
        let mut buf = vec![0u8; (size as usize).min(XATTR_SIZE_MAX)];
        // SAFETY (both): the kernel writes at most `buf.len()` bytes into `buf`; a zero
        // length with any pointer only asks for the size.
        let n = check_size(match &target {
            Target::Fd(f) => unsafe {
                libc::fgetxattr(
                    f.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            },
            Target::Proc { name: p, .. } => unsafe {
                libc::getxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            },
        })?;
        if size == 0 {
            return Ok(GetxattrReply::Count(n as u32));
        }
        buf.truncate(n);
        Ok(GetxattrReply::Value(buf))
    }

    pub(super) fn do_listxattr(&self, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let target = self.xattr_target(inode)?;
        if let Some(map) = &self.cfg.xattrmap {
            // The whole host list, then the names the guest sees: their total length is
            // not the host's.
            let host = list_names(&target, XATTR_SIZE_MAX)?;
            let mut names = Vec::new();
            for name in host.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                if let Some(guest) = map.to_guest(name).filter(|g| !g.is_empty()) {
                    names.extend_from_slice(&guest);
                    names.push(0);
                }
            }
            return if size == 0 {
                Ok(ListxattrReply::Count(names.len() as u32))
            } else if names.len() > size as usize {
                Err(errno(libc::ERANGE))
            } else {
                Ok(ListxattrReply::Names(names))
            };
        }
        let mut buf = vec![0u8; (size as usize).min(XATTR_SIZE_MAX)];
        let n = list_into(&target, &mut buf)?;
        if size == 0 {
            return Ok(ListxattrReply::Count(n as u32));
        }
        buf.truncate(n);
        Ok(ListxattrReply::Names(buf))
    }

    pub(super) fn do_setxattr(
        &self,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let name = &*self.host_xattr_name(name, libc::EPERM)?;
        let target = self.xattr_target(inode)?;
        let flags = flags as i32;
        // SAFETY (both): `value` is read for exactly its length; names are NUL-terminated.
        let r = match &target {
            Target::Fd(f) => unsafe {
                libc::fsetxattr(
                    f.as_raw_fd(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            },
            Target::Proc { name: p, .. } => unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    flags,
                )
            },
        };
        check(r).map(drop)
    }

    pub(super) fn do_removexattr(&self, inode: u64, name: &CStr) -> io::Result<()> {
        let name = &*self.host_xattr_name(name, libc::EPERM)?;
        let target = self.xattr_target(inode)?;
        // SAFETY (both): names are NUL-terminated.
        let r = match &target {
            Target::Fd(f) => unsafe { libc::fremovexattr(f.as_raw_fd(), name.as_ptr()) },
            Target::Proc { name: p, .. } => unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) },
        };
        check(r).map(drop)
    }
}

/// The host's whole name list for `target` (at most `max` bytes).
fn list_names(target: &Target, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    let n = list_into(target, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// listxattr into `buf`: the names' length (with an empty `buf`, only the length needed).
fn list_into(target: &Target, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY (both): the kernel writes at most `buf.len()` bytes into `buf`; a zero length
    // with any pointer only asks for the size.
    check_size(match target {
        Target::Fd(f) => unsafe {
            libc::flistxattr(f.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
        },
        Target::Proc { name: p, .. } => unsafe {
            libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        },
    })
}
