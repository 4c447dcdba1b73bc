//! mmap, sparse files and SEEK_DATA/SEEK_HOLE, fallocate, O_DIRECT, offsets
//! past 4 GiB, copy_file_range, lseek, the sync family.

use crate::harness::{note, Ctx, TErr, TResult};
use crate::sys::{self, all_bytes, cmp_bytes, expect_errno, pattern, AlignedBuf, Mmap, OpExt};
use crate::{ensure, ensure_eq};
use libc::{
    MAP_PRIVATE, MAP_SHARED, O_RDONLY, O_RDWR, PROT_READ, PROT_WRITE, SEEK_CUR, SEEK_END, SEEK_SET,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

pub fn mmap_shared(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let len = 3 * 4096;
    let fd = sys::create(&p).op("create")?;
    sys::ftruncate(&fd, len as u64).op("ftruncate")?;
    let mut model = vec![0u8; len];
    {
        let mut m =
            Mmap::new(&fd, len, PROT_READ | PROT_WRITE, MAP_SHARED).op("mmap MAP_SHARED")?;
        let d = pattern(20, 5000);
        m.as_mut_slice()[1000..6000].copy_from_slice(&d);
        model[1000..6000].copy_from_slice(&d);
        m.as_mut_slice()[len - 1] = 0xab;
        model[len - 1] = 0xab;
        m.msync(libc::MS_SYNC).op("msync MS_SYNC")?;
        let got = sys::pread_full(&fd, 0, len).op("pread after msync")?;
        cmp_bytes(&got, &model, "read(2) after MAP_SHARED write + msync")?;
        // The other direction: write(2) shows in the mapping.
        sys::pwrite_all(&fd, b"written by pwrite", 8200).op("pwrite")?;
        model[8200..8217].copy_from_slice(b"written by pwrite");
        cmp_bytes(m.as_slice(), &model, "mapping after pwrite")?;
        let fresh = sys::read_file(&p).op("read via fresh open")?;
        cmp_bytes(&fresh, &model, "fresh open while mapped")?;
    }
    drop(fd);
    let fresh = sys::read_file(&p).op("read after munmap+close")?;
    cmp_bytes(&fresh, &model, "fresh open after munmap and close")?;
    ensure_eq!(
        sys::stat(&p).op("stat")?.st_size,
        len as i64,
        "size after mmap writes"
    );
    // Two mappings of the same file see each other's writes.
    let fd = sys::open(&p, O_RDWR, 0).op("reopen")?;
    let mut m1 = Mmap::new(&fd, len, PROT_READ | PROT_WRITE, MAP_SHARED).op("mmap 1")?;
    let m2 = Mmap::new(&fd, len, PROT_READ, MAP_SHARED).op("mmap 2")?;
    m1.as_mut_slice()[42] = 0x5a;
    ensure_eq!(
        m2.as_slice()[42],
        0x5a,
        "byte 42 seen through the second mapping"
    );
    Ok(())
}

pub fn mmap_private(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let len = 2 * 4096;
    sys::write_file(&p, &vec![b'A'; len]).op("create")?;
    let fd = sys::open(&p, O_RDWR, 0).op("open")?;
    {
        let mut m =
            Mmap::new(&fd, len, PROT_READ | PROT_WRITE, MAP_PRIVATE).op("mmap MAP_PRIVATE")?;
        all_bytes(m.as_slice(), b'A', "MAP_PRIVATE initial content")?;
        m.as_mut_slice()[100..5000].fill(b'B');
        ensure_eq!(m.as_slice()[100], b'B', "private mapping after write");
        m.msync(libc::MS_SYNC).op("msync private")?;
        all_bytes(
            &sys::pread_full(&fd, 0, len).op("pread")?,
            b'A',
            "file via read(2) after MAP_PRIVATE write",
        )?;
        all_bytes(
            &sys::read_file(&p).op("fresh read")?,
            b'A',
            "fresh open after MAP_PRIVATE write",
        )?;
    }
    drop(fd);
    all_bytes(
        &sys::read_file(&p).op("read after munmap")?,
        b'A',
        "file after MAP_PRIVATE munmap",
    )?;
    Ok(())
}

pub fn sparse_seek(c: &mut Ctx) -> TResult {
    let p = c.p("sparse");
    let fd = sys::create(&p).op("create")?;
    let data = vec![0xaa_u8; 4096];
    sys::pwrite_all(&fd, &data, MIB).op("pwrite at 1 MiB")?;
    sys::pwrite_all(&fd, &data, 3 * MIB).op("pwrite at 3 MiB")?;
    let size = 3 * MIB + 4096;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size as u64,
        size,
        "sparse file size"
    );
    // Content: zeros in holes, data where written.
    let all = sys::pread_full(&fd, 0, size as usize).op("pread whole")?;
    all_bytes(&all[..MIB as usize], 0, "hole [0,1MiB)")?;
    all_bytes(
        &all[MIB as usize..(MIB + 4096) as usize],
        0xaa,
        "data at 1 MiB",
    )?;
    all_bytes(
        &all[(MIB + 4096) as usize..(3 * MIB) as usize],
        0,
        "hole (1MiB+4K,3MiB)",
    )?;
    all_bytes(&all[(3 * MIB) as usize..], 0xaa, "data at 3 MiB")?;

    let seek = |off: u64, whence: i32, name: &str| -> Result<u64, String> {
        sys::lseek(&fd, off as i64, whence)
            .map(|o| o as u64)
            .op(format!("lseek({off}, {name})"))
    };
    let h0 = seek(0, libc::SEEK_HOLE, "SEEK_HOLE")?;
    let d0 = seek(0, libc::SEEK_DATA, "SEEK_DATA")?;
    if h0 == size {
        // No hole reporting: the whole file is data. Offsets must still
        // be right.
        note("filesystem reports the whole sparse file as data (no SEEK_HOLE support)");
        ensure_eq!(d0, 0, "SEEK_DATA(0) without hole support");
        ensure_eq!(
            seek(MIB + 10, libc::SEEK_DATA, "SEEK_DATA")?,
            MIB + 10,
            "SEEK_DATA in the middle"
        );
        ensure_eq!(
            seek(2 * MIB, libc::SEEK_HOLE, "SEEK_HOLE")?,
            size,
            "SEEK_HOLE(2MiB)"
        );
    } else {
        ensure!(
            h0 < MIB,
            "SEEK_HOLE(0) = {h0}: expected a hole before the data at 1 MiB"
        );
        ensure_eq!(d0, MIB, "SEEK_DATA(0): first data");
        ensure_eq!(
            seek(MIB + 100, libc::SEEK_DATA, "SEEK_DATA")?,
            MIB + 100,
            "SEEK_DATA inside data"
        );
        let h1 = seek(MIB, libc::SEEK_HOLE, "SEEK_HOLE")?;
        ensure!(
            (MIB + 4096..=3 * MIB).contains(&h1),
            "SEEK_HOLE(1MiB) = {h1}: expected the end of the data at 1 MiB + 4 KiB"
        );
        if h1 != MIB + 4096 {
            note(format!("SEEK_HOLE(1MiB) = {h1} (data extent rounded up)"));
        }
        if h1 < 3 * MIB {
            let d1 = seek(h1, libc::SEEK_DATA, "SEEK_DATA")?;
            ensure_eq!(d1, 3 * MIB, "SEEK_DATA after the first data: second data");
        }
        ensure_eq!(
            seek(3 * MIB, libc::SEEK_HOLE, "SEEK_HOLE")?,
            size,
            "SEEK_HOLE(3MiB): end of file"
        );
    }
    expect_errno(
        sys::lseek(&fd, size as i64, libc::SEEK_DATA),
        &[libc::ENXIO],
        "SEEK_DATA at EOF",
    )?;
    expect_errno(
        sys::lseek(&fd, size as i64 + 1, libc::SEEK_HOLE),
        &[libc::ENXIO],
        "SEEK_HOLE past EOF",
    )?;
    // Sparse files need not occupy their size.
    sys::fsync(&fd).op("fsync")?;
    let st = sys::fstat(&fd).op("fstat")?;
    if h0 != size {
        ensure!(
            (st.st_blocks as u64) * 512 < size,
            "sparse file with holes occupies {} blocks (512 B) for {size} bytes",
            st.st_blocks
        );
    }
    Ok(())
}

