//! Adaptive leases for stock guests: which inodes get no lease time for now because the host
//! is writing them or their neighbours. A pure state machine on a caller's clock (host
//! nanoseconds), so cool-downs, decay and bursts are unit-tested without sleeping.
//!
//! On a stock guest a host writer waits until the guest's lease on the file has run out (up
//! to one lease). That is cheap once, and ruinous for a host tool that writes many files the
//! guest keeps re-reading: each writer waits a full lease in turn, because the guest renewed
//! every other file's lease meanwhile. So a host write (a lease break, or a ctime change seen
//! while the file gets no lease) changes what the daemon grants, the way NFS clients shorten
//! their attribute cache for files that change, but driven by the host's real writes:
//!
//! * **The inode cools down.** It gets no lease time (the guest revalidates at every access,
//!   and the daemon takes no host lease, so later host writes are not held) for
//!   `cooldown` after the last write seen; a write soon after a cool-down ended (within one
//!   more period) doubles the period (up to `max_cooldown`); a quiet period as long as the
//!   cool-down after its end forgets the inode, which then gets full leases again.
//! * **Its directory stops renewing leases** for `burst_window`: host writes come in bursts
//!   (a formatter, a generator, `git checkout`, a build), and while the first writer waits,
//!   the leases of its neighbours run out instead of being renewed, so the next writers find
//!   nothing to wait for. Files in other directories keep their leases.
//! * **A burst across `burst_dirs` directories** within one window stops renewals share-wide
//!   for the window.
//!
//! Correctness does not depend on any of this: a lease is only ever shortened or withheld,
//! never extended, so the guarantee (docs/coherency.md) holds whatever the parameters.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// The parameters, from the command line (`--lease-cooldown`, `--lease-cooldown-max`,
/// `--lease-burst-window`, `--lease-burst-dirs`).
#[derive(Clone, Copy, Debug)]
pub struct AdaptiveConfig {
    /// First cool-down of an inode the host wrote. Default 2 s: two stock leases, so a file
    /// written twice within a lease of each other stays cooled.
    pub cooldown: Duration,
    /// Longest cool-down. Default 60 s: a file written all the time (a log) stays cooled
    /// while it is, and a file written once a minute costs at most one hold a minute.
    pub max_cooldown: Duration,
    /// How long a host write stops lease renewal in its directory (and the share, for a
    /// burst). Default 2 s: longer than one lease plus margin, so every lease granted before
    /// the burst has run out before the window ends.
    pub burst_window: Duration,
    /// Directories written within one window that make a burst share-wide. Default 3.
    pub burst_dirs: usize,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(60),
            burst_window: Duration::from_secs(2),
            burst_dirs: 3,
        }
    }
}

/// One inode the host wrote.
#[derive(Clone, Copy, Debug)]
struct Cooling {
    /// End of the cool-down (host ns).
    until_ns: u64,
    /// The current cool-down period (ns): doubles with each write that comes soon.
    period_ns: u64,
    /// The ctime seen at the last grant, to notice host writes while no host lease is held.
    ctime_ns: i64,
}

/// Why a grant got no lease time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withheld {
    Inode,
    Directory,
    Share,
}

/// Counters for the metrics line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptiveCounts {
    /// Inodes and directories in cool-down now, and whether the share is.
    pub inodes: usize,
    pub dirs: usize,
    pub share: bool,
}

/// The cool-down state of one lease table.
#[derive(Debug)]
pub struct Adaptive {
    cfg: AdaptiveConfig,
    inodes: HashMap<u64, Cooling>,
    /// Directory node -> end of its renewal stop (host ns).
    dirs: HashMap<u64, u64>,
    /// End of the share-wide renewal stop (host ns); 0: none.
    share_until_ns: u64,
    /// Recent (time, directory) of host writes, for share-wide bursts.
    recent: VecDeque<(u64, u64)>,
    /// No deadline of any entry is later than this: from then on [`Adaptive::withheld`]
    /// answers `None` for every inode and changes nothing that matters, so callers may skip it
    /// (and the lock around it) on a clock check. Only moves forward.
    busy_until_ns: u64,
}

impl Adaptive {
    pub fn new(cfg: AdaptiveConfig) -> Self {
        Adaptive {
            cfg,
            inodes: HashMap::new(),
            dirs: HashMap::new(),
            share_until_ns: 0,
            recent: VecDeque::new(),
            busy_until_ns: 0,
        }
    }

    pub fn config(&self) -> AdaptiveConfig {
        self.cfg
    }

