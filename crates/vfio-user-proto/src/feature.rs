//! DEVICE_FEATURE (16) and the migration v2 state machine: protocol.md section 3.12.

use crate::bytes::{put_u32, u32_at, u64_at};
use crate::ProtoError;

pub const FEATURE_GET: u32 = 1 << 16;
pub const FEATURE_SET: u32 = 1 << 17;
pub const FEATURE_PROBE: u32 = 1 << 18;
pub const FEATURE_MIGRATION: u16 = 1;
pub const FEATURE_MIG_DEVICE_STATE: u16 = 2;
/// MIGRATION feature flags.
pub const MIGRATION_STOP_COPY: u64 = 1;
pub const MIGRATION_P2P: u64 = 2;
pub const MIGRATION_PRE_COPY: u64 = 4;
/// The fixed part of a DEVICE_FEATURE payload: argsz and flags.
pub const FEATURE_HEADER: usize = 8;

/// A DEVICE_FEATURE request: `feature` with the GET/SET/PROBE bits, accepting `argsz` bytes
/// of reply, then `data`. The combination rules are checked: at least one of GET, SET and
/// PROBE, and GET with SET only when probing.
pub fn feature_request(feature: u16, ops: u32, argsz: u32, data: &[u8]) -> Result<Vec<u8>, String> {
    if ops & !(FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0 || ops == 0 {
        return Err("a DEVICE_FEATURE request must GET, SET or PROBE".into());
    }
    if ops & FEATURE_GET != 0 && ops & FEATURE_SET != 0 && ops & FEATURE_PROBE == 0 {
        return Err("GET and SET together are only allowed with PROBE".into());
    }
    let mut p = vec![0u8; FEATURE_HEADER + data.len()];
    let argsz = argsz.max(p.len() as u32);
    put_u32(&mut p, 0, argsz);
    put_u32(&mut p, 4, u32::from(feature) | ops);
    p[FEATURE_HEADER..].copy_from_slice(data);
    Ok(p)
}

/// Checks a DEVICE_FEATURE reply to a request with `flags` and returns its data.
pub fn feature_reply_data(payload: &[u8], flags: u32) -> Result<&[u8], ProtoError> {
    let Some(echoed) = u32_at(payload, 4) else {
        return Err(ProtoError::new(format!(
            "DEVICE_FEATURE reply is {} bytes, less than {FEATURE_HEADER}",
            payload.len()
        )));
    };
    if echoed != flags {
        return Err(ProtoError::new(format!(
            "DEVICE_FEATURE reply echoes flags {echoed:#x}, not {flags:#x}"
        )));
    }
    Ok(&payload[FEATURE_HEADER..])
}

/// The MIGRATION feature's flags (GET); a device that cannot STOP_COPY cannot migrate.
pub fn decode_migration_flags(data: &[u8]) -> Result<u64, ProtoError> {
    let flags = u64_at(data, 0).ok_or_else(|| {
        ProtoError::new(format!(
            "MIGRATION feature data is {} bytes, not 8",
            data.len()
        ))
    })?;
    if flags & MIGRATION_STOP_COPY == 0 {
        return Err(ProtoError::new(format!(
            "MIGRATION feature flags {flags:#x} lack STOP_COPY, which every migratable device has"
        )));
    }
    Ok(flags)
}

/// The MIG_DEVICE_STATE data: a state and the (unused) data fd, -1.
pub fn device_state_data(state: u32) -> [u8; 8] {
    let mut d = [0u8; 8];
    put_u32(&mut d, 0, state);
    put_u32(&mut d, 4, u32::MAX);
    d
}

/// The state a MIG_DEVICE_STATE reply reports.
pub fn decode_device_state(data: &[u8]) -> Result<MigState, ProtoError> {
    let raw = u32_at(data, 0).ok_or_else(|| {
        ProtoError::new(format!(
            "MIG_DEVICE_STATE data is {} bytes, not 8",
            data.len()
        ))
    })?;
    MigState::from_u32(raw)
        .ok_or_else(|| ProtoError::new(format!("MIG_DEVICE_STATE reports unknown state {raw}")))
}

/// Migration v2 device states.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl MigState {
    pub fn from_u32(v: u32) -> Option<MigState> {
        use MigState::*;
        [
            Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }

    /// True when the spec allows going from this state to `to` in one step (a direct arc).
    pub fn has_arc_to(self, to: MigState) -> bool {
        self.arcs().contains(&to)
    }

    /// The states a device goes to in one step from this one (the spec's arcs).
    fn arcs(self) -> &'static [MigState] {
        use MigState::*;
        match self {
            Running => &[Stop, PreCopy],
            Stop => &[Running, StopCopy, Resuming],
            StopCopy => &[Stop],
            Resuming => &[Stop],
            PreCopy => &[Running, StopCopy],
            _ => &[],
        }
    }

    /// A state that saves device data: never passed through on the way somewhere else.
    fn saving(self) -> bool {
        matches!(self, MigState::StopCopy | MigState::PreCopy)
    }
}

