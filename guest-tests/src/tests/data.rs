//! File data: read/write, positional I/O, overwrite, append, truncate.

use crate::harness::{Ctx, TResult};
use crate::proto::fnv1a64;
use crate::sys::{self, all_bytes, cmp_bytes, pattern, OpExt};
use crate::{ensure, ensure_eq};
use libc::{O_APPEND, O_CREAT, O_RDONLY, O_RDWR, O_WRONLY, SEEK_CUR, SEEK_END, SEEK_SET};

pub fn write_read(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let data = pattern(1, 100_003);
    {
        let fd = sys::open(&p, O_WRONLY | O_CREAT | libc::O_EXCL, 0o644).op("create f")?;
        // Several writes of odd sizes.
        for chunk in data.chunks(7_777) {
            let n = sys::write(&fd, chunk).op("write")?;
            ensure_eq!(n, chunk.len(), "short write");
        }
        ensure_eq!(
            sys::lseek(&fd, 0, SEEK_CUR).op("lseek")?,
            data.len() as i64,
            "file position after writes"
        );
    }
    let fd = sys::open(&p, O_RDONLY, 0).op("reopen f")?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4099];
    loop {
        let n = sys::read(&fd, &mut buf).op("read")?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    cmp_bytes(&got, &data, "read after reopen")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        data.len() as i64,
        "st_size"
    );
    Ok(())
}

pub fn pwrite_pread(c: &mut Ctx) -> TResult {
    let fd = sys::create(c.p("f")).op("create")?;
    let pieces: [(u64, usize); 5] = [
        (0, 10),
        (4095, 2),
        (4096, 4096),
        (65537, 1000),
        (200_000, 3),
    ];
    let mut model = vec![0u8; 200_003];
    for (i, &(off, len)) in pieces.iter().enumerate() {
        let d = pattern(10 + i as u64, len);
        let n = sys::pwrite(&fd, &d, off).op(format!("pwrite at {off}"))?;
        ensure_eq!(n, len, "pwrite at {off}: short write");
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    // pwrite must not move the file position.
    ensure_eq!(
        sys::lseek(&fd, 0, SEEK_CUR).op("lseek")?,
        0,
        "position after pwrite"
    );
    for &(off, len) in &pieces {
        let got = sys::pread_full(&fd, off, len).op(format!("pread at {off}"))?;
        cmp_bytes(
            &got,
            &model[off as usize..off as usize + len],
            &format!("pread at {off}"),
        )?;
    }
    // A read spanning several pieces and the zero gaps between them.
    let got = sys::pread_full(&fd, 0, model.len() + 100).op("pread whole")?;
    cmp_bytes(&got, &model, "pread whole file")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        model.len() as i64,
        "size after pwrites"
    );
    Ok(())
}

pub fn overwrite(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let mut model = vec![b'a'; 65536];
    sys::write_file(&p, &model).op("write 64KiB")?;
    let ino = sys::stat(&p).op("stat")?.st_ino;
    let fd = sys::open(&p, O_RDWR, 0).op("open O_RDWR")?;
    // pwrite in the middle, across a page boundary.
    let b = vec![b'b'; 3000];
    sys::pwrite_all(&fd, &b, 3000).op("pwrite 3000 bytes at 3000")?;
    model[3000..6000].copy_from_slice(&b);
    // lseek + write at the end of the file, not extending it.
    sys::lseek(&fd, 65536 - 10, SEEK_SET).op("lseek")?;
    sys::write_all(&fd, b"0123456789").op("write last 10 bytes")?;
    model[65526..].copy_from_slice(b"0123456789");
    // A one-byte overwrite at offset 0.
    sys::pwrite_all(&fd, b"Z", 0).op("pwrite 1 byte at 0")?;
    model[0] = b'Z';
    drop(fd);
    let st = sys::stat(&p).op("stat after overwrite")?;
    ensure_eq!(st.st_size, 65536, "size after in-place overwrite");
    ensure_eq!(st.st_ino, ino, "inode number after overwrite");
    cmp_bytes(
        &sys::read_file(&p).op("read back")?,
        &model,
        "content after overwrite",
    )?;
    Ok(())
}

