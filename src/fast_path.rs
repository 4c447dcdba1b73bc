//! The commonest small requests served straight from their descriptor chain: GETATTR, LOOKUP,
//! FORGET, OPEN, CREATE, READ, FLUSH, RELEASE and UNLINK.
//!
//! fuse-backend-rs's `Server` wants a `Reader` and a `Writer` for every request: each walks
//! the chain and allocates a list of 64 buffer slices, and the reply goes out in several
//! writes through them. Here the chain is walked once into two short lists on the stack, the
//! request (a header, fixed arguments and at most one name) is copied out of the guest once
//! and the reply is encoded in one stack buffer and copied in once (READ's data goes straight
//! from the file into the guest's buffers with one `preadv`, as through the crate).
//!
//! Only well-formed requests are served here, each exactly as the crate's server serves it
//! (same filesystem call, same reply bytes, same length). Anything else (a request longer
//! than [`MAX_REQUEST`], arguments shorter than their opcode's, a name without its NUL, a
//! chain with more than [`MAX_BUFFERS`] buffers on a side or one outside guest memory, reply
//! buffers too short for the reply) is left to the general path before any filesystem work
//! is done, so the guest sees the answer (or the silence) it always did.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{
    AttrOut, CreateIn, EntryOut, FlushIn, ForgetIn, GetattrIn, InHeader, OpenIn, OpenOut,
    OutHeader, ReadIn, ReleaseIn, GETATTR_FH, READ_LOCKOWNER, RELEASE_FLOCK_UNLOCK, RELEASE_FLUSH,
};
use fuse_backend_rs::api::filesystem::{Context, FileSystem, ZeroCopyWriter};
use fuse_backend_rs::file_buf::FileVolatileSlice;
use fuse_backend_rs::file_traits::FileReadWriteVolatile;
use vm_memory::{ByteValued, GuestMemory, GuestMemoryMmap, VolatileSlice};

use crate::filesystem::Fs;
use crate::fuse::opcode;
use crate::queue::Chain;

/// Most guest buffers a request or its reply may span here (a Linux guest uses two each).
const MAX_BUFFERS: usize = 8;
/// Most request bytes served here: the header, the largest fixed arguments (CREATE's) and a
/// name of up to FUSE_NAME_MAX (1,024) bytes with its NUL.
pub const MAX_REQUEST: usize = size_of::<InHeader>() + size_of::<CreateIn>() + 1025;
/// Request bodies up to this long are copied into a buffer of this size.
const SHORT_BODY: usize = 64;
/// The largest reply encoded here: CREATE's.
const MAX_REPLY: usize = size_of::<OutHeader>() + size_of::<EntryOut>() + size_of::<OpenOut>();

/// What INIT agreed that changes how requests here are answered.
#[derive(Clone, Copy, Debug)]
pub struct Agreed {
    /// The export is read-only: OPEN, CREATE and UNLINK are left to the general path, which
    /// refuses what would change the share.
    pub readonly: bool,
    /// FUSE_SECURITY_CTX is agreed: CREATE carries an extension for the general path to read.
    pub security_ctx: bool,
    /// The guest's protocol minor is 4 or later: a LOOKUP may answer node id 0 (a negative
    /// entry); before, the crate's server turns it into ENOENT.
    pub negative_entries: bool,
}

/// One side (readable or writable) of a descriptor chain, in order.
struct Buffers<'m> {
    slices: [Option<VolatileSlice<'m>>; MAX_BUFFERS],
    count: usize,
    total: usize,
}

impl<'m> Buffers<'m> {
    fn new() -> Self {
        Buffers {
            slices: [None; MAX_BUFFERS],
            count: 0,
            total: 0,
        }
    }

    /// False when the list is full.
    fn push(&mut self, slice: VolatileSlice<'m>) -> bool {
        if self.count == MAX_BUFFERS {
            return false;
        }
        self.total += slice.len();
        self.slices[self.count] = Some(slice);
        self.count += 1;
        true
    }

