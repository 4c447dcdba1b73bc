//! POSIX (fcntl) record locks between processes, and flock(2).

use std::time::Duration;

use crate::ensure_eq;
use crate::harness::{note, spawn, Child, Ctx, TErr, TResult};
use crate::sys::{self, expect_errno, recv_byte, send_byte, Fd, OpExt};
use libc::{F_RDLCK, F_UNLCK, F_WRLCK, LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN, O_RDWR};

const WAIT: Duration = Duration::from_secs(20);
const BUSY: [i32; 2] = [libc::EAGAIN, libc::EACCES];

fn open_rw(p: &std::path::Path) -> Result<Fd, String> {
    sys::open(p, O_RDWR, 0).op(format!("open {}", sys::show(p)))
}

/// Receives a sync byte; if the child failed instead, reports its error.
fn sync_from(child: &mut Option<Child>, r: &Fd, what: &str) -> Result<u8, TErr> {
    match recv_byte(r, WAIT) {
        Ok(b) => Ok(b),
        Err(e) => {
            let c = child.take().expect("child");
            match c.wait(Duration::from_secs(5)).into_result("child") {
                Err(TErr::Fail(m)) => Err(TErr::Fail(m)),
                _ => Err(TErr::Fail(format!("waiting for child ({what}): {e}"))),
            }
        }
    }
}

fn finish(child: &mut Option<Child>) -> TResult {
    match child.take() {
        Some(c) => c.wait(WAIT).into_result("child"),
        None => Ok(()),
    }
}

pub fn posix_conflict(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, &[0u8; 200]).op("create")?;
    let fd = open_rw(&p)?;
    sys::setlk(&fd, F_WRLCK, 0, 100).op("parent F_SETLK write [0,100)")?;
    let (r1, w1) = sys::pipe().op("pipe")?;
    let (r2, w2) = sys::pipe().op("pipe")?;
    let pc = p.clone();
    let mut child = Some(spawn(false, move || {
        let fd = open_rw(&pc)?;
        expect_errno(
            sys::setlk(&fd, F_WRLCK, 50, 10),
            &BUSY,
            "child F_SETLK write [50,60) while parent holds write [0,100)",
        )?;
        expect_errno(
            sys::setlk(&fd, F_RDLCK, 0, 10),
            &BUSY,
            "child F_SETLK read [0,10) while parent holds write [0,100)",
        )?;
        expect_errno(
            sys::setlk(&fd, F_WRLCK, 99, 0),
            &BUSY,
            "child F_SETLK write [99,EOF) overlapping by one byte",
        )?;
        sys::setlk(&fd, F_WRLCK, 100, 100).op("child F_SETLK write [100,200) (no overlap)")?;
        send_byte(&w1, 1)?;
        recv_byte(&r2, WAIT)?;
        sys::setlk(&fd, F_WRLCK, 0, 100).op("child F_SETLK write [0,100) after parent unlocked")?;
        send_byte(&w1, 2)?;
        recv_byte(&r2, WAIT)?;
        Ok(())
    })?);
    sync_from(&mut child, &r1, "phase 1")?;
    expect_errno(
        sys::setlk(&fd, F_WRLCK, 150, 10),
        &BUSY,
        "parent F_SETLK write [150,160) while child holds [100,200)",
    )?;
    sys::setlk(&fd, F_UNLCK, 0, 100).op("parent unlock [0,100)")?;
    send_byte(&w2, 1)?;
    sync_from(&mut child, &r1, "phase 2")?;
    expect_errno(
        sys::setlk(&fd, F_RDLCK, 0, 1),
        &BUSY,
        "parent F_SETLK read [0,1) while child holds write [0,200)",
    )?;
    send_byte(&w2, 2)?;
    finish(&mut child)?;
    // The child exited: its locks are gone.
    sys::setlk(&fd, F_WRLCK, 0, 0).op("parent F_SETLK whole file after child exit")?;
    Ok(())
}

