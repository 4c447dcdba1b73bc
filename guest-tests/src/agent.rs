//! `guest-tests host-agent`: runs on the host, answers the guest's requests
//! about the host side of the share over a unix socket that QEMU bridges to
//! the guest's `leasefs.agent` virtio-serial port.
//!
//! Before it listens it creates the fixtures: a secret file outside the share
//! and, in the share, `.fixtures/abs-link`, `.fixtures/abs-dir` and
//! `.fixtures/rel-link` pointing at it. They are removed on exit (BYE, end of
//! connection, SIGTERM/SIGINT/SIGHUP).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::proto::{self, errno_name, hex_encode, split_relpath, HostStat, Request};
use crate::sys::{self, Errno, Fd};

pub const FIXTURES_DIR: &str = ".fixtures";
const MAX_LINE: usize = 64 << 20;

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// The agent's fixtures, removed again by `cleanup`.
pub struct Fixtures {
    pub secret_dir: PathBuf,
    pub secret_file: PathBuf,
    pub secret: String,
    pub fixtures: PathBuf,
}

impl Fixtures {
    pub fn create(share: &Path) -> Result<Fixtures, String> {
        let mut tmpl = b"/tmp/leasefs-secret-XXXXXX\0".to_vec();
        let p = unsafe { libc::mkdtemp(tmpl.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(format!(
                "mkdtemp /tmp/leasefs-secret-XXXXXX: {}",
                Errno::last()
            ));
        }
        tmpl.pop();
        let secret_dir = sys::path_from_bytes(&tmpl);
        let secret_file = secret_dir.join("secret");
        let secret = format!("LEASEFS-HOST-SECRET-{}", sys::random_hex());
        let fx = Fixtures {
            secret_dir: secret_dir.clone(),
            secret_file: secret_file.clone(),
            secret: secret.clone(),
            fixtures: share.join(FIXTURES_DIR),
        };
        let res = (|| -> Result<(), String> {
            if secret_dir.starts_with(share) {
                return Err(format!(
                    "secret dir {} would be inside the share {}",
                    secret_dir.display(),
                    share.display()
                ));
            }
            std::fs::write(&secret_file, &secret)
                .map_err(|e| format!("write {}: {e}", secret_file.display()))?;
            sys::remove_tree(&fx.fixtures)?;
            std::fs::create_dir(&fx.fixtures)
                .map_err(|e| format!("mkdir {}: {e}", fx.fixtures.display()))?;
            let link = |target: &Path, name: &str| {
                std::os::unix::fs::symlink(target, fx.fixtures.join(name))
                    .map_err(|e| format!("symlink {name}: {e}"))
            };
            link(&secret_file, "abs-link")?;
            link(&secret_dir, "abs-dir")?;
            // Enough ".." to climb from <share>/.fixtures to / on the host,
            // whatever the depth of the share (and at least 8).
            let depth = share.components().count() + 1;
            let ups = "../".repeat(depth.max(8) + 2);
            let rel = format!(
                "{ups}{}",
                secret_file.to_string_lossy().trim_start_matches('/')
            );
            link(Path::new(&rel), "rel-link")?;
            Ok(())
        })();
        if let Err(e) = res {
            fx.cleanup();
            return Err(e);
        }
        Ok(fx)
    }

    pub fn cleanup(&self) {
        let _ = std::fs::remove_dir_all(&self.secret_dir);
        let _ = sys::remove_tree(&self.fixtures);
    }
}

/// Request handler with the share opened as a directory.
pub struct Server {
    share: Fd,
    secret: String,
    /// QEMU's QMP socket, for PAUSE (`host-agent --qmp`).
    qmp: Option<PathBuf>,
}

fn en(e: Errno) -> String {
    errno_name(e.0)
}

impl Server {
    pub fn new(share: &Path, secret: &str) -> Result<Server, String> {
        let share = sys::open(share, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| format!("open share {}: {e}", share.display()))?;
        Ok(Server {
            share,
            secret: secret.to_string(),
            qmp: None,
        })
    }

    /// Lets PAUSE stop and resume the VM through QEMU's QMP socket.
    pub fn with_qmp(mut self, qmp: Option<PathBuf>) -> Server {
        self.qmp = qmp;
        self
    }

    /// The reply line (without newline) for one parsed request.
    fn reply_for(&self, req: &Request) -> String {
        match self.handle(req) {
            Ok(s) if s.is_empty() => "OK".into(),
            Ok(s) => format!("OK {s}"),
            Err(e) => format!("ERR {e}"),
        }
    }

