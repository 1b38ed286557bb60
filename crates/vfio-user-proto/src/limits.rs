//! How big a peer's message may be, and how many fds it may carry, decided before anything is
//! allocated for it.

use crate::bytes::u32_at;
use crate::caps::MAX_DATA_XFER_SIZE_LIMIT;
use crate::{Capabilities, Command, HEADER_SIZE};

/// No frame may claim more than this: the largest data transfer we ever accept plus room for
/// headers. A larger `msg_size` means the stream is corrupt or hostile, and it is closed.
pub const MAX_INCOMING_MESSAGE: usize = MAX_DATA_XFER_SIZE_LIMIT as usize + 4096;

/// Replies whose size is not tied to the request (VERSION JSON, unknown commands).
const SMALL_REPLY_LIMIT: usize = HEADER_SIZE + 64 * 1024;

/// The largest whole reply message acceptable for a request of `command` with `payload`.
/// A bigger reply fails that request (the rest of the stream is unaffected).
pub fn reply_size_limit(command: u16, payload: &[u8]) -> usize {
    let argsz = |fixed: usize| {
        let asked = u32_at(payload, 0).map_or(0, |a| a as usize);
        HEADER_SIZE + asked.max(fixed)
    };
    match Command::from_u16(command) {
        // Access header (16) plus the data asked for.
        Some(Command::RegionRead) => {
            HEADER_SIZE + 16 + u32_at(payload, 12).map_or(0, |c| c as usize)
        }
        Some(Command::RegionWrite) => HEADER_SIZE + 16,
        // No reply payload in the spec; some servers echo the request.
        Some(Command::DmaMap) | Some(Command::DeviceSetIrqs) | Some(Command::DeviceReset) => {
            HEADER_SIZE + payload.len().max(32)
        }
        // argsz in the request is the largest reply payload the client accepts.
        Some(Command::DmaUnmap) => argsz(24),
        Some(Command::DeviceGetInfo) => argsz(16),
        Some(Command::DeviceGetRegionInfo) => argsz(32),
        Some(Command::DeviceGetRegionIoFds) => argsz(16),
        Some(Command::DeviceGetIrqInfo) => argsz(16),
        Some(Command::DeviceFeature) => argsz(8),
        Some(Command::MigDataRead) => argsz(8),
        Some(Command::MigDataWrite) => HEADER_SIZE + 8,
        Some(Command::RegionWriteMulti) => HEADER_SIZE + 8,
        _ => SMALL_REPLY_LIMIT,
    }
    .min(MAX_INCOMING_MESSAGE)
}

/// Checks a request we are about to send against what the server accepts: a REGION_READ or
/// REGION_WRITE moving more than its `max_data_xfer_size` (the count asked for, or the data
/// carried) is refused before it is sent. Returns what is wrong.
pub fn check_request(command: u16, payload: &[u8], server: &Capabilities) -> Result<(), String> {
    let max = server.max_data_xfer_size;
    let (count, what) = match Command::from_u16(command) {
        Some(Command::RegionRead) => (u32_at(payload, 12).map_or(0, u64::from), "read"),
        Some(Command::RegionWrite) => {
            let count = u32_at(payload, 12).map_or(0, u64::from);
            let data = payload.len().saturating_sub(16) as u64;
            (count.max(data), "write")
        }
        _ => return Ok(()),
    };
    if count > max {
        return Err(format!(
            "{} of {count} bytes exceeds the server's max_data_xfer_size of {max}",
            if what == "read" {
                "REGION_READ"
            } else {
                "REGION_WRITE"
            }
        ));
    }
    Ok(())
}

/// How many fds a reply to `command` may carry; `our_max_fds` is what we advertised.
pub fn reply_fd_limit(command: u16, our_max_fds: u32) -> usize {
    match Command::from_u16(command) {
        Some(Command::DeviceGetRegionInfo) => 1,
        Some(Command::DeviceGetRegionIoFds) => our_max_fds as usize,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_reply_bounded_by_count() {
        let mut p = [0u8; 16];
        p[12..16].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(reply_size_limit(9, &p), 32 + 4096);
        // A truncated request cannot make the limit blow up.
        assert_eq!(reply_size_limit(9, &[]), 32);
    }

    #[test]
    fn argsz_bounded() {
        let mut p = [0u8; 32];
        p[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(reply_size_limit(5, &p), MAX_INCOMING_MESSAGE);
        p[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert_eq!(reply_size_limit(5, &p), 80);
        assert_eq!(reply_size_limit(4, &[]), 32);
        assert_eq!(reply_size_limit(999, &[]), SMALL_REPLY_LIMIT);
    }

    #[test]
    fn transfers_bounded_by_the_servers_max_data_xfer_size() {
        let caps = Capabilities {
            max_data_xfer_size: 4096,
            ..Capabilities::default()
        };
        let mut read = [0u8; 16];
        read[12..16].copy_from_slice(&4096u32.to_ne_bytes());
        assert_eq!(check_request(9, &read, &caps), Ok(()));
        read[12..16].copy_from_slice(&4097u32.to_ne_bytes());
        assert!(check_request(9, &read, &caps)
            .unwrap_err()
            .contains("max_data_xfer_size of 4096"));
        // A write is judged by its count and by the data it carries, whichever is larger.
        let mut write = vec![0u8; 16 + 5000];
        write[12..16].copy_from_slice(&8u32.to_ne_bytes());
        assert!(check_request(10, &write, &caps).is_err());
        write.truncate(16 + 8);
        assert_eq!(check_request(10, &write, &caps), Ok(()));
        assert_eq!(check_request(4, &[], &caps), Ok(()));
    }

    #[test]
    fn fd_limits() {
        assert_eq!(reply_fd_limit(5, 16), 1);
        assert_eq!(reply_fd_limit(6, 16), 16);
        assert_eq!(reply_fd_limit(1, 16), 0);
        assert_eq!(reply_fd_limit(9, 16), 0);
    }
}
