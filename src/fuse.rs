//! FUSE dispatch: decode one request chain, route it, write the reply into the same chain.
//!
//! fuse-backend-rs's `Server` decodes the FUSE protocol and drives the passthrough filesystem.
//! This layer sits in front of it for what the daemon decides before any filesystem code runs:
//! refusing writes on a read-only export, and the opcodes the crate's server does not route.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;

use fuse_backend_rs::abi::fuse_abi::{InHeader, OpenIn, OutHeader};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use log::{debug, warn};
use vm_memory::GuestMemoryMmap;

use crate::filesystem::Fs;
use crate::queue::Chain;

/// FUSE opcodes this layer looks at (linux/include/uapi/linux/fuse.h).
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const SETATTR: u32 = 4;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const WRITE: u32 = 16;
    pub const SETXATTR: u32 = 21;
    pub const REMOVEXATTR: u32 = 24;
    pub const SETLKW: u32 = 33;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
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

/// Routes FUSE requests from any queue to the filesystem.
pub struct FuseDispatcher {
    server: Server<Fs>,
    readonly: bool,
    /// The shared directory, kept open so SYNCFS can reach its filesystem after the sandbox
    /// has hidden every other path.
    root: File,
}

impl FuseDispatcher {
    pub fn new(fs: Fs, root: File, readonly: bool) -> Self {
        FuseDispatcher {
            server: Server::new(fs),
            readonly,
            root,
        }
    }

    /// Whether serving this chain may wait on other processes for unbounded time (a blocking
    /// lock request), so it must not run on a queue's own thread.
    pub fn may_block(&self, mem: &GuestMemoryMmap, chain: &Chain) -> bool {
        peek_header(mem, chain).is_some_and(|h| h.opcode == opcode::SETLKW)
    }

    /// Answer a chain with an error without running it (used when too many requests are
    /// already blocked).
    pub fn refuse_chain(&self, mem: &GuestMemoryMmap, chain: Chain, errno: i32) -> u32 {
        match (peek_header(mem, &chain), VirtioFsWriter::new(mem, chain)) {
            (Some(header), Ok(writer)) => reply(writer, header.unique, Err(errno)),
            _ => 0,
        }
    }

    /// Serve one descriptor chain; returns how many bytes were written into it.
    pub fn handle_chain(&self, mem: &GuestMemoryMmap, chain: Chain) -> u32 {
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
        let header: InHeader = match reader.clone().read_obj() {
            Ok(h) => h,
            Err(e) => {
                warn!("dropping request: too short for a FUSE header: {e}");
                return 0;
            }
        };
        if let Some(result) = self.handle_locally(&header, &reader) {
            return reply(writer, header.unique, result);
        }
        match self
            .server
            .handle_message(reader, Writer::VirtioFs(writer), None, None)
        {
            Ok(len) => len as u32,
            Err(e) => {
                debug!("request {} (opcode {}): {e}", header.unique, header.opcode);
                0
            }
        }
    }

    /// Requests answered before the filesystem sees them: `Some(Ok(()))` for an empty success
    /// reply, `Some(Err(errno))` for an error reply, `None` to pass through.
    fn handle_locally(
        &self,
        header: &InHeader,
        request: &Reader<'_, ()>,
    ) -> Option<Result<(), i32>> {
        if self.readonly && refused_on_readonly(header, request.clone()) {
            return Some(Err(libc::EROFS));
        }
        match header.opcode {
            opcode::SYNCFS => Some(self.syncfs()),
            opcode::LOOKUP if header.nodeid == ROOT_ID && looks_up_parent(request.clone()) => {
                // The share's root has no parent the guest may see. The passthrough allows
                // ".." lookups (for NFS export), which with `--sandbox none` would leave the
                // share; a Linux guest never sends this, so only a hostile one gets ENOENT.
                Some(Err(libc::ENOENT))
            }
            _ => None,
        }
    }

    fn syncfs(&self) -> Result<(), i32> {
        // SAFETY: syncfs takes any open descriptor and touches no memory of ours.
        if unsafe { libc::syncfs(self.root.as_raw_fd()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        }
    }
}

fn peek_header(mem: &GuestMemoryMmap, chain: &Chain) -> Option<InHeader> {
    Reader::from_descriptor_chain(mem, chain.clone())
        .ok()?
        .read_obj()
        .ok()
}

/// The FUSE node id of the share's root.
const ROOT_ID: u64 = 1;

fn looks_up_parent(mut body: Reader<'_, ()>) -> bool {
    let _ = body.read_obj::<InHeader>();
    let mut name = [0u8; 3];
    matches!(body.read(&mut name), Ok(n) if n >= 2 && &name[..2] == b".." && (n == 2 || name[2] == 0))
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

/// Write a reply that has no payload: a bare `fuse_out_header`.
fn reply(mut writer: VirtioFsWriter<'_, ()>, unique: u64, result: Result<(), i32>) -> u32 {
    let header = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: result.err().map_or(0, |errno| -errno),
        unique,
    };
    match writer.write_obj(header).and_then(|_| writer.flush()) {
        Ok(()) => header.len,
        Err(e) => {
            warn!("reply to request {unique} does not fit the guest's buffer: {e}");
            0
        }
    }
}
