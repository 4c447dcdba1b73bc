//! Test runner: registry types, per-test child processes with timeouts,
//! notes, and the `run` subcommand's main loop.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::client::Agent;
use crate::sys::{self, Fd, OpExt};

/// Why a test did not pass.
#[derive(Debug)]
pub enum TErr {
    Fail(String),
    Skip(String),
}

impl From<String> for TErr {
    fn from(s: String) -> TErr {
        TErr::Fail(s)
    }
}

impl From<&str> for TErr {
    fn from(s: &str) -> TErr {
        TErr::Fail(s.to_string())
    }
}

pub type TResult = Result<(), TErr>;

pub fn skip<T>(why: impl Into<String>) -> Result<T, TErr> {
    Err(TErr::Skip(why.into()))
}

/// Fails the enclosing function (returning `Result<_, String>` or `TResult`)
/// with a formatted message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($c:expr, $($arg:tt)+) => {
        if !$c {
            return Err(format!($($arg)+).into());
        }
    };
}

/// Fails unless `$a == $b`; the message shows both values.
#[macro_export]
macro_rules! ensure_eq {
    ($a:expr, $b:expr, $($arg:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            return Err(format!("{}: got {:?}, expected {:?}", format!($($arg)+), a, b).into());
        }
    }};
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
}

pub struct Test {
    pub name: &'static str,
    pub f: fn(&mut Ctx) -> TResult,
    /// Seconds; 0 means the run's default.
    pub timeout: u64,
}

pub enum AgentState {
    /// `--no-agent`: agent tests are skipped.
    Disabled,
    /// No agent could be reached: agent tests fail with this message.
    Missing(String),
    Ready(Agent),
}

/// What a test gets: the share root and its own fresh directory.
pub struct Ctx {
    /// The mount point (`--dir`).
    pub root: PathBuf,
    /// This test's directory, `<root>/gt-<name>`, fresh and empty.
    pub dir: PathBuf,
    /// `dir` relative to `root`, as the agent wants it.
    pub rel: Vec<u8>,
    pub agent: AgentState,
    agent_synced: bool,
}

impl Ctx {
    /// A path inside the test directory.
    pub fn p<P: AsRef<Path>>(&self, name: P) -> PathBuf {
        self.dir.join(name)
    }

    /// A share-relative path (for the agent) of a name in the test directory.
    pub fn relp(&self, name: &[u8]) -> Vec<u8> {
        let mut v = self.rel.clone();
        if !name.is_empty() {
            v.push(b'/');
            v.extend_from_slice(name);
        }
        v
    }

    pub fn dirfd(&self) -> Result<Fd, String> {
        sys::open(&self.dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .op(format!("open {}", sys::show(&self.dir)))
    }

    /// The host agent: skips under `--no-agent`, fails when unreachable.
    pub fn agent(&mut self) -> Result<&mut Agent, TErr> {
        match &mut self.agent {
            AgentState::Disabled => skip("needs the host agent (--no-agent given)"),
            AgentState::Missing(m) => Err(TErr::Fail(format!("no host agent: {m}"))),
            AgentState::Ready(a) => {
                if !self.agent_synced {
                    a.sync().map_err(|e| format!("agent: {e}"))?;
                    self.agent_synced = true;
                }
                Ok(a)
            }
        }
    }
}

// ---------------------------------------------------------------- notes

static NOTE_FD: AtomicI32 = AtomicI32::new(-1);

/// Prints an informational line for the current test (shown before its
/// result line).
pub fn note(msg: impl AsRef<str>) {
    let fd = NOTE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        write_record(fd, b'N', msg.as_ref());
    } else {
        println!("  note: {}", msg.as_ref());
    }
}

