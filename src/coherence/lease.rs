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
//!   revalidates before every read.
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

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::stat64;
use log::{debug, info, warn};

use crate::coherence::adaptive::{Adaptive, AdaptiveConfig};
use crate::coherence::guest_clock::GuestClock;
use crate::coherence::notifier::{Notification, Notifier};
use crate::metrics::Histogram;
use crate::passthrough::{InodeData, InodeObserver, LeaseKeeper, PassthroughFs, ReadOnly};

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

const F_SETLEASE: libc::c_int = 1024;
const F_SETSIG: libc::c_int = 10;

/// The signal the kernel sends us when a host process breaks one of our leases. Blocked in
/// every thread ([`block_signals`]) and read through a signalfd.
fn lease_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// Block the lease-break signal (and SIGUSR1, which logs the metrics) in the calling thread
/// and every thread it starts afterwards. Must run before the daemon starts any thread: an
/// unblocked real-time signal would terminate the process.
pub fn block_signals() -> io::Result<()> {
    let set = signal_set();
    // SAFETY: set is a valid, initialised sigset.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, lease_signal());
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    }
}

/// Counters, logged on SIGUSR1 and at exit (docs/coherency.md, "Metrics").
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Host file leases taken.
    pub acquired: AtomicU64,
    /// Host file leases that could not be taken (the file is open for writing somewhere, the
    /// filesystem has no leases, or half the descriptor limit is already spent on leases):
    /// the guest revalidates instead.
    pub refused: AtomicU64,
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
}

impl LeaseStats {
    fn line(&self, entries: usize, stale_names: u64, cooling: &str) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let held = g(&self.held);
        format!(
            "leases: {entries} inodes tracked, {} file leases taken, {} refused, {} broken by host writers, {} given up for guest writes; {held} host writers held, mean {} us, max {} us ({}); {} revocations sent, {} holds ended by confirmation; {} requests answered ESTALE for a stale guest name, {} cache drops at open; {} holds ended by the pause bound while the guest was paused; adaptive: {} grants without lease time while cooling, {} host writers not held (the guest's lease had run out), {cooling}",
            g(&self.acquired),
            g(&self.refused),
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
        )
    }
}

/// What the guest was told about one inode. Kept small: one per inode the guest caches.
#[derive(Default)]
struct Lease {
    /// The O_RDONLY descriptor carrying our host file lease (regular files only).
    file: Option<OwnedFd>,
    /// When the last attribute lease we granted runs out (ns since the table's epoch); a
    /// host writer is held until then.
    attr_expires_ns: u64,
    /// The inode's ctime (ns) when the guest's cached pages or listing were last known to be
    /// what the host has: at its last OPEN/OPENDIR, or when it closed its own writes. ctime,
    /// not mtime: userspace can set mtime back (touch -r, cp -p, rsync -t) but not ctime.
    /// 0: never validated.
    cache_ctime_ns: i64,
    /// A host change may have happened since `cache_ctime_ns` without moving ctime visibly (a
    /// lease break, or a validation within one coarse timestamp tick with no host lease to
    /// catch a writer): the next OPEN drops the cache whatever ctime says.
    cache_suspect: bool,
    /// A host writer is waiting for the lease to be released: grant no attribute time.
    breaking: bool,
    /// Our own opens for writing in flight: do not take a lease meanwhile.
    own_writers: u16,
}

struct Table {
    leases: HashMap<u64, Lease>,
    /// Lease descriptor -> node id, to find the inode a break signal names.
    by_fd: HashMap<RawFd, u64>,
    /// Pending releases, earliest first: (due, node, lease fd, hold start).
    releases: BinaryHeap<std::cmp::Reverse<(u64, u64, RawFd, u64)>>,
    /// Host writers waiting, by node: when the hold started, and the id of the notification
    /// whose confirmation ends it early (0: none sent).
    holds: HashMap<u64, Hold>,
    /// The pause bound of each hold, earliest first: (host-time deadline, node, hold start).
    pause_bounds: BinaryHeap<std::cmp::Reverse<(u64, u64, u64)>>,
    /// Cool-downs after host writes (stock guests), when adaptive leases are on.
    adaptive: Option<Adaptive>,
}

