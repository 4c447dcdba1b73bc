//! The notification queue (virtqueue 1 with VIRTIO_FS_F_NOTIFICATION): FUSE notify messages
//! from the daemon to the guest, used to revoke what the guest caches.
//!
//! The guest driver keeps device-writable buffers posted on the queue (Linux: 64); each
//! message takes one. The daemon must never wait for the guest here (a guest that stops
//! refilling the queue must not stall request processing or a host event), so messages go
//! through a bounded pending list: [`Notifier::send`] appends and tries to deliver, and every
//! refill kick delivers the backlog.
//!
//! The queue is served like a request queue. With EVENT_IDX the guest kicks only when the
//! device asked (`avail_event`), so whenever messages are left over for want of buffers the
//! notifier publishes `avail_event` (enables notification) and looks at the avail ring once
//! more: a guest that refills after that point kicks, one that refilled before is seen now.
//!
//! Nothing is dropped silently. A message leaves the pending list only once a buffer has
//! taken it; one the guest's buffer cannot hold stays for the next buffer. Identical untracked
//! messages already waiting are merged (the one waiting is delivered after both changes).
//! Past [`MAX_PENDING`] messages the oldest is dropped, counted and logged; a dropped
//! revocation falls back to the lease, as for a stock guest (a host writer waiting for a
//! dropped message's confirmation is released when its lease ends: its waiter stays).
//!
//! Deliveries are batched. Whoever delivers fills every buffer the guest has posted with
//! every message waiting, then decides once whether to signal the used ring; a sender that
//! finds a delivery in progress leaves its message to it (the deliverer looks at the list
//! again before it lets go) instead of waiting for the ring and signalling on its own. A
//! caller with many messages at hand (the watcher with the events of one `read(2)` of its
//! fanotify groups) opens a [`Notifier::batch`]: sends inside it only queue, and the batch's
//! end delivers them together. So N host changes that arrive
//! together cost the guest one interrupt per filled ring, not one per file, and its refill
//! one kick per batch of buffers.
//!
//! The VMM stops and starts the ring (vhost-user GET_VRING_BASE stops it, SET_VRING_KICK /
//! SET_VRING_ENABLE start it: a paused VM); while stopped nothing touches it and messages
//! wait, and the backlog goes out when it starts again ([`Notifier::ring_started`]). A device
//! reset or a renegotiation without the feature detaches the queue ([`Notifier::detach`]):
//! virtqueue 1 may be a request queue from then on.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::transport::VirtioFsWriter;
use log::{debug, info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::metrics::Histogram;

/// Guest memory as the vhost-user crates hand it to us (the device uses the same type).
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// virtio-fs feature bit 0: the device has a notification queue.
pub const VIRTIO_FS_F_NOTIFICATION: u64 = 1 << 0;

/// The notification queue's index when the feature is negotiated.
pub const NOTIFICATION_QUEUE: usize = 1;

/// Smallest buffer the driver must post: room for the largest message we send (an
/// INVAL_ENTRY or DELETE with a 255-byte name, its NUL and the headers).
pub const NOTIFY_BUF_SIZE: u32 = 512;

/// Messages kept for a guest that has no buffer posted; beyond this the oldest are dropped.
/// Enough for a burst of host changes far larger than the guest's 64 buffers (a message
/// waiting takes about 100 bytes, twice for the merge index: a few MiB at most).
pub const MAX_PENDING: usize = 32768;

const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
const FUSE_NOTIFY_DELETE: i32 = 6;
/// The guest patch `0002` (qemu/patches/linux-6.12/): raise fsnotify events for a host change.
const FUSE_NOTIFY_FSNOTIFY: i32 = 10;

/// A message for the guest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Notification {
    /// Drop the attributes of node `ino` and, if `offset` >= 0, its cached data from `offset`
    /// for `len` bytes (`len` 0: to the end of the file).
    InvalInode { ino: u64, offset: i64, len: i64 },
    /// Drop the dentry `name` in directory node `parent`.
    InvalEntry { parent: u64, name: Vec<u8> },
    /// `name` in directory node `parent`, which led to node `child`, is gone.
    Delete {
        parent: u64,
        child: u64,
        name: Vec<u8>,
    },
    /// The host changed node `node` (`name` empty), or the entry `name` of directory node
    /// `node`: the guest raises the inotify events `mask` (IN_* bits) a local change would
    /// have, with `cookie` pairing the IN_MOVED_FROM and IN_MOVED_TO of one rename. Only for
    /// a guest that offered FUSE_HAS_FSNOTIFY at INIT ([`Notifier::fsnotify`]).
    Fsnotify {
        node: u64,
        mask: u32,
        cookie: u32,
        name: Vec<u8>,
    },
}

impl Notification {
    /// The node the message is about (what a confirmation names).
    pub fn node(&self) -> u64 {
        match self {
            Notification::InvalInode { ino, .. } => *ino,
            Notification::InvalEntry { parent, .. } | Notification::Delete { parent, .. } => {
                *parent
            }
            Notification::Fsnotify { node, .. } => *node,
        }
    }

