//! Connection settings.

use std::time::Duration;
use vfio_user_proto::{Capabilities, VersionProposal};

/// Most fds we accept in one message, as advertised in our capabilities.
pub const OUR_MAX_MSG_FDS: u32 = 16;

/// Default for [`Options::max_queued_bytes`].
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 256 << 20;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Default time to wait for a reply (per call overridable). QEMU's default is 5 s.
    pub timeout: Duration,
    /// Never write from the caller's thread: every message goes through the queue and the
    /// I/O thread (QEMU's `x-send-queued`). For tests of that path and for callers that must
    /// never make a syscall.
    pub send_queued: bool,
    /// What we propose in VERSION.
    pub proposal: VersionProposal,
    /// Most bytes queued for a server that does not read: beyond this, new requests are
    /// refused (ENOBUFS) and a server that floods us with requests while not reading our
    /// replies is disconnected.
    pub max_queued_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_millis(5000),
            send_queued: false,
            proposal: VersionProposal {
                major: 0,
                minor: 0,
                capabilities: Capabilities {
                    max_msg_fds: OUR_MAX_MSG_FDS,
                    ..Capabilities::default()
                },
            },
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}
