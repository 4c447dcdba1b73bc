//! `hostcost`: what the guest's caching costs host tools (qemu/host-cost.sh boots one VM per
//! daemon configuration and runs this in each). The host agent plays the host tools and
//! reports how long each of their system calls took; the guest plays the user of the tree.
//!
//! Workloads, on `--files` files of 4 KiB in DIR/hostcost (created by the host):
//!
//! | name | host | guest |
//! |---|---|---|
//! | idle | rewrite every file in place (open, write, close), one after another | read the tree once before, then idle |
//! | loop | the same | reads the whole tree in a loop meanwhile (an IDE indexer, a build watcher) |
//! | logger | append a line every 50 ms for 10 s, reopening the file each time (`echo >> log`) | polls the log every 10 ms (`tail -f`) |
//! | save | write a temporary file and rename it over each file (an editor's save) | reads the tree in a loop |
//!
//! For each: the host's wall time, the per-call hold p50/p99/max (how long each host write
//! took, most of which is waiting for the guest's lease on a stock stack), and stale reads:
//! reads the guest started after the host tool had returned that still gave an older
//! version. Each file's content names its version, so the guest checks every read it makes
//! after the agent's reply. Output: one `HOSTCOST ...` line per workload.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::Agent;
use crate::proto::Request;

pub struct Opts {
    pub dir: PathBuf,
    pub files: usize,
    pub label: String,
}

const FILE_SIZE: usize = 4096;
/// The longest a host tool may run: 200 files held a lease each on a slow stack.
const TOOL_TIMEOUT: Duration = Duration::from_secs(900);

/// The content of file `i` at `version`: a header naming both, padded to FILE_SIZE.
fn content(i: usize, version: u32) -> Vec<u8> {
    let mut v = format!("file {i} version {version}\n").into_bytes();
    v.resize(FILE_SIZE, b'.');
    v
}

/// The version a read of file `i` returned, if it is one of ours.
fn version_of(bytes: &[u8], i: usize) -> Option<u32> {
    let line = bytes.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix(&format!("file {i} version "))?;
    rest.parse().ok()
}

struct Run {
    name: &'static str,
    wall_ms: f64,
    holds_us: Vec<u64>,
    stale: u64,
    reads: u64,
}

impl Run {
    fn line(&self, label: &str) -> String {
        let ms: Vec<f64> = self.holds_us.iter().map(|&us| us as f64 / 1000.0).collect();
        let pct = |p: f64| crate::model::pct(&ms, p);
        let blocked: u64 = self.holds_us.iter().sum();
        format!(
            "HOSTCOST config={label} workload={} host_wall_ms={:.0} blocked_ms={:.0} hold_p50_ms={:.1} hold_p99_ms={:.1} hold_max_ms={:.1} calls={} guest_reads={} stale_reads={}",
            self.name,
            self.wall_ms,
            blocked as f64 / 1000.0,
            pct(50.0),
            pct(99.0),
            pct(100.0),
            ms.len(),
            self.reads,
            self.stale
        )
    }
}

/// The agent's `SEQ` reply: microseconds per call.
fn per_call_us(payload: &str) -> Result<Vec<u64>, String> {
    payload
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("host call failed ({s})")))
        .collect()
}

/// Runs host tool `reqs` (one after another, `gap_ms` apart) and returns its wall time and
/// per-call microseconds.
fn host_tool(
    agent: &mut Agent,
    gap_ms: u64,
    reqs: Vec<Request>,
) -> Result<(f64, Vec<u64>), String> {
    let start = Instant::now();
    let reply = agent.call_patient(&Request::Seq(gap_ms, reqs), TOOL_TIMEOUT)?;
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    let payload = reply.map_err(|e| format!("agent SEQ: ERR {e}"))?;
    Ok((wall, per_call_us(&payload)?))
}

/// Reads every file of the tree once; returns (reads, stale) where stale counts files whose
/// version is below `want[i]`.
fn read_tree(dir: &Path, files: usize, want: &[AtomicU64]) -> (u64, u64) {
    let (mut reads, mut stale) = (0, 0);
    for (i, w) in want.iter().enumerate().take(files) {
        // What the host had finished when this read started.
        let min = w.load(Ordering::SeqCst) as u32;
        let Ok(bytes) = std::fs::read(dir.join(format!("f{i:03}"))) else {
            continue; // Between a save's unlink and rename there is no file: not a stale read.
        };
        reads += 1;
        if version_of(&bytes, i).is_none_or(|v| v < min) {
            stale += 1;
        }
    }
    (reads, stale)
}

/// A guest reading the tree in a loop until `stop`; counts stale reads against `want` (what
/// the host tool has finished writing, set once the agent replied).
fn reader(
    dir: PathBuf,
    files: usize,
    want: Arc<Vec<AtomicU64>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (mut reads, mut stale) = (0, 0);
        while !stop.load(Ordering::SeqCst) {
            let (r, s) = read_tree(&dir, files, &want);
            reads += r;
            stale += s;
        }
        (reads, stale)
    })
}