    fn iter(&self) -> impl Iterator<Item = &VolatileSlice<'m>> {
        self.slices[..self.count].iter().flatten()
    }

    /// Fill `out` from the buffers' bytes after the first `skip` (the caller checked they
    /// hold that much).
    fn gather(&self, out: &mut [u8], mut skip: usize) {
        let mut done = 0;
        for slice in self.iter() {
            if done == out.len() {
                break;
            }
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            // In bounds: skip < slice.len().
            if let Ok(rest) = slice.offset(skip) {
                done += rest.copy_to(&mut out[done..]);
            }
            skip = 0;
        }
    }

    /// Write `data` from the start of the buffers (the caller checked they hold that much).
    fn scatter(&self, data: &[u8]) {
        let mut done = 0;
        for slice in self.iter() {
            if done == data.len() {
                break;
            }
            let n = slice.len().min(data.len() - done);
            slice.copy_from(&data[done..done + n]);
            done += n;
        }
    }

    /// The buffers' bytes from `skip` on, `count` of them at most, as slices for one vectored
    /// read (empty buffers left out); the array's first `n` are those slices.
    fn window(&self, skip: usize, count: usize) -> ([FileVolatileSlice<'m>; MAX_BUFFERS], usize) {
        let mut out = [FileVolatileSlice::from_volatile_slice(&VolatileSlice::from(&mut [][..]));
            MAX_BUFFERS];
        let (mut skip, mut left, mut n) = (skip, count, 0);
        for slice in self.iter() {
            if left == 0 {
                break;
            }
            if skip >= slice.len() {
                skip -= slice.len();
                continue;
            }
            let take = (slice.len() - skip).min(left);
            // In bounds: skip + take <= slice.len().
            if let Ok(part) = slice.subslice(skip, take) {
                out[n] = FileVolatileSlice::from_volatile_slice(&part);
                n += 1;
                left -= take;
            }
            skip = 0;
        }
        (out, n)
    }
}

/// READ's data: the writable buffers after the out header, filled from the file in place.
struct ReadData<'b, 'm> {
    buffers: &'b Buffers<'m>,
    /// Bytes of the buffers used so far, the out header's included.
    used: usize,
}

impl ZeroCopyWriter for ReadData<'_, '_> {
    fn write_from(
        &mut self,
        f: &mut dyn FileReadWriteVolatile,
        count: usize,
        off: u64,
    ) -> io::Result<usize> {
        // As the crate's writer: no more than the buffers hold.
        if count > self.available_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data out of range",
            ));
        }
        let (slices, n) = self.buffers.window(self.used, count);
        if n == 0 {
            return Ok(0);
        }
        let read = f.read_vectored_at_volatile(&slices[..n], off)?;
        self.used += read;
        Ok(read)
    }

    fn available_bytes(&self) -> usize {
        self.buffers.total - self.used
    }
}

impl io::Write for ReadData<'_, '_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let (slices, n) = self.buffers.window(self.used, data.len());
        let mut done = 0;
        for slice in &slices[..n] {
            let part = &data[done..done + slice.len()];
            slice.as_volatile_slice().copy_from(part);
            done += part.len();
        }
        self.used += done;
        Ok(done)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fill `readable` and `writable` (empty) with the buffers of `chain`, each side in order (as
/// the crate's `Reader` and `Writer` take them); false when a side has more than
/// [`MAX_BUFFERS`] or a buffer is not inside one region of guest memory. Filled in place:
/// the lists are some 300 bytes each, and returning them cost five copies per request.
fn split<'m>(
    mem: &'m GuestMemoryMmap,
    chain: &Chain,
    readable: &mut Buffers<'m>,
    writable: &mut Buffers<'m>,
) -> bool {
    for desc in chain.clone() {
        let Ok(slice) = mem.get_slice(desc.addr(), desc.len() as usize) else {
            return false;
        };
        let side = if desc.is_write_only() {
            &mut *writable
        } else {
            &mut *readable
        };
        if !side.push(slice) {
            return false;
        }
    }
    true
}

