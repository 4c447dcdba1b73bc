//! The guest's running time: a clock that stops while the VM is paused.
//!
//! A guest measures its cache timeouts in its own time, and a paused VM's time stands still
//! (QEMU stops the guest's clocks on `stop`): a 1 s lease granted just before a 10 s pause
//! still has most of its second left after `cont`. A lease that must outlast the guest's trust
//! in its cache is therefore measured here, in time the guest ran, not in host time.
//!
//! The device ([`crate::device`]) tells the clock when the VMM stops every ring (QEMU 7.2's
//! `stop` makes vhost-user-fs send GET_VRING_BASE on each) and when it starts one again
//! (`cont` sets the rings up again). Readers are lock-free: a sequence counter guards the two
//! words a pause changes, and writers (the vhost-user thread, rarely) take a mutex.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A source of monotonic nanoseconds.
pub type TimeSource = Box<dyn Fn() -> u64 + Send + Sync>;

/// Time the guest has been running since the clock was made: host time minus pauses.
pub struct GuestClock {
    source: TimeSource,
    origin_ns: u64,
    /// Odd while a writer updates `paused_ns` and `paused_at`.
    seq: AtomicU64,
    /// Total length of the pauses that have ended.
    paused_ns: AtomicU64,
    /// Source time the current pause began, or [`RUNNING`].
    paused_at: AtomicU64,
    pauses: AtomicU64,
    writer: Mutex<()>,
}

const RUNNING: u64 = u64::MAX;

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for GuestClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClock")
            .field("running_ns", &self.running_ns())
            .field("paused_since", &self.paused_since())
            .finish()
    }
}

impl GuestClock {
    /// A running clock on the host's monotonic clock.
    pub fn new() -> Self {
        let epoch = monotonic_ns();
        Self::with_source(move || monotonic_ns().saturating_sub(epoch).min(u64::MAX - 1))
    }

    /// A running clock reading `source` (monotonic nanoseconds; tests pass a fake).
    pub fn with_source(source: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        let origin_ns = source();
        GuestClock {
            source: Box::new(source),
            origin_ns,
            seq: AtomicU64::new(0),
            paused_ns: AtomicU64::new(0),
            paused_at: AtomicU64::new(RUNNING),
            pauses: AtomicU64::new(0),
            writer: Mutex::new(()),
        }
    }

    /// The source's time now, in the time base of [`GuestClock::paused_since`].
    pub fn now_ns(&self) -> u64 {
        (self.source)()
    }

    /// Nanoseconds the guest has been running since the clock was made (pauses excluded).
    /// Never decreases; stands still while paused.
    pub fn running_ns(&self) -> u64 {
        self.running_and_now_ns().0
    }

    /// [`GuestClock::running_ns`] and the source time it was computed at
    /// ([`GuestClock::now_ns`]), from one read of the source.
    pub fn running_and_now_ns(&self) -> (u64, u64) {
        // The time is read inside the snapshot: a pause or resume that overlaps it makes the
        // reader look again, so no reader counts time a concurrent pause then leaves out.
        let (paused_ns, paused_at, now) = self.snapshot_at(true);
        let end = if paused_at == RUNNING { now } else { paused_at };
        (
            end.saturating_sub(self.origin_ns).saturating_sub(paused_ns),
            now,
        )
    }

    /// [`GuestClock::running_ns`] as a duration.
    pub fn running(&self) -> Duration {
        Duration::from_nanos(self.running_ns())
    }

    /// Whether the VMM has stopped every ring (the VM is paused, or the driver is gone).
    pub fn is_paused(&self) -> bool {
        self.snapshot().1 != RUNNING
    }

    /// When the current pause began, in source time ([`GuestClock::now_ns`]); `None` while
    /// running.
    pub fn paused_since(&self) -> Option<u64> {
        let at = self.snapshot().1;
        (at != RUNNING).then_some(at)
    }

    /// How long the current pause has lasted so far; `None` while running.
    pub fn paused_for(&self) -> Option<Duration> {
        self.paused_since()
            .map(|at| Duration::from_nanos(self.now_ns().saturating_sub(at)))
    }

    /// Pauses so far (ended or not).
    pub fn pauses(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// The guest stopped running (idempotent).
    pub fn pause(&self) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.paused_at.load(Ordering::Relaxed) != RUNNING {
            return;
        }
        self.write(|now| self.paused_at.store(now.min(RUNNING - 1), Ordering::SeqCst));
        self.pauses.fetch_add(1, Ordering::Relaxed);
    }

