//! `guest-tests inotify`: host changes as inotify events in the guest, on the notify stack
//! with the fsnotify patch (qemu/patches/linux-6.12/0002; docs/coherency.md, "Host changes
//! as guest inotify events").
//!
//! The guest makes DIR/NAME and a file `watched` in it, and watches both with inotify. Each
//! round the host agent then creates and writes a file, writes and chmods `watched`, renames
//! and deletes the new file, makes and removes a directory and chmods DIR/NAME itself, one
//! change at a time. After each change the guest reads events until those a local change
//! would have raised have all come, and checks them in order: watch, mask, name, and one
//! cookie shared by a rename's IN_MOVED_FROM and IN_MOVED_TO. A missing, doubled, reordered
//! or extra event fails the run. Latency: from sending the request to the agent to the last
//! event of the change (so it includes the agent's round trip over virtio-serial).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::Agent;
use crate::proto::Request;

pub struct Opts {
    pub dir: PathBuf,
    pub name: String,
    pub rounds: u64,
    /// How long to wait for the events of one change.
    pub wait_ms: u64,
    pub agent_path: Option<PathBuf>,
    pub verbose: bool,
}

impl Opts {
    pub fn new() -> Self {
        Opts {
            dir: PathBuf::from("/mnt"),
            name: "inotify".into(),
            rounds: 20,
            wait_ms: 2000,
            agent_path: None,
            verbose: false,
        }
    }
}

/// What the directory watch asks for, and the file watch.
const DIR_MASK: u32 = libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_CLOSE_WRITE
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO;
const FILE_MASK: u32 = libc::IN_MODIFY | libc::IN_ATTRIB | libc::IN_CLOSE_WRITE;

/// Which watch an event is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    Dir,
    File,
}

/// One inotify event as read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Event {
    watch: Watch,
    mask: u32,
    cookie: u32,
    name: String,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let watch = match self.watch {
            Watch::Dir => "dir",
            Watch::File => "file",
        };
        write!(f, "{watch} {}", mask_name(self.mask))?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        if self.cookie != 0 {
            write!(f, " cookie {}", self.cookie)?;
        }
        Ok(())
    }
}

fn mask_name(mask: u32) -> String {
    let names = [
        (libc::IN_MODIFY, "MODIFY"),
        (libc::IN_ATTRIB, "ATTRIB"),
        (libc::IN_CLOSE_WRITE, "CLOSE_WRITE"),
        (libc::IN_MOVED_FROM, "MOVED_FROM"),
        (libc::IN_MOVED_TO, "MOVED_TO"),
        (libc::IN_CREATE, "CREATE"),
        (libc::IN_DELETE, "DELETE"),
        (libc::IN_DELETE_SELF, "DELETE_SELF"),
        (libc::IN_MOVE_SELF, "MOVE_SELF"),
        (libc::IN_IGNORED, "IGNORED"),
        (libc::IN_Q_OVERFLOW, "Q_OVERFLOW"),
        (libc::IN_ISDIR, "ISDIR"),
    ];
    let mut parts: Vec<String> = names
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let rest = names.iter().fold(mask, |m, (bit, _)| m & !bit);
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    parts.join("|")
}

/// An inotify instance with a directory and a file watch.
struct Watcher {
    fd: i32,
    dir_wd: i32,
    file_wd: i32,
}

impl Watcher {
    fn new(dir: &Path, file: &Path) -> Result<Self, String> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(format!(
                "inotify_init1: {}",
                std::io::Error::last_os_error()
            ));
        }
        let add = |p: &Path, mask: u32| -> Result<i32, String> {
            let c = CString::new(p.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: valid descriptor and C string.
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
            if wd < 0 {
                return Err(format!(
                    "inotify_add_watch {}: {}",
                    p.display(),
                    std::io::Error::last_os_error()
                ));
            }
            Ok(wd)
        };
        Ok(Watcher {
            fd,
            dir_wd: add(dir, DIR_MASK)?,
            file_wd: add(file, FILE_MASK)?,
        })
    }

    /// Events readable within `wait` (all of them once the first has come, without waiting
    /// further), or none.
    fn read(&self, wait: Duration) -> Result<Vec<Event>, String> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    return Ok(out);
                }
                return Err(format!("read inotify: {e}"));
            }
            let n = n as usize;
            let mut off = 0;
            while off + 16 <= n {
                let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
                let wd = word(off) as i32;
                let (mask, cookie, len) = (word(off + 4), word(off + 8), word(off + 12) as usize);
                let name = &buf[off + 16..(off + 16 + len).min(n)];
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                out.push(Event {
                    watch: if wd == self.dir_wd {
                        Watch::Dir
                    } else if wd == self.file_wd {
                        Watch::File
                    } else {
                        return Err(format!("event for unknown watch {wd}"));
                    },
                    mask,
                    cookie,
                    name: String::from_utf8_lossy(name).into_owned(),
                });
                off += 16 + len;
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // SAFETY: our descriptor.
        unsafe { libc::close(self.fd) };
    }
}