    /// The bytes the guest reads: a `fuse_out_header` with the notify code in `error` and
    /// `unique` (0, or the id the guest confirms with), then the notify payload.
    pub fn encode(&self, unique: u64) -> Vec<u8> {
        let (code, payload) = match self {
            Notification::InvalInode { ino, offset, len } => {
                let mut p = Vec::with_capacity(24);
                p.extend_from_slice(&ino.to_le_bytes());
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                (FUSE_NOTIFY_INVAL_INODE, p)
            }
            Notification::InvalEntry { parent, name } => {
                let mut p = Vec::with_capacity(16 + name.len() + 1);
                p.extend_from_slice(&parent.to_le_bytes());
                p.extend_from_slice(&(name.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes()); // flags
                p.extend_from_slice(name);
                p.push(0);
                (FUSE_NOTIFY_INVAL_ENTRY, p)
            }
            Notification::Delete {
                parent,
                child,
                name,
            } => {
                let mut p = Vec::with_capacity(24 + name.len() + 1);
                p.extend_from_slice(&parent.to_le_bytes());
                p.extend_from_slice(&child.to_le_bytes());
                p.extend_from_slice(&(name.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes()); // padding
                p.extend_from_slice(name);
                p.push(0);
                (FUSE_NOTIFY_DELETE, p)
            }
            Notification::Fsnotify {
                node,
                mask,
                cookie,
                name,
            } => {
                // struct fuse_notify_fsnotify_out, then the name and its NUL if there is one.
                let mut p = Vec::with_capacity(24 + name.len() + 1);
                p.extend_from_slice(&node.to_le_bytes());
                p.extend_from_slice(&mask.to_le_bytes());
                p.extend_from_slice(&cookie.to_le_bytes());
                p.extend_from_slice(&(name.len() as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes()); // padding
                if !name.is_empty() {
                    p.extend_from_slice(name);
                    p.push(0);
                }
                (FUSE_NOTIFY_FSNOTIFY, p)
            }
        };
        let header = OutHeader {
            len: (std::mem::size_of::<OutHeader>() + payload.len()) as u32,
            error: code,
            unique,
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(&payload);
        bytes
    }
}

/// What the notifier has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct NotifyStats {
    pub sent: AtomicU64,
    /// Messages lost to the guest: the oldest beyond [`MAX_PENDING`].
    pub dropped: AtomicU64,
    /// Messages merged into an identical one still waiting (not lost).
    pub merged: AtomicU64,
    /// Messages let go because the guest no longer has the queue (reset, or renegotiated
    /// without the feature): the backlog at that moment, and what was sent after.
    pub discarded: AtomicU64,
    /// Guest buffers returned unused (too small for the message, or unreadable).
    pub bad_buffers: AtomicU64,
    /// Messages that asked for a confirmation, and confirmations received for them.
    pub tracked: AtomicU64,
    pub confirmed: AtomicU64,
    /// Confirmations naming no message we wait for (late, after the lease ran out, or bogus).
    pub unexpected_confirmations: AtomicU64,
    /// From handing a tracked message to the notifier to the guest's confirmation, in us.
    pub confirm_latency_us: Histogram,
    /// Times the VMM stopped the ring (a paused VM) and the queue was let go.
    pub ring_stops: AtomicU64,
    pub detaches: AtomicU64,
}

impl NotifyStats {
    /// One log line of the counters.
    pub fn line(&self, backlog: usize) -> String {
        format!(
            "notifications: {} sent, {} dropped, {} queued, {} merged, {} discarded, {} bad buffers; {} awaited confirmation, {} confirmed ({}), {} unexpected confirmations; ring stopped {} times, detached {} times",
            self.sent.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            backlog,
            self.merged.load(Ordering::Relaxed),
            self.discarded.load(Ordering::Relaxed),
            self.bad_buffers.load(Ordering::Relaxed),
            self.tracked.load(Ordering::Relaxed),
            self.confirmed.load(Ordering::Relaxed),
            self.confirm_latency_us.summary("us"),
            self.unexpected_confirmations.load(Ordering::Relaxed),
            self.ring_stops.load(Ordering::Relaxed),
            self.detaches.load(Ordering::Relaxed),
        )
    }
}

type OnConfirm = Box<dyn FnOnce() + Send>;

/// A message whose confirmation someone waits for.
struct Waiter {
    since: Instant,
    on_confirm: OnConfirm,
}

type AttachHook = Box<dyn Fn() + Send + Sync>;

/// The notification queue as the device handed it to us.
struct Ring {
    vring: VringRwLock,
    memory: GuestMemory,
}

/// Where the queue is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No guest has negotiated the queue yet: messages wait for one (bounded).
    Unattached,
    /// A guest uses the queue.
    Attached,
    /// The guest reset the device or renegotiated without the feature: nobody listens.
    Detached,
}

struct QueueState {
    ring: Option<Ring>,
    phase: Phase,
    /// The VMM has the ring started (between its start and GET_VRING_BASE).
    running: bool,
}

/// Messages not yet in a guest buffer, with their ids (0: no confirmation wanted), and an
/// index of the untracked ones for merging.
#[derive(Default)]
struct Pending {
    queue: VecDeque<(u64, Notification)>,
    untracked: HashSet<Notification>,
}

impl Pending {
    fn take_front(&mut self) -> Option<(u64, Notification)> {
        let (id, message) = self.queue.pop_front()?;
        if id == 0 {
            self.untracked.remove(&message);
        }
        Some((id, message))
    }
}

/// A warning at most once a second, with the count of those left out.
struct RateLimited {
    last_ns: AtomicU64,
    suppressed: AtomicU64,
    epoch: Instant,
}

impl RateLimited {
    fn new() -> Self {
        RateLimited {
            last_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn warn(&self, message: impl FnOnce() -> String) {
        let now = self.epoch.elapsed().as_nanos() as u64 + 1_000_000_000;
        let last = self.last_ns.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1_000_000_000
            || self
                .last_ns
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        if suppressed > 0 {
            warn!(
                "{} ({suppressed} more like it in the last second)",
                message()
            );
        } else {
            warn!("{}", message());
        }
    }
}

/// Sends held back for one delivery: see [`Notifier::batch`]. Delivers when dropped.
#[must_use = "the batch delivers when it is dropped"]
pub struct DeliveryBatch<'a> {
    notifier: &'a Notifier,
}

impl Drop for DeliveryBatch<'_> {
    fn drop(&mut self) {
        if self.notifier.batches.fetch_sub(1, Ordering::SeqCst) == 1
            && self.notifier.undelivered.load(Ordering::SeqCst)
        {
            self.notifier.deliver();
        }
    }
}

/// Delivers notifications on the notification queue once the guest has negotiated it, and
/// matches the guest's confirmations (FUSE_NOTIFY_REPLY) to the messages that asked for them.
pub struct Notifier {
    queue: Mutex<QueueState>,
    /// Whether a guest uses the queue: read on every lease grant, which must not wait behind
    /// a delivery holding the queue's lock. Stays set while the VMM has the ring stopped (the
    /// guest is paused, not gone).
    attached: AtomicBool,
    pending: Mutex<Pending>,
    max_pending: usize,
    /// Mirrors `QueueState::phase == Detached`, so a send need not take the queue's lock.
    detached: AtomicBool,
    /// The guest offered FUSE_HAS_FSNOTIFY at its last INIT.
    fsnotify: AtomicBool,
    /// Messages were queued since the last delivery looked at the list: the thread holding
    /// the queue (delivering) must look again before it lets go.
    undelivered: AtomicBool,
    /// Open [`DeliveryBatch`]es: sends only queue while any is open.
    batches: AtomicUsize,
    waiting: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    on_attach: Mutex<Vec<AttachHook>>,
    drop_warning: RateLimited,
    queue_warning: RateLimited,
    pub stats: NotifyStats,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::with_max_pending(MAX_PENDING)
    }
}

impl Notifier {
    /// A notifier keeping at most `max_pending` messages for a guest without buffers.
    pub fn with_max_pending(max_pending: usize) -> Self {
        Notifier {
            queue: Mutex::new(QueueState {
                ring: None,
                phase: Phase::Unattached,
                running: false,
            }),
            attached: AtomicBool::new(false),
            pending: Mutex::new(Pending::default()),
            max_pending: max_pending.max(1),
            detached: AtomicBool::new(false),
            fsnotify: AtomicBool::new(false),
            undelivered: AtomicBool::new(false),
            batches: AtomicUsize::new(0),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            on_attach: Mutex::new(Vec::new()),
            drop_warning: RateLimited::new(),
            queue_warning: RateLimited::new(),
            stats: NotifyStats::default(),
        }
    }