pub fn fallocate_extend(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::create(&p).op("create")?;
    sys::fallocate(&fd, 0, 0, MIB).op("fallocate mode 0 [0,1MiB)")?;
    let st = sys::fstat(&fd).op("fstat")?;
    ensure_eq!(st.st_size as u64, MIB, "size after fallocate mode 0");
    ensure!(
        (st.st_blocks as u64) * 512 >= MIB,
        "fallocate(1 MiB) allocated only {} blocks",
        st.st_blocks
    );
    all_bytes(
        &sys::pread_full(&fd, 0, MIB as usize).op("pread")?,
        0,
        "fallocated range",
    )?;
    // KEEP_SIZE allocates beyond EOF without changing the size.
    sys::fallocate(&fd, libc::FALLOC_FL_KEEP_SIZE, MIB, MIB).op("fallocate KEEP_SIZE")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size as u64,
        MIB,
        "size after KEEP_SIZE"
    );
    // Extending a file with data keeps the data.
    let q = c.p("g");
    let d = pattern(30, 100);
    sys::write_file(&q, &d).op("create g")?;
    let fd2 = sys::open(&q, O_RDWR, 0).op("open g")?;
    sys::fallocate(&fd2, 0, 50, 1000).op("fallocate [50,1050)")?;
    ensure_eq!(
        sys::fstat(&fd2).op("fstat")?.st_size,
        1050,
        "size after fallocate past EOF"
    );
    let got = sys::pread_full(&fd2, 0, 2000).op("pread")?;
    ensure_eq!(got.len(), 1050, "readable bytes");
    cmp_bytes(&got[..100], &d, "data before fallocated range")?;
    all_bytes(&got[100..], 0, "fallocated tail")?;
    // Writing into the preallocated range works and reads back.
    sys::pwrite_all(&fd, b"inside", 500 * KIB).op("pwrite into fallocated range")?;
    ensure_eq!(
        sys::pread_full(&fd, 500 * KIB, 6).op("pread")?,
        b"inside".to_vec(),
        "write inside fallocated range"
    );
    Ok(())
}

