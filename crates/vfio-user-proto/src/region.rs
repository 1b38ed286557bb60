//! DEVICE_GET_REGION_INFO (5) with its capability chain, and the REGION_READ (9) /
//! REGION_WRITE (10) access header: protocol.md sections 3.4 and 3.8.

use crate::bytes::{put_u32, put_u64, u16_at, u32_at, u64_at};
use crate::ProtoError;

/// The fixed part of a region info, request and reply.
pub const REGION_INFO_SIZE: usize = 32;
pub const REGION_FLAG_READ: u32 = 1 << 0;
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
pub const REGION_FLAG_MMAP: u32 = 1 << 2;
pub const REGION_FLAG_CAPS: u32 = 1 << 3;
/// Capability ids (linux/vfio.h).
pub const CAP_SPARSE_MMAP: u16 = 1;
pub const CAP_TYPE: u16 = 2;
/// The most bytes of region info (fixed part and capabilities) we ask a server for.
pub const MAX_REGION_INFO_SIZE: u32 = 64 * 1024;
/// The REGION_READ/REGION_WRITE access header.
pub const ACCESS_HEADER_SIZE: usize = 16;

const CAP_HEADER_SIZE: usize = 8;

/// One area of a region that may be mmapped: `offset` from the region's own mmap offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

/// A decoded DEVICE_GET_REGION_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// What the server needs to describe the region fully; more than we asked for means the
    /// capabilities (and the fd) were left out: ask again with this much.
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub size: u64,
    /// The offset to mmap the region's fd at; sparse areas are relative to it.
    pub offset: u64,
    /// The SPARSE_MMAP capability's areas, when it came.
    pub sparse: Option<Vec<SparseArea>>,
    /// The TYPE capability: (type, subtype).
    pub region_type: Option<(u32, u32)>,
    /// Accepted oddities: unknown capabilities skipped.
    pub warnings: Vec<String>,
}

/// The DEVICE_GET_REGION_INFO request payload for `index`, accepting up to `argsz` bytes of
/// reply payload.
pub fn region_info_request(index: u32, argsz: u32) -> [u8; REGION_INFO_SIZE] {
    let mut p = [0u8; REGION_INFO_SIZE];
    put_u32(&mut p, 0, argsz);
    put_u32(&mut p, 8, index);
    p
}

fn bad(what: String) -> ProtoError {
    ProtoError::new(format!("DEVICE_GET_REGION_INFO reply: {what}"))
}

/// Decodes a DEVICE_GET_REGION_INFO reply to a request for `index`. The capability chain is
/// walked with every check a hostile server calls for: each capability must lie inside the
/// payload, start 4-byte aligned past the fixed part, not overlap another, and the chain must
/// not loop; sparse areas must lie inside the region. Unknown capabilities are skipped, with
/// a warning.
pub fn decode_region_info(payload: &[u8], index: u32) -> Result<RegionInfo, ProtoError> {
    if payload.len() < REGION_INFO_SIZE {
        return Err(bad(format!(
            "{} bytes, less than {REGION_INFO_SIZE}",
            payload.len()
        )));
    }
    let u32f = |at| u32_at(payload, at).unwrap_or(0);
    let u64f = |at| u64_at(payload, at).unwrap_or(0);
    let mut info = RegionInfo {
        argsz: u32f(0),
        flags: u32f(4),
        index: u32f(8),
        size: u64f(16),
        offset: u64f(24),
        sparse: None,
        region_type: None,
        warnings: Vec::new(),
    };
    if info.index != index {
        return Err(bad(format!(
            "it describes region {}, not {index}",
            info.index
        )));
    }
    if info.offset.checked_add(info.size).is_none() {
        return Err(bad(format!(
            "region {index} of {} bytes at mmap offset {} wraps around",
            info.size, info.offset
        )));
    }
    // A server asked with too little room says how much it needs and leaves its capabilities
    // out (libvfio-user also clears CAPS then; rust-vmm's server leaves it set): nothing to
    // walk until asked again with that much.
    if info.flags & REGION_FLAG_CAPS == 0 || info.argsz as usize > payload.len() {
        return Ok(info);
    }
    walk_caps(payload, &mut info)?;
    Ok(info)
}