pub fn append(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let fd1 = sys::open(&p, O_WRONLY | O_CREAT | O_APPEND, 0o644).op("open O_APPEND 1")?;
    let fd2 = sys::open(&p, O_WRONLY | O_APPEND, 0).op("open O_APPEND 2")?;
    sys::write_all(&fd1, b"111").op("write fd1")?;
    sys::write_all(&fd2, b"222").op("write fd2")?;
    sys::write_all(&fd1, b"333").op("write fd1 again")?;
    // Seeking back does not matter for O_APPEND writes.
    sys::lseek(&fd1, 0, SEEK_SET).op("lseek 0")?;
    sys::write_all(&fd1, b"444").op("write after lseek 0")?;
    ensure_eq!(
        sys::lseek(&fd1, 0, SEEK_CUR).op("lseek")?,
        12,
        "file position after O_APPEND write"
    );
    // Linux: pwrite on an O_APPEND descriptor appends too.
    sys::pwrite_all(&fd2, b"5", 0).op("pwrite on O_APPEND fd")?;
    let got = sys::read_file(&p).op("read back")?;
    ensure!(
        got == b"1112223334445",
        "content after O_APPEND writes: got {:?}, expected \"1112223334445\"",
        String::from_utf8_lossy(&got)
    );
    // Append to a file another descriptor grew with a plain write.
    let fd3 = sys::open(&p, O_WRONLY, 0).op("open O_WRONLY")?;
    sys::pwrite_all(&fd3, b"XY", 13).op("pwrite extending")?;
    sys::write_all(&fd1, b"!").op("append after extension")?;
    let got = sys::read_file(&p).op("read back 2")?;
    ensure!(
        got == b"1112223334445XY!",
        "append after another fd extended the file: got {:?}",
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

pub fn truncate(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let data = pattern(3, 10_000);
    sys::write_file(&p, &data).op("write 10000")?;
    let fd = sys::open(&p, O_RDWR, 0).op("open")?;
    // Grow with ftruncate: old data kept, the rest zero.
    sys::ftruncate(&fd, 20_000).op("ftruncate to 20000")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        20_000,
        "size after grow"
    );
    let got = sys::pread_full(&fd, 0, 30_000).op("pread")?;
    ensure_eq!(got.len(), 20_000, "bytes readable after grow");
    cmp_bytes(&got[..10_000], &data, "data kept by grow")?;
    all_bytes(&got[10_000..], 0, "grown region")?;
    // Shrink by path.
    sys::truncate(&p, 5_000).op("truncate to 5000")?;
    ensure_eq!(
        sys::stat(&p).op("stat")?.st_size,
        5_000,
        "size after shrink"
    );
    let got = sys::pread_full(&fd, 0, 30_000).op("pread after shrink")?;
    cmp_bytes(&got, &data[..5_000], "content after shrink")?;
    // Shrink to a non-page boundary, then grow: the cut-off bytes must not
    // come back (stale page cache / host data).
    sys::ftruncate(&fd, 1_234).op("ftruncate to 1234")?;
    sys::ftruncate(&fd, 8_192).op("ftruncate to 8192")?;
    let got = sys::pread_full(&fd, 0, 9_000).op("pread after shrink+grow")?;
    ensure_eq!(got.len(), 8_192, "bytes after shrink+grow");
    cmp_bytes(&got[..1_234], &data[..1_234], "kept prefix")?;
    all_bytes(&got[1_234..], 0, "region cut off and grown back")?;
    // Truncate to zero, then write past the start.
    sys::ftruncate(&fd, 0).op("ftruncate to 0")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        0,
        "size after truncate 0"
    );
    sys::pwrite_all(&fd, b"x", 100).op("pwrite at 100")?;
    let got = sys::pread_full(&fd, 0, 1000).op("pread")?;
    ensure_eq!(got.len(), 101, "size after write at 100");
    all_bytes(&got[..100], 0, "hole before write at 100")?;
    // O_TRUNC on open.
    drop(fd);
    let fd = sys::open(&p, O_WRONLY | libc::O_TRUNC, 0).op("open O_TRUNC")?;
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        0,
        "size after O_TRUNC"
    );
    Ok(())
}

