//! The lease table: what a guest may cache of each inode, until when, and holding host writers
//! until it may no longer.
//!
//! A stock guest (no notification queue) cannot be told that its cache went stale; it only
//! stops trusting its cache when a timeout runs out. So the timeouts are the leases, and the
//! daemon makes sure no host write lands while one is outstanding:
//!
//! * **Data and attributes of a regular file** are granted for the lease duration only while
//!   the daemon holds a host file lease (`F_SETLEASE F_RDLCK`) on it. The kernel breaks that
//!   lease before any process opens the file for writing or truncates it, and the breaker
//!   waits until we release it. We release it once the last attribute lease we granted has
//!   expired, so when the host write returns, the guest has already stopped trusting its
//!   cached attributes: its next read asks for them, sees the new mtime and drops the stale
//!   pages (FUSE_AUTO_INVAL_DATA). While a break is pending, or while the file is open for
//!   writing anywhere (no lease can be had), its attributes are granted for 0 s: the guest
//!   revalidates before every read. The one exception is a file the guest's CREATE or OPEN
//!   opened for writing while nobody else had it open: a write lease (`F_WRLCK`) on the
//!   guest's own handle
//!   ([`LeaseKeeper::lease_write_handle`]) breaks before any other open, so it covers the file
//!   while the guest writes it; the daemon's own opens give it up first, and the guest's
//!   close trades it for a read lease (docs/coherency.md, "Files the guest is writing").
//! * **Names** (entries) are granted for the lease duration; the kernel has no event before a
//!   rename or unlink. OPEN closes the gap for data: opening an inode that lost its name since
//!   we granted it (unlinked, replaced by a rename, or renamed away) answers ESTALE once, and
//!   the guest's VFS repeats the path walk with revalidation, finding the current file.
//! * **Cached pages and listings across opens** (FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR) are granted
//!   only while the inode's mtime and size are what our last attribute reply told the guest.
//!
//! A guest that negotiated the notification queue is told instead: the break sends it
//! FUSE_NOTIFY_INVAL_INODE asking for a confirmation, and the writer goes on as soon as the
//! guest confirms it dropped the file's attributes and pages (docs/coherency.md, "the
//! notification queue protocol"); without a confirmation, at the lease's end as above.
//!
//! Holds are bounded: a host writer waits at most the lease duration plus [`GRANT_MARGIN`].
//! The guest's own writes open the file through this daemon, which first gives up its lease
//! (the guest's cache is already right), so they never wait.
//!
//! # Concurrency and cost
//!
//! Every request that describes a regular file passes through [`LeaseKeeper::grant`], so the
//! table is built for that path: the state is split into [`SHARDS`] shards by node id, each
//! behind its own mutex, and no system call is made while a shard is locked (taking a host
//! lease reopens the file and calls `fcntl` and `statx` between two short critical sections;
//! releasing one closes the descriptor after the shard is unlocked). A grant on a file whose
//! host lease is held is one shard lock and a few compares. A host lease that cannot be had
//! is remembered with the reason, and not attempted again until its back-off has passed
//! ([`Refusal`]). Adaptive leases are skipped on one atomic load while nothing cools down.
//!
//! Lock order: `timers` before a shard before `adaptive`; no two shards at once; the
//! notifier is called with no lock of ours held.
//!
//! A lease is 16 bytes ([`Lease`]): with its key and the hash table's control bytes and
//! spare capacity, 30 to 57 bytes per leased inode, whatever the count (measured at a
//! million in the tests). State that only a few inodes have at a time (holds, guest writes in
//! flight, acquisitions in flight, refusals) lives in side maps of the shard.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::stat64;
use log::{debug, info, warn};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::coherence::adaptive::{Adaptive, AdaptiveConfig};
use crate::coherence::guest_clock::GuestClock;
use crate::coherence::host_lease::{self, BreakSignals, Refused, Signal};
use crate::coherence::notifier::{Notification, Notifier};
use crate::metrics::Histogram;
use crate::passthrough::{InodeData, InodeObserver, LeaseKeeper, PassthroughFs};

/// Added to every hold: the guest starts its timeout when it processes our reply, which can
/// be later than when we sent it (a busy or emulated vCPU).
pub const GRANT_MARGIN: Duration = Duration::from_millis(100);

/// How long a host writer may wait beyond the guest's lease while the guest is paused (QEMU
/// `stop`, libvirt suspend, savevm): the paused guest's lease timer stands still, so without a
/// bound a writer would wait for as long as the pause. Below the kernel's default
/// lease-break-time (45 s) minus the longest default lease (10 s), so the kernel never takes
/// the lease back first; [`start`] lowers it when the host's is shorter.
pub const PAUSE_BOUND: Duration = Duration::from_secs(30);

/// How often the lease thread looks at the clock while the guest is paused.
const PAUSED_POLL: Duration = Duration::from_millis(50);

/// Shards of the table. Node ids are handed out in sequence, so consecutive inodes land in
/// different shards; two request queues meet on a shard lock only for the same inode or one
/// in 64 others, and then only for a few compares.
pub const SHARDS: usize = 64;

/// A break signal for a lease still being installed (taken, not yet in the table) is looked
/// at again this often, up to [`BREAK_RETRIES`] times.
const BREAK_RETRY: Duration = Duration::from_millis(1);
const BREAK_RETRIES: u32 = 2_000;

/// Back-off after a refused host lease: a transient cause (the file is open for writing
/// somewhere, or could not be reopened) is retried after `REFUSAL_FIRST`, doubling with each
/// refusal in a row up to `REFUSAL_MAX`; a lasting one (no lease support, not the owner)
/// after `REFUSAL_LASTING`. Meanwhile the guest revalidates the file at every use: slower,
/// never wrong, and no reopen and fcntl per request.
const REFUSAL_FIRST: Duration = Duration::from_millis(100);
const REFUSAL_MAX: Duration = Duration::from_secs(5);
const REFUSAL_LASTING: Duration = Duration::from_secs(60);

pub use host_lease::block_signals;

/// Counters, logged on SIGUSR1 and at exit (docs/coherency.md, "Metrics").
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Host file leases taken.
    pub acquired: AtomicU64,
    /// Write leases taken on the guest's handle of a file it opened for writing alone (see
    /// [`LeaseKeeper::lease_write_handle`]), and those given up for the guest's own opens or its
    /// close before any host process broke them.
    pub write_leases: AtomicU64,
    pub write_leases_given_up: AtomicU64,
    /// Host file leases that could not be taken, by cause (see [`Refused`]), and for want of
    /// descriptors (half the descriptor limit is already spent on leases): the guest
    /// revalidates instead.
    pub refused: AtomicU64,
    pub refused_open_for_write: AtomicU64,
    pub refused_unsupported: AtomicU64,
    pub refused_not_permitted: AtomicU64,
    pub refused_unreachable: AtomicU64,
    pub refused_budget: AtomicU64,
    /// Grants that did not try for a host lease because a refusal's back-off had not passed.
    pub deferred: AtomicU64,
    /// Leases a host writer broke.
    pub broken: AtomicU64,
    /// Leases given up for the guest's own writes (no hold).
    pub own_writes: AtomicU64,
    /// Host writers held, total hold in microseconds, and the distribution.
    pub held: AtomicU64,
    pub hold_us_total: AtomicU64,
    pub hold_us: Histogram,
    /// Breaks told to a notify-capable guest (INVAL_INODE awaiting confirmation), and holds
    /// it ended early by confirming.
    pub revocations_sent: AtomicU64,
    pub released_on_confirmation: AtomicU64,
    /// OPENs told to drop cached pages or listings (changed since the guest's last open).
    pub cache_drops: AtomicU64,
    /// Holds ended by the pause bound while the guest was paused, before it could have
    /// dropped its cache (each is also a warning in the log).
    pub pause_bound_ended: AtomicU64,
    /// Adaptive leases (stock guests): grants that gave no lease time because the inode, its
    /// directory or the share was cooling down after host writes, and host writers let
    /// through at once because the guest's lease had already run out (holds avoided).
    pub cooled_grants: AtomicU64,
    pub unheld_breaks: AtomicU64,
    /// Directory delegations taken for names (hosts with F_SETDELEG), and delegations given up
    /// before the guest's own creates, unlinks, renames and attribute changes.
    pub delegations: AtomicU64,
    pub own_changes: AtomicU64,
}

