//! The vhost-user connection: play the VMM towards a virtio-fs backend.
//!
//! [`Device::connect`] does what QEMU does when a vhost-user-fs device starts, in the same
//! order: SET_OWNER, feature negotiation (what QEMU and a Linux guest ack: VERSION_1,
//! EVENT_IDX, INDIRECT_DESC and PROTOCOL_FEATURES when offered, EVENT_IDX unless
//! [`FrontendConfig::event_idx`] is off; optionally VIRTIO_FS_F_NOTIFICATION), protocol
//! features (MQ, REPLY_ACK), the queue count, SET_MEM_TABLE with our memfd, then for each
//! queue SET_VRING_NUM / ADDR / BASE / CALL / KICK / ENABLE. Once REPLY_ACK is negotiated every later message asks for an
//! acknowledgement, so a backend that rejects a step fails `connect` instead of a request.
//!
//! Guest memory is split once, up front:
//!
//! ```text
//!  GUEST_BASE
//!  │ rings of queue 0 │ rings of queue 1 │ … │ arena q0 (1 MiB) │ [arena notif] │ arena rq 1 │ … │
//! ```
//!
//! Queue order on the device follows the virtio-fs spec: 0 = hiprio, then the notification
//! queue if negotiated, then the request queues.
//!
//! [`Device::pause`] and [`Device::resume`] stop and restart every ring the way QEMU does for
//! `stop` and `cont`; [`Device::reboot`] stops them and negotiates afresh, as a guest that
//! reboots (possibly into a kernel without the notification queue) makes QEMU do.
//!
//! Dropping the [`Device`] closes the socket, which a well-behaved backend treats as the VMM
//! going away (it exits).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::memory::{Arena, Buffer, GuestRam, GUEST_BASE};
use super::virtqueue::{ring_bytes, Segment, Virtqueue};
use super::FrontendError;

/// virtio-fs feature bit 0: the device has a notification queue.
pub const VIRTIO_FS_F_NOTIFICATION: u64 = 1 << 0;

/// Size of each buffer kept posted on the notification queue.
pub const NOTIFICATION_BUFFER_SIZE: u32 = 4096;

/// The hiprio queue's arena (FORGET and INTERRUPT are tiny).
const HIPRIO_ARENA: u64 = 1 << 20;

/// How the frontend sets the device up.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// Bytes of guest memory (one memfd region).
    pub memory_size: u64,
    /// Entries per virtqueue (a power of two).
    pub queue_size: u16,
    /// Request queues to set up; `None` = as many as the backend offers.
    pub request_queues: Option<usize>,
    /// Ask for VIRTIO_FS_F_NOTIFICATION when the backend offers it.
    pub want_notification: bool,
    /// Ack VIRTIO_RING_F_EVENT_IDX when the backend offers it (QEMU and Linux do): kicks
    /// and signals are then suppressed as `avail_event` and `used_event` say.
    pub event_idx: bool,
    /// Buffers kept posted on the notification queue (the Linux driver keeps 64).
    pub notification_buffers: usize,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            memory_size: 256 << 20,
            queue_size: 256,
            request_queues: None,
            want_notification: false,
            event_idx: true,
            notification_buffers: 64,
        }
    }
}

/// What was negotiated with the backend.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// Virtio features the backend offered.
    pub offered_features: u64,
    /// Virtio features we acked.
    pub features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol_features: u64,
    /// Protocol features we acked.
    pub protocol_features: u64,
    /// Queues the backend has (hiprio + notification + request queues).
    pub backend_queues: usize,
    /// Request queues the backend could serve.
    pub backend_request_queues: usize,
}

/// A virtio-fs device as seen from its driver, connected over vhost-user.
pub struct Device {
    /// `None` once [`Device::reboot`] handed the connection to the next device.
    frontend: Mutex<Option<Frontend>>,
    ram: Arc<GuestRam>,
    hiprio: Arc<Virtqueue>,
    notification: Option<Arc<Virtqueue>>,
    /// Notification buffers posted, by head.
    notification_buffers: Mutex<HashMap<u16, Buffer>>,
    request: Vec<Arc<Virtqueue>>,
    negotiated: Negotiated,
    queue_size: u16,
    /// The next avail index of each queue, from GET_VRING_BASE, while paused.
    paused: Mutex<Option<Vec<u32>>>,
}

impl Device {
    /// Connect to the backend listening on `socket` and start every queue.
    pub fn connect(
        socket: impl AsRef<Path>,
        config: &FrontendConfig,
    ) -> Result<Self, FrontendError> {
        let vu = |step: &'static str| {
            move |e: vhost::Error| FrontendError::VhostUser { step, source: e }
        };
        let mut frontend = Frontend::connect(socket.as_ref(), 2).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;

