//! The inode table: FUSE node ids ↔ host inodes.
//!
//! Each entry holds an O_PATH descriptor or a file handle of its host inode, its identity
//! (device, inode number, mount id), and the guest's lookup count. The guest only ever names inodes by the
//! node ids handed out here, so every host access starts from a descriptor we opened
//! ourselves; an unknown id is EBADF. An entry leaves the table when the guest forgets its
//! last lookup, which bounds the table by what the guest's dentry cache holds.
//!
//! Lookup-count changes and insertions happen under the table's write lock, so a forget that
//! brings the count to zero cannot race with a lookup that revives the same inode.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::file_handle::{InodeFd, InodeFile};
use rustc_hash::FxHashMap;

/// The FUSE node id of the share's root.
pub const ROOT_INODE: u64 = 1;

/// What makes two host inodes the same: identical (st_dev, st_ino) on the same mount.
/// Ordered by (dev, ino) first so all mounts of one host inode can be found together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeId {
    pub dev: u64,
    pub ino: u64,
    pub mnt_id: u64,
}

/// One host inode the guest knows about.
pub struct InodeData {
    /// The FUSE node id.
    pub inode: u64,
    /// The host inode itself (a symlink stays a symlink): an O_PATH | O_NOFOLLOW descriptor
    /// or a file handle (`--inode-file-handles`); [`InodeData::fd`] gives a descriptor.
    pub(crate) file: InodeFile,
    pub id: InodeId,
    /// File type bits (S_IFMT) at lookup time; the type of an inode never changes.
    pub mode: u32,
    refcount: AtomicU64,
    /// Per lock owner, the descriptor whose open file description carries that owner's
    /// POSIX (OFD) locks on this inode; closing it releases them.
    pub(crate) plocks: Mutex<HashMap<u64, Arc<File>>>,
    /// The names the guest was given this inode under (see [`GuestNames`]).
    pub(crate) names: Mutex<GuestNames>,
    /// Guest handles open on this inode (OPEN, CREATE, TMPFILE, OPENDIR), counted by
    /// [`OpenHandleCount`] guards that live as long as the handle's descriptor.
    pub(crate) open_handles: AtomicU32,
    /// Of those, the handles the guest opened to execute the file (FMODE_EXEC: a program, its
    /// ELF interpreter). While one is open the guest's kernel refuses to open the inode for
    /// writing (ETXTBSY), and the daemon refuses too ([`PassthroughFs::open_for_write`]):
    /// with ATOMIC_O_TRUNC the guest sends an `open(O_RDONLY|O_TRUNC)` to be truncated here
    /// before it checks, so without this a refused open would still empty a running program.
    ///
    /// [`PassthroughFs::open_for_write`]: super::PassthroughFs::open_for_write
    pub(crate) exec_handles: AtomicU32,
    /// Set by the coherence engine's host watcher while a fanotify mark reports changes of
    /// this inode (its data for a file; its entries, its own and its children's attributes
    /// for a directory). Only then may a notify-capable guest cache it for the long lease.
    pub watched: AtomicBool,
    /// When this node last answered ESTALE for a stale name: the daemon's LOOKUP count then,
    /// plus one (0: never). See `PassthroughFs::check_names`.
    pub(crate) estale_at: AtomicU64,
}

/// The (parent node id, name) pairs under which the guest got this inode in an entry reply
/// (LOOKUP, READDIRPLUS, CREATE, MKNOD, MKDIR, SYMLINK, LINK) or moved it (RENAME): the guest
/// may hold a dentry for each. FUSE's OPEN and SETATTR name only the inode, so before one of
/// them changes anything the daemon checks that every one of these names still leads to this
/// very inode on the host (see `PassthroughFs::check_names`).
///
/// Bounded: a LOOKUP of a further name of a file whose node holds [`GuestNames::MAX`] gets a
/// node of its own (`PassthroughFs::alias_for`). Only a directory, which has one dentry in
/// the guest, drops its oldest name here (the host renamed it more than `MAX` times while the
/// guest kept it).
#[derive(Default)]
pub(crate) struct GuestNames {
    names: Vec<(u64, Box<[u8]>)>,
}

