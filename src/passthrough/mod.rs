//! leasefs's own passthrough filesystem: serves a host directory to the guest over FUSE.
//!
//! # Design
//!
//! The model is virtiofsd's:
//!
//! * **Inode table** (`inode.rs`): every host inode the guest has looked up is one FUSE node id
//!   holding an `O_PATH | O_NOFOLLOW` descriptor of that inode and a lookup count, keyed by
//!   (st_dev, st_ino, mount id). FORGET drops counts; the entry and its descriptor go at zero.
//! * **Handle table** (`handle.rs`): each guest OPEN/CREATE/OPENDIR/TMPFILE is one host open
//!   file description, so flock locks, O_APPEND and directory positions behave as locally.
//! * **Name resolution** is always one component, relative to the parent's descriptor, with
//!   `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW` / `AT_EMPTY_PATH`. I/O descriptors are reopened from
//!   the inode's descriptor through a `/proc/self/fd` directory descriptor opened by
//!   [`PassthroughFs::new`], which works after the daemon has pivoted into the share.
//! * **Credentials**: operations that create inodes run with the guest caller's effective
//!   uid/gid (per-thread raw `setresuid`/`setresgid`) and the right umask (per-thread, after
//!   `unshare(CLONE_FS)`), see `util.rs`.
//! * **POSIX locks** are open-file-description (OFD) locks on one descriptor per
//!   (inode, lock owner), closed when that owner flushes or releases: the same lifetime rules
//!   as process-associated locks, without tying every guest process to the daemon's pid.
//!   `flock` locks are `flock(2)` on the handle's own descriptor.
//!
//! # Guarantees
//!
//! * The guest can only reach inodes below the share: names with `/`, empty names, `.` and
//!   `..` are refused where they would create or remove anything (EINVAL); a lookup of `..` at
//!   the root answers the root itself; symlinks inside the share are returned as symlinks and
//!   never followed by the daemon (only the guest's own kernel follows them, inside the guest).
//! * Only regular files and directories are ever opened for I/O: a FIFO or device node in the
//!   share cannot block a request thread or expose a host device (EBADF, as virtiofsd).
//! * Node ids and handles come from the guest and are never trusted: unknown ones, or a handle
//!   used with another inode than it was opened for, are EBADF; nothing here panics on guest
//!   data. The inode table shrinks with FORGET, so memory follows the guest's dentry cache.
//! * Negative lookups are cached by the guest only with [`CachePolicy::Always`] (the guest is
//!   taken to own the share); otherwise a missing name is ENOENT, as with virtiofsd.
//!
//! # Limits
//!
//! * [`FileHandleMode`] `Prefer`/`Mandatory`: a node refers to its inode by file handle
//!   (`file_handle.rs`) and does not keep it alive, so once the host removes it the node
//!   answers ESTALE, except through the guest's open handles; the share's root always keeps
//!   its descriptor.
//! * Credentials switch the effective uid/gid only: supplementary groups stay the daemon's,
//!   so the daemon should drop its own supplementary groups at start-up (virtiofsd does).

mod file_handle;
mod handle;
mod idmap;
mod inode;
mod locks;
mod open;
mod ops;
mod security_label;
mod util;
mod xattr;
mod xattrmap;

#[cfg(test)]
mod tests;

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, ATTR_SUBMOUNT};
use fuse_backend_rs::api::filesystem::{Entry, OpenOptions};

pub(crate) use file_handle::FileHandle;
pub use file_handle::InodeFd;
pub use handle::HandleData;
pub use idmap::IdTranslation;
pub use inode::{InodeData, InodeId, InodeObserver, ROOT_INODE};
pub use open::ReadOnly;
pub use security_label::{with_security_context, SecurityContext};
pub use xattrmap::XattrMap;

/// The coherence engine's say in what the guest may cache (see `crate::coherence::lease`). Without one,
/// the configured timeouts and cache policy apply as they are.
pub trait LeaseKeeper: Send + Sync {
    /// The (attribute, entry) timeouts for a reply describing `data` with attributes `st`;
    /// `entry` when the reply names it (LOOKUP, CREATE, READDIRPLUS...), `parent` the
    /// directory node the guest will hold that name in. `acquire`: whether the keeper may take
    /// new host resources for the inode (not for every READDIRPLUS entry). May refresh `st`,
    /// which is then what the guest is told.
    fn grant(
        &self,
        data: &InodeData,
        st: &mut stat64,
        entry: bool,
        parent: Option<u64>,
        acquire: bool,
    ) -> (Duration, Duration);
    /// The daemon is about to change names in directory node `node`, or the names or
    /// attributes of node `node` itself (unlink, rename, link, chmod, chown, utimes, xattrs),
    /// for the guest, and has finished doing so: the metadata choke point
    /// ([`PassthroughFs::changing`]) calls both, so the keeper can give up what the guest's
    /// own change would break.
    fn begin_change(&self, _node: u64) {}
    fn end_change(&self, _node: u64) {}
    /// At OPEN or OPENDIR, with the inode's current attributes: whether the guest may keep
    /// the pages or listing it cached. From here on the guest's cache is what the host has.
    fn check_open(&self, data: &InodeData, st: &stat64) -> bool;
    /// The daemon is about to open `data` for writing or truncate it for the guest, and has
    /// finished doing so (the write-open choke point, `open.rs`, calls both).
    fn begin_write(&self, data: &InodeData);
    fn end_write(&self, data: &InodeData);
    /// The guest closed a handle it had open for writing; `st` is the inode now. Its cached
    /// pages hold its own writes, so they may be kept across the next open. Called while the
    /// handle's descriptor is still open; a write lease on it ([`Self::lease_write_handle`]) is
    /// given up here.
    fn write_handle_closed(&self, data: &InodeData, st: &stat64);
    /// After such a handle's descriptor was dropped: the guest may still trust attributes
    /// granted while it wrote, so the keeper may take a host lease again at once to cover
    /// them.
    fn write_handle_dropped(&self, _data: &InodeData) {}
    /// CREATE or OPEN opened `file` (the guest's new handle) on `data` for writing: take a
    /// host write lease on the handle's own open file description if the kernel grants one
    /// (nobody else has the file open), so the guest may cache the file it is writing.
    /// Whether one is held now; a CREATE then reads the reply's attributes again under it.
    fn lease_write_handle(&self, _data: &InodeData, _file: &File) -> bool {
        false
    }
    /// The daemon is about to open `data` read-only ([`PassthroughFs::open_read`]): a write
    /// lease of ours on it would be broken by that open and hold it up like a host reader, so
    /// the keeper gives it up first.
    fn before_read_open(&self, _data: &InodeData) {}

