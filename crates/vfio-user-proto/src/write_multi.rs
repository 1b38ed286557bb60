//! REGION_WRITE_MULTI (15): protocol.md 3.9. Small posted writes (at most 8 bytes each)
//! carried in one message, `wr_cnt` (u64) then that many 24-byte entries: offset (u64), region
//! (u32), count (u32), data (8 bytes, the first `count` used). Only for a peer that offered
//! `write_multiple`; QEMU sends at most 200 entries a message, and so do we.

use crate::bytes::{put_u32, u32_at, u64_at};
use crate::{Command, Header, ProtoError, HEADER_SIZE};

pub const WRITE_MULTI_ENTRY: usize = 24;
pub const WRITE_MULTI_MAX_ENTRIES: u64 = 200;
pub const WRITE_MULTI_MAX_DATA: usize = 8;
/// The REGION_WRITE access header in front of a write's data.
const ACCESS: usize = 16;

/// One write of a REGION_WRITE_MULTI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmallWrite<'a> {
    pub offset: u64,
    pub region: u32,
    pub data: &'a [u8],
}

/// The write a REGION_WRITE payload makes, when it is small enough to be an entry: 1 to 8
/// bytes, and exactly as many as its count says.
pub fn small_write(payload: &[u8]) -> Option<SmallWrite<'_>> {
    let count = u32_at(payload, 12)? as usize;
    let data = payload.get(ACCESS..)?;
    (data.len() == count && (1..=WRITE_MULTI_MAX_DATA).contains(&count)).then(|| SmallWrite {
        offset: u64_at(payload, 0).unwrap_or(0),
        region: u32_at(payload, 8).unwrap_or(0),
        data,
    })
}

/// A whole REGION_WRITE_MULTI message (header with `No_reply`, then `wr_cnt`) holding `w`.
pub fn write_multi_message(id: u16, w: SmallWrite<'_>) -> Vec<u8> {
    let mut msg = Vec::with_capacity(HEADER_SIZE + 8 + 4 * WRITE_MULTI_ENTRY);
    msg.extend_from_slice(&Header::command(id, Command::RegionWriteMulti as u16, 8, true).encode());
    msg.extend_from_slice(&0u64.to_ne_bytes());
    append_write(&mut msg, w);
    msg
}

/// Appends `w` to a message made by [`write_multi_message`]: its size and `wr_cnt` follow.
/// False (and nothing changed) when it already holds [`WRITE_MULTI_MAX_ENTRIES`].
pub fn append_write(msg: &mut Vec<u8>, w: SmallWrite<'_>) -> bool {
    let Some(n) = u64_at(msg, HEADER_SIZE) else {
        return false;
    };
    if n >= WRITE_MULTI_MAX_ENTRIES || w.data.len() > WRITE_MULTI_MAX_DATA {
        return false;
    }
    let mut entry = [0u8; WRITE_MULTI_ENTRY];
    entry[0..8].copy_from_slice(&w.offset.to_ne_bytes());
    put_u32(&mut entry, 8, w.region);
    put_u32(&mut entry, 12, w.data.len() as u32);
    entry[16..16 + w.data.len()].copy_from_slice(w.data);
    msg.extend_from_slice(&entry);
    msg[HEADER_SIZE..HEADER_SIZE + 8].copy_from_slice(&(n + 1).to_ne_bytes());
    let size = msg.len() as u32;
    put_u32(msg, 4, size);
    true
}

