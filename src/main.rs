//! `leasefsd`: parse the command line, report errors in one line, run the daemon.

use clap::Parser;

use leasefs::cli::Options;
use leasefs::daemon;

fn main() {
    let options = match Options::try_parse() {
        Ok(options) => options,
        Err(e) => {
            // --help and --version are "errors" that print to stdout and exit 0.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = daemon::run(options) {
        eprintln!("leasefsd: {e}");
        std::process::exit(1);
    }
}
