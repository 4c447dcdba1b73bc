//! FUSE dispatch: decode one request chain, route it, write the reply into the same chain.
//!
//! fuse-backend-rs's `Server` decodes the FUSE protocol and drives the passthrough filesystem.
//! This layer sits in front of it for what the daemon decides before any filesystem code runs
//! (refusing writes on a read-only export) and for the opcodes the crate's server does not
//! route (COPY_FILE_RANGE, SYNCFS, TMPFILE) or routes wrongly (SETLKW), which it decodes
//! itself, and READDIR/READDIRPLUS, whose replies it encodes in one buffer (the crate's server
//! writes every entry into the guest's buffers piecemeal).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{
    CopyFileRangeIn, CreateIn, Dirent, EntryOut, InHeader, InitIn, InitIn2, LkIn, OpenIn, OpenOut,
    OutHeader, ReadIn, WriteOut, KERNEL_MINOR_VERSION_LOOKUP_NEGATIVE_ENTRY_ZERO, KERNEL_VERSION,
};
use fuse_backend_rs::api::filesystem::{Context, DirEntry, Entry, FileSystem};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use log::{debug, warn};
use vm_memory::{ByteValued, GuestMemoryMmap};

use crate::coherence::notifier::Notifier;
use crate::fast_path;
use crate::filesystem::Fs;
use crate::passthrough::with_security_context;
use crate::queue::Chain;
use crate::request_ext::{creates_object, security_context};

/// FUSE opcodes (linux/include/uapi/linux/fuse.h), for the daemon and the test frontend.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const SETLKW: u32 = 33;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
}

/// Opcodes that change the share; a read-only export refuses them with EROFS.
const MODIFYING_OPCODES: &[u32] = &[
    opcode::SETATTR,
    opcode::SYMLINK,
    opcode::MKNOD,
    opcode::MKDIR,
    opcode::UNLINK,
    opcode::RMDIR,
    opcode::RENAME,
    opcode::LINK,
    opcode::WRITE,
    opcode::SETXATTR,
    opcode::REMOVEXATTR,
    opcode::CREATE,
    opcode::FALLOCATE,
    opcode::RENAME2,
    opcode::COPY_FILE_RANGE,
    opcode::TMPFILE,
];

/// Opcodes [`FuseDispatcher::handle_locally`] answers itself.
const LOCAL_OPCODES: &[u32] = &[
    opcode::SYNCFS,
    opcode::COPY_FILE_RANGE,
    opcode::SETLKW,
    opcode::TMPFILE,
    opcode::READDIR,
    opcode::READDIRPLUS,
];

/// Routes FUSE requests from any queue to the filesystem.
pub struct FuseDispatcher {
    server: Server<Arc<Fs>>,
    fs: Arc<Fs>,
    readonly: bool,
    notifier: Arc<Notifier>,
    /// FUSE_SECURITY_CTX was agreed at the last INIT: creating requests carry the context.
    security_ctx: AtomicBool,
    /// The guest's protocol minor at the last INIT the crate's server took allows negative
    /// entries (node id 0) in LOOKUP replies: what the server decides from it, for
    /// [`fast_path`].
    negative_entries: AtomicBool,
}

/// The outcome of a request answered by this layer: a reply payload or an errno.
type LocalReply = Result<Vec<u8>, i32>;

/// Whether every request is to be logged (`--log-level trace`): the crate's server logs each
/// one ("fuse: new req ..."), as virtiofsd does; one load of the log level.
fn requests_traced() -> bool {
    log::max_level() >= log::LevelFilter::Trace
}

/// Log a request answered here rather than by the crate's server, in the server's words.
fn trace_request(header: &InHeader) {
    log::trace!(
        "fuse: new req {:?}: {:?}",
        fuse_backend_rs::abi::fuse_abi::Opcode::from(header.opcode),
        header
    );
}

impl FuseDispatcher {
    /// `notifier` receives the guest's confirmations of notifications (FUSE_NOTIFY_REPLY).
    pub fn new(fs: Arc<Fs>, readonly: bool, notifier: Arc<Notifier>) -> Self {
        FuseDispatcher {
            server: Server::new(fs.clone()),
            fs,
            readonly,
            notifier,
            security_ctx: AtomicBool::new(false),
            // The crate's server assumes its own minor until an INIT says otherwise.
            negative_entries: AtomicBool::new(true),
        }
    }

