//! `--workload revoke`: revocation throughput through the notification queue.
//!
//! 1. The share gets `--files` files (`leasefs-revoke-<pid>/d<i/1000>/f<i>`), written on the
//!    host directly.
//! 2. The client (this process, notify-capable: VIRTIO_FS_F_NOTIFICATION and EVENT_IDX, as
//!    the patched QEMU and Linux negotiate them, `--notify-buffers` buffers posted like Linux's
//!    64) LOOKUPs every file, so the daemon leases each to it (and takes a host lease on it).
//! 3. `--changers` host threads change every file once, acting on the share directly:
//!    * `--change open` (default): open it for writing and close it (no write). The open
//!      breaks the daemon's host lease; the daemon sends INVAL_INODE with a confirmation id
//!      and holds the opener until the client confirms. What is measured is the lease path.
//!    * `--change chmod`: flip its mode. fanotify reports it (a directory mark's FAN_ATTRIB
//!      of a child) and the daemon sends INVAL_INODE(attributes) without an id; nobody waits.
//! 4. The client thread works like Linux's notification work item: it sleeps until the
//!    device signals the queue, takes every filled buffer, posts them all again with one
//!    kick decision, then sends the confirmations of the batch on the hiprio queue at once.
//!
//! Per file: the time from just before the host call that changed it to the client's
//! confirmation (`open`: the confirmation's chain returned by the device) or its receipt
//! (`chmod`: nothing to confirm). Every file must be revoked exactly once by the message of
//! its kind; a missing one, a second one, or a stall of `--stall-seconds` fails the run.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{Device, FrontendConfig, FuseClient, Notice, ROOT_ID};

use super::Args;

/// How the host changes each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Change {
    /// open(O_WRONLY) + close: breaks the daemon's host lease; the opener is held until the
    /// client confirms.
    Open,
    /// chmod: reported by fanotify; revoked without a confirmation.
    Chmod,
}

#[derive(Debug, ClapArgs)]
pub struct RevokeArgs {
    /// revoke: files the client learns and the host changes.
    #[arg(long, default_value_t = 100_000)]
    files: usize,
    /// revoke: how the host changes them.
    #[arg(long, value_enum, default_value_t = Change::Open)]
    change: Change,
    /// revoke: host threads changing files concurrently (each open waits for its
    /// confirmation, so this is how many revocations can be in flight).
    #[arg(long, default_value_t = 64)]
    changers: usize,
    /// revoke: the daemon's shared directory on the host (with --socket).
    #[arg(long)]
    share: Option<PathBuf>,
    /// revoke: start this leasefsd on a scratch share (`--cache coherent`, a notify lease of
    /// --lease seconds) instead of connecting to --socket.
    #[arg(long, conflicts_with_all = ["socket", "share"])]
    daemon: Option<PathBuf>,
    /// revoke: more arguments for the spawned daemon (repeat for each), e.g.
    /// `--daemon-arg=--inode-file-handles=mandatory` to learn more files than the
    /// descriptor limit allows.
    #[arg(long, allow_hyphen_values = true)]
    daemon_arg: Vec<String>,
    /// revoke: the notify lease the spawned daemon grants, in seconds (must outlast the run:
    /// a lease that ran out is released without a revocation).
    #[arg(long, default_value_t = 40)]
    lease: u64,
    /// revoke: notification buffers the client keeps posted (Linux: 64).
    #[arg(long, default_value_t = 64)]
    notify_buffers: usize,
    /// revoke: fail if no revocation arrives for this long.
    #[arg(long, default_value_t = 30)]
    stall_seconds: u64,
}

/// What the client thread saw.
#[derive(Default)]
struct ClientCounts {
    /// Messages of the kind this change causes, about files of the run, per file.
    per_file: Vec<u32>,
    /// Messages about files of the run of the other kind (tracked vs untracked).
    other_kind: u64,
    /// Messages about nodes that are not files of the run (directories...).
    other_nodes: u64,
    malformed: u64,
    /// handle_notifications() calls that found messages, and the messages.
    batches: u64,
    messages: u64,
    largest_batch: usize,
    /// Per file: ns since the epoch at confirmation (or receipt); 0 = never.
    done_ns: Vec<u64>,
}

