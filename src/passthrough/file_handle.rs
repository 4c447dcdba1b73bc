//! `--inode-file-handles`: how a node refers to its host inode. With `never`, by an O_PATH
//! descriptor held as long as the guest knows the node. With `prefer` (virtiofsd's default)
//! and `mandatory`, by a file handle (name_to_handle_at) where the host filesystem gives
//! one: the node then holds no descriptor, and each use opens one for just that use
//! (open_by_handle_at, which needs CAP_DAC_READ_SEARCH; the daemon keeps that capability only
//! when handles are in use). `prefer` falls back to a descriptor per inode where the
//! filesystem has no handles; `mandatory` refuses such inodes (and a share without them at
//! start).
//!
//! open_by_handle_at needs a descriptor on the inode's mount, and not an O_PATH one:
//! [`MountFds`] keeps one read-only directory descriptor per mount, opened on the first
//! directory the guest sees on it (the root of a submount is a directory, looked up before
//! anything below it). An inode on a mount without one keeps a descriptor.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::sync::{Arc, RwLock};

use rustc_hash::FxHashMap;

use super::util::{check, fd_name, openat, EMPTY};

/// MAX_HANDLE_SZ (linux/exportfs.h): no filesystem's handle is longer.
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A host inode's file handle: enough to open it again while it exists, without holding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileHandle {
    handle_type: i32,
    bytes: Box<[u8]>,
}

impl FileHandle {
    /// The handle of the inode `fd` refers to (an O_PATH descriptor will do). EOPNOTSUPP
    /// where its filesystem has none.
    pub(crate) fn of(fd: RawFd) -> io::Result<FileHandle> {
        let mut raw = RawHandle {
            handle_bytes: MAX_HANDLE_SZ as u32,
            handle_type: 0,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        let mut mount_id = 0;
        // SAFETY: `raw` holds MAX_HANDLE_SZ bytes of handle, as `handle_bytes` announces.
        check(unsafe {
            libc::name_to_handle_at(
                fd,
                EMPTY.as_ptr(),
                (&mut raw as *mut RawHandle).cast(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        })?;
        let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
        Ok(FileHandle {
            handle_type: raw.handle_type,
            bytes: raw.f_handle[..len].into(),
        })
    }

    /// Open the inode with `flags` (O_PATH for a reference, O_RDONLY to read...), through
    /// `mount`, a descriptor on its mount. ESTALE once the inode is gone.
    pub(crate) fn open(&self, mount: &File, flags: i32) -> io::Result<File> {
        let mut raw = RawHandle {
            handle_bytes: self.bytes.len() as u32,
            handle_type: self.handle_type,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        raw.f_handle[..self.bytes.len()].copy_from_slice(&self.bytes);
        // SAFETY: `raw` is a valid file_handle of `handle_bytes` bytes; the descriptor
        // returned is ours alone.
        let fd = check(unsafe {
            libc::open_by_handle_at(
                mount.as_raw_fd(),
                (&mut raw as *mut RawHandle).cast(),
                flags | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: a descriptor the call just opened for us.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// The handle's bytes (type, then handle), to compare host inodes by.
    pub(crate) fn key(&self) -> Vec<u8> {
        let mut key = self.handle_type.to_ne_bytes().to_vec();
        key.extend_from_slice(&self.bytes);
        key
    }
}

/// How a node refers to its host inode.
pub(crate) enum InodeFile {
    /// An O_PATH | O_NOFOLLOW descriptor, held as long as the node.
    Fd(File),
    /// A file handle and a descriptor on its mount (shared by all nodes of the mount).
    Handle {
        handle: FileHandle,
        mount: Arc<File>,
    },
}

/// A descriptor of a node's inode for one use: the node's own, or one opened from its handle
/// and closed when this goes.
pub enum InodeFd<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(File),
}

impl AsRawFd for InodeFd<'_> {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            InodeFd::Borrowed(fd) => fd.as_raw_fd(),
            InodeFd::Owned(file) => file.as_raw_fd(),
        }
    }
}

impl AsFd for InodeFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            InodeFd::Borrowed(fd) => *fd,
            InodeFd::Owned(file) => file.as_fd(),
        }
    }
}

impl InodeFile {
    /// An O_PATH descriptor of the inode for one use.
    pub(crate) fn fd(&self) -> io::Result<InodeFd<'_>> {
        match self {
            InodeFile::Fd(file) => Ok(InodeFd::Borrowed(file.as_fd())),
            InodeFile::Handle { handle, mount } => Ok(InodeFd::Owned(
                handle.open(mount, libc::O_PATH | libc::O_NOFOLLOW)?,
            )),
        }
    }

