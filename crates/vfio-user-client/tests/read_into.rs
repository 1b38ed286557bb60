//! Region reads into the caller's memory (`region_read_into`), against a scripted peer: the
//! data lands where it belongs, a reply of the wrong size is EPROTO with the stream intact,
//! and a read that settles while its body is still arriving (a timeout) never writes the
//! memory afterwards.

mod common;

use common::*;
use std::sync::mpsc;
use std::time::Duration;
use vfio_user_client::proto::Header;
use vfio_user_client::{Client, Options, ReadInto, Request, READ_PIECE};

const REGION_READ: u16 = 9;
const SMALL_CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":64}}"#;

fn pattern(offset: u64, count: usize) -> Vec<u8> {
    (0..count as u64)
        .map(|k| ((offset + k) % 251) as u8)
        .collect()
}

fn access(m: &Msg) -> (u64, u32, u32) {
    let p = &m.payload;
    (
        u64::from_ne_bytes(p[0..8].try_into().unwrap()),
        u32::from_ne_bytes(p[8..12].try_into().unwrap()),
        u32::from_ne_bytes(p[12..16].try_into().unwrap()),
    )
}

/// Serves `n` reads from the pattern, each reply with `extra` more data bytes than asked for
/// (negative: fewer), announced as such in its header.
fn serve(mut peer: Peer, n: usize, extra: isize) -> std::thread::JoinHandle<Peer> {
    std::thread::spawn(move || {
        for _ in 0..n {
            let m = peer.read_msg();
            assert_eq!(m.header.command, REGION_READ);
            let (offset, _, count) = access(&m);
            let mut reply = m.payload[..16].to_vec();
            let len = (count as isize + extra).max(0) as usize;
            reply.extend(pattern(offset, len));
            peer.reply(&m.header, &reply);
        }
        peer
    })
}

/// Starts a read of `mem.len()` bytes at `offset` of region 2 into `mem`; its result comes
/// on the channel.
fn read_with_callback(
    client: &Client,
    offset: u64,
    mem: &mut [u8],
    timeout: Option<Duration>,
) -> mpsc::Receiver<Result<(), vfio_user_client::Error>> {
    let (tx, rx) = mpsc::channel();
    client
        .region_read_into_callback(
            2,
            offset,
            into(mem),
            timeout,
            Box::new(move |r| tx.send(r).unwrap()),
        )
        .unwrap();
    rx
}

fn into(mem: &mut [u8]) -> ReadInto {
    // SAFETY: every test keeps `mem` alive and unmoved until its read has settled.
    unsafe { ReadInto::new(mem.as_mut_ptr(), mem.len()) }
}

#[test]
fn a_large_read_lands_in_the_memory_given() {
    let (client, peer) = negotiated(Options::default());
    let server = serve(peer, 1, 0);
    let mut mem = vec![0u8; READ_PIECE];
    client
        .region_read_into(2, 1000, into(&mut mem), None)
        .unwrap();
    assert!(mem == pattern(1000, READ_PIECE));
    server.join().unwrap();
}

#[test]
fn a_read_bigger_than_a_piece_is_split_though_the_server_takes_more() {
    // The server's max_data_xfer_size is 1 MiB; pieces are READ_PIECE (see its comment), the
    // last one what is left.
    const LEN: usize = 1 << 20;
    let expected: Vec<_> = (0..LEN.div_ceil(READ_PIECE))
        .map(|k| {
            let at = k * READ_PIECE;
            (at as u64, READ_PIECE.min(LEN - at))
        })
        .collect();
    let pieces = expected.len();
    let (client, mut peer) = negotiated(Options::default());
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..pieces {
            let m = peer.read_msg();
            let (offset, _, count) = access(&m);
            seen.push((offset, count as usize));
            let mut reply = m.payload[..16].to_vec();
            reply.extend(pattern(offset, count as usize));
            peer.reply(&m.header, &reply);
        }
        seen
    });
    let data = client.region_read(2, 0, LEN, None).unwrap().into_vec();
    assert!(data == pattern(0, LEN));
    let seen = server.join().unwrap();
    assert_eq!(seen, expected);
}

