//! Big directories, deep paths, and unusual names.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use crate::harness::{Ctx, TResult};
use crate::sys::{self, expect_errno, path_from_bytes, Fd, OpExt};
use crate::{ensure, ensure_eq};
use libc::{O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_WRONLY};

const N: usize = 10_000;

fn check_listing(got: &[sys::DirEnt], want: &HashSet<Vec<u8>>, what: &str) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut dups = Vec::new();
    let mut extra = Vec::new();
    for e in got {
        if !seen.insert(e.name.clone()) {
            dups.push(String::from_utf8_lossy(&e.name).into_owned());
        } else if !want.contains(&e.name) {
            extra.push(String::from_utf8_lossy(&e.name).into_owned());
        }
    }
    let missing: Vec<String> = want
        .iter()
        .filter(|n| !seen.contains(*n))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    let show = |v: &[String]| -> String {
        let mut s: Vec<&String> = v.iter().take(5).collect();
        s.sort();
        format!("{} e.g. {:?}", v.len(), s)
    };
    ensure!(dups.is_empty(), "{what}: duplicate names: {}", show(&dups));
    ensure!(
        missing.is_empty(),
        "{what}: missing names: {}",
        show(&missing)
    );
    ensure!(
        extra.is_empty(),
        "{what}: unexpected names: {}",
        show(&extra)
    );
    ensure_eq!(got.len(), want.len(), "{what}: entry count");
    Ok(())
}

pub fn dir_10000(c: &mut Ctx) -> TResult {
    let d = c.p("big");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    let dfd = sys::open(&d, O_RDONLY | O_DIRECTORY, 0).op("open dir")?;
    let mut want = HashSet::new();
    for i in 0..N {
        // Varying lengths, so entries pack unevenly into readdir buffers.
        let name = format!("entry-{i:05}-{}", "x".repeat(i % 37));
        sys::openat(&dfd, &name, O_WRONLY | O_CREAT | O_EXCL, 0o644)
            .op(format!("create {name} (#{i})"))?;
        want.insert(name.into_bytes());
    }
    let got = sys::list_dir(&d).op("readdir")?;
    check_listing(&got, &want, "readdir of 10000 entries")?;
    // d_type and d_ino agree with stat for a sample.
    for e in got.iter().step_by(997) {
        let st = sys::fstatat(&dfd, path_from_bytes(&e.name), libc::AT_SYMLINK_NOFOLLOW)
            .op("fstatat sample")?;
        ensure!(
            e.dtype == libc::DT_REG || e.dtype == libc::DT_UNKNOWN,
            "d_type {} for a regular file",
            e.dtype
        );
        ensure_eq!(
            e.ino,
            st.st_ino,
            "d_ino vs st_ino of {:?}",
            String::from_utf8_lossy(&e.name)
        );
    }
    // A second pass gives the same set (no stale cursor state).
    let again = sys::list_dir(&d).op("readdir again")?;
    check_listing(&again, &want, "second readdir")?;
    // Remove half, list, remove the rest.
    for (i, name) in want.iter().enumerate() {
        if i % 2 == 0 {
            sys::unlinkat(&dfd, path_from_bytes(name), 0)
                .op(format!("unlink {}", String::from_utf8_lossy(name)))?;
        }
    }
    let half: HashSet<Vec<u8>> = want
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, n)| n.clone())
        .collect();
    check_listing(
        &sys::list_dir(&d).op("readdir after removing half")?,
        &half,
        "after removing half",
    )?;
    for name in &half {
        sys::unlinkat(&dfd, path_from_bytes(name), 0)
            .op(format!("unlink {}", String::from_utf8_lossy(name)))?;
    }
    let rest = sys::list_dir(&d).op("readdir after removing all")?;
    ensure!(
        rest.is_empty(),
        "{} entries left after removing all",
        rest.len()
    );
    drop(dfd);
    sys::rmdir(&d).op("rmdir emptied big dir")?;
    Ok(())
}

