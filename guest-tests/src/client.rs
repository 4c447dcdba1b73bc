//! Guest side of the host-agent protocol: finds the `leasefs.agent`
//! virtio-serial port (or a unix socket, for testing on the host) and
//! performs requests with timeouts, so a missing agent cannot hang a test.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::{hex_decode, HostStat, Request, HELLO_REPLY};
use crate::sys::{self, Fd, OpExt};

pub const PORT_NAME: &str = "leasefs.agent";
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Agent {
    fd: Fd,
    buf: Vec<u8>,
    /// Where the connection goes (for messages).
    pub desc: String,
}

/// An `ERR ...` reply, or a transport failure.
pub type Reply = Result<String, String>;

/// Finds the character device of the virtio-serial port with this name
/// (`leasefs.agent` for the host agent).
pub fn find_port_named(port: &str) -> Result<PathBuf, String> {
    let link = Path::new("/dev/virtio-ports").join(port);
    if sys::stat(&link).is_ok() {
        return Ok(link);
    }
    let class = Path::new("/sys/class/virtio-ports");
    let entries = std::fs::read_dir(class).op(format!(
        "no virtio-serial ports: read {} (is /sys mounted? does the VM have the port?)",
        class.display()
    ))?;
    let mut seen = Vec::new();
    for e in entries.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        let name = name.trim();
        seen.push(format!("{}={name:?}", e.file_name().to_string_lossy()));
        if name != port {
            continue;
        }
        let dev = Path::new("/dev").join(e.file_name());
        if sys::stat(&dev).is_err() {
            // No devtmpfs node: make one from the sysfs major:minor.
            let mm = std::fs::read_to_string(e.path().join("dev")).op("read port dev number")?;
            let (ma, mi) = mm
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("bad dev number {mm:?}"))?;
            let (ma, mi): (u32, u32) = (
                ma.parse().map_err(|_| format!("bad major {ma:?}"))?,
                mi.parse().map_err(|_| format!("bad minor {mi:?}"))?,
            );
            sys::mknod(&dev, libc::S_IFCHR | 0o600, libc::makedev(ma, mi))
                .op(format!("mknod {}", dev.display()))?;
        }
        return Ok(dev);
    }
    Err(format!(
        "no virtio-serial port named {port} (ports: {})",
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    ))
}

/// `OK ...` -> Ok(Ok(payload)), `ERR ...` -> Ok(Err(text)).
pub fn parse_reply(line: &str) -> Result<Reply, String> {
    if line == "OK" {
        Ok(Ok(String::new()))
    } else if let Some(rest) = line.strip_prefix("OK ") {
        Ok(Ok(rest.to_string()))
    } else if let Some(rest) = line.strip_prefix("ERR") {
        Ok(Err(rest.trim_start().to_string()))
    } else {
        Err(format!("malformed agent reply {line:?}"))
    }
}

impl Agent {
    pub fn connect_port() -> Result<Agent, String> {
        Agent::connect_port_named(PORT_NAME)
    }

    /// Connects to the virtio-serial port with this name.
    pub fn connect_port_named(port: &str) -> Result<Agent, String> {
        let dev = find_port_named(port)?;
        let fd = sys::open(&dev, libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
            .op(format!("open {}", dev.display()))?;
        Ok(Agent {
            fd,
            buf: Vec::new(),
            desc: dev.display().to_string(),
        })
    }

    /// Connects to the agent's unix socket directly (host-side testing).
    pub fn connect_path(p: &Path) -> Result<Agent, String> {
        let s =
            std::os::unix::net::UnixStream::connect(p).op(format!("connect {}", p.display()))?;
        s.set_nonblocking(true).op("set_nonblocking")?;
        Ok(Agent {
            fd: OwnedFd::from(s),
            buf: Vec::new(),
            desc: p.display().to_string(),
        })
    }

    /// A second handle on the same connection, for a forked test process.
    pub fn fork_copy(&self) -> Agent {
        Agent {
            fd: sys::dup(&self.fd).expect("dup agent fd"),
            buf: self.buf.clone(),
            desc: self.desc.clone(),
        }
    }

    fn send_line(&mut self, line: &str) -> Result<(), String> {
        let mut data = line.as_bytes().to_vec();
        data.push(b'\n');
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut off = 0;
        while off < data.len() {
            match sys::write(&self.fd, &data[off..]) {
                Ok(n) => off += n,
                Err(sys::Errno(libc::EAGAIN)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err("timed out sending to the agent".into());
                    }
                    sys::poll_fd(self.fd.as_raw_fd(), libc::POLLOUT, left).op("poll agent")?;
                }
                Err(e) => return Err(format!("write to agent: {e}")),
            }
        }
        Ok(())
    }

