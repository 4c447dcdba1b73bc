//! Extended attributes in the user.* namespace.

use crate::harness::{skip, Ctx, TErr, TResult};
use crate::sys::{self, expect_errno, OpExt};
use crate::{ensure, ensure_eq};

/// The first setxattr: EOPNOTSUPP means xattrs are off (skip), not broken.
fn first_set(p: &std::path::Path, name: &str, val: &[u8]) -> TResult {
    match sys::setxattr(p, name, val, 0) {
        Ok(()) => Ok(()),
        Err(sys::Errno(libc::EOPNOTSUPP)) => skip(
            "user xattrs refused with EOPNOTSUPP (daemon without xattr support, \
             e.g. --xattr off?)",
        ),
        Err(e) => Err(TErr::Fail(format!("setxattr {name}: {e}"))),
    }
}

fn user_names(p: &std::path::Path) -> Result<Vec<String>, String> {
    let mut v: Vec<String> = sys::listxattr(p)
        .op("listxattr")?
        .into_iter()
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .filter(|n| n.starts_with("user."))
        .collect();
    v.sort();
    Ok(v)
}

pub fn user(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, b"data").op("create")?;
    first_set(&p, "user.test", b"value1")?;
    ensure_eq!(
        sys::getxattr(&p, "user.test").op("getxattr user.test")?,
        b"value1".to_vec(),
        "getxattr user.test"
    );
    ensure_eq!(
        sys::getxattr_sized(&p, "user.test", 0)
            .op("getxattr size query")?
            .len(),
        6,
        "getxattr size query"
    );
    expect_errno(
        sys::getxattr_sized(&p, "user.test", 3),
        &[libc::ERANGE],
        "getxattr with a 3-byte buffer",
    )?;
    // Binary value with NULs and high bytes, and an empty value.
    let bin: Vec<u8> = (0..=255u8).collect();
    sys::setxattr(&p, "user.bin", &bin, 0).op("setxattr user.bin")?;
    sys::setxattr(&p, "user.empty", b"", 0).op("setxattr user.empty")?;
    let big = sys::pattern(7, 3000);
    sys::setxattr(&p, "user.big", &big, 0).op("setxattr 3000-byte value")?;
    ensure_eq!(
        sys::getxattr(&p, "user.bin").op("getxattr user.bin")?,
        bin,
        "binary xattr value"
    );
    ensure_eq!(
        sys::getxattr(&p, "user.empty").op("getxattr user.empty")?,
        Vec::<u8>::new(),
        "empty xattr value"
    );
    ensure!(
        sys::getxattr(&p, "user.big").op("getxattr user.big")? == big,
        "3000-byte xattr value differs"
    );
    ensure_eq!(
        user_names(&p)?,
        vec!["user.big", "user.bin", "user.empty", "user.test"],
        "listxattr user.* names"
    );
    // Flags.
    expect_errno(
        sys::setxattr(&p, "user.test", b"x", libc::XATTR_CREATE),
        &[libc::EEXIST],
        "setxattr XATTR_CREATE on existing",
    )?;
    expect_errno(
        sys::setxattr(&p, "user.nope", b"x", libc::XATTR_REPLACE),
        &[libc::ENODATA],
        "setxattr XATTR_REPLACE on missing",
    )?;
    sys::setxattr(&p, "user.test", b"v2", libc::XATTR_REPLACE).op("setxattr XATTR_REPLACE")?;
    ensure_eq!(
        sys::getxattr(&p, "user.test").op("getxattr")?,
        b"v2".to_vec(),
        "value after replace (shorter)"
    );
    expect_errno(
        sys::getxattr(&p, "user.nope"),
        &[libc::ENODATA],
        "getxattr missing name",
    )?;
    // Via a descriptor.
    let fd = sys::open(&p, libc::O_RDWR, 0).op("open")?;
    sys::fsetxattr(&fd, "user.fd", b"via fd", 0).op("fsetxattr")?;
    ensure_eq!(
        sys::fgetxattr(&fd, "user.fd").op("fgetxattr")?,
        b"via fd".to_vec(),
        "fgetxattr"
    );
    ensure_eq!(
        sys::getxattr(&p, "user.fd").op("getxattr")?,
        b"via fd".to_vec(),
        "getxattr of fsetxattr value"
    );
    // Remove.
    for n in ["user.test", "user.bin", "user.empty", "user.big", "user.fd"] {
        sys::removexattr(&p, n).op(format!("removexattr {n}"))?;
    }
    expect_errno(
        sys::removexattr(&p, "user.test"),
        &[libc::ENODATA],
        "removexattr of removed name",
    )?;
    expect_errno(
        sys::getxattr(&p, "user.test"),
        &[libc::ENODATA],
        "getxattr after removexattr",
    )?;
    ensure!(
        user_names(&p)?.is_empty(),
        "user xattrs left: {:?}",
        user_names(&p)?
    );
    // Data untouched by all that.
    ensure_eq!(
        sys::read_file(&p).op("read")?,
        b"data".to_vec(),
        "file data"
    );
    Ok(())
}

pub fn dir_symlink(c: &mut Ctx) -> TResult {
    let d = c.p("d");
    sys::mkdir(&d, 0o755).op("mkdir")?;
    first_set(&d, "user.dir", b"on a dir")?;
    ensure_eq!(
        sys::getxattr(&d, "user.dir").op("getxattr dir")?,
        b"on a dir".to_vec(),
        "dir xattr"
    );
    // xattrs survive rename.
    sys::rename(&d, c.p("e")).op("rename dir")?;
    ensure_eq!(
        sys::getxattr(c.p("e"), "user.dir").op("getxattr after rename")?,
        b"on a dir".to_vec(),
        "dir xattr after rename"
    );
    // Linux refuses user.* xattrs on symlinks themselves (EPERM); through
    // the link they apply to the target.
    sys::write_file(c.p("f"), b"").op("create f")?;
    sys::symlink("f", c.p("l")).op("symlink")?;
    expect_errno(
        sys::lsetxattr(c.p("l"), "user.x", b"1", 0),
        &[libc::EPERM],
        "lsetxattr user.* on a symlink",
    )?;
    sys::setxattr(c.p("l"), "user.via", b"link", 0).op("setxattr through symlink")?;
    ensure_eq!(
        sys::getxattr(c.p("f"), "user.via").op("getxattr target")?,
        b"link".to_vec(),
        "xattr set through symlink lands on target"
    );
    // Hard links share xattrs.
    sys::link(c.p("f"), c.p("g")).op("link")?;
    ensure_eq!(
        sys::getxattr(c.p("g"), "user.via").op("getxattr via hard link")?,
        b"link".to_vec(),
        "xattr via hard link"
    );
    Ok(())
}
