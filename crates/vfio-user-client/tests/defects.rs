//! Regression tests for defects found by attacking the client (issue 5): each failed before
//! its fix.

mod common;

use common::*;
use std::time::Duration;
use vfio_user_client::proto::Header;
use vfio_user_client::{Options, Request, Ticket};

const GET_INFO: u16 = 4;
const DMA_READ: u16 = 11;

/// How the echo peer treats a request (bytes 4..8 of its payload).
const NOW: u32 = 0;
const LATE: u32 = 1;
const RELEASE: u32 = 2;

/// A GET_INFO payload carrying `mode` and a nonce the peer echoes back.
fn nonce_req(mode: u32, nonce: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0..4].copy_from_slice(&16u32.to_ne_bytes());
    p[4..8].copy_from_slice(&mode.to_ne_bytes());
    p[8..16].copy_from_slice(&nonce.to_ne_bytes());
    p
}

fn nonce_of(payload: &[u8]) -> u64 {
    u64::from_ne_bytes(payload[8..16].try_into().unwrap())
}

/// Echoes each request's payload as its reply, except LATE requests, which it holds until a
/// RELEASE request arrives: then it sends every held (late) reply first, and answers.
fn echo_peer(mut peer: Peer) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Some(m) = peer.try_read_msg() {
            let mode = u32::from_ne_bytes(m.payload[4..8].try_into().unwrap());
            if mode == LATE {
                held.push(m);
                continue;
            }
            if mode == RELEASE {
                for late in held.drain(..) {
                    peer.reply(&late.header, &late.payload);
                }
            }
            peer.reply(&m.header, &m.payload);
        }
    })
}

fn send(client: &vfio_user_client::Client, mode: u32, nonce: u64, timeout: Duration) -> Ticket {
    client
        .send_nowait(Request {
            timeout: Some(timeout),
            ..Request::new(GET_INFO, &nonce_req(mode, nonce))
        })
        .expect("sent")
}

/// Sends LATE requests that time out until `n` ids wait for a late reply. A request that
/// times out before it reached the wire frees its id at once, so it may take more than `n`.
fn tombstones(client: &vfio_user_client::Client, n: u64) {
    while client.stats().tombstones < n {
        let missing = n - client.stats().tombstones;
        let late: Vec<_> = (0..missing)
            .map(|i| send(client, LATE, i, Duration::from_millis(1)))
            .collect();
        for t in late {
            assert_eq!(t.wait().unwrap_err().code(), "ETIMEDOUT");
        }
    }
    assert_eq!(client.stats().tombstones, n);
}

/// More timed-out requests than any bounded memory of them would hold, then enough requests
/// to wrap the 16-bit ids, then the late replies: none may answer a newer request.
#[test]
fn a_late_reply_never_answers_a_newer_request_after_the_ids_wrap() {
    let (client, peer) = negotiated(Options::default());
    let peer = echo_peer(peer);
    const TIMED_OUT: u64 = 6000;
    tombstones(&client, TIMED_OUT);
    // Answered at once: these take every id the timed-out ones do not hold, and wrap.
    let long = Duration::from_secs(600);
    let mut nonce = 1_000_000;
    for _ in 0..(65_536 - TIMED_OUT + 100) {
        nonce += 1;
        let r = send(&client, NOW, nonce, long).wait().expect("answered");
        assert_eq!(nonce_of(&r.payload), nonce);
    }
    // The late replies come now, ahead of the answers to these.
    let release: Vec<_> = (0..200)
        .map(|i| (nonce + 1 + i, send(&client, RELEASE, nonce + 1 + i, long)))
        .collect();
    for (n, t) in release {
        let r = t.wait().expect("answered");
        assert_eq!(nonce_of(&r.payload), n, "a reply reached the wrong request");
    }
    let stats = client.stats();
    assert_eq!(stats.tombstones, 0, "every late reply released its id");
    assert_eq!(stats.dropped_replies, TIMED_OUT);
    client.close();
    peer.join().unwrap();
}