#[test]
fn pieces_land_in_their_places_blocking_and_with_a_callback() {
    let (client, peer) = negotiated_with_caps(SMALL_CAPS);
    let server = serve(peer, 8, 0);
    let mut mem = vec![0u8; 200];
    client
        .region_read_into(2, 1000, into(&mut mem), None)
        .unwrap();
    assert_eq!(mem, pattern(1000, 200));

    let mut other = vec![0u8; 200];
    let rx = read_with_callback(&client, 5000, &mut other, None);
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(other, pattern(5000, 200));
    server.join().unwrap();
}

#[test]
fn a_reply_of_the_wrong_size_is_eproto_and_the_stream_stays_in_sync() {
    for extra in [1isize, -1] {
        let (client, peer) = negotiated(Options::default());
        let server = serve(peer, 1, extra);
        let mut mem = vec![0xaau8; 128 << 10];
        let e = client
            .region_read_into(2, 0, into(&mut mem), None)
            .unwrap_err();
        assert_eq!(e.code(), "EPROTO", "{extra}: {e}");
        // The whole reply was read: the next request gets its own answer.
        let mut peer = server.join().unwrap();
        let t = std::thread::spawn(move || {
            let m = peer.read_msg();
            peer.reply(&m.header, &[7u8; 8]);
            peer
        });
        let r = client.send_wait(Request::new(4, &get_info())).unwrap();
        assert_eq!(r.payload, vec![7u8; 8]);
        t.join().unwrap();
    }
}

/// A server that sends the head of a read's reply (header, echo and `first` data bytes of
/// 0x55) at once, and the rest (0x66) only when told to; then answers one DEVICE_GET_INFO.
fn split_reply(
    mut peer: Peer,
    first: usize,
    go: mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let m = peer.read_msg();
        let (_, _, count) = access(&m);
        let count = count as usize;
        let mut head = Header::reply_to(&m.header, 16 + count).encode().to_vec();
        head.extend_from_slice(&m.payload[..16]);
        head.extend(std::iter::repeat_n(0x55u8, first));
        peer.write(&head);
        go.recv().unwrap();
        peer.write(&vec![0x66u8; count - first]);
        let m = peer.read_msg();
        peer.reply(&m.header, &[7u8; 8]);
    })
}

/// After a read timed out while its body was arriving: the rest of the body, sent only then,
/// reaches neither the memory nor the next request.
fn assert_untouched_after(client: &Client, mem: &[u8], go: mpsc::Sender<()>) {
    go.send(()).unwrap();
    let r = client.send_wait(Request::new(4, &get_info())).unwrap();
    assert_eq!(r.payload, vec![7u8; 8]);
    assert!(
        !mem.contains(&0x66),
        "bytes sent after the read settled were written into its memory"
    );
}

/// A read timed out while its body was arriving (`read` starts it and returns its error):
/// the rest of the body, sent only then, reaches neither the memory nor the next request.
fn timed_out_mid_body(read: impl FnOnce(&Client, &mut [u8]) -> vfio_user_client::Error) {
    let (client, peer) = negotiated(Options::default());
    let (go, wait) = mpsc::channel();
    let server = split_reply(peer, 100 << 10, wait);
    let mut mem = vec![0xaau8; READ_PIECE];
    let e = read(&client, &mut mem);
    assert_eq!(e.code(), "ETIMEDOUT");
    assert_untouched_after(&client, &mem, go);
    server.join().unwrap();
}

const SHORT: Option<Duration> = Some(Duration::from_millis(100));

#[test]
fn a_blocking_read_that_timed_out_never_writes_the_memory_again() {
    timed_out_mid_body(|client, mem| client.region_read_into(2, 0, into(mem), SHORT).unwrap_err());
}

#[test]
fn a_read_with_a_callback_that_timed_out_never_writes_the_memory_again() {
    timed_out_mid_body(|client, mem| {
        let rx = read_with_callback(client, 0, mem, SHORT);
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap()
            .unwrap_err()
    });
}

