//! Adaptive busy-polling of a request queue, after QEMU's iothread polling (`poll-max-ns`).
//!
//! A request on an idle queue costs two thread wake-ups: the driver's kick wakes the queue
//! thread, the used-ring signal wakes the driver. On a small host those wake-ups are most of
//! a request's time (docs/performance.md measures about 50 µs per request, of which the
//! daemon's own work is a few µs). When the driver sends its next request soon after the
//! last reply, as a guest issuing synchronous system calls does, the queue thread can watch
//! the avail ring for a few µs instead of sleeping: the request is taken without a kick (the
//! driver is told not to send one while notifications are off) and without a wake-up.
//!
//! Polling costs CPU, so the window adapts to how soon requests actually come, per queue,
//! as QEMU's does: it starts at 0 (a queue sleeps at once), grows (4 µs, then doubling) while
//! the next request keeps arriving within `max` of the last pass, and halves each time one
//! arrives later than `max`, down to 0. An idle or slow guest therefore stops costing polling
//! after a few requests (at most about 2 × `max` of spinning in all), and a queue never spins
//! for longer than `max` without finding work.
//!
//! The default `max` (`--queue-poll-us`, 64 µs) is twice QEMU's 32 µs: the window opens only
//! when a request comes within `max` of the last pass, and a round trip through two sleeping
//! threads takes 50 to 60 µs on the 2-vCPU machine the benchmarks run on (once the queue
//! polls, it drops to about 16 µs), so 32 µs seldom opens there. docs/performance.md has the
//! measurements.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::coherence::guest_clock::monotonic_ns;

/// The window a queue polls when it first finds polling worth it.
const FIRST_WINDOW_NS: u64 = 4_000;

/// One queue's polling state. Only that queue's thread touches it (atomics only to be `Sync`
/// inside the device).
#[derive(Debug)]
pub struct PollWindow {
    max_ns: u64,
    window_ns: AtomicU64,
    /// When the last pass started polling (or went to sleep, with a window of 0); 0 before
    /// the first pass.
    idle_since_ns: AtomicU64,
}

impl PollWindow {
    /// A window of at most `max` (zero: never poll).
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max_ns: max.as_nanos().min(u64::MAX as u128) as u64,
            window_ns: AtomicU64::new(0),
            idle_since_ns: AtomicU64::new(0),
        }
    }

    /// Whether this queue may poll at all.
    pub fn enabled(&self) -> bool {
        self.max_ns != 0
    }

    /// The queue was woken by a kick: adjust the window to the time since the last pass ran
    /// out of work.
    pub fn woken(&self) {
        if self.enabled() {
            self.woken_at(monotonic_ns());
        }
    }

    fn woken_at(&self, now_ns: u64) {
        let since = self.idle_since_ns.load(Ordering::Relaxed);
        if since == 0 {
            return;
        }
        let waited = now_ns.saturating_sub(since);
        let window = self.window_ns.load(Ordering::Relaxed);
        self.window_ns
            .store(next_window(window, waited, self.max_ns), Ordering::Relaxed);
    }

    /// Poll with `ready` (whether a request is available) for the current window; whether one
    /// came. Records the time the queue ran out of work, for [`PollWindow::woken`].
    pub fn poll(&self, mut ready: impl FnMut() -> bool) -> bool {
        if !self.enabled() {
            return false;
        }
        let start = monotonic_ns();
        self.idle_since_ns.store(start, Ordering::Relaxed);
        let window = self.window_ns.load(Ordering::Relaxed);
        if window == 0 {
            return false;
        }
        let deadline = start.saturating_add(window);
        loop {
            if ready() {
                return true;
            }
            if monotonic_ns() >= deadline {
                return false;
            }
            // Give the CPU to anything else runnable on it (the guest's vCPU or the driver
            // thread whose next request we wait for): polling must cost only otherwise idle
            // time. With nothing else to run, sched_yield returns at once.
            std::thread::yield_now();
        }
    }

    /// The current window, for tests and metrics.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }
}