pub fn run(args: &Args) -> Result<(), String> {
    let r = &args.revoke;
    if r.files == 0 || r.changers == 0 {
        return Err("--files and --changers must be at least 1".into());
    }
    let lease = r.lease.to_string();
    let backend = match &r.daemon {
        Some(binary) => Some(
            Backend::spawn(
                binary,
                &[
                    &["--cache", "coherent", "--notify-lease-timeout", &lease][..],
                    &r.daemon_arg.iter().map(String::as_str).collect::<Vec<_>>(),
                ]
                .concat(),
            )
            .map_err(|e| format!("starting {}: {e}", binary.display()))?,
        ),
        None => None,
    };
    let (socket, share): (PathBuf, PathBuf) = match &backend {
        Some(b) => (b.socket().into(), b.share().into()),
        None => (
            args.socket.clone().ok_or("--socket or --daemon")?.into(),
            r.share
                .clone()
                .ok_or("--workload revoke with --socket needs --share")?,
        ),
    };
    let result = measure(args, &socket, &share, backend.as_ref());
    if let (Err(_), Some(b)) = (&result, &backend) {
        eprintln!("daemon log (tail):\n{}", tail(&b.log(), 30));
    }
    result
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn file_path(top: &Path, i: usize) -> PathBuf {
    top.join(format!("d{}", i / 1000)).join(format!("f{i}"))
}

fn measure(
    args: &Args,
    socket: &Path,
    share: &Path,
    backend: Option<&Backend>,
) -> Result<(), String> {
    let r = &args.revoke;
    let files = r.files;
    let top_name = format!("leasefs-revoke-{}", std::process::id());
    let top = share.join(&top_name);
    let setup = Instant::now();
    for i in 0..files {
        if i % 1000 == 0 {
            fs::create_dir_all(top.join(format!("d{}", i / 1000)))
                .map_err(|e| format!("creating the tree: {e}"))?;
        }
        fs::write(file_path(&top, i), b"v1").map_err(|e| format!("file {i}: {e}"))?;
    }
    let config = FrontendConfig {
        memory_size: args.memory_mib << 20,
        request_queues: Some(1),
        want_notification: true,
        event_idx: true,
        notification_buffers: r.notify_buffers,
        ..Default::default()
    };
    let device = Arc::new(Device::connect(socket, &config).map_err(|e| e.to_string())?);
    let Some(nq) = device.notification_queue().cloned() else {
        return Err("the daemon did not offer the notification queue".into());
    };
    for q in device.all_queues() {
        q.set_spin(Duration::from_micros(args.spin_us));
    }
    let fuse = FuseClient::new(device.clone());
    fuse.init().map_err(|e| format!("INIT: {e}"))?;

    // The client learns every file.
    let top_node = fuse
        .lookup(ROOT_ID, &top_name)
        .map_err(|e| format!("LOOKUP {top_name}: {e}"))?
        .nodeid;
    let mut index: HashMap<u64, usize> = HashMap::with_capacity(files);
    let mut dir = 0;
    let mut unleased = 0usize;
    for i in 0..files {
        if i % 1000 == 0 {
            dir = fuse
                .lookup(top_node, format!("d{}", i / 1000))
                .map_err(|e| format!("LOOKUP d{}: {e}", i / 1000))?
                .nodeid;
        }
        let entry = fuse
            .lookup(dir, format!("f{i}"))
            .map_err(|e| format!("LOOKUP f{i}: {e}"))?;
        if entry.attr_valid == 0 && entry.attr_valid_nsec == 0 {
            unleased += 1;
        }
        if index.insert(entry.nodeid, i).is_some() {
            return Err(format!("node {} named twice", entry.nodeid));
        }
    }
    let setup_s = setup.elapsed().as_secs_f64();
    if unleased > 0 && r.change == Change::Open {
        // Past the daemon's host lease budget (half its descriptor limit) a file gets no
        // lease, and a host open of it is never held nor revoked.
        return Err(format!(
            "{unleased} of {files} files came without a lease: the daemon cannot revoke them (is it --cache coherent with the notification queue?)"
        ));
    }
    // Whatever the set-up caused (nothing, normally) is not part of the run.
    device
        .handle_notifications(|_| {})
        .map_err(|e| e.to_string())?;
    let (kicks0, _) = nq.kick_counts();
    let signals0 = nq.signals_received();
    let (hikicks0, _) = device.hiprio().kick_counts();

    let epoch = Instant::now();
    let changed_ns: Arc<Vec<AtomicU64>> = Arc::new((0..files).map(|_| AtomicU64::new(0)).collect());
    let held_ns: Arc<Vec<AtomicU64>> = Arc::new((0..files).map(|_| AtomicU64::new(0)).collect());
    let change = r.change;
    let stall = Duration::from_secs(r.stall_seconds);
    let changers_done = Arc::new(AtomicBool::new(false));

    let client = {
        let (device, nq, fuse, changers_done) = (
            device.clone(),
            nq.clone(),
            fuse.clone(),
            changers_done.clone(),
        );
        thread::spawn(move || -> Result<ClientCounts, String> {
            let mut c = ClientCounts {
                per_file: vec![0; files],
                done_ns: vec![0; files],
                ..Default::default()
            };
            let mut revoked = 0usize;
            let mut last_progress = Instant::now();
            let mut confirms = Vec::new();
            let mut confirmed_files = Vec::new();
            while revoked < files {
                if !nq.wait_for_completions(Duration::from_millis(20)) {
                    if last_progress.elapsed() > stall {
                        return Err(format!(
                            "no revocation for {stall:?}; {revoked} of {files} revoked"
                        ));
                    }
                    continue;
                }
                confirms.clear();
                confirmed_files.clear();
                let mut received = Vec::new();
                let handled = device
                    .handle_notifications(|bytes| {
                        let Some(n) = Notice::parse(bytes) else {
                            c.malformed += 1;
                            return;
                        };
                        let file = (n.code == Notice::INVAL_INODE)
                            .then(|| index.get(&n.node).copied())
                            .flatten();
                        let Some(i) = file else {
                            c.other_nodes += 1;
                            return;
                        };
                        let expected = match change {
                            Change::Open => n.unique != 0,
                            Change::Chmod => n.unique == 0,
                        };
                        if !expected {
                            c.other_kind += 1;
                        } else {
                            received.push(i);
                        }
                        if n.unique != 0 {
                            confirms.push((n.unique, n.node, 0));
                            if expected {
                                confirmed_files.push(i);
                            }
                        }
                    })
                    .map_err(|e| format!("notification queue: {e}"))?;
                if handled == 0 {
                    continue;
                }
                c.batches += 1;
                c.messages += handled as u64;
                c.largest_batch = c.largest_batch.max(handled);
                let received_at = epoch.elapsed().as_nanos() as u64;
                if !confirms.is_empty() {
                    fuse.confirm_notifications(&confirms)
                        .map_err(|e| format!("confirming: {e}"))?;
                }
                let confirmed_at = epoch.elapsed().as_nanos() as u64;
                for &i in &received {
                    c.per_file[i] += 1;
                    if c.per_file[i] == 1 {
                        revoked += 1;
                        c.done_ns[i] = match change {
                            Change::Open => confirmed_at,
                            Change::Chmod => received_at,
                        };
                    }
                }
                last_progress = Instant::now();
            }
            // Late duplicates: look a little longer once the host is done.
            let linger = Instant::now();
            while !changers_done.load(Ordering::SeqCst)
                || linger.elapsed() < Duration::from_millis(200)
            {
                if linger.elapsed() > stall {
                    break;
                }
                if !nq.wait_for_completions(Duration::from_millis(20)) {
                    continue;
                }
                confirms.clear();
                device
                    .handle_notifications(|bytes| {
                        let Some(n) = Notice::parse(bytes) else {
                            c.malformed += 1;
                            return;
                        };
                        match index.get(&n.node) {
                            Some(&i) if n.code == Notice::INVAL_INODE => {
                                let expected = (n.unique != 0) == (change == Change::Open);
                                if expected {
                                    c.per_file[i] += 1;
                                } else {
                                    c.other_kind += 1;
                                }
                            }
                            _ => c.other_nodes += 1,
                        }
                        if n.unique != 0 {
                            confirms.push((n.unique, n.node, 0));
                        }
                    })
                    .map_err(|e| format!("notification queue: {e}"))?;
                if !confirms.is_empty() {
                    fuse.confirm_notifications(&confirms)
                        .map_err(|e| format!("confirming: {e}"))?;
                }
            }
            Ok(c)
        })
    };

    // The host side.
    let next = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(r.changers));
    let changers: Vec<_> = (0..r.changers)
        .map(|_| {
            let (next, start, top) = (next.clone(), start.clone(), top.clone());
            let (changed_ns, held_ns) = (changed_ns.clone(), held_ns.clone());
            thread::spawn(move || -> Result<(), String> {
                start.wait();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= files {
                        return Ok(());
                    }
                    let path = file_path(&top, i);
                    let t0 = epoch.elapsed().as_nanos() as u64;
                    changed_ns[i].store(t0.max(1), Ordering::Relaxed);
                    match change {
                        Change::Open => {
                            let f = OpenOptions::new()
                                .write(true)
                                .open(&path)
                                .map_err(|e| format!("host open of {}: {e}", path.display()))?;
                            held_ns[i]
                                .store(epoch.elapsed().as_nanos() as u64 - t0, Ordering::Relaxed);
                            drop(f);
                        }
                        Change::Chmod => {
                            let mode = if i % 2 == 0 { 0o600 } else { 0o640 };
                            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                                .map_err(|e| format!("host chmod of {}: {e}", path.display()))?;
                        }
                    }
                }
            })
        })
        .collect();
    let mut host_error = None;
    for c in changers {
        match c.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => host_error = Some(e),
            Err(_) => host_error = Some("a host changer panicked".into()),
        }
    }
    let host_s = epoch.elapsed().as_secs_f64();
    changers_done.store(true, Ordering::SeqCst);
    let counts = client
        .join()
        .map_err(|_| "the client thread panicked".to_string())?;
    if let Some(e) = host_error {
        return Err(e);
    }
    let counts = counts?;
    let (kicks1, _) = nq.kick_counts();
    let signals1 = nq.signals_received();
    let (hikicks1, _) = device.hiprio().kick_counts();

    // Figures.
    let first = changed_ns
        .iter()
        .map(|t| t.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    let last = counts.done_ns.iter().copied().max().unwrap_or(0);
    let total_s = (last.saturating_sub(first)) as f64 / 1e9;
    let mut latencies: Vec<u64> = (0..files)
        .map(|i| counts.done_ns[i].saturating_sub(changed_ns[i].load(Ordering::Relaxed)))
        .collect();
    latencies.sort_unstable();
    let mut holds: Vec<u64> = held_ns.iter().map(|h| h.load(Ordering::Relaxed)).collect();
    holds.sort_unstable();
    let pct = |v: &[u64], p: f64| -> f64 {
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    let missing: Vec<usize> = (0..files).filter(|&i| counts.per_file[i] == 0).collect();
    let repeated: Vec<usize> = (0..files).filter(|&i| counts.per_file[i] > 1).collect();
    let rate = files as f64 / total_s;
    let daemon_line = backend.map(daemon_counters).unwrap_or_default();
    let revoked = files - missing.len();
    let (p50, p99, max) = (
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&latencies, 1.0),
    );
    let (messages, batches, largest) = (counts.messages, counts.batches, counts.largest_batch);
    let (kicks, signals, confirm_kicks) =
        (kicks1 - kicks0, signals1 - signals0, hikicks1 - hikicks0);
    let change_name = match change {
        Change::Open => "open",
        Change::Chmod => "chmod",
    };
    println!(
        "{{\"workload\":\"revoke\",\"change\":\"{change_name}\",\"files\":{files},\"changers\":{},\
         \"notify_buffers\":{},\"seconds\":{total_s:.3},\"host_seconds\":{host_s:.3},\
         \"revocations_per_sec\":{rate:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"max_us\":{max:.1},\
         \"hold_p50_us\":{:.1},\"hold_p99_us\":{:.1},\"revoked\":{revoked},\"missing\":{},\
         \"repeated\":{},\"other_kind\":{},\"other_nodes\":{},\"messages\":{messages},\"batches\":{batches},\
         \"largest_batch\":{largest},\"notify_kicks\":{kicks},\"notify_signals\":{signals},\"confirm_kicks\":{confirm_kicks},\
         \"unleased\":{unleased},\"setup_seconds\":{setup_s:.1}}}",
        r.changers,
        r.notify_buffers,
        pct(&holds, 0.5),
        pct(&holds, 0.99),
        missing.len(),
        repeated.len(),
        counts.other_kind,
        counts.other_nodes,
    );
    if !args.json {
        let until = match change {
            Change::Open => "confirmation",
            Change::Chmod => "receipt",
        };
        eprintln!(
            "revoke ({change_name}): {files} files, {revoked} revoked in {total_s:.3} s: {rate:.0} revocations/s; host change to {until} p50 {p50:.1} µs, p99 {p99:.1} µs, max {max:.1} µs; {messages} messages in {batches} batches (largest {largest}), {kicks} kicks, {signals} signals on the notification queue, {confirm_kicks} confirmation kicks"
        );
        if change == Change::Open {
            eprintln!(
                "host open held p50 {:.1} µs, p99 {:.1} µs",
                pct(&holds, 0.5),
                pct(&holds, 0.99)
            );
        }
        if !daemon_line.is_empty() {
            eprintln!("daemon: {daemon_line}");
        }
    }
    drop(fuse);
    drop(device);
    let _ = fs::remove_dir_all(&top);
    if !missing.is_empty() || !repeated.is_empty() || counts.malformed > 0 {
        return Err(format!(
            "{} of {files} files not revoked (first {:?}), {} revoked more than once (first {:?}), {} malformed messages",
            missing.len(),
            &missing[..missing.len().min(5)],
            repeated.len(),
            &repeated[..repeated.len().min(5)],
            counts.malformed
        ));
    }
    Ok(())
}

/// The daemon's notifier and lease counters, from the lines it logs on SIGUSR1.
fn daemon_counters(backend: &Backend) -> String {
    let before = backend.log().matches("notifications: ").count();
    // SAFETY: a signal to the daemon this process started.
    unsafe { libc::kill(backend.pid() as i32, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.log().matches("notifications: ").count() == before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let log = backend.log();
    let pick = |word: &str| {
        log.lines()
            .rev()
            .find(|l| l.contains(word))
            .map(|l| l[l.find(word).unwrap_or(0)..].to_string())
            .unwrap_or_default()
    };
    format!("{}\n        {}", pick("notifications: "), pick("leases: "))
}
