//! What a message says, field by field, for someone watching the traffic (the tap): the
//! decoded fields of any request or reply of either side, as a JSON object. It never fails:
//! what cannot be decoded is said as such, with the reason, and the message is still shown.
//! Only a message's first bytes are needed ([`DESCRIBE_PREFIX`], more for VERSION); data
//! (region, DMA and migration data) is shown as its size and first bytes.

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::dma::{
    DMA_ACCESS_SIZE, DMA_FLAG_READ, DMA_FLAG_WRITE, DMA_MAP_SIZE, DMA_UNMAP_FLAG_ALL,
    DMA_UNMAP_SIZE,
};
use crate::feature::{
    MigState, FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP,
    FEATURE_GET, FEATURE_HEADER, FEATURE_MIGRATION, FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE,
    FEATURE_SET, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY,
};
use crate::irq::{
    IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE, SET_IRQS_SIZE,
};
use crate::migration::MIG_DATA_HEADER;
use crate::region::ACCESS_HEADER_SIZE;
use crate::{command_name, Command, Header, HEADER_SIZE};
use serde_json::{json, Map, Value};

/// Payload bytes a description needs besides the data head: every fixed request and reply
/// layout fits (REGION_INFO's sparse areas are summarised by count).
pub const DESCRIBE_PREFIX: usize = 128;
/// Payload bytes kept for a VERSION message (its capability JSON).
pub const VERSION_PREFIX: usize = 8192;

/// A message described: its fields, the data it carries (size and first bytes), and, when
/// it could not be decoded, why.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub fields: Map<String, Value>,
    /// Bytes of data (region, DMA or migration data) the message carries.
    pub data_len: u64,
    /// Where the data starts in the payload, when there is data.
    pub data_at: Option<usize>,
    pub undecodable: Option<String>,
}

/// How many payload bytes to keep to describe a message with `header`, showing `head` bytes
/// of its data.
pub fn prefix_needed(header: &Header, head: usize) -> usize {
    let want = if header.command == Command::Version as u16 {
        VERSION_PREFIX
    } else {
        DESCRIBE_PREFIX + head
    };
    want.min(header.payload_len())
}

fn hex(v: u64) -> Value {
    Value::String(format!("0x{v:x}"))
}

/// The errno's name (`EINVAL`), or its number when unknown.
pub fn errno_name(errno: u32) -> String {
    let e = nix_errno_name(errno as i32);
    e.unwrap_or_else(|| format!("errno {errno}"))
}

fn nix_errno_name(n: i32) -> Option<String> {
    // The names of the errnos a server is likely to send; others are shown by number.
    let name = match n {
        1 => "EPERM",
        2 => "ENOENT",
        5 => "EIO",
        9 => "EBADF",
        11 => "EAGAIN",
        12 => "ENOMEM",
        13 => "EACCES",
        14 => "EFAULT",
        16 => "EBUSY",
        17 => "EEXIST",
        19 => "ENODEV",
        22 => "EINVAL",
        28 => "ENOSPC",
        38 => "ENOSYS",
        71 => "EPROTO",
        74 => "EBADMSG",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        104 => "ECONNRESET",
        107 => "ENOTCONN",
        110 => "ETIMEDOUT",
        _ => return None,
    };
    Some(name.to_string())
}

/// What kind of message `header` starts: `"request"`, `"reply"` or `"error"` (a reply
/// reporting failure).
pub fn kind(header: &Header) -> &'static str {
    if header.is_error() {
        "error"
    } else if header.is_reply() {
        "reply"
    } else {
        "request"
    }
}

/// Describes the message with `header`, `payload` being its first bytes (at least
/// [`prefix_needed`] of them, or all of it). A header that cannot frame its message, or
/// carries flags no version defines, is said to be undecodable.
pub fn describe(header: &Header, payload: &[u8]) -> Description {
    if (header.size as usize) < HEADER_SIZE {
        return Description {
            fields: Map::new(),
            data_len: 0,
            data_at: None,
            undecodable: Some(format!(
                "a header says the message is {} bytes, less than {HEADER_SIZE}: the stream \
                 cannot be framed past it",
                header.size
            )),
        };
    }
    let mut d = describe_payload(header, payload);
    if d.undecodable.is_none() && header.unknown_flags() != 0 {
        d.undecodable = Some(format!("unknown header flags 0x{:x}", header.flags));
    }
    d
}

