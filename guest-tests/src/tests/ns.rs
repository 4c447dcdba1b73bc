//! Namespace operations: create, mkdir/rmdir, unlink, rename(2)/renameat2,
//! link, symlink, mknod, O_EXCL, ENOENT cases, O_TMPFILE.

use std::os::fd::AsRawFd;

use crate::harness::{note, skip, Ctx, TErr, TResult};
use crate::sys::{self, expect_errno, file_type, type_name, OpExt};
use crate::{ensure, ensure_eq};
use libc::{O_CREAT, O_EXCL, O_RDONLY, O_RDWR, O_WRONLY, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG};

fn names(dir: &std::path::Path) -> Result<Vec<String>, String> {
    let mut v: Vec<String> = sys::list_dir(dir)
        .op(format!("readdir {}", sys::show(dir)))?
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    v.sort();
    Ok(v)
}

fn content(p: &std::path::Path) -> Result<Vec<u8>, String> {
    sys::read_file(p).op(format!("read {}", sys::show(p)))
}

pub fn create(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::open(&p, O_WRONLY | O_CREAT, 0o644).op("open O_CREAT")?;
    let st = sys::fstat(&fd).op("fstat")?;
    ensure_eq!(
        (file_type(&st), st.st_size),
        (S_IFREG, 0),
        "new file type/size"
    );
    // O_CREAT without O_EXCL on an existing file opens it.
    sys::write_all(&fd, b"abc").op("write")?;
    let fd2 = sys::open(&p, O_RDWR | O_CREAT, 0o600).op("open O_CREAT existing")?;
    let st2 = sys::fstat(&fd2).op("fstat 2")?;
    ensure_eq!(st2.st_ino, st.st_ino, "O_CREAT on existing file: inode");
    ensure_eq!(st2.st_size, 3, "O_CREAT on existing file keeps data");
    ensure_eq!(st2.st_mode & 0o777, 0o644, "O_CREAT on existing keeps mode");
    // mknod S_IFREG creates a regular file too.
    sys::mknod(c.p("g"), S_IFREG | 0o600, 0).op("mknod S_IFREG")?;
    let st = sys::stat(c.p("g")).op("stat g")?;
    ensure_eq!(st.st_mode, S_IFREG | 0o600, "mknod S_IFREG mode");
    ensure_eq!(names(&c.dir)?, vec!["f", "g"], "directory listing");
    // openat with a directory descriptor.
    let dfd = c.dirfd()?;
    sys::openat(&dfd, "h", O_WRONLY | O_CREAT | O_EXCL, 0o644).op("openat O_CREAT")?;
    ensure!(
        sys::exists(c.p("h")),
        "file created by openat not found by path"
    );
    Ok(())
}

pub fn mkdir_rmdir(c: &mut Ctx) -> TResult {
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    ensure_eq!(
        file_type(&sys::stat(&d).op("stat")?),
        S_IFDIR,
        "type of new dir"
    );
    expect_errno(sys::mkdir(&d, 0o755), &[libc::EEXIST], "mkdir existing")?;
    sys::write_file(d.join("f"), b"x").op("create d/f")?;
    sys::mkdir(d.join("sub"), 0o755).op("mkdir d/sub")?;
    expect_errno(sys::rmdir(&d), &[libc::ENOTEMPTY], "rmdir non-empty dir")?;
    expect_errno(sys::rmdir(d.join("f")), &[libc::ENOTDIR], "rmdir of a file")?;
    expect_errno(
        sys::unlink(d.join("sub")),
        &[libc::EISDIR],
        "unlink of a dir",
    )?;
    expect_errno(
        sys::mkdir(c.p("nope/x"), 0o755),
        &[libc::ENOENT],
        "mkdir in missing parent",
    )?;
    expect_errno(
        sys::mkdir(d.join("f/x"), 0o755),
        &[libc::ENOTDIR],
        "mkdir under a file",
    )?;
    sys::rmdir(d.join("sub")).op("rmdir d/sub")?;
    expect_errno(
        sys::rmdir(&d),
        &[libc::ENOTEMPTY],
        "rmdir dir with one file",
    )?;
    sys::unlink(d.join("f")).op("unlink d/f")?;
    sys::rmdir(&d).op("rmdir emptied dir")?;
    expect_errno(sys::stat(&d), &[libc::ENOENT], "stat removed dir")?;
    expect_errno(sys::rmdir(&d), &[libc::ENOENT], "rmdir removed dir")?;
    // Recreate with the same name.
    sys::mkdir(&d, 0o700).op("mkdir again")?;
    ensure_eq!(
        sys::stat(&d).op("stat")?.st_mode & 0o777,
        0o700,
        "mode of recreated dir"
    );
    ensure!(names(&d)?.is_empty(), "recreated dir is not empty");
    Ok(())
}

