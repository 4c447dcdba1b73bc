//! The command line: virtiofsd 1.14's flags, with the same names and meanings.
//!
//! A user who swaps `virtiofsd` for `leasefsd` in a launch script must not have to touch the
//! rest of the line, so every flag here keeps virtiofsd's spelling, defaults and value syntax.

use std::path::{Path, PathBuf};

use clap::{ArgAction, Parser, ValueEnum};

use crate::coherence::host_lease;

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

/// What the seccomp filter does with a system call outside the daemon's allow-list
/// (virtiofsd's `--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SeccompMode {
    /// No filter.
    None,
    /// Kill the whole process.
    Kill,
    /// Allow the call but log it to the kernel's audit log.
    Log,
    /// Send SIGSYS to the thread.
    Trap,
}

/// virtiofsd's negotiation modes (`--posix-acl`, `--security-label`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NegotiationMode {
    Never,
    Auto,
    Always,
}

/// A `--modcaps` item: add (`+`) or remove (`-`) one capability from the kept set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModCap {
    pub add: bool,
    pub cap: caps::Capability,
}

/// A whole `--modcaps` value (the last one given wins, as in virtiofsd).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ModCaps(pub Vec<ModCap>);

/// One `--uid-map`/`--gid-map` range, `:namespace_id:host_id:count:`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMapRange {
    pub inside: u32,
    pub outside: u32,
    pub count: u32,
}

const ABOUT: &str = "leasefsd: a vhost-user virtio-fs daemon with coherent guest caching \
(drop-in for virtiofsd 1.14)";

const AFTER_HELP: &str = "\
Coherent caching is the default (--cache coherent): the guest caches data, names and attributes
under short leases and never reads stale data after a host change. --cache auto|always|never|
metadata keep virtiofsd's meaning (always and metadata serve stale data when the host edits the
share). Launchers that force a cache mode: with libvirt, leave out <cache> (it only knows
none|always); with virtme-ng (which passes --cache always|auto) and other scripts, set
LEASEFSD_CACHE=coherent in leasefsd's environment: it overrides --cache and -o cache.
--readonly exports the share read-only.";

/// leasefsd: a vhost-user virtio-fs daemon (drop-in for virtiofsd).
///
/// Build it with [`Options::parse_args`]: that also applies the legacy `-o` options, `-d` and
/// the `--no-*` flags, and checks what clap cannot.
#[derive(Debug, Parser)]
#[command(name = "leasefsd", version, about = ABOUT, after_help = AFTER_HELP,
          args_override_self = true)]
