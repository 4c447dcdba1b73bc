//! `leasefs-bench`: drive a virtio-fs daemon (leasefsd or virtiofsd) through leasefs's own
//! vhost-user frontend, with no VM in the way, and report throughput and latency.
//!
//! ```text
//! leasefs-bench --socket PATH --workload getattr --threads 2 --seconds 5 [--queues Q] [--json]
//! ```
//!
//! It connects as the VMM, sends FUSE_INIT, prepares its files inside the share through FUSE
//! (a `leasefs-bench-<pid>` directory, removed at the end), then runs N threads for the given
//! time, each submitting one request at a time on request queue `thread % Q` (Q defaults to
//! min(N, the request queues the daemon offers)). Each operation's latency is the time from
//! submitting its chain to seeing it in the used ring. Prints one JSON line on stdout.
//!
//! `--workload revoke` measures revocation throughput instead (see [`revoke`]): a
//! notify-capable client learns `--files` files, host threads change them all, and the
//! client confirms every revocation.
//!
//! ```text
//! leasefs-bench --daemon target/release/leasefsd --workload revoke --files 100000 [--change open|chmod]
//! leasefs-bench --socket PATH --share DIR --workload revoke ...   (a daemon started by hand)
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use leasefs::frontend::{Device, FrontendConfig, FuseClient, FuseError, ROOT_ID};

#[path = "leasefs-bench/revoke.rs"]
mod revoke;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// GETATTR of a file.
    Getattr,
    /// LOOKUP of a file by name.
    Lookup,
    /// 4 KiB READs cycling through a 1 MiB file.
    Read4k,
    /// 4 KiB WRITEs cycling through a 1 MiB file.
    Write4k,
    /// 1 MiB READs of a 1 MiB file.
    Read1m,
    /// CREATE + RELEASE + UNLINK + FORGET of a new file (one op).
    CreateUnlink,
    /// READDIRPLUS of a 100-entry directory from offset 0 (one request of up to 64 KiB).
    Readdirplus,
    /// Revocation throughput: host changes to `--files` files the client knows, each
    /// revoked through the notification queue (not a timed loop; see `revoke`).
    Revoke,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Getattr => "getattr",
            Workload::Lookup => "lookup",
            Workload::Read4k => "read4k",
            Workload::Write4k => "write4k",
            Workload::Read1m => "read1m",
            Workload::CreateUnlink => "create-unlink",
            Workload::Readdirplus => "readdirplus",
            Workload::Revoke => "revoke",
        }
    }
}

#[derive(Debug, Parser)]
#[command(about = "Benchmark a vhost-user virtio-fs daemon without a VM")]
struct Args {
    /// The daemon's vhost-user socket (or `--daemon`).
    #[arg(long, required_unless_present = "daemon")]
    socket: Option<String>,
    #[arg(long, value_enum)]
    workload: Workload,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Request queues to use (default: min(threads, what the daemon offers)).
    #[arg(long)]
    queues: Option<usize>,
    /// Print only the JSON line (no human summary on stderr).
    #[arg(long)]
    json: bool,
    /// Busy-poll the used ring this many microseconds before sleeping on the call eventfd
    /// (takes scheduler wake-ups on the frontend's side out of the latencies; costs a CPU).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    #[command(flatten)]
    revoke: revoke::RevokeArgs,
}

const FILE_SIZE: usize = 1 << 20;
const DIR_ENTRIES: usize = 100;

/// What one thread works on, prepared before the clock starts.
struct Target {
    dir: u64,
    file: u64,
    file_name: String,
    fh: u64,
    dir_fh: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leasefs-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.workload == Workload::Revoke {
        return revoke::run(args);
    }
    let Some(socket) = &args.socket else {
        return Err("--socket is needed (--daemon serves only --workload revoke)".into());
    };
    if args.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    let wanted_queues = args.queues.unwrap_or(args.threads).max(1);
    let config = FrontendConfig {
        memory_size: args.memory_mib << 20,
        request_queues: Some(wanted_queues),
        ..Default::default()
    };
    let device = Device::connect(socket, &config).map_err(|e| e.to_string())?;
    let queues = device.request_queues().len();
    let offered = device.negotiated().backend_request_queues;
    for q in device.request_queues() {
        q.set_spin(Duration::from_micros(args.spin_us));
    }
    let fuse = FuseClient::new(Arc::new(device));
    let init = fuse.init().map_err(|e| format!("INIT: {e}"))?;

