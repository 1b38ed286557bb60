// napi-derive registers exports only outside cfg(test), so a test build sees them unused.
#![cfg_attr(test, allow(dead_code))]

//! The N-API binding: argument conversion between JavaScript and `vfio-user-client`, nothing
//! else. Protocol logic lives in the crates; the typed API lives in `ts/`.

mod batch;
mod client;
mod convert;
mod device;
mod dma;
mod event;
mod events;
mod feature;
mod irq;
mod js_callback;
mod loop_reader;
mod migration;
mod pci;
mod region;
mod tap;
mod view;

use convert::{NativeCapabilitiesResult, NativeError};
use napi_derive::napi;

/// Parses a capability JSON text (without its NUL) exactly as VERSION replies are parsed.
#[napi]
pub fn parse_capabilities(json: String) -> NativeCapabilitiesResult {
    match vfio_user_client::proto::parse_capabilities(&json) {
        Ok(p) => NativeCapabilitiesResult {
            capabilities: Some(convert::capabilities(&p.capabilities)),
            warnings: p.warnings,
            error: None,
        },
        Err(e) => NativeCapabilitiesResult {
            capabilities: None,
            warnings: Vec::new(),
            error: Some(NativeError::proto(e.0)),
        },
    }
}