    /// Whether a guest driver negotiated the queue and uses it.
    pub fn active(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Whether the guest raises fsnotify events for [`Notification::Fsnotify`]: it uses the
    /// queue and offered FUSE_HAS_FSNOTIFY at INIT (a kernel with only the invalidation patch,
    /// or a stock one, does not; they never get the message).
    pub fn fsnotify(&self) -> bool {
        self.active() && self.fsnotify.load(Ordering::Acquire)
    }

    /// What the guest's INIT said about FUSE_HAS_FSNOTIFY.
    pub fn set_fsnotify(&self, on: bool) {
        self.fsnotify.store(on, Ordering::Release);
    }

    /// Run `hook` once the guest starts using the queue (at once if it already does; again
    /// after a detach and a new attach): the coherence engine starts watching what the guest
    /// learned before that.
    pub fn on_attach(&self, hook: impl Fn() + Send + Sync + 'static) {
        if self.active() {
            hook();
        }
        self.on_attach.lock().unwrap().push(Box::new(hook));
    }

    fn lock_queue(&self) -> MutexGuard<'_, QueueState> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start delivering on `vring`: the guest negotiated the feature and the VMM started the
    /// ring (or the guest kicked it). Delivers the backlog.
    pub fn attach(&self, vring: VringRwLock, memory: GuestMemory) {
        let newly = {
            let mut q = self.lock_queue();
            q.ring = Some(Ring { vring, memory });
            q.running = true;
            let newly = q.phase != Phase::Attached;
            q.phase = Phase::Attached;
            self.detached.store(false, Ordering::SeqCst);
            newly
        };
        if newly {
            self.attached.store(true, Ordering::Release);
            info!("notification queue: the guest uses it");
            for hook in self.on_attach.lock().unwrap().iter() {
                hook();
            }
        }
        self.deliver();
    }

    /// The VMM stopped the ring (GET_VRING_BASE, or SET_VRING_ENABLE 0): leave it alone and
    /// keep every message until it starts again. Waits for a delivery in progress.
    pub fn ring_stopped(&self) {
        let mut q = self.lock_queue();
        if q.running && q.phase == Phase::Attached {
            self.stats.ring_stops.fetch_add(1, Ordering::Relaxed);
            debug!("notification queue: the VMM stopped the ring; messages wait");
        }
        q.running = false;
    }

    /// The VMM started the ring again (a paused VM resumed) or gave it a new call eventfd:
    /// deliver the backlog and signal the guest whatever the event index says, so a message
    /// put in the used ring while it could not be signalled is seen.
    pub fn ring_started(&self, vring: VringRwLock, memory: GuestMemory) {
        {
            let mut q = self.lock_queue();
            if q.phase == Phase::Detached {
                return;
            }
            let was_running = q.running;
            q.ring = Some(Ring { vring, memory });
            q.running = true;
            if q.phase == Phase::Attached && !was_running {
                debug!(
                    "notification queue: the VMM started the ring; {} messages waiting",
                    self.backlog()
                );
            }
        }
        if self.active() {
            self.deliver_and_signal(true);
        }
    }

    /// The guest no longer has a notification queue (device reset, or features renegotiated
    /// without VIRTIO_FS_F_NOTIFICATION): never touch the ring again, and let the backlog go
    /// (counted as discarded). Confirmations still awaited will not come; their writers are
    /// released when their leases end.
    pub fn detach(&self) {
        let mut q = self.lock_queue();
        let was = q.phase;
        q.ring = None;
        q.running = false;
        q.phase = Phase::Detached;
        self.detached.store(true, Ordering::SeqCst);
        self.attached.store(false, Ordering::Release);
        // A guest that comes back renegotiates it at its INIT.
        self.fsnotify.store(false, Ordering::Release);
        let discarded = {
            let mut pending = self.lock_pending();
            let n = pending.queue.len();
            *pending = Pending::default();
            n
        };
        drop(q);
        self.stats
            .discarded
            .fetch_add(discarded as u64, Ordering::Relaxed);
        if was != Phase::Detached {
            self.stats.detaches.fetch_add(1, Ordering::Relaxed);
            info!(
                "notification queue: the guest let it go (reset or renegotiated without it); {discarded} waiting messages discarded, {} confirmations still awaited end with their leases",
                self.awaiting()
            );
        }
    }

    /// Queue a message that needs no answer and deliver what the guest has room for. Never
    /// blocks on the guest.
    pub fn send(&self, message: Notification) {
        self.enqueue(0, message);
    }

    /// Queue a message the guest confirms; `on_confirm` runs (on the thread serving the
    /// confirmation) when it does. Returns the message's id, for [`Notifier::cancel`].
    pub fn send_tracked(&self, message: Notification, on_confirm: OnConfirm) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.waiting.lock().unwrap().insert(
            id,
            Waiter {
                since: Instant::now(),
                on_confirm,
            },
        );
        self.stats.tracked.fetch_add(1, Ordering::Relaxed);
        self.enqueue(id, message);
        id
    }