    /// The host wrote (or is about to write) inode `node`, whose names are in directories
    /// `parents`, at `now_ns`.
    pub fn host_wrote(&mut self, node: u64, parents: &[u64], now_ns: u64) {
        let base = self.cfg.cooldown.as_nanos() as u64;
        let max = (self.cfg.max_cooldown.as_nanos() as u64).max(base);
        let entry = self.inodes.entry(node).or_insert(Cooling {
            until_ns: 0,
            period_ns: 0,
            ctime_ns: 0,
        });
        // During a cool-down: it goes on from this write. Soon after one (within one more
        // period): the host writes this file often, cool it twice as long. Later: start
        // again from the base.
        entry.period_ns = if entry.period_ns == 0 {
            base
        } else if now_ns < entry.until_ns {
            entry.period_ns
        } else if now_ns <= entry.until_ns.saturating_add(entry.period_ns) {
            entry.period_ns.saturating_mul(2).min(max)
        } else {
            base
        };
        entry.until_ns = entry.until_ns.max(now_ns.saturating_add(entry.period_ns));
        // The inode's ctime is watched for one more period after its cool-down.
        let remembered_until = entry.until_ns.saturating_add(entry.period_ns);
        self.busy_until_ns = self.busy_until_ns.max(remembered_until);

        let window = self.cfg.burst_window.as_nanos() as u64;
        for &dir in parents {
            let until = self.dirs.entry(dir).or_default();
            *until = (*until).max(now_ns.saturating_add(window));
            self.busy_until_ns = self.busy_until_ns.max(*until);
            self.recent.push_back((now_ns, dir));
        }
        while self
            .recent
            .front()
            .is_some_and(|&(at, _)| at.saturating_add(window) < now_ns)
        {
            self.recent.pop_front();
        }
        let mut dirs: Vec<u64> = self.recent.iter().map(|&(_, d)| d).collect();
        dirs.sort_unstable();
        dirs.dedup();
        if dirs.len() >= self.cfg.burst_dirs.max(1) {
            self.share_until_ns = self.share_until_ns.max(now_ns.saturating_add(window));
            self.busy_until_ns = self.busy_until_ns.max(self.share_until_ns);
        }
    }

    /// Whether a grant for inode `node` (names in `parents`, ctime `ctime_ns` now) may give
    /// lease time at `now_ns`; why not otherwise. A ctime that moved while the inode was
    /// cooling is a host write the daemon had no lease to see: it counts as one.
    pub fn withheld(
        &mut self,
        node: u64,
        parents: &[u64],
        ctime_ns: i64,
        now_ns: u64,
    ) -> Option<Withheld> {
        if let Some(c) = self.inodes.get_mut(&node) {
            let moved = c.ctime_ns != 0 && c.ctime_ns != ctime_ns;
            c.ctime_ns = ctime_ns;
            if moved && now_ns < c.until_ns.saturating_add(c.period_ns) {
                self.host_wrote(node, parents, now_ns);
            }
        }
        match self.inodes.get(&node) {
            Some(c) if now_ns < c.until_ns => return Some(Withheld::Inode),
            Some(c) if now_ns >= c.until_ns.saturating_add(c.period_ns) => {
                // Quiet for a whole period after the cool-down: forget it.
                self.inodes.remove(&node);
            }
            _ => {}
        }
        if parents
            .iter()
            .any(|d| self.dirs.get(d).is_some_and(|&until| now_ns < until))
        {
            return Some(Withheld::Directory);
        }
        if now_ns < self.share_until_ns {
            return Some(Withheld::Share);
        }
        None
    }

    /// Host time from which nothing is cooling or remembered (see `busy_until_ns`).
    pub fn busy_until(&self) -> u64 {
        self.busy_until_ns
    }

    /// Forget what is over at `now_ns` (bounded memory: entries live at most two periods or
    /// one window past the last write).
    pub fn expire(&mut self, now_ns: u64) {
        self.inodes
            .retain(|_, c| now_ns < c.until_ns.saturating_add(c.period_ns));
        self.dirs.retain(|_, &mut until| now_ns < until);
    }

    /// The guest forgot `node`.
    pub fn forget(&mut self, node: u64) {
        // Both are empty unless something cools down: look before hashing (every FORGET
        // that drops a node comes here).
        if !self.inodes.is_empty() {
            self.inodes.remove(&node);
        }
        if !self.dirs.is_empty() {
            self.dirs.remove(&node);
        }
    }

