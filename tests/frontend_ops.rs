//! Every FUSE operation the frontend's client has, sent to a real daemon through a real
//! vhost-user socket (no VM), each result checked against the shared directory on the host.
//!
//! The scenario runs against leasefsd, and against virtiofsd too when it is installed
//! (`$VIRTIOFSD`, else `~/.cargo/bin/virtiofsd`), so the frontend is known to drive both.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use leasefs::frontend::process::Backend;
use leasefs::frontend::{Device, FrontendConfig, FuseClient, FuseError, ROOT_ID};

fn leasefsd() -> &'static str {
    env!("CARGO_BIN_EXE_leasefsd")
}

fn virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("VIRTIOFSD")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd"))
        })?;
    path.exists().then_some(path)
}

fn connect(backend: &Backend) -> FuseClient {
    let device = Device::connect(backend.socket(), &FrontendConfig::default())
        .unwrap_or_else(|e| panic!("connecting: {e}\ndaemon log:\n{}", backend.log()));
    let fuse = FuseClient::new(Arc::new(device));
    let init = fuse.init().expect("INIT");
    assert_eq!(init.major, 7);
    assert!(init.minor >= 31, "minor {}", init.minor);
    fuse
}

/// The whole tour; returns once the daemon has exited after the disconnect.
fn every_operation(mut backend: Backend) {
    let share = backend.share().to_path_buf();
    let fuse = connect(&backend);

    // GETATTR on the root is the share.
    let root = fuse.getattr(ROOT_ID).expect("GETATTR root").attr;
    let host_root = fs::metadata(&share).unwrap();
    assert_eq!(root.ino, host_root.ino());
    assert_eq!(root.mode & libc::S_IFMT, libc::S_IFDIR);

    // Created on the host, seen through LOOKUP / GETATTR.
    fs::write(share.join("host.txt"), b"written on the host\n").unwrap();
    let host_file = fuse.lookup(ROOT_ID, "host.txt").expect("LOOKUP host.txt");
    assert_ne!(host_file.nodeid, 0);
    assert_eq!(
        host_file.attr.ino,
        fs::metadata(share.join("host.txt")).unwrap().ino()
    );
    assert_eq!(host_file.attr.size, 20);
    assert_eq!(host_file.attr.mode & libc::S_IFMT, libc::S_IFREG);
    let attr = fuse
        .getattr(host_file.nodeid)
        .expect("GETATTR host.txt")
        .attr;
    assert_eq!(attr.size, 20);

    // Missing names.
    assert_eq!(
        fuse.lookup(ROOT_ID, "missing").unwrap_err(),
        FuseError::Errno(libc::ENOENT)
    );
    assert_eq!(
        fuse.unlink(ROOT_ID, "missing").unwrap_err(),
        FuseError::Errno(libc::ENOENT)
    );

    // OPEN + READ what the host wrote: whole, at an offset, past the end.
    let open = fuse.open(host_file.nodeid, libc::O_RDONLY).expect("OPEN");
    assert_eq!(
        fuse.read(host_file.nodeid, open.fh, 0, 4096).unwrap(),
        b"written on the host\n"
    );
    assert_eq!(fuse.read(host_file.nodeid, open.fh, 8, 2).unwrap(), b"on");
    assert!(fuse
        .read(host_file.nodeid, open.fh, 100, 10)
        .unwrap()
        .is_empty());
    fuse.flush(host_file.nodeid, open.fh, 0).expect("FLUSH");
    fuse.release(host_file.nodeid, open.fh, libc::O_RDONLY)
        .expect("RELEASE");

    // CREATE + WRITE through FUSE, read on the host. More than max_write bytes, so several
    // WRITE requests (leasefsd's current max_write is 4 KiB).
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let (made, made_open) = fuse
        .create(ROOT_ID, "made.bin", libc::O_RDWR | libc::O_CREAT, 0o640)
        .expect("CREATE");
    assert_eq!(made.attr.mode & 0o777, 0o640);
    assert_eq!(
        fuse.write(made.nodeid, made_open.fh, 0, b"abc")
            .expect("WRITE"),
        3
    );
    fuse.write_all(made.nodeid, made_open.fh, 0, &data)
        .expect("WRITE all");
    fuse.fsync(made.nodeid, made_open.fh, false).expect("FSYNC");
    fuse.fsync(made.nodeid, made_open.fh, true)
        .expect("FSYNC datasync");
    assert_eq!(fs::read(share.join("made.bin")).unwrap(), data);
    let host_meta = fs::metadata(share.join("made.bin")).unwrap();
    assert_eq!(host_meta.permissions().mode() & 0o777, 0o640);
    // Read back through FUSE as well (the same open handle).
    let back = fuse
        .read(made.nodeid, made_open.fh, 0, 32768)
        .expect("READ back");
    assert_eq!(back, data);
    fuse.flush(made.nodeid, made_open.fh, 0).expect("FLUSH");
    fuse.release(made.nodeid, made_open.fh, libc::O_RDWR)
        .expect("RELEASE");
    assert_eq!(
        fuse.create(
            ROOT_ID,
            "made.bin",
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o600
        )
        .unwrap_err(),
        FuseError::Errno(libc::EEXIST)
    );

    // SETATTR: truncate and chmod, seen on the host.
    let attr = fuse.truncate(made.nodeid, 1000).expect("SETATTR size").attr;
    assert_eq!(attr.size, 1000);
    assert_eq!(fs::metadata(share.join("made.bin")).unwrap().len(), 1000);
    let attr = fuse.chmod(made.nodeid, 0o604).expect("SETATTR mode").attr;
    assert_eq!(attr.mode & 0o777, 0o604);
    assert_eq!(
        fs::metadata(share.join("made.bin"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o604
    );

    // MKDIR, then a file in it, RMDIR refused while not empty.
    let dir = fuse.mkdir(ROOT_ID, "dir", 0o755).expect("MKDIR");
    assert!(fs::metadata(share.join("dir")).unwrap().is_dir());
    assert_eq!(
        fuse.mkdir(ROOT_ID, "dir", 0o755).unwrap_err(),
        FuseError::Errno(libc::EEXIST)
    );
    let (inner, inner_open) = fuse
        .create(dir.nodeid, "inner", libc::O_WRONLY | libc::O_CREAT, 0o644)
        .expect("CREATE in dir");
    fuse.release(inner.nodeid, inner_open.fh, libc::O_WRONLY)
        .unwrap();
    assert!(share.join("dir/inner").exists());
    assert_eq!(
        fuse.rmdir(ROOT_ID, "dir").unwrap_err(),
        FuseError::Errno(libc::ENOTEMPTY)
    );

    // RENAME across directories, visible on the host.
    fuse.rename(dir.nodeid, "inner", ROOT_ID, "moved")
        .expect("RENAME");
    assert!(!share.join("dir/inner").exists());
    assert!(share.join("moved").exists());
    fuse.rmdir(ROOT_ID, "dir").expect("RMDIR");
    assert!(!share.join("dir").exists());

    // SYMLINK, READLINK, LINK.
    let link = fuse.symlink(ROOT_ID, "sym", "host.txt").expect("SYMLINK");
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        fs::read_link(share.join("sym")).unwrap(),
        PathBuf::from("host.txt")
    );
    assert_eq!(fuse.readlink(link.nodeid).expect("READLINK"), b"host.txt");
    let hard = fuse.link(host_file.nodeid, ROOT_ID, "hard").expect("LINK");
    assert_eq!(hard.attr.nlink, 2);
    assert_eq!(
        fs::metadata(share.join("hard")).unwrap().ino(),
        host_file.attr.ino
    );

    // READDIR / READDIRPLUS list what the host lists.
    fs::create_dir(share.join("from-host")).unwrap();
    let mut host_names: Vec<Vec<u8>> = fs::read_dir(&share)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_encoded_bytes())
        .collect();
    host_names.sort();
    let dh = fuse.opendir(ROOT_ID).expect("OPENDIR");
    let plus = fuse.readdirplus_all(ROOT_ID, dh.fh).expect("READDIRPLUS");
    let mut names: Vec<Vec<u8>> = plus
        .iter()
        .map(|e| e.dirent.name.clone())
        .filter(|n| n != b"." && n != b"..")
        .collect();
    names.sort();
    assert_eq!(names, host_names);
    let made_entry = plus.iter().find(|e| e.dirent.name == b"made.bin").unwrap();
    assert_eq!(made_entry.entry.attr.size, 1000);
    assert_eq!(made_entry.entry.nodeid, made.nodeid);
    let plain = fuse.readdir(ROOT_ID, dh.fh, 0, 8192).expect("READDIR");
    assert!(plain.iter().any(|e| e.name == b"from-host"));
    fuse.releasedir(ROOT_ID, dh.fh).expect("RELEASEDIR");

    // UNLINK, visible on the host; the hard link keeps the data.
    fuse.unlink(ROOT_ID, "host.txt").expect("UNLINK");
    assert!(!share.join("host.txt").exists());
    assert_eq!(
        fs::read(share.join("hard")).unwrap(),
        b"written on the host\n"
    );
    assert_eq!(
        fuse.lookup(ROOT_ID, "host.txt").unwrap_err(),
        FuseError::Errno(libc::ENOENT)
    );

    // STATFS matches the host's statvfs of the share.
    let st = fuse.statfs(ROOT_ID).expect("STATFS");
    let mut host: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(share.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path and an out struct of the right type.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut host) }, 0);
    assert!(st.bsize > 0 && st.blocks > 0 && st.namelen > 0);
    assert_eq!(st.blocks, host.f_blocks);
    assert_eq!(st.bsize as u64, host.f_bsize);

    // FORGET (hiprio queue, no reply) of every lookup we made of made.bin.
    fuse.forget(made.nodeid, 2).expect("FORGET");

    // The frontend disconnects: the daemon exits, successfully.
    drop(fuse);
    let status = backend
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("daemon still running 10 s after the frontend disconnected");
    assert!(
        status.success(),
        "daemon exited with {status}\n{}",
        backend.log()
    );
}

