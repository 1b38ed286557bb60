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

/// The data of a MIG_DATA_READ reply to a request for `asked` bytes: its `size` field's worth,
/// at most `asked`, from the front of what follows the header. Fewer than asked means the
/// stream (or the pre-copy round) has ended.
///
/// The payload may carry more than `size` bytes: libvfio-user allocates the reply for the size
/// *asked* and sends it whole, the real count in `size` and the rest zeros (protocol.md 7). So
/// `size` is trusted, bounded by what came and by what was asked, and the padding (itself
/// never more than was asked) is not data.
pub fn mig_data_read_data(payload: &[u8], asked: u32) -> Result<&[u8], ProtoError> {
    let Some(size) = u32_at(payload, 4) else {
        return Err(ProtoError::new(format!(
            "MIG_DATA_READ reply is {} bytes, less than {MIG_DATA_HEADER}",
            payload.len()
        )));
    };
    let carried = payload.len() - MIG_DATA_HEADER;
    if size > asked || carried < size as usize || carried > asked as usize {
        return Err(ProtoError::new(format!(
            "MIG_DATA_READ reply says {size} bytes and carries {carried} (asked for {asked})"
        )));
    }
    Ok(&payload[MIG_DATA_HEADER..MIG_DATA_HEADER + size as usize])
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

    /// The requests byte for byte as protocol.md 3.13 lays them out (argsz, size, data), written
    /// by hand: libvfio-user refuses a read whose argsz is less than 8 + size, and a write
    /// whose payload holds less than `size` bytes (lib/migration.c).
    #[test]
    fn requests_are_laid_out_as_the_spec_says() {
        let read: Vec<u8> = [&(8u32 + 0x4000).to_le_bytes()[..], &0x4000u32.to_le_bytes()].concat();
        assert_eq!(mig_data_read_request(0x4000).to_vec(), read);
        let write: Vec<u8> = [&11u32.to_le_bytes()[..], &3u32.to_le_bytes(), &[5, 6, 7]].concat();
        assert_eq!(mig_data_write_request(&[5, 6, 7]), write);
    }

    /// libvfio-user's reply to a read of 8 bytes when 3 are left (lib/migration.c
    /// handle_mig_data_read): the payload is allocated for the size asked, `argsz` and `size`
    /// say 3, and 5 zeros follow the data. Written out by hand, not with our encoder.
    #[test]
    fn a_reply_padded_to_the_size_asked_gives_size_bytes() {
        let mut r = Vec::new();
        r.extend_from_slice(&11u32.to_ne_bytes()); // argsz: 8 + 3
        r.extend_from_slice(&3u32.to_ne_bytes()); // size: 3 returned
        r.extend_from_slice(&[7, 8, 9, 0, 0, 0, 0, 0]); // data, then padding to 8 asked
        assert_eq!(mig_data_read_data(&r, 8).unwrap(), &[7, 8, 9]);
        // An empty read, padded: the stream ended, nothing is data.
        let mut end = vec![0u8; 16];
        end[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(mig_data_read_data(&end, 8).unwrap(), &[] as &[u8]);
        // Padding past what was asked is not a server's to send.
        assert!(mig_data_read_data(&r, 7).is_err());
        // A size past what came is refused, however much was asked.
        r[4..8].copy_from_slice(&9u32.to_ne_bytes());
        assert!(mig_data_read_data(&r, 16).is_err());
    }
}
