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
    /// The BARs decoded: one entry per BAR, a 64-bit BAR taking its two registers.
    pub decoded_bars: Vec<PciBar>,
    /// The MSI capability, if the list has one.
    pub msi: Option<PciMsi>,
    /// The MSI-X capability, if the list has one.
    pub msix: Option<PciMsix>,
    /// The extended capabilities (PCI Express, from 0x100), when more than 256 bytes were given.
    pub extended_capabilities: Vec<PciCapability>,
    /// What the walk refused (a loop, a pointer outside the bytes given).
    pub warnings: Vec<String>,
}

/// What a base address register decodes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    Memory64,
}

/// One BAR: its index (a 64-bit one uses this register and the next), kind and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    pub index: u32,
    pub kind: BarKind,
    pub prefetchable: bool,
    pub address: u64,
}

/// The MSI capability's message control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciMsi {
    pub offset: u32,
    pub enabled: bool,
    /// Vectors the function can request (1 to 32).
    pub vectors: u32,
    /// Vectors enabled now (1 to 32).
    pub enabled_vectors: u32,
    pub address_64: bool,
    pub per_vector_masking: bool,
}

/// The MSI-X capability: its table and pending-bit array, each a BAR (BIR) and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciMsix {
    pub offset: u32,
    pub enabled: bool,
    pub function_mask: bool,
    /// Vectors in the table (1 to 2048).
    pub table_size: u32,
    pub table_bir: u32,
    pub table_offset: u32,
    pub pba_bir: u32,
    pub pba_offset: u32,
}

/// Where the extended capabilities start (PCI Express config space is 4096 bytes).
pub const PCI_EXTENDED_START: usize = 0x100;

fn extended_capability_name(id: u16) -> String {
    match id {
        0x0001 => "Advanced Error Reporting".into(),
        0x0002 => "Virtual Channel".into(),
        0x0003 => "Device Serial Number".into(),
        0x000b => "Vendor Specific".into(),
        0x000d => "Access Control Services".into(),
        0x000e => "Alternative Routing-ID".into(),
        0x0010 => "SR-IOV".into(),
        0x0015 => "Resizable BAR".into(),
        0x0018 => "Latency Tolerance Reporting".into(),
        0x0019 => "Secondary PCI Express".into(),
        0x001e => "L1 PM Substates".into(),
        _ => format!("id 0x{id:04x}"),
    }
}

/// The six BARs decoded, a 64-bit one paired with the register after it.
fn decode_bars(bars: &[u32; 6], warnings: &mut Vec<String>) -> Vec<PciBar> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < 6 {
        let raw = bars[i];
        if raw & 1 == 1 {
            out.push(PciBar {
                index: i as u32,
                kind: BarKind::Io,
                prefetchable: false,
                address: u64::from(raw & !0x3),
            });
            i += 1;
            continue;
        }
        let prefetchable = raw & 0x8 != 0;
        let low = u64::from(raw & !0xf);
        if (raw >> 1) & 0x3 == 0x2 {
            let Some(high) = bars.get(i + 1) else {
                warnings.push(format!("BAR{i} is 64-bit but has no upper half"));
                out.push(PciBar {
                    index: i as u32,
                    kind: BarKind::Memory32,
                    prefetchable,
                    address: low,
                });
                break;
            };
            out.push(PciBar {
                index: i as u32,
                kind: BarKind::Memory64,
                prefetchable,
                address: low | u64::from(*high) << 32,
            });
            i += 2;
        } else {
            out.push(PciBar {
                index: i as u32,
                kind: BarKind::Memory32,
                prefetchable,
                address: low,
            });
            i += 1;
        }
    }
    out
}