#[test]
fn a_read_cut_short_by_the_servers_end_fails_and_later_reads_are_refused() {
    let (client, mut peer) = negotiated(Options::default());
    let mut mem = vec![0xaau8; READ_PIECE];
    let rx = read_with_callback(&client, 0, &mut mem, None);
    // Half the reply, then the server goes away.
    let m = peer.read_msg();
    let mut head = Header::reply_to(&m.header, 16 + READ_PIECE)
        .encode()
        .to_vec();
    head.extend_from_slice(&m.payload[..16]);
    head.extend(std::iter::repeat_n(0x55u8, READ_PIECE / 2));
    peer.write(&head);
    drop(peer);
    let e = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), "ECONNRESET");
    // Nothing more is sent, nor any memory handed out: the next read is refused up front,
    // and its completion never runs (it is dropped with the refusal).
    let (tx, later) = mpsc::channel::<()>();
    let refused = client
        .region_read_into_callback(
            2,
            0,
            into(&mut mem),
            None,
            Box::new(move |_| tx.send(()).unwrap()),
        )
        .unwrap_err();
    assert_eq!(refused.code(), "ECONNRESET");
    assert!(later.recv().is_err());
}

#[test]
fn replies_behind_a_read_into_memory_are_framed_as_usual() {
    // After a reply read into its target the next header is read on its own; what follows
    // in the same write (three small replies behind the read's last piece) still arrives
    // whole and in order.
    let (client, mut peer) = negotiated(Options::default());
    let mut mem = vec![0u8; 2 * READ_PIECE];
    let rx = read_with_callback(&client, 0, &mut mem, None);
    let tickets: Vec<_> = (0..3)
        .map(|_| client.send_nowait(Request::new(4, &get_info())).unwrap())
        .collect();
    let msgs: Vec<Msg> = (0..5).map(|_| peer.read_msg()).collect();
    let piece = |m: &Msg| {
        let (offset, _, count) = access(m);
        let mut reply = m.payload[..16].to_vec();
        reply.extend(pattern(offset, count as usize));
        message(Header::reply_to(&m.header, reply.len()), &reply)
    };
    peer.write(&piece(&msgs[0]));
    let mut rest = piece(&msgs[1]);
    for (k, m) in msgs[2..].iter().enumerate() {
        rest.extend(message(Header::reply_to(&m.header, 8), &[k as u8; 8]));
    }
    peer.write(&rest);
    for (k, t) in tickets.into_iter().enumerate() {
        assert_eq!(t.wait().unwrap().payload, vec![k as u8; 8]);
    }
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert!(mem == pattern(0, 2 * READ_PIECE));
}

#[test]
fn an_fd_behind_a_read_into_memory_stays_with_its_own_message() {
    // The last read of a body into memory goes on into the read buffer; a reply with an fd
    // written right behind the read's reply keeps its fd, and the read its data.
    let (client, mut peer) = negotiated(Options::default());
    let mut mem = vec![0u8; READ_PIECE];
    let rx = read_with_callback(&client, 0, &mut mem, None);
    let info = client
        .send_nowait(Request::new(5, &[0u8; 32]))
        .expect("REGION_INFO sent");
    let read = peer.read_msg();
    let region_info = peer.read_msg();
    let (offset, _, count) = access(&read);
    let mut reply = read.payload[..16].to_vec();
    reply.extend(pattern(offset, count as usize));
    peer.write(&message(
        Header::reply_to(&read.header, reply.len()),
        &reply,
    ));
    let file = std::fs::File::open("/dev/null").unwrap();
    peer.send_with_fds(
        &message(Header::reply_to(&region_info.header, 32), &[0u8; 32]),
        &[std::os::fd::AsRawFd::as_raw_fd(&file)],
    );
    drop(file);
    rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert!(mem == pattern(0, READ_PIECE));
    let reply = info.wait().expect("the REGION_INFO reply");
    assert_eq!(reply.fds.len(), 1, "the fd went with another message");
}
