//! `relay`: joins pairs of unix sockets, for the two-guest stress
//! (qemu/stress.sh --two-guests). Each guest's QEMU connects its
//! `leasefs.agent` and `leasefs.peer` virtio-serial ports to sockets the
//! relay listens on; the relay copies bytes between guest A's agent port and
//! guest B's peer port, and between B's agent port and A's peer port. So
//! each guest's stress asks the other guest (not the host) to make its
//! changes, and the reply comes back only after the other guest's system
//! calls returned.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

fn bind(p: &PathBuf) -> Result<UnixListener, String> {
    if let Ok(st) = crate::sys::lstat(p) {
        if crate::sys::file_type(&st) != libc::S_IFSOCK {
            return Err(format!("{} exists and is not a socket", p.display()));
        }
        let _ = std::fs::remove_file(p);
    }
    // Bind under a temporary name and rename it into place once listening,
    // so whoever waits for the path never connects before listen().
    let mut tmp = p.clone().into_os_string();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp).map_err(|e| format!("bind {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, p)
        .map_err(|e| format!("rename {} to {}: {e}", tmp.display(), p.display()))?;
    Ok(l)
}

fn copy(mut from: UnixStream, mut to: UnixStream, what: String) {
    let mut buf = vec![0u8; 65536];
    let (mut bytes, mut lines) = (0u64, 0u64);
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                bytes += n as u64;
                lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                if let Err(e) = to.write_all(&buf[..n]) {
                    eprintln!("relay: {what}: write: {e}");
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("relay: {what}: read: {e}");
                break;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    eprintln!("relay: {what}: closed after {bytes} bytes, {lines} lines");
}

/// The `relay` subcommand: listens on every socket of every pair, accepts one
/// connection on each, then copies both ways within each pair until all
/// connections have ended. Returns the exit code.
pub fn main(pairs: Vec<(PathBuf, PathBuf)>) -> i32 {
    let mut listeners = Vec::new();
    for (a, b) in &pairs {
        for p in [a, b] {
            match bind(p) {
                Ok(l) => listeners.push((p.clone(), l)),
                Err(e) => {
                    eprintln!("relay: {e}");
                    return 1;
                }
            }
        }
    }
    println!(
        "relay: listening on {}",
        listeners
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = std::io::stdout().flush();
    let mut streams = Vec::new();
    for (p, l) in &listeners {
        match l.accept() {
            Ok((s, _)) => {
                eprintln!("relay: {} connected", p.display());
                streams.push(s);
            }
            Err(e) => {
                eprintln!("relay: accept on {}: {e}", p.display());
                return 1;
            }
        }
    }
    for (p, _) in &listeners {
        let _ = std::fs::remove_file(p);
    }
    let mut threads = Vec::new();
    let mut it = streams.into_iter();
    for (a, b) in &pairs {
        let (sa, sb) = (it.next().unwrap(), it.next().unwrap());
        let (sa2, sb2) = match (sa.try_clone(), sb.try_clone()) {
            (Ok(x), Ok(y)) => (x, y),
            _ => {
                eprintln!("relay: cannot clone a socket");
                return 1;
            }
        };
        let (an, bn) = (a.display().to_string(), b.display().to_string());
        let w1 = format!("{an} -> {bn}");
        let w2 = format!("{bn} -> {an}");
        threads.push(std::thread::spawn(move || copy(sa, sb, w1)));
        threads.push(std::thread::spawn(move || copy(sb2, sa2, w2)));
    }
    for t in threads {
        let _ = t.join();
    }
    eprintln!("relay: all connections ended");
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    #[test]
    fn relays_both_ways() {
        let d = std::env::temp_dir().join(format!("gt-relay-{}", crate::sys::random_hex()));
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a.sock"), d.join("b.sock"));
        let (a2, b2) = (a.clone(), b.clone());
        let t = std::thread::spawn(move || main(vec![(a2, b2)]));
        let start = Instant::now();
        while !(a.exists() && b.exists()) {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut ca = UnixStream::connect(&a).unwrap();
        let mut cb = UnixStream::connect(&b).unwrap();
        ca.write_all(b"to b\n").unwrap();
        cb.write_all(b"to a\n").unwrap();
        let mut line = String::new();
        BufReader::new(cb.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "to b\n");
        line.clear();
        BufReader::new(ca.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "to a\n");
        drop(ca);
        drop(cb);
        assert_eq!(t.join().unwrap(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
