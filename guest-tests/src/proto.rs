//! The host-agent line protocol, shared by the agent (host) and its client
//! (guest): hex encoding, FNV-1a 64, request encoding/parsing, path checks
//! and errno names.
//!
//! One request per line, one reply per line. Paths are relative to the share
//! and hex-encoded (so any byte string works as a name); the empty string is
//! the share root. Replies are `OK ...` or `ERR <errno-name or message>`.

use std::fmt::Write as _;

/// The reply to `HELLO`.
pub const HELLO_REPLY: &str = "OK leasefs-agent 1";

/// Largest `READ` length the agent serves in one request.
pub const MAX_READ: u64 = 16 << 20;

pub fn hex_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(format!("odd-length hex string ({} chars)", b.len()));
    }
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    b.chunks(2)
        .map(|p| match (nib(p[0]), nib(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!(
                "invalid hex digit in {:?}",
                String::from_utf8_lossy(p)
            )),
        })
        .collect()
}

/// Streaming FNV-1a 64-bit hash.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64(u64);

impl Fnv1a64 {
    pub const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    pub const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Self {
        Fnv1a64(Self::OFFSET)
    }
    pub fn update(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= b as u64;
            h = h.wrapping_mul(Self::PRIME);
        }
        self.0 = h;
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = Fnv1a64::new();
    h.update(data);
    h.finish()
}

/// One agent request. Paths are raw bytes relative to the share root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello,
    Stat(Vec<u8>),
    Hash(Vec<u8>),
    Read(Vec<u8>, u64, u64),
    Write(Vec<u8>, u64, Vec<u8>),
    Truncate(Vec<u8>, u64),
    Unlink(Vec<u8>),
    Rename(Vec<u8>, Vec<u8>),
    Mkdir(Vec<u8>),
    Xattr(Vec<u8>, Vec<u8>),
    List(Vec<u8>),
    Secret,
    Bye,
    /// chmod without following a symlink (mode in octal on the wire).
    Chmod(Vec<u8>, u32),
    /// Sets the mtime (seconds, nanoseconds); atime is left alone.
    Utimes(Vec<u8>, i64, i64),
    /// An editor's save: write the data to a temporary name in the same
    /// directory, then rename it over the path.
    Save(Vec<u8>, Vec<u8>),
    /// Replies with its argument (a nonce, to resynchronise a connection).
    Echo(Vec<u8>),
    /// Runs the inner request and puts the microseconds its handling took
    /// (the host system calls) first in the reply: `OK <us>[ <payload>]`.
    Timed(Box<Request>),
    /// A hard link: `link(a, b)` (b must not exist).
    Link(Vec<u8>, Vec<u8>),
    /// `open(O_RDONLY | O_TRUNC)`: truncates to 0 without opening for
    /// writing (the kernel breaks no read lease for it).
    RdTrunc(Vec<u8>),
    /// `cp -p` over an existing file: open O_WRONLY|O_TRUNC, write the data,
    /// then set the mtime back to what it was before.
    Restore(Vec<u8>, Vec<u8>),
    /// Runs the inner requests at once, one thread each (they must not touch
    /// the same files); replies `OK <hex of each inner reply line>...`.
    Par(Vec<Request>),
    /// Stops the VM (QMP `stop`), runs the inner request, resumes the VM
    /// (`cont`) after the milliseconds given (or when the request is done,
    /// if later); replies `OK <hex of the inner reply line>`.
    Pause(u64, Box<Request>),
    /// Runs the inner requests one after another, as one host tool would, sleeping the
    /// milliseconds given between them; replies `OK <us>...`, the microseconds each took
    /// (`E` for one that failed).
    Seq(u64, Vec<Request>),
    /// `echo data >> path`: open O_WRONLY|O_APPEND|O_CREAT, write, close.
    Append(Vec<u8>, Vec<u8>),
}