fn walk_caps(payload: &[u8], info: &mut RegionInfo) -> Result<(), ProtoError> {
    // Ranges taken by the capabilities seen so far; a chain has few links, so a list will do.
    let mut taken: Vec<(usize, usize)> = Vec::new();
    let mut at = u32_at(payload, 12).unwrap_or(0) as usize;
    while at != 0 {
        if at < REGION_INFO_SIZE || !at.is_multiple_of(4) {
            return Err(bad(format!(
                "a capability at offset {at} (must be 4-byte aligned, past the first {REGION_INFO_SIZE} bytes)"
            )));
        }
        let Some(end) = at
            .checked_add(CAP_HEADER_SIZE)
            .filter(|&e| e <= payload.len())
        else {
            return Err(bad(format!(
                "a capability header at offset {at} runs past the {} bytes received",
                payload.len()
            )));
        };
        if let Some(o) = taken.iter().find(|(s, e)| (*s..*e).contains(&at)) {
            return Err(bad(format!(
                "the capability chain comes back to offset {at}, inside the capability at offset {} (a loop)",
                o.0
            )));
        }
        let id = u16_at(payload, at).unwrap_or(0);
        let next = u32_at(payload, at + 4).unwrap_or(0) as usize;
        let body = &payload[end..];
        let len = match id {
            CAP_SPARSE_MMAP => {
                let areas = decode_sparse(body, at, info)?;
                let len = CAP_HEADER_SIZE + 8 + 16 * areas.len();
                if info.sparse.replace(areas).is_some() {
                    return Err(bad("two SPARSE_MMAP capabilities".into()));
                }
                len
            }
            CAP_TYPE => {
                let (Some(t), Some(s)) = (u32_at(body, 0), u32_at(body, 4)) else {
                    return Err(bad(format!(
                        "the TYPE capability at offset {at} runs past the payload"
                    )));
                };
                if info.region_type.replace((t, s)).is_some() {
                    return Err(bad("two TYPE capabilities".into()));
                }
                CAP_HEADER_SIZE + 8
            }
            other => {
                info.warnings.push(format!(
                    "region {}: unknown capability id {other} at offset {at} skipped",
                    info.index
                ));
                CAP_HEADER_SIZE
            }
        };
        let range = (at, at + len);
        if let Some(o) = taken.iter().find(|(s, e)| range.0 < *e && *s < range.1) {
            return Err(bad(format!(
                "the capability at offset {at} overlaps the one at offset {} (a loop or a lie)",
                o.0
            )));
        }
        taken.push(range);
        at = next;
    }
    Ok(())
}

fn decode_sparse(body: &[u8], at: usize, info: &RegionInfo) -> Result<Vec<SparseArea>, ProtoError> {
    let Some(n) = u32_at(body, 0) else {
        return Err(bad(format!(
            "the SPARSE_MMAP capability at offset {at} runs past the payload"
        )));
    };
    let n = n as usize;
    // Bounded by what was received before anything is allocated.
    if n > body.len().saturating_sub(8) / 16 {
        return Err(bad(format!(
            "the SPARSE_MMAP capability at offset {at} claims {n} areas, more than its bytes hold"
        )));
    }
    let mut areas = Vec::with_capacity(n);
    for i in 0..n {
        let offset = u64_at(body, 8 + 16 * i).unwrap_or(0);
        let size = u64_at(body, 16 + 16 * i).unwrap_or(0);
        if offset.checked_add(size).is_none_or(|end| end > info.size) {
            return Err(bad(format!(
                "sparse area {i} ({size} bytes at {offset}) lies past region {}'s {} bytes",
                info.index, info.size
            )));
        }
        areas.push(SparseArea { offset, size });
    }
    Ok(areas)
}

