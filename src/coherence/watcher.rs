//! Host change events: fanotify listeners that revoke what a notify-capable guest caches when
//! another process changes the share.
//!
//! * **Data** (one fanotify group reporting file handles, FAN_REPORT_FID): each regular file
//!   the guest knows (from its first LOOKUP to its last FORGET) carries a FAN_MODIFY mark.
//!   Handles, not descriptors: the kernel opening a descriptor for each event would break a
//!   write lease we hold on the guest's own write handle (src/coherence/lease.rs) at the
//!   guest's own writes, holding this thread up like a host reader. (Kernels before 5.1 get
//!   descriptors; there the lease table takes no write leases on watched files.) When a process
//!   other than this daemon modifies it, the guest gets INVAL_INODE for every node id of the
//!   inode. This is the post-change path, for writers that opened the file before the guest's
//!   lease (no lease break held them); the lease table's breaks cover the rest, before the
//!   write.
//! * **Names** (a second group reporting directory file handles and names,
//!   FAN_REPORT_DFID_NAME): each directory the guest knows carries a mark for entries created,
//!   deleted and moved in it and for attribute changes of it and its children. The kernel has
//!   no event before these changes, so they are told after the fact: INVAL_ENTRY for a name
//!   that went away or was renamed over, INVAL_INODE of the directory (attributes and cached
//!   listing) for any change of its entries, INVAL_INODE (attributes) of a child whose mode,
//!   owner or times changed (a modification of a child also counts: an mtime-only utimensat
//!   raises nothing else). The guest sees the change within the notification's flight time.
//!
//! * **Events** (the same directory group): for a guest that raises fsnotify events
//!   (FUSE_HAS_FSNOTIFY at INIT), each host event also becomes FUSE_NOTIFY_FSNOTIFY messages
//!   after its invalidations: IN_CREATE, IN_DELETE, IN_MOVED_FROM/IN_MOVED_TO (one cookie per
//!   rename) with the name on the directory, IN_MODIFY, IN_ATTRIB and IN_CLOSE_WRITE with the
//!   name (a child) or without (the directory itself). Only this group sends them, so a host
//!   change is one guest event, never one per group or per page.
//!
//! Marks follow what the guest knows, so the cost of watching grows with what the guest
//! caches, not with the size of the tree. They are only placed while a guest has negotiated
//! the notification queue; a stock guest stays coherent through leases (src/coherence/lease.rs).

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use libc::{
    IN_ATTRIB, IN_CLOSE_WRITE, IN_CREATE, IN_DELETE, IN_ISDIR, IN_MODIFY, IN_MOVED_FROM,
    IN_MOVED_TO,
};
use log::{debug, info, warn};

use crate::coherence::notifier::{Notification, Notifier};
use crate::passthrough::{FileHandle, InodeData, InodeObserver, PassthroughFs};

const FAN_CLOEXEC: libc::c_uint = 0x1;
const FAN_CLASS_NOTIF: libc::c_uint = 0x0;
const FAN_REPORT_DFID_NAME: libc::c_uint = 0x400 | 0x800;
const FAN_REPORT_FID: libc::c_uint = 0x200;
/// With FAN_REPORT_FID and FAN_REPORT_DFID_NAME (Linux 5.17): entry events also carry the
/// file handle of the child they created, deleted or moved.
const FAN_REPORT_TARGET_FID: libc::c_uint = 0x1000;
const FAN_MARK_ADD: libc::c_uint = 0x1;
const FAN_MARK_REMOVE: libc::c_uint = 0x2;
const FAN_MODIFY: u64 = 0x2;
const FAN_ATTRIB: u64 = 0x4;
const FAN_CLOSE_WRITE: u64 = 0x8;
const FAN_MOVED_FROM: u64 = 0x40;
const FAN_MOVED_TO: u64 = 0x80;
const FAN_CREATE: u64 = 0x100;
const FAN_DELETE: u64 = 0x200;
const FAN_Q_OVERFLOW: u64 = 0x4000;
const FAN_EVENT_ON_CHILD: u64 = 0x0800_0000;
const FAN_ONDIR: u64 = 0x4000_0000;
const FANOTIFY_METADATA_VERSION: u8 = 3;
const FAN_EVENT_INFO_TYPE_FID: u8 = 1;
const FAN_EVENT_INFO_TYPE_DFID_NAME: u8 = 2;
/// What a directory mark asks for.
// FAN_MODIFY too: a utimensat that sets only the mtime raises FAN_MODIFY, not FAN_ATTRIB, and
// only with a directory entry (no path), which the data group cannot receive.
// FAN_CLOSE_WRITE only for the guest's IN_CLOSE_WRITE: it revokes nothing.
const NAMESPACE_EVENTS: u64 = FAN_CREATE
    | FAN_MODIFY
    | FAN_CLOSE_WRITE
    | FAN_DELETE
    | FAN_MOVED_FROM
    | FAN_MOVED_TO
    | FAN_ATTRIB
    | FAN_EVENT_ON_CHILD
    | FAN_ONDIR;

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
    pub dir_marks: AtomicU64,
    pub namespace_changes: AtomicU64,
    /// Marks that could not be placed (those inodes get the short lease).
    pub mark_failures: AtomicU64,
}

