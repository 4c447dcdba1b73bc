//! The vhost-user connection: play the VMM towards a virtio-fs backend.
//!
//! [`Device::connect`] does what QEMU does when a vhost-user-fs device starts, in the same
//! order: SET_OWNER, feature negotiation (VERSION_1 and PROTOCOL_FEATURES; optionally
//! VIRTIO_FS_F_NOTIFICATION; never EVENT_IDX), protocol features (MQ, REPLY_ACK), the
//! queue count, SET_MEM_TABLE with our memfd, then for each queue SET_VRING_NUM / ADDR /
//! BASE / CALL / KICK / ENABLE. Once REPLY_ACK is negotiated every later message asks for an
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
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            memory_size: 256 << 20,
            queue_size: 256,
            request_queues: None,
            want_notification: false,
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
    frontend: Mutex<Frontend>,
    ram: Arc<GuestRam>,
    hiprio: Arc<Virtqueue>,
    notification: Option<Arc<Virtqueue>>,
    /// Notification buffers posted, by head.
    notification_buffers: Mutex<HashMap<u16, Buffer>>,
    request: Vec<Arc<Virtqueue>>,
    negotiated: Negotiated,
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
        let mut features = (1 << VIRTIO_F_VERSION_1) | (offered_features & protocol_bit);
        if config.want_notification {
            features |= offered_features & VIRTIO_FS_F_NOTIFICATION;
        }
        frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;

        let mut offered_protocol_features = 0;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & protocol_bit != 0 {
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
        let notification = features & VIRTIO_FS_F_NOTIFICATION != 0;
        let backend_queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))? as usize
        } else {
            2 + notification as usize
        };
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
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }

        // Lay out guest memory.
        let ram = Arc::new(GuestRam::new(config.memory_size).map_err(FrontendError::Io)?);
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
        let mut queues = Vec::with_capacity(queue_count);
        for (i, arena) in arenas.into_iter().enumerate() {
            let area = GUEST_BASE + rings * i as u64;
            queues.push(Arc::new(
                Virtqueue::new(i, config.queue_size, ram.clone(), area, arena)
                    .map_err(FrontendError::Io)?,
            ));
        }

        let region = ram.region_info().map_err(FrontendError::Io)?;
        frontend
            .set_mem_table(&[region])
            .map_err(vu("SET_MEM_TABLE"))?;
        for q in &queues {
            start_queue(&mut frontend, &ram, q, config.queue_size, features)?;
        }

        let mut queues = queues.into_iter();
        let hiprio = queues.next().expect("hiprio queue");
        let notification = if notification { queues.next() } else { None };
        let device = Device {
            frontend: Mutex::new(frontend),
            ram,
            hiprio,
            notification,
            notification_buffers: Mutex::new(HashMap::new()),
            request: queues.collect(),
            negotiated: Negotiated {
                offered_features,
                features,
                offered_protocol_features,
                protocol_features: protocol_features.bits(),
                backend_queues,
                backend_request_queues,
            },
        };
        device.stock_notification_queue()?;
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

    /// Run `f` on the vhost-user connection (for tests that send their own messages).
    pub fn with_frontend<T>(&self, f: impl FnOnce(&mut Frontend) -> T) -> T {
        f(&mut self.frontend.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Messages the device has put on the notification queue since the last call, each as
    /// the bytes it wrote (a `fuse_out_header` with `unique` 0, then the notification). The
    /// buffers are posted again right away. Empty without a notification queue.
    pub fn notifications(&self) -> Result<Vec<Vec<u8>>, FrontendError> {
        let Some(queue) = &self.notification else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
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
            out.push(bytes);
            done.push(buf);
        }
        for buf in done {
            let head = queue
                .submit(&[Segment::writable(buf)])
                .map_err(FrontendError::Io)?;
            buffers.insert(head, buf);
        }
        Ok(out)
    }

    fn stock_notification_queue(&self) -> Result<(), FrontendError> {
        let Some(queue) = &self.notification else {
            return Ok(());
        };
        let mut buffers = self
            .notification_buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while let Some(buf) = queue.alloc(NOTIFICATION_BUFFER_SIZE) {
            if queue.free_descriptors() == 0 {
                queue.free(buf);
                break;
            }
            let head = queue
                .submit(&[Segment::writable(buf)])
                .map_err(FrontendError::Io)?;
            buffers.insert(head, buf);
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
}

fn start_queue(
    frontend: &mut Frontend,
    ram: &GuestRam,
    queue: &Virtqueue,
    size: u16,
    features: u64,
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
        .set_vring_base(i, 0)
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
