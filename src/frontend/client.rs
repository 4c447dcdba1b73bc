//! A FUSE client speaking to the device through its virtqueues, as the guest kernel would.
//!
//! Each request is one chain: a device-readable buffer holding `fuse_in_header` + the
//! opcode's arguments, then a device-writable buffer for `fuse_out_header` + the reply.
//! The reply is checked (the device wrote at least a header, `unique` matches, `len` is
//! sane) before it is parsed; a non-zero `error` becomes [`FuseError::Errno`].
//!
//! The raw layer ([`FuseClient::send_bytes`]) sends arbitrary request bytes with a reply
//! buffer of any size and reports what came back without judging it; hostile tests that need
//! malformed chains go one level lower, to [`Virtqueue::submit_raw`].

use std::mem::size_of;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, Dirent, EntryOut, FlushIn, ForgetIn, FsyncIn, GetattrIn, InHeader, InitIn,
    InitIn2, InitOut, Kstatfs, LinkIn, MkdirIn, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn,
    RenameIn, SetattrIn, WriteIn, WriteOut,
};
use vm_memory::ByteValued;

use super::connection::Device;
use super::virtqueue::{Segment, Virtqueue, WaitError};

/// The FUSE node id of the share's root.
pub const ROOT_ID: u64 = 1;

/// FUSE opcodes, shared with the daemon's dispatcher.
pub use crate::fuse::opcode;

/// `FATTR_*` bits of `SetattrIn::valid`.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
}

/// INIT flags this client asks for: what a Linux guest typically sends, minus locks,
/// writeback caching and DAX (which need more of a guest than this client is).
pub const INIT_FLAGS: u32 = 0x1 // ASYNC_READ
    | 0x8 // ATOMIC_O_TRUNC
    | 0x20 // BIG_WRITES
    | 0x2000 // DO_READDIRPLUS
    | 0x4000 // READDIRPLUS_AUTO
    | 0x4_0000 // PARALLEL_DIROPS
    | 0x40_0000; // MAX_PAGES

/// FUSE protocol version this client speaks.
pub const FUSE_MAJOR: u32 = 7;
pub const FUSE_MINOR: u32 = 31;
/// The minor [`FuseClient::init_ext`] sends: 7.36 added FUSE_INIT_EXT.
pub const FUSE_MINOR_EXT: u32 = 38;

/// Why a FUSE request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FuseError {
    /// The filesystem answered with this errno.
    #[error("errno {0} ({msg})", msg = std::io::Error::from_raw_os_error(*.0))]
    Errno(i32),
    /// The device returned the chain without a reply (fewer bytes than a `fuse_out_header`).
    #[error("the device returned the chain with {0} bytes written, no reply")]
    NoReply(u32),
    /// The device did not return the chain in time.
    #[error("no reply within the timeout")]
    Timeout,
    /// The reply was malformed.
    #[error("malformed reply: {0}")]
    Protocol(String),
    /// Submitting failed (queue full, guest memory exhausted, ...).
    #[error("transport: {0}")]
    Transport(String),
}

impl FuseError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            FuseError::Errno(e) => Some(*e),
            _ => None,
        }
    }
}

pub type FuseResult<T> = Result<T, FuseError>;

/// What the device did with a raw request.
#[derive(Debug, Clone)]
pub struct RawReply {
    /// The length the device put in the used ring.
    pub used_len: u32,
    /// The first `min(used_len, reply buffer size)` bytes of the reply buffer.
    pub bytes: Vec<u8>,
}

impl RawReply {
    /// The `fuse_out_header`, if the device wrote one.
    pub fn header(&self) -> Option<OutHeader> {
        parse::<OutHeader>(&self.bytes).ok()
    }
}

/// One entry of a READDIR reply.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    /// Offset of the next entry (to continue reading after this one).
    pub off: u64,
    pub typ: u32,
    pub name: Vec<u8>,
}

/// One entry of a READDIRPLUS reply.
#[derive(Debug, Clone)]
pub struct DirEntryPlus {
    /// The lookup this entry performed (`nodeid` 0 for "." and ".." and when the
    /// filesystem did not look the entry up).
    pub entry: EntryOut,
    pub dirent: DirEntry,
}