pub fn deep_paths(c: &mut Ctx) -> TResult {
    const DEPTH: usize = 100;
    let mut fds: Vec<Fd> = vec![c.dirfd()?];
    let mut names = Vec::new();
    let mut full = c.dir.clone();
    for i in 0..DEPTH {
        let name = format!("level-{i:03}-abcdefgh");
        let parent = fds.last().unwrap();
        sys::mkdirat(parent, &name, 0o755).op(format!("mkdirat depth {i}"))?;
        let fd = sys::openat(parent, &name, O_RDONLY | O_DIRECTORY, 0)
            .op(format!("openat depth {i}"))?;
        full.push(&name);
        names.push(name);
        fds.push(fd);
    }
    let rel_len: usize = names.iter().map(|n| n.len() + 1).sum();
    ensure!(rel_len > 1000, "path only {rel_len} bytes");
    let bottom = fds.last().unwrap();
    let data = b"at the bottom of a very deep tree";
    {
        let f = sys::openat(bottom, "leaf.txt", O_WRONLY | O_CREAT | O_EXCL, 0o644)
            .op("create leaf at depth 100")?;
        sys::write_all(&f, data).op("write leaf")?;
    }
    let f = sys::openat(bottom, "leaf.txt", O_RDONLY, 0).op("open leaf")?;
    ensure_eq!(
        sys::read_to_end(&f).op("read leaf")?,
        data.to_vec(),
        "leaf content via openat"
    );
    // The full path (under PATH_MAX) works too.
    let leaf = full.join("leaf.txt");
    ensure!(leaf.as_os_str().len() > 1000, "full path is short");
    ensure_eq!(
        sys::read_file(&leaf).op("read leaf by full path")?,
        data.to_vec(),
        "leaf via full path"
    );
    // getcwd at the bottom.
    let saved = sys::open(".", O_RDONLY | O_DIRECTORY, 0).op("open cwd")?;
    let cwd_ok = (|| -> Result<(), String> {
        let r = unsafe { libc::fchdir(bottom.as_raw_fd()) };
        ensure!(r == 0, "fchdir to depth 100: {}", sys::Errno::last());
        let cwd = std::env::current_dir().op("getcwd at depth 100")?;
        ensure_eq!(cwd, full, "getcwd at depth 100");
        ensure_eq!(
            sys::read_file("leaf.txt").op("read leaf relative to cwd")?,
            data.to_vec(),
            "leaf via cwd"
        );
        let up: PathBuf = "../".repeat(DEPTH).into();
        let top = sys::stat(&up).op("stat ../ x100")?;
        let dir = sys::stat(&c.dir).op("stat test dir")?;
        ensure_eq!(
            (top.st_dev, top.st_ino),
            (dir.st_dev, dir.st_ino),
            "100 levels of '..'"
        );
        Ok(())
    })();
    unsafe { libc::fchdir(saved.as_raw_fd()) };
    cwd_ok?;
    // Tear down bottom-up.
    sys::unlinkat(bottom, "leaf.txt", 0).op("unlink leaf")?;
    drop(f);
    for i in (0..DEPTH).rev() {
        fds.pop();
        sys::unlinkat(fds.last().unwrap(), &names[i], libc::AT_REMOVEDIR)
            .op(format!("rmdir depth {i}"))?;
    }
    ensure!(
        sys::list_dir(&c.dir).op("readdir")?.is_empty(),
        "test dir not empty after teardown"
    );
    Ok(())
}

fn roundtrip_names(c: &Ctx, names: &[Vec<u8>]) -> Result<(), String> {
    let dfd = c.dirfd()?;
    for n in names {
        let p = path_from_bytes(n);
        let f = sys::openat(&dfd, &p, O_WRONLY | O_CREAT | O_EXCL, 0o644)
            .op(format!("create {:?}", String::from_utf8_lossy(n)))?;
        sys::write_all(&f, n).op("write name into file")?;
    }
    let want: HashSet<Vec<u8>> = names.iter().cloned().collect();
    check_listing(
        &sys::list_dir(&c.dir).op("readdir")?,
        &want,
        "listing of special names",
    )?;
    for n in names {
        let p = c.dir.join(path_from_bytes(n));
        let got = sys::read_file(&p).op(format!("read {:?}", String::from_utf8_lossy(n)))?;
        ensure!(
            got == *n,
            "content of {:?} is wrong",
            String::from_utf8_lossy(n)
        );
        let st = sys::stat(&p).op("stat")?;
        ensure_eq!(
            st.st_size as usize,
            n.len(),
            "size of {:?}",
            String::from_utf8_lossy(n)
        );
    }
    // Rename each to a variant, check, and remove.
    for n in names {
        let mut m = n.clone();
        m.extend_from_slice("-ré✓".as_bytes());
        let (a, b) = (
            c.dir.join(path_from_bytes(n)),
            c.dir.join(path_from_bytes(&m)),
        );
        sys::rename(&a, &b).op(format!("rename {:?}", String::from_utf8_lossy(n)))?;
        expect_errno(sys::stat(&a), &[libc::ENOENT], "old name after rename")?;
        ensure!(
            sys::read_file(&b).op("read renamed")? == *n,
            "content after renaming {:?}",
            String::from_utf8_lossy(n)
        );
        sys::unlink(&b).op("unlink renamed")?;
    }
    ensure!(
        sys::list_dir(&c.dir).op("readdir")?.is_empty(),
        "names left behind"
    );
    Ok(())
}

