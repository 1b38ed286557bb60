use crate::ProtoError;

/// Size of the common header that starts every message.
pub const HEADER_SIZE: usize = 16;
/// Bits 0-3 of `flags`: the message type.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// The sender does not want a reply.
pub const FLAG_NO_REPLY: u32 = 0x10;
/// A reply reporting failure; `error` holds the errno.
pub const FLAG_ERROR: u32 = 0x20;

/// The type bits of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Command,
    Reply,
}

/// The 16-byte common header, in host byte order (every implementation is little-endian C
/// structs on the host; the spec says host endianness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// Size of the whole message including this header.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    /// A command header for a payload of `payload_len` bytes.
    pub fn command(id: u16, command: u16, payload_len: usize, no_reply: bool) -> Header {
        Header {
            id,
            command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: if no_reply { FLAG_NO_REPLY } else { 0 },
            error: 0,
        }
    }

    /// A reply to `request` carrying `payload_len` bytes.
    pub fn reply_to(request: &Header, payload_len: usize) -> Header {
        Header {
            id: request.id,
            command: request.command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: 1,
            error: 0,
        }
    }

    /// A header-only error reply to `request`.
    pub fn error_reply_to(request: &Header, errno: u32) -> Header {
        Header {
            id: request.id,
            command: request.command,
            size: HEADER_SIZE as u32,
            flags: 1 | FLAG_ERROR,
            error: errno,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_ne_bytes());
        b[2..4].copy_from_slice(&self.command.to_ne_bytes());
        b[4..8].copy_from_slice(&self.size.to_ne_bytes());
        b[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        b[12..16].copy_from_slice(&self.error.to_ne_bytes());
        b
    }

    /// Decodes the raw fields. Nothing is validated; see [`Header::validate`].
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            id: u16_at(0),
            command: u16_at(2),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        }
    }

    /// Checks what framing depends on: the type bits and a size that covers the header and
    /// stays under `max_size`. Failing this means the stream can no longer be trusted.
    pub fn validate(&self, max_size: usize) -> Result<MessageType, ProtoError> {
        let kind = match self.flags & FLAG_TYPE_MASK {
            0 => MessageType::Command,
            1 => MessageType::Reply,
            t => {
                return Err(ProtoError::new(format!(
                    "message {} has invalid type bits {t}",
                    self.id
                )))
            }
        };
        let size = self.size as usize;
        if size < HEADER_SIZE {
            return Err(ProtoError::new(format!(
                "message {} claims msg_size {size}, smaller than its 16-byte header",
                self.id
            )));
        }
        if size > max_size {
            return Err(ProtoError::new(format!(
                "message {} claims msg_size {size}, above the limit of {max_size}",
                self.id
            )));
        }
        Ok(kind)
    }

    pub fn payload_len(&self) -> usize {
        (self.size as usize).saturating_sub(HEADER_SIZE)
    }

    /// Whether the type bits say reply (anything but 1 is a command or invalid).
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == 1
    }

    /// Flag bits no version of the protocol defines (zero for a well-formed header).
    pub fn unknown_flags(&self) -> u32 {
        self.flags & !(FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR)
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes() {
        let h = Header::command(0x0102, 4, 16, false);
        assert_eq!(
            h.encode(),
            [2, 1, 4, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Header::decode(&h.encode()), h);
        let e = Header::error_reply_to(&h, 22);
        assert_eq!(
            e.encode(),
            [2, 1, 4, 0, 16, 0, 0, 0, 0x21, 0, 0, 0, 22, 0, 0, 0]
        );
        assert!(Header::command(1, 10, 0, true).no_reply());
    }

    #[test]
    fn validate_framing() {
        let mut h = Header::command(1, 4, 16, false);
        assert_eq!(h.validate(4096), Ok(MessageType::Command));
        h.flags = 1;
        assert_eq!(h.validate(4096), Ok(MessageType::Reply));
        for t in 2..16 {
            h.flags = t;
            assert!(h.validate(4096).is_err(), "type {t}");
        }
        h.flags = 1;
        for size in [0, 15, 4097, u32::MAX] {
            h.size = size;
            assert!(h.validate(4096).is_err(), "size {size}");
        }
        h.size = 16;
        assert!(h.validate(4096).is_ok());
    }
}
