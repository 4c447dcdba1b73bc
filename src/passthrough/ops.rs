//! The FUSE operations, plus those the crate's `Server` does not route (COPY_FILE_RANGE,
//! TMPFILE, SYNCFS), which the daemon's dispatcher calls directly.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, FOPEN_IN_KILL_SUIDGID,
    WRITE_KILL_PRIV,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};

use super::security_label::take_security_context;
use super::util::{
    self, check, ebadf, einval, errno, fd_name, getdents, is_dir, openat, parse_dirents, statx_fd,
    validate_name, ScopedCreds, ScopedNoFsetid, ScopedUmask,
};
use super::{CachePolicy, HandleData, InodeFd, PassthroughFs};

/// The kernel's `__FMODE_EXEC` (include/linux/fcntl.h), which FUSE passes on in OPEN's flags
/// when the guest opens a file to execute it; the libc crate does not name it.
pub(crate) const FMODE_EXEC: u32 = 0x20;

/// Largest getdents buffer per READDIR, whatever size the guest asks for.
const MAX_DIR_BUF: usize = 64 * 1024;

/// How many bytes of host directory entries (`linux_dirent64`: 19 bytes and the name,
/// 8-aligned) to read per `getdents64` for a reply of `size` bytes whose entries take
/// `reply_entry` bytes besides the name. READDIR's entries (`fuse_dirent`, 24 bytes) are
/// about as large as the host's, READDIRPLUS's (`fuse_direntplus`, 152 bytes) six times
/// larger: reading `size` bytes of host entries for those made the host list six times more
/// entries than one reply can carry, each call again from the guest's offset. The listing
/// goes on reading when a batch falls short, so this only bounds the work, never the reply.
fn dirents_for_reply(size: u32, reply_entry: usize) -> usize {
    const HOST_ENTRY: usize = 24;
    let size = size as usize;
    (size / reply_entry.max(1) * HOST_ENTRY + HOST_ENTRY).clamp(1024, MAX_DIR_BUF)
}

/// A `File` view of a handle's descriptor for the zero-copy I/O traits, which want `&mut`.
/// It must not outlive `h`, and it never closes the descriptor.
fn borrow_file(h: &HandleData) -> ManuallyDrop<File> {
    // SAFETY: the descriptor stays open while `h` lives; ManuallyDrop never closes it.
    ManuallyDrop::new(unsafe { File::from_raw_fd(h.as_raw_fd()) })
}

fn to_i64(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| einval())
}

