//! Every fd has one owner and is closed on every path: counted with /proc/self/fd.
//! One test in its own binary, so no other test opens or closes fds meanwhile.

mod common;

use common::*;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::stat::fstat;
use std::os::fd::{AsFd, AsRawFd};
use vfio_user_client::proto::Header;
use vfio_user_client::{Options, ReadInto, Request, READ_PIECE};

const DMA_MAP: u16 = 2;
const GET_INFO: u16 = 4;
const REGION_INFO: u16 = 5;
const DMA_READ: u16 = 11;
const REGION_READ: u16 = 9;

#[test]
fn fds_pass_both_ways_and_none_leak() {
    let baseline = open_fds();
    {
        let (client, mut peer) = negotiated(Options::default());
        let memory = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap();

        // Client to server: the peer receives a duplicate of our fd.
        let fds = [memory.as_fd()];
        let t = client
            .send_nowait(Request {
                fds: &fds,
                ..Request::new(DMA_MAP, &[0; 32])
            })
            .unwrap();
        let m = peer.read_msg();
        assert_eq!(m.fds.len(), 1);
        assert_eq!(
            fstat(&m.fds[0]).unwrap().st_ino,
            fstat(&memory).unwrap().st_ino
        );
        peer.reply(&m.header, &[]);
        t.wait().unwrap();
        drop(m);

        // Server to client: a REGION_INFO reply's fd is handed to the caller.
        let mut p = [0u8; 32];
        p[0..4].copy_from_slice(&32u32.to_ne_bytes());
        let t = client.send_nowait(Request::new(REGION_INFO, &p)).unwrap();
        let m = peer.read_msg();
        let reply = message(Header::reply_to(&m.header, 32), &p);
        peer.send_with_fds(&reply, &[memory.as_raw_fd()]);
        let r = t.wait().unwrap();
        assert_eq!(r.fds.len(), 1);
        assert_eq!(
            fstat(&r.fds[0]).unwrap().st_ino,
            fstat(&memory).unwrap().st_ino
        );
        drop(r);

        // Fds where none belong: a GET_INFO reply carrying one fails and closes it.
        let t = client
            .send_nowait(Request::new(GET_INFO, &get_info()))
            .unwrap();
        let m = peer.read_msg();
        let mut info = [0u8; 16];
        info[0..4].copy_from_slice(&16u32.to_ne_bytes());
        peer.send_with_fds(
            &message(Header::reply_to(&m.header, 16), &info),
            &[memory.as_raw_fd()],
        );
        let e = t.wait().unwrap_err();
        assert_eq!(e.code(), "EPROTO");
        assert!(e.message.contains("fds"), "{e}");

        // A server request carrying fds: error reply, fds closed.
        let mut dma = [0u8; 16];
        dma[8..16].copy_from_slice(&8u64.to_ne_bytes());
        peer.send_with_fds(
            &message(Header::command(5, DMA_READ, 16, false), &dma),
            &[memory.as_raw_fd(), memory.as_raw_fd()],
        );
        assert!(peer.read_msg().header.is_error());

        // A late reply with an fd, after a timeout: drained, fd closed.
        let t = client
            .send_nowait(Request {
                timeout: Some(std::time::Duration::from_millis(20)),
                ..Request::new(REGION_INFO, &p)
            })
            .unwrap();
        let m = peer.read_msg();
        assert_eq!(t.wait().unwrap_err().code(), "ETIMEDOUT");
        peer.send_with_fds(
            &message(Header::reply_to(&m.header, 32), &p),
            &[memory.as_raw_fd()],
        );
        // Sync with the client: a full round trip after the late reply.
        let t = client
            .send_nowait(Request::new(GET_INFO, &get_info()))
            .unwrap();
        let m = peer.read_msg();
        peer.reply(&m.header, &info);
        t.wait().unwrap();

        // Fds queued with a request that never gets written are closed when it fails.
        nix::sys::socket::setsockopt(&peer.s, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
        let big = vec![0u8; 1 << 20];
        let _blocked = client.send_nowait(Request::new(GET_INFO, &big)).unwrap();
        let queued = client
            .send_nowait(Request {
                fds: &fds,
                ..Request::new(DMA_MAP, &[0; 32])
            })
            .unwrap();
        drop(peer);
        assert_eq!(queued.wait().unwrap_err().code(), "ECONNRESET");
        client.close();
    }
    assert_eq!(open_fds(), baseline, "every fd was closed");

    // A cork does not keep a dropped client's socket, eventfd and epoll open.
    let (client, peer) = negotiated(Options::default());
    let cork = client.cork();
    drop(client);
    drop(peer);
    assert_eq!(
        open_fds(),
        baseline,
        "the cork kept the connection's fds open"
    );
    drop(cork);

    // An fd that arrives in the middle of a large body (read straight into the body) belongs
    // to that message: a REGION_READ reply may carry none, so it fails and the fd is closed.
    {
        let (client, mut peer) = negotiated(Options::default());
        let count = 200_000u32;
        let mut p = [0u8; 16];
        p[8..12].copy_from_slice(&2u32.to_ne_bytes());
        p[12..16].copy_from_slice(&count.to_ne_bytes());
        let t = client.send_nowait(Request::new(REGION_READ, &p)).unwrap();
        fd_mid_body(&client, &mut peer, count as usize, move || {
            t.wait().unwrap_err()
        });
    }
    assert_eq!(
        open_fds(),
        baseline,
        "an fd that came mid-body was not closed"
    );

    // The same when the body is read straight into the caller's memory (a read into memory).
    {
        let (client, mut peer) = negotiated(Options::default());
        let mut mem = vec![0u8; READ_PIECE];
        // SAFETY: `mem` outlives the read, which settles before this block ends.
        let into = unsafe { ReadInto::new(mem.as_mut_ptr(), mem.len()) };
        let (tx, rx) = std::sync::mpsc::channel();
        client
            .region_read_into_callback(2, 0, into, None, Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        fd_mid_body(&client, &mut peer, READ_PIECE, move || {
            rx.recv().unwrap().unwrap_err()
        });
    }
    assert_eq!(
        open_fds(),
        baseline,
        "an fd that came mid-body of a read into memory was not closed"
    );
}

/// Answers the REGION_READ just sent with `count` data bytes, an eventfd riding the part after
/// the first 100,000 bytes (past the 64 KiB read buffer, so read straight into the body); the
/// read (`settled` waits for it) must fail with EPROTO and the stream stay in step.
fn fd_mid_body(
    client: &vfio_user_client::Client,
    peer: &mut Peer,
    count: usize,
    settled: impl FnOnce() -> vfio_user_client::Error,
) {
    let stray = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap();
    let m = peer.read_msg();
    let mut body = m.payload[..16].to_vec();
    body.resize(16 + count, 0xab);
    let whole = message(Header::reply_to(&m.header, body.len()), &body);
    peer.write(&whole[..100_000]);
    peer.send_with_fds(&whole[100_000..], &[stray.as_raw_fd()]);
    let e = settled();
    assert_eq!(e.code(), "EPROTO", "{}", e.message);
    let t = client
        .send_nowait(Request::new(GET_INFO, &get_info()))
        .unwrap();
    let m = peer.read_msg();
    peer.reply(&m.header, &get_info());
    t.wait().unwrap();
}