    /// Stop waiting for the confirmation of message `id` (its lease ran out meanwhile).
    pub fn cancel(&self, id: u64) {
        self.waiting.lock().unwrap().remove(&id);
    }

    /// Confirmations still awaited.
    pub fn awaiting(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }

    /// The guest confirmed message `id` (FUSE_NOTIFY_REPLY with that unique). `error` is what
    /// its handler returned: -ENOENT (nothing cached) confirms as well as 0.
    pub fn confirm(&self, id: u64, error: i32) {
        let waiter = self.waiting.lock().unwrap().remove(&id);
        let Some(waiter) = waiter else {
            debug!("confirmation of notification {id} that nobody waits for");
            self.stats
                .unexpected_confirmations
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        if error != 0 {
            debug!("notification {id} confirmed with error {error}");
        }
        self.stats.confirmed.fetch_add(1, Ordering::Relaxed);
        self.stats
            .confirm_latency_us
            .record(waiter.since.elapsed().as_micros() as u64);
        (waiter.on_confirm)();
    }

    /// Hold deliveries back until the returned batch ends: sends made meanwhile (by any
    /// thread) only queue, and the end of the batch puts them all into the guest's buffers
    /// with one signal. For a caller about to send many messages at once.
    pub fn batch(&self) -> DeliveryBatch<'_> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        DeliveryBatch { notifier: self }
    }

    /// Send every message of `messages` (none asks for a confirmation) in one delivery.
    pub fn send_many(&self, messages: impl IntoIterator<Item = Notification>) {
        let _batch = self.batch();
        for message in messages {
            self.send(message);
        }
    }

