//! The passthrough filesystem and how the command line configures it.
//!
//! [`crate::passthrough`] does the host-side work. This module maps virtiofsd's cache modes
//! onto it with virtiofsd's exact timeouts, so a guest sees the same caching behaviour after a
//! swap of daemons.

use std::io;
use std::path::Path;
use std::time::Duration;

use crate::cli::{CacheMode, InodeFileHandles, NegotiationMode, Options};
use crate::passthrough::{
    CachePolicy, Config, FileHandleMode, IdTranslation, PassthroughFs, XattrMap,
};

/// The filesystem type the daemon serves.
pub type Fs = PassthroughFs;

/// The entry and attribute timeout: virtiofsd's for its cache modes, the lease for ours.
pub fn cache_timeout(mode: CacheMode, lease_timeout: f64) -> Duration {
    match mode {
        CacheMode::Never => Duration::ZERO,
        CacheMode::Metadata | CacheMode::Always => Duration::from_secs(86400),
        CacheMode::Auto => Duration::from_secs(1),
        CacheMode::Coherent => Duration::from_secs_f64(lease_timeout),
    }
}

fn cache_policy(mode: CacheMode) -> CachePolicy {
    match mode {
        CacheMode::Never => CachePolicy::Never,
        CacheMode::Metadata => CachePolicy::Metadata,
        CacheMode::Auto => CachePolicy::Auto,
        CacheMode::Always => CachePolicy::Always,
        CacheMode::Coherent => CachePolicy::Coherent,
    }
}

fn file_handle_mode(mode: InodeFileHandles) -> FileHandleMode {
    match mode {
        InodeFileHandles::Never => FileHandleMode::Never,
        InodeFileHandles::Prefer => FileHandleMode::Prefer,
        InodeFileHandles::Mandatory => FileHandleMode::Mandatory,
    }
}

/// The passthrough configuration for serving `root` with `options`.
pub fn config(options: &Options, root: &Path) -> Config {
    let timeout = cache_timeout(options.cache, options.lease_timeout);
    Config {
        root_dir: root.to_path_buf(),
        entry_timeout: timeout,
        attr_timeout: timeout,
        cache: cache_policy(options.cache),
        writeback: options.writeback,
        // As virtiofsd: ACLs, name maps and security labels are xattrs.
        xattr: options.xattr
            || options.posix_acl
            || options.xattrmap.is_some()
            || options.security_label != NegotiationMode::Never,
        posix_acl: options.posix_acl,
        inode_file_handles: file_handle_mode(options.inode_file_handles),
        allow_direct_io: options.allow_direct_io,
        announce_submounts: options.announce_submounts,
        host_posix_locks: options.posix_lock,
        host_flock: options.flock,
        readdirplus: !options.no_readdirplus,
        killpriv_v2: options.killpriv_v2,
        // After set_rlimit_nofile: the budget is a share of the limit the daemon runs with.
        guest_descriptors: crate::passthrough::guest_descriptor_budget(),
        // Each rule was checked when the command line was parsed.
        uids: IdTranslation::parse(&options.translate_uid)
            .expect("--translate-uid rules are checked by the command-line parser"),
        gids: IdTranslation::parse(&options.translate_gid)
            .expect("--translate-gid rules are checked by the command-line parser"),
        allow_mmap: options.allow_mmap,
        xattrmap: options.xattrmap.as_deref().map(|spec| {
            XattrMap::parse(spec).expect("--xattrmap is checked by the command-line parser")
        }),
        security_label: options.security_label != NegotiationMode::Never,
        security_label_required: options.security_label == NegotiationMode::Always,
    }
}

/// Open the shared directory `root` for serving. Must run after the process has its final
/// /proc (a /proc/self/fd descriptor is kept to reopen inodes) and before the sandbox hides
/// the directory's path: the root is opened here, not at the guest's INIT.
pub fn open(options: &Options, root: &Path) -> io::Result<Fs> {
    PassthroughFs::new(config(options, root))
}

/// `--inode-file-handles=mandatory` must fail at start-up where file handles do not work,
/// rather than silently falling back to descriptors.
pub fn check_file_handles(root: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(root)
        .and_then(|dir| crate::passthrough::FileHandle::of(dir.as_raw_fd()))
        .map(drop)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("--inode-file-handles=mandatory: the shared directory's filesystem does not support file handles: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn options(args: &[&str]) -> Options {
        let base = [
            "leasefsd",
            "--socket-path",
            "/tmp/s",
            "--shared-dir",
            "/tmp",
        ];
        Options::try_parse_from(base.iter().chain(args.iter())).unwrap()
    }

    #[test]
    fn cache_modes_keep_virtiofsd_timeouts() {
        assert_eq!(cache_timeout(CacheMode::Never, 5.0), Duration::ZERO);
        assert_eq!(cache_timeout(CacheMode::Auto, 5.0), Duration::from_secs(1));
        assert_eq!(
            cache_timeout(CacheMode::Always, 5.0),
            Duration::from_secs(86400)
        );
        assert_eq!(
            cache_timeout(CacheMode::Metadata, 5.0),
            Duration::from_secs(86400)
        );
        assert_eq!(
            cache_timeout(CacheMode::Coherent, 0.25),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn options_map_onto_passthrough_config() {
        let c = config(
            &options(&["--cache", "never", "--posix-acl", "--writeback"]),
            Path::new("/srv"),
        );
        assert_eq!(c.cache, CachePolicy::Never);
        assert_eq!(c.entry_timeout, Duration::ZERO);
        assert!(c.xattr, "--posix-acl implies xattr support");
        assert!(c.writeback);
        assert!(
            !c.allow_direct_io,
            "O_DIRECT is filtered unless --allow-direct-io"
        );
        assert_eq!(c.root_dir, Path::new("/srv"));
    }

    #[test]
    fn file_handle_support_is_detected() {
        // /proc has no file handle support; ext4, tmpfs and btrfs under /tmp do.
        let e = check_file_handles(Path::new("/proc")).unwrap_err();
        assert!(
            e.to_string().contains("--inode-file-handles=mandatory"),
            "{e}"
        );
        assert!(check_file_handles(&std::env::temp_dir()).is_ok());
    }
}