    /// The guest runs again (idempotent).
    pub fn resume(&self) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let at = self.paused_at.load(Ordering::Relaxed);
        if at == RUNNING {
            return;
        }
        self.write(|now| {
            self.paused_ns
                .fetch_add(now.saturating_sub(at), Ordering::SeqCst);
            self.paused_at.store(RUNNING, Ordering::SeqCst);
        });
    }

    /// Run `update` as the one writer, with the sequence odd meanwhile; it gets the time,
    /// read once the sequence is odd, so a reader that read an earlier time finds the
    /// sequence unchanged and counted nothing the update changes.
    fn write(&self, update: impl FnOnce(u64)) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        update(self.now_ns());
        self.seq.fetch_add(1, Ordering::SeqCst);
    }

    /// `(paused_ns, paused_at)`, read consistently.
    fn snapshot(&self) -> (u64, u64) {
        let (paused_ns, paused_at, _) = self.snapshot_at(false);
        (paused_ns, paused_at)
    }

    /// `(paused_ns, paused_at, now)`, read consistently (`now` is 0 unless `with_time`).
    fn snapshot_at(&self, with_time: bool) -> (u64, u64, u64) {
        loop {
            let before = self.seq.load(Ordering::SeqCst);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let paused_ns = self.paused_ns.load(Ordering::SeqCst);
            let paused_at = self.paused_at.load(Ordering::SeqCst);
            let now = if with_time { self.now_ns() } else { 0 };
            if self.seq.load(Ordering::SeqCst) == before {
                return (paused_ns, paused_at, now);
            }
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` reads on Linux, read directly because
/// every lease grant reads it (`Instant::elapsed` costs about three times as many
/// instructions for the same value).
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::time::Instant;

    /// The host clock counts what `Instant` counts.
    #[test]
    fn the_host_clock_keeps_pace_with_instant() {
        let clock = GuestClock::new();
        // The clock's interval lies inside Instant's (read first, read last), so a preemption
        // between the two reads cannot make the clock look faster.
        let begun = Instant::now();
        let start = clock.running_ns();
        std::thread::sleep(Duration::from_millis(20));
        let ran = clock.running_ns() - start;
        let elapsed = begun.elapsed();
        assert!(ran >= 20_000_000, "{ran} ns");
        assert!(
            ran <= elapsed.as_nanos() as u64 + 1_000_000,
            "{ran} ns, {elapsed:?}"
        );
    }

    fn fake(start: u64) -> (Arc<AtomicU64>, GuestClock) {
        let now = Arc::new(AtomicU64::new(start));
        let n = now.clone();
        (
            now,
            GuestClock::with_source(move || n.load(Ordering::SeqCst)),
        )
    }

    #[test]
    fn runs_from_creation_and_stands_still_while_paused() {
        let (now, clock) = fake(1_000);
        assert_eq!(clock.running_ns(), 0);
        assert!(!clock.is_paused());
        assert_eq!(clock.paused_since(), None);
        now.store(1_500, Ordering::SeqCst);
        assert_eq!(clock.running_ns(), 500);

        clock.pause();
        assert!(clock.is_paused());
        assert_eq!(clock.paused_since(), Some(1_500));
        now.store(9_500, Ordering::SeqCst);
        assert_eq!(clock.running_ns(), 500, "paused time does not count");
        assert_eq!(clock.paused_for(), Some(Duration::from_nanos(8_000)));

        clock.resume();
        assert!(!clock.is_paused());
        assert_eq!(clock.running_ns(), 500);
        now.store(9_700, Ordering::SeqCst);
        assert_eq!(clock.running_ns(), 700);
        assert_eq!(clock.pauses(), 1);
    }

    #[test]
    fn pause_and_resume_are_idempotent_and_pauses_add_up() {
        let (now, clock) = fake(0);
        clock.resume(); // Not paused: nothing to end.
        now.store(100, Ordering::SeqCst);
        clock.pause();
        now.store(200, Ordering::SeqCst);
        clock.pause(); // Already paused: the pause still began at 100.
        assert_eq!(clock.paused_since(), Some(100));
        now.store(300, Ordering::SeqCst);
        clock.resume();
        clock.resume();
        now.store(400, Ordering::SeqCst);
        assert_eq!(clock.running_ns(), 200);
        clock.pause();
        now.store(1_400, Ordering::SeqCst);
        clock.resume();
        now.store(1_450, Ordering::SeqCst);
        assert_eq!(clock.running_ns(), 250);
        assert_eq!(clock.pauses(), 2);
    }

    #[test]
    fn readers_never_see_time_go_backwards_while_a_writer_pauses_and_resumes() {
        let clock = Arc::new(GuestClock::new());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (clock, stop) = (clock.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut last = 0;
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Relaxed) || reads == 0 {
                        let t = clock.running_ns();
                        assert!(t >= last, "running time went back from {last} to {t}");
                        last = t;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        let began = Instant::now();
        while began.elapsed() < Duration::from_millis(200) {
            clock.pause();
            clock.resume();
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }

    #[test]
    fn is_cheap_to_share() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<GuestClock>();
    }
}