pub struct Options {
    /// Shared directory path.
    #[arg(long = "shared-dir", value_name = "DIR",
          required_unless_present_any = ["compat_options", "print_capabilities"])]
    pub shared_dir: Option<PathBuf>,

    /// Tag the guest mounts (`mount -t virtiofs TAG`); also announced through the device's
    /// config space when the VMM asks for it.
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// vhost-user socket path (`--socket` is virtiofsd's deprecated spelling).
    #[arg(long = "socket-path", alias = "socket", value_name = "PATH",
          required_unless_present_any = ["fd", "print_capabilities"])]
    pub socket_path: Option<PathBuf>,

    /// Name of the group that owns the vhost-user socket (mode 0770).
    #[arg(long = "socket-group", value_name = "GROUP", conflicts_with = "fd")]
    pub socket_group: Option<String>,

    /// File descriptor of an already listening vhost-user socket.
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    pub fd: Option<i32>,

    /// Maximum number of threads serving requests of one queue (0: serve in the queue's own
    /// thread).
    #[arg(long = "thread-pool-size", value_name = "N", default_value_t = 0)]
    pub thread_pool_size: usize,

    /// Longest time, in microseconds, a request queue's thread watches its ring for the next
    /// request before sleeping until the guest kicks (0: never). The window adapts per queue:
    /// it opens only while requests keep coming sooner than this, and halves at each that
    /// comes later, so an idle or slow guest stops costing polling after a few requests.
    #[arg(long = "queue-poll-us", value_name = "US", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub queue_poll_us: u32,

    /// Enable support for extended attributes.
    #[arg(long)]
    pub xattr: bool,

    /// Enable support for POSIX ACLs (implies --xattr). `always` (the bare flag) and `auto`
    /// both negotiate ACLs when the guest supports them.
    #[arg(long = "posix-acl", value_name = "never|auto|always", require_equals = true,
          num_args = 0..=1, default_value = "never", default_missing_value = "always",
          value_parser = parse_negotiation_enabled, action = ArgAction::Set)]
    pub posix_acl: bool,

    /// Rules translating extended attribute names between host and guest (virtiofsd's
    /// `:type:scope:key:prepend:` rules; implies --xattr).
    #[arg(long, value_name = "XATTRMAP", value_parser = parse_xattrmap)]
    pub xattrmap: Option<String>,

    /// Sandbox mechanism to isolate the daemon process.
    #[arg(long, value_enum, default_value_t = SandboxMode::Namespace)]
    pub sandbox: SandboxMode,

    /// Export the directory read-only: the guest can make no modification.
    #[arg(long)]
    pub readonly: bool,

    /// What seccomp does with a system call outside the daemon's allow-list.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,

    /// Tell the guest which directories are mount points [default].
    #[arg(long = "announce-submounts", default_value_t = true, action = ArgAction::SetTrue,
          overrides_with = "no_announce_submounts")]
    pub announce_submounts: bool,

    /// Do not tell the guest which directories are mount points.
    #[arg(long = "no-announce-submounts", overrides_with = "announce_submounts")]
    pub no_announce_submounts: bool,

    /// Reference inodes by file handles instead of O_PATH descriptors (never, prefer,
    /// mandatory; "fallback" is virtiofsd's deprecated alias for "prefer"): a node then holds
    /// no descriptor. Needs CAP_DAC_READ_SEARCH; `prefer` falls back to descriptors where
    /// handles cannot be used, `mandatory` refuses to start there.
    #[arg(long = "inode-file-handles", value_name = "never|prefer|mandatory",
          default_value = "prefer", num_args = 0..=1, default_missing_value = "prefer",
          value_parser = parse_inode_file_handles)]
    pub inode_file_handles: InodeFileHandles,

    /// What the guest may cache.
    #[arg(long, value_enum, default_value_t = CacheMode::Coherent)]
    pub cache: CacheMode,

    /// With --cache metadata|never: let the guest mmap files shared (FUSE_DIRECT_IO_ALLOW_MMAP).
    #[arg(long = "allow-mmap")]
    pub allow_mmap: bool,

    /// Disable support for READDIRPLUS operations.
    #[arg(long = "no-readdirplus")]
    pub no_readdirplus: bool,

    /// Enable writeback caching in the guest.
    #[arg(long)]
    pub writeback: bool,

    /// Honour O_DIRECT from the guest instead of filtering it out.
    #[arg(long = "allow-direct-io")]
    pub allow_direct_io: bool,

    /// Print the vhost-user.json backend program capabilities and exit.
    #[arg(long = "print-capabilities")]
    pub print_capabilities: bool,

    /// Modify the list of capabilities kept, e.g. --modcaps=+sys_admin:-chown.
    #[arg(long, value_name = "MODCAPS", value_parser = parse_modcaps, allow_hyphen_values = true)]
    pub modcaps: Option<ModCaps>,

    /// Log level.
    #[arg(long = "log-level", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,

    /// Log to syslog (facility daemon) instead of stderr; without /dev/log, to local TCP or
    /// UDP syslog.
    #[arg(long)]
    pub syslog: bool,

    /// Set the maximum number of open files (0: leave the limit unchanged; default:
    /// min(1000000, /proc/sys/fs/nr_open)).
    #[arg(long = "rlimit-nofile", value_name = "N")]
    pub rlimit_nofile: Option<u64>,

    /// Options in the legacy comma-separated format (`,,` is a literal comma) [deprecated].
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub compat_options: Vec<String>,

    /// Set the log level to "debug" [deprecated].
    #[arg(short = 'd')]
    pub compat_debug: bool,

    /// Disable KILLPRIV V2 support [default].
    #[arg(long = "no-killpriv-v2", overrides_with = "killpriv_v2")]
    pub no_killpriv_v2: bool,

    /// Enable KILLPRIV V2 support.
    #[arg(long = "killpriv-v2", overrides_with = "no_killpriv_v2")]
    pub killpriv_v2: bool,

    /// Compatibility option that has no effect: the daemon always runs in the foreground
    /// [deprecated].
    #[arg(short = 'f')]
    pub compat_foreground: bool,

    /// Security label support (implies --xattr): agree to FUSE_SECURITY_CTX and store the
    /// security context (SELinux label) the guest sends with each object it creates as the
    /// xattr it names. `auto` agrees when the guest kernel offers it; `always` (the bare
    /// flag) refuses the mount of a guest kernel that does not.
    #[arg(long = "security-label", value_name = "never|auto|always", require_equals = true,
          num_args = 0..=1, default_value = "never", default_missing_value = "always",
          value_enum)]
    pub security_label: NegotiationMode,

    /// Map a range of UIDs from the host into the daemon's user namespace (with
    /// --sandbox=namespace), given as :namespace_uid:host_uid:count:. Repeatable.
    #[arg(long = "uid-map", value_name = "UID_MAP", value_parser = parse_id_map)]
    pub uid_map: Vec<IdMapRange>,

    /// Map a range of GIDs, as --uid-map. Repeatable.
    #[arg(long = "gid-map", value_name = "GID_MAP", value_parser = parse_id_map)]
    pub gid_map: Vec<IdMapRange>,

    /// Translate UIDs between guest and host in the daemon, given as
    /// `<type>:<source base>:<target base>:<count>` (type guest, host, map, squash-guest,
    /// squash-host) or `forbid-guest:<base>:<count>`. Repeatable; the first rule holding an
    /// id decides.
    #[arg(long = "translate-uid", value_name = "TRANSLATE_UID",
          value_parser = parse_translate_id)]
    pub translate_uid: Vec<String>,

    /// Translate GIDs, as --translate-uid.
    #[arg(long = "translate-gid", value_name = "TRANSLATE_GID",
          value_parser = parse_translate_id)]
    pub translate_gid: Vec<String>,

    /// Keep the guest's O_NOATIME (leasefsd always does).
    #[arg(long = "preserve-noatime")]
    pub preserve_noatime: bool,

    /// virtiofsd's migration settings: leasefsd cannot migrate (refused at start).
    #[arg(long = "migration-mode", value_name = "find-paths|file-handles",
          value_parser = ["find-paths", "file-handles"])]
    pub migration_mode: Option<String>,

    /// virtiofsd's migration settings: leasefsd cannot migrate (refused at start).
    #[arg(long = "migration-on-error", value_name = "abort|guest-error",
          value_parser = ["abort", "guest-error"])]
    pub migration_on_error: Option<String>,

    /// virtiofsd's migration settings: leasefsd cannot migrate (refused at start).
    #[arg(long = "migration-verify-handles")]
    pub migration_verify_handles: bool,

    /// virtiofsd's migration settings: leasefsd cannot migrate (refused at start).
    #[arg(long = "migration-confirm-paths")]
    pub migration_confirm_paths: bool,

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

    /// Adaptive leases (stock guests, --cache coherent): a file a host process writes gets no
    /// lease for this many seconds after the last write seen (doubling, up to
    /// --lease-cooldown-max, when the host writes it again soon after), so that later host
    /// writes are not held. 0 turns adaptation off: every grant gets the full lease.
    #[arg(long = "lease-cooldown", value_name = "SECS", default_value_t = 2.0,
          value_parser = parse_lease_timeout)]
    pub lease_cooldown: f64,

    /// Adaptive leases: the longest cool-down of a file the host keeps writing, in seconds.
    #[arg(long = "lease-cooldown-max", value_name = "SECS", default_value_t = 60.0,
          value_parser = parse_lease_timeout)]
    pub lease_cooldown_max: f64,

    /// Adaptive leases: a host write stops lease renewals in the file's directory for this
    /// many seconds (and share-wide when --lease-burst-dirs directories are written within
    /// it), so while one host writer waits the other leases run out instead of being renewed.
    #[arg(long = "lease-burst-window", value_name = "SECS", default_value_t = 2.0,
          value_parser = parse_lease_timeout)]
    pub lease_burst_window: f64,

    /// Adaptive leases: directories written within one burst window that stop renewals
    /// share-wide.
    #[arg(long = "lease-burst-dirs", value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub lease_burst_dirs: u32,

    /// How many request queues to offer the VMM (QEMU's `num-request-queues` may ask for up to
    /// this many), at most 62: with the hiprio and notification queues that is 64 virtqueues,
    /// one bit each in the daemon's 64-bit queue masks.
    #[arg(long = "max-request-queues", value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=MAX_REQUEST_QUEUES as i64))]
    pub max_request_queues: u16,

    /// Off with `-o no_flock`: guest flock locks stay in the guest (FLOCK_LOCKS not offered).
    #[arg(skip = true)]
    pub flock: bool,

    /// Off with `-o no_posix_lock`: guest POSIX locks stay in the guest (POSIX_LOCKS not offered).
    #[arg(skip = true)]
    pub posix_lock: bool,
}