fn rewrite_reqs(files: usize, version: u32, save: bool) -> Vec<Request> {
    (0..files)
        .map(|i| {
            let p = format!("hostcost/f{i:03}").into_bytes();
            if save {
                Request::Save(p, content(i, version))
            } else {
                Request::Write(p, 0, content(i, version))
            }
        })
        .collect()
}

/// One rewrite workload: the host tool rewrites the tree to `version`; the guest reads in a
/// loop during it if `looping`. Stale reads are those after the tool returned.
fn rewrite(
    agent: &mut Agent,
    o: &Opts,
    name: &'static str,
    version: u32,
    looping: bool,
    save: bool,
) -> Result<Run, String> {
    let dir = o.dir.join("hostcost");
    let want: Arc<Vec<AtomicU64>> = Arc::new((0..o.files).map(|_| AtomicU64::new(0)).collect());
    // The guest has the tree cached.
    read_tree(&dir, o.files, &want);
    std::thread::sleep(Duration::from_millis(200));
    let stop = Arc::new(AtomicBool::new(false));
    let looper = looping.then(|| reader(dir.clone(), o.files, want.clone(), stop.clone()));
    let (wall_ms, holds_us) = host_tool(agent, 0, rewrite_reqs(o.files, version, save))?;
    // From now on every read must see the new version.
    for w in want.iter() {
        w.store(version as u64, Ordering::SeqCst);
    }
    let (mut reads, mut stale) = (0, 0);
    if let Some(h) = looper {
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let (r, s) = h.join().map_err(|_| "reader panicked".to_string())?;
        reads += r;
        stale += s;
    }
    let (r, s) = read_tree(&dir, o.files, &want);
    Ok(Run {
        name,
        wall_ms,
        holds_us,
        stale: stale + s,
        reads: reads + r,
    })
}

/// The logger: the host appends a numbered line every 50 ms for 10 s, reopening the file;
/// the guest polls it every 10 ms. A poll after the tool returned must see every line.
fn logger(agent: &mut Agent, o: &Opts) -> Result<Run, String> {
    const LINES: usize = 200;
    let path = o.dir.join("hostcost/log");
    let line = |n: usize| format!("line {n:05}\n").into_bytes();
    let stop = Arc::new(AtomicBool::new(false));
    let polls = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut polls = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let _ = std::fs::read(&path);
                polls += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            polls
        })
    };
    let reqs = (0..LINES)
        .map(|n| Request::Append(b"hostcost/log".to_vec(), line(n)))
        .collect();
    let (wall_ms, holds_us) = host_tool(agent, 50, reqs)?;
    stop.store(true, Ordering::SeqCst);
    let reads = polls.join().map_err(|_| "poller panicked".to_string())?;
    let got = std::fs::read(&path).map_err(|e| format!("read log: {e}"))?;
    let stale = u64::from(got.len() != LINES * line(0).len());
    Ok(Run {
        name: "logger",
        wall_ms,
        holds_us,
        stale,
        reads: reads + 1,
    })
}

pub fn main(o: Opts) -> i32 {
    let mut agent = match Agent::connect_port() {
        Ok(mut a) => match a.sync_patient(Duration::from_secs(2), Duration::from_secs(30)) {
            Ok(()) => a,
            Err(e) => {
                println!("hostcost: ERROR: agent: {e}");
                return 3;
            }
        },
        Err(e) => {
            println!("hostcost: ERROR: no agent: {e}");
            return 3;
        }
    };
    let mut reqs = vec![Request::Mkdir(b"hostcost".to_vec())];
    reqs.extend(rewrite_reqs(o.files, 0, false));
    reqs.push(Request::Append(b"hostcost/log".to_vec(), Vec::new()));
    if let Err(e) = host_tool(&mut agent, 0, reqs) {
        println!("hostcost: ERROR: setup: {e}");
        return 3;
    }
    let mut failed = false;
    let workloads: [(&'static str, u32, bool, bool); 3] = [
        ("idle", 1, false, false),
        ("loop", 2, true, false),
        ("save", 3, true, true),
    ];
    let mut runs = Vec::new();
    for (name, version, looping, save) in workloads {
        match rewrite(&mut agent, &o, name, version, looping, save) {
            Ok(r) => runs.push(r),
            Err(e) => {
                println!("hostcost: ERROR: {name}: {e}");
                failed = true;
            }
        }
    }
    match logger(&mut agent, &o) {
        Ok(r) => runs.push(r),
        Err(e) => {
            println!("hostcost: ERROR: logger: {e}");
            failed = true;
        }
    }
    for r in &runs {
        println!("{}", r.line(&o.label));
    }
    if failed {
        3
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip() {
        let c = content(7, 3);
        assert_eq!(c.len(), FILE_SIZE);
        assert_eq!(version_of(&c, 7), Some(3));
        assert_eq!(version_of(&c, 8), None);
        assert_eq!(per_call_us("12 5 7").unwrap(), vec![12, 5, 7]);
        assert!(per_call_us("12 E").is_err());
    }
}
