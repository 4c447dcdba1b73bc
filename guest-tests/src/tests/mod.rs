//! The checks, grouped by area. `all()` is the run order.

mod data;
mod dirs;
mod escape;
mod host;
mod locks;
mod meta;
mod misc;
mod ns;
mod xattr;

use crate::harness::{Ctx, TResult, Test};

fn t(name: &'static str, f: fn(&mut Ctx) -> TResult) -> Test {
    Test {
        name,
        f,
        timeout: 0,
    }
}

fn slow(name: &'static str, f: fn(&mut Ctx) -> TResult, timeout: u64) -> Test {
    Test { name, f, timeout }
}

/// Tests of the runner itself, listed first when GUEST_TESTS_SELFTEST=1:
/// a test that hangs after leaving an unread agent reply behind, and one
/// that panics.
fn selftests() -> Vec<Test> {
    if std::env::var_os("GUEST_TESTS_SELFTEST").is_none_or(|v| v != "1") {
        return Vec::new();
    }
    fn hang(c: &mut Ctx) -> TResult {
        if let Ok(a) = c.agent() {
            a.send_only(&crate::proto::Request::Secret)?;
        }
        crate::sys::sleep_ms(3_600_000);
        Ok(())
    }
    fn panic(_: &mut Ctx) -> TResult {
        panic!("deliberate panic");
    }
    vec![t("selftest_hang", hang), t("selftest_panic", panic)]
}

pub fn all() -> Vec<Test> {
    let mut v = selftests();
    v.extend(vec![
        t("data_write_read", data::write_read),
        t("data_pwrite_pread", data::pwrite_pread),
        t("data_overwrite", data::overwrite),
        t("data_append", data::append),
        t("data_truncate", data::truncate),
        t("data_large_checksum", data::large_checksum),
        t("data_read_past_eof", data::read_past_eof),
        t("meta_chmod", meta::chmod),
        t("meta_chown", meta::chown),
        t("meta_utimensat", meta::utimensat),
        t("meta_dir_mtime", meta::dir_mtime),
        t("meta_stat", meta::stat),
        t("meta_fstat_after_write", meta::fstat_after_write),
        t("meta_statfs", meta::statfs),
        t("ns_create", ns::create),
        t("ns_mkdir_rmdir", ns::mkdir_rmdir),
        t("ns_unlink", ns::unlink),
        t("ns_rename_file", ns::rename_file),
        t("ns_rename_dir", ns::rename_dir),
        t("ns_rename_replace", ns::rename_replace),
        t("ns_renameat2_noreplace", ns::renameat2_noreplace),
        t("ns_renameat2_exchange", ns::renameat2_exchange),
        t("ns_link", ns::link),
        t("ns_symlink", ns::symlink),
        t("ns_mkfifo", ns::mkfifo),
        t("ns_excl", ns::excl),
        t("ns_enoent", ns::enoent),
        t("ns_tmpfile", ns::tmpfile),
        t("xattr_user", xattr::user),
        t("xattr_dir_symlink", xattr::dir_symlink),
        t("lock_posix_conflict", locks::posix_conflict),
        t("lock_getlk", locks::getlk),
        t("lock_posix_release", locks::posix_release),
        t("lock_setlkw_wakeup", locks::setlkw_wakeup),
        t("lock_flock", locks::flock),
        t("mmap_shared", misc::mmap_shared),
        t("mmap_private", misc::mmap_private),
        t("sparse_seek", misc::sparse_seek),
        t("fallocate_extend", misc::fallocate_extend),
        t("fallocate_punch", misc::fallocate_punch),
        t("odirect", misc::odirect),
        t("offset_5gib", misc::offset_5gib),
        t("copy_file_range", misc::copy_file_range),
        t("lseek", misc::lseek),
        t("sync", misc::sync),
        t(
            "exec_keeps_running_program",
            misc::exec_keeps_running_program,
        ),
        slow("dir_10000", dirs::dir_10000, 900),
        t("deep_paths", dirs::deep_paths),
        t("names_utf8", dirs::names_utf8),
        t("names_special", dirs::names_special),
        t("names_length", dirs::names_length),
        t("escape_dotdot", escape::dotdot),
        t("escape_abs_symlink", escape::abs_symlink),
        t("escape_rel_symlink", escape::rel_symlink),
        t("host_sees_write", host::sees_write),
        t("host_sees_rename", host::sees_rename),
        t("host_sees_unlink", host::sees_unlink),
        t("host_sees_chmod", host::sees_chmod),
        t("host_sees_mkdir", host::sees_mkdir),
        t("host_sees_xattr", host::sees_xattr),
        t("host_sees_truncate", host::sees_truncate),
        t("host_sees_5gib", host::sees_5gib),
        t("host_sees_mtime", host::sees_mtime),
        t("host_sees_link", host::sees_link),
        t("host_sees_mmap", host::sees_mmap),
        t("coherence_host_create", host::co_create),
        t("coherence_host_write", host::co_write),
        t("coherence_host_truncate", host::co_truncate),
        t("coherence_host_unlink", host::co_unlink),
        t("coherence_host_rename", host::co_rename),
        t("coherence_host_mkdir", host::co_mkdir),
    ]);
    v
}

#[cfg(test)]
mod unit {
    #[test]
    fn names_unique_and_wellformed() {
        let all = super::all();
        let mut seen = std::collections::HashSet::new();
        for t in &all {
            assert!(seen.insert(t.name), "duplicate test {}", t.name);
            assert!(t
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        }
        assert!(all.len() > 50);
    }
}