impl Request {
    /// The request line, without the trailing newline.
    pub fn encode(&self) -> String {
        let h = |b: &[u8]| hex_encode(b);
        match self {
            Request::Hello => "HELLO".into(),
            Request::Stat(p) => format!("STAT {}", h(p)),
            Request::Hash(p) => format!("HASH {}", h(p)),
            Request::Read(p, off, len) => format!("READ {} {off} {len}", h(p)),
            Request::Write(p, off, data) => format!("WRITE {} {off} {}", h(p), h(data)),
            Request::Truncate(p, len) => format!("TRUNCATE {} {len}", h(p)),
            Request::Unlink(p) => format!("UNLINK {}", h(p)),
            Request::Rename(a, b) => format!("RENAME {} {}", h(a), h(b)),
            Request::Mkdir(p) => format!("MKDIR {}", h(p)),
            Request::Xattr(p, n) => format!("XATTR {} {}", h(p), h(n)),
            Request::List(p) => format!("LIST {}", h(p)),
            Request::Secret => "SECRET".into(),
            Request::Bye => "BYE".into(),
            Request::Chmod(p, mode) => format!("CHMOD {} {mode:o}", h(p)),
            Request::Utimes(p, sec, nsec) => format!("UTIMES {} {sec} {nsec}", h(p)),
            Request::Save(p, data) => format!("SAVE {} {}", h(p), h(data)),
            Request::Echo(b) => format!("ECHO {}", h(b)),
            Request::Timed(r) => format!("TIMED {}", r.encode()),
            Request::Link(a, b) => format!("LINK {} {}", h(a), h(b)),
            Request::RdTrunc(p) => format!("RDTRUNC {}", h(p)),
            Request::Restore(p, data) => format!("RESTORE {} {}", h(p), h(data)),
            Request::Par(rs) => {
                let mut s = "PAR".to_string();
                for r in rs {
                    s.push(' ');
                    s.push_str(&h(r.encode().as_bytes()));
                }
                s
            }
            Request::Pause(ms, r) => format!("PAUSE {ms} {}", h(r.encode().as_bytes())),
            Request::Seq(ms, rs) => {
                let mut s = format!("SEQ {ms}");
                for r in rs {
                    s.push(' ');
                    s.push_str(&h(r.encode().as_bytes()));
                }
                s
            }
            Request::Append(p, data) => format!("APPEND {} {}", h(p), h(data)),
        }
    }