/// The fixed arguments of an opcode served here, and its longest reply.
fn shape(op: u32, agreed: Agreed) -> Option<(usize, usize)> {
    const OUT: usize = size_of::<OutHeader>();
    let modifies = matches!(op, opcode::OPEN | opcode::CREATE | opcode::UNLINK);
    if (modifies && agreed.readonly) || (op == opcode::CREATE && agreed.security_ctx) {
        return None;
    }
    Some(match op {
        opcode::GETATTR => (size_of::<GetattrIn>(), OUT + size_of::<AttrOut>()),
        opcode::LOOKUP => (0, OUT + size_of::<EntryOut>()),
        opcode::FORGET => (size_of::<ForgetIn>(), 0),
        opcode::OPEN => (size_of::<OpenIn>(), OUT + size_of::<OpenOut>()),
        // The room for its data is checked once the size is known.
        opcode::READ => (size_of::<ReadIn>(), OUT),
        opcode::CREATE => (size_of::<CreateIn>(), MAX_REPLY),
        opcode::FLUSH => (size_of::<FlushIn>(), OUT),
        opcode::RELEASE => (size_of::<ReleaseIn>(), OUT),
        opcode::UNLINK => (0, OUT),
        _ => return None,
    })
}

/// A reply encoded on the stack.
struct Reply {
    buf: [u8; MAX_REPLY],
    len: usize,
}