    /// Descriptors the keeper holds now (one per host lease); counted against the guest's
    /// descriptor budget.
    fn descriptors(&self) -> usize {
        0
    }
}

/// The attributes of an inode in the table, read now.
pub fn statx_info(data: &InodeData) -> io::Result<stat64> {
    Ok(statx_fd(data.fd()?.as_raw_fd())?.st)
}

use file_handle::{InodeFile, MountFds};
use handle::HandleTable;
use inode::{GuestNames, InodeTable};
use util::{ebadf, einval, fd_name, is_dir, openat, statx_fd};

/// How much the guest may cache, with virtiofsd's meaning of each mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No data caching (direct I/O on files); metadata per the timeouts (normally zero).
    Never,
    /// Metadata cached (long timeouts), data uncached (direct I/O on files).
    Metadata,
    /// Data cached but revalidated on open (close-to-open); the default.
    #[default]
    Auto,
    /// Data and directory contents kept across opens: the guest owns the share.
    Always,
    /// Data and directory contents kept across opens like `Always`, but revalidated: the guest
    /// checks attributes before using cached data (AUTO_INVAL_DATA) and drops the cache when
    /// mtime or size changed. Entry and attribute timeouts are the metadata lease.
    Coherent,
}

/// Whether inodes are held by file handle instead of O_PATH descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FileHandleMode {
    #[default]
    Never,
    Prefer,
    Mandatory,
}

/// How the share is served. The timeouts are what the guest caches entries and attributes for.
#[derive(Clone, Debug)]
pub struct Config {
    pub root_dir: PathBuf,
    pub entry_timeout: Duration,
    pub attr_timeout: Duration,
    pub cache: CachePolicy,
    pub writeback: bool,
    pub xattr: bool,
    pub posix_acl: bool,
    pub inode_file_handles: FileHandleMode,
    pub allow_direct_io: bool,
    pub announce_submounts: bool,
    /// Take the guest's POSIX (fcntl) and flock locks on the host (FUSE_POSIX_LOCKS,
    /// FUSE_FLOCK_LOCKS); off (`-o no_posix_lock`, `-o no_flock`), the guest kernel keeps
    /// them to itself, as with virtiofsd.
    pub host_posix_locks: bool,
    pub host_flock: bool,
    /// Offer READDIRPLUS (names with their attributes in one reply); off with
    /// `--no-readdirplus`, the guest reads directories with READDIR and looks names up one
    /// by one, as with virtiofsd.
    pub readdirplus: bool,
    /// Negotiate FUSE_HANDLE_KILLPRIV_V2 (`--killpriv-v2`): the guest then leaves clearing
    /// setuid/setgid bits on write, truncate and chown to the daemon, flagging each request
    /// that must clear them, instead of sending a SETATTR of its own first.
    pub killpriv_v2: bool,
    /// Most descriptors the guest may make the daemon hold (one per node, one per open
    /// handle); the daemon sets [`guest_descriptor_budget`], the default is no limit.
    pub guest_descriptors: usize,
    /// `--translate-uid` / `--translate-gid`: ids translated between guest and host.
    pub uids: IdTranslation,
    pub gids: IdTranslation,
    /// `--allow-mmap`: agree to FUSE_DIRECT_IO_ALLOW_MMAP, so that with `--cache never` or
    /// `metadata` (direct I/O) the guest still lets programs map files shared.
    pub allow_mmap: bool,
    /// `--xattrmap`: extended attribute names translated between guest and host.
    pub xattrmap: Option<XattrMap>,
    /// `--security-label`: agree to FUSE_SECURITY_CTX when the guest offers it, and store the
    /// security context of each object the guest creates as the xattr it names.
    pub security_label: bool,
    /// `--security-label=always`: refuse INIT (EPROTO) from a guest that does not offer it.
    pub security_label_required: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_dir: PathBuf::from("/"),
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
            cache: CachePolicy::Auto,
            writeback: false,
            xattr: false,
            posix_acl: false,
            inode_file_handles: FileHandleMode::Never,
            allow_direct_io: false,
            announce_submounts: false,
            host_posix_locks: true,
            host_flock: true,
            readdirplus: true,
            killpriv_v2: false,
            guest_descriptors: usize::MAX,
            uids: IdTranslation::default(),
            gids: IdTranslation::default(),
            allow_mmap: false,
            xattrmap: None,
            security_label: false,
            security_label_required: false,
        }
    }
}