    fn recv_line(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let s = String::from_utf8_lossy(&line[..i]).into_owned();
                return Ok(s.trim_end_matches('\r').to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no reply from the agent within {timeout:?}"));
            }
            let ev = sys::poll_fd(self.fd.as_raw_fd(), libc::POLLIN, left).op("poll agent")?;
            if ev == 0 {
                continue;
            }
            let mut chunk = [0u8; 65536];
            match sys::read(&self.fd, &mut chunk) {
                Ok(0) => {
                    if ev & libc::POLLHUP != 0 {
                        return Err("agent disconnected (host side not connected)".into());
                    }
                    return Err("agent closed the connection".into());
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(sys::Errno(libc::EAGAIN)) => {
                    if ev & libc::POLLHUP != 0 {
                        // virtio-serial: host not connected; don't spin.
                        sys::sleep_ms(50);
                    }
                }
                Err(e) => return Err(format!("read from agent: {e}")),
            }
        }
    }

    /// Sends HELLO and discards everything up to its reply, so a late reply
    /// to an abandoned request cannot be taken for a later request's.
    pub fn sync(&mut self) -> Result<(), String> {
        self.send_line(&Request::Hello.encode())?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.recv_line(left.max(Duration::from_millis(1)))?;
            if line == HELLO_REPLY {
                return Ok(());
            }
        }
    }

    /// Like `sync`, for a peer that may not be listening yet (the other
    /// guest of the two-guest stress, still booting): sends `ECHO <nonce>`
    /// every `every` until its own reply comes back, for at most `total`.
    /// Replies to earlier nonces arrive before the awaited one, so they are
    /// discarded here and cannot be taken for a later request's reply.
    pub fn sync_patient(&mut self, every: Duration, total: Duration) -> Result<(), String> {
        let deadline = Instant::now() + total;
        let base = sys::random_hex();
        for i in 0u64.. {
            let nonce = format!("{base}-{i}").into_bytes();
            let want = format!("OK {}", crate::proto::hex_encode(&nonce));
            self.send_line(&Request::Echo(nonce).encode())?;
            let until = (Instant::now() + every).min(deadline);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.recv_line(left) {
                    Ok(line) if line == want => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.starts_with("no reply") => break,
                    Err(e) if e.contains("not connected") => sys::sleep_ms(200),
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(format!("no answer from {} within {total:?}", self.desc))
    }

    /// Sends all requests at once, then reads their replies in order.
    pub fn call_many(&mut self, reqs: &[Request]) -> Result<Vec<Reply>, String> {
        let mut text = String::new();
        for r in reqs {
            text.push_str(&r.encode());
            text.push('\n');
        }
        let text = text.trim_end_matches('\n');
        if !reqs.is_empty() {
            self.send_line(text)?;
        }
        let mut out = Vec::with_capacity(reqs.len());
        for _ in reqs {
            let line = self.recv_line(REPLY_TIMEOUT)?;
            out.push(parse_reply(&line)?);
        }
        Ok(out)
    }

    /// Runs requests as `TIMED` ones, all sent at once; returns how long the
    /// agent took for each (its host system calls), in microseconds. Any
    /// `ERR` reply is an error.
    pub fn timed_many(&mut self, reqs: &[Request]) -> Result<Vec<u64>, String> {
        let timed: Vec<Request> = reqs
            .iter()
            .map(|r| Request::Timed(Box::new(r.clone())))
            .collect();
        let replies = self.call_many(&timed)?;
        let mut out = Vec::with_capacity(reqs.len());
        for (req, rep) in reqs.iter().zip(replies) {
            let what: String = req.encode().chars().take(80).collect();
            let payload = rep.map_err(|e| format!("agent {what}: ERR {e}"))?;
            let us = payload.split(' ').next().unwrap_or("");
            out.push(
                us.parse()
                    .map_err(|_| format!("agent {what}: bad TIMED reply {payload:?}"))?,
            );
        }
        Ok(out)
    }

    /// Sends a request without reading its reply (runner self-test only).
    pub fn send_only(&mut self, req: &Request) -> Result<(), String> {
        self.send_line(&req.encode())
    }

    /// One request: Ok(Ok(payload after "OK")) or Ok(Err(text after "ERR")).
    pub fn call(&mut self, req: &Request) -> Result<Reply, String> {
        self.send_line(&req.encode())?;
        let line = self.recv_line(REPLY_TIMEOUT)?;
        parse_reply(&line)
    }

    /// [`call`](Self::call) for a request that may take up to `timeout` (a host tool's
    /// whole run).
    pub fn call_patient(&mut self, req: &Request, timeout: Duration) -> Result<Reply, String> {
        self.send_line(&req.encode())?;
        let line = self.recv_line(timeout)?;
        parse_reply(&line)
    }

    fn ok(&mut self, req: Request) -> Result<String, String> {
        let what = req.encode();
        let what: String = what.chars().take(80).collect();
        match self.call(&req)? {
            Ok(s) => Ok(s),
            Err(e) => Err(format!("agent {what}: ERR {e}")),
        }
    }

    /// Host-side lstat; None if the path does not exist on the host.
    pub fn stat(&mut self, p: &[u8]) -> Result<Option<HostStat>, String> {
        match self.call(&Request::Stat(p.to_vec()))? {
            Ok(s) => HostStat::parse(&s).map(Some),
            Err(e) if e.starts_with("ENOENT") => Ok(None),
            Err(e) => Err(format!("agent STAT: ERR {e}")),
        }
    }

    /// Host-side (size, fnv1a64 of content); None if absent.
    pub fn hash(&mut self, p: &[u8]) -> Result<Option<(u64, u64)>, String> {
        match self.call(&Request::Hash(p.to_vec()))? {
            Ok(s) => {
                let (a, b) = s
                    .split_once(' ')
                    .ok_or_else(|| format!("bad HASH reply {s:?}"))?;
                let size = a.parse().map_err(|_| format!("bad HASH size {a:?}"))?;
                let h = u64::from_str_radix(b, 16).map_err(|_| format!("bad HASH value {b:?}"))?;
                Ok(Some((size, h)))
            }
            Err(e) if e.starts_with("ENOENT") => Ok(None),
            Err(e) => Err(format!("agent HASH: ERR {e}")),
        }
    }

    pub fn read(&mut self, p: &[u8], off: u64, len: u64) -> Result<Vec<u8>, String> {
        let s = self.ok(Request::Read(p.to_vec(), off, len))?;
        hex_decode(&s).map_err(|e| format!("bad READ reply: {e}"))
    }

    pub fn write(&mut self, p: &[u8], off: u64, data: &[u8]) -> Result<(), String> {
        self.ok(Request::Write(p.to_vec(), off, data.to_vec()))
            .map(drop)
    }

    pub fn truncate(&mut self, p: &[u8], len: u64) -> Result<(), String> {
        self.ok(Request::Truncate(p.to_vec(), len)).map(drop)
    }

    pub fn unlink(&mut self, p: &[u8]) -> Result<(), String> {
        self.ok(Request::Unlink(p.to_vec())).map(drop)
    }

    pub fn rename(&mut self, a: &[u8], b: &[u8]) -> Result<(), String> {
        self.ok(Request::Rename(a.to_vec(), b.to_vec())).map(drop)
    }

    pub fn mkdir(&mut self, p: &[u8]) -> Result<(), String> {
        self.ok(Request::Mkdir(p.to_vec())).map(drop)
    }

    /// Host-side xattr value; None on ENODATA.
    pub fn xattr(&mut self, p: &[u8], name: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self.call(&Request::Xattr(p.to_vec(), name.to_vec()))? {
            Ok(s) => hex_decode(&s)
                .map(Some)
                .map_err(|e| format!("bad XATTR reply: {e}")),
            Err(e) if e.starts_with("ENODATA") => Ok(None),
            Err(e) => Err(format!("agent XATTR: ERR {e}")),
        }
    }

    pub fn list(&mut self, p: &[u8]) -> Result<u64, String> {
        let s = self.ok(Request::List(p.to_vec()))?;
        s.parse().map_err(|_| format!("bad LIST reply {s:?}"))
    }

    pub fn secret(&mut self) -> Result<Vec<u8>, String> {
        let s = self.ok(Request::Secret)?;
        hex_decode(&s).map_err(|e| format!("bad SECRET reply: {e}"))
    }

    pub fn bye(&mut self) -> Result<(), String> {
        self.ok(Request::Bye).map(drop)
    }
}
