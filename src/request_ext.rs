//! FUSE request extensions (protocol 7.38): records the guest kernel appends to CREATE, MKDIR,
//! MKNOD, SYMLINK and TMPFILE after their arguments, `fuse_in_header.total_extlen` 8-byte
//! units in all. fuse-backend-rs reads a name up to its NUL and ignores what follows, so the
//! requests still decode there; this module reads the one extension the daemon negotiates,
//! the security context (FUSE_SECURITY_CTX, `--security-label`).
//!
//! Each record starts with `{ u32 size; u32 type; }` (`size` counting the header, a multiple
//! of 8). A type of 31 or less is the security-context record, whose header is
//! `fuse_secctx_header { u32 size; u32 nr_secctx; }`: `nr_secctx` contexts follow, each
//! `fuse_secctx { u32 size; u32 padding; }`, the xattr name with its NUL, then `size` bytes
//! of value. The kernel sends one record with `nr_secctx` 0 or 1 on every such request once
//! the flag is agreed (0 when no LSM labels the object).

use std::ffi::CString;

use fuse_backend_rs::abi::fuse_abi::InHeader;
use fuse_backend_rs::transport::Reader;

use crate::fuse::opcode;
use crate::passthrough::SecurityContext;

/// Record types up to this one are security contexts (`type` is their count).
const MAX_NR_SECCTX: u32 = 31;
/// The largest request body read to find the extensions: a symlink's two names
/// (255 + 4,096 bytes), its arguments and a security context (at most an xattr value).
const MAX_BODY: usize = 8 * 1024 + 65_536;

/// Whether `opcode` creates an object and so carries the security context when agreed.
pub fn creates_object(op: u32) -> bool {
    matches!(
        op,
        opcode::CREATE | opcode::MKDIR | opcode::MKNOD | opcode::SYMLINK | opcode::TMPFILE
    )
}

/// The security context a creating request carries, once FUSE_SECURITY_CTX is agreed.
/// `None` when the guest's LSM gave none. EINVAL for a request without the record or with a
/// malformed one (virtiofsd answers the same), never a panic.
pub fn security_context(
    header: &InHeader,
    mut request: Reader<'_, ()>,
) -> Result<Option<SecurityContext>, i32> {
    // `total_extlen` is the low 16 bits of the word fuse-backend-rs calls `padding`.
    let ext_len = (header.padding & 0xffff) as usize * 8;
    let body_len = (header.len as usize)
        .checked_sub(std::mem::size_of::<InHeader>())
        .ok_or(libc::EINVAL)?;
    if ext_len == 0 || ext_len > body_len || body_len > MAX_BODY {
        return Err(libc::EINVAL);
    }
    let _ = request.read_obj::<InHeader>();
    let mut body = vec![0u8; body_len];
    std::io::Read::read_exact(&mut request, &mut body).map_err(|_| libc::EINVAL)?;
    parse_extensions(&body[body_len - ext_len..])
}

/// Parse the extension records `ext` (the request's last `total_extlen * 8` bytes).
fn parse_extensions(mut ext: &[u8]) -> Result<Option<SecurityContext>, i32> {
    let mut context = None;
    let mut seen = false;
    while !ext.is_empty() {
        let size = read_u32(ext, 0)? as usize;
        let kind = read_u32(ext, 4)?;
        if size < 8 || !size.is_multiple_of(8) || size > ext.len() {
            return Err(libc::EINVAL);
        }
        let (record, rest) = ext.split_at(size);
        ext = rest;
        // Only the security context is agreed (not FUSE_CREATE_SUPP_GROUP's type 32), and it
        // comes at most once.
        if kind > MAX_NR_SECCTX || seen {
            return Err(libc::EINVAL);
        }
        seen = true;
        context = parse_security_context(kind, &record[8..])?;
    }
    if !seen {
        return Err(libc::EINVAL);
    }
    Ok(context)
}

/// One security-context record's payload holding `count` contexts (the kernel sends one).
fn parse_security_context(count: u32, payload: &[u8]) -> Result<Option<SecurityContext>, i32> {
    match count {
        0 => return Ok(None),
        1 => {}
        _ => return Err(libc::EINVAL),
    }
    let value_len = read_u32(payload, 0)? as usize;
    let rest = payload.get(8..).ok_or(libc::EINVAL)?;
    let name_end = rest.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
    let name = &rest[..name_end];
    let value = rest
        .get(name_end + 1..name_end + 1 + value_len)
        .ok_or(libc::EINVAL)?;
    if name.is_empty() || value_len == 0 {
        return Err(libc::EINVAL);
    }
    Ok(Some(SecurityContext {
        name: CString::new(name).map_err(|_| libc::EINVAL)?,
        value: value.to_vec(),
    }))
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, i32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")))
        .ok_or(libc::EINVAL)
}

/// The extension bytes of a request carrying security context `context` (or an empty record
/// when `None`), as the guest kernel builds them: for the test frontend and the tests here.
pub fn encode_security_context(context: Option<(&str, &[u8])>) -> Vec<u8> {
    let mut payload = Vec::new();
    let count = match context {
        None => 0,
        Some((name, value)) => {
            payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
            payload.extend_from_slice(&0u32.to_le_bytes());
            payload.extend_from_slice(name.as_bytes());
            payload.push(0);
            payload.extend_from_slice(value);
            1
        }
    };
    let size = (8 + payload.len()).next_multiple_of(8);
    let mut record = Vec::with_capacity(size);
    record.extend_from_slice(&(size as u32).to_le_bytes());
    record.extend_from_slice(&(count as u32).to_le_bytes());
    record.extend_from_slice(&payload);
    record.resize(size, 0);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_round_trips_and_an_empty_record_means_none() {
        let label = b"system_u:object_r:tmp_t:s0\0";
        let ext = encode_security_context(Some(("security.selinux", label)));
        assert_eq!(ext.len() % 8, 0);
        let got = parse_extensions(&ext).unwrap().unwrap();
        assert_eq!(got.name.as_bytes(), b"security.selinux");
        assert_eq!(got.value, label);
        assert_eq!(parse_extensions(&encode_security_context(None)), Ok(None));
    }

    #[test]
    fn malformed_extensions_are_einval_not_a_panic() {
        let good = encode_security_context(Some(("security.selinux", b"x")));
        // Missing record, truncated header, a size past the end, a size not a multiple of
        // 8, two contexts, two records, a record type the daemon did not agree to.
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), good[..4].to_vec()];
        let mut past = good.clone();
        past[0] = 200;
        cases.push(past);
        let mut odd = good.clone();
        odd[0] = 12;
        cases.push(odd);
        let mut two = good.clone();
        two[4] = 2;
        cases.push(two);
        cases.push([good.clone(), good.clone()].concat());
        let mut groups = good.clone();
        groups[4] = 32;
        cases.push(groups);
        // A value longer than the record, and a name without its NUL.
        let mut long = good.clone();
        long[8] = 100;
        cases.push(long);
        let mut unterminated = encode_security_context(None);
        unterminated[4] = 1;
        unterminated.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0]);
        unterminated.extend_from_slice(b"abcdefgh");
        unterminated[0] = unterminated.len() as u8;
        cases.push(unterminated);
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(
                parse_extensions(case),
                Err(libc::EINVAL),
                "case {i}: {case:?}"
            );
        }
    }
}
