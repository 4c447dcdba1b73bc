//! The host side of a lease: taking `F_SETLEASE` read leases and hearing, through a
//! signalfd, that one is being broken. System calls only; what a lease or a break means for
//! the guest is decided by the lease table (`lease.rs`), which never holds a lock shared by
//! the request queues while calling in here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use log::debug;

use crate::passthrough::{InodeData, PassthroughFs, ReadOnly};

const F_SETLEASE: libc::c_int = 1024;
const F_SETSIG: libc::c_int = 10;

/// The signal the kernel sends us when a host process breaks one of our leases. Blocked in
/// every thread ([`block_signals`]) and read through a signalfd.
pub fn lease_signal() -> libc::c_int {
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

/// Why no host lease could be had for an inode; decides how soon to try again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// EAGAIN: the file is open for writing somewhere (a host writer, or our own handle).
    /// Usually short-lived.
    OpenForWrite,
    /// The filesystem offers no leases on this file (EINVAL, ENOLCK, EOPNOTSUPP, ENOSYS).
    Unsupported,
    /// We are not the file's owner and lack CAP_LEASE (EACCES, EPERM).
    NotPermitted,
    /// The inode could not be reopened (removed meanwhile, permissions, descriptor limit).
    Unreachable,
}

impl Refused {
    fn of_setlease(e: &io::Error) -> Refused {
        match e.raw_os_error() {
            Some(libc::EAGAIN) => Refused::OpenForWrite,
            Some(libc::EACCES | libc::EPERM) => Refused::NotPermitted,
            _ => Refused::Unsupported,
        }
    }

    /// Whether the cause usually outlasts a few seconds (the file system or ownership).
    pub fn lasting(self) -> bool {
        matches!(self, Refused::Unsupported | Refused::NotPermitted)
    }

    pub fn name(self) -> &'static str {
        match self {
            Refused::OpenForWrite => "open for writing",
            Refused::Unsupported => "no leases on that filesystem",
            Refused::NotPermitted => "not the owner and no CAP_LEASE",
            Refused::Unreachable => "could not be reopened",
        }
    }
}

/// Take a read lease on `data` (a regular file): a new O_RDONLY descriptor whose open file
/// description carries the lease; closing it (see [`release`]) gives the lease up. With
/// `delegation` (hosts with F_SETDELEG) a read delegation instead: it breaks on everything a
/// lease breaks on, and also before a chmod, chown, utimes, xattr change, link, unlink or
/// rename of the file, and before a truncating `open(O_RDONLY|O_TRUNC)`.
pub fn take(fs: &PassthroughFs, data: &InodeData, delegation: bool) -> Result<OwnedFd, Refused> {
    // O_NOATIME when we own the file (else EPERM): our reopen is not a guest read.
    let fd = reopen(fs, data, libc::O_NONBLOCK | libc::O_NOATIME)
        .or_else(|_| reopen(fs, data, libc::O_NONBLOCK))?;
    set(&fd, data, delegation)?;
    Ok(fd)
}

/// Take a read delegation on the directory `data`: a new O_RDONLY descriptor whose open file
/// description carries it. The kernel breaks it before any create, delete or rename of a
/// name in the directory (and a rename of the directory itself), the changer waiting like a
/// lease breaker; the break arrives as the same signal as a lease break.
pub fn take_delegation(fs: &PassthroughFs, data: &InodeData) -> Result<OwnedFd, Refused> {
    let fd = reopen(fs, data, libc::O_NONBLOCK | libc::O_DIRECTORY)?;
    set(&fd, data, true)?;
    Ok(fd)
}