/// The fanotify listener.
pub struct HostWatcher {
    fanotify: OwnedFd,
    /// The directory group (FAN_REPORT_DFID_NAME); `None` where the kernel lacks it (before
    /// 5.9), leaving names to the leases.
    names: Option<OwnedFd>,
    /// Directory file handle -> node ids, to find the directory an event names.
    dirs: Mutex<HashMap<Vec<u8>, Vec<u64>>>,
    /// Whether directory events name their child (FAN_REPORT_TARGET_FID), and then regular
    /// file handle -> node ids, to tell the guest which inode a host unlink deleted.
    target_fid: bool,
    /// Whether the file group reports handles (FAN_REPORT_FID) rather than descriptors; then
    /// its events are looked up in `files` too.
    files_fid: bool,
    files: Mutex<HashMap<Vec<u8>, Vec<u64>>>,
    /// `/proc/self/fd`, to name our O_PATH inode descriptors to fanotify_mark (which refuses
    /// O_PATH descriptors themselves); opened before the sandbox hides /proc.
    proc_self_fd: File,
    notifier: Arc<Notifier>,
    /// The cookie of the last directory event's IN_MOVED_FROM and the moved child's handle
    /// key (when the group reports it): the IN_MOVED_TO of the same rename comes next.
    moving: Mutex<Option<(u32, Option<Vec<u8>>)>>,
    next_cookie: AtomicU32,
    /// This process's pid as fanotify reports it, to tell the guest's own changes (made by
    /// us) from a host process's. Read once: getpid per event was a system call per guest
    /// write. In the namespace sandbox it is our pid there, which is also how fanotify
    /// reports our own accesses to us (the watcher starts after the sandbox's namespaces).
    own_pid: i32,
    pub stats: WatchStats,
}