    /// Parses one request line (a trailing `\n` / `\r\n` is ignored).
    /// Arguments are separated by single spaces, so an empty hex path
    /// (`STAT ` ) names the share root.
    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some(inner) = line.strip_prefix("TIMED ") {
            let r = Request::parse(inner)?;
            if matches!(r, Request::Timed(_)) {
                return Err("TIMED cannot be nested".into());
            }
            return Ok(Request::Timed(Box::new(r)));
        }
        let mut parts = line.split(' ');
        let cmd = parts.next().unwrap_or("");
        let args: Vec<&str> = parts.collect();
        let want = |n: usize| -> Result<(), String> {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!("{cmd} takes {n} argument(s), got {}", args.len()))
            }
        };
        let num = |s: &str, what: &str| -> Result<u64, String> {
            s.parse::<u64>().map_err(|_| format!("bad {what} {s:?}"))
        };
        let path = |s: &str| hex_decode(s).map_err(|e| format!("bad hex path: {e}"));
        let inner = |s: &str| -> Result<Request, String> {
            let line = hex_decode(s).map_err(|e| format!("bad hex request: {e}"))?;
            let line =
                String::from_utf8(line).map_err(|_| "inner request not UTF-8".to_string())?;
            match Request::parse(&line)? {
                Request::Bye => Err("BYE cannot be nested".into()),
                r => Ok(r),
            }
        };
        Ok(match cmd {
            "HELLO" => {
                want(0)?;
                Request::Hello
            }
            "SECRET" => {
                want(0)?;
                Request::Secret
            }
            "BYE" => {
                want(0)?;
                Request::Bye
            }
            "STAT" | "HASH" | "UNLINK" | "MKDIR" | "LIST" => {
                want(1)?;
                let p = path(args[0])?;
                match cmd {
                    "STAT" => Request::Stat(p),
                    "HASH" => Request::Hash(p),
                    "UNLINK" => Request::Unlink(p),
                    "MKDIR" => Request::Mkdir(p),
                    _ => Request::List(p),
                }
            }
            "READ" => {
                want(3)?;
                Request::Read(
                    path(args[0])?,
                    num(args[1], "offset")?,
                    num(args[2], "length")?,
                )
            }
            "WRITE" => {
                want(3)?;
                let data = hex_decode(args[2]).map_err(|e| format!("bad hex data: {e}"))?;
                Request::Write(path(args[0])?, num(args[1], "offset")?, data)
            }
            "TRUNCATE" => {
                want(2)?;
                Request::Truncate(path(args[0])?, num(args[1], "length")?)
            }
            "RENAME" => {
                want(2)?;
                Request::Rename(path(args[0])?, path(args[1])?)
            }
            "XATTR" => {
                want(2)?;
                let name = hex_decode(args[1]).map_err(|e| format!("bad hex name: {e}"))?;
                Request::Xattr(path(args[0])?, name)
            }
            "CHMOD" => {
                want(2)?;
                let mode = u32::from_str_radix(args[1], 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| format!("bad mode {:?}", args[1]))?;
                Request::Chmod(path(args[0])?, mode)
            }
            "UTIMES" => {
                want(3)?;
                let sec = args[1]
                    .parse::<i64>()
                    .map_err(|_| format!("bad seconds {:?}", args[1]))?;
                let nsec = num(args[2], "nanoseconds")?;
                if nsec >= 1_000_000_000 {
                    return Err(format!("bad nanoseconds {nsec}"));
                }
                Request::Utimes(path(args[0])?, sec, nsec as i64)
            }
            "SAVE" => {
                want(2)?;
                let data = hex_decode(args[1]).map_err(|e| format!("bad hex data: {e}"))?;
                Request::Save(path(args[0])?, data)
            }
            "ECHO" => {
                want(1)?;
                Request::Echo(hex_decode(args[0]).map_err(|e| format!("bad hex: {e}"))?)
            }
            "LINK" => {
                want(2)?;
                Request::Link(path(args[0])?, path(args[1])?)
            }
            "RDTRUNC" => {
                want(1)?;
                Request::RdTrunc(path(args[0])?)
            }
            "RESTORE" => {
                want(2)?;
                let data = hex_decode(args[1]).map_err(|e| format!("bad hex data: {e}"))?;
                Request::Restore(path(args[0])?, data)
            }
            "PAR" => Request::Par(args.iter().map(|a| inner(a)).collect::<Result<_, _>>()?),
            "PAUSE" => {
                want(2)?;
                Request::Pause(num(args[0], "milliseconds")?, Box::new(inner(args[1])?))
            }
            "SEQ" => {
                if args.is_empty() {
                    return Err("SEQ takes milliseconds and requests".into());
                }
                let rs = args[1..]
                    .iter()
                    .map(|a| inner(a))
                    .collect::<Result<Vec<_>, _>>()?;
                Request::Seq(num(args[0], "milliseconds")?, rs)
            }
            "APPEND" => {
                want(2)?;
                let data = hex_decode(args[1]).map_err(|e| format!("bad hex data: {e}"))?;
                Request::Append(path(args[0])?, data)
            }
            "TIMED" => return Err("TIMED needs a request".into()),
            "" => return Err("empty request".into()),
            other => return Err(format!("unknown command {other:?}")),
        })
    }
}

/// Splits a share-relative path into its components, refusing anything that
/// could leave the share: absolute paths, `..` components and NUL bytes.
/// Empty components (`a//b`, trailing `/`) and `.` are dropped; an empty
/// result means the share root.
pub fn split_relpath(p: &[u8]) -> Result<Vec<&[u8]>, String> {
    if p.first() == Some(&b'/') {
        return Err("absolute path refused".into());
    }
    if p.contains(&0) {
        return Err("NUL byte in path".into());
    }
    let mut out = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' component refused".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Parsed reply of a `STAT` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostStat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub nlink: u64,
}

impl HostStat {
    pub fn encode(&self) -> String {
        format!(
            "{:o} {} {} {} {} {} {}",
            self.mode, self.uid, self.gid, self.size, self.mtime_sec, self.mtime_nsec, self.nlink
        )
    }
    pub fn parse(s: &str) -> Result<HostStat, String> {
        let f: Vec<&str> = s.split(' ').collect();
        if f.len() != 7 {
            return Err(format!("STAT reply needs 7 fields: {s:?}"));
        }
        let bad = |what: &str| format!("bad {what} in STAT reply {s:?}");
        Ok(HostStat {
            mode: u32::from_str_radix(f[0], 8).map_err(|_| bad("mode"))?,
            uid: f[1].parse().map_err(|_| bad("uid"))?,
            gid: f[2].parse().map_err(|_| bad("gid"))?,
            size: f[3].parse().map_err(|_| bad("size"))?,
            mtime_sec: f[4].parse().map_err(|_| bad("mtime"))?,
            mtime_nsec: f[5].parse().map_err(|_| bad("mtime_nsec"))?,
            nlink: f[6].parse().map_err(|_| bad("nlink"))?,
        })
    }
}

