//! The driver side of one split virtqueue, laid out in guest memory.
//!
//! ```text
//!  ring area (page aligned)                         arena
//!  ┌──────────────┬────────────┬────────────┐      ┌──────────────────────────────┐
//!  │ descriptors  │ avail ring │ used ring  │      │ request / reply buffers      │
//!  │ 16 × size    │ 6 + 2×size │ 6 + 8×size │      │ (first-fit, see memory.rs)   │
//!  └──────────────┴────────────┴────────────┘      └──────────────────────────────┘
//! ```
//!
//! Submitting a chain takes descriptors from a free list, writes them, puts the head in the
//! avail ring, publishes the new avail index (release ordering) and kicks the queue's
//! eventfd. Completions are harvested from the used ring into a map keyed by head, so several
//! threads can share a queue and each waits for its own chain: one waiter at a time sleeps in
//! `poll(2)` on the call eventfd (the "poller"), the others on a condition variable that the
//! poller signals after each harvest. A returned chain's descriptors stay reserved until its
//! waiter claims the completion, so a head is never reused while its completion is pending.
//!
//! With VIRTIO_RING_F_EVENT_IDX negotiated ([`Virtqueue::set_event_idx`], what QEMU and Linux
//! do), the queue behaves like the Linux driver: it kicks only when the device's `avail_event`
//! asks for it (`vring_need_event`), and after every harvest it publishes `used_event` = the
//! next used entry it has not seen, re-checking the used index afterwards so a completion that
//! raced with the update is never slept through. Without it we kick after every submission.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{Arena, Buffer, GuestRam};

/// `VIRTQ_DESC_F_NEXT`: the `next` field is valid.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer holds a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Bytes of guest memory the rings of a queue of `size` entries take, page aligned.
pub fn ring_bytes(size: u16) -> u64 {
    let page = |n: u64| n.div_ceil(4096) * 4096;
    let size = size as u64;
    page(16 * size) + page(6 + 2 * size) + page(6 + 8 * size)
}

/// One buffer of a well-formed chain.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (a reply buffer).
    pub writable: bool,
}

impl Segment {
    pub fn readable(buf: Buffer) -> Self {
        Segment {
            addr: buf.addr,
            len: buf.len,
            writable: false,
        }
    }

    pub fn writable(buf: Buffer) -> Self {
        Segment {
            addr: buf.addr,
            len: buf.len,
            writable: true,
        }
    }
}

/// Where a raw descriptor's `next` field points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// `next` = 0 (the caller decides whether `DESC_F_NEXT` is set anyway).
    Zero,
    /// The descriptor at this position of the same raw chain (so loops can be built).
    Position(usize),
    /// This descriptor table index, verbatim (may be out of range).
    Index(u16),
}

/// A descriptor written exactly as given: for tests that abuse the device.
#[derive(Debug, Clone, Copy)]
pub struct RawDescriptor {
    pub addr: u64,
    pub len: u32,
    /// Written verbatim; `DESC_F_NEXT` is not added for you.
    pub flags: u16,
    pub next: Next,
}

/// Why waiting for a chain failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The device did not return the chain in time. Its descriptors stay reserved (the
    /// device may still use them) and its buffers must not be reused.
    Timeout,
    /// No such chain is in flight.
    Unknown,
}

/// Descriptors and buffers of one chain the device owns.
#[derive(Debug)]
struct InFlight {
    descriptors: Vec<u16>,
}

struct State {
    free_descriptors: Vec<u16>,
    /// Our copy of `avail->idx`.
    avail_idx: u16,
    /// Used ring entries consumed so far.
    last_used: u16,
    /// Indexed by head.
    in_flight: Vec<Option<InFlight>>,
    /// Harvested but not yet claimed: head → used length and the chain's descriptors.
    /// Completed chains by head: used length, descriptors, and position in the used ring
    /// (so they can be claimed in the order the device completed them).
    completed: HashMap<u16, (u32, InFlight, u64)>,
    completions_seen: u64,
    /// Used entries naming a head we never submitted (a misbehaving device).
    bogus_used: u64,
    arena: Arena,
    /// Whether some waiter is sleeping on the call eventfd.
    polling: bool,
}

