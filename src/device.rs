//! The vhost-user virtio-fs device: queues, features and config space.
//!
//! The VMM owns the PCI device; this side answers its questions (how many queues, which
//! features, what the config space holds) and turns queue kicks into work for
//! [`crate::queue::RequestQueue`]. Each request queue is served by its own thread, so a guest
//! with `num-request-queues > 1` gets real parallelism.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{ByteValued, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::cli::MAX_QUEUE_SIZE;
use crate::coherence::notifier::{
    Notifier, NOTIFICATION_QUEUE, NOTIFY_BUF_SIZE, VIRTIO_FS_F_NOTIFICATION,
};
use crate::fuse::FuseDispatcher;
use crate::queue::{RequestQueue, WorkerPool};

/// Queue 0 carries high-priority requests (FORGET, INTERRUPT); request queues follow it.
pub const HIPRIO_QUEUE: usize = 0;

/// Length of the tag field of `struct virtio_fs_config`.
pub const TAG_LEN: usize = 36;

/// `struct virtio_fs_config` as the virtio 1.2 spec lays it out; `notify_buf_size` is valid
/// when VIRTIO_FS_F_NOTIFICATION is negotiated.
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct VirtioFsConfig {
    pub tag: [u8; TAG_LEN],
    pub num_request_queues: u32,
    pub notify_buf_size: u32,
}

// SAFETY: plain old data, no padding (packed), every bit pattern valid.
unsafe impl ByteValued for VirtioFsConfig {}

/// Guest memory as the vhost-user crates hand it to us.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// A virtio-fs device served over vhost-user.
pub struct FsDevice {
    dispatcher: Arc<FuseDispatcher>,
    notifier: Arc<Notifier>,
    num_request_queues: usize,
    tag: Option<String>,
    memory: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    pool: Option<WorkerPool>,
}

impl FsDevice {
    /// A device offering `num_request_queues` request queues. A `thread_pool_size` of 0 serves
    /// each queue's requests in that queue's own thread.
    pub fn new(
        dispatcher: Arc<FuseDispatcher>,
        notifier: Arc<Notifier>,
        num_request_queues: usize,
        tag: Option<String>,
        thread_pool_size: usize,
    ) -> io::Result<Self> {
        if let Some(tag) = &tag {
            if tag.is_empty() || tag.len() > TAG_LEN {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("tag must be 1 to {TAG_LEN} bytes long, got {}", tag.len()),
                ));
            }
        }
        let pool = match thread_pool_size {
            0 => None,
            n => Some(WorkerPool::new(n)?),
        };
        Ok(FsDevice {
            dispatcher,
            notifier,
            num_request_queues,
            tag,
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            pool,
        })
    }

    /// The virtio queue index and vring behind event `device_event` of worker `thread_id`.
    fn thread_queue<'a>(
        &self,
        thread_id: usize,
        device_event: u16,
        vrings: &'a [VringRwLock],
    ) -> Option<(usize, &'a VringRwLock)> {
        let mask = *self.queues_per_thread().get(thread_id)?;
        let index = (0..64)
            .filter(|q| mask & (1 << q) != 0)
            .nth(device_event as usize)?;
        Some((index, vrings.get(device_event as usize)?))
    }

    fn config_bytes(&self) -> Vec<u8> {
        let mut config = VirtioFsConfig {
            tag: [0; TAG_LEN],
            num_request_queues: (self.num_request_queues as u32).to_le(),
            notify_buf_size: NOTIFY_BUF_SIZE.to_le(),
        };
        if let Some(tag) = &self.tag {
            config.tag[..tag.len()].copy_from_slice(tag.as_bytes());
        }
        config.as_slice().to_vec()
    }
}

impl VhostUserBackend for FsDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        // hiprio, the notification queue (used only when negotiated), the request queues.
        2 + self.num_request_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_FS_F_NOTIFICATION
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let mut features = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        // Like virtiofsd: only a daemon that knows its tag can fill the config space. Without
        // --tag the VMM keeps filling it itself (QEMU's vhost-user-fs does).
        if self.tag.is_some() {
            features |= VhostUserProtocolFeatures::CONFIG;
        }
        features
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_bytes();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        *self.memory.write().unwrap() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // hiprio alone on thread 0, then one thread per request queue: a slow request on one
        // queue never delays another queue.
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, the queue threads cannot be stopped and the daemon never exits after the
        // VMM disconnects.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .inspect_err(|e| warn!("creating a queue thread's exit event: {e}"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} on queue {device_event}");
            return Ok(());
        }
        // `device_event` counts within this thread's queues; the virtio queue index is what
        // decides a queue's role.
        let Some((index, vring)) = self.thread_queue(thread_id, device_event, vrings) else {
            warn!("event {device_event} on thread {thread_id} names no queue");
            return Ok(());
        };
        let Some(memory) = self.memory.read().unwrap().clone() else {
            debug!("queue {index} kicked before the memory table arrived");
            return Ok(());
        };
        let notification =
            self.acked_features.load(Ordering::Relaxed) & VIRTIO_FS_F_NOTIFICATION != 0;
        if notification && index == NOTIFICATION_QUEUE {
            // The guest posted buffers: deliver what is pending.
            if !self.notifier.active() {
                self.notifier.attach(vring.clone(), memory);
            } else {
                self.notifier.deliver();
            }
            return Ok(());
        }
        let queue = RequestQueue {
            index,
            vring: vring.clone(),
            memory,
            dispatcher: self.dispatcher.clone(),
            event_idx: self.event_idx.load(Ordering::Relaxed),
        };
        let result = match &self.pool {
            Some(pool) if index != HIPRIO_QUEUE => queue.process_in(pool),
            _ => queue.process(),
        };
        result.inspect_err(|e| warn!("queue {index}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout_is_tag_then_queue_count() {
        assert_eq!(std::mem::size_of::<VirtioFsConfig>(), 44);
    }
}