    /// Whether serving this chain may wait on other processes for unbounded time (a blocking
    /// lock request), so it must not run on a queue's own thread.
    pub fn may_block(header: Option<&InHeader>) -> bool {
        header.is_some_and(|h| h.opcode == opcode::SETLKW)
    }

    /// The request's FUSE header, read where it lies without building a [`Reader`] (an
    /// allocation and a walk of the whole chain) when the first buffer holds it, as a guest
    /// driver always lays it out; `None` if the chain is too short for one.
    pub fn peek_header(mem: &GuestMemoryMmap, chain: &Chain) -> Option<InHeader> {
        use vm_memory::Bytes;
        if let Some(first) = chain.clone().next() {
            if !first.is_write_only() && first.len() as usize >= std::mem::size_of::<InHeader>() {
                return mem.read_obj(first.addr()).ok();
            }
        }
        read_header(mem, chain)
    }

    /// Answer a chain with an error without running it (used when too many requests are
    /// already blocked).
    pub fn refuse_chain(&self, mem: &GuestMemoryMmap, chain: Chain, errno: i32) -> u32 {
        match (
            Self::peek_header(mem, &chain),
            VirtioFsWriter::new(mem, chain),
        ) {
            (Some(header), Ok(writer)) => reply(writer, header.unique, Err(errno)),
            _ => 0,
        }
    }

    /// Serve one descriptor chain; returns how many bytes were written into it.
    pub fn handle_chain(&self, mem: &GuestMemoryMmap, chain: Chain) -> u32 {
        let header = Self::peek_header(mem, &chain);
        self.handle_request(mem, chain, header)
    }

    /// Serve `chain` now if [`fast_path`] takes it: `Ok` with the bytes written; else its
    /// header (as [`Self::peek_header`] reads it), for [`Self::handle_general`].
    pub fn handle_fast(
        &self,
        mem: &GuestMemoryMmap,
        chain: &Chain,
    ) -> Result<u32, Option<InHeader>> {
        match self.serve_fast(mem, chain) {
            fast_path::Served::Done(len) => Ok(len),
            fast_path::Served::Pass(Some(header)) => Err(Some(header)),
            fast_path::Served::Pass(None) => Err(Self::peek_header(mem, chain)),
        }
    }

    /// [`fast_path::serve`], unless every request is to be logged: the fast path then steps
    /// aside for the crate's server, which logs each one.
    fn serve_fast(&self, mem: &GuestMemoryMmap, chain: &Chain) -> fast_path::Served {
        if requests_traced() {
            return fast_path::Served::Pass(None);
        }
        fast_path::serve(&self.fs, self.agreed(), mem, chain)
    }

    fn agreed(&self) -> fast_path::Agreed {
        fast_path::Agreed {
            readonly: self.readonly,
            security_ctx: self.security_ctx.load(Ordering::Relaxed),
            negative_entries: self.negative_entries.load(Ordering::Relaxed),
        }
    }

    /// Serve one descriptor chain whose header [`Self::peek_header`] has read already.
    pub fn handle_request(
        &self,
        mem: &GuestMemoryMmap,
        chain: Chain,
        header: Option<InHeader>,
    ) -> u32 {
        if header.is_some() {
            if let fast_path::Served::Done(len) = self.serve_fast(mem, &chain) {
                return len;
            }
        }
        self.handle_general(mem, chain, header)
    }

