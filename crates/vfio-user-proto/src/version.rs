//! VERSION (command 1): the proposal we send and every rule its reply must satisfy
//! (protocol.md sections 2.1, 2.2 and 2.5).

use crate::{parse_capabilities, Capabilities, Command, Header, ProtoError, HEADER_SIZE};

/// What this client proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionProposal {
    pub major: u16,
    pub minor: u16,
    pub capabilities: Capabilities,
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    /// The server's capabilities, spec defaults filled in.
    pub capabilities: Capabilities,
    /// Accepted oddities: unknown capabilities, clamped values.
    pub warnings: Vec<String>,
}

/// The whole VERSION request: header, major, minor, JSON and its terminating NUL.
pub fn encode_version_request(id: u16, proposal: &VersionProposal) -> Vec<u8> {
    let json = proposal.capabilities.to_json();
    let payload_len = 4 + json.len() + 1;
    let mut out = Vec::with_capacity(HEADER_SIZE + payload_len);
    out.extend_from_slice(
        &Header::command(id, Command::Version as u16, payload_len, false).encode(),
    );
    out.extend_from_slice(&version_payload(proposal, &json));
    out
}

/// The request payload alone (major, minor, JSON, NUL).
pub fn version_payload(proposal: &VersionProposal, json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + json.len() + 1);
    out.extend_from_slice(&proposal.major.to_ne_bytes());
    out.extend_from_slice(&proposal.minor.to_ne_bytes());
    out.extend_from_slice(json.as_bytes());
    out.push(0);
    out
}