/// The REGION_READ request payload, or the REGION_WRITE one when `data` is given (whose length
/// is then the count).
pub fn region_access(index: u32, offset: u64, count: u32, data: Option<&[u8]>) -> Vec<u8> {
    let mut p = vec![0u8; ACCESS_HEADER_SIZE + data.map_or(0, <[u8]>::len)];
    put_u64(&mut p, 0, offset);
    put_u32(&mut p, 8, index);
    put_u32(&mut p, 12, count);
    if let Some(d) = data {
        p[ACCESS_HEADER_SIZE..].copy_from_slice(d);
    }
    p
}

fn check_echo(
    what: &str,
    payload: &[u8],
    index: u32,
    offset: u64,
    count: u32,
) -> Result<(), ProtoError> {
    let (Some(o), Some(i), Some(c)) = (u64_at(payload, 0), u32_at(payload, 8), u32_at(payload, 12))
    else {
        return Err(ProtoError::new(format!(
            "{what} reply is {} bytes, less than its {ACCESS_HEADER_SIZE}-byte access header",
            payload.len()
        )));
    };
    if (o, i, c) != (offset, index, count) {
        return Err(ProtoError::new(format!(
            "{what} reply echoes region {i} offset {o} count {c}, not region {index} offset {offset} count {count}"
        )));
    }
    Ok(())
}

/// Checks a REGION_READ reply against its request and returns the data: the access header
/// echoed exactly, then exactly `count` bytes (a short or long read is a protocol error).
pub fn region_read_data(
    payload: &[u8],
    index: u32,
    offset: u64,
    count: u32,
) -> Result<&[u8], ProtoError> {
    region_read_head(payload, 0, index, offset, count)
}

/// [`region_read_data`] for a reply whose data was received in two places: the first part
/// in `payload` behind the access header (returned), and `elsewhere` bytes after it in memory
/// the transport wrote directly. Together they must be exactly `count` bytes.
pub fn region_read_head(
    payload: &[u8],
    elsewhere: usize,
    index: u32,
    offset: u64,
    count: u32,
) -> Result<&[u8], ProtoError> {
    check_echo("REGION_READ", payload, index, offset, count)?;
    let data = &payload[ACCESS_HEADER_SIZE..];
    let total = data.len().saturating_add(elsewhere);
    if total != count as usize {
        return Err(ProtoError::new(format!(
            "REGION_READ reply carries {total} bytes of data, not the {count} asked for"
        )));
    }
    Ok(data)
}

