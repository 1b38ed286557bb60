//! DEVICE_GET_REGION_IO_FDS (6): protocol.md section 3.5. Two record layouts are in use: the
//! spec's 40-byte one and libvfio-user's 48-byte one (which adds a shadow-memory fd and moves
//! datamatch to offset 40). The stride is taken from argsz and count, exact division required.

use crate::bytes::{put_u32, u32_at, u64_at};
use crate::ProtoError;

/// The fixed part of request and reply: argsz, flags, index, count.
pub const IO_FDS_HEADER: usize = 16;
pub const SPEC_RECORD: usize = 40;
pub const LIBVFIO_USER_RECORD: usize = 48;
/// Record types: an ioeventfd, an ioregionfd, libvfio-user's shadow ioeventfd.
pub const IO_FD_EVENTFD: u32 = 0;
pub const IO_FD_REGIONFD: u32 = 1;
pub const IO_FD_SHADOW: u32 = 2;
/// The most bytes of reply we ask a server for (libvfio-user refuses more than 1 MiB).
pub const MAX_IO_FDS_SIZE: u32 = 1 << 20;

/// One sub-region served by an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoFdRecord {
    /// Offset within the region.
    pub offset: u64,
    /// Size (0: any size).
    pub size: u64,
    /// Index into the fds that came with the reply.
    pub fd_index: u32,
    pub kind: u32,
    pub flags: u32,
    /// ioeventfd datamatch, or ioregionfd user data.
    pub datamatch: u64,
    /// libvfio-user's shadow ioeventfd: the fd index of its shadow memory and the offset in it.
    pub shadow: Option<(u32, u64)>,
}

/// A decoded DEVICE_GET_REGION_IO_FDS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionIoFds {
    /// What the server needs for every record; more than was asked means the records (and the
    /// fds) were left out: ask again with this much.
    pub argsz: u32,
    pub count: u32,
    /// The record layout's size: 40 (the spec's) or 48 (libvfio-user's).
    pub stride: usize,
    pub records: Vec<IoFdRecord>,
}

/// The request payload for region `index`, accepting up to `argsz` bytes of reply.
pub fn region_io_fds_request(index: u32, argsz: u32) -> [u8; IO_FDS_HEADER] {
    let mut p = [0u8; IO_FDS_HEADER];
    put_u32(&mut p, 0, argsz);
    put_u32(&mut p, 8, index);
    p
}

fn bad(what: String) -> ProtoError {
    ProtoError::new(format!("DEVICE_GET_REGION_IO_FDS reply: {what}"))
}