/// The extended capability list from 0x100, within `config`, each entry visited once.
fn walk_extended(config: &[u8], warnings: &mut Vec<String>) -> Vec<PciCapability> {
    let mut out = Vec::new();
    if config.len() < PCI_EXTENDED_START + 4 {
        return out;
    }
    let mut seen = vec![false; config.len() / 4 + 1];
    let mut at = PCI_EXTENDED_START;
    loop {
        let Some(h) = u32_at(config, at).map(u32::from_le) else {
            warnings.push(format!(
                "extended capability pointer 0x{at:x} lies outside the {} bytes read",
                config.len()
            ));
            break;
        };
        // An empty (or absent, all ones) header at 0x100: no extended capabilities.
        if h == 0 || h == u32::MAX {
            break;
        }
        if seen[at / 4] {
            warnings.push(format!(
                "the extended capability list loops back to 0x{at:x}"
            ));
            break;
        }
        seen[at / 4] = true;
        let id = (h & 0xffff) as u16;
        out.push(PciCapability {
            offset: at as u32,
            id: u32::from(id),
            name: extended_capability_name(id),
        });
        let next = ((h >> 20) & 0xffc) as usize;
        if next == 0 {
            break;
        }
        if next < PCI_EXTENDED_START {
            warnings.push(format!(
                "extended capability at 0x{at:x} points into the legacy header (0x{next:x})"
            ));
            break;
        }
        at = next;
    }
    out
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
    let bars: [u32; 6] = std::array::from_fn(|i| b32(0x10 + 4 * i));
    let decoded_bars = decode_bars(&bars, &mut warnings);
    let cap = |id: u8| {
        capabilities
            .iter()
            .find(|c| c.id == u32::from(id))
            .map(|c| c.offset as usize)
    };
    let msi = cap(0x05).and_then(|at| {
        let control = u16_at(config, at + 2).map(u16::from_le)?;
        Some(PciMsi {
            offset: at as u32,
            enabled: control & 0x1 != 0,
            vectors: 1 << ((control >> 1) & 0x7).min(5),
            enabled_vectors: 1 << ((control >> 4) & 0x7).min(5),
            address_64: control & 0x80 != 0,
            per_vector_masking: control & 0x100 != 0,
        })
    });
    let msix = cap(0x11).and_then(|at| {
        let control = u16_at(config, at + 2).map(u16::from_le)?;
        let table = u32_at(config, at + 4).map(u32::from_le)?;
        let pba = u32_at(config, at + 8).map(u32::from_le)?;
        Some(PciMsix {
            offset: at as u32,
            enabled: control & 0x8000 != 0,
            function_mask: control & 0x4000 != 0,
            table_size: u32::from(control & 0x7ff) + 1,
            table_bir: table & 0x7,
            table_offset: table & !0x7,
            pba_bir: pba & 0x7,
            pba_offset: pba & !0x7,
        })
    });
    let extended_capabilities = walk_extended(config, &mut warnings);
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
        bars,
        subsystem_vendor_id: b16(0x2c),
        subsystem_id: b16(0x2e),
        interrupt_line: u32::from(config[0x3c]),
        interrupt_pin: u32::from(config[0x3d]),
        capabilities,
        decoded_bars,
        msi,
        msix,
        extended_capabilities,
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

    /// Laid out by hand from the PCI spec: BAR0 64-bit prefetchable memory, BAR2 32-bit
    /// memory, BAR3 I/O; MSI (4 vectors requested, 2 enabled, 64-bit, maskable) and MSI-X
    /// (64 vectors, table in BAR0 at 0x2000, PBA in BAR2 at 0x800, enabled); two extended
    /// capabilities (AER at 0x100, serial number at 0x140).
    #[test]
    fn decodes_bars_msi_msix_and_extended_capabilities() {
        let mut c = vec![0u8; 4096];
        c[0x06] = 0x10;
        c[0x10..0x14].copy_from_slice(&0xfe00_000cu32.to_le_bytes()); // 64-bit, prefetchable
        c[0x14..0x18].copy_from_slice(&0x0000_0001u32.to_le_bytes()); // upper half
        c[0x18..0x1c].copy_from_slice(&0xfd00_0000u32.to_le_bytes()); // 32-bit
        c[0x1c..0x20].copy_from_slice(&0x0000_c001u32.to_le_bytes()); // I/O
        c[0x34] = 0x40;
        c[0x40] = 0x05;
        c[0x41] = 0x60;
        // MSI control: enable, MMC 2 (4), MME 1 (2), 64-bit, per-vector masking
        c[0x42..0x44].copy_from_slice(&(0x1u16 | 2 << 1 | 1 << 4 | 0x80 | 0x100).to_le_bytes());
        c[0x60] = 0x11;
        c[0x61] = 0x00;
        // MSI-X control: table size 64 (63), enabled; table BIR 0 at 0x2000, PBA BIR 2 at 0x800
        c[0x62..0x64].copy_from_slice(&(63u16 | 0x8000).to_le_bytes());
        c[0x64..0x68].copy_from_slice(&0x2000u32.to_le_bytes());
        c[0x68..0x6c].copy_from_slice(&(0x800u32 | 2).to_le_bytes());
        // Extended: AER v1 at 0x100 → 0x140; DSN v1 at 0x140, last.
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | 1 << 16 | 0x140 << 20).to_le_bytes());
        c[0x140..0x144].copy_from_slice(&(0x0003u32 | 1 << 16).to_le_bytes());
        let p = decode_pci_config(&c).unwrap();
        assert_eq!(
            p.decoded_bars,
            vec![
                PciBar {
                    index: 0,
                    kind: BarKind::Memory64,
                    prefetchable: true,
                    address: 0x1_fe00_0000
                },
                PciBar {
                    index: 2,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                    address: 0xfd00_0000
                },
                PciBar {
                    index: 3,
                    kind: BarKind::Io,
                    prefetchable: false,
                    address: 0xc000
                },
                PciBar {
                    index: 4,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                    address: 0
                },
                PciBar {
                    index: 5,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                    address: 0
                },
            ]
        );
        assert_eq!(
            p.msi,
            Some(PciMsi {
                offset: 0x40,
                enabled: true,
                vectors: 4,
                enabled_vectors: 2,
                address_64: true,
                per_vector_masking: true
            })
        );
        assert_eq!(
            p.msix,
            Some(PciMsix {
                offset: 0x60,
                enabled: true,
                function_mask: false,
                table_size: 64,
                table_bir: 0,
                table_offset: 0x2000,
                pba_bir: 2,
                pba_offset: 0x800,
            })
        );
        let ext: Vec<_> = p
            .extended_capabilities
            .iter()
            .map(|c| (c.offset, c.name.as_str()))
            .collect();
        assert_eq!(
            ext,
            [
                (0x100, "Advanced Error Reporting"),
                (0x140, "Device Serial Number")
            ]
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        // With only 256 bytes there is nothing extended to walk.
        assert!(decode_pci_config(&c[..256])
            .unwrap()
            .extended_capabilities
            .is_empty());
        // A loop, a pointer into the legacy header, a pointer past what was read.
        c[0x140..0x144].copy_from_slice(&(0x0003u32 | 0x100 << 20).to_le_bytes());
        assert!(decode_pci_config(&c).unwrap().warnings[0].contains("loops back to 0x100"));
        c[0x140..0x144].copy_from_slice(&(0x0003u32 | 0x40 << 20).to_le_bytes());
        assert!(decode_pci_config(&c).unwrap().warnings[0].contains("legacy header"));
        assert!(
            decode_pci_config(&c[..0x120]).unwrap().warnings[0].contains("outside the 288 bytes")
        );
        // A 64-bit BAR5 has no upper half.
        c[0x24..0x28].copy_from_slice(&0x4u32.to_le_bytes());
        let p = decode_pci_config(&c[..256]).unwrap();
        assert!(p
            .warnings
            .iter()
            .any(|w| w == "BAR5 is 64-bit but has no upper half"));
    }
}