/// A FUSE session's client, bound to one request queue. Clones share the session (and its
/// `unique` counter) and may be moved to other threads.
#[derive(Clone)]
pub struct FuseClient {
    device: Arc<Device>,
    queue: Arc<Virtqueue>,
    unique: Arc<AtomicU64>,
    max_write: Arc<AtomicU32>,
    timeout: Duration,
    uid: u32,
    gid: u32,
}

impl FuseClient {
    /// A client on the first request queue.
    pub fn new(device: Arc<Device>) -> Self {
        let queue = device.request_queue(0).clone();
        FuseClient {
            device,
            queue,
            unique: Arc::new(AtomicU64::new(1)),
            max_write: Arc::new(AtomicU32::new(4096)),
            timeout: Duration::from_secs(10),
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
        }
    }

    /// The same session, sending on request queue `i` (modulo the queues set up).
    pub fn on_queue(&self, i: usize) -> Self {
        let queues = self.device.request_queues();
        FuseClient {
            queue: queues[i % queues.len()].clone(),
            ..self.clone()
        }
    }

    /// The same session, waiting at most `timeout` for each reply.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        FuseClient {
            timeout,
            ..self.clone()
        }
    }

    /// The same session, with these credentials in every request header.
    pub fn with_credentials(&self, uid: u32, gid: u32) -> Self {
        FuseClient {
            uid,
            gid,
            ..self.clone()
        }
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    pub fn queue(&self) -> &Arc<Virtqueue> {
        &self.queue
    }

    /// The largest WRITE payload the device accepts (from INIT; 4096 before INIT).
    pub fn max_write(&self) -> u32 {
        self.max_write.load(Ordering::Relaxed)
    }

    pub fn next_unique(&self) -> u64 {
        self.unique.fetch_add(1, Ordering::Relaxed)
    }

    /// A request header for `opcode` on `nodeid` with `body_len` bytes of arguments.
    pub fn in_header(&self, opcode: u32, nodeid: u64, body_len: usize) -> InHeader {
        InHeader {
            len: (size_of::<InHeader>() + body_len) as u32,
            opcode,
            unique: self.next_unique(),
            nodeid,
            uid: self.uid,
            gid: self.gid,
            pid: std::process::id(),
            padding: 0,
        }
    }

    // ---- the raw layer ----

    /// Send `request` verbatim on `queue` with a `reply_len`-byte reply buffer (none if 0)
    /// and report what the device wrote.
    pub fn send_bytes_on(
        &self,
        queue: &Virtqueue,
        request: &[u8],
        reply_len: u32,
    ) -> FuseResult<RawReply> {
        let ram = self.device.ram();
        let transport = |e: std::io::Error| FuseError::Transport(e.to_string());
        let req = queue
            .alloc(request.len() as u32)
            .ok_or_else(|| FuseError::Transport("guest memory exhausted".into()))?;
        let reply = match reply_len {
            0 => None,
            n => match queue.alloc(n) {
                Some(b) => Some(b),
                None => {
                    queue.free(req);
                    return Err(FuseError::Transport("guest memory exhausted".into()));
                }
            },
        };
        let release = |queue: &Virtqueue| {
            queue.free(req);
            if let Some(r) = reply {
                queue.free(r);
            }
        };
        if let Err(e) = ram.write(req.addr, request) {
            release(queue);
            return Err(transport(e));
        }
        let mut segments = vec![Segment::readable(req)];
        segments.extend(reply.map(Segment::writable));
        let head = match queue.submit(&segments) {
            Ok(h) => h,
            Err(e) => {
                release(queue);
                return Err(transport(e));
            }
        };
        let used_len = match queue.wait(head, self.timeout) {
            Ok(len) => len,
            // The device may still write the buffers: leave them allocated.
            Err(WaitError::Timeout) => return Err(FuseError::Timeout),
            Err(WaitError::Unknown) => {
                return Err(FuseError::Transport("chain vanished".into()));
            }
        };
        let mut bytes = vec![0u8; used_len.min(reply_len) as usize];
        let read = match reply {
            Some(r) if !bytes.is_empty() => ram.read(r.addr, &mut bytes).map_err(transport),
            _ => Ok(()),
        };
        release(queue);
        read.map(|()| RawReply { used_len, bytes })
    }

    /// [`Self::send_bytes_on`] this client's queue.
    pub fn send_bytes(&self, request: &[u8], reply_len: u32) -> FuseResult<RawReply> {
        self.send_bytes_on(&self.queue, request, reply_len)
    }

    /// Send `opcode` on `nodeid` with argument bytes `body`; return the reply payload (after
    /// the out header), checked. `reply_len` is the payload capacity to offer.
    pub fn call(
        &self,
        opcode: u32,
        nodeid: u64,
        body: &[&[u8]],
        reply_len: u32,
    ) -> FuseResult<Vec<u8>> {
        self.call_on(&self.queue, opcode, nodeid, body, &[], reply_len)
    }

    /// [`Self::call`] with request extensions `ext` (8-byte records, e.g.
    /// `leasefs::request_ext::encode_security_context`) after the arguments, counted in the
    /// header's `total_extlen` as a Linux guest sends them.
    pub fn call_ext(
        &self,
        opcode: u32,
        nodeid: u64,
        body: &[&[u8]],
        ext: &[u8],
        reply_len: u32,
    ) -> FuseResult<Vec<u8>> {
        self.call_on(&self.queue, opcode, nodeid, body, ext, reply_len)
    }

    fn call_on(
        &self,
        queue: &Virtqueue,
        opcode: u32,
        nodeid: u64,
        body: &[&[u8]],
        ext: &[u8],
        reply_len: u32,
    ) -> FuseResult<Vec<u8>> {
        let body_len: usize = body.iter().map(|b| b.len()).sum::<usize>() + ext.len();
        let mut header = self.in_header(opcode, nodeid, body_len);
        // `total_extlen`, the low 16 bits of what fuse-backend-rs calls `padding`.
        header.padding = (ext.len() / 8) as u32;
        let mut request = Vec::with_capacity(header.len as usize);
        request.extend_from_slice(header.as_slice());
        for b in body {
            request.extend_from_slice(b);
        }
        request.extend_from_slice(ext);
        let raw = self.send_bytes_on(queue, &request, size_of::<OutHeader>() as u32 + reply_len)?;
        let out = raw.header().ok_or(FuseError::NoReply(raw.used_len))?;
        if out.unique != header.unique {
            return Err(FuseError::Protocol(format!(
                "reply for request {} answers {}",
                header.unique, out.unique
            )));
        }
        if (out.len as usize) < size_of::<OutHeader>() || out.len > raw.used_len {
            return Err(FuseError::Protocol(format!(
                "out header len {} with {} bytes written",
                out.len, raw.used_len
            )));
        }
        if out.error != 0 {
            return Err(FuseError::Errno(-out.error));
        }
        Ok(raw.bytes[size_of::<OutHeader>()..out.len as usize].to_vec())
    }

    fn call_obj<T: ByteValued + Default>(
        &self,
        opcode: u32,
        nodeid: u64,
        body: &[&[u8]],
    ) -> FuseResult<T> {
        parse(&self.call(opcode, nodeid, body, size_of::<T>() as u32)?)
    }

    // ---- typed requests ----

    /// FUSE_INIT; remembers `max_write`.
    pub fn init(&self) -> FuseResult<InitOut> {
        self.init_with(FUSE_MAJOR, FUSE_MINOR, INIT_FLAGS)
    }

    /// FUSE_INIT offering `flags` and, with FUSE_INIT_EXT, the upper bits `flags2` (as Linux
    /// 5.17 and later send it).
    pub fn init_ext(&self, flags: u32, flags2: u32) -> FuseResult<InitOut> {
        const INIT_EXT: u32 = 1 << 30;
        let arg = InitIn {
            major: FUSE_MAJOR,
            minor: FUSE_MINOR_EXT,
            max_readahead: 128 << 10,
            flags: flags | INIT_EXT,
        };
        let ext = InitIn2 {
            flags2,
            unused: [0; 11],
        };
        let out: InitOut =
            self.call_obj_min(opcode::INIT, 0, &[arg.as_slice(), ext.as_slice()], 64)?;
        if out.max_write != 0 {
            self.max_write.store(out.max_write, Ordering::Relaxed);
        }
        Ok(out)
    }

    pub fn init_with(&self, major: u32, minor: u32, flags: u32) -> FuseResult<InitOut> {
        let arg = InitIn {
            major,
            minor,
            max_readahead: 128 << 10,
            flags,
        };
        let out: InitOut = self.call_obj_min(opcode::INIT, 0, &[arg.as_slice()], 24)?;
        if out.max_write != 0 {
            self.max_write.store(out.max_write, Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Like `call_obj`, but a reply as short as `min_len` is accepted (zero-filled), for
    /// structs that grew across protocol versions.
    fn call_obj_min<T: ByteValued + Default>(
        &self,
        opcode: u32,
        nodeid: u64,
        body: &[&[u8]],
        min_len: usize,
    ) -> FuseResult<T> {
        let payload = self.call(opcode, nodeid, body, size_of::<T>() as u32)?;
        if payload.len() < min_len {
            return Err(FuseError::Protocol(format!(
                "{} bytes of reply, expected at least {min_len}",
                payload.len()
            )));
        }
        let mut t = T::default();
        let n = payload.len().min(size_of::<T>());
        t.as_mut_slice()[..n].copy_from_slice(&payload[..n]);
        Ok(t)
    }

    /// LOOKUP. A negative entry (node id 0, which a daemon may send so the guest caches the
    /// absence) is reported as ENOENT, as the guest kernel reads it.
    pub fn lookup(&self, parent: u64, name: impl AsRef<[u8]>) -> FuseResult<EntryOut> {
        let entry: EntryOut = self.call_obj(opcode::LOOKUP, parent, &[&cstr(name.as_ref())])?;
        if entry.nodeid == 0 {
            return Err(FuseError::Errno(libc::ENOENT));
        }
        Ok(entry)
    }

    /// FORGET, sent on the hiprio queue as the guest does. It has no reply; this returns once
    /// the device has returned the chain.
    pub fn forget(&self, nodeid: u64, nlookup: u64) -> FuseResult<()> {
        let arg = ForgetIn { nlookup };
        let header = self.in_header(opcode::FORGET, nodeid, size_of::<ForgetIn>());
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(arg.as_slice());
        self.send_bytes_on(self.device.hiprio(), &request, 0)
            .map(|_| ())
    }

    /// Confirm notification `unique` about node `nodeid` (FUSE_NOTIFY_REPLY with the
    /// confirmation body of docs/coherency.md) on the hiprio queue, as the patched guest does:
    /// a request queue may be busy with the very request that waits for this confirmation.
    /// No reply; returns once the device has returned the chain.
    pub fn confirm_notification(&self, unique: u64, nodeid: u64, error: i32) -> FuseResult<()> {
        let mut header = self.in_header(opcode::NOTIFY_REPLY, nodeid, 8);
        header.unique = unique;
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(&error.to_le_bytes());
        request.extend_from_slice(&0u32.to_le_bytes());
        self.send_bytes_on(self.device.hiprio(), &request, 0)
            .map(|_| ())
    }

    /// Confirm many notifications at once, as a guest's notification work item does after a
    /// batch: every FUSE_NOTIFY_REPLY (`(unique, nodeid, error)`) is made available on the
    /// hiprio queue before one kick decision, then each completion is awaited. One round
    /// trip for the batch instead of one per message; more than the queue's free descriptors
    /// go in several rounds.
    pub fn confirm_notifications(&self, confirmations: &[(u64, u64, i32)]) -> FuseResult<()> {
        let queue = self.device.hiprio();
        let ram = self.device.ram();
        let transport = |e: std::io::Error| FuseError::Transport(e.to_string());
        let mut rest = confirmations;
        while !rest.is_empty() {
            let room = queue.free_descriptors().clamp(1, rest.len());
            let (now, later) = rest.split_at(room);
            rest = later;
            let mut buffers = Vec::with_capacity(now.len());
            let release = |buffers: &[super::memory::Buffer]| {
                buffers.iter().for_each(|b| queue.free(*b));
            };
            for &(unique, nodeid, error) in now {
                let mut header = self.in_header(opcode::NOTIFY_REPLY, nodeid, 8);
                header.unique = unique;
                let mut request = header.as_slice().to_vec();
                request.extend_from_slice(&error.to_le_bytes());
                request.extend_from_slice(&0u32.to_le_bytes());
                let Some(buf) = queue.alloc(request.len() as u32) else {
                    release(&buffers);
                    return Err(FuseError::Transport("guest memory exhausted".into()));
                };
                buffers.push(buf);
                if let Err(e) = ram.write(buf.addr, &request) {
                    release(&buffers);
                    return Err(transport(e));
                }
            }
            let chains: Vec<[Segment; 1]> =
                buffers.iter().map(|b| [Segment::readable(*b)]).collect();
            let chains: Vec<&[Segment]> = chains.iter().map(|c| &c[..]).collect();
            let heads = match queue.submit_many(&chains) {
                Ok(heads) => heads,
                Err(e) => {
                    release(&buffers);
                    return Err(transport(e));
                }
            };
            for (head, buf) in heads.into_iter().zip(buffers) {
                match queue.wait(head, self.timeout) {
                    Ok(_) => queue.free(buf),
                    // The device may still read the buffer: leave it allocated.
                    Err(WaitError::Timeout) => return Err(FuseError::Timeout),
                    Err(WaitError::Unknown) => {
                        return Err(FuseError::Transport("chain vanished".into()));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn getattr(&self, nodeid: u64) -> FuseResult<AttrOut> {
        self.call_obj(opcode::GETATTR, nodeid, &[GetattrIn::default().as_slice()])
    }

    pub fn setattr(&self, nodeid: u64, attr: &SetattrIn) -> FuseResult<AttrOut> {
        self.call_obj(opcode::SETATTR, nodeid, &[attr.as_slice()])
    }

    /// SETATTR of the size alone (truncate).
    pub fn truncate(&self, nodeid: u64, size: u64) -> FuseResult<AttrOut> {
        self.setattr(
            nodeid,
            &SetattrIn {
                valid: fattr::SIZE,
                size,
                ..Default::default()
            },
        )
    }

    /// SETATTR of the permission bits alone (chmod).
    pub fn chmod(&self, nodeid: u64, mode: u32) -> FuseResult<AttrOut> {
        self.setattr(
            nodeid,
            &SetattrIn {
                valid: fattr::MODE,
                mode,
                ..Default::default()
            },
        )
    }

    pub fn open(&self, nodeid: u64, flags: i32) -> FuseResult<OpenOut> {
        let arg = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call_obj(opcode::OPEN, nodeid, &[arg.as_slice()])
    }

    pub fn read(&self, nodeid: u64, fh: u64, offset: u64, size: u32) -> FuseResult<Vec<u8>> {
        let arg = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        self.call(opcode::READ, nodeid, &[arg.as_slice()], size)
    }

    /// One WRITE request (at most [`Self::max_write`] bytes are accepted by the device);
    /// returns how many bytes were written.
    pub fn write(&self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> FuseResult<u32> {
        self.write_with_flags(nodeid, fh, offset, data, 0)
    }

    /// [`write`](Self::write) with `write_flags` set (FUSE_WRITE_KILL_SUIDGID...).
    pub fn write_with_flags(
        &self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
    ) -> FuseResult<u32> {
        let arg = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            fuse_flags: write_flags,
            ..Default::default()
        };
        let out: WriteOut = self.call_obj(opcode::WRITE, nodeid, &[arg.as_slice(), data])?;
        Ok(out.size)
    }

    /// Write all of `data`, in requests of at most `max_write` bytes.
    pub fn write_all(
        &self,
        nodeid: u64,
        fh: u64,
        mut offset: u64,
        mut data: &[u8],
    ) -> FuseResult<()> {
        while !data.is_empty() {
            let n = data.len().min(self.max_write() as usize);
            let written = self.write(nodeid, fh, offset, &data[..n])? as usize;
            if written == 0 || written > n {
                return Err(FuseError::Protocol(format!(
                    "WRITE of {n} bytes wrote {written}"
                )));
            }
            data = &data[written..];
            offset += written as u64;
        }
        Ok(())
    }

    pub fn create(
        &self,
        parent: u64,
        name: impl AsRef<[u8]>,
        flags: i32,
        mode: u32,
    ) -> FuseResult<(EntryOut, OpenOut)> {
        let arg = CreateIn {
            flags: flags as u32,
            mode,
            umask: 0,
            fuse_flags: 0,
        };
        let payload = self.call(
            opcode::CREATE,
            parent,
            &[arg.as_slice(), &cstr(name.as_ref())],
            (size_of::<EntryOut>() + size_of::<OpenOut>()) as u32,
        )?;
        let entry: EntryOut = parse(&payload)?;
        let open: OpenOut = parse(&payload[size_of::<EntryOut>().min(payload.len())..])?;
        Ok((entry, open))
    }

    pub fn mkdir(&self, parent: u64, name: impl AsRef<[u8]>, mode: u32) -> FuseResult<EntryOut> {
        let arg = MkdirIn { mode, umask: 0 };
        self.call_obj(
            opcode::MKDIR,
            parent,
            &[arg.as_slice(), &cstr(name.as_ref())],
        )
    }

    pub fn unlink(&self, parent: u64, name: impl AsRef<[u8]>) -> FuseResult<()> {
        self.call(opcode::UNLINK, parent, &[&cstr(name.as_ref())], 0)
            .map(drop)
    }

    pub fn rmdir(&self, parent: u64, name: impl AsRef<[u8]>) -> FuseResult<()> {
        self.call(opcode::RMDIR, parent, &[&cstr(name.as_ref())], 0)
            .map(drop)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: impl AsRef<[u8]>,
        new_parent: u64,
        new_name: impl AsRef<[u8]>,
    ) -> FuseResult<()> {
        let arg = RenameIn { newdir: new_parent };
        self.call(
            opcode::RENAME,
            parent,
            &[
                arg.as_slice(),
                &cstr(name.as_ref()),
                &cstr(new_name.as_ref()),
            ],
            0,
        )
        .map(drop)
    }

    pub fn symlink(
        &self,
        parent: u64,
        name: impl AsRef<[u8]>,
        target: impl AsRef<[u8]>,
    ) -> FuseResult<EntryOut> {
        self.call_obj(
            opcode::SYMLINK,
            parent,
            &[&cstr(name.as_ref()), &cstr(target.as_ref())],
        )
    }

    pub fn readlink(&self, nodeid: u64) -> FuseResult<Vec<u8>> {
        self.call(opcode::READLINK, nodeid, &[], libc::PATH_MAX as u32)
    }

    pub fn link(
        &self,
        nodeid: u64,
        new_parent: u64,
        new_name: impl AsRef<[u8]>,
    ) -> FuseResult<EntryOut> {
        let arg = LinkIn { oldnodeid: nodeid };
        self.call_obj(
            opcode::LINK,
            new_parent,
            &[arg.as_slice(), &cstr(new_name.as_ref())],
        )
    }

    pub fn opendir(&self, nodeid: u64) -> FuseResult<OpenOut> {
        let arg = OpenIn {
            flags: libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32,
            fuse_flags: 0,
        };
        self.call_obj(opcode::OPENDIR, nodeid, &[arg.as_slice()])
    }

    /// One READDIR request of up to `size` bytes from `offset`.
    pub fn readdir(
        &self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<Vec<DirEntry>> {
        let arg = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let payload = self.call(opcode::READDIR, nodeid, &[arg.as_slice()], size)?;
        parse_dirents(&payload, 0).map(|v| v.into_iter().map(|(_, d)| d).collect())
    }

    /// One READDIRPLUS request of up to `size` bytes from `offset`.
    pub fn readdirplus(
        &self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> FuseResult<Vec<DirEntryPlus>> {
        let arg = ReadIn {
            fh,
            offset,
            size,
            ..Default::default()
        };
        let payload = self.call(opcode::READDIRPLUS, nodeid, &[arg.as_slice()], size)?;
        parse_dirents(&payload, size_of::<EntryOut>()).map(|v| {
            v.into_iter()
                .map(|(entry, dirent)| DirEntryPlus {
                    entry: entry.unwrap_or_default(),
                    dirent,
                })
                .collect()
        })
    }

    /// Every entry of an open directory, READDIRPLUS after READDIRPLUS until one is empty.
    pub fn readdirplus_all(&self, nodeid: u64, fh: u64) -> FuseResult<Vec<DirEntryPlus>> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let batch = self.readdirplus(nodeid, fh, offset, 8192)?;
            let Some(last) = batch.last() else {
                return Ok(all);
            };
            offset = last.dirent.off;
            all.extend(batch);
        }
    }

    pub fn releasedir(&self, nodeid: u64, fh: u64) -> FuseResult<()> {
        let arg = ReleaseIn {
            fh,
            ..Default::default()
        };
        self.call(opcode::RELEASEDIR, nodeid, &[arg.as_slice()], 0)
            .map(drop)
    }

    pub fn fsync(&self, nodeid: u64, fh: u64, datasync: bool) -> FuseResult<()> {
        let arg = FsyncIn {
            fh,
            fsync_flags: datasync as u32,
            padding: 0,
        };
        self.call(opcode::FSYNC, nodeid, &[arg.as_slice()], 0)
            .map(drop)
    }

    pub fn flush(&self, nodeid: u64, fh: u64, lock_owner: u64) -> FuseResult<()> {
        let arg = FlushIn {
            fh,
            lock_owner,
            ..Default::default()
        };
        self.call(opcode::FLUSH, nodeid, &[arg.as_slice()], 0)
            .map(drop)
    }

    pub fn release(&self, nodeid: u64, fh: u64, flags: i32) -> FuseResult<()> {
        let arg = ReleaseIn {
            fh,
            flags: flags as u32,
            ..Default::default()
        };
        self.call(opcode::RELEASE, nodeid, &[arg.as_slice()], 0)
            .map(drop)
    }

    pub fn statfs(&self, nodeid: u64) -> FuseResult<Kstatfs> {
        self.call_obj(opcode::STATFS, nodeid, &[])
    }
}

/// `name` with its terminating NUL, as FUSE carries names.
fn cstr(name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(name.len() + 1);
    v.extend_from_slice(name);
    v.push(0);
    v
}

/// A `T` from the start of `bytes` (which need not be aligned).
pub fn parse<T: ByteValued + Default>(bytes: &[u8]) -> FuseResult<T> {
    if bytes.len() < size_of::<T>() {
        return Err(FuseError::Protocol(format!(
            "{} bytes of reply, expected {}",
            bytes.len(),
            size_of::<T>()
        )));
    }
    let mut t = T::default();
    t.as_mut_slice().copy_from_slice(&bytes[..size_of::<T>()]);
    Ok(t)
}

/// Walk a READDIR (`entry_len` 0) or READDIRPLUS (`entry_len` = sizeof EntryOut) payload.
fn parse_dirents(
    payload: &[u8],
    entry_len: usize,
) -> FuseResult<Vec<(Option<EntryOut>, DirEntry)>> {
    let mut out = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let entry = if entry_len > 0 {
            Some(parse::<EntryOut>(rest)?)
        } else {
            None
        };
        let d: Dirent = parse(&rest[entry_len.min(rest.len())..])?;
        let name_at = entry_len + size_of::<Dirent>();
        let name_end = name_at + d.namelen as usize;
        if name_end > rest.len() {
            return Err(FuseError::Protocol(format!(
                "directory entry name of {} bytes overruns the reply",
                d.namelen
            )));
        }
        out.push((
            entry,
            DirEntry {
                ino: d.ino,
                off: d.off,
                typ: d.type_,
                name: rest[name_at..name_end].to_vec(),
            },
        ));
        let padded = name_end.div_ceil(8) * 8;
        rest = &rest[padded.min(rest.len())..];
    }
    Ok(out)
}

/// A message from the notification queue, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// The FUSE notify code (2 INVAL_INODE, 3 INVAL_ENTRY, 6 DELETE...).
    pub code: i32,
    /// Non-zero: the device waits for a confirmation with this id.
    pub unique: u64,
    /// The inode (INVAL_INODE) or parent directory (INVAL_ENTRY, DELETE).
    pub node: u64,
    /// INVAL_INODE: the data offset (-1: attributes only).
    pub offset: i64,
    /// INVAL_ENTRY, DELETE: the name.
    pub name: Vec<u8>,
    /// DELETE: the inode the name led to (else 0).
    pub child: u64,
}

impl Notice {
    pub const INVAL_INODE: i32 = 2;
    pub const INVAL_ENTRY: i32 = 3;
    pub const DELETE: i32 = 6;

    /// Decode what the device wrote into one notification buffer; `None` if it is not a
    /// well-formed message of a known code.
    pub fn parse(bytes: &[u8]) -> Option<Notice> {
        let u32_at = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
        if u32_at(0)? as usize != bytes.len() {
            return None;
        }
        let code = u32_at(4)? as i32;
        let unique = u64_at(8)?;
        let node = u64_at(16)?;
        let (offset, name, child) = match code {
            Self::INVAL_INODE => (u64_at(24)? as i64, Vec::new(), 0),
            Self::INVAL_ENTRY => {
                let len = u32_at(24)? as usize;
                (0, bytes.get(32..32 + len)?.to_vec(), 0)
            }
            Self::DELETE => {
                let len = u32_at(32)? as usize;
                (0, bytes.get(40..40 + len)?.to_vec(), u64_at(24)?)
            }
            _ => return None,
        };
        Some(Notice {
            code,
            unique,
            node,
            offset,
            name,
            child,
        })
    }
}
