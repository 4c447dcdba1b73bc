//! `model`: a model-based randomized coherence test. Run inside the guest
//! (qemu/test-all.sh runs it on the stock and the notify stack).
//!
//! One seed gives one sequence of operations. The guest drives everything:
//! each round it picks, from the seed and the model's state only, a batch of
//! host operations (sent to the host agent as one `PAR` request, run at once
//! on distinct files; the agent replies after every host system call has
//! returned) and then, maybe, one guest operation through the mount. Then it
//! checks every name, every descriptor it keeps open and the directory
//! listing against a reference model of what docs/coherency.md guarantees,
//! and asks the agent for the host's truth (the model must match it: that
//! checks that no guest write hit a file the host had renamed away or
//! replaced, "0 bytes lost").
//!
//! What the model allows (the guarantee, no more, no less):
//!
//! - data, on both stacks: `open(2)` of a name reaches the file the host has
//!   now, or fails with ENOENT if it has none; `read(2)` through it, or
//!   through a descriptor kept open, returns the file's current bytes, and
//!   `fstat` its current size (guarantees 1 and 2). No lag, but for a host
//!   `open(O_RDONLY|O_TRUNC)` on the notify stack: it breaks no lease and is
//!   revoked after the fact (FAN_MODIFY), so the guest looks only once the
//!   notify window (50 ms) has passed.
//! - `stat(2)` of a name: the size is exact (guarantee 1); which file the
//!   name leads to and its mode may be those of any state the name and file
//!   had within the window before the look (stock: lease + 0.25 s, guarantee
//!   3; notify: 50 ms, the notify guarantee 2). A name the host created is
//!   found at once (never ENOENT for an existing name).
//! - `readdir`: the directory as it is now (guarantee 2).
//! - guest writes through a name (write, O_TRUNC open, truncate, chmod, `cp
//!   -p`) act on the file the name leads to on the host now.
//!
//! A stale answer that the window still allows is looked at again once the
//! window has passed. The guest's own namespace operations (create, unlink,
//! rename, link, mkdir, rmdir) are only issued on names that have not
//! changed for the window (waiting if needed), so that what the guest sees of
//! them is the host's state; writes are issued on any name.
//!
//! On a violation it prints the seed, the failed check and the operation
//! history; `--seed S --ops N` replays the same sequence. After a violation
//! that makes the model differ from the host, it goes on in a fresh
//! directory (a new epoch) so later operations are still checked.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{parse_reply, Agent};
use crate::proto::{fnv1a64, hex_decode, HostStat, Request};
use crate::sys::{self, Fd};

pub struct Opts {
    pub dir: PathBuf,
    pub name: String,
    pub seed: u64,
    pub ops: u64,
    /// None: detect (the notification queue present in sysfs).
    pub notify: Option<bool>,
    pub lease_ms: u64,
    pub window_ms: Option<u64>,
    /// Op kinds whose stale reads are counted as known limits, not failures.
    pub known: Vec<String>,
    pub pause: bool,
    pub pause_ms: u64,
    pub burst: usize,
    pub agent_path: Option<PathBuf>,
    pub history: usize,
    pub keep: bool,
    pub verbose: bool,
}

impl Opts {
    pub fn new() -> Opts {
        Opts {
            dir: PathBuf::from("/mnt"),
            name: "model".into(),
            seed: 1,
            ops: 2000,
            notify: None,
            lease_ms: 1000,
            window_ms: None,
            known: Vec::new(),
            pause: true,
            pause_ms: 5000,
            burst: 1000,
            agent_path: None,
            history: 40,
            keep: false,
            verbose: false,
        }
    }
}

/// How a check through a descriptor the guest kept open starts.
const KEPT_READ: &str = "read on a descriptor kept open";

/// Op kinds `--known-limit` accepts.
pub const LIMIT_KINDS: [&str; 4] = ["rdtrunc", "restore", "pause", "burst"];

const FILES: usize = 14;
const DIRS: usize = 3;
const MAX_SIZE: usize = 12 * 1024;
const MAX_KEPT: usize = 3;

fn file_name(i: usize) -> String {
    format!("f{i:02}")
}

fn dir_name(i: usize) -> String {
    format!("d{i}")
}

/// splitmix64: the run's only source of randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
}

// ---------------------------------------------------------------- the model

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Obj {
    File(usize),
    Dir,
}

struct Inode {
    data: Vec<u8>,
    mode: u32,
    /// Earlier modes and when they stopped being current.
    old_modes: Vec<(u32, f64)>,
    /// Hashes of earlier contents, newest last, with the op that replaced each.
    old_data: Vec<(u64, usize, String)>,
    version: u64,
    /// st_ino the guest saw for it through open(2).
    guest_ino: Option<u64>,
    /// The kind of the op that last changed its data (and its op number).
    last: String,
    links: usize,
}

#[derive(Default)]
struct Model {
    inodes: Vec<Inode>,
    names: BTreeMap<String, Obj>,
    /// Earlier bindings of each name and when they stopped being current.
    past: BTreeMap<String, Vec<(Option<Obj>, f64)>>,
    /// Op number of each name's last binding change; its kind.
    changed_op: BTreeMap<String, u64>,
    name_last: BTreeMap<String, String>,
    /// When each name last changed binding (seconds since start).
    changed_at: BTreeMap<String, f64>,
}

impl Model {
    fn new_inode(&mut self, data: Vec<u8>, mode: u32, kind: &str) -> usize {
        self.inodes.push(Inode {
            data,
            mode,
            old_modes: Vec::new(),
            old_data: Vec::new(),
            version: 0,
            guest_ino: None,
            last: kind.to_string(),
            links: 0,
        });
        self.inodes.len() - 1
    }

    fn bind(&mut self, name: &str, obj: Option<Obj>, now: f64, op: u64, kind: &str) {
        let old = self.names.get(name).copied();
        if old == obj {
            return;
        }
        if let Some(Obj::File(i)) = old {
            self.inodes[i].links -= 1;
        }
        if let Some(Obj::File(i)) = obj {
            self.inodes[i].links += 1;
        }
        let past = self.past.entry(name.to_string()).or_default();
        past.push((old, now));
        if past.len() > 8 {
            past.remove(0);
        }
        match obj {
            Some(o) => self.names.insert(name.to_string(), o),
            None => self.names.remove(name),
        };
        self.changed_op.insert(name.to_string(), op);
        self.changed_at.insert(name.to_string(), now);
        self.name_last
            .insert(name.to_string(), format!("{kind} (op {op})"));
    }

    fn set_data(&mut self, i: usize, data: Vec<u8>, op: u64, kind: &str) {
        let ino = &mut self.inodes[i];
        if ino.data == data {
            return;
        }
        let old = std::mem::replace(&mut ino.data, data);
        ino.old_data
            .push((fnv1a64(&old), old.len(), format!("{kind} (op {op})")));
        if ino.old_data.len() > 6 {
            ino.old_data.remove(0);
        }
        ino.version += 1;
        ino.last = kind.to_string();
    }

    fn set_mode(&mut self, i: usize, mode: u32, now: f64) {
        let ino = &mut self.inodes[i];
        if ino.mode == mode {
            return;
        }
        let old = ino.mode;
        ino.old_modes.push((old, now));
        if ino.old_modes.len() > 8 {
            ino.old_modes.remove(0);
        }
        ino.mode = mode;
    }

    fn file(&self, name: &str) -> Option<usize> {
        match self.names.get(name) {
            Some(Obj::File(i)) => Some(*i),
            _ => None,
        }
    }

    fn files_present(&self) -> Vec<String> {
        (0..FILES)
            .map(file_name)
            .filter(|n| self.file(n).is_some())
            .collect()
    }

    fn files_absent(&self) -> Vec<String> {
        (0..FILES)
            .map(file_name)
            .filter(|n| !self.names.contains_key(n))
            .collect()
    }
}

// ---------------------------------------------------------------- operations