pub fn unlink(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, b"hello").op("create")?;
    let fd = sys::open(&p, O_RDWR, 0).op("open")?;
    sys::unlink(&p).op("unlink")?;
    expect_errno(sys::stat(&p), &[libc::ENOENT], "stat after unlink")?;
    expect_errno(
        sys::open(&p, O_RDONLY, 0),
        &[libc::ENOENT],
        "open after unlink",
    )?;
    expect_errno(sys::unlink(&p), &[libc::ENOENT], "second unlink")?;
    ensure!(
        !names(&c.dir)?.contains(&"f".to_string()),
        "unlinked name still listed"
    );
    // The open descriptor keeps working.
    let st = sys::fstat(&fd).op("fstat unlinked")?;
    ensure_eq!(st.st_nlink, 0, "nlink of an open unlinked file");
    ensure_eq!(
        sys::pread_full(&fd, 0, 100).op("pread unlinked")?,
        b"hello".to_vec(),
        "read from unlinked open file"
    );
    sys::pwrite_all(&fd, b" world", 5).op("pwrite unlinked")?;
    ensure_eq!(
        sys::pread_full(&fd, 0, 100).op("pread unlinked")?,
        b"hello world".to_vec(),
        "write+read on unlinked open file"
    );
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        11,
        "size of unlinked file"
    );
    // A new file with the same name is a different file.
    sys::write_file(&p, b"new").op("recreate")?;
    ensure_eq!(content(&p)?, b"new".to_vec(), "recreated file content");
    ensure_eq!(
        sys::pread_full(&fd, 0, 100).op("pread old")?,
        b"hello world".to_vec(),
        "old unlinked file after name reuse"
    );
    // Unlinking a symlink removes the link only.
    sys::symlink("f", c.p("l")).op("symlink")?;
    sys::unlink(c.p("l")).op("unlink symlink")?;
    ensure_eq!(
        content(&p)?,
        b"new".to_vec(),
        "target after unlinking its symlink"
    );
    Ok(())
}

pub fn rename_file(c: &mut Ctx) -> TResult {
    let (a, b) = (c.p("a"), c.p("b"));
    sys::write_file(&a, b"content-a").op("create a")?;
    let ino = sys::stat(&a).op("stat a")?.st_ino;
    sys::rename(&a, &b).op("rename a b")?;
    expect_errno(sys::stat(&a), &[libc::ENOENT], "stat old name")?;
    let st = sys::stat(&b).op("stat new name")?;
    ensure_eq!(st.st_ino, ino, "inode after rename");
    ensure_eq!(content(&b)?, b"content-a".to_vec(), "content after rename");
    ensure_eq!(names(&c.dir)?, vec!["b"], "listing after rename");
    // Rename to itself is a no-op.
    sys::rename(&b, &b).op("rename b b")?;
    ensure_eq!(
        content(&b)?,
        b"content-a".to_vec(),
        "content after self-rename"
    );
    // Into a subdirectory and back out.
    sys::mkdir(c.p("d"), 0o755).op("mkdir d")?;
    sys::rename(&b, c.p("d/x")).op("rename into subdir")?;
    ensure_eq!(
        content(&c.p("d/x"))?,
        b"content-a".to_vec(),
        "content in subdir"
    );
    sys::rename(c.p("d/x"), &a).op("rename out of subdir")?;
    ensure_eq!(
        sys::stat(&a).op("stat")?.st_ino,
        ino,
        "inode after two moves"
    );
    ensure!(
        names(&c.p("d"))?.is_empty(),
        "subdir not empty after moving out"
    );
    expect_errno(
        sys::rename(c.p("missing"), c.p("z")),
        &[libc::ENOENT],
        "rename missing source",
    )?;
    expect_errno(
        sys::rename(&a, c.p("nodir/z")),
        &[libc::ENOENT],
        "rename into missing dir",
    )?;
    Ok(())
}

