//! `stress`: host writers against guest readers, with causality through the
//! host agent. Run inside the guest (qemu/stress.sh boots one VM per daemon
//! configuration).
//!
//! Each round: the guest primes its caches (reads the file, stats the names,
//! lists the directory), asks the agent to make one change on the host, and
//! starts looking only when the agent has replied, i.e. after the host system
//! calls returned. The agent reports how long those calls took: with
//! leasefsd's leases a host open-for-write of a file the guest caches is held
//! until the guest's lease has ended; that is the host-writer hold time.
//!
//! Kinds (one change and one way of looking per kind):
//!
//! | kind | host change | the guest looks with | class |
//! |---|---|---|---|
//! | overwrite | pwrite a range, same size | read(2) on a descriptor kept open, fstat on it, open + fstat + read, stat(2) size (which comes first rotates) | data |
//! | append | pwrite at the end | same | data |
//! | truncate | open O_WRONLY + ftruncate (shorter, or longer for tiny files) | same | data |
//! | replace-open | write a temporary file, rename it over the name | open + fstat + read | data |
//! | unlink-open | unlink a storm of names | open(2) of each must fail with ENOENT | data |
//! | replace-stat | as replace-open | stat(2): a new inode of the new size | namespace |
//! | unlink-stat | unlink a storm of names | stat(2) of each: ENOENT | namespace |
//! | unlink-readdir | unlink a storm of names | readdir: the names are gone | namespace |
//! | create-stat | create a storm of names (after failed lookups) | stat(2) of each: found, right size | namespace |
//! | create-readdir | create a storm of names | readdir: all listed | namespace |
//! | chmod | chmod | stat(2) mode | namespace |
//! | mtime | utimensat (mtime only) | stat(2) mtime with ns | namespace |
//!
//! A data answer that is not the new state (an old byte, the old size, an
//! open that succeeds on a removed name) is a stale data read: the run fails.
//! Namespace answers are looked at right after the reply (0 ms) and again at
//! 50 ms (`--strict-namespace-ms MS` moves the second look to MS and makes a
//! stale answer there a failure); they are counted, not failed, by default:
//! a stock guest may see them late by up to the lease (docs/coherency.md,
//! guarantee 3). After the first look the guest polls every 1 ms for up to
//! `--max-wait-ms` (2000) until the answer is right: that delay since the
//! reply is the revocation latency ("unseen" when it never came).
//!
//! After every round the guest re-reads a set of files nobody changes (16 of
//! 16 KiB) and times it: the cached re-read throughput, to compare modes; with
//! `--readers N` (default 1) background threads do the same all the time.
//!
//! With `--peer` the changes are made by another guest instead of the host:
//! the agent port is relayed (qemu/stress.sh --two-guests) to the other
//! guest's `leasefs.peer` port, where its own `stress --peer` serves the
//! agent protocol through its own mount, and vice versa.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::Agent;
use crate::proto::Request;
use crate::sys::{self, Fd, OpExt};

/// The port a `--peer` guest serves the other guest's requests on.
pub const PEER_PORT: &str = "leasefs.peer";

pub struct Opts {
    /// The mount point (share root).
    pub dir: PathBuf,
    /// The work directory's name under `dir`.
    pub name: String,
    pub seed: u64,
    pub rounds: Option<u64>,
    pub seconds: Option<f64>,
    pub agent_path: Option<PathBuf>,
    /// Second namespace look, ms after the reply.
    pub late_ms: u64,
    /// Stale namespace answers at `late_ms` fail the run.
    pub strict: bool,
    pub max_wait_ms: u64,
    /// Names per create/unlink storm.
    pub storm: usize,
    /// Background reader threads.
    pub readers: usize,
    /// Only these kinds (empty: all).
    pub kinds: Vec<Kind>,
    /// Also serve the other guest's requests on the `leasefs.peer` port.
    pub peer: bool,
    /// How long to wait for the agent (or the peer guest) to answer at start.
    pub connect_secs: u64,
    pub keep: bool,
    pub verbose: bool,
}

impl Opts {
    pub fn new() -> Opts {
        Opts {
            dir: PathBuf::from("/mnt"),
            name: "stress".into(),
            seed: 1,
            rounds: None,
            seconds: None,
            agent_path: None,
            late_ms: 50,
            strict: false,
            max_wait_ms: 2000,
            storm: 8,
            readers: 1,
            kinds: Vec::new(),
            peer: false,
            connect_secs: 0,
            keep: false,
            verbose: false,
        }
    }
}

/// Rounds when neither --rounds nor --seconds is given: four of each kind.
pub const DEFAULT_ROUNDS: u64 = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Overwrite,
    Append,
    Truncate,
    ReplaceOpen,
    UnlinkOpen,
    ReplaceStat,
    UnlinkStat,
    UnlinkReaddir,
    CreateStat,
    CreateReaddir,
    Chmod,
    Mtime,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Overwrite,
        Kind::Append,
        Kind::Truncate,
        Kind::ReplaceOpen,
        Kind::UnlinkOpen,
        Kind::ReplaceStat,
        Kind::UnlinkStat,
        Kind::UnlinkReaddir,
        Kind::CreateStat,
        Kind::CreateReaddir,
        Kind::Chmod,
        Kind::Mtime,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Overwrite => "overwrite",
            Kind::Append => "append",
            Kind::Truncate => "truncate",
            Kind::ReplaceOpen => "replace-open",
            Kind::UnlinkOpen => "unlink-open",
            Kind::ReplaceStat => "replace-stat",
            Kind::UnlinkStat => "unlink-stat",
            Kind::UnlinkReaddir => "unlink-readdir",
            Kind::CreateStat => "create-stat",
            Kind::CreateReaddir => "create-readdir",
            Kind::Chmod => "chmod",
            Kind::Mtime => "mtime",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.name() == s)
    }

    /// Data answers: a stale one fails the run.
    pub fn is_data(self) -> bool {
        matches!(
            self,
            Kind::Overwrite | Kind::Append | Kind::Truncate | Kind::ReplaceOpen | Kind::UnlinkOpen
        )
    }

    /// The host opens a file the guest caches for writing (where leases hold it).
    pub fn is_writer(self) -> bool {
        matches!(self, Kind::Overwrite | Kind::Append | Kind::Truncate)
    }
}

