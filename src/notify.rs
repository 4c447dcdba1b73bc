//! The notification queue (virtqueue 1 with VIRTIO_FS_F_NOTIFICATION): FUSE notify messages
//! from the daemon to the guest, used to revoke what the guest caches.
//!
//! The guest driver keeps device-writable buffers posted on the queue; each message takes one.
//! The daemon must never wait for the guest here (a guest that stops refilling the queue must
//! not stall request processing or a host event), so messages go through a bounded pending
//! list: [`Notifier::send`] appends and tries to deliver, and every refill kick delivers the
//! backlog. Past [`MAX_PENDING`] messages the oldest are dropped and counted; the guest then
//! relies on the lease expiring, as a stock guest always does.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::transport::VirtioFsWriter;
use log::{debug, warn};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{ByteValued, GuestAddressSpace};

use crate::device::GuestMemory;

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

/// A message for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notification {
    /// Drop the attributes of node `ino` and its cached data from `offset` for `len` bytes
    /// (`len` 0: to the end of the file).
    InvalInode { ino: u64, offset: i64, len: i64 },
    /// Drop the dentry `name` in directory node `parent`.
    InvalEntry { parent: u64, name: Vec<u8> },
}

impl Notification {
    /// The bytes the guest reads: a `fuse_out_header` with `unique` 0 and the notify code in
    /// `error`, then the notify payload.
    pub fn encode(&self) -> Vec<u8> {
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
        };
        let header = OutHeader {
            len: (std::mem::size_of::<OutHeader>() + payload.len()) as u32,
            error: code,
            unique: 0,
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
}

/// Delivers notifications on the notification queue once the guest has negotiated it.
#[derive(Default)]
pub struct Notifier {
    queue: Mutex<Option<(VringRwLock, GuestMemory)>>,
    pending: Mutex<VecDeque<Notification>>,
    pub stats: NotifyStats,
}

impl Notifier {
    /// Whether a guest driver negotiated the queue and it is ready to use.
    pub fn active(&self) -> bool {
        self.queue.lock().unwrap().is_some()
    }

    /// Start delivering on `vring` (the guest negotiated the feature and posted buffers).
    pub fn attach(&self, vring: VringRwLock, memory: GuestMemory) {
        *self.queue.lock().unwrap() = Some((vring, memory));
        self.deliver();
    }

    /// Queue a message and deliver what the guest has room for. Never blocks on the guest.
    pub fn send(&self, message: Notification) {
        {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() >= MAX_PENDING {
                pending.pop_front();
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            pending.push_back(message);
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
            let Some(message) = self.pending.lock().unwrap().pop_front() else {
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
                self.pending.lock().unwrap().push_front(message);
                break;
            };
            let head = chain.head_index();
            let bytes = message.encode();
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
        .encode();
        assert_eq!(bytes.len(), 16 + 24);
        assert_eq!(u32::from_le_bytes(bytes[0..4].try_into().unwrap()), 40);
        assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 0);
        assert_eq!(u64::from_le_bytes(bytes[16..24].try_into().unwrap()), 7);
    }

    #[test]
    fn inval_entry_layout_and_largest_message_fits_the_buffer() {
        let name = vec![b'x'; 255];
        let bytes = Notification::InvalEntry { parent: 1, name }.encode();
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
}
