//! DEVICE_GET_INFO (4) and DEVICE_RESET (13): protocol.md sections 3.3 and 3.10.

use crate::bytes::{put_u32, u32_at};
use crate::ProtoError;

/// The request and reply payload of DEVICE_GET_INFO.
pub const DEVICE_INFO_SIZE: usize = 16;
/// DEVICE_RESET is supported.
pub const DEVICE_FLAG_RESET: u32 = 1 << 0;
/// A PCI device (the only kind the spec describes).
pub const DEVICE_FLAG_PCI: u32 = 1 << 1;
/// The most regions and irq indexes a server may claim (QEMU's guards against a hostile one).
pub const MAX_REGIONS: u32 = 100;
pub const MAX_IRQS: u32 = 50;

/// What DEVICE_GET_INFO reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// The DEVICE_GET_INFO request payload: argsz 16, everything else 0.
pub fn device_info_request() -> [u8; DEVICE_INFO_SIZE] {
    let mut p = [0u8; DEVICE_INFO_SIZE];
    put_u32(&mut p, 0, DEVICE_INFO_SIZE as u32);
    p
}

/// Decodes a DEVICE_GET_INFO reply payload, refusing counts past [`MAX_REGIONS`] and
/// [`MAX_IRQS`].
pub fn decode_device_info(payload: &[u8]) -> Result<DeviceInfo, ProtoError> {
    let field = |at| {
        u32_at(payload, at).ok_or_else(|| {
            ProtoError::new(format!(
                "DEVICE_GET_INFO reply is {} bytes, less than {DEVICE_INFO_SIZE}",
                payload.len()
            ))
        })
    };
    let info = DeviceInfo {
        flags: field(4)?,
        num_regions: field(8)?,
        num_irqs: field(12)?,
    };
    if info.num_regions > MAX_REGIONS {
        return Err(ProtoError::new(format!(
            "DEVICE_GET_INFO reports {} regions, more than the {MAX_REGIONS} a device may have",
            info.num_regions
        )));
    }
    if info.num_irqs > MAX_IRQS {
        return Err(ProtoError::new(format!(
            "DEVICE_GET_INFO reports {} irq indexes, more than the {MAX_IRQS} a device may have",
            info.num_irqs
        )));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(flags: u32, regions: u32, irqs: u32) -> Vec<u8> {
        let mut p = vec![0u8; 16];
        put_u32(&mut p, 0, 16);
        put_u32(&mut p, 4, flags);
        put_u32(&mut p, 8, regions);
        put_u32(&mut p, 12, irqs);
        p
    }

    #[test]
    fn decodes_and_bounds_the_counts() {
        let info = decode_device_info(&reply(3, 9, 5)).unwrap();
        assert_eq!(
            info,
            DeviceInfo {
                flags: 3,
                num_regions: 9,
                num_irqs: 5
            }
        );
        assert!(decode_device_info(&reply(3, 101, 5)).is_err());
        assert!(decode_device_info(&reply(3, 9, 51)).is_err());
        assert!(decode_device_info(&reply(3, 9, 5)[..12]).is_err());
        assert_eq!(u32_at(&device_info_request(), 0), Some(16));
    }
}
