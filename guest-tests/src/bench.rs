//! `bench-tree`: cached re-reads of a small file tree, run inside the guest.
//!
//! The tree (made on the host with `bench-tree --create`, see
//! qemu/bench-tree.sh) is `FILES` files of `SIZE` bytes spread over
//! `DIRS` subdirectories: `dNN/fNNNN`, file k in directory k % DIRS, with
//! content a deterministic function of k (so the guest can check it without
//! a manifest).
//!
//! In the guest: one cold pass (open, read, close every file; each file's
//! checksum must match the content the host wrote, or the run fails), then
//! `ROUNDS` timed warm passes, each a walk of the tree the way a stock tool
//! does it: readdir the top directory, readdir each subdirectory, and for
//! each file stat(path), open(path), read to EOF, close. Files are named by
//! full path, so every path component is looked up each time. Finally an
//! untimed pass checks the content again (a daemon serving wrong data from a
//! cache must not pass). Prints one JSON line:
//!
//!   {"files":200,"bytes":3276800,"cold_ms":..,"warm_ms_median":..,
//!    "warm_ms_p10":..,"warm_ms_p90":..,"rounds":20}
//!
//! `bytes` is the data read by one pass. Times come from
//! clock_gettime(CLOCK_MONOTONIC).

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// Subdirectories in the tree (fewer if there are fewer files).
pub const DIRS: usize = 10;

pub struct Opts {
    pub dir: PathBuf,
    pub files: usize,
    pub size: usize,
    pub rounds: usize,
    /// Host side: create the tree instead of reading it.
    pub create: bool,
}

fn ndirs(files: usize) -> usize {
    DIRS.min(files).max(1)
}

fn dir_name(j: usize) -> String {
    format!("d{j:02}")
}

fn file_name(k: usize) -> String {
    format!("f{k:04}")
}

/// Path of file k relative to the tree root.
fn rel_path(k: usize, files: usize) -> String {
    format!("{}/{}", dir_name(k % ndirs(files)), file_name(k))
}

/// Content of file k: xorshift64* words seeded by k, little endian.
fn content(k: usize, size: usize) -> Vec<u8> {
    let mut s: u64 = (k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(size);
    out
}

/// A cheap checksum: FNV-style over 8-byte words, then the tail bytes, then the length.
fn checksum(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h = (h ^ b as u64).wrapping_mul(PRIME);
    }
    (h ^ data.len() as u64).wrapping_mul(PRIME)
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

fn cstr(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).expect("path with a NUL byte")
}

/// stat(path) -> st_size.
fn stat_size(p: &CStr) -> Result<u64, String> {
    // SAFETY: zeroed stat is a valid out buffer; p is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::stat(p.as_ptr(), &mut st) } != 0 {
        return Err(format!("stat {p:?}: {}", errno_str()));
    }
    Ok(st.st_size as u64)
}

/// open(path), read to EOF into buf (returns the length), close.
fn read_whole(p: &CStr, buf: &mut Vec<u8>) -> Result<usize, String> {
    // SAFETY: p is NUL-terminated.
    let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {p:?}: {}", errno_str()));
    }
    let mut len = 0usize;
    let res = loop {
        if buf.len() - len < 65536 {
            buf.resize(len + 65536, 0);
        }
        // SAFETY: the destination range lies inside buf.
        let n = unsafe {
            libc::read(
                fd,
                buf[len..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - len,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break Err(format!("read {p:?}: {}", errno_str()));
        }
        if n == 0 {
            break Ok(len);
        }
        len += n as usize;
    };
    // SAFETY: fd is ours.
    if unsafe { libc::close(fd) } != 0 && res.is_ok() {
        return Err(format!("close {p:?}: {}", errno_str()));
    }
    res
}

/// readdir(path): the names, without "." and "..".
fn list_dir(p: &CStr) -> Result<Vec<CString>, String> {
    // SAFETY: p is NUL-terminated; the DIR* is used only here and closed.
    let d = unsafe { libc::opendir(p.as_ptr()) };
    if d.is_null() {
        return Err(format!("opendir {p:?}: {}", errno_str()));
    }
    let mut names = Vec::new();
    loop {
        // SAFETY: d is open; the entry is valid until the next readdir.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b != b"." && b != b".." {
            names.push(name.to_owned());
        }
    }
    unsafe { libc::closedir(d) };
    Ok(names)
}

fn join(dir: &CStr, name: &CStr) -> CString {
    let mut v = dir.to_bytes().to_vec();
    v.push(b'/');
    v.extend_from_slice(name.to_bytes());
    CString::new(v).unwrap()
}