/// Take a write lease on the open file description of `file`, the descriptor a guest CREATE or
/// OPEN for writing just opened: the kernel grants it only while that description is the
/// file's only open, and breaks it before any other open (for reading too) or truncation. It
/// lives on a duplicate of the descriptor, which the lease table keeps and gives up with
/// [`release`] (closing the duplicate alone would not end it: the guest's handle shares the
/// description).
pub fn take_write(file: &impl AsRawFd, data: &InodeData) -> Result<OwnedFd, Refused> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open; checked.
    let dup = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        debug!(
            "no write lease on node {}: dup: {}",
            data.inode,
            io::Error::last_os_error()
        );
        return Err(Refused::Unreachable);
    }
    // SAFETY: a descriptor just made for us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(dup) };
    set_kind(&fd, data, libc::F_WRLCK)?;
    Ok(fd)
}

fn reopen(fs: &PassthroughFs, data: &InodeData, flags: i32) -> Result<OwnedFd, Refused> {
    ReadOnly::new(flags)
        .and_then(|f| fs.reopen_data(data, f))
        .map(OwnedFd::from)
        .map_err(|e| {
            debug!("no host lease on node {}: reopen: {e}", data.inode);
            Refused::Unreachable
        })
}

/// Ask for the break signal on `fd`, then a read lease or (`delegation`) a read delegation.
fn set(fd: &OwnedFd, data: &InodeData, delegation: bool) -> Result<(), Refused> {
    if !delegation {
        return set_kind(fd, data, libc::F_RDLCK);
    }
    let mut want = Delegation {
        d_type: libc::F_RDLCK as u16,
        ..Delegation::default()
    };
    // SAFETY: fcntl on a descriptor we own (with a struct of the kernel's layout); checked.
    let ok = unsafe {
        libc::fcntl(fd.as_raw_fd(), F_SETSIG, lease_signal()) == 0
            && libc::fcntl(fd.as_raw_fd(), F_SETDELEG, &mut want as *mut Delegation) == 0
    };
    if !ok {
        return Err(refused(data));
    }
    Ok(())
}

/// Ask for the break signal on `fd`, then a lease of `kind` (F_RDLCK or F_WRLCK).
fn set_kind(fd: &OwnedFd, data: &InodeData, kind: libc::c_int) -> Result<(), Refused> {
    // SAFETY: fcntl on a descriptor we own; checked.
    let ok = unsafe {
        libc::fcntl(fd.as_raw_fd(), F_SETSIG, lease_signal()) == 0
            && libc::fcntl(fd.as_raw_fd(), F_SETLEASE, kind) == 0
    };
    if !ok {
        return Err(refused(data));
    }
    Ok(())
}

/// The refusal the last failed fcntl means, logged.
fn refused(data: &InodeData) -> Refused {
    let e = io::Error::last_os_error();
    debug!("no host lease on node {}: {e}", data.inode);
    Refused::of_setlease(&e)
}

/// Give a lease or a delegation up: the breaker (if any) goes on.
pub fn release(fd: OwnedFd) {
    // SAFETY: fcntl on a descriptor we own. Closing it releases either kind too; the explicit
    // unlock says so where a reader of strace looks (F_SETLEASE refuses directories, whose
    // delegation the close gives back).
    unsafe { libc::fcntl(fd.as_raw_fd(), F_SETLEASE, libc::F_UNLCK) };
    drop(fd);
}

/// The host inode (st_dev, st_ino) behind a lease descriptor named by a break signal.
pub fn identity(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: fstat fills st or fails; fd may be closed by now (EBADF), which is fine.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some((st.st_dev, st.st_ino))
}

/// How many host leases we may hold: half the descriptor limit, so leases never starve the
/// guest's own opens.
pub fn budget() -> usize {
    crate::passthrough::descriptor_limit() / 2
}

/// /proc/sys/fs/lease-break-time: after it the kernel takes a lease back whatever we do.
pub fn break_time() -> Option<Duration> {
    let s = std::fs::read_to_string("/proc/sys/fs/lease-break-time").ok()?;
    s.trim().parse().ok().map(Duration::from_secs)
}