impl LeaseStats {
    fn refused_as(&self, why: Refused) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        match why {
            Refused::OpenForWrite => &self.refused_open_for_write,
            Refused::Unsupported => &self.refused_unsupported,
            Refused::NotPermitted => &self.refused_not_permitted,
            Refused::Unreachable => &self.refused_unreachable,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    fn line(&self, entries: usize, stale_names: u64, cooling: &str) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let held = g(&self.held);
        format!(
            "leases: {entries} inodes tracked, {} file leases taken, {} write leases on files the guest writes alone ({} given up for its own opens and closes), {} refused ({} open for writing, {} unsupported, {} not permitted, {} unreachable, {} over the descriptor budget; {} retries deferred by back-off), {} broken by host writers, {} given up for guest writes; {held} host writers held, mean {} us, max {} us ({}); {} revocations sent, {} holds ended by confirmation; {} requests answered ESTALE for a stale guest name, {} cache drops at open; {} holds ended by the pause bound while the guest was paused; adaptive: {} grants without lease time while cooling, {} host writers not held (the guest's lease had run out), {cooling}; names: {} directory delegations taken; {} leases or delegations given up for the guest's own name and attribute changes",
            g(&self.acquired),
            g(&self.write_leases),
            g(&self.write_leases_given_up),
            g(&self.refused),
            g(&self.refused_open_for_write),
            g(&self.refused_unsupported),
            g(&self.refused_not_permitted),
            g(&self.refused_unreachable),
            g(&self.refused_budget),
            g(&self.deferred),
            g(&self.broken),
            g(&self.own_writes),
            g(&self.hold_us_total).checked_div(held).unwrap_or(0),
            self.hold_us.max(),
            self.hold_us.summary("us"),
            g(&self.revocations_sent),
            g(&self.released_on_confirmation),
            stale_names,
            g(&self.cache_drops),
            g(&self.pause_bound_ended),
            g(&self.cooled_grants),
            g(&self.unheld_breaks),
            g(&self.delegations),
            g(&self.own_changes),
        )
    }
}

/// Guest-running time in whole milliseconds, wrapping every 49.7 days, so that a lease's
/// end fits in 4 bytes. No lease is longer than lease-break-time, far below the wrap, so an
/// end is read as "still ahead" only when it is at most the longest lease ahead
/// ([`Tick::remaining`]). An end left from a grant a multiple of 49.7 days ago can thus look
/// ahead again only within one lease's width of that multiple; then a host writer waits at
/// most one lease for nothing. Never shorter than the truth: ends round up, now rounds down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tick(u32);

const NS_PER_MS: u64 = 1_000_000;

impl Tick {
    fn now(running_ns: u64) -> Tick {
        Tick((running_ns / NS_PER_MS) as u32)
    }

    fn end(running_ns: u64, lease: Duration) -> Tick {
        Tick(
            running_ns
                .saturating_add(lease.as_nanos() as u64)
                .div_ceil(NS_PER_MS) as u32,
        )
    }

    /// Milliseconds from `now` to this end, if it is ahead by at most `longest_ms`.
    fn remaining(self, now: Tick, longest_ms: u32) -> Option<u32> {
        let ahead = self.0.wrapping_sub(now.0);
        (ahead != 0 && ahead <= longest_ms).then_some(ahead)
    }
}

/// What the guest's cached pages or listing of an inode are known to match: the inode's
/// ctime (ns) at its last OPEN/OPENDIR or when it closed its own writes. ctime, not mtime:
/// userspace can set mtime back (touch -r, cp -p, rsync -t) but not ctime. Two values are
/// reserved: never validated, and suspect (a host change may have happened since without
/// moving ctime visibly: a lease break, or a validation within one coarse timestamp tick with
/// no host lease to catch a writer), where the next OPEN drops the cache whatever ctime says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CacheMark(i64);

impl CacheMark {
    const NEVER: CacheMark = CacheMark(i64::MIN);
    const SUSPECT: CacheMark = CacheMark(i64::MIN + 1);

    fn at(ctime: i64) -> CacheMark {
        CacheMark(ctime.max(i64::MIN + 2))
    }

    fn validated(self) -> bool {
        self != CacheMark::NEVER
    }

    fn known(self) -> bool {
        self.0 > CacheMark::SUSPECT.0
    }

    fn matches(self, ctime: i64) -> bool {
        self.known() && self == CacheMark::at(ctime)
    }
}

impl Default for CacheMark {
    fn default() -> Self {
        CacheMark::NEVER
    }
}

/// What the guest was told about one inode. 16 bytes: one per inode the guest caches.
#[derive(Default)]
struct Lease {
    /// The descriptor carrying our host file lease (regular files only): an O_RDONLY one of
    /// our own, or, for a node in [`Shard::write_leased`], a duplicate of the guest's write
    /// handle carrying a write lease.
    file: Option<OwnedFd>,
    /// When the last attribute lease we granted runs out; a host writer is held until then.
    attr_until: Tick,
    cache: CacheMark,
}

/// A host writer waiting for the guest.
#[derive(Clone, Copy)]
struct Hold {
    /// When the writer started waiting, in host time ([`GuestClock::now_ns`]): the hold's
    /// identity and the start of its pause bound.
    since_ns: u64,
    /// The notification whose confirmation ends it early (0: none sent).
    notification: u64,
}

/// A host lease that could not be had: why, and when to try again.
#[derive(Clone, Copy, Debug)]
struct Refusal {
    why: Refused,
    retry_at_ns: u64,
    /// The back-off this time; doubles while refusals follow one another.
    period_ns: u64,
}

impl Refusal {
    /// The refusal after `previous` (if the inode was refused before), at host time `now`.
    fn next(previous: Option<Refusal>, why: Refused, now_ns: u64) -> Refusal {
        let first = REFUSAL_FIRST.as_nanos() as u64;
        let max = REFUSAL_MAX.as_nanos() as u64;
        let period_ns = if why.lasting() {
            REFUSAL_LASTING.as_nanos() as u64
        } else {
            previous.map_or(first, |p| p.period_ns.saturating_mul(2).clamp(first, max))
        };
        Refusal {
            why,
            retry_at_ns: now_ns.saturating_add(period_ns),
            period_ns,
        }
    }
}

/// One shard: the leases of the nodes that hash to it, and their rarer states. Keyed by node
/// id with FxHash: the daemon hands node ids out, so no guest can choose keys that collide,
/// and SipHash cost a third of a grant.
#[derive(Default)]
struct Shard {
    leases: FxHashMap<u64, Lease>,
    /// Host writers waiting, by node. A node with a hold is being broken: it gets no
    /// attribute time, and no new host lease, until the hold ends.
    holds: FxHashMap<u64, Hold>,
    /// Our own opens for writing in flight, by node: no host lease is taken meanwhile.
    own_writers: FxHashMap<u64, u32>,
    /// Nodes whose host lease is being taken outside the lock.
    acquiring: FxHashSet<u64>,
    /// Nodes whose `file` carries a write lease on the guest's write handle rather than a
    /// read lease: any open of ours, for reading too, must give it up first.
    write_leased: FxHashSet<u64>,
    refused: FxHashMap<u64, Refusal>,
}

/// The deadlines the lease thread serves.
#[derive(Default)]
struct Timers {
    /// Holds to end, earliest first: (guest-running time due, node, hold start).
    releases: BinaryHeap<Reverse<(u64, u64, u64)>>,
    /// The pause bound of each hold, earliest first: (host-time deadline, node, hold start).
    pause_bounds: BinaryHeap<Reverse<(u64, u64, u64)>>,
}

/// What a break signal found for one node.
#[derive(Debug, PartialEq, Eq)]
enum BreakFound {
    /// The node's lease is on that descriptor: the break is handled (or already was).
    Handled,
    /// A lease for the node is being installed: look again shortly.
    NotYet,
    /// Not this node's lease.
    NotThis,
}

/// The lease table and its host-lease handling. Installed into the passthrough filesystem as
/// its [`LeaseKeeper`] and [`InodeObserver`].
pub struct LeaseTable {
    shards: Box<[Mutex<Shard>]>,
    timers: Mutex<Timers>,
    /// Cool-downs after host writes (stock guests), when adaptive leases are on, and the host
    /// time from which nothing cools (skip the lock before then).
    adaptive: Option<Mutex<Adaptive>>,
    adaptive_busy_until: AtomicU64,
    /// Host leases held now.
    host_leases: AtomicUsize,
    lease: Duration,
    notify_lease: Duration,
    /// The longest lease we grant, in ms (see [`Tick`]).
    longest_ms: u32,
    clock: Arc<GuestClock>,
    pause_bound: Duration,
    fs: Weak<PassthroughFs>,
    notifier: Option<Arc<Notifier>>,
    max_host_leases: usize,
    /// The host kernel and filesystem take directory delegations: a stock guest's names are
    /// then leased only under one ([`LeaseTable::grant_names`]).
    delegations: bool,
    /// The host watcher's file events come with descriptors (kernels before 5.1): the kernel
    /// opens a watched file for each event, which would break a write lease on it at the
    /// guest's own writes, so watched files get none.
    watch_by_descriptor: bool,
    pub stats: LeaseStats,
}