    fn enqueue(&self, id: u64, message: Notification) {
        if self.detached.load(Ordering::SeqCst) {
            // Nobody can receive it; the lease bounds what the guest caches.
            self.stats.discarded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let dropped = {
            let mut pending = self.lock_pending();
            // Events are never merged: each host change is one event for the guest's watchers.
            let mergeable = !matches!(message, Notification::Fsnotify { .. });
            if id == 0 && mergeable && pending.untracked.contains(&message) {
                // An identical message is still waiting: it reaches the guest after this
                // change too.
                self.stats.merged.fetch_add(1, Ordering::Relaxed);
                None
            } else {
                let dropped = if pending.queue.len() >= self.max_pending {
                    pending.take_front()
                } else {
                    None
                };
                if id == 0 && mergeable {
                    pending.untracked.insert(message.clone());
                }
                pending.queue.push_back((id, message));
                dropped
            }
        };
        self.undelivered.store(true, Ordering::SeqCst);
        if let Some((dropped_id, dropped)) = dropped {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.drop_warning.warn(|| {
                format!(
                    "notification queue: {} messages wait for guest buffers; dropped the oldest, {dropped:?}{}: the guest relies on its lease for it",
                    self.max_pending,
                    if dropped_id != 0 {
                        format!(" (id {dropped_id}, a host writer waits for it until the lease ends)")
                    } else {
                        String::new()
                    }
                )
            });
        }
        if self.batches.load(Ordering::SeqCst) == 0 {
            self.deliver();
        }
    }

    /// Messages not yet delivered.
    pub fn backlog(&self) -> usize {
        self.lock_pending().queue.len()
    }

    /// Put pending messages into the buffers the guest has posted (called on every refill
    /// kick, and after each send).
    pub fn deliver(&self) {
        self.deliver_and_signal(false);
    }

    /// Deliver what is pending. A caller that finds another thread holding the queue leaves
    /// it to that thread, which looks at the list again before letting go (`undelivered`);
    /// `force_signal` (a restarted ring) always waits for the queue and signals.
    fn deliver_and_signal(&self, force_signal: bool) {
        self.undelivered.store(true, Ordering::SeqCst);
        let mut force_signal = force_signal;
        loop {
            let q = if force_signal {
                self.lock_queue()
            } else {
                match self.queue.try_lock() {
                    Ok(q) => q,
                    Err(TryLockError::Poisoned(e)) => e.into_inner(),
                    // The holder delivers our messages before it lets go.
                    Err(TryLockError::WouldBlock) => return,
                }
            };
            self.undelivered.store(false, Ordering::SeqCst);
            let Some(ring) = q.ring.as_ref().filter(|_| q.running) else {
                return;
            };
            if let Err(e) = self.deliver_to(ring, force_signal) {
                self.queue_warning
                    .warn(|| format!("notification queue: {e}; messages stay queued"));
                return;
            }
            force_signal = false;
            drop(q);
            if !self.undelivered.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// The EVENT_IDX loop of a queue handler, for a device-to-driver queue: fill buffers
    /// while there are messages and buffers; when buffers run out first, ask the guest to
    /// kick on its next refill and look once more (a refill that raced with that request is
    /// taken now). Holds the vring's lock throughout, so the VMM's GET_VRING_BASE sees either
    /// none or all of a message's delivery.
    fn deliver_to(&self, ring: &Ring, force_signal: bool) -> io::Result<()> {
        let mem = ring.memory.memory();
        let mut state = ring.vring.get_mut();
        if !state.get_queue().ready() {
            return Ok(()); // Stopped under us; ring_started() delivers.
        }
        let mut delivered = 0u32;
        let result = loop {
            match self.fill_buffers(&mut state, &mem, &mut delivered) {
                Ok(true) => {}
                Ok(false) => break Ok(()), // Nothing left to send.
                Err(e) => break Err(e),
            }
            // Out of buffers with messages left: have the guest kick when it refills.
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue, // It refilled meanwhile.
                Ok(false) => break Ok(()),
                Err(e) => break Err(io::Error::other(format!("virtqueue: {e}"))),
            }
        };
        let signal = if delivered > 0 {
            state
                .get_queue_mut()
                .needs_notification(&*mem)
                .unwrap_or(true)
        } else {
            false
        };
        if signal || force_signal {
            state.signal_used_queue()?;
        }
        result
    }

    /// Put messages into available buffers until one runs out. `Ok(true)`: messages are left
    /// and no buffer is.
    fn fill_buffers(
        &self,
        state: &mut vhost_user_backend::VringState<GuestMemory>,
        mem: &vm_memory::atomic::GuestMemoryLoadGuard<GuestMemoryMmap>,
        delivered: &mut u32,
    ) -> io::Result<bool> {
        loop {
            let Some(bytes) = self
                .lock_pending()
                .queue
                .front()
                .map(|(id, m)| m.encode(*id))
            else {
                return Ok(false);
            };
            let chain = state
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?
                .next();
            let Some(chain) = chain else {
                return Ok(true);
            };
            let head = chain.head_index();
            let written = VirtioFsWriter::new(&**mem, chain)
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|mut w| {
                    if w.available_bytes() < bytes.len() {
                        return Err(io::Error::other(format!(
                            "guest buffer of {} bytes is smaller than a {}-byte message",
                            w.available_bytes(),
                            bytes.len()
                        )));
                    }
                    w.write_all(&bytes)?;
                    Ok(bytes.len() as u32)
                });
            let len = match written {
                Ok(len) => len,
                Err(e) => {
                    // The buffer goes back unused; the message waits for the next one.
                    self.stats.bad_buffers.fetch_add(1, Ordering::Relaxed);
                    self.queue_warning
                        .warn(|| format!("notification queue: unusable guest buffer: {e}"));
                    0
                }
            };
            state
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?;
            *delivered += 1;
            if len > 0 {
                // Taken off the list only now that a buffer holds it.
                self.lock_pending().take_front();
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inval_inode_layout() {
        let bytes = Notification::InvalInode {
            ino: 7,
            offset: 0,
            len: 0,
        }
        .encode(0);
        assert_eq!(bytes.len(), 16 + 24);
        assert_eq!(u32::from_le_bytes(bytes[0..4].try_into().unwrap()), 40);
        assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 7);
    }

    #[test]
    fn inval_entry_layout_and_largest_message_fits_the_buffer() {
        let name = vec![b'x'; 255];
        let bytes = Notification::InvalEntry { parent: 1, name }.encode(9);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 9);
        assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 255);
        assert_eq!(*bytes.last().unwrap(), 0, "name is NUL-terminated");
        assert!(bytes.len() <= NOTIFY_BUF_SIZE as usize);
    }

    #[test]
    fn backlog_is_bounded_and_counts_drops() {
        let notifier = Notifier::default();
        for ino in 0..(MAX_PENDING as u64 + 10) {
            notifier.send(Notification::InvalInode {
                ino,
                offset: 0,
                len: 0,
            });
        }
        assert_eq!(notifier.backlog(), MAX_PENDING);
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn delete_layout() {
        let bytes = Notification::Delete {
            parent: 1,
            child: 5,
            name: b"gone".to_vec(),
        }
        .encode(0);
        assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 6);
        assert_eq!(u64::from_le_bytes(bytes[24..32].try_into().unwrap()), 5);
        assert_eq!(u32::from_le_bytes(bytes[32..36].try_into().unwrap()), 4);
        assert_eq!(&bytes[40..], b"gone\0");
        assert_eq!(bytes.len(), 16 + 24 + 5);
    }

    #[test]
    fn confirmations_run_once_and_cancelled_ids_are_ignored() {
        use std::sync::Arc;
        let notifier = Notifier::default();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let id = notifier.send_tracked(
            Notification::InvalInode {
                ino: 3,
                offset: 0,
                len: 0,
            },
            Box::new(move || {
                h.fetch_add(1, Ordering::Relaxed);
            }),
        );
        assert_ne!(id, 0, "tracked messages have a non-zero id");
        notifier.confirm(id, 0);
        notifier.confirm(id, 0);
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        assert_eq!(
            notifier
                .stats
                .unexpected_confirmations
                .load(Ordering::Relaxed),
            1
        );

        let h = hits.clone();
        let id = notifier.send_tracked(
            Notification::InvalInode {
                ino: 4,
                offset: 0,
                len: 0,
            },
            Box::new(move || {
                h.fetch_add(1, Ordering::Relaxed);
            }),
        );
        notifier.cancel(id);
        notifier.confirm(id, -libc::ENOENT);
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        assert_eq!(notifier.awaiting(), 0);
    }

    #[test]
    fn fsnotify_layout_with_and_without_a_name() {
        let named = Notification::Fsnotify {
            node: 7,
            mask: 0x40,
            cookie: 3,
            name: vec![b'x'; 255],
        }
        .encode(0);
        assert_eq!(i32::from_le_bytes(named[4..8].try_into().unwrap()), 10);
        assert_eq!(
            u32::from_le_bytes(named[0..4].try_into().unwrap()) as usize,
            named.len()
        );
        assert_eq!(u64::from_le_bytes(named[16..24].try_into().unwrap()), 7);
        assert_eq!(u32::from_le_bytes(named[24..28].try_into().unwrap()), 0x40);
        assert_eq!(u32::from_le_bytes(named[28..32].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(named[32..36].try_into().unwrap()), 255);
        assert_eq!(named.len(), 16 + 24 + 255 + 1);
        assert_eq!(*named.last().unwrap(), 0, "name is NUL-terminated");
        assert!(named.len() <= NOTIFY_BUF_SIZE as usize);
        let bare = Notification::Fsnotify {
            node: 7,
            mask: 0x4,
            cookie: 0,
            name: Vec::new(),
        }
        .encode(0);
        assert_eq!(bare.len(), 16 + 24, "no name, no NUL");
    }

    #[test]
    fn fsnotify_events_never_merge() {
        let notifier = Notifier::default();
        let modify = Notification::Fsnotify {
            node: 1,
            mask: 0x2,
            cookie: 0,
            name: b"f".to_vec(),
        };
        notifier.send(modify.clone());
        notifier.send(modify);
        assert_eq!(notifier.backlog(), 2);
        assert_eq!(notifier.stats.merged.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn fsnotify_needs_the_queue_and_the_init_flag_and_a_detach_clears_it() {
        let guest = ring::Guest::new(true);
        let notifier = Notifier::default();
        notifier.set_fsnotify(true);
        assert!(!notifier.fsnotify(), "no queue yet");
        notifier.attach(guest.vring.clone(), guest.mem.clone());
        assert!(notifier.fsnotify());
        notifier.set_fsnotify(false);
        assert!(!notifier.fsnotify(), "a guest without FUSE_HAS_FSNOTIFY");
        notifier.set_fsnotify(true);
        notifier.detach();
        notifier.attach(guest.vring.clone(), guest.mem.clone());
        assert!(!notifier.fsnotify(), "a new guest says again at INIT");
    }

    #[test]
    fn identical_waiting_messages_merge_and_tracked_ones_never_do() {
        let notifier = Notifier::default();
        let dir = Notification::InvalInode {
            ino: 1,
            offset: 0,
            len: 0,
        };
        for _ in 0..100 {
            notifier.send(dir.clone());
        }
        assert_eq!(notifier.backlog(), 1);
        assert_eq!(notifier.stats.merged.load(Ordering::Relaxed), 99);
        notifier.send_tracked(dir.clone(), Box::new(|| {}));
        notifier.send_tracked(dir.clone(), Box::new(|| {}));
        assert_eq!(notifier.backlog(), 3, "each tracked message has its own id");
    }

    #[test]
    fn a_dropped_tracked_message_keeps_its_waiter_for_the_lease_to_end() {
        let notifier = Notifier::with_max_pending(4);
        let id = notifier.send_tracked(
            Notification::InvalInode {
                ino: 9,
                offset: 0,
                len: 0,
            },
            Box::new(|| {}),
        );
        for ino in 10..14 {
            notifier.send(Notification::InvalInode {
                ino,
                offset: -1,
                len: 0,
            });
        }
        assert_eq!(notifier.backlog(), 4);
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 1);
        // Its writer is still accounted for: the lease table ends the hold at lease expiry
        // and cancels the id then.
        assert_eq!(notifier.awaiting(), 1);
        notifier.cancel(id);
        assert_eq!(notifier.awaiting(), 0);
    }

    /// A split virtqueue in test memory, driven from both sides: the notifier as the device,
    /// this code as the guest driver.
    mod ring {
        use super::*;
        use std::sync::Arc;
        use vm_memory::{Bytes, GuestAddress};

        pub const SIZE: u16 = 16;
        const DESC: u64 = 0x1000;
        const AVAIL: u64 = 0x2000;
        const USED: u64 = 0x3000;
        const BUFS: u64 = 0x10000;

        pub struct Guest {
            pub mem: GuestMemory,
            pub vring: VringRwLock,
            avail_idx: u16,
            pub last_used: u16,
            pub kicks: u32,
            call: vmm_sys_util::eventfd::EventFd,
            pub signals: u64,
        }

        impl Guest {
            pub fn new(event_idx: bool) -> Guest {
                let mmap =
                    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100000)]).unwrap();
                let mem = GuestMemoryAtomic::new(mmap);
                let vring = VringRwLock::new(mem.clone(), SIZE).unwrap();
                vring.set_queue_size(SIZE);
                vring.set_queue_info(DESC, AVAIL, USED).unwrap();
                vring.set_queue_event_idx(event_idx);
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                let call = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                    .unwrap();
                // SAFETY: dup of our eventfd gives a fresh descriptor the vring owns.
                let dup = unsafe {
                    use std::os::fd::{AsRawFd, FromRawFd};
                    std::fs::File::from_raw_fd(libc::dup(call.as_raw_fd()))
                };
                vring.set_call(Some(dup));
                Guest {
                    mem,
                    vring,
                    avail_idx: 0,
                    last_used: 0,
                    kicks: 0,
                    call,
                    signals: 0,
                }
            }

            /// Interrupts the device raised since the last look, added to `signals`.
            pub fn count_signals(&mut self) -> u64 {
                self.signals += self.call.read().unwrap_or(0);
                self.signals
            }

            fn m(&self) -> vm_memory::atomic::GuestMemoryLoadGuard<GuestMemoryMmap> {
                self.mem.memory()
            }

            /// Post `n` buffers (descriptor = ring slot) and kick if the device asked, as
            /// Linux's virtqueue_kick_prepare() decides.
            pub fn post(&mut self, n: u16, len: u32) {
                let old = self.avail_idx;
                let m = self.m();
                for _ in 0..n {
                    let slot = self.avail_idx % SIZE;
                    let desc = DESC + 16 * slot as u64;
                    m.write_obj(BUFS + 4096 * slot as u64, GuestAddress(desc))
                        .unwrap();
                    m.write_obj(len, GuestAddress(desc + 8)).unwrap();
                    m.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // WRITE
                    m.write_obj(slot, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                        .unwrap();
                    self.avail_idx = self.avail_idx.wrapping_add(1);
                }
                m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                    .unwrap();
                std::sync::atomic::fence(Ordering::SeqCst);
                let event: u16 = m
                    .read_obj(GuestAddress(USED + 4 + 8 * SIZE as u64))
                    .unwrap();
                let new = self.avail_idx;
                if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
                    self.kicks += 1;
                }
            }

            /// The used entries not seen yet: (head, length).
            pub fn take_used(&mut self) -> Vec<(u16, u32)> {
                let m = self.m();
                let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
                let mut out = Vec::new();
                while self.last_used != idx {
                    let slot = (self.last_used % SIZE) as u64;
                    let id: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * slot)).unwrap();
                    let len: u32 = m.read_obj(GuestAddress(USED + 8 + 8 * slot)).unwrap();
                    out.push((id as u16, len));
                    self.last_used = self.last_used.wrapping_add(1);
                }
                out
            }