/// Parses a comma-separated list of kinds (`data` and `namespace` name the classes).
pub fn parse_kinds(s: &str) -> Result<Vec<Kind>, String> {
    let mut out = Vec::new();
    for w in s.split(',').filter(|w| !w.is_empty()) {
        match w {
            "all" => out.extend(Kind::ALL),
            "data" => out.extend(Kind::ALL.iter().filter(|k| k.is_data())),
            "namespace" | "ns" => out.extend(Kind::ALL.iter().filter(|k| !k.is_data())),
            _ => out.push(Kind::from_name(w).ok_or_else(|| format!("unknown kind {w:?}"))?),
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

// ---------------------------------------------------------------- small helpers

/// xorshift64*: the run's only source of randomness (`--seed`).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values (infinite = never seen).
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Machine form: `inf` for never, `-` for no data, else ms with 3 decimals.
fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.is_infinite() => "inf".into(),
        Some(x) => format!("{x:.3}"),
    }
}

/// Human form, `>MAX` for never.
fn human(v: Option<f64>, max_wait: u64) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.is_infinite() => format!(">{max_wait}"),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

/// All bytes of a file through a descriptor, from offset 0, without moving
/// its offset or reopening it.
fn pread_all(fd: &Fd) -> sys::SysResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = sys::pread(fd, &mut buf, out.len() as u64)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn join_rel(a: &[u8], b: &str) -> Vec<u8> {
    let mut v = a.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(b.as_bytes());
    v
}

// ---------------------------------------------------------------- looking

/// The result of one look: how many answers, how many not yet the new state,
/// and the first such answer described.
#[derive(Default, Debug)]
struct Look {
    checks: u64,
    stale: u64,
    detail: Option<String>,
}

impl Look {
    fn judge(&mut self, r: Option<String>) {
        self.checks += 1;
        if let Some(d) = r {
            self.stale += 1;
            if self.detail.is_none() {
                self.detail = Some(d);
            }
        }
    }
}

fn judge_bytes(
    what: &str,
    got: sys::SysResult<Vec<u8>>,
    want: &[u8],
    old: &[u8],
) -> Option<String> {
    let got = match got {
        Ok(g) => g,
        Err(e) => return Some(format!("{what}: {e}")),
    };
    if got == want {
        return None;
    }
    let state = if got == old {
        "the old content".to_string()
    } else {
        match got.iter().zip(want).position(|(a, b)| a != b) {
            Some(i) => format!("differs from the new content at offset {i}"),
            None => "a prefix/extension of the new content".into(),
        }
    };
    Some(format!(
        "{what}: {} bytes, expected {} ({state})",
        got.len(),
        want.len()
    ))
}

fn judge_size(what: &str, got: sys::SysResult<i64>, want: usize, old: usize) -> Option<String> {
    match got {
        Err(e) => Some(format!("{what}: {e}")),
        Ok(s) if s as usize == want => None,
        Ok(s) => Some(format!(
            "{what}: size {s}, expected {want}{}",
            if s as usize == old {
                " (the old size)"
            } else {
                ""
            }
        )),
    }
}

/// What the new state looks like, and how to look at it.
enum Expect<'a> {
    /// overwrite/append/truncate: every way of reading the file.
    Data {
        path: &'a Path,
        kept: &'a Fd,
        want: &'a [u8],
        old: &'a [u8],
        order: usize,
    },
    /// replace-open: a fresh open finds the new file.
    Opened {
        path: &'a Path,
        want: &'a [u8],
        old: &'a [u8],
    },
    /// unlink-open: opening a removed name fails.
    OpenFails {
        paths: &'a [PathBuf],
    },
    /// replace-stat: stat(2) shows the new inode.
    NewInode {
        path: &'a Path,
        old_ino: u64,
        size: u64,
        old_size: u64,
    },
    StatGone {
        paths: &'a [PathBuf],
    },
    StatPresent {
        paths: &'a [PathBuf],
        sizes: &'a [u64],
    },
    Listing {
        dir: &'a Path,
        want: &'a BTreeSet<Vec<u8>>,
        old: &'a BTreeSet<Vec<u8>>,
    },
    Mode {
        path: &'a Path,
        mode: u32,
        old: u32,
    },
    Mtime {
        path: &'a Path,
        want: (i64, i64),
        old: (i64, i64),
    },
}

