//! leasefsd as a drop-in for virtiofsd 1.14: every flag of virtiofsd's `--help` (a checked-in
//! copy, `tests/fixtures/virtiofsd-1.14-help.txt`, so this runs without virtiofsd) is tried,
//! with every value the help names, first against the parser and then against the daemon
//! itself, which must start listening (its pid file appears) or, for the few flags it cannot
//! honour yet, refuse in one line naming the flag. Then the launchers' exact lines (libvirt
//! 9.0, virtme-ng 1.42) and the pid file's life.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leasefs::cli::{Options, Parsed};

const LEASEFSD: &str = env!("CARGO_BIN_EXE_leasefsd");
const HELP: &str = include_str!("fixtures/virtiofsd-1.14-help.txt");

/// Flags leasefsd parses but refuses at start, each with a one-line reason, because it cannot
/// do what virtiofsd does with them yet (or, for migration, ever). Kept exact: a flag that
/// starts working must be taken off this list.
const REFUSED: &[&str] = &[
    "--migration-mode",
    "--migration-on-error",
    "--migration-verify-handles",
    "--migration-confirm-paths",
];

/// One option line of the help text: its spellings and how it takes a value.
#[derive(Debug)]
struct HelpFlag {
    /// `--long` or `-s` (the long one when both exist).
    name: String,
    /// `None`: a switch. `Some(true)`: the value is optional (`[=<...>]`).
    value: Option<bool>,
    /// Values the help lists (`<a|b|c>` or "(a, b, c)" in the description).
    choices: Vec<String>,
}

fn help_flags() -> Vec<HelpFlag> {
    let lines: Vec<&str> = HELP.lines().collect();
    let mut flags = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if !(2..=6).contains(&indent) || !text.starts_with('-') {
            continue;
        }
        // "-h, --help" -> the last spelling.
        let spec = text.rsplit(", ").next().unwrap();
        let (name, rest) = match spec.find(['=', ' ', '[']) {
            Some(at) => spec.split_at(at),
            None => (spec, ""),
        };
        let value = if rest.is_empty() {
            None
        } else {
            Some(rest.starts_with('['))
        };
        let mut choices = Vec::new();
        if let (Some(a), Some(b)) = (rest.find('<'), rest.find('>')) {
            let inner = &rest[a + 1..b];
            if inner.contains('|') {
                choices.extend(inner.split('|').map(str::to_string));
            }
        }
        // "(none, kill, log, trap)" on the first description line.
        if let Some(desc) = lines.get(i + 1) {
            if let (Some(a), Some(b)) = (desc.find('('), desc.find(')')) {
                let inner = &desc[a + 1..b];
                if inner.contains(", ") && value.is_some() && choices.is_empty() {
                    choices.extend(inner.split(", ").map(str::to_string));
                }
            }
        }
        flags.push(HelpFlag {
            name: name.to_string(),
            value,
            choices,
        });
    }
    flags
}

/// A value for a flag whose help names no choices.
fn sample(flag: &str) -> &'static str {
    match flag {
        // Base-line flags: the tests below build their lines themselves.
        "--shared-dir" | "--socket" | "--socket-path" => "/tmp/s",
        "--fd" => "3",
        "--tag" => "myfs",
        "--thread-pool-size" => "4",
        "--xattrmap" => ":map::user.virtiofs.:",
        "--socket-group" => "root",
        "--modcaps" => "-mknod:+sys_admin",
        "--rlimit-nofile" => "4096",
        "-o" => "xattr,writeback",
        "--uid-map" | "--gid-map" => ":0:100000:65536:",
        "--translate-uid" | "--translate-gid" => "guest:0:1000:1",
        "--migration-mode" => "find-paths",
        "--migration-on-error" => "guest-error",
        other => panic!("no sample value for {other}: add one"),
    }
}

