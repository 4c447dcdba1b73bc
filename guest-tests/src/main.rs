//! guest-tests: POSIX conformance and host/guest coherence checks for a
//! virtio-fs share (run inside the guest), plus the host agent they talk to.
//!
//!   guest-tests run [--dir /mnt] [--only NAME]... [--skip NAME]... [--no-agent]
//!                   [--agent-path SOCK] [--timeout SECS] [--no-fork] [--list]
//!   guest-tests host-agent --share DIR --listen SOCKPATH [-v]
//!   guest-tests bench-tree [--dir /mnt/tree] [--files 200] [--size 16384] [--rounds 20] [--create]

mod agent;
mod bench;
mod client;
mod harness;
mod proto;
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
  guest-tests host-agent --share DIR --listen SOCKPATH [-v]
      Host side: create fixtures, accept one connection on SOCKPATH and
      answer the guest's requests about DIR.
  guest-tests bench-tree [--dir DIR] [--files N] [--size BYTES] [--rounds R] [--create]
      Time cached re-reads of the tree in DIR (default /mnt/tree, 200 files of
      16384 bytes): a checked cold pass, then R (default 20) warm passes of
      readdir + stat + open + read + close; prints one JSON line. --create
      makes the tree instead (host side; qemu/bench-tree.sh).
";

fn die(msg: &str) -> ! {
    eprintln!("guest-tests: {msg}\n{USAGE}");
    std::process::exit(2);
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
            let (mut share, mut listen, mut verbose) = (None, None, false);
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--share" => share = Some(PathBuf::from(value(a, &mut it))),
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
            agent::main(&share, &listen, verbose)
        }
        "bench-tree" => {
            let mut o = bench::Opts {
                dir: PathBuf::from("/mnt/tree"),
                files: 200,
                size: 16384,
                rounds: 20,
                create: false,
            };
            let num = |flag: &str, v: String| -> usize {
                v.parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| die(&format!("bad {flag} {v:?}")))
            };
            while let Some(a) = it.next() {
                match a.as_str() {
                    "--dir" => o.dir = PathBuf::from(value(a, &mut it)),
                    "--files" => o.files = num(a, value(a, &mut it)),
                    "--size" => o.size = num(a, value(a, &mut it)),
                    "--rounds" => o.rounds = num(a, value(a, &mut it)),
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
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            0
        }
        other => die(&format!("unknown subcommand {other:?}")),
    };
    std::process::exit(code);
}
