//! Serving one virtqueue: pop descriptor chains, hand each to the FUSE dispatcher, return it.
//!
//! The guest may put anything in a chain, so nothing here trusts it: every chain is returned to
//! the used ring (with length 0 when it could not be answered), which keeps the guest's request
//! from hanging forever, and the dispatcher validates every address against guest memory.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

use crate::device::GuestMemory;
use crate::fuse::FuseDispatcher;
use crate::queue_poll::PollWindow;

/// One queue's worth of work, created for each kick.
pub struct RequestQueue<'a> {
    pub index: usize,
    pub vring: &'a VringRwLock,
    pub memory: &'a GuestMemory,
    pub dispatcher: &'a Arc<FuseDispatcher>,
    pub event_idx: bool,
    /// This queue's busy-polling window ([`crate::queue_poll`]).
    pub poll: &'a PollWindow,
}

impl RequestQueue<'_> {
    /// Serve every available chain in this thread, each answered (and, when the driver asks
    /// for it, signalled) before the next is taken.
    pub fn process(&self) -> io::Result<()> {
        self.drain(|mem, chain| {
            let head = chain.head_index();
            let header = match self.dispatcher.handle_fast(mem, &chain) {
                Ok(len) => return complete(self.vring, mem, self.index, head, len),
                Err(header) => header,
            };
            if FuseDispatcher::may_block(header.as_ref()) {
                return self.detach(mem, chain);
            }
            let len = self.dispatcher.handle_general(mem, chain, header);
            complete(self.vring, mem, self.index, head, len)
        })
    }

    /// Serve a request that may block indefinitely (SETLKW) on a thread of its own, so the
    /// queue keeps serving; past [`MAX_BLOCKED_REQUESTS`] of them the lock is refused with
    /// ENOLCK, which POSIX allows, rather than letting a guest pile up threads.
    fn detach(&self, mem: &MemoryGuard, chain: Chain) -> io::Result<()> {
        let head = chain.head_index();
        let Some(slot) = BlockedSlot::take() else {
            let len = self.dispatcher.refuse_chain(mem, chain, libc::ENOLCK);
            return complete(self.vring, mem, self.index, head, len);
        };
        let mem = mem.clone();
        let vring = self.vring.clone();
        let dispatcher = self.dispatcher.clone();
        let index = self.index;
        thread::Builder::new()
            .name("leasefs-blocking".into())
            .spawn(move || {
                let len = dispatcher.handle_chain(&mem, chain);
                drop(slot);
                if let Err(e) = complete(&vring, &mem, index, head, len) {
                    warn!("queue {index}: {e}");
                }
            })
            .map(|_| ())
    }

    /// Hand every available chain to `pool`; its workers complete them out of order, which
    /// virtio allows and which keeps one slow request from holding up the rest.
    pub fn process_in(&self, pool: &WorkerPool) -> io::Result<()> {
        self.drain(|mem, chain| {
            let header = FuseDispatcher::peek_header(mem, &chain);
            if FuseDispatcher::may_block(header.as_ref()) {
                return self.detach(mem, chain);
            }
            let mem = mem.clone();
            let vring = self.vring.clone();
            let dispatcher = self.dispatcher.clone();
            let index = self.index;
            pool.submit(Box::new(move || {
                let head = chain.head_index();
                let len = dispatcher.handle_request(&mem, chain, header);
                if let Err(e) = complete(&vring, &mem, index, head, len) {
                    warn!("queue {index}: {e}");
                }
            }))
        })
    }

    /// Pop chains until the queue is empty, re-checking after notifications are re-enabled so
    /// a request that raced with us is not left behind (the EVENT_IDX protocol).
    fn drain(&self, each: impl FnMut(&MemoryGuard, Chain) -> io::Result<()>) -> io::Result<()> {
        self.poll.woken();
        drain_vring(
            self.vring,
            self.memory,
            self.event_idx,
            Some(self.poll),
            each,
        )
    }
}