/// One host change and the events the guest must see for it, in order.
struct Step {
    what: String,
    request: Request,
    expect: Vec<(Watch, u32, String)>,
}

fn steps(name: &str, round: u64) -> Vec<Step> {
    let p = |leaf: &str| format!("{name}/{leaf}").into_bytes();
    let new = format!("new-{round}");
    let moved = format!("moved-{round}");
    let sub = format!("sub-{round}");
    let w = "watched".to_string();
    let dir = |mask: u32, n: &str| (Watch::Dir, mask, n.to_string());
    let file = |mask: u32| (Watch::File, mask, String::new());
    let mode = if round.is_multiple_of(2) {
        0o600
    } else {
        0o644
    };
    let dir_mode = if round.is_multiple_of(2) {
        0o750
    } else {
        0o755
    };
    vec![
        Step {
            what: format!("create and write {new}"),
            request: Request::Append(p(&new), b"x".to_vec()),
            expect: vec![
                dir(libc::IN_CREATE, &new),
                dir(libc::IN_MODIFY, &new),
                dir(libc::IN_CLOSE_WRITE, &new),
            ],
        },
        Step {
            what: "write watched".into(),
            request: Request::Write(p(&w), 0, format!("round {round}").into_bytes()),
            expect: vec![
                dir(libc::IN_MODIFY, &w),
                file(libc::IN_MODIFY),
                dir(libc::IN_CLOSE_WRITE, &w),
                file(libc::IN_CLOSE_WRITE),
            ],
        },
        Step {
            what: format!("chmod watched {mode:o}"),
            request: Request::Chmod(p(&w), mode),
            expect: vec![dir(libc::IN_ATTRIB, &w), file(libc::IN_ATTRIB)],
        },
        Step {
            what: format!("rename {new} {moved}"),
            request: Request::Rename(p(&new), p(&moved)),
            expect: vec![
                dir(libc::IN_MOVED_FROM, &new),
                dir(libc::IN_MOVED_TO, &moved),
            ],
        },
        Step {
            what: format!("unlink {moved}"),
            request: Request::Unlink(p(&moved)),
            expect: vec![dir(libc::IN_DELETE, &moved)],
        },
        Step {
            what: format!("mkdir {sub}"),
            request: Request::Mkdir(p(&sub)),
            expect: vec![dir(libc::IN_CREATE | libc::IN_ISDIR, &sub)],
        },
        Step {
            what: format!("rmdir {sub}"),
            request: Request::Unlink(p(&sub)),
            expect: vec![dir(libc::IN_DELETE | libc::IN_ISDIR, &sub)],
        },
        Step {
            what: format!("chmod the directory {dir_mode:o}"),
            request: Request::Chmod(name.as_bytes().to_vec(), dir_mode),
            expect: vec![dir(libc::IN_ATTRIB | libc::IN_ISDIR, "")],
        },
    ]
}

/// Compare what came with what a local change raises; the cookie rule for renames.
fn check(expect: &[(Watch, u32, String)], got: &[Event]) -> Result<(), String> {
    let same = expect.len() == got.len()
        && expect
            .iter()
            .zip(got)
            .all(|((w, m, n), e)| *w == e.watch && *m == e.mask && *n == e.name);
    if !same {
        let want: Vec<String> = expect
            .iter()
            .map(|(w, m, n)| {
                Event {
                    watch: *w,
                    mask: *m,
                    cookie: 0,
                    name: n.clone(),
                }
                .to_string()
            })
            .collect();
        let got: Vec<String> = got.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "expected [{}], got [{}]",
            want.join(", "),
            got.join(", ")
        ));
    }
    let cookies: Vec<u32> = got
        .iter()
        .filter(|e| e.mask & (libc::IN_MOVED_FROM | libc::IN_MOVED_TO) != 0)
        .map(|e| e.cookie)
        .collect();
    if !cookies.is_empty() && (cookies[0] == 0 || cookies.iter().any(|&c| c != cookies[0])) {
        return Err(format!("rename cookies differ or are 0: {cookies:?}"));
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub fn main(o: Opts) -> i32 {
    match run(&o) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            println!("INOTIFY error: {e}");
            3
        }
    }
}