/// Linux 6.19's delegations (`F_GETDELEG`/`F_SETDELEG`, F_GETDELEG(2const)): leases that
/// also break on unlink and rename of the file and, on a directory, on creates, deletes and
/// renames inside it. Where the share's directories take them, a directory's names are leased
/// to a stock guest only while we hold a read delegation on it ([`take_delegation`]).
const F_GETDELEG: libc::c_int = F_SETLEASE + 15;
const F_SETDELEG: libc::c_int = F_SETLEASE + 16;

/// The argument of `F_GETDELEG`/`F_SETDELEG` (`struct delegation` of <linux/fcntl.h>).
#[repr(C)]
#[derive(Default)]
struct Delegation {
    d_flags: u32,
    d_type: u16,
    pad: u16,
}

/// What the host kernel and the shared filesystem offer of delegations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delegations {
    /// The kernel has no F_GETDELEG (before Linux 6.19).
    NotInKernel,
    /// The kernel has them, but a read delegation on the probed directory was refused (the
    /// filesystem, or our rights): the errno.
    Refused(i32),
    /// A read delegation on the probed directory was granted (and given back at once).
    OnDirectories,
}

impl Delegations {
    pub fn describe(self) -> String {
        match self {
            Delegations::NotInKernel => "not offered by this kernel (F_SETDELEG needs Linux 6.19 or later): names are leased by time alone".into(),
            Delegations::Refused(errno) => format!(
                "offered by the kernel but refused on the share ({}): names are leased by time alone",
                io::Error::from_raw_os_error(errno)
            ),
            Delegations::OnDirectories => "directory delegations (F_SETDELEG) for names: a stock guest's names in a directory are leased only while the daemon holds a delegation on it, and host creates, unlinks and renames there wait for the guest's lease".into(),
        }
    }

    /// The name in `--print-capabilities`' host-events list, if any.
    pub fn capability(self) -> Option<&'static str> {
        match self {
            Delegations::OnDirectories => Some("directory-delegation"),
            _ => None,
        }
    }
}

/// Probe delegations on `dir` (a directory descriptor opened O_RDONLY): ask for the current
/// one, then take a read delegation and give it back.
pub fn probe_delegations(dir: RawFd) -> Delegations {
    let mut d = Delegation::default();
    // SAFETY: fcntl with a pointer to a struct we own, of the kernel's layout.
    if unsafe { libc::fcntl(dir, F_GETDELEG, &mut d as *mut Delegation) } != 0 {
        return Delegations::NotInKernel;
    }
    let mut want = Delegation {
        d_type: libc::F_RDLCK as u16,
        ..Delegation::default()
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(dir, F_SETDELEG, &mut want as *mut Delegation) } != 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Delegations::Refused(errno);
    }
    let mut unlock = Delegation {
        d_type: libc::F_UNLCK as u16,
        ..Delegation::default()
    };
    // SAFETY: as above.
    unsafe { libc::fcntl(dir, F_SETDELEG, &mut unlock as *mut Delegation) };
    Delegations::OnDirectories
}

/// [`probe_delegations`] on a directory by path.
pub fn probe_delegations_at(path: &std::path::Path) -> Delegations {
    match std::fs::File::open(path) {
        Ok(dir) => probe_delegations(dir.as_raw_fd()),
        Err(e) => Delegations::Refused(e.raw_os_error().unwrap_or(0)),
    }
}

/// What the lease thread hears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// A host process is breaking the lease on this descriptor.
    Break(RawFd),
    /// SIGUSR1: log the metrics.
    LogStats,
}

/// The signalfd the lease thread waits on.
pub struct BreakSignals {
    sfd: OwnedFd,
}

/// Signals read per read(2): a burst of host writers is taken in a few system calls.
const SIGNALS_PER_READ: usize = 64;

impl BreakSignals {
    pub fn new() -> io::Result<Self> {
        let set = signal_set();
        // SAFETY: valid sigset; the result is checked.
        let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if sfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        Ok(BreakSignals {
            sfd: unsafe { OwnedFd::from_raw_fd(sfd) },
        })
    }

