//! `leasefsd`: parse the command line, report errors in one line, run the daemon.

use leasefs::cli::{Options, Parsed, CACHE_ENV};
use leasefs::{daemon, pidfile};

fn main() {
    let cache_env = std::env::var(CACHE_ENV).ok();
    let options = match Options::parse_args(std::env::args_os(), cache_env.as_deref()) {
        Ok(Parsed::Run(options)) => options,
        Ok(Parsed::Exit(e)) => {
            // --help and --version are "errors" that print to stdout and exit 0.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("leasefsd: {e}");
            std::process::exit(2);
        }
    };
    if let Some(reason) = options.unsupported() {
        eprintln!("leasefsd: {reason}");
        std::process::exit(1);
    }
    let result = daemon::run(*options);
    // Every way out but a signal passes here; signals remove it in their handlers.
    pidfile::remove();
    if let Err(e) = result {
        eprintln!("leasefsd: {e}");
        std::process::exit(1);
    }
}
