//! One daemon run: check the command line against the host, confine the process, serve one
//! VMM connection, exit when it ends.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::Error as BackendError;

use crate::cli::{capabilities_json, CacheMode, InodeFileHandles, Options};
use crate::coherence::guest_clock::GuestClock;
use crate::coherence::notifier::Notifier;
use crate::coherence::{lease, watcher};
use crate::device::{self, FsDevice};
use crate::filesystem;
use crate::fuse::FuseDispatcher;
use crate::sandbox::{self, Sandbox, SandboxError};
use crate::{pidfile, seccomp};

/// Everything that stops the daemon, each naming its cause for the one-line error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("shared directory {path}: {source}")]
    SharedDir { path: PathBuf, source: io::Error },
    #[error("vhost-user socket {path}: {reason}")]
    Socket { path: String, reason: String },
    #[error("--socket-group {0}: no such group")]
    Group(String),
    #[error("--rlimit-nofile: {0}")]
    Rlimit(io::Error),
    #[error("logging: {0}")]
    Logging(String),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("opening the shared directory for serving: {0}")]
    Filesystem(io::Error),
    #[error("device: {0}")]
    Device(io::Error),
    #[error("vhost-user: {0}")]
    VhostUser(String),
}

pub fn run(options: Options) -> Result<(), DaemonError> {
    if options.print_capabilities {
        println!("{}", capabilities_json());
        return Ok(());
    }
    init_logging(&options)?;
    // Before any thread starts: lease-break signals must reach only the lease thread.
    lease::block_signals().map_err(DaemonError::Filesystem)?;
    let shared_dir = check_shared_dir(options.shared_dir.as_deref().expect("clap requires it"))?;
    if options.inode_file_handles == InodeFileHandles::Mandatory {
        filesystem::check_file_handles(&shared_dir).map_err(DaemonError::Filesystem)?;
    }
    set_rlimit_nofile(options.rlimit_nofile)?;
    let (mut listener, socket_name) = listen(&options)?;

    let sandbox = Sandbox::new(options.sandbox, &shared_dir, options.readonly)
        .with_id_maps(&options.uid_map, &options.gid_map);
    sandbox.enter_namespaces()?;
    let root = File::open(&shared_dir).map_err(|source| DaemonError::SharedDir {
        path: shared_dir.clone(),
        source,
    })?;
    let fs = Arc::new(filesystem::open(&options, &shared_dir).map_err(DaemonError::Filesystem)?);
    let notifier = Arc::new(Notifier::default());
    // Before the sandbox: the watcher keeps a /proc/self/fd descriptor, as the filesystem does.
    let host_watcher = watcher::start(&fs, notifier.clone());
    // Without the watcher nothing tells a notify-capable guest of host renames, unlinks or
    // attribute changes: it gets the stock guest's lease, which bounds how stale they get.
    let notify_lease = if host_watcher.is_some() {
        options.notify_lease_timeout
    } else {
        options.lease_timeout
    };
    // The guest's running time: the device stops it while the VMM has stopped every ring (a
    // paused VM) and leases are counted in it.
    let guest_clock = Arc::new(GuestClock::new());
    let leases = (options.cache == CacheMode::Coherent && options.lease_timeout > 0.0)
        .then(|| {
            lease::start(
                &fs,
                Duration::from_secs_f64(options.lease_timeout),
                Duration::from_secs_f64(notify_lease),
                notifier.clone(),
                guest_clock.clone(),
                adaptive_config(&options),
                host_watcher
                    .as_ref()
                    .is_some_and(|w| w.reports_descriptors()),
            )
        })
        .flatten();
    sandbox.enter_root()?;
    // As virtiofsd: a root daemon drops what it does not need whatever the sandbox.
    let modcaps = options.modcaps.as_ref().map(|m| m.0.as_slice());
    let kept = sandbox::kept_capabilities(modcaps.unwrap_or_default(), fs.uses_file_handles());
    sandbox::drop_capabilities(&kept).map_err(|e| {
        DaemonError::Sandbox(SandboxError::Step {
            step: "drop capabilities",
            source: e,
        })
    })?;
    drop_supplementary_groups()?;
    install_exit_handlers(root);
    // Only now does SIGTERM end the daemon cleanly (as pid 1 of its namespace it would ignore
    // it before): now launchers may read the pid file and signal the pid in it.
    pidfile::write_pid().map_err(DaemonError::Filesystem)?;
    // Last: every thread, from here on, may make only the calls serving needs.
    seccomp::apply(options.seccomp)?;

    let dispatcher = Arc::new(FuseDispatcher::new(fs, options.readonly, notifier.clone()));
    let device = FsDevice::new(
        dispatcher,
        notifier,
        guest_clock,
        options.max_request_queues as usize,
        options.tag.clone(),
        options.thread_pool_size,
    )
    .map_err(DaemonError::Device)?
    .with_queue_poll(Duration::from_micros(options.queue_poll_us.into()));
    let mut daemon = device::new_daemon("leasefsd", Arc::new(device))
        .map_err(|e| DaemonError::VhostUser(e.to_string()))?;

    info!("waiting for a vhost-user connection on {socket_name}");
    daemon
        .start(&mut listener)
        .map_err(|e| DaemonError::VhostUser(format!("accepting the VMM: {e}")))?;
    info!("VMM connected; serving {}", shared_dir.display());
    let result = daemon.wait();
    // The queue threads only stop when told to; the daemon's drop would wait for them forever.
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    sync_shared_dir();
    if let Some(leases) = &leases {
        leases.log_stats();
    }
    match result {
        Ok(())
        | Err(BackendError::HandleRequest(VhostUserError::Disconnected))
        | Err(BackendError::HandleRequest(VhostUserError::PartialMessage)) => {
            info!("VMM disconnected; exiting");
            Ok(())
        }
        Err(e) => Err(DaemonError::VhostUser(format!("serving the VMM: {e}"))),
    }
}