impl GuestNames {
    pub(crate) const MAX: usize = 4;

    /// Remember `name` in `parent`; no allocation when it is already known (a revalidation).
    pub(crate) fn remember(&mut self, parent: u64, name: &[u8]) {
        if let Some(i) = self
            .names
            .iter()
            .position(|(p, n)| *p == parent && &n[..] == name)
        {
            // Keep the newest last, so the oldest goes first when the list is full.
            let last = self.names.len() - 1;
            self.names.swap(i, last);
            return;
        }
        if self.names.len() >= Self::MAX {
            self.names.remove(0);
        }
        self.names.push((parent, name.into()));
    }

    /// Whether `name` in `parent` is one of these names.
    pub(crate) fn holds(&self, parent: u64, name: &[u8]) -> bool {
        self.names
            .iter()
            .any(|(p, n)| *p == parent && &n[..] == name)
    }

    /// Forget `name` in `parent` (the guest removed or moved that dentry itself).
    pub(crate) fn forget(&mut self, parent: u64, name: &[u8]) {
        self.names
            .retain(|(p, n)| !(*p == parent && &n[..] == name));
    }

    /// Whether `f` holds for every parent directory these names are in (true with none).
    pub(crate) fn all_parents(&self, mut f: impl FnMut(u64) -> bool) -> bool {
        self.names.iter().all(|(p, _)| f(*p))
    }

    pub(crate) fn snapshot(&self) -> Vec<(u64, Box<[u8]>)> {
        self.names.clone()
    }