pub fn large_checksum(c: &mut Ctx) -> TResult {
    const MIB: usize = 1 << 20;
    let p = c.p("big");
    let mut whole = crate::proto::Fnv1a64::new();
    {
        let fd = sys::create(&p).op("create")?;
        for i in 0..8 {
            let chunk = pattern(100 + i, MIB);
            whole.update(&chunk);
            sys::write_all(&fd, &chunk).op(format!("write MiB {i}"))?;
        }
    }
    let want = whole.finish();
    ensure_eq!(
        sys::stat(&p).op("stat")?.st_size,
        8 * MIB as i64,
        "size of 8 MiB file"
    );
    // Read back with an odd buffer size so reads straddle pages.
    let fd = sys::open(&p, O_RDONLY, 0).op("open")?;
    let mut h = crate::proto::Fnv1a64::new();
    let mut buf = vec![0u8; 65521];
    let mut total = 0;
    loop {
        let n = sys::read(&fd, &mut buf).op("read")?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n;
    }
    ensure_eq!(total, 8 * MIB, "bytes read from 8 MiB file");
    ensure!(
        h.finish() == want,
        "8 MiB checksum mismatch: read {:016x}, wrote {want:016x}",
        h.finish()
    );
    // Spot check one chunk at an unaligned offset.
    let got = sys::pread_full(&fd, 5 * MIB as u64 + 333, 1000).op("pread")?;
    cmp_bytes(&got, &pattern(105, MIB)[333..1333], "pread at 5 MiB + 333")?;
    ensure!(fnv1a64(&got) != 0, "impossible hash");
    Ok(())
}

pub fn read_past_eof(c: &mut Ctx) -> TResult {
    let p = c.p("f");
    let data = pattern(4, 100);
    sys::write_file(&p, &data).op("write")?;
    let fd = sys::open(&p, O_RDONLY, 0).op("open")?;
    let mut buf = [0xeeu8; 200];
    ensure_eq!(
        sys::pread(&fd, &mut buf, 100).op("pread at EOF")?,
        0,
        "pread at EOF"
    );
    ensure_eq!(
        sys::pread(&fd, &mut buf, 1000).op("pread past EOF")?,
        0,
        "pread past EOF"
    );
    ensure_eq!(
        sys::pread(&fd, &mut buf, 1 << 40).op("pread at 1 TiB")?,
        0,
        "pread at 1 TiB"
    );
    let n = sys::pread(&fd, &mut buf, 50).op("pread across EOF")?;
    ensure_eq!(n, 50, "pread of 200 at 50 in a 100-byte file");
    cmp_bytes(&buf[..50], &data[50..], "pread across EOF")?;
    ensure_eq!(
        sys::lseek(&fd, 0, SEEK_END).op("lseek END")?,
        100,
        "SEEK_END"
    );
    ensure_eq!(
        sys::read(&fd, &mut buf).op("read at EOF")?,
        0,
        "read at EOF"
    );
    sys::lseek(&fd, 5000, SEEK_SET).op("lseek past EOF")?;
    ensure_eq!(
        sys::read(&fd, &mut buf).op("read past EOF")?,
        0,
        "read past EOF"
    );
    // Reading past EOF must not change the size.
    ensure_eq!(
        sys::fstat(&fd).op("fstat")?.st_size,
        100,
        "size after reads past EOF"
    );
    // Empty file.
    sys::write_file(c.p("empty"), b"").op("create empty")?;
    let fd = sys::open(c.p("empty"), O_RDONLY, 0).op("open empty")?;
    ensure_eq!(
        sys::read(&fd, &mut buf).op("read empty")?,
        0,
        "read of empty file"
    );
    Ok(())
}
