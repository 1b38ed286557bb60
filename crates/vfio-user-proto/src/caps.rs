//! The capability JSON carried by VERSION (protocol.md section 2.3).
//!
//! Known capabilities are type- and range-checked strictly; unknown ones are ignored (forward
//! compatibility) but reported as warnings so a user can see what the peer offered.

use crate::ProtoError;
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Number, Value};
use std::fmt;

/// Spec default when the peer does not send `max_msg_fds` (QEMU wrongly assumes 8).
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
pub const DEFAULT_MAX_DATA_XFER_SIZE: u64 = 1 << 20;
pub const DEFAULT_MAX_DMA_MAPS: u64 = 65535;
pub const DEFAULT_PGSIZES: u64 = 4096;
pub const DEFAULT_MAX_BITMAP_SIZE: u64 = 256 << 20;
/// The kernel passes at most 253 fds per sendmsg (SCM_MAX_FD); larger claims are clamped.
pub const MAX_MSG_FDS_LIMIT: u32 = 253;
/// Larger transfer sizes are clamped: we never need to send more than this in one message.
pub const MAX_DATA_XFER_SIZE_LIMIT: u64 = 64 << 20;

/// Legacy migration v1 parameters (`migration` object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub pgsize: u64,
    pub max_bitmap_size: u64,
}

/// The `twin_socket` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TwinSocket {
    pub supported: bool,
    pub fd_index: Option<u32>,
}

/// One side's capabilities, with the spec defaults filled in for anything absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the sender of the JSON can receive in one message.
    pub max_msg_fds: u32,
    /// Largest `count` the sender of the JSON accepts in REGION/DMA READ/WRITE.
    pub max_data_xfer_size: u64,
    pub max_dma_maps: u64,
    pub pgsizes: u64,
    pub migration: Option<Migration>,
    pub write_multiple: bool,
    pub twin_socket: Option<TwinSocket>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            pgsizes: DEFAULT_PGSIZES,
            migration: None,
            write_multiple: false,
            twin_socket: None,
        }
    }
}

impl Capabilities {
    /// The JSON this client proposes: what we can receive and nothing we do not implement
    /// (no `migration`, `twin_socket` or `write_multiple`).
    pub fn to_json(&self) -> String {
        let mut caps = Map::new();
        caps.insert("max_msg_fds".into(), self.max_msg_fds.into());
        caps.insert("max_data_xfer_size".into(), self.max_data_xfer_size.into());
        caps.insert("pgsizes".into(), self.pgsizes.into());
        caps.insert("max_dma_maps".into(), self.max_dma_maps.into());
        let mut top = Map::new();
        top.insert("capabilities".into(), Value::Object(caps));
        Value::Object(top).to_string()
    }
}

/// The result of parsing a capability JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCapabilities {
    pub capabilities: Capabilities,
    /// Things accepted but worth telling a user: unknown keys, clamped values.
    pub warnings: Vec<String>,
}

/// Parses the JSON text of a VERSION message (without its NUL).
pub fn parse_capabilities(json: &str) -> Result<ParsedCapabilities, ProtoError> {
    let StrictValue(top) = serde_json::from_str(json)
        .map_err(|e| ProtoError::new(format!("capability JSON is invalid: {e}")))?;
    let Value::Object(top) = top else {
        return Err(ProtoError::new(format!(
            "capability JSON must be an object, got {}",
            kind(&top)
        )));
    };
    let mut warnings = Vec::new();
    let mut out = Capabilities::default();
    for (key, value) in &top {
        if key != "capabilities" {
            warnings.push(format!("unknown top-level key '{key}' ignored"));
            continue;
        }
        let Value::Object(caps) = value else {
            return Err(ProtoError::new(format!(
                "'capabilities' must be an object, got {}",
                kind(value)
            )));
        };
        for (name, v) in caps {
            parse_one(name, v, &mut out, &mut warnings)?;
        }
    }
    Ok(ParsedCapabilities {
        capabilities: out,
        warnings,
    })
}