impl HostWatcher {
    /// Set up the listener. Needs CAP_SYS_ADMIN; without it the caller serves without
    /// notifications, which stays correct for every guest (they revalidate).
    pub fn new(notifier: Arc<Notifier>) -> io::Result<Self> {
        let files_group = |report: libc::c_uint| {
            // SAFETY: plain syscall; the result is checked.
            unsafe {
                libc::fanotify_init(
                    FAN_CLASS_NOTIF | FAN_CLOEXEC | report,
                    (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
                )
            }
        };
        let mut files_fid = true;
        let mut fd = files_group(FAN_REPORT_FID);
        if fd < 0 {
            files_fid = false;
            fd = files_group(0);
        }
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fanotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let names_group = |report: libc::c_uint| {
            // SAFETY: plain syscall; the result is checked.
            unsafe {
                libc::fanotify_init(
                    FAN_CLASS_NOTIF | FAN_CLOEXEC | report,
                    (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
                )
            }
        };
        let mut target_fid = true;
        let mut names = names_group(FAN_REPORT_DFID_NAME | FAN_REPORT_FID | FAN_REPORT_TARGET_FID);
        if names < 0 {
            // Before Linux 5.17: no child handles, host unlinks become INVAL_ENTRY.
            target_fid = false;
            names = names_group(FAN_REPORT_DFID_NAME);
        }
        target_fid &= names >= 0;
        let names = if names < 0 {
            warn!(
                "host watcher: no directory events ({}); names stay cached up to the lease",
                io::Error::last_os_error()
            );
            None
        } else {
            // SAFETY: a fresh descriptor we own.
            Some(unsafe { OwnedFd::from_raw_fd(names) })
        };
        let proc_self_fd = File::open("/proc/self/fd")?;
        Ok(HostWatcher {
            fanotify,
            names,
            dirs: Mutex::new(HashMap::new()),
            target_fid,
            files_fid,
            files: Mutex::new(HashMap::new()),
            proc_self_fd,
            notifier,
            moving: Mutex::new(None),
            next_cookie: AtomicU32::new(1),
            // SAFETY: getpid cannot fail.
            own_pid: unsafe { libc::getpid() },
            stats: WatchStats::default(),
        })
    }

    fn mark(&self, flags: libc::c_uint, data: &InodeData) -> io::Result<()> {
        self.mark_in(self.fanotify.as_raw_fd(), flags, FAN_MODIFY, data)
    }

    fn mark_in(
        &self,
        group: RawFd,
        flags: libc::c_uint,
        mask: u64,
        data: &InodeData,
    ) -> io::Result<()> {
        let fd = data.fd()?;
        let name = std::ffi::CString::new(fd.as_raw_fd().to_string())?;
        // SAFETY: valid descriptors and C string.
        let rc = unsafe {
            libc::fanotify_mark(
                group,
                flags,
                mask,
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
        if self.names.is_some() {
            let (watcher, fs) = (self.clone(), fs.clone());
            thread::Builder::new()
                .name("leasefs-names".into())
                .spawn(move || {
                    let group = watcher.names.as_ref().map(|g| g.as_raw_fd()).unwrap();
                    read_events(
                        group,
                        &watcher.notifier,
                        OWN_CHANGE_PAUSE,
                        |event, record| watcher.handle_namespace(&fs, event, record),
                    )
                })?;
        }
        thread::Builder::new()
            .name("leasefs-watcher".into())
            .spawn(move || {
                read_events(
                    self.fanotify.as_raw_fd(),
                    &self.notifier,
                    OWN_CHANGE_PAUSE,
                    |event, record| self.handle(&fs, event, record),
                )
            })
            .map(|_| ())
    }

    fn handle(&self, fs: &PassthroughFs, event: &EventMetadata, record: &[u8]) -> Origin {
        // A descriptor (groups reporting descriptors) is ours to close, whatever the event.
        // SAFETY: the kernel opened it for us; nobody else owns it.
        let file = (event.fd >= 0).then(|| unsafe { File::from_raw_fd(event.fd) });
        if file.is_none() && event.mask & FAN_Q_OVERFLOW != 0 {
            warn!("host watcher: file event queue overflow; revoking everything the guest caches");
            self.revoke_everything(fs);
            return Origin::Host;
        }
        if file.is_none() && !self.files_fid {
            return Origin::Host;
        }
        if event.pid == self.own_pid {
            // The guest's own write through us: its cache is already right.
            self.stats.own_changes.fetch_add(1, Ordering::Relaxed);
            return Origin::Own;
        }
        self.stats.host_changes.fetch_add(1, Ordering::Relaxed);
        let nodes = match file {
            // FAN_REPORT_FID: the file's handle, among those of the files the guest knows.
            None => target_fid(record, event.metadata_len as usize)
                .and_then(|key| self.files.lock().unwrap().get(&key).cloned())
                .unwrap_or_default(),
            Some(file) => {
                use std::os::unix::fs::MetadataExt;
                match file.metadata() {
                    Ok(meta) => fs.find_inodes_by_dev_ino(meta.dev(), meta.ino()),
                    Err(_) => return Origin::Host,
                }
            }
        };
        for ino in nodes {
            debug!("host changed node {ino}: revoking");
            self.stats.revocations.fetch_add(1, Ordering::Relaxed);
            self.notifier.send(Notification::InvalInode {
                ino,
                offset: 0,
                len: 0,
            });
        }
        Origin::Host
    }

    /// Whether file events come with descriptors (kernels before 5.1): the kernel then opens
    /// each watched file for each event, which breaks a write lease on it.
    pub fn reports_descriptors(&self) -> bool {
        !self.files_fid
    }
}

/// The inotify events, one IN_* bit each, that a directory event with fanotify mask `mask`
/// stands for, in the order a local change raises them; `named`: about a child (else about
/// the marked directory itself). fanotify merges events on one name that wait unread (a
/// create, write and close in a row): they are replayed in the order of a file's life, which
/// is the order they happened in for everything but a name that went and came back within
/// one read.
fn guest_events(mask: u64, named: bool) -> impl Iterator<Item = u32> {
    const ORDER: [(u64, u32, bool); 7] = [
        (FAN_CREATE, IN_CREATE, true),
        (FAN_MOVED_TO, IN_MOVED_TO, true),
        (FAN_MODIFY, IN_MODIFY, false),
        (FAN_ATTRIB, IN_ATTRIB, false),
        (FAN_CLOSE_WRITE, IN_CLOSE_WRITE, false),
        (FAN_MOVED_FROM, IN_MOVED_FROM, true),
        (FAN_DELETE, IN_DELETE, true),
    ];
    // IN_ISDIR goes with entry events; for inode events the guest adds it itself.
    let isdir = if mask & FAN_ONDIR != 0 { IN_ISDIR } else { 0 };
    ORDER
        .into_iter()
        .filter(move |&(fan, _, entry)| mask & fan != 0 && (named || !entry))
        .map(move |(_, event, entry)| if entry { event | isdir } else { event })
}

/// Who made the change an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// This daemon, for the guest: nothing to revoke.
    Own,
    /// Anyone else (or an event that is not about one change: an overflow).
    Host,
}

/// How long a watcher thread waits before its next read after a read that held only the
/// guest's own changes. Every guest WRITE raises FAN_MODIFY in both groups; read at once,
/// each is a wake-up and a read of this thread per guest write, CPU the guest's vCPUs and
/// the request queues need (on the notify stack, fio's 4 KiB writes ran 10 to 20% behind
/// virtiofsd). While we wait, the kernel merges the same file's further events from us into
/// the one queued event, so a stream of guest writes costs one read per pause. The price: a
/// host change that comes during the pause is revoked up to this much later. That is the
/// post-change path (a writer that opened the file before the guest's lease); a writer the
/// lease holds waits for the guest's confirmation as before.
const OWN_CHANGE_PAUSE: Duration = Duration::from_millis(2);

/// Read events from fanotify group `group` until it fails, calling `handle` with each event's
/// metadata and its whole record (metadata and information records). The revocations of all
/// the events one `read(2)` returned (up to 64 KiB of them: hundreds) reach the guest in one
/// delivery ([`Notifier::batch`]). After a read whose events were all our own, waits `pause`
/// before reading again ([`OWN_CHANGE_PAUSE`]).
fn read_events(
    group: RawFd,
    notifier: &Notifier,
    pause: Duration,
    mut handle: impl FnMut(&EventMetadata, &[u8]) -> Origin,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut only_own = false;
    loop {
        if only_own {
            thread::sleep(pause);
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(group, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("host watcher stopped: {e}");
            return;
        }
        if n == 0 {
            // Not a fanotify group (which never ends): a closed pipe in the tests.
            return;
        }
        let mut offset = 0usize;
        let n = n as usize;
        let _batch = notifier.batch();
        only_own = true;
        while offset + std::mem::size_of::<EventMetadata>() <= n {
            // SAFETY: the kernel wrote a whole metadata record at this offset; read it
            // unaligned since the buffer is bytes.
            let event: EventMetadata =
                unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
            let end = offset + event.event_len as usize;
            if event.vers != FANOTIFY_METADATA_VERSION
                || (event.event_len as usize) < std::mem::size_of::<EventMetadata>()
                || end > n
            {
                warn!("host watcher: unexpected event record; skipping the batch");
                only_own = false;
                break;
            }
            only_own &= handle(&event, &buf[offset..end]) == Origin::Own;
            offset = end;
        }
    }
}

/// The information records after an event's metadata, as (type, record) pairs; stops at the
/// first malformed one.
fn info_records(record: &[u8], metadata_len: usize) -> impl Iterator<Item = (u8, &[u8])> {
    let mut info = record.get(metadata_len..).unwrap_or_default();
    std::iter::from_fn(move || {
        if info.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
        if len < 4 || len > info.len() {
            return None;
        }
        let (this, rest) = info.split_at(len);
        info = rest;
        Some((this[0], this))
    })
}

/// The handle key (type and bytes) of a FID or DFID_NAME record, and what follows it: header
/// (4), fsid (8), struct file_handle { u32 handle_bytes; i32 handle_type; bytes }.
fn record_handle(this: &[u8]) -> Option<(Vec<u8>, &[u8])> {
    let fh = this.get(12..)?;
    let handle_bytes = u32::from_ne_bytes(fh.get(0..4)?.try_into().ok()?) as usize;
    Some((
        fh.get(4..8 + handle_bytes)?.to_vec(),
        fh.get(8 + handle_bytes..)?,
    ))
}

/// The directory and name a FAN_REPORT_DFID_NAME event names: the directory's file handle
/// (type and bytes, the key of [`HostWatcher::dirs`]) and the entry name ("." for the
/// directory itself).
fn dfid_name(record: &[u8], metadata_len: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, this) = info_records(record, metadata_len)
        .find(|&(info_type, _)| info_type == FAN_EVENT_INFO_TYPE_DFID_NAME)?;
    let (key, rest) = record_handle(this)?;
    let name = CStr::from_bytes_until_nul(rest).ok()?;
    Some((key, name.to_bytes().to_vec()))
}

/// The file's handle key in an event of a FAN_REPORT_FID group (the child's, in an entry
/// event of a FAN_REPORT_TARGET_FID group).
fn target_fid(record: &[u8], metadata_len: usize) -> Option<Vec<u8>> {
    let (_, this) = info_records(record, metadata_len)
        .find(|&(info_type, _)| info_type == FAN_EVENT_INFO_TYPE_FID)?;
    Some(record_handle(this)?.0)
}

/// The key fanotify's file-handle records name `data`'s host inode by: its stored handle, or
/// one asked for now (a node that holds a descriptor).
fn key_of(data: &InodeData) -> io::Result<Vec<u8>> {
    match data.file.handle() {
        Some(handle) => Ok(handle.key()),
        None => Ok(FileHandle::of(data.fd()?.as_raw_fd())?.key()),
    }
}

impl HostWatcher {
    /// Watch directory `data` for entry and attribute changes.
    fn mark_dir(&self, data: &InodeData) {
        let Some(group) = &self.names else {
            return;
        };
        let key = match key_of(data) {
            Ok(key) => key,
            Err(e) => {
                self.mark_failed(data, &e);
                return;
            }
        };
        if let Err(e) = self.mark_in(group.as_raw_fd(), FAN_MARK_ADD, NAMESPACE_EVENTS, data) {
            self.mark_failed(data, &e);
            return;
        }
        data.watched.store(true, Ordering::Relaxed);
        let mut dirs = self.dirs.lock().unwrap();
        let nodes = dirs.entry(key).or_default();
        if !nodes.contains(&data.inode) {
            nodes.push(data.inode);
            self.stats.dir_marks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unmark_dir(&self, data: &InodeData) {
        let Some(group) = &self.names else {
            return;
        };
        let Ok(key) = key_of(data) else {
            return;
        };
        let mut dirs = self.dirs.lock().unwrap();
        let Some(nodes) = dirs.get_mut(&key) else {
            return;
        };
        nodes.retain(|&n| n != data.inode);
        self.stats.dir_marks.fetch_sub(1, Ordering::Relaxed);
        if nodes.is_empty() {
            dirs.remove(&key);
            // The mark is on the host inode: only remove it when no node id needs it.
            let _ = self.mark_in(group.as_raw_fd(), FAN_MARK_REMOVE, NAMESPACE_EVENTS, data);
        }
    }

    /// Start watching what the guest learned before it negotiated the queue (the root, at
    /// least).
    fn watch_known(&self, fs: &PassthroughFs) {
        for data in fs.inodes_snapshot() {
            self.added(&data);
        }
    }

    fn handle_namespace(&self, fs: &PassthroughFs, event: &EventMetadata, record: &[u8]) -> Origin {
        // A rename's IN_MOVED_TO pairs only with the event right before it.
        let moving = self.moving.lock().unwrap().take();
        if event.mask & FAN_Q_OVERFLOW != 0 {
            warn!(
                "host watcher: directory event queue overflow; revoking every inode the guest caches (names stay cached up to the lease)"
            );
            self.revoke_everything(fs);
            return Origin::Host;
        }
        if event.pid == self.own_pid {
            // The guest's own change through us: its dentries are already right.
            return Origin::Own;
        }
        let Some((key, name)) = dfid_name(record, event.metadata_len as usize) else {
            debug!("directory event without a directory and name; ignored");
            return Origin::Host;
        };
        let Some(dirs) = self.dirs.lock().unwrap().get(&key).cloned() else {
            return Origin::Host; // A directory the guest forgot meanwhile.
        };
        if event.mask & !(FAN_CLOSE_WRITE | FAN_EVENT_ON_CHILD | FAN_ONDIR) != 0 {
            self.stats.namespace_changes.fetch_add(1, Ordering::Relaxed);
            self.revoke_namespace(fs, event, record, &dirs, &name);
        }
        if self.notifier.fsnotify() {
            self.raise_events(event, record, &dirs, &name, moving);
        }
        Origin::Host
    }

    /// The guest's fsnotify events for one directory event, after its invalidations (so a
    /// watcher that reacts reads the new state). `moving`: the IN_MOVED_FROM of the event
    /// before, if it had one.
    fn raise_events(
        &self,
        event: &EventMetadata,
        record: &[u8],
        dirs: &[u64],
        name: &[u8],
        mut moving: Option<(u32, Option<Vec<u8>>)>,
    ) {
        let child = if self.target_fid {
            target_fid(record, event.metadata_len as usize)
        } else {
            None
        };
        // "." is the directory itself: the event is on its inode, without a name.
        let name = if name == b"." { &[][..] } else { name };
        for mask in guest_events(event.mask, !name.is_empty()) {
            let cookie = match mask & !IN_ISDIR {
                IN_MOVED_TO => match moving.take() {
                    Some((cookie, from)) if from == child => cookie,
                    _ => self.new_cookie(),
                },
                IN_MOVED_FROM => {
                    let cookie = self.new_cookie();
                    *self.moving.lock().unwrap() = Some((cookie, child.clone()));
                    cookie
                }
                _ => 0,
            };
            for &node in dirs {
                self.notifier.send(Notification::Fsnotify {
                    node,
                    mask,
                    cookie,
                    name: name.to_vec(),
                });
            }
        }
    }

    fn new_cookie(&self) -> u32 {
        // Never 0, which inotify uses for events outside a rename.
        loop {
            let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
            if cookie != 0 {
                return cookie;
            }
        }
    }

    /// What the guest caches that a directory event made stale.
    fn revoke_namespace(
        &self,
        fs: &PassthroughFs,
        event: &EventMetadata,
        record: &[u8],
        dirs: &[u64],
        name: &[u8],
    ) {
        let entries_changed =
            event.mask & (FAN_CREATE | FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO) != 0;
        // A rename over an existing name (an editor's save) replaces what the name led to.
        let name_changed = event.mask & (FAN_DELETE | FAN_MOVED_FROM | FAN_MOVED_TO) != 0;
        // A host unlink or rmdir of an inode the guest knows: DELETE tells it which one went
        // (the guest drops its link count too). A move away leaves the inode alive elsewhere.
        // Only the last link's unlink deletes the inode: for one of several hard links,
        // DELETE would make the guest zero the link count it holds for the other names (and
        // refuse a `link` from them with ENOENT), so those get INVAL_ENTRY and a fresh
        // link count instead.
        let (deleted, still_linked): (Vec<u64>, Vec<u64>) = if event.mask & FAN_DELETE != 0 {
            self.known_child(record, event.metadata_len as usize)
                .into_iter()
                .partition(|&node| !still_linked(fs, node))
        } else {
            (Vec::new(), Vec::new())
        };
        for &node in &still_linked {
            self.revoke(Notification::InvalInode {
                ino: node,
                offset: -1,
                len: 0,
            });
        }
        for &dir in dirs {
            if name == b"." {
                // The directory's own attributes.
                self.revoke(Notification::InvalInode {
                    ino: dir,
                    offset: -1,
                    len: 0,
                });
                continue;
            }
            if name_changed {
                // The name stays checked at OPEN: the guest may use its dentry before it has
                // processed this message.
                self.revoke_name(dir, name, &deleted);
            }
            if entries_changed {
                // The guest may hold the listing (FOPEN_CACHE_DIR) in the directory's pages;
                // an INVAL_ENTRY for a name it never looked up would not touch it.
                self.revoke(Notification::InvalInode {
                    ino: dir,
                    offset: 0,
                    len: 0,
                });
            }
            if event.mask & (FAN_ATTRIB | FAN_MODIFY) != 0 {
                // The event names the child by file handle too (FAN_REPORT_FID): use that, so
                // a child unlinked before we read the event is still revoked; the name is the
                // fallback for kernels without it.
                let mut children = self.known_child(record, event.metadata_len as usize);
                if children.is_empty() {
                    children = child_nodes(fs, dir, name);
                }
                for child in children {
                    self.revoke(Notification::InvalInode {
                        ino: child,
                        offset: -1,
                        len: 0,
                    });
                }
            }
        }
    }

    /// Nodes of the child an entry event names, if the guest knows it.
    fn known_child(&self, record: &[u8], metadata_len: usize) -> Vec<u64> {
        if !self.target_fid {
            return Vec::new();
        }
        let Some(key) = target_fid(record, metadata_len) else {
            return Vec::new();
        };
        let files = self.files.lock().unwrap().get(&key).cloned();
        files
            .or_else(|| self.dirs.lock().unwrap().get(&key).cloned())
            .unwrap_or_default()
    }

    /// `name` in directory node `dir` leads elsewhere now: DELETE for each node in `deleted`
    /// that it led to, else INVAL_ENTRY.
    fn revoke_name(&self, dir: u64, name: &[u8], deleted: &[u64]) {
        if deleted.is_empty() {
            self.revoke(Notification::InvalEntry {
                parent: dir,
                name: name.to_vec(),
            });
        }
        for &child in deleted {
            self.revoke(Notification::Delete {
                parent: dir,
                child,
                name: name.to_vec(),
            });
        }
    }

    /// Remember (or forget) regular file `data`'s handle, to name it in DELETE.
    /// Returns whether another node id (an alias of the same host inode) still needs the
    /// file's mark.
    fn track_file(&self, data: &InodeData, add: bool) -> bool {
        if !self.target_fid && !self.files_fid {
            return false;
        }
        let Ok(key) = key_of(data) else {
            return false;
        };
        let mut files = self.files.lock().unwrap();
        if add {
            let nodes = files.entry(key).or_default();
            if !nodes.contains(&data.inode) {
                nodes.push(data.inode);
            }
        } else if let Some(nodes) = files.get_mut(&key) {
            nodes.retain(|&n| n != data.inode);
            if nodes.is_empty() {
                files.remove(&key);
            } else {
                return true;
            }
        }
        false
    }

    /// Events were lost: any inode the guest knows may have changed. Its attributes, pages and
    /// listings go; its dentries cannot without their names, and keep their lease.
    fn revoke_everything(&self, fs: &PassthroughFs) {
        for data in fs.inodes_snapshot() {
            self.revoke(Notification::InvalInode {
                ino: data.inode,
                offset: 0,
                len: 0,
            });
        }
    }

    /// A mark could not be placed: the inode keeps the stock guest's short lease (the lease
    /// table asks `watched`). Counted; the first failure is a warning, the rest debug lines.
    fn mark_failed(&self, data: &InodeData, e: &io::Error) {
        data.watched.store(false, Ordering::Relaxed);
        if self.stats.mark_failures.fetch_add(1, Ordering::Relaxed) == 0 {
            warn!(
                "host watcher: cannot watch node {} ({e}); it and any later such inode get the short lease (check /proc/sys/fs/fanotify/max_user_marks and the descriptor limit)",
                data.inode
            );
        } else {
            debug!("host watcher: cannot watch node {}: {e}", data.inode);
        }
    }

    fn revoke(&self, message: Notification) {
        debug!("host changed the share: {message:?}");
        self.stats.revocations.fetch_add(1, Ordering::Relaxed);
        self.notifier.send(message);
    }
}

/// Whether the host inode behind node `node` still has a name. One gone from the host (or
/// that cannot be seen: with a file handle it cannot even be opened) has none.
fn still_linked(fs: &PassthroughFs, node: u64) -> bool {
    fs.inode_fd(node)
        .and_then(|data| crate::passthrough::statx_info(&data).ok())
        .is_some_and(|st| st.st_nlink > 0)
}

/// The node ids of `name` in directory node `dir`, if the guest knows that inode.
fn child_nodes(fs: &PassthroughFs, dir: u64, name: &[u8]) -> Vec<u64> {
    let Some(parent) = fs.inode_fd(dir) else {
        return Vec::new();
    };
    let Ok(parent) = parent.fd() else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(name) else {
        return Vec::new();
    };
    // SAFETY: stat64 is plain data, filled by a successful fstatat.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out pointer.
    let rc = unsafe {
        libc::fstatat64(
            parent.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc < 0 {
        return Vec::new();
    }
    fs.find_inodes_by_dev_ino(st.st_dev, st.st_ino)
}

impl InodeObserver for HostWatcher {
    fn added(&self, data: &InodeData) {
        if !self.notifier.active() {
            return;
        }
        if data.mode & libc::S_IFMT == libc::S_IFDIR {
            self.mark_dir(data);
            return;
        }
        if data.mode & libc::S_IFMT != libc::S_IFREG {
            return;
        }
        // Its events name the file by handle: one we cannot compute could not be told.
        if self.files_fid {
            if let Err(e) = key_of(data) {
                self.mark_failed(data, &e);
                return;
            }
        }
        match self.mark(FAN_MARK_ADD, data) {
            Ok(()) => {
                self.stats.marks.fetch_add(1, Ordering::Relaxed);
                data.watched.store(true, Ordering::Relaxed);
            }
            Err(e) => self.mark_failed(data, &e),
        }
        self.track_file(data, true);
    }

    fn removed(&self, data: &InodeData) {
        if !self.notifier.active() {
            return;
        }
        data.watched.store(false, Ordering::Relaxed);
        if data.mode & libc::S_IFMT == libc::S_IFDIR {
            self.unmark_dir(data);
            return;
        }
        if data.mode & libc::S_IFMT != libc::S_IFREG {
            return;
        }
        // The mark is on the host inode: keep it while an alias of it is still known.
        if !self.track_file(data, false) && self.mark(FAN_MARK_REMOVE, data).is_ok() {
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
            let (w, f) = (Arc::downgrade(&watcher), Arc::downgrade(fs));
            watcher.notifier.on_attach(move || {
                if let (Some(w), Some(f)) = (w.upgrade(), f.upgrade()) {
                    w.watch_known(&f);
                }
            });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn events(mask: u64, named: bool) -> Vec<u32> {
        guest_events(mask, named).collect()
    }

    #[test]
    fn one_guest_event_per_host_event_with_isdir_on_entries_only() {
        assert_eq!(events(FAN_CREATE, true), [IN_CREATE]);
        assert_eq!(events(FAN_CREATE | FAN_ONDIR, true), [IN_CREATE | IN_ISDIR]);
        assert_eq!(events(FAN_DELETE | FAN_ONDIR, true), [IN_DELETE | IN_ISDIR]);
        assert_eq!(events(FAN_MOVED_FROM, true), [IN_MOVED_FROM]);
        assert_eq!(events(FAN_MOVED_TO, true), [IN_MOVED_TO]);
        assert_eq!(events(FAN_MODIFY, true), [IN_MODIFY]);
        assert_eq!(events(FAN_CLOSE_WRITE, true), [IN_CLOSE_WRITE]);
        // The directory itself: the guest adds IN_ISDIR to inode events.
        assert_eq!(events(FAN_ATTRIB | FAN_ONDIR, false), [IN_ATTRIB]);
        assert!(events(FAN_Q_OVERFLOW, false).is_empty());
    }

    #[test]
    fn merged_events_replay_in_the_order_of_a_files_life() {
        assert_eq!(
            events(
                FAN_CLOSE_WRITE | FAN_MODIFY | FAN_CREATE | FAN_EVENT_ON_CHILD,
                true
            ),
            [IN_CREATE, IN_MODIFY, IN_CLOSE_WRITE]
        );
        assert_eq!(
            events(FAN_DELETE | FAN_ATTRIB | FAN_MOVED_TO, true),
            [IN_MOVED_TO, IN_ATTRIB, IN_DELETE]
        );
        // Entry events cannot be about the directory itself.
        assert_eq!(events(FAN_CREATE | FAN_ATTRIB, false), [IN_ATTRIB]);
    }

    #[test]
    fn inotify_and_fanotify_bits_agree() {
        // The guest takes IN_* values; fanotify's are the same bits (linux/fanotify.h).
        for (fan, inotify) in [
            (FAN_MODIFY, IN_MODIFY),
            (FAN_ATTRIB, IN_ATTRIB),
            (FAN_CLOSE_WRITE, IN_CLOSE_WRITE),
            (FAN_MOVED_FROM, IN_MOVED_FROM),
            (FAN_MOVED_TO, IN_MOVED_TO),
            (FAN_CREATE, IN_CREATE),
            (FAN_DELETE, IN_DELETE),
            (FAN_ONDIR, IN_ISDIR),
        ] {
            assert_eq!(fan, inotify as u64);
        }
    }

    /// One event record as fanotify writes it: metadata only, no descriptor.
    fn record(pid: i32) -> Vec<u8> {
        let event = EventMetadata {
            event_len: std::mem::size_of::<EventMetadata>() as u32,
            vers: FANOTIFY_METADATA_VERSION,
            reserved: 0,
            metadata_len: std::mem::size_of::<EventMetadata>() as u16,
            mask: FAN_MODIFY,
            fd: -1,
            pid,
        };
        // SAFETY: a plain-old-data struct viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&event as *const EventMetadata).cast::<u8>(),
                std::mem::size_of::<EventMetadata>(),
            )
        }
        .to_vec()
    }

    /// Own changes are read in pauses, so the kernel can merge the next ones; a host change
    /// after a host change is read at once.
    #[test]
    fn reads_wait_after_own_changes_only() {
        const OWN: i32 = 1;
        let pause = Duration::from_millis(800);
        let (rx, mut tx) = std::io::pipe().unwrap();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let reader = thread::spawn(move || {
            let notifier = Notifier::default();
            read_events(rx.as_raw_fd(), &notifier, pause, |event, _| {
                seen_tx
                    .send((event.pid, std::time::Instant::now()))
                    .unwrap();
                if event.pid == OWN {
                    Origin::Own
                } else {
                    Origin::Host
                }
            })
        });
        let mut send = |pid: i32| {
            use std::io::Write;
            tx.write_all(&record(pid)).unwrap();
            std::time::Instant::now()
        };
        let wait = |pid: i32| {
            let (got, at) = seen.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(got, pid);
            at
        };
        // A host change after our own: read only after the pause.
        send(OWN);
        wait(OWN);
        let sent = send(2);
        let delay = wait(2) - sent;
        assert!(
            delay >= pause / 2,
            "read after {delay:?}, not after a pause"
        );
        // A host change after a host change: no pause (the bound is generous for a loaded
        // machine; the pause it must beat is 0.8 s).
        let sent = send(3);
        let delay = wait(3) - sent;
        assert!(
            delay < pause / 2,
            "read after {delay:?}: a pause after a host change"
        );
        drop(tx);
        reader.join().unwrap();
    }
}