    /// Walks to the parent directory of `p` without following symlinks and
    /// without leaving the share; returns it with the last component
    /// (`.` for the share root).
    fn resolve(&self, p: &[u8]) -> Result<(Fd, Vec<u8>), String> {
        let comps = split_relpath(p).map_err(|e| format!("EACCES {e}"))?;
        let mut dir = sys::dup(&self.share).map_err(en)?;
        let Some((last, parents)) = comps.split_last() else {
            return Ok((dir, b".".to_vec()));
        };
        for c in parents {
            dir = sys::openat(
                &dir,
                sys::path_from_bytes(c),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(en)?;
        }
        Ok((dir, last.to_vec()))
    }

    fn open_in(&self, p: &[u8], flags: i32, mode: u32) -> Result<Fd, String> {
        let (dir, name) = self.resolve(p)?;
        sys::openat(
            &dir,
            sys::path_from_bytes(&name),
            flags | libc::O_NOFOLLOW,
            mode,
        )
        .map_err(en)
    }

    /// Handles one request; Ok(reply payload) or Err(error text).
    pub fn handle(&self, req: &Request) -> Result<String, String> {
        match req {
            Request::Hello => Ok("leasefs-agent 1".into()),
            Request::Secret => Ok(hex_encode(self.secret.as_bytes())),
            Request::Bye => Ok(String::new()),
            Request::Stat(p) => {
                let (dir, name) = self.resolve(p)?;
                let st = sys::fstatat(&dir, sys::path_from_bytes(&name), libc::AT_SYMLINK_NOFOLLOW)
                    .map_err(en)?;
                Ok(HostStat {
                    mode: st.st_mode,
                    uid: st.st_uid,
                    gid: st.st_gid,
                    size: st.st_size as u64,
                    mtime_sec: st.st_mtime,
                    mtime_nsec: st.st_mtime_nsec,
                    nlink: st.st_nlink,
                }
                .encode())
            }
            Request::Hash(p) => {
                let fd = self.open_in(p, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
                let mut h = proto::Fnv1a64::new();
                let mut size = 0u64;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = sys::read(&fd, &mut buf).map_err(en)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    size += n as u64;
                }
                Ok(format!("{size} {:016x}", h.finish()))
            }
            Request::Read(p, off, len) => {
                if *len > proto::MAX_READ {
                    return Err(format!("EINVAL length above {}", proto::MAX_READ));
                }
                let fd = self.open_in(p, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
                let data = sys::pread_full(&fd, *off, *len as usize).map_err(en)?;
                Ok(hex_encode(&data))
            }
            Request::Write(p, off, data) => {
                let fd = self.open_in(p, libc::O_WRONLY | libc::O_CREAT, 0o644)?;
                sys::pwrite_all(&fd, data, *off).map_err(en)?;
                Ok(String::new())
            }
            Request::Truncate(p, len) => {
                // Blocking, like truncate(1): a leasefsd lease on the file holds this open
                // until the guest's lease ends, where O_NONBLOCK would fail with EAGAIN.
                let fd = self.open_in(p, libc::O_WRONLY, 0)?;
                sys::ftruncate(&fd, *len).map_err(en)?;
                Ok(String::new())
            }
            Request::Unlink(p) => {
                let (dir, name) = self.resolve(p)?;
                let name = sys::path_from_bytes(&name);
                match sys::unlinkat(&dir, &name, 0) {
                    Err(Errno(libc::EISDIR)) => {
                        sys::unlinkat(&dir, &name, libc::AT_REMOVEDIR).map_err(en)?
                    }
                    r => r.map_err(en)?,
                }
                Ok(String::new())
            }
            Request::Rename(a, b) => {
                let (da, na) = self.resolve(a)?;
                let (db, nb) = self.resolve(b)?;
                let (ca, cb) = (cstr(&na)?, cstr(&nb)?);
                let r = unsafe {
                    libc::renameat(da.as_raw_fd(), ca.as_ptr(), db.as_raw_fd(), cb.as_ptr())
                };
                if r < 0 {
                    return Err(en(Errno::last()));
                }
                Ok(String::new())
            }
            Request::Mkdir(p) => {
                let (dir, name) = self.resolve(p)?;
                sys::mkdirat(&dir, sys::path_from_bytes(&name), 0o755).map_err(en)?;
                Ok(String::new())
            }
            Request::Xattr(p, name) => {
                let fd = self.open_in(p, libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
                let n = cstr(name)?;
                let mut buf = vec![0u8; 65536];
                let r = unsafe {
                    libc::fgetxattr(
                        fd.as_raw_fd(),
                        n.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if r < 0 {
                    return Err(en(Errno::last()));
                }
                buf.truncate(r as usize);
                Ok(hex_encode(&buf))
            }
            Request::List(p) => {
                let fd = self.open_in(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                let n = sys::list_dir_fd(fd).map_err(en)?.len();
                Ok(n.to_string())
            }
            Request::Chmod(p, mode) => {
                let (dir, name) = self.resolve(p)?;
                let c = cstr(&name)?;
                // glibc refuses a symlink with EOPNOTSUPP and changes anything else.
                let r = unsafe {
                    libc::fchmodat(
                        dir.as_raw_fd(),
                        c.as_ptr(),
                        *mode as libc::mode_t,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if r < 0 {
                    return Err(en(Errno::last()));
                }
                Ok(String::new())
            }
            Request::Utimes(p, sec, nsec) => {
                let (dir, name) = self.resolve(p)?;
                let c = cstr(&name)?;
                let times = [
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    sys::ts(*sec, *nsec),
                ];
                let r = unsafe {
                    libc::utimensat(
                        dir.as_raw_fd(),
                        c.as_ptr(),
                        times.as_ptr(),
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if r < 0 {
                    return Err(en(Errno::last()));
                }
                Ok(String::new())
            }
            Request::Save(p, data) => {
                let (dir, name) = self.resolve(p)?;
                if name == b"." {
                    return Err("EINVAL cannot save over the share root".into());
                }
                let mut tmp = b".".to_vec();
                tmp.extend_from_slice(&name);
                tmp.extend_from_slice(b".save-tmp");
                let fd = sys::openat(
                    &dir,
                    sys::path_from_bytes(&tmp),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
                    0o644,
                )
                .map_err(en)?;
                sys::write_all(&fd, data).map_err(en)?;
                drop(fd);
                let (ct, cn) = (cstr(&tmp)?, cstr(&name)?);
                let r = unsafe {
                    libc::renameat(dir.as_raw_fd(), ct.as_ptr(), dir.as_raw_fd(), cn.as_ptr())
                };
                if r < 0 {
                    let e = Errno::last();
                    let _ = sys::unlinkat(&dir, sys::path_from_bytes(&tmp), 0);
                    return Err(en(e));
                }
                Ok(String::new())
            }
            Request::Echo(b) => Ok(hex_encode(b)),
            Request::Link(a, b) => {
                let (da, na) = self.resolve(a)?;
                let (db, nb) = self.resolve(b)?;
                let (ca, cb) = (cstr(&na)?, cstr(&nb)?);
                let r = unsafe {
                    libc::linkat(da.as_raw_fd(), ca.as_ptr(), db.as_raw_fd(), cb.as_ptr(), 0)
                };
                if r < 0 {
                    return Err(en(Errno::last()));
                }
                Ok(String::new())
            }
            Request::RdTrunc(p) => {
                self.open_in(p, libc::O_RDONLY | libc::O_TRUNC, 0)?;
                Ok(String::new())
            }
            Request::Restore(p, data) => {
                let (dir, name) = self.resolve(p)?;
                let st = sys::fstatat(&dir, sys::path_from_bytes(&name), libc::AT_SYMLINK_NOFOLLOW)
                    .map_err(en)?;
                let fd = self.open_in(p, libc::O_WRONLY | libc::O_TRUNC, 0)?;
                sys::write_all(&fd, data).map_err(en)?;
                let times = [
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    sys::ts(st.st_mtime, st.st_mtime_nsec),
                ];
                sys::futimens(&fd, times).map_err(en)?;
                Ok(String::new())
            }
            Request::Par(reqs) => {
                let replies: Vec<String> = std::thread::scope(|sc| {
                    let hs: Vec<_> = reqs
                        .iter()
                        .map(|r| sc.spawn(move || self.reply_for(r)))
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| "ERR EIO panic".into()))
                        .collect()
                });
                let hexes: Vec<String> = replies.iter().map(|r| hex_encode(r.as_bytes())).collect();
                Ok(hexes.join(" "))
            }
            Request::Pause(ms, inner) => {
                let qmp = self
                    .qmp
                    .as_deref()
                    .ok_or("EOPNOTSUPP no QMP socket (host-agent --qmp)")?;
                let mut mon = Qmp::connect(qmp)?;
                mon.execute("stop")?;
                let start = Instant::now();
                let reply = std::thread::scope(|sc| {
                    let h = sc.spawn(|| self.reply_for(inner));
                    let left = Duration::from_millis(*ms).saturating_sub(start.elapsed());
                    std::thread::sleep(left);
                    // Resume even if the inner request is still held (on the notify
                    // stack it waits for the guest's confirmation).
                    let cont = mon.execute("cont");
                    let r = h.join().unwrap_or_else(|_| "ERR EIO panic".into());
                    cont.map(|_| r)
                })?;
                Ok(hex_encode(reply.as_bytes()))
            }
            Request::Seq(ms, reqs) => {
                let mut took = Vec::with_capacity(reqs.len());
                for (i, r) in reqs.iter().enumerate() {
                    if i > 0 && *ms > 0 {
                        std::thread::sleep(Duration::from_millis(*ms));
                    }
                    let start = Instant::now();
                    let ok = self.handle(r).is_ok();
                    let us = start.elapsed().as_micros();
                    took.push(if ok { us.to_string() } else { "E".into() });
                }
                Ok(took.join(" "))
            }
            Request::Append(p, data) => {
                let fd = self.open_in(p, libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT, 0o644)?;
                sys::write_all(&fd, data).map_err(en)?;
                Ok(String::new())
            }
            Request::Timed(inner) => {
                let start = Instant::now();
                let r = self.handle(inner)?;
                let us = start.elapsed().as_micros();
                Ok(if r.is_empty() {
                    us.to_string()
                } else {
                    format!("{us} {r}")
                })
            }
        }
    }

    /// The full reply line for a request line (without newline).
    pub fn reply_line(&self, line: &str) -> (String, bool) {
        match Request::parse(line) {
            Err(e) => (format!("ERR EINVAL {e}"), false),
            Ok(req) => {
                let bye = req == Request::Bye;
                match self.handle(&req) {
                    Ok(s) if s.is_empty() => ("OK".into(), bye),
                    Ok(s) => (format!("OK {s}"), bye),
                    Err(e) => (format!("ERR {e}"), bye),
                }
            }
        }
    }
}

/// A QMP client: enough for `stop` and `cont`.
struct Qmp {
    stream: std::os::unix::net::UnixStream,
    buf: Vec<u8>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = std::os::unix::net::UnixStream::connect(path)
            .map_err(|e| format!("EIO QMP connect {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("EIO QMP: {e}"))?;
        let mut q = Qmp {
            stream,
            buf: Vec::new(),
        };
        let greeting = q.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("EIO QMP greeting {greeting:?}"));
        }
        q.execute("qmp_capabilities")?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        use std::io::Read;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&l).trim().to_string());
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| format!("EIO QMP read: {e}"))?;
            if n == 0 {
                return Err("EIO QMP closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Runs a command without arguments; events before its answer are skipped.
    fn execute(&mut self, cmd: &str) -> Result<(), String> {
        self.stream
            .write_all(format!("{{\"execute\": \"{cmd}\"}}\n").as_bytes())
            .map_err(|e| format!("EIO QMP write: {e}"))?;
        loop {
            let l = self.line()?;
            if l.starts_with("{\"return\"") {
                return Ok(());
            }
            if l.starts_with("{\"error\"") {
                return Err(format!("EIO QMP {cmd}: {l}"));
            }
        }
    }
}

fn cstr(b: &[u8]) -> Result<CString, String> {
    CString::new(b.to_vec()).map_err(|_| "EINVAL NUL byte in name".to_string())
}

/// Waits until `fd` is readable; Err(()) when a termination signal came.
fn wait_readable(fd: i32) -> Result<(), ()> {
    loop {
        if TERMINATE.load(Ordering::SeqCst) {
            return Err(());
        }
        match sys::poll_fd_once(fd, libc::POLLIN, Duration::from_millis(250)) {
            Ok(0) | Err(Errno(libc::EINTR)) => continue,
            _ => return Ok(()),
        }
    }
}

enum End {
    Bye,
    Eof,
    Signal,
    Error(String),
}

fn serve<S: Write + AsRawFd>(server: &Server, mut stream: S, verbose: bool) -> End {
    let fd = stream.as_raw_fd();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..i]).into_owned();
            let (reply, bye) = server.reply_line(&line);
            // ENOENT/ENODATA are ordinary answers to "is it gone?" checks.
            let unusual =
                reply.starts_with("ERR") && reply != "ERR ENOENT" && reply != "ERR ENODATA";
            if verbose || unusual {
                let short = |s: &str| s.chars().take(120).collect::<String>();
                eprintln!("agent: {} -> {}", short(&line), short(&reply));
            }
            let mut out = reply.into_bytes();
            out.push(b'\n');
            if let Err(e) = stream.write_all(&out) {
                return End::Error(format!("write reply: {e}"));
            }
            if bye {
                return End::Bye;
            }
        }
        if buf.len() > MAX_LINE {
            return End::Error("request line too long".into());
        }
        if wait_readable(fd).is_err() {
            return End::Signal;
        }
        let mut chunk = [0u8; 65536];
        let n = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        if n < 0 {
            let e = Errno::last();
            if e.0 == libc::EINTR || e.0 == libc::EAGAIN {
                continue;
            }
            return End::Error(format!("read: {e}"));
        }
        if n == 0 {
            return End::Eof;
        }
        buf.extend_from_slice(&chunk[..n as usize]);
    }
}

/// Serves agent requests arriving on a character device (the guest's end of
/// a virtio-serial port) against `share`, until BYE or end of connection:
/// in the two-guest stress, each guest performs the other's changes through
/// its own mount this way. Ok(true) after BYE, Ok(false) at end of connection.
pub fn serve_device(share: &Path, dev: &Path) -> Result<bool, String> {
    let server = Server::new(share, "")?;
    let fd = sys::open(dev, libc::O_RDWR | libc::O_NOCTTY, 0)
        .map_err(|e| format!("open {}: {e}", dev.display()))?;
    match serve(&server, std::fs::File::from(fd), false) {
        End::Bye => Ok(true),
        End::Eof => Ok(false),
        End::Signal => Err("terminated by signal".into()),
        End::Error(e) => Err(e),
    }
}

/// The `host-agent` subcommand. Returns the exit code.
pub fn main(share: &Path, listen: &Path, qmp: Option<PathBuf>, verbose: bool) -> i32 {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let share = match std::fs::canonicalize(share) {
        Ok(p) if p.is_dir() => p,
        Ok(p) => {
            eprintln!("host-agent: {} is not a directory", p.display());
            return 2;
        }
        Err(e) => {
            eprintln!("host-agent: share {}: {e}", share.display());
            return 2;
        }
    };
    let fx = match Fixtures::create(&share) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("host-agent: creating fixtures: {e}");
            return 1;
        }
    };
    let code = run_listener(&share, listen, &fx, qmp, verbose);
    fx.cleanup();
    eprintln!("host-agent: fixtures removed, exiting with status {code}");
    code
}

fn run_listener(
    share: &Path,
    listen: &Path,
    fx: &Fixtures,
    qmp: Option<PathBuf>,
    verbose: bool,
) -> i32 {
    let server = match Server::new(share, &fx.secret) {
        Ok(s) => s.with_qmp(qmp),
        Err(e) => {
            eprintln!("host-agent: {e}");
            return 1;
        }
    };
    // Remove a stale socket (but nothing else).
    if let Ok(st) = sys::lstat(listen) {
        if sys::file_type(&st) == libc::S_IFSOCK {
            let _ = std::fs::remove_file(listen);
        } else {
            eprintln!(
                "host-agent: {} exists and is not a socket; refusing to remove it",
                listen.display()
            );
            return 2;
        }
    }
    // bind(2) makes the socket file before listen(2) makes it accept: a client that waits
    // for the file (run-vm.sh, QEMU, the tests) could connect in between and be refused. So
    // bind and listen under a temporary name and rename the socket into place, listening.
    let mut staging = listen.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = match UnixListener::bind(&staging) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("host-agent: bind {}: {e}", staging.display());
            return 1;
        }
    };
    if let Err(e) = std::fs::rename(&staging, listen) {
        eprintln!(
            "host-agent: rename {} to {}: {e}",
            staging.display(),
            listen.display()
        );
        let _ = std::fs::remove_file(&staging);
        return 1;
    }
    println!(
        "host-agent: share={} listening on {} secret={} fixtures={}",
        share.display(),
        listen.display(),
        fx.secret_file.display(),
        fx.fixtures.display()
    );
    let _ = std::io::stdout().flush();
    let accepted = loop {
        if wait_readable(listener.as_raw_fd()).is_err() {
            break None;
        }
        match listener.accept() {
            Ok((s, _)) => break Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("host-agent: accept: {e}");
                break None;
            }
        }
    };
    drop(listener);
    let _ = std::fs::remove_file(listen);
    let Some(stream) = accepted else {
        eprintln!("host-agent: stopped before any connection");
        return if TERMINATE.load(Ordering::SeqCst) {
            143
        } else {
            1
        };
    };
    if let Err(e) = stream.set_nonblocking(false) {
        eprintln!("host-agent: {e}");
    }
    eprintln!("host-agent: connected");
    match serve(&server, stream, verbose) {
        End::Bye => {
            eprintln!("host-agent: BYE received");
            0
        }
        End::Eof => {
            eprintln!("host-agent: connection closed without BYE");
            0
        }
        End::Signal => {
            eprintln!("host-agent: terminated by signal");
            143
        }
        End::Error(e) => {
            eprintln!("host-agent: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::fnv1a64;
    use std::os::unix::ffi::OsStrExt;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gt-unit-{tag}-{}-{}",
            std::process::id(),
            sys::random_hex()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn call(s: &Server, req: Request) -> String {
        s.reply_line(&req.encode()).0
    }

    #[test]
    fn server_requests() {
        let d = tmpdir("srv");
        let s = Server::new(&d, "SEKRIT").unwrap();
        assert_eq!(call(&s, Request::Hello), proto::HELLO_REPLY);
        assert_eq!(
            call(&s, Request::Secret),
            format!("OK {}", hex_encode(b"SEKRIT"))
        );
        assert_eq!(call(&s, Request::Stat(b"nope".to_vec())), "ERR ENOENT");
        assert_eq!(call(&s, Request::Mkdir(b"sub".to_vec())), "OK");
        assert_eq!(
            call(&s, Request::Write(b"sub/f".to_vec(), 2, b"hello".to_vec())),
            "OK"
        );
        let mut want = vec![0u8, 0];
        want.extend_from_slice(b"hello");
        assert_eq!(
            call(&s, Request::Hash(b"sub/f".to_vec())),
            format!("OK 7 {:016x}", fnv1a64(&want))
        );
        assert_eq!(
            call(&s, Request::Read(b"sub/f".to_vec(), 3, 100)),
            format!("OK {}", hex_encode(b"ello"))
        );
        let st = call(&s, Request::Stat(b"sub/f".to_vec()));
        let st = HostStat::parse(st.strip_prefix("OK ").unwrap()).unwrap();
        assert_eq!(
            (st.mode & libc::S_IFMT, st.size, st.nlink),
            (libc::S_IFREG, 7, 1)
        );
        assert_eq!(call(&s, Request::List(b"sub".to_vec())), "OK 1");
        assert_eq!(call(&s, Request::List(b"".to_vec())), "OK 1");
        assert_eq!(call(&s, Request::Truncate(b"sub/f".to_vec(), 3)), "OK");
        assert!(call(&s, Request::Hash(b"sub/f".to_vec())).starts_with("OK 3 "));
        assert_eq!(
            call(&s, Request::Rename(b"sub/f".to_vec(), b"g".to_vec())),
            "OK"
        );
        assert_eq!(
            call(&s, Request::Xattr(b"g".to_vec(), b"user.none".to_vec())),
            "ERR ENODATA"
        );
        sys::setxattr(d.join("g"), "user.k", b"v\0w", 0).unwrap();
        assert_eq!(
            call(&s, Request::Xattr(b"g".to_vec(), b"user.k".to_vec())),
            format!("OK {}", hex_encode(b"v\0w"))
        );
        assert_eq!(call(&s, Request::Unlink(b"g".to_vec())), "OK");
        assert_eq!(call(&s, Request::Unlink(b"sub".to_vec())), "OK");
        assert_eq!(call(&s, Request::List(b"".to_vec())), "OK 0");
        assert_eq!(call(&s, Request::Bye), "OK");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn server_stress_requests() {
        use std::os::unix::fs::MetadataExt;
        let d = tmpdir("stress");
        let s = Server::new(&d, "S").unwrap();
        assert_eq!(
            call(&s, Request::Echo(b"n1".to_vec())),
            format!("OK {}", hex_encode(b"n1"))
        );
        std::fs::write(d.join("f"), b"old").unwrap();
        let ino = std::fs::metadata(d.join("f")).unwrap().ino();
        // SAVE: new content under the old name, a new inode, no temporary left.
        assert_eq!(
            call(&s, Request::Save(b"f".to_vec(), b"new content".to_vec())),
            "OK"
        );
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"new content");
        assert_ne!(std::fs::metadata(d.join("f")).unwrap().ino(), ino);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        assert_eq!(call(&s, Request::Chmod(b"f".to_vec(), 0o604)), "OK");
        let m = std::fs::metadata(d.join("f")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o604);
        let atime = m.atime();
        assert_eq!(
            call(
                &s,
                Request::Utimes(b"f".to_vec(), 1_400_000_000, 123_456_789)
            ),
            "OK"
        );
        let m = std::fs::metadata(d.join("f")).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_400_000_000, 123_456_789));
        assert_eq!(m.atime(), atime);
        // TIMED: microseconds first, then the inner payload.
        let r = call(
            &s,
            Request::Timed(Box::new(Request::Write(b"f".to_vec(), 0, b"N".to_vec()))),
        );
        let us = r.strip_prefix("OK ").unwrap();
        assert!(us.parse::<u64>().is_ok(), "{r}");
        let r = call(&s, Request::Timed(Box::new(Request::Hash(b"f".to_vec()))));
        let f: Vec<&str> = r.split(' ').collect();
        assert_eq!((f.len(), f[0], f[2]), (4, "OK", "11"), "{r}");
        assert_eq!(
            call(
                &s,
                Request::Timed(Box::new(Request::Unlink(b"nope".to_vec())))
            ),
            "ERR ENOENT"
        );
        // Symlinks are not followed.
        std::os::unix::fs::symlink("f", d.join("ln")).unwrap();
        assert!(call(&s, Request::Chmod(b"ln".to_vec(), 0o600)).starts_with("ERR"));
        assert!(call(&s, Request::Save(b"".to_vec(), b"x".to_vec())).starts_with("ERR"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn server_refuses_escapes() {
        let d = tmpdir("esc");
        let outside = tmpdir("outside");
        std::fs::write(outside.join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, d.join("ln")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), d.join("fl")).unwrap();
        let s = Server::new(&d, "S").unwrap();
        for req in [
            Request::Stat(b"../x".to_vec()),
            Request::Hash(b"/etc/passwd".to_vec()),
            Request::Write(b"a/../../x".to_vec(), 0, vec![1]),
        ] {
            let r = call(&s, req);
            assert!(r.starts_with("ERR EACCES"), "{r}");
        }
        // Symlinks are never followed: not as a directory, not as a file.
        assert!(call(&s, Request::Hash(b"ln/secret".to_vec())).starts_with("ERR ENOTDIR"));
        assert!(call(&s, Request::Hash(b"fl".to_vec())).starts_with("ERR ELOOP"));
        assert!(call(&s, Request::Write(b"fl".to_vec(), 0, b"y".to_vec())).starts_with("ERR"));
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"x");
        // STAT of a symlink describes the link itself.
        let st = call(&s, Request::Stat(b"fl".to_vec()));
        assert!(st.starts_with("OK 120777 "), "{st}");
        assert!(call(&s, Request::Stat(b"ln\0".to_vec())).starts_with("ERR"));
        assert!(s.reply_line("FROB 00").0.starts_with("ERR EINVAL"));
        std::fs::remove_dir_all(&d).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn fixtures_created_and_removed() {
        let d = tmpdir("fx");
        let fx = Fixtures::create(&d).unwrap();
        assert!(fx.secret.starts_with("LEASEFS-HOST-SECRET-"));
        assert_eq!(std::fs::read_to_string(&fx.secret_file).unwrap(), fx.secret);
        let abs = std::fs::read_link(d.join(".fixtures/abs-link")).unwrap();
        assert_eq!(abs, fx.secret_file);
        // On the host, both links do reach the secret.
        assert_eq!(
            std::fs::read_to_string(d.join(".fixtures/rel-link")).unwrap(),
            fx.secret
        );
        let rel = std::fs::read_link(d.join(".fixtures/rel-link")).unwrap();
        assert!(rel
            .as_os_str()
            .as_bytes()
            .starts_with(b"../../../../../../../../"));
        fx.cleanup();
        assert!(!fx.secret_dir.exists());
        assert!(!d.join(".fixtures").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