/// The writes a REGION_WRITE_MULTI payload carries (a server's view): 1 to 200 entries, the
/// payload exactly that long, each count at most 8.
pub fn decode_write_multi(payload: &[u8]) -> Result<Vec<SmallWrite<'_>>, ProtoError> {
    let n = u64_at(payload, 0)
        .ok_or_else(|| ProtoError::new("REGION_WRITE_MULTI payload is shorter than wr_cnt"))?;
    let entries = payload.get(8..).unwrap_or_default();
    if n == 0 || n > WRITE_MULTI_MAX_ENTRIES || entries.len() as u64 != n * WRITE_MULTI_ENTRY as u64
    {
        return Err(ProtoError::new(format!(
            "REGION_WRITE_MULTI says {n} entries and carries {} bytes of them",
            entries.len()
        )));
    }
    entries
        .chunks_exact(WRITE_MULTI_ENTRY)
        .map(|e| {
            let count = u32_at(e, 12).unwrap_or(u32::MAX) as usize;
            if count > WRITE_MULTI_MAX_DATA {
                return Err(ProtoError::new(format!(
                    "REGION_WRITE_MULTI entry of {count} bytes (at most 8)"
                )));
            }
            Ok(SmallWrite {
                offset: u64_at(e, 0).unwrap_or(0),
                region: u32_at(e, 8).unwrap_or(0),
                data: &e[16..16 + count],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::region_access;

    /// The message for two writes, byte for byte as protocol.md 3.9 lays it out (header, then
    /// `wr_cnt` u64, then 24-byte entries: offset u64, region u32, count u32, 8 data bytes),
    /// written by hand rather than with the encoder, so an encoder and decoder wrong the same
    /// way cannot both pass.
    #[test]
    fn a_message_is_laid_out_as_the_spec_says() {
        let a = region_access(1, 0x100, 4, Some(&[1, 2, 3, 4]));
        let b = region_access(2, 0x208, 8, Some(&[9; 8]));
        let mut msg = write_multi_message(0x1234, small_write(&a).unwrap());
        assert!(append_write(&mut msg, small_write(&b).unwrap()));
        #[rustfmt::skip]
        let want: Vec<u8> = [
            // header: id 0x1234, command 15, size 16 + 8 + 48 = 72, flags: command | No_reply, error 0
            &[0x34, 0x12, 15, 0][..], &72u32.to_le_bytes(), &0x10u32.to_le_bytes(), &[0; 4],
            &2u64.to_le_bytes(),
            // entry 0: offset 0x100, region 1, count 4, data 1 2 3 4 and 4 bytes of zeros
            &0x100u64.to_le_bytes(), &1u32.to_le_bytes(), &4u32.to_le_bytes(), &[1, 2, 3, 4, 0, 0, 0, 0],
            // entry 1: offset 0x208, region 2, count 8, data 9 x 8
            &0x208u64.to_le_bytes(), &2u32.to_le_bytes(), &8u32.to_le_bytes(), &[9; 8],
        ]
        .concat();
        assert_eq!(msg, want);
        let back = decode_write_multi(&want[HEADER_SIZE..]).unwrap();
        assert_eq!(
            back,
            vec![
                SmallWrite {
                    offset: 0x100,
                    region: 1,
                    data: &[1, 2, 3, 4]
                },
                SmallWrite {
                    offset: 0x208,
                    region: 2,
                    data: &[9; 8]
                },
            ]
        );
    }

    #[test]
    fn small_writes_become_entries_and_decode_back() {
        let a = region_access(1, 0x100, 4, Some(&[1, 2, 3, 4]));
        let b = region_access(2, 0x208, 8, Some(&[9; 8]));
        let (wa, wb) = (small_write(&a).unwrap(), small_write(&b).unwrap());
        let mut msg = write_multi_message(7, wa);
        assert!(append_write(&mut msg, wb));
        let h = Header::decode(msg[..HEADER_SIZE].try_into().unwrap());
        assert_eq!((h.id, h.command, h.size as usize), (7, 15, msg.len()));
        assert!(h.no_reply());
        assert_eq!(
            decode_write_multi(&msg[HEADER_SIZE..]).unwrap(),
            vec![wa, wb]
        );
    }

    #[test]
    fn only_writes_of_one_to_eight_bytes_qualify() {
        assert!(small_write(&region_access(0, 0, 9, Some(&[0; 9]))).is_none());
        assert!(small_write(&region_access(0, 0, 0, Some(&[]))).is_none());
        let mut lying = region_access(0, 0, 4, Some(&[0; 4]));
        lying.push(0);
        assert!(small_write(&lying).is_none());
    }

    #[test]
    fn a_message_holds_at_most_200_entries_and_bad_ones_are_refused() {
        let p = region_access(0, 0, 1, Some(&[1]));
        let w = small_write(&p).unwrap();
        let mut msg = write_multi_message(1, w);
        for _ in 1..200 {
            assert!(append_write(&mut msg, w));
        }
        assert!(!append_write(&mut msg, w));
        assert_eq!(decode_write_multi(&msg[HEADER_SIZE..]).unwrap().len(), 200);
        assert!(decode_write_multi(&msg[HEADER_SIZE..msg.len() - 1]).is_err());
        assert!(decode_write_multi(&0u64.to_ne_bytes()).is_err());
        let mut big = write_multi_message(1, w)[HEADER_SIZE..].to_vec();
        big[8 + 12] = 9;
        assert!(decode_write_multi(&big).is_err());
    }
}