fn parse_one(
    name: &str,
    v: &Value,
    out: &mut Capabilities,
    warnings: &mut Vec<String>,
) -> Result<(), ProtoError> {
    match name {
        "max_msg_fds" => {
            let n = unsigned(name, v)?;
            out.max_msg_fds = if n > u64::from(MAX_MSG_FDS_LIMIT) {
                warnings.push(format!(
                    "max_msg_fds {n} clamped to {MAX_MSG_FDS_LIMIT} (the kernel's SCM_MAX_FD)"
                ));
                MAX_MSG_FDS_LIMIT
            } else {
                n as u32
            };
        }
        "max_data_xfer_size" => {
            let n = unsigned(name, v)?;
            if n == 0 {
                return Err(ProtoError::new("max_data_xfer_size must not be 0"));
            }
            out.max_data_xfer_size = if n > MAX_DATA_XFER_SIZE_LIMIT {
                warnings.push(format!(
                    "max_data_xfer_size {n} clamped to {MAX_DATA_XFER_SIZE_LIMIT}"
                ));
                MAX_DATA_XFER_SIZE_LIMIT
            } else {
                n
            };
        }
        "max_dma_maps" => {
            let n = unsigned(name, v)?;
            if n == 0 {
                return Err(ProtoError::new("max_dma_maps must not be 0"));
            }
            out.max_dma_maps = n;
        }
        "pgsizes" => {
            let n = unsigned(name, v)?;
            if n == 0 {
                return Err(ProtoError::new("pgsizes must not be 0"));
            }
            if n & 0xfff != 0 {
                return Err(ProtoError::new(format!(
                    "pgsizes {n:#x} has bits below 4 KiB"
                )));
            }
            if n & 0x1000 == 0 {
                warnings.push(format!("pgsizes {n:#x} does not include 4 KiB pages"));
            }
            out.pgsizes = n;
        }
        "migration" => {
            let Value::Object(m) = v else {
                return Err(ProtoError::new(format!(
                    "migration must be an object, got {}",
                    kind(v)
                )));
            };
            let pgsize = match m.get("pgsize") {
                Some(p) => unsigned("migration.pgsize", p)?,
                None => return Err(ProtoError::new("migration.pgsize is missing")),
            };
            if pgsize == 0 || pgsize % 4096 != 0 {
                return Err(ProtoError::new(format!(
                    "migration.pgsize {pgsize} is not a nonzero multiple of 4096"
                )));
            }
            let max_bitmap_size = match m.get("max_bitmap_size") {
                Some(b) => unsigned("migration.max_bitmap_size", b)?,
                None => DEFAULT_MAX_BITMAP_SIZE,
            };
            if max_bitmap_size == 0 || max_bitmap_size > DEFAULT_MAX_BITMAP_SIZE {
                return Err(ProtoError::new(format!(
                    "migration.max_bitmap_size {max_bitmap_size} is outside 1..={DEFAULT_MAX_BITMAP_SIZE}"
                )));
            }
            for k in m
                .keys()
                .filter(|k| *k != "pgsize" && *k != "max_bitmap_size")
            {
                warnings.push(format!("unknown key 'migration.{k}' ignored"));
            }
            out.migration = Some(Migration {
                pgsize,
                max_bitmap_size,
            });
        }
        "write_multiple" => {
            let Value::Bool(b) = v else {
                return Err(ProtoError::new(format!(
                    "write_multiple must be a boolean, got {}",
                    kind(v)
                )));
            };
            out.write_multiple = *b;
        }
        "twin_socket" => {
            let Value::Object(t) = v else {
                return Err(ProtoError::new(format!(
                    "twin_socket must be an object, got {}",
                    kind(v)
                )));
            };
            let supported = match t.get("supported") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ProtoError::new(format!(
                        "twin_socket.supported must be a boolean, got {}",
                        kind(other)
                    )))
                }
            };
            let fd_index = match t.get("fd_index") {
                None => None,
                Some(i) => {
                    let n = unsigned("twin_socket.fd_index", i)?;
                    Some(u32::try_from(n).map_err(|_| {
                        ProtoError::new(format!("twin_socket.fd_index {n} is out of range"))
                    })?)
                }
            };
            for k in t.keys().filter(|k| *k != "supported" && *k != "fd_index") {
                warnings.push(format!("unknown key 'twin_socket.{k}' ignored"));
            }
            out.twin_socket = Some(TwinSocket {
                supported,
                fd_index,
            });
        }
        other => warnings.push(format!("unknown capability '{other}' ignored")),
    }
    Ok(())
}