/// Requests run with the guest caller's uid and gid but the daemon's supplementary groups;
/// dropping them keeps a guest user from gaining the daemon's group memberships.
fn drop_supplementary_groups() -> Result<(), DaemonError> {
    // SAFETY: an empty group list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        // An unprivileged daemon cannot change groups, and cannot switch uid either.
        return Ok(());
    }
    Err(DaemonError::Sandbox(SandboxError::Step {
        step: "drop supplementary groups",
        source: e,
    }))
}

fn init_logging(options: &Options) -> Result<(), DaemonError> {
    let level = options.log_level.filter();
    if options.syslog {
        let formatter = syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: "leasefsd".into(),
            pid: std::process::id(),
        };
        // As virtiofsd: /dev/log, else local TCP (601) or UDP (514) syslog, else stderr.
        let logger = syslog::unix(formatter.clone())
            .map(|l| Box::new(syslog::BasicLogger::new(l)) as Box<dyn log::Log>)
            .or_else(|_| {
                syslog::tcp(formatter.clone(), ("127.0.0.1", 601))
                    .map(|l| Box::new(syslog::BasicLogger::new(l)) as Box<dyn log::Log>)
            })
            .or_else(|_| {
                syslog::udp(formatter, ("127.0.0.1", 0), ("127.0.0.1", 514))
                    .map(|l| Box::new(syslog::BasicLogger::new(l)) as Box<dyn log::Log>)
            });
        match logger {
            Ok(logger) => {
                log::set_boxed_logger(logger).map_err(|e| DaemonError::Logging(e.to_string()))?;
                log::set_max_level(level);
                return Ok(());
            }
            Err(e) => {
                eprintln!("leasefsd: can't enable syslog, logging to stderr: {e}");
            }
        }
    }
    {
        let mut builder = env_logger::Builder::new();
        builder.filter_level(level);
        // As with virtiofsd, RUST_LOG refines the level per module (e.g.
        // `leasefs::passthrough=trace` traces LOOKUP and OPEN answers).
        if let Ok(filters) = std::env::var("RUST_LOG") {
            builder.parse_filters(&filters);
        }
        builder
            .format_timestamp_millis()
            .try_init()
            .map_err(|e| DaemonError::Logging(e.to_string()))?;
    }
    Ok(())
}

/// The shared directory must exist, be a directory and be readable by the daemon; anything
/// else is a start-up error, not a guest that sees an empty or broken mount.
fn check_shared_dir(path: &Path) -> Result<PathBuf, DaemonError> {
    let error = |source| DaemonError::SharedDir {
        path: path.to_path_buf(),
        source,
    };
    let canonical = path.canonicalize().map_err(error)?;
    if !canonical.is_dir() {
        return Err(error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    std::fs::read_dir(&canonical).map_err(error)?;
    Ok(canonical)
}

fn set_rlimit_nofile(requested: Option<u64>) -> Result<(), DaemonError> {
    let target = match requested {
        Some(0) => return Ok(()),
        Some(n) => n,
        // Like virtiofsd: every inode the guest knows holds a descriptor, so take up to
        // min(1000000, nr_open), unless the soft limit is already higher.
        None => {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(1 << 20);
            let mut current = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: current is a valid out-pointer.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) };
            if current.rlim_cur >= 1_000_000 {
                return Ok(());
            }
            std::cmp::min(1_000_000, nr_open)
        }
    };
    let limit = libc::rlimit {
        rlim_cur: target,
        rlim_max: target,
    };
    // SAFETY: limit is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if requested.is_some() {
        return Err(DaemonError::Rlimit(error));
    }
    // Unprivileged: raise the soft limit as far as the hard limit allows.
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: current is a valid out-pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
        current.rlim_cur = current.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &current);
    }
    Ok(())
}