/// The fields of a message whose header frames it.
fn describe_payload(header: &Header, payload: &[u8]) -> Description {
    let mut d = Description {
        fields: Map::new(),
        data_len: 0,
        data_at: None,
        undecodable: None,
    };
    let reply = header.is_reply();
    let total = header.payload_len();
    // An error reply's errno is the header's (see `errno_name`); it has no fields of its own.
    if header.is_error() {
        return d;
    }
    let u32f = |at: usize| u32_at(payload, at);
    let u64f = |at: usize| u64_at(payload, at);
    let short = |what: &str, need: usize| -> Option<String> {
        (payload.len() < need)
            .then(|| format!("{what} is {} bytes, less than {need}", payload.len()))
    };
    let f = &mut d.fields;
    let cmd = Command::from_u16(header.command);
    let mut problem: Option<String> = None;
    match (cmd, reply) {
        (Some(Command::Version), _) => match (u16_at(payload, 0), u16_at(payload, 2)) {
            (Some(major), Some(minor)) => {
                f.insert("major".into(), json!(major));
                f.insert("minor".into(), json!(minor));
                let json = &payload[4..];
                let json = json.strip_suffix(&[0]).unwrap_or(json);
                if !json.is_empty() {
                    match serde_json::from_slice::<Value>(json) {
                        Ok(v) => {
                            f.insert("json".into(), v);
                        }
                        // Cut off by the prefix kept, not broken: say so, as for REGION_INFO.
                        Err(_) if payload.len() < total => {
                            f.insert("jsonBytes".into(), json!(total.saturating_sub(4)));
                        }
                        Err(e) => problem = Some(format!("its JSON does not parse: {e}")),
                    }
                }
            }
            _ => problem = short("VERSION payload", 4),
        },
        (Some(Command::DmaMap), false) => {
            problem = short("DMA_MAP request", DMA_MAP_SIZE);
            if problem.is_none() {
                let flags = u32f(4).unwrap_or(0);
                f.insert("flags".into(), json!(flags));
                f.insert("read".into(), json!(flags & DMA_FLAG_READ != 0));
                f.insert("write".into(), json!(flags & DMA_FLAG_WRITE != 0));
                f.insert("offset".into(), hex(u64f(8).unwrap_or(0)));
                f.insert("iova".into(), hex(u64f(16).unwrap_or(0)));
                f.insert("size".into(), hex(u64f(24).unwrap_or(0)));
            }
        }
        (Some(Command::DmaUnmap), _) if !(reply && payload.is_empty()) => {
            problem = short("DMA_UNMAP payload", DMA_UNMAP_SIZE);
            if problem.is_none() {
                let flags = u32f(4).unwrap_or(0);
                f.insert("flags".into(), json!(flags));
                f.insert("all".into(), json!(flags & DMA_UNMAP_FLAG_ALL != 0));
                f.insert("iova".into(), hex(u64f(8).unwrap_or(0)));
                f.insert("size".into(), hex(u64f(16).unwrap_or(0)));
            }
        }
        (Some(Command::DeviceGetInfo), false) => {
            f.insert("argsz".into(), json!(u32f(0)));
        }
        (Some(Command::DeviceGetInfo), true) => match crate::device::decode_device_info(payload) {
            Ok(i) => {
                f.insert("flags".into(), json!(i.flags));
                f.insert("reset".into(), json!(i.flags & 1 != 0));
                f.insert("pci".into(), json!(i.flags & 2 != 0));
                f.insert("numRegions".into(), json!(i.num_regions));
                f.insert("numIrqs".into(), json!(i.num_irqs));
            }
            Err(e) => problem = Some(e.0),
        },
        (Some(Command::DeviceGetRegionInfo), false) => {
            f.insert("argsz".into(), json!(u32f(0)));
            f.insert("index".into(), json!(u32f(8)));
        }
        (Some(Command::DeviceGetRegionInfo), true) => {
            let index = u32f(8).unwrap_or(u32::MAX);
            match crate::region::decode_region_info(payload, index) {
                Ok(r) => {
                    f.insert("argsz".into(), json!(r.argsz));
                    f.insert("index".into(), json!(r.index));
                    f.insert("flags".into(), json!(r.flags));
                    f.insert("size".into(), hex(r.size));
                    f.insert("offset".into(), hex(r.offset));
                    if let Some(s) = r.sparse {
                        f.insert("sparseAreas".into(), json!(s.len()));
                    }
                }
                // A reply too long for the prefix kept is not a decoding failure.
                Err(_) if payload.len() < total => {
                    f.insert("index".into(), json!(index));
                    f.insert("argsz".into(), json!(u32f(0)));
                }
                Err(e) => problem = Some(e.0),
            }
        }
        (Some(Command::DeviceGetRegionIoFds), _) => {
            f.insert("argsz".into(), json!(u32f(0)));
            f.insert("index".into(), json!(u32f(8)));
            f.insert("count".into(), json!(u32f(12)));
        }
        (Some(Command::DeviceGetIrqInfo), false) => {
            f.insert("index".into(), json!(u32f(8)));
        }
        (Some(Command::DeviceGetIrqInfo), true) => {
            let index = u32f(8).unwrap_or(u32::MAX);
            match crate::irq::decode_irq_info(payload, index) {
                Ok(i) => {
                    f.insert("index".into(), json!(i.index));
                    f.insert("count".into(), json!(i.count));
                    f.insert("flags".into(), json!(i.flags));
                }
                Err(e) => problem = Some(e.0),
            }
        }
        (Some(Command::DeviceSetIrqs), false) => {
            problem = short("DEVICE_SET_IRQS request", SET_IRQS_SIZE);
            if problem.is_none() {
                let flags = u32f(4).unwrap_or(0);
                let data =
                    match flags & (IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD) {
                        IRQ_SET_DATA_NONE => "none",
                        IRQ_SET_DATA_BOOL => "bool",
                        IRQ_SET_DATA_EVENTFD => "eventfd",
                        _ => "?",
                    };
                let action = match flags
                    & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER)
                {
                    IRQ_SET_ACTION_MASK => "mask",
                    IRQ_SET_ACTION_UNMASK => "unmask",
                    IRQ_SET_ACTION_TRIGGER => "trigger",
                    _ => "?",
                };
                f.insert("index".into(), json!(u32f(8)));
                f.insert("start".into(), json!(u32f(12)));
                f.insert("count".into(), json!(u32f(16)));
                f.insert("action".into(), json!(action));
                f.insert("data".into(), json!(data));
            }
        }
        // A header-only reply (a count of 0) says nothing more.
        (Some(Command::RegionRead | Command::RegionWrite), _) if !(reply && payload.is_empty()) => {
            problem = short("region access", ACCESS_HEADER_SIZE);
            if problem.is_none() {
                f.insert("region".into(), json!(u32f(8)));
                f.insert("offset".into(), hex(u64f(0).unwrap_or(0)));
                f.insert("count".into(), json!(u32f(12)));
                let carries = matches!((cmd, reply), (Some(Command::RegionRead), true))
                    || matches!((cmd, reply), (Some(Command::RegionWrite), false));
                if carries {
                    d.data_len = total.saturating_sub(ACCESS_HEADER_SIZE) as u64;
                    d.data_at = Some(ACCESS_HEADER_SIZE);
                }
            }
        }
        (Some(Command::DmaRead | Command::DmaWrite), _) => {
            problem = short("DMA access", DMA_ACCESS_SIZE);
            if problem.is_none() {
                f.insert("address".into(), hex(u64f(0).unwrap_or(0)));
                f.insert("count".into(), json!(u64f(8)));
                let carries = matches!((cmd, reply), (Some(Command::DmaRead), true))
                    || matches!((cmd, reply), (Some(Command::DmaWrite), false));
                if carries {
                    d.data_len = total.saturating_sub(DMA_ACCESS_SIZE) as u64;
                    d.data_at = Some(DMA_ACCESS_SIZE);
                }
            }
        }
        (Some(Command::DeviceReset), _) => {}
        (Some(Command::RegionWriteMulti), false) => {
            problem = short("REGION_WRITE_MULTI request", 8);
            if problem.is_none() {
                let n = u64f(0).unwrap_or(0);
                f.insert("writes".into(), json!(n));
                let first: Vec<Value> = (0..n.min(4) as usize)
                    .filter_map(|i| {
                        let at = 8 + 24 * i;
                        Some(json!({
                            "offset": hex(u64f(at)?),
                            "region": u32f(at + 8)?,
                            "count": u32f(at + 12)?,
                        }))
                    })
                    .collect();
                f.insert("first".into(), Value::Array(first));
            }
        }
        (Some(Command::DeviceFeature), _) if !(reply && payload.is_empty()) => {
            problem = short("DEVICE_FEATURE payload", FEATURE_HEADER);
            if problem.is_none() {
                let flags = u32f(4).unwrap_or(0);
                let feature = (flags & 0xffff) as u16;
                let name = match feature {
                    FEATURE_MIGRATION => "MIGRATION".to_string(),
                    FEATURE_MIG_DEVICE_STATE => "MIG_DEVICE_STATE".to_string(),
                    FEATURE_DMA_LOGGING_START => "DMA_LOGGING_START".to_string(),
                    FEATURE_DMA_LOGGING_STOP => "DMA_LOGGING_STOP".to_string(),
                    FEATURE_DMA_LOGGING_REPORT => "DMA_LOGGING_REPORT".to_string(),
                    n => format!("feature {n}"),
                };
                let ops: Vec<&str> = [
                    (FEATURE_GET, "get"),
                    (FEATURE_SET, "set"),
                    (FEATURE_PROBE, "probe"),
                ]
                .into_iter()
                .filter(|(bit, _)| flags & bit != 0)
                .map(|(_, n)| n)
                .collect();
                f.insert("feature".into(), json!(name));
                f.insert("ops".into(), json!(ops));
                let data = &payload[FEATURE_HEADER..];
                let probing = flags & FEATURE_PROBE != 0;
                let set = flags & FEATURE_SET != 0;
                // The state is in a SET request and in a GET reply.
                let state_here = (set && !reply) || (!set && reply);
                if feature == FEATURE_MIG_DEVICE_STATE && !probing && state_here {
                    if let Some(s) = u32_at(data, 0) {
                        let state = MigState::from_u32(s)
                            .map_or(format!("state {s}"), |m| format!("{m:?}"));
                        f.insert("state".into(), json!(state));
                    }
                }
                if feature == FEATURE_MIGRATION && reply && !probing {
                    if let Some(bits) = u64_at(data, 0) {
                        let names: Vec<&str> = [
                            (MIGRATION_STOP_COPY, "stopCopy"),
                            (MIGRATION_P2P, "p2p"),
                            (MIGRATION_PRE_COPY, "preCopy"),
                        ]
                        .into_iter()
                        .filter(|(b, _)| bits & b != 0)
                        .map(|(_, n)| n)
                        .collect();
                        f.insert("migration".into(), json!(names));
                    }
                }
                if feature == FEATURE_DMA_LOGGING_REPORT && !reply {
                    f.insert("iova".into(), hex(u64_at(data, 0).unwrap_or(0)));
                    f.insert("length".into(), hex(u64_at(data, 8).unwrap_or(0)));
                    f.insert("pageSize".into(), json!(u64_at(data, 16)));
                }
            }
        }
        (Some(Command::MigDataRead | Command::MigDataWrite), _)
            if !(reply && payload.is_empty()) =>
        {
            problem = short("MIG_DATA payload", MIG_DATA_HEADER);
            if problem.is_none() {
                f.insert("argsz".into(), json!(u32f(0)));
                f.insert("size".into(), json!(u32f(4)));
                let carries = matches!((cmd, reply), (Some(Command::MigDataRead), true))
                    || matches!((cmd, reply), (Some(Command::MigDataWrite), false));
                if carries {
                    // The data is `size` bytes; a libvfio-user reply pads past it.
                    let size = u64::from(u32f(4).unwrap_or(0));
                    let sent = total.saturating_sub(MIG_DATA_HEADER) as u64;
                    d.data_len = size.min(sent);
                    d.data_at = Some(MIG_DATA_HEADER);
                    if sent > size {
                        f.insert("padding".into(), json!(sent - size));
                    }
                }
            }
        }
        (None, _) => problem = Some(format!("unknown command {}", command_name(header.command))),
        _ => {}
    }
    d.undecodable = problem;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::dma_map_request;
    use crate::region::region_access;

    fn request(command: Command, payload: &[u8]) -> Header {
        Header::command(7, command as u16, payload.len(), false)
    }

    #[test]
    fn requests_and_replies_are_described_field_by_field() {
        let p = dma_map_request(3, 0x1000, 0x10_0000, 0x2000);
        let d = describe(&request(Command::DmaMap, &p), &p);
        assert_eq!(
            Value::Object(d.fields),
            json!({"flags": 3, "read": true, "write": true, "offset": "0x1000", "iova": "0x100000", "size": "0x2000"})
        );
        let p = region_access(2, 0x40, 4, Some(&[1, 2, 3, 4]));
        let d = describe(&request(Command::RegionWrite, &p), &p);
        assert_eq!((d.data_len, d.data_at), (4, Some(16)));
        assert_eq!(d.fields["region"], json!(2));
        let mut v = vec![0u8, 0, 0, 0];
        v.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":8}}\0");
        let d = describe(&request(Command::Version, &v), &v);
        assert_eq!(d.fields["json"]["capabilities"]["max_msg_fds"], json!(8));
        // Only the first bytes of a long VERSION kept (the tap's prefix): cut off, not broken.
        let h = request(Command::Version, &v);
        let d = describe(&h, &v[..12]);
        assert_eq!(
            (d.undecodable, d.fields["jsonBytes"].clone()),
            (None, json!(v.len() - 4))
        );
        assert!(describe(&h, &v[..v.len() - 3]).undecodable.is_none());
        // A state change, a padded MIG_DATA_READ reply.
        let mut f = crate::feature::feature_request(
            2,
            FEATURE_SET,
            16,
            &crate::feature::device_state_data(6),
        )
        .unwrap();
        let d = describe(&request(Command::DeviceFeature, &f), &f);
        assert_eq!(d.fields["state"], json!("PreCopy"));
        f.truncate(4);
        assert!(describe(&request(Command::DeviceFeature, &f), &f)
            .undecodable
            .is_some());
        let mut r = vec![0u8; 8 + 16];
        r[0..4].copy_from_slice(&11u32.to_ne_bytes());
        r[4..8].copy_from_slice(&3u32.to_ne_bytes());
        let h = Header::reply_to(&request(Command::MigDataRead, &[0; 8]), r.len());
        let d = describe(&h, &r);
        assert_eq!((d.data_len, d.fields["padding"].clone()), (3, json!(13)));
    }

    #[test]
    fn errors_unknown_commands_and_short_payloads_are_said_not_refused() {
        let h = Header::error_reply_to(&request(Command::RegionRead, &[]), 22);
        assert!(describe(&h, &[]).fields.is_empty());
        assert_eq!(errno_name(h.error), "EINVAL");
        let h = Header::command(1, 99, 3, false);
        assert!(describe(&h, &[1, 2, 3])
            .undecodable
            .unwrap()
            .contains("unknown command"));
        let p = [0u8; 5];
        let d = describe(&request(Command::DmaMap, &p), &p);
        assert_eq!(
            d.undecodable.unwrap(),
            "DMA_MAP request is 5 bytes, less than 32"
        );
        // A header too short to frame its message, and flags no version defines.
        let mut h = request(Command::DmaMap, &[]);
        h.size = 12;
        assert!(describe(&h, &[])
            .undecodable
            .unwrap()
            .contains("less than 16"));
        let p = dma_map_request(3, 0x1000, 0x10_0000, 0x2000);
        let mut h = request(Command::DmaMap, &p);
        h.flags |= 0x100;
        assert_eq!(
            describe(&h, &p).undecodable.unwrap(),
            "unknown header flags 0x100"
        );
        assert_eq!(
            (kind(&h), kind(&Header::reply_to(&h, 0))),
            ("request", "reply")
        );
    }
}