pub fn rename_dir(c: &mut Ctx) -> TResult {
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir d")?;
    sys::mkdir(d.join("sub"), 0o755).op("mkdir d/sub")?;
    sys::write_file(d.join("sub/f"), b"deep").op("create d/sub/f")?;
    let e = c.p("e");
    sys::rename(&d, &e).op("rename dir d e")?;
    expect_errno(sys::stat(&d), &[libc::ENOENT], "stat old dir name")?;
    ensure_eq!(
        content(&e.join("sub/f"))?,
        b"deep".to_vec(),
        "file under renamed dir"
    );
    expect_errno(
        sys::stat(d.join("sub/f")),
        &[libc::ENOENT],
        "old path of file in renamed dir",
    )?;
    // Into its own subdirectory: EINVAL.
    expect_errno(
        sys::rename(&e, e.join("sub/loop")),
        &[libc::EINVAL],
        "rename dir into its own subdir",
    )?;
    // Over an empty directory: replaces it.
    let empty = c.p("empty");
    sys::mkdir(&empty, 0o755).op("mkdir empty")?;
    sys::rename(&e, &empty).op("rename dir over empty dir")?;
    ensure_eq!(
        content(&empty.join("sub/f"))?,
        b"deep".to_vec(),
        "after replacing empty dir"
    );
    // Over a non-empty directory: ENOTEMPTY (or EEXIST).
    let full = c.p("full");
    sys::mkdir(&full, 0o755).op("mkdir full")?;
    sys::write_file(full.join("x"), b"").op("create full/x")?;
    expect_errno(
        sys::rename(&empty, &full),
        &[libc::ENOTEMPTY, libc::EEXIST],
        "rename dir over non-empty dir",
    )?;
    // Dir over file and file over dir.
    let f = c.p("file");
    sys::write_file(&f, b"").op("create file")?;
    expect_errno(
        sys::rename(&empty, &f),
        &[libc::ENOTDIR],
        "rename dir over file",
    )?;
    expect_errno(
        sys::rename(&f, &full),
        &[libc::EISDIR],
        "rename file over dir",
    )?;
    // Parent link count follows a directory moving between parents.
    let before = sys::stat(&full).op("stat full")?.st_nlink;
    sys::rename(&empty, full.join("moved")).op("move dir into full")?;
    let after = sys::stat(&full).op("stat full")?.st_nlink;
    ensure!(
        after == before + 1 || (before == 1 && after == 1),
        "nlink of new parent {before} -> {after} after moving a dir in"
    );
    ensure_eq!(
        content(&full.join("moved/sub/f"))?,
        b"deep".to_vec(),
        "file after dir move"
    );
    // ".." of the moved dir is the new parent.
    let dotdot = sys::stat(full.join("moved/..")).op("stat moved/..")?;
    ensure_eq!(
        dotdot.st_ino,
        sys::stat(&full).op("stat")?.st_ino,
        "moved dir's '..'"
    );
    Ok(())
}

pub fn rename_replace(c: &mut Ctx) -> TResult {
    let (a, b) = (c.p("a"), c.p("b"));
    sys::write_file(&a, b"AAAA").op("create a")?;
    sys::write_file(&b, b"BBBBBBBB").op("create b")?;
    let ino_a = sys::stat(&a).op("stat a")?.st_ino;
    let old_b = sys::open(&b, O_RDONLY, 0).op("open b")?;
    sys::rename(&a, &b).op("rename a over b")?;
    expect_errno(sys::stat(&a), &[libc::ENOENT], "stat a after rename")?;
    let st = sys::stat(&b).op("stat b")?;
    ensure_eq!(st.st_ino, ino_a, "inode of b after replace");
    ensure_eq!(st.st_size, 4, "size of b after replace");
    ensure_eq!(content(&b)?, b"AAAA".to_vec(), "content of b after replace");
    // The replaced file lives on through its descriptor.
    ensure_eq!(
        sys::pread_full(&old_b, 0, 100).op("read replaced file")?,
        b"BBBBBBBB".to_vec(),
        "replaced file via open fd"
    );
    ensure_eq!(names(&c.dir)?, vec!["b"], "listing after replace");
    // Replacing a symlink replaces the link, not its target.
    sys::write_file(c.p("t"), b"target").op("create t")?;
    sys::symlink("t", c.p("l")).op("symlink")?;
    sys::rename(&b, c.p("l")).op("rename over symlink")?;
    ensure_eq!(
        file_type(&sys::lstat(c.p("l")).op("lstat")?),
        S_IFREG,
        "type after replacing symlink"
    );
    ensure_eq!(
        content(&c.p("t"))?,
        b"target".to_vec(),
        "symlink target untouched"
    );
    // Hard links to the same inode: rename is a no-op, both names stay.
    sys::link(c.p("t"), c.p("t2")).op("link")?;
    sys::rename(c.p("t"), c.p("t2")).op("rename between hard links")?;
    ensure!(
        sys::exists(c.p("t")) && sys::exists(c.p("t2")),
        "rename between two links of one inode removed a name"
    );
    Ok(())
}