fn run(o: &Opts) -> Result<bool, String> {
    let base = o.dir.join(&o.name);
    if base.exists() {
        std::fs::remove_dir_all(&base).map_err(|e| format!("clean {}: {e}", base.display()))?;
    }
    std::fs::create_dir(&base).map_err(|e| format!("mkdir {}: {e}", base.display()))?;
    let watched = base.join("watched");
    std::fs::write(&watched, b"start").map_err(|e| format!("write {}: {e}", watched.display()))?;
    let mut agent = match &o.agent_path {
        Some(p) => Agent::connect_path(p)?,
        None => Agent::connect_port()?,
    };
    agent.sync()?;
    let watcher = Watcher::new(&base, &watched)?;
    let wait = Duration::from_millis(o.wait_ms);
    let early = watcher.read(Duration::from_millis(200))?;
    if !early.is_empty() {
        let early: Vec<String> = early.iter().map(|e| e.to_string()).collect();
        return Err(format!(
            "events before any host change: {}",
            early.join(", ")
        ));
    }

    let (mut changes, mut events, mut expected) = (0u64, 0u64, 0u64);
    let mut failures = 0u64;
    let mut latencies = Vec::new();
    for round in 0..o.rounds {
        for step in steps(&o.name, round) {
            let start = Instant::now();
            match agent.call(&step.request)? {
                Ok(_) => {}
                Err(e) => return Err(format!("agent: {}: ERR {e}", step.what)),
            }
            changes += 1;
            expected += step.expect.len() as u64;
            // Read until as many events as expected came (or more), or the wait ran out.
            let deadline = start + wait;
            let mut got = Vec::new();
            let mut last = start;
            while got.len() < step.expect.len() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let more = watcher.read(left)?;
                if !more.is_empty() {
                    last = Instant::now();
                }
                got.extend(more);
            }
            events += got.len() as u64;
            let verdict = check(&step.expect, &got);
            if o.verbose || verdict.is_err() {
                let list: Vec<String> = got.iter().map(|e| e.to_string()).collect();
                println!(
                    "INOTIFY round={round} change={:?} {} events={} [{}]",
                    step.what,
                    if verdict.is_ok() { "ok" } else { "FAIL" },
                    got.len(),
                    list.join(", ")
                );
            }
            if let Err(e) = verdict {
                println!("INOTIFY round={round} change={:?}: {e}", step.what);
                failures += 1;
            } else {
                latencies.push((last - start).as_secs_f64() * 1000.0);
            }
        }
    }
    // Nothing may trail the last change.
    let late = watcher.read(Duration::from_millis(500))?;
    events += late.len() as u64;
    if !late.is_empty() {
        let list: Vec<String> = late.iter().map(|e| e.to_string()).collect();
        println!(
            "INOTIFY extra events after the last change: {}",
            list.join(", ")
        );
        failures += 1;
    }
    drop(watcher);
    let _ = std::fs::remove_dir_all(&base);
    let _ = agent.bye();

    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "INOTIFY changes={changes} events={events} expected={expected} failed_changes={failures} latency_ms_p50={:.1} latency_ms_p99={:.1} latency_ms_max={:.1}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    Ok(failures == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(watch: Watch, mask: u32, cookie: u32, name: &str) -> Event {
        Event {
            watch,
            mask,
            cookie,
            name: name.into(),
        }
    }

    #[test]
    fn a_rename_needs_one_nonzero_cookie() {
        let expect = vec![
            (Watch::Dir, libc::IN_MOVED_FROM, "a".to_string()),
            (Watch::Dir, libc::IN_MOVED_TO, "b".to_string()),
        ];
        let pair = |c1, c2| {
            vec![
                ev(Watch::Dir, libc::IN_MOVED_FROM, c1, "a"),
                ev(Watch::Dir, libc::IN_MOVED_TO, c2, "b"),
            ]
        };
        assert!(check(&expect, &pair(7, 7)).is_ok());
        assert!(check(&expect, &pair(7, 8)).is_err());
        assert!(check(&expect, &pair(0, 0)).is_err());
    }

    #[test]
    fn missing_doubled_and_reordered_events_fail() {
        let expect = vec![
            (Watch::Dir, libc::IN_MODIFY, "w".to_string()),
            (Watch::File, libc::IN_MODIFY, String::new()),
        ];
        let dir = ev(Watch::Dir, libc::IN_MODIFY, 0, "w");
        let file = ev(Watch::File, libc::IN_MODIFY, 0, "");
        assert!(check(&expect, &[dir.clone(), file.clone()]).is_ok());
        assert!(check(&expect, std::slice::from_ref(&dir)).is_err());
        assert!(check(&expect, &[dir.clone(), file.clone(), file.clone()]).is_err());
        assert!(check(&expect, &[file, dir]).is_err());
    }

    #[test]
    fn every_round_changes_each_kind_once() {
        let s = steps("d", 3);
        assert_eq!(s.len(), 8);
        assert_eq!(s.iter().map(|s| s.expect.len()).sum::<usize>(), 15);
        assert_eq!(mask_name(libc::IN_CREATE | libc::IN_ISDIR), "CREATE|ISDIR");
    }
}