fn write_record(fd: RawFd, kind: u8, msg: &str) {
    let mut rec = Vec::with_capacity(msg.len() + 5);
    rec.push(kind);
    rec.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    rec.extend_from_slice(msg.as_bytes());
    let mut off = 0;
    while off < rec.len() {
        let r = unsafe { libc::write(fd, rec[off..].as_ptr().cast(), rec.len() - off) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        off += r as usize;
    }
}

// ---------------------------------------------------------------- child processes

/// A forked child running a closure; its result comes back over a pipe.
pub struct Child {
    pub pid: i32,
    res: Option<Fd>,
    status: Option<i32>,
    pgrp: bool,
}

pub struct ChildResult {
    pub notes: Vec<String>,
    pub outcome: Option<Outcome>,
    /// waitpid status, None if the child could not be reaped.
    pub status: Option<i32>,
    pub timed_out: bool,
}

fn flush_std() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

/// Forks; the child runs `f` and reports its result. With `pgrp` the child
/// leads a new process group, so a timeout kills its helpers too.
pub fn spawn<F: FnOnce() -> TResult>(pgrp: bool, f: F) -> Result<Child, String> {
    let (r, w) = sys::pipe().op("pipe")?;
    flush_std();
    let parent = unsafe { libc::getpid() };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", sys::Errno::last()));
    }
    if pid == 0 {
        drop(r);
        // Do not outlive the runner (e.g. when it is interrupted).
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
        }
        if pgrp {
            unsafe { libc::setpgid(0, 0) };
        }
        let old = NOTE_FD.swap(w.as_raw_fd(), Ordering::SeqCst);
        if old >= 0 {
            unsafe { libc::close(old) };
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let (kind, msg) = match res {
            Ok(Ok(())) => (b'P', String::new()),
            Ok(Err(TErr::Fail(m))) => (b'F', m),
            Ok(Err(TErr::Skip(m))) => (b'S', m),
            Err(p) => {
                let m = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                (b'F', format!("panicked: {m}"))
            }
        };
        write_record(w.as_raw_fd(), kind, &msg);
        flush_std();
        unsafe { libc::_exit(0) };
    }
    drop(w);
    Ok(Child {
        pid,
        res: Some(r),
        status: None,
        pgrp,
    })
}

impl Child {
    /// Non-blocking: has the child exited (and been reaped)?
    pub fn exited(&mut self) -> bool {
        if self.status.is_some() {
            return true;
        }
        let mut st = 0;
        let r = unsafe { libc::waitpid(self.pid, &mut st, libc::WNOHANG) };
        if r == self.pid {
            self.status = Some(st);
            true
        } else {
            false
        }
    }

    fn kill(&mut self) {
        if self.pgrp {
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }

    fn reap_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sys::sleep_ms(5);
        }
    }

    /// Collects the child's notes and result, waiting at most `timeout`
    /// before killing it.
    pub fn wait(mut self, timeout: Duration) -> ChildResult {
        let deadline = Instant::now() + timeout;
        let mut data = Vec::new();
        let mut timed_out = false;
        let res = self.res.take().expect("result pipe");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                timed_out = true;
                break;
            }
            match sys::poll_fd(res.as_raw_fd(), libc::POLLIN, left) {
                Ok(0) => {
                    timed_out = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
            let mut buf = [0u8; 4096];
            match sys::read(&res, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
            }
        }
        let mut notes = Vec::new();
        let mut outcome = None;
        let mut i = 0;
        while i + 5 <= data.len() {
            let kind = data[i];
            let len = u32::from_le_bytes(data[i + 1..i + 5].try_into().unwrap()) as usize;
            if i + 5 + len > data.len() {
                break;
            }
            let msg = String::from_utf8_lossy(&data[i + 5..i + 5 + len]).into_owned();
            match kind {
                b'N' => notes.push(msg),
                b'P' => outcome = Some(Outcome::Pass),
                b'F' => outcome = Some(Outcome::Fail(msg)),
                b'S' => outcome = Some(Outcome::Skip(msg)),
                _ => {}
            }
            i += 5 + len;
        }
        if timed_out {
            self.kill();
        } else if !self.reap_within(Duration::from_secs(10)) {
            // The result arrived but the process lingers: kill it.
            self.kill();
        }
        self.reap_within(Duration::from_secs(10));
        ChildResult {
            notes,
            outcome,
            status: self.status,
            timed_out,
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
            self.reap_within(Duration::from_secs(5));
        }
    }
}

pub fn describe_status(st: Option<i32>) -> String {
    match st {
        None => "could not be reaped (stuck in the kernel?)".into(),
        Some(s) if libc::WIFSIGNALED(s) => format!("killed by signal {}", libc::WTERMSIG(s)),
        Some(s) if libc::WIFEXITED(s) => format!("exited with status {}", libc::WEXITSTATUS(s)),
        Some(s) => format!("wait status {s:#x}"),
    }
}

impl ChildResult {
    /// Maps the child's report onto a test result, forwarding its notes.
    pub fn into_result(self, what: &str) -> TResult {
        for n in &self.notes {
            note(n);
        }
        let pre = |m: String| {
            if what.is_empty() {
                m
            } else {
                format!("{what}: {m}")
            }
        };
        if self.timed_out {
            return Err(TErr::Fail(format!(
                "{what}: child timed out (and was killed; it {})",
                describe_status(self.status)
            )));
        }
        match self.outcome {
            Some(Outcome::Pass) => Ok(()),
            Some(Outcome::Fail(m)) => Err(TErr::Fail(pre(m))),
            Some(Outcome::Skip(m)) => Err(TErr::Skip(m)),
            None => Err(TErr::Fail(pre(format!(
                "process reported nothing; it {}",
                describe_status(self.status)
            )))),
        }
    }
}