pub fn renameat2_noreplace(c: &mut Ctx) -> TResult {
    let (a, b) = (c.p("a"), c.p("b"));
    sys::write_file(&a, b"A").op("create a")?;
    sys::write_file(&b, b"B").op("create b")?;
    expect_errno(
        sys::renameat2(&a, &b, libc::RENAME_NOREPLACE),
        &[libc::EEXIST],
        "renameat2 RENAME_NOREPLACE onto existing",
    )?;
    ensure_eq!(content(&a)?, b"A".to_vec(), "a after refused rename");
    ensure_eq!(content(&b)?, b"B".to_vec(), "b after refused rename");
    sys::renameat2(&a, c.p("c"), libc::RENAME_NOREPLACE).op("renameat2 RENAME_NOREPLACE to new")?;
    expect_errno(
        sys::stat(&a),
        &[libc::ENOENT],
        "old name after NOREPLACE rename",
    )?;
    ensure_eq!(
        content(&c.p("c"))?,
        b"A".to_vec(),
        "content after NOREPLACE rename"
    );
    // Onto an existing directory too.
    sys::mkdir(c.p("d"), 0o755).op("mkdir")?;
    sys::mkdir(c.p("e"), 0o755).op("mkdir")?;
    expect_errno(
        sys::renameat2(c.p("d"), c.p("e"), libc::RENAME_NOREPLACE),
        &[libc::EEXIST],
        "RENAME_NOREPLACE dir onto existing dir",
    )?;
    Ok(())
}

pub fn renameat2_exchange(c: &mut Ctx) -> TResult {
    let (a, b) = (c.p("a"), c.p("b"));
    sys::write_file(&a, b"AAA").op("create a")?;
    sys::write_file(&b, b"BB").op("create b")?;
    let (ia, ib) = (
        sys::stat(&a).op("stat a")?.st_ino,
        sys::stat(&b).op("stat b")?.st_ino,
    );
    sys::renameat2(&a, &b, libc::RENAME_EXCHANGE).op("renameat2 RENAME_EXCHANGE")?;
    ensure_eq!(content(&a)?, b"BB".to_vec(), "a after exchange");
    ensure_eq!(content(&b)?, b"AAA".to_vec(), "b after exchange");
    ensure_eq!(
        (
            sys::stat(&a).op("stat a")?.st_ino,
            sys::stat(&b).op("stat b")?.st_ino
        ),
        (ib, ia),
        "inodes after exchange"
    );
    ensure_eq!(
        sys::stat(&a).op("stat a")?.st_size,
        2,
        "size of a after exchange"
    );
    // File <-> directory.
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    sys::write_file(d.join("inner"), b"in").op("create d/inner")?;
    sys::renameat2(&a, &d, libc::RENAME_EXCHANGE).op("RENAME_EXCHANGE file and dir")?;
    ensure_eq!(
        file_type(&sys::stat(&a).op("stat a")?),
        S_IFDIR,
        "a is now the dir"
    );
    ensure_eq!(
        content(&a.join("inner"))?,
        b"in".to_vec(),
        "file inside exchanged dir"
    );
    ensure_eq!(content(&d)?, b"BB".to_vec(), "d is now the file");
    expect_errno(
        sys::renameat2(&b, c.p("missing"), libc::RENAME_EXCHANGE),
        &[libc::ENOENT],
        "RENAME_EXCHANGE with a missing target",
    )?;
    Ok(())
}

