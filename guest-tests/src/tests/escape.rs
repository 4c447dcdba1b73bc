//! The share must be the guest's whole world: `..` at the mount root stays
//! in the guest, and symlinks made on the host that point outside the share
//! are resolved by the guest in its own namespace, never reaching host files.

use std::path::{Path, PathBuf};

use crate::harness::{note, Ctx, TErr, TResult};
use crate::sys::{self, OpExt};
use crate::{ensure, ensure_eq};
use libc::{O_DIRECTORY, O_RDONLY};

fn devino(p: &Path) -> Result<(u64, u64), String> {
    let st = sys::stat(p).op(format!("stat {}", sys::show(p)))?;
    Ok((st.st_dev, st.st_ino))
}

pub fn dotdot(c: &mut Ctx) -> TResult {
    let root = c.root.clone();
    let parent = root
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let up = devino(&root.join(".."))?;
    ensure_eq!(
        up,
        devino(&parent)?,
        "stat({}/..) vs stat({})",
        root.display(),
        parent.display()
    );
    if parent == Path::new("/") {
        ensure_eq!(
            up,
            devino(Path::new("/"))?,
            "stat(<mount>/..) vs the guest's stat(\"/\")"
        );
    }
    // The same through a directory descriptor.
    let rfd = sys::open(&root, O_RDONLY | O_DIRECTORY, 0).op("open mount root")?;
    let pfd = sys::openat(&rfd, "..", O_RDONLY | O_DIRECTORY, 0).op("openat(root, \"..\")")?;
    let st = sys::fstat(&pfd).op("fstat")?;
    ensure_eq!((st.st_dev, st.st_ino), up, "openat(root, \"..\")");
    // From inside: <test dir>/../.. is the mount's parent too.
    ensure_eq!(devino(&c.dir.join("../.."))?, up, "stat(<test dir>/../..)");
    // Climbing far above / ends at the guest's /.
    let depth = root.components().count();
    let mut many = root.clone();
    for _ in 0..depth + 10 {
        many.push("..");
    }
    ensure_eq!(
        devino(&many)?,
        devino(Path::new("/"))?,
        "climbing {} levels of '..'",
        depth + 10
    );
    let rst = devino(&root)?;
    if rst.0 != up.0 {
        note(format!(
            "{} is a mount point (dev {:#x}, parent dev {:#x})",
            root.display(),
            rst.0,
            up.0
        ));
    }
    ensure!(up != rst, "{}/.. is the mount root itself", root.display());
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Opening/reading `p` in the guest must never produce the host secret.
fn never_secret(p: &Path, secret: &[u8], what: &str) -> Result<(), String> {
    match sys::read_file(p) {
        Err(_) => Ok(()),
        Ok(data) => {
            ensure!(
                !contains(&data, secret),
                "{what}: reading {} returned the HOST secret: the guest escaped the share",
                p.display()
            );
            note(format!(
                "{what}: resolved to a guest file ({} bytes), not the host's",
                data.len()
            ));
            Ok(())
        }
    }
}

fn fixture(c: &Ctx, name: &str) -> Result<(PathBuf, Vec<u8>), String> {
    let p = c.root.join(".fixtures").join(name);
    let target = sys::readlink(&p).op(format!(
        "readlink {} (fixture created by the host agent)",
        p.display()
    ))?;
    Ok((p, target))
}

pub fn abs_symlink(c: &mut Ctx) -> TResult {
    let secret = c.agent()?.secret()?;
    ensure!(
        secret.starts_with(b"LEASEFS-HOST-SECRET-"),
        "agent SECRET is {:?}",
        String::from_utf8_lossy(&secret)
    );
    let (link, target) = fixture(c, "abs-link")?;
    ensure!(
        target.starts_with(b"/") && target.ends_with(b"/secret"),
        "abs-link target {:?} is not an absolute path to the secret",
        String::from_utf8_lossy(&target)
    );
    never_secret(&link, &secret, "host-made absolute symlink")?;
    let tpath = sys::path_from_bytes(&target);
    never_secret(
        &tpath,
        &secret,
        "the host secret's path, opened in the guest",
    )?;
    // A symlink the guest makes itself, with the same target.
    let own = c.p("own-abs");
    sys::symlink(&tpath, &own).op("guest symlink to the host secret path")?;
    never_secret(&own, &secret, "guest-made absolute symlink")?;
    // Directory symlink: listing through it must not show the host dir.
    let (dlink, _) = fixture(c, "abs-dir")?;
    never_secret(
        &dlink.join("secret"),
        &secret,
        "host-made dir symlink + /secret",
    )?;
    if let Ok(list) = sys::list_dir(&dlink) {
        ensure!(
            !list.iter().any(|e| e.name == b"secret"),
            "listing through .fixtures/abs-dir shows the host's secret dir"
        );
    }
    // The link itself is still a plain symlink in the share.
    let lst = sys::lstat(&link).op("lstat abs-link")?;
    ensure_eq!(sys::file_type(&lst), libc::S_IFLNK, "abs-link type");
    Ok(())
}

pub fn rel_symlink(c: &mut Ctx) -> TResult {
    let secret = c.agent()?.secret()?;
    let (link, target) = fixture(c, "rel-link")?;
    ensure!(
        target.starts_with(b"../../"),
        "rel-link target {:?} does not climb with '..'",
        String::from_utf8_lossy(&target)
    );
    never_secret(&link, &secret, "host-made relative symlink")?;
    // The same walk spelled out as a path.
    let walked = c.root.join(".fixtures").join(sys::path_from_bytes(&target));
    never_secret(&walked, &secret, "the rel-link path walked by hand")?;
    // A guest-made relative symlink climbing out of a deep directory.
    let (_, abs) = fixture(c, "abs-link")?;
    let abs_rel = String::from_utf8_lossy(&abs)
        .trim_start_matches('/')
        .to_string();
    sys::mkdir(c.p("a"), 0o755).op("mkdir")?;
    sys::mkdir(c.p("a/b"), 0o755).op("mkdir")?;
    let own = c.p("a/b/own-rel");
    sys::symlink(format!("{}{abs_rel}", "../".repeat(30)), &own).op("guest relative symlink")?;
    never_secret(&own, &secret, "guest-made relative symlink climbing out")?;
    // Symlink chains: share link -> share link -> outside.
    sys::symlink(&link, c.p("chain")).op("symlink chain")?;
    never_secret(&c.p("chain"), &secret, "chain to rel-link")?;
    if let Ok(st) = sys::stat(&link) {
        // It resolves to something in the guest: not to a file of the share.
        let share = sys::stat(&c.root).op("stat root")?;
        if st.st_dev == share.st_dev {
            return Err(TErr::Fail(format!(
                "rel-link resolves to an inode on the share (ino {}), expected the guest's own tree",
                st.st_ino
            )));
        }
    }
    Ok(())
}
