//! The PCI configuration header, through the proto crate's `pci.rs`.

use crate::convert::NativeError;
use napi::bindgen_prelude::{BufferSlice, Either};
use napi_derive::napi;
use vfio_user_client::proto::pci;

#[napi(object, object_from_js = false)]
pub struct NativePciCapability {
    pub offset: u32,
    pub id: u32,
    pub name: String,
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
    pub warnings: Vec<String>,
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
            capabilities: p
                .capabilities
                .into_iter()
                .map(|c| NativePciCapability {
                    offset: c.offset,
                    id: c.id,
                    name: c.name,
                })
                .collect(),
            warnings: p.warnings,
        }),
        Err(e) => Either::B(NativeError::proto(e.0)),
    }
}
