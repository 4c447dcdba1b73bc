//! Running a backend daemon for a test: a scratch directory, the daemon process, its socket,
//! its memory use, its exit.
//!
//! ```no_run
//! use leasefs::frontend::process::Backend;
//! let backend = Backend::spawn("target/debug/leasefsd", &[]).unwrap();
//! // ... connect to backend.socket(), use backend.share() ...
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A directory under the system temp dir, removed (recursively) on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(tag: &str) -> io::Result<Self> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "leasefs-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(ScratchDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A virtio-fs daemon (leasefsd or virtiofsd) serving `<scratch>/share` on `<scratch>/s`.
pub struct Backend {
    child: Option<Child>,
    socket: PathBuf,
    share: PathBuf,
    log: PathBuf,
    // Dropped last: the daemon must be gone before its directory is removed.
    _scratch: ScratchDir,
}

/// Whether `binary` (leasefsd) uses host delegations on this host (`--print-capabilities`
/// says `"delegations": "in-use"`: Linux 6.19 or later): tests whose guarantee depends on the
/// host kernel check the one that applies.
pub fn delegations_in_use(binary: impl AsRef<Path>) -> bool {
    Command::new(binary.as_ref())
        .arg("--print-capabilities")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("\"delegations\": \"in-use\""))
        .unwrap_or(false)
}

impl Backend {
    /// Start `binary --socket-path S --shared-dir D --sandbox none --cache always` plus
    /// `extra` arguments, and wait (up to 10 s) for its socket to appear.
    pub fn spawn(binary: impl AsRef<Path>, extra: &[&str]) -> io::Result<Self> {
        let scratch = ScratchDir::new("backend")?;
        let socket = scratch.path().join("s");
        let share = scratch.path().join("share");
        fs::create_dir(&share)?;
        let log = scratch.path().join("daemon.log");
        let child = Command::new(binary.as_ref())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&share)
            .args(["--sandbox", "none", "--cache", "always"])
            .args(extra)
            .stdin(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let mut backend = Backend {
            child: Some(child),
            socket,
            share,
            log,
            _scratch: scratch,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !backend.socket.exists() {
            if let Some(status) = backend.try_status()? {
                return Err(io::Error::other(format!(
                    "{} exited before listening: {status}: {}",
                    binary.as_ref().display(),
                    backend.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "daemon did not create its socket",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(backend)
    }

    /// A FUSE client of this daemon through its socket, with `config`, INIT done. Panics with
    /// the daemon's log if it cannot connect: a test helper.
    pub fn client(&self, config: &super::FrontendConfig) -> super::FuseClient {
        let device = super::Device::connect(self.socket(), config)
            .unwrap_or_else(|e| panic!("connecting: {e}\ndaemon log:\n{}", self.log()));
        let fuse = super::FuseClient::new(std::sync::Arc::new(device));
        fuse.init().expect("INIT");
        fuse
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn share(&self) -> &Path {
        &self.share
    }

    /// What the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Ask the daemon for its counters (SIGUSR1) and return the newest logged line that holds
    /// `marker` ("leases: ", "notifications: ") once one more such line has appeared; panics
    /// with the log if none does within 5 s.
    pub fn counters_line(&self, marker: &str) -> String {
        let before = self.log().matches(marker).count();
        // SAFETY: a signal to the daemon we started.
        unsafe { libc::kill(self.pid() as i32, libc::SIGUSR1) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if log.matches(marker).count() > before {
                let line = log.lines().rev().find(|l| l.contains(marker));
                return line.unwrap_or_default().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no '{marker}' counters in the daemon log after SIGUSR1:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A field of /proc/<pid>/status in kB (e.g. "VmRSS", "RssAnon").
    pub fn status_kb(&self, field: &str) -> io::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| {
                let rest = l.strip_prefix(field)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .ok_or_else(|| io::Error::other(format!("no {field} in /proc/<pid>/status")))
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    fn try_status(&mut self) -> io::Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Wait up to `timeout` for the daemon to exit; `Ok(None)` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