pub fn getlk(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, &[0u8; 100]).op("create")?;
    let fd = open_rw(&p)?;
    let me = unsafe { libc::getpid() };
    sys::setlk(&fd, F_WRLCK, 10, 20).op("F_SETLK write [10,30)")?;
    let own = sys::getlk(&fd, F_WRLCK, 0, 100).op("F_GETLK own range")?;
    ensure_eq!(
        own.l_type as i32,
        F_UNLCK,
        "F_GETLK on a range locked by the caller itself"
    );
    let pc = p.clone();
    crate::harness::in_child("child", WAIT, || {
        let fd = open_rw(&pc)?;
        let fl = sys::getlk(&fd, F_WRLCK, 0, 100).op("child F_GETLK write [0,100)")?;
        ensure_eq!(fl.l_type as i32, F_WRLCK, "F_GETLK l_type");
        ensure_eq!(
            (fl.l_start, fl.l_len),
            (10, 20),
            "F_GETLK range (l_start, l_len)"
        );
        if fl.l_pid <= 0 {
            note(format!(
                "F_GETLK reports no holder pid (l_pid {})",
                fl.l_pid
            ));
        } else {
            ensure_eq!(fl.l_pid, me, "F_GETLK l_pid (holder)");
        }
        let fl = sys::getlk(&fd, F_WRLCK, 30, 10).op("child F_GETLK write [30,40)")?;
        ensure_eq!(fl.l_type as i32, F_UNLCK, "F_GETLK of an unlocked range");
        Ok(())
    })?;
    // Downgrade to a read lock: readers coexist, writers still conflict.
    sys::setlk(&fd, F_RDLCK, 10, 20).op("F_SETLK downgrade to read")?;
    crate::harness::in_child("child", WAIT, || {
        let fd = open_rw(&pc)?;
        let fl = sys::getlk(&fd, F_RDLCK, 0, 100).op("child F_GETLK read")?;
        ensure_eq!(fl.l_type as i32, F_UNLCK, "F_GETLK read vs a read lock");
        let fl = sys::getlk(&fd, F_WRLCK, 0, 100).op("child F_GETLK write")?;
        ensure_eq!(
            fl.l_type as i32,
            F_RDLCK,
            "F_GETLK write vs a read lock: l_type"
        );
        sys::setlk(&fd, F_RDLCK, 15, 5).op("child F_SETLK shared read lock")?;
        expect_errno(
            sys::setlk(&fd, F_WRLCK, 15, 5),
            &BUSY,
            "child F_SETLK write over parent's read lock",
        )?;
        Ok(())
    })?;
    Ok(())
}

pub fn posix_release(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, &[0u8; 100]).op("create")?;
    let fd1 = open_rw(&p)?;
    sys::setlk(&fd1, F_WRLCK, 0, 10).op("F_SETLK [0,10)")?;
    let pc = p.clone();
    crate::harness::in_child("child", WAIT, || {
        let fd = open_rw(&pc)?;
        expect_errno(
            sys::setlk(&fd, F_WRLCK, 0, 10),
            &BUSY,
            "child lock while held",
        )?;
        Ok(())
    })?;
    // POSIX: closing any descriptor of the file drops the process's locks.
    let fd2 = open_rw(&p)?;
    drop(fd2);
    crate::harness::in_child("child", WAIT, || {
        let fd = open_rw(&pc)?;
        sys::setlk(&fd, F_WRLCK, 0, 10)
            .op("child F_SETLK after the holder closed another fd of the file")?;
        Ok(())
    })?;
    // Locks die with their process.
    let (r1, w1) = sys::pipe().op("pipe")?;
    let (r2, w2) = sys::pipe().op("pipe")?;
    let mut child = Some(spawn(false, move || {
        let fd = open_rw(&pc)?;
        sys::setlk(&fd, F_WRLCK, 50, 50).op("child F_SETLK [50,100)")?;
        send_byte(&w1, 1)?;
        recv_byte(&r2, WAIT)?;
        // Exit without unlocking or closing.
        std::mem::forget(fd);
        Ok(())
    })?);
    sync_from(&mut child, &r1, "child locked")?;
    expect_errno(
        sys::setlk(&fd1, F_WRLCK, 60, 10),
        &BUSY,
        "parent lock inside the child's range",
    )?;
    send_byte(&w2, 1)?;
    finish(&mut child)?;
    sys::setlk(&fd1, F_WRLCK, 60, 10).op("parent F_SETLK after the holder exited")?;
    Ok(())
}