pub fn fallocate_punch(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let len = 64 * KIB as usize;
    sys::write_file(&p, &vec![0xcd; len]).op("create 64 KiB")?;
    let fd = sys::open(&p, O_RDWR, 0).op("open")?;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    sys::fallocate(&fd, mode, 8192, 16384).op("fallocate PUNCH_HOLE [8192,24576)")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size as usize,
        len,
        "size after punch"
    );
    let got = sys::pread_full(&fd, 0, len).op("pread")?;
    all_bytes(&got[..8192], 0xcd, "before punched range")?;
    all_bytes(&got[8192..24576], 0, "punched range")?;
    all_bytes(&got[24576..], 0xcd, "after punched range")?;
    // Unaligned punch zeroes exactly the range.
    sys::fallocate(&fd, mode, 30_000, 5_000).op("fallocate PUNCH_HOLE [30000,35000)")?;
    let got = sys::pread_full(&fd, 0, len).op("pread")?;
    all_bytes(&got[24576..30_000], 0xcd, "before unaligned punch")?;
    all_bytes(&got[30_000..35_000], 0, "unaligned punched range")?;
    all_bytes(&got[35_000..], 0xcd, "after unaligned punch")?;
    // A fresh open sees the same.
    let fresh = sys::read_file(&p).op("fresh read")?;
    cmp_bytes(&fresh, &got, "fresh open after punch")?;
    // PUNCH_HOLE without KEEP_SIZE is invalid.
    expect_errno(
        sys::fallocate(&fd, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        &[libc::EINVAL, libc::EOPNOTSUPP],
        "PUNCH_HOLE without KEEP_SIZE",
    )?;
    Ok(())
}

pub fn odirect(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::open(&p, O_RDWR | libc::O_CREAT | libc::O_DIRECT, 0o644).op("open O_DIRECT")?;
    let mut buf = AlignedBuf::new(4 * 4096, 4096);
    let a = pattern(40, 4096);
    let b = pattern(41, 4096);
    buf.as_mut_slice()[..4096].copy_from_slice(&a);
    sys::pwrite_all(&fd, &buf.as_slice()[..4096], 0).op("O_DIRECT pwrite 4 KiB at 0")?;
    buf.as_mut_slice()[..4096].copy_from_slice(&b);
    sys::pwrite_all(&fd, &buf.as_slice()[..4096], 12288).op("O_DIRECT pwrite 4 KiB at 12 KiB")?;
    let mut rbuf = AlignedBuf::new(4 * 4096, 4096);
    let n = sys::pread(&fd, rbuf.as_mut_slice(), 0).op("O_DIRECT pread 16 KiB")?;
    ensure_eq!(n, 16384, "O_DIRECT read length");
    let r = rbuf.as_slice();
    cmp_bytes(&r[..4096], &a, "O_DIRECT read of block 0")?;
    all_bytes(&r[4096..12288], 0, "O_DIRECT read of hole")?;
    cmp_bytes(&r[12288..], &b, "O_DIRECT read of block 3")?;
    // Buffered reader sees the direct writes.
    let bfd = sys::open(&p, O_RDWR, 0).op("open buffered")?;
    let got = sys::pread_full(&bfd, 0, 16384).op("buffered pread")?;
    cmp_bytes(&got, r, "buffered read after O_DIRECT writes")?;
    // Direct reader sees buffered writes.
    sys::pwrite_all(&bfd, &[0x77; 4096], 4096).op("buffered pwrite at 4 KiB")?;
    let n =
        sys::pread(&fd, &mut rbuf.as_mut_slice()[..4096], 4096).op("O_DIRECT pread at 4 KiB")?;
    ensure_eq!(n, 4096, "O_DIRECT read length");
    all_bytes(
        &rbuf.as_slice()[..4096],
        0x77,
        "O_DIRECT read after buffered write",
    )?;
    ensure_eq!(sys::fstat(&fd).op("fstat")?.st_size, 16384, "size");
    Ok(())
}

