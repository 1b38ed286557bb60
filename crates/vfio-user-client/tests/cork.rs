//! Corking: requests sent while a `Cork` is held go out together, in order, when it is
//! released, and nothing that must not wait (a blocking request, fds) is held back by it.

mod common;

use common::*;
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::Duration;
use vfio_user_client::{Error, Options, Reply, Request};

const GET_INFO: u16 = 4;
const REGION_WRITE: u16 = 10;

type Outcome = Result<Reply, Error>;

fn send_info(client: &vfio_user_client::Client, done: &mpsc::Sender<Outcome>) {
    let done = done.clone();
    client
        .send_callback(
            Request::new(GET_INFO, &get_info()),
            Box::new(move |r| {
                let _ = done.send(r);
            }),
        )
        .unwrap();
}

/// True when the client has written nothing the peer could read yet.
fn nothing_sent(peer: &Peer) -> bool {
    let mut probe = [0u8; 1];
    peer.s.set_nonblocking(true).unwrap();
    let r = nix::sys::socket::recv(
        std::os::fd::AsRawFd::as_raw_fd(&peer.s),
        &mut probe,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    );
    peer.s.set_nonblocking(false).unwrap();
    r == Err(nix::errno::Errno::EAGAIN)
}

#[test]
fn corked_requests_go_out_together_and_in_order() {
    let (client, mut peer) = negotiated(Options::default());
    let before = client.stats();
    let (tx, rx) = mpsc::channel();
    let cork = client.cork();
    for _ in 0..63 {
        send_info(&client, &tx);
    }
    client.post(Request::new(REGION_WRITE, &[0u8; 24])).unwrap();
    assert!(nothing_sent(&peer), "a corked request was written");
    drop(cork);
    let after = client.stats();
    assert_eq!(after.inline_sends, before.inline_sends);
    assert_eq!(after.queued_sends - before.queued_sends, 64);
    assert_eq!(
        after.queue_writes - before.queue_writes,
        1,
        "64 small messages, one sendmsg"
    );
    let mut last = None;
    for i in 0..64 {
        let m = peer.read_msg();
        if i == 63 {
            assert_eq!(m.header.command, REGION_WRITE);
            assert!(m.header.no_reply());
            break;
        }
        assert_eq!(m.header.command, GET_INFO);
        if let Some(prev) = last {
            assert_eq!(m.header.id, u16::wrapping_add(prev, 1), "sent out of order");
        }
        last = Some(m.header.id);
        peer.reply(&m.header, &get_info());
    }
    for _ in 0..63 {
        let r = rx.recv_timeout(Duration::from_secs(10)).expect("a reply");
        assert_eq!(r.expect("reply").header.command, GET_INFO);
    }
}

#[test]
fn a_blocking_request_does_not_wait_behind_a_cork() {
    let (client, peer) = negotiated(Options::default());
    let server = std::thread::spawn(move || {
        let mut peer = peer;
        for _ in 0..4 {
            let m = peer.read_msg();
            peer.reply(&m.header, &get_info());
        }
        peer
    });
    let (tx, rx) = mpsc::channel();
    let _cork = client.cork();
    for _ in 0..3 {
        send_info(&client, &tx);
    }
    // Held on this very thread: were it corked, it could only time out.
    let reply = client
        .send_wait(Request {
            timeout: Some(Duration::from_secs(30)),
            ..Request::new(GET_INFO, &get_info())
        })
        .expect("the blocking request was answered");
    assert_eq!(reply.header.command, GET_INFO);
    for _ in 0..3 {
        assert!(rx
            .recv_timeout(Duration::from_secs(10))
            .expect("reply")
            .is_ok());
    }
    drop(server.join());
}