fn look(e: &Expect) -> Look {
    let mut l = Look::default();
    match e {
        Expect::Data {
            path,
            kept,
            want,
            old,
            order,
        } => {
            for step in 0..3 {
                match (order + step) % 3 {
                    0 => {
                        l.judge(judge_bytes(
                            "read(2) on the kept descriptor",
                            pread_all(kept),
                            want,
                            old,
                        ));
                        l.judge(judge_size(
                            "fstat on the kept descriptor",
                            sys::fstat(kept).map(|s| s.st_size),
                            want.len(),
                            old.len(),
                        ));
                    }
                    1 => match sys::open(path, libc::O_RDONLY, 0) {
                        Err(e) => l.judge(Some(format!("open: {e}"))),
                        Ok(fd) => {
                            l.judge(judge_size(
                                "fstat after open",
                                sys::fstat(&fd).map(|s| s.st_size),
                                want.len(),
                                old.len(),
                            ));
                            l.judge(judge_bytes(
                                "read after open",
                                sys::read_to_end(&fd),
                                want,
                                old,
                            ));
                        }
                    },
                    _ => l.judge(judge_size(
                        "stat(2)",
                        sys::stat(path).map(|s| s.st_size),
                        want.len(),
                        old.len(),
                    )),
                }
            }
        }
        Expect::Opened { path, want, old } => match sys::open(path, libc::O_RDONLY, 0) {
            Err(e) => l.judge(Some(format!("open of the replaced name: {e}"))),
            Ok(fd) => {
                l.judge(judge_size(
                    "fstat after open of the replaced name",
                    sys::fstat(&fd).map(|s| s.st_size),
                    want.len(),
                    old.len(),
                ));
                l.judge(judge_bytes(
                    "read after open of the replaced name",
                    sys::read_to_end(&fd),
                    want,
                    old,
                ));
            }
        },
        Expect::OpenFails { paths } => {
            for p in paths.iter() {
                l.judge(match sys::open(p, libc::O_RDONLY, 0) {
                    Err(sys::Errno(libc::ENOENT)) => None,
                    Err(e) => Some(format!("open of a removed name: {e}, expected ENOENT")),
                    Ok(fd) => Some(format!(
                        "open of a removed name succeeded (and read {} bytes of the removed file)",
                        sys::read_to_end(&fd).map(|d| d.len()).unwrap_or(0)
                    )),
                });
            }
        }
        Expect::NewInode {
            path,
            old_ino,
            size,
            old_size,
        } => l.judge(match sys::stat(path) {
            Err(e) => Some(format!("stat of the replaced name: {e}")),
            Ok(st) if st.st_ino != *old_ino && st.st_size as u64 == *size => None,
            Ok(st) if st.st_ino == *old_ino => Some(format!(
                "stat of the replaced name: the old inode {old_ino} (size {}{})",
                st.st_size,
                if st.st_size as u64 == *old_size {
                    ", the old size"
                } else {
                    ""
                }
            )),
            Ok(st) => Some(format!(
                "stat of the replaced name: inode {}, size {}, expected size {size}",
                st.st_ino, st.st_size
            )),
        }),
        Expect::StatGone { paths } => {
            for p in paths.iter() {
                l.judge(match sys::stat(p) {
                    Err(sys::Errno(libc::ENOENT)) => None,
                    Err(e) => Some(format!("stat of a removed name: {e}, expected ENOENT")),
                    Ok(_) => Some("stat of a removed name succeeded".into()),
                });
            }
        }
        Expect::StatPresent { paths, sizes } => {
            for (p, &size) in paths.iter().zip(sizes.iter()) {
                l.judge(match sys::stat(p) {
                    Err(e) => Some(format!("stat of a created name: {e}")),
                    Ok(st) if st.st_size as u64 == size => None,
                    Ok(st) => Some(format!(
                        "stat of a created name: size {}, expected {size}",
                        st.st_size
                    )),
                });
            }
        }
        Expect::Listing { dir, want, old } => l.judge(match sys::list_dir(dir) {
            Err(e) => Some(format!("readdir: {e}")),
            Ok(ents) => {
                let got: BTreeSet<Vec<u8>> = ents.into_iter().map(|e| e.name).collect();
                if &&got == want {
                    None
                } else {
                    let missing = want.difference(&got).count();
                    let extra = got.difference(want).count();
                    Some(format!(
                        "readdir: {} entries, expected {} ({missing} missing, {extra} extra{})",
                        got.len(),
                        want.len(),
                        if &&got == old {
                            "; the old listing"
                        } else {
                            ""
                        }
                    ))
                }
            }
        }),
        Expect::Mode { path, mode, old } => l.judge(match sys::stat(path) {
            Err(e) => Some(format!("stat after chmod: {e}")),
            Ok(st) if st.st_mode & 0o7777 == *mode => None,
            Ok(st) => Some(format!(
                "stat after chmod: mode {:o}, expected {mode:o}{}",
                st.st_mode & 0o7777,
                if st.st_mode & 0o7777 == *old {
                    " (the old mode)"
                } else {
                    ""
                }
            )),
        }),
        Expect::Mtime { path, want, old } => l.judge(match sys::stat(path) {
            Err(e) => Some(format!("stat after utimes: {e}")),
            Ok(st) if (st.st_mtime, st.st_mtime_nsec) == *want => None,
            Ok(st) => {
                let got = (st.st_mtime, st.st_mtime_nsec);
                Some(format!(
                    "stat after utimes: mtime {}.{:09}, expected {}.{:09}{}",
                    got.0,
                    got.1,
                    want.0,
                    want.1,
                    if got == *old { " (the old mtime)" } else { "" }
                ))
            }
        }),
    }
    l
}

/// Everything seen after one change.
struct Obs {
    first: Look,
    late: Option<Look>,
    /// ms after the reply when the guest first saw the new state.
    seen_ms: Option<f64>,
}

/// Looks at once, at `late` (namespace kinds), and every 1 ms until the new
/// state shows or `max_wait` has passed.
fn observe(e: &Expect, t0: Instant, late: Option<Duration>, max_wait: Duration) -> Obs {
    let first = look(e);
    let mut seen_ms = if first.stale == 0 { Some(0.0) } else { None };
    let mut late_look: Option<Look> = None;
    loop {
        let el = t0.elapsed();
        let late_pending = late.is_some() && late_look.is_none();
        if late_pending && el >= late.unwrap() {
            let l = look(e);
            if l.stale == 0 && seen_ms.is_none() {
                seen_ms = Some(ms(el));
            }
            late_look = Some(l);
            continue;
        }
        if seen_ms.is_none() && el < max_wait {
            sys::sleep_ms(1);
            let t = t0.elapsed();
            if look(e).stale == 0 {
                seen_ms = Some(ms(t));
            }
            continue;
        }
        if late_pending {
            std::thread::sleep(late.unwrap().saturating_sub(el));
            continue;
        }
        break;
    }
    Obs {
        first,
        late: late_look,
        seen_ms,
    }
}

// ---------------------------------------------------------------- the model

struct DataFile {
    path: PathBuf,
    rel: Vec<u8>,
    content: Vec<u8>,
    kept: Fd,
}

struct ReplFile {
    path: PathBuf,
    rel: Vec<u8>,
    content: Vec<u8>,
}

struct AttrFile {
    path: PathBuf,
    rel: Vec<u8>,
    mode: u32,
    mtime: (i64, i64),
}

#[derive(Default)]
struct KindStats {
    rounds: u64,
    checks: u64,
    stale: u64,
    late_checks: u64,
    stale_late: u64,
    /// Revocation latency per round, ms (infinite: never seen).
    lat: Vec<f64>,
    /// Host-side duration of each change request, ms.
    hold: Vec<f64>,
    notes: Vec<String>,
}

const RO_FILES: usize = 16;
const RO_SIZE: usize = 16384;
const DATA_FILES: usize = 6;
const REPL_FILES: usize = 4;
const ATTR_FILES: usize = 4;
const NOTES_PER_KIND: usize = 3;

#[derive(Default)]
struct Throughput {
    reads: u64,
    bytes: u64,
    secs: f64,
    bad: u64,
}

struct Stress {
    late: Duration,
    max_wait: Duration,
    storm: usize,
    seed: u64,
    verbose: bool,
    root: PathBuf,
    rel: Vec<u8>,
    agent: Agent,
    rng: Rng,
    ro: Arc<Vec<(PathBuf, Vec<u8>)>>,
    data: Vec<DataFile>,
    repl: Vec<ReplFile>,
    attr: Vec<AttrFile>,
    stats: BTreeMap<Kind, KindStats>,
    tp: Throughput,
}

/// Content seeds: distinct per (run seed, purpose, index).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    seed.wrapping_mul(0x100_0000_01B3) ^ a.wrapping_mul(0x9E37_79B9) ^ b.rotate_left(29)
}