pub fn offset_5gib(c: &mut Ctx) -> TResult {
    let p = c.p("big");
    let fd = sys::create(&p).op("create")?;
    let off = 5 * GIB + 123;
    let d = pattern(50, 1000);
    let n = sys::pwrite(&fd, &d, off).op("pwrite at 5GiB+123")?;
    ensure_eq!(n, 1000, "pwrite at 5GiB+123 length");
    let st = sys::fstat(&fd).op("fstat")?;
    ensure_eq!(
        st.st_size as u64,
        off + 1000,
        "size after pwrite at 5GiB+123"
    );
    let got = sys::pread_full(&fd, off, 2000).op("pread at 5GiB+123")?;
    cmp_bytes(&got, &d, "pread at 5GiB+123")?;
    all_bytes(
        &sys::pread_full(&fd, off - 100, 100).op("pread before")?,
        0,
        "hole just below 5GiB+123",
    )?;
    // Straddling 4 GiB (catches 32-bit offset truncation).
    sys::pwrite_all(&fd, b"ABCD", 4 * GIB - 2).op("pwrite across 4 GiB")?;
    ensure_eq!(
        sys::pread_full(&fd, 4 * GIB - 2, 4).op("pread across 4 GiB")?,
        b"ABCD".to_vec(),
        "bytes across 4 GiB"
    );
    all_bytes(
        &sys::pread_full(&fd, 0, 4096).op("pread at 0")?,
        0,
        "start of file (no wraparound)",
    )?;
    ensure_eq!(
        sys::lseek(&fd, 0, SEEK_END).op("lseek END")? as u64,
        off + 1000,
        "SEEK_END"
    );
    ensure_eq!(
        sys::stat(&p).op("stat")?.st_size as u64,
        off + 1000,
        "stat size"
    );
    // A fresh descriptor reads the same.
    let fd2 = sys::open(&p, O_RDONLY, 0).op("reopen")?;
    cmp_bytes(
        &sys::pread_full(&fd2, off, 1000).op("pread fresh")?,
        &d,
        "fresh pread at 5GiB+123",
    )?;
    // Truncate across the boundary.
    sys::ftruncate(&fd, 4 * GIB + 1).op("ftruncate to 4GiB+1")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size as u64,
        4 * GIB + 1,
        "size after truncate"
    );
    ensure_eq!(
        sys::pread_full(&fd, 4 * GIB - 2, 10).op("pread")?,
        b"ABC".to_vec(),
        "bytes kept by truncate to 4GiB+1"
    );
    Ok(())
}