/// Take every available chain of `vring` and hand it to `each`, one at a time (each is popped
/// when the previous one has been handled, so a chain made available meanwhile is served in
/// the same pass, without a kick); with `event_idx`, poll the ring for `poll`'s window when it
/// is empty (notifications still off, so the driver need not kick), then re-enable
/// notifications and go on if a chain raced with that. Notifications are switched on the
/// queue with this pass's view of guest memory, as [`complete`] does (the ring's own would be
/// loaded for each switch).
fn drain_vring(
    vring: &VringRwLock,
    memory: &GuestMemory,
    event_idx: bool,
    poll: Option<&PollWindow>,
    mut each: impl FnMut(&MemoryGuard, Chain) -> io::Result<()>,
) -> io::Result<()> {
    let mem = memory.memory();
    loop {
        if event_idx {
            vring
                .get_mut()
                .get_queue_mut()
                .disable_notification(&*mem)
                .map_err(queue_error)?;
        }
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(queue_error)?
                .next();
            match chain {
                Some(chain) => each(&mem, chain)?,
                None => break,
            }
        }
        if !event_idx {
            return Ok(());
        }
        if poll.is_some_and(|p| p.poll(|| available(vring, &mem))) {
            continue;
        }
        let raced = vring
            .get_mut()
            .get_queue_mut()
            .enable_notification(&*mem)
            .map_err(queue_error)?;
        if !raced {
            return Ok(());
        }
    }
}

/// Whether the driver has made a chain available that this queue has not taken. A queue the
/// VMM stopped, or whose ring cannot be read, has none: polling ends and the pass re-enables
/// notifications, which reports a broken ring.
fn available(vring: &VringRwLock, mem: &GuestMemoryMmap) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue.ready()
        && queue
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// A snapshot of guest memory that stays mapped while a request uses it, even if the VMM
/// changes the memory table meanwhile.
pub type MemoryGuard = vm_memory::atomic::GuestMemoryLoadGuard<vm_memory::GuestMemoryMmap>;

/// A descriptor chain that owns its view of guest memory, so it can move to a worker thread.
pub type Chain = virtio_queue::DescriptorChain<MemoryGuard>;

/// Put chain `head` in the used ring and signal the driver now if it asked to be told (with
/// EVENT_IDX: its `used_event` has been passed), under one lock of the ring and with the
/// caller's view of guest memory (the ring's own would be loaded once per call).
fn complete(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    index: usize,
    head: u16,
    len: u32,
) -> io::Result<()> {
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    queue.add_used(mem, head, len).map_err(queue_error)?;
    if queue.needs_notification(mem).map_err(queue_error)? {
        state.signal_used_queue().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("queue {index}: signalling the guest: {e}"),
            )
        })?;
    }
    Ok(())
}

fn queue_error(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

/// How many requests may wait at once on their own threads.
pub const MAX_BLOCKED_REQUESTS: usize = 64;

static BLOCKED_REQUESTS: AtomicUsize = AtomicUsize::new(0);

/// A counted place among the blocked requests, given back when dropped.
struct BlockedSlot;

impl BlockedSlot {
    fn take() -> Option<BlockedSlot> {
        BLOCKED_REQUESTS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_BLOCKED_REQUESTS).then_some(n + 1)
            })
            .ok()
            .map(|_| BlockedSlot)
    }
}

