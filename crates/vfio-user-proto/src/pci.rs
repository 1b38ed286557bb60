//! The PCI configuration header (type 0) and its capability list, decoded from the bytes of a
//! device's config region (region 7), as `lspci -vv` shows them. What a device put there is
//! untrusted: the capability walk is bounded and stops at a loop or a pointer out of range.

use crate::bytes::{u16_at, u32_at};
use crate::ProtoError;

/// Bytes of a type-0 header.
pub const PCI_HEADER_SIZE: usize = 64;
/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u16 = 0x10;

/// One entry of the capability list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciCapability {
    /// Offset in config space.
    pub offset: u32,
    pub id: u32,
    /// Its name, when known; else "id 0x..".
    pub name: String,
}

/// A decoded configuration header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfig {
    pub vendor_id: u32,
    pub device_id: u32,
    pub command: u32,
    pub status: u32,
    pub revision: u32,
    /// Class code, subclass and programming interface, as one 24-bit number.
    pub class_code: u32,
    pub header_type: u32,
    /// The six base address registers, raw (a 64-bit BAR spans two).
    pub bars: [u32; 6],
    pub subsystem_vendor_id: u32,
    pub subsystem_id: u32,
    pub interrupt_line: u32,
    pub interrupt_pin: u32,
    pub capabilities: Vec<PciCapability>,
    /// What the walk refused (a loop, a pointer outside the bytes given).
    pub warnings: Vec<String>,
}

fn capability_name(id: u8) -> String {
    match id {
        0x01 => "Power Management".into(),
        0x05 => "MSI".into(),
        0x09 => "Vendor Specific".into(),
        0x10 => "Express".into(),
        0x11 => "MSI-X".into(),
        0x12 => "SATA".into(),
        0x13 => "Advanced Features".into(),
        _ => format!("id 0x{id:x}"),
    }
}

/// Decodes a type-0 configuration header from `config` (at least its first 64 bytes; the
/// capability list is followed within what is given, each entry visited once).
pub fn decode_pci_config(config: &[u8]) -> Result<PciConfig, ProtoError> {
    if config.len() < PCI_HEADER_SIZE {
        return Err(ProtoError::new(format!(
            "a PCI config header is {PCI_HEADER_SIZE} bytes; got {}",
            config.len()
        )));
    }
    let b16 = |at| u32::from(u16_at(config, at).map_or(0, u16::from_le));
    let b32 = |at| u32_at(config, at).map_or(0, u32::from_le);
    let status = b16(0x06);
    let mut capabilities = Vec::new();
    let mut warnings = Vec::new();
    if status as u16 & STATUS_CAP_LIST != 0 {
        let mut seen = [false; 256];
        let mut at = usize::from(config[0x34] & 0xfc);
        while at != 0 {
            if at < PCI_HEADER_SIZE || at + 2 > config.len() {
                warnings.push(format!(
                    "capability pointer 0x{at:x} lies outside the {} bytes read",
                    config.len()
                ));
                break;
            }
            if seen[at & 0xff] {
                warnings.push(format!("the capability list loops back to 0x{at:x}"));
                break;
            }
            seen[at & 0xff] = true;
            let id = config[at];
            capabilities.push(PciCapability {
                offset: at as u32,
                id: u32::from(id),
                name: capability_name(id),
            });
            at = usize::from(config[at + 1] & 0xfc);
        }
    }
    Ok(PciConfig {
        vendor_id: b16(0x00),
        device_id: b16(0x02),
        command: b16(0x04),
        status,
        revision: u32::from(config[0x08]),
        class_code: u32::from(config[0x09])
            | u32::from(config[0x0a]) << 8
            | u32::from(config[0x0b]) << 16,
        header_type: u32::from(config[0x0e]),
        bars: std::array::from_fn(|i| b32(0x10 + 4 * i)),
        subsystem_vendor_id: b16(0x2c),
        subsystem_id: b16(0x2e),
        interrupt_line: u32::from(config[0x3c]),
        interrupt_pin: u32::from(config[0x3d]),
        capabilities,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x0005u16.to_le_bytes());
        c[0x06] = 0x10;
        c[0x09..0x0c].copy_from_slice(&[0x01, 0x08, 0x01]);
        c[0x10..0x14].copy_from_slice(&0xfebf_0000u32.to_le_bytes());
        c
    }

    #[test]
    fn decodes_the_header_and_walks_the_capabilities() {
        let mut c = header();
        c[0x34] = 0x40;
        c[0x40] = 0x05;
        c[0x41] = 0x50;
        c[0x50] = 0x11;
        let p = decode_pci_config(&c).unwrap();
        assert_eq!(
            (p.vendor_id, p.device_id, p.class_code),
            (0x1b36, 5, 0x010801)
        );
        assert_eq!(p.bars[0], 0xfebf_0000);
        let names: Vec<_> = p.capabilities.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["MSI", "MSI-X"]);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn a_loop_or_a_pointer_out_of_range_ends_the_walk_with_a_warning() {
        let mut c = header();
        c[0x34] = 0x40;
        c[0x40] = 0x09;
        c[0x41] = 0x40;
        let p = decode_pci_config(&c).unwrap();
        assert_eq!(p.capabilities.len(), 1);
        assert!(p.warnings[0].contains("loops back to 0x40"));
        c[0x41] = 0xfc;
        let p = decode_pci_config(&c[..128]).unwrap();
        assert!(p.warnings[0].contains("outside the 128 bytes"));
        assert!(decode_pci_config(&c[..63]).is_err());
    }
}
