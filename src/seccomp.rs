//! `--seccomp`: once the daemon is confined, a filter lets through only the system calls it
//! makes while serving, in every thread (TSYNC), as virtiofsd does.
//!
//! The allow-list was measured, not guessed: the integration tests in `tests/` and the guest
//! tests were run with the daemon under `strace -f`, and every call made after the sandbox was
//! entered is here, plus what Rust's standard library and glibc make on paths the tests do not
//! reach (panics and backtraces, thread exit, allocator growth). A call outside it gets
//! `--seccomp`'s action: `kill` (default) ends the process (SECCOMP_RET_KILL_PROCESS), `log`
//! allows and logs it to the kernel log (SECCOMP_RET_LOG), `trap` sends SIGSYS, `none`
//! installs no filter.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::cli::SeccompMode;

/// Every system call the daemon makes after the sandbox, grouped by what needs it.
const ALLOWED: &[(&str, &[libc::c_long])] = &[
    (
        "memory and threads (std, glibc, the queue and lock threads started while serving)",
        &[
            libc::SYS_brk,
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_futex,
            libc::SYS_sched_getaffinity,
            libc::SYS_sched_yield,
            libc::SYS_getrandom,
            libc::SYS_prctl, // PR_SET_NAME for new threads
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_restart_syscall,
        ],
    ),
    (
        "signals (exit handlers, glibc's set*id broadcast, panics and aborts)",
        &[
            libc::SYS_rt_sigaction,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_tgkill,
        ],
    ),
    (
        "time",
        &[
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_gettimeofday,
        ],
    ),
    (
        "vhost-user: the socket, guest memory, eventfds and the queue threads' epoll",
        &[
            libc::SYS_accept4,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_sendto, // also syslog's datagram and UDP loggers
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_ppoll,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_dup3,
            libc::SYS_close,
        ],
    ),
    (
        "file data",
        &[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_syncfs,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
            libc::SYS_copy_file_range,
        ],
    ),
    (
        "the passthrough's namespace operations, all relative to descriptors",
        &[
            libc::SYS_openat,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_getdents64,
            libc::SYS_readlinkat,
            libc::SYS_mkdirat,
            libc::SYS_mknodat,
            libc::SYS_symlinkat,
            libc::SYS_linkat,
            libc::SYS_renameat2,
            libc::SYS_unlinkat,
            libc::SYS_fchmod,
            libc::SYS_fchmodat,
            libc::SYS_fchown,
            libc::SYS_fchownat,
            libc::SYS_utimensat,
            libc::SYS_fchdir,
            libc::SYS_umask,
            libc::SYS_flock,
            libc::SYS_name_to_handle_at,
            // --inode-file-handles: nodes are reopened from their handles.
            libc::SYS_open_by_handle_at,
        ],
    ),
    (
        "extended attributes and ACLs (through /proc/self/fd paths or descriptors)",
        &[
            libc::SYS_getxattr,
            libc::SYS_lgetxattr,
            libc::SYS_fgetxattr,
            libc::SYS_setxattr,
            libc::SYS_lsetxattr,
            libc::SYS_fsetxattr,
            libc::SYS_listxattr,
            libc::SYS_llistxattr,
            libc::SYS_flistxattr,
            libc::SYS_removexattr,
            libc::SYS_lremovexattr,
            libc::SYS_fremovexattr,
        ],
    ),
    (
        "acting as the guest's caller: per-thread credentials, umask and CAP_FSETID",
        &[
            libc::SYS_setresuid,
            libc::SYS_setresgid,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getegid,
            libc::SYS_unshare, // CLONE_FS, so each thread has its own umask
            libc::SYS_capget,
            libc::SYS_capset,
        ],
    ),
    (
        "the coherence engine: fanotify marks on files the guest knows",
        &[libc::SYS_fanotify_mark],
    ),
    #[cfg(target_arch = "x86_64")]
    (
        "x86_64's older calls glibc and std still make",
        &[
            libc::SYS_epoll_wait,
            libc::SYS_poll,
            libc::SYS_renameat,
            libc::SYS_unlink, // the vhost-user listener removes its socket at exit
        ],
    ),
];

/// ioctl: only FIONBIO (std's set_nonblocking on sockets).
fn ioctl_rule() -> Result<Vec<SeccompRule>, SeccompError> {
    let condition =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO)
            .map_err(|e| SeccompError(e.to_string()))?;
    Ok(vec![
        SeccompRule::new(vec![condition]).map_err(|e| SeccompError(e.to_string()))?
    ])
}

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("seccomp: {0}")]
pub struct SeccompError(String);

fn target_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SeccompError(format!("no filter for this architecture: {e:?}")))
}

/// The filter for `mode` (`None` for `--seccomp none`).
pub fn filter(mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::None => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Trap => SeccompAction::Trap,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    rules.insert(libc::SYS_ioctl, ioctl_rule()?);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
        .map_err(|e| SeccompError(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError(e.to_string()))?;
    Ok(Some(program))
}

/// The allow-list as system call numbers, without duplicates.
pub fn allowed_syscalls() -> Vec<libc::c_long> {
    let mut all: Vec<libc::c_long> = ALLOWED
        .iter()
        .flat_map(|(_, nrs)| nrs.iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// Install the filter for `mode` on every thread of the process. Call it last, once the
/// sandbox is entered and capabilities are dropped: nothing after it may need a call that is
/// not on the list.
pub fn apply(mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(program) = filter(mode)? else {
        return Ok(());
    };
    seccompiler::apply_filter_all_threads(&program).map_err(|e| SeccompError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_compiles_and_none_installs_nothing() {
        assert!(filter(SeccompMode::None).unwrap().is_none());
        for mode in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Trap] {
            assert!(!filter(mode).unwrap().unwrap().is_empty());
        }
    }
}
