//! Guest memory: one memfd-backed region shared with the backend, and a small allocator for
//! request and reply buffers inside it.
//!
//! The region is mapped `MAP_SHARED` here and handed to the backend with `SET_MEM_TABLE`
//! (the memfd travels as ancillary data), so both processes see the same pages. Guest
//! physical addresses start at [`GUEST_BASE`], deliberately not 0, so that address 0 and
//! anything past the end are outside guest memory — the hostile tests rely on that.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Guest physical address of the first byte of guest memory.
pub const GUEST_BASE: u64 = 0x4000_0000;

/// Every allocation is aligned to (and rounded up to) this many bytes.
pub const ALLOC_ALIGN: u64 = 64;

/// The guest's RAM: a memfd, mapped once in this process.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    /// Kept open for the lifetime of the mapping; the backend received a duplicate.
    _file: File,
}

impl GuestRam {
    /// Create `size` bytes of zeroed guest memory (rounded up to a page).
    pub fn new(size: u64) -> io::Result<Self> {
        let size = size.div_ceil(4096) * 4096;
        let name: &CStr = c"leasefs-guest-ram";
        // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it touches no
        // other memory of ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(GUEST_BASE),
            size as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;
        Ok(GuestRam {
            mem,
            size,
            _file: file,
        })
    }

    /// The mapping, for reads and writes at guest physical addresses.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        GUEST_BASE + self.size
    }

    /// The region as `SET_MEM_TABLE` describes it (our virtual address, the memfd).
    pub fn region_info(&self) -> io::Result<VhostUserMemoryRegionInfo> {
        let region = self
            .mem
            .iter()
            .next()
            .ok_or_else(|| io::Error::other("no guest memory region"))?;
        VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| io::Error::other(format!("describing guest memory: {e}")))
    }

    /// Our virtual address of a guest physical address (vring addresses are sent this way).
    pub fn host_address(&self, gpa: u64) -> io::Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| io::Error::other(format!("guest address {gpa:#x}: {e}")))
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) -> io::Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|e| io::Error::other(format!("writing guest memory at {gpa:#x}: {e}")))
    }

    pub fn read(&self, gpa: u64, bytes: &mut [u8]) -> io::Result<()> {
        self.mem
            .read_slice(bytes, GuestAddress(gpa))
            .map_err(|e| io::Error::other(format!("reading guest memory at {gpa:#x}: {e}")))
    }
}

/// A buffer in guest memory owned by whoever allocated it; give it back with
/// [`Arena::free`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Usable length (what was asked for, not the rounded size).
    pub len: u32,
}

/// First-fit allocator over one range of guest memory, with coalescing frees.
///
/// Requests in flight are few (at most a queue's worth), so a sorted list of free ranges is
/// small and fast enough, and freed buffers are reused at the same addresses — which keeps
/// the set of guest pages the backend touches bounded.
#[derive(Debug)]
pub struct Arena {
    /// Free ranges `(start, len)`, sorted by start, never adjacent.
    free: Vec<(u64, u64)>,
    start: u64,
    len: u64,
}

impl Arena {
    pub fn new(start: u64, len: u64) -> Self {
        Arena {
            free: vec![(start, len)],
            start,
            len,
        }
    }

    /// A buffer of `len` bytes (at least one allocation unit), or `None` when full.
    pub fn alloc(&mut self, len: u32) -> Option<Buffer> {
        let size = (len as u64).max(1).div_ceil(ALLOC_ALIGN) * ALLOC_ALIGN;
        let i = self.free.iter().position(|&(_, l)| l >= size)?;
        let (addr, free_len) = self.free[i];
        if free_len == size {
            self.free.remove(i);
        } else {
            self.free[i] = (addr + size, free_len - size);
        }
        Some(Buffer { addr, len })
    }

    pub fn free(&mut self, buf: Buffer) {
        let size = (buf.len as u64).max(1).div_ceil(ALLOC_ALIGN) * ALLOC_ALIGN;
        let (addr, end) = (buf.addr, buf.addr + size);
        debug_assert!(addr >= self.start && end <= self.start + self.len);
        let i = self.free.partition_point(|&(s, _)| s < addr);
        let merges_prev = i > 0 && {
            let (s, l) = self.free[i - 1];
            s + l == addr
        };
        let merges_next = i < self.free.len() && self.free[i].0 == end;
        match (merges_prev, merges_next) {
            (true, true) => {
                self.free[i - 1].1 += size + self.free[i].1;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].1 += size,
            (false, true) => self.free[i] = (addr, size + self.free[i].1),
            (false, false) => self.free.insert(i, (addr, size)),
        }
    }

    /// Bytes currently free (for tests and diagnostics).
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_reuses_and_coalesces() {
        let mut a = Arena::new(0x1000, 4096);
        let x = a.alloc(100).unwrap();
        let y = a.alloc(64).unwrap();
        let z = a.alloc(1).unwrap();
        assert_eq!(x.addr, 0x1000);
        assert_eq!(y.addr, 0x1000 + 128);
        assert_eq!(z.addr, 0x1000 + 192);
        a.free(y);
        a.free(x);
        assert_eq!(a.alloc(190).unwrap().addr, 0x1000);
        a.free(Buffer {
            addr: 0x1000,
            len: 190,
        });
        a.free(z);
        assert_eq!(a.free_bytes(), 4096);
        assert_eq!(a.free.len(), 1);
        assert!(a.alloc(4097).is_none());
    }

    #[test]
    fn guest_ram_round_trips() {
        let ram = GuestRam::new(1 << 20).unwrap();
        ram.write(GUEST_BASE + 10, b"hello").unwrap();
        let mut out = [0u8; 5];
        ram.read(GUEST_BASE + 10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(ram.read(GUEST_BASE + (1 << 20), &mut out).is_err());
        let info = ram.region_info().unwrap();
        assert_eq!(info.guest_phys_addr, GUEST_BASE);
        assert_eq!(info.memory_size, 1 << 20);
    }
}
