//! The vhost-user virtio-fs device: queues, features and config space.
//!
//! The VMM owns the PCI device; this side answers its questions (how many queues, which
//! features, what the config space holds) and turns queue kicks into work for
//! [`crate::queue::RequestQueue`]. Each request queue is served by its own thread, so a guest
//! with `num-request-queues > 1` gets real parallelism.
//!
//! The vhost-user crate keeps the ring lifecycle to itself (GET_VRING_BASE stops a ring,
//! SET_VRING_KICK / SET_VRING_ENABLE start it), so the device's vrings are [`FsVring`]s: the
//! crate's own vring plus a [`RingMonitor`] that sees every such change. It tells the
//! notifier when its ring stops and starts (a paused VM keeps its revocations queued), and
//! the [`GuestClock`] when the VMM has stopped every ring (QEMU `stop`) and started one again.
//! Build the vhost-user daemon with [`new_daemon`], which hands the monitor to the vrings.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringRwLock, VringState, VringStateGuard,
    VringStateMutGuard, VringT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::cli::MAX_QUEUE_SIZE;
use crate::coherence::guest_clock::GuestClock;
use crate::coherence::notifier::{
    Notifier, NOTIFICATION_QUEUE, NOTIFY_BUF_SIZE, VIRTIO_FS_F_NOTIFICATION,
};
use crate::fuse::FuseDispatcher;
use crate::queue::{RequestQueue, WorkerPool};
use crate::queue_poll::PollWindow;

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
pub type GuestMemory = crate::coherence::notifier::GuestMemory;

/// Sees the VMM start and stop the rings, for the notifier and the guest clock.
pub struct RingMonitor {
    notifier: Arc<Notifier>,
    clock: Arc<GuestClock>,
    memory: RwLock<Option<GuestMemory>>,
    /// VIRTIO_FS_F_NOTIFICATION is negotiated now.
    notification: AtomicBool,
    /// Whether each ring is started (ready and enabled), by queue index.
    running: Mutex<Vec<bool>>,
}

impl RingMonitor {
    fn new(notifier: Arc<Notifier>, clock: Arc<GuestClock>) -> Self {
        RingMonitor {
            notifier,
            clock,
            memory: RwLock::new(None),
            notification: AtomicBool::new(false),
            running: Mutex::new(Vec::new()),
        }
    }

    /// Ring `index` may have started or stopped: compare with what we knew.
    fn update(&self, index: usize, vring: &VringRwLock, call_changed: bool) {
        let now = {
            let state = vring.get_ref();
            state.get_queue().ready() && state.is_enabled()
        };
        let (was, any_running) = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.len() <= index {
                running.resize(index + 1, false);
            }
            let was = std::mem::replace(&mut running[index], now);
            (was, running.iter().any(|r| *r))
        };
        if was != now {
            debug!("ring {index} {}", if now { "started" } else { "stopped" });
            if now {
                if self.clock.is_paused() {
                    info!("the VMM started a ring again: the guest runs");
                }
                self.clock.resume();
            } else if !any_running {
                info!("the VMM stopped every ring: the guest is paused (or has no driver)");
                self.clock.pause();
            }
        }
        if index != NOTIFICATION_QUEUE || !self.notification.load(Ordering::Acquire) {
            return;
        }
        if was && !now {
            self.notifier.ring_stopped();
        } else if now && (!was || call_changed) {
            let Some(memory) = self.memory.read().unwrap().clone() else {
                return;
            };
            if self.notifier.active() {
                self.notifier.ring_started(vring.clone(), memory);
            } else {
                self.notifier.attach(vring.clone(), memory);
            }
        }
    }
}

thread_local! {
    /// The monitor, and the index of the next vring, while [`new_daemon`] builds the vrings.
    static NEW_VRINGS: RefCell<Option<(Arc<RingMonitor>, usize)>> = const { RefCell::new(None) };
}

