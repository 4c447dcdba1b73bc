//! Confining the daemon before it serves a guest.
//!
//! The guest controls every name the daemon resolves, so the daemon's view of the world should
//! be the shared directory and nothing else. `namespace` (the default, as in virtiofsd) gives the
//! daemon new mount, pid and network namespaces and pivots its root into the shared directory;
//! `chroot` only changes its root; `none` trusts the filesystem code alone.
//!
//! The steps run in a fixed order, split in two because the filesystem must be opened between
//! them: [`Sandbox::enter_namespaces`] (fork into the new pid namespace, mount a fresh /proc),
//! then the caller opens the shared directory and /proc/self/fd, then [`Sandbox::enter_root`]
//! (pivot_root or chroot) and [`drop_capabilities`].

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use log::{debug, info};

use caps::Capability;

use crate::cli::{IdMapRange, ModCap, SandboxMode};

/// Errors name the step that failed, so a user knows which privilege or kernel feature is missing.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "sandbox: {step}: {source} (run as root, or choose --sandbox chroot or --sandbox none)"
    )]
    Step {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

fn check(step: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc < 0 {
        Err(SandboxError::Step {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths from the OS hold no NUL byte")
}

/// The sandbox chosen on the command line, for one shared directory.
pub struct Sandbox {
    mode: SandboxMode,
    shared_dir: PathBuf,
    readonly: bool,
    /// `--uid-map` / `--gid-map`: with any, `namespace` mode also enters a new user namespace
    /// with these ranges mapped.
    uid_map: Vec<IdMapRange>,
    gid_map: Vec<IdMapRange>,
}

/// The child's pid, for the parent's signal forwarder (a signal handler cannot take arguments).
static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD_PID.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

/// The signals the parent of a sandboxed daemon forwards to it.
const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// fork(2) for the sandbox, with the launcher's signals forwarded to the child from the moment
/// it exists: a launcher signals the pid in the pid file, which the child may write before
/// the parent runs again after the fork (on a loaded host it did, and the parent died of the
/// SIGTERM meant to stop the daemon cleanly). The forwarded signals are blocked across the
/// fork, so one arriving before the parent knows the child's pid is delivered after; the
/// child gets the default actions back. Returns fork's result.
fn fork_forwarding_signals(step: &'static str) -> Result<libc::pid_t, SandboxError> {
    // SAFETY: sigset and signal calls on values we own; the handler only calls kill(2).
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        for s in FORWARDED {
            libc::sigaddset(&mut block, s);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let pid = libc::fork();
        if pid > 0 {
            CHILD_PID.store(pid, Ordering::Relaxed);
            for s in FORWARDED {
                libc::signal(s, forward_signal as *const () as libc::sighandler_t);
            }
        } else if pid == 0 {
            for s in FORWARDED {
                libc::signal(s, libc::SIG_DFL);
            }
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        check(step, pid).map(|()| pid)
    }
}

impl Sandbox {
    pub fn new(mode: SandboxMode, shared_dir: &Path, readonly: bool) -> Self {
        Sandbox {
            mode,
            shared_dir: shared_dir.to_path_buf(),
            readonly,
            uid_map: Vec::new(),
            gid_map: Vec::new(),
        }
    }

    /// Map these id ranges into a new user namespace (`namespace` mode only).
    pub fn with_id_maps(mut self, uid_map: &[IdMapRange], gid_map: &[IdMapRange]) -> Self {
        self.uid_map = uid_map.to_vec();
        self.gid_map = gid_map.to_vec();
        self
    }

    /// Enter a new user namespace whose id maps are `uid_map` and `gid_map`, then become its
    /// root. A process cannot write its own maps beyond its own id, so this forks: the parent
    /// stays in the host's namespaces with CAP_SETUID, writes the child's maps once the child
    /// has unshared (as newuidmap would for an unprivileged virtiofsd), and then waits for it
    /// like the pid-namespace parent does, removing the pid file at the end (which the child,
    /// an unprivileged id on the host now, may not). The child returns.
    fn enter_user_namespace(&self) -> Result<(), SandboxError> {
        let pipe = || -> Result<[libc::c_int; 2], SandboxError> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: fds is a valid out array of two descriptors.
            check("pipe for the user namespace set-up", unsafe {
                libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
            })?;
            Ok(fds)
        };
        let unshared = pipe()?;
        let mapped = pipe()?;
        // No other thread exists yet.
        let child = fork_forwarding_signals("fork into the user namespace")?;
        if child > 0 {
            // SAFETY: closing the ends this side does not use.
            unsafe {
                libc::close(unshared[1]);
                libc::close(mapped[0]);
            }
            let mut byte = [0u8; 1];
            // SAFETY: reading one byte into a valid buffer.
            let n = unsafe { libc::read(unshared[0], byte.as_mut_ptr().cast(), 1) };
            let write_map = |file: &str, ranges: &[IdMapRange]| {
                let text: String = ranges
                    .iter()
                    .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
                    .collect();
                std::fs::write(format!("/proc/{child}/{file}"), text)
            };
            let ok = n == 1
                && byte[0] == 1
                && (self.uid_map.is_empty() || write_map("uid_map", &self.uid_map).is_ok())
                && (self.gid_map.is_empty() || write_map("gid_map", &self.gid_map).is_ok());
            // SAFETY: writing one byte from a valid buffer.
            unsafe {
                libc::write(mapped[1], [u8::from(ok)].as_ptr().cast(), 1);
                libc::close(mapped[1]);
            }
            self.wait_for_child(child);
        }
        // SAFETY: closing the ends this side does not use.
        unsafe {
            libc::close(unshared[0]);
            libc::close(mapped[1]);
        }
        // SAFETY: prctl with integer arguments.
        check("prctl(PR_SET_PDEATHSIG)", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM)
        })?;
        // SAFETY: plain syscall.
        let result = check("unshare(CLONE_NEWUSER) for --uid-map/--gid-map", unsafe {
            libc::unshare(libc::CLONE_NEWUSER)
        });
        // SAFETY: writing and reading one byte with valid buffers.
        let mut answer = [0u8; 1];
        let n = unsafe {
            libc::write(unshared[1], [u8::from(result.is_ok())].as_ptr().cast(), 1);
            libc::close(unshared[1]);
            libc::read(mapped[0], answer.as_mut_ptr().cast(), 1)
        };
        result?;
        if n != 1 || answer[0] != 1 {
            return Err(SandboxError::Step {
                step: "write the --uid-map/--gid-map ranges (needs CAP_SETUID and CAP_SETGID, \
                       and ranges of ids the caller may map)",
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        // Root of the new namespace where 0 is mapped; elsewhere the capabilities the creator
        // holds in its own namespace are enough.
        // SAFETY: plain syscalls.
        unsafe {
            libc::setresgid(0, 0, 0);
            libc::setresuid(0, 0, 0);
        }
        debug!(
            "sandbox: in a new user namespace (uid map {:?}, gid map {:?})",
            self.uid_map, self.gid_map
        );
        Ok(())
    }

    /// Enter the new namespaces. In `namespace` mode the process forks: the parent stays in the
    /// host's pid namespace, forwards SIGTERM/SIGINT and exits with the child's status (it never
    /// returns from here); the child returns and serves. Must run before any thread is started.
    pub fn enter_namespaces(&self) -> Result<(), SandboxError> {
        if self.mode != SandboxMode::Namespace {
            return Ok(());
        }
        if !self.uid_map.is_empty() || !self.gid_map.is_empty() {
            self.enter_user_namespace()?;
        }
        // SAFETY: plain syscalls on no memory of ours.
        check(
            "unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET)",
            unsafe { libc::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWNET) },
        )?;
        // No other thread exists yet, so the child inherits a consistent process.
        let pid = fork_forwarding_signals("fork into the new pid namespace")?;
        if pid > 0 {
            self.wait_for_child(pid);
        }
        // The child dies with its parent, so killing the launcher stops the daemon.
        // SAFETY: prctl with integer arguments.
        check("prctl(PR_SET_PDEATHSIG)", unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM)
        })?;
        // Mounts made from here on must not propagate back to the host.
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            "make / private",
        )?;
        // A /proc for the new pid namespace: /proc/self must name this process.
        mount(
            Some(Path::new("proc")),
            Path::new("/proc"),
            Some(c"proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "mount /proc for the new pid namespace",
        )?;
        debug!("sandbox: in new mount, pid and network namespaces");
        Ok(())
    }

    /// Wait for the serving child (signals are forwarded to it since the fork) and exit with
    /// its status.
    fn wait_for_child(&self, child: libc::pid_t) -> ! {
        let mut status = 0;
        loop {
            // SAFETY: status is a valid out-pointer.
            let rc = unsafe { libc::waitpid(child, &mut status, 0) };
            if rc == child {
                break;
            }
            if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                crate::pidfile::remove();
                std::process::exit(1);
            }
        }
        // The serving child shares the pid file's lock but leaves the file to us.
        crate::pidfile::remove();
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        std::process::exit(code);
    }

    /// Make the shared directory the process's root. Everything the daemon needs from outside
    /// it (the vhost-user socket, /proc/self/fd, the directory itself) must be open already.
    pub fn enter_root(&self) -> Result<(), SandboxError> {
        match self.mode {
            SandboxMode::None => Ok(()),
            SandboxMode::Chroot => {
                let dir = cstring(&self.shared_dir);
                // SAFETY: dir is a valid C string.
                check("chroot into the shared directory", unsafe {
                    libc::chroot(dir.as_ptr())
                })?;
                chdir_root()
            }
            SandboxMode::Namespace => self.pivot_root(),
        }
    }

    fn pivot_root(&self) -> Result<(), SandboxError> {
        // pivot_root needs the new root to be a mount point: bind the directory onto itself.
        mount(
            Some(&self.shared_dir),
            &self.shared_dir,
            None,
            libc::MS_BIND | libc::MS_REC,
            "bind-mount the shared directory",
        )?;
        if self.readonly {
            mount(
                None,
                &self.shared_dir,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                "remount the shared directory read-only",
            )?;
        }
        let dir = cstring(&self.shared_dir);
        // SAFETY: valid C string.
        check("chdir into the shared directory", unsafe {
            libc::chdir(dir.as_ptr())
        })?;
        let dot = c".";
        // pivot_root(".", ".") stacks the old root on top of the new one; unmounting it lazily
        // then leaves only the shared directory (the trick virtiofsd and runc use).
        // SAFETY: valid C strings.
        check("pivot_root into the shared directory", unsafe {
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) as libc::c_int
        })?;
        // SAFETY: valid C string.
        check("detach the old root", unsafe {
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
        })?;
        chdir_root()?;
        info!("sandbox: the shared directory is now the root of the daemon's mount namespace");
        Ok(())
    }
}