    /// Every name but `name` in `parent`: no allocation when there is none, which is a
    /// LOOKUP's or READDIRPLUS's usual case (the file has the one name the guest asks about).
    pub(crate) fn others(&self, parent: u64, name: &[u8]) -> Vec<(u64, Box<[u8]>)> {
        self.names
            .iter()
            .filter(|(p, n)| !(*p == parent && &n[..] == name))
            .cloned()
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

/// Counts one guest handle open on an inode for as long as it lives (held by the handle),
/// and among them the handles opened to execute the file.
pub(crate) struct OpenHandleCount {
    data: Arc<InodeData>,
    exec: bool,
}

impl OpenHandleCount {
    pub(crate) fn new(data: &Arc<InodeData>, exec: bool) -> Self {
        data.open_handles.fetch_add(1, Ordering::Relaxed);
        if exec {
            data.exec_handles.fetch_add(1, Ordering::SeqCst);
        }
        OpenHandleCount {
            data: data.clone(),
            exec,
        }
    }
}

impl Drop for OpenHandleCount {
    fn drop(&mut self) {
        self.data.open_handles.fetch_sub(1, Ordering::Relaxed);
        if self.exec {
            self.data.exec_handles.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl InodeData {
    /// An O_PATH descriptor of the inode for one use: the node's own, or one opened from its
    /// file handle (ESTALE once the host inode is gone).
    pub fn fd(&self) -> io::Result<InodeFd<'_>> {
        self.file.fd()
    }

    /// The directory nodes the guest holds names of this inode in (no duplicates).
    pub fn parent_nodes(&self) -> Vec<u64> {
        let mut parents = Vec::new();
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .all_parents(|p| {
                if !parents.contains(&p) {
                    parents.push(p);
                }
                true
            });
        parents
    }

    /// Like [`fd`](Self::fd), as a descriptor of its own (the node's is duplicated).
    pub fn owned_fd(&self) -> io::Result<File> {
        match self.fd()? {
            InodeFd::Owned(file) => Ok(file),
            InodeFd::Borrowed(fd) => Ok(File::from(fd.try_clone_to_owned()?)),
        }
    }
}

#[derive(Default)]
struct Maps {
    /// FxHash: node ids are ours, a guest cannot pick colliding keys.
    by_inode: FxHashMap<u64, Arc<InodeData>>,
    /// Host inode (device, inode number) -> its nodes as (mount id, node id): usually one;
    /// more when a name the guest cached went stale and the inode was looked up again under
    /// another name (an alias, see [`InodeTable::lookup_or_insert`]), or when it was seen
    /// through another mount. Node ids only grow, so each list is oldest first. FxHash: the
    /// host assigns inode numbers, a guest cannot pick colliding keys. A hash lookup per
    /// LOOKUP instead of two B-tree range walks.
    by_id: FxHashMap<(u64, u64), Vec<(u64, u64)>>,
}

impl Maps {
    /// The node ids of host inode `id` (this mount), oldest first.
    fn nodes(&self, id: &InodeId) -> impl DoubleEndedIterator<Item = u64> + '_ {
        let mnt = id.mnt_id;
        self.by_id
            .get(&(id.dev, id.ino))
            .into_iter()
            .flatten()
            .filter(move |&&(m, _)| m == mnt)
            .map(|&(_, n)| n)
    }

    fn newest(&self, id: &InodeId) -> Option<u64> {
        self.nodes(id).next_back()
    }

    fn insert_id(&mut self, id: &InodeId, node: u64) {
        self.by_id
            .entry((id.dev, id.ino))
            .or_default()
            .push((id.mnt_id, node));
    }

    fn remove_id(&mut self, id: &InodeId, node: u64) {
        if let Some(list) = self.by_id.get_mut(&(id.dev, id.ino)) {
            list.retain(|&(m, n)| !(m == id.mnt_id && n == node));
            if list.is_empty() {
                self.by_id.remove(&(id.dev, id.ino));
            }
        }
    }
}

/// Told when an inode enters the table (the guest learned its node id and may now cache its
/// attributes, data and, for a directory, entries) and when it leaves (the guest forgot it).
/// The coherence engine watches the host inode for exactly that span.
pub trait InodeObserver: Send + Sync {
    fn added(&self, data: &InodeData);
    fn removed(&self, data: &InodeData);
}

pub(crate) struct InodeTable {
    maps: RwLock<Maps>,
    /// How many nodes the table holds, readable without its lock (the descriptor budget and
    /// the lease keeper read it while holding other locks).
    size: AtomicUsize,
    /// How many of them hold a descriptor (the others hold a file handle), likewise.
    descriptors: AtomicUsize,
    next: AtomicU64,
    observers: RwLock<Vec<Arc<dyn InodeObserver>>>,
}

impl InodeTable {
    pub(crate) fn new() -> Self {
        InodeTable {
            size: AtomicUsize::new(0),
            descriptors: AtomicUsize::new(0),
            maps: RwLock::new(Maps::default()),
            next: AtomicU64::new(ROOT_INODE + 1),
            observers: RwLock::new(Vec::new()),
        }
    }

    /// Add an observer; inodes already in the table are not reported to it.
    pub(crate) fn add_observer(&self, observer: Arc<dyn InodeObserver>) {
        self.observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    fn each_observer(&self, f: impl Fn(&dyn InodeObserver)) {
        for o in self
            .observers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            f(o.as_ref());
        }
    }

    pub(crate) fn get(&self, inode: u64) -> Option<Arc<InodeData>> {
        self.read().by_inode.get(&inode).cloned()
    }

    /// The newest node id of host inode `id`.
    pub(crate) fn find(&self, id: &InodeId) -> Option<u64> {
        self.read().newest(id)
    }

    /// Every node id of host inode `id` (the newest last).
    pub(crate) fn nodes_of(&self, id: &InodeId) -> Vec<u64> {
        self.read().nodes(id).collect()
    }

    /// Every node id for host inode (dev, ino), whatever mount it was seen through.
    pub(crate) fn find_dev_ino(&self, dev: u64, ino: u64) -> Vec<u64> {
        self.read()
            .by_id
            .get(&(dev, ino))
            .map(|list| list.iter().map(|&(_, n)| n).collect())
            .unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    /// How many nodes hold a descriptor of their inode.
    pub(crate) fn descriptors(&self) -> usize {
        self.descriptors.load(Ordering::Relaxed)
    }

    fn count_descriptor(&self, data: &InodeData, added: bool) {
        if data.file.holds_descriptor() {
            if added {
                self.descriptors.fetch_add(1, Ordering::Relaxed);
            } else {
                self.descriptors.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Every inode in the table (a snapshot: the table is not locked while `f` runs).
    pub(crate) fn snapshot(&self) -> Vec<Arc<InodeData>> {
        self.read().by_inode.values().cloned().collect()
    }

    /// Install the root (node id 1). Its lookup count starts at 2 and forgets never remove
    /// it: the guest's root dentry lives as long as the mount.
    pub(crate) fn set_root(&self, file: InodeFile, id: InodeId, mode: u32) {
        let data = Arc::new(InodeData {
            inode: ROOT_INODE,
            file,
            id,
            mode,
            refcount: AtomicU64::new(2),
            plocks: Mutex::new(HashMap::new()),
            names: Mutex::new(GuestNames::default()),
            open_handles: AtomicU32::new(0),
            exec_handles: AtomicU32::new(0),
            watched: AtomicBool::new(false),
            estale_at: AtomicU64::new(0),
        });
        let mut m = self.write();
        self.count_descriptor(&data, true);
        m.insert_id(&id, ROOT_INODE);
        m.by_inode.insert(ROOT_INODE, data);
        self.size.store(m.by_inode.len(), Ordering::Relaxed);
    }

    /// Count one more guest lookup of the host inode `id`, adding it to the table with the
    /// descriptor `file` if it is new (otherwise `file` is simply closed). `decided`: the
    /// newest node of this inode when the caller decided whether the guest may get it again,
    /// and `avoid`: a node not to hand out (the guest holds a stale name of it). For a file,
    /// if the newest node is no longer `decided` (a FORGET on another queue removed it, or
    /// another lookup added one), the decision is void and a new node is made: handing out an
    /// older alias nobody checked would hand the guest a node with a stale name, whose OPEN
    /// answers ESTALE again after the guest's retry. A directory always gets its newest node
    /// (it has no aliases).
    pub(crate) fn lookup_or_insert(
        &self,
        id: InodeId,
        mode: u32,
        file: InodeFile,
        decided: Option<u64>,
        avoid: Option<u64>,
    ) -> Arc<InodeData> {
        let mut m = self.write();
        let newest = m.newest(&id);
        let checked = newest == decided || mode & libc::S_IFMT == libc::S_IFDIR;
        if let Some(data) = newest
            .filter(|&n| Some(n) != avoid && checked)
            .and_then(|n| m.by_inode.get(&n))
        {
            data.refcount.fetch_add(1, Ordering::Relaxed);
            return data.clone();
        }
        let inode = self.next.fetch_add(1, Ordering::Relaxed);
        let data = Arc::new(InodeData {
            inode,
            file,
            id,
            mode: mode & libc::S_IFMT,
            refcount: AtomicU64::new(1),
            plocks: Mutex::new(HashMap::new()),
            names: Mutex::new(GuestNames::default()),
            open_handles: AtomicU32::new(0),
            exec_handles: AtomicU32::new(0),
            watched: AtomicBool::new(false),
            estale_at: AtomicU64::new(0),
        });
        self.count_descriptor(&data, true);
        m.insert_id(&id, inode);
        m.by_inode.insert(inode, data.clone());
        self.size.store(m.by_inode.len(), Ordering::Relaxed);
        self.each_observer(|o| o.added(&data));
        data
    }

    /// Count one more lookup of an inode already in the table.
    pub(crate) fn add_ref(&self, inode: u64) -> Option<Arc<InodeData>> {
        let m = self.write();
        let data = m.by_inode.get(&inode)?;
        data.refcount.fetch_add(1, Ordering::Relaxed);
        Some(data.clone())
    }

    /// Drop `count` lookups; the entry goes when none remain. Unknown ids are ignored (FORGET
    /// has no reply, and a hostile guest's bogus forget must not hurt anyone else).
    pub(crate) fn forget(&self, inode: u64, count: u64) {
        let mut m = self.write();
        let Some(data) = m.by_inode.get(&inode) else {
            return;
        };
        let left = data.refcount.load(Ordering::Relaxed).saturating_sub(count);
        data.refcount.store(left, Ordering::Relaxed);
        if left == 0 && inode != ROOT_INODE {
            let id = data.id;
            self.each_observer(|o| o.removed(data));
            self.count_descriptor(data, false);
            m.by_inode.remove(&inode);
            m.remove_id(&id, inode);
            self.size.store(m.by_inode.len(), Ordering::Relaxed);
        }
    }

    /// Forget everything but the root (guest unmount / DESTROY).
    pub(crate) fn clear(&self) {
        let mut m = self.write();
        m.by_inode.retain(|&i, data| {
            if i != ROOT_INODE {
                self.each_observer(|o| o.removed(data));
                self.count_descriptor(data, false);
            }
            i == ROOT_INODE
        });
        m.by_id.retain(|_, list| {
            list.retain(|&(_, n)| n == ROOT_INODE);
            !list.is_empty()
        });
        self.size.store(m.by_inode.len(), Ordering::Relaxed);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        // A panic elsewhere cannot leave the maps half-updated (each update is one insert or
        // remove), so a poisoned lock is still safe to use.
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(id: InodeId, n: usize) -> (InodeTable, Vec<u64>) {
        let t = InodeTable::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let file = InodeFile::Fd(File::open("/").unwrap());
            // The first insert makes a node; each later one is told to avoid the newest.
            let newest = t.find(&id);
            let d = t.lookup_or_insert(id, libc::S_IFREG, file, newest, newest);
            assert_eq!(nodes.len(), i);
            nodes.push(d.inode);
        }
        (t, nodes)
    }

    #[test]
    fn a_lookup_decided_on_a_node_that_went_meanwhile_gets_a_new_one() {
        let id = InodeId {
            dev: 1,
            ino: 2,
            mnt_id: 3,
        };
        // Nodes a (older alias, with a stale name) and b (newest, checked: it may be reused).
        let (t, nodes) = table_with(id, 2);
        let (a, b) = (nodes[0], nodes[1]);
        assert_eq!(t.find(&id), Some(b));
        // A FORGET on another queue drops b between the decision and the insert.
        t.forget(b, 1);
        let got = t.lookup_or_insert(
            id,
            libc::S_IFREG,
            InodeFile::Fd(File::open("/").unwrap()),
            Some(b),
            None,
        );
        assert_ne!(
            got.inode, a,
            "the unchecked older alias must not be handed out"
        );
        assert_ne!(got.inode, b);
        // Decided on the newest, which is still there: reused.
        let again = t.lookup_or_insert(
            id,
            libc::S_IFREG,
            InodeFile::Fd(File::open("/").unwrap()),
            Some(got.inode),
            None,
        );
        assert_eq!(again.inode, got.inode);
        // A directory has one node, whatever happened meanwhile.
        let dir = InodeId { ino: 9, ..id };
        let d1 = t.lookup_or_insert(
            dir,
            libc::S_IFDIR,
            InodeFile::Fd(File::open("/").unwrap()),
            None,
            None,
        );
        let d2 = t.lookup_or_insert(
            dir,
            libc::S_IFDIR,
            InodeFile::Fd(File::open("/").unwrap()),
            None,
            None,
        );
        assert_eq!(d1.inode, d2.inode);
    }

    #[test]
    fn guest_names_are_bounded_and_deduplicated() {
        let mut n = GuestNames::default();
        n.remember(1, b"a");
        n.remember(1, b"a");
        assert_eq!(n.len(), 1, "a revalidation adds nothing");
        for i in 0..10u8 {
            n.remember(2, &[b'x', i]);
        }
        assert_eq!(n.len(), GuestNames::MAX);
        assert!(
            n.snapshot().iter().all(|(p, _)| *p == 2),
            "the oldest names go first"
        );
        n.forget(2, &[b'x', 9]);
        assert_eq!(n.len(), GuestNames::MAX - 1);
    }
}