        let offered_features = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        if offered_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FrontendError::Unsupported(
                "backend lacks VIRTIO_F_VERSION_1".into(),
            ));
        }
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut offered_protocol_features = 0;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if offered_features & protocol_bit != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            offered_protocol_features = offered.bits();
            protocol_features =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        }
        let backend_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            Some(frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))? as usize)
        } else {
            None
        };
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let ram = Arc::new(GuestRam::new(config.memory_size).map_err(FrontendError::Io)?);
        let link = Link {
            offered_features,
            offered_protocol_features,
            protocol_features,
            backend_queues,
        };
        Self::start(frontend, ram, &link, config)
    }

    /// Negotiate features and set up every queue over an established connection (QEMU
    /// negotiates the protocol features once per connection; the virtio features and the
    /// rings on every start of the device).
    fn start(
        mut frontend: Frontend,
        ram: Arc<GuestRam>,
        link: &Link,
        config: &FrontendConfig,
    ) -> Result<Self, FrontendError> {
        let vu = |step: &'static str| {
            move |e: vhost::Error| FrontendError::VhostUser { step, source: e }
        };
        let offered_features = link.offered_features;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (offered_features & (protocol_bit | (1 << VIRTIO_RING_F_INDIRECT_DESC)));
        if config.event_idx {
            features |= offered_features & (1 << VIRTIO_RING_F_EVENT_IDX);
        }
        if config.want_notification {
            features |= offered_features & VIRTIO_FS_F_NOTIFICATION;
        }
        frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        let protocol_features = link.protocol_features;
        let notification = features & VIRTIO_FS_F_NOTIFICATION != 0;
        let backend_queues = link.backend_queues.unwrap_or(2 + notification as usize);
        let fixed_queues = 1 + notification as usize;
        let backend_request_queues = backend_queues.saturating_sub(fixed_queues);
        if backend_request_queues == 0 {
            return Err(FrontendError::Unsupported(format!(
                "backend has {backend_queues} queues, none of them a request queue"
            )));
        }
        let request_queues = config
            .request_queues
            .unwrap_or(backend_request_queues)
            .clamp(1, backend_request_queues);

        // Lay out guest memory.
        let queue_count = fixed_queues + request_queues;
        let rings = ring_bytes(config.queue_size);
        let rings_end = GUEST_BASE + rings * queue_count as u64;
        let notification_arena = if notification {
            (NOTIFICATION_BUFFER_SIZE as u64) * config.queue_size as u64
        } else {
            0
        };
        let request_area = ram
            .end()
            .checked_sub(rings_end + HIPRIO_ARENA + notification_arena)
            .filter(|left| *left / request_queues as u64 >= 2 << 20)
            .ok_or_else(|| {
                FrontendError::Unsupported(format!(
                    "{} bytes of guest memory are too few for {queue_count} queues",
                    config.memory_size
                ))
            })?;
        let per_request_queue = (request_area / request_queues as u64) / 4096 * 4096;
        let mut arenas = Vec::with_capacity(queue_count);
        let mut next = rings_end;
        for i in 0..queue_count {
            let len = match i {
                0 => HIPRIO_ARENA,
                1 if notification => notification_arena,
                _ => per_request_queue,
            };
            arenas.push(Arena::new(next, len));
            next += len;
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(queue_count);
        for (i, arena) in arenas.into_iter().enumerate() {
            let area = GUEST_BASE + rings * i as u64;
            let queue = Virtqueue::new(i, config.queue_size, ram.clone(), area, arena)
                .map_err(FrontendError::Io)?;
            queue.set_event_idx(event_idx);
            queues.push(Arc::new(queue));
        }

        let region = ram.region_info().map_err(FrontendError::Io)?;
        frontend
            .set_mem_table(&[region])
            .map_err(vu("SET_MEM_TABLE"))?;
        for q in &queues {
            start_queue(&mut frontend, &ram, q, config.queue_size, features, 0)?;
        }

        let mut queues = queues.into_iter();
        let hiprio = queues.next().expect("hiprio queue");
        let notification = if notification { queues.next() } else { None };
        let device = Device {
            frontend: Mutex::new(Some(frontend)),
            ram,
            hiprio,
            notification,
            notification_buffers: Mutex::new(HashMap::new()),
            request: queues.collect(),
            negotiated: Negotiated {
                offered_features,
                features,
                offered_protocol_features: link.offered_protocol_features,
                protocol_features: protocol_features.bits(),
                backend_queues,
                backend_request_queues,
            },
            queue_size: config.queue_size,
            paused: Mutex::new(None),
        };
        device.stock_notification_queue(config.notification_buffers)?;
        Ok(device)
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    pub fn hiprio(&self) -> &Arc<Virtqueue> {
        &self.hiprio
    }

    /// Request queue `i` (0-based among request queues).
    pub fn request_queue(&self, i: usize) -> &Arc<Virtqueue> {
        &self.request[i]
    }

    pub fn request_queues(&self) -> &[Arc<Virtqueue>] {
        &self.request
    }

    /// Every queue we set up, in device order.
    pub fn all_queues(&self) -> Vec<Arc<Virtqueue>> {
        let mut all = vec![self.hiprio.clone()];
        all.extend(self.notification.clone());
        all.extend(self.request.iter().cloned());
        all
    }

    pub fn has_notification_queue(&self) -> bool {
        self.notification.is_some()
    }

    /// The notification queue (virtqueue 1), if negotiated: for its kick and signal counts
    /// and [`Virtqueue::wait_for_completions`].
    pub fn notification_queue(&self) -> Option<&Arc<Virtqueue>> {
        self.notification.as_ref()
    }

    /// Run `f` on the vhost-user connection (for tests that send their own messages).
    ///
    /// # Panics
    ///
    /// After [`Device::reboot`], which hands the connection to the new device.
    pub fn with_frontend<T>(&self, f: impl FnOnce(&mut Frontend) -> T) -> T {
        let mut frontend = self.frontend.lock().unwrap_or_else(|e| e.into_inner());
        f(frontend
            .as_mut()
            .expect("the connection moved to the rebooted device"))
    }

    /// Messages the device has put on the notification queue since the last call, each as
    /// the bytes it wrote (a `fuse_out_header`, then the notification). The buffers are
    /// posted again right away. Empty without a notification queue.
    pub fn notifications(&self) -> Result<Vec<Vec<u8>>, FrontendError> {
        let mut out = Vec::new();
        self.handle_notifications(|bytes| out.push(bytes.to_vec()))?;
        Ok(out)
    }

    /// What the Linux driver's notification work item does: take every buffer the device
    /// filled, hand each message to `handle` (which may confirm it), then post all of them
    /// again at once and kick if the device asked for it. Returns how many were handled.
    pub fn handle_notifications(
        &self,
        mut handle: impl FnMut(&[u8]),
    ) -> Result<usize, FrontendError> {
        let Some(queue) = &self.notification else {
            return Ok(0);
        };
        let mut buffers = self
            .notification_buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Read every completed buffer before posting any again: a re-posted buffer can take
        // the head number of a completion not read yet.
        let mut done = Vec::new();
        for (head, len) in queue.take_completions() {
            let Some(buf) = buffers.remove(&head) else {
                continue;
            };
            let mut bytes = vec![0u8; len.min(buf.len) as usize];
            self.ram
                .read(buf.addr, &mut bytes)
                .map_err(FrontendError::Io)?;
            handle(&bytes);
            done.push(buf);
        }
        let chains: Vec<[Segment; 1]> = done.iter().map(|b| [Segment::writable(*b)]).collect();
        let chains: Vec<&[Segment]> = chains.iter().map(|c| &c[..]).collect();
        if !chains.is_empty() {
            let heads = queue.submit_many(&chains).map_err(FrontendError::Io)?;
            buffers.extend(heads.into_iter().zip(done.iter().copied()));
        }
        Ok(done.len())
    }

    /// Notification buffers currently posted (not yet filled, or filled and not yet taken).
    pub fn notification_buffers_posted(&self) -> usize {
        self.notification_buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Post up to `count` notification buffers and kick once, as the Linux driver does when
    /// the device starts.
    fn stock_notification_queue(&self, count: usize) -> Result<(), FrontendError> {
        let Some(queue) = &self.notification else {
            return Ok(());
        };
        let mut buffers = self
            .notification_buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let count = count.min(queue.free_descriptors());
        let mut bufs = Vec::with_capacity(count);
        while bufs.len() < count {
            match queue.alloc(NOTIFICATION_BUFFER_SIZE) {
                Some(buf) => bufs.push(buf),
                None => break,
            }
        }
        let chains: Vec<[Segment; 1]> = bufs.iter().map(|b| [Segment::writable(*b)]).collect();
        let chains: Vec<&[Segment]> = chains.iter().map(|c| &c[..]).collect();
        if !chains.is_empty() {
            let heads = queue.submit_many(&chains).map_err(FrontendError::Io)?;
            buffers.extend(heads.into_iter().zip(bufs));
        }
        Ok(())
    }

    /// Ask the backend to stop queue `index` (GET_VRING_BASE) and return its next avail index.
    pub fn stop_queue(&self, index: usize) -> Result<u32, FrontendError> {
        self.with_frontend(|f| f.get_vring_base(index))
            .map_err(|source| FrontendError::VhostUser {
                step: "GET_VRING_BASE",
                source,
            })
    }

    /// Stop every ring as QEMU does when the VM is paused (`stop` in the monitor):
    /// SET_VRING_ENABLE 0 and GET_VRING_BASE on each. Guest memory and the rings' contents
    /// stay as they are; [`Device::resume`] starts them again.
    pub fn pause(&self) -> Result<(), FrontendError> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_some() {
            return Ok(());
        }
        *paused = Some(self.stop_all()?);
        Ok(())
    }

    /// Start every ring again where it stopped, as QEMU does on `cont`: SET_FEATURES,
    /// SET_MEM_TABLE, then per ring SET_VRING_NUM / ADDR / BASE (the saved index) / CALL /
    /// KICK / ENABLE.
    pub fn resume(&self) -> Result<(), FrontendError> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        let Some(bases) = paused.take() else {
            return Ok(());
        };
        let features = self.negotiated.features;
        let region = self.ram.region_info().map_err(FrontendError::Io)?;
        self.with_frontend(|f| -> Result<(), FrontendError> {
            f.set_features(features)
                .map_err(|source| FrontendError::VhostUser {
                    step: "SET_FEATURES",
                    source,
                })?;
            f.set_mem_table(&[region])
                .map_err(|source| FrontendError::VhostUser {
                    step: "SET_MEM_TABLE",
                    source,
                })?;
            for (q, base) in self.all_queues().iter().zip(bases) {
                start_queue(f, &self.ram, q, self.queue_size, features, base)?;
            }
            Ok(())
        })
    }

    /// What a guest reboot makes QEMU do: stop every ring, then negotiate again with
    /// `config` (say, a kernel without VIRTIO_FS_F_NOTIFICATION) and set up fresh rings in the
    /// same guest memory. Returns the new device; this one must not be used any more.
    pub fn reboot(&self, config: &FrontendConfig) -> Result<Device, FrontendError> {
        if self
            .paused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
        {
            self.stop_all()?;
        }
        let frontend = self
            .frontend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the connection moved to the rebooted device");
        let link = Link {
            offered_features: self.negotiated.offered_features,
            offered_protocol_features: self.negotiated.offered_protocol_features,
            protocol_features: VhostUserProtocolFeatures::from_bits_truncate(
                self.negotiated.protocol_features,
            ),
            backend_queues: VhostUserProtocolFeatures::from_bits_truncate(
                self.negotiated.protocol_features,
            )
            .contains(VhostUserProtocolFeatures::MQ)
            .then_some(self.negotiated.backend_queues),
        };
        Self::start(frontend, self.ram.clone(), &link, config)
    }

    /// SET_VRING_ENABLE 0 and GET_VRING_BASE on every ring; their next avail indices.
    fn stop_all(&self) -> Result<Vec<u32>, FrontendError> {
        let protocol =
            self.negotiated.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        self.with_frontend(|f| {
            self.all_queues()
                .iter()
                .map(|q| {
                    if protocol {
                        f.set_vring_enable(q.index(), false).map_err(|source| {
                            FrontendError::VhostUser {
                                step: "SET_VRING_ENABLE",
                                source,
                            }
                        })?;
                    }
                    f.get_vring_base(q.index())
                        .map_err(|source| FrontendError::VhostUser {
                            step: "GET_VRING_BASE",
                            source,
                        })
                })
                .collect()
        })
    }
}