fn chdir_root() -> Result<(), SandboxError> {
    // SAFETY: valid C string.
    check("chdir to the new root", unsafe {
        libc::chdir(c"/".as_ptr())
    })
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    step: &'static str,
) -> Result<(), SandboxError> {
    let source = source.map(cstring);
    let target = cstring(target);
    let source_ptr = source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    let fstype_ptr = fstype.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is either null or a valid C string that outlives the call.
    check(step, unsafe {
        libc::mount(
            source_ptr,
            target.as_ptr(),
            fstype_ptr,
            flags,
            std::ptr::null(),
        )
    })
}

/// Capabilities a passthrough daemon needs to act on behalf of any guest user. Not CAP_KILL or
/// CAP_AUDIT_WRITE (nothing the daemon does needs them, and a compromised daemon could use
/// them), and not CAP_DAC_READ_SEARCH: it serves only open_by_handle_at, kept only while the
/// filesystem refers to inodes by file handle (`--inode-file-handles`, see
/// [`kept_capabilities`]). `--modcaps` adds to and removes from this set.
pub const KEPT_CAPABILITIES: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_LEASE, // host file leases on files the daemon does not own
    Capability::CAP_SETFCAP,
];

/// The capabilities kept: [`KEPT_CAPABILITIES`], CAP_DAC_READ_SEARCH if `file_handles` (the
/// filesystem opens inodes by handle), changed by `--modcaps`, in order.
pub fn kept_capabilities(modcaps: &[ModCap], file_handles: bool) -> Vec<Capability> {
    let mut kept: Vec<Capability> = KEPT_CAPABILITIES.to_vec();
    if file_handles {
        kept.push(Capability::CAP_DAC_READ_SEARCH);
    }
    for m in modcaps {
        kept.retain(|&c| c != m.cap);
        if m.add {
            kept.push(m.cap);
        }
    }
    kept
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drop every capability but `kept` from the effective, permitted, inheritable and bounding
/// sets. Does nothing for an unprivileged daemon, which has none to drop.
pub fn drop_capabilities(kept: &[Capability]) -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as version 3 requires.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut keep = [0u32; 2];
    for cap in kept {
        let bit = cap.index() as u32;
        keep[(bit / 32) as usize] |= 1 << (bit % 32);
    }
    for (d, k) in data.iter_mut().zip(keep) {
        d.effective &= k;
        d.permitted &= k;
        d.inheritable = 0;
    }
    // Shrink the bounding set first: that needs CAP_SETPCAP, which the capset below removes.
    for bit in 0..64u32 {
        if keep[(bit / 32) as usize] & (1 << (bit % 32)) == 0 {
            // SAFETY: prctl with integer arguments; EINVAL for caps this kernel lacks is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, bit as libc::c_ulong, 0, 0, 0) };
        }
    }
    // SAFETY: as for capget.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    debug!("capabilities reduced to {kept:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_mode_changes_nothing() {
        let sandbox = Sandbox::new(SandboxMode::None, Path::new("/tmp"), false);
        sandbox.enter_namespaces().unwrap();
        sandbox.enter_root().unwrap();
        assert!(Path::new("/proc/self").exists());
    }

    #[test]
    fn modcaps_add_and_remove() {
        let kept = kept_capabilities(
            &crate::cli::parse_modcaps("+sys_admin:-chown").unwrap().0,
            false,
        );
        assert!(kept.contains(&Capability::CAP_SYS_ADMIN));
        assert!(!kept.contains(&Capability::CAP_CHOWN));
        let default = kept_capabilities(&[], false);
        assert!(kept_capabilities(&[], true).contains(&Capability::CAP_DAC_READ_SEARCH));
        for dropped in [
            Capability::CAP_KILL,
            Capability::CAP_AUDIT_WRITE,
            Capability::CAP_DAC_READ_SEARCH,
        ] {
            assert!(!default.contains(&dropped), "{dropped}");
        }
    }

    #[test]
    fn errors_name_the_step_and_the_way_out() {
        let e = check("chroot into the shared directory", -1).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("chroot into the shared directory"), "{text}");
        assert!(text.contains("--sandbox none"), "{text}");
    }
}