pub fn link(c: &mut Ctx) -> TResult {
    let (a, b) = (c.p("a"), c.p("b"));
    sys::write_file(&a, b"one").op("create a")?;
    sys::link(&a, &b).op("link a b")?;
    let (sa, sb) = (sys::stat(&a).op("stat a")?, sys::stat(&b).op("stat b")?);
    ensure_eq!(sa.st_ino, sb.st_ino, "inode of both links");
    ensure_eq!((sa.st_nlink, sb.st_nlink), (2, 2), "nlink of both names");
    // Writes through one name show through the other.
    let fd = sys::open(&b, O_WRONLY | libc::O_APPEND, 0).op("open b")?;
    sys::write_all(&fd, b"+two").op("append via b")?;
    drop(fd);
    ensure_eq!(content(&a)?, b"one+two".to_vec(), "a after write via b");
    // A third link in a subdir.
    sys::mkdir(c.p("d"), 0o755).op("mkdir")?;
    sys::link(&b, c.p("d/c")).op("link into subdir")?;
    ensure_eq!(sys::stat(&a).op("stat")?.st_nlink, 3, "nlink with 3 names");
    sys::unlink(&a).op("unlink a")?;
    ensure_eq!(
        sys::stat(&b).op("stat b")?.st_nlink,
        2,
        "nlink after unlink a"
    );
    ensure_eq!(content(&b)?, b"one+two".to_vec(), "b after unlink a");
    expect_errno(
        sys::link(&b, c.p("d/c")),
        &[libc::EEXIST],
        "link onto existing name",
    )?;
    expect_errno(
        sys::link(c.p("d"), c.p("dl")),
        &[libc::EPERM],
        "link to a directory",
    )?;
    expect_errno(
        sys::link(&a, c.p("z")),
        &[libc::ENOENT],
        "link from missing source",
    )?;
    // fstat on an open fd reflects link count changes.
    let fd = sys::open(&b, O_RDONLY, 0).op("open b")?;
    sys::unlink(c.p("d/c")).op("unlink d/c")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_nlink,
        1,
        "nlink via fd after unlink"
    );
    Ok(())
}

pub fn symlink(c: &mut Ctx) -> TResult {
    let l = c.p("l");
    sys::symlink("target/with/../dots", &l).op("symlink")?;
    ensure_eq!(
        sys::readlink(&l).op("readlink")?,
        b"target/with/../dots".to_vec(),
        "readlink"
    );
    let lst = sys::lstat(&l).op("lstat")?;
    ensure_eq!(file_type(&lst), S_IFLNK, "lstat type");
    ensure_eq!(lst.st_size, 19, "symlink size");
    expect_errno(sys::stat(&l), &[libc::ENOENT], "stat of dangling symlink")?;
    // Following to a real file.
    sys::write_file(c.p("f"), b"data").op("create f")?;
    sys::symlink("f", c.p("lf")).op("symlink lf")?;
    ensure_eq!(
        content(&c.p("lf"))?,
        b"data".to_vec(),
        "read through symlink"
    );
    expect_errno(
        sys::open(c.p("lf"), O_RDONLY | libc::O_NOFOLLOW, 0),
        &[libc::ELOOP],
        "open O_NOFOLLOW on symlink",
    )?;
    // Absolute target, through a directory symlink.
    sys::mkdir(c.p("d"), 0o755).op("mkdir")?;
    sys::write_file(c.p("d/x"), b"in d").op("create d/x")?;
    let abs = c.p("d");
    sys::symlink(&abs, c.p("ld")).op("symlink to abs dir")?;
    ensure_eq!(
        content(&c.p("ld/x"))?,
        b"in d".to_vec(),
        "read via dir symlink"
    );
    // Long target.
    let long = "x/".repeat(500) + "end";
    sys::symlink(&long, c.p("long")).op("symlink with 1003-byte target")?;
    ensure_eq!(
        sys::readlink(c.p("long")).op("readlink long")?,
        long.as_bytes().to_vec(),
        "long readlink"
    );
    // Loop.
    sys::symlink("loop2", c.p("loop1")).op("symlink loop1")?;
    sys::symlink("loop1", c.p("loop2")).op("symlink loop2")?;
    expect_errno(
        sys::open(c.p("loop1"), O_RDONLY, 0),
        &[libc::ELOOP],
        "open symlink loop",
    )?;
    // Existing name.
    expect_errno(
        sys::symlink("x", c.p("f")),
        &[libc::EEXIST],
        "symlink onto existing",
    )?;
    expect_errno(
        sys::readlink(c.p("f")),
        &[libc::EINVAL],
        "readlink of a regular file",
    )?;
    Ok(())
}