#[derive(Clone, Debug)]
enum Op {
    Write {
        name: String,
        off: u64,
        data: Vec<u8>,
    },
    Append {
        name: String,
        data: Vec<u8>,
    },
    Trunc {
        name: String,
        len: u64,
    },
    RdTrunc {
        name: String,
    },
    Save {
        name: String,
        data: Vec<u8>,
    },
    Rename {
        from: String,
        to: String,
    },
    Restore {
        name: String,
        data: Vec<u8>,
    },
    Chmod {
        name: String,
        mode: u32,
    },
    Create {
        name: String,
        data: Vec<u8>,
    },
    Unlink {
        name: String,
    },
    Mkdir {
        name: String,
    },
    Rmdir {
        name: String,
    },
    Link {
        from: String,
        to: String,
    },
    /// `echo x > name` (guest only): O_WRONLY|O_CREAT|O_TRUNC, write.
    TruncWrite {
        name: String,
        data: Vec<u8>,
    },
    /// Open a descriptor on the name and keep it (guest only).
    Keep {
        name: String,
    },
    /// Close a kept descriptor (guest only).
    Drop {
        slot: usize,
    },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Append { .. } => "append",
            Op::Trunc { .. } => "truncate",
            Op::RdTrunc { .. } => "rdtrunc",
            Op::Save { .. } => "save",
            Op::Rename { .. } => "rename",
            Op::Restore { .. } => "restore",
            Op::Chmod { .. } => "chmod",
            Op::Create { .. } => "create",
            Op::Unlink { .. } => "unlink",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Link { .. } => "link",
            Op::TruncWrite { .. } => "trunc-write",
            Op::Keep { .. } => "keep",
            Op::Drop { .. } => "drop",
        }
    }

    fn describe(&self) -> String {
        let d = |b: &[u8]| format!("{} bytes fnv={:016x}", b.len(), fnv1a64(b));
        match self {
            Op::Write { name, off, data } => format!("write {name} at {off}: {}", d(data)),
            Op::Append { name, data } => format!("append {name}: {}", d(data)),
            Op::Trunc { name, len } => format!("truncate {name} to {len}"),
            Op::RdTrunc { name } => format!("open({name}, O_RDONLY|O_TRUNC)"),
            Op::Save { name, data } => format!("save (tmp + rename over) {name}: {}", d(data)),
            Op::Rename { from, to } => format!("rename {from} -> {to}"),
            Op::Restore { name, data } => {
                format!("rewrite {name} same size, mtime restored: {}", d(data))
            }
            Op::Chmod { name, mode } => format!("chmod {mode:o} {name}"),
            Op::Create { name, data } => format!("create {name}: {}", d(data)),
            Op::Unlink { name } => format!("unlink {name}"),
            Op::Mkdir { name } => format!("mkdir {name}"),
            Op::Rmdir { name } => format!("rmdir {name}"),
            Op::Link { from, to } => format!("link {from} -> {to}"),
            Op::TruncWrite { name, data } => format!("echo > {name}: {}", d(data)),
            Op::Keep { name } => format!("open {name} and keep it"),
            Op::Drop { slot } => format!("close kept descriptor {slot}"),
        }
    }

    /// Names whose binding the op changes or depends on (guest namespace
    /// ops need them settled).
    fn names(&self) -> Vec<&str> {
        match self {
            Op::Rename { from, to } | Op::Link { from, to } => vec![from, to],
            Op::Drop { .. } => vec![],
            Op::Write { name, .. }
            | Op::Append { name, .. }
            | Op::Trunc { name, .. }
            | Op::RdTrunc { name }
            | Op::Save { name, .. }
            | Op::Restore { name, .. }
            | Op::Chmod { name, .. }
            | Op::Create { name, .. }
            | Op::Unlink { name }
            | Op::Mkdir { name }
            | Op::Rmdir { name }
            | Op::TruncWrite { name, .. }
            | Op::Keep { name } => vec![name],
        }
    }

    /// Guest namespace ops: issued only on settled names.
    fn is_namespace(&self) -> bool {
        matches!(
            self,
            Op::Rename { .. }
                | Op::Create { .. }
                | Op::Unlink { .. }
                | Op::Mkdir { .. }
                | Op::Rmdir { .. }
                | Op::Link { .. }
        )
    }
}

const MODES: [u32; 5] = [0o644, 0o600, 0o640, 0o444, 0o755];

/// One operation the model applies: who, what, and a tag (burst, pause).
#[derive(Clone)]
struct Step {
    host: bool,
    op: Op,
    tag: &'static str,
}

// ---------------------------------------------------------------- checks

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Class {
    StaleData,
    StaleSize,
    StaleName,
    StaleAttr,
    StaleReaddir,
    LostBytes,
    MisdirectedAttr,
    HostState,
    GuestOp,
    HostOp,
}

impl Class {
    const ALL: [Class; 10] = [
        Class::StaleData,
        Class::StaleSize,
        Class::StaleName,
        Class::StaleAttr,
        Class::StaleReaddir,
        Class::LostBytes,
        Class::MisdirectedAttr,
        Class::HostState,
        Class::GuestOp,
        Class::HostOp,
    ];
    fn name(self) -> &'static str {
        match self {
            Class::StaleData => "stale-data",
            Class::StaleSize => "stale-size",
            Class::StaleName => "stale-name",
            Class::StaleAttr => "stale-attr",
            Class::StaleReaddir => "stale-readdir",
            Class::LostBytes => "lost-bytes",
            Class::MisdirectedAttr => "misdirected-attr",
            Class::HostState => "host-state",
            Class::GuestOp => "guest-op",
            Class::HostOp => "host-op",
        }
    }
    /// The model no longer knows the host's state: go on in a new epoch.
    fn diverges(self) -> bool {
        matches!(
            self,
            Class::LostBytes
                | Class::MisdirectedAttr
                | Class::HostState
                | Class::GuestOp
                | Class::HostOp
        )
    }
}

#[derive(Default)]
struct Counts {
    ops: u64,
    host_ops: u64,
    guest_ops: u64,
    burst_changes: u64,
    bursts: u64,
    pauses: u64,
    rounds: u64,
    epochs: u64,
    data_checks: u64,
    fd_checks: u64,
    stat_checks: u64,
    readdir_checks: u64,
    host_checks: u64,
    lagged: u64,
    rechecks: u64,
    settle_waits: u64,
    violations: BTreeMap<Class, u64>,
    repeats: u64,
    known: BTreeMap<String, u64>,
    per_kind: BTreeMap<String, u64>,
    host_round_ms: Vec<f64>,
}

struct Run {
    o: Opts,
    notify: bool,
    window: f64,
    agent: Agent,
    rng: Rng,
    start: Instant,
    root: PathBuf,
    rel: String,
    epoch: u64,
    m: Model,
    kept: Vec<(usize, Fd, String)>,
    hist: VecDeque<String>,
    op_no: u64,
    c: Counts,
    seen: BTreeSet<String>,
    rechecks: Vec<(f64, String)>,
    shown: BTreeMap<Class, u64>,
    diverged: bool,
    burst_done: bool,
    pause_done: bool,
}

fn errno_of(e: &sys::Errno) -> String {
    crate::proto::errno_name(e.0)
}

fn describe_bytes(b: &[u8]) -> String {
    format!("{} bytes fnv={:016x}", b.len(), fnv1a64(b))
}

impl Run {
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn work_rel(&self) -> String {
        format!("{}/e{}", self.rel, self.epoch)
    }

    fn host_path(&self, name: &str) -> Vec<u8> {
        format!("{}/{name}", self.work_rel()).into_bytes()
    }

