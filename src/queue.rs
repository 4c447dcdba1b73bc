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
use virtio_queue::QueueOwnedT;
use vm_memory::GuestAddressSpace;

use crate::device::GuestMemory;
use crate::fuse::FuseDispatcher;

/// One queue's worth of work, created for each kick.
pub struct RequestQueue {
    pub index: usize,
    pub vring: VringRwLock,
    pub memory: GuestMemory,
    pub dispatcher: Arc<FuseDispatcher>,
    pub event_idx: bool,
}

impl RequestQueue {
    /// Serve every available chain in this thread.
    pub fn process(&self) -> io::Result<()> {
        self.drain(|mem, chain| {
            if self.dispatcher.may_block(&mem, &chain) {
                return self.detach(mem, chain);
            }
            let head = chain.head_index();
            let len = self.dispatcher.handle_chain(&mem, chain);
            complete(&self.vring, self.index, head, len)
        })
    }

    /// Serve a request that may block indefinitely (SETLKW) on a thread of its own, so the
    /// queue keeps serving; past [`MAX_BLOCKED_REQUESTS`] of them the lock is refused with
    /// ENOLCK, which POSIX allows, rather than letting a guest pile up threads.
    fn detach(&self, mem: MemoryGuard, chain: Chain) -> io::Result<()> {
        let head = chain.head_index();
        let Some(slot) = BlockedSlot::take() else {
            let len = self.dispatcher.refuse_chain(&mem, chain, libc::ENOLCK);
            return complete(&self.vring, self.index, head, len);
        };
        let vring = self.vring.clone();
        let dispatcher = self.dispatcher.clone();
        let index = self.index;
        thread::Builder::new()
            .name("leasefs-blocking".into())
            .spawn(move || {
                let len = dispatcher.handle_chain(&mem, chain);
                drop(slot);
                if let Err(e) = complete(&vring, index, head, len) {
                    warn!("queue {index}: {e}");
                }
            })
            .map(|_| ())
    }

    /// Hand every available chain to `pool`; its workers complete them out of order, which
    /// virtio allows and which keeps one slow request from holding up the rest.
    pub fn process_in(&self, pool: &WorkerPool) -> io::Result<()> {
        self.drain(|mem, chain| {
            if self.dispatcher.may_block(&mem, &chain) {
                return self.detach(mem, chain);
            }
            let vring = self.vring.clone();
            let dispatcher = self.dispatcher.clone();
            let index = self.index;
            pool.submit(Box::new(move || {
                let head = chain.head_index();
                let len = dispatcher.handle_chain(&mem, chain);
                if let Err(e) = complete(&vring, index, head, len) {
                    warn!("queue {index}: {e}");
                }
            }))
        })
    }

    /// Pop chains until the queue is empty, re-checking after notifications are re-enabled so
    /// a request that raced with us is not left behind (the EVENT_IDX protocol).
    fn drain(&self, mut each: impl FnMut(MemoryGuard, Chain) -> io::Result<()>) -> io::Result<()> {
        let mem = self.memory.memory();
        loop {
            if self.event_idx {
                self.vring.disable_notification().map_err(queue_error)?;
            }
            loop {
                let chain = self
                    .vring
                    .get_mut()
                    .get_queue_mut()
                    .iter(mem.clone())
                    .map_err(queue_error)?
                    .next();
                match chain {
                    Some(chain) => each(mem.clone(), chain)?,
                    None => break,
                }
            }
            if !self.event_idx || !self.vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }
}

/// A snapshot of guest memory that stays mapped while a request uses it, even if the VMM
/// changes the memory table meanwhile.
pub type MemoryGuard = vm_memory::atomic::GuestMemoryLoadGuard<vm_memory::GuestMemoryMmap>;

/// A descriptor chain that owns its view of guest memory, so it can move to a worker thread.
pub type Chain = virtio_queue::DescriptorChain<MemoryGuard>;

fn complete(vring: &VringRwLock, index: usize, head: u16, len: u32) -> io::Result<()> {
    vring.add_used(head, len).map_err(queue_error)?;
    if vring.needs_notification().map_err(queue_error)? {
        vring.signal_used_queue().map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

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