/// Symbolic name of an errno value (`ENOENT`), or `E<n>` when unknown.
pub fn errno_name(e: i32) -> String {
    use libc::*;
    let n = match e {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        ESRCH => "ESRCH",
        EINTR => "EINTR",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        ENOEXEC => "ENOEXEC",
        EBADF => "EBADF",
        ECHILD => "ECHILD",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EXDEV => "EXDEV",
        ENODEV => "ENODEV",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        ENOTTY => "ENOTTY",
        ETXTBSY => "ETXTBSY",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ESPIPE => "ESPIPE",
        EROFS => "EROFS",
        EMLINK => "EMLINK",
        EPIPE => "EPIPE",
        ERANGE => "ERANGE",
        EDEADLK => "EDEADLK",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOLCK => "ENOLCK",
        ENOSYS => "ENOSYS",
        ENOTEMPTY => "ENOTEMPTY",
        ELOOP => "ELOOP",
        ENODATA => "ENODATA",
        EOVERFLOW => "EOVERFLOW",
        EOPNOTSUPP => "EOPNOTSUPP",
        ETIMEDOUT => "ETIMEDOUT",
        ESTALE => "ESTALE",
        EDQUOT => "EDQUOT",
        ECONNRESET => "ECONNRESET",
        ENOTCONN => "ENOTCONN",
        ENOTSOCK => "ENOTSOCK",
        _ => return format!("E{e}"),
    };
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let all: Vec<u8> = (0..=255).collect();
        let s = hex_encode(&all);
        assert_eq!(s.len(), 512);
        assert!(s.starts_with("000102"));
        assert!(s.ends_with("feff"));
        assert_eq!(hex_decode(&s).unwrap(), all);
        assert_eq!(hex_decode("ABcd").unwrap(), vec![0xab, 0xcd]);
        assert_eq!(hex_encode(b""), "");
        assert_eq!(hex_decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn hex_errors() {
        assert!(hex_decode("abc").is_err());
        assert!(hex_decode("zz").is_err());
        assert!(hex_decode("0g").is_err());
        assert!(hex_decode(" 0").is_err());
    }

    #[test]
    fn fnv_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
        let mut h = Fnv1a64::new();
        h.update(b"foo");
        h.update(b"");
        h.update(b"bar");
        assert_eq!(h.finish(), fnv1a64(b"foobar"));
    }

    #[test]
    fn request_roundtrip() {
        let reqs = vec![
            Request::Hello,
            Request::Stat(b"a/b c".to_vec()),
            Request::Stat(Vec::new()),
            Request::Hash("héllo\n✓".as_bytes().to_vec()),
            Request::Read(b"f".to_vec(), 5 << 30, 4096),
            Request::Write(b"f".to_vec(), 123, vec![0, 1, 0xff]),
            Request::Write(b"f".to_vec(), 0, vec![]),
            Request::Truncate(b"f".to_vec(), 0),
            Request::Unlink(b"x".to_vec()),
            Request::Rename(b"a".to_vec(), b"b/c".to_vec()),
            Request::Mkdir(b"d".to_vec()),
            Request::Xattr(b"f".to_vec(), b"user.x".to_vec()),
            Request::List(b"".to_vec()),
            Request::Secret,
            Request::Bye,
            Request::Chmod(b"f".to_vec(), 0o4755),
            Request::Chmod(b"f".to_vec(), 0),
            Request::Utimes(b"f".to_vec(), 1_500_000_000, 999_999_999),
            Request::Utimes(b"f".to_vec(), -5, 0),
            Request::Save(b"d/f".to_vec(), b"new".to_vec()),
            Request::Save(b"d/f".to_vec(), vec![]),
            Request::Echo(b"nonce".to_vec()),
            Request::Timed(Box::new(Request::Write(b"f".to_vec(), 3, vec![1]))),
            Request::Timed(Box::new(Request::Truncate(b"f".to_vec(), 0))),
            Request::Link(b"a".to_vec(), b"b".to_vec()),
            Request::RdTrunc(b"a".to_vec()),
            Request::Restore(b"a".to_vec(), b"xyz".to_vec()),
            Request::Par(vec![]),
            Request::Par(vec![
                Request::Write(b"f".to_vec(), 1, vec![2]),
                Request::Unlink(b"g".to_vec()),
            ]),
            Request::Pause(
                5000,
                Box::new(Request::Par(vec![Request::Truncate(b"f".to_vec(), 0)])),
            ),
            Request::Seq(0, vec![]),
            Request::Seq(
                50,
                vec![
                    Request::Append(b"log".to_vec(), b"line\n".to_vec()),
                    Request::Save(b"f".to_vec(), b"x".to_vec()),
                ],
            ),
        ];
        for r in reqs {
            let line = r.encode();
            assert!(!line.contains('\n'), "{line:?}");
            assert_eq!(Request::parse(&line).unwrap(), r, "{line}");
            assert_eq!(Request::parse(&format!("{line}\r\n")).unwrap(), r);
        }
    }

    #[test]
    fn request_parse_exact() {
        assert_eq!(
            Request::parse("STAT 612f62").unwrap(),
            Request::Stat(b"a/b".to_vec())
        );
        assert_eq!(
            Request::parse("READ 66 10 20").unwrap(),
            Request::Read(b"f".to_vec(), 10, 20)
        );
        assert_eq!(Request::parse("STAT ").unwrap(), Request::Stat(vec![]));
        assert_eq!(
            Request::parse("XATTR 66 757365722e61").unwrap(),
            Request::Xattr(b"f".to_vec(), b"user.a".to_vec())
        );
    }

    #[test]
    fn request_parse_errors() {
        for bad in [
            "",
            "NOPE",
            "hello",
            "HELLO x",
            "STAT",
            "STAT 6",
            "STAT zz",
            "STAT 61 62",
            "READ 61 1",
            "READ 61 -1 2",
            "READ 61 1 x",
            "WRITE 61 0",
            "WRITE 61 0 abc",
            "TRUNCATE 61",
            "RENAME 61",
            "XATTR 61 7",
            "BYE now",
            "CHMOD 61",
            "CHMOD 61 9",
            "CHMOD 61 17777",
            "UTIMES 61 1",
            "UTIMES 61 x 0",
            "UTIMES 61 1 1000000000",
            "SAVE 61",
            "ECHO",
            "TIMED",
            "TIMED ",
            "TIMED NOPE",
            "TIMED TIMED HELLO",
            "LINK 61",
            "RDTRUNC",
            "PAR zz",
            "PAR 425945",
            "PAUSE 10",
            "PAUSE x 48454c4c4f",
        ] {
            assert!(Request::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn relpath_checks() {
        assert_eq!(split_relpath(b"").unwrap(), Vec::<&[u8]>::new());
        assert_eq!(split_relpath(b".").unwrap(), Vec::<&[u8]>::new());
        assert_eq!(
            split_relpath(b"a//b/./c/").unwrap(),
            vec![&b"a"[..], &b"b"[..], &b"c"[..]]
        );
        assert_eq!(
            split_relpath(b"..a/b..").unwrap(),
            vec![&b"..a"[..], &b"b.."[..]]
        );
        assert_eq!(split_relpath(b"...").unwrap(), vec![&b"..."[..]]);
        assert!(split_relpath(b"/etc/passwd").is_err());
        assert!(split_relpath(b"..").is_err());
        assert!(split_relpath(b"a/../../b").is_err());
        assert!(split_relpath(b"a/..").is_err());
        assert!(split_relpath(b"a\0b").is_err());
    }

    #[test]
    fn hoststat_roundtrip() {
        let s = HostStat {
            mode: 0o100644,
            uid: 0,
            gid: 42,
            size: 5 << 30,
            mtime_sec: 1_500_000_000,
            mtime_nsec: 987_654_321,
            nlink: 2,
        };
        let e = s.encode();
        assert!(e.starts_with("100644 0 42 "));
        assert_eq!(HostStat::parse(&e).unwrap(), s);
        assert!(HostStat::parse("1 2 3").is_err());
        assert!(HostStat::parse("9 0 0 0 0 0 1").is_err());
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ENOENT), "ENOENT");
        assert_eq!(errno_name(libc::ENODATA), "ENODATA");
        assert_eq!(errno_name(9999), "E9999");
    }
}