    /// Wait up to `timeout` (forever: `None`) and return every signal pending by then, in
    /// arrival order (empty on timeout).
    pub fn wait(&self, timeout: Option<Duration>) -> Vec<Signal> {
        let timeout_ms = timeout.map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
        let mut pfd = libc::pollfd {
            fd: self.sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, timeout_ms) } <= 0 {
            return Vec::new();
        }
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        let mut out = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data.
            let mut infos: [libc::signalfd_siginfo; SIGNALS_PER_READ] =
                unsafe { std::mem::zeroed() };
            // SAFETY: infos is valid for its whole size; the fd is non-blocking.
            let r = unsafe {
                libc::read(
                    self.sfd.as_raw_fd(),
                    infos.as_mut_ptr().cast(),
                    size * SIGNALS_PER_READ,
                )
            };
            if r <= 0 {
                break;
            }
            let n = r as usize / size;
            for info in &infos[..n] {
                if info.ssi_signo == libc::SIGUSR1 as u32 {
                    out.push(Signal::LogStats);
                } else if info.ssi_signo == lease_signal() as u32 {
                    out.push(Signal::Break(info.ssi_fd));
                }
            }
            if n < SIGNALS_PER_READ {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_can_be_blocked_and_named() {
        assert!(lease_signal() > libc::SIGRTMIN() && lease_signal() <= libc::SIGRTMAX());
        // On a test thread of its own, so the harness's other threads keep their masks.
        std::thread::spawn(|| block_signals().unwrap())
            .join()
            .unwrap();
    }

    #[test]
    fn refusals_are_told_apart_by_errno() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(
            Refused::of_setlease(&e(libc::EAGAIN)),
            Refused::OpenForWrite
        );
        assert_eq!(
            Refused::of_setlease(&e(libc::EACCES)),
            Refused::NotPermitted
        );
        assert_eq!(Refused::of_setlease(&e(libc::EINVAL)), Refused::Unsupported);
        assert!(!Refused::OpenForWrite.lasting());
        assert!(Refused::Unsupported.lasting());
    }

    #[test]
    fn a_pending_burst_of_signals_is_read_at_once() {
        // Queue 100 lease signals to a thread of our own with them blocked, then read them
        // through the signalfd in one wait.
        std::thread::spawn(|| {
            block_signals().unwrap();
            let signals = BreakSignals::new().unwrap();
            // SAFETY: gettid/rt_tgsigqueueinfo on our own thread with a filled siginfo.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
                for _ in 0..100 {
                    // The kernel's break signal carries the descriptor in si_fd, which
                    // sigqueue can't set: this checks the count and kind only.
                    let mut info: libc::siginfo_t = std::mem::zeroed();
                    info.si_signo = lease_signal();
                    info.si_code = libc::SI_QUEUE;
                    libc::syscall(
                        libc::SYS_rt_tgsigqueueinfo,
                        libc::getpid(),
                        tid,
                        lease_signal(),
                        &mut info,
                    );
                }
            }
            let got = signals.wait(Some(Duration::from_secs(5)));
            assert_eq!(got.len(), 100, "{got:?}");
            assert!(got.iter().all(|s| matches!(s, Signal::Break(_))));
            assert!(signals.wait(Some(Duration::ZERO)).is_empty());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn delegations_are_probed_for_what_the_kernel_offers() {
        let dir = std::env::temp_dir();
        let found = probe_delegations_at(&dir);
        // The running kernel decides; on a kernel with F_GETDELEG the answer is never
        // "not in kernel", and the reverse. uname tells which this is.
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.trim().split(['.', '-']);
        let major: u32 = parts.next().unwrap().parse().unwrap();
        let minor: u32 = parts.next().unwrap().parse().unwrap();
        let has_deleg = (major, minor) >= (6, 19);
        assert_eq!(
            found != Delegations::NotInKernel,
            has_deleg,
            "Linux {major}.{minor}: {found:?}"
        );
        assert!(!found.describe().is_empty());
    }
}