    pub fn counts(&self, now_ns: u64) -> AdaptiveCounts {
        AdaptiveCounts {
            inodes: self.inodes.values().filter(|c| now_ns < c.until_ns).count(),
            dirs: self.dirs.values().filter(|&&u| now_ns < u).count(),
            share: now_ns < self.share_until_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn adaptive() -> Adaptive {
        Adaptive::new(AdaptiveConfig::default())
    }

    #[test]
    fn an_inode_the_host_wrote_cools_down_then_gets_leases_again() {
        let mut a = adaptive();
        assert_eq!(a.withheld(7, &[1], 100, 0), None);
        a.host_wrote(7, &[1], S);
        assert_eq!(
            a.withheld(7, &[1], 100, S + 500 * MS),
            Some(Withheld::Inode)
        );
        // After the cool-down (2 s) the inode is leased again.
        assert_eq!(a.withheld(7, &[1], 100, 3 * S + MS), None);
        // Quiet a whole period after it: forgotten, the next write starts from the base.
        a.expire(6 * S);
        assert_eq!(a.counts(6 * S).inodes, 0);
        a.host_wrote(7, &[], 10 * S);
        assert_eq!(a.withheld(7, &[], 0, 12 * S - MS), Some(Withheld::Inode));
        assert_eq!(a.withheld(7, &[], 0, 12 * S + MS), None);
    }

    #[test]
    fn a_file_written_often_cools_longer_up_to_the_cap() {
        let mut a = adaptive();
        let mut now = 0;
        let mut last_until = 0;
        for _ in 0..10 {
            a.host_wrote(7, &[], now);
            let c = a.inodes[&7];
            assert!(c.until_ns >= last_until);
            last_until = c.until_ns;
            // The next write comes just after the cool-down ends.
            now = c.until_ns + MS;
        }
        assert_eq!(a.inodes[&7].period_ns, 60 * S, "capped at max_cooldown");
    }

    #[test]
    fn host_writes_seen_only_as_ctime_changes_keep_a_logger_cooled() {
        // A logger reopens and appends every 50 ms; after its first write the daemon holds
        // no host lease, so it sees the writes only as the ctime the guest's GETATTRs read.
        let mut a = adaptive();
        a.host_wrote(7, &[1], 0);
        let mut ctime = 1;
        assert_eq!(a.withheld(7, &[1], ctime, 10 * MS), Some(Withheld::Inode));
        for step in 1..400u64 {
            ctime += 1;
            let now = step * 50 * MS;
            assert!(
                a.withheld(7, &[1], ctime, now).is_some(),
                "leased again at {} ms while the host kept writing",
                now / MS
            );
        }
        // The logger stops: leases come back one cool-down after its last write.
        let stop = 400 * 50 * MS;
        assert!(a.withheld(7, &[1], ctime, stop + S).is_some());
        assert_eq!(a.withheld(7, &[1], ctime, stop + 2 * S + MS), None);
        assert_eq!(
            a.inodes[&7].period_ns,
            2 * S,
            "writes during a cool-down do not grow it"
        );
    }

    #[test]
    fn a_write_stops_renewals_in_its_directory_for_the_window_only() {
        let mut a = adaptive();
        a.host_wrote(7, &[1], S);
        // A neighbour in the same directory: no renewal during the window.
        assert_eq!(a.withheld(8, &[1], 5, S + MS), Some(Withheld::Directory));
        // A file elsewhere keeps its lease.
        assert_eq!(a.withheld(9, &[2], 5, S + MS), None);
        // After the window the neighbour is leased again.
        assert_eq!(a.withheld(8, &[1], 5, 3 * S + MS), None);
    }

    #[test]
    fn a_burst_across_directories_stops_renewals_share_wide() {
        let mut a = adaptive();
        a.host_wrote(7, &[1], S);
        a.host_wrote(8, &[2], S + 10 * MS);
        assert_eq!(a.withheld(9, &[3], 5, S + 20 * MS), None, "two directories");
        a.host_wrote(10, &[3], S + 20 * MS);
        assert_eq!(a.withheld(11, &[4], 5, S + 30 * MS), Some(Withheld::Share));
        assert!(a.counts(S + 30 * MS).share);
        assert_eq!(a.withheld(11, &[4], 5, 4 * S), None, "the window is over");
        // Writes spread out in time are no burst.
        let mut b = adaptive();
        for (i, dir) in [1u64, 2, 3].iter().enumerate() {
            b.host_wrote(20 + dir, &[*dir], i as u64 * 3 * S);
        }
        assert!(!b.counts(6 * S).share);
    }

    #[test]
    fn memory_stays_bounded_by_recent_writes() {
        let mut a = adaptive();
        for node in 0..10_000u64 {
            a.host_wrote(node, &[node % 100], node * MS);
        }
        a.expire(10 * S + 200 * S);
        assert_eq!(a.inodes.len(), 0);
        assert_eq!(a.dirs.len(), 0);
    }

    #[test]
    fn after_busy_until_nothing_is_withheld_whatever_was_written() {
        let mut a = adaptive();
        assert_eq!(a.busy_until(), 0, "a fresh state is idle");
        for (i, dir) in [1u64, 2, 3, 1].iter().enumerate() {
            a.host_wrote(10 + i as u64, &[*dir], i as u64 * 100 * MS);
            a.host_wrote(10 + i as u64, &[*dir], i as u64 * 100 * MS + MS);
        }
        let idle = a.busy_until();
        assert!(idle > 0);
        // Right before it the last inode written is still watched: a ctime change then is a
        // host write, which cools it again and moves the idle time on.
        assert_eq!(a.withheld(13, &[1], 7, idle - 2 * MS), None);
        assert_eq!(a.withheld(13, &[1], 8, idle - MS), Some(Withheld::Inode));
        let idle = a.busy_until();
        assert!(idle > 2 * S);
        for node in 10..14 {
            for dir in 1..4 {
                assert_eq!(a.withheld(node, &[dir], 12345, idle), None);
            }
        }
        assert_eq!(a.counts(idle), AdaptiveCounts::default());
    }
}