pub fn mkfifo(c: &mut Ctx) -> TResult {
    let p = c.p("fifo");
    sys::mknod(&p, S_IFIFO | 0o600, 0).op("mknod S_IFIFO")?;
    let st = sys::stat(&p).op("stat fifo")?;
    ensure!(
        file_type(&st) == S_IFIFO,
        "fifo stats as a {}",
        type_name(st.st_mode)
    );
    ensure_eq!(st.st_mode & 0o777, 0o600, "fifo mode");
    let r = sys::open(&p, O_RDONLY | libc::O_NONBLOCK, 0).op("open fifo for reading")?;
    let w = sys::open(&p, O_WRONLY | libc::O_NONBLOCK, 0).op("open fifo for writing")?;
    sys::write_all(&w, b"through the pipe").op("write fifo")?;
    let mut buf = [0u8; 64];
    let n = sys::read(&r, &mut buf).op("read fifo")?;
    ensure_eq!(&buf[..n], b"through the pipe", "data through fifo");
    expect_errno(
        sys::lseek(&r, 0, libc::SEEK_SET),
        &[libc::ESPIPE],
        "lseek on fifo",
    )?;
    drop((r, w));
    expect_errno(
        sys::mknod(&p, S_IFIFO | 0o600, 0),
        &[libc::EEXIST],
        "mkfifo existing",
    )?;
    sys::unlink(&p).op("unlink fifo")?;
    Ok(())
}

pub fn excl(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::open(&p, O_WRONLY | O_CREAT | O_EXCL, 0o644).op("O_CREAT|O_EXCL new file")?;
    expect_errno(
        sys::open(&p, O_WRONLY | O_CREAT | O_EXCL, 0o644),
        &[libc::EEXIST],
        "O_CREAT|O_EXCL on existing file",
    )?;
    sys::mkdir(c.p("d"), 0o755).op("mkdir")?;
    expect_errno(
        sys::open(c.p("d"), O_RDONLY | O_CREAT | O_EXCL, 0o644),
        &[libc::EEXIST],
        "O_CREAT|O_EXCL on existing dir",
    )?;
    // A dangling symlink counts as existing and is not followed.
    sys::symlink("nowhere", c.p("dangling")).op("symlink")?;
    expect_errno(
        sys::open(c.p("dangling"), O_WRONLY | O_CREAT | O_EXCL, 0o644),
        &[libc::EEXIST],
        "O_CREAT|O_EXCL on dangling symlink",
    )?;
    expect_errno(
        sys::stat(c.p("nowhere")),
        &[libc::ENOENT],
        "symlink target created",
    )?;
    // Without O_EXCL, O_CREAT through a dangling symlink creates the target.
    sys::open(c.p("dangling"), O_WRONLY | O_CREAT, 0o644).op("O_CREAT via dangling symlink")?;
    ensure!(
        sys::exists(c.p("nowhere")),
        "O_CREAT via dangling symlink did not create its target"
    );
    // Racing O_EXCL creators: exactly one wins.
    let q = c.p("race");
    let mut wins = 0;
    for _ in 0..5 {
        if sys::open(&q, O_WRONLY | O_CREAT | O_EXCL, 0o644).is_ok() {
            wins += 1;
        }
    }
    ensure_eq!(wins, 1, "O_EXCL creations of one name that succeeded");
    Ok(())
}