/// What stays of a connection across device restarts.
struct Link {
    offered_features: u64,
    offered_protocol_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM's answer (with MQ).
    backend_queues: Option<usize>,
}

fn start_queue(
    frontend: &mut Frontend,
    ram: &GuestRam,
    queue: &Virtqueue,
    size: u16,
    features: u64,
    base: u32,
) -> Result<(), FrontendError> {
    let i = queue.index();
    let vu =
        |step: &'static str| move |e: vhost::Error| FrontendError::VhostUser { step, source: e };
    let (desc, avail, used) = queue.ring_addresses();
    let host = |gpa| ram.host_address(gpa).map_err(FrontendError::Io);
    frontend
        .set_vring_num(i, size)
        .map_err(vu("SET_VRING_NUM"))?;
    frontend
        .set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: size,
                queue_size: size,
                flags: 0,
                desc_table_addr: host(desc)?,
                used_ring_addr: host(used)?,
                avail_ring_addr: host(avail)?,
                log_addr: None,
            },
        )
        .map_err(vu("SET_VRING_ADDR"))?;
    frontend
        .set_vring_base(i, base as u16)
        .map_err(vu("SET_VRING_BASE"))?;
    frontend
        .set_vring_call(i, queue.call_fd())
        .map_err(vu("SET_VRING_CALL"))?;
    frontend
        .set_vring_kick(i, queue.kick_fd())
        .map_err(vu("SET_VRING_KICK"))?;
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        frontend
            .set_vring_enable(i, true)
            .map_err(vu("SET_VRING_ENABLE"))?;
    }
    Ok(())
}