/// Checks a REGION_WRITE reply: the access header echoed exactly (libvfio-user answers a
/// zero-byte write with no payload at all, which is accepted then).
pub fn check_region_write_reply(
    payload: &[u8],
    index: u32,
    offset: u64,
    count: u32,
) -> Result<(), ProtoError> {
    if count == 0 && payload.is_empty() {
        return Ok(());
    }
    check_echo("REGION_WRITE", payload, index, offset, count)?;
    if payload.len() != ACCESS_HEADER_SIZE {
        return Err(ProtoError::new(format!(
            "REGION_WRITE reply is {} bytes, not the {ACCESS_HEADER_SIZE}-byte echo",
            payload.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A region info of `size` bytes with the given caps laid out from offset 32.
    fn info(size: u64, caps: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut p = vec![0u8; REGION_INFO_SIZE];
        put_u32(
            &mut p,
            4,
            REGION_FLAG_READ | if caps.is_empty() { 0 } else { REGION_FLAG_CAPS },
        );
        put_u32(&mut p, 8, 0);
        put_u64(&mut p, 16, size);
        if !caps.is_empty() {
            put_u32(&mut p, 12, REGION_INFO_SIZE as u32);
        }
        for (i, (id, body)) in caps.iter().enumerate() {
            let at = p.len();
            p.extend_from_slice(&id.to_ne_bytes());
            p.extend_from_slice(&1u16.to_ne_bytes());
            let next = if i + 1 == caps.len() {
                0
            } else {
                at + 8 + body.len()
            };
            p.extend_from_slice(&(next as u32).to_ne_bytes());
            p.extend_from_slice(body);
        }
        let len = p.len() as u32;
        put_u32(&mut p, 0, len);
        p
    }

    fn sparse(areas: &[(u64, u64)]) -> Vec<u8> {
        let mut b = (areas.len() as u32).to_ne_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        for (o, s) in areas {
            b.extend_from_slice(&o.to_ne_bytes());
            b.extend_from_slice(&s.to_ne_bytes());
        }
        b
    }

    #[test]
    fn decodes_sparse_type_and_skips_unknown_caps() {
        let mut ty = 3u32.to_ne_bytes().to_vec();
        ty.extend_from_slice(&1u32.to_ne_bytes());
        let p = info(
            4096,
            &[
                (CAP_SPARSE_MMAP, sparse(&[(0, 4096)])),
                (9, vec![0; 8]),
                (CAP_TYPE, ty),
            ],
        );
        let r = decode_region_info(&p, 0).unwrap();
        assert_eq!(
            r.sparse,
            Some(vec![SparseArea {
                offset: 0,
                size: 4096
            }])
        );
        assert_eq!(r.region_type, Some((3, 1)));
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(r.argsz as usize, p.len());
    }

    #[test]
    fn refuses_loops_overlaps_and_areas_past_the_region() {
        let mut looped = info(4096, &[(CAP_SPARSE_MMAP, sparse(&[(0, 4096)]))]);
        put_u32(&mut looped, 36, 32);
        assert!(decode_region_info(&looped, 0)
            .unwrap_err()
            .0
            .contains("a loop"));
        let past = info(4096, &[(CAP_SPARSE_MMAP, sparse(&[(4000, 100)]))]);
        assert!(decode_region_info(&past, 0)
            .unwrap_err()
            .0
            .contains("past region"));
        let mut outside = info(4096, &[(CAP_SPARSE_MMAP, sparse(&[(0, 16)]))]);
        put_u32(&mut outside, 12, 4096);
        // Claiming more room than it used does not excuse a chain that leaves the payload.
        assert!(decode_region_info(&outside, 0).is_err());
        put_u32(&mut outside, 0, 4096);
        assert!(decode_region_info(&outside, 0).unwrap().sparse.is_none());
        put_u32(&mut outside, 0, 64);
        assert!(decode_region_info(&outside, 0).is_err());
        let mut unaligned = info(4096, &[(CAP_SPARSE_MMAP, sparse(&[(0, 16)]))]);
        put_u32(&mut unaligned, 12, 33);
        assert!(decode_region_info(&unaligned, 0).is_err());
        let mut many = info(4096, &[(CAP_SPARSE_MMAP, sparse(&[(0, 16)]))]);
        put_u32(&mut many, 40, u32::MAX);
        assert!(decode_region_info(&many, 0)
            .unwrap_err()
            .0
            .contains("claims"));
        assert!(decode_region_info(&info(4096, &[]), 1).is_err());
    }

    #[test]
    fn access_echoes_are_checked() {
        let req = region_access(7, 64, 4, None);
        let mut reply = req.clone();
        reply.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(region_read_data(&reply, 7, 64, 4).unwrap(), &[1, 2, 3, 4]);
        assert!(region_read_data(&reply[..19], 7, 64, 4).is_err());
        assert!(region_read_data(&reply, 7, 68, 4).is_err());
        assert!(check_region_write_reply(&req, 7, 64, 4).is_ok());
        assert!(check_region_write_reply(&req, 6, 64, 4).is_err());
        assert!(check_region_write_reply(&[], 7, 64, 0).is_ok());
        assert!(check_region_write_reply(&[], 7, 64, 4).is_err());
    }

    #[test]
    fn a_read_split_between_the_reply_and_memory_must_add_up_to_the_count() {
        let mut reply = region_access(2, 4096, 100, None);
        reply.extend_from_slice(&[5u8; 30]);
        let head = region_read_head(&reply, 70, 2, 4096, 100).unwrap();
        assert_eq!(head, &[5u8; 30][..]);
        assert!(region_read_head(&reply, 69, 2, 4096, 100).is_err());
        assert!(region_read_head(&reply, 71, 2, 4096, 100).is_err());
        assert!(region_read_head(&reply, usize::MAX, 2, 4096, 100).is_err());
        // The echo is checked as for a whole reply.
        assert!(region_read_head(&reply, 70, 2, 4097, 100).is_err());
    }
}