pub fn enoent(c: &mut Ctx) -> TResult {
    let m = c.p("missing");
    expect_errno(sys::open(&m, O_RDONLY, 0), &[libc::ENOENT], "open missing")?;
    expect_errno(sys::stat(&m), &[libc::ENOENT], "stat missing")?;
    expect_errno(sys::lstat(&m), &[libc::ENOENT], "lstat missing")?;
    expect_errno(sys::unlink(&m), &[libc::ENOENT], "unlink missing")?;
    expect_errno(sys::rmdir(&m), &[libc::ENOENT], "rmdir missing")?;
    expect_errno(sys::rename(&m, c.p("x")), &[libc::ENOENT], "rename missing")?;
    expect_errno(sys::chmod(&m, 0o600), &[libc::ENOENT], "chmod missing")?;
    expect_errno(sys::readlink(&m), &[libc::ENOENT], "readlink missing")?;
    expect_errno(sys::truncate(&m, 0), &[libc::ENOENT], "truncate missing")?;
    expect_errno(
        sys::list_dir(&m).map(|_| ()),
        &[libc::ENOENT],
        "opendir missing",
    )?;
    expect_errno(
        sys::open(c.p("missing/child"), O_RDONLY, 0),
        &[libc::ENOENT],
        "open missing/child",
    )?;
    expect_errno(
        sys::open(c.p("missing/child"), O_WRONLY | O_CREAT, 0o644),
        &[libc::ENOENT],
        "create in missing dir",
    )?;
    sys::write_file(c.p("file"), b"").op("create file")?;
    expect_errno(
        sys::open(c.p("file/child"), O_RDONLY, 0),
        &[libc::ENOTDIR],
        "open file/child",
    )?;
    expect_errno(
        sys::open(c.p("file"), O_RDONLY | libc::O_DIRECTORY, 0),
        &[libc::ENOTDIR],
        "O_DIRECTORY on a file",
    )?;
    expect_errno(
        sys::open(&c.dir, O_WRONLY, 0),
        &[libc::EISDIR],
        "open a directory for writing",
    )?;
    // Lookups of a removed name fail even right after it existed.
    sys::unlink(c.p("file")).op("unlink")?;
    expect_errno(
        sys::stat(c.p("file")),
        &[libc::ENOENT],
        "stat just-removed file",
    )?;
    Ok(())
}

pub fn tmpfile(c: &mut Ctx) -> TResult {
    let fd = match sys::open(&c.dir, libc::O_TMPFILE | O_RDWR, 0o600) {
        Ok(fd) => fd,
        Err(sys::Errno(libc::EOPNOTSUPP)) => {
            return skip("O_TMPFILE: the kernel/filesystem says EOPNOTSUPP")
        }
        Err(e) => return Err(TErr::Fail(format!("open O_TMPFILE: {e}"))),
    };
    let before = names(&c.dir)?;
    ensure!(
        before.is_empty(),
        "O_TMPFILE created a visible entry: {before:?}"
    );
    sys::write_all(&fd, b"anonymous data").op("write tmpfile")?;
    let st = sys::fstat(&fd).op("fstat tmpfile")?;
    ensure_eq!(st.st_nlink, 0, "tmpfile nlink");
    ensure_eq!(file_type(&st), S_IFREG, "tmpfile type");
    ensure_eq!(st.st_size, 14, "tmpfile size");
    // Give it a name.
    let target = c.p("named");
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match sys::linkat(
        libc::AT_FDCWD,
        &proc_path,
        libc::AT_FDCWD,
        &target,
        libc::AT_SYMLINK_FOLLOW,
    ) {
        Ok(()) => {}
        Err(sys::Errno(libc::ENOENT)) if !sys::exists("/proc/self") => {
            note("/proc is not mounted; linking the tmpfile with AT_EMPTY_PATH");
            sys::linkat(
                fd.as_raw_fd(),
                "",
                libc::AT_FDCWD,
                &target,
                libc::AT_EMPTY_PATH,
            )
            .op("linkat AT_EMPTY_PATH")?;
        }
        Err(e) => return Err(TErr::Fail(format!("linkat {proc_path} -> named: {e}"))),
    }
    let nst = sys::stat(&target).op("stat linked tmpfile")?;
    ensure_eq!(nst.st_ino, st.st_ino, "inode of linked tmpfile");
    ensure_eq!(nst.st_nlink, 1, "nlink after linkat");
    ensure_eq!(nst.st_mode & 0o777, 0o600, "mode of linked tmpfile");
    ensure_eq!(
        content(&target)?,
        b"anonymous data".to_vec(),
        "linked tmpfile content"
    );
    // An O_TMPFILE | O_EXCL file can never be linked.
    let fd2 = sys::open(&c.dir, libc::O_TMPFILE | O_RDWR | O_EXCL, 0o600).op("O_TMPFILE|O_EXCL")?;
    expect_errno(
        sys::linkat(
            fd2.as_raw_fd(),
            "",
            libc::AT_FDCWD,
            c.p("never"),
            libc::AT_EMPTY_PATH,
        ),
        &[libc::ENOENT],
        "linkat of an O_EXCL tmpfile",
    )?;
    drop(fd2);
    ensure_eq!(names(&c.dir)?, vec!["named"], "entries after tmpfiles");
    Ok(())
}