#[test]
fn every_operation_against_leasefsd() {
    every_operation(Backend::spawn(leasefsd(), &[]).unwrap());
}

#[test]
fn every_operation_against_virtiofsd() {
    let Some(virtiofsd) = virtiofsd() else {
        eprintln!("virtiofsd not installed; skipping");
        return;
    };
    every_operation(Backend::spawn(virtiofsd, &[]).unwrap());
}

/// Every request queue leasefsd offers serves requests, concurrently.
#[test]
fn every_request_queue_serves_in_parallel() {
    let mut backend = Backend::spawn(leasefsd(), &[]).unwrap();
    fs::write(backend.share().join("f"), b"x").unwrap();
    let fuse = connect(&backend);
    let queues = fuse.device().request_queues().len();
    // 1 hiprio + 1 notification + 8 request queues; a driver without the notification
    // feature may use the notification queue's slot as a ninth request queue.
    assert_eq!(queues, 9, "leasefsd offers 10 queues by default");
    assert_eq!(fuse.device().negotiated().backend_request_queues, 9);
    let threads: Vec<_> = (0..queues)
        .map(|q| {
            let fuse = fuse.on_queue(q);
            thread::spawn(move || {
                for _ in 0..200 {
                    let e = fuse.lookup(ROOT_ID, "f").unwrap();
                    assert_eq!(fuse.getattr(e.nodeid).unwrap().attr.size, 1);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Several threads sharing one queue each get their own replies.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let fuse = fuse.on_queue(0);
            thread::spawn(move || {
                for _ in 0..200 {
                    assert_eq!(
                        fuse.getattr(ROOT_ID).unwrap().attr.ino,
                        fuse.getattr(ROOT_ID).unwrap().attr.ino
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for q in fuse.device().request_queues() {
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.bogus_used(), 0);
        assert_eq!(q.free_descriptors(), q.size() as usize);
    }
    drop(fuse);
    let status = backend
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .expect("daemon exits");
    assert!(status.success());
}

/// Asking for fewer request queues than offered sets up only those.
#[test]
fn request_queue_count_is_configurable() {
    let backend = Backend::spawn(leasefsd(), &[]).unwrap();
    let config = FrontendConfig {
        request_queues: Some(2),
        memory_size: 64 << 20,
        ..Default::default()
    };
    let device = Arc::new(Device::connect(backend.socket(), &config).unwrap());
    assert_eq!(device.request_queues().len(), 2);
    let fuse = FuseClient::new(device);
    fuse.init().unwrap();
    assert!(fuse.on_queue(1).getattr(ROOT_ID).is_ok());
}

/// `--no-readdirplus` (and `-o no_readdirplus`, libvirt's spelling) take READDIRPLUS out of the
/// INIT reply, so the guest lists directories with READDIR; by default it is offered.
#[test]
fn no_readdirplus_takes_readdirplus_out_of_init() {
    const DO_READDIRPLUS: u32 = 1 << 13;
    const READDIRPLUS_AUTO: u32 = 1 << 14;
    for (args, offered) in [
        (&[][..], true),
        (&["--no-readdirplus"][..], false),
        (&["-o", "no_readdirplus"][..], false),
        (&["--no-readdirplus", "-o", "readdirplus"][..], true),
    ] {
        let backend = Backend::spawn(leasefsd(), args).unwrap();
        let device = Device::connect(backend.socket(), &FrontendConfig::default()).unwrap();
        let fuse = FuseClient::new(Arc::new(device));
        let init = fuse.init().expect("INIT");
        let got = init.flags & (DO_READDIRPLUS | READDIRPLUS_AUTO);
        if offered {
            assert_eq!(got, DO_READDIRPLUS | READDIRPLUS_AUTO, "{args:?}");
        } else {
            assert_eq!(got, 0, "{args:?}");
        }
        // Listing still works: READDIR is always served.
        let dir = fuse.opendir(ROOT_ID).expect("OPENDIR");
        fuse.readdir(ROOT_ID, dir.fh, 0, 4096).expect("READDIR");
    }
}

/// `--killpriv-v2` negotiates FUSE_HANDLE_KILLPRIV_V2: the guest stops clearing setuid bits
/// itself and flags the writes that must clear them (FUSE_WRITE_KILL_SUIDGID), which the
/// daemon, privileged on the host, then does. Without the flag the guest is not offered it.
#[test]
fn killpriv_v2_is_negotiated_on_request_and_flagged_writes_clear_setuid() {
    use leasefs::frontend::client::INIT_FLAGS;
    const HANDLE_KILLPRIV_V2: u32 = 1 << 28;
    const WRITE_KILL_SUIDGID: u32 = 1 << 2;
    for (args, offered) in [
        (&[][..], false),
        (&["--no-killpriv-v2"][..], false),
        (&["--killpriv-v2"][..], true),
        (&["-o", "killpriv_v2"][..], true),
    ] {
        let backend = Backend::spawn(leasefsd(), args).unwrap();
        let device = Device::connect(backend.socket(), &FrontendConfig::default()).unwrap();
        let fuse = FuseClient::new(Arc::new(device));
        let init = fuse
            .init_with(7, 31, INIT_FLAGS | HANDLE_KILLPRIV_V2)
            .expect("INIT");
        assert_eq!(
            init.flags & HANDLE_KILLPRIV_V2 != 0,
            offered,
            "{args:?}: {:#x}",
            init.flags
        );
        if !offered {
            continue;
        }
        let path = backend.share().join("suid");
        fs::write(&path, b"x").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o4755)).unwrap();
        let e = fuse.lookup(ROOT_ID, "suid").unwrap();
        let h = fuse.open(e.nodeid, libc::O_RDWR).unwrap();
        // A write the guest made with CAP_FSETID keeps the bit, as on a local filesystem...
        fuse.write(e.nodeid, h.fh, 0, b"y").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o4755);
        // ...an unprivileged one, flagged, clears it on the host.
        fuse.write_with_flags(e.nodeid, h.fh, 1, b"z", WRITE_KILL_SUIDGID)
            .unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(fs::read(&path).unwrap(), b"yz");
    }
}

/// `--translate-uid` / `--translate-gid`: the guest sees host owners through the rules, files
/// it creates or chowns get the host ids the rules give, and `forbid-guest` ids are refused.
#[test]
fn translated_ids_go_both_ways_and_forbidden_ones_are_refused() {
    use fuse_backend_rs::abi::fuse_abi::SetattrIn;
    use leasefs::frontend::client::fattr;
    use std::os::unix::fs::chown;
    let backend = Backend::spawn(
        leasefsd(),
        &[
            "--translate-uid=forbid-guest:666:1",
            "--translate-uid=map:1000:5000:10",
            "--translate-gid=map:1000:6000:10",
            "--translate-gid=squash-host:7000:1999:100",
        ],
    )
    .unwrap();
    let share = backend.share().to_path_buf();
    let fuse = connect(&backend);
    fs::set_permissions(&share, fs::Permissions::from_mode(0o777)).unwrap();

    // Host to guest.
    fs::write(share.join("owned"), b"x").unwrap();
    chown(share.join("owned"), Some(5003), Some(7050)).unwrap();
    fs::write(share.join("other"), b"x").unwrap();
    chown(share.join("other"), Some(4000), Some(4000)).unwrap();
    let owned = fuse.lookup(ROOT_ID, "owned").unwrap();
    assert_eq!((owned.attr.uid, owned.attr.gid), (1003, 1999));
    let attr = fuse.getattr(owned.nodeid).unwrap().attr;
    assert_eq!((attr.uid, attr.gid), (1003, 1999));
    let other = fuse.lookup(ROOT_ID, "other").unwrap();
    assert_eq!(
        (other.attr.uid, other.attr.gid),
        (4000, 4000),
        "no rule: as it is"
    );

    // Guest to host: creation as the caller.
    let user = fuse.with_credentials(1002, 1004);
    let (created, open) = user
        .create(ROOT_ID, "made", libc::O_WRONLY, 0o644)
        .expect("CREATE as guest uid 1002");
    let meta = fs::metadata(share.join("made")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (5002, 6004));
    assert_eq!((created.attr.uid, created.attr.gid), (1002, 1004));
    fuse.release(created.nodeid, open.fh, libc::O_WRONLY)
        .unwrap();
    user.mkdir(ROOT_ID, "dir", 0o755)
        .expect("MKDIR as guest uid 1002");
    assert_eq!(fs::metadata(share.join("dir")).unwrap().uid(), 5002);

    // chown, and what the reply says.
    let out = fuse
        .setattr(
            created.nodeid,
            &SetattrIn {
                valid: fattr::UID | fattr::GID,
                uid: 1009,
                gid: 1000,
                ..Default::default()
            },
        )
        .expect("chown to 1009:1000");
    assert_eq!((out.attr.uid, out.attr.gid), (1009, 1000));
    let meta = fs::metadata(share.join("made")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (5009, 6000));

    // forbid-guest: neither creating as, nor chowning to, uid 666.
    let forbidden = fuse.with_credentials(666, 1000);
    assert_eq!(
        forbidden
            .create(ROOT_ID, "nope", libc::O_WRONLY, 0o644)
            .unwrap_err(),
        FuseError::Errno(libc::EPERM)
    );
    assert!(!share.join("nope").exists());
    assert_eq!(
        fuse.setattr(
            created.nodeid,
            &SetattrIn {
                valid: fattr::UID,
                uid: 666,
                ..Default::default()
            },
        )
        .unwrap_err(),
        FuseError::Errno(libc::EPERM)
    );
    assert_eq!(fs::metadata(share.join("made")).unwrap().uid(), 5009);
}

/// `--allow-mmap` agrees to FUSE_DIRECT_IO_ALLOW_MMAP (an INIT flag beyond what the FUSE
/// crate knows): with `--cache never` the guest then lets programs map files shared. Only when
/// the guest offers it, and never without the flag.
#[test]
fn allow_mmap_agrees_to_direct_io_allow_mmap() {
    use leasefs::frontend::client::INIT_FLAGS;
    const INIT_EXT: u32 = 1 << 30;
    const DIRECT_IO_ALLOW_MMAP: u32 = 1 << (36 - 32);
    for (args, offered, agreed) in [
        (&["--cache", "never"][..], true, false),
        (&["--cache", "never", "--allow-mmap"][..], true, true),
        (&["--cache", "never", "--allow-mmap"][..], false, false),
    ] {
        let backend = Backend::spawn(leasefsd(), args).unwrap();
        let device = Device::connect(backend.socket(), &FrontendConfig::default()).unwrap();
        let fuse = FuseClient::new(Arc::new(device));
        let flags2 = if offered { DIRECT_IO_ALLOW_MMAP } else { 0 };
        let init = fuse.init_ext(INIT_FLAGS, flags2).expect("INIT");
        assert_eq!(
            init.flags2 & DIRECT_IO_ALLOW_MMAP != 0,
            agreed,
            "{args:?} offered {offered}: {init:?}"
        );
        if agreed {
            assert_ne!(
                init.flags & INIT_EXT,
                0,
                "flags2 is read only with INIT_EXT"
            );
        }
        // The rest of INIT is untouched: what the crate agreed is still there.
        assert_ne!(init.flags & 0x40_0000, 0, "MAX_PAGES");
        assert!(fuse.getattr(ROOT_ID).is_ok());
    }
}

/// `--uid-map` / `--gid-map` (with the namespace sandbox): the daemon serves from a user
/// namespace with those ranges mapped, as virtiofsd does, so host ids reach the guest through
/// the map and files the guest makes get the mapped host ids. Host ids outside the map show as
/// the overflow id.
#[test]
fn uid_map_serves_the_share_from_a_user_namespace() {
    use std::os::unix::fs::chown;
    let backend = Backend::spawn(
        leasefsd(),
        &[
            "--sandbox",
            "namespace",
            "--uid-map=:0:100000:65536:",
            "--gid-map=:0:100000:65536:",
        ],
    )
    .unwrap();
    let share = backend.share().to_path_buf();
    // The namespace's root owns the share: host 100000.
    chown(&share, Some(100000), Some(100000)).unwrap();
    fs::set_permissions(&share, fs::Permissions::from_mode(0o777)).unwrap();
    let fuse = connect(&backend);

    fs::write(share.join("mapped"), b"x").unwrap();
    chown(share.join("mapped"), Some(100005), Some(100006)).unwrap();
    fs::write(share.join("unmapped"), b"x").unwrap();
    let mapped = fuse.lookup(ROOT_ID, "mapped").unwrap();
    assert_eq!((mapped.attr.uid, mapped.attr.gid), (5, 6));
    let unmapped = fuse.lookup(ROOT_ID, "unmapped").unwrap();
    assert_eq!((unmapped.attr.uid, unmapped.attr.gid), (65534, 65534));

    let user = fuse.with_credentials(7, 8);
    let (made, open) = user
        .create(ROOT_ID, "made", libc::O_WRONLY, 0o644)
        .expect("CREATE as namespace uid 7");
    assert_eq!((made.attr.uid, made.attr.gid), (7, 8));
    let meta = fs::metadata(share.join("made")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (100007, 100008));
    fuse.release(made.nodeid, open.fh, libc::O_WRONLY).unwrap();
    let root = fuse.with_credentials(0, 0);
    root.mkdir(ROOT_ID, "dir", 0o755)
        .expect("MKDIR as namespace root");
    let meta = fs::metadata(share.join("dir")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (100000, 100000));
}

/// `--security-label`: FUSE_SECURITY_CTX is agreed when the guest offers it, and the context
/// each creating request carries (CREATE, MKDIR, MKNOD, SYMLINK, TMPFILE) is stored as the
/// xattr it names on the new host object, as virtiofsd does. A CREATE that opens an existing
/// file does not relabel it; a request without the record or with a malformed one is EINVAL
/// and creates nothing; `always` refuses a guest that does not offer the flag, `auto` goes on
/// without; without the flag nothing is agreed.
#[test]
fn security_label_stores_the_guests_context_on_what_it_creates() {
    use fuse_backend_rs::abi::fuse_abi::{CreateIn, MkdirIn, MknodIn};
    use leasefs::frontend::client::INIT_FLAGS;
    use leasefs::fuse::opcode;
    use leasefs::request_ext::encode_security_context;
    use vm_memory::ByteValued;
    const SECURITY_CTX: u32 = 1 << (32 - 32);
    const ENTRY_OUT: u32 = 128;
    const LABEL: &[u8] = b"system_u:object_r:leasefs_test_t:s0\0";

    let label_of = |path: &std::path::Path| -> Option<Vec<u8>> {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: valid C strings and a buffer of the length given.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                c"security.selinux".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    };

    let backend = Backend::spawn(leasefsd(), &["--security-label=auto"]).unwrap();
    let share = backend.share().to_path_buf();
    let device = Device::connect(backend.socket(), &FrontendConfig::default()).unwrap();
    let fuse = FuseClient::new(Arc::new(device));
    let init = fuse.init_ext(INIT_FLAGS, SECURITY_CTX).expect("INIT");
    assert_ne!(init.flags2 & SECURITY_CTX, 0, "not agreed: {init:?}");
    let ext = encode_security_context(Some(("security.selinux", LABEL)));
    let name = |n: &str| std::ffi::CString::new(n).unwrap().into_bytes_with_nul();

    let create = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    fuse.call_ext(
        opcode::CREATE,
        ROOT_ID,
        &[create.as_slice(), &name("f")],
        &ext,
        ENTRY_OUT + 32,
    )
    .expect("CREATE with a label");
    let mkdir = MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    fuse.call_ext(
        opcode::MKDIR,
        ROOT_ID,
        &[mkdir.as_slice(), &name("d")],
        &ext,
        ENTRY_OUT,
    )
    .expect("MKDIR with a label");
    let mknod = MknodIn {
        mode: libc::S_IFIFO | 0o600,
        rdev: 0,
        umask: 0,
        padding: 0,
    };
    fuse.call_ext(
        opcode::MKNOD,
        ROOT_ID,
        &[mknod.as_slice(), &name("p")],
        &ext,
        ENTRY_OUT,
    )
    .expect("MKNOD with a label");
    fuse.call_ext(
        opcode::SYMLINK,
        ROOT_ID,
        &[&name("l"), &name("f")],
        &ext,
        ENTRY_OUT,
    )
    .expect("SYMLINK with a label");
    for n in ["f", "d", "p", "l"] {
        assert_eq!(label_of(&share.join(n)).as_deref(), Some(LABEL), "{n}");
    }
    // TMPFILE: the label is on the unnamed file, which the guest then links in.
    let tmp = CreateIn {
        flags: (libc::O_RDWR | libc::O_TMPFILE) as u32,
        mode: libc::S_IFREG | 0o600,
        umask: 0,
        fuse_flags: 0,
    };
    let reply = fuse
        .call_ext(
            opcode::TMPFILE,
            ROOT_ID,
            &[tmp.as_slice(), &name("t")],
            &ext,
            ENTRY_OUT + 32,
        )
        .expect("TMPFILE with a label");
    let node = u64::from_le_bytes(reply[..8].try_into().unwrap());
    fuse.link(node, ROOT_ID, "t").expect("LINK of the tmpfile");
    assert_eq!(
        label_of(&share.join("t")).as_deref(),
        Some(LABEL),
        "tmpfile"
    );

    // An existing file opened through CREATE keeps its own label.
    fs::write(share.join("old"), b"x").unwrap();
    let other = encode_security_context(Some(("security.selinux", b"other_t\0")));
    fuse.call_ext(
        opcode::CREATE,
        ROOT_ID,
        &[create.as_slice(), &name("old")],
        &other,
        ENTRY_OUT + 32,
    )
    .expect("CREATE of an existing file");
    assert_eq!(
        label_of(&share.join("old")),
        None,
        "an existing file was relabelled"
    );
    // No LSM context (an empty record): created, unlabelled.
    fuse.call_ext(
        opcode::MKDIR,
        ROOT_ID,
        &[mkdir.as_slice(), &name("plain")],
        &encode_security_context(None),
        ENTRY_OUT,
    )
    .expect("MKDIR without a context");
    assert!(share.join("plain").is_dir());
    assert_eq!(label_of(&share.join("plain")), None);
    // No record at all, or a malformed one: EINVAL, nothing created.
    let mut bad = ext.clone();
    bad[4] = 7; // seven contexts announced, one sent
    for (n, e) in [("none", &[][..]), ("bad", &bad[..])] {
        let got = fuse.call_ext(
            opcode::MKDIR,
            ROOT_ID,
            &[mkdir.as_slice(), &name(n)],
            e,
            ENTRY_OUT,
        );
        assert!(
            matches!(got, Err(FuseError::Errno(libc::EINVAL))),
            "{n}: {got:?}"
        );
        assert!(!share.join(n).exists(), "{n} was created");
    }
    // A label the host filesystem refuses (a name outside any namespace): the object is
    // removed again and the error reaches the guest.
    let refused = encode_security_context(Some(("nonamespace.x", b"y")));
    let got = fuse.call_ext(
        opcode::MKDIR,
        ROOT_ID,
        &[mkdir.as_slice(), &name("r")],
        &refused,
        ENTRY_OUT,
    );
    assert!(matches!(got, Err(FuseError::Errno(_))), "{got:?}");
    assert!(
        !share.join("r").exists(),
        "an unlabelled object was left behind"
    );
    drop(backend);

    // always: a guest that does not offer it cannot mount; auto: it can, without labels.
    for (mode, mounts) in [
        ("--security-label=always", false),
        ("--security-label=auto", true),
    ] {
        let backend = Backend::spawn(leasefsd(), &[mode]).unwrap();
        let device = Device::connect(backend.socket(), &FrontendConfig::default()).unwrap();
        let fuse = FuseClient::new(Arc::new(device));
        let init = fuse.init_ext(INIT_FLAGS, 0);
        assert_eq!(init.is_ok(), mounts, "{mode}: {init:?}");
        if let Ok(init) = init {
            assert_eq!(init.flags2 & SECURITY_CTX, 0);
        } else {
            assert!(
                matches!(init, Err(FuseError::Errno(libc::EPROTO))),
                "{init:?}"
            );
        }
    }
    // Without the flag nothing is agreed, offered or not.
    let backend = Backend::spawn(leasefsd(), &[]).unwrap();
    let device = Device::connect(backend.socket(), &FrontendConfig::default()).unwrap();
    let fuse = FuseClient::new(Arc::new(device));
    let init = fuse.init_ext(INIT_FLAGS, SECURITY_CTX).expect("INIT");
    assert_eq!(init.flags2 & SECURITY_CTX, 0);
}
