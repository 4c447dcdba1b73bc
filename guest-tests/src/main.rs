//! guest-tests: POSIX conformance and host/guest coherence checks for a
//! virtio-fs share (run inside the guest), plus the host agent they talk to.
//!
//!   guest-tests run [--dir /mnt] [--only NAME]... [--skip NAME]... [--no-agent]
//!                   [--agent-path SOCK] [--timeout SECS] [--no-fork] [--list]
//!   guest-tests host-agent --share DIR --listen SOCKPATH [--qmp SOCK] [-v]
//!   guest-tests bench-tree [--dir /mnt/tree] [--files 200] [--size 16384] [--rounds 20] [--create]
//!   guest-tests stress [--dir /mnt] [--rounds N | --seconds N] [--seed S] ... (see USAGE)
//!   guest-tests model [--dir /mnt] [--seed S] [--ops N] [--stack stock|notify] ... (see USAGE)
//!   guest-tests relay --pair SOCK SOCK [--pair SOCK SOCK]...
//!   guest-tests inotify [--dir /mnt] [--rounds N] ... (see USAGE)

mod agent;
mod bench;
mod client;
mod harness;
mod hostcost;
mod inotify;
mod model;
mod proto;
mod relay;
mod stress;
mod sys;
mod tests;

use std::path::PathBuf;

const USAGE: &str = "\
usage:
  guest-tests run [--dir DIR] [--only NAME]... [--skip NAME]... [--no-agent] [--agent-path SOCK]
                  [--timeout SECS] [--no-fork] [--list]
      Run the checks against DIR (default /mnt). NAME may contain '*' and may
      be a comma-separated list. Agent tests talk to the host agent over the
      virtio-serial port 'leasefs.agent' (or the unix socket SOCK); without
      one they fail, unless --no-agent is given (then they are skipped).
      Each test runs in its own process, killed after SECS (default 300).
  guest-tests host-agent --share DIR --listen SOCKPATH [--qmp SOCK] [-v]
      Host side: create fixtures, accept one connection on SOCKPATH and
      answer the guest's requests about DIR. --qmp: QEMU's QMP socket, which
      the PAUSE request uses to stop and resume the VM.
  guest-tests bench-tree [--dir DIR] [--files N] [--size BYTES] [--rounds R] [--create]
      Time cached re-reads of the tree in DIR (default /mnt/tree, 200 files of
      16384 bytes): a checked cold pass, then R (default 20) warm passes of
      readdir + stat + open + read + close; prints one JSON line. --create
      makes the tree instead (host side; qemu/bench-tree.sh).
  guest-tests hostcost [--dir DIR] [--files N] [--label NAME]
      What caching costs host tools (qemu/host-cost.sh): the host agent rewrites
      N files in DIR/hostcost in place (guest idle, then reading in a loop),
      saves them by rename, and appends to a log every 50 ms; prints one
      HOSTCOST line per workload (host wall time, holds, stale guest reads).
  guest-tests stress [--dir DIR] [--name NAME] [--rounds N] [--seconds N] [--seed S]
                     [--kinds LIST] [--storm N] [--readers N] [--max-wait-ms MS]
                     [--late-ms MS] [--strict-namespace-ms MS] [--agent-path SOCK] [--peer]
                     [--connect-timeout SECS] [--keep] [-v]
      Coherency stress (in the guest): the host agent changes files in
      DIR/NAME (default /mnt/stress) and replies once its system calls have
      returned; then the guest looks. A stale data answer fails (exit 1);
      stale namespace answers at 0 ms and 50 ms are counted (with
      --strict-namespace-ms MS, stale at MS ms fails). Default 48 rounds, seed 1.
      Prints a table and `STRESS key=value...` lines. --peer: the agent port
      leads to another guest, and this one serves that guest's requests on
      the leasefs.peer port (qemu/stress.sh --two-guests). Exit 3: not completed.
  guest-tests model [--dir DIR] [--name NAME] [--seed S] [--ops N] [--stack auto|stock|notify]
                    [--lease-ms MS] [--window-ms MS] [--known-limit KIND,...] [--no-pause]
                    [--pause-ms MS] [--burst N] [--agent-path SOCK] [--history N] [--keep] [-v]
      Model-based randomized coherence test (in the guest): from the seed, the
      host agent and the guest interleave operations on DIR/NAME (default
      /mnt/model); every answer is checked against a model of what
      docs/coherency.md guarantees on the stack (auto: the notification queue
      in sysfs means notify), and the host's state against the model. Names
      may lag the window (stock: lease-ms + 250, default 1250 ms; notify: 50
      ms); data never. Default 2000 ops, seed 1, one VM pause of 5000 ms and
      one burst of 1000 host changes. A violation prints the seed, the check
      and the op history; --seed S --ops N replays it. --known-limit: stale
      answers after ops of these kinds (rdtrunc, restore, pause, burst) are
      reported, not failed. Prints `MODEL key=value...`; exit 1 on a
      violation, 3 when the run could not complete.
  guest-tests inotify [--dir DIR] [--name NAME] [--rounds N] [--wait-ms MS]
                      [--agent-path SOCK] [-v]
      Host changes as inotify events (in the guest, notify stack with the
      fsnotify patch): the guest watches DIR/NAME (default /mnt/inotify) and a
      file in it while the host agent creates, writes, chmods, renames,
      deletes, makes and removes a directory, and chmods DIR/NAME, one change
      at a time, N rounds (default 20). Every change's events must all come
      within MS (default 2000), once each, in order, with the right names and
      one cookie per rename. Prints `INOTIFY changes= events= expected=
      failed_changes= latency_ms_p50= ...`; exit 1 on a wrong event, 3 when
      the run could not complete.
  guest-tests relay --pair SOCK_A SOCK_B [--pair SOCK_A SOCK_B]...
      Host side: listen on every SOCK, accept one connection on each, copy
      bytes both ways within each pair until all have closed.