/// The steps from `from` to `to`, each a direct arc: the shortest path with no saving state
/// in the middle. Refused: leaving ERROR (only a reset does), asking for ERROR or a P2P
/// state, and STOP_COPY to PRE_COPY.
pub fn migration_path(from: MigState, to: MigState) -> Result<Vec<MigState>, String> {
    use MigState::*;
    if from == Error {
        return Err("a device in ERROR leaves it only through DEVICE_RESET".into());
    }
    if matches!(to, Error | RunningP2p | PreCopyP2p) {
        return Err(format!("{to:?} cannot be asked for"));
    }
    if from == StopCopy && to == PreCopy {
        return Err("STOP_COPY to PRE_COPY is forbidden".into());
    }
    if from == to {
        return Ok(Vec::new());
    }
    // Breadth first over at most 8 states.
    let mut prev: [Option<MigState>; 8] = [None; 8];
    let mut queue = std::collections::VecDeque::from([from]);
    let mut seen = [false; 8];
    seen[from as usize] = true;
    while let Some(s) = queue.pop_front() {
        if s == to {
            let mut path = vec![to];
            let mut at = to;
            while let Some(p) = prev[at as usize] {
                if p == from {
                    break;
                }
                path.push(p);
                at = p;
            }
            path.reverse();
            return Ok(path);
        }
        if s != from && s.saving() {
            continue;
        }
        for &n in s.arcs() {
            if !seen[n as usize] {
                seen[n as usize] = true;
                prev[n as usize] = Some(s);
                queue.push_back(n);
            }
        }
    }
    Err(format!("no way from {from:?} to {to:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    #[test]
    fn paths_take_the_arcs_and_never_pass_a_saving_state() {
        assert_eq!(
            migration_path(Running, StopCopy).unwrap(),
            vec![Stop, StopCopy]
        );
        assert_eq!(migration_path(PreCopy, Stop).unwrap(), vec![Running, Stop]);
        assert_eq!(
            migration_path(Resuming, Running).unwrap(),
            vec![Stop, Running]
        );
        assert_eq!(
            migration_path(StopCopy, Running).unwrap(),
            vec![Stop, Running]
        );
        assert_eq!(
            migration_path(Running, Resuming).unwrap(),
            vec![Stop, Resuming]
        );
        assert_eq!(migration_path(PreCopy, StopCopy).unwrap(), vec![StopCopy]);
        assert_eq!(migration_path(Stop, Stop).unwrap(), Vec::<MigState>::new());
        assert!(migration_path(StopCopy, PreCopy).is_err());
        assert!(migration_path(Error, Stop).is_err());
        assert!(migration_path(Running, Error).is_err());
        assert!(migration_path(Running, RunningP2p).is_err());
    }

    #[test]
    fn requests_follow_the_combination_rules() {
        let p = feature_request(FEATURE_MIGRATION, FEATURE_GET, 16, &[]).unwrap();
        assert_eq!(u32_at(&p, 0), Some(16));
        assert_eq!(u32_at(&p, 4), Some(1 | FEATURE_GET));
        assert!(feature_request(1, FEATURE_GET | FEATURE_SET, 16, &[]).is_err());
        assert!(feature_request(1, FEATURE_GET | FEATURE_SET | FEATURE_PROBE, 16, &[]).is_ok());
        assert!(feature_request(1, 0, 16, &[]).is_err());
        let mut reply = p.clone();
        reply.extend_from_slice(&5u64.to_ne_bytes());
        let data = feature_reply_data(&reply, 1 | FEATURE_GET).unwrap();
        assert_eq!(decode_migration_flags(data).unwrap(), 5);
        assert!(decode_migration_flags(&4u64.to_ne_bytes()).is_err());
        assert!(feature_reply_data(&reply, 2 | FEATURE_GET).is_err());
        assert_eq!(decode_device_state(&device_state_data(6)).unwrap(), PreCopy);
        assert!(decode_device_state(&device_state_data(9)).is_err());
    }
}

/// DMA dirty-page logging features (SET start and stop, GET report).
pub const FEATURE_DMA_LOGGING_START: u16 = 6;
pub const FEATURE_DMA_LOGGING_STOP: u16 = 7;
pub const FEATURE_DMA_LOGGING_REPORT: u16 = 8;
/// The fixed part of a DMA_LOGGING_REPORT's data: iova, length, page size.
pub const REPORT_HEADER: usize = 24;

/// DMA_LOGGING_START data: the page size, then the ranges (none: log everything).
pub fn logging_start_data(page_size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut d = Vec::with_capacity(16 + 16 * ranges.len());
    d.extend_from_slice(&page_size.to_ne_bytes());
    d.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
    d.extend_from_slice(&[0; 4]);
    for (iova, length) in ranges {
        d.extend_from_slice(&iova.to_ne_bytes());
        d.extend_from_slice(&length.to_ne_bytes());
    }
    d
}

/// The page size a DMA_LOGGING_START reply settled on (a server may change it).
pub fn logging_start_page_size(data: &[u8]) -> Result<u64, ProtoError> {
    let page = u64_at(data, 0).ok_or_else(|| {
        ProtoError::new(format!(
            "DMA_LOGGING_START reply data is {} bytes",
            data.len()
        ))
    })?;
    if !page.is_power_of_two() {
        return Err(ProtoError::new(format!(
            "DMA_LOGGING_START settled on a page size of {page}, not a power of two"
        )));
    }
    Ok(page)
}

/// DMA_LOGGING_REPORT request data.
pub fn logging_report_data(iova: u64, length: u64, page_size: u64) -> [u8; REPORT_HEADER] {
    let mut d = [0u8; REPORT_HEADER];
    d[0..8].copy_from_slice(&iova.to_ne_bytes());
    d[8..16].copy_from_slice(&length.to_ne_bytes());
    d[16..24].copy_from_slice(&page_size.to_ne_bytes());
    d
}

/// Bytes of bitmap a report of `length` bytes in pages of `page_size` carries: one bit a
/// page, in whole u64 words.
pub fn bitmap_bytes(length: u64, page_size: u64) -> u64 {
    length.div_ceil(page_size.max(1)).div_ceil(64) * 8
}

/// The dirty ranges a DMA_LOGGING_REPORT reply's data says, for a request of `length` bytes
/// at `iova` in pages of `page_size`: bit i (word i/64, bit i%64) is page i. The request must
/// be echoed and every bit past the range must be 0 (else EPROTO). Adjacent dirty pages are
/// merged; each range is (iova, length).
pub fn decode_dirty_bitmap(
    data: &[u8],
    iova: u64,
    length: u64,
    page_size: u64,
) -> Result<Vec<(u64, u64)>, ProtoError> {
    let bad = |what: String| ProtoError::new(format!("DMA_LOGGING_REPORT reply: {what}"));
    let echo = (u64_at(data, 0), u64_at(data, 8), u64_at(data, 16));
    if echo != (Some(iova), Some(length), Some(page_size)) {
        return Err(bad(format!(
            "echoes {echo:?}, not ({iova}, {length}, {page_size})"
        )));
    }
    if page_size == 0 || iova.checked_add(length).is_none() {
        return Err(bad(format!(
            "a range of {length} bytes at {iova:#x} in pages of {page_size}"
        )));
    }
    let pages = length.div_ceil(page_size);
    let need = bitmap_bytes(length, page_size) as usize;
    let bitmap = &data[REPORT_HEADER..];
    if bitmap.len() < need {
        return Err(bad(format!(
            "{} bytes of bitmap, {need} needed",
            bitmap.len()
        )));
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for w in 0..need / 8 {
        let word = u64_at(bitmap, w * 8).unwrap_or(0);
        for b in 0..64 {
            if word & (1u64 << b) == 0 {
                continue;
            }
            let page = (w * 64 + b) as u64;
            if page >= pages {
                return Err(bad(format!(
                    "page {page} is marked dirty, past the {pages} asked for"
                )));
            }
            let start = iova + page * page_size;
            let len = page_size.min(length - page * page_size);
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => ranges.push((start, len)),
            }
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod logging_tests {
    use super::*;

    fn report(iova: u64, length: u64, page: u64, words: &[u64]) -> Vec<u8> {
        let mut d = logging_report_data(iova, length, page).to_vec();
        for w in words {
            d.extend_from_slice(&w.to_ne_bytes());
        }
        d
    }

    #[test]
    fn bit_i_is_page_i_and_bits_past_the_range_are_refused() {
        let d = report(0x10000, 10 * 4096, 4096, &[0b10_0110]);
        assert_eq!(
            decode_dirty_bitmap(&d, 0x10000, 10 * 4096, 4096).unwrap(),
            vec![(0x11000, 8192), (0x15000, 4096)]
        );
        // Page 64 lives in word 1, bit 0.
        let d = report(0, 70 * 4096, 4096, &[0, 1]);
        assert_eq!(
            decode_dirty_bitmap(&d, 0, 70 * 4096, 4096).unwrap(),
            vec![(64 * 4096, 4096)]
        );
        let past = report(0, 10 * 4096, 4096, &[1 << 10]);
        assert!(decode_dirty_bitmap(&past, 0, 10 * 4096, 4096).is_err());
        let short = report(0, 70 * 4096, 4096, &[0]);
        assert!(decode_dirty_bitmap(&short, 0, 70 * 4096, 4096).is_err());
        let other = report(4096, 10 * 4096, 4096, &[0]);
        assert!(decode_dirty_bitmap(&other, 0, 10 * 4096, 4096).is_err());
        assert_eq!(bitmap_bytes(65 * 4096, 4096), 16);
        assert_eq!(
            logging_start_page_size(&logging_start_data(4096, &[])).unwrap(),
            4096
        );
        assert!(logging_start_page_size(&3000u64.to_ne_bytes()).is_err());
    }
}