impl Stress {
    fn p(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    fn relp(&self, sub: &str) -> Vec<u8> {
        join_rel(&self.rel, sub)
    }

    /// Makes the work tree: the directories through the guest's mount, the
    /// files on the host side (the agent), as a host-side project the guest
    /// reads; then the guest reads every file back (which also shows that the
    /// agent serves the directory the guest has mounted).
    fn setup(&mut self) -> Result<(), String> {
        sys::remove_tree(&self.root)?;
        sys::mkdir(&self.root, 0o755).op(format!("mkdir {}", sys::show(&self.root)))?;
        for d in ["ro", "data", "repl", "attr", "storm"] {
            sys::mkdir(self.p(d), 0o755).op(format!("mkdir {d}"))?;
        }
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for i in 0..RO_FILES {
            files.push((
                format!("ro/f{i:02}"),
                sys::pattern(mix(self.seed, 1, i as u64), RO_SIZE),
            ));
        }
        for i in 0..DATA_FILES {
            let size = self.rng.range(4096, 32768) as usize;
            files.push((
                format!("data/f{i}"),
                sys::pattern(mix(self.seed, 2, i as u64), size),
            ));
        }
        for i in 0..REPL_FILES {
            let size = self.rng.range(2000, 8000) as usize;
            files.push((
                format!("repl/f{i}"),
                sys::pattern(mix(self.seed, 3, i as u64), size),
            ));
        }
        for i in 0..ATTR_FILES {
            files.push((format!("attr/f{i}"), format!("attr/f{i}").into_bytes()));
        }
        let reqs: Vec<Request> = files
            .iter()
            .map(|(n, c)| Request::Write(self.relp(n), 0, c.clone()))
            .collect();
        for ((n, _), rep) in files.iter().zip(self.agent.call_many(&reqs)?) {
            rep.map_err(|e| format!("agent: creating {n}: ERR {e}"))?;
        }
        for (n, c) in &files {
            let got = sys::read_file(self.p(n)).op(format!(
                "the guest reading {n}, which the agent created (does it serve the mounted directory?)"
            ))?;
            sys::cmp_bytes(
                &got,
                c,
                &format!("the guest reading {n}, which the agent created"),
            )?;
        }
        let mut ro = Vec::new();
        for (n, c) in files {
            let (path, rel) = (self.p(&n), self.relp(&n));
            match &n[..n.find('/').unwrap()] {
                "ro" => ro.push((path, c)),
                "data" => {
                    let kept = sys::open(&path, libc::O_RDONLY, 0).op(format!("open {n}"))?;
                    self.data.push(DataFile {
                        path,
                        rel,
                        content: c,
                        kept,
                    });
                }
                "repl" => self.repl.push(ReplFile {
                    path,
                    rel,
                    content: c,
                }),
                _ => {
                    let st = sys::stat(&path).op(format!("stat {n}"))?;
                    self.attr.push(AttrFile {
                        path,
                        rel,
                        mode: st.st_mode & 0o7777,
                        mtime: (st.st_mtime, st.st_mtime_nsec),
                    });
                }
            }
        }
        self.ro = Arc::new(ro);
        Ok(())
    }

    /// Asks the agent for the changes; returns each one's host-side duration (ms).
    fn change(&mut self, reqs: &[Request]) -> Result<Vec<f64>, String> {
        let us = self.agent.timed_many(reqs)?;
        Ok(us.into_iter().map(|u| u as f64 / 1000.0).collect())
    }

    fn record(&mut self, kind: Kind, r: u64, obs: Obs, hold: Vec<f64>) {
        let (late_ms, max_wait, verbose) = (self.late.as_millis(), self.max_wait, self.verbose);
        let s = self.stats.entry(kind).or_default();
        s.rounds += 1;
        s.checks += obs.first.checks;
        s.stale += obs.first.stale;
        if let Some(l) = &obs.late {
            s.late_checks += l.checks;
            s.stale_late += l.stale;
        }
        s.lat.push(obs.seen_ms.unwrap_or(f64::INFINITY));
        s.hold.extend(hold);
        let seen = match obs.seen_ms {
            Some(t) => format!("seen after {t:.1} ms"),
            None => format!("not seen within {} ms", max_wait.as_millis()),
        };
        let mut detail = obs.first.detail.map(|d| format!("at 0 ms: {d}"));
        if let Some(d) = obs.late.and_then(|l| l.detail) {
            detail = Some(match detail {
                Some(x) => format!("{x}; at {late_ms} ms: {d}"),
                None => format!("at {late_ms} ms: {d}"),
            });
        }
        if let Some(d) = detail {
            let line = format!("round {r} {}: {d}; {seen}", kind.name());
            if verbose || (kind.is_data() && s.notes.len() < NOTES_PER_KIND) {
                println!(
                    "stress: {} {line}",
                    if kind.is_data() {
                        "STALE DATA"
                    } else {
                        "stale"
                    }
                );
            }
            if s.notes.len() < NOTES_PER_KIND {
                s.notes.push(line);
            }
        } else if verbose {
            println!("stress: round {r} {}: fresh; {seen}", kind.name());
        }
    }

    fn round(&mut self, kind: Kind, r: u64) -> Result<(), String> {
        let late = if kind.is_data() {
            None
        } else {
            Some(self.late)
        };
        let max_wait = self.max_wait;
        match kind {
            Kind::Overwrite | Kind::Append | Kind::Truncate => {
                let i = self.rng.below(self.data.len());
                // Prime: the pages through the kept descriptor, the
                // attributes by stat(2), and one open/read/close.
                {
                    let f = &self.data[i];
                    let _ = pread_all(&f.kept).op("prime: read kept descriptor")?;
                    let _ = sys::fstat(&f.kept).op("prime: fstat kept descriptor")?;
                    let _ = sys::stat(&f.path).op("prime: stat")?;
                    let _ = sys::read_file(&f.path).op("prime: read")?;
                }
                let old = self.data[i].content.clone();
                let len = old.len();
                let mut new = old.clone();
                let req = match kind {
                    Kind::Overwrite => {
                        let off = self.rng.below(len);
                        let n = self.rng.range(1, (len - off).min(4096) as u64) as usize;
                        let mut bytes = sys::pattern(mix(self.seed, 10, r), n);
                        if bytes[..] == old[off..off + n] {
                            bytes[0] ^= 0xff;
                        }
                        new[off..off + n].copy_from_slice(&bytes);
                        Request::Write(self.data[i].rel.clone(), off as u64, bytes)
                    }
                    Kind::Append => {
                        let n = if len > 256 << 10 {
                            1
                        } else {
                            self.rng.range(1, 4096) as usize
                        };
                        let bytes = sys::pattern(mix(self.seed, 11, r), n);
                        new.extend_from_slice(&bytes);
                        Request::Write(self.data[i].rel.clone(), len as u64, bytes)
                    }
                    _ => {
                        let to = if len < 64 {
                            len + 1000
                        } else {
                            self.rng.range(len as u64 / 2, len as u64 - 1) as usize
                        };
                        new.resize(to, 0);
                        Request::Truncate(self.data[i].rel.clone(), to as u64)
                    }
                };
                let hold = self.change(&[req])?;
                let t0 = Instant::now();
                self.data[i].content = new;
                let f = &self.data[i];
                let e = Expect::Data {
                    path: &f.path,
                    kept: &f.kept,
                    want: &f.content,
                    old: &old,
                    // Per kind, so each way of reading comes first in turn.
                    order: (self.stats.get(&kind).map_or(0, |s| s.rounds) % 3) as usize,
                };
                let obs = observe(&e, t0, late, max_wait);
                self.record(kind, r, obs, hold);
            }
            Kind::ReplaceOpen | Kind::ReplaceStat => {
                let i = self.rng.below(self.repl.len());
                let path = self.repl[i].path.clone();
                let old_ino = sys::stat(&path).op("prime: stat")?.st_ino;
                let _ = sys::read_file(&path).op("prime: read")?;
                let old = self.repl[i].content.clone();
                let delta = self.rng.range(1, 512) as usize;
                let size = if old.len() > 6000 {
                    old.len() - delta
                } else {
                    old.len() + delta
                };
                let new = sys::pattern(mix(self.seed, 12, r), size);
                let hold = self.change(&[Request::Save(self.repl[i].rel.clone(), new.clone())])?;
                let t0 = Instant::now();
                self.repl[i].content = new;
                let want = &self.repl[i].content;
                let e = if kind == Kind::ReplaceOpen {
                    Expect::Opened {
                        path: &path,
                        want,
                        old: &old,
                    }
                } else {
                    Expect::NewInode {
                        path: &path,
                        old_ino,
                        size: size as u64,
                        old_size: old.len() as u64,
                    }
                };
                let obs = observe(&e, t0, late, max_wait);
                self.record(kind, r, obs, hold);
            }
            Kind::UnlinkOpen | Kind::UnlinkStat | Kind::UnlinkReaddir => {
                // A fresh directory with two files that stay and a storm of
                // names the guest makes, caches, and the host then removes.
                let dname = format!("storm/r{r}");
                let dir = self.p(&dname);
                sys::mkdir(&dir, 0o755).op(format!("mkdir {dname}"))?;
                let mut all = BTreeSet::new();
                for k in ["keep0", "keep1"] {
                    sys::write_file(dir.join(k), k.as_bytes()).op(format!("create {dname}/{k}"))?;
                    all.insert(k.as_bytes().to_vec());
                }
                let mut paths = Vec::new();
                let mut reqs = Vec::new();
                for j in 0..self.storm {
                    let n = format!("u{j}");
                    let p = dir.join(&n);
                    sys::write_file(
                        &p,
                        &sys::pattern(mix(self.seed, 13, r * 1000 + j as u64), 100 + j),
                    )
                    .op(format!("create {dname}/{n}"))?;
                    let _ = sys::stat(&p).op("prime: stat")?;
                    if kind == Kind::UnlinkOpen {
                        let _ = sys::read_file(&p).op("prime: read")?;
                    }
                    all.insert(n.as_bytes().to_vec());
                    reqs.push(Request::Unlink(self.relp(&format!("{dname}/{n}"))));
                    paths.push(p);
                }
                let _ = sys::list_dir(&dir).op("prime: readdir")?;
                let hold = self.change(&reqs)?;
                let t0 = Instant::now();
                let want: BTreeSet<Vec<u8>> =
                    [b"keep0".to_vec(), b"keep1".to_vec()].into_iter().collect();
                let e = match kind {
                    Kind::UnlinkOpen => Expect::OpenFails { paths: &paths },
                    Kind::UnlinkStat => Expect::StatGone { paths: &paths },
                    _ => Expect::Listing {
                        dir: &dir,
                        want: &want,
                        old: &all,
                    },
                };
                let obs = observe(&e, t0, late, max_wait);
                self.record(kind, r, obs, hold);
            }
            Kind::CreateStat | Kind::CreateReaddir => {
                let dname = format!("storm/r{r}");
                let dir = self.p(&dname);
                sys::mkdir(&dir, 0o755).op(format!("mkdir {dname}"))?;
                let mut before = BTreeSet::new();
                for k in ["keep0", "keep1"] {
                    sys::write_file(dir.join(k), k.as_bytes()).op(format!("create {dname}/{k}"))?;
                    before.insert(k.as_bytes().to_vec());
                }
                let mut after = before.clone();
                let (mut paths, mut sizes, mut reqs) = (Vec::new(), Vec::new(), Vec::new());
                for j in 0..self.storm {
                    let n = format!("c{j}");
                    let p = dir.join(&n);
                    // A failed lookup first: a negative entry the guest might keep.
                    sys::expect_errno(
                        sys::stat(&p),
                        &[libc::ENOENT],
                        "prime: stat of a name not yet created",
                    )?;
                    let data = sys::pattern(mix(self.seed, 14, r * 1000 + j as u64), 100 + j);
                    sizes.push(data.len() as u64);
                    reqs.push(Request::Write(self.relp(&format!("{dname}/{n}")), 0, data));
                    after.insert(n.as_bytes().to_vec());
                    paths.push(p);
                }
                let _ = sys::list_dir(&dir).op("prime: readdir")?;
                let hold = self.change(&reqs)?;
                let t0 = Instant::now();
                let e = if kind == Kind::CreateStat {
                    Expect::StatPresent {
                        paths: &paths,
                        sizes: &sizes,
                    }
                } else {
                    Expect::Listing {
                        dir: &dir,
                        want: &after,
                        old: &before,
                    }
                };
                let obs = observe(&e, t0, late, max_wait);
                self.record(kind, r, obs, hold);
            }
            Kind::Chmod => {
                let i = self.rng.below(self.attr.len());
                let _ = sys::stat(&self.attr[i].path).op("prime: stat")?;
                let old = self.attr[i].mode;
                let modes = [0o644, 0o600, 0o640, 0o604, 0o664, 0o444, 0o660, 0o400];
                let mut mode = modes[self.rng.below(modes.len())];
                if mode == old {
                    mode = if old == 0o644 { 0o600 } else { 0o644 };
                }
                let hold = self.change(&[Request::Chmod(self.attr[i].rel.clone(), mode)])?;
                let t0 = Instant::now();
                self.attr[i].mode = mode;
                let e = Expect::Mode {
                    path: &self.attr[i].path,
                    mode,
                    old,
                };
                let obs = observe(&e, t0, late, max_wait);
                self.record(kind, r, obs, hold);
            }
            Kind::Mtime => {
                let i = self.rng.below(self.attr.len());
                let _ = sys::stat(&self.attr[i].path).op("prime: stat")?;
                let old = self.attr[i].mtime;
                let want = (
                    1_500_000_000 + r as i64 * 1000 + i as i64,
                    self.rng.range(1, 999_999_999) as i64,
                );
                let hold =
                    self.change(&[Request::Utimes(self.attr[i].rel.clone(), want.0, want.1)])?;
                let t0 = Instant::now();
                self.attr[i].mtime = want;
                let e = Expect::Mtime {
                    path: &self.attr[i].path,
                    want,
                    old,
                };
                let obs = observe(&e, t0, late, max_wait);
                self.record(kind, r, obs, hold);
            }
        }
        Ok(())
    }

    /// One timed pass over the unchanged files (open, read, close each).
    fn throughput_pass(&mut self) {
        let start = Instant::now();
        let mut bad = 0;
        let mut bytes = 0;
        for (p, want) in self.ro.iter() {
            match sys::read_file(p) {
                Ok(d) if &d == want => bytes += d.len() as u64,
                _ => bad += 1,
            }
        }
        self.tp.secs += start.elapsed().as_secs_f64();
        self.tp.reads += self.ro.len() as u64;
        self.tp.bytes += bytes;
        self.tp.bad += bad;
    }
}

// ---------------------------------------------------------------- background readers

struct Readers {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
    start: Instant,
}

impl Readers {
    fn start(n: usize, ro: Arc<Vec<(PathBuf, Vec<u8>)>>) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|t| {
                let (stop, reads, bad, ro) = (stop.clone(), reads.clone(), bad.clone(), ro.clone());
                std::thread::spawn(move || {
                    let mut i = t * 7;
                    while !stop.load(Ordering::Relaxed) {
                        let (p, want) = &ro[i % ro.len()];
                        match sys::read_file(p) {
                            Ok(d) if &d == want => {}
                            _ => {
                                bad.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                        if i % ro.len() == 0 {
                            // Leave the vCPUs some air between passes.
                            sys::sleep_ms(2);
                        }
                    }
                })
            })
            .collect();
        Readers {
            stop,
            reads,
            bad,
            threads,
            start: Instant::now(),
        }
    }