/// Timestamps below a second apart can come from one coarse kernel clock tick (ext4, tmpfs
/// and others stamp with the jiffy-resolution coarse clock): a change within the same tick as
/// our validation may leave ctime where it was.
const COARSE_TIMESTAMP_SLACK_NS: i64 = 20_000_000;

fn ns(ts_sec: i64, ts_nsec: i64) -> i64 {
    ts_sec.saturating_mul(1_000_000_000).saturating_add(ts_nsec)
}

fn ctime_is_recent(ctime: i64) -> bool {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    ns(now.tv_sec, now.tv_nsec).saturating_sub(ctime) < COARSE_TIMESTAMP_SLACK_NS
}

fn ctime_ns(st: &stat64) -> i64 {
    ns(st.st_ctime, st.st_ctime_nsec)
}

fn is_reg(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFREG
}

impl LeaseTable {
    pub fn new(
        lease: Duration,
        notify_lease: Duration,
        fs: Weak<PassthroughFs>,
        notifier: Option<Arc<Notifier>>,
        clock: Arc<GuestClock>,
        pause_bound: Duration,
    ) -> Self {
        LeaseTable {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            timers: Mutex::default(),
            adaptive: None,
            adaptive_busy_until: AtomicU64::new(0),
            host_leases: AtomicUsize::new(0),
            lease,
            notify_lease,
            longest_ms: (lease.max(notify_lease).as_millis() as u32).saturating_add(1),
            clock,
            pause_bound,
            fs,
            notifier,
            max_host_leases: host_lease::budget(),
            delegations: false,
            watch_by_descriptor: false,
            stats: LeaseStats::default(),
        }
    }

    /// The lease a reply may carry for `data`: the long one only for a notify-capable guest
    /// and an inode whose changes the host watcher reports (with all its parents, whose
    /// entries lead to it).
    fn granted_lease(&self, data: &InodeData) -> Duration {
        match &self.notifier {
            Some(n)
                if n.active()
                    && self
                        .fs
                        .upgrade()
                        .is_some_and(|fs| fs.watched_with_parents(data)) =>
            {
                self.notify_lease
            }
            _ => self.lease,
        }
    }

    /// Turn adaptive leases on (`Some`) or off.
    pub fn with_adaptive(mut self, cfg: Option<AdaptiveConfig>) -> Self {
        self.adaptive = cfg.map(|c| Mutex::new(Adaptive::new(c)));
        self
    }

    /// Lease names under directory delegations (`true`: the host offers them, see
    /// [`host_lease::probe_delegations`]) instead of by time alone.
    pub fn with_delegations(mut self, on: bool) -> Self {
        self.delegations = on;
        self
    }

    pub fn with_watch_by_descriptor(mut self, on: bool) -> Self {
        self.watch_by_descriptor = on;
        self
    }

    /// Whether delegations are used now: for a stock guest only, where they close what time
    /// alone leaves open (names, and attribute changes of files). A notify-capable guest is
    /// told of each host name and attribute change by the watcher instead, without making the
    /// host wait, and keeps file leases for data.
    fn delegating(&self) -> bool {
        self.delegations && !self.notifier.as_ref().is_some_and(|n| n.active())
    }

    /// Adaptive leases apply to stock guests only: a notify-capable guest is told at once, so
    /// holding its writers costs a round trip, not a lease.
    fn adapting(&self) -> bool {
        self.adaptive.is_some() && !self.notifier.as_ref().is_some_and(|n| n.active())
    }

