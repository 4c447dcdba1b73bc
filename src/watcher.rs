//! Host change events: a fanotify listener that revokes what a notify-capable guest caches
//! when another process changes a file's data.
//!
//! Each regular file the guest knows (from its first LOOKUP to its last FORGET) carries a
//! FAN_MODIFY mark, so the cost of watching grows with what the guest caches, not with the
//! size of the tree. When a process other than this daemon modifies a marked file, the watcher
//! sends INVAL_INODE for every node id of that inode on the notification queue: the guest drops
//! the file's attributes and cached pages and fetches them again on next use.
//!
//! This is the post-change path: the host writer is not held, so a guest read racing the
//! notification can still see old data for the notification's flight time. Marks are only
//! placed while a guest has negotiated the notification queue; a stock guest stays coherent by
//! revalidation alone (docs/coherency.md).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use log::{debug, info, warn};

use crate::notify::{Notification, Notifier};
use crate::passthrough::{InodeData, InodeObserver, PassthroughFs};

const FAN_CLOEXEC: libc::c_uint = 0x1;
const FAN_CLASS_NOTIF: libc::c_uint = 0x0;
const FAN_MARK_ADD: libc::c_uint = 0x1;
const FAN_MARK_REMOVE: libc::c_uint = 0x2;
const FAN_MODIFY: u64 = 0x2;
const FAN_Q_OVERFLOW: u64 = 0x4000;
const FANOTIFY_METADATA_VERSION: u8 = 3;

/// `struct fanotify_event_metadata`.
#[repr(C)]
#[derive(Clone, Copy)]
struct EventMetadata {
    event_len: u32,
    vers: u8,
    reserved: u8,
    metadata_len: u16,
    mask: u64,
    fd: i32,
    pid: i32,
}

/// What the watcher has seen, for metrics and tests.
#[derive(Debug, Default)]
pub struct WatchStats {
    pub marks: AtomicU64,
    pub host_changes: AtomicU64,
    pub own_changes: AtomicU64,
    pub revocations: AtomicU64,
}

/// The fanotify listener.
pub struct HostWatcher {
    fanotify: OwnedFd,
    /// `/proc/self/fd`, to name our O_PATH inode descriptors to fanotify_mark (which refuses
    /// O_PATH descriptors themselves); opened before the sandbox hides /proc.
    proc_self_fd: File,
    notifier: Arc<Notifier>,
    pub stats: WatchStats,
}

impl HostWatcher {
    /// Set up the listener. Needs CAP_SYS_ADMIN; without it the caller serves without
    /// notifications, which stays correct for every guest (they revalidate).
    pub fn new(notifier: Arc<Notifier>) -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe {
            libc::fanotify_init(
                FAN_CLASS_NOTIF | FAN_CLOEXEC,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fanotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let proc_self_fd = File::open("/proc/self/fd")?;
        Ok(HostWatcher {
            fanotify,
            proc_self_fd,
            notifier,
            stats: WatchStats::default(),
        })
    }

    fn mark(&self, flags: libc::c_uint, data: &InodeData) -> io::Result<()> {
        let name = std::ffi::CString::new(data.file.as_raw_fd().to_string())?;
        // SAFETY: valid descriptors and C string.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fanotify.as_raw_fd(),
                flags,
                FAN_MODIFY,
                self.proc_self_fd.as_raw_fd(),
                name.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read events until the process exits, revoking as they come.
    pub fn spawn(self: Arc<Self>, fs: Arc<PassthroughFs>) -> io::Result<()> {
        thread::Builder::new()
            .name("leasefs-watcher".into())
            .spawn(move || self.run(&fs))
            .map(|_| ())
    }

    fn run(&self, fs: &PassthroughFs) {
        // SAFETY: getpid cannot fail. In the namespace sandbox this is our pid there, which is
        // also how fanotify reports our own accesses to us.
        let own_pid = unsafe { libc::getpid() };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::read(
                    self.fanotify.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("host watcher stopped: {e}");
                return;
            }
            let mut offset = 0usize;
            let n = n as usize;
            while offset + std::mem::size_of::<EventMetadata>() <= n {
                // SAFETY: the kernel wrote a whole metadata record at this offset; read it
                // unaligned since the buffer is bytes.
                let event: EventMetadata =
                    unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
                if event.vers != FANOTIFY_METADATA_VERSION || event.event_len == 0 {
                    warn!("host watcher: unexpected event record; skipping the batch");
                    break;
                }
                self.handle(fs, &event, own_pid);
                offset += event.event_len as usize;
            }
        }
    }

    fn handle(&self, fs: &PassthroughFs, event: &EventMetadata, own_pid: i32) {
        if event.fd < 0 {
            if event.mask & FAN_Q_OVERFLOW != 0 {
                // Events were lost: every file the guest knows may have changed.
                warn!("host watcher: event queue overflow");
            }
            return;
        }
        // SAFETY: the kernel opened this descriptor for us; we own and close it.
        let file = unsafe { File::from_raw_fd(event.fd) };
        if event.pid == own_pid {
            // The guest's own write through us: its cache is already right.
            self.stats.own_changes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.stats.host_changes.fetch_add(1, Ordering::Relaxed);
        let Ok(meta) = file.metadata() else {
            return;
        };
        use std::os::unix::fs::MetadataExt;
        for ino in fs.find_inodes_by_dev_ino(meta.dev(), meta.ino()) {
            debug!("host changed node {ino}: revoking");
            self.stats.revocations.fetch_add(1, Ordering::Relaxed);
            self.notifier.send(Notification::InvalInode {
                ino,
                offset: 0,
                len: 0,
            });
        }
    }
}

impl InodeObserver for HostWatcher {
    fn added(&self, data: &InodeData) {
        if data.mode & libc::S_IFMT != libc::S_IFREG || !self.notifier.active() {
            return;
        }
        match self.mark(FAN_MARK_ADD, data) {
            Ok(()) => {
                self.stats.marks.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => debug!("cannot watch node {}: {e}", data.inode),
        }
    }

    fn removed(&self, data: &InodeData) {
        if data.mode & libc::S_IFMT != libc::S_IFREG || !self.notifier.active() {
            return;
        }
        if self.mark(FAN_MARK_REMOVE, data).is_ok() {
            self.stats.marks.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Start watching for `fs` if the host allows it; a daemon without the privilege for
/// fanotify serves on, coherent through guest revalidation only.
pub fn start(fs: &Arc<PassthroughFs>, notifier: Arc<Notifier>) -> Option<Arc<HostWatcher>> {
    match HostWatcher::new(notifier) {
        Ok(watcher) => {
            let watcher = Arc::new(watcher);
            fs.add_observer(watcher.clone());
            if let Err(e) = watcher.clone().spawn(fs.clone()) {
                warn!("host watcher: {e}");
                return None;
            }
            info!("host watcher: fanotify ready; notify-capable guests get revocations");
            Some(watcher)
        }
        Err(e) => {
            info!("host watcher unavailable ({e}); guests stay coherent by revalidation only");
            None
        }
    }
}