    /// Stops them; (reads, bad, seconds).
    fn finish(self) -> (u64, u64, f64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.reads.load(Ordering::Relaxed),
            self.bad.load(Ordering::Relaxed),
            self.start.elapsed().as_secs_f64(),
        )
    }
}

// ---------------------------------------------------------------- report

struct Summary {
    text: String,
    machine: Vec<String>,
    stale_data: u64,
    ns_stale_late: u64,
}

fn summarize(
    s: &Stress,
    o: &Opts,
    rounds: u64,
    secs: f64,
    bg: (u64, u64, f64),
    error: Option<&str>,
) -> Summary {
    let late = o.late_ms;
    let mw = o.max_wait_ms;
    let mut text = String::new();
    let mut machine = Vec::new();
    text.push_str(&format!(
        "{:<15} {:<5} {:>6} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9} {:>9}\n",
        "kind",
        "class",
        "rounds",
        "checks",
        "stale@0",
        format!("stale@{late}"),
        "lat_p50",
        "lat_p90",
        "lat_p99",
        "lat_max",
        "unseen",
        "hold_p50",
        "hold_p99",
        "hold_max"
    ));
    let (mut data_lat, mut ns_lat, mut holds) = (Vec::new(), Vec::new(), Vec::new());
    let (mut data_checks, mut stale_data) = (0, 0);
    let (mut ns_checks, mut ns_stale, mut ns_late_checks, mut ns_stale_late) = (0, 0, 0, 0);
    for (k, st) in &s.stats {
        let lat = sorted(&st.lat);
        let hold = sorted(&st.hold);
        let unseen = lat.iter().filter(|x| x.is_infinite()).count();
        let class = if k.is_data() { "data" } else { "ns" };
        if k.is_data() {
            data_lat.extend(&st.lat);
            data_checks += st.checks;
            stale_data += st.stale;
        } else {
            ns_lat.extend(&st.lat);
            ns_checks += st.checks;
            ns_stale += st.stale;
            ns_late_checks += st.late_checks;
            ns_stale_late += st.stale_late;
        }
        if k.is_writer() {
            holds.extend(&st.hold);
        }
        let h = |p| human(pct(&lat, p), mw);
        let hh = |p| human(pct(&hold, p), mw);
        text.push_str(&format!(
            "{:<15} {:<5} {:>6} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9} {:>9}\n",
            k.name(),
            class,
            st.rounds,
            st.checks,
            st.stale,
            if k.is_data() {
                "-".to_string()
            } else {
                st.stale_late.to_string()
            },
            h(50.0),
            h(90.0),
            h(99.0),
            h(100.0),
            unseen,
            hh(50.0),
            hh(99.0),
            hh(100.0)
        ));
        machine.push(format!(
            "STRESS kind={} class={class} rounds={} checks_0ms={} stale_0ms={} checks_{late}ms={} \
             stale_{late}ms={} lat_n={} lat_p50_ms={} lat_p90_ms={} lat_p99_ms={} lat_max_ms={} \
             unseen={unseen} hold_n={} hold_p50_ms={} hold_p99_ms={} hold_max_ms={}",
            k.name(),
            st.rounds,
            st.checks,
            st.stale,
            st.late_checks,
            st.stale_late,
            lat.len(),
            num(pct(&lat, 50.0)),
            num(pct(&lat, 90.0)),
            num(pct(&lat, 99.0)),
            num(pct(&lat, 100.0)),
            hold.len(),
            num(pct(&hold, 50.0)),
            num(pct(&hold, 99.0)),
            num(pct(&hold, 100.0)),
        ));
    }
    let (data_lat, ns_lat, holds) = (sorted(&data_lat), sorted(&ns_lat), sorted(&holds));
    let inf = |v: &[f64]| v.iter().filter(|x| x.is_infinite()).count();
    let tp = &s.tp;
    let rps = if tp.secs > 0.0 {
        tp.reads as f64 / tp.secs
    } else {
        0.0
    };
    let mibps = if tp.secs > 0.0 {
        tp.bytes as f64 / tp.secs / (1 << 20) as f64
    } else {
        0.0
    };
    let (bg_reads, bg_bad, bg_secs) = bg;
    let bg_rps = if bg_secs > 0.0 {
        bg_reads as f64 / bg_secs
    } else {
        0.0
    };
    let ro_bad = tp.bad + bg_bad;
    let strict_fail = o.strict && ns_stale_late > 0;
    let result = if error.is_some() {
        "error"
    } else if stale_data > 0 || ro_bad > 0 || strict_fail {
        "fail"
    } else {
        "pass"
    };
    text.push_str(&format!(
        "\ntotal: {rounds} rounds in {secs:.1} s (seed {}); data: {stale_data} stale of {data_checks} answers; \
         namespace: {ns_stale} stale of {ns_checks} at 0 ms, {ns_stale_late} of {ns_late_checks} at {late} ms\n",
        o.seed
    ));
    text.push_str(&format!(
        "revocation latency, ms: data p50 {} p99 {} ({} unseen); namespace p50 {} p90 {} p99 {} max {} ({} unseen)\n",
        human(pct(&data_lat, 50.0), mw),
        human(pct(&data_lat, 99.0), mw),
        inf(&data_lat),
        human(pct(&ns_lat, 50.0), mw),
        human(pct(&ns_lat, 90.0), mw),
        human(pct(&ns_lat, 99.0), mw),
        human(pct(&ns_lat, 100.0), mw),
        inf(&ns_lat),
    ));
    text.push_str(&format!(
        "host-writer hold (overwrite, append, truncate), ms: p50 {} p99 {} max {} of {}\n",
        human(pct(&holds, 50.0), u64::MAX),
        human(pct(&holds, 99.0), u64::MAX),
        human(pct(&holds, 100.0), u64::MAX),
        holds.len()
    ));
    text.push_str(&format!(
        "cached re-reads of {RO_FILES} unchanged {} KiB files: {rps:.0} files/s ({mibps:.1} MiB/s, {} reads \
         between rounds); background readers: {bg_rps:.0} files/s ({bg_reads} reads); {ro_bad} wrong\n",
        RO_SIZE >> 10,
        tp.reads
    ));
    for (k, st) in &s.stats {
        for n in &st.notes {
            text.push_str(&format!("  {}: {n}\n", k.name()));
        }
    }
    machine.push(format!(
        "STRESS kind=total rounds={rounds} seconds={secs:.1} seed={} late_ms={late} max_wait_ms={mw} \
         stale_data={stale_data} data_checks={data_checks} ns_checks_0ms={ns_checks} ns_stale_0ms={ns_stale} \
         ns_checks_{late}ms={ns_late_checks} ns_stale_{late}ms={ns_stale_late} \
         data_lat_p50_ms={} data_lat_p99_ms={} data_unseen={} \
         ns_lat_p50_ms={} ns_lat_p90_ms={} ns_lat_p99_ms={} ns_lat_max_ms={} ns_unseen={} \
         hold_n={} hold_p50_ms={} hold_p99_ms={} hold_max_ms={} \
         reads={} read_seconds={:.3} reads_per_s={rps:.1} mib_per_s={mibps:.2} \
         bg_reads={bg_reads} bg_reads_per_s={bg_rps:.1} ro_bad={ro_bad} strict={} result={result}",
        o.seed,
        num(pct(&data_lat, 50.0)),
        num(pct(&data_lat, 99.0)),
        inf(&data_lat),
        num(pct(&ns_lat, 50.0)),
        num(pct(&ns_lat, 90.0)),
        num(pct(&ns_lat, 99.0)),
        num(pct(&ns_lat, 100.0)),
        inf(&ns_lat),
        holds.len(),
        num(pct(&holds, 50.0)),
        num(pct(&holds, 99.0)),
        num(pct(&holds, 100.0)),
        tp.reads,
        tp.secs,
        o.strict as u8,
    ));
    Summary {
        text,
        machine,
        stale_data,
        ns_stale_late,
    }
}