/// Most request queues: hiprio and notification queue plus these make 64 virtqueues, which is
/// what the vhost-user backend's per-thread queue masks (`u64`) can name.
pub const MAX_REQUEST_QUEUES: u16 = 62;

/// A command line leasefsd cannot run with, in one line (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// The environment variable that overrides `--cache` and `-o cache=` (for launchers such as
/// virtme-ng that always pass a cache mode of their own).
pub const CACHE_ENV: &str = "LEASEFSD_CACHE";

/// What `--help` and `--version` print and how the process ends.
pub enum Parsed {
    /// Run the daemon with these options.
    Run(Box<Options>),
    /// Print this (help, version or a clap error) and exit with this status.
    Exit(clap::Error),
}

impl Options {
    /// Parse a command line as virtiofsd 1.14 would, plus leasefs's own flags: clap first,
    /// then `-o`, `-d`, the `--no-*` flags and `LEASEFSD_CACHE` (read from `cache_env`).
    pub fn parse_args<I, T>(args: I, cache_env: Option<&str>) -> Result<Parsed, CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let mut options = match Options::try_parse_from(args) {
            Ok(options) => options,
            Err(e) => return Ok(Parsed::Exit(e)),
        };
        options.finish(cache_env)?;
        Ok(Parsed::Run(Box::new(options)))
    }

    /// Apply what clap leaves to us, in virtiofsd's order: `-o` options override flags.
    pub fn finish(&mut self, cache_env: Option<&str>) -> Result<(), CliError> {
        if self.no_announce_submounts {
            self.announce_submounts = false;
        }
        if self.no_killpriv_v2 {
            self.killpriv_v2 = false;
        }
        if self.compat_debug {
            self.log_level = LogLevel::Debug;
        }
        for line in std::mem::take(&mut self.compat_options) {
            for option in split_compat_options(&line) {
                self.apply_compat_option(&option)?;
            }
        }
        if let Some(value) = cache_env.filter(|v| !v.is_empty()) {
            self.cache = CacheMode::from_str(value, true).map_err(|_| {
                CliError(format!(
                    "{CACHE_ENV}={value}: not a cache mode (coherent, auto, always, metadata, never)"
                ))
            })?;
        }
        if self.shared_dir.is_none() && !self.print_capabilities {
            return Err(CliError(
                "missing --shared-dir or -o source=DIR: the directory to share".into(),
            ));
        }
        Ok(())
    }

    fn apply_compat_option(&mut self, option: &str) -> Result<(), CliError> {
        let bad_value = |name: &str, value: &str, expected: &str| {
            CliError(format!(
                "-o {name}={value}: invalid value (expected {expected})"
            ))
        };
        if let Some((name, value)) = option.split_once('=') {
            match name {
                "source" => self.shared_dir = Some(PathBuf::from(value)),
                "cache" => {
                    self.cache = match value {
                        "none" => CacheMode::Never,
                        "auto" => CacheMode::Auto,
                        "always" => CacheMode::Always,
                        "metadata" => CacheMode::Metadata,
                        "coherent" => CacheMode::Coherent,
                        _ => {
                            return Err(bad_value(
                                name,
                                value,
                                "none, auto, always, metadata or coherent",
                            ))
                        }
                    }
                }
                // virtiofsd spells it `loglevel`; the C virtiofsd `log_level`.
                "loglevel" | "log_level" => {
                    self.log_level = match value {
                        "debug" => LogLevel::Debug,
                        "info" => LogLevel::Info,
                        "warn" => LogLevel::Warn,
                        "err" => LogLevel::Error,
                        _ => return Err(bad_value(name, value, "debug, info, warn or err")),
                    }
                }
                "sandbox" => {
                    self.sandbox = match value {
                        "namespace" => SandboxMode::Namespace,
                        "chroot" => SandboxMode::Chroot,
                        _ => return Err(bad_value(name, value, "namespace or chroot")),
                    }
                }
                "modcaps" => {
                    self.modcaps = Some(
                        parse_modcaps(value).map_err(|e| CliError(format!("-o {option}: {e}")))?,
                    )
                }
                "xattrmap" => {
                    parse_xattrmap(value).map_err(|e| CliError(format!("-o {option}: {e}")))?;
                    self.xattrmap = Some(value.to_string())
                }
                _ => return Err(CliError(format!("-o {option}: unknown option"))),
            }
            return Ok(());
        }
        match option {
            "xattr" => self.xattr = true,
            "no_xattr" => self.xattr = false,
            "readdirplus" => self.no_readdirplus = false,
            "no_readdirplus" => self.no_readdirplus = true,
            "writeback" => self.writeback = true,
            "no_writeback" => self.writeback = false,
            "allow_direct_io" => self.allow_direct_io = true,
            "no_allow_direct_io" => self.allow_direct_io = false,
            "announce_submounts" => self.announce_submounts = true,
            "killpriv_v2" => self.killpriv_v2 = true,
            "no_killpriv_v2" => self.killpriv_v2 = false,
            "posix_acl" => self.posix_acl = true,
            "no_posix_acl" => self.posix_acl = false,
            "security_label" => self.security_label = NegotiationMode::Always,
            "no_security_label" => self.security_label = NegotiationMode::Never,
            "flock" => self.flock = true,
            "no_flock" => self.flock = false,
            "posix_lock" => self.posix_lock = true,
            "no_posix_lock" => self.posix_lock = false,
            "" => {}
            _ => return Err(CliError(format!("-o {option}: unknown option"))),
        }
        Ok(())
    }

    /// The first option this leasefsd cannot honour, as a one-line reason; `None` if it can
    /// run the whole command line. Checked before anything starts, so nothing is half-applied.
    pub fn unsupported(&self) -> Option<String> {
        let migration = self.migration_mode.is_some()
            || self.migration_on_error.is_some()
            || self.migration_verify_handles
            || self.migration_confirm_paths;
        if migration {
            return Some(
                "--migration-*: leasefsd cannot be migrated (it offers the VMM no device-state \
                 transfer, and QEMU 7.2 cannot migrate vhost-user-fs); drop the migration flags"
                    .into(),
            );
        }
        if (!self.translate_uid.is_empty() || !self.translate_gid.is_empty()) && self.posix_acl {
            return Some(
                "--translate-uid/--translate-gid cannot be used with --posix-acl: ACLs name \
                 host ids the daemon would not translate (as virtiofsd)"
                    .into(),
            );
        }
        if (!self.uid_map.is_empty() || !self.gid_map.is_empty())
            && self.sandbox != SandboxMode::Namespace
        {
            return Some(
                "--uid-map/--gid-map need --sandbox namespace: the ranges are mapped into the \
                 user namespace that sandbox creates (as virtiofsd)"
                    .into(),
            );
        }
        None
    }
}

