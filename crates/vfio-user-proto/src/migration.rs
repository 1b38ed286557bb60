//! MIG_DATA_READ (17) and MIG_DATA_WRITE (18), the device-state stream: protocol.md 3.13.

use crate::bytes::{put_u32, u32_at};
use crate::ProtoError;

/// argsz and size, in front of the data.
pub const MIG_DATA_HEADER: usize = 8;

/// A MIG_DATA_READ request for up to `size` bytes.
pub fn mig_data_read_request(size: u32) -> [u8; MIG_DATA_HEADER] {
    let mut p = [0u8; MIG_DATA_HEADER];
    put_u32(&mut p, 0, (MIG_DATA_HEADER as u32).saturating_add(size));
    put_u32(&mut p, 4, size);
    p
}

/// The data of a MIG_DATA_READ reply to a request for `asked` bytes: at most that many, and
/// exactly as many as its size field says. Fewer than asked means the stream has ended.
pub fn mig_data_read_data(payload: &[u8], asked: u32) -> Result<&[u8], ProtoError> {
    let Some(size) = u32_at(payload, 4) else {
        return Err(ProtoError::new(format!(
            "MIG_DATA_READ reply is {} bytes, less than {MIG_DATA_HEADER}",
            payload.len()
        )));
    };
    let data = &payload[MIG_DATA_HEADER..];
    if size > asked || data.len() != size as usize {
        return Err(ProtoError::new(format!(
            "MIG_DATA_READ reply says {size} bytes and carries {} (asked for {asked})",
            data.len()
        )));
    }
    Ok(data)
}

/// A MIG_DATA_WRITE request carrying `data`.
pub fn mig_data_write_request(data: &[u8]) -> Vec<u8> {
    let len = MIG_DATA_HEADER + data.len();
    let mut p = vec![0u8; len];
    put_u32(&mut p, 0, len as u32);
    put_u32(&mut p, 4, data.len() as u32);
    p[MIG_DATA_HEADER..].copy_from_slice(data);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_by_what_was_asked_and_their_size_field() {
        let mut r = mig_data_read_request(4).to_vec();
        r[4..8].copy_from_slice(&3u32.to_ne_bytes());
        r.extend_from_slice(&[1, 2, 3]);
        assert_eq!(mig_data_read_data(&r, 4).unwrap(), &[1, 2, 3]);
        assert!(mig_data_read_data(&r, 2).is_err());
        assert!(mig_data_read_data(&r[..10], 4).is_err());
        assert_eq!(mig_data_write_request(&[9; 5])[0..4], 13u32.to_ne_bytes());
    }
}