// ---------------------------------------------------------------- main

fn connect(o: &Opts) -> Result<Agent, String> {
    let mut a = match &o.agent_path {
        Some(p) => Agent::connect_path(p)?,
        None => Agent::connect_port()?,
    };
    let total = Duration::from_secs(if o.connect_secs > 0 {
        o.connect_secs
    } else if o.peer {
        600
    } else {
        30
    });
    a.sync_patient(Duration::from_secs(2), total)?;
    Ok(a)
}

/// The `stress` subcommand. Exit status: 0 pass, 1 a stale data read (or a
/// stale namespace answer at the late look with --strict-namespace-ms, or an
/// unchanged file read wrong), 3 the run could not be completed.
pub fn main(o: Opts) -> i32 {
    unsafe { libc::umask(0o022) };
    let root = std::fs::canonicalize(&o.dir).unwrap_or_else(|_| o.dir.clone());
    match sys::stat(&root) {
        Ok(st) if sys::file_type(&st) == libc::S_IFDIR => {}
        _ => {
            eprintln!("stress: {} is not a directory", sys::show(&root));
            return 2;
        }
    }
    // The other guest's changes to our share come in on the peer port.
    let servant = if o.peer {
        let dev = match crate::client::find_port_named(PEER_PORT) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("stress: --peer: {e}");
                return 3;
            }
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let share = root.clone();
        std::thread::spawn(move || {
            let _ = tx.send(crate::agent::serve_device(&share, &dev));
        });
        println!("stress: serving the other guest's requests on {PEER_PORT}");
        Some(rx)
    } else {
        None
    };
    let agent = match connect(&o) {
        Ok(a) => a,
        Err(e) => {
            println!("stress: ERROR: no agent: {e}");
            println!("STRESS kind=total result=error");
            return 3;
        }
    };
    println!(
        "stress: dir={} name={} seed={} agent={} rounds={} seconds={} storm={} readers={} late={} ms max-wait={} ms{}",
        root.display(),
        o.name,
        o.seed,
        agent.desc,
        o.rounds.map_or("-".into(), |r| r.to_string()),
        o.seconds.map_or("-".into(), |s| s.to_string()),
        o.storm,
        o.readers,
        o.late_ms,
        o.max_wait_ms,
        if o.strict { " strict" } else { "" }
    );
    let mut s = Stress {
        late: Duration::from_millis(o.late_ms),
        max_wait: Duration::from_millis(o.max_wait_ms),
        storm: o.storm,
        seed: o.seed,
        verbose: o.verbose,
        root: root.join(&o.name),
        rel: o.name.as_bytes().to_vec(),
        agent,
        rng: Rng::new(o.seed),
        ro: Arc::new(Vec::new()),
        data: Vec::new(),
        repl: Vec::new(),
        attr: Vec::new(),
        stats: BTreeMap::new(),
        tp: Throughput::default(),
    };
    let kinds: Vec<Kind> = if o.kinds.is_empty() {
        Kind::ALL.to_vec()
    } else {
        o.kinds.clone()
    };
    let limit = match (o.rounds, o.seconds) {
        (None, None) => Some(DEFAULT_ROUNDS),
        (r, _) => r,
    };
    let start = Instant::now();
    let mut error: Option<String> = None;
    let mut rounds = 0u64;
    let mut bg = (0, 0, 0.0);
    match s.setup() {
        Err(e) => error = Some(format!("setup: {e}")),
        Ok(()) => {
            // Warm the unchanged set once (not timed).
            s.throughput_pass();
            s.tp = Throughput::default();
            let readers = Readers::start(o.readers, s.ro.clone());
            let mut order: Vec<Kind> = Vec::new();
            let mut last_progress = Instant::now();
            loop {
                if limit.is_some_and(|n| rounds >= n)
                    || o.seconds
                        .is_some_and(|t| start.elapsed().as_secs_f64() >= t)
                {
                    break;
                }
                if order.is_empty() {
                    order = kinds.clone();
                    s.rng.shuffle(&mut order);
                }
                let k = order.pop().unwrap();
                if let Err(e) = s.round(k, rounds) {
                    error = Some(format!("round {rounds} ({}): {e}", k.name()));
                    break;
                }
                s.throughput_pass();
                rounds += 1;
                if last_progress.elapsed() >= Duration::from_secs(15) {
                    last_progress = Instant::now();
                    println!(
                        "stress: {rounds} rounds, {:.0} s",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
            bg = readers.finish();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = &error {
        println!("stress: ERROR: {e}");
    }
    let sum = summarize(&s, &o, rounds, secs, bg, error.as_deref());
    println!();
    print!("{}", sum.text);
    for l in &sum.machine {
        println!("{l}");
    }
    let code = if error.is_some() {
        3
    } else if sum
        .machine
        .last()
        .is_some_and(|l| l.ends_with("result=fail"))
    {
        1
    } else {
        0
    };
    let verdict = match code {
        0 => "PASS".to_string(),
        1 => format!(
            "FAIL ({} stale data reads{})",
            sum.stale_data,
            if o.strict {
                format!(
                    ", {} stale namespace answers at {} ms",
                    sum.ns_stale_late, o.late_ms
                )
            } else {
                String::new()
            }
        ),
        _ => "ERROR (the run did not complete)".into(),
    };
    println!("stress: {verdict}");
    // Clean up (best effort: a stale guest view may refuse some removals).
    s.data.clear();
    if !o.keep {
        if let Err(e) = sys::remove_tree(&s.root) {
            println!("stress: note: cleanup of {}: {e}", s.root.display());
        }
    }
    // Ends the host agent, or the other guest's servant.
    if let Err(e) = s.agent.bye() {
        println!("stress: BYE to the agent failed: {e}");
    }
    if let Some(rx) = servant {
        // Wait until the other guest is done with us.
        match rx.recv_timeout(Duration::from_secs(900)) {
            Ok(Ok(_)) => println!("stress: the other guest is done"),
            Ok(Err(e)) => println!("stress: serving the other guest: {e}"),
            Err(_) => println!("stress: the other guest never said BYE (gave up after 900 s)"),
        }
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v = sorted(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(pct(&v, 50.0), Some(3.0));
        assert_eq!(pct(&v, 0.0), Some(1.0));
        assert_eq!(pct(&v, 99.0), Some(5.0));
        assert_eq!(pct(&v, 100.0), Some(5.0));
        assert_eq!(pct(&[], 50.0), None);
        let v = sorted(&[f64::INFINITY, 1.0, 2.0, 3.0]);
        assert_eq!(pct(&v, 50.0), Some(2.0));
        assert!(pct(&v, 99.0).unwrap().is_infinite());
        assert_eq!(num(Some(f64::INFINITY)), "inf");
        assert_eq!(num(Some(1.23456)), "1.235");
        assert_eq!(human(Some(f64::INFINITY), 2000), ">2000");
    }

    #[test]
    fn kinds_parse() {
        assert_eq!(parse_kinds("all").unwrap().len(), 12);
        let d = parse_kinds("data").unwrap();
        assert!(d.iter().all(|k| k.is_data()) && d.len() == 5);
        assert_eq!(parse_kinds("ns").unwrap().len(), 7);
        assert_eq!(
            parse_kinds("mtime,chmod,mtime").unwrap(),
            vec![Kind::Chmod, Kind::Mtime]
        );
        assert!(parse_kinds("bogus").is_err());
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let va: Vec<u64> = (0..10).map(|_| a.range(3, 9)).collect();
        let vb: Vec<u64> = (0..10).map(|_| b.range(3, 9)).collect();
        assert_eq!(va, vb);
        assert!(va.iter().all(|&x| (3..=9).contains(&x)));
        let mut v: Vec<u32> = (0..20).collect();
        Rng::new(1).shuffle(&mut v);
        let mut w = v.clone();
        w.sort();
        assert_eq!(w, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn looks_judge_stale_and_fresh() {
        let d = std::env::temp_dir().join(format!("gt-stress-{}", sys::random_hex()));
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("f");
        std::fs::write(&f, b"new!").unwrap();
        let kept = sys::open(&f, libc::O_RDONLY, 0).unwrap();
        let e = Expect::Data {
            path: &f,
            kept: &kept,
            want: b"new!",
            old: b"old",
            order: 1,
        };
        let l = look(&e);
        assert_eq!((l.checks, l.stale), (5, 0), "{:?}", l.detail);
        let e = Expect::Data {
            path: &f,
            kept: &kept,
            want: b"newer",
            old: b"new!",
            order: 0,
        };
        let l = look(&e);
        assert_eq!((l.checks, l.stale), (5, 5));
        assert!(l.detail.unwrap().contains("the old content"));
        let gone = vec![d.join("nope")];
        assert_eq!(look(&Expect::OpenFails { paths: &gone }).stale, 0);
        let there = vec![f.clone()];
        assert_eq!(look(&Expect::OpenFails { paths: &there }).stale, 1);
        assert_eq!(look(&Expect::StatGone { paths: &gone }).stale, 0);
        let l = look(&Expect::StatPresent {
            paths: &there,
            sizes: &[4],
        });
        assert_eq!((l.checks, l.stale), (1, 0));
        let want: BTreeSet<Vec<u8>> = [b"f".to_vec()].into_iter().collect();
        let l = look(&Expect::Listing {
            dir: &d,
            want: &want,
            old: &BTreeSet::new(),
        });
        assert_eq!(l.stale, 0);
        // observe: a state that never comes is "unseen" after max_wait.
        let t0 = Instant::now();
        let o = observe(
            &Expect::StatGone { paths: &there },
            t0,
            Some(Duration::from_millis(20)),
            Duration::from_millis(60),
        );
        assert!(o.seen_ms.is_none() && o.late.unwrap().stale == 1);
        assert!(t0.elapsed() >= Duration::from_millis(60));
        let o = observe(
            &Expect::StatGone { paths: &gone },
            Instant::now(),
            Some(Duration::from_millis(20)),
            Duration::from_millis(60),
        );
        assert_eq!(o.seen_ms, Some(0.0));
        assert_eq!(o.late.unwrap().stale, 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