            pub fn used_idx(&self) -> u16 {
                self.m().read_obj(GuestAddress(USED + 2)).unwrap()
            }
        }

        pub fn inval(ino: u64) -> Notification {
            Notification::InvalInode {
                ino,
                offset: -1,
                len: 0,
            }
        }

        pub fn attached(guest: &Guest) -> Arc<Notifier> {
            let notifier = Arc::new(Notifier::default());
            notifier.attach(guest.vring.clone(), guest.mem.clone());
            notifier
        }
    }

    #[test]
    fn with_event_idx_a_backlog_asks_the_guest_to_kick_and_drains_on_refill() {
        let mut guest = ring::Guest::new(true);
        guest.post(ring::SIZE, 512);
        assert_eq!(guest.kicks, 1, "the first fill kicks");
        let notifier = ring::attached(&guest);
        for ino in 0..40 {
            notifier.send(ring::inval(100 + ino));
        }
        assert_eq!(notifier.stats.sent.load(Ordering::Relaxed), 16);
        assert_eq!(notifier.backlog(), 24);
        // The guest takes them all and gives the buffers back: it must be asked to kick
        // (the bug: avail_event stayed at 0 and refills went unannounced).
        assert_eq!(guest.take_used().len(), 16);
        guest.post(16, 512);
        assert_eq!(
            guest.kicks, 2,
            "the refill kicked: avail_event asked for it"
        );
        notifier.deliver(); // What the kick runs.
        assert_eq!(notifier.backlog(), 8);
        assert_eq!(guest.take_used().len(), 16);
        guest.post(16, 512);
        assert_eq!(guest.kicks, 3);
        notifier.deliver();
        assert_eq!(notifier.backlog(), 0);
        assert_eq!(guest.take_used().len(), 8);
        assert_eq!(notifier.stats.sent.load(Ordering::Relaxed), 40);
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_refill_that_raced_the_request_to_kick_is_taken_at_once() {
        let mut guest = ring::Guest::new(true);
        guest.post(4, 512);
        let notifier = ring::attached(&guest);
        for ino in 10..14 {
            notifier.send(ring::inval(ino));
        }
        assert_eq!(guest.take_used().len(), 4);
        // Buffers posted while nothing waited (avail_event not asked for): no kick...
        let kicks = guest.kicks;
        guest.post(4, 512);
        assert_eq!(guest.kicks, kicks);
        // ...but the next send finds them, and what it cannot place asks for a kick.
        for ino in 0..6 {
            notifier.send(ring::inval(ino));
        }
        assert_eq!(guest.kicks, kicks);
        assert_eq!(notifier.stats.sent.load(Ordering::Relaxed), 8);
        assert_eq!(notifier.backlog(), 2);
        guest.take_used();
        guest.post(4, 512);
        assert_eq!(guest.kicks, kicks + 1);
    }

    #[test]
    fn a_buffer_too_small_is_returned_and_the_message_waits_for_the_next() {
        let mut guest = ring::Guest::new(false);
        guest.post(1, 8);
        let notifier = ring::attached(&guest);
        notifier.send(ring::inval(5));
        assert_eq!(guest.take_used(), vec![(0, 0)]);
        assert_eq!(notifier.backlog(), 1, "not lost with the bad buffer");
        assert_eq!(notifier.stats.bad_buffers.load(Ordering::Relaxed), 1);
        guest.post(1, 512);
        notifier.deliver();
        assert_eq!(guest.take_used(), vec![(1, 40)]);
        assert_eq!(notifier.backlog(), 0);
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stopped_ring_is_left_alone_and_its_backlog_goes_out_on_restart() {
        let mut guest = ring::Guest::new(true);
        guest.post(8, 512);
        let notifier = ring::attached(&guest);
        // GET_VRING_BASE: the backend makes the queue not ready.
        guest.vring.set_queue_ready(false);
        notifier.ring_stopped();
        for ino in 0..5 {
            notifier.send(ring::inval(ino));
        }
        assert_eq!(guest.used_idx(), 0, "nothing written into a stopped ring");
        assert_eq!(notifier.backlog(), 5);
        assert!(notifier.active(), "a paused guest still has the queue");
        guest.vring.set_queue_ready(true);
        notifier.ring_started(guest.vring.clone(), guest.mem.clone());
        assert_eq!(guest.take_used().len(), 5);
        assert_eq!(notifier.backlog(), 0);
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_detached_queue_is_never_written_again() {
        let mut guest = ring::Guest::new(true);
        guest.post(2, 512);
        let notifier = ring::attached(&guest);
        for ino in 0..4 {
            notifier.send(ring::inval(ino));
        }
        assert_eq!(notifier.backlog(), 2);
        notifier.detach();
        assert!(!notifier.active());
        assert_eq!(notifier.backlog(), 0);
        assert_eq!(notifier.stats.discarded.load(Ordering::Relaxed), 2);
        // Virtqueue 1 is a request queue now: its chains are not ours.
        guest.take_used();
        guest.post(2, 512);
        notifier.send(ring::inval(9));
        notifier.ring_started(guest.vring.clone(), guest.mem.clone());
        notifier.deliver();
        assert!(guest.take_used().is_empty());
        assert_eq!(notifier.stats.discarded.load(Ordering::Relaxed), 3);
        // A guest that negotiates the queue again gets it back.
        notifier.attach(guest.vring.clone(), guest.mem.clone());
        notifier.send(ring::inval(10));
        assert_eq!(guest.take_used().len(), 1);
    }

    #[test]
    fn a_batch_fills_every_buffer_before_one_signal() {
        // Without EVENT_IDX every delivery that used a buffer signals: the cost a batch saves.
        let mut guest = ring::Guest::new(false);
        guest.post(ring::SIZE, 512);
        let notifier = ring::attached(&guest);
        for ino in 0..4 {
            notifier.send(ring::inval(ino));
        }
        assert_eq!(guest.count_signals(), 4, "one lone send, one interrupt");
        assert_eq!(guest.take_used().len(), 4);

        let batch = notifier.batch();
        for ino in 10..20 {
            notifier.send(ring::inval(ino));
        }
        let id = notifier.send_tracked(ring::inval(20), Box::new(|| {}));
        assert_ne!(id, 0);
        assert!(
            guest.take_used().is_empty(),
            "held back until the batch ends"
        );
        assert_eq!(notifier.backlog(), 11);
        drop(batch);
        assert_eq!(notifier.backlog(), 0);
        let used = guest.take_used();
        assert_eq!(used.len(), 11, "every message in its own buffer");
        assert_eq!(
            guest.count_signals(),
            5,
            "the whole batch raised one interrupt"
        );
        assert_eq!(notifier.stats.sent.load(Ordering::Relaxed), 15);

        // More than the ring holds: the rest waits for the refill, nothing is lost.
        notifier.send_many((100..140).map(ring::inval));
        assert_eq!(guest.count_signals(), 6);
        assert_eq!(notifier.backlog(), 39, "one buffer was left");
        assert_eq!(guest.take_used().len(), 1);
        guest.post(ring::SIZE, 512);
        notifier.deliver(); // The refill's kick.
        assert_eq!(guest.take_used().len(), 16);
        assert_eq!(guest.count_signals(), 7, "16 more messages, one interrupt");
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn with_event_idx_a_batch_signals_once_and_the_refill_kicks_once() {
        let mut guest = ring::Guest::new(true);
        guest.post(ring::SIZE, 512);
        let notifier = ring::attached(&guest);
        // The guest asks for an interrupt at its next used entry (used_event = 0).
        notifier.send_many((0..40).map(ring::inval));
        assert_eq!(guest.take_used().len(), 16, "the whole ring filled");
        assert_eq!(guest.count_signals(), 1);
        let kicks = guest.kicks;
        // The Linux driver's refill: every buffer at once, one kick decision.
        guest.post(16, 512);
        assert_eq!(guest.kicks, kicks + 1, "asked for: messages are waiting");
        notifier.deliver();
        assert_eq!(guest.take_used().len(), 16);
        guest.post(16, 512);
        assert_eq!(guest.kicks, kicks + 2);
        notifier.deliver();
        assert_eq!(guest.take_used().len(), 8);
        assert_eq!(notifier.backlog(), 0);
        assert_eq!(notifier.stats.sent.load(Ordering::Relaxed), 40);
    }

    #[test]
    fn a_send_from_another_thread_during_a_batch_goes_out_at_its_end() {
        let mut guest = ring::Guest::new(false);
        guest.post(8, 512);
        let notifier = ring::attached(&guest);
        let batch = notifier.batch();
        let other = notifier.clone();
        std::thread::spawn(move || other.send(ring::inval(7)))
            .join()
            .unwrap();
        assert!(guest.take_used().is_empty());
        drop(batch);
        assert_eq!(guest.take_used().len(), 1);
        // Nested batches deliver when the last one ends.
        let outer = notifier.batch();
        let inner = notifier.batch();
        notifier.send(ring::inval(8));
        drop(inner);
        assert!(guest.take_used().is_empty());
        drop(outer);
        assert_eq!(guest.take_used().len(), 1);
    }

    #[test]
    fn concurrent_senders_and_refills_lose_nothing() {
        // Senders that find a delivery in progress leave their messages to it: none may be
        // stranded while the guest has buffers posted.
        let mut guest = ring::Guest::new(true);
        guest.post(ring::SIZE, 512);
        let notifier = ring::attached(&guest);
        let senders: Vec<_> = (0..4u64)
            .map(|t| {
                let n = notifier.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        if i % 50 == 0 {
                            n.send_many(
                                (0..10).map(|k| ring::inval((t << 32) | (1 << 31) | i << 4 | k)),
                            );
                        } else {
                            n.send(ring::inval((t << 32) | i));
                        }
                    }
                })
            })
            .collect();
        let total = 4 * (1960 + 40 * 10);
        let mut got = 0;
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        while got < total {
            assert!(Instant::now() < deadline, "{got} of {total} delivered");
            let used = guest.take_used();
            got += used.len();
            let kicks = guest.kicks;
            guest.post(used.len() as u16, 512);
            if guest.kicks != kicks {
                notifier.deliver(); // What the device runs on a kick.
            }
            std::thread::yield_now();
        }
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(got, total);
        assert_eq!(notifier.backlog(), 0);
        assert_eq!(notifier.stats.dropped.load(Ordering::Relaxed), 0);
    }
}