/// The passthrough filesystem. Node ids and handles are `u64`; see the module documentation.
pub struct PassthroughFs {
    cfg: Config,
    inodes: InodeTable,
    handles: HandleTable,
    /// `/proc/self/fd`, to reopen our O_PATH descriptors with real access modes.
    proc_self_fd: File,
    /// The share's root, O_PATH; also the working directory threads return to.
    root: File,
    // What INIT agreed with the guest.
    writeback: AtomicBool,
    posix_acl: AtomicBool,
    submounts: AtomicBool,
    leases: OnceLock<Arc<dyn LeaseKeeper>>,
    /// See [`PassthroughFs::stale_name_answers`].
    stale_names: AtomicU64,
    /// Name resolutions for the guest so far (LOOKUP, and the lookup after MKNOD, MKDIR,
    /// SYMLINK and LINK; counting more only makes the retry rule stricter): a request repeated
    /// after an ESTALE with none in between came through something the guest could not
    /// revalidate (see `check_names`).
    lookups: AtomicU64,
    /// Requests refused because the guest had used up `descriptor_budget`.
    descriptor_refusals: AtomicU64,
    /// How new nodes refer to their inodes: `Never` (a descriptor each) when file handles
    /// are off or do not work here (see [`file_handle`]).
    file_handles: FileHandleMode,
    /// A descriptor per host mount, for opening inodes by handle.
    mounts: MountFds,
}

/// Descriptors kept out of the guest's reach: the vhost-user connection's (guest memory
/// regions, an eventfd or two per ring, up to 16 request queues), the host watcher's and the
/// descriptor each fanotify event carries, and whatever a request opens for a moment (a
/// lookup's O_PATH before it is found known).
pub const DAEMON_DESCRIPTORS: usize = 128;

/// The process's descriptor limit (RLIMIT_NOFILE, soft).
pub fn descriptor_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// How many descriptors the guest may make the daemon hold, nodes, handles and the host
/// leases taken for it together: all but [`DAEMON_DESCRIPTORS`], and at least half the limit.
/// A guest that looks up and opens as much as it can then runs out of its own share, not of
/// the daemon's; host leases are taken only while the same sum stays under it
/// ([`PassthroughFs::descriptors_held`]).
pub fn guest_descriptor_budget() -> usize {
    let total = descriptor_limit();
    total.saturating_sub(DAEMON_DESCRIPTORS).max(total / 2)
}

