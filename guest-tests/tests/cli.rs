//! Host-side tests of the binary: the agent protocol over its unix socket,
//! fixture cleanup, and the `run` suite on the host's own filesystem (with
//! and without a local agent).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_guest-tests");

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gt-it-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running host agent, killed on drop.
struct AgentProc {
    child: Option<Child>,
    sock: PathBuf,
}

impl AgentProc {
    fn start(share: &Path, sock: &Path) -> AgentProc {
        let child = Command::new(BIN)
            .args(["host-agent", "--share"])
            .arg(share)
            .arg("--listen")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn host-agent");
        // Fixtures come first, then the socket (a stale socket may be there
        // before: callers that care connect to it, which only works once
        // the agent listens).
        let start = Instant::now();
        while !sock.exists() || !share.join(".fixtures/rel-link").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "agent socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        AgentProc {
            child: Some(child),
            sock: sock.to_path_buf(),
        }
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!("agent did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn new(sock: &Path) -> Conn {
        let s = UnixStream::connect(sock).expect("connect agent");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
    fn call(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        self.r.read_line(&mut reply).expect("agent reply");
        assert!(reply.ends_with('\n'), "reply {reply:?} to {line:?}");
        reply.trim_end().to_string()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn run(args: &[&str]) -> (Output, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run guest-tests");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

#[test]
fn agent_protocol_over_socket() {
    let share = TempDir::new("share");
    let sock = TempDir::new("sock");
    let sock = sock.0.join("agent.sock");
    let mut agent = AgentProc::start(&share.0, &sock);
    let fixtures = share.0.join(".fixtures");
    let abs = std::fs::read_link(fixtures.join("abs-link")).unwrap();
    let secret_dir = abs.parent().unwrap().to_path_buf();
    assert!(abs.is_absolute() && !abs.starts_with(&share.0));
    let mut c = Conn::new(&sock);

    assert_eq!(c.call("HELLO"), "OK leasefs-agent 1");
    let secret = c.call("SECRET");
    let secret = unhex(secret.strip_prefix("OK ").unwrap());
    assert!(secret.starts_with(b"LEASEFS-HOST-SECRET-"));
    assert_eq!(std::fs::read(&abs).unwrap(), secret);

    // Symlinks are described, never followed.
    let st = c.call(&format!("STAT {}", hex(b".fixtures/abs-link")));
    assert!(st.starts_with("OK 120777 "), "{st}");
    let h = c.call(&format!("HASH {}", hex(b".fixtures/abs-link")));
    assert_eq!(h, "ERR ELOOP");
    assert!(c
        .call(&format!("READ {} 0 100", hex(b".fixtures/abs-dir/secret")))
        .starts_with("ERR ENOTDIR"));
    // Path safety.
    assert!(c
        .call(&format!("STAT {}", hex(b"../x")))
        .starts_with("ERR EACCES"));
    assert!(c
        .call(&format!("STAT {}", hex(b"/etc/passwd")))
        .starts_with("ERR EACCES"));
    assert!(c.call("STAT zz").starts_with("ERR EINVAL"));
    assert!(c.call("FROB").starts_with("ERR EINVAL"));

    // Write, hash, read, stat, list, truncate, rename, unlink, mkdir.
    let name = "dir ✓/f\nnewline".as_bytes();
    assert_eq!(c.call(&format!("MKDIR {}", hex("dir ✓".as_bytes()))), "OK");
    assert_eq!(
        c.call(&format!("WRITE {} 3 {}", hex(name), hex(b"hello"))),
        "OK"
    );
    let content = b"\0\0\0hello";
    assert_eq!(
        c.call(&format!("HASH {}", hex(name))),
        format!("OK 8 {:016x}", fnv(content))
    );
    assert_eq!(
        c.call(&format!("READ {} 2 100", hex(name))),
        format!("OK {}", hex(&content[2..]))
    );
    let st = c.call(&format!("STAT {}", hex(name)));
    let f: Vec<&str> = st.split(' ').collect();
    assert_eq!((f[0], f[1]), ("OK", "100644"), "{st}");
    assert_eq!(f[4], "8", "size field of {st}");
    assert_eq!(f[7], "1", "nlink field of {st}");
    assert_eq!(c.call(&format!("LIST {}", hex("dir ✓".as_bytes()))), "OK 1");
    assert_eq!(c.call(&format!("TRUNCATE {} 1", hex(name))), "OK");
    assert!(c.call(&format!("HASH {}", hex(name))).starts_with("OK 1 "));
    assert_eq!(c.call(&format!("RENAME {} {}", hex(name), hex(b"g"))), "OK");
    assert_eq!(c.call(&format!("STAT {}", hex(name))), "ERR ENOENT");
    assert_eq!(
        c.call(&format!("XATTR {} {}", hex(b"g"), hex(b"user.nope"))),
        "ERR ENODATA"
    );
    assert_eq!(c.call(&format!("UNLINK {}", hex(b"g"))), "OK");
    assert_eq!(c.call(&format!("UNLINK {}", hex("dir ✓".as_bytes()))), "OK");
    // Root listing: only .fixtures left.
    assert_eq!(c.call("LIST "), "OK 1");

    assert_eq!(c.call("BYE"), "OK");
    let st = agent.wait(Duration::from_secs(20));
    assert!(st.success(), "agent exit {st:?}");
    assert!(!fixtures.exists(), "fixtures left behind");
    assert!(!secret_dir.exists(), "secret dir left behind");
    assert!(!agent.sock.exists(), "socket left behind");
}

#[test]
fn agent_cleans_up_on_sigterm() {
    let share = TempDir::new("share");
    let sock = TempDir::new("sock");
    let sock = sock.0.join("agent.sock");
    // A stale socket file is replaced.
    let _stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(_stale);
    assert!(sock.exists());
    let mut agent = AgentProc::start(&share.0, &sock);
    let abs = std::fs::read_link(share.0.join(".fixtures/abs-link")).unwrap();
    assert!(abs.exists());
    // Connect (refused by the stale socket until the agent has rebound it),
    // then signal the agent while it serves the connection.
    let start = Instant::now();
    let _conn = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < Duration::from_secs(20), "connect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let pid = agent.child.as_ref().unwrap().id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = agent.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(143), "{st:?}");
    assert!(!share.0.join(".fixtures").exists());
    assert!(!abs.parent().unwrap().exists());
}

#[test]
fn agent_refuses_non_socket_path() {
    let share = TempDir::new("share");
    let f = share.0.join("not-a-socket");
    std::fs::write(&f, b"keep me").unwrap();
    let (out, text) = run(&[
        "host-agent",
        "--share",
        share.0.to_str().unwrap(),
        "--listen",
        f.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(std::fs::read(&f).unwrap(), b"keep me");
    assert!(!share.0.join(".fixtures").exists());
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| l.contains(" passed, "))
        .unwrap_or("")
}

/// The whole suite on the host's own filesystem, agent tests skipped.
#[test]
fn run_suite_on_host_fs() {
    let dir = TempDir::new("run");
    let (out, text) = run(&["run", "--dir", dir.0.to_str().unwrap(), "--no-agent"]);
    assert!(out.status.success(), "suite failed on the host:\n{text}");
    let last = last_line(&text);
    assert!(last.ends_with(" passed, 0 failed"), "{last:?}\n{text}");
    assert!(text.contains("\nok dir_10000\n") && text.contains("\nok offset_5gib\n"));
    assert!(text.contains("\nskip host_sees_write: "), "{text}");
    // Every test cleaned up after itself.
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Agent tests against a local agent. On the host the "guest" shares the
/// host's namespace, so the escape tests must FAIL here: proof that they
/// detect a leak of the host secret.
#[test]
fn run_with_local_agent() {
    let share = TempDir::new("share");
    let sock = TempDir::new("sock");
    let sock = sock.0.join("agent.sock");
    let mut agent = AgentProc::start(&share.0, &sock);
    let (out, text) = run(&[
        "run",
        "--dir",
        share.0.to_str().unwrap(),
        "--agent-path",
        sock.to_str().unwrap(),
        "--only",
        "host_*,coherence_*,escape_*",
    ]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for line in text.lines() {
        if line.starts_with("FAIL ") {
            assert!(
                (line.starts_with("FAIL escape_abs_symlink:")
                    || line.starts_with("FAIL escape_rel_symlink:"))
                    && line.contains("HOST secret"),
                "unexpected failure: {line}\n{text}"
            );
        }
    }
    assert!(text.contains("\nok host_sees_write\n"), "{text}");
    assert!(text.contains("\nok coherence_host_write\n"), "{text}");
    assert!(text.contains("\nok escape_dotdot\n"), "{text}");
    let last = last_line(&text);
    assert!(last.ends_with(" passed, 2 failed"), "{last:?}\n{text}");
    // The run said BYE: the agent is gone and cleaned up.
    let st = agent.wait(Duration::from_secs(20));
    assert!(st.success());
    assert!(!share.0.join(".fixtures").exists());
}

#[test]
fn stress_with_local_agent() {
    // On the host's own filesystem nothing is ever stale: every kind must
    // pass, with machine-readable lines for the runner.
    let share = TempDir::new("share");
    let sock = TempDir::new("sock");
    let sock = sock.0.join("agent.sock");
    let mut agent = AgentProc::start(&share.0, &sock);
    let (out, text) = run(&[
        "stress",
        "--dir",
        share.0.to_str().unwrap(),
        "--agent-path",
        sock.to_str().unwrap(),
        "--rounds",
        "24",
        "--seed",
        "7",
        "--storm",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let kinds: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("STRESS kind=") && !l.starts_with("STRESS kind=total"))
        .collect();
    assert_eq!(kinds.len(), 12, "{text}");
    for l in &kinds {
        assert!(
            l.contains(" rounds=2 ") && l.contains(" stale_0ms=0 "),
            "{l}"
        );
    }
    let total = text
        .lines()
        .find(|l| l.starts_with("STRESS kind=total "))
        .unwrap_or_else(|| panic!("no total line\n{text}"));
    for want in [
        " rounds=24 ",
        " seed=7 ",
        " stale_data=0 ",
        " ns_stale_50ms=0 ",
        " result=pass",
    ] {
        assert!(total.contains(want), "{want:?} missing in {total}");
    }
    assert!(text.contains("\nstress: PASS\n"), "{text}");
    // The work tree is removed, and BYE ended the agent.
    assert!(!share.0.join("stress").exists());
    assert!(agent.wait(Duration::from_secs(20)).success());
    // Usage errors.
    let (out, text) = run(&["stress", "--kinds", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let (out, text) = run(&["stress", "--max-wait-ms", "10"]);
    assert_eq!(out.status.code(), Some(2), "{text}");
}

#[test]
fn model_with_local_agent() {
    // On the host's own filesystem every answer is the host's state: the
    // model must find no violation (no false alarms), the same seed must give
    // the same operations, and the agent's PAUSE must refuse without QMP.
    let share = TempDir::new("share");
    let sock = TempDir::new("sock");
    let sock = sock.0.join("agent.sock");
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let mut agent = AgentProc::start(&share.0, &sock);
        let (out, text) = run(&[
            "model",
            "--dir",
            share.0.to_str().unwrap(),
            "--agent-path",
            sock.to_str().unwrap(),
            "--ops",
            "600",
            "--seed",
            "11",
            "--stack",
            "stock",
            "--window-ms",
            "20",
            "--burst",
            "200",
            "--no-pause",
        ]);
        assert_eq!(out.status.code(), Some(0), "{text}");
        let total = text
            .lines()
            .find(|l| l.starts_with("MODEL "))
            .unwrap_or_else(|| panic!("no MODEL line\n{text}"));
        for want in [" seed=11 ", " violations=0 ", " bursts=", " result=pass"] {
            assert!(total.contains(want), "{want:?} missing in {total}");
        }
        assert!(text.contains("\nmodel: PASS\n"), "{text}");
        kinds.push(
            text.lines()
                .find(|l| l.starts_with("model: per op kind:"))
                .unwrap_or_default()
                .to_string(),
        );
        assert!(!share.0.join("model").exists());
        assert!(agent.wait(Duration::from_secs(20)).success());
    }
    assert_eq!(kinds[0], kinds[1]);
    let mut agent = AgentProc::start(&share.0, &sock);
    let mut c = Conn::new(&sock);
    let pause = format!("PAUSE 10 {}", hex(b"HELLO"));
    assert!(c.call(&pause).starts_with("ERR EOPNOTSUPP"));
    let par = format!("PAR {} {}", hex(b"HELLO"), hex(b"STAT 6e6f7065"));
    assert_eq!(
        c.call(&par),
        format!("OK {} {}", hex(b"OK leasefs-agent 1"), hex(b"ERR ENOENT"))
    );
    assert_eq!(c.call("BYE"), "OK");
    assert!(agent.wait(Duration::from_secs(20)).success());
    let (out, text) = run(&["model", "--known-limit", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{text}");
}

#[test]
fn missing_agent_fails_clearly() {
    let dir = TempDir::new("noagent");
    let (out, text) = run(&[
        "run",
        "--dir",
        dir.0.to_str().unwrap(),
        "--agent-path",
        dir.0.join("no-such.sock").to_str().unwrap(),
        "--only",
        "host_sees_write",
    ]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL host_sees_write: no host agent: connect"),
        "{text}"
    );
    assert!(text.ends_with("0 passed, 1 failed\n"), "{text}");
}

#[test]
fn cli_errors_and_list() {
    let (out, _) = run(&["run", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let (out, _) = run(&["frob"]);
    assert_eq!(out.status.code(), Some(2));
    let dir = TempDir::new("cli");
    let (out, text) = run(&["run", "--dir", dir.0.to_str().unwrap(), "--only", "nope*"]);
    assert_eq!(out.status.code(), Some(2), "{text}");
    let (out, text) = run(&["run", "--list"]);
    assert!(out.status.success());
    assert!(text.lines().any(|l| l == "lock_setlkw_wakeup"), "{text}");
    assert!(text.lines().count() > 50);
    let (out, _) = run(&[
        "host-agent",
        "--share",
        "/nonexistent-dir",
        "--listen",
        "/tmp/x.sock",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// The runner survives a hanging test (killed at the timeout, its unread
/// agent reply discarded) and a panicking one, and goes on with the rest.
#[test]
fn runner_survives_hang_and_panic() {
    let share = TempDir::new("share");
    let sock = TempDir::new("sock");
    let sock = sock.0.join("agent.sock");
    let mut agent = AgentProc::start(&share.0, &sock);
    let start = Instant::now();
    let out = Command::new(BIN)
        .args(["run", "--timeout", "2", "--dir"])
        .arg(&share.0)
        .arg("--agent-path")
        .arg(&sock)
        .args(["--only", "selftest_*,host_sees_write,data_append"])
        .env("GUEST_TESTS_SELFTEST", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(start.elapsed() < Duration::from_secs(60), "{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("\nFAIL selftest_hang: timed out after 2 s\n"),
        "{text}"
    );
    assert!(
        text.contains("\nFAIL selftest_panic: panicked: deliberate panic\n"),
        "{text}"
    );
    assert!(text.contains("\nok host_sees_write\n"), "{text}");
    assert!(text.contains("\nok data_append\n"), "{text}");
    assert!(text.ends_with("\n2 passed, 2 failed\n"), "{text}");
    assert!(
        !share.0.join("gt-selftest_hang").exists(),
        "hung test's dir not cleaned"
    );
    assert!(agent.wait(Duration::from_secs(20)).success());
}
