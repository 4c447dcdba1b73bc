//! The notification queue (virtqueue 1 with VIRTIO_FS_F_NOTIFICATION): FUSE notify messages
//! from the daemon to the guest, used to revoke what the guest caches.
//!
//! The guest driver keeps device-writable buffers posted on the queue; each message takes one.
//! The daemon must never wait for the guest here (a guest that stops refilling the queue must
//! not stall request processing or a host event), so messages go through a bounded pending
//! list: [`Notifier::send`] appends and tries to deliver, and every refill kick delivers the
//! backlog. Past [`MAX_PENDING`] messages the oldest are dropped and counted; the guest then
//! relies on the lease expiring, as a stock guest always does.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::transport::VirtioFsWriter;
use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{ByteValued, GuestAddressSpace};

use crate::device::GuestMemory;
use crate::metrics::Histogram;

/// virtio-fs feature bit 0: the device has a notification queue.
pub const VIRTIO_FS_F_NOTIFICATION: u64 = 1 << 0;

/// The notification queue's index when the feature is negotiated.
pub const NOTIFICATION_QUEUE: usize = 1;

/// Smallest buffer the driver must post: room for the largest message we send (an
/// INVAL_ENTRY or DELETE with a 255-byte name, its NUL and the headers).
pub const NOTIFY_BUF_SIZE: u32 = 512;

/// Messages kept for a guest that has no buffer posted; beyond this the oldest are dropped.
pub const MAX_PENDING: usize = 4096;

const FUSE_NOTIFY_INVAL_INODE: i32 = 2;
const FUSE_NOTIFY_INVAL_ENTRY: i32 = 3;
const FUSE_NOTIFY_DELETE: i32 = 6;

/// A message for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

impl Notification {
    /// The node the message is about (what a confirmation names).
    pub fn node(&self) -> u64 {
        match self {
            Notification::InvalInode { ino, .. } => *ino,
            Notification::InvalEntry { parent, .. } | Notification::Delete { parent, .. } => {
                *parent
            }
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
    pub dropped: AtomicU64,
    /// Messages that asked for a confirmation, and confirmations received for them.
    pub tracked: AtomicU64,
    pub confirmed: AtomicU64,
    /// Confirmations naming no message we wait for (late, after the lease ran out, or bogus).
    pub unexpected_confirmations: AtomicU64,
    /// From handing a tracked message to the notifier to the guest's confirmation, in us.
    pub confirm_latency_us: Histogram,
}

impl NotifyStats {
    /// One log line of the counters.
    pub fn line(&self, backlog: usize) -> String {
        format!(
            "notifications: {} sent, {} dropped, {} queued; {} awaited confirmation, {} confirmed ({}), {} unexpected confirmations",
            self.sent.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
            backlog,
            self.tracked.load(Ordering::Relaxed),
            self.confirmed.load(Ordering::Relaxed),
            self.confirm_latency_us.summary("us"),
            self.unexpected_confirmations.load(Ordering::Relaxed),
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

/// Delivers notifications on the notification queue once the guest has negotiated it, and
/// matches the guest's confirmations (FUSE_NOTIFY_REPLY) to the messages that asked for them.
pub struct Notifier {
    queue: Mutex<Option<(VringRwLock, GuestMemory)>>,
    /// Set once `queue` is: read on every lease grant, which must not wait behind a delivery
    /// holding the queue's lock.
    attached: AtomicBool,
    /// Messages not yet in a guest buffer, with their ids (0: no confirmation wanted).
    pending: Mutex<VecDeque<(u64, Notification)>>,
    waiting: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    on_attach: Mutex<Vec<AttachHook>>,
    pub stats: NotifyStats,
}

impl Default for Notifier {
    fn default() -> Self {
        Notifier {
            queue: Mutex::new(None),
            attached: AtomicBool::new(false),
            pending: Mutex::new(VecDeque::new()),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            on_attach: Mutex::new(Vec::new()),
            stats: NotifyStats::default(),
        }
    }
}

impl Notifier {
    /// Whether a guest driver negotiated the queue and it is ready to use.
    pub fn active(&self) -> bool {
        self.attached.load(Ordering::Acquire)
    }

    /// Run `hook` once the guest starts using the queue (at once if it already does): the
    /// coherence engine starts watching what the guest learned before that.
    pub fn on_attach(&self, hook: impl Fn() + Send + Sync + 'static) {
        if self.active() {
            hook();
        }
        self.on_attach.lock().unwrap().push(Box::new(hook));
    }

    /// Start delivering on `vring` (the guest negotiated the feature and posted buffers).
    pub fn attach(&self, vring: VringRwLock, memory: GuestMemory) {
        *self.queue.lock().unwrap() = Some((vring, memory));
        self.attached.store(true, Ordering::Release);
        for hook in self.on_attach.lock().unwrap().iter() {
            hook();
        }
        self.deliver();
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

    fn enqueue(&self, id: u64, message: Notification) {
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= MAX_PENDING {
                pending.pop_front();
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            pending.push_back((id, message));
        }
        self.deliver();
    }

    /// Messages not yet delivered.
    pub fn backlog(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Put pending messages into the buffers the guest has posted (called on every refill
    /// kick, and after each send).
    pub fn deliver(&self) {
        let queue = self.queue.lock().unwrap();
        let Some((vring, memory)) = queue.as_ref() else {
            return;
        };
        if let Err(e) = self.deliver_to(vring, memory) {
            warn!("notification queue: {e}");
        }
    }

    fn deliver_to(&self, vring: &VringRwLock, memory: &GuestMemory) -> io::Result<()> {
        let mem = memory.memory();
        let mut delivered = false;
        loop {
            let Some((id, message)) = self.pending.lock().unwrap().pop_front() else {
                break;
            };
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?
                .next();
            let Some(chain) = chain else {
                // No buffer posted: keep the message for the next refill.
                self.pending.lock().unwrap().push_front((id, message));
                break;
            };
            let head = chain.head_index();
            let bytes = message.encode(id);
            let written = VirtioFsWriter::new(&*mem, chain)
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
                Ok(len) => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    len
                }
                Err(e) => {
                    debug!("notification dropped: {e}");
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?;
            delivered = true;
        }
        if delivered && vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
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
}
