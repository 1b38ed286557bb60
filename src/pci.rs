//! The PCI configuration header, through the proto crate's `pci.rs`.

use crate::convert::NativeError;
use napi::bindgen_prelude::{BigInt, BufferSlice, Either};
use napi_derive::napi;
use vfio_user_client::proto::pci;

#[napi(object, object_from_js = false)]
pub struct NativePciCapability {
    pub offset: u32,
    pub id: u32,
    pub name: String,
}

/// One decoded BAR: kind 0 I/O, 1 32-bit memory, 2 64-bit memory.
#[napi(object, object_from_js = false)]
pub struct NativePciBar {
    pub index: u32,
    pub kind: u32,
    pub prefetchable: bool,
    pub address: BigInt,
}

/// The MSI capability.
#[napi(object, object_from_js = false)]
pub struct NativePciMsi {
    pub offset: u32,
    pub enabled: bool,
    pub vectors: u32,
    pub enabled_vectors: u32,
    pub address64: bool,
    pub per_vector_masking: bool,
}

/// The MSI-X capability.
#[napi(object, object_from_js = false)]
pub struct NativePciMsix {
    pub offset: u32,
    pub enabled: bool,
    pub function_mask: bool,
    pub table_size: u32,
    pub table_bir: u32,
    pub table_offset: u32,
    pub pba_bir: u32,
    pub pba_offset: u32,
}

/// A decoded configuration header.
#[napi(object, object_from_js = false)]
pub struct NativePciConfig {
    pub vendor_id: u32,
    pub device_id: u32,
    pub command: u32,
    pub status: u32,
    pub revision: u32,
    pub class_code: u32,
    pub header_type: u32,
    pub bars: Vec<u32>,
    pub subsystem_vendor_id: u32,
    pub subsystem_id: u32,
    pub interrupt_line: u32,
    pub interrupt_pin: u32,
    pub capabilities: Vec<NativePciCapability>,
    pub decoded_bars: Vec<NativePciBar>,
    pub msi: Option<NativePciMsi>,
    pub msix: Option<NativePciMsix>,
    pub extended_capabilities: Vec<NativePciCapability>,
    pub warnings: Vec<String>,
}

fn capabilities(list: Vec<pci::PciCapability>) -> Vec<NativePciCapability> {
    list.into_iter()
        .map(|c| NativePciCapability {
            offset: c.offset,
            id: c.id,
            name: c.name,
        })
        .collect()
}

/// Decodes a type-0 configuration header and its capability list.
#[napi]
pub fn decode_pci_config(config: BufferSlice) -> Either<NativePciConfig, NativeError> {
    match pci::decode_pci_config(&config) {
        Ok(p) => Either::A(NativePciConfig {
            vendor_id: p.vendor_id,
            device_id: p.device_id,
            command: p.command,
            status: p.status,
            revision: p.revision,
            class_code: p.class_code,
            header_type: p.header_type,
            bars: p.bars.to_vec(),
            subsystem_vendor_id: p.subsystem_vendor_id,
            subsystem_id: p.subsystem_id,
            interrupt_line: p.interrupt_line,
            interrupt_pin: p.interrupt_pin,
            capabilities: capabilities(p.capabilities),
            decoded_bars: p
                .decoded_bars
                .iter()
                .map(|b| NativePciBar {
                    index: b.index,
                    kind: match b.kind {
                        pci::BarKind::Io => 0,
                        pci::BarKind::Memory32 => 1,
                        pci::BarKind::Memory64 => 2,
                    },
                    prefetchable: b.prefetchable,
                    address: BigInt::from(b.address),
                })
                .collect(),
            msi: p.msi.map(|m| NativePciMsi {
                offset: m.offset,
                enabled: m.enabled,
                vectors: m.vectors,
                enabled_vectors: m.enabled_vectors,
                address64: m.address_64,
                per_vector_masking: m.per_vector_masking,
            }),
            msix: p.msix.map(|m| NativePciMsix {
                offset: m.offset,
                enabled: m.enabled,
                function_mask: m.function_mask,
                table_size: m.table_size,
                table_bir: m.table_bir,
                table_offset: m.table_offset,
                pba_bir: m.pba_bir,
                pba_offset: m.pba_offset,
            }),
            extended_capabilities: capabilities(p.extended_capabilities),
            warnings: p.warnings,
        }),
        Err(e) => Either::B(NativeError::proto(e.0)),
    }
}