#[test]
fn a_message_with_fds_is_written_alone_and_its_fds_arrive_with_it() {
    let (client, mut peer) = negotiated(Options::default());
    let (tx, _rx) = mpsc::channel::<Outcome>();
    let file = std::fs::File::open("/dev/null").unwrap();
    let fds = [file.as_fd()];
    let cork = client.cork();
    send_info(&client, &tx);
    let before = client.stats();
    client
        .post(Request {
            fds: &fds,
            ..Request::new(REGION_WRITE, &[0u8; 24])
        })
        .unwrap();
    let after = client.stats();
    // Written on the spot, behind what the cork held: no queued copy, no duplicated fd.
    assert_eq!(after.inline_sends - before.inline_sends, 1);
    assert_eq!(after.queued_sends, before.queued_sends);
    send_info(&client, &tx);
    drop(cork);
    let counts: Vec<(u16, usize)> = (0..3)
        .map(|_| {
            let m = peer.read_msg();
            (m.header.command, m.fds.len())
        })
        .collect();
    assert_eq!(
        counts,
        vec![(GET_INFO, 0), (REGION_WRITE, 1), (GET_INFO, 0)]
    );
    let stats = client.stats();
    assert!(
        stats.queue_writes >= 2,
        "a corked request shared the sendmsg of the message with fds"
    );
}

#[test]
fn a_corked_burst_bigger_than_the_socket_buffer_arrives_whole_and_in_order() {
    let (client, peer) = negotiated_with_sndbuf(Options::default(), 4096);
    const N: usize = 2000;
    let reader = std::thread::spawn(move || {
        let mut peer = peer;
        let mut seen = Vec::with_capacity(N);
        for _ in 0..N {
            let m = peer.read_msg();
            assert_eq!(m.header.command, REGION_WRITE);
            seen.push(u32::from_ne_bytes(m.payload[16..20].try_into().unwrap()));
        }
        seen
    });
    let cork = client.cork();
    for i in 0..N as u32 {
        let mut payload = vec![0u8; 16 + 1000];
        payload[8..12].copy_from_slice(&1000u32.to_ne_bytes());
        payload[16..20].copy_from_slice(&i.to_ne_bytes());
        client.post(Request::new(REGION_WRITE, &payload)).unwrap();
    }
    drop(cork);
    let seen = reader.join().expect("reader");
    assert_eq!(seen, (0..N as u32).collect::<Vec<_>>());
    assert!(
        client.stats().partial_writes > 0,
        "the socket never filled up"
    );
}

#[test]
fn messages_with_fds_in_a_corked_burst_that_fills_the_socket_keep_their_place_and_fds() {
    // Each message with an fd flushes what the cork holds and goes on the spot; once the
    // socket is full it queues behind the rest instead (with its fd duplicated), in order.
    let (client, peer) = negotiated_with_sndbuf(Options::default(), 4096);
    const N: usize = 2000;
    let reader = std::thread::spawn(move || {
        let mut peer = peer;
        (0..N)
            .map(|_| {
                let m = peer.read_msg();
                assert_eq!(m.header.command, REGION_WRITE);
                let seq = u32::from_ne_bytes(m.payload[16..20].try_into().unwrap());
                (seq, m.fds.len())
            })
            .collect::<Vec<_>>()
    });
    let file = std::fs::File::open("/dev/null").unwrap();
    let with_fd = [file.as_fd()];
    let cork = client.cork();
    for i in 0..N as u32 {
        let mut payload = vec![0u8; 16 + 1000];
        payload[8..12].copy_from_slice(&1000u32.to_ne_bytes());
        payload[16..20].copy_from_slice(&i.to_ne_bytes());
        // The first goes into an empty socket: on the spot, whatever the timing.
        let fds: &[_] = if i % 50 == 0 { &with_fd } else { &[] };
        client
            .post(Request {
                fds,
                ..Request::new(REGION_WRITE, &payload)
            })
            .unwrap();
    }
    drop(cork);
    let seen = reader.join().expect("reader");
    let expected: Vec<_> = (0..N as u32)
        .map(|i| (i, usize::from(i % 50 == 0)))
        .collect();
    assert_eq!(seen, expected);
    let stats = client.stats();
    assert!(stats.partial_writes > 0, "the socket never filled up");
    assert!(
        stats.inline_sends > 0,
        "no message with fds went on the spot"
    );
}