/// A split virtqueue from the driver's side.
pub struct Virtqueue {
    index: usize,
    size: u16,
    ram: Arc<GuestRam>,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    kick: EventFd,
    call: EventFd,
    state: Mutex<State>,
    harvested: Condvar,
    /// How long a waiter busy-polls the used ring before sleeping on the call eventfd, in ns.
    spin_ns: AtomicU64,
    /// VIRTIO_RING_F_EVENT_IDX negotiated: honour `avail_event`, publish `used_event`.
    event_idx: AtomicBool,
    /// Kicks written, and kicks `avail_event` told us to leave out.
    kicks: AtomicU64,
    kicks_suppressed: AtomicU64,
    /// Signals (interrupts) the device wrote to the call eventfd that we have read.
    signals: AtomicU64,
}

/// `vring_need_event()` of the virtio spec: whether moving an index from `old` to `new`
/// crosses `event` (the other side asked to be told when entry `event` is made).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Virtqueue {
    /// A queue of `size` entries whose rings start at `ring_area` (page aligned, at least
    /// [`ring_bytes`] long) and whose buffers come from `arena`.
    pub fn new(
        index: usize,
        size: u16,
        ram: Arc<GuestRam>,
        ring_area: u64,
        arena: Arena,
    ) -> io::Result<Self> {
        assert!(size.is_power_of_two(), "queue size must be a power of two");
        let page = |n: u64| n.div_ceil(4096) * 4096;
        let desc_table = ring_area;
        let avail_ring = desc_table + page(16 * size as u64);
        let used_ring = avail_ring + page(6 + 2 * size as u64);
        // Start from zeroed rings (a reused memory area must not leak old indices).
        ram.write(ring_area, &vec![0u8; ring_bytes(size) as usize])?;
        Ok(Virtqueue {
            index,
            size,
            ram,
            desc_table,
            avail_ring,
            used_ring,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::new(State {
                free_descriptors: (0..size).rev().collect(),
                avail_idx: 0,
                last_used: 0,
                in_flight: (0..size).map(|_| None).collect(),
                completed: HashMap::new(),
                completions_seen: 0,
                bogus_used: 0,
                arena,
                polling: false,
            }),
            harvested: Condvar::new(),
            spin_ns: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            kicks: AtomicU64::new(0),
            kicks_suppressed: AtomicU64::new(0),
            signals: AtomicU64::new(0),
        })
    }

    /// Drive the queue with VIRTIO_RING_F_EVENT_IDX semantics (set once negotiated, before
    /// the first submission).
    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }

    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::SeqCst)
    }

    /// Kicks written to the device so far, and kicks left out because `avail_event` did not
    /// ask for them.
    pub fn kick_counts(&self) -> (u64, u64) {
        (
            self.kicks.load(Ordering::Relaxed),
            self.kicks_suppressed.load(Ordering::Relaxed),
        )
    }

    /// Signals the device has sent on the call eventfd so far (each eventfd write counts once,
    /// as an interrupt would; signals not read yet are read now).
    pub fn signals_received(&self) -> u64 {
        self.count_signals();
        self.signals.load(Ordering::Relaxed)
    }

    /// Read the call eventfd without waiting, counting what it held.
    fn count_signals(&self) {
        if let Ok(n) = self.call.read() {
            self.signals.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Forget everything in flight and start from zeroed rings, as a freshly loaded driver
    /// does after a device reset (buffers of the arena stay as they are).
    pub fn reset_rings(&self) -> io::Result<()> {
        let mut state = self.lock();
        self.ram
            .write(self.desc_table, &vec![0u8; ring_bytes(self.size) as usize])?;
        state.free_descriptors = (0..self.size).rev().collect();
        state.avail_idx = 0;
        state.last_used = 0;
        state.in_flight.iter_mut().for_each(|f| *f = None);
        state.completed.clear();
        Ok(())
    }

    pub fn index(&self) -> usize {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Busy-poll the used ring for up to `spin` before sleeping on the call eventfd (0, the
    /// default, sleeps at once). Spinning trades a CPU for wake-up latency, like a guest
    /// polling its virtqueue; benchmarks use it to take scheduler wake-ups out of the numbers.
    pub fn set_spin(&self, spin: Duration) {
        self.spin_ns.store(
            spin.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Guest physical addresses of the descriptor table, avail ring and used ring.
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        (self.desc_table, self.avail_ring, self.used_ring)
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// A buffer from this queue's arena.
    pub fn alloc(&self, len: u32) -> Option<Buffer> {
        self.lock().arena.alloc(len)
    }

    pub fn free(&self, buf: Buffer) {
        self.lock().arena.free(buf)
    }

    /// Free descriptors left (a queue's worth minus what is in flight or lost).
    pub fn free_descriptors(&self) -> usize {
        self.lock().free_descriptors.len()
    }

    /// Used entries that named chains we never submitted.
    pub fn bogus_used(&self) -> u64 {
        self.lock().bogus_used
    }

    /// Bytes free in this queue's arena.
    pub fn arena_free_bytes(&self) -> u64 {
        self.lock().arena.free_bytes()
    }

    /// Make a well-formed chain available to the device and kick it; returns its head.
    pub fn submit(&self, segments: &[Segment]) -> io::Result<u16> {
        let raw: Vec<RawDescriptor> = segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let last = i + 1 == segments.len();
                RawDescriptor {
                    addr: s.addr,
                    len: s.len,
                    flags: if s.writable { DESC_F_WRITE } else { 0 }
                        | if last { 0 } else { DESC_F_NEXT },
                    next: if last {
                        Next::Zero
                    } else {
                        Next::Position(i + 1)
                    },
                }
            })
            .collect();
        self.submit_raw(&raw)
    }

    /// Write `descriptors` into free table slots exactly as given (the first is the head),
    /// make the head available and kick.
    pub fn submit_raw(&self, descriptors: &[RawDescriptor]) -> io::Result<u16> {
        if descriptors.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty chain"));
        }
        let mut state = self.lock();
        if state.free_descriptors.len() < descriptors.len() {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("queue {}: no free descriptors", self.index),
            ));
        }
        let at = state.free_descriptors.len() - descriptors.len();
        let slots: Vec<u16> = state.free_descriptors.drain(at..).rev().collect();
        for (d, &slot) in descriptors.iter().zip(&slots) {
            let next = match d.next {
                Next::Zero => 0,
                Next::Position(p) => *slots.get(p).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "next position out of chain")
                })?,
                Next::Index(i) => i,
            };
            let mut bytes = [0u8; 16];
            bytes[0..8].copy_from_slice(&d.addr.to_le_bytes());
            bytes[8..12].copy_from_slice(&d.len.to_le_bytes());
            bytes[12..14].copy_from_slice(&d.flags.to_le_bytes());
            bytes[14..16].copy_from_slice(&next.to_le_bytes());
            self.ram.write(self.desc_table + 16 * slot as u64, &bytes)?;
        }
        let head = slots[0];
        state.in_flight[head as usize] = Some(InFlight { descriptors: slots });
        let old = state.avail_idx;
        self.publish(&mut state, &[head])?;
        drop(state);
        self.kick_if_needed(old)?;
        Ok(head)
    }

    /// Make several well-formed chains available at once and decide once whether to kick,
    /// as the Linux driver does when it refills a queue (`virtqueue_add_*` then
    /// `virtqueue_kick_prepare`). Returns the heads, in order.
    pub fn submit_many(&self, chains: &[&[Segment]]) -> io::Result<Vec<u16>> {
        let mut state = self.lock();
        let needed: usize = chains.iter().map(|c| c.len()).sum();
        if chains.iter().any(|c| c.is_empty()) || state.free_descriptors.len() < needed {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("queue {}: no free descriptors", self.index),
            ));
        }
        let mut heads = Vec::with_capacity(chains.len());
        for chain in chains {
            let at = state.free_descriptors.len() - chain.len();
            let slots: Vec<u16> = state.free_descriptors.drain(at..).rev().collect();
            for (i, (seg, &slot)) in chain.iter().zip(&slots).enumerate() {
                let last = i + 1 == chain.len();
                let flags = if seg.writable { DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { DESC_F_NEXT };
                let next = if last { 0 } else { slots[i + 1] };
                let mut bytes = [0u8; 16];
                bytes[0..8].copy_from_slice(&seg.addr.to_le_bytes());
                bytes[8..12].copy_from_slice(&seg.len.to_le_bytes());
                bytes[12..14].copy_from_slice(&flags.to_le_bytes());
                bytes[14..16].copy_from_slice(&next.to_le_bytes());
                self.ram.write(self.desc_table + 16 * slot as u64, &bytes)?;
            }
            let head = slots[0];
            heads.push(head);
            state.in_flight[head as usize] = Some(InFlight { descriptors: slots });
        }
        let old = state.avail_idx;
        self.publish(&mut state, &heads)?;
        drop(state);
        self.kick_if_needed(old)?;
        Ok(heads)
    }

    /// Put `heads` in the avail ring and publish the new index.
    fn publish(&self, state: &mut State, heads: &[u16]) -> io::Result<()> {
        for head in heads {
            let ring_slot = (state.avail_idx % self.size) as u64;
            self.ram
                .write(self.avail_ring + 4 + 2 * ring_slot, &head.to_le_bytes())?;
            state.avail_idx = state.avail_idx.wrapping_add(1);
        }
        // The descriptors and ring entries must be visible before the index that publishes
        // them.
        fence(Ordering::SeqCst);
        self.ram
            .mem()
            .store(
                state.avail_idx.to_le(),
                GuestAddress(self.avail_ring + 2),
                Ordering::Release,
            )
            .map_err(|e| io::Error::other(format!("publishing avail idx: {e}")))
    }

    /// Kick after the avail index moved on from `old`, unless EVENT_IDX is on and the
    /// device's `avail_event` does not ask for it.
    fn kick_if_needed(&self, old: u16) -> io::Result<()> {
        // The new index must be visible before we read what the device asked for.
        fence(Ordering::SeqCst);
        if self.event_idx() {
            let new = self.lock().avail_idx;
            let event = self.load_u16(self.used_ring + 4 + 8 * self.size as u64)?;
            if !need_event(event, new, old) {
                self.kicks_suppressed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        self.kicks.fetch_add(1, Ordering::Relaxed);
        self.kick.write(1)
    }

    fn load_u16(&self, gpa: u64) -> io::Result<u16> {
        self.ram
            .mem()
            .load::<u16>(GuestAddress(gpa), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| io::Error::other(format!("reading guest memory at {gpa:#x}: {e}")))
    }

    /// Wait until the device returns chain `head`; returns the length it reported written.
    pub fn wait(&self, head: u16, timeout: Duration) -> Result<u32, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        if state
            .in_flight
            .get(head as usize)
            .is_none_or(|f| f.is_none())
            && !state.completed.contains_key(&head)
        {
            return Err(WaitError::Unknown);
        }
        loop {
            self.harvest(&mut state);
            if let Some((len, flight, _)) = state.completed.remove(&head) {
                state.free_descriptors.extend(flight.descriptors);
                return Ok(len);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout);
            }
            let slice = (deadline - now).min(Duration::from_millis(50));
            if state.polling {
                state = self
                    .harvested
                    .wait_timeout(state, slice)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            } else {
                state.polling = true;
                let seen = state.last_used;
                drop(state);
                let moved = self.load_u16(self.used_ring + 2).is_ok_and(|u| u != seen);
                if !moved && !self.spin_for_used(seen) {
                    self.sleep_on_call(slice);
                }
                state = self.lock();
                state.polling = false;
                // Let another waiter take over polling if this one is done.
                self.harvested.notify_all();
            }
        }
    }

    /// Harvest whatever the device has returned and hand back every completion nobody is
    /// waiting for by head (for callers that submit many chains and collect them in bulk).
    pub fn take_completions(&self) -> Vec<(u16, u32)> {
        let mut state = self.lock();
        self.harvest(&mut state);
        let mut done: Vec<(u16, (u32, InFlight, u64))> = state.completed.drain().collect();
        done.sort_by_key(|(_, (_, _, seq))| *seq);
        done.into_iter()
            .map(|(head, (len, flight, _))| {
                state.free_descriptors.extend(flight.descriptors);
                (head, len)
            })
            .collect()
    }

    /// Sleep until the device signals (or `timeout` passes), then clear the signal.
    pub fn sleep_on_call(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        self.count_signals();
    }

    /// Wait until the device has returned chains nobody has claimed yet (or `timeout`
    /// passes), sleeping on the call eventfd as a driver waits for its interrupt: with
    /// EVENT_IDX `used_event` is published first, so the device signals its next used entry.
    /// Whether completions are there to take ([`Virtqueue::take_completions`]).
    pub fn wait_for_completions(&self, timeout: Duration) -> bool {
        let mut state = self.lock();
        self.harvest(&mut state);
        if !state.completed.is_empty() {
            return true;
        }
        let seen = state.last_used;
        drop(state);
        if !self.spin_for_used(seen) {
            self.sleep_on_call(timeout);
        }
        let mut state = self.lock();
        self.harvest(&mut state);
        !state.completed.is_empty()
    }

    /// Busy-poll until the used index moves past `seen` or the spin time is up; whether it
    /// moved.
    fn spin_for_used(&self, seen: u16) -> bool {
        let spin = Duration::from_nanos(self.spin_ns.load(Ordering::Relaxed));
        if spin.is_zero() {
            return false;
        }
        let began = Instant::now();
        loop {
            let used = self
                .ram
                .mem()
                .load::<u16>(GuestAddress(self.used_ring + 2), Ordering::Acquire)
                .map(u16::from_le);
            if used.is_ok_and(|u| u != seen) {
                return true;
            }
            if began.elapsed() >= spin {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The device's used index as it is in guest memory now.
    pub fn used_idx(&self) -> io::Result<u16> {
        self.load_u16(self.used_ring + 2)
    }

    /// Chains in flight (submitted, not yet returned).
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight.iter().filter(|f| f.is_some()).count()
    }

    fn harvest(&self, state: &mut State) {
        let mut any = false;
        while let Ok(used_idx) = self.load_u16(self.used_ring + 2) {
            if state.last_used == used_idx {
                if !self.event_idx() {
                    break;
                }
                // Ask to be signalled for the next entry, then look again: an entry the
                // device added before it could see the new `used_event` raised no signal.
                let used_event = self.avail_ring + 4 + 2 * self.size as u64;
                if self
                    .ram
                    .mem()
                    .store(
                        state.last_used.to_le(),
                        GuestAddress(used_event),
                        Ordering::Release,
                    )
                    .is_err()
                {
                    break;
                }
                fence(Ordering::SeqCst);
                if self.load_u16(self.used_ring + 2).ok() == Some(used_idx) {
                    break;
                }
                continue;
            }
            if !self.harvest_to(state, used_idx, &mut any) {
                break;
            }
        }
        if any {
            self.harvested.notify_all();
        }
    }

    /// Consume used entries up to `used_idx`; false if the used ring could not be read.
    fn harvest_to(&self, state: &mut State, used_idx: u16, any: &mut bool) -> bool {
        while state.last_used != used_idx {
            let slot = (state.last_used % self.size) as u64;
            let mut elem = [0u8; 8];
            if self
                .ram
                .read(self.used_ring + 4 + 8 * slot, &mut elem)
                .is_err()
            {
                return false;
            }
            state.last_used = state.last_used.wrapping_add(1);
            let id = u32::from_le_bytes(elem[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(elem[4..8].try_into().unwrap());
            match state
                .in_flight
                .get_mut(id as usize)
                .and_then(|slot| slot.take())
            {
                Some(flight) => {
                    // The descriptors stay reserved until the completion is claimed, so the
                    // head cannot be reused (and its completion confused) meanwhile.
                    state.completions_seen += 1;
                    let seq = state.completions_seen;
                    state.completed.insert(id as u16, (len, flight, seq));
                    *any = true;
                }
                None => state.bogus_used += 1,
            }
        }
        true
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::memory::GUEST_BASE;

    /// Play the device by hand: read the avail ring, write the used ring.
    #[test]
    fn submit_then_complete_by_hand() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let rings = ring_bytes(8);
        let q = Virtqueue::new(
            3,
            8,
            ram.clone(),
            GUEST_BASE,
            Arena::new(GUEST_BASE + rings, 65536),
        )
        .unwrap();
        let a = q.alloc(10).unwrap();
        let b = q.alloc(20).unwrap();
        let head = q
            .submit(&[Segment::readable(a), Segment::writable(b)])
            .unwrap();
        assert_eq!(q.kick_fd().read().unwrap(), 1);
        let (desc, avail, used) = q.ring_addresses();
        let mut idx = [0u8; 2];
        ram.read(avail + 2, &mut idx).unwrap();
        assert_eq!(u16::from_le_bytes(idx), 1);
        let mut d = [0u8; 16];
        ram.read(desc + 16 * head as u64, &mut d).unwrap();
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), a.addr);
        assert_eq!(
            u16::from_le_bytes(d[12..14].try_into().unwrap()),
            DESC_F_NEXT
        );
        assert_eq!(q.free_descriptors(), 6);
        // Device returns it.
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&(head as u32).to_le_bytes());
        elem[4..8].copy_from_slice(&7u32.to_le_bytes());
        ram.write(used + 4, &elem).unwrap();
        ram.write(used + 2, &1u16.to_le_bytes()).unwrap();
        q.call_fd().write(1).unwrap();
        assert_eq!(q.wait(head, Duration::from_secs(1)), Ok(7));
        assert_eq!(q.free_descriptors(), 8);
        assert_eq!(
            q.wait(head, Duration::from_millis(1)),
            Err(WaitError::Unknown)
        );
    }
}