/// Checks a successful (non-error) VERSION reply payload against what we proposed.
/// Header matching (type, id, command, Error bit) is done by the transport beforehand.
pub fn validate_version_reply(
    proposal: &VersionProposal,
    payload: &[u8],
) -> Result<Version, ProtoError> {
    if payload.len() < 4 {
        return Err(ProtoError::new(format!(
            "VERSION reply is {} bytes, shorter than the 20 that major and minor need",
            HEADER_SIZE + payload.len()
        )));
    }
    let major = u16::from_ne_bytes([payload[0], payload[1]]);
    let minor = u16::from_ne_bytes([payload[2], payload[3]]);
    if major != proposal.major {
        return Err(ProtoError::new(format!(
            "server replied with major version {major}, we proposed {}",
            proposal.major
        )));
    }
    if minor > proposal.minor {
        return Err(ProtoError::new(format!(
            "server replied with minor version {minor}, above the {} we proposed",
            proposal.minor
        )));
    }
    let data = &payload[4..];
    let parsed = if data.is_empty() {
        parse_capabilities("{}")?
    } else {
        let Some((&0, text)) = data.split_last() else {
            return Err(ProtoError::new("VERSION reply JSON is not NUL-terminated"));
        };
        if text.contains(&0) {
            return Err(ProtoError::new("VERSION reply JSON contains a NUL byte"));
        }
        let text = std::str::from_utf8(text)
            .map_err(|e| ProtoError::new(format!("VERSION reply JSON is not UTF-8: {e}")))?;
        parse_capabilities(text)?
    };
    if let Some(t) = parsed.capabilities.twin_socket {
        if t.supported && proposal.capabilities.twin_socket.is_none() {
            return Err(ProtoError::new(
                "server enabled twin_socket, which we did not offer",
            ));
        }
    }
    Ok(Version {
        major,
        minor,
        capabilities: parsed.capabilities,
        warnings: parsed.warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal() -> VersionProposal {
        VersionProposal {
            major: 0,
            minor: 0,
            capabilities: Capabilities {
                max_msg_fds: 16,
                ..Capabilities::default()
            },
        }
    }

    fn reply(major: u16, minor: u16, json: &[u8]) -> Vec<u8> {
        let mut p = major.to_ne_bytes().to_vec();
        p.extend_from_slice(&minor.to_ne_bytes());
        p.extend_from_slice(json);
        p
    }

    #[test]
    fn request_golden_bytes() {
        let bytes = encode_version_request(7, &proposal());
        let json = br#"{"capabilities":{"max_data_xfer_size":1048576,"max_dma_maps":65535,"max_msg_fds":16,"pgsizes":4096}}"#;
        let size = 16 + 4 + json.len() + 1;
        let mut want = vec![7, 0, 1, 0];
        want.extend_from_slice(&(size as u32).to_le_bytes());
        want.extend_from_slice(&[0; 8]);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(json);
        want.push(0);
        assert_eq!(bytes, want);
    }

    #[test]
    fn accepts_rust_vmm_reply() {
        let v = validate_version_reply(
            &proposal(),
            &reply(
                0,
                0,
                b"{\"capabilities\":{\"max_msg_fds\":1,\"max_data_xfer_size\":1048576,\"migration\":{\"pgsize\":4096}}}\0",
            ),
        )
        .unwrap();
        assert_eq!((v.major, v.minor), (0, 0));
        assert_eq!(v.capabilities.max_msg_fds, 1);
        assert!(v.warnings.is_empty());
    }

    #[test]
    fn accepts_bare_20_byte_reply_with_defaults() {
        let v = validate_version_reply(&proposal(), &reply(0, 0, b"")).unwrap();
        assert_eq!(v.capabilities, Capabilities::default());
    }

    #[test]
    fn lower_minor_is_fine() {
        let p = VersionProposal {
            minor: 2,
            ..proposal()
        };
        assert_eq!(
            validate_version_reply(&p, &reply(0, 1, b"{}\0"))
                .unwrap()
                .minor,
            1
        );
    }

    #[test]
    fn rejects() {
        let p = proposal();
        let cases: &[(&[u8], &str)] = &[
            (&[], "shorter than the 20"),
            (&[0, 0], "shorter than the 20"),
            (&reply(1, 0, b"{}\0"), "major version 1"),
            (&reply(0, 1, b"{}\0"), "minor version 1"),
            (&reply(0, 0, b"{}"), "not NUL-terminated"),
            (&reply(0, 0, b"{}\0\0"), "contains a NUL"),
            (&reply(0, 0, b"{\0}\0"), "contains a NUL"),
            (&reply(0, 0, b"{\"a\":\"\xff\"}\0"), "not UTF-8"),
            (&reply(0, 0, b"[]\0"), "must be an object"),
            (&reply(0, 0, b"\0"), "invalid"),
            (
                &reply(0, 0, b"{\"capabilities\":3}\0"),
                "'capabilities' must be an object",
            ),
            (
                &reply(0, 0, b"{\"capabilities\":{\"max_msg_fds\":\"x\"}}\0"),
                "max_msg_fds",
            ),
            (
                &reply(
                    0,
                    0,
                    b"{\"capabilities\":{\"twin_socket\":{\"supported\":true,\"fd_index\":0}}}\0",
                ),
                "twin_socket",
            ),
        ];
        for (payload, what) in cases {
            let e = validate_version_reply(&p, payload).unwrap_err();
            assert!(e.0.contains(what), "{payload:?}: {e}");
        }
    }
}

#[cfg(test)]
mod golden_reply {
    use super::*;

    /// A whole VERSION reply as rust-vmm's server puts it on the wire.
    #[test]
    fn decodes_and_validates_reply_bytes() {
        let json = br#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,"migration":{"pgsize":4096}}}"#;
        let size = 16 + 4 + json.len() + 1;
        let mut wire = vec![7, 0, 1, 0];
        wire.extend_from_slice(&(size as u32).to_le_bytes());
        wire.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // reply, no error
        wire.extend_from_slice(&[0, 0, 0, 0]); // 0.0
        wire.extend_from_slice(json);
        wire.push(0);
        let mut raw = [0u8; HEADER_SIZE];
        raw.copy_from_slice(&wire[..16]);
        let h = Header::decode(&raw);
        assert_eq!((h.id, h.command, h.size as usize), (7, 1, size));
        assert_eq!(h.validate(4096), Ok(crate::MessageType::Reply));
        assert!(!h.is_error());
        let v = validate_version_reply(
            &VersionProposal {
                major: 0,
                minor: 0,
                capabilities: Capabilities::default(),
            },
            &wire[16..],
        )
        .unwrap();
        assert_eq!(v.capabilities.max_msg_fds, 1);
        assert_eq!(v.capabilities.migration.map(|m| m.pgsize), Some(4096));
    }
}