    fn adaptive(&self) -> Option<MutexGuard<'_, Adaptive>> {
        self.adaptive
            .as_ref()
            .map(|a| a.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether `data` gets no lease time now because it or its neighbours cool down. One
    /// atomic load while nothing does.
    fn cooling(&self, data: &InodeData, st: &stat64, host_now: u64) -> bool {
        if !self.adapting() {
            return false;
        }
        if host_now >= self.adaptive_busy_until.load(Ordering::Relaxed) {
            return false;
        }
        let parents = data.parent_nodes();
        let Some(mut adaptive) = self.adaptive() else {
            return false;
        };
        let withheld = adaptive
            .withheld(data.inode, &parents, ctime_ns(st), host_now)
            .is_some();
        self.adaptive_busy_until
            .fetch_max(adaptive.busy_until(), Ordering::Relaxed);
        withheld
    }

    /// The directories a host change of `node` was in, for adaptive leases: a file's parents;
    /// for a directory (its delegation broke: a name in it changed), the directory itself.
    fn written_dirs(&self, node: u64) -> Vec<u64> {
        match self.fs.upgrade().and_then(|fs| fs.inode_fd(node)) {
            Some(data) if data.mode & libc::S_IFMT == libc::S_IFDIR => vec![node],
            Some(data) => data.parent_nodes(),
            None => Vec::new(),
        }
    }

    /// The guest's running time: what its lease timers count.
    fn now_ns(&self) -> u64 {
        self.clock.running_ns()
    }

    fn shard(&self, node: u64) -> MutexGuard<'_, Shard> {
        self.shards[(node % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn timers(&self) -> MutexGuard<'_, Timers> {
        self.timers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inodes with lease state.
    pub fn len(&self) -> usize {
        (0..SHARDS as u64).map(|i| self.shard(i).leases.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether another host lease fits the descriptor budget.
    fn within_budget(&self) -> bool {
        let held = self.host_leases.load(Ordering::Relaxed);
        held < self.max_host_leases
            && self
                .fs
                .upgrade()
                .is_none_or(|fs| fs.descriptors_held() + held < fs.descriptor_budget())
    }

    fn release_host_lease(&self, fd: OwnedFd) {
        self.host_leases.fetch_sub(1, Ordering::Relaxed);
        host_lease::release(fd);
    }

    /// Take a host lease for `data` with no lock held, and the attribute time the reply may
    /// carry: `granted` once the lease is installed, 0 when none could be had (the refusal is
    /// remembered) or the node no longer wants one. On success `st` is read again under the
    /// lease, so the guest is told what the lease covers.
    fn acquire(&self, data: &InodeData, st: &mut stat64, now: u64, granted: Duration) -> Duration {
        let taken = match self.fs.upgrade() {
            Some(fs) => host_lease::take(&fs, data, self.delegating()),
            None => Err(Refused::Unreachable),
        };
        let fresh = match &taken {
            Ok(_) => crate::passthrough::statx_info(data).ok(),
            Err(_) => None,
        };
        // No attributes read under the lease: grant nothing this time.
        let extend_by = if fresh.is_some() {
            granted
        } else {
            Duration::ZERO
        };
        if !self.install(data.inode, taken, now, extend_by, false) {
            return Duration::ZERO;
        }
        self.stats.acquired.fetch_add(1, Ordering::Relaxed);
        match fresh {
            Some(info) => {
                *st = info;
                granted
            }
            None => Duration::ZERO,
        }
    }

    /// Put what [`host_lease::take`] or [`host_lease::take_delegation`] gave for `node` (which
    /// the caller marked acquiring) into the table, extending it by `granted` from `now`, or
    /// remember the refusal. Whether it was installed: not if the guest forgot the node
    /// meanwhile, or a writer (ours or the host's) came first.
    fn install(
        &self,
        node: u64,
        taken: Result<OwnedFd, Refused>,
        now: u64,
        granted: Duration,
        write: bool,
    ) -> bool {
        let host_now = self.clock.now_ns();
        let mut guard = self.shard(node);
        let s = &mut *guard;
        // Gone from the set: the guest forgot the node meanwhile (see `removed`).
        let still_known = s.acquiring.remove(&node);
        match taken {
            Ok(fd) => {
                if !still_known || s.own_writers.contains_key(&node) || s.holds.contains_key(&node)
                {
                    drop(guard);
                    host_lease::release(fd);
                    return false;
                }
                s.refused.remove(&node);
                if write {
                    s.write_leased.insert(node);
                }
                let lease = s.leases.entry(node).or_default();
                lease.file = Some(fd);
                self.host_leases.fetch_add(1, Ordering::Relaxed);
                extend(lease, now, granted, self.longest_ms);
                true
            }
            Err(why) => {
                if still_known {
                    let previous = s.refused.get(&node).copied();
                    if previous.map(|p| p.why) != Some(why) {
                        debug!(
                            "no host lease for node {node}: {}; the guest revalidates it until a retry succeeds",
                            why.name()
                        );
                    }
                    s.refused
                        .insert(node, Refusal::next(previous, why, host_now));
                }
                self.stats.refused_as(why);
                false
            }
        }
    }

    /// The entry time for a name in directory `dir` while names are leased under delegations:
    /// `granted` while we hold a delegation on `dir` that no host change is breaking (taking
    /// one if need be), else 0 (the guest looks the name up again at every use). The
    /// delegation's lease end then covers the name, so a host create, unlink or rename in
    /// `dir` waits until the guest stopped trusting it.
    fn grant_names(&self, dir: u64, granted: Duration) -> Duration {
        let (now, host_now) = self.clock.running_and_now_ns();
        if self.names_cooling(dir, host_now) {
            self.stats.cooled_grants.fetch_add(1, Ordering::Relaxed);
            return Duration::ZERO;
        }
        {
            let mut guard = self.shard(dir);
            let s = &mut *guard;
            let breaking = !s.holds.is_empty() && s.holds.contains_key(&dir);
            if let Some(lease) = s.leases.get_mut(&dir).filter(|l| l.file.is_some()) {
                if breaking {
                    return Duration::ZERO;
                }
                extend(lease, now, granted, self.longest_ms);
                return granted;
            }
            if breaking || s.own_writers.contains_key(&dir) || s.acquiring.contains(&dir) {
                return Duration::ZERO;
            }
            if s.refused
                .get(&dir)
                .is_some_and(|r| host_now < r.retry_at_ns)
            {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                return Duration::ZERO;
            }
            if !self.within_budget() {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.stats.refused_budget.fetch_add(1, Ordering::Relaxed);
                return Duration::ZERO;
            }
            s.acquiring.insert(dir);
        }
        if self.delegate(dir, now, granted) {
            granted
        } else {
            Duration::ZERO
        }
    }

    /// Take a delegation on directory `dir` (marked acquiring) with no lock held and install
    /// it, extended by `granted` from `now`. Whether it was.
    fn delegate(&self, dir: u64, now: u64, granted: Duration) -> bool {
        let taken = match self.fs.upgrade() {
            Some(fs) => match fs.inode_fd(dir) {
                Some(data) => host_lease::take_delegation(&fs, &data),
                None => Err(Refused::Unreachable),
            },
            None => Err(Refused::Unreachable),
        };
        let installed = self.install(dir, taken, now, granted, false);
        if installed {
            self.stats.delegations.fetch_add(1, Ordering::Relaxed);
        }
        installed
    }

    /// Take `node`'s delegation (a directory's, or a file's) again after the guest's own
    /// change, with no lock held; `node` is marked acquiring. The lease end is kept.
    fn retake(&self, node: u64, now: u64) {
        let data = self.fs.upgrade().and_then(|fs| fs.inode_fd(node));
        match data {
            Some(d) if d.mode & libc::S_IFMT == libc::S_IFDIR => {
                self.delegate(node, now, Duration::ZERO);
            }
            Some(d) if is_reg(d.mode) => {
                let taken = match self.fs.upgrade() {
                    Some(fs) => host_lease::take(&fs, &d, self.delegating()),
                    None => Err(Refused::Unreachable),
                };
                if self.install(node, taken, now, Duration::ZERO, false) {
                    self.stats.acquired.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {
                self.shard(node).acquiring.remove(&node);
            }
        }
    }

    /// Whether names in `dir` get no lease time now because the host changed the directory
    /// lately (adaptive leases: a host `rm -rf` or `git checkout` is held once, not per name).
    fn names_cooling(&self, dir: u64, host_now: u64) -> bool {
        if !self.adapting() || host_now >= self.adaptive_busy_until.load(Ordering::Relaxed) {
            return false;
        }
        let Some(mut adaptive) = self.adaptive() else {
            return false;
        };
        // The directory's own cool-down and burst window; its ctime is not tracked here.
        let withheld = adaptive.withheld(dir, &[dir], 0, host_now).is_some();
        self.adaptive_busy_until
            .fetch_max(adaptive.busy_until(), Ordering::Relaxed);
        withheld
    }

    /// A break signal named `fd`: find the node whose lease it is (the descriptor's inode,
    /// then each node id of it) and handle the break.
    fn on_break(self: &Arc<Self>, fd: RawFd) -> BreakFound {
        let Some(fs) = self.fs.upgrade() else {
            return BreakFound::NotThis;
        };
        let Some((dev, ino)) = host_lease::identity(fd) else {
            return BreakFound::NotThis; // Released and closed meanwhile.
        };
        let mut found = BreakFound::NotThis;
        for node in fs.find_inodes_by_dev_ino(dev, ino) {
            match self.host_break(node, fd) {
                BreakFound::Handled => return BreakFound::Handled,
                BreakFound::NotYet => found = BreakFound::NotYet,
                BreakFound::NotThis => {}
            }
        }
        found
    }

    /// A host writer is breaking `node`'s lease on `fd`: hold it until the guest's lease has
    /// run out (plus the margin), or until a notify-capable guest confirms it dropped its copy.
    fn host_break(self: &Arc<Self>, node: u64, fd: RawFd) -> BreakFound {
        let now = self.now_ns();
        let host_now = self.clock.now_ns();
        let remaining_ms = {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            let ours = s
                .leases
                .get(&node)
                .and_then(|l| l.file.as_ref())
                .is_some_and(|f| f.as_raw_fd() == fd);
            if !ours {
                return if s.acquiring.contains(&node) {
                    BreakFound::NotYet
                } else {
                    BreakFound::NotThis
                };
            }
            if s.holds.contains_key(&node) {
                return BreakFound::Handled; // The kernel repeats the signal.
            }
            let Some(lease) = s.leases.get_mut(&node) else {
                return BreakFound::NotThis;
            };
            if lease.cache.validated() {
                lease.cache = CacheMark::SUSPECT;
            }
            let remaining = lease.attr_until.remaining(Tick::now(now), self.longest_ms);
            s.holds.insert(
                node,
                Hold {
                    since_ns: host_now,
                    notification: 0,
                },
            );
            remaining
        };
        self.stats.broken.fetch_add(1, Ordering::Relaxed);
        let guest_may_cache = remaining_ms.is_some();
        if !guest_may_cache {
            self.stats.unheld_breaks.fetch_add(1, Ordering::Relaxed);
        }
        if self.adapting() {
            // Read with no lock of ours held, and only for a break that starts a hold.
            let parents = self.written_dirs(node);
            if let Some(mut adaptive) = self.adaptive() {
                adaptive.expire(host_now);
                adaptive.host_wrote(node, &parents, host_now);
                self.adaptive_busy_until
                    .fetch_max(adaptive.busy_until(), Ordering::Relaxed);
            }
        }
        let release_at = match remaining_ms {
            Some(ms) => now + ms as u64 * NS_PER_MS + GRANT_MARGIN.as_nanos() as u64,
            None => now,
        };
        let mut told = false;
        if let Some(notifier) = self
            .notifier
            .as_ref()
            .filter(|n| guest_may_cache && n.active())
        {
            let table = Arc::downgrade(self);
            let id = notifier.send_tracked(
                Notification::InvalInode {
                    ino: node,
                    offset: 0,
                    len: 0,
                },
                Box::new(move || {
                    if let Some(table) = table.upgrade() {
                        table.confirmed(node, host_now);
                    }
                }),
            );
            self.stats.revocations_sent.fetch_add(1, Ordering::Relaxed);
            told = true;
            let mut guard = self.shard(node);
            match guard.holds.get_mut(&node) {
                Some(h) if h.since_ns == host_now => h.notification = id,
                // The hold ended meanwhile (confirmed already, or the guest forgot the node).
                _ => {
                    drop(guard);
                    notifier.cancel(id);
                }
            }
        }
        debug!(
            "host writer on node {node}: holding it up to {} ms{}",
            (release_at - now) / NS_PER_MS,
            if told {
                " or until the guest confirms"
            } else {
                ""
            }
        );
        let bound = host_now + (release_at - now) + self.pause_bound.as_nanos() as u64;
        let mut timers = self.timers();
        timers.releases.push(Reverse((release_at, node, host_now)));
        timers.pause_bounds.push(Reverse((bound, node, host_now)));
        BreakFound::Handled
    }

    /// The guest confirmed a revocation: end the hold it was for, if that hold still runs.
    fn confirmed(&self, node: u64, since_ns: u64) {
        if self.end_hold(node, since_ns) {
            self.stats
                .released_on_confirmation
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// End `node`'s hold if it is the one that started at `since_ns`: release the host lease
    /// (the writer goes on) and stop waiting for a confirmation. Whether it was.
    fn end_hold(&self, node: u64, since_ns: u64) -> bool {
        let (hold, fd) = {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            if s.holds.get(&node).map(|h| h.since_ns) != Some(since_ns) {
                return false;
            }
            let hold = s.holds.remove(&node);
            s.write_leased.remove(&node);
            let fd = s.leases.get_mut(&node).and_then(|l| l.file.take());
            (hold, fd)
        };
        if let Some(fd) = fd {
            self.release_host_lease(fd);
        }
        self.stop_awaiting(hold);
        let held_us = self.clock.now_ns().saturating_sub(since_ns) / 1000;
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        self.stats
            .hold_us_total
            .fetch_add(held_us, Ordering::Relaxed);
        self.stats.hold_us.record(held_us);
        true
    }

    /// Stop waiting for the confirmation of an ended hold's notification, if it had one.
    fn stop_awaiting(&self, hold: Option<Hold>) {
        if let (Some(n), Some(h)) = (&self.notifier, hold) {
            if h.notification != 0 {
                n.cancel(h.notification);
            }
        }
    }

    /// End the holds that are due; how long until the next one (None: none pending).
    fn release_due(&self) -> Option<Duration> {
        let now = self.now_ns();
        let host_now = self.clock.now_ns();
        let paused = self.clock.is_paused();
        let mut due = Vec::new();
        let mut bound_due = Vec::new();
        let mut next: Option<Duration> = None;
        {
            let mut timers = self.timers();
            while let Some(&Reverse((at, node, since))) = timers.releases.peek() {
                if at > now {
                    // While paused the guest's clock stands still: look at the host clock
                    // (for the pause bound) and for the resume.
                    next = Some(if paused {
                        PAUSED_POLL
                    } else {
                        Duration::from_nanos(at - now)
                    });
                    break;
                }
                timers.releases.pop();
                due.push((node, since));
            }
            while let Some(&Reverse((bound, node, since))) = timers.pause_bounds.peek() {
                if bound > host_now {
                    let wait = Duration::from_nanos(bound - host_now);
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                    break;
                }
                timers.pause_bounds.pop();
                bound_due.push((node, since));
            }
        }
        // Else released meanwhile (confirmed, forgotten, or the guest wrote itself).
        for (node, since) in due {
            self.end_hold(node, since);
        }
        for (node, since) in bound_due {
            if self.end_hold(node, since) {
                self.stats.pause_bound_ended.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "host writer on node {node} let through after {} ms: the guest has been paused past the bound ({} s); it may use what it cached of that file until it resumes and its lease runs out",
                    (host_now - since) / 1_000_000,
                    self.pause_bound.as_secs_f64()
                );
            }
        }
        next
    }

    /// Serve lease breaks and SIGUSR1 until the process exits.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<()> {
        let signals = BreakSignals::new()?;
        let table = self.clone();
        thread::Builder::new()
            .name("leasefs-leases".into())
            .spawn(move || table.run(signals))
            .map(|_| ())
    }

    fn run(self: &Arc<Self>, signals: BreakSignals) {
        // Breaks of leases still being installed, with how often they were looked at.
        let mut retry: Vec<(RawFd, u32)> = Vec::new();
        loop {
            let mut wait = self.release_due();
            if !retry.is_empty() {
                wait = Some(wait.map_or(BREAK_RETRY, |w| w.min(BREAK_RETRY)));
            }
            let signals = signals.wait(wait);
            // A burst of host writers: their revocations go to the guest in one delivery.
            let _batch = self.notifier.as_ref().map(|n| n.batch());
            for (fd, tries) in std::mem::take(&mut retry) {
                if self.on_break(fd) == BreakFound::NotYet {
                    if tries < BREAK_RETRIES {
                        retry.push((fd, tries + 1));
                    } else {
                        warn!("a break of lease descriptor {fd} found its lease still being installed after {tries} looks; left to the kernel's lease-break-time");
                    }
                }
            }
            for signal in signals {
                match signal {
                    Signal::LogStats => self.log_stats(),
                    Signal::Break(fd) => {
                        if self.on_break(fd) == BreakFound::NotYet {
                            retry.push((fd, 1));
                        }
                    }
                }
            }
        }
    }

    /// Log the counters (on SIGUSR1 and at exit).
    pub fn log_stats(&self) {
        let stale_names = self.fs.upgrade().map_or(0, |fs| fs.stale_name_answers());
        let cooling = match self.adaptive() {
            Some(a) => {
                let c = a.counts(self.clock.now_ns());
                format!(
                    "{} inodes and {} directories cooling now{}",
                    c.inodes,
                    c.dirs,
                    if c.share { ", the share too" } else { "" }
                )
            }
            None => "off".to_string(),
        };
        info!("{}", self.stats.line(self.len(), stale_names, &cooling));
        if let Some(n) = &self.notifier {
            info!("{}", n.stats.line(n.backlog()));
        }
    }
}

impl LeaseTable {
    /// The guest is about to change `node` itself (open it for writing, or change its names or
    /// attributes): give up our host lease or delegation on it, which that change would break
    /// (its own cache sees its own change), and take none until it is done. Counted in
    /// `counter`. If a host writer is already held on it, keep it: the guest's change waits
    /// behind that writer like any other, and the hold ends it as usual.
    fn give_up_for_own_change(&self, node: u64, counter: &AtomicU64) {
        let fd = {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            *s.own_writers.entry(node).or_default() += 1;
            if s.holds.contains_key(&node) {
                return;
            }
            if !s.write_leased.is_empty() && s.write_leased.remove(&node) {
                self.stats
                    .write_leases_given_up
                    .fetch_add(1, Ordering::Relaxed);
            }
            s.leases.get_mut(&node).and_then(|l| l.file.take())
        };
        if let Some(fd) = fd {
            counter.fetch_add(1, Ordering::Relaxed);
            self.release_host_lease(fd);
        }
    }

    /// Give up `node`'s write lease before an open of ours would break it (see
    /// [`take_write_lease`] for when it is kept).
    fn give_up_write_lease_of(&self, node: u64) {
        let fd = take_write_lease(&mut self.shard(node), node);
        self.give_up_write_lease(fd);
    }

    /// Give up a write lease [`take_write_lease`] took out of the table, if any.
    fn give_up_write_lease(&self, fd: Option<OwnedFd>) {
        if let Some(fd) = fd {
            self.stats
                .write_leases_given_up
                .fetch_add(1, Ordering::Relaxed);
            self.release_host_lease(fd);
        }
    }

    /// Whether `node`, whose host lease we gave up for the guest's own change, should have
    /// one again at once because the guest still trusts attributes granted under it; if so
    /// it is marked acquiring, for [`LeaseTable::retake`] with no lock held.
    fn to_cover_again(&self, s: &mut Shard, node: u64, now: u64) -> bool {
        let outstanding = s.leases.get(&node).is_some_and(|l| {
            l.file.is_none()
                && l.attr_until
                    .remaining(Tick::now(now), self.longest_ms)
                    .is_some()
        });
        outstanding && self.claim_for_acquiring(s, node)
    }

    /// Mark `node` acquiring, unless a lease is being taken for it already, a host writer is
    /// held on it, the guest is changing it, or no descriptor is left for another lease.
    /// Whether it was marked.
    fn claim_for_acquiring(&self, s: &mut Shard, node: u64) -> bool {
        if s.acquiring.contains(&node)
            || s.holds.contains_key(&node)
            || s.own_writers.contains_key(&node)
            || !self.within_budget()
        {
            return false;
        }
        s.acquiring.insert(node);
        true
    }

    /// The attribute part of [`LeaseKeeper::grant`], and the lease the reply may carry.
    fn grant_attr(&self, data: &InodeData, st: &mut stat64, acquire: bool) -> (Duration, Duration) {
        let granted = self.granted_lease(data);
        if !is_reg(data.mode) {
            return (granted, granted);
        }
        let node = data.inode;
        let (now, host_now) = self.clock.running_and_now_ns();
        let cooling = self.cooling(data, st, host_now);
        if cooling {
            self.stats.cooled_grants.fetch_add(1, Ordering::Relaxed);
        }
        {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            // The side maps are empty nearly always: look before hashing.
            let breaking = !s.holds.is_empty() && s.holds.contains_key(&node);
            let has_lease = match s.leases.get_mut(&node) {
                Some(lease) if lease.file.is_some() => {
                    if !breaking && !cooling {
                        extend(lease, now, granted, self.longest_ms);
                        return (granted, granted);
                    }
                    true
                }
                _ => false,
            };
            if has_lease
                || !acquire
                || breaking
                || cooling
                || s.own_writers.contains_key(&node)
                || s.acquiring.contains(&node)
            {
                return (Duration::ZERO, granted);
            }
            if s.refused
                .get(&node)
                .is_some_and(|r| host_now < r.retry_at_ns)
            {
                self.stats.deferred.fetch_add(1, Ordering::Relaxed);
                return (Duration::ZERO, granted);
            }
            if !self.within_budget() {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                self.stats.refused_budget.fetch_add(1, Ordering::Relaxed);
                return (Duration::ZERO, granted);
            }
            s.acquiring.insert(node);
        }
        (self.acquire(data, st, now, granted), granted)
    }
}

impl LeaseKeeper for LeaseTable {
    fn descriptors(&self) -> usize {
        self.host_leases.load(Ordering::Relaxed)
    }

    /// Attributes: full lease time for a regular file only while we hold a host lease on it
    /// that no writer is breaking, and it is not cooling down; else 0 s (the guest
    /// revalidates). Other inode types get the lease duration: no host lease exists for them.
    /// Names: where the host offers directory delegations, a stock guest's name in `parent`
    /// gets lease time only under a delegation on `parent` ([`LeaseTable::grant_names`]);
    /// elsewhere the lease duration, as no kernel event precedes a rename or unlink there (see
    /// the module docs for how OPEN closes that gap).
    fn grant(
        &self,
        data: &InodeData,
        st: &mut stat64,
        entry: bool,
        parent: Option<u64>,
        acquire: bool,
    ) -> (Duration, Duration) {
        let (attr, granted) = self.grant_attr(data, st, acquire);
        match parent {
            Some(dir) if entry && self.delegating() => (attr, self.grant_names(dir, granted)),
            _ => (attr, granted),
        }
    }

    fn begin_change(&self, node: u64) {
        // Without delegations nothing of ours breaks on a metadata change (file leases
        // break on opens for writing and truncation only, which `begin_write` covers).
        if self.delegations {
            self.give_up_for_own_change(node, &self.stats.own_changes);
        }
    }

    fn end_change(&self, node: u64) {
        if !self.delegations {
            return;
        }
        let now = self.now_ns();
        {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            let Some(n) = s.own_writers.get_mut(&node) else {
                return;
            };
            *n -= 1;
            if *n > 0 {
                return;
            }
            s.own_writers.remove(&node);
            // The guest still trusts what it was given under the delegation we gave up: cover
            // it again at once, so only a host change racing the guest's own system call goes
            // unheld.
            if !self.to_cover_again(s, node, now) {
                return;
            }
        }
        self.retake(node, now);
    }

    fn check_open(&self, data: &InodeData, st: &stat64) -> bool {
        let ctime = ctime_ns(st);
        let recent = ctime_is_recent(ctime);
        let node = data.inode;
        let mut guard = self.shard(node);
        let s = &mut *guard;
        let lease_catches_writers =
            s.leases.get(&node).is_some_and(|l| l.file.is_some()) && !s.holds.contains_key(&node);
        let lease = s.leases.entry(node).or_default();
        let keep = lease.cache.matches(ctime);
        if !keep && lease.cache.validated() {
            self.stats.cache_drops.fetch_add(1, Ordering::Relaxed);
        }
        // Without a host lease to catch a writer, a write within the same timestamp tick as
        // this validation would leave ctime unchanged: distrust it next time.
        lease.cache = if !lease_catches_writers && recent {
            CacheMark::SUSPECT
        } else {
            CacheMark::at(ctime)
        };
        keep
    }

    fn begin_write(&self, data: &InodeData) {
        self.give_up_for_own_change(data.inode, &self.stats.own_writes);
    }

    fn write_handle_closed(&self, data: &InodeData, st: &stat64) {
        let ctime = ctime_ns(st);
        let recent = ctime_is_recent(ctime);
        let node = data.inode;
        let write_lease = {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            // The only handle a write lease can be on (any other open of ours gave it up):
            // give it up now, or our duplicate would keep the file open for writing.
            let write_lease = take_write_lease(s, node);
            if let Some(lease) = s.leases.get_mut(&node) {
                if lease.cache.known() {
                    lease.cache = if recent {
                        CacheMark::SUSPECT
                    } else {
                        CacheMark::at(ctime)
                    };
                }
            }
            write_lease
        };
        self.give_up_write_lease(write_lease);
    }

    fn write_handle_dropped(&self, data: &InodeData) {
        if !is_reg(data.mode) {
            return;
        }
        let node = data.inode;
        let now = self.now_ns();
        {
            let mut guard = self.shard(node);
            if !self.to_cover_again(&mut guard, node, now) {
                return;
            }
        }
        self.retake(node, now);
    }

    fn lease_write_handle(&self, data: &InodeData, file: &File) -> bool {
        if self.delegations
            || !is_reg(data.mode)
            || self.granted_lease(data).is_zero()
            || (self.watch_by_descriptor && data.watched.load(Ordering::Relaxed))
        {
            return false;
        }
        let node = data.inode;
        let now = self.now_ns();
        {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            if s.leases.get(&node).is_some_and(|l| l.file.is_some())
                || !self.claim_for_acquiring(s, node)
            {
                return false;
            }
        }
        let taken = host_lease::take_write(file, data);
        let installed = self.install(node, taken, now, Duration::ZERO, true);
        if installed {
            self.stats.write_leases.fetch_add(1, Ordering::Relaxed);
        }
        installed
    }

    fn before_read_open(&self, data: &InodeData) {
        self.give_up_write_lease_of(data.inode);
    }

    fn end_write(&self, data: &InodeData) {
        let mut guard = self.shard(data.inode);
        if let Some(n) = guard.own_writers.get_mut(&data.inode) {
            *n -= 1;
            if *n == 0 {
                guard.own_writers.remove(&data.inode);
            }
        }
    }
}

/// `node`'s write lease on the guest's write handle, taken out of the table to be given up
/// before an open of ours would break it or the handle closes. None if it has none, or if a
/// host opener is already held on it: then our open waits behind that one like another, and
/// the hold's end gives the lease up.
fn take_write_lease(s: &mut Shard, node: u64) -> Option<OwnedFd> {
    if s.write_leased.is_empty() || !s.write_leased.contains(&node) || s.holds.contains_key(&node) {
        return None;
    }
    s.write_leased.remove(&node);
    s.leases.get_mut(&node).and_then(|l| l.file.take())
}

/// Extend `lease`'s attribute time to `granted` from `now` (never shorten it).
fn extend(lease: &mut Lease, now: u64, granted: Duration, longest_ms: u32) {
    if granted.is_zero() {
        return;
    }
    let end = Tick::end(now, granted);
    let tick_now = Tick::now(now);
    let current = lease
        .attr_until
        .remaining(tick_now, longest_ms)
        .unwrap_or(0);
    if end.remaining(tick_now, longest_ms).unwrap_or(0) >= current {
        lease.attr_until = end;
    }
}

impl InodeObserver for LeaseTable {
    fn added(&self, _data: &InodeData) {}

    fn removed(&self, data: &InodeData) {
        let node = data.inode;
        let (fd, hold) = {
            let mut guard = self.shard(node);
            let s = &mut *guard;
            let fd = s.leases.remove(&node).and_then(|l| l.file);
            // The side maps are empty nearly always: look before hashing.
            if !s.own_writers.is_empty() {
                s.own_writers.remove(&node);
            }
            if !s.acquiring.is_empty() {
                s.acquiring.remove(&node);
            }
            if !s.write_leased.is_empty() {
                s.write_leased.remove(&node);
            }
            if !s.refused.is_empty() {
                s.refused.remove(&node);
            }
            let hold = if s.holds.is_empty() {
                None
            } else {
                s.holds.remove(&node)
            };
            (fd, hold)
        };
        if let Some(fd) = fd {
            self.release_host_lease(fd);
        }
        self.stop_awaiting(hold);
        if let Some(mut adaptive) = self.adaptive() {
            adaptive.forget(node);
        }
    }
}

/// Set up leases of `lease` for `fs` and start serving breaks. A failure leaves the guest on
/// zero timeouts, which is slower but coherent.
pub fn start(
    fs: &Arc<PassthroughFs>,
    lease: Duration,
    notify_lease: Duration,
    notifier: Arc<Notifier>,
    clock: Arc<GuestClock>,
    adaptive: Option<AdaptiveConfig>,
    watched_by_descriptor: bool,
) -> Option<Arc<LeaseTable>> {
    let mut pause_bound = PAUSE_BOUND;
    if let Some(max) = host_lease::break_time() {
        for (flag, secs) in [
            ("--lease-timeout", lease),
            ("--notify-lease-timeout", notify_lease),
        ] {
            if secs + GRANT_MARGIN >= max {
                warn!(
                    "{flag} {:.3} s is not below /proc/sys/fs/lease-break-time ({} s): the kernel would let host writers through before guest leases end",
                    secs.as_secs_f64(),
                    max.as_secs()
                );
            }
        }
        // The kernel takes a lease back after lease-break-time whatever we do: end holds of a
        // paused guest ourselves before that, so each such case is counted and logged.
        let longest = lease.max(notify_lease) + GRANT_MARGIN;
        pause_bound = pause_bound.min(max.saturating_sub(longest + Duration::from_secs(1)));
    }
    // Linux 6.19's delegations give names the pre-modify hold file data has, where the
    // share's filesystem takes them (probed on its root).
    let delegations = crate::passthrough::ReadOnly::new(libc::O_DIRECTORY)
        .and_then(|flags| fs.reopen_inode(crate::passthrough::ROOT_INODE, flags))
        .map(|root| host_lease::probe_delegations(root.as_raw_fd()))
        .unwrap_or_else(|e| host_lease::Delegations::Refused(e.raw_os_error().unwrap_or(0)));
    let table = Arc::new(
        LeaseTable::new(
            lease,
            notify_lease,
            Arc::downgrade(fs),
            Some(notifier),
            clock,
            pause_bound,
        )
        .with_adaptive(adaptive)
        .with_delegations(delegations == host_lease::Delegations::OnDirectories)
        .with_watch_by_descriptor(watched_by_descriptor),
    );
    if let Err(e) = table.spawn() {
        warn!("leases unavailable ({e}); guests revalidate every access");
        return None;
    }
    fs.add_observer(table.clone());
    fs.set_lease_keeper(table.clone());
    info!(
        "leases: {:.3} s per grant ({:.3} s for a notify-capable guest), counted in guest-running time; host writers are held until the guest's lease ends or a notify-capable guest confirms, and at most {:.0} s longer while the guest is paused; {}",
        lease.as_secs_f64(),
        notify_lease.as_secs_f64(),
        pause_bound.as_secs_f64(),
        match adaptive {
            Some(a) => format!(
                "adaptive for stock guests: {:.1} s cool-down after a host write (up to {:.0} s), renewals stop for {:.1} s in the directory written (share-wide at {} directories)",
                a.cooldown.as_secs_f64(),
                a.max_cooldown.as_secs_f64(),
                a.burst_window.as_secs_f64(),
                a.burst_dirs
            ),
            None => "not adaptive (--lease-cooldown 0)".to_string(),
        }
    );
    info!(
        "host events: {}; delegations: {}",
        if delegations == host_lease::Delegations::OnDirectories {
            "file delegations (F_SETDELEG) for file data, attributes and the file's names"
        } else {
            "file leases (F_SETLEASE) for file data and attributes"
        },
        delegations.describe()
    );
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_state_stays_small() {
        assert_eq!(
            std::mem::size_of::<Lease>(),
            16,
            "one per inode the guest caches"
        );
    }

    /// Counts the bytes each thread has allocated and not freed, so a test can measure its own
    /// data structures while other tests run on other threads.
    struct CountingAllocator;

    thread_local! {
        static LIVE_BYTES: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: forwards to the system allocator unchanged; only counts.
    unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            let _ = LIVE_BYTES.try_with(|b| b.set(b.get() + layout.size() as isize));
            // SAFETY: same contract as ours.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            let _ = LIVE_BYTES.try_with(|b| b.set(b.get() - layout.size() as isize));
            // SAFETY: same contract as ours.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: CountingAllocator = CountingAllocator;

    fn live_bytes() -> isize {
        LIVE_BYTES.with(|b| b.get())
    }

    #[test]
    fn a_million_leases_measured() {
        // The lease table's own memory per cached inode, as the table stores leases: in its
        // shards, with nothing else per lease (holds, writes in flight, acquisitions and
        // refusals are transient side entries). Measured at a million, and at counts where
        // the hash tables have just grown (the most spare capacity).
        let clock = Arc::new(GuestClock::with_source(|| 0));
        for n in [1_000_000u64, 500_000, 460_000, 30_000] {
            let before = live_bytes();
            let table = LeaseTable::new(
                Duration::from_secs(1),
                Duration::from_secs(10),
                Weak::new(),
                None,
                clock.clone(),
                PAUSE_BOUND,
            );
            for node in 2..n + 2 {
                table.shard(node).leases.insert(
                    node,
                    Lease {
                        attr_until: Tick(node as u32),
                        cache: CacheMark::at(node as i64),
                        file: None,
                    },
                );
            }
            let per_lease = (live_bytes() - before) as u64 / n;
            eprintln!("{n} leases: {per_lease} bytes each");
            assert_eq!(table.len() as u64, n);
            // 16-byte lease, 8-byte key, a control byte, and the hash tables' spare capacity
            // (at worst 7/16 full right after growing): at most 57 bytes whatever the count.
            assert!(per_lease <= 64, "{per_lease} bytes per lease at {n}");
        }
    }

    #[test]
    fn lease_ends_read_across_the_wrap_and_never_early() {
        let longest = 10_001;
        // Rounded: an end rounds up, now rounds down.
        assert_eq!(Tick::end(1, Duration::from_secs(1)), Tick(1001));
        assert_eq!(Tick::now(999_999), Tick(0));
        assert_eq!(Tick(1001).remaining(Tick(0), longest), Some(1001));
        assert_eq!(Tick(1001).remaining(Tick(1001), longest), None, "over");
        assert_eq!(Tick(1001).remaining(Tick(5000), longest), None, "long over");
        // Across the wrap of the 32-bit millisecond count.
        let now = Tick(u32::MAX - 10);
        assert_eq!(Tick(20).remaining(now, longest), Some(31));
        // An end from about 24 days ago (half the wrap) is over, not ahead.
        assert_eq!(Tick(5).remaining(Tick(5 + (1 << 31)), longest), None);
        // An end left from a grant a whole wrap ago reads as ahead only within the longest
        // lease, so a host writer waits at most that long for nothing.
        let stale = Tick::end(0, Duration::from_secs(1));
        let wrapped_now = Tick::now((1u64 << 32) * NS_PER_MS + 500 * NS_PER_MS);
        assert_eq!(stale.remaining(wrapped_now, longest), Some(500));
        let later = Tick::now((1u64 << 32) * NS_PER_MS + 20_000 * NS_PER_MS);
        assert_eq!(stale.remaining(later, longest), None);
    }

    #[test]
    fn a_grant_extends_a_lease_and_never_shortens_it() {
        let mut lease = Lease::default();
        let s = 1_000_000_000;
        extend(&mut lease, 0, Duration::from_secs(10), 10_001);
        assert_eq!(lease.attr_until, Tick(10_000));
        extend(&mut lease, s, Duration::from_secs(1), 10_001);
        assert_eq!(
            lease.attr_until,
            Tick(10_000),
            "a shorter grant keeps the longer end"
        );
        extend(&mut lease, 2 * s, Duration::ZERO, 10_001);
        assert_eq!(lease.attr_until, Tick(10_000));
        extend(&mut lease, 20 * s, Duration::from_secs(1), 10_001);
        assert_eq!(lease.attr_until, Tick(21_000));
    }

    #[test]
    fn refusals_back_off_by_cause() {
        let ms = 1_000_000;
        let first = Refusal::next(None, Refused::OpenForWrite, 0);
        assert_eq!(first.retry_at_ns, 100 * ms);
        let second = Refusal::next(Some(first), Refused::OpenForWrite, 100 * ms);
        assert_eq!(
            second.retry_at_ns,
            300 * ms,
            "doubles while refusals follow"
        );
        let mut r = second;
        for _ in 0..20 {
            r = Refusal::next(Some(r), Refused::OpenForWrite, 0);
        }
        assert_eq!(r.period_ns, REFUSAL_MAX.as_nanos() as u64, "capped");
        let lasting = Refusal::next(None, Refused::Unsupported, 0);
        assert_eq!(lasting.retry_at_ns, REFUSAL_LASTING.as_nanos() as u64);
        assert_eq!(lasting.why, Refused::Unsupported);
    }

    #[test]
    fn cache_marks_keep_only_what_matches() {
        assert!(!CacheMark::NEVER.validated());
        assert!(!CacheMark::NEVER.matches(i64::MIN));
        assert!(CacheMark::SUSPECT.validated());
        assert!(!CacheMark::SUSPECT.matches(i64::MIN + 1));
        assert!(CacheMark::at(5).matches(5));
        assert!(!CacheMark::at(5).matches(6));
        assert!(
            CacheMark::at(i64::MIN).known(),
            "a ctime never collides with the marks"
        );
    }

    /// A table on a fake clock, with one regular file (node 7) leased to the guest until
    /// `expires` (guest-running time) and a descriptor standing in for its host lease.
    fn table_with_one_lease(
        expires: Duration,
        bound: Duration,
    ) -> (Arc<LeaseTable>, Arc<AtomicU64>, Arc<GuestClock>, RawFd) {
        let host_ns = Arc::new(AtomicU64::new(1_000));
        let source = host_ns.clone();
        let clock = Arc::new(GuestClock::with_source(move || {
            source.load(Ordering::SeqCst)
        }));
        let table = Arc::new(LeaseTable::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
            Weak::new(),
            None,
            clock.clone(),
            bound,
        ));
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = file.as_raw_fd();
        table.shard(7).leases.insert(
            7,
            Lease {
                file: Some(OwnedFd::from(file)),
                attr_until: Tick::end(0, expires),
                ..Lease::default()
            },
        );
        table.host_leases.fetch_add(1, Ordering::Relaxed);
        (table, host_ns, clock, fd)
    }

    fn advance(host_ns: &AtomicU64, by: Duration) {
        host_ns.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    fn held(table: &LeaseTable) -> bool {
        table.release_due();
        table.shard(7).holds.contains_key(&7)
    }

    /// `table_with_one_lease`'s node 7 as a directory whose names the guest was given until
    /// `expires`, under a delegation (the descriptor stands in for it).
    fn table_with_one_delegation(
        expires: Duration,
    ) -> (Arc<LeaseTable>, Arc<AtomicU64>, Arc<GuestClock>, RawFd) {
        let (table, host_ns, clock, fd) = table_with_one_lease(expires, Duration::from_secs(30));
        let mut table = Arc::into_inner(table).expect("the only reference");
        table.delegations = true;
        (Arc::new(table), host_ns, clock, fd)
    }

    #[test]
    fn names_under_a_delegation_get_lease_time_until_a_host_change_breaks_it() {
        let (table, host_ns, _clock, fd) = table_with_one_delegation(Duration::from_millis(200));
        assert!(table.delegating(), "a stock guest");
        let lease = Duration::from_secs(1);
        assert_eq!(table.grant_names(7, lease), lease);
        advance(&host_ns, Duration::from_millis(500));
        assert_eq!(table.grant_names(7, lease), lease, "renewed");
        // A host unlink in the directory: held until the last name granted (at 0.5 s, for
        // 1 s) has run out, plus the margin.
        assert_eq!(table.host_break(7, fd), BreakFound::Handled);
        assert_eq!(
            table.grant_names(7, lease),
            Duration::ZERO,
            "no name time while a host change waits"
        );
        advance(&host_ns, Duration::from_millis(1_000));
        assert!(held(&table), "the name granted at 0.5 s is still trusted");
        advance(&host_ns, Duration::from_millis(110));
        assert!(
            !held(&table),
            "names and margin are over: the host change goes on"
        );
        assert_eq!(table.descriptors(), 0, "the delegation is given up");
    }

    #[test]
    fn without_a_delegation_names_get_no_lease_time_and_no_retry_per_request() {
        let (table, _host_ns, _clock, _fd) = table_with_one_delegation(Duration::ZERO);
        let lease = Duration::from_secs(1);
        // Node 5 is not in the (absent) filesystem: no delegation can be had.
        assert_eq!(table.grant_names(5, lease), Duration::ZERO);
        assert_eq!(table.stats.refused.load(Ordering::Relaxed), 1);
        assert_eq!(table.grant_names(5, lease), Duration::ZERO);
        assert_eq!(
            table.stats.deferred.load(Ordering::Relaxed),
            1,
            "backed off"
        );
        assert_eq!(table.stats.delegations.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_guests_own_name_change_gives_the_delegation_up_first() {
        let (table, _host_ns, _clock, _fd) = table_with_one_delegation(Duration::from_secs(1));
        table.begin_change(7);
        assert_eq!(table.descriptors(), 0, "given up before the guest's change");
        assert_eq!(table.stats.own_changes.load(Ordering::Relaxed), 1);
        assert_eq!(
            table.grant_names(7, Duration::from_secs(1)),
            Duration::ZERO,
            "no name time while the guest's own change runs"
        );
        table.end_change(7);
        let s = table.shard(7);
        assert!(!s.own_writers.contains_key(&7));
        // It tried to take a new delegation at once for the names granted before (here the
        // node is in no filesystem: nothing to take, nothing left marked).
        assert!(!s.acquiring.contains(&7));
        assert!(s.leases.get(&7).is_some_and(|l| l.file.is_none()));
    }

    #[test]
    fn a_write_lease_is_given_up_before_our_own_open_and_only_a_write_lease() {
        let (table, _host_ns, _clock, _fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        // A read lease stays: our read-only opens do not break it.
        table.give_up_write_lease_of(7);
        assert_eq!(table.descriptors(), 1);
        table.shard(7).write_leased.insert(7);
        table.give_up_write_lease_of(7);
        assert_eq!(table.descriptors(), 0, "given up before our open breaks it");
        assert!(table.shard(7).write_leased.is_empty());
        assert_eq!(table.stats.write_leases_given_up.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_write_lease_a_host_opener_broke_is_kept_until_the_hold_ends() {
        let (table, host_ns, _clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        table.shard(7).write_leased.insert(7);
        assert_eq!(table.host_break(7, fd), BreakFound::Handled);
        // Our own open now waits behind the held host opener, like another one: giving the
        // lease up would let that opener through while the guest may still use its cache.
        table.give_up_write_lease_of(7);
        assert_eq!(table.descriptors(), 1, "kept for the hold");
        assert_eq!(
            take_write_lease(&mut table.shard(7), 7).map(drop),
            None,
            "nor given up at the guest's close"
        );
        advance(&host_ns, Duration::from_millis(1_110));
        assert!(!held(&table));
        assert_eq!(table.descriptors(), 0, "the hold's end gave it up");
        assert!(table.shard(7).write_leased.is_empty());
    }

    #[test]
    fn a_break_names_its_lease_by_descriptor() {
        let (table, _host_ns, _clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(table.host_break(8, fd), BreakFound::NotThis, "another node");
        assert_eq!(
            table.host_break(7, fd + 1000),
            BreakFound::NotThis,
            "another fd"
        );
        table.shard(9).acquiring.insert(9);
        assert_eq!(
            table.host_break(9, fd),
            BreakFound::NotYet,
            "a lease being installed is looked at again"
        );
        assert_eq!(table.host_break(7, fd), BreakFound::Handled);
        assert_eq!(table.descriptors(), 1, "held, not released yet");
    }

    #[test]
    fn a_host_writer_waits_out_the_lease_plus_the_margin() {
        let (table, host_ns, _clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        table.host_break(7, fd);
        assert!(held(&table));
        advance(&host_ns, Duration::from_millis(1_050));
        assert!(held(&table), "inside the grant margin");
        advance(&host_ns, Duration::from_millis(60));
        assert!(!held(&table), "lease and margin are over");
        assert_eq!(table.stats.held.load(Ordering::Relaxed), 1);
        assert_eq!(table.stats.pause_bound_ended.load(Ordering::Relaxed), 0);
        assert_eq!(table.descriptors(), 0, "the host lease is given up");
    }

    #[test]
    fn a_writer_after_the_lease_ran_out_is_not_held() {
        let (table, host_ns, _clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        advance(&host_ns, Duration::from_millis(1_001));
        table.host_break(7, fd);
        assert!(!held(&table));
        assert_eq!(table.stats.unheld_breaks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_paused_guests_lease_stands_still_and_so_does_the_hold() {
        let (table, host_ns, clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        table.host_break(7, fd);
        advance(&host_ns, Duration::from_millis(500));
        clock.pause();
        // Five seconds of pause: the guest's timer did not move, nor does the hold.
        advance(&host_ns, Duration::from_secs(5));
        assert!(held(&table), "released while the guest was paused");
        assert_eq!(
            table.release_due(),
            Some(PAUSED_POLL),
            "looks again soon while paused"
        );
        clock.resume();
        advance(&host_ns, Duration::from_millis(550));
        assert!(
            held(&table),
            "the guest has run 1.05 s of its 1 s lease plus margin"
        );
        advance(&host_ns, Duration::from_millis(100));
        assert!(!held(&table));
        assert_eq!(table.stats.pause_bound_ended.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_pause_longer_than_the_bound_lets_the_writer_through_counted() {
        let bound = Duration::from_secs(3);
        let (table, host_ns, clock, fd) = table_with_one_lease(Duration::from_secs(1), bound);
        table.host_break(7, fd);
        clock.pause();
        // The writer waits its lease (1.1 s) plus the bound, in host time.
        advance(&host_ns, Duration::from_millis(4_000));
        assert!(held(&table));
        advance(&host_ns, Duration::from_millis(200));
        assert!(!held(&table), "the bound ends the hold");
        assert_eq!(table.stats.pause_bound_ended.load(Ordering::Relaxed), 1);
        assert_eq!(table.stats.held.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_second_break_during_the_same_pause_is_its_own_hold() {
        let (table, host_ns, clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        clock.pause();
        table.host_break(7, fd);
        let first = table.shard(7).holds[&7].since_ns;
        advance(&host_ns, Duration::from_millis(10));
        table.host_break(7, fd); // the kernel repeats the signal: still one hold
        assert_eq!(table.shard(7).holds[&7].since_ns, first);
        assert_eq!(table.stats.broken.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn timestamps_compare_to_the_nanosecond() {
        assert_eq!(ns(1, 5), 1_000_000_005);
        assert_ne!(ns(1, 5), ns(1, 6));
        assert_eq!(
            ns(i64::MAX, 1),
            i64::MAX,
            "saturates instead of overflowing"
        );
    }
}
