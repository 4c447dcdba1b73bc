//! The command line: virtiofsd 1.14's flags, with the same names and meanings.
//!
//! A user who swaps `virtiofsd` for `leasefsd` in a launch script must not have to touch the
//! rest of the line, so every flag here keeps virtiofsd's spelling, defaults and value syntax.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// What the guest may cache, with virtiofsd's timeouts and open flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    /// No data, attribute or dentry caching: every access goes to the host.
    Never,
    /// Attributes and dentries are cached for a day; file data is not.
    Metadata,
    /// Attributes and dentries for one second; data is dropped when a file's mtime changed at open.
    Auto,
    /// Everything is cached for a day (stale when the host changes the directory).
    Always,
    /// leasefs's default: data, listings, names and attributes are cached under leases of
    /// `--lease-timeout`; host writers wait until the guest's lease has ended.
    Coherent,
}

/// How the daemon is confined before it serves the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SandboxMode {
    /// New mount, pid and network namespaces, with the shared directory as the root.
    Namespace,
    /// chroot(2) into the shared directory (needs CAP_SYS_CHROOT).
    Chroot,
    /// No confinement: the daemon sees the host's whole filesystem.
    None,
}

/// Whether inodes are referenced by O_PATH descriptors or by file handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InodeFileHandles {
    /// Always keep an O_PATH descriptor per inode.
    Never,
    /// Use file handles where the filesystem supports them, descriptors elsewhere.
    Prefer,
    /// Use file handles; refuse to start where they are not supported.
    Mandatory,
}

/// Log verbosity, as virtiofsd spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
    Off,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
            LogLevel::Off => log::LevelFilter::Off,
        }
    }
}

/// The largest virtqueue a guest may configure; QEMU accepts up to this with virtiofsd too.
pub const MAX_QUEUE_SIZE: usize = 32768;