/// The vhost-user daemon for `device`, its vrings reporting to the device's monitor.
pub fn new_daemon(
    name: &str,
    device: Arc<FsDevice>,
) -> vhost_user_backend::Result<VhostUserDaemon<Arc<FsDevice>>> {
    // The crate makes one vring per queue, in order, in this thread, inside new().
    NEW_VRINGS.with(|v| *v.borrow_mut() = Some((device.monitor.clone(), 0)));
    let daemon = VhostUserDaemon::new(
        name.to_string(),
        device,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    );
    NEW_VRINGS.with(|v| *v.borrow_mut() = None);
    daemon
}

/// The crate's vring, telling a [`RingMonitor`] when the VMM starts or stops it.
#[derive(Clone)]
pub struct FsVring {
    ring: VringRwLock,
    monitor: Option<(Arc<RingMonitor>, usize)>,
}

impl FsVring {
    /// The vring proper.
    pub fn ring(&self) -> &VringRwLock {
        &self.ring
    }

    fn changed(&self, call_changed: bool) {
        if let Some((monitor, index)) = &self.monitor {
            monitor.update(*index, &self.ring, call_changed);
        }
    }
}

impl<'a> VringStateGuard<'a, GuestMemory> for FsVring {
    type G = RwLockReadGuard<'a, VringState<GuestMemory>>;
}

impl<'a> VringStateMutGuard<'a, GuestMemory> for FsVring {
    type G = RwLockWriteGuard<'a, VringState<GuestMemory>>;
}