    /// Whether the node holds a descriptor (counted against the guest's budget).
    pub(crate) fn holds_descriptor(&self) -> bool {
        matches!(self, InodeFile::Fd(_))
    }

    pub(crate) fn handle(&self) -> Option<&FileHandle> {
        match self {
            InodeFile::Handle { handle, .. } => Some(handle),
            InodeFile::Fd(_) => None,
        }
    }
}

/// One read-only directory descriptor per host mount (by statx's mount id), for
/// open_by_handle_at. Keyed with FxHash: mount ids come from the host kernel, not the guest,
/// and every new node looks its mount up here.
#[derive(Default)]
pub(crate) struct MountFds {
    by_mount: RwLock<FxHashMap<u64, Arc<File>>>,
}

impl MountFds {
    /// The descriptor for mount `mnt_id`. If the mount is new and `fd` (an O_PATH descriptor
    /// on it) is a directory, it is reopened read-only (through `proc_self_fd`) to become the
    /// mount's; otherwise ENOTDIR.
    pub(crate) fn get_or_insert(
        &self,
        mnt_id: u64,
        proc_self_fd: &File,
        fd: RawFd,
    ) -> io::Result<Arc<File>> {
        if let Some(file) = self
            .by_mount
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&mnt_id)
        {
            return Ok(file.clone());
        }
        let mut map = self.by_mount.write().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = map.get(&mnt_id) {
            return Ok(file.clone());
        }
        let file = Arc::new(readable_dir(proc_self_fd, fd)?);
        map.insert(mnt_id, file.clone());
        Ok(file)
    }

    /// How many mount descriptors are held.
    pub(crate) fn len(&self) -> usize {
        self.by_mount
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// The directory O_PATH descriptor `fd` refers to, opened read-only.
fn readable_dir(proc_self_fd: &File, fd: RawFd) -> io::Result<File> {
    openat(
        proc_self_fd.as_raw_fd(),
        &fd_name(fd),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
}

/// Whether this process can open inodes by handle below `root` (an O_PATH descriptor):
/// name_to_handle_at works on its filesystem and open_by_handle_at is allowed
/// (CAP_DAC_READ_SEARCH in the initial user namespace). The reason when not.
pub(crate) fn usable(proc_self_fd: &File, root: &File) -> io::Result<()> {
    let mount = readable_dir(proc_self_fd, root.as_raw_fd())?;
    let handle = FileHandle::of(root.as_raw_fd())?;
    handle.open(&mount, libc::O_PATH).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_handle_opens_its_inode_again_without_holding_it_and_stales_when_it_goes() {
        let dir = std::env::temp_dir().join(format!("leasefs-fh-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"x").unwrap();
        let root = File::open(&dir).unwrap();
        let proc_self_fd = File::open("/proc/self/fd").unwrap();
        if usable(&proc_self_fd, &root).is_err() {
            eprintln!("skipped: no file handles here (needs CAP_DAC_READ_SEARCH)");
            return;
        }
        let handle = FileHandle::of(File::open(&path).unwrap().as_raw_fd()).unwrap();
        let again = handle.open(&root, libc::O_RDONLY).unwrap();
        assert_eq!(
            again.metadata().unwrap().ino(),
            std::fs::metadata(&path).unwrap().ino()
        );
        drop(again);
        std::fs::remove_file(&path).unwrap();
        // A test on another thread that forks may hold a copy of our descriptor of the file
        // until its child execs (the descriptor is close-on-exec), which keeps the inode
        // alive for that long: the handle goes stale once the last reference is gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let gone = loop {
            match handle.open(&root, libc::O_PATH) {
                Err(e) => break e,
                Ok(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Ok(_) => panic!("the handle still opens its removed file after 10 s"),
            }
        };
        assert_eq!(gone.raw_os_error(), Some(libc::ESTALE), "{gone}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
