//! DMA_MAP (2), DMA_UNMAP (3), and the server's DMA_READ (11) / DMA_WRITE (12) requests:
//! protocol.md sections 3.1, 3.2 and 3.11. The DMA_READ/WRITE layout is the spec's (and
//! libvfio-user's): address u64, count u64, then data; not QEMU's.

use crate::bytes::{put_u32, put_u64, u64_at};
use crate::ProtoError;

pub const DMA_MAP_SIZE: usize = 32;
pub const DMA_UNMAP_SIZE: usize = 24;
/// DMA_MAP flags: the device may read / write the range.
pub const DMA_FLAG_READ: u32 = 1 << 0;
pub const DMA_FLAG_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flag: unmap everything (address and size 0). rust-vmm's crate numbers it
/// differently; this is libvfio-user's and QEMU's.
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
/// The address and count in front of a DMA_READ/DMA_WRITE request's data and reply.
pub const DMA_ACCESS_SIZE: usize = 16;

/// The DMA_MAP request payload.
pub fn dma_map_request(flags: u32, fd_offset: u64, iova: u64, size: u64) -> [u8; DMA_MAP_SIZE] {
    let mut p = [0u8; DMA_MAP_SIZE];
    put_u32(&mut p, 0, DMA_MAP_SIZE as u32);
    put_u32(&mut p, 4, flags);
    put_u64(&mut p, 8, fd_offset);
    put_u64(&mut p, 16, iova);
    put_u64(&mut p, 24, size);
    p
}

/// The DMA_UNMAP request payload (`flags` [`DMA_UNMAP_FLAG_ALL`] with iova and size 0 unmaps
/// everything).
pub fn dma_unmap_request(flags: u32, iova: u64, size: u64) -> [u8; DMA_UNMAP_SIZE] {
    let mut p = [0u8; DMA_UNMAP_SIZE];
    put_u32(&mut p, 0, DMA_UNMAP_SIZE as u32);
    put_u32(&mut p, 4, flags);
    put_u64(&mut p, 8, iova);
    put_u64(&mut p, 16, size);
    p
}

/// A server's DMA_READ or DMA_WRITE request: the range, and for a write its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAccess<'a> {
    pub address: u64,
    pub count: u64,
    /// DMA_WRITE only: exactly `count` bytes.
    pub data: &'a [u8],
}

/// Decodes a DMA_READ (`write` false) or DMA_WRITE request payload. `max` is our
/// `max_data_xfer_size`: a bigger count is refused (E2BIG by the caller).
pub fn decode_dma_request(payload: &[u8], write: bool) -> Result<DmaAccess<'_>, ProtoError> {
    let what = if write { "DMA_WRITE" } else { "DMA_READ" };
    let (Some(address), Some(count)) = (u64_at(payload, 0), u64_at(payload, 8)) else {
        return Err(ProtoError::new(format!(
            "{what} request is {} bytes, less than {DMA_ACCESS_SIZE}",
            payload.len()
        )));
    };
    if address.checked_add(count).is_none() {
        return Err(ProtoError::new(format!(
            "{what} of {count} bytes at {address:#x} wraps around"
        )));
    }
    let data = &payload[DMA_ACCESS_SIZE..];
    if write && data.len() as u64 != count {
        return Err(ProtoError::new(format!(
            "DMA_WRITE says {count} bytes but carries {}",
            data.len()
        )));
    }
    if !write && !data.is_empty() {
        return Err(ProtoError::new(format!(
            "DMA_READ request carries {} bytes of data",
            data.len()
        )));
    }
    Ok(DmaAccess {
        address,
        count,
        data,
    })
}

/// The front of a DMA_READ/DMA_WRITE reply: the request's address and count echoed (a
/// DMA_READ reply's data follows it).
pub fn dma_reply_head(address: u64, count: u64) -> [u8; DMA_ACCESS_SIZE] {
    let mut p = [0u8; DMA_ACCESS_SIZE];
    put_u64(&mut p, 0, address);
    put_u64(&mut p, 8, count);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_have_the_specs_layout() {
        let m = dma_map_request(DMA_FLAG_READ | DMA_FLAG_WRITE, 8, 0x1000, 0x2000);
        assert_eq!(m[0..4], 32u32.to_ne_bytes());
        assert_eq!(u64_at(&m, 16), Some(0x1000));
        let u = dma_unmap_request(DMA_UNMAP_FLAG_ALL, 0, 0);
        assert_eq!(u[4..8], 2u32.to_ne_bytes());
        let mut w = dma_reply_head(0x1000, 4).to_vec();
        w.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decode_dma_request(&w, true).unwrap().data, &[1, 2, 3, 4]);
        assert!(decode_dma_request(&w, false).is_err());
        assert!(decode_dma_request(&w[..19], true).is_err());
        assert!(decode_dma_request(&dma_reply_head(u64::MAX, 2), false).is_err());
        assert_eq!(
            decode_dma_request(&dma_reply_head(8, 2), false)
                .unwrap()
                .count,
            2
        );
    }
}