fn unsigned(name: &str, v: &Value) -> Result<u64, ProtoError> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| ProtoError::new(format!("{name} must be an unsigned integer, got {n}"))),
        other => Err(ProtoError::new(format!(
            "{name} must be an unsigned integer, got {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A `serde_json::Value` that refuses duplicate object keys instead of keeping the last one,
/// so a peer cannot say two things at once and have us silently pick one.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(v) = map.next_value()?;
            if out.insert(key.clone(), v).is_some() {
                return Err(serde::de::Error::custom(format!("duplicate key '{key}'")));
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        parse_capabilities(json).unwrap_err().0
    }

    #[test]
    fn defaults_when_absent() {
        let p = parse_capabilities("{}").unwrap();
        assert_eq!(p.capabilities, Capabilities::default());
        assert_eq!(p.capabilities.max_msg_fds, 1, "spec default, not QEMU's 8");
        assert!(p.warnings.is_empty());
        let p = parse_capabilities(r#"{"capabilities":{}}"#).unwrap();
        assert_eq!(p.capabilities, Capabilities::default());
    }

    #[test]
    fn rust_vmm_server_reply() {
        let p = parse_capabilities(
            r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#,
        )
        .unwrap();
        assert_eq!(p.capabilities.max_msg_fds, 1);
        assert_eq!(
            p.capabilities.migration,
            Some(Migration {
                pgsize: 4096,
                max_bitmap_size: DEFAULT_MAX_BITMAP_SIZE
            })
        );
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn all_known_fields() {
        let p = parse_capabilities(
            r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":65536,"pgsizes":12288,
                "max_dma_maps":10,"write_multiple":true,
                "migration":{"pgsize":8192,"max_bitmap_size":1024},
                "twin_socket":{"supported":true,"fd_index":0}}}"#,
        )
        .unwrap();
        let c = p.capabilities;
        assert_eq!(c.max_msg_fds, 16);
        assert_eq!(c.max_data_xfer_size, 65536);
        assert_eq!(c.pgsizes, 12288);
        assert_eq!(c.max_dma_maps, 10);
        assert!(c.write_multiple);
        assert_eq!(
            c.migration,
            Some(Migration {
                pgsize: 8192,
                max_bitmap_size: 1024
            })
        );
        assert_eq!(
            c.twin_socket,
            Some(TwinSocket {
                supported: true,
                fd_index: Some(0)
            })
        );
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let p = parse_capabilities(r#"{"capabilities":{"frobnicate":1},"extra":2}"#).unwrap();
        assert_eq!(p.capabilities, Capabilities::default());
        assert_eq!(p.warnings.len(), 2);
        assert!(p.warnings.iter().any(|w| w.contains("frobnicate")));
        assert!(p.warnings.iter().any(|w| w.contains("extra")));
    }

    #[test]
    fn clamps_with_warning() {
        let p = parse_capabilities(
            r#"{"capabilities":{"max_msg_fds":100000,"max_data_xfer_size":4294967296}}"#,
        )
        .unwrap();
        assert_eq!(p.capabilities.max_msg_fds, MAX_MSG_FDS_LIMIT);
        assert_eq!(p.capabilities.max_data_xfer_size, MAX_DATA_XFER_SIZE_LIMIT);
        assert_eq!(p.warnings.len(), 2);
        let p = parse_capabilities(r#"{"capabilities":{"max_msg_fds":0}}"#).unwrap();
        assert_eq!(p.capabilities.max_msg_fds, 0);
    }

    #[test]
    fn structure_errors() {
        assert!(err("").contains("invalid"));
        assert!(err("{").contains("invalid"));
        assert!(err("[]").contains("must be an object"));
        assert!(err("3").contains("must be an object"));
        assert!(err(r#"{"capabilities":[]}"#).contains("'capabilities' must be an object"));
        assert!(err(r#"{"capabilities":null}"#).contains("'capabilities' must be an object"));
        assert!(err(r#"{"capabilities":{"max_msg_fds":1,"max_msg_fds":2}}"#).contains("duplicate"));
        assert!(err(r#"{"capabilities":{},"capabilities":{}}"#).contains("duplicate"));
    }

    #[test]
    fn type_errors() {
        for (json, what) in [
            (r#"{"capabilities":{"max_msg_fds":"8"}}"#, "max_msg_fds"),
            (r#"{"capabilities":{"max_msg_fds":-1}}"#, "max_msg_fds"),
            (r#"{"capabilities":{"max_msg_fds":1.5}}"#, "max_msg_fds"),
            (r#"{"capabilities":{"max_msg_fds":1e30}}"#, "max_msg_fds"),
            (
                r#"{"capabilities":{"max_data_xfer_size":true}}"#,
                "max_data_xfer_size",
            ),
            (r#"{"capabilities":{"pgsizes":null}}"#, "pgsizes"),
            (r#"{"capabilities":{"max_dma_maps":[]}}"#, "max_dma_maps"),
            (r#"{"capabilities":{"write_multiple":1}}"#, "write_multiple"),
            (r#"{"capabilities":{"twin_socket":true}}"#, "twin_socket"),
            (
                r#"{"capabilities":{"twin_socket":{"supported":1}}}"#,
                "twin_socket.supported",
            ),
            (
                r#"{"capabilities":{"twin_socket":{"fd_index":-1}}}"#,
                "twin_socket.fd_index",
            ),
            (r#"{"capabilities":{"migration":4096}}"#, "migration"),
            (r#"{"capabilities":{"migration":{}}}"#, "migration.pgsize"),
            (
                r#"{"capabilities":{"migration":{"pgsize":"4096"}}}"#,
                "migration.pgsize",
            ),
        ] {
            assert!(err(json).contains(what), "{json}: {}", err(json));
        }
    }

    #[test]
    fn range_errors() {
        for (json, what) in [
            (
                r#"{"capabilities":{"max_data_xfer_size":0}}"#,
                "max_data_xfer_size",
            ),
            (r#"{"capabilities":{"pgsizes":0}}"#, "pgsizes"),
            (r#"{"capabilities":{"pgsizes":6144}}"#, "below 4 KiB"),
            (r#"{"capabilities":{"max_dma_maps":0}}"#, "max_dma_maps"),
            (
                r#"{"capabilities":{"migration":{"pgsize":100}}}"#,
                "migration.pgsize",
            ),
            (
                r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":0}}}"#,
                "max_bitmap_size",
            ),
            (
                r#"{"capabilities":{"twin_socket":{"fd_index":4294967296}}}"#,
                "fd_index",
            ),
        ] {
            assert!(err(json).contains(what), "{json}: {}", err(json));
        }
        let p = parse_capabilities(r#"{"capabilities":{"pgsizes":2097152}}"#).unwrap();
        assert_eq!(
            p.warnings.len(),
            1,
            "no 4 KiB pages is legal but worth saying"
        );
    }

    #[test]
    fn proposal_json_round_trips() {
        let ours = Capabilities {
            max_msg_fds: 16,
            ..Capabilities::default()
        };
        let json = ours.to_json();
        assert_eq!(
            json,
            r#"{"capabilities":{"max_data_xfer_size":1048576,"max_dma_maps":65535,"max_msg_fds":16,"pgsizes":4096}}"#
        );
        assert_eq!(parse_capabilities(&json).unwrap().capabilities, ours);
    }
}
