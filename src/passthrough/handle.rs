//! The handle table: FUSE file handles ↔ descriptors we opened for the guest.
//!
//! One guest open (OPEN, CREATE, OPENDIR, TMPFILE) is one host open file description, so
//! per-description state the guest relies on (flock locks, O_APPEND, a directory's read
//! position) behaves as it would locally. A handle is only honoured together with the inode it
//! was opened for; anything else is EBADF.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use rustc_hash::FxHashMap;

use super::inode::{InodeData, OpenHandleCount};

/// One open file or directory of the guest's.
pub struct HandleData {
    /// The FUSE node id it was opened for.
    pub inode: u64,
    pub file: File,
    /// Opened for writing (or created): its close tells the lease keeper.
    pub(crate) writable: bool,
    /// Serialises users of the shared file position: READDIR seeks then reads.
    pos: Mutex<()>,
    /// Counts this handle on its inode while the descriptor is open.
    _open: OpenHandleCount,
}

impl HandleData {
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn lock_position(&self) -> MutexGuard<'_, ()> {
        self.pos.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AsFd for HandleData {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

pub(crate) struct HandleTable {
    /// FxHash: handle numbers are ours, a guest cannot pick colliding keys.
    map: RwLock<FxHashMap<u64, Arc<HandleData>>>,
    /// How many handles the table holds, readable without its lock.
    size: AtomicUsize,
    next: AtomicU64,
}

impl HandleTable {
    pub(crate) fn new() -> Self {
        HandleTable {
            map: RwLock::new(FxHashMap::default()),
            size: AtomicUsize::new(0),
            // 0 means "no handle" in several FUSE requests, so it is never handed out.
            next: AtomicU64::new(1),
        }
    }

    /// A new handle of `inode` holding `file`; `writable`: opened for writing (or created);
    /// `exec`: opened to execute the file (see [`InodeData::exec_handles`]).
    pub(crate) fn insert(
        &self,
        inode: &Arc<InodeData>,
        file: File,
        writable: bool,
        exec: bool,
    ) -> u64 {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let data = Arc::new(HandleData {
            inode: inode.inode,
            file,
            writable,
            pos: Mutex::new(()),
            _open: OpenHandleCount::new(inode, exec),
        });
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        m.insert(handle, data);
        self.size.store(m.len(), Ordering::Relaxed);
        handle
    }

    /// The handle, if it exists and belongs to `inode`.
    pub(crate) fn get(&self, handle: u64, inode: u64) -> Option<Arc<HandleData>> {
        self.get_any(handle).filter(|d| d.inode == inode)
    }

    pub(crate) fn get_any(&self, handle: u64) -> Option<Arc<HandleData>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&handle)
            .cloned()
    }

    /// Remove the handle if it belongs to `inode`. Requests still using it keep the
    /// descriptor open until they finish.
    pub(crate) fn remove(&self, handle: u64, inode: u64) -> Option<Arc<HandleData>> {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        if m.get(&handle)?.inode != inode {
            return None;
        }
        let removed = m.remove(&handle);
        self.size.store(m.len(), Ordering::Relaxed);
        removed
    }

    pub(crate) fn clear(&self) {
        let mut m = self.map.write().unwrap_or_else(|e| e.into_inner());
        m.clear();
        self.size.store(0, Ordering::Relaxed);
    }

    pub(crate) fn len(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }
}