impl PassthroughFs {
    /// Open `/proc/self/fd` and the share's root. Both stay open, so this may run before the
    /// daemon pivots into the share and INIT needs no path lookups afterwards.
    pub fn new(cfg: Config) -> io::Result<Self> {
        let proc_self_fd = openat(
            libc::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let root_path =
            std::ffi::CString::new(cfg.root_dir.as_os_str().as_bytes()).map_err(|_| einval())?;
        // The administrator's path may contain symlinks; everything below it may not.
        let root = openat(
            libc::AT_FDCWD,
            &root_path,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let file_handles = match (
            cfg.inode_file_handles,
            file_handle::usable(&proc_self_fd, &root),
        ) {
            (FileHandleMode::Never, _) => FileHandleMode::Never,
            (mode, Ok(())) => mode,
            (FileHandleMode::Prefer, Err(e)) => {
                log::info!(
                    "--inode-file-handles=prefer: file handles cannot be used here ({e}; \
                     opening by handle needs CAP_DAC_READ_SEARCH); every node holds an O_PATH \
                     descriptor"
                );
                FileHandleMode::Never
            }
            (FileHandleMode::Mandatory, Err(e)) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "--inode-file-handles=mandatory: the shared directory cannot be \
                         opened by file handle ({e}; its filesystem needs file handles and the \
                         daemon CAP_DAC_READ_SEARCH)"
                    ),
                ));
            }
        };
        let fs = PassthroughFs {
            cfg,
            inodes: InodeTable::new(),
            handles: HandleTable::new(),
            proc_self_fd,
            root,
            writeback: AtomicBool::new(false),
            posix_acl: AtomicBool::new(false),
            submounts: AtomicBool::new(false),
            leases: OnceLock::new(),
            stale_names: AtomicU64::new(0),
            lookups: AtomicU64::new(0),
            descriptor_refusals: AtomicU64::new(0),
            file_handles,
            mounts: MountFds::default(),
        };
        fs.install_root()?;
        Ok(fs)
    }

    /// Kept for the daemon's start-up sequence: the root was opened by [`new`](Self::new), so
    /// there is nothing left to import. Fails only if the root is no longer reachable.
    pub fn import(&self) -> io::Result<()> {
        statx_fd(self.root.as_raw_fd()).map(|_| ())
    }

    fn install_root(&self) -> io::Result<()> {
        let info = statx_fd(self.root.as_raw_fd())?;
        let id = InodeId {
            dev: info.st.st_dev,
            ino: info.st.st_ino,
            mnt_id: info.mnt_id,
        };
        let file = reopen_path(&self.proc_self_fd, &self.root)?;
        if self.file_handles != FileHandleMode::Never {
            // The share's own mount: inodes on it can be opened by handle from the start.
            self.mounts
                .get_or_insert(id.mnt_id, &self.proc_self_fd, self.root.as_raw_fd())?;
        }
        // The root stays pinned by a descriptor whatever the mode: the guest never forgets it.
        self.inodes
            .set_root(InodeFile::Fd(file), id, info.st.st_mode & libc::S_IFMT);
        Ok(())
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    // Accessors for the coherence engine.

    /// The inode's O_PATH descriptor (via [`InodeData`]'s `AsFd`) and identity. Holding the
    /// returned `Arc` keeps the descriptor open even if the guest forgets the inode meanwhile.
    pub fn inode_fd(&self, inode: u64) -> Option<Arc<InodeData>> {
        self.inodes.get(inode)
    }

    /// A new read-only descriptor of the inode (e.g. for a file lease or a fanotify mark).
    /// Only regular files and directories can be opened (else EBADF).
    pub fn reopen_inode(&self, inode: u64, flags: ReadOnly) -> io::Result<File> {
        let data = self.inode(inode)?;
        self.open_read(&data, flags)
    }

    /// A new read-only descriptor of `data`, as [`PassthroughFs::reopen_inode`].
    pub fn reopen_data(&self, data: &InodeData, flags: ReadOnly) -> io::Result<File> {
        self.open_read(data, flags)
    }

    /// The host identity of a node id.
    pub fn inode_id(&self, inode: u64) -> Option<InodeId> {
        self.inodes.get(inode).map(|d| d.id)
    }

    /// The node id of a host inode seen through a given mount.
    pub fn find_inode(&self, id: &InodeId) -> Option<u64> {
        self.inodes.find(id)
    }

    /// Report inodes entering and leaving the table to `observer` (too) from now on.
    pub fn add_observer(&self, observer: Arc<dyn InodeObserver>) {
        self.inodes.add_observer(observer);
    }

    /// Let `keeper` decide the timeouts and cache flags of replies from now on (once).
    pub fn set_lease_keeper(&self, keeper: Arc<dyn LeaseKeeper>) {
        let _ = self.leases.set(keeper);
    }

    /// All node ids of host inode (dev, ino), one per mount it was seen through.
    pub fn find_inodes_by_dev_ino(&self, dev: u64, ino: u64) -> Vec<u64> {
        self.inodes.find_dev_ino(dev, ino)
    }

    /// The open descriptor behind a guest file handle.
    pub fn handle_fd(&self, handle: u64) -> Option<Arc<HandleData>> {
        self.handles.get_any(handle)
    }

    /// Every inode the guest currently knows (for watchers starting late).
    pub fn inodes_snapshot(&self) -> Vec<Arc<InodeData>> {
        self.inodes.snapshot()
    }

    /// Number of node ids in the table (the root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Number of open guest handles.
    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    // Helpers shared by the operations.

    fn inode(&self, inode: u64) -> io::Result<Arc<InodeData>> {
        self.inodes.get(inode).ok_or_else(ebadf)
    }

    fn handle(&self, handle: u64, inode: u64) -> io::Result<Arc<HandleData>> {
        self.handles.get(handle, inode).ok_or_else(ebadf)
    }

    /// Guest open flags adjusted as virtiofsd does.
    fn open_flags(&self, flags: u32) -> i32 {
        let mut flags = flags as i32;
        if self.writeback.load(Ordering::Relaxed) {
            // With writeback caching the guest may read pages of a file it opened write-only,
            // and it implements O_APPEND itself from its own idea of the size.
            if flags & libc::O_ACCMODE == libc::O_WRONLY {
                flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
            }
            flags &= !libc::O_APPEND;
        }
        if !self.cfg.allow_direct_io {
            flags &= !libc::O_DIRECT;
        }
        flags
    }

    fn file_open_options(&self) -> OpenOptions {
        match self.cfg.cache {
            CachePolicy::Never | CachePolicy::Metadata => OpenOptions::DIRECT_IO,
            CachePolicy::Auto => OpenOptions::empty(),
            CachePolicy::Always | CachePolicy::Coherent => OpenOptions::KEEP_CACHE,
        }
    }

    /// CACHE_DIR without KEEP_CACHE: the guest caches the listing for one open (Linux drops
    /// it at the next OPENDIR). Not virtiofsd `--cache always`'s KEEP_CACHE: our names expire
    /// with the lease, and a listing read afresh (READDIRPLUS) renews them all in a few
    /// requests, where a kept listing left each to its own LOOKUP (docs/performance.md).
    fn dir_open_options(&self) -> OpenOptions {
        match self.cfg.cache {
            CachePolicy::Always | CachePolicy::Coherent => OpenOptions::CACHE_DIR,
            _ => OpenOptions::empty(),
        }
    }

    /// The umask to create with: the guest's own when it left masking to us (POSIX ACLs, so a
    /// default ACL can override it), else none since the guest already applied it.
    fn create_umask(&self, umask: u32) -> u32 {
        if self.posix_acl.load(Ordering::Relaxed) {
            umask
        } else {
            0
        }
    }

    /// The entry for `data`; `parent` the directory's identity (submount check), `named_in`
    /// the directory node the guest holds the name in.
    fn entry(
        &self,
        data: &InodeData,
        mut st: stat64,
        parent: Option<&InodeId>,
        named_in: Option<u64>,
        acquire: bool,
    ) -> Entry {
        let crosses_mount =
            parent.is_some_and(|p| p.dev != data.id.dev || p.mnt_id != data.id.mnt_id);
        let attr_flags =
            if self.submounts.load(Ordering::Relaxed) && is_dir(st.st_mode) && crosses_mount {
                ATTR_SUBMOUNT
            } else {
                0
            };
        let (attr_timeout, entry_timeout) = match self.leases.get() {
            Some(keeper) => keeper.grant(data, &mut st, true, named_in, acquire),
            None => (self.cfg.attr_timeout, self.cfg.entry_timeout),
        };
        self.ids_to_guest(&mut st);
        Entry {
            inode: data.inode,
            generation: 0,
            attr: st,
            attr_flags,
            attr_timeout,
            entry_timeout,
        }
    }

    /// The attribute timeout for a GETATTR or SETATTR reply carrying `st`.
    fn attr_reply(&self, data: &InodeData, mut st: stat64) -> (stat64, Duration) {
        let timeout = match self.leases.get() {
            Some(keeper) => keeper.grant(data, &mut st, false, None, true).0,
            None => self.cfg.attr_timeout,
        };
        self.ids_to_guest(&mut st);
        (st, timeout)
    }

    /// The owner and group of a host file as the guest sees them (`--translate-uid/gid`).
    fn ids_to_guest(&self, st: &mut stat64) {
        st.st_uid = self.cfg.uids.to_guest(st.st_uid);
        st.st_gid = self.cfg.gids.to_guest(st.st_gid);
    }

    /// The host ids for guest ids `uid` and `gid` (`--translate-uid/gid`); EPERM for ids
    /// the guest may not give files.
    fn ids_to_host(&self, uid: u32, gid: u32) -> io::Result<(u32, u32)> {
        Ok((self.cfg.uids.to_host(uid)?, self.cfg.gids.to_host(gid)?))
    }

    /// Whether an OPEN or OPENDIR may let the guest keep what it cached; `file` is the
    /// descriptor just opened on `data` (its attributes are the inode's, without reopening a
    /// file handle).
    fn check_open(&self, data: &InodeData, file: &File) -> io::Result<bool> {
        match self.leases.get() {
            Some(keeper) => Ok(keeper.check_open(data, &statx_fd(file.as_raw_fd())?.st)),
            None => Ok(true),
        }
    }

    /// Before OPEN or a SETATTR without a handle changes anything on the host: every name the
    /// guest was given `data` under must still lead to this very inode. FUSE names only the
    /// inode, so a guest whose dentry went stale (the host renamed the file away, replaced or
    /// unlinked it) would otherwise truncate, write or chmod the wrong file. The names that
    /// lead elsewhere now (or nowhere) are forgotten and the guest gets ESTALE, which makes its
    /// VFS walk the path again with revalidation and retry: then it reaches whatever the name
    /// leads to now.
    ///
    /// Exact, not a guess from timestamps: the name is resolved now and compared by identity
    /// (device, inode number, mount). We hold an O_PATH descriptor of `data`, so its inode
    /// number cannot have been reused by another file meanwhile.
    fn check_names(&self, data: &InodeData) -> io::Result<()> {
        let names = data
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot();
        if names.is_empty() {
            return Ok(());
        }
        let mut stale: Vec<(u64, Box<[u8]>)> = Vec::new();
        for (parent, name) in names {
            if !self.name_leads_to(parent, &name, &data.id) {
                stale.push((parent, name));
            }
        }
        if stale.is_empty() {
            return Ok(());
        }
        // The guest's VFS retries an ESTALE once, revalidating the path with LOOKUPs. A retry
        // with no LOOKUP at all since came through a link it cannot revalidate (an open of
        // /proc/self/fd/N while the host renamed the file): that one goes through, to the file
        // the descriptor refers to, as on a local filesystem.
        let lookups_now = self.lookups.load(Ordering::SeqCst) + 1;
        if data.estale_at.swap(0, Ordering::SeqCst) == lookups_now {
            return Ok(());
        }
        // A file's stale names stay: FUSE does not say which name this request came through,
        // and the guest's retry revalidates only that one; a dentry of another stale name may
        // still lead here. The retry's LOOKUP of a name that still leads here gets a node of
        // its own (`alias_for`), so this node keeps answering ESTALE only to stale dentries.
        // A directory has one dentry in the guest, which the retry revalidates, or none at
        // all (a process's working directory): its stale names go, so that the retry of a
        // request relative to it goes through.
        if is_dir(data.mode) {
            let mut names = data.names.lock().unwrap_or_else(|e| e.into_inner());
            for (parent, name) in &stale {
                names.forget(*parent, name);
            }
        }
        log::trace!(
            "node {}: stale names {:?}",
            data.inode,
            stale
                .iter()
                .map(|(p, n)| format!("{p}/{}", String::from_utf8_lossy(n)))
                .collect::<Vec<_>>()
        );
        data.estale_at.store(lookups_now, Ordering::SeqCst);
        self.stale_names.fetch_add(1, Ordering::Relaxed);
        Err(io::Error::from_raw_os_error(libc::ESTALE))
    }

    /// The host inode `name` in `dir` leads to now (no symlink followed).
    fn id_at(&self, dir: &InodeData, name: &CStr) -> Option<InodeId> {
        let info = util::statx_at(dir.fd().ok()?.as_raw_fd(), name, 0).ok()?;
        Some(InodeId {
            dev: info.st.st_dev,
            ino: info.st.st_ino,
            mnt_id: info.mnt_id,
        })
    }

    /// The newest node id of what `name` in `dir` leads to now, if the guest knows that inode.
    fn node_at(&self, dir: &InodeData, name: &CStr) -> Option<u64> {
        self.inodes.find(&self.id_at(dir, name)?)
    }

    /// The guest moved (RENAME: `to`) or dropped (UNLINK, RMDIR, a rename over it) its dentry
    /// `from` of host inode `id`. FUSE does not say which node the dentry was on, so every
    /// node of the file that holds the name follows: an older alias as much as the newest
    /// node. Otherwise that node would keep a name that leads elsewhere now and answer ESTALE
    /// through its other names.
    fn guest_moved_name(&self, id: &InodeId, from: (u64, &[u8]), to: Option<(u64, &[u8])>) {
        for node in self.inodes.nodes_of(id) {
            let Some(data) = self.inodes.get(node) else {
                continue;
            };
            let mut names = data.names.lock().unwrap_or_else(|e| e.into_inner());
            if names.holds(from.0, from.1) {
                names.forget(from.0, from.1);
                if let Some((dir, name)) = to {
                    names.remember(dir, name);
                }
            }
        }
    }

    /// Whether `name` in directory node `parent` leads to host inode `id` now.
    fn name_leads_to(&self, parent: u64, name: &[u8], id: &InodeId) -> bool {
        self.inodes.get(parent).is_some_and(|p| {
            util::with_cstr(name, |cname| {
                p.fd()
                    .and_then(|fd| util::statx_at(fd.as_raw_fd(), cname, 0))
                    .is_ok_and(|info| {
                        info.st.st_dev == id.dev
                            && info.st.st_ino == id.ino
                            && info.mnt_id == id.mnt_id
                    })
            })
            .unwrap_or(false)
        })
    }

    /// A LOOKUP of `name` in `dir` found host inode `id`: the node the guest has for it, if
    /// the answer must carry a new node id instead. That is when the node also carries a name
    /// that no longer leads to the file (the host renamed or unlinked it): the guest keeps its
    /// stale dentry on the old node, whose OPEN keeps answering ESTALE, while this name works
    /// at once (the guest retries an ESTALE only once). And when the node already carries
    /// [`GuestNames::MAX`] names: a further name never pushes a remembered one out unchecked.
    /// The guest then caches the file's pages per node, as for two files; a writable handle on
    /// either makes the other's attributes expire at once (no host lease can be had), and
    /// each OPEN compares the file's ctime with what that node cached. Not for directories:
    /// the guest moves a directory's one dentry itself.
    fn alias_for(
        &self,
        newest: Option<u64>,
        id: &InodeId,
        mode: u32,
        dir: u64,
        name: &[u8],
    ) -> Option<u64> {
        if is_dir(mode) {
            return None;
        }
        let current = self.inodes.get(newest?)?;
        // The other names are checked on the host with the lock released.
        let (full, others) = {
            let names = current.names.lock().unwrap_or_else(|e| e.into_inner());
            let full = !names.holds(dir, name) && names.len() >= GuestNames::MAX;
            (full, names.others(dir, name))
        };
        if full {
            return Some(current.inode);
        }
        others
            .iter()
            .any(|(p, n)| !self.name_leads_to(*p, n, id))
            .then_some(current.inode)
    }

    /// [`check_names`](Self::check_names) for a request that may come through a path or a
    /// descriptor (SETATTR of mode, owner or times, SETXATTR, REMOVEXATTR): a descriptor's
    /// caller (fchmod, fsetxattr...) cannot retry an ESTALE, so while the guest has the inode
    /// open the request goes ahead unchecked.
    fn check_names_unless_open(&self, data: &InodeData) -> io::Result<()> {
        if data.open_handles.load(Ordering::Relaxed) == 0 {
            self.check_names(data)
        } else {
            Ok(())
        }
    }

    /// Before a request makes the daemon hold `needed` more descriptors for the guest (a new
    /// node, an open handle): ENFILE once the guest holds its budget, so that the daemon keeps the
    /// descriptors it needs itself (a reboot's ring eventfds, leases, fanotify events, which
    /// each carry one). Counted and logged (the first refusal and then every power of two).
    fn descriptor_room(&self, needed: usize) -> io::Result<()> {
        let held =
            self.descriptors_held() + self.leases.get().map_or(0, |keeper| keeper.descriptors());
        if held.saturating_add(needed) <= self.cfg.guest_descriptors {
            return Ok(());
        }
        let n = self.descriptor_refusals.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!(
                "the guest holds {held} descriptors, its budget ({} of RLIMIT_NOFILE): \
                 refusing new nodes and opens with ENFILE until it forgets some ({n} refused)",
                self.cfg.guest_descriptors
            );
        }
        Err(io::Error::from_raw_os_error(libc::ENFILE))
    }

    /// Descriptors held for the guest's nodes and open handles; read without locks.
    pub fn descriptors_held(&self) -> usize {
        self.inodes.descriptors() + self.handles.len() + self.mounts.len()
    }

    /// Whether nodes refer to inodes by file handle (the daemon then needs
    /// CAP_DAC_READ_SEARCH).
    pub fn uses_file_handles(&self) -> bool {
        self.file_handles != FileHandleMode::Never
    }

    /// How a new node of host inode `id`, found as O_PATH descriptor `file`, refers to it.
    /// `handle`: its file handle, if they are in use.
    fn inode_file(
        &self,
        file: File,
        handle: Option<io::Result<FileHandle>>,
        id: &InodeId,
    ) -> io::Result<InodeFile> {
        let Some(handle) = handle else {
            return Ok(InodeFile::Fd(file));
        };
        let handle = handle.and_then(|handle| {
            let mount =
                self.mounts
                    .get_or_insert(id.mnt_id, &self.proc_self_fd, file.as_raw_fd())?;
            Ok(InodeFile::Handle { handle, mount })
        });
        match handle {
            Ok(node) => Ok(node),
            // A filesystem without handles below the share (a submount), or a mount whose
            // root the guest has not looked up.
            Err(_) if self.file_handles == FileHandleMode::Prefer => Ok(InodeFile::Fd(file)),
            Err(e) => {
                log::debug!("--inode-file-handles=mandatory: no file handle for {id:?}: {e}");
                Err(e)
            }
        }
    }

    /// The guest's descriptor budget ([`guest_descriptor_budget`] in the daemon).
    pub fn descriptor_budget(&self) -> usize {
        self.cfg.guest_descriptors
    }

    /// Requests refused with ENFILE because the guest held its descriptor budget.
    pub fn descriptor_refusals(&self) -> u64 {
        self.descriptor_refusals.load(Ordering::Relaxed)
    }

    /// Requests answered ESTALE because a name the guest held no longer led to the inode.
    pub fn stale_name_answers(&self) -> u64 {
        self.stale_names.load(Ordering::Relaxed)
    }

    /// Run `f`, which opens `data` for writing or truncates it on the guest's behalf: the
    /// node gives up the daemon's own host lease first, since the guest's cache of this node
    /// sees its own writes. Other node ids of the same host inode (aliases, see `alias_for`)
    /// keep theirs: the guest caches each alias apart, so this open breaks their leases and
    /// waits, like a host writer, until the guest's copies under them have run out.
    fn writing<T>(&self, data: &InodeData, f: impl FnOnce() -> T) -> T {
        let Some(keeper) = self.leases.get() else {
            return f();
        };
        keeper.begin_write(data);
        let r = f();
        keeper.end_write(data);
        r
    }

    /// Run `f`, which changes on the guest's behalf the names in the directory nodes among
    /// `nodes`, or the names or attributes of the nodes themselves: the metadata choke point.
    /// Where the keeper holds delegations (hosts with F_SETDELEG), our own change would break
    /// our own delegation and wait for it like a host change; the keeper gives it up first,
    /// since the guest's cache sees its own change. Every create, link, unlink, rmdir, rename,
    /// SETATTR and xattr change passes here (opens for writing pass [`Self::writing`]).
    fn changing<T>(&self, nodes: &[u64], f: impl FnOnce() -> T) -> T {
        let Some(keeper) = self.leases.get() else {
            return f();
        };
        let (mut small, mut large) = ([0u64; 4], Vec::new());
        let distinct = sorted_distinct(nodes, &mut small, &mut large);
        for &node in distinct {
            keeper.begin_change(node);
        }
        let r = f();
        for &node in distinct {
            keeper.end_change(node);
        }
        r
    }

    /// Resolve one name below `parent` and count a guest lookup of the result.
    fn do_lookup(&self, parent: &InodeData, name: &CStr) -> io::Result<Entry> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.lookup_granting(parent, name, true)
    }

    /// [`do_lookup`](Self::do_lookup); `acquire` as in [`LeaseKeeper::grant`].
    fn lookup_granting(&self, parent: &InodeData, name: &CStr, acquire: bool) -> io::Result<Entry> {
        self.lookup_at(parent, None, name, acquire)
    }

    /// [`lookup_granting`](Self::lookup_granting) with `parent_fd`, a descriptor of `parent`
    /// the caller already has open (READDIRPLUS's directory handle), so looking up each of a
    /// directory's names does not open the directory again (by file handle) for every name.
    fn lookup_at(
        &self,
        parent: &InodeData,
        parent_fd: Option<RawFd>,
        name: &CStr,
        acquire: bool,
    ) -> io::Result<Entry> {
        let b = name.to_bytes();
        if b == b"." || (b == b".." && parent.inode == ROOT_INODE) {
            // The root's parent is not part of the share: ".." there is the root again.
            let st = statx_fd(parent.fd()?.as_raw_fd())?.st;
            let data = self.inodes.add_ref(parent.inode).ok_or_else(ebadf)?;
            return Ok(self.entry(&data, st, None, None, acquire));
        }
        if b.is_empty() || b.contains(&b'/') {
            return Err(einval());
        }
        let opened;
        let dir_fd = match parent_fd {
            Some(fd) => fd,
            None => {
                opened = parent.fd()?;
                opened.as_raw_fd()
            }
        };
        let file = openat(dir_fd, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        // A submount's ".." is its parent mount, not a submount of it.
        let parent_id = (b != b"..").then_some(&parent.id);
        // The guest will hold a dentry under this name (not for "..": it never does).
        let named = (b != b"..").then_some((parent.inode, b));
        self.add_inode(file, parent_id, named, acquire)
    }

    /// Enter the inode `file` (an O_PATH descriptor) into the table and build its entry;
    /// `named`: the (parent node, name) the guest will hold a dentry under, remembered before
    /// the entry is granted.
    fn add_inode(
        &self,
        file: File,
        parent: Option<&InodeId>,
        named: Option<(u64, &[u8])>,
        acquire: bool,
    ) -> io::Result<Entry> {
        let info = statx_fd(file.as_raw_fd())?;
        let id = InodeId {
            dev: info.st.st_dev,
            ino: info.st.st_ino,
            mnt_id: info.mnt_id,
        };
        // The alias decision is made on the newest node now; the insert re-checks that it is
        // still the newest (see `lookup_or_insert`).
        let decided = self.inodes.find(&id);
        // Nodes that hold a file handle do not keep their inode alive, so the host may have
        // reused the inode number: a node of the same number but another handle (another
        // generation) is of a dead inode, never to be handed out for this one.
        let handle =
            (self.file_handles != FileHandleMode::Never).then(|| FileHandle::of(file.as_raw_fd()));
        let reused = match (&handle, decided.and_then(|n| self.inodes.get(n))) {
            (Some(Ok(new)), Some(old)) => old.file.handle().is_some_and(|old| old != new),
            _ => false,
        };
        let avoid = if reused {
            decided
        } else {
            named.and_then(|(dir, name)| self.alias_for(decided, &id, info.st.st_mode, dir, name))
        };
        let file = if avoid.is_some() || decided.is_none() {
            // A new node: it keeps `file` open, or its handle.
            let file = self.inode_file(file, handle, &id)?;
            if file.holds_descriptor() {
                self.descriptor_room(1)?;
            }
            file
        } else {
            // The node is found (should a FORGET remove it meanwhile, the new one keeps the
            // descriptor).
            InodeFile::Fd(file)
        };
        let data = self
            .inodes
            .lookup_or_insert(id, info.st.st_mode, file, decided, avoid);
        if let Some((dir, name)) = named {
            data.names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remember(dir, name);
        }
        Ok(self.entry(&data, info.st, parent, named.map(|(dir, _)| dir), acquire))
    }

    /// Whether the host watcher reports changes of `data` and of every directory the guest
    /// holds a name of it in: what a notify-capable guest's long lease needs.
    pub fn watched_with_parents(&self, data: &InodeData) -> bool {
        data.watched.load(Ordering::Relaxed)
            && data
                .names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .all_parents(|p| {
                    self.inodes
                        .get(p)
                        .is_some_and(|d| d.watched.load(Ordering::Relaxed))
                })
    }

    /// Enter the inode behind an open descriptor (from CREATE or TMPFILE: the name may already
    /// have changed, or there is none) into the table. We hold it open for writing, so no
    /// lease can be had for it now.
    fn add_inode_of_open_file(
        &self,
        file: &File,
        parent: &InodeData,
        name: Option<&CStr>,
    ) -> io::Result<Entry> {
        let path = reopen_path(&self.proc_self_fd, file)?;
        let named = name.map(|n| (parent.inode, n.to_bytes()));
        self.add_inode(path, Some(&parent.id), named, false)
    }
}

/// `nodes` sorted, each once: in `small` when they fit (a request names one to four), else
/// in `large`.
fn sorted_distinct<'a>(
    nodes: &[u64],
    small: &'a mut [u64; 4],
    large: &'a mut Vec<u64>,
) -> &'a [u64] {
    let sorted: &mut [u64] = if nodes.len() <= small.len() {
        small[..nodes.len()].copy_from_slice(nodes);
        &mut small[..nodes.len()]
    } else {
        large.extend_from_slice(nodes);
        large
    };
    sorted.sort_unstable();
    let mut distinct = 0;
    for i in 0..sorted.len() {
        if distinct == 0 || sorted[distinct - 1] != sorted[i] {
            sorted[distinct] = sorted[i];
            distinct += 1;
        }
    }
    &sorted[..distinct]
}

/// An O_PATH descriptor of the inode an open descriptor refers to.
fn reopen_path(proc_self_fd: &File, file: &File) -> io::Result<File> {
    openat(
        proc_self_fd.as_raw_fd(),
        &fd_name(file.as_raw_fd()),
        libc::O_PATH,
        0,
    )
}
