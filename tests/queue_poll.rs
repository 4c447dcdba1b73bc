//! Adaptive queue polling (`--queue-poll-us`, src/queue_poll.rs) through a real vhost-user
//! socket, counted rather than timed: a client sending requests back to back has them taken
//! without kicks once the queue polls; without polling every request needs its kick; and an
//! idle queue burns no CPU, whatever the window grew to while it was busy.

use std::time::{Duration, Instant};

use leasefs::frontend::process::Backend;
use leasefs::frontend::{FrontendConfig, FuseClient, ROOT_ID};

const REQUESTS: u64 = 3_000;

fn start(poll_us: &str) -> (Backend, FuseClient) {
    let backend = Backend::spawn(
        env!("CARGO_BIN_EXE_leasefsd"),
        &["--queue-poll-us", poll_us],
    )
    .expect("starting leasefsd");
    let fuse = backend.client(&FrontendConfig::default());
    fuse.init().expect("INIT");
    (backend, fuse)
}

/// `(requests, kicks sent, kicks left out)` for `REQUESTS` GETATTRs back to back on one queue.
fn back_to_back(fuse: &FuseClient) -> (u64, u64, u64) {
    let queue = fuse.queue().clone();
    let (kicks_before, left_out_before) = queue.kick_counts();
    for _ in 0..REQUESTS {
        fuse.getattr(ROOT_ID).expect("GETATTR");
    }
    let (kicks, left_out) = queue.kick_counts();
    let (kicks, left_out) = (kicks - kicks_before, left_out - left_out_before);
    assert_eq!(
        kicks + left_out,
        REQUESTS,
        "every request either kicked or not"
    );
    (REQUESTS, kicks, left_out)
}

/// CPU time (user + system) the daemon process has used, in clock ticks.
fn cpu_ticks(backend: &Backend) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", backend.pid())).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_polling_queue_takes_back_to_back_requests_without_kicks() {
    // A generous window, so a loaded test machine still sends within it often.
    let (_backend, fuse) = start("1000");
    let (requests, kicks, left_out) = back_to_back(&fuse);
    eprintln!("polling: {kicks} kicked, {left_out} left out");
    assert!(
        left_out >= requests / 4,
        "the polling queue should have taken at least a quarter of {requests} back-to-back \
         requests without a kick; {kicks} kicked, {left_out} left out"
    );
}

#[test]
fn without_polling_most_requests_on_an_idle_queue_are_kicked() {
    let (_backend, fuse) = start("0");
    let (requests, kicks, left_out) = back_to_back(&fuse);
    // One request at a time: the queue re-enables notifications as soon as it has answered,
    // so most requests need their kick. (A request that the client sends between the reply
    // and the re-enabling is taken in the same pass without one: 3% in a debug build, up to
    // 16% in a release build with the other tests running; with polling it is over 90%.)
    assert!(
        left_out < requests / 2,
        "with --queue-poll-us 0 most requests must be kicked; {kicks} kicked, \
         {left_out} left out"
    );
}

#[test]
fn an_idle_queue_stops_polling() {
    let (backend, fuse) = start("1000");
    let (_, _, left_out) = back_to_back(&fuse);
    assert!(left_out > 0, "the window never opened");
    // The queue polls one window after its last request, then sleeps until kicked. Two
    // seconds of polling on would be two seconds of CPU.
    let before = cpu_ticks(&backend);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(&backend) - before;
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let elapsed_ticks = start.elapsed().as_secs_f64() * ticks_per_s as f64;
    assert!(
        (used as f64) < elapsed_ticks * 0.05,
        "an idle daemon used {used} of {elapsed_ticks:.0} clock ticks"
    );
}