/// The window after a pass whose next request came `waited` ns after the queue ran out of
/// work: unchanged when the window caught it; halved when it came later than `max_ns` (0 once
/// below the first window), so one late request among quick ones does not close the window
/// while a pause closes it within a few requests; else grown towards `max_ns` (QEMU's
/// `adjust_polling_time` with a grow factor of 2 and a shrink factor of 2).
fn next_window(window: u64, waited: u64, max_ns: u64) -> u64 {
    if waited <= window {
        window
    } else if waited > max_ns {
        match window / 2 {
            half if half < FIRST_WINDOW_NS => 0,
            half => half,
        }
    } else if window == 0 {
        FIRST_WINDOW_NS.min(max_ns)
    } else {
        window.saturating_mul(2).min(max_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 32_768;

    #[test]
    fn window_grows_while_requests_come_within_max_and_stops_at_max() {
        let mut w = 0;
        let mut seen = vec![];
        for _ in 0..6 {
            w = next_window(w, 20_000, MAX);
            seen.push(w);
        }
        assert_eq!(seen, [4_000, 8_000, 16_000, 32_000, 32_000, 32_000]);
        // Once it catches requests, the window stays.
        assert_eq!(next_window(32_000, 25_000, MAX), 32_000);
    }

    #[test]
    fn window_shrinks_when_requests_come_later_than_max_and_closes() {
        let mut w = MAX;
        let mut seen = vec![];
        while w != 0 {
            w = next_window(w, MAX + 1, MAX);
            seen.push(w);
        }
        assert_eq!(seen, [16_384, 8_192, 4_096, 0]);
        assert_eq!(next_window(0, 1_000_000, MAX), 0);
        assert_eq!(next_window(4_000, 5_000, MAX), 8_000);
        // Never above the maximum, however small.
        assert_eq!(next_window(0, 1_000, 2_000), 2_000);
    }

    #[test]
    fn a_disabled_window_never_polls_and_never_grows() {
        let w = PollWindow::new(Duration::ZERO);
        assert!(!w.enabled());
        let mut calls = 0;
        assert!(!w.poll(|| {
            calls += 1;
            true
        }));
        assert_eq!(calls, 0);
        w.woken();
        assert_eq!(w.window(), Duration::ZERO);
    }

    #[test]
    fn an_idle_queue_sleeps_at_once_and_a_busy_one_polls() {
        let w = PollWindow::new(Duration::from_nanos(MAX));
        // First pass: window 0, ready is never asked.
        let mut asked = 0;
        assert!(!w.poll(|| {
            asked += 1;
            true
        }));
        assert_eq!(asked, 0);
        // A request 10 µs after the pass ended: the window opens.
        let since = w.idle_since_ns.load(Ordering::Relaxed);
        w.woken_at(since + 10_000);
        assert_eq!(w.window(), Duration::from_nanos(FIRST_WINDOW_NS));
        // Now it polls, and finds a request made available on the third look. The deadline
        // is widened for this look only: a 4 µs window can pass between two looks when the
        // test thread is preempted (a loaded machine), which is not what this checks.
        w.window_ns.store(60_000_000_000, Ordering::Relaxed);
        let mut looks = 0;
        assert!(w.poll(|| {
            looks += 1;
            looks == 3
        }));
        assert_eq!(looks, 3);
        w.window_ns.store(FIRST_WINDOW_NS, Ordering::Relaxed);
        // A pause of a second: the window below its first size, so sleeping at once.
        let since = w.idle_since_ns.load(Ordering::Relaxed);
        w.woken_at(since + 1_000_000_000);
        assert_eq!(w.window(), Duration::ZERO);
    }

    #[test]
    fn polling_gives_up_after_its_window() {
        let w = PollWindow::new(Duration::from_millis(5));
        w.window_ns.store(2_000_000, Ordering::Relaxed);
        let start = std::time::Instant::now();
        assert!(!w.poll(|| false));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(2), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}