/// One pass over the files by name (no readdir), checking every file's
/// checksum against `expect`. Returns the bytes read.
fn checked_pass(o: &Opts, expect: &[u64], buf: &mut Vec<u8>) -> Result<u64, String> {
    let mut bytes = 0u64;
    for (k, &want) in expect.iter().enumerate() {
        let p = cstr(&o.dir.join(rel_path(k, o.files)));
        let n = read_whole(&p, buf)?;
        let got = checksum(&buf[..n]);
        if n != o.size || got != want {
            return Err(format!(
                "wrong data in {p:?}: {n} bytes, checksum {got:016x}; expected {} bytes, checksum {want:016x}",
                o.size
            ));
        }
        bytes += n as u64;
    }
    Ok(bytes)
}

/// One warm pass: readdir walk, then stat + open + read + close per file.
/// Returns (files, bytes).
fn walk_pass(root: &CStr, buf: &mut Vec<u8>) -> Result<(usize, u64), String> {
    let (mut files, mut bytes) = (0usize, 0u64);
    for sub in list_dir(root)? {
        let subp = join(root, &sub);
        for name in list_dir(&subp)? {
            let p = join(&subp, &name);
            let size = stat_size(&p)?;
            let n = read_whole(&p, buf)?;
            if n as u64 != size {
                return Err(format!("{p:?}: stat says {size} bytes, read {n}"));
            }
            files += 1;
            bytes += n as u64;
        }
    }
    Ok((files, bytes))
}

/// Percentile of sorted values, linear interpolation between closest ranks.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn create_tree(o: &Opts) -> Result<(), String> {
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("mkdir {}: {e}", o.dir.display()))?;
    for j in 0..ndirs(o.files) {
        let d = o.dir.join(dir_name(j));
        std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    }
    for k in 0..o.files {
        let p = o.dir.join(rel_path(k, o.files));
        std::fs::write(&p, content(k, o.size))
            .map_err(|e| format!("write {}: {e}", p.display()))?;
    }
    eprintln!(
        "bench-tree: created {} files of {} bytes in {} directories under {}",
        o.files,
        o.size,
        ndirs(o.files),
        o.dir.display()
    );
    Ok(())
}

fn bench(o: &Opts) -> Result<String, String> {
    let expect: Vec<u64> = (0..o.files)
        .map(|k| checksum(&content(k, o.size)))
        .collect();
    let mut buf = Vec::with_capacity(o.size.max(65536) + 65536);
    let root = cstr(&o.dir);

    let t0 = now_ns();
    let bytes = checked_pass(o, &expect, &mut buf)?;
    let cold_ms = (now_ns() - t0) as f64 / 1e6;

    let mut warm = Vec::with_capacity(o.rounds);
    for r in 0..o.rounds {
        let t0 = now_ns();
        let (files, b) = walk_pass(&root, &mut buf)?;
        warm.push((now_ns() - t0) as f64 / 1e6);
        if files != o.files || b != bytes {
            return Err(format!(
                "warm round {r}: walked {files} files / {b} bytes, expected {} / {bytes} (is the tree from bench-tree --create with the same --files/--size?)",
                o.files
            ));
        }
    }
    // The cache must still hold the right data.
    checked_pass(o, &expect, &mut buf)?;

    let mut sorted = warm.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "bench-tree: warm rounds (ms): {}",
        warm.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(format!(
        "{{\"files\":{},\"bytes\":{},\"cold_ms\":{:.3},\"warm_ms_median\":{:.3},\"warm_ms_p10\":{:.3},\"warm_ms_p90\":{:.3},\"rounds\":{}}}",
        o.files,
        bytes,
        cold_ms,
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.1),
        percentile(&sorted, 0.9),
        o.rounds
    ))
}

pub fn main(o: Opts) -> i32 {
    if o.create {
        return match create_tree(&o) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("bench-tree: error: {e}");
                1
            }
        };
    }
    match bench(&o) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("bench-tree: FAIL: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_content() {
        assert_eq!(rel_path(0, 200), "d00/f0000");
        assert_eq!(rel_path(123, 200), "d03/f0123");
        assert_eq!(content(5, 16384), content(5, 16384));
        assert_ne!(checksum(&content(5, 16384)), checksum(&content(6, 16384)));
        assert_eq!(content(1, 13).len(), 13);
        let s = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&s, 0.5), 3.0);
        assert_eq!(percentile(&s, 0.1), 1.4);
    }

    #[test]
    fn create_then_bench() {
        let dir = std::env::temp_dir().join(format!("bench-tree-test-{}", std::process::id()));
        let o = Opts {
            dir: dir.clone(),
            files: 23,
            size: 1000,
            rounds: 3,
            create: true,
        };
        create_tree(&o).unwrap();
        let line = bench(&Opts { create: false, ..o }).unwrap();
        assert!(line.starts_with("{\"files\":23,\"bytes\":23000,"), "{line}");
        std::fs::write(dir.join(rel_path(7, 23)), vec![0u8; 1000]).unwrap();
        let err = bench(&Opts {
            dir: dir.clone(),
            files: 23,
            size: 1000,
            rounds: 1,
            create: false,
        })
        .unwrap_err();
        assert!(err.contains("wrong data"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