    /// Serve a chain [`fast_path`] passed on, whose header is `header`.
    pub fn handle_general(
        &self,
        mem: &GuestMemoryMmap,
        chain: Chain,
        header: Option<InHeader>,
    ) -> u32 {
        let Some(header) = header else {
            warn!("dropping request: too short for a FUSE header");
            return 0;
        };
        // Only INIT's reply is patched afterwards (agree_init_flags2).
        let reply_chain = (header.opcode == opcode::INIT).then(|| chain.clone());
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                warn!("dropping request: bad readable descriptors: {e}");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                warn!("dropping request: bad writable descriptors: {e}");
                return 0;
            }
        };
        if header.opcode == opcode::NOTIFY_REPLY {
            // No reply: the guest expects none and posted no buffer for one.
            self.confirm_notification(&header, reader);
            return 0;
        }
        if header.opcode == opcode::TMPFILE && self.security_ctx.load(Ordering::Relaxed) {
            let result = match security_context(&header, reader.clone()) {
                Ok(context) => with_security_context(context, || {
                    self.handle_locally(&header, &reader, 0)
                        .expect("TMPFILE is served here")
                }),
                Err(errno) => Err(errno),
            };
            return reply(writer, header.unique, result);
        }
        if let Some(result) = self.handle_locally(&header, &reader, writer.available_bytes()) {
            return reply(writer, header.unique, result);
        }
        let init_flags2 = if header.opcode == opcode::INIT {
            match self.init_flags2(reader.clone()) {
                Ok(flags2) => {
                    self.note_init_minor(reader.clone());
                    flags2
                }
                Err(errno) => return reply(writer, header.unique, Err(errno)),
            }
        } else {
            0
        };
        let context = if creates_object(header.opcode) && self.security_ctx.load(Ordering::Relaxed)
        {
            match security_context(&header, reader.clone()) {
                Ok(context) => context,
                Err(errno) => {
                    debug!("request {}: bad security context extension", header.unique);
                    return reply(writer, header.unique, Err(errno));
                }
            }
        } else {
            None
        };
        let served = with_security_context(context, || {
            self.server
                .handle_message(reader, Writer::VirtioFs(writer), None, None)
        });
        match served {
            Ok(len) => {
                if let (true, Some(reply_chain)) = (init_flags2 != 0, &reply_chain) {
                    agree_init_flags2(mem, reply_chain, len, init_flags2);
                }
                len as u32
            }
            Err(e) => {
                debug!("request {} (opcode {}): {e}", header.unique, header.opcode);
                0
            }
        }
    }

    /// INIT flags beyond those fuse-backend-rs knows (its `FsOptions` drops them) that the
    /// guest offers and the daemon agrees to, as bits of `flags2`: DIRECT_IO_ALLOW_MMAP with
    /// `--allow-mmap`, SECURITY_CTX with `--security-label`, HAS_FSNOTIFY always (the
    /// notifier sends host changes as fsnotify events to such a guest). EPROTO for a guest
    /// without SECURITY_CTX under `--security-label=always` (as virtiofsd).
    fn init_flags2(&self, request: Reader<'_, ()>) -> Result<u32, i32> {
        let offered = offered_flags2(request);
        let config = self.fs.config();
        let mut want = HAS_FSNOTIFY_FLAGS2;
        if config.allow_mmap {
            want |= DIRECT_IO_ALLOW_MMAP_FLAGS2;
        }
        if config.security_label {
            want |= SECURITY_CTX_FLAGS2;
        }
        let agreed = offered & want;
        self.notifier
            .set_fsnotify(agreed & HAS_FSNOTIFY_FLAGS2 != 0);
        let labels = agreed & SECURITY_CTX_FLAGS2 != 0;
        self.security_ctx.store(labels, Ordering::Relaxed);
        if config.security_label && !labels {
            if config.security_label_required {
                warn!("INIT refused: --security-label=always, and the guest kernel does not offer FUSE_SECURITY_CTX");
                return Err(libc::EPROTO);
            }
            warn!("--security-label: the guest kernel does not offer FUSE_SECURITY_CTX; continuing without");
        }
        Ok(agreed)
    }

    /// Follow the crate's server, which stores the guest's protocol version from an INIT of
    /// major 7 and turns a LOOKUP's negative entry into ENOENT below minor 4.
    fn note_init_minor(&self, mut request: Reader<'_, ()>) {
        let _ = request.read_obj::<InHeader>();
        if let Ok(init) = request.read_obj::<InitIn>() {
            if init.major == KERNEL_VERSION {
                let ok = init.minor >= KERNEL_MINOR_VERSION_LOOKUP_NEGATIVE_ENTRY_ZERO;
                self.negative_entries.store(ok, Ordering::Relaxed);
            }
        }
    }

    /// A guest's confirmation that it carried out notification `header.unique`
    /// (docs/coherency.md): body `{ s32 error; u32 padding; }`.
    fn confirm_notification(&self, header: &InHeader, mut request: Reader<'_, ()>) {
        let _ = request.read_obj::<InHeader>();
        let error = match request.read_obj::<[u8; 8]>() {
            Ok(body) => i32::from_le_bytes([body[0], body[1], body[2], body[3]]),
            Err(_) => {
                debug!(
                    "FUSE_NOTIFY_REPLY {} without a confirmation body; ignored",
                    header.unique
                );
                return;
            }
        };
        self.notifier.confirm(header.unique, error);
    }

    /// Requests answered here rather than by the crate's server: `None` passes the request on.
    /// `room`: bytes the guest's reply buffers hold.
    fn handle_locally(
        &self,
        header: &InHeader,
        request: &Reader<'_, ()>,
        room: usize,
    ) -> Option<LocalReply> {
        if self.readonly && refused_on_readonly(header, request.clone()) {
            trace_request(header);
            return Some(Err(libc::EROFS));
        }
        if !LOCAL_OPCODES.contains(&header.opcode) {
            // Most requests: no copy of the reader's buffer list.
            return None;
        }
        trace_request(header);
        let mut body = request.clone();
        let _ = body.read_obj::<InHeader>();
        let ctx = Context::from(header);
        let reply = match header.opcode {
            opcode::SYNCFS => self.fs.syncfs().map(|()| Vec::new()),
            opcode::COPY_FILE_RANGE => {
                let Ok(args) = body.read_obj::<CopyFileRangeIn>() else {
                    return Some(Err(libc::EINVAL));
                };
                self.fs
                    .copy_file_range(
                        &ctx,
                        header.nodeid,
                        args.fh_in,
                        args.offset_in,
                        args.nodeid_out,
                        args.fh_out,
                        args.offset_out,
                        args.len,
                        args.flags,
                    )
                    .map(|copied| {
                        // The reply's size field is 32 bits; the kernel never asks for more.
                        let size = u32::try_from(copied).unwrap_or(u32::MAX);
                        WriteOut { size, padding: 0 }.as_slice().to_vec()
                    })
            }
            opcode::SETLKW => {
                // The crate's server answers SETLKW with a non-blocking setlk, which turns a
                // waiting fcntl(F_SETLKW) in the guest into a spurious EAGAIN.
                let Ok(args) = body.read_obj::<LkIn>() else {
                    return Some(Err(libc::EINVAL));
                };
                self.fs
                    .setlkw(
                        &ctx,
                        header.nodeid,
                        args.fh,
                        args.owner,
                        args.lk.into(),
                        args.lk_flags,
                    )
                    .map(|()| Vec::new())
            }
            opcode::TMPFILE => {
                // fuse_create_in, then the dentry's name, which O_TMPFILE has no use for.
                let Ok(args) = body.read_obj::<CreateIn>() else {
                    return Some(Err(libc::EINVAL));
                };
                self.fs
                    .tmpfile(&ctx, header.nodeid, args.mode, args.umask, args.flags)
                    .map(|(entry, handle, options)| {
                        let open = OpenOut {
                            fh: handle.unwrap_or(0),
                            open_flags: options.bits(),
                            passthrough: 0,
                        };
                        let mut payload = EntryOut::from(entry).as_slice().to_vec();
                        payload.extend_from_slice(open.as_slice());
                        payload
                    })
            }
            opcode::READDIR | opcode::READDIRPLUS => {
                let Ok(args) = body.read_obj::<ReadIn>() else {
                    return Some(Err(libc::EINVAL));
                };
                // As the crate's server: ENOMEM when the guest's buffers cannot take `size`.
                if room < args.size as usize {
                    return Some(Err(libc::ENOMEM));
                }
                let max = (args.size as usize).min(room - size_of::<OutHeader>().min(room));
                let mut out = DirReply::new(max);
                let listed = if header.opcode == opcode::READDIRPLUS {
                    self.fs.readdirplus(
                        &ctx,
                        header.nodeid,
                        args.fh,
                        args.size,
                        args.offset,
                        &mut |d, e| Ok(out.add(d, Some(e))),
                    )
                } else {
                    self.fs.readdir(
                        &ctx,
                        header.nodeid,
                        args.fh,
                        args.size,
                        args.offset,
                        &mut |d| Ok(out.add(d, None)),
                    )
                };
                listed.map(|()| out.buf)
            }
            _ => return None,
        };
        Some(reply.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

/// FUSE_INIT_EXT: `fuse_init_in`/`fuse_init_out` carry `flags2`, the upper 32 flag bits.
const INIT_EXT: u32 = 1 << 30;
/// The `flags2` word of an INIT request (0 for a guest without FUSE_INIT_EXT).
fn offered_flags2(mut request: Reader<'_, ()>) -> u32 {
    let _ = request.read_obj::<InHeader>();
    let Ok(init) = request.read_obj::<InitIn>() else {
        return 0;
    };
    if init.major != 7 || init.minor < INIT_OUT_FLAGS2_MINOR || init.flags & INIT_EXT == 0 {
        return 0;
    }
    request.read_obj::<InitIn2>().map_or(0, |ext| ext.flags2)
}

/// FUSE_SECURITY_CTX (bit 32), in `flags2`.
const SECURITY_CTX_FLAGS2: u32 = 1;
/// FUSE_DIRECT_IO_ALLOW_MMAP (bit 36), in `flags2`.
const DIRECT_IO_ALLOW_MMAP_FLAGS2: u32 = 1 << (36 - 32);
/// FUSE_HAS_FSNOTIFY (bit 44), in `flags2`: the guest raises fsnotify events on
/// FUSE_NOTIFY_FSNOTIFY (qemu/patches/linux-6.12/0002; docs/notify-patches.md). Not a
/// mainline flag: the next bit after those Linux 7.3 uses.
const HAS_FSNOTIFY_FLAGS2: u32 = 1 << (44 - 32);
/// The first protocol minor whose `fuse_init_out` holds `flags2` (7.23 made it 64 bytes).
const INIT_OUT_FLAGS2_MINOR: u32 = 23;
/// Where `flags` and `flags2` sit in an INIT reply: after the 16-byte `fuse_out_header`.
const INIT_REPLY_FLAGS_AT: usize = 16 + 12;
const INIT_REPLY_FLAGS2_AT: usize = 16 + 32;

/// Add `flags2` (and INIT_EXT, without which the guest ignores `flags2`) to the successful
/// INIT reply of `len` bytes the server wrote into `chain`'s writable buffers.
fn agree_init_flags2(mem: &GuestMemoryMmap, chain: &Chain, len: usize, flags2: u32) {
    if len < INIT_REPLY_FLAGS2_AT + 4 {
        return; // an error reply, or one for an older protocol minor
    }
    let mut error = [0u8; 4];
    if !reply_bytes(mem, chain, 4, &mut error, false) || error != [0; 4] {
        return;
    }
    for (at, bits) in [
        (INIT_REPLY_FLAGS_AT, INIT_EXT),
        (INIT_REPLY_FLAGS2_AT, flags2),
    ] {
        let mut word = [0u8; 4];
        if reply_bytes(mem, chain, at, &mut word, false) {
            word = (u32::from_le_bytes(word) | bits).to_le_bytes();
            reply_bytes(mem, chain, at, &mut word, true);
        }
    }
}

/// Read (or, with `write`, write) `buf` at byte `offset` of `chain`'s device-writable buffers,
/// taken in order as one reply; false if they are too short.
fn reply_bytes(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    mut offset: usize,
    buf: &mut [u8],
    write: bool,
) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let mut done = 0;
    for desc in chain.clone().filter(|d| d.is_write_only()) {
        let len = desc.len() as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(buf.len() - done);
        let addr = GuestAddress(desc.addr().0 + offset as u64);
        let part = &mut buf[done..done + n];
        let ok = if write {
            mem.write_slice(part, addr).is_ok()
        } else {
            mem.read_slice(part, addr).is_ok()
        };
        if !ok {
            return false;
        }
        done += n;
        offset = 0;
        if done == buf.len() {
            return true;
        }
    }
    false
}

/// The header through a [`Reader`]: for a header split across buffers.
fn read_header(mem: &GuestMemoryMmap, chain: &Chain) -> Option<InHeader> {
    Reader::from_descriptor_chain(mem, chain.clone())
        .ok()?
        .read_obj()
        .ok()
}

fn refused_on_readonly(header: &InHeader, mut body: Reader<'_, ()>) -> bool {
    if MODIFYING_OPCODES.contains(&header.opcode) {
        return true;
    }
    if header.opcode == opcode::OPEN {
        // Skip the header the clone still holds, then look at the open flags.
        let _ = body.read_obj::<InHeader>();
        if let Ok(open) = body.read_obj::<OpenIn>() {
            let flags = open.flags as i32;
            return flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        }
    }
    false
}

/// Write a reply: `fuse_out_header`, then the payload of a successful one.
/// A READDIR or READDIRPLUS reply, encoded in one buffer and written to the guest once: the
/// crate's server writes each entry into the guest's buffers in three or four writes, each
/// walking and allocating a list of buffer slices (about 1,600 instructions per entry).
struct DirReply {
    buf: Vec<u8>,
    max: usize,
}

impl DirReply {
    fn new(max: usize) -> Self {
        DirReply {
            buf: Vec::with_capacity(max),
            max,
        }
    }

    /// Append `d` (with its entry for READDIRPLUS): `fuse_entry_out`, then `fuse_dirent` and
    /// the name padded to 8 bytes. Returns the bytes added, 0 when it does not fit (the
    /// listing stops there, and the filesystem takes back the lookup it counted for it).
    fn add(&mut self, d: DirEntry, entry: Option<Entry>) -> usize {
        let dirent_len = size_of::<Dirent>() + d.name.len();
        let padded = (dirent_len + 7) & !7;
        let total = padded + entry.map_or(0, |_| size_of::<EntryOut>());
        if self.max.saturating_sub(self.buf.len()) < total {
            return 0;
        }
        if let Some(entry) = entry {
            self.buf.extend_from_slice(EntryOut::from(entry).as_slice());
        }
        let dirent = Dirent {
            ino: d.ino,
            off: d.offset,
            namelen: d.name.len() as u32,
            type_: d.type_,
        };
        self.buf.extend_from_slice(dirent.as_slice());
        self.buf.extend_from_slice(d.name);
        self.buf.resize(self.buf.len() + padded - dirent_len, 0);
        total
    }
}

fn reply(mut writer: VirtioFsWriter<'_, ()>, unique: u64, result: LocalReply) -> u32 {
    let (error, payload) = match result {
        Ok(payload) => (0, payload),
        Err(errno) => (-errno, Vec::new()),
    };
    let header = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + payload.len()) as u32,
        error,
        unique,
    };
    let written = writer
        .write_obj(header)
        .and_then(|_| writer.write_all(&payload))
        .and_then(|_| writer.flush());
    match written {
        Ok(()) => header.len,
        Err(e) => {
            warn!("reply to request {unique} does not fit the guest's buffer: {e}");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &[u8], off: u64) -> DirEntry<'_> {
        DirEntry {
            ino: 42,
            offset: off,
            type_: libc::DT_REG as u32,
            name,
        }
    }

    /// The layout the guest's fuse_parse_dirfile/parse_dirplusfile read: for READDIRPLUS a
    /// 128-byte fuse_entry_out, then a 24-byte fuse_dirent, the name and zeros to 8 bytes;
    /// an entry that does not fit whole is refused and nothing of it is written.
    #[test]
    fn dir_reply_lays_out_entries_and_stops_at_the_limit() {
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<Dirent>(), 24);
        let mut plain = DirReply::new(64);
        assert_eq!(plain.add(entry(b"abc", 1), None), 32);
        assert_eq!(plain.add(entry(b"12345678", 2), None), 32);
        assert_eq!(plain.add(entry(b"x", 3), None), 0, "64 bytes are full");
        assert_eq!(plain.buf.len(), 64);
        assert_eq!(&plain.buf[0..8], &42u64.to_ne_bytes());
        assert_eq!(&plain.buf[8..16], &1u64.to_ne_bytes());
        assert_eq!(&plain.buf[16..20], &3u32.to_ne_bytes());
        assert_eq!(&plain.buf[24..32], b"abc\0\0\0\0\0");
        assert_eq!(&plain.buf[56..64], b"12345678");

        let mut plus = DirReply::new(4096);
        let mut e = Entry {
            inode: 7,
            entry_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        };
        e.attr.st_ino = 42;
        assert_eq!(plus.add(entry(b"f", 5), Some(e)), 128 + 32);
        assert_eq!(
            &plus.buf[0..8],
            &7u64.to_ne_bytes(),
            "fuse_entry_out.nodeid"
        );
        assert_eq!(&plus.buf[16..24], &1u64.to_ne_bytes(), "entry_valid");
        assert_eq!(&plus.buf[128..136], &42u64.to_ne_bytes(), "fuse_dirent.ino");
        assert_eq!(&plus.buf[152..160], b"f\0\0\0\0\0\0\0");
        let mut tight = DirReply::new(128 + 31);
        assert_eq!(tight.add(entry(b"f", 5), Some(e)), 0);
        assert!(tight.buf.is_empty());
    }
}