";

fn die(msg: &str) -> ! {
    eprintln!("guest-tests: {msg}\n{USAGE}");
    std::process::exit(2);
}

/// The positive whole number given for `flag`, or a usage error.
fn positive(flag: &str, v: String) -> u64 {
    v.parse()
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| die(&format!("bad {flag} {v:?}")))
}

/// The `--name` given: one directory entry under `--dir`, or a usage error.
fn entry_name(v: String) -> String {
    if v.is_empty() || v.contains('/') || v.starts_with('.') {
        die(&format!("bad --name {v:?}"));
    }
    v
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        die("missing subcommand");
    };
    let mut it = args[1..].iter();
    let value = |flag: &str, it: &mut std::slice::Iter<String>| -> String {
        it.next()
            .cloned()
            .unwrap_or_else(|| die(&format!("{flag} needs a value")))
    };
    let code = match cmd.as_str() {
        "run" => {
            let mut opts = harness::RunOpts {
                dir: PathBuf::from("/mnt"),
                only: Vec::new(),
                skip: Vec::new(),
                no_agent: false,
                agent_path: None,
                timeout: 300,
                no_fork: false,
                list: false,
            };
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => opts.dir = PathBuf::from(value(a, &mut it)),
                    "--only" => opts.only.extend(
                        value(a, &mut it)
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from),
                    ),
                    "--skip" => opts.skip.extend(
                        value(a, &mut it)
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from),
                    ),
                    "--no-agent" => opts.no_agent = true,
                    "--agent-path" => opts.agent_path = Some(PathBuf::from(value(a, &mut it))),
                    "--timeout" => {
                        let v = value(a, &mut it);
                        opts.timeout = v
                            .parse()
                            .ok()
                            .filter(|&t| t > 0)
                            .unwrap_or_else(|| die(&format!("bad --timeout {v:?}")));
                    }
                    "--no-fork" => opts.no_fork = true,
                    "--list" => opts.list = true,
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            harness::run(opts, tests::all())
        }
        "host-agent" => {
            let (mut share, mut listen, mut qmp, mut verbose) = (None, None, None, false);
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--share" => share = Some(PathBuf::from(value(a, &mut it))),
                    "--qmp" => qmp = Some(PathBuf::from(value(a, &mut it))),
                    "--listen" => listen = Some(PathBuf::from(value(a, &mut it))),
                    "-v" | "--verbose" => verbose = true,
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            let share = share.unwrap_or_else(|| die("host-agent needs --share DIR"));
            let listen = listen.unwrap_or_else(|| die("host-agent needs --listen SOCKPATH"));
            agent::main(&share, &listen, qmp, verbose)
        }
        "hostcost" => {
            let mut o = hostcost::Opts {
                dir: PathBuf::from("/mnt"),
                files: 200,
                label: "unnamed".into(),
            };
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => o.dir = PathBuf::from(value(a, &mut it)),
                    "--files" => o.files = positive(a, value(a, &mut it)) as usize,
                    "--label" => o.label = value(a, &mut it),
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            hostcost::main(o)
        }
        "bench-tree" => {
            let mut o = bench::Opts {
                dir: PathBuf::from("/mnt/tree"),
                files: 200,
                size: 16384,
                rounds: 20,
                create: false,
            };
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => o.dir = PathBuf::from(value(a, &mut it)),
                    "--files" => o.files = positive(a, value(a, &mut it)) as usize,
                    "--size" => o.size = positive(a, value(a, &mut it)) as usize,
                    "--rounds" => o.rounds = positive(a, value(a, &mut it)) as usize,
                    "--create" => o.create = true,
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            bench::main(o)
        }
        "stress" => {
            let mut o = stress::Opts::new();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => o.dir = PathBuf::from(value(a, &mut it)),
                    "--name" => o.name = entry_name(value(a, &mut it)),
                    "--rounds" => o.rounds = Some(positive(a, value(a, &mut it))),
                    "--seconds" => {
                        let v = value(a, &mut it);
                        o.seconds = Some(
                            v.parse::<f64>()
                                .ok()
                                .filter(|&s| s > 0.0)
                                .unwrap_or_else(|| die(&format!("bad --seconds {v:?}"))),
                        );
                    }
                    "--seed" => {
                        let v = value(a, &mut it);
                        o.seed = v
                            .parse()
                            .unwrap_or_else(|_| die(&format!("bad --seed {v:?}")));
                    }
                    "--kinds" => {
                        o.kinds =
                            stress::parse_kinds(&value(a, &mut it)).unwrap_or_else(|e| die(&e))
                    }
                    "--storm" => o.storm = positive(a, value(a, &mut it)) as usize,
                    "--readers" => {
                        let v = value(a, &mut it);
                        o.readers = v
                            .parse()
                            .unwrap_or_else(|_| die(&format!("bad --readers {v:?}")));
                    }
                    "--max-wait-ms" => o.max_wait_ms = positive(a, value(a, &mut it)),
                    "--late-ms" => o.late_ms = positive(a, value(a, &mut it)),
                    "--strict-namespace-ms" => {
                        let v = value(a, &mut it);
                        o.late_ms = v
                            .parse()
                            .unwrap_or_else(|_| die(&format!("bad --strict-namespace-ms {v:?}")));
                        o.strict = true;
                    }
                    "--agent-path" => o.agent_path = Some(PathBuf::from(value(a, &mut it))),
                    "--peer" => o.peer = true,
                    "--connect-timeout" => o.connect_secs = positive(a, value(a, &mut it)),
                    "--keep" => o.keep = true,
                    "-v" | "--verbose" => o.verbose = true,
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            if o.late_ms >= o.max_wait_ms {
                die("the late namespace look must come before --max-wait-ms");
            }
            stress::main(o)
        }
        "model" => {
            let mut o = model::Opts::new();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => o.dir = PathBuf::from(value(a, &mut it)),
                    "--name" => o.name = entry_name(value(a, &mut it)),
                    "--seed" => {
                        let v = value(a, &mut it);
                        o.seed = v
                            .parse()
                            .unwrap_or_else(|_| die(&format!("bad --seed {v:?}")));
                    }
                    "--ops" => o.ops = positive(a, value(a, &mut it)),
                    "--stack" => {
                        o.notify = match value(a, &mut it).as_str() {
                            "auto" => None,
                            "stock" => Some(false),
                            "notify" => Some(true),
                            v => die(&format!("bad --stack {v:?} (auto, stock, notify)")),
                        }
                    }
                    "--lease-ms" => o.lease_ms = positive(a, value(a, &mut it)),
                    "--window-ms" => o.window_ms = Some(positive(a, value(a, &mut it))),
                    "--known-limit" => {
                        for k in value(a, &mut it).split(',').filter(|k| !k.is_empty()) {
                            if !model::LIMIT_KINDS.contains(&k) {
                                die(&format!(
                                    "bad --known-limit {k:?} ({:?})",
                                    model::LIMIT_KINDS
                                ));
                            }
                            o.known.push(k.to_string());
                        }
                    }
                    "--no-pause" => o.pause = false,
                    "--pause-ms" => o.pause_ms = positive(a, value(a, &mut it)),
                    "--burst" => {
                        let v = value(a, &mut it);
                        o.burst = v
                            .parse()
                            .unwrap_or_else(|_| die(&format!("bad --burst {v:?}")));
                    }
                    "--agent-path" => o.agent_path = Some(PathBuf::from(value(a, &mut it))),
                    "--history" => o.history = positive(a, value(a, &mut it)) as usize,
                    "--keep" => o.keep = true,
                    "-v" | "--verbose" => o.verbose = true,
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            model::main(o)
        }
        "inotify" => {
            let mut o = inotify::Opts::new();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => o.dir = PathBuf::from(value(a, &mut it)),
                    "--name" => o.name = entry_name(value(a, &mut it)),
                    "--rounds" => o.rounds = positive(a, value(a, &mut it)),
                    "--wait-ms" => o.wait_ms = positive(a, value(a, &mut it)),
                    "--agent-path" => o.agent_path = Some(PathBuf::from(value(a, &mut it))),
                    "-v" | "--verbose" => o.verbose = true,
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            inotify::main(o)
        }
        "relay" => {
            let mut pairs = Vec::new();
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--pair" => {
                        let x = PathBuf::from(value(a, &mut it));
                        let y = PathBuf::from(value(a, &mut it));
                        pairs.push((x, y));
                    }
                    "-h" | "--help" => {
                        print!("{USAGE}");
                        std::process::exit(0);
                    }
                    other => die(&format!("unknown option {other:?}")),
                }
            }
            if pairs.is_empty() {
                die("relay needs at least one --pair");
            }
            relay::main(pairs)
        }
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            0
        }
        other => die(&format!("unknown subcommand {other:?}")),
    };
    std::process::exit(code);
}
