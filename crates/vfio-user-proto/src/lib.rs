//! The vfio-user wire format: bytes in, typed values out, and every check on what a peer sent.
//!
//! No I/O lives here. The transport (`vfio-user-client`) frames messages with [`Header`] and
//! asks this crate whether a peer's bytes are acceptable; everything a hostile server can
//! influence is decoded in this crate so it can be tested (and fuzzed) without a socket.

pub mod bytes;
mod caps;
mod command;
pub mod describe;
pub mod device;
pub mod dma;
mod error;
pub mod feature;
mod frame;
pub mod fuzzing;
mod header;
pub mod irq;
mod limits;
pub mod migration;
pub mod pci;
pub mod region;
pub mod region_io_fds;
pub mod version;
pub mod write_multi;

pub use caps::{
    parse_capabilities, Capabilities, Migration, ParsedCapabilities, TwinSocket,
    DEFAULT_MAX_BITMAP_SIZE, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DEFAULT_MAX_MSG_FDS,
    DEFAULT_PGSIZES, MAX_DATA_XFER_SIZE_LIMIT, MAX_MSG_FDS_LIMIT,
};
pub use command::{command_name, Command};
pub use error::ProtoError;
pub use frame::{Frame, Framer, BODY_FIRST};
pub use header::{Header, MessageType, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_MASK, HEADER_SIZE};
pub use limits::{check_request, reply_fd_limit, reply_size_limit, MAX_INCOMING_MESSAGE};
pub use version::{encode_version_request, validate_version_reply, Version, VersionProposal};