pub fn setlkw_wakeup(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, &[0u8; 100]).op("create")?;
    let fd = open_rw(&p)?;
    sys::setlk(&fd, F_WRLCK, 0, 100).op("parent F_SETLK [0,100)")?;
    let (r, w) = sys::pipe().op("pipe")?;
    let pc = p.clone();
    let mut child = Some(spawn(false, move || {
        let fd = open_rw(&pc)?;
        send_byte(&w, b'R')?;
        // SIGALRM's default action ends the child if it blocks too long.
        unsafe { libc::alarm(30) };
        let mut fl = sys::mk_flock(F_WRLCK, 50, 10);
        sys::fcntl_lock(&fd, libc::F_SETLKW, &mut fl).op("child F_SETLKW [50,60)")?;
        send_byte(&w, b'G')?;
        Ok(())
    })?);
    ensure_eq!(sync_from(&mut child, &r, "child ready")?, b'R', "sync byte");
    sys::sleep_ms(300);
    let early = sys::poll_fd(
        std::os::fd::AsRawFd::as_raw_fd(&r),
        libc::POLLIN,
        Duration::ZERO,
    )
    .op("poll")?;
    if early != 0 || child.as_mut().unwrap().exited() {
        let c = child.take().unwrap();
        if let Err(TErr::Fail(m)) = c.wait(WAIT).into_result("child") {
            return Err(TErr::Fail(m));
        }
        return Err(TErr::Fail(
            "child's F_SETLKW returned while the parent still held a conflicting lock".into(),
        ));
    }
    sys::setlk(&fd, F_UNLCK, 0, 100).op("parent unlock")?;
    let b = sync_from(&mut child, &r, "F_SETLKW granted after unlock")?;
    ensure_eq!(b, b'G', "child's report after unlock");
    finish(&mut child)?;
    Ok(())
}

pub fn flock(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, b"x").op("create")?;
    let fd1 = open_rw(&p)?;
    let fd2 = open_rw(&p)?;
    let fd3 = open_rw(&p)?;
    sys::flock(&fd1, LOCK_EX).op("flock fd1 LOCK_EX")?;
    expect_errno(
        sys::flock(&fd2, LOCK_EX | LOCK_NB),
        &[libc::EWOULDBLOCK],
        "flock LOCK_EX|LOCK_NB on a second open file description",
    )?;
    expect_errno(
        sys::flock(&fd2, LOCK_SH | LOCK_NB),
        &[libc::EWOULDBLOCK],
        "flock LOCK_SH|LOCK_NB against LOCK_EX",
    )?;
    // A dup shares the open file description, hence the lock.
    let dup1 = sys::dup(&fd1).op("dup")?;
    sys::flock(&dup1, LOCK_EX | LOCK_NB).op("flock LOCK_EX|LOCK_NB on a dup of the holder")?;
    // Another process with its own open file description is refused.
    let pc = p.clone();
    crate::harness::in_child("child", WAIT, || {
        let fd = open_rw(&pc)?;
        expect_errno(
            sys::flock(&fd, LOCK_EX | LOCK_NB),
            &[libc::EWOULDBLOCK],
            "child flock LOCK_EX|LOCK_NB while parent holds LOCK_EX",
        )?;
        Ok(())
    })?;
    sys::flock(&fd1, LOCK_UN).op("flock LOCK_UN")?;
    sys::flock(&fd2, LOCK_EX | LOCK_NB).op("flock fd2 LOCK_EX after unlock")?;
    sys::flock(&fd2, LOCK_UN).op("flock fd2 LOCK_UN")?;
    // Shared locks coexist; exclusive is refused while they are held.
    sys::flock(&fd1, LOCK_SH).op("flock fd1 LOCK_SH")?;
    sys::flock(&fd2, LOCK_SH | LOCK_NB).op("flock fd2 LOCK_SH with fd1 LOCK_SH")?;
    expect_errno(
        sys::flock(&fd3, LOCK_EX | LOCK_NB),
        &[libc::EWOULDBLOCK],
        "flock LOCK_EX against two LOCK_SH",
    )?;
    sys::flock(&fd2, LOCK_UN).op("flock fd2 LOCK_UN")?;
    // Upgrade shared -> exclusive.
    sys::flock(&fd1, LOCK_EX | LOCK_NB).op("upgrade fd1 to LOCK_EX")?;
    expect_errno(
        sys::flock(&fd3, LOCK_SH | LOCK_NB),
        &[libc::EWOULDBLOCK],
        "flock LOCK_SH against upgraded LOCK_EX",
    )?;
    // Closing every descriptor of the description releases the lock.
    drop(dup1);
    drop(fd1);
    sys::flock(&fd3, LOCK_EX | LOCK_NB).op("flock fd3 LOCK_EX after holder closed")?;
    Ok(())
}