pub fn copy_file_range(c: &mut Ctx) -> TResult {
    let src_data = pattern(60, (MIB + 17) as usize);
    sys::write_file(c.p("src"), &src_data).op("create src")?;
    let src = sys::open(c.p("src"), O_RDONLY, 0).op("open src")?;
    let dst = sys::create(c.p("dst")).op("create dst")?;
    // Explicit offsets.
    let (mut oi, mut oo) = (100i64, 0i64);
    let mut left = 500_000usize;
    while left > 0 {
        let n = sys::copy_file_range(&src, Some(&mut oi), &dst, Some(&mut oo), left)
            .op("copy_file_range with offsets")?;
        ensure!(n > 0, "copy_file_range returned 0 with {left} bytes left");
        left -= n;
    }
    ensure_eq!(
        (oi, oo),
        (500_100, 500_000),
        "offsets advanced by copy_file_range"
    );
    ensure_eq!(
        sys::lseek(&src, 0, SEEK_CUR).op("lseek")?,
        0,
        "src position untouched"
    );
    cmp_bytes(
        &sys::read_file(c.p("dst")).op("read dst")?,
        &src_data[100..500_100],
        "dst after copy_file_range",
    )?;
    // Using the file positions, past the end of the destination (hole).
    sys::lseek(&src, 600_000, SEEK_SET).op("lseek src")?;
    sys::lseek(&dst, 700_000, SEEK_SET).op("lseek dst")?;
    let mut left = src_data.len() - 600_000;
    while left > 0 {
        let n = sys::copy_file_range(&src, None, &dst, None, left)
            .op("copy_file_range at file positions")?;
        if n == 0 {
            break;
        }
        left -= n;
    }
    ensure_eq!(left, 0, "bytes left uncopied");
    ensure_eq!(
        sys::lseek(&dst, 0, SEEK_CUR).op("lseek")?,
        700_000 + (src_data.len() - 600_000) as i64,
        "dst position after copy"
    );
    let got = sys::read_file(c.p("dst")).op("read dst")?;
    ensure_eq!(got.len(), 700_000 + src_data.len() - 600_000, "dst size");
    all_bytes(&got[500_000..700_000], 0, "gap in dst")?;
    cmp_bytes(&got[700_000..], &src_data[600_000..], "second copy")?;
    // Copy at EOF copies nothing.
    let mut oi = src_data.len() as i64;
    let n =
        sys::copy_file_range(&src, Some(&mut oi), &dst, None, 100).op("copy_file_range at EOF")?;
    ensure_eq!(n, 0, "copy_file_range from EOF");
    Ok(())
}

pub fn lseek(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    sys::write_file(&p, &pattern(70, 1000)).op("create")?;
    let fd = sys::open(&p, O_RDWR, 0).op("open")?;
    ensure_eq!(
        sys::lseek(&fd, 10, SEEK_SET).op("SEEK_SET")?,
        10,
        "SEEK_SET 10"
    );
    ensure_eq!(
        sys::lseek(&fd, 5, SEEK_CUR).op("SEEK_CUR")?,
        15,
        "SEEK_CUR +5"
    );
    ensure_eq!(
        sys::lseek(&fd, -3, SEEK_CUR).op("SEEK_CUR")?,
        12,
        "SEEK_CUR -3"
    );
    ensure_eq!(
        sys::lseek(&fd, -100, SEEK_END).op("SEEK_END")?,
        900,
        "SEEK_END -100"
    );
    ensure_eq!(
        sys::lseek(&fd, 0, SEEK_END).op("SEEK_END")?,
        1000,
        "SEEK_END 0"
    );
    expect_errno(
        sys::lseek(&fd, -1, SEEK_SET),
        &[libc::EINVAL],
        "SEEK_SET -1",
    )?;
    expect_errno(
        sys::lseek(&fd, -2000, SEEK_END),
        &[libc::EINVAL],
        "SEEK_END before start",
    )?;
    // read advances the position.
    sys::lseek(&fd, 100, SEEK_SET).op("SEEK_SET")?;
    let mut b = [0u8; 50];
    ensure_eq!(sys::read(&fd, &mut b).op("read")?, 50, "read length");
    ensure_eq!(
        sys::lseek(&fd, 0, SEEK_CUR).op("SEEK_CUR")?,
        150,
        "position after read"
    );
    cmp_bytes(&b, &pattern(70, 1000)[100..150], "read at position 100")?;
    // Seek past EOF and write: creates a hole, size grows.
    ensure_eq!(
        sys::lseek(&fd, 5000, SEEK_SET).op("SEEK_SET")?,
        5000,
        "seek past EOF"
    );
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        1000,
        "seek alone does not grow the file"
    );
    sys::write_all(&fd, b"end").op("write at 5000")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        5003,
        "size after write past EOF"
    );
    all_bytes(
        &sys::pread_full(&fd, 1000, 4000).op("pread")?,
        0,
        "hole from seek+write",
    )?;
    // Separate descriptors have separate positions; dups share one.
    let fd2 = sys::open(&p, O_RDONLY, 0).op("open 2")?;
    ensure_eq!(
        sys::lseek(&fd2, 0, SEEK_CUR).op("SEEK_CUR")?,
        0,
        "new fd position"
    );
    let d = sys::dup(&fd).op("dup")?;
    sys::lseek(&d, 7, SEEK_SET).op("SEEK_SET on dup")?;
    ensure_eq!(
        sys::lseek(&fd, 0, SEEK_CUR).op("SEEK_CUR")?,
        7,
        "position shared with dup"
    );
    // Directories are seekable back to the start.
    let dfd = c.dirfd()?;
    ensure_eq!(
        sys::lseek(&dfd, 0, SEEK_SET).op("lseek dir")?,
        0,
        "lseek on dir"
    );
    Ok(())
}