/// When every id waits for a late reply, a new request is refused (EAGAIN) rather than sent
/// with an id whose old reply may still come; once the late replies arrive, sending resumes.
#[test]
fn every_id_held_by_a_late_reply_refuses_new_requests() {
    let (client, mut peer) = negotiated(Options::default());
    let reader = std::thread::spawn(move || {
        let held: Vec<_> = (0..65_536).map(|_| peer.read_msg()).collect();
        (peer, held)
    });
    tombstones(&client, 65_536);
    let (mut peer, held) = reader.join().unwrap();
    for _ in 0..1000 {
        let e = client
            .send_nowait(Request::new(GET_INFO, &nonce_req(NOW, 0)))
            .err()
            .expect("refused");
        assert_eq!(e.code(), "EAGAIN", "{e}");
        assert!(
            e.message.contains("65536 waiting for the late reply"),
            "{e}"
        );
        let e = client
            .post(Request::new(GET_INFO, &nonce_req(NOW, 0)))
            .unwrap_err();
        assert_eq!(e.code(), "EAGAIN");
    }
    assert_eq!(client.stats().tombstones, 65_536);
    // The late replies, then a server request: once the client has answered that, it has
    // read every reply before it (the stream is processed in order).
    for m in &held {
        peer.reply(&m.header, &m.payload);
    }
    peer.write(&message(Header::command(5, DMA_READ, 16, false), &[0; 16]));
    assert_eq!(peer.read_msg().header.id, 5);
    assert_eq!(client.stats().tombstones, 0);
    let t = send(&client, NOW, 42, Duration::from_secs(600));
    let m = peer.read_msg();
    peer.reply(&m.header, &m.payload);
    assert_eq!(nonce_of(&t.wait().expect("answered").payload), 42);
}

/// A server request in the same read as the VERSION reply is judged after that reply has
/// completed the negotiation, and served as usual.
#[test]
fn a_server_request_right_behind_the_version_reply() {
    let (client, mut peer) = pair(Options::default());
    let t = std::thread::spawn(move || {
        let m = peer.read_msg();
        let payload = version_payload(0, 0, RUST_VMM_CAPS);
        let mut bytes = message(Header::reply_to(&m.header, payload.len()), &payload);
        let mut dma = [0u8; 16];
        dma[8..16].copy_from_slice(&8u64.to_ne_bytes());
        bytes.extend(message(Header::command(77, DMA_READ, 16, false), &dma));
        // One write: both arrive in one read on the client.
        peer.write(&bytes);
        let answer = peer.read_msg();
        assert_eq!((answer.header.id, answer.header.command), (77, DMA_READ));
        assert!(answer.header.is_error());
        peer
    });
    let v = client.negotiate().expect("negotiated");
    assert_eq!(v.capabilities.max_msg_fds, 8);
    let mut peer = t.join().unwrap();
    let t = client
        .send_nowait(Request::new(GET_INFO, &get_info()))
        .unwrap();
    let m = peer.read_msg();
    peer.reply(&m.header, &get_info());
    t.wait().expect("stream in sync");
    assert_eq!(client.stats().server_requests, 1);
}

/// A REGION_WRITE or REGION_READ moving more than the server's max_data_xfer_size is refused
/// (E2BIG) before anything is sent.
#[test]
fn transfers_beyond_the_servers_max_data_xfer_size_are_refused_unsent() {
    let (client, mut peer) = negotiated(Options::default());
    let mut write = vec![0u8; 16 + (1 << 20) + 1];
    write[12..16].copy_from_slice(&((1u32 << 20) + 1).to_ne_bytes());
    let e = client
        .send_nowait(Request::new(10, &write))
        .err()
        .expect("refused");
    assert_eq!((e.code().as_str(), e.command), ("E2BIG", Some(10)));
    let mut read = [0u8; 16];
    read[12..16].copy_from_slice(&((1u32 << 20) + 1).to_ne_bytes());
    let e = client.post(Request::new(9, &read)).unwrap_err();
    assert_eq!(e.code(), "E2BIG");
    // Nothing went out: the next message the peer sees is this one.
    let t = send(&client, NOW, 7, Duration::from_secs(600));
    let m = peer.read_msg();
    assert_eq!(m.header.command, GET_INFO);
    peer.reply(&m.header, &m.payload);
    assert_eq!(nonce_of(&t.wait().unwrap().payload), 7);
}