    let top_name = format!("leasefs-bench-{}", std::process::id());
    let top = fuse
        .mkdir(ROOT_ID, &top_name, 0o755)
        .map_err(|e| format!("MKDIR {top_name}: {e}"))?
        .nodeid;
    let targets: Vec<Target> = (0..args.threads)
        .map(|t| prepare(&fuse.on_queue(t), args.workload, top, t))
        .collect::<Result<_, FuseError>>()
        .map_err(|e| format!("preparing files: {e}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(args.threads + 1));
    let workers: Vec<_> = targets
        .into_iter()
        .enumerate()
        .map(|(t, target)| {
            let fuse = fuse.on_queue(t);
            let stop = stop.clone();
            let start = start.clone();
            let workload = args.workload;
            thread::spawn(move || {
                start.wait();
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    let result = one_op(&fuse, workload, &target, t, i);
                    latencies.push(began.elapsed().as_nanos() as u64);
                    if result.is_err() {
                        errors += 1;
                    }
                    i += 1;
                }
                (latencies, errors, target)
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    thread::sleep(Duration::from_secs_f64(args.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut targets = Vec::new();
    for w in workers {
        let (l, e, target) = w.join().map_err(|_| "a worker panicked".to_string())?;
        latencies.extend(l);
        errors += e;
        targets.push(target);
    }
    let elapsed = began.elapsed().as_secs_f64();
    cleanup(&fuse, args.workload, top, &top_name, &targets);

    latencies.sort_unstable();
    let ops = latencies.len();
    let pct = |p: f64| -> f64 {
        if ops == 0 {
            return 0.0;
        }
        let i = ((ops as f64 * p).ceil() as usize).clamp(1, ops) - 1;
        latencies[i] as f64 / 1000.0
    };
    let mean = if ops == 0 {
        0.0
    } else {
        latencies.iter().sum::<u64>() as f64 / ops as f64 / 1000.0
    };
    let ops_per_sec = ops as f64 / elapsed;
    println!(
        "{{\"workload\":\"{}\",\"threads\":{},\"queues\":{},\"backend_request_queues\":{},\
         \"seconds\":{:.3},\"ops\":{},\"errors\":{},\"ops_per_sec\":{:.1},\"mean_us\":{:.2},\
         \"p50_us\":{:.2},\"p90_us\":{:.2},\"p99_us\":{:.2},\"max_us\":{:.2},\"max_write\":{},\"spin_us\":{}}}",
        args.workload.name(),
        args.threads,
        queues,
        offered,
        elapsed,
        ops,
        errors,
        ops_per_sec,
        mean,
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        init.max_write,
        args.spin_us,
    );
    if !args.json {
        eprintln!(
            "{}: {ops} ops in {elapsed:.2} s on {} thread(s) / {queues} queue(s): \
             {ops_per_sec:.0} ops/s, p50 {:.1} µs, p99 {:.1} µs, {errors} errors",
            args.workload.name(),
            args.threads,
            pct(0.5),
            pct(0.99)
        );
    }
    if errors > 0 {
        return Err(format!("{errors} operations failed"));
    }
    Ok(())
}

/// Create what thread `t` needs inside the bench directory `top`.
fn prepare(fuse: &FuseClient, workload: Workload, top: u64, t: usize) -> Result<Target, FuseError> {
    let dir = fuse.mkdir(top, format!("t{t}"), 0o755)?.nodeid;
    let file_name = "file".to_string();
    let (entry, open) = fuse.create(dir, &file_name, libc::O_RDWR | libc::O_CREAT, 0o644)?;
    if matches!(workload, Workload::Read4k | Workload::Read1m) {
        let block: Vec<u8> = (0..FILE_SIZE).map(|i| (i % 253) as u8).collect();
        fuse.write_all(entry.nodeid, open.fh, 0, &block)?;
    }
    let mut dir_fh = 0;
    if workload == Workload::Readdirplus {
        for i in 0..DIR_ENTRIES {
            let (e, o) = fuse.create(
                dir,
                format!("entry-{i:03}"),
                libc::O_WRONLY | libc::O_CREAT,
                0o644,
            )?;
            fuse.release(e.nodeid, o.fh, libc::O_WRONLY)?;
        }
        dir_fh = fuse.opendir(dir)?.fh;
    }
    Ok(Target {
        dir,
        file: entry.nodeid,
        file_name,
        fh: open.fh,
        dir_fh,
    })
}

fn one_op(
    fuse: &FuseClient,
    workload: Workload,
    target: &Target,
    t: usize,
    i: u64,
) -> Result<(), FuseError> {
    let block_offset = (i * 4096) % FILE_SIZE as u64;
    match workload {
        Workload::Getattr => fuse.getattr(target.file).map(drop),
        Workload::Lookup => fuse.lookup(target.dir, &target.file_name).map(drop),
        Workload::Read4k => {
            let data = fuse.read(target.file, target.fh, block_offset, 4096)?;
            check_len(data.len(), 4096)
        }
        Workload::Write4k => {
            let written = fuse.write(target.file, target.fh, block_offset, &[t as u8; 4096])?;
            check_len(written as usize, 4096)
        }
        Workload::Read1m => {
            let data = fuse.read(target.file, target.fh, 0, FILE_SIZE as u32)?;
            check_len(data.len(), FILE_SIZE)
        }
        Workload::CreateUnlink => {
            let name = format!("c{i}");
            let (entry, open) = fuse.create(
                target.dir,
                &name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o644,
            )?;
            fuse.release(entry.nodeid, open.fh, libc::O_WRONLY)?;
            fuse.unlink(target.dir, &name)?;
            // As the guest kernel would once the dentry goes: drop the daemon's inode.
            fuse.forget(entry.nodeid, 1)
        }
        Workload::Readdirplus => {
            let entries = fuse.readdirplus(target.dir, target.dir_fh, 0, 65536)?;
            check_len(entries.len().min(DIR_ENTRIES), DIR_ENTRIES)
        }
        Workload::Revoke => unreachable!("revoke has its own driver"),
    }
}

fn check_len(got: usize, want: usize) -> Result<(), FuseError> {
    if got == want {
        Ok(())
    } else {
        Err(FuseError::Protocol(format!("{got} bytes, expected {want}")))
    }
}

/// Remove the bench directory (best effort: a failure here does not spoil the numbers).
fn cleanup(fuse: &FuseClient, workload: Workload, top: u64, top_name: &str, targets: &[Target]) {
    for (t, target) in targets.iter().enumerate() {
        let _ = fuse.release(target.file, target.fh, libc::O_RDWR);
        let _ = fuse.unlink(target.dir, &target.file_name);
        if workload == Workload::Readdirplus {
            let _ = fuse.releasedir(target.dir, target.dir_fh);
            for i in 0..DIR_ENTRIES {
                let _ = fuse.unlink(target.dir, format!("entry-{i:03}"));
            }
        }
        let _ = fuse.rmdir(top, format!("t{t}"));
    }
    let _ = fuse.rmdir(ROOT_ID, top_name);
}