#[derive(Clone, Copy)]
struct Hold {
    /// When the writer started waiting, in host time ([`GuestClock::now_ns`]): the hold's
    /// identity and the start of its pause bound.
    since_ns: u64,
    notification: u64,
}

/// The lease table and its host-lease handling. Installed into the passthrough filesystem as
/// its [`LeaseKeeper`] in `--cache coherent` with a non-zero `--lease-timeout`.
pub struct LeaseTable {
    table: Mutex<Table>,
    /// The lease of a stock guest, and of one that negotiated the notification queue (told of
    /// changes, so it may cache longer).
    lease: Duration,
    notify_lease: Duration,
    /// Guest-running time: leases are counted in it, since a paused guest's timers stand still.
    clock: Arc<GuestClock>,
    /// The longest a host writer waits beyond the guest's lease while the guest is paused.
    pause_bound: Duration,
    /// Opens our inodes read-only to take host leases (weak: the filesystem owns us).
    fs: Weak<PassthroughFs>,
    /// Tells notify-capable guests about breaks.
    notifier: Option<Arc<Notifier>>,
    /// Most host leases held at once: each costs a descriptor, and the inode table needs the
    /// rest (half of RLIMIT_NOFILE).
    max_host_leases: usize,
    pub stats: LeaseStats,
}

/// Half the descriptors this process may open.
fn host_lease_budget() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid out pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 512;
    }
    (limit.rlim_cur / 2).min(usize::MAX as u64) as usize
}

fn ns(ts_sec: i64, ts_nsec: i64) -> i64 {
    ts_sec.saturating_mul(1_000_000_000).saturating_add(ts_nsec)
}

/// How close to the wall clock a ctime must be for a later change to possibly share its value:
/// the kernel stamps ctime from a clock that advances once per timer tick (up to 10 ms), or
/// finer with multigrain timestamps. Twice the coarsest tick.
const COARSE_TIMESTAMP_SLACK_NS: i64 = 20_000_000;