/// Decodes a reply for region `index` of `region_size` bytes that came with `fds` fds.
pub fn decode_region_io_fds(
    payload: &[u8],
    index: u32,
    region_size: u64,
    fds: usize,
) -> Result<RegionIoFds, ProtoError> {
    let (Some(argsz), Some(flags), Some(idx), Some(count)) = (
        u32_at(payload, 0),
        u32_at(payload, 4),
        u32_at(payload, 8),
        u32_at(payload, 12),
    ) else {
        return Err(bad(format!(
            "{} bytes, less than {IO_FDS_HEADER}",
            payload.len()
        )));
    };
    if idx != index {
        return Err(bad(format!("it describes region {idx}, not {index}")));
    }
    if flags != 0 {
        return Err(bad(format!("flags {flags:#x} (must be 0)")));
    }
    let mut out = RegionIoFds {
        argsz,
        count,
        stride: 0,
        records: Vec::new(),
    };
    // The records were left out when we asked with too little room: nothing to decode yet.
    if count == 0 || argsz as usize > payload.len() {
        return Ok(out);
    }
    let body = (argsz as usize).saturating_sub(IO_FDS_HEADER);
    if !body.is_multiple_of(count as usize) {
        return Err(bad(format!(
            "{body} bytes of records do not divide into {count} records"
        )));
    }
    let stride = body / count as usize;
    if stride != SPEC_RECORD && stride != LIBVFIO_USER_RECORD {
        return Err(bad(format!(
            "records of {stride} bytes (the spec's are {SPEC_RECORD}, libvfio-user's {LIBVFIO_USER_RECORD})"
        )));
    }
    out.stride = stride;
    let fd_ok = |i: u32, what: &str| {
        if (i as usize) < fds {
            Ok(i)
        } else {
            Err(bad(format!("{what} {i} but {fds} fds came")))
        }
    };
    for n in 0..count as usize {
        let at = IO_FDS_HEADER + n * stride;
        let rec = &payload[at..at + stride];
        let u32f = |o| u32_at(rec, o).unwrap_or(0);
        let u64f = |o| u64_at(rec, o).unwrap_or(0);
        let (offset, size, kind) = (u64f(0), u64f(8), u32f(20));
        let end = offset.checked_add(size);
        if end.is_none_or(|e| e > region_size) || offset >= region_size {
            return Err(bad(format!(
                "record {n} ({size} bytes at {offset}) lies outside region {index}'s {region_size} bytes"
            )));
        }
        let shadow = if stride == LIBVFIO_USER_RECORD && kind == IO_FD_SHADOW {
            Some((fd_ok(u32f(28), "shadow fd index")?, u64f(32)))
        } else {
            None
        };
        let known = [IO_FD_EVENTFD, IO_FD_REGIONFD].contains(&kind)
            || (stride == LIBVFIO_USER_RECORD && kind == IO_FD_SHADOW);
        if !known {
            return Err(bad(format!("record {n} has type {kind}")));
        }
        out.records.push(IoFdRecord {
            offset,
            size,
            fd_index: fd_ok(u32f(16), "fd index")?,
            kind,
            flags: u32f(24),
            datamatch: u64f(if stride == LIBVFIO_USER_RECORD {
                40
            } else {
                32
            }),
            shadow,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::put_u64;

    /// A reply with `records` of (offset, size, fd_index, type, datamatch) in `stride` bytes each.
    fn reply(stride: usize, records: &[(u64, u64, u32, u32, u64)]) -> Vec<u8> {
        let mut p = vec![0u8; IO_FDS_HEADER + stride * records.len()];
        let len = p.len() as u32;
        put_u32(&mut p, 0, len);
        put_u32(&mut p, 8, 3);
        put_u32(&mut p, 12, records.len() as u32);
        for (i, (o, s, f, t, d)) in records.iter().enumerate() {
            let at = IO_FDS_HEADER + i * stride;
            put_u64(&mut p, at, *o);
            put_u64(&mut p, at + 8, *s);
            put_u32(&mut p, at + 16, *f);
            put_u32(&mut p, at + 20, *t);
            put_u64(&mut p, at + if stride == 48 { 40 } else { 32 }, *d);
        }
        p
    }

    /// A reply as libvfio-user builds it (lib/libvfio-user.c, handle_device_get_region_io_fds),
    /// laid out from its include/vfio-user.h, written by hand rather than with the helper
    /// above: `struct vfio_user_sub_region_ioeventfd` is packed, 48 bytes: gpa_offset u64,
    /// size u64, fd_index u32, type u32, flags u32, shadow_mem_fd_index u32, shadow_offset
    /// u64, datamatch u64. One plain ioeventfd (type 0) and one shadow ioeventfd (type 2).
    #[test]
    fn libvfio_user_records_decode_as_its_header_lays_them_out() {
        #[rustfmt::skip]
        let p: Vec<u8> = [
            // argsz 16 + 2 * 48, flags 0, index 3, count 2
            &112u32.to_le_bytes()[..], &0u32.to_le_bytes(), &3u32.to_le_bytes(), &2u32.to_le_bytes(),
            // gpa_offset 0x10, size 4, fd_index 0, type 0, flags 1 (datamatch), shadow fd 0, shadow offset 0, datamatch 0xabcd
            &0x10u64.to_le_bytes(), &4u64.to_le_bytes(), &0u32.to_le_bytes(), &0u32.to_le_bytes(),
            &1u32.to_le_bytes(), &0u32.to_le_bytes(), &0u64.to_le_bytes(), &0xabcdu64.to_le_bytes(),
            // gpa_offset 0x20, size 8, fd_index 1, type 2 (shadow), flags 0, shadow fd 2 at offset 0x1000, datamatch 0
            &0x20u64.to_le_bytes(), &8u64.to_le_bytes(), &1u32.to_le_bytes(), &2u32.to_le_bytes(),
            &0u32.to_le_bytes(), &2u32.to_le_bytes(), &0x1000u64.to_le_bytes(), &0u64.to_le_bytes(),
        ]
        .concat();
        let r = decode_region_io_fds(&p, 3, 4096, 3).unwrap();
        assert_eq!(r.stride, LIBVFIO_USER_RECORD);
        assert_eq!(
            r.records,
            vec![
                IoFdRecord {
                    offset: 0x10,
                    size: 4,
                    fd_index: 0,
                    kind: IO_FD_EVENTFD,
                    flags: 1,
                    datamatch: 0xabcd,
                    shadow: None
                },
                IoFdRecord {
                    offset: 0x20,
                    size: 8,
                    fd_index: 1,
                    kind: IO_FD_SHADOW,
                    flags: 0,
                    datamatch: 0,
                    shadow: Some((2, 0x1000))
                },
            ]
        );
    }

    #[test]
    fn both_layouts_decode_by_stride() {
        for stride in [SPEC_RECORD, LIBVFIO_USER_RECORD] {
            let p = reply(stride, &[(0, 4, 0, 0, 7), (8, 4, 1, 1, 9)]);
            let r = decode_region_io_fds(&p, 3, 4096, 2).unwrap();
            assert_eq!(r.stride, stride);
            assert_eq!(r.records[1].datamatch, 9);
            assert_eq!(r.records[1].fd_index, 1);
        }
    }

    #[test]
    fn lies_are_refused() {
        let p = reply(40, &[(0, 4, 0, 0, 7)]);
        assert!(
            decode_region_io_fds(&p, 4, 4096, 1).is_err(),
            "other region"
        );
        assert!(
            decode_region_io_fds(&p, 3, 2, 1).is_err(),
            "past the region"
        );
        assert!(
            decode_region_io_fds(&p, 3, 4096, 0).is_err(),
            "fd index past the fds"
        );
        let mut odd = reply(40, &[(0, 4, 0, 0, 7), (8, 4, 0, 0, 7)]);
        put_u32(&mut odd, 0, 16 + 81);
        odd.push(0);
        assert!(
            decode_region_io_fds(&odd, 3, 4096, 1).is_err(),
            "inexact stride"
        );
        let mut short_stride = reply(40, &[(0, 4, 0, 0, 7)]);
        put_u32(&mut short_stride, 0, 16 + 32);
        short_stride.truncate(48);
        assert!(
            decode_region_io_fds(&short_stride, 3, 4096, 1).is_err(),
            "stride 32"
        );
        let kind = reply(40, &[(0, 4, 0, 2, 7)]);
        assert!(
            decode_region_io_fds(&kind, 3, 4096, 1).is_err(),
            "shadow in the spec layout"
        );
        // Asked with too little room: the count and argsz only.
        let mut room = reply(48, &[(0, 4, 0, 0, 7)]);
        room.truncate(16);
        let r = decode_region_io_fds(&room, 3, 4096, 0).unwrap();
        assert_eq!((r.argsz, r.count, r.records.len()), (64, 1, 0));
    }
}