impl PassthroughFs {
    /// Copy a range between two open handles with copy_file_range(2). Set-id bits of the
    /// output are cleared as for an unprivileged writer (the guest has no way to say whether
    /// its caller was privileged here).
    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        _ctx: &Context,
        inode_in: u64,
        fh_in: u64,
        off_in: u64,
        inode_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        let h_in = self.handle(fh_in, inode_in)?;
        let h_out = self.handle(fh_out, inode_out)?;
        let flags = u32::try_from(flags).map_err(|_| einval())?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        let _kill = ScopedNoFsetid::new()?;
        util::copy_file_range(
            h_in.as_raw_fd(),
            off_in,
            h_out.as_raw_fd(),
            off_out,
            len,
            flags,
        )
    }

    /// Create an unnamed file in directory `parent` with O_TMPFILE. The new inode enters the
    /// table (the guest may later LINK it into a directory) and comes back open.
    pub fn tmpfile(
        &self,
        ctx: &Context,
        parent: u64,
        mode: u32,
        umask: u32,
        flags: u32,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        let p = self.inode(parent)?;
        self.check_names(&p)?;
        self.descriptor_room(2)?;
        // O_EXCL stays: with O_TMPFILE it means "never to be linked".
        let flags =
            self.open_flags(flags) & !(libc::O_CREAT | libc::O_NOFOLLOW | libc::O_DIRECTORY);
        // Before the guest's credentials: they cannot open a node held by file handle.
        let dir = p.fd()?;
        let file = {
            let (uid, gid) = self.ids_to_host(ctx.uid, ctx.gid)?;
            let _creds = ScopedCreds::new(uid, gid)?;
            let _umask = ScopedUmask::new(self.create_umask(umask))?;
            self.create_for_write(&p, &dir, c".", flags | libc::O_TMPFILE, mode)?
        };
        if let Some(context) = take_security_context() {
            self.label_open_file(&file, &context)?;
        }
        let entry = self.add_inode_of_open_file(&file, &p, None)?;
        let data = self.inode(entry.inode)?;
        let handle = self.handles.insert(&data, file, true, false);
        Ok((entry, Some(handle), self.file_open_options()))
    }

    /// Flush the share's filesystem to disk.
    pub fn syncfs(&self) -> io::Result<()> {
        // syncfs(2) refuses O_PATH descriptors.
        let dir = openat(
            self.root.as_raw_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        // SAFETY: syncfs touches no memory of ours.
        check(unsafe { libc::syncfs(dir.as_raw_fd()) })?;
        Ok(())
    }

    fn stat_inode(&self, inode: u64) -> io::Result<(stat64, Duration)> {
        let data = self.inode(inode)?;
        let st = statx_fd(data.fd()?.as_raw_fd())?.st;
        Ok(self.attr_reply(&data, st))
    }

    /// Run `f` creating something in `parent` as the caller, then look the result up.
    fn create_node(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        umask: Option<u32>,
        f: impl FnOnce(i32) -> io::Result<()>,
    ) -> io::Result<Entry> {
        validate_name(name)?;
        let p = self.inode(parent)?;
        self.check_names(&p)?;
        // Refused before anything is created: the node it needs may not fit afterwards.
        self.descriptor_room(1)?;
        let dir = p.fd()?;
        let (uid, gid) = self.ids_to_host(ctx.uid, ctx.gid)?;
        // The keeper's part runs with our own credentials (a delegation needs CAP_LEASE).
        self.changing(&[parent], || {
            let _creds = ScopedCreds::new(uid, gid)?;
            let _umask = match umask {
                Some(m) => Some(ScopedUmask::new(self.create_umask(m))?),
                None => None,
            };
            f(dir.as_raw_fd())
        })?;
        if let Some(context) = take_security_context() {
            self.label_created_node(dir.as_raw_fd(), name, &context)?;
        }
        self.do_lookup(&p, name)
    }

    /// List directory handle `handle` from `offset`, handing each entry and the handle's
    /// descriptor to `emit` until it says stop; `getdents_size`: bytes of host entries read
    /// per system call (see [`dirents_for_reply`]).
    fn do_readdir(
        &self,
        inode: u64,
        handle: u64,
        getdents_size: usize,
        offset: u64,
        mut emit: impl FnMut(RawFd, &[u8], u64, u64, u32) -> io::Result<bool>,
    ) -> io::Result<()> {
        let h = self.handle(handle, inode)?;
        let _pos = h.lock_position();
        // Offsets are the cookies (d_off) the host gave us, so restarting from any of them
        // lists each remaining name exactly once.
        util::lseek(h.as_raw_fd(), to_i64(offset)?, libc::SEEK_SET)?;
        let mut buf = Vec::with_capacity(getdents_size);
        loop {
            getdents(h.as_raw_fd(), &mut buf)?;
            if buf.is_empty() {
                return Ok(());
            }
            for d in parse_dirents(&buf) {
                if !emit(h.as_raw_fd(), d.name, d.ino, d.off, d.type_)? {
                    return Ok(());
                }
            }
        }
    }
}