/// Whether `ctime` is so recent that another change could still get the same stamp.
fn ctime_is_recent(ctime: i64) -> bool {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: now is a valid out pointer.
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
    /// A table granting leases of `lease` on inodes of `fs`, or of `notify_lease` once the
    /// guest negotiated the notification queue, telling breaks to it through `notifier`.
    /// Lease expiries and holds are counted in `clock`'s guest-running time; a hold that a
    /// paused guest stretches ends at most `pause_bound` of host time after its lease would
    /// have ended had the guest kept running.
    pub fn new(
        lease: Duration,
        notify_lease: Duration,
        fs: Weak<PassthroughFs>,
        notifier: Option<Arc<Notifier>>,
        clock: Arc<GuestClock>,
        pause_bound: Duration,
    ) -> Self {
        LeaseTable {
            table: Mutex::new(Table {
                leases: HashMap::new(),
                by_fd: HashMap::new(),
                releases: BinaryHeap::new(),
                holds: HashMap::new(),
                pause_bounds: BinaryHeap::new(),
                adaptive: None,
            }),
            lease,
            notify_lease,
            clock,
            pause_bound,
            fs,
            notifier,
            max_host_leases: host_lease_budget(),
            stats: LeaseStats::default(),
        }
    }

    /// The lease a reply about `data` grants now: the long one only for a notify-capable
    /// guest and only while the host watcher reports changes of `data` and of the directories
    /// the guest holds its names in (a fanotify mark can fail: max_user_marks, EMFILE).
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

    /// Adapt leases to host writes (see [`crate::coherence::adaptive`]); `None`: fixed
    /// leases.
    pub fn with_adaptive(self, cfg: Option<AdaptiveConfig>) -> Self {
        self.lock().adaptive = cfg.map(Adaptive::new);
        self
    }

    /// Whether grants adapt to host writes now: on, and the guest is a stock one (a
    /// notify-capable guest is told of writes and holds writers only for its confirmation).
    fn adapting(&self) -> bool {
        !self.notifier.as_ref().is_some_and(|n| n.active())
    }

    /// The directories the guest holds names of node `node` in (for adaptive leases). Must
    /// be called without the table's lock: it takes the inode table's.
    fn parents_of(&self, node: u64) -> Vec<u64> {
        self.fs
            .upgrade()
            .and_then(|fs| fs.inode_fd(node))
            .map(|data| data.parent_nodes())
            .unwrap_or_default()
    }

    /// Guest-running nanoseconds: what lease expiries are measured in.
    fn now_ns(&self) -> u64 {
        self.clock.running_ns()
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every update keeps the table consistent between statements that can panic.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of inodes with lease state.
    pub fn len(&self) -> usize {
        self.lock().leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take a host read lease on `data`, reporting breaks with our signal. `None` when the
    /// host will not give one (the file is open for writing, or no lease support).
    fn take_host_lease(&self, data: &InodeData) -> Option<OwnedFd> {
        let fs = self.fs.upgrade()?;
        // O_NONBLOCK: should someone hold a write lease, fail instead of waiting for it.
        // O_NOATIME needs ownership or CAP_FOWNER; retry without it.
        let with_noatime = ReadOnly::new(libc::O_NONBLOCK | libc::O_NOATIME).ok()?;
        let plain = ReadOnly::new(libc::O_NONBLOCK).ok()?;
        let file = fs
            .reopen_data(data, with_noatime)
            .or_else(|_| fs.reopen_data(data, plain))
            .ok()?;
        let fd = OwnedFd::from(file);
        // SAFETY: fcntl on our descriptor with integer arguments.
        let ok = unsafe {
            libc::fcntl(fd.as_raw_fd(), F_SETSIG, lease_signal()) == 0
                && libc::fcntl(fd.as_raw_fd(), F_SETLEASE, libc::F_RDLCK) == 0
        };
        if !ok {
            debug!(
                "no host lease on node {}: {}",
                data.inode,
                io::Error::last_os_error()
            );
            return None;
        }
        Some(fd)
    }

    /// A host process wants to write the file whose lease descriptor is `fd`: hold it until
    /// the guest's attribute lease has run out, or a notify-capable guest confirmed it
    /// dropped what it cached.
    fn on_break(self: &Arc<Self>, fd: RawFd) {
        // The node's directories, read before the table's lock (lock order: inode table,
        // then lease table).
        let parents = match self.lock().by_fd.get(&fd) {
            Some(&node) if self.adapting() => self.parents_of(node),
            _ => Vec::new(),
        };
        let now = self.now_ns();
        let host_now = self.clock.now_ns();
        let mut t = self.lock();
        let t = &mut *t;
        let Some(&node) = t.by_fd.get(&fd) else {
            return; // Already released.
        };
        let Some(lease) = t.leases.get_mut(&node) else {
            return;
        };
        if lease.breaking {
            return;
        }
        lease.breaking = true;
        // The writer may change data without moving ctime visibly (same tick) or set mtime
        // back: the next OPEN must not keep the guest's pages whatever the timestamps say.
        lease.cache_suspect = true;
        self.stats.broken.fetch_add(1, Ordering::Relaxed);
        let guest_may_cache = lease.attr_expires_ns > now;
        if !guest_may_cache {
            self.stats.unheld_breaks.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(adaptive) = t.adaptive.as_mut().filter(|_| self.adapting()) {
            adaptive.expire(host_now);
            adaptive.host_wrote(node, &parents, host_now);
        }
        let release_at = if guest_may_cache {
            lease.attr_expires_ns + GRANT_MARGIN.as_nanos() as u64
        } else {
            now
        };
        let mut hold = Hold {
            since_ns: host_now,
            notification: 0,
        };
        if let Some(notifier) = self
            .notifier
            .as_ref()
            .filter(|n| guest_may_cache && n.active())
        {
            let table = Arc::downgrade(self);
            hold.notification = notifier.send_tracked(
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
        }
        debug!(
            "host writer on node {node}: holding it up to {} ms{}",
            (release_at - now) / 1_000_000,
            if hold.notification != 0 {
                " or until the guest confirms"
            } else {
                ""
            }
        );
        t.holds.insert(node, hold);
        t.releases
            .push(std::cmp::Reverse((release_at, node, fd, host_now)));
        // Should the guest be paused, its lease stands still with it: bound the writer's wait
        // in host time too.
        let bound = host_now + (release_at - now) + self.pause_bound.as_nanos() as u64;
        t.pause_bounds
            .push(std::cmp::Reverse((bound, node, host_now)));
    }

    /// The guest confirmed the revocation of the hold on `node` that started at `since_ns`.
    fn confirmed(&self, node: u64, since_ns: u64) {
        let mut t = self.lock();
        if t.holds.get(&node).map(|h| h.since_ns) != Some(since_ns) {
            return; // That hold already ended.
        }
        self.stats
            .released_on_confirmation
            .fetch_add(1, Ordering::Relaxed);
        self.end_hold(&mut t, node);
    }

    /// Let the writer held on `node` through: give up the host lease, count the hold.
    fn end_hold(&self, t: &mut Table, node: u64) {
        let Some(hold) = t.holds.remove(&node) else {
            return;
        };
        if let Some(lease) = t.leases.get_mut(&node) {
            Self::drop_host_lease_in(&mut t.by_fd, lease);
        }
        if hold.notification != 0 {
            if let Some(n) = &self.notifier {
                n.cancel(hold.notification);
            }
        }
        let held_us = self.clock.now_ns().saturating_sub(hold.since_ns) / 1000;
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        self.stats
            .hold_us_total
            .fetch_add(held_us, Ordering::Relaxed);
        self.stats.hold_us.record(held_us);
    }

    /// Release every lease whose hold is over; returns how long until the next check. A hold
    /// is over when the guest's lease has run out in guest-running time, or, while the guest is
    /// paused, when its pause bound (host time) has passed.
    fn release_due(&self) -> Option<Duration> {
        let now = self.now_ns();
        let host_now = self.clock.now_ns();
        let paused = self.clock.is_paused();
        let mut t = self.lock();
        let mut next: Option<Duration> = None;
        while let Some(&std::cmp::Reverse((at, node, _fd, since))) = t.releases.peek() {
            if at > now {
                // Guest time stands still while paused: look again soon after it resumes.
                let wait = if paused {
                    PAUSED_POLL
                } else {
                    Duration::from_nanos(at - now)
                };
                next = Some(wait);
                break;
            }
            t.releases.pop();
            if t.holds.get(&node).map(|h| h.since_ns) == Some(since) {
                self.end_hold(&mut t, node);
            } // Else released meanwhile (confirmed, forgotten, or the guest wrote itself).
        }
        while let Some(&std::cmp::Reverse((bound, node, since))) = t.pause_bounds.peek() {
            if t.holds.get(&node).map(|h| h.since_ns) != Some(since) {
                t.pause_bounds.pop(); // That hold already ended.
                continue;
            }
            if bound > host_now {
                let wait = Duration::from_nanos(bound - host_now);
                next = Some(next.map_or(wait, |n| n.min(wait)));
                break;
            }
            t.pause_bounds.pop();
            self.stats.pause_bound_ended.fetch_add(1, Ordering::Relaxed);
            warn!(
                "host writer on node {node} let through after {} ms: the guest has been paused past the bound ({} s); it may use what it cached of that file until it resumes and its lease runs out",
                (host_now - since) / 1_000_000,
                self.pause_bound.as_secs_f64()
            );
            self.end_hold(&mut t, node);
        }
        next
    }

    /// Give up a host lease now, letting a held writer through.
    fn drop_host_lease_in(by_fd: &mut HashMap<RawFd, u64>, lease: &mut Lease) {
        if let Some(fd) = lease.file.take() {
            by_fd.remove(&fd.as_raw_fd());
            // SAFETY: fcntl on our descriptor.
            unsafe { libc::fcntl(fd.as_raw_fd(), F_SETLEASE, libc::F_UNLCK) };
        }
        lease.breaking = false;
    }

    /// Serve lease breaks and SIGUSR1 until the process exits.
    pub fn spawn(self: &Arc<Self>) -> io::Result<()> {
        let set = signal_set();
        // SAFETY: valid sigset; the result is checked.
        let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if sfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
        let table = self.clone();
        thread::Builder::new()
            .name("leasefs-leases".into())
            .spawn(move || table.run(sfd))
            .map(|_| ())
    }

    fn run(self: &Arc<Self>, sfd: OwnedFd) {
        loop {
            let wait = self.release_due();
            let timeout_ms = wait.map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
            let mut pfd = libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if n <= 0 {
                continue;
            }
            // SAFETY: signalfd_siginfo is plain data; read fills it or fails.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: info is valid for `size` bytes.
            let r = unsafe {
                libc::read(
                    sfd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            if r != size as isize {
                continue;
            }
            if info.ssi_signo == libc::SIGUSR1 as u32 {
                self.log_stats();
            } else if info.ssi_signo == lease_signal() as u32 {
                self.on_break(info.ssi_fd);
            }
        }
    }

    /// Log the counters (at exit).
    pub fn log_stats(&self) {
        let stale_names = self.fs.upgrade().map_or(0, |fs| fs.stale_name_answers());
        let cooling = match &self.lock().adaptive {
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

impl LeaseKeeper for LeaseTable {
    fn descriptors(&self) -> usize {
        self.lock().by_fd.len()
    }

    fn grant(
        &self,
        data: &InodeData,
        st: &mut stat64,
        entry: bool,
        acquire: bool,
    ) -> (Duration, Duration) {
        let now = self.now_ns();
        let granted = self.granted_lease(data);
        let adapting = is_reg(data.mode) && self.adapting();
        // Read before the table's lock (it takes the inode's names lock).
        let parents = if adapting {
            data.parent_nodes()
        } else {
            Vec::new()
        };
        let mut t = self.lock();
        let t = &mut *t;
        // A file the host writes (or whose neighbours it writes) gets no lease time for now:
        // no host lease is taken, so the host's next writes are not held either.
        let cooling = match t.adaptive.as_mut().filter(|_| adapting) {
            Some(adaptive) => adaptive
                .withheld(data.inode, &parents, ctime_ns(st), self.clock.now_ns())
                .is_some(),
            None => false,
        };
        if cooling {
            self.stats.cooled_grants.fetch_add(1, Ordering::Relaxed);
        }
        let lease = t.leases.entry(data.inode).or_default();
        let mut attr = granted;
        if is_reg(data.mode) {
            let leases_held = t.by_fd.len();
            if lease.file.is_none()
                && acquire
                && !lease.breaking
                && lease.own_writers == 0
                && !cooling
            {
                // Half the descriptors at most, and never into what the daemon keeps for
                // itself: the guest's nodes and handles and the leases share one budget.
                let within_budget = leases_held < self.max_host_leases
                    && self.fs.upgrade().is_none_or(|fs| {
                        fs.descriptors_held() + leases_held < fs.descriptor_budget()
                    });
                match within_budget.then(|| self.take_host_lease(data)).flatten() {
                    Some(fd) => {
                        self.stats.acquired.fetch_add(1, Ordering::Relaxed);
                        // What we reply must be read under the lease: a write that landed
                        // before we took it is in these attributes.
                        if let Ok(info) = crate::passthrough::statx_info(data) {
                            *st = info;
                        }
                        t.by_fd.insert(fd.as_raw_fd(), data.inode);
                        lease.file = Some(fd);
                    }
                    None => {
                        self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if lease.file.is_none() || lease.breaking || cooling {
                attr = Duration::ZERO;
            }
        }
        if !attr.is_zero() {
            lease.attr_expires_ns = lease.attr_expires_ns.max(now + attr.as_nanos() as u64);
        }
        let _ = entry;
        (attr, granted)
    }

    fn check_open(&self, data: &InodeData, st: &stat64) -> bool {
        let mut t = self.lock();
        let lease = t.leases.entry(data.inode).or_default();
        let ctime = ctime_ns(st);
        let keep =
            lease.cache_ctime_ns != 0 && lease.cache_ctime_ns == ctime && !lease.cache_suspect;
        if !keep && lease.cache_ctime_ns != 0 {
            self.stats.cache_drops.fetch_add(1, Ordering::Relaxed);
        }
        // From this reply on, the guest's cache is what the host has now (kept because
        // unchanged, or dropped). A later change shows in ctime, unless it lands in the same
        // timestamp tick: then only a host lease (regular files) catches the writer.
        let lease_catches_writers = lease.file.is_some() && !lease.breaking;
        lease.cache_ctime_ns = ctime;
        lease.cache_suspect = !lease_catches_writers && ctime_is_recent(ctime);
        keep
    }

    fn begin_write(&self, data: &InodeData) {
        let mut t = self.lock();
        let t = &mut *t;
        let lease = t.leases.entry(data.inode).or_default();
        lease.own_writers = lease.own_writers.saturating_add(1);
        if lease.breaking {
            // A host writer is held until the guest's lease ends (or it confirms). Letting our
            // open through now would let that writer through too, while the guest may still
            // use what it cached: keep the host lease; our open waits in the kernel with the
            // host writer and goes on when the hold ends.
            return;
        }
        if lease.file.is_some() {
            self.stats.own_writes.fetch_add(1, Ordering::Relaxed);
            Self::drop_host_lease_in(&mut t.by_fd, lease);
        }
    }

    fn write_handle_closed(&self, data: &InodeData, st: &stat64) {
        let mut t = self.lock();
        let Some(lease) = t.leases.get_mut(&data.inode) else {
            return;
        };
        // The guest's pages hold its own writes. If they were what the host had before (not
        // suspect), they still are: keep them across the next open.
        if !lease.cache_suspect && lease.cache_ctime_ns != 0 {
            let ctime = ctime_ns(st);
            lease.cache_ctime_ns = ctime;
            lease.cache_suspect = ctime_is_recent(ctime);
        }
    }

    fn end_write(&self, data: &InodeData) {
        if let Some(lease) = self.lock().leases.get_mut(&data.inode) {
            lease.own_writers = lease.own_writers.saturating_sub(1);
        }
    }
}

impl InodeObserver for LeaseTable {
    fn added(&self, _data: &InodeData) {}

    fn removed(&self, data: &InodeData) {
        let mut t = self.lock();
        let t = &mut *t;
        if let Some(mut lease) = t.leases.remove(&data.inode) {
            // A pending hold is released with it: the guest forgot the inode, so it caches
            // nothing of it any more.
            Self::drop_host_lease_in(&mut t.by_fd, &mut lease);
        }
        if let Some(adaptive) = t.adaptive.as_mut() {
            adaptive.forget(data.inode);
        }
        if let Some(hold) = t.holds.remove(&data.inode) {
            if let (Some(n), true) = (&self.notifier, hold.notification != 0) {
                n.cancel(hold.notification);
            }
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
) -> Option<Arc<LeaseTable>> {
    let mut pause_bound = PAUSE_BOUND;
    if let Some(max) = lease_break_time() {
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
    let table = Arc::new(
        LeaseTable::new(
            lease,
            notify_lease,
            Arc::downgrade(fs),
            Some(notifier),
            clock,
            pause_bound,
        )
        .with_adaptive(adaptive),
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
    Some(table)
}

fn lease_break_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/sys/fs/lease-break-time").ok()?;
    s.trim().parse().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_state_stays_small() {
        // One per inode the guest caches; with the table's key and hash slot overhead this
        // keeps a lease near the 64-byte budget of docs/coherency.md.
        assert!(
            std::mem::size_of::<Lease>() <= 24,
            "Lease is {} bytes",
            std::mem::size_of::<Lease>()
        );
    }

    #[test]
    fn a_million_leases_measured() {
        // The lease table's own memory at a million cached inodes, measured with the
        // allocator's counters (heap in use plus mmapped blocks), as the table stores it.
        fn heap_bytes() -> usize {
            // SAFETY: mallinfo2 only reads the allocator's statistics.
            let m = unsafe { libc::mallinfo2() };
            m.uordblks + m.hblkhd
        }
        const N: u64 = 1_000_000;
        let before = heap_bytes();
        let mut leases: HashMap<u64, Lease> = HashMap::new();
        for node in 2..N + 2 {
            leases.insert(node, Lease::default());
        }
        let per_lease = (heap_bytes().saturating_sub(before)) as u64 / N;
        eprintln!(
            "{N} leases: {per_lease} bytes each (Lease {} bytes)",
            std::mem::size_of::<Lease>()
        );
        assert_eq!(leases.len() as u64, N);
        // Entry plus key plus the hash table's control byte and spare slots (69 measured).
        assert!(per_lease <= 80, "{per_lease} bytes per lease");
    }

    /// A table on a fake clock, with one regular file leased to the guest until `expires`
    /// (guest-running time) and a descriptor standing in for its host lease.
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
        {
            let mut t = table.lock();
            t.by_fd.insert(fd, 7);
            t.leases.insert(
                7,
                Lease {
                    file: Some(OwnedFd::from(file)),
                    attr_expires_ns: expires.as_nanos() as u64,
                    ..Lease::default()
                },
            );
        }
        (table, host_ns, clock, fd)
    }

    fn advance(host_ns: &AtomicU64, by: Duration) {
        host_ns.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    fn held(table: &LeaseTable) -> bool {
        table.release_due();
        table.lock().holds.contains_key(&7)
    }

    #[test]
    fn a_host_writer_waits_out_the_lease_plus_the_margin() {
        let (table, host_ns, _clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        table.on_break(fd);
        assert!(held(&table));
        advance(&host_ns, Duration::from_millis(1_050));
        assert!(held(&table), "inside the grant margin");
        advance(&host_ns, Duration::from_millis(60));
        assert!(!held(&table), "lease and margin are over");
        assert_eq!(table.stats.held.load(Ordering::Relaxed), 1);
        assert_eq!(table.stats.pause_bound_ended.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_paused_guests_lease_stands_still_and_so_does_the_hold() {
        let (table, host_ns, clock, fd) =
            table_with_one_lease(Duration::from_secs(1), Duration::from_secs(30));
        table.on_break(fd);
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
        table.on_break(fd);
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
        table.on_break(fd);
        let first = table.lock().holds[&7].since_ns;
        advance(&host_ns, Duration::from_millis(10));
        table.on_break(fd); // the kernel repeats the signal: still one hold
        assert_eq!(table.lock().holds[&7].since_ns, first);
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

    #[test]
    fn signals_can_be_blocked_and_named() {
        assert!(lease_signal() > libc::SIGRTMIN() && lease_signal() <= libc::SIGRTMAX());
        // On a test thread of its own, so the harness's other threads keep their masks.
        std::thread::spawn(|| block_signals().unwrap())
            .join()
            .unwrap();
    }
}
