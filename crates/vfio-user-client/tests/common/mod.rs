//! A scripted peer on the other end of a socketpair, built on the proto crate: it reads what
//! the client sends and answers however a test wants, including wrongly.
#![allow(dead_code)]

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use vfio_user_client::proto::{Header, HEADER_SIZE};
use vfio_user_client::{Client, Options};

pub const RUST_VMM_CAPS: &str =
    r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;

pub struct Peer {
    pub s: UnixStream,
}

pub struct Msg {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Peer {
    /// Reads one whole message, or None once the client has closed the connection.
    pub fn try_read_msg(&mut self) -> Option<Msg> {
        let mut raw = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut raw).ok()?;
        let header = Header::decode(&raw);
        let mut payload = vec![0u8; header.payload_len()];
        self.s.read_exact(&mut payload).ok()?;
        Some(Msg {
            header,
            payload,
            fds: Vec::new(),
        })
    }

    /// Reads one whole message (fds come with its first bytes).
    pub fn read_msg(&mut self) -> Msg {
        let mut raw = [0u8; HEADER_SIZE];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut got = 0;
        let mut fds = Vec::new();
        while got < HEADER_SIZE {
            let mut iov = [IoSliceMut::new(&mut raw[got..])];
            let m = recvmsg::<()>(
                self.s.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .expect("peer recvmsg");
            assert!(m.bytes > 0, "client closed the connection");
            for c in m.cmsgs().expect("cmsgs") {
                if let ControlMessageOwned::ScmRights(r) = c {
                    // SAFETY: just received; this test owns them.
                    fds.extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
            got += m.bytes;
        }
        let header = Header::decode(&raw);
        let mut payload = vec![0u8; header.payload_len()];
        self.s.read_exact(&mut payload).expect("peer read body");
        Msg {
            header,
            payload,
            fds,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("peer write");
    }

    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let iov = [IoSlice::new(bytes)];
        let n = sendmsg::<()>(
            self.s.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("peer sendmsg");
        if n < bytes.len() {
            self.write(&bytes[n..]);
        }
    }

    pub fn reply(&mut self, to: &Header, payload: &[u8]) {
        self.write(&message(Header::reply_to(to, payload.len()), payload));
    }

    pub fn error_reply(&mut self, to: &Header, errno: u32) {
        self.write(&Header::error_reply_to(to, errno).encode());
    }

    /// Answers the VERSION the client sends with 0.0 and `json`.
    pub fn accept_version(&mut self, json: &str) {
        let m = self.read_msg();
        assert_eq!(m.header.command, 1, "first message must be VERSION");
        self.reply(&m.header, &version_payload(0, 0, json));
    }
}

pub fn version_payload(major: u16, minor: u16, json: &str) -> Vec<u8> {
    let mut p = major.to_ne_bytes().to_vec();
    p.extend_from_slice(&minor.to_ne_bytes());
    p.extend_from_slice(json.as_bytes());
    p.push(0);
    p
}

pub fn message(h: Header, payload: &[u8]) -> Vec<u8> {
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    v
}

/// A client and the peer end of a fresh socketpair, not yet negotiated.
pub fn pair(options: Options) -> (Client, Peer) {
    pair_with_sndbuf(options, None)
}

/// Like [`pair`], with the client's SO_SNDBUF set first (the kernel doubles it, minimum 4608).
pub fn pair_with_sndbuf(options: Options, sndbuf: Option<usize>) -> (Client, Peer) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    if let Some(n) = sndbuf {
        nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &n).expect("SndBuf");
    }
    let client = Client::from_socket(a, options, "socketpair".into()).expect("client");
    (
        client,
        Peer {
            s: UnixStream::from(b),
        },
    )
}

/// A client that has negotiated with a peer offering the capabilities of `json`.
pub fn negotiated_with_caps(json: &'static str) -> (Client, Peer) {
    let (client, peer) = pair(Options::default());
    let t = std::thread::spawn(move || {
        let mut peer = peer;
        peer.accept_version(json);
        peer
    });
    client.negotiate().expect("negotiate");
    (client, t.join().expect("peer thread"))
}

/// A client that has negotiated with the peer (which offered `max_msg_fds` 8).
pub fn negotiated(options: Options) -> (Client, Peer) {
    negotiated_with_sndbuf_opt(options, None)
}

/// Like [`negotiated`], with the client's SO_SNDBUF set first.
pub fn negotiated_with_sndbuf(options: Options, sndbuf: usize) -> (Client, Peer) {
    negotiated_with_sndbuf_opt(options, Some(sndbuf))
}

fn negotiated_with_sndbuf_opt(options: Options, sndbuf: Option<usize>) -> (Client, Peer) {
    let (client, peer) = pair_with_sndbuf(options, sndbuf);
    let t = std::thread::spawn(move || {
        let mut peer = peer;
        peer.accept_version(RUST_VMM_CAPS);
        peer
    });
    client.negotiate().expect("negotiate");
    (client, t.join().expect("peer thread"))
}

pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

pub fn get_info() -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&16u32.to_ne_bytes());
    p
}
