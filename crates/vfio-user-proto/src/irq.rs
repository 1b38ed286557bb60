//! DEVICE_GET_IRQ_INFO (7): protocol.md section 3.6.

use crate::bytes::{put_u32, u32_at};
use crate::ProtoError;

pub const IRQ_INFO_SIZE: usize = 16;
pub const IRQ_FLAG_EVENTFD: u32 = 1 << 0;
pub const IRQ_FLAG_MASKABLE: u32 = 1 << 1;
pub const IRQ_FLAG_AUTOMASKED: u32 = 1 << 2;
pub const IRQ_FLAG_NORESIZE: u32 = 1 << 3;
/// The most vectors one index may claim (MSI-X allows 2048).
pub const MAX_IRQ_VECTORS: u32 = 2048;

/// DEVICE_SET_IRQS flags: exactly one DATA bit and one ACTION bit (protocol.md 3.7).
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// The fixed part of a DEVICE_SET_IRQS request.
pub const SET_IRQS_SIZE: usize = 20;

/// The DEVICE_SET_IRQS request payload: `data` is one byte per vector with DATA_BOOL, else
/// empty (eventfds travel as SCM_RIGHTS).
pub fn set_irqs_request(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; SET_IRQS_SIZE + data.len()];
    put_u32(&mut p, 0, (SET_IRQS_SIZE + data.len()) as u32);
    put_u32(&mut p, 4, flags);
    put_u32(&mut p, 8, index);
    put_u32(&mut p, 12, start);
    put_u32(&mut p, 16, count);
    p[SET_IRQS_SIZE..].copy_from_slice(data);
    p
}

/// What DEVICE_GET_IRQ_INFO reports for one irq index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// The DEVICE_GET_IRQ_INFO request payload for irq index `index`.
pub fn irq_info_request(index: u32) -> [u8; IRQ_INFO_SIZE] {
    let mut p = [0u8; IRQ_INFO_SIZE];
    put_u32(&mut p, 0, IRQ_INFO_SIZE as u32);
    put_u32(&mut p, 8, index);
    p
}

/// Decodes a DEVICE_GET_IRQ_INFO reply to a request for `index` (which it must echo, a check
/// QEMU skips).
pub fn decode_irq_info(payload: &[u8], index: u32) -> Result<IrqInfo, ProtoError> {
    let field = |at| {
        u32_at(payload, at).ok_or_else(|| {
            ProtoError::new(format!(
                "DEVICE_GET_IRQ_INFO reply is {} bytes, less than {IRQ_INFO_SIZE}",
                payload.len()
            ))
        })
    };
    let info = IrqInfo {
        flags: field(4)?,
        index: field(8)?,
        count: field(12)?,
    };
    if info.index != index {
        return Err(ProtoError::new(format!(
            "DEVICE_GET_IRQ_INFO reply is for irq index {}, not {index}",
            info.index
        )));
    }
    if info.count > MAX_IRQ_VECTORS {
        return Err(ProtoError::new(format!(
            "DEVICE_GET_IRQ_INFO reports {} vectors for index {index}, more than {MAX_IRQ_VECTORS}",
            info.count
        )));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_irqs_has_the_specs_layout() {
        let p = set_irqs_request(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 1, 2, 2, &[1, 0]);
        assert_eq!(p.len(), 22);
        assert_eq!(u32_at(&p, 0), Some(22));
        assert_eq!(u32_at(&p, 4), Some(0x22));
        assert_eq!(
            (u32_at(&p, 8), u32_at(&p, 12), u32_at(&p, 16)),
            (Some(1), Some(2), Some(2))
        );
    }

    #[test]
    fn the_index_must_be_echoed() {
        let mut p = irq_info_request(1);
        put_u32(&mut p, 4, IRQ_FLAG_EVENTFD);
        put_u32(&mut p, 12, 1);
        assert_eq!(decode_irq_info(&p, 1).unwrap().count, 1);
        assert!(decode_irq_info(&p, 2).is_err());
        put_u32(&mut p, 12, MAX_IRQ_VECTORS + 1);
        assert!(decode_irq_info(&p, 1).is_err());
        assert!(decode_irq_info(&p[..8], 1).is_err());
    }
}