/// Split a `-o` argument at its commas; `,,` stands for one literal comma (libvirt escapes
/// commas in paths that way).
pub fn split_compat_options(line: &str) -> Vec<String> {
    let mut options = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                options.last_mut().expect("never empty").push(',');
            } else {
                options.push(String::new());
            }
        } else {
            options.last_mut().expect("never empty").push(c);
        }
    }
    options
}

fn parse_negotiation_enabled(value: &str) -> Result<bool, String> {
    match NegotiationMode::from_str(value, false)? {
        NegotiationMode::Never => Ok(false),
        NegotiationMode::Auto | NegotiationMode::Always => Ok(true),
    }
}

fn parse_inode_file_handles(value: &str) -> Result<InodeFileHandles, String> {
    match value {
        // virtiofsd's deprecated alias.
        "fallback" => Ok(InodeFileHandles::Prefer),
        _ => InodeFileHandles::from_str(value, false)
            .map_err(|_| format!("{value:?}: expected never, prefer or mandatory")),
    }
}

/// `--modcaps=+sys_admin:-chown`: `:`-separated capability names (without `CAP_`, any case),
/// each added (`+`) to or removed (`-`) from the set the daemon keeps.
pub fn parse_modcaps(value: &str) -> Result<ModCaps, String> {
    value
        .split(':')
        .map(|item| {
            let (add, name) = match item.split_at_checked(1) {
                Some(("+", name)) => (true, name),
                Some(("-", name)) => (false, name),
                _ => return Err(format!("{item:?}: expected +CAPABILITY or -CAPABILITY")),
            };
            let full = format!("CAP_{}", name.to_ascii_uppercase());
            let cap = full
                .parse::<caps::Capability>()
                .map_err(|_| format!("{name:?}: no such capability"))?;
            Ok(ModCap { add, cap })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(ModCaps)
}

/// `:namespace_id:host_id:count:`
fn parse_id_map(value: &str) -> Result<IdMapRange, String> {
    let fields: Vec<&str> = value.split(':').collect();
    let numbers: Option<Vec<u32>> = match fields[..] {
        ["", a, b, c, ""] => [a, b, c].iter().map(|s| s.parse().ok()).collect(),
        _ => None,
    };
    match numbers.as_deref() {
        Some(&[inside, outside, count]) if count > 0 => Ok(IdMapRange {
            inside,
            outside,
            count,
        }),
        _ => Err(format!(
            "{value:?}: expected :namespace_id:host_id:count: (count at least 1)"
        )),
    }
}

/// An `--xattrmap`, checked in full.
fn parse_xattrmap(value: &str) -> Result<String, String> {
    crate::passthrough::XattrMap::parse(value).map(|_| value.to_string())
}

/// One `--translate-uid`/`--translate-gid` rule, checked in full (kind, ids, range).
fn parse_translate_id(value: &str) -> Result<String, String> {
    crate::passthrough::IdTranslation::parse(&[value.to_string()]).map(|_| value.to_string())
}

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
pub fn capabilities_json() -> String {
    // No "migrate-precopy": leasefsd does not transfer device state, so it must not claim to.
    // "host-events" are the pre-modify and change events in use; "delegations" says what this
    // host kernel offers of Linux 6.19's F_SETDELEG (probed on "/"; "in-use" where the daemon
    // leases names under directory delegations, see docs/coherency.md).
    let probed = host_lease::probe_delegations_at(Path::new("/"));
    let delegations = match probed {
        host_lease::Delegations::NotInKernel => "not-in-kernel",
        host_lease::Delegations::Refused(_) => "in-kernel-refused-on-probe",
        host_lease::Delegations::OnDirectories => "in-use",
    };
    let pre_modify = match probed {
        host_lease::Delegations::OnDirectories => r#""file-delegation", "directory-delegation""#,
        _ => r#""file-lease""#,
    };
    format!(
        concat!(
            "{{\n",
            "  \"type\": \"fs\",\n",
            "  \"features\": [\n",
            "    \"separate-options\"\n",
            "  ],\n",
            "  \"leasefs\": {{\n",
            "    \"cache\": [\"coherent\", \"auto\", \"always\", \"metadata\", \"never\"],\n",
            "    \"default-cache\": \"coherent\",\n",
            "    \"lease-timeout\": {{ \"flag\": \"--lease-timeout\", \"default-seconds\": 1.0 }},\n",
            "    \"notify-lease-timeout\": {{ \"flag\": \"--notify-lease-timeout\", \"default-seconds\": 10.0 }},\n",
            "    \"adaptive-leases\": {{ \"cooldown\": {{ \"flag\": \"--lease-cooldown\", \"default-seconds\": 2.0 }}, \"cooldown-max\": {{ \"flag\": \"--lease-cooldown-max\", \"default-seconds\": 60.0 }}, \"burst-window\": {{ \"flag\": \"--lease-burst-window\", \"default-seconds\": 2.0 }}, \"burst-dirs\": {{ \"flag\": \"--lease-burst-dirs\", \"default\": 3 }} }},\n",
            "    \"host-events\": [{}, \"fanotify-modify\", \"fanotify-dirent\"],\n",
            "    \"delegations\": \"{}\",\n",
            "    \"notification-queue\": {{ \"feature-bit\": 0, \"notify-buf-size\": 512, \"confirmation\": \"FUSE_NOTIFY_REPLY\" }}\n",
            "  }}\n",
            "}}"
        ),
        pre_modify,
        delegations
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
        assert_eq!(o.inode_file_handles, InodeFileHandles::Prefer);
        assert_eq!(o.seccomp, SeccompMode::Kill);
        assert!(o.announce_submounts);
        assert_eq!(o.thread_pool_size, 0);
        assert_eq!(o.queue_poll_us, 64);
        assert!(!o.readonly && !o.xattr && !o.writeback);
    }

    #[test]
    fn queue_poll_takes_microseconds_up_to_a_millisecond() {
        let base = ["--socket-path", "/tmp/s", "--shared-dir", "/srv"];
        let with = |v: &str| parse(&[&base[..], &["--queue-poll-us", v]].concat());
        assert_eq!(with("0").unwrap().queue_poll_us, 0);
        assert_eq!(with("1000").unwrap().queue_poll_us, 1000);
        for bad in ["1001", "fast"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("--queue-poll-us"), "{bad}: {e}");
        }
        let e = parse(&[&base[..], &["--queue-poll-us=-1"]].concat()).unwrap_err();
        assert!(e.to_string().contains("--queue-poll-us"), "{e}");
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

    fn full(args: &[&str], env: Option<&str>) -> Result<Options, String> {
        match Options::parse_args(std::iter::once("leasefsd").chain(args.iter().copied()), env) {
            Ok(Parsed::Run(o)) => Ok(*o),
            Ok(Parsed::Exit(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn compat_options_split_at_single_commas() {
        assert_eq!(split_compat_options("a,b"), ["a", "b"]);
        assert_eq!(
            split_compat_options("source=/a,,b,xattr"),
            ["source=/a,b", "xattr"]
        );
        assert_eq!(split_compat_options("source=/a,,,b"), ["source=/a,", "b"]);
        assert_eq!(split_compat_options("x,,,,y"), ["x,,y"]);
    }

    #[test]
    fn libvirt_lines() {
        let o = full(&["--fd=31", "-o", "source=/srv/sh,,are"], None).unwrap();
        assert_eq!(
            o.shared_dir.as_deref(),
            Some(std::path::Path::new("/srv/sh,are"))
        );
        assert_eq!(o.fd, Some(31));
        assert_eq!(o.cache, CacheMode::Coherent);
        assert!(o.unsupported().is_none());
        let o = full(
            &[
                "--fd=31",
                "-o",
                "source=/srv/share,cache=always,sandbox=chroot,xattr",
                "--thread-pool-size=16",
                "-d",
            ],
            None,
        )
        .unwrap();
        assert_eq!(o.cache, CacheMode::Always);
        assert_eq!(o.sandbox, SandboxMode::Chroot);
        assert!(o.xattr);
        assert_eq!(o.thread_pool_size, 16);
        assert_eq!(o.log_level, LogLevel::Debug);
        assert_eq!(
            full(&["--fd=3", "-o", "source=/s,cache=none"], None)
                .unwrap()
                .cache,
            CacheMode::Never
        );
        // The lock options parse; until guest-local locks exist they are refused at start.
        let o = full(&["--fd=3", "-o", "source=/s,no_flock,no_posix_lock"], None).unwrap();
        assert!(!o.flock && !o.posix_lock);
        assert!(
            o.unsupported().is_none(),
            "libvirt's <lock posix='off' flock='off'>"
        );
    }

    #[test]
    fn compat_errors_are_one_line_and_name_the_option() {
        for (line, needle) in [
            ("source=/s,cache=sometimes", "cache=sometimes"),
            ("source=/s,bogus", "bogus"),
            ("source=/s,sandbox=none", "sandbox=none"),
            ("source=/s,loglevel=trace", "loglevel=trace"),
            ("source=/s,modcaps=+nonsense", "nonsense"),
        ] {
            let e = full(&["--fd=3", "-o", line], None).unwrap_err();
            assert!(e.contains(needle) && !e.contains('\n'), "{line}: {e}");
        }
        let e = full(&["--fd=3", "-o", "xattr"], None).unwrap_err();
        assert!(e.contains("--shared-dir"), "{e}");
    }

    #[test]
    fn virtme_ng_lines() {
        let base = [
            "--syslog",
            "--no-announce-submounts",
            "--socket-path",
            "/tmp/S",
            "--shared-dir",
            "/",
            "--sandbox",
            "none",
        ];
        let mut ro = base.to_vec();
        ro.extend(["--readonly", "--cache", "always"]);
        let o = full(&ro, None).unwrap();
        assert!(o.readonly && o.syslog && !o.announce_submounts);
        assert_eq!(o.cache, CacheMode::Always);
        assert!(o.unsupported().is_none());
        // LEASEFSD_CACHE=coherent gives a virtme-ng user the coherent default back.
        assert_eq!(
            full(&ro, Some("coherent")).unwrap().cache,
            CacheMode::Coherent
        );
        assert!(full(&ro, Some("sometimes"))
            .unwrap_err()
            .contains("LEASEFSD_CACHE"));
        let mut rw = base.to_vec();
        rw.extend(["--cache", "auto"]);
        assert_eq!(full(&rw, None).unwrap().cache, CacheMode::Auto);
    }

    #[test]
    fn negotiation_and_paired_flags() {
        let f = |args: &[&str]| {
            let mut v = vec!["--socket-path=/s", "--shared-dir=/d"];
            v.extend_from_slice(args);
            full(&v, None).unwrap()
        };
        assert!(f(&["--posix-acl"]).posix_acl);
        assert!(f(&["--posix-acl=auto"]).posix_acl);
        assert!(!f(&["--posix-acl=never"]).posix_acl);
        assert!(!f(&["--announce-submounts", "--no-announce-submounts"]).announce_submounts);
        assert!(f(&["--no-announce-submounts", "--announce-submounts"]).announce_submounts);
        assert!(!f(&["--killpriv-v2", "--no-killpriv-v2"]).killpriv_v2);
        assert!(f(&["--no-killpriv-v2", "--killpriv-v2"]).killpriv_v2);
        assert_eq!(
            f(&["--inode-file-handles=fallback"]).inode_file_handles,
            InodeFileHandles::Prefer
        );
        assert_eq!(f(&["--seccomp", "log"]).seccomp, SeccompMode::Log);
        assert_eq!(f(&["-o", "loglevel=warn", "-d"]).log_level, LogLevel::Warn);
        let caps = f(&["--modcaps=+sys_admin:-chown"]).modcaps.unwrap();
        assert_eq!(
            caps.0,
            [
                ModCap {
                    add: true,
                    cap: caps::Capability::CAP_SYS_ADMIN
                },
                ModCap {
                    add: false,
                    cap: caps::Capability::CAP_CHOWN
                }
            ]
        );
        assert_eq!(
            f(&["--uid-map=:0:100000:65536:"]).uid_map,
            [IdMapRange {
                inside: 0,
                outside: 100000,
                count: 65536
            }]
        );
        assert!(parse(&["--socket-path=/s", "--shared-dir=/d", "--uid-map=0:1:2"]).is_err());
        assert!(parse(&[
            "--socket-path=/s",
            "--shared-dir=/d",
            "--translate-uid=map:0:1:2"
        ])
        .is_ok());
        assert!(parse(&[
            "--socket-path=/s",
            "--shared-dir=/d",
            "--translate-uid=bad:0:1:2"
        ])
        .is_err());
    }

    #[test]
    fn flags_leasefsd_cannot_honour_are_refused_in_one_line() {
        for flag in [
            "--migration-mode=find-paths",
            "--migration-on-error=abort",
            "--migration-verify-handles",
            "--migration-confirm-paths",
        ] {
            let o = full(&["--socket-path=/s", "--shared-dir=/d", flag], None).unwrap();
            let reason = o.unsupported().unwrap_or_else(|| panic!("{flag} accepted"));
            assert!(!reason.contains('\n'), "{reason}");
        }
    }

    #[test]
    fn fd_and_socket_path_conflict() {
        assert!(parse(&["--fd", "3", "--socket-path", "/s", "--shared-dir", "/d"]).is_err());
        assert!(parse(&["--fd", "3", "--shared-dir", "/d"]).is_ok());
    }
}