    fn guest_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("e{}", self.epoch)).join(name)
    }

    fn note(&mut self, line: String) {
        if self.o.verbose {
            println!("model: {line}");
        }
        self.hist.push_back(line);
        while self.hist.len() > self.o.history {
            self.hist.pop_front();
        }
    }

    fn replay_hint(&self) -> String {
        format!(
            "guest-tests model --seed {} --ops {} --stack {}{}",
            self.o.seed,
            self.c.ops.max(1),
            if self.notify { "notify" } else { "stock" },
            if self.o.known.is_empty() {
                String::new()
            } else {
                format!(" --known-limit {}", self.o.known.join(","))
            }
        )
    }

    /// Records a violation (once per key); `limit` is the kind of the op the
    /// stale answer comes from, for --known-limit.
    fn violation(&mut self, class: Class, key: String, limit: Option<&str>, what: String) {
        if class.diverges() {
            self.diverged = true;
        }
        let key = format!("{}:{key}", class.name());
        if !self.seen.insert(key) {
            self.c.repeats += 1;
            return;
        }
        // A restored mtime is a limit only for a descriptor the guest kept open across it (the
        // next open must read the new bytes), whoever restored it: the guest's own restore
        // through another node id of the file (an alias) is seen like a host's. Otherwise
        // only a host change can be a known limit: the guest's own rdtrunc goes through the
        // daemon like any other write of the guest.
        let kept_restore = |l: &str| l.starts_with("restore ") && what.starts_with(KEPT_READ);
        let known = limit
            .filter(|l| l.contains("(host ") || kept_restore(l))
            .map(|l| l.split(' ').next().unwrap_or(l))
            .filter(|&l| l != "restore" || what.starts_with(KEPT_READ))
            .filter(|l| self.o.known.iter().any(|k| k == l));
        if let Some(k) = known {
            let k = k.to_string();
            *self.c.known.entry(k.clone()).or_default() += 1;
            println!(
                "model: known limit ({k}), not a failure: {}: {what} [op {}]",
                class.name(),
                self.c.ops
            );
            return;
        }
        *self.c.violations.entry(class).or_default() += 1;
        let shown = self.shown.entry(class).or_default();
        *shown += 1;
        if *shown > 3 {
            println!(
                "model: VIOLATION {} at op {}: {what}",
                class.name(),
                self.c.ops
            );
            return;
        }
        println!(
            "model: VIOLATION {} at op {} (round {}, epoch {}, t={:.3} s) seed={} stack={}",
            class.name(),
            self.c.ops,
            self.c.rounds,
            self.epoch,
            self.now(),
            self.o.seed,
            if self.notify { "notify" } else { "stock" }
        );
        println!("  check: {what}");
        println!("  history (last {} ops, newest last):", self.hist.len());
        for h in &self.hist {
            println!("    {h}");
        }
        println!("  replay: {}", self.replay_hint());
    }

    // ------------------------------------------------------------ generating

    /// Names not changed in the last few ops (guest namespace ops prefer them).
    fn quiet(&self, names: &[String]) -> Vec<String> {
        names
            .iter()
            .filter(|n| {
                self.m
                    .changed_op
                    .get(n.as_str())
                    .is_none_or(|&o| o + 8 <= self.op_no)
            })
            .cloned()
            .collect()
    }

    fn gen_data(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.range(1, max);
        self.rng.bytes(n)
    }

    /// One host op not touching `busy` names or inodes; None if none fits.
    fn gen_host(
        &mut self,
        busy: &BTreeSet<String>,
        busy_ino: &BTreeSet<usize>,
        small: bool,
    ) -> Option<Op> {
        let free = |n: &String| !busy.contains(n);
        let present: Vec<String> = self
            .m
            .files_present()
            .into_iter()
            .filter(free)
            .filter(|n| !busy_ino.contains(&self.m.file(n).unwrap()))
            .collect();
        let absent: Vec<String> = self.m.files_absent().into_iter().filter(free).collect();
        let maxw = if small { 64 } else { 4096 };
        for _ in 0..6 {
            let k = self.rng.below(100);
            let op = match k {
                0..=17 => {
                    let name = self.rng.pick(&present)?.clone();
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    if len == 0 {
                        continue;
                    }
                    let off = self.rng.below(len) as u64;
                    let n = self.rng.range(1, (len - off as usize).min(maxw));
                    Op::Write {
                        name,
                        off,
                        data: self.rng.bytes(n),
                    }
                }
                18..=26 => {
                    let name = self.rng.pick(&present)?.clone();
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    if len >= MAX_SIZE {
                        continue;
                    }
                    let data = self.gen_data((MAX_SIZE - len).min(maxw));
                    Op::Append { name, data }
                }
                27..=33 => {
                    let name = self.rng.pick(&present)?.clone();
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    Op::Trunc {
                        name,
                        len: self.rng.below(len.max(1)) as u64,
                    }
                }
                34..=36 => Op::RdTrunc {
                    name: self.rng.pick(&present)?.clone(),
                },
                37..=44 => {
                    let name = self.rng.pick(&present)?.clone();
                    let data = self.gen_data(maxw.min(MAX_SIZE));
                    Op::Save { name, data }
                }
                45..=54 => {
                    let from = self.rng.pick(&present)?.clone();
                    let to = if self.rng.chance(500) {
                        self.rng.pick(&absent)?.clone()
                    } else {
                        self.rng.pick(&present)?.clone()
                    };
                    if from == to || self.m.file(&from) == self.m.file(&to) {
                        continue;
                    }
                    Op::Rename { from, to }
                }
                55..=62 => {
                    let name = self.rng.pick(&present)?.clone();
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    if len == 0 {
                        continue;
                    }
                    Op::Restore {
                        name,
                        data: self.rng.bytes(len),
                    }
                }
                63..=69 => {
                    let name = self.rng.pick(&present)?.clone();
                    let mode = MODES[self.rng.below(MODES.len())];
                    Op::Chmod { name, mode }
                }
                70..=78 => {
                    let name = self.rng.pick(&absent)?.clone();
                    let data = self.gen_data(maxw.min(MAX_SIZE));
                    Op::Create { name, data }
                }
                79..=85 => Op::Unlink {
                    name: self.rng.pick(&present)?.clone(),
                },
                86..=91 => {
                    let from = self.rng.pick(&present)?.clone();
                    let to = self.rng.pick(&absent)?.clone();
                    Op::Link { from, to }
                }
                _ => {
                    let d = dir_name(self.rng.below(DIRS));
                    if busy.contains(&d) {
                        continue;
                    }
                    if self.m.names.contains_key(&d) {
                        Op::Rmdir { name: d }
                    } else {
                        Op::Mkdir { name: d }
                    }
                }
            };
            return Some(op);
        }
        None
    }

    /// One guest op; `prefer` names (touched by this round's host ops) first.
    fn gen_guest(&mut self, prefer: &[String]) -> Option<Op> {
        let present = self.m.files_present();
        let absent = self.m.files_absent();
        let near: Vec<String> = prefer
            .iter()
            .filter(|n| n.starts_with('f'))
            .cloned()
            .collect();
        let target = |r: &mut Rng, pool: &[String]| -> Option<String> {
            let hot: Vec<String> = near.iter().filter(|n| pool.contains(n)).cloned().collect();
            if !hot.is_empty() && r.chance(600) {
                r.pick(&hot).cloned()
            } else {
                r.pick(pool).cloned()
            }
        };
        let qp = self.quiet(&present);
        let qa = self.quiet(&absent);
        for _ in 0..8 {
            let k = self.rng.below(100);
            let op = match k {
                0..=13 => {
                    let name = target(&mut self.rng, &present)?;
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    if len == 0 {
                        continue;
                    }
                    let off = self.rng.below(len) as u64;
                    let n = self.rng.range(1, (len - off as usize).min(4096));
                    Op::Write {
                        name,
                        off,
                        data: self.rng.bytes(n),
                    }
                }
                14..=19 => {
                    let name = target(&mut self.rng, &present)?;
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    if len >= MAX_SIZE {
                        continue;
                    }
                    let data = self.gen_data((MAX_SIZE - len).min(4096));
                    Op::Append { name, data }
                }
                20..=34 => {
                    // echo > name: through a name the host may just have renamed away.
                    let all: Vec<String> = (0..FILES).map(file_name).collect();
                    let name = target(&mut self.rng, &all)?;
                    let data = self.gen_data(4096);
                    Op::TruncWrite { name, data }
                }
                35..=39 => {
                    let name = target(&mut self.rng, &present)?;
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    Op::Trunc {
                        name,
                        len: self.rng.below(len.max(1)) as u64,
                    }
                }
                40..=41 => Op::RdTrunc {
                    name: target(&mut self.rng, &present)?,
                },
                42..=45 => {
                    let name = target(&mut self.rng, &present)?;
                    let len = self.m.inodes[self.m.file(&name)?].data.len();
                    if len == 0 {
                        continue;
                    }
                    Op::Restore {
                        name,
                        data: self.rng.bytes(len),
                    }
                }
                46..=53 => {
                    let name = target(&mut self.rng, &present)?;
                    Op::Chmod {
                        name,
                        mode: MODES[self.rng.below(MODES.len())],
                    }
                }
                54..=60 => {
                    if self.kept.len() >= MAX_KEPT {
                        Op::Drop {
                            slot: self.rng.below(self.kept.len()),
                        }
                    } else {
                        Op::Keep {
                            name: target(&mut self.rng, &present)?,
                        }
                    }
                }
                61..=63 => {
                    if self.kept.is_empty() {
                        continue;
                    }
                    Op::Drop {
                        slot: self.rng.below(self.kept.len()),
                    }
                }
                64..=66 => {
                    let name = target(&mut self.rng, &present)?;
                    let data = self.gen_data(4096);
                    Op::Save { name, data }
                }
                // Namespace ops: settled names only.
                67..=72 => {
                    let name = self.rng.pick(&qa)?.clone();
                    let data = self.gen_data(4096);
                    Op::Create { name, data }
                }
                73..=77 => Op::Unlink {
                    name: self.rng.pick(&qp)?.clone(),
                },
                78..=85 => {
                    let from = self.rng.pick(&qp)?.clone();
                    let to = if self.rng.chance(500) {
                        self.rng.pick(&qa)?.clone()
                    } else {
                        self.rng.pick(&qp)?.clone()
                    };
                    if from == to || self.m.file(&from) == self.m.file(&to) {
                        continue;
                    }
                    Op::Rename { from, to }
                }
                86..=91 => {
                    let from = self.rng.pick(&qp)?.clone();
                    let to = self.rng.pick(&qa)?.clone();
                    Op::Link { from, to }
                }
                _ => {
                    let dirs: Vec<String> = (0..DIRS).map(dir_name).collect();
                    let d = self.rng.pick(&self.quiet(&dirs))?.clone();
                    if self.m.names.contains_key(&d) {
                        Op::Rmdir { name: d }
                    } else {
                        Op::Mkdir { name: d }
                    }
                }
            };
            return Some(op);
        }
        None
    }

    // ------------------------------------------------------------ applying

    /// Applies an op to the model (it has happened, at `now`).
    fn apply(&mut self, s: &Step, now: f64) {
        let op_no = self.op_no;
        let who = if s.host { "host" } else { "guest" };
        let kind = if s.tag.is_empty() {
            format!("{who} {}", s.op.kind())
        } else {
            format!("{who} {} {}", s.op.kind(), s.tag)
        };
        // The limit kind an inode's stale answers are charged to comes first.
        let limit = if s.tag.is_empty() {
            s.op.kind().to_string()
        } else {
            s.tag.to_string()
        };
        let lk = format!("{limit} ({kind}, op {op_no})");
        let m = &mut self.m;
        match &s.op {
            Op::Write { name, off, data } => {
                let i = m.file(name).expect("write: file");
                let mut d = m.inodes[i].data.clone();
                let end = *off as usize + data.len();
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[*off as usize..end].copy_from_slice(data);
                m.set_data(i, d, op_no, &lk);
            }
            Op::Append { name, data } => {
                let i = m.file(name).expect("append: file");
                let mut d = m.inodes[i].data.clone();
                d.extend_from_slice(data);
                m.set_data(i, d, op_no, &lk);
            }
            Op::Trunc { name, len } => {
                let i = m.file(name).expect("truncate: file");
                let mut d = m.inodes[i].data.clone();
                d.resize(*len as usize, 0);
                m.set_data(i, d, op_no, &lk);
            }
            Op::RdTrunc { name } => {
                let i = m.file(name).expect("rdtrunc: file");
                m.set_data(i, Vec::new(), op_no, &lk);
            }
            Op::Restore { name, data } => {
                let i = m.file(name).expect("restore: file");
                m.set_data(i, data.clone(), op_no, &lk);
            }
            Op::Save { name, data } => {
                let i = m.new_inode(data.clone(), 0o644, &lk);
                m.bind(name, Some(Obj::File(i)), now, op_no, &lk);
            }
            Op::Create { name, data } => {
                let i = m.new_inode(data.clone(), 0o644, &lk);
                m.bind(name, Some(Obj::File(i)), now, op_no, &lk);
            }
            Op::TruncWrite { name, data } => match m.file(name) {
                Some(i) => m.set_data(i, data.clone(), op_no, &lk),
                None => {
                    let i = m.new_inode(data.clone(), 0o644, &lk);
                    m.bind(name, Some(Obj::File(i)), now, op_no, &lk);
                }
            },
            Op::Rename { from, to } => {
                let o = m.names.get(from).copied();
                m.bind(to, o, now, op_no, &lk);
                m.bind(from, None, now, op_no, &lk);
            }
            Op::Link { from, to } => {
                let o = m.names.get(from).copied();
                m.bind(to, o, now, op_no, &lk);
            }
            Op::Chmod { name, mode } => {
                let i = m.file(name).expect("chmod: file");
                m.set_mode(i, *mode, now);
            }
            Op::Unlink { name } | Op::Rmdir { name } => m.bind(name, None, now, op_no, &lk),
            Op::Mkdir { name } => m.bind(name, Some(Obj::Dir), now, op_no, &lk),
            Op::Keep { .. } | Op::Drop { .. } => {}
        }
    }

    fn host_request(&self, op: &Op) -> Request {
        let p = |n: &str| self.host_path(n);
        match op {
            Op::Write { name, off, data } => Request::Write(p(name), *off, data.clone()),
            Op::Append { name, data } => {
                let len = self.m.inodes[self.m.file(name).unwrap()].data.len() as u64;
                Request::Write(p(name), len, data.clone())
            }
            Op::Trunc { name, len } => Request::Truncate(p(name), *len),
            Op::RdTrunc { name } => Request::RdTrunc(p(name)),
            Op::Save { name, data } => Request::Save(p(name), data.clone()),
            Op::Rename { from, to } => Request::Rename(p(from), p(to)),
            Op::Restore { name, data } => Request::Restore(p(name), data.clone()),
            Op::Chmod { name, mode } => Request::Chmod(p(name), *mode),
            Op::Create { name, data } => Request::Write(p(name), 0, data.clone()),
            Op::Unlink { name } | Op::Rmdir { name } => Request::Unlink(p(name)),
            Op::Mkdir { name } => Request::Mkdir(p(name)),
            Op::Link { from, to } => Request::Link(p(from), p(to)),
            Op::TruncWrite { .. } | Op::Keep { .. } | Op::Drop { .. } => {
                unreachable!("guest-only op")
            }
        }
    }

    /// Runs host steps at once (PAR; inside PAUSE when `pause`); applies
    /// those that succeeded. Err: the agent could not be reached.
    fn run_host(&mut self, steps: &[Step], pause: bool) -> Result<(), String> {
        if steps.is_empty() {
            return Ok(());
        }
        let reqs: Vec<Request> = steps.iter().map(|s| self.host_request(&s.op)).collect();
        let t0 = Instant::now();
        let mut req = Request::Par(reqs);
        if pause {
            req = Request::Pause(self.o.pause_ms, Box::new(req));
        }
        let reply = self.agent.call(&req)?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        self.c.host_round_ms.push(ms);
        let payload = match reply {
            Ok(p) => p,
            Err(e) => {
                return Err(format!(
                    "agent {}: ERR {e}",
                    req.encode().chars().take(60).collect::<String>()
                ))
            }
        };
        let payload = if pause {
            let line = hex_decode(&payload).map_err(|e| format!("bad PAUSE reply: {e}"))?;
            let line = String::from_utf8_lossy(&line).into_owned();
            match parse_reply(&line)? {
                Ok(p) => p,
                Err(e) => return Err(format!("agent PAUSE/PAR: ERR {e}")),
            }
        } else {
            payload
        };
        let parts: Vec<&str> = payload.split(' ').filter(|s| !s.is_empty()).collect();
        if parts.len() != steps.len() {
            return Err(format!(
                "PAR reply has {} parts for {}",
                parts.len(),
                steps.len()
            ));
        }
        let now = self.now();
        // A host open(O_RDONLY|O_TRUNC) breaks no lease: a notify guest hears of it from
        // FAN_MODIFY, after the truncate, and may read the old bytes until it has (the notify
        // window, docs/coherency.md). Nothing in the guest looks before the window has passed.
        if self.notify && steps.iter().any(|s| matches!(s.op, Op::RdTrunc { .. })) {
            self.c.settle_waits += 1;
            std::thread::sleep(Duration::from_secs_f64(self.window));
        }
        for (s, part) in steps.iter().zip(parts) {
            let line = hex_decode(part).map_err(|e| format!("bad PAR part: {e}"))?;
            let line = String::from_utf8_lossy(&line).into_owned();
            self.op_no += 1;
            self.c.ops += 1;
            self.c.host_ops += 1;
            *self
                .c
                .per_kind
                .entry(format!("host {}", s.op.kind()))
                .or_default() += 1;
            let res = parse_reply(&line)?;
            self.note(format!(
                "op {} t={now:.3} host{} {} -> {} ({ms:.0} ms for the batch)",
                self.op_no,
                if s.tag.is_empty() {
                    String::new()
                } else {
                    format!("[{}]", s.tag)
                },
                s.op.describe(),
                match &res {
                    Ok(_) => "OK".to_string(),
                    Err(e) => format!("ERR {e}"),
                }
            ));
            match res {
                Ok(_) => self.apply(s, now),
                Err(e) => self.violation(
                    Class::HostOp,
                    format!("op{}", self.op_no),
                    None,
                    format!(
                        "host {}: ERR {e} (the model said it would work)",
                        s.op.describe()
                    ),
                ),
            }
        }
        Ok(())
    }

    /// A burst: `n` host changes one after another (sent at once).
    fn run_burst(&mut self, n: usize) -> Result<(), String> {
        let mut steps = Vec::with_capacity(n);
        let mut reqs = Vec::with_capacity(n);
        // Generate against the model as it goes (applied with a placeholder
        // time, then their names' change times set to the reply's).
        let none = BTreeSet::new();
        let nino = BTreeSet::new();
        let t_before = self.now();
        for _ in 0..n {
            let Some(op) = self.gen_host(&none, &nino, true) else {
                continue;
            };
            let s = Step {
                host: true,
                op,
                tag: "burst",
            };
            reqs.push(self.host_request(&s.op));
            self.apply(&s, t_before);
            steps.push(s);
        }
        let t0 = Instant::now();
        let replies = self.agent.call_many(&reqs)?;
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        let now = self.now();
        // The burst's changes all ended by now.
        for v in self.m.past.values_mut() {
            for e in v.iter_mut() {
                if e.1 >= t_before {
                    e.1 = now;
                }
            }
        }
        for ino in self.m.inodes.iter_mut() {
            for e in ino.old_modes.iter_mut() {
                if e.1 >= t_before {
                    e.1 = now;
                }
            }
        }
        for v in self.m.changed_at.values_mut() {
            if *v >= t_before {
                *v = now;
            }
        }
        self.c.bursts += 1;
        self.c.burst_changes += steps.len() as u64;
        let errs: Vec<String> = steps
            .iter()
            .zip(&replies)
            .filter_map(|(s, r)| {
                r.as_ref()
                    .err()
                    .map(|e| format!("{}: ERR {e}", s.op.describe()))
            })
            .collect();
        self.note(format!(
            "after op {} t={now:.3} host burst of {} changes ({} ms){}",
            self.op_no,
            steps.len(),
            ms as u64,
            if errs.is_empty() {
                String::new()
            } else {
                format!(", {} failed", errs.len())
            }
        ));
        if let Some(e) = errs.first() {
            self.violation(
                Class::HostOp,
                format!("burst{}", self.c.bursts),
                None,
                format!("burst: {} host changes failed, first: {e}", errs.len()),
            );
        }
        Ok(())
    }

    /// Waits until the op's names have been unchanged for the window.
    fn settle(&mut self, op: &Op) {
        let last = op
            .names()
            .iter()
            .filter_map(|n| self.m.changed_at.get(*n).copied())
            .fold(f64::MIN, f64::max);
        let wait = last + self.window - self.now();
        if wait > 0.0 {
            self.c.settle_waits += 1;
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }

    fn run_guest(&mut self, op: Op) {
        if op.is_namespace() {
            self.settle(&op);
        }
        let s = Step {
            host: false,
            op,
            tag: "",
        };
        let r = self.guest_syscalls(&s.op);
        let now = self.now();
        self.op_no += 1;
        self.c.ops += 1;
        self.c.guest_ops += 1;
        *self
            .c
            .per_kind
            .entry(format!("guest {}", s.op.kind()))
            .or_default() += 1;
        self.note(format!(
            "op {} t={now:.3} guest {} -> {}",
            self.op_no,
            s.op.describe(),
            match &r {
                Ok(()) => "OK".into(),
                Err(e) => e.clone(),
            }
        ));
        match r {
            Ok(()) => self.apply(&s, now),
            Err(e) => {
                // The name's last change says what the guest may have been
                // looking at; a known limit there excuses it.
                let limit =
                    s.op.names()
                        .first()
                        .and_then(|n| self.m.name_last.get(*n).cloned());
                self.violation(
                    Class::GuestOp,
                    format!("op{}", self.op_no),
                    limit.as_deref(),
                    format!(
                        "guest {}: {e} (the host state says it works)",
                        s.op.describe()
                    ),
                );
            }
        }
    }

    fn guest_syscalls(&mut self, op: &Op) -> Result<(), String> {
        let p = |n: &str| self.guest_path(n);
        let e = |what: &str, err: sys::Errno| format!("{what}: {}", errno_of(&err));
        match op {
            Op::Write { name, off, data } => {
                let fd =
                    sys::open(p(name), libc::O_WRONLY, 0).map_err(|x| e("open O_WRONLY", x))?;
                sys::pwrite_all(&fd, data, *off).map_err(|x| e("pwrite", x))
            }
            Op::Append { name, data } => {
                let fd = sys::open(p(name), libc::O_WRONLY | libc::O_APPEND, 0)
                    .map_err(|x| e("open O_APPEND", x))?;
                sys::write_all(&fd, data).map_err(|x| e("write", x))
            }
            Op::Trunc { name, len } => sys::truncate(p(name), *len).map_err(|x| e("truncate", x)),
            Op::RdTrunc { name } => sys::open(p(name), libc::O_RDONLY | libc::O_TRUNC, 0)
                .map(drop)
                .map_err(|x| e("open O_RDONLY|O_TRUNC", x)),
            Op::Restore { name, data } => {
                let fd =
                    sys::open(p(name), libc::O_WRONLY, 0).map_err(|x| e("open O_WRONLY", x))?;
                let st = sys::fstat(&fd).map_err(|x| e("fstat", x))?;
                sys::ftruncate(&fd, 0).map_err(|x| e("ftruncate", x))?;
                sys::write_all(&fd, data).map_err(|x| e("write", x))?;
                let times = [
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    sys::ts(st.st_mtime, st.st_mtime_nsec),
                ];
                sys::futimens(&fd, times).map_err(|x| e("futimens", x))
            }
            Op::Save { name, data } => {
                let tmp = p(&format!(".{name}.g-tmp"));
                let fd = sys::open(&tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o644)
                    .map_err(|x| e("create tmp", x))?;
                sys::write_all(&fd, data).map_err(|x| e("write tmp", x))?;
                drop(fd);
                sys::rename(&tmp, p(name)).map_err(|x| e("rename tmp over", x))
            }
            Op::Create { name, data } => {
                let fd = sys::open(
                    p(name),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o644,
                )
                .map_err(|x| e("open O_CREAT|O_EXCL", x))?;
                sys::write_all(&fd, data).map_err(|x| e("write", x))
            }
            Op::TruncWrite { name, data } => {
                let fd = sys::open(
                    p(name),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                    0o644,
                )
                .map_err(|x| e("open O_WRONLY|O_CREAT|O_TRUNC", x))?;
                sys::write_all(&fd, data).map_err(|x| e("write", x))
            }
            Op::Rename { from, to } => sys::rename(p(from), p(to)).map_err(|x| e("rename", x)),
            Op::Link { from, to } => sys::link(p(from), p(to)).map_err(|x| e("link", x)),
            Op::Chmod { name, mode } => sys::chmod(p(name), *mode).map_err(|x| e("chmod", x)),
            Op::Unlink { name } => sys::unlink(p(name)).map_err(|x| e("unlink", x)),
            Op::Mkdir { name } => sys::mkdir(p(name), 0o755).map_err(|x| e("mkdir", x)),
            Op::Rmdir { name } => sys::rmdir(p(name)).map_err(|x| e("rmdir", x)),
            Op::Keep { name } => {
                let fd = sys::open(p(name), libc::O_RDONLY, 0).map_err(|x| e("open", x))?;
                let i = self.m.file(name).expect("keep: file");
                self.kept.push((i, fd, name.clone()));
                Ok(())
            }
            Op::Drop { slot } => {
                if *slot < self.kept.len() {
                    self.kept.remove(*slot);
                }
                Ok(())
            }
        }
    }

    // ------------------------------------------------------------ checking

    /// The content before the current one, if `got` is one of them.
    fn which_old(&self, i: usize, got: &[u8]) -> String {
        let h = fnv1a64(got);
        let ino = &self.m.inodes[i];
        for (k, (oh, olen, by)) in ino.old_data.iter().rev().enumerate() {
            if *oh == h && *olen == got.len() {
                return format!("the content {} change(s) back, before {by}", k + 1);
            }
        }
        "no content the file had".into()
    }

    fn data_check(&mut self, name: &str) {
        let path = self.guest_path(name);
        let obj = self.m.names.get(name).copied();
        self.c.data_checks += 1;
        let opened = sys::open(&path, libc::O_RDONLY | libc::O_NOFOLLOW, 0);
        match (obj, opened) {
            (None, Err(sys::Errno(libc::ENOENT))) => {}
            (None, Ok(fd)) => {
                let st = sys::fstat(&fd).ok();
                let limit = self.m.name_last.get(name).cloned();
                let key = format!(
                    "{name}:{}",
                    self.m.changed_op.get(name).copied().unwrap_or(0)
                );
                self.violation(
                    Class::StaleData,
                    key,
                    limit.as_deref(),
                    format!(
                        "open({name}) succeeded (ino {:?}, size {:?}) but the host has no {name} since {}",
                        st.map(|s| s.st_ino),
                        st.map(|s| s.st_size),
                        limit.as_deref().unwrap_or("?")
                    ),
                );
            }
            (_, Err(err)) => {
                let limit = self.m.name_last.get(name).cloned();
                let key = format!(
                    "{name}:{}",
                    self.m.changed_op.get(name).copied().unwrap_or(0)
                );
                self.violation(
                    Class::StaleData,
                    key,
                    limit.as_deref(),
                    format!(
                        "open({name}): {} but the host has it ({:?})",
                        errno_of(&err),
                        obj
                    ),
                );
            }
            (Some(Obj::Dir), Ok(_)) => {}
            (Some(Obj::File(i)), Ok(fd)) => self.check_fd(&fd, i, &format!("open({name})")),
        }
    }

    /// Reads all of `fd`, which must be inode `i`, and compares.
    fn check_fd(&mut self, fd: &Fd, i: usize, what: &str) {
        let st = match sys::fstat(fd) {
            Ok(st) => st,
            Err(err) => {
                self.violation(
                    Class::GuestOp,
                    format!("fstat{}", self.op_no),
                    None,
                    format!("{what}: fstat: {}", errno_of(&err)),
                );
                return;
            }
        };
        let ino = &self.m.inodes[i];
        let key = format!("i{i}:v{}", ino.version);
        let limit = ino.last.clone();
        match ino.guest_ino {
            None => self.m.inodes[i].guest_ino = Some(st.st_ino),
            Some(g) if g != st.st_ino => {
                let other = self
                    .m
                    .inodes
                    .iter()
                    .position(|x| x.guest_ino == Some(st.st_ino));
                self.violation(
                    Class::StaleData,
                    format!("{key}:ino"),
                    Some(&limit),
                    format!(
                        "{what} reached ino {} but the file is ino {g}{}",
                        st.st_ino,
                        other.map_or(String::new(), |o| format!(
                            " (ino {} is model file #{o}, {} links now)",
                            st.st_ino, self.m.inodes[o].links
                        ))
                    ),
                );
                return;
            }
            Some(_) => {}
        }
        let want_len = self.m.inodes[i].data.len();
        if st.st_size as usize != want_len {
            self.violation(
                Class::StaleData,
                format!("{key}:fsize"),
                Some(&limit),
                format!(
                    "{what}: fstat size {} but the file has {want_len} bytes (last change: {limit})",
                    st.st_size
                ),
            );
        }
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            match sys::pread(fd, &mut buf, got.len() as u64) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(err) => {
                    self.violation(
                        Class::StaleData,
                        format!("{key}:read"),
                        Some(&limit),
                        format!("{what}: read: {}", errno_of(&err)),
                    );
                    return;
                }
            }
        }
        if got != self.m.inodes[i].data {
            let old = self.which_old(i, &got);
            let want = describe_bytes(&self.m.inodes[i].data);
            self.violation(
                Class::StaleData,
                key,
                Some(&limit),
                format!(
                    "{what}: read {} = {old}; want {want} (last change: {limit})",
                    describe_bytes(&got)
                ),
            );
        }
    }

    /// Which past states of `name` (and modes of its files) the window allows at `t`.
    fn stat_check(&mut self, name: &str) {
        let path = self.guest_path(name);
        let t = self.now();
        self.c.stat_checks += 1;
        let ans = sys::lstat(&path);
        let cur = self.m.names.get(name).copied();
        let horizon = t - self.window;
        let mut cands: Vec<(Option<Obj>, f64)> = vec![(cur, f64::INFINITY)];
        if let Some(p) = self.m.past.get(name) {
            cands.extend(p.iter().filter(|(_, end)| *end > horizon).copied());
        }
        let key_base = format!(
            "{name}:{}",
            self.m.changed_op.get(name).copied().unwrap_or(0)
        );
        let st = match ans {
            Err(sys::Errno(libc::ENOENT)) => {
                if cur.is_some() {
                    let limit = self.m.name_last.get(name).cloned();
                    self.violation(
                        Class::StaleName,
                        key_base,
                        limit.as_deref(),
                        format!(
                            "stat({name}): ENOENT but the host has it ({cur:?}) since {}",
                            limit.as_deref().unwrap_or("?")
                        ),
                    );
                }
                return;
            }
            Err(err) => {
                self.violation(
                    Class::StaleName,
                    key_base,
                    None,
                    format!("stat({name}): {}", errno_of(&err)),
                );
                return;
            }
            Ok(st) => st,
        };
        let ty = sys::file_type(&st);
        let mut near: Option<String> = None;
        let mut size_bad: Option<(usize, String)> = None;
        let mut ok_until: Option<f64> = None;
        for (obj, end) in &cands {
            match obj {
                Some(Obj::Dir) if ty == libc::S_IFDIR => {
                    ok_until = Some(ok_until.map_or(*end, |u: f64| u.max(*end)));
                }
                Some(Obj::File(i)) if ty == libc::S_IFREG => {
                    let ino = &self.m.inodes[*i];
                    if ino.guest_ino.is_some_and(|g| g != st.st_ino) {
                        continue;
                    }
                    if st.st_size as usize != ino.data.len() {
                        near = Some(format!(
                            "size {} but the file (ino {}) has {} bytes; last change: {}",
                            st.st_size,
                            st.st_ino,
                            ino.data.len(),
                            ino.last
                        ));
                        if ino.guest_ino.is_some() && size_bad.is_none() {
                            size_bad = Some((*i, near.clone().unwrap_or_default()));
                        }
                        continue;
                    }
                    let mode = st.st_mode & 0o7777;
                    let mode_end = if mode == ino.mode {
                        Some(f64::INFINITY)
                    } else {
                        ino.old_modes
                            .iter()
                            .filter(|(m, e)| *m == mode && *e > horizon)
                            .map(|(_, e)| *e)
                            .fold(None, |a: Option<f64>, e| Some(a.map_or(e, |a| a.max(e))))
                    };
                    match mode_end {
                        Some(me) => {
                            let u = end.min(me);
                            ok_until = Some(ok_until.map_or(u, |x: f64| x.max(u)));
                        }
                        None => {
                            near = Some(format!(
                                "mode {:o} but the file (ino {}) has {:o} (modes within the window: {:?})",
                                mode,
                                st.st_ino,
                                ino.mode,
                                ino.old_modes.iter().filter(|(_, e)| *e > horizon).map(|(m, _)| format!("{m:o}")).collect::<Vec<_>>()
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        match ok_until {
            Some(u) if u.is_infinite() => {}
            Some(u) => {
                // Allowed by the window for now: look again once it has passed.
                self.c.lagged += 1;
                self.rechecks
                    .push((u + self.window + 0.005, name.to_string()));
            }
            None if size_bad.is_some() => {
                // The file it names is right but its size is old (guarantee 1).
                let (i, what) = size_bad.unwrap();
                let ino = &self.m.inodes[i];
                let limit = ino.last.clone();
                let key = format!("i{i}:v{}:size", ino.version);
                self.violation(
                    Class::StaleSize,
                    key,
                    Some(&limit),
                    format!("stat({name}): {what}"),
                );
            }
            None => {
                let (class, what) = match near {
                    Some(n) if n.starts_with("mode") => (Class::StaleAttr, n),
                    Some(n) => (Class::StaleName, n),
                    None => (
                        Class::StaleName,
                        format!(
                            "{} ino {} size {} matches no state of {name} within {:.0} ms (now: {cur:?}, earlier: {:?})",
                            sys::type_name(st.st_mode),
                            st.st_ino,
                            st.st_size,
                            self.window * 1000.0,
                            self.m.past.get(name).map(|p| p.iter().rev().take(3).map(|(o, e)| format!("{o:?} until {e:.3}")).collect::<Vec<_>>())
                        ),
                    ),
                };
                let limit = self.m.name_last.get(name).cloned();
                self.violation(
                    class,
                    format!("{key_base}:{}:{:o}", st.st_ino, st.st_mode),
                    limit.as_deref(),
                    format!(
                        "stat({name}) at t={t:.3}: {what}; name last changed by {}",
                        limit.as_deref().unwrap_or("-")
                    ),
                );
            }
        }
    }

    fn readdir_check(&mut self) {
        self.c.readdir_checks += 1;
        let dir = self.guest_path("");
        let got: BTreeSet<String> = match sys::list_dir(&dir) {
            Ok(v) => v
                .into_iter()
                .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                .collect(),
            Err(err) => {
                self.violation(
                    Class::StaleReaddir,
                    format!("err{}", self.op_no),
                    None,
                    format!("readdir: {}", errno_of(&err)),
                );
                return;
            }
        };
        let want: BTreeSet<String> = self.m.names.keys().cloned().collect();
        if got != want {
            let extra: Vec<_> = got.difference(&want).collect();
            let missing: Vec<_> = want.difference(&got).collect();
            let last = extra
                .iter()
                .chain(missing.iter())
                .filter_map(|n| self.m.name_last.get(n.as_str()))
                .next()
                .cloned();
            self.violation(
                Class::StaleReaddir,
                format!("{extra:?}{missing:?}{}", self.m.changed_op.values().max().unwrap_or(&0)),
                last.as_deref(),
                format!(
                    "readdir lists {extra:?} the host does not have and lacks {missing:?} (last change of those: {})",
                    last.as_deref().unwrap_or("-")
                ),
            );
        }
    }

    /// The host's truth against the model: content, size, mode, existence.
    fn host_check(&mut self) -> Result<(), String> {
        self.c.host_checks += 1;
        let names: Vec<String> = (0..FILES)
            .map(file_name)
            .chain((0..DIRS).map(dir_name))
            .collect();
        let mut reqs = Vec::new();
        for n in &names {
            reqs.push(Request::Stat(self.host_path(n)));
            reqs.push(Request::Hash(self.host_path(n)));
        }
        let replies = self.agent.call_many(&reqs)?;
        for (k, n) in names.iter().enumerate() {
            let (st, hash) = (&replies[2 * k], &replies[2 * k + 1]);
            let obj = self.m.names.get(n).copied();
            let key = format!(
                "{n}:{}:{}",
                self.m.changed_op.get(n).copied().unwrap_or(0),
                self.op_no
            );
            match (obj, st) {
                (None, Err(e)) if e.starts_with("ENOENT") => {}
                (Some(Obj::Dir), Ok(s))
                    if HostStat::parse(s)?.mode & libc::S_IFMT == libc::S_IFDIR => {}
                (Some(Obj::File(i)), Ok(s)) => {
                    let hs = HostStat::parse(s)?;
                    let ino = &self.m.inodes[i];
                    let (want_len, want_h) = (ino.data.len(), fnv1a64(&ino.data));
                    let got = hash.clone().map_err(|e| format!("ERR {e}"));
                    let got = got.and_then(|g| {
                        let (a, b) = g.split_once(' ').ok_or("bad HASH")?;
                        Ok::<_, String>((
                            a.parse::<usize>().map_err(|_| "bad size")?,
                            u64::from_str_radix(b, 16).map_err(|_| "bad hash")?,
                        ))
                    });
                    if hs.mode & libc::S_IFMT != libc::S_IFREG || got != Ok((want_len, want_h)) {
                        let what = match &got {
                            Ok((l, h)) => {
                                let old = ino
                                    .old_data
                                    .iter()
                                    .rev()
                                    .position(|(oh, ol, _)| oh == h && ol == l)
                                    .map_or("not a content the model had".to_string(), |k| {
                                        format!("the content {} change(s) back", k + 1)
                                    });
                                format!("{l} bytes fnv={h:016x} ({old})")
                            }
                            Err(e) => e.clone(),
                        };
                        let limit = ino.last.clone();
                        self.violation(
                            Class::LostBytes,
                            key,
                            None,
                            format!(
                                "host {n}: {what}; the model has {} (last change: {limit}): a guest write went elsewhere or bytes were lost",
                                describe_bytes(&ino.data)
                            ),
                        );
                    } else if hs.mode & 0o7777 != ino.mode {
                        self.violation(
                            Class::MisdirectedAttr,
                            key,
                            None,
                            format!(
                                "host {n}: mode {:o}, the model {:o} (a chmod hit another file, or was lost)",
                                hs.mode & 0o7777,
                                ino.mode
                            ),
                        );
                    }
                }
                (obj, st) => {
                    self.violation(
                        Class::HostState,
                        key,
                        None,
                        format!(
                            "host {n}: {st:?}, the model {obj:?} (last change: {})",
                            self.m.name_last.get(n).map_or("-", |s| s.as_str())
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn verify(&mut self) -> Result<(), String> {
        let names: Vec<String> = (0..FILES)
            .map(file_name)
            .chain((0..DIRS).map(dir_name))
            .collect();
        // Directories are names (guarantee 3): only stat and readdir look at them.
        for n in names.iter().filter(|n| n.starts_with('f')) {
            self.data_check(n);
        }
        let kept: Vec<(usize, String)> =
            self.kept.iter().map(|(i, _, n)| (*i, n.clone())).collect();
        for (k, (i, n)) in kept.iter().enumerate() {
            self.c.fd_checks += 1;
            let fd = sys::dup(&self.kept[k].1).map_err(|e| format!("dup: {e}"))?;
            self.check_fd(&fd, *i, &format!("{KEPT_READ} since open({n})"));
        }
        for n in &names {
            self.stat_check(n);
        }
        self.readdir_check();
        self.host_check()
    }

    fn due_rechecks(&mut self, all: bool) {
        if self.rechecks.is_empty() {
            return;
        }
        if all {
            let last = self.rechecks.iter().map(|r| r.0).fold(0.0, f64::max);
            let wait = last - self.now();
            if wait > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
        }
        let now = self.now();
        let (due, rest): (Vec<_>, Vec<_>) = self.rechecks.drain(..).partition(|r| r.0 <= now);
        self.rechecks = rest;
        let names: BTreeSet<String> = due.into_iter().map(|r| r.1).collect();
        for n in names {
            self.c.rechecks += 1;
            self.stat_check(&n);
        }
    }

    // ------------------------------------------------------------ epochs, rounds

    /// A fresh work directory with 8 files; names never seen by the guest.
    fn new_epoch(&mut self) -> Result<(), String> {
        self.epoch += 1;
        self.c.epochs += 1;
        self.m = Model::default();
        self.kept.clear();
        self.rechecks.clear();
        self.diverged = false;
        let d = self.work_rel().into_bytes();
        self.agent.mkdir(&d)?;
        let mut steps = Vec::new();
        for k in 0..8 {
            let n = self.rng.range(0, 8192);
            let data = self.rng.bytes(n);
            steps.push(Step {
                host: true,
                op: Op::Create {
                    name: file_name(k),
                    data,
                },
                tag: "setup",
            });
        }
        let reqs: Vec<Request> = steps.iter().map(|s| self.host_request(&s.op)).collect();
        for r in self.agent.call_many(&reqs)? {
            r.map_err(|e| format!("setup: ERR {e}"))?;
        }
        let now = self.now();
        for s in &steps {
            self.apply(s, now);
        }
        self.note(format!(
            "epoch {}: {} with f00..f07",
            self.epoch,
            self.work_rel()
        ));
        Ok(())
    }

    fn round(&mut self) -> Result<(), String> {
        self.c.rounds += 1;
        self.due_rechecks(false);
        let target = self.o.ops;
        let burst_due = self.o.burst > 0 && !self.burst_done && self.c.ops >= target / 3;
        let pause_due = self.o.pause && !self.pause_done && self.c.ops >= target * 2 / 3;
        let r = self.rng.below(1000);
        let mut touched: Vec<String> = Vec::new();
        if burst_due || (self.o.burst > 0 && r < 1) {
            self.burst_done = true;
            self.run_burst(self.o.burst)?;
        } else if pause_due || (self.o.pause && r < 2) {
            // Writes to files the guest caches while the VM is stopped.
            self.pause_done = true;
            self.c.pauses += 1;
            let files = self.m.files_present();
            let mut steps = Vec::new();
            let mut inos = BTreeSet::new();
            for n in files.iter().take(4) {
                let i = self.m.file(n).unwrap();
                if !inos.insert(i) {
                    continue;
                }
                let len = self.m.inodes[i].data.len();
                let op = if len > 0 && self.rng.chance(500) {
                    Op::Restore {
                        name: n.clone(),
                        data: self.rng.bytes(len),
                    }
                } else {
                    Op::Append {
                        name: n.clone(),
                        data: self.gen_data(512),
                    }
                };
                touched.push(n.clone());
                steps.push(Step {
                    host: true,
                    op,
                    tag: "pause",
                });
            }
            let before: u64 = self.c.violations.values().sum::<u64>()
                + self.c.repeats
                + self.c.known.values().sum::<u64>();
            let t0 = Instant::now();
            self.run_host(&steps, true)?;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if !self.diverged {
                self.verify()?;
            }
            let after: u64 = self.c.violations.values().sum::<u64>()
                + self.c.repeats
                + self.c.known.values().sum::<u64>();
            println!(
                "model: pause {}: VM stopped {} ms while the host changed {} cached files ({}), {ms:.0} ms by the guest clock (which stood still while stopped); checks after cont: {}",
                self.c.pauses,
                self.o.pause_ms,
                steps.len(),
                steps.iter().map(|s| s.op.describe()).collect::<Vec<_>>().join("; "),
                if after == before { "all fresh".to_string() } else { format!("{} stale answers", after - before) }
            );
        } else if r < 550 {
            let want = self.rng.range(1, 8);
            let mut busy = BTreeSet::new();
            let mut busy_ino = BTreeSet::new();
            let mut steps = Vec::new();
            for _ in 0..want {
                let Some(op) = self.gen_host(&busy, &busy_ino, false) else {
                    continue;
                };
                for n in op.names() {
                    busy.insert(n.to_string());
                    if let Some(i) = self.m.file(n) {
                        busy_ino.insert(i);
                    }
                    touched.push(n.to_string());
                }
                steps.push(Step {
                    host: true,
                    op,
                    tag: "",
                });
            }
            self.run_host(&steps, false)?;
        }
        if !self.diverged && self.rng.chance(650) {
            if let Some(op) = self.gen_guest(&touched) {
                self.run_guest(op);
            }
        }
        self.verify()?;
        if self.diverged {
            self.note("the model differs from the host: new epoch".into());
            self.new_epoch()?;
        }
        Ok(())
    }
}

fn detect_notify() -> bool {
    let Ok(fss) = std::fs::read_dir("/sys/fs/virtiofs") else {
        return false;
    };
    for fs in fss.flatten() {
        let Ok(qs) = std::fs::read_dir(fs.path().join("mqs")) else {
            continue;
        };
        for q in qs.flatten() {
            if std::fs::read_to_string(q.path().join("name"))
                .is_ok_and(|n| n.trim() == "notification")
            {
                return true;
            }
        }
    }
    false
}

fn connect(o: &Opts) -> Result<Agent, String> {
    let mut a = match &o.agent_path {
        Some(p) => Agent::connect_path(p)?,
        None => Agent::connect_port()?,
    };
    a.sync_patient(Duration::from_secs(2), Duration::from_secs(30))?;
    Ok(a)
}

/// The `p`th percentile of `v` (nearest rank; 0 for none).
pub(crate) fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The `model` subcommand. Exit status: 0 pass, 1 a violation, 3 the run
/// could not complete.
pub fn main(o: Opts) -> i32 {
    unsafe { libc::umask(0o022) };
    let root_dir = std::fs::canonicalize(&o.dir).unwrap_or_else(|_| o.dir.clone());
    if !Path::new(&root_dir).is_dir() {
        eprintln!("model: {} is not a directory", root_dir.display());
        return 2;
    }
    let notify = o.notify.unwrap_or_else(detect_notify);
    let window = o
        .window_ms
        .unwrap_or(if notify { 50 } else { o.lease_ms + 250 }) as f64
        / 1000.0;
    let agent = match connect(&o) {
        Ok(a) => a,
        Err(e) => {
            println!("model: ERROR: no agent: {e}");
            println!("MODEL result=error");
            return 3;
        }
    };
    let root = root_dir.join(&o.name);
    let _ = sys::remove_tree(&root);
    println!(
        "model: dir={} seed={} ops={} stack={} window={:.0} ms pause={} burst={} known-limit={}",
        root.display(),
        o.seed,
        o.ops,
        if notify { "notify" } else { "stock" },
        window * 1000.0,
        if o.pause {
            format!("{} ms", o.pause_ms)
        } else {
            "off".into()
        },
        o.burst,
        if o.known.is_empty() {
            "-".into()
        } else {
            o.known.join(",")
        }
    );
    let mut r = Run {
        rng: Rng(o.seed ^ 0x005E_ED0F_C0DE),
        notify,
        window,
        agent,
        start: Instant::now(),
        root,
        rel: o.name.clone(),
        epoch: 0,
        m: Model::default(),
        kept: Vec::new(),
        hist: VecDeque::new(),
        op_no: 0,
        c: Counts::default(),
        seen: BTreeSet::new(),
        rechecks: Vec::new(),
        shown: BTreeMap::new(),
        diverged: false,
        burst_done: false,
        pause_done: false,
        o,
    };
    let mut error = None;
    let rel = r.rel.clone().into_bytes();
    if let Err(e) = r.agent.mkdir(&rel).and_then(|_| r.new_epoch()) {
        error = Some(format!("setup: {e}"));
    }
    let mut last = Instant::now();
    while error.is_none() && r.c.ops < r.o.ops {
        if let Err(e) = r.round() {
            error = Some(format!("round {}: {e}", r.c.rounds));
            break;
        }
        if last.elapsed() >= Duration::from_secs(30) {
            last = Instant::now();
            println!(
                "model: {} ops, {} rounds, {:.0} s, {} violations",
                r.c.ops,
                r.c.rounds,
                r.now(),
                r.c.violations.values().sum::<u64>()
            );
        }
    }
    if error.is_none() {
        r.due_rechecks(true);
    }
    r.kept.clear();
    let secs = r.now();
    let c = &r.c;
    let total: u64 = c.violations.values().sum();
    let known: u64 = c.known.values().sum();
    println!(
        "model: per op kind: {}",
        c.per_kind
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "model: host batches: {} (p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms)",
        c.host_round_ms.len(),
        pct(&c.host_round_ms, 50.0),
        pct(&c.host_round_ms, 99.0),
        pct(&c.host_round_ms, 100.0)
    );
    let classes: Vec<String> = Class::ALL
        .iter()
        .map(|k| format!("{}={}", k.name(), c.violations.get(k).copied().unwrap_or(0)))
        .collect();
    let result = if error.is_some() {
        "error"
    } else if total > 0 {
        "fail"
    } else {
        "pass"
    };
    println!(
        "MODEL stack={} seed={} ops={} host_ops={} guest_ops={} burst_changes={} bursts={} pauses={} rounds={} epochs={} seconds={secs:.1} data_checks={} fd_checks={} stat_checks={} readdir_checks={} host_checks={} lagged={} rechecks={} settle_waits={} violations={total} {} repeats={} known_limit={known}{} result={result}",
        if r.notify { "notify" } else { "stock" },
        r.o.seed,
        c.ops,
        c.host_ops,
        c.guest_ops,
        c.burst_changes,
        c.bursts,
        c.pauses,
        c.rounds,
        c.epochs,
        c.data_checks,
        c.fd_checks,
        c.stat_checks,
        c.readdir_checks,
        c.host_checks,
        c.lagged,
        c.rechecks,
        c.settle_waits,
        classes.join(" "),
        c.repeats,
        c.known.iter().map(|(k, v)| format!(" known_{k}={v}")).collect::<String>(),
    );
    if !r.o.keep {
        let _ = sys::remove_tree(&r.root);
    }
    let _ = r.agent.bye();
    match error {
        Some(e) => {
            println!("model: ERROR {e}");
            println!("model: replay: {}", r.replay_hint());
            3
        }
        None if total > 0 => {
            println!(
                "model: FAIL ({total} violations; replay: {})",
                r.replay_hint()
            );
            1
        }
        None => {
            println!("model: PASS");
            0
        }
    }
}