/// leasefsd: a vhost-user virtio-fs daemon (drop-in for virtiofsd).
#[derive(Debug, Parser)]
#[command(name = "leasefsd", version, about, args_override_self = true)]
pub struct Options {
    /// vhost-user socket path.
    #[arg(long = "socket-path", alias = "socket", value_name = "PATH",
          required_unless_present_any = ["fd", "print_capabilities"])]
    pub socket_path: Option<PathBuf>,

    /// File descriptor of an already listening vhost-user socket.
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    pub fd: Option<i32>,

    /// Name of the group that owns the vhost-user socket.
    #[arg(long = "socket-group", value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// Shared directory path.
    #[arg(
        long = "shared-dir",
        value_name = "DIR",
        required_unless_present = "print_capabilities"
    )]
    pub shared_dir: Option<PathBuf>,

    /// Tag the guest mounts (`mount -t virtiofs TAG`); also announced through the device's
    /// config space when the VMM asks for it.
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// What the guest may cache.
    #[arg(long, value_enum, default_value_t = CacheMode::Coherent)]
    pub cache: CacheMode,

    /// With --cache coherent: the lease, in seconds (fractions allowed). A guest uses cached
    /// names and attributes this long without asking; a host process writing a file the guest
    /// caches is held (at most this long) until the guest has stopped trusting its cache.
    /// 0 means no leases: the guest revalidates every use and host writers are never held.
    #[arg(long = "lease-timeout", value_name = "SECS", default_value_t = 1.0,
          value_parser = parse_lease_timeout)]
    pub lease_timeout: f64,

    /// With --cache coherent and a guest that negotiated the notification queue: the lease,
    /// in seconds. Such a guest is told of host changes as they happen, so it may cache
    /// longer; a host writer waits for its confirmation, and for at most this long if it never
    /// confirms. Changes no event reports (a lost fanotify event) stay stale at most this long.
    #[arg(long = "notify-lease-timeout", value_name = "SECS", default_value_t = 10.0,
          value_parser = parse_lease_timeout)]
    pub notify_lease_timeout: f64,

    /// Sandbox mechanism to isolate the daemon process.
    #[arg(long, value_enum, default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,

    /// Maximum number of threads serving requests of one queue (0: serve in the queue's own
    /// thread).
    #[arg(long = "thread-pool-size", value_name = "N", default_value_t = 0)]
    pub thread_pool_size: usize,

    /// Export the directory read-only.
    #[arg(long)]
    pub readonly: bool,

    /// Enable support for extended attributes.
    #[arg(long)]
    pub xattr: bool,

    /// Enable support for POSIX ACLs (implies --xattr).
    #[arg(long = "posix-acl")]
    pub posix_acl: bool,

    /// Reference inodes by file handles instead of O_PATH descriptors.
    #[arg(long = "inode-file-handles", value_enum, default_value_t = InodeFileHandles::Never,
          num_args = 0..=1, default_missing_value = "prefer")]
    pub inode_file_handles: InodeFileHandles,

    /// Enable writeback caching in the guest.
    #[arg(long)]
    pub writeback: bool,

    /// Honour O_DIRECT from the guest instead of filtering it out.
    #[arg(long = "allow-direct-io")]
    pub allow_direct_io: bool,

    /// Tell the guest about host submounts so it can give them their own st_dev.
    #[arg(long = "announce-submounts")]
    pub announce_submounts: bool,

    /// Log level.
    #[arg(long = "log-level", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Log to syslog instead of stderr.
    #[arg(long)]
    pub syslog: bool,

    /// Set the maximum number of open files (0: leave the limit unchanged; default: raise it to
    /// the system maximum).
    #[arg(long = "rlimit-nofile", value_name = "N")]
    pub rlimit_nofile: Option<u64>,

    /// Print the vhost-user.json backend program capabilities and exit.
    #[arg(long = "print-capabilities")]
    pub print_capabilities: bool,

    /// How many request queues to offer the VMM (QEMU's `num-request-queues` may ask for up to
    /// this many), at most 62: with the hiprio and notification queues that is 64 virtqueues,
    /// one bit each in the daemon's 64-bit queue masks.
    #[arg(long = "max-request-queues", value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=MAX_REQUEST_QUEUES as i64))]
    pub max_request_queues: u16,
}

/// Most request queues: hiprio and notification queue plus these make 64 virtqueues, which is
/// what the vhost-user backend's per-thread queue masks (`u64`) can name.
pub const MAX_REQUEST_QUEUES: u16 = 62;

fn parse_lease_timeout(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=86400.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "{value:?} is not a number of seconds from 0 to 86400"
        )),
    }
}