impl Reply {
    fn new() -> Self {
        Reply {
            buf: [0; MAX_REPLY],
            len: size_of::<OutHeader>(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Fill in the header: the error, or 0 and the payload pushed so far.
    fn finish(&mut self, unique: u64, error: i32) -> &[u8] {
        if error != 0 {
            self.len = size_of::<OutHeader>();
        }
        let header = OutHeader {
            len: self.len as u32,
            error,
            unique,
        };
        self.buf[..size_of::<OutHeader>()].copy_from_slice(header.as_slice());
        &self.buf[..self.len]
    }
}

/// `T` from the start of `bytes`, which may be unaligned; `None` if too short.
fn args<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut t = T::default();
    t.as_mut_slice()
        .copy_from_slice(bytes.get(..size_of::<T>())?);
    Some(t)
}

/// The name at the start of `bytes`, up to its first NUL (as the crate's `bytes_to_cstr`).
fn name(bytes: &[u8]) -> Option<&CStr> {
    CStr::from_bytes_until_nul(bytes).ok()
}

/// The errno a failed request answers, as the crate's server encodes it.
fn errno(e: &io::Error, header: &InHeader) -> i32 {
    match e.raw_os_error() {
        Some(errno) => errno,
        None => {
            log::error!(
                "fuse: reply error to request {}, error {e:?}",
                header.unique
            );
            fuse_backend_rs::encode_io_error_kind(e.kind())
        }
    }
}

/// What [`serve`] did with a chain.
#[derive(Debug)]
pub enum Served {
    /// Answered: the bytes written into the chain.
    Done(u32),
    /// Left to the general path, nothing done; the request's header when it was read here
    /// (`None`: the chain could not be taken apart here, or holds no header).
    Pass(Option<InHeader>),
}

/// Serve `chain` if it is one of the requests served here. The chain is taken apart once,
/// and its header read from it, for both outcomes: a request passed on comes back with its
/// header, so the caller need not read it again.
pub fn serve(fs: &Fs, agreed: Agreed, mem: &GuestMemoryMmap, chain: &Chain) -> Served {
    let (mut readable, mut writable) = (Buffers::new(), Buffers::new());
    if !split(mem, chain, &mut readable, &mut writable) {
        return Served::Pass(None);
    }
    let mut head = [0u8; size_of::<InHeader>()];
    if readable.total < head.len() {
        return Served::Pass(None);
    }
    readable.gather(&mut head, 0);
    let header: InHeader = args(&head).expect("a header's bytes");
    match serve_request(fs, agreed, &readable, &writable, &header) {
        Some(len) => Served::Done(len),
        None => Served::Pass(Some(header)),
    }
}

/// [`serve`] once the header is known.
fn serve_request(
    fs: &Fs,
    agreed: Agreed,
    readable: &Buffers<'_>,
    writable: &Buffers<'_>,
    header: &InHeader,
) -> Option<u32> {
    let (fixed, reply_len) = shape(header.opcode, agreed)?;
    let len = header.len as usize;
    let head = size_of::<InHeader>();
    if len > MAX_REQUEST || len < head + fixed {
        return None;
    }
    if readable.total < len || writable.total < reply_len {
        return None;
    }
    // The body after the header, copied out once; a short one (fixed arguments, a short
    // name) without zeroing the room for a long name.
    let mut short = [0u8; SHORT_BODY];
    let mut long: [u8; MAX_REQUEST - size_of::<InHeader>()];
    let body: &mut [u8] = if len - head <= SHORT_BODY {
        &mut short[..len - head]
    } else {
        long = [0; MAX_REQUEST - size_of::<InHeader>()];
        &mut long[..len - head]
    };
    readable.gather(body, head);
    let body = &*body;

    let ctx = Context::from(header);
    let node = header.nodeid;
    let mut reply = Reply::new();
    let result = match header.opcode {
        opcode::GETATTR => {
            let a: GetattrIn = args(body)?;
            let handle = (a.flags & GETATTR_FH != 0).then_some(a.fh);
            fs.getattr(&ctx, node, handle).map(|(st, timeout)| {
                let out = AttrOut {
                    attr_valid: timeout.as_secs(),
                    attr_valid_nsec: timeout.subsec_nanos(),
                    dummy: 0,
                    attr: st.into(),
                };
                reply.push(out.as_slice());
            })
        }
        opcode::LOOKUP => {
            let name = name(body)?;
            match fs.lookup(&ctx, node, name) {
                Ok(entry) if entry.inode == 0 && !agreed.negative_entries => {
                    Err(io::Error::from_raw_os_error(libc::ENOENT))
                }
                Ok(entry) => {
                    reply.push(EntryOut::from(entry).as_slice());
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        opcode::FORGET => {
            let a: ForgetIn = args(body)?;
            fs.forget(&ctx, node, a.nlookup);
            // No reply.
            return Some(0);
        }
        opcode::OPEN => {
            let a: OpenIn = args(body)?;
            fs.open(&ctx, node, a.flags, a.fuse_flags)
                .map(|(handle, options, passthrough)| {
                    let out = OpenOut {
                        fh: handle.unwrap_or(0),
                        open_flags: options.bits(),
                        passthrough: passthrough.unwrap_or_default(),
                    };
                    reply.push(out.as_slice());
                })
        }
        opcode::READ => {
            let a: ReadIn = args(body)?;
            // A guest always offers room for the whole size; the crate's server answers a
            // READ of nothing, or of more than the buffers hold, in its own ways.
            let size = a.size as usize;
            if size == 0 || writable.total - size_of::<OutHeader>() < size {
                return None;
            }
            let owner = (a.read_flags & READ_LOCKOWNER != 0).then_some(a.lock_owner);
            let mut data = ReadData {
                buffers: writable,
                used: size_of::<OutHeader>(),
            };
            match fs.read(
                &ctx, node, a.fh, &mut data, a.size, a.offset, owner, a.flags,
            ) {
                Ok(count) => {
                    // The data is in place: only the header is left to write.
                    let header = OutHeader {
                        len: (size_of::<OutHeader>() + count) as u32,
                        error: 0,
                        unique: header.unique,
                    };
                    writable.scatter(header.as_slice());
                    return Some(header.len);
                }
                Err(e) => Err(e),
            }
        }
        opcode::CREATE => {
            let a: CreateIn = args(body)?;
            let name = name(&body[size_of::<CreateIn>()..])?;
            fs.create(&ctx, node, name, a)
                .map(|(entry, handle, options, passthrough)| {
                    let open = OpenOut {
                        fh: handle.unwrap_or(0),
                        open_flags: options.bits(),
                        passthrough: passthrough.unwrap_or_default(),
                    };
                    // As the crate's server: no attribute flags in CREATE's entry.
                    let out = EntryOut {
                        attr: entry.attr.into(),
                        ..EntryOut::from(entry)
                    };
                    reply.push(out.as_slice());
                    reply.push(open.as_slice());
                })
        }
        opcode::FLUSH => {
            let a: FlushIn = args(body)?;
            fs.flush(&ctx, node, a.fh, a.lock_owner)
        }
        opcode::RELEASE => {
            let a: ReleaseIn = args(body)?;
            let flush = a.release_flags & RELEASE_FLUSH != 0;
            let flock_release = a.release_flags & RELEASE_FLOCK_UNLOCK != 0;
            let owner = (flush || flock_release).then_some(a.lock_owner);
            fs.release(&ctx, node, a.flags, a.fh, flush, flock_release, owner)
        }
        opcode::UNLINK => {
            let name = name(body)?;
            fs.unlink(&ctx, node, name)
        }
        _ => return None,
    };
    let error = match &result {
        Ok(()) => 0,
        Err(e) => -errno(e, header),
    };
    let bytes = reply.finish(header.unique, error);
    writable.scatter(bytes);
    Some(bytes.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    use fuse_backend_rs::abi::fuse_abi::FsOptions;
    use fuse_backend_rs::api::server::Server;
    use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};

    use crate::fuse::FuseDispatcher;
    use crate::passthrough::{CachePolicy, Config, PassthroughFs};
    use crate::queue::test_ring::Ring;

    const AGREED: Agreed = Agreed {
        readonly: false,
        security_ctx: false,
        negative_entries: true,
    };
    /// A request and its reply in one buffer each, as leasefs's frontend sends them.
    const PLAIN: &[(u32, bool)] = &[(4096, false), (4096, true)];

    /// A scratch share holding one file, `f`, served by a filesystem and the crate's server.
    struct Share {
        dir: PathBuf,
        fs: Arc<Fs>,
        server: Server<Arc<Fs>>,
    }

    impl Share {
        fn new(cache: CachePolicy) -> Share {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "leasefs-fast-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("f"), b"data").unwrap();
            let fs = Arc::new(
                PassthroughFs::new(Config {
                    root_dir: dir.clone(),
                    cache,
                    entry_timeout: std::time::Duration::from_secs(5),
                    ..Config::default()
                })
                .unwrap(),
            );
            fs.init(FsOptions::all()).unwrap();
            let server = Server::new(fs.clone());
            Share { dir, fs, server }
        }

        /// `opcode` on `node` with argument bytes `body`, as a request.
        fn request(opcode: u32, node: u64, body: &[&[u8]]) -> Vec<u8> {
            let len: usize = size_of::<InHeader>() + body.iter().map(|b| b.len()).sum::<usize>();
            let header = InHeader {
                len: len as u32,
                opcode,
                unique: 7,
                nodeid: node,
                ..Default::default()
            };
            let mut bytes = header.as_slice().to_vec();
            for b in body {
                bytes.extend_from_slice(b);
            }
            bytes
        }

        /// Serve `request` laid out in `buffers` here (`general`: through the crate's server
        /// instead): the length the server returned and the writable buffers' contents, or
        /// `None` when this path passed the request on.
        fn serve(
            &self,
            agreed: Agreed,
            request: &[u8],
            buffers: &[(u32, bool)],
            general: bool,
        ) -> Option<(u32, Vec<u8>)> {
            let mut ring = Ring::new();
            ring.offer(0, buffers, request);
            let mut len = None;
            ring.serve(|mem, chain| {
                len = if general {
                    let reader = Reader::from_descriptor_chain(&**mem, chain.clone()).unwrap();
                    let writer = VirtioFsWriter::new(&**mem, chain).unwrap();
                    let served =
                        self.server
                            .handle_message(reader, Writer::VirtioFs(writer), None, None);
                    Some(served.map_or(0, |n| n as u32))
                } else {
                    match serve(&self.fs, agreed, mem, &chain) {
                        Served::Done(len) => Some(len),
                        Served::Pass(header) => {
                            // The header handed back is the one the general path reads.
                            if let Some(header) = header {
                                let peeked = FuseDispatcher::peek_header(mem, &chain);
                                assert_eq!(
                                    Some(header.as_slice()),
                                    peeked.as_ref().map(|h| h.as_slice())
                                );
                            }
                            None
                        }
                    }
                };
                len.unwrap_or(0)
            });
            let room = buffers.iter().filter(|b| b.1).map(|b| b.0 as usize).sum();
            len.map(|len| (len, ring.written(0, buffers, room)))
        }

        /// Serve `request` both ways: the replies must be the same bytes.
        fn same(&self, request: &[u8], buffers: &[(u32, bool)]) -> (u32, Vec<u8>) {
            let fast = self.serve(AGREED, request, buffers, false).expect("served");
            let general = self.serve(AGREED, request, buffers, true).unwrap();
            assert_eq!(fast, general, "request {:?}", &request[..8]);
            fast
        }
    }

    impl Drop for Share {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn reply_error(reply: &(u32, Vec<u8>)) -> i32 {
        let mut header = OutHeader::default();
        header
            .as_mut_slice()
            .copy_from_slice(&reply.1[..size_of::<OutHeader>()]);
        assert_eq!(header.len, reply.0);
        assert_eq!(header.unique, 7);
        -header.error
    }

    fn lookup(name: &[u8]) -> Vec<u8> {
        Share::request(opcode::LOOKUP, 1, &[name])
    }

    #[test]
    fn replies_match_the_crate_servers_byte_for_byte() {
        let share = Share::new(CachePolicy::Auto);
        let getattr = |node: u64, flags: u32, fh: u64| {
            let args = GetattrIn {
                flags,
                dummy: 0,
                fh,
            };
            Share::request(opcode::GETATTR, node, &[args.as_slice()])
        };
        let root = share.same(&getattr(1, 0, 0), PLAIN);
        assert_eq!((reply_error(&root), root.0), (0, 16 + 104));
        // A handle the guest does not hold: the node's own attributes.
        share.same(&getattr(1, GETATTR_FH, 99), PLAIN);
        assert_eq!(
            reply_error(&share.same(&getattr(999, 0, 0), PLAIN)),
            libc::EBADF
        );

        let found = share.same(&lookup(b"f\0"), PLAIN);
        assert_eq!((reply_error(&found), found.0), (0, 16 + 128));
        assert_eq!(
            reply_error(&share.same(&lookup(b"nothing\0"), PLAIN)),
            libc::ENOENT
        );
        // Padding after the NUL, as the kernel may send, and a request and reply split
        // across buffers the way a Linux guest lays them out (header, arguments).
        share.same(&lookup(b"f\0\0\0\0\0"), PLAIN);
        let split = [(40, false), (2, false), (16, true), (128, true)];
        share.same(&lookup(b"f\0"), &split);
        share.same(
            &lookup(b"f\0"),
            &[(3, false), (39, false), (7, true), (200, true)],
        );
        // A name longer than a short body, and the longest a host filesystem holds.
        for len in [100, 255] {
            let long = "n".repeat(len);
            std::fs::write(share.dir.join(&long), b"").unwrap();
            let found = share.same(&lookup(format!("{long}\0").as_bytes()), PLAIN);
            assert_eq!(reply_error(&found), 0);
        }

        // CREATE, then the same exclusive CREATE again, OPEN, FLUSH, RELEASE, UNLINK.
        let create_args = CreateIn {
            flags: (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let create = Share::request(opcode::CREATE, 1, &[create_args.as_slice(), b"new\0"]);
        let created = share.serve(AGREED, &create, PLAIN, false).unwrap();
        assert_eq!((reply_error(&created), created.0), (0, 16 + 128 + 16));
        assert!(share.dir.join("new").exists());
        let mut entry = EntryOut::default();
        entry.as_mut_slice().copy_from_slice(&created.1[16..144]);
        let mut open = OpenOut::default();
        open.as_mut_slice().copy_from_slice(&created.1[144..160]);
        assert_eq!(reply_error(&share.same(&create, PLAIN)), libc::EEXIST);

        let flush_args = FlushIn {
            fh: open.fh,
            ..Default::default()
        };
        let flush = Share::request(opcode::FLUSH, entry.nodeid, &[flush_args.as_slice()]);
        assert_eq!(reply_error(&share.same(&flush, PLAIN)), 0);
        let release_args = ReleaseIn {
            fh: open.fh,
            flags: libc::O_WRONLY as u32,
            ..Default::default()
        };
        let release = Share::request(opcode::RELEASE, entry.nodeid, &[release_args.as_slice()]);
        let released = share.serve(AGREED, &release, PLAIN, false).unwrap();
        assert_eq!((reply_error(&released), released.0), (0, 16));
        assert_eq!(reply_error(&share.same(&release, PLAIN)), libc::EBADF);
        assert_eq!(reply_error(&share.same(&flush, PLAIN)), libc::EBADF);

        let open_args = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let open_new = Share::request(opcode::OPEN, entry.nodeid, &[open_args.as_slice()]);
        let opened = share.serve(AGREED, &open_new, PLAIN, false).unwrap();
        assert_eq!((reply_error(&opened), opened.0), (0, 16 + 16));
        let open_none = Share::request(opcode::OPEN, 999, &[open_args.as_slice()]);
        assert_eq!(reply_error(&share.same(&open_none, PLAIN)), libc::EBADF);

        let unlink = Share::request(opcode::UNLINK, 1, &[b"new\0"]);
        let unlinked = share.serve(AGREED, &unlink, PLAIN, false).unwrap();
        assert_eq!((reply_error(&unlinked), unlinked.0), (0, 16));
        assert!(!share.dir.join("new").exists());
        assert_eq!(reply_error(&share.same(&unlink, PLAIN)), libc::ENOENT);

        // FORGET has no reply.
        let forget = ForgetIn { nlookup: 1 };
        let forget = Share::request(opcode::FORGET, entry.nodeid, &[forget.as_slice()]);
        assert_eq!(share.same(&forget, PLAIN).0, 0);
    }

    /// READ's data lands in the guest's buffers after the header, wherever they split, as
    /// the crate's server puts it; an unknown handle is EBADF; a READ of nothing or of more
    /// than the buffers hold is passed on.
    #[test]
    fn reads_fill_the_buffers_as_the_crate_does() {
        let share = Share::new(CachePolicy::Auto);
        std::fs::write(share.dir.join("f"), b"0123456789abcdef").unwrap();
        share.same(&lookup(b"f\0"), PLAIN);
        let mut entry = EntryOut::default();
        let found = share.serve(AGREED, &lookup(b"f\0"), PLAIN, false).unwrap();
        entry.as_mut_slice().copy_from_slice(&found.1[16..144]);
        let open_args = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        let open = Share::request(opcode::OPEN, entry.nodeid, &[open_args.as_slice()]);
        let opened = share.serve(AGREED, &open, PLAIN, false).unwrap();
        let fh = u64::from_ne_bytes(opened.1[16..24].try_into().unwrap());
        let read = |fh: u64, offset: u64, size: u32| {
            let args = ReadIn {
                fh,
                offset,
                size,
                ..Default::default()
            };
            Share::request(opcode::READ, entry.nodeid, &[args.as_slice()])
        };
        let whole = share.same(&read(fh, 0, 4000), PLAIN);
        assert_eq!(whole.0, 16 + 16);
        assert_eq!(&whole.1[16..32], b"0123456789abcdef");
        // The header split, the data over three buffers, and a read short of the end.
        let split = [(80, false), (10, true), (9, true), (3, true), (4096, true)];
        let part = share.same(&read(fh, 2, 12), &split);
        assert_eq!(part.0, 16 + 12);
        assert_eq!(&part.1[16..28], b"23456789abcd");
        share.same(&read(fh, 10, 100), &split);
        assert_eq!(
            reply_error(&share.same(&read(fh + 1, 0, 16), PLAIN)),
            libc::EBADF
        );

        for (request, buffers) in [(read(fh, 0, 0), PLAIN), (read(fh, 0, 4096), PLAIN)] {
            assert_eq!(share.serve(AGREED, &request, buffers, false), None);
        }
    }

    /// With `--cache always` a missing name is a negative entry (node id 0) the guest may
    /// cache, unless its protocol minor is older than 4 (then ENOENT, as the crate's server).
    #[test]
    fn negative_entries_follow_the_protocol_minor() {
        let share = Share::new(CachePolicy::Always);
        let negative = share.same(&lookup(b"nothing\0"), PLAIN);
        assert_eq!((reply_error(&negative), negative.0), (0, 16 + 128));
        assert_eq!(&negative.1[16..24], &[0; 8], "node id 0");
        let old = Agreed {
            negative_entries: false,
            ..AGREED
        };
        let refused = share
            .serve(old, &lookup(b"nothing\0"), PLAIN, false)
            .unwrap();
        assert_eq!(reply_error(&refused), libc::ENOENT);
    }

    /// What is not a well-formed request of an opcode served here goes to the general path
    /// untouched: nothing is done and nothing written.
    #[test]
    fn anything_unusual_is_passed_on_untouched() {
        let share = Share::new(CachePolicy::Auto);
        let passed = |agreed: Agreed, request: &[u8], buffers: &[(u32, bool)]| {
            let served = share.serve(agreed, request, buffers, false);
            assert_eq!(served.map(|r| r.0), None, "request {:?}", &request[..8]);
        };
        // A name without its NUL; a header longer than the readable buffers; arguments
        // shorter than the opcode's; a reply buffer too short for the reply.
        passed(AGREED, &lookup(b"f"), PLAIN);
        let mut long = lookup(b"f\0");
        long[0] = 43;
        passed(AGREED, &long, &[(42, false), (4096, true)]);
        passed(
            AGREED,
            &Share::request(opcode::GETATTR, 1, &[&[0; 8]]),
            PLAIN,
        );
        passed(AGREED, &lookup(b"f\0"), &[(42, false), (143, true)]);
        // A request longer than served here, and more buffers than served here.
        let name = vec![b'x'; MAX_REQUEST];
        passed(AGREED, &lookup(&name), PLAIN);
        let mut many = vec![(4, false); 11];
        many.push((4096, true));
        passed(AGREED, &lookup(b"f\0"), &many);
        // Opcodes served elsewhere; changes on a read-only export; CREATE carrying a security
        // context.
        passed(AGREED, &Share::request(opcode::STATFS, 1, &[]), PLAIN);
        let readonly = Agreed {
            readonly: true,
            ..AGREED
        };
        passed(
            readonly,
            &Share::request(opcode::UNLINK, 1, &[b"f\0"]),
            PLAIN,
        );
        let labelled = Agreed {
            security_ctx: true,
            ..AGREED
        };
        let create = Share::request(opcode::CREATE, 1, &[CreateIn::default().as_slice(), b"g\0"]);
        passed(labelled, &create, PLAIN);
        assert!(share.dir.join("f").exists() && !share.dir.join("g").exists());
    }
}