/// Create the vhost-user listener: from `--fd`, or bound at `--socket-path`. A path that a live
/// daemon is listening on is refused; a stale socket left by a dead one is replaced.
fn listen(options: &Options) -> Result<(Listener, String), DaemonError> {
    if let Some(fd) = options.fd {
        let name = format!("fd {fd}");
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: stat is a valid out-pointer.
        let is_socket = unsafe { libc::fstat(fd, &mut stat) } == 0
            && stat.st_mode & libc::S_IFMT == libc::S_IFSOCK;
        if !is_socket {
            return Err(DaemonError::Socket {
                path: name,
                reason: "--fd is not an open socket".into(),
            });
        }
        // SAFETY: the descriptor was handed to us to own.
        return Ok((unsafe { Listener::from_raw_fd(fd) }, name));
    }
    let path = options
        .socket_path
        .as_ref()
        .expect("clap requires --fd or --socket-path");
    let name = path.display().to_string();
    let error = |reason: String| DaemonError::Socket {
        path: name.clone(),
        reason,
    };
    // First the pid file's lock: a second daemon on this socket stops here.
    pidfile::lock(path).map_err(|e| error(format!("pid file: {e}")))?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(error("in use by another process".into()));
            }
            std::fs::remove_file(path).map_err(|e| error(format!("removing stale socket: {e}")))?;
        }
        Ok(_) => return Err(error("exists and is not a socket".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e.to_string())),
    }
    // The socket is born 0700 (0770 with --socket-group): no moment where others may connect.
    let mask = if options.socket_group.is_some() {
        0o007
    } else {
        0o077
    };
    // SAFETY: umask cannot fail; no other thread runs yet, so none creates files meanwhile.
    let old_mask = unsafe { libc::umask(mask) };
    let listener = Listener::new(path, true);
    // SAFETY: as above.
    unsafe { libc::umask(old_mask) };
    let listener = listener.map_err(|e| error(e.to_string()))?;
    if let Some(group) = &options.socket_group {
        set_socket_group(path, group)?;
    }
    Ok((listener, name))
}

fn set_socket_group(path: &Path, group: &str) -> Result<(), DaemonError> {
    let name = std::ffi::CString::new(group).map_err(|_| DaemonError::Group(group.into()))?;
    // SAFETY: name is a valid C string; getgrnam's result is only read before the next call.
    let entry = unsafe { libc::getgrnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(DaemonError::Group(group.into()));
    }
    // SAFETY: entry is non-null and points to a valid struct group.
    let gid = unsafe { (*entry).gr_gid };
    let socket_error = |e: io::Error| DaemonError::Socket {
        path: path.display().to_string(),
        reason: format!("giving it to group {group}: {e}"),
    };
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(socket_error)
}

/// The shared directory's descriptor, for flushing on the way out.
static ROOT_FD: AtomicI32 = AtomicI32::new(-1);

fn sync_shared_dir() {
    let fd = ROOT_FD.load(Ordering::Relaxed);
    // SAFETY: syncfs on a descriptor we keep open for the whole run (or -1: EBADF, harmless).
    if fd >= 0 && unsafe { libc::syncfs(fd) } != 0 {
        warn!(
            "syncfs on the shared directory: {}",
            io::Error::last_os_error()
        );
    }
}

extern "C" fn exit_on_signal(_signal: libc::c_int) {
    let fd = ROOT_FD.load(Ordering::Relaxed);
    // SAFETY: syncfs and _exit are async-signal-safe system calls. Every write the guest got a
    // reply for is already in the host's page cache; syncfs also puts it on disk.
    unsafe {
        if fd >= 0 {
            libc::syncfs(fd);
        }
        pidfile::remove();
        libc::_exit(0);
    }
}

/// SIGTERM and SIGINT end the daemon with status 0. A real handler, not SIG_DFL, is needed:
/// as pid 1 of its namespace the daemon would otherwise ignore them.
fn install_exit_handlers(root: File) {
    // Kept open for the rest of the process: the handler may run at any moment.
    ROOT_FD.store(root.into_raw_fd(), Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only makes async-signal-safe calls.
        unsafe { libc::signal(signal, exit_on_signal as *const () as libc::sighandler_t) };
    }
}

/// The adaptive-lease parameters of the command line; `None` with `--lease-cooldown 0`.
fn adaptive_config(options: &Options) -> Option<crate::coherence::adaptive::AdaptiveConfig> {
    (options.lease_cooldown > 0.0).then(|| crate::coherence::adaptive::AdaptiveConfig {
        cooldown: Duration::from_secs_f64(options.lease_cooldown),
        max_cooldown: Duration::from_secs_f64(
            options.lease_cooldown_max.max(options.lease_cooldown),
        ),
        burst_window: Duration::from_secs_f64(options.lease_burst_window),
        burst_dirs: options.lease_burst_dirs as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_non_directory_shares_are_refused_with_the_path() {
        let e = check_shared_dir(Path::new("/nonexistent/leasefs")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/leasefs"), "{e}");
        let e = check_shared_dir(Path::new("/proc/self/status")).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        assert!(check_shared_dir(Path::new("/tmp")).is_ok());
    }
}