/// The capabilities document of QEMU's docs/interop/vhost-user.json for a "fs" backend, plus
/// a "leasefs" object (management tools read only "type" and "features") naming the coherence
/// options: cache modes, the lease flag and its default, the host event sources, and whether
/// the notification queue is offered.
pub fn capabilities_json() -> &'static str {
    // No "migrate-precopy": leasefsd does not transfer device state, so it must not claim to.
    concat!(
        "{\n",
        "  \"type\": \"fs\",\n",
        "  \"features\": [\n",
        "    \"separate-options\"\n",
        "  ],\n",
        "  \"leasefs\": {\n",
        "    \"cache\": [\"coherent\", \"auto\", \"always\", \"metadata\", \"never\"],\n",
        "    \"default-cache\": \"coherent\",\n",
        "    \"lease-timeout\": { \"flag\": \"--lease-timeout\", \"default-seconds\": 1.0 },\n",
        "    \"notify-lease-timeout\": { \"flag\": \"--notify-lease-timeout\", \"default-seconds\": 10.0 },\n",
        "    \"host-events\": [\"file-lease\", \"fanotify-modify\", \"fanotify-dirent\"],\n",
        "    \"notification-queue\": { \"feature-bit\": 0, \"notify-buf-size\": 512, \"confirmation\": \"FUSE_NOTIFY_REPLY\" }\n",
        "  }\n",
        "}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(std::iter::once("leasefsd").chain(args.iter().copied()))
    }

    #[test]
    fn command_definition_is_consistent() {
        Options::command().debug_assert();
    }

    #[test]
    fn virtiofsd_line_parses_with_virtiofsd_defaults() {
        let o = parse(&["--socket-path", "/tmp/s", "--shared-dir", "/srv"]).unwrap();
        assert_eq!(o.cache, CacheMode::Coherent, "leasefs's own default");
        assert_eq!(o.lease_timeout, 1.0);
        assert_eq!(o.sandbox, SandboxMode::Namespace);
        assert_eq!(o.inode_file_handles, InodeFileHandles::Never);
        assert_eq!(o.thread_pool_size, 0);
        assert!(!o.readonly && !o.xattr && !o.writeback);
    }

    #[test]
    fn equals_syntax_and_bare_inode_file_handles() {
        let o = parse(&[
            "--socket-path=/tmp/s",
            "--shared-dir=/srv",
            "--cache=always",
            "--sandbox=none",
            "--inode-file-handles",
        ])
        .unwrap();
        assert_eq!(o.cache, CacheMode::Always);
        assert_eq!(o.sandbox, SandboxMode::None);
        assert_eq!(o.inode_file_handles, InodeFileHandles::Prefer);
    }

    #[test]
    fn unknown_flag_and_missing_dir_are_errors() {
        assert!(parse(&["--socket-path", "/s", "--shared-dir", "/d", "--bogus"]).is_err());
        assert!(parse(&["--socket-path", "/s"]).is_err());
        assert!(parse(&[
            "--socket-path",
            "/s",
            "--shared-dir",
            "/d",
            "--cache",
            "sometimes"
        ])
        .is_err());
    }

    #[test]
    fn a_repeated_flag_takes_its_last_value() {
        // Launch scripts append their own flags to a default line.
        let o = parse(&[
            "--socket-path=/s",
            "--shared-dir=/d",
            "--cache=always",
            "--cache=never",
        ]);
        assert_eq!(o.unwrap().cache, CacheMode::Never);
    }

    #[test]
    fn request_queues_fit_the_64_bit_queue_masks() {
        let base = [
            "--socket-path",
            "/s",
            "--shared-dir",
            "/d",
            "--max-request-queues",
        ];
        let with = |n: &str| {
            let mut v = base.to_vec();
            v.push(n);
            parse(&v)
        };
        assert_eq!(with("62").unwrap().max_request_queues, 62);
        for bad in ["63", "64", "0"] {
            let e = with(bad).expect_err(bad).to_string();
            assert!(e.contains("62"), "{bad}: {e}");
        }
        // hiprio + notification + request queues, one bit each.
        assert_eq!(2 + MAX_REQUEST_QUEUES as u32, u64::BITS);
    }

    #[test]
    fn print_capabilities_needs_nothing_else() {
        let o = parse(&["--print-capabilities"]).unwrap();
        assert!(o.print_capabilities);
        assert!(capabilities_json().contains("\"type\": \"fs\""));
        // The flags it names exist, with the defaults it claims.
        let json = capabilities_json();
        assert!(json.contains("\"--lease-timeout\""));
        let defaults = parse(&["--socket-path", "/s", "--shared-dir", "/d"]).unwrap();
        assert_eq!(defaults.lease_timeout, 1.0);
        assert!(json.contains("\"default-seconds\": 1.0"));
        assert_eq!(defaults.cache, CacheMode::Coherent);
        assert!(json.contains(&format!(
            "\"notify-buf-size\": {}",
            crate::coherence::notifier::NOTIFY_BUF_SIZE
        )));
    }

    #[test]
    fn fd_and_socket_path_conflict() {
        assert!(parse(&["--fd", "3", "--socket-path", "/s", "--shared-dir", "/d"]).is_err());
        assert!(parse(&["--fd", "3", "--shared-dir", "/d"]).is_ok());
    }
}