impl Drop for BlockedSlot {
    fn drop(&mut self) {
        BLOCKED_REQUESTS.fetch_sub(1, Ordering::AcqRel);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads serving requests, fed through a bounded channel so a flood of
/// requests applies back-pressure instead of growing memory.
pub struct WorkerPool {
    sender: SyncSender<Job>,
}

impl WorkerPool {
    pub fn new(threads: usize) -> io::Result<Self> {
        let (sender, receiver) = sync_channel::<Job>(threads * 64);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads {
            let receiver: Arc<Mutex<Receiver<Job>>> = receiver.clone();
            thread::Builder::new()
                .name(format!("leasefs-worker-{i}"))
                .spawn(move || loop {
                    let job = receiver.lock().unwrap().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(WorkerPool { sender })
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.sender
            .send(job)
            .map_err(|_| io::Error::other("worker pool has shut down"))
    }
}

/// A hand-played driver side of one ring, for the tests here and in [`crate::fast_path`].
#[cfg(test)]
pub(crate) mod test_ring {
    use super::*;
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// A split ring of [`SIZE`] entries in 1 MiB of guest memory, the driver's side played by
    /// hand: descriptors at 0, the avail ring at 0x1000, the used ring at 0x2000, buffers from
    /// 0x10000. EVENT_IDX is on; the call eventfd counts the device's signals.
    pub(crate) struct Ring {
        pub(crate) mem: GuestMemoryMmap,
        pub(crate) memory: GuestMemory,
        pub(crate) vring: VringRwLock,
        call: EventFd,
        avail_idx: u16,
    }

    pub(crate) const SIZE: u16 = 16;
    pub(crate) const DESC: u64 = 0;
    pub(crate) const AVAIL: u64 = 0x1000;
    pub(crate) const USED: u64 = 0x2000;

    impl Ring {
        pub(crate) fn new() -> Ring {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let memory = GuestMemoryAtomic::new(mem.clone());
            let vring = VringRwLock::new(memory.clone(), SIZE).unwrap();
            vring.set_queue_size(SIZE);
            vring.set_queue_info(DESC, AVAIL, USED).unwrap();
            vring.set_queue_event_idx(true);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            let fd = call.try_clone().unwrap().into_raw_fd();
            // SAFETY: a fresh descriptor that nothing else owns.
            vring.set_call(Some(unsafe { File::from_raw_fd(fd) }));
            Ring {
                mem,
                memory,
                vring,
                call,
                avail_idx: 0,
            }
        }

        /// Make a chain of the given (length, device-writable) buffers available, descriptors
        /// from `first` on; `bytes` fill its readable buffers in order.
        pub(crate) fn offer(&mut self, first: u16, buffers: &[(u32, bool)], bytes: &[u8]) {
            for (i, &(len, writable)) in buffers.iter().enumerate() {
                let slot = first + i as u16;
                let addr = Self::buffer(slot).0;
                let last = i + 1 == buffers.len();
                let flags = if writable { 2u16 } else { 0 } | if last { 0 } else { 1 };
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..16].copy_from_slice(&(slot + 1).to_le_bytes());
                self.mem
                    .write_slice(&d, GuestAddress(DESC + 16 * slot as u64))
                    .unwrap();
            }
            let mut rest = bytes;
            for (i, &(len, writable)) in buffers.iter().enumerate() {
                if !writable && !rest.is_empty() {
                    let n = rest.len().min(len as usize);
                    let addr = Self::buffer(first + i as u16);
                    self.mem.write_slice(&rest[..n], addr).unwrap();
                    rest = &rest[n..];
                }
            }
            assert!(rest.is_empty(), "the readable buffers hold the request");
            let at = AVAIL + 4 + 2 * (self.avail_idx % SIZE) as u64;
            self.mem.write_obj(first, GuestAddress(at)).unwrap();
            self.avail_idx += 1;
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// Request `i` of `requests`: a readable and a writable buffer at descriptors 2i, 2i+1.
        pub(crate) fn offer_requests(&mut self, requests: std::ops::Range<u16>) {
            for i in requests {
                self.offer(2 * i, &[(64, false), (64, true)], &[]);
            }
        }

        pub(crate) fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
        }

        /// The driver asks to be signalled when used entry `idx` is written.
        pub(crate) fn set_used_event(&self, idx: u16) {
            let at = AVAIL + 4 + 2 * SIZE as u64;
            self.mem.write_obj(idx, GuestAddress(at)).unwrap();
        }

        /// Where the device asks to be kicked next.
        pub(crate) fn avail_event(&self) -> u16 {
            self.mem
                .read_obj(GuestAddress(USED + 4 + 8 * SIZE as u64))
                .unwrap()
        }

        pub(crate) fn signals(&self) -> u64 {
            self.call.read().unwrap_or(0)
        }

        /// Where the buffer of descriptor `slot` lies (4 KiB each).
        pub(crate) fn buffer(slot: u16) -> GuestAddress {
            GuestAddress(0x10000 + 0x1000 * slot as u64)
        }

        /// The first `len` bytes the device wrote into the writable buffers among `buffers`
        /// (as offered from descriptor `first`), taken in order.
        pub(crate) fn written(&self, first: u16, buffers: &[(u32, bool)], len: usize) -> Vec<u8> {
            let mut out = Vec::new();
            for (i, &(size, writable)) in buffers.iter().enumerate() {
                let n = (size as usize).min(len - out.len());
                if writable && n > 0 {
                    let mut part = vec![0u8; n];
                    let addr = Self::buffer(first + i as u16);
                    self.mem.read_slice(&mut part, addr).unwrap();
                    out.extend_from_slice(&part);
                }
            }
            out
        }

        /// Serve every chain offered so far with `each`, completing it with the length
        /// `each` returns.
        pub(crate) fn serve(&self, mut each: impl FnMut(&MemoryGuard, Chain) -> u32) {
            let vring = self.vring.clone();
            drain_vring(&self.vring, &self.memory, true, None, |mem, chain| {
                let head = chain.head_index();
                let len = each(mem, chain);
                complete(&vring, mem, 0, head, len)
            })
            .unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_ring::*;
    use super::*;
    use std::time::{Duration, Instant};

    use fuse_backend_rs::abi::fuse_abi::InHeader;
    use vm_memory::ByteValued;

    /// Two requests in flight on one queue: everything available is served in one pass,
    /// including a request the driver adds while the device is busy (which the EVENT_IDX
    /// driver does not kick for), and the device asks for a kick only for the next one.
    #[test]
    fn one_pass_serves_every_available_chain() {
        let mut ring = Ring::new();
        ring.offer_requests(0..3);
        let (vring, memory) = (ring.vring.clone(), ring.memory.clone());
        let mut served = Vec::new();
        drain_vring(&vring, &memory, true, None, |mem, chain| {
            let head = chain.head_index();
            if served.is_empty() {
                // The other thread's request arrives while this one is served.
                ring.offer_requests(3..4);
            }
            served.push(head);
            complete(&vring, mem, 0, head, 16)
        })
        .unwrap();
        assert_eq!(served, [0, 2, 4, 6]);
        assert_eq!(ring.used_idx(), 4);
        assert_eq!(ring.avail_event(), 4, "kick for the next request");
    }

    /// The driver's waiter re-arms `used_event` after each harvest (as the Linux driver and
    /// leasefs's frontend do): every completion must be signalled at once, not at the end of
    /// the pass, or the other waiting thread sleeps through its reply.
    #[test]
    fn each_completion_is_signalled_when_the_driver_waits_for_it() {
        let mut ring = Ring::new();
        ring.offer_requests(0..3);
        let (vring, memory) = (ring.vring.clone(), ring.memory.clone());
        let mut signals = Vec::new();
        drain_vring(&vring, &memory, true, None, |mem, chain| {
            ring.set_used_event(ring.used_idx());
            complete(&vring, mem, 0, chain.head_index(), 16)?;
            signals.push(ring.signals());
            Ok(())
        })
        .unwrap();
        assert_eq!(signals, [1, 1, 1]);

        // A driver that has not harvested meanwhile (it asked about entry 3 and sleeps) is
        // signalled once, for that entry, however many complete after it.
        ring.set_used_event(3);
        ring.offer_requests(3..6);
        drain_vring(&vring, &memory, true, None, |mem, chain| {
            complete(&vring, mem, 0, chain.head_index(), 16)
        })
        .unwrap();
        assert_eq!(ring.used_idx(), 6);
        assert_eq!(ring.signals(), 1);
    }

    /// The header is read where it lies when the first buffer holds it, and through a Reader
    /// when the guest split it; a chain with no readable header has none.
    #[test]
    fn peek_header_reads_whole_and_split_headers() {
        let header = InHeader {
            len: 40,
            opcode: crate::fuse::opcode::GETATTR,
            unique: 77,
            nodeid: 5,
            ..Default::default()
        };
        let bytes = header.as_slice().to_vec();
        let mut ring = Ring::new();
        ring.offer(0, &[(64, false), (64, true)], &bytes);
        ring.offer(2, &[(10, false), (64, false), (64, true)], &bytes);
        ring.offer(5, &[(64, true)], &[]);
        let vring = ring.vring.clone();
        let memory = ring.memory.clone();
        let mut seen = Vec::new();
        drain_vring(&vring, &memory, true, None, |mem, chain| {
            let got = FuseDispatcher::peek_header(mem, &chain);
            seen.push(got.map(|h| (h.opcode, h.unique, h.nodeid)));
            complete(&vring, mem, 0, chain.head_index(), 0)
        })
        .unwrap();
        let want = Some((crate::fuse::opcode::GETATTR, 77, 5));
        assert_eq!(seen, [want, want, None]);
    }

    #[test]
    fn pool_runs_every_job() {
        let pool = WorkerPool::new(3).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        for _ in 0..1000 {
            let count = count.clone();
            pool.submit(Box::new(move || {
                count.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) < 1000 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(count.load(Ordering::SeqCst), 1000);
    }

    #[test]
    fn blocked_requests_are_bounded_and_slots_come_back() {
        let slots: Vec<_> = std::iter::from_fn(BlockedSlot::take).take(1000).collect();
        assert_eq!(slots.len(), MAX_BLOCKED_REQUESTS);
        assert!(BlockedSlot::take().is_none());
        drop(slots);
        assert!(BlockedSlot::take().is_some());
    }
}