/// Every way the help text says a flag may be given, as extra arguments for a base line.
/// The base-line flags (`--shared-dir`, `--socket-path`, `--socket`, `--fd`) get lines of
/// their own.
fn variants(flag: &HelpFlag) -> Vec<Vec<String>> {
    match flag.value {
        None => vec![vec![flag.name.clone()]],
        Some(optional) => {
            let mut v: Vec<Vec<String>> = if flag.choices.is_empty() {
                vec![vec![format!("{}={}", flag.name, sample(&flag.name))]]
            } else {
                flag.choices
                    .iter()
                    .map(|c| vec![format!("{}={c}", flag.name)])
                    .collect()
            };
            if flag.name.starts_with("--") && !optional && flag.choices.is_empty() {
                // The separate-argument spelling too.
                v.push(vec![flag.name.clone(), sample(&flag.name).to_string()]);
            }
            if flag.name.len() == 2 {
                v = vec![vec![flag.name.clone(), sample(&flag.name).to_string()]];
            }
            if optional {
                v.push(vec![flag.name.clone()]);
            }
            v
        }
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("leasefs-cli-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.join("share")).unwrap();
        Dir(p)
    }
    fn socket(&self) -> PathBuf {
        self.0.join("s")
    }
    fn pid_file(&self) -> PathBuf {
        self.0.join("s.pid")
    }
    fn share(&self) -> PathBuf {
        self.0.join("share")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the daemon if a test fails before terminating it: no daemon outlives the test.
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        // Only while the pid is still our unreaped child: once reaped it may name another
        // process.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).unwrap_or_default();
        let ppid = stat
            .rsplit(") ")
            .next()
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(std::process::id()) {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn spawn(args: &[String], keep_fd: Option<i32>) -> Child {
    let mut cmd = Command::new(LEASEFSD);
    cmd.args(args)
        .env_remove("LEASEFSD_CACHE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(fd) = keep_fd {
        // SAFETY: only fcntl between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().unwrap()
}

enum Outcome {
    /// Listening: the pid file holds the daemon's pid (or, with --fd, it is still running).
    Listening,
    /// Exited with this status, stdout and stderr.
    Exited(i32, String, String),
}

fn read_all(r: Option<impl Read>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

/// Wait up to 5 s for the daemon to listen or exit.
fn outcome(child: &mut Child, pid_file: Option<&Path>) -> Outcome {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = read_all(child.stdout.take());
            let err = read_all(child.stderr.take());
            return Outcome::Exited(status.code().unwrap_or(-1), out, err);
        }
        match pid_file {
            Some(p) => {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                if text.trim() == child.id().to_string() {
                    return Outcome::Listening;
                }
            }
            None if start.elapsed() > Duration::from_millis(700) => return Outcome::Listening,
            None => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "neither listening nor exited after 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM and wait: exit status 0, and the pid file gone.
fn terminate(mut child: Child, pid_file: Option<&Path>) {
    terminate_labelled(&mut child, pid_file, "")
}

fn terminate_labelled(child: &mut Child, pid_file: Option<&Path>, label: &str) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{label}: SIGTERM ignored"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{label}: exit status after SIGTERM");
    if let Some(p) = pid_file {
        assert!(!p.exists(), "{label}: {} left behind", p.display());
    }
}

fn parses(args: &[String]) -> Result<(), String> {
    let argv = std::iter::once("leasefsd".to_string()).chain(args.iter().cloned());
    match Options::parse_args(argv, None) {
        Ok(Parsed::Run(_)) => Ok(()),
        // --help and --version.
        Ok(Parsed::Exit(e)) if !e.use_stderr() => Ok(()),
        Ok(Parsed::Exit(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn the_help_text_lists_virtiofsd_1_14s_flags() {
    let names: BTreeSet<String> = help_flags().into_iter().map(|f| f.name).collect();
    // A sanity check of the parsing above, not of leasefsd.
    assert_eq!(names.len(), 43, "{names:?}");
    for f in [
        "--shared-dir",
        "-o",
        "-d",
        "-f",
        "--seccomp",
        "--version",
        "--uid-map",
    ] {
        assert!(names.contains(f), "{f} missing from {names:?}");
    }
}

#[test]
fn every_virtiofsd_flag_parses() {
    let mut rejected = Vec::new();
    for flag in help_flags() {
        for extra in variants(&flag) {
            let mut args = vec!["--shared-dir".to_string(), "/tmp".to_string()];
            if flag.name != "--fd" && flag.name != "--socket" && flag.name != "--socket-path" {
                args.extend(["--socket-path".to_string(), "/tmp/s".to_string()]);
            }
            if flag.name == "--fd" || flag.name == "--socket" || flag.name == "--socket-path" {
                args.push(flag.name.clone());
                args.push(if flag.name == "--fd" { "3" } else { "/tmp/s" }.to_string());
            } else if flag.name != "--shared-dir" {
                args.extend(extra.iter().cloned());
            }
            if let Err(e) = parses(&args) {
                rejected.push(format!("{args:?}: {e}"));
            }
        }
    }
    assert!(rejected.is_empty(), "rejected:\n{}", rejected.join("\n"));
}

#[test]
fn every_virtiofsd_flag_runs_or_is_refused_in_one_line() {
    let mut failures = Vec::new();
    let mut refused_seen = BTreeSet::new();
    for (i, flag) in help_flags().into_iter().enumerate() {
        for (j, extra) in variants(&flag).into_iter().enumerate() {
            let dir = Dir::new(&format!("{i}-{j}"));
            let share = dir.share().display().to_string();
            let socket = dir.socket().display().to_string();
            let mut args = vec!["--shared-dir".to_string(), share.clone()];
            let mut listener = None;
            let mut pid_file = Some(dir.pid_file());
            match flag.name.as_str() {
                "--shared-dir" => args.extend(["--socket-path".into(), socket.clone()]),
                "--socket" | "--socket-path" => args.extend([flag.name.clone(), socket.clone()]),
                "--fd" => {
                    let l = std::os::unix::net::UnixListener::bind(&socket).unwrap();
                    args.extend(["--fd".into(), l.as_raw_fd().to_string()]);
                    listener = Some(l);
                    pid_file = None;
                }
                _ => {
                    args.extend(["--socket-path".into(), socket.clone()]);
                    args.extend(extra.iter().cloned());
                }
            }
            let keep = listener.as_ref().map(|l| l.as_raw_fd());
            let mut child = spawn(&args, keep);
            let _reaper = Reaper(child.id());
            let refusable = REFUSED.contains(&flag.name.as_str());
            match outcome(&mut child, pid_file.as_deref()) {
                Outcome::Listening => {
                    if refusable {
                        failures.push(format!("{args:?}: started, but is on REFUSED"));
                    }
                    terminate_labelled(&mut child, pid_file.as_deref(), &format!("{args:?}"));
                }
                Outcome::Exited(0, out, _)
                    if matches!(
                        flag.name.as_str(),
                        "--help" | "--version" | "--print-capabilities"
                    ) =>
                {
                    if out.is_empty() {
                        failures.push(format!("{args:?}: printed nothing"));
                    }
                }
                Outcome::Exited(1, _, err) if refusable => {
                    let err = err.trim_end();
                    let one_line = err.lines().count() == 1 && err.starts_with("leasefsd: ");
                    if !one_line {
                        failures.push(format!("{args:?}: refusal not one line: {err:?}"));
                    }
                    refused_seen.insert(flag.name.clone());
                }
                Outcome::Exited(code, _, err) => {
                    failures.push(format!("{args:?}: exit {code}: {}", err.trim_end()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    let expected: BTreeSet<String> = REFUSED.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        refused_seen, expected,
        "REFUSED must list exactly the refused flags"
    );
}

#[test]
fn version_and_help_as_virtme_ng_reads_them() {
    let out = Command::new(LEASEFSD).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("leasefsd "));
    let out = Command::new(LEASEFSD).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // virtme-ng adds --readonly only when the help mentions it.
    assert!(help.contains("--readonly"));
    assert!(help.contains("Coherent caching is the default"), "{help}");
    assert!(help.contains("LEASEFSD_CACHE=coherent"), "{help}");
}

#[test]
fn virtme_ng_line_listens_writes_the_pid_file_and_ends_on_sigterm() {
    let dir = Dir::new("virtme");
    let socket = dir.socket().display().to_string();
    let share = dir.share().display().to_string();
    let line: Vec<String> = [
        "--syslog",
        "--no-announce-submounts",
        "--readonly",
        "--socket-path",
        &socket,
        "--shared-dir",
        &share,
        "--sandbox",
        "none",
        "--cache",
        "always",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let start = Instant::now();
    let mut child = spawn(&line, None);
    let _reaper = Reaper(child.id());
    assert!(matches!(
        outcome(&mut child, Some(&dir.pid_file())),
        Outcome::Listening
    ));
    // virtme-ng gives up after 3.1 s.
    assert!(start.elapsed() < Duration::from_secs(3));
    let meta = std::fs::metadata(dir.pid_file()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let sock = std::fs::metadata(dir.socket()).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o700, "socket mode");
    terminate(child, Some(&dir.pid_file()));
}

#[test]
fn a_second_daemon_on_the_same_socket_is_refused_and_the_first_keeps_serving() {
    for sandbox in ["none", "namespace"] {
        let dir = Dir::new(&format!("second-{sandbox}"));
        let args: Vec<String> = [
            "--socket-path",
            &dir.socket().display().to_string(),
            "--shared-dir",
            &dir.share().display().to_string(),
            "--sandbox",
            sandbox,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut first = spawn(&args, None);
        let _reaper = Reaper(first.id());
        assert!(matches!(
            outcome(&mut first, Some(&dir.pid_file())),
            Outcome::Listening
        ));
        let mut second = spawn(&args, None);
        let _reaper2 = Reaper(second.id());
        match outcome(&mut second, Some(&dir.pid_file())) {
            Outcome::Exited(1, _, err) => {
                let err = err.trim_end();
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(err.contains(&format!("pid {}", first.id())), "{err}");
            }
            Outcome::Exited(code, _, err) => panic!("exit {code}: {err}"),
            Outcome::Listening => panic!("a second daemon started"),
        }
        // The first one's files are untouched.
        let pid = std::fs::read_to_string(dir.pid_file()).unwrap();
        assert_eq!(pid.trim(), first.id().to_string());
        assert!(dir.socket().exists());
        terminate(first, Some(&dir.pid_file()));
    }
}

#[test]
fn socket_group_gives_the_socket_mode_0770() {
    let dir = Dir::new("group");
    let args: Vec<String> = [
        "--socket-path",
        &dir.socket().display().to_string(),
        "--shared-dir",
        &dir.share().display().to_string(),
        "--sandbox",
        "none",
        "--socket-group",
        "root",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut child = spawn(&args, None);
    let _reaper = Reaper(child.id());
    assert!(matches!(
        outcome(&mut child, Some(&dir.pid_file())),
        Outcome::Listening
    ));
    let sock = std::fs::metadata(dir.socket()).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o770);
    terminate(child, Some(&dir.pid_file()));
}

#[test]
fn libvirt_lines_start() {
    let dir = Dir::new("libvirt");
    // A share whose path has a comma, escaped as libvirt does.
    let share = dir.0.join("sh,are");
    std::fs::create_dir(&share).unwrap();
    let escaped = share.display().to_string().replace(',', ",,");
    let listener = std::os::unix::net::UnixListener::bind(dir.socket()).unwrap();
    let fd = listener.as_raw_fd();
    for extra in [
        format!("source={escaped}"),
        format!("source={escaped},cache=always,sandbox=chroot,xattr"),
        // <lock posix='off' flock='off'/>: the guest keeps its locks.
        format!("source={escaped},cache=always,sandbox=chroot,xattr,no_flock,no_posix_lock"),
    ] {
        let args = vec![
            format!("--fd={fd}"),
            "-o".to_string(),
            extra,
            "--thread-pool-size=16".to_string(),
            "-d".to_string(),
        ];
        let mut child = spawn(&args, Some(fd));
        let _reaper = Reaper(child.id());
        match outcome(&mut child, None) {
            Outcome::Listening => terminate(child, None),
            Outcome::Exited(code, _, err) => panic!("{args:?}: exit {code}: {err}"),
        }
    }
}

#[test]
fn the_vhost_user_description_file_names_an_fs_backend() {
    // libvirt finds vhost-user backends through these files (QEMU's
    // docs/interop/vhost-user.json), then asks the binary for --print-capabilities.
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/50-leasefs.json"
    ))
    .expect("contrib/50-leasefs.json");
    let compact: String = file.split_whitespace().collect();
    assert!(compact.contains(r#""type":"fs""#), "{file}");
    assert!(
        compact.contains(r#""binary":"/"#),
        "an absolute binary path: {file}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leasefsd"))
        .arg("--print-capabilities")
        .output()
        .expect("running leasefsd");
    assert!(out.status.success());
    let caps: String = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect();
    assert!(
        caps.starts_with('{') && caps.contains(r#""type":"fs""#),
        "{caps}"
    );
}