/// Runs `f` in a child process, waiting at most `timeout`.
pub fn in_child<F: FnOnce() -> TResult>(what: &str, timeout: Duration, f: F) -> TResult {
    spawn(false, f)?.wait(timeout).into_result(what)
}

// ---------------------------------------------------------------- the run

pub struct RunOpts {
    pub dir: PathBuf,
    pub only: Vec<String>,
    /// Tests to leave out (glob patterns), e.g. `coherence_*` for a daemon mode that promises
    /// no coherence.
    pub skip: Vec<String>,
    pub no_agent: bool,
    pub agent_path: Option<PathBuf>,
    pub timeout: u64,
    pub no_fork: bool,
    pub list: bool,
}

/// `*` matches any run of characters; everything else is literal.
pub fn glob_match(pat: &str, s: &str) -> bool {
    let (p, t) = (pat.as_bytes(), s.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

fn fs_description(dir: &Path) -> String {
    match sys::statfs(dir) {
        Ok(s) => {
            let magic = s.f_type as u64;
            let name = match magic {
                0x6573_5546 => "fuse/virtiofs",
                0xef53 => "ext2/3/4",
                0x0102_1994 => "tmpfs",
                0x5846_5342 => "xfs",
                0x9123_683e => "btrfs",
                0x794c_7630 => "overlayfs",
                _ => "other",
            };
            format!("{name} (f_type {magic:#x})")
        }
        Err(e) => format!("statfs failed: {e}"),
    }
}

fn connect_agent(opts: &RunOpts) -> AgentState {
    if opts.no_agent {
        println!("agent: disabled (--no-agent); agent tests are skipped");
        return AgentState::Disabled;
    }
    let conn = match &opts.agent_path {
        Some(p) => Agent::connect_path(p),
        None => Agent::connect_port(),
    };
    match conn.and_then(|mut a| a.sync().map(|_| a)) {
        Ok(a) => {
            println!("agent: connected via {}", a.desc);
            AgentState::Ready(a)
        }
        Err(e) => {
            println!(
                "agent: NOT AVAILABLE: {e}; agent tests will fail (use --no-agent to skip them)"
            );
            AgentState::Missing(e)
        }
    }
}

fn run_one(test: &Test, root: &Path, agent: AgentState) -> (TResult, AgentState) {
    let dir = root.join(format!("gt-{}", test.name));
    let rel = format!("gt-{}", test.name).into_bytes();
    let mut ctx = Ctx {
        root: root.to_path_buf(),
        dir: dir.clone(),
        rel,
        agent,
        agent_synced: false,
    };
    let setup = || -> Result<(), String> {
        sys::remove_tree(&dir).map_err(|e| format!("removing stale test dir: {e}"))?;
        sys::mkdir(&dir, 0o755).op(format!("mkdir {}", sys::show(&dir)))
    };
    if let Err(e) = setup() {
        return (Err(TErr::Fail(e)), ctx.agent);
    }
    let res = (test.f)(&mut ctx);
    let cleanup = sys::remove_tree(&dir);
    let res = match (res, cleanup) {
        (Ok(()), Err(e)) => Err(TErr::Fail(format!("cleanup: {e}"))),
        (r, _) => r,
    };
    (res, ctx.agent)
}

/// The `run` subcommand. Returns the process exit code.
pub fn run(opts: RunOpts, tests: Vec<Test>) -> i32 {
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| opts.only.is_empty() || opts.only.iter().any(|p| glob_match(p, t.name)))
        .filter(|t| !opts.skip.iter().any(|p| glob_match(p, t.name)))
        .collect();
    if opts.list {
        for t in &tests {
            println!("{}", t.name);
        }
        return 0;
    }
    if selected.is_empty() {
        eprintln!("guest-tests: no test matches {:?} (see --list)", opts.only);
        return 2;
    }
    match sys::stat(&opts.dir) {
        Ok(st) if sys::file_type(&st) == libc::S_IFDIR => {}
        Ok(_) => {
            eprintln!("guest-tests: {} is not a directory", sys::show(&opts.dir));
            return 2;
        }
        Err(e) => {
            eprintln!("guest-tests: {}: {e}", sys::show(&opts.dir));
            return 2;
        }
    }
    let root = std::fs::canonicalize(&opts.dir).unwrap_or_else(|_| opts.dir.clone());
    unsafe { libc::umask(0o022) };
    println!(
        "guest-tests: dir={} fs={} euid={} tests={}",
        root.display(),
        fs_description(&root),
        unsafe { libc::geteuid() },
        selected.len()
    );
    let mut agent = connect_agent(&opts);

    let (mut passed, mut failed) = (0usize, 0usize);
    let mut skipped: Vec<&str> = Vec::new();
    let mut stuck: Option<String> = None;
    for t in &selected {
        if let Some(why) = &stuck {
            println!("FAIL {}: not run: {why}", t.name);
            failed += 1;
            continue;
        }
        let secs = if t.timeout > 0 {
            t.timeout.max(opts.timeout)
        } else {
            opts.timeout
        };
        let res = if opts.no_fork {
            let (r, a) = run_one(t, &root, agent);
            agent = a;
            r
        } else {
            let state = std::mem::replace(&mut agent, AgentState::Disabled);
            let had_agent = matches!(state, AgentState::Ready(_));
            // The child gets a copy of the agent connection (same fd);
            // the parent keeps its own to say BYE at the end.
            let (child_state, keep) = match state {
                AgentState::Ready(a) => {
                    let copy = a.fork_copy();
                    (AgentState::Ready(copy), AgentState::Ready(a))
                }
                AgentState::Missing(m) => (AgentState::Missing(m.clone()), AgentState::Missing(m)),
                AgentState::Disabled => (AgentState::Disabled, AgentState::Disabled),
            };
            agent = keep;
            let root2 = root.clone();
            let child = spawn(true, move || run_one(t, &root2, child_state).0);
            match child {
                Err(e) => Err(TErr::Fail(e)),
                Ok(c) => {
                    let cr = c.wait(Duration::from_secs(secs));
                    if cr.timed_out {
                        for n in &cr.notes {
                            println!("  note: {n}");
                        }
                        if cr.status.is_none() {
                            stuck = Some(format!(
                                "test {} hung and its process cannot be killed \
                                 (a filesystem request never completes?)",
                                t.name
                            ));
                        } else {
                            // Best-effort cleanup, itself bounded in time.
                            let dir = root.join(format!("gt-{}", t.name));
                            let _ = in_child("cleanup", Duration::from_secs(60), move || {
                                sys::remove_tree(&dir).map_err(TErr::Fail)
                            });
                        }
                        if had_agent {
                            if let AgentState::Ready(a) = &mut agent {
                                if let Err(e) = a.sync() {
                                    agent = AgentState::Missing(format!(
                                        "agent connection lost after a timed-out test: {e}"
                                    ));
                                }
                            }
                        }
                        Err(TErr::Fail(format!("timed out after {secs} s")))
                    } else {
                        cr.into_result("")
                    }
                }
            }
        };
        match res {
            Ok(()) => {
                passed += 1;
                println!("ok {}", t.name);
            }
            Err(TErr::Skip(m)) => {
                skipped.push(t.name);
                println!("skip {}: {m}", t.name);
            }
            Err(TErr::Fail(m)) => {
                failed += 1;
                println!("FAIL {}: {m}", t.name);
            }
        }
        flush_std();
    }
    if let AgentState::Ready(a) = &mut agent {
        if let Err(e) = a.bye() {
            println!("agent: BYE failed: {e}");
        }
    }
    if !skipped.is_empty() {
        println!("skipped {}: {}", skipped.len(), skipped.join(" "));
    }
    println!("{passed} passed, {failed} failed");
    flush_std();
    if failed > 0 {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("data_*", "data_append"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("host_sees_write", "host_sees_write"));
        assert!(!glob_match("host_sees_write", "host_sees_writes"));
        assert!(glob_match("*_5gib", "offset_5gib"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*f", "abcde"));
        assert!(!glob_match("data", "data_x"));
    }

    #[test]
    fn child_reports_results() {
        let t = Duration::from_secs(10);
        assert!(in_child("x", t, || Ok(())).is_ok());
        match in_child("x", t, || Err(TErr::Fail("boom".into()))) {
            Err(TErr::Fail(m)) => assert!(m.contains("boom")),
            other => panic!("{other:?}"),
        }
        match in_child("x", t, || skip("nope")) {
            Err(TErr::Skip(m)) => assert_eq!(m, "nope"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn child_timeout_is_enforced() {
        let start = Instant::now();
        let r = in_child("sleeper", Duration::from_millis(300), || {
            sys::sleep_ms(30_000);
            Ok(())
        });
        assert!(start.elapsed() < Duration::from_secs(10));
        match r {
            Err(TErr::Fail(m)) => assert!(m.contains("timed out"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