pub fn names_utf8(c: &mut Ctx) -> TResult {
    let names: Vec<Vec<u8>> = [
        "héllo wörld ✓",
        "日本語のファイル名",
        "emoji 🦀🎉👩‍👩‍👧",
        "Ελληνικά και кириллица",
        "ﬁ ligature and combining é",
        "עברית العربية",
        "😀",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    roundtrip_names(c, &names)?;
    // Directories with UTF-8 names, nested.
    let d = c.p("répertoire ✓/子ディレクトリ");
    sys::mkdir(c.p("répertoire ✓"), 0o755).op("mkdir utf8")?;
    sys::mkdir(&d, 0o755).op("mkdir nested utf8")?;
    sys::write_file(d.join("🦀.txt"), b"crab").op("create in utf8 dir")?;
    ensure_eq!(
        sys::read_file(d.join("🦀.txt")).op("read")?,
        b"crab".to_vec(),
        "nested utf8 file"
    );
    Ok(())
}

pub fn names_special(c: &mut Ctx) -> TResult {
    let mut names: Vec<Vec<u8>> = [
        "with space",
        " leading space",
        "trailing space ",
        "new\nline",
        "\nstarts with newline",
        "tab\there",
        "back\\slash",
        "quote\"'`",
        "-dash",
        ".hidden",
        "..dots..",
        "...",
        "a:b;c|d&e",
        "*?[]{}$",
        "%s%n%x",
        "#hash~",
        "\x01\x02\x7f control",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Not valid UTF-8: names are bytes.
    names.push(b"latin1-\xe9t\xe9".to_vec());
    names.push(b"\xff\xfe invalid".to_vec());
    roundtrip_names(c, &names)?;
    Ok(())
}

pub fn names_length(c: &mut Ctx) -> TResult {
    let n255 = "a".repeat(255);
    let n256 = "b".repeat(256);
    // 255 bytes of multi-byte UTF-8 (127 x 2 bytes + 1).
    let u255 = "é".repeat(127) + "z";
    let u256 = "é".repeat(128);
    assert_eq!((u255.len(), u256.len()), (255, 256));
    for n in [&n255, &u255] {
        let p = c.p(n);
        sys::write_file(&p, b"long").op(format!("create {}-byte name", n.len()))?;
        ensure_eq!(
            sys::read_file(&p).op("read 255-byte name")?,
            b"long".to_vec(),
            "content"
        );
        ensure!(sys::stat(&p).is_ok(), "stat of 255-byte name failed");
        let listed = sys::list_dir(&c.dir)
            .op("readdir")?
            .iter()
            .any(|e| e.name == n.as_bytes());
        ensure!(listed, "255-byte name not listed by readdir");
        sys::mkdir(c.p(format!("d{}", &n[..n.len() - 1])), 0o755).op("mkdir 255-byte name")?;
        sys::rename(&p, c.p(format!("{}x", &n[..n.len() - 1]))).op("rename to 255-byte name")?;
    }
    for n in [&n256, &u256] {
        let p = c.p(n);
        let what = |op: &str| format!("{op} with a {}-byte name", n.len());
        expect_errno(
            sys::open(&p, O_WRONLY | O_CREAT, 0o644),
            &[libc::ENAMETOOLONG],
            &what("create"),
        )?;
        expect_errno(sys::mkdir(&p, 0o755), &[libc::ENAMETOOLONG], &what("mkdir"))?;
        expect_errno(sys::stat(&p), &[libc::ENAMETOOLONG], &what("stat"))?;
        expect_errno(
            sys::symlink("x", &p),
            &[libc::ENAMETOOLONG],
            &what("symlink"),
        )?;
        let src = c.p("short");
        sys::write_file(&src, b"").op("create short")?;
        expect_errno(
            sys::rename(&src, &p),
            &[libc::ENAMETOOLONG],
            &what("rename to"),
        )?;
        expect_errno(sys::link(&src, &p), &[libc::ENAMETOOLONG], &what("link to"))?;
        sys::unlink(&src).op("unlink short")?;
    }
    // No 256-byte entry may exist.
    let long: Vec<String> = sys::list_dir(&c.dir)
        .op("readdir")?
        .iter()
        .filter(|e| e.name.len() > 255)
        .map(|e| String::from_utf8_lossy(&e.name[..20]).into_owned())
        .collect();
    ensure!(
        long.is_empty(),
        "entries longer than 255 bytes exist: {long:?}"
    );
    Ok(())
}
