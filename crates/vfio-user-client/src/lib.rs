//! The vfio-user client transport: one UNIX socket, one I/O thread, and the queues between
//! them (protocol.md section 5, design.md section 2).
//!
//! - Requests are written inline from the caller's thread when nothing is queued; a send that
//!   would block queues the rest and the I/O thread finishes it when the socket is writable.
//! - Replies are matched by id and command; every waited request has a deadline; a late reply
//!   is read whole and dropped.
//! - EOF or a corrupt stream fails everything queued or pending at once.
//!
//! QEMU's three message kinds map to: WAIT = [`Client::send_wait`] (blocks on a timed condvar,
//! reading its own reply when it can), NOWAIT = [`Client::send_nowait`] (a [`Ticket`] to collect
//! later), ASYNC = [`Client::post`] (No_reply) and our replies to server requests. Event-loop
//! callers use [`Client::send_callback`].

mod client;
mod cork;
mod dma;
mod dma_memory;
mod dma_table;
mod error;
mod fault_safe;
mod ids;
mod io_thread;
mod irq;
mod irq_table;
mod join;
mod options;
mod outgoing;
mod pending;
mod pump;
mod reader;
mod receive;
mod region;
mod region_map;
mod rx;
mod shared;
mod socket;
mod state;
mod tap;
mod tap_io;
mod target;
mod ticket;
mod write_multi;

pub use client::{Client, Request};
pub use cork::Cork;
pub use dma::DmaMap;
pub use dma_memory::DmaMemory;
pub use dma_table::LocalMemory;
pub use error::Error;
pub use irq::{Enabled, IrqFds};
pub use irq_table::IrqHook;
pub use join::JoinDone;
pub use options::{Options, OUR_MAX_MSG_FDS};
pub use pending::{Completion, Reply};
pub use pump::{PumpDone, Pumped, WRITES_IN_FLIGHT};
pub use reader::ExternalReader;
pub use region::{DataCompletion, IntoCompletion, ReadData, READ_PIECE};
pub use region_map::RegionMapping;
pub use shared::DmaHook;
pub use socket::{adopt_unix_stream, connect_unix, MAX_RECV_FDS};
pub use state::Stats;
pub use tap::{Sender, Tap, TapEvent, TapRecord, TapSink, MAX_TAP_SESSIONS, RELAY_BUFFER};
pub use tap_io::TAP_LINGER;
pub use target::{ReadCancel, ReadInto};
pub use ticket::Ticket;
pub use vfio_user_proto as proto;