pub fn sync(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd = sys::create(&p).op("create")?;
    sys::write_all(&fd, &pattern(80, 100_000)).op("write")?;
    sys::fsync(&fd).op("fsync")?;
    sys::pwrite_all(&fd, b"more", 100_000).op("pwrite")?;
    sys::fdatasync(&fd).op("fdatasync")?;
    sys::syncfs(&fd).op("syncfs")?;
    let dfd = c.dirfd()?;
    sys::fsync(&dfd).op("fsync directory")?;
    sys::fdatasync(&dfd).op("fdatasync directory")?;
    let ro = sys::open(&p, O_RDONLY, 0).op("open O_RDONLY")?;
    sys::fsync(&ro).op("fsync O_RDONLY fd")?;
    unsafe { libc::sync() };
    let root = sys::open(&c.root, O_RDONLY | libc::O_DIRECTORY, 0).op("open root")?;
    sys::syncfs(&root).op("syncfs on mount root")?;
    // Data still intact after all that.
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        100_004,
        "size after syncs"
    );
    let r = sys::open(&p, O_RDONLY | libc::O_SYNC, 0);
    if let Err(e) = r {
        return Err(TErr::Fail(format!("open O_SYNC: {e}")));
    }
    let s = sys::open(&p, libc::O_WRONLY | libc::O_DSYNC, 0).op("open O_DSYNC")?;
    sys::pwrite_all(&s, b"sync", 0).op("O_DSYNC write")?;
    ensure_eq!(
        sys::pread_full(&fd, 0, 4).op("pread")?,
        b"sync".to_vec(),
        "O_DSYNC write"
    );
    Ok(())
}

/// A running program is neither opened for writing nor truncated, whichever open tries:
/// `open(O_WRONLY)`, `O_RDWR`, `truncate(2)` (the guest's own checks) and
/// `open(O_RDONLY|O_TRUNC)`, which with ATOMIC_O_TRUNC reaches the daemon before the guest
/// checks for ETXTBSY: virtiofsd 1.14 truncates the program there, and the refused open
/// leaves the process to die of SIGBUS. Afterwards the file is intact and the program runs on.
pub fn exec_keeps_running_program(c: &mut Ctx) -> TResult {
    let p = c.p("sleep");
    // busybox runs the applet its file is named after.
    let program = sys::read_file("/bin/busybox").op("read /bin/busybox")?;
    sys::write_file(&p, &program).op("copy busybox")?;
    sys::chmod(&p, 0o755).op("chmod 755")?;
    let mut child = std::process::Command::new(&p)
        .arg("60")
        .spawn()
        .map_err(|e| format!("run {}: {e}", sys::show(&p)))?;
    let checks = (|| -> TResult {
        // spawn returns once the program is executing: its writes are denied from now on.
        expect_errno(
            sys::open(&p, libc::O_WRONLY, 0),
            &[libc::ETXTBSY],
            "O_WRONLY",
        )?;
        expect_errno(sys::open(&p, O_RDWR, 0), &[libc::ETXTBSY], "O_RDWR")?;
        expect_errno(sys::truncate(&p, 0), &[libc::ETXTBSY], "truncate")?;
        expect_errno(
            sys::open(&p, O_RDONLY | libc::O_TRUNC, 0),
            &[libc::ETXTBSY],
            "O_RDONLY|O_TRUNC",
        )?;
        ensure_eq!(
            sys::stat(&p).op("stat")?.st_size,
            program.len() as i64,
            "size of the running program after the refused opens"
        );
        let state = child.try_wait().map_err(|e| format!("try_wait: {e}"))?;
        ensure!(state.is_none(), "the program died while running: {state:?}");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    checks?;
    cmp_bytes(
        &sys::read_file(&p).op("read after the program ended")?,
        &program,
        "program file after the run",
    )?;
    // No run left: the same open truncates now.
    drop(sys::open(&p, O_RDONLY | libc::O_TRUNC, 0).op("O_RDONLY|O_TRUNC after the run")?);
    ensure_eq!(
        sys::stat(&p).op("stat")?.st_size,
        0,
        "size after truncating"
    );
    Ok(())
}