impl VringT<GuestMemory> for FsVring {
    fn new(mem: GuestMemory, max_queue_size: u16) -> Result<Self, virtio_queue::Error> {
        let monitor = NEW_VRINGS.with(|v| {
            v.borrow_mut().as_mut().map(|(monitor, next)| {
                *next += 1;
                (monitor.clone(), *next - 1)
            })
        });
        Ok(FsVring {
            ring: VringRwLock::new(mem, max_queue_size)?,
            monitor,
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, GuestMemory>>::G {
        self.ring.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, GuestMemory>>::G {
        self.ring.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), virtio_queue::Error> {
        self.ring.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.ring.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, virtio_queue::Error> {
        self.ring.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), virtio_queue::Error> {
        self.ring.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, virtio_queue::Error> {
        self.ring.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.ring.set_enabled(enabled);
        self.changed(false);
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), virtio_queue::Error> {
        self.ring.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.ring.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.ring.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.ring.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, virtio_queue::Error> {
        self.ring.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.ring.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.ring.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        // GET_VRING_BASE stops a ring with this; SET_VRING_KICK/CALL start it.
        self.ring.set_queue_ready(ready);
        self.changed(false);
    }

    fn set_kick(&self, file: Option<File>) {
        self.ring.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.ring.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        let new_call = file.is_some();
        self.ring.set_call(file);
        // A ring restarted before its call eventfd came could not signal what it delivered.
        self.changed(new_call);
    }

    fn set_err(&self, file: Option<File>) {
        self.ring.set_err(file)
    }
}

/// A virtio-fs device served over vhost-user.
pub struct FsDevice {
    dispatcher: Arc<FuseDispatcher>,
    notifier: Arc<Notifier>,
    monitor: Arc<RingMonitor>,
    num_request_queues: usize,
    tag: Option<String>,
    memory: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    pool: Option<WorkerPool>,
    /// Each queue's busy-polling window, by virtio queue index (hiprio's never polls).
    polls: Vec<PollWindow>,
}

impl FsDevice {
    /// A device offering `num_request_queues` request queues. A `thread_pool_size` of 0 serves
    /// each queue's requests in that queue's own thread. `clock` is told when the VMM stops
    /// every ring and starts them again.
    pub fn new(
        dispatcher: Arc<FuseDispatcher>,
        notifier: Arc<Notifier>,
        clock: Arc<GuestClock>,
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
            monitor: Arc::new(RingMonitor::new(notifier.clone(), clock)),
            notifier,
            num_request_queues,
            tag,
            memory: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            pool,
            polls: poll_windows(2 + num_request_queues, Duration::ZERO),
        })
    }

    /// Let each request queue busy-poll for up to `max` after it runs out of work
    /// ([`crate::queue_poll`]); zero turns polling off.
    pub fn with_queue_poll(mut self, max: Duration) -> Self {
        self.polls = poll_windows(self.num_queues(), max);
        self
    }

    /// The guest's running time (paused time left out), as this device sees the VMM stop
    /// and start the rings.
    pub fn guest_clock(&self) -> Arc<GuestClock> {
        self.monitor.clock.clone()
    }

    /// The virtio queue index and vring behind event `device_event` of worker `thread_id`.
    fn thread_queue<'a>(
        &self,
        thread_id: usize,
        device_event: u16,
        vrings: &'a [FsVring],
    ) -> Option<(usize, &'a VringRwLock)> {
        let mut mask = self.thread_queues(thread_id)?;
        for _ in 0..device_event {
            mask &= mask.checked_sub(1)?; // drop the lowest queue
        }
        let index = (mask != 0).then(|| mask.trailing_zeros() as usize)?;
        Some((index, vrings.get(device_event as usize)?.ring()))
    }

    /// The queues (a bit per virtio queue index) served by worker thread `thread_id`, without
    /// building [`VhostUserBackend::queues_per_thread`]'s list on every event.
    fn thread_queues(&self, thread_id: usize) -> Option<u64> {
        // hiprio alone on thread 0, then one thread per request queue: a slow request on one
        // queue never delays another queue.
        (thread_id < self.num_queues()).then(|| 1u64 << thread_id)
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

/// A polling window of at most `max` for each of `num_queues` queues, by virtio queue index;
/// hiprio's never polls (its requests are rare and never back to back).
fn poll_windows(num_queues: usize, max: Duration) -> Vec<PollWindow> {
    (0..num_queues)
        .map(|i| {
            PollWindow::new(if i == HIPRIO_QUEUE {
                Duration::ZERO
            } else {
                max
            })
        })
        .collect()
}

impl VhostUserBackend for FsDevice {
    type Bitmap = ();
    type Vring = FsVring;

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
        let before = self.acked_features.swap(features, Ordering::AcqRel);
        let notification = features & VIRTIO_FS_F_NOTIFICATION != 0;
        self.monitor
            .notification
            .store(notification, Ordering::Release);
        if before & VIRTIO_FS_F_NOTIFICATION != 0 && !notification {
            // A guest rebooted into a kernel without the queue: virtqueue 1 is a request
            // queue now.
            self.notifier.detach();
        }
    }

    fn reset_device(&self) {
        self.acked_features.store(0, Ordering::Release);
        self.monitor.notification.store(false, Ordering::Release);
        self.notifier.detach();
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
        *self.monitor.memory.write().unwrap() = Some(mem.clone());
        *self.memory.write().unwrap() = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues())
            .filter_map(|t| self.thread_queues(t))
            .collect()
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
        vrings: &[FsVring],
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
            self.acked_features.load(Ordering::Acquire) & VIRTIO_FS_F_NOTIFICATION != 0;
        if notification && index == NOTIFICATION_QUEUE {
            // The guest posted buffers (it kicks only when the notifier asked it to, with
            // EVENT_IDX): deliver what is pending.
            if !self.notifier.active() {
                self.notifier.attach(vring.clone(), memory);
            } else {
                self.notifier.deliver();
            }
            return Ok(());
        }
        let queue = RequestQueue {
            index,
            vring,
            memory: &memory,
            dispatcher: &self.dispatcher,
            event_idx: self.event_idx.load(Ordering::Relaxed),
            poll: &self.polls[index],
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