impl FileSystem for PassthroughFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // A new INIT means a new guest mount: nothing the previous one looked up or opened is
        // referenced any more.
        self.handles.clear();
        self.inodes.clear();

        let mut want = FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::EXPORT_SUPPORT
            | FsOptions::MAX_PAGES;
        if self.cfg.readdirplus {
            want |= FsOptions::DO_READDIRPLUS | FsOptions::READDIRPLUS_AUTO;
        }
        if self.cfg.host_posix_locks {
            want |= FsOptions::POSIX_LOCKS;
        }
        if self.cfg.host_flock {
            want |= FsOptions::FLOCK_LOCKS;
        }
        // With no caching at all a symlink's text must not be cached either.
        if self.cfg.cache != CachePolicy::Never {
            want |= FsOptions::CACHE_SYMLINKS;
        }
        if matches!(self.cfg.cache, CachePolicy::Auto | CachePolicy::Coherent) {
            want |= FsOptions::AUTO_INVAL_DATA;
        }
        if self.cfg.writeback {
            want |= FsOptions::WRITEBACK_CACHE;
        }
        if self.cfg.announce_submounts {
            want |= FsOptions::SUBMOUNTS;
        }
        if self.cfg.posix_acl {
            want |= FsOptions::POSIX_ACL | FsOptions::DONT_MASK;
        }
        if self.cfg.killpriv_v2 {
            want |= FsOptions::HANDLE_KILLPRIV_V2;
        }
        let agreed = capable & want;
        self.writeback.store(
            agreed.contains(FsOptions::WRITEBACK_CACHE),
            Ordering::Relaxed,
        );
        self.posix_acl.store(
            agreed.contains(FsOptions::POSIX_ACL | FsOptions::DONT_MASK),
            Ordering::Relaxed,
        );
        self.submounts
            .store(agreed.contains(FsOptions::SUBMOUNTS), Ordering::Relaxed);
        Ok(agreed)
    }

    fn destroy(&self) {
        self.handles.clear();
        self.inodes.clear();
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let p = self.inode(parent)?;
        match self.do_lookup(&p, name) {
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT)
                    && self.cfg.cache == CachePolicy::Always
                    && !self.cfg.entry_timeout.is_zero() =>
            {
                // Node id 0: a negative entry the guest may cache for entry_timeout. Only
                // where the guest is taken to own the share: otherwise a file created on the
                // host would stay invisible for as long as the entry timeout (a day with
                // `metadata`), and virtiofsd answers ENOENT.
                Ok(Entry {
                    inode: 0,
                    entry_timeout: self.cfg.entry_timeout,
                    ..Entry::default()
                })
            }
            r => {
                match &r {
                    Ok(e) => log::trace!(
                        "lookup {parent}/{name:?} -> node {} ino {}",
                        e.inode,
                        e.attr.st_ino
                    ),
                    Err(err) => log::trace!("lookup {parent}/{name:?} -> {err}"),
                }
                r
            }
        }
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        self.inodes.forget(inode, count);
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        for (inode, count) in requests {
            self.inodes.forget(inode, count);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        // fstat in the guest names its open file: that reaches an inode the host unlinked,
        // which a file handle no longer opens.
        if let Some(h) = handle.and_then(|fh| self.handle(fh, inode).ok()) {
            let data = self.inode(inode)?;
            let st = statx_fd(h.as_raw_fd())?.st;
            return Ok(self.attr_reply(&data, st));
        }
        self.stat_inode(inode)
    }

    fn setattr(
        &self,
        _ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let data = self.inode(inode)?;
        let h = match handle {
            Some(fh) => Some(self.handle(fh, inode)?),
            None => None,
        };
        if h.is_none() {
            // Without a handle this may come from a path (truncate, chmod, chown, utimes) whose
            // dentry the host made stale: check the names before changing anything. A size
            // change without a handle always comes from a path (ftruncate and O_TRUNC carry
            // the handle); the others may come from a descriptor too (fchmod, fchown,
            // futimens), which cannot retry an ESTALE, so while the guest has the inode open
            // those go ahead (docs/coherency.md, limits).
            if valid.contains(SetattrValid::SIZE) {
                self.check_names(&data)?;
            } else {
                self.check_names_unless_open(&data)?;
            }
        }
        // The guest's open file where it gave one: it reaches an inode the host unlinked,
        // which a file handle no longer opens.
        let fd = match &h {
            Some(h) => InodeFd::Borrowed(h.as_fd()),
            None => data.fd()?,
        };
        let proc_name = fd_name(fd.as_raw_fd());

        self.changing(&[inode], || -> io::Result<()> {
            if valid.contains(SetattrValid::MODE) {
                // SAFETY (both): plain system calls on descriptors we own; no memory is passed.
                let r = match &h {
                    Some(h) => unsafe { libc::fchmod(h.as_raw_fd(), attr.st_mode) },
                    None => unsafe {
                        libc::fchmodat(
                            self.proc_self_fd.as_raw_fd(),
                            proc_name.as_ptr(),
                            attr.st_mode,
                            0,
                        )
                    },
                };
                check(r)?;
            }

            if valid.intersects(SetattrValid::UID | SetattrValid::GID) {
                let uid = if valid.contains(SetattrValid::UID) {
                    self.cfg.uids.to_host(attr.st_uid)?
                } else {
                    u32::MAX
                };
                let gid = if valid.contains(SetattrValid::GID) {
                    self.cfg.gids.to_host(attr.st_gid)?
                } else {
                    u32::MAX
                };
                // SAFETY: the empty path is NUL-terminated; AT_EMPTY_PATH acts on the inode itself.
                check(unsafe {
                    libc::fchownat(
                        fd.as_raw_fd(),
                        util::EMPTY.as_ptr(),
                        uid,
                        gid,
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }

            if valid.contains(SetattrValid::SIZE) {
                let size = to_i64(attr.st_size as u64)?;
                let _kill = if valid.contains(SetattrValid::KILL_SUIDGID) {
                    Some(ScopedNoFsetid::new()?)
                } else {
                    None
                };
                // SAFETY (both): ftruncate on descriptors we own.
                match &h {
                    Some(h) => check(unsafe { libc::ftruncate64(h.as_raw_fd(), size) })?,
                    None => {
                        let f = self.open_for_write(&data, libc::O_WRONLY)?;
                        check(unsafe { libc::ftruncate64(f.as_raw_fd(), size) })?
                    }
                };
            }

            if valid.intersects(SetattrValid::ATIME | SetattrValid::MTIME) {
                let time = |set: SetattrValid, now: SetattrValid, sec: i64, nsec: i64| {
                    if valid.contains(now) {
                        libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_NOW,
                        }
                    } else if valid.contains(set) {
                        libc::timespec {
                            tv_sec: sec,
                            tv_nsec: nsec,
                        }
                    } else {
                        libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_OMIT,
                        }
                    }
                };
                let times = [
                    time(
                        SetattrValid::ATIME,
                        SetattrValid::ATIME_NOW,
                        attr.st_atime,
                        attr.st_atime_nsec,
                    ),
                    time(
                        SetattrValid::MTIME,
                        SetattrValid::MTIME_NOW,
                        attr.st_mtime,
                        attr.st_mtime_nsec,
                    ),
                ];
                // SAFETY (both): `times` is a two-element array as utimensat requires. Through
                // /proc the magic link resolves to the inode itself, symlinks included.
                let r = match &h {
                    Some(h) => unsafe { libc::futimens(h.as_raw_fd(), times.as_ptr()) },
                    None => unsafe {
                        libc::utimensat(
                            self.proc_self_fd.as_raw_fd(),
                            proc_name.as_ptr(),
                            times.as_ptr(),
                            0,
                        )
                    },
                };
                check(r)?;
            }
            Ok(())
        })?;

        let st = statx_fd(fd.as_raw_fd())?.st;
        Ok(self.attr_reply(&data, st))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        let data = self.inode(inode)?;
        util::readlinkat(data.fd()?.as_raw_fd())
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.create_node(ctx, parent, name, None, |dir| {
            // SAFETY: both strings are NUL-terminated.
            check(unsafe { libc::symlinkat(linkname.as_ptr(), dir, name.as_ptr()) }).map(drop)
        })
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.create_node(ctx, parent, name, Some(umask), |dir| {
            // SAFETY: `name` is NUL-terminated.
            check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, rdev as libc::dev_t) }).map(drop)
        })
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.create_node(ctx, parent, name, Some(umask), |dir| {
            // SAFETY: `name` is NUL-terminated.
            check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
        })
    }

    fn unlink(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        validate_name(name)?;
        let p = self.inode(parent)?;
        self.check_names(&p)?;
        let id = self.id_at(&p, name);
        let dir = p.fd()?;
        let found = id.as_ref().and_then(|id| self.inodes.find(id));
        let both = [parent, found.unwrap_or(parent)];
        let nodes = &both[..1 + usize::from(found.is_some())];
        // SAFETY: `name` is NUL-terminated.
        self.changing(nodes, || {
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })
        })?;
        if let Some(id) = id {
            self.guest_moved_name(&id, (parent, name.to_bytes()), None);
        }
        Ok(())
    }

    fn rmdir(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        validate_name(name)?;
        let p = self.inode(parent)?;
        self.check_names(&p)?;
        let id = self.id_at(&p, name);
        let dir = p.fd()?;
        // SAFETY: `name` is NUL-terminated.
        self.changing(&[parent], || {
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
        })?;
        if let Some(id) = id {
            self.guest_moved_name(&id, (parent, name.to_bytes()), None);
        }
        Ok(())
    }

    fn rename(
        &self,
        _ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        validate_name(oldname)?;
        validate_name(newname)?;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE | libc::RENAME_WHITEOUT) != 0 {
            return Err(einval());
        }
        let old = self.inode(olddir)?;
        let new = self.inode(newdir)?;
        self.check_names(&old)?;
        self.check_names(&new)?;
        // The guest moves its dentries with the rename (and drops the one it replaces): so do
        // the names we check at OPEN.
        let moved = self.id_at(&old, oldname);
        let target = self.id_at(&new, newname);
        // SAFETY: both names are NUL-terminated. The raw system call avoids depending on the
        // C library's renameat2 wrapper.
        let (old_fd, new_fd) = (old.fd()?, new.fd()?);
        // A directory moved (or exchanged) carries its own delegation along.
        let mut dirs = vec![olddir, newdir];
        // The inodes moved or replaced carry delegations of their own.
        dirs.extend(
            moved
                .iter()
                .chain(&target)
                .filter_map(|id| self.inodes.find(id)),
        );
        let r = self.changing(&dirs, || unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                old_fd.as_raw_fd(),
                oldname.as_ptr(),
                new_fd.as_raw_fd(),
                newname.as_ptr(),
                flags,
            )
        });
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let (from, to) = ((olddir, oldname.to_bytes()), (newdir, newname.to_bytes()));
        if moved.is_some() && moved == target {
            // Two links of one file: rename(2) changes nothing.
            return Ok(());
        }
        if let Some(target) = target {
            let exchanged = flags & libc::RENAME_EXCHANGE != 0;
            self.guest_moved_name(&target, to, exchanged.then_some(from));
        }
        if let Some(moved) = moved {
            self.guest_moved_name(&moved, from, Some(to));
        }
        Ok(())
    }

    fn link(
        &self,
        _ctx: &Context,
        inode: u64,
        newparent: u64,
        newname: &CStr,
    ) -> io::Result<Entry> {
        validate_name(newname)?;
        let data = self.inode(inode)?;
        let p = self.inode(newparent)?;
        // `ln old new` through a stale `old` would link the file the host moved away, and a
        // stale directory name would put the link where the host moved that directory.
        self.check_names(&data)?;
        self.check_names(&p)?;
        self.descriptor_room(1)?;
        // Linking through the /proc magic link needs no CAP_DAC_READ_SEARCH (unlike
        // AT_EMPTY_PATH) and links the inode itself, even a symlink or an O_TMPFILE file.
        // Both descriptors stay open across the call (a node held by file handle opens one).
        let (src, dir) = (data.fd()?, p.fd()?);
        let from = fd_name(src.as_raw_fd());
        // SAFETY: both names are NUL-terminated.
        self.changing(&[newparent, inode], || {
            check(unsafe {
                libc::linkat(
                    self.proc_self_fd.as_raw_fd(),
                    from.as_ptr(),
                    dir.as_raw_fd(),
                    newname.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
        })?;
        self.do_lookup(&p, newname)
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let data = self.inode(inode)?;
        let raw_flags = flags;
        let flags = self.open_flags(flags);
        // First the name, then anything else: an O_TRUNC through a name the host renamed away
        // must not truncate the renamed file.
        if let Err(e) = self.check_names(&data) {
            log::trace!("open node {inode}: {e}");
            return Err(e);
        }
        // Before anything changes on the host (O_TRUNC): the handle must fit.
        self.descriptor_room(1)?;
        let writes = super::open::writes(flags);
        let file = {
            let _kill = if fuse_flags & FOPEN_IN_KILL_SUIDGID != 0 && flags & libc::O_TRUNC != 0 {
                Some(ScopedNoFsetid::new()?)
            } else {
                None
            };
            if writes {
                self.open_for_write(&data, flags)?
            } else {
                self.open_read(&data, super::ReadOnly::new(flags)?)?
            }
        };
        if let (true, Some(keeper)) = (writes, self.leases.get()) {
            // As at CREATE: the guest's only open of a file may be leased while it writes
            // (the read lease, if any, was given up for this open; the keeper leases regular
            // files only).
            keeper.lease_write_handle(&data, &file);
        }
        let keep = self.check_open(&data, &file)?;
        let exec = raw_flags & FMODE_EXEC != 0 && !writes;
        let handle = self.handles.insert(&data, file, writes, exec);
        let mut opts = if is_dir(data.mode) {
            self.dir_open_options()
        } else {
            self.file_open_options()
        };
        if !keep {
            opts.remove(OpenOptions::KEEP_CACHE | OpenOptions::CACHE_DIR);
        }
        log::trace!(
            "open node {inode} ino {} flags {flags:#o}: keep {keep}",
            data.id.ino
        );
        Ok((Some(handle), opts, None))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        validate_name(name)?;
        let p = self.inode(parent)?;
        self.check_names(&p)?;
        // A node and a handle, before anything is created or truncated.
        self.descriptor_room(2)?;
        let flags = self.open_flags(args.flags) & !libc::O_DIRECTORY;
        let context = take_security_context();
        // Before the guest's credentials: they cannot open a node held by file handle.
        let dir = p.fd()?;
        let (uid, gid) = self.ids_to_host(ctx.uid, ctx.gid)?;
        // The keeper's part runs with our own credentials (a delegation needs CAP_LEASE).
        let (file, created) = self.changing(&[parent], || {
            let _creds = ScopedCreds::new(uid, gid)?;
            let _umask = ScopedUmask::new(self.create_umask(args.umask))?;
            // O_NOFOLLOW: should a symlink appear under the name meanwhile, fail instead of
            // creating or opening whatever it points to.
            let flags = flags | libc::O_CREAT | libc::O_NOFOLLOW;
            // A security context labels only a file this CREATE makes, not one it opens:
            // try an exclusive create first to know which.
            match context {
                Some(_) if flags & libc::O_EXCL == 0 => {
                    match self.create_for_write(&p, &dir, name, flags | libc::O_EXCL, args.mode) {
                        Ok(file) => Ok((file, true)),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok((
                            self.create_for_write(&p, &dir, name, flags, args.mode)?,
                            false,
                        )),
                        Err(e) => Err(e),
                    }
                }
                _ => Ok((
                    self.create_for_write(&p, &dir, name, flags, args.mode)?,
                    true,
                )),
            }
        })?;
        if let (Some(context), true) = (&context, created) {
            self.label_created_file(dir.as_raw_fd(), name, &file, context)?;
        }
        let mut entry = self.add_inode_of_open_file(&file, &p, Some(name))?;
        let data = self.inode(entry.inode)?;
        if let Some(keeper) = self.leases.get() {
            // Nobody else has the new file open: a write lease on the guest's own handle
            // lets it cache the file while it writes; the reply then says what the lease
            // covers, read under it.
            if keeper.lease_write_handle(&data, &file) {
                let st = statx_fd(file.as_raw_fd())?.st;
                (entry.attr, entry.attr_timeout) = self.attr_reply(&data, st);
            }
            // The guest's cache of the new file starts as what the host has: the attributes
            // just read for the entry.
            keeper.check_open(&data, &entry.attr);
        }
        let handle = self.handles.insert(&data, file, true, false);
        Ok((entry, Some(handle), self.file_open_options(), None))
    }

    fn read(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let h = self.handle(handle, inode)?;
        let mut f = borrow_file(&h);
        w.write_from(&mut *f, size as usize, offset)
    }

    fn write(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let h = self.handle(handle, inode)?;
        let _kill = if fuse_flags & WRITE_KILL_PRIV != 0 {
            Some(ScopedNoFsetid::new()?)
        } else {
            None
        };
        let mut f = borrow_file(&h);
        r.read_to(&mut *f, size as usize, offset)
    }

    fn flush(&self, _ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        let h = self.handle(handle, inode)?;
        self.release_owner_locks(inode, lock_owner);
        // Closing a duplicate is what close(2) in the guest means to the host: it drops any
        // process-associated POSIX locks and reports delayed write errors (NFS and the like).
        // SAFETY: dup/close of a descriptor we own; the duplicate is closed exactly once.
        let dup = check(unsafe { libc::dup(h.as_raw_fd()) })?;
        check(unsafe { libc::close(dup) })?;
        Ok(())
    }

    fn fsync(&self, _ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let h = self.handle(handle, inode)?;
        // SAFETY: fsync/fdatasync on a descriptor we own.
        let r = if datasync {
            unsafe { libc::fdatasync(h.as_raw_fd()) }
        } else {
            unsafe { libc::fsync(h.as_raw_fd()) }
        };
        check(r).map(drop)
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let h = self.handle(handle, inode)?;
        // SAFETY: fallocate on a descriptor we own.
        check(unsafe {
            libc::fallocate64(h.as_raw_fd(), mode as i32, to_i64(offset)?, to_i64(length)?)
        })
        .map(drop)
    }

    fn release(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let h = self.handles.remove(handle, inode).ok_or_else(ebadf)?;
        let written = match (h.writable, self.leases.get()) {
            (true, Some(keeper)) => self.inode(inode).ok().map(|data| {
                // The handle's own descriptor: the inode as the guest's writes left it.
                if let Ok(info) = statx_fd(h.as_raw_fd()) {
                    keeper.write_handle_closed(&data, &info.st);
                }
                (keeper, data)
            }),
            _ => None,
        };
        if flock_release {
            // An in-flight request may still hold the descriptor open; unlock explicitly.
            // SAFETY: flock on a descriptor we own.
            unsafe { libc::flock(h.as_raw_fd(), libc::LOCK_UN) };
        }
        if let Some(owner) = lock_owner {
            self.release_owner_locks(inode, owner);
        }
        drop(h);
        if let Some((keeper, data)) = written {
            keeper.write_handle_dropped(&data);
        }
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let data = self.inode(inode)?;
        let mut st = std::mem::MaybeUninit::<statvfs64>::zeroed();
        // SAFETY: fstatvfs fills the buffer we pass; O_PATH descriptors are accepted.
        check(unsafe { libc::fstatvfs64(data.fd()?.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstatvfs64 succeeded (and the buffer was zeroed anyway).
        Ok(unsafe { st.assume_init() })
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_names_unless_open(&*self.inode(inode)?)?;
        self.changing(&[inode], || self.do_setxattr(inode, name, value, flags))
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.do_getxattr(inode, name, size)
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.do_listxattr(inode, size)
    }

    fn removexattr(&self, _ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_names_unless_open(&*self.inode(inode)?)?;
        self.changing(&[inode], || self.do_removexattr(inode, name))
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let data = self.inode(inode)?;
        if !is_dir(data.mode) {
            return Err(errno(libc::ENOTDIR));
        }
        // Listing a directory through a name the host moved away would list the moved one.
        self.check_names(&data)?;
        self.descriptor_room(1)?;
        let file = openat(
            data.fd()?.as_raw_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        let keep = self.check_open(&data, &file)?;
        let handle = self.handles.insert(&data, file, false, false);
        let mut opts = self.dir_open_options();
        if !keep {
            // The directory changed since the guest last opened it (its ctime): no cached
            // listing even for this open.
            opts.remove(OpenOptions::CACHE_DIR);
        }
        Ok((Some(handle), opts))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let batch = dirents_for_reply(size, 24);
        self.do_readdir(inode, handle, batch, offset, |_, name, ino, off, type_| {
            let n = add_entry(DirEntry {
                ino,
                offset: off,
                type_,
                name,
            })?;
            Ok(n > 0)
        })
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let dir = self.inode(inode)?;
        let batch = dirents_for_reply(size, 152);
        self.do_readdir(
            inode,
            handle,
            batch,
            offset,
            |dir_fd, name, ino, off, type_| {
                let dirent = DirEntry {
                    ino,
                    offset: off,
                    type_,
                    name,
                };
                // The guest ignores node ids given for "." and ".." (it would never forget them),
                // and an entry that vanished since getdents is simply not described.
                let entry = if name == b"." || name == b".." {
                    Entry::default()
                } else {
                    match std::ffi::CString::new(name) {
                        Ok(cname) => self
                            .lookup_at(&dir, Some(dir_fd), &cname, false)
                            .unwrap_or_default(),
                        Err(_) => Entry::default(),
                    }
                };
                let looked_up = entry.inode;
                let n = add_entry(dirent, entry)?;
                if n == 0 && looked_up != 0 {
                    // Did not fit: the guest never saw this lookup.
                    self.inodes.forget(looked_up, 1);
                }
                Ok(n > 0)
            },
        )
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.fsync(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, _ctx: &Context, inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.handles
            .remove(handle, inode)
            .map(drop)
            .ok_or_else(ebadf)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        let mut st = statx_fd(self.inode(inode)?.fd()?.as_raw_fd())?.st;
        // The caller's ids are the guest's: compare with the owner the guest sees.
        self.ids_to_guest(&mut st);
        let want = mask & (libc::R_OK | libc::W_OK | libc::X_OK) as u32;
        if want == 0 {
            return Ok(());
        }
        let mode = st.st_mode;
        if ctx.uid == 0 {
            // Root may read and write anything; it may execute only what someone could.
            if want & libc::X_OK as u32 != 0 && !is_dir(mode) && mode & 0o111 == 0 {
                return Err(errno(libc::EACCES));
            }
            return Ok(());
        }
        // Exactly one class of permission bits applies: owner, else group, else others.
        let bits = if st.st_uid == ctx.uid {
            (mode >> 6) & 7
        } else if st.st_gid == ctx.gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        if want & !bits != 0 {
            return Err(errno(libc::EACCES));
        }
        Ok(())
    }

    fn lseek(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let h = self.handle(handle, inode)?;
        let whence = whence as i32;
        // The guest resolves SEEK_SET/CUR/END itself; only these need the host's layout.
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(einval());
        }
        util::lseek(h.as_raw_fd(), to_i64(offset)?, whence)
    }

    fn getlk(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.do_getlk(inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.do_setlk(inode, handle, owner, lock, flags, false)
    }

    fn setlkw(
        &self,
        _ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.do_setlk(inode, handle, owner, lock, flags, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirents_for_reply_bounds_the_host_listing() {
        // READDIR: about the reply's size; READDIRPLUS: a sixth of it, at least 1 KiB (one
        // 255-byte name and more), at most MAX_DIR_BUF whatever the guest asks.
        assert_eq!(dirents_for_reply(4096, 24), 4104);
        assert_eq!(dirents_for_reply(4096, 152), 1024);
        assert_eq!(dirents_for_reply(65_536, 152), 10_368);
        assert_eq!(dirents_for_reply(1 << 20, 24), MAX_DIR_BUF);
        assert_eq!(dirents_for_reply(0, 152), 1024);
        assert_eq!(dirents_for_reply(u32::MAX, 0), MAX_DIR_BUF);
    }
}
