//! Region reads and writes against a scripted peer that advertises a small
//! max_data_xfer_size: transfers split into pipelined pieces, echoes checked.

mod common;

use common::*;
use std::sync::mpsc;
use std::time::Duration;
use vfio_user_client::proto::Header;
use vfio_user_client::Client;

const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const SMALL_CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":64}}"#;

fn small() -> (Client, Peer) {
    negotiated_with_caps(SMALL_CAPS)
}

fn access(m: &Msg) -> (u64, u32, u32) {
    let p = &m.payload;
    (
        u64::from_ne_bytes(p[0..8].try_into().unwrap()),
        u32::from_ne_bytes(p[8..12].try_into().unwrap()),
        u32::from_ne_bytes(p[12..16].try_into().unwrap()),
    )
}

/// Serves reads from a pattern (byte at region offset o is o % 251) and echoes writes,
/// recording every access; `lie` alters the echo of the access at that position.
fn serve(
    mut peer: Peer,
    n: usize,
    lie: Option<usize>,
) -> std::thread::JoinHandle<Vec<(u16, u64, u32, u32)>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        for i in 0..n {
            let m = peer.read_msg();
            let (offset, region, count) = access(&m);
            seen.push((m.header.command, offset, region, count));
            let mut echo = m.payload[..16].to_vec();
            if lie == Some(i) {
                echo[0] ^= 1;
            }
            if m.header.command == REGION_READ {
                echo.extend((0..count as u64).map(|k| ((offset + k) % 251) as u8));
            }
            peer.write(&message(Header::reply_to(&m.header, echo.len()), &echo));
        }
        seen
    })
}

#[test]
fn a_read_is_split_by_max_data_xfer_size_and_reassembled() {
    let (client, peer) = small();
    let server = serve(peer, 4, None);
    let data = client.region_read(2, 1000, 200, None).unwrap().into_vec();
    assert_eq!(
        data,
        (1000..1200u64).map(|o| (o % 251) as u8).collect::<Vec<_>>()
    );
    let seen = server.join().unwrap();
    assert_eq!(
        seen,
        vec![
            (9, 1000, 2, 64),
            (9, 1064, 2, 64),
            (9, 1128, 2, 64),
            (9, 1192, 2, 8)
        ]
    );
}

#[test]
fn a_write_is_split_and_every_piece_answered() {
    let (client, peer) = small();
    let server = serve(peer, 3, None);
    client.region_write(1, 0, &[7u8; 130], None).unwrap();
    let seen = server.join().unwrap();
    assert_eq!(
        seen,
        vec![
            (REGION_WRITE, 0, 1, 64),
            (REGION_WRITE, 64, 1, 64),
            (REGION_WRITE, 128, 1, 2)
        ]
    );
}

#[test]
fn a_one_piece_read_hands_over_the_reply_buffer() {
    let (client, peer) = small();
    let server = serve(peer, 1, None);
    let data = client.region_read(1, 5, 40, None).unwrap();
    assert_eq!(data.start, 16, "the data was moved");
    assert_eq!(
        data.as_slice(),
        (5..45u64).map(|o| (o % 251) as u8).collect::<Vec<_>>()
    );
    server.join().unwrap();
}

#[test]
fn a_mismatched_echo_is_eproto() {
    let (client, peer) = small();
    let server = serve(peer, 2, Some(1));
    let e = client.region_read(0, 0, 100, None).unwrap_err();
    assert_eq!(e.code(), "EPROTO");
    assert!(e.message.contains("echoes"), "{}", e.message);
    server.join().unwrap();
}

#[test]
fn callbacks_gather_every_piece_once() {
    let (client, peer) = small();
    let server = serve(peer, 5, None);
    let (tx, rx) = mpsc::channel();
    let read = tx.clone();
    client
        .region_read_callback(
            3,
            10,
            150,
            None,
            Box::new(move |r| read.send(r.map(|d| d.into_vec())).unwrap()),
        )
        .unwrap();
    client
        .region_write_callback(
            3,
            0,
            &[1u8; 100],
            None,
            Box::new(move |r| tx.send(r.map(|d| d.into_vec())).unwrap()),
        )
        .unwrap();
    let mut results: Vec<_> = (0..2)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("settled")
                .unwrap()
        })
        .collect();
    results.sort_by_key(Vec::len);
    assert!(results[0].is_empty());
    assert_eq!(
        results[1],
        (10..160u64).map(|o| (o % 251) as u8).collect::<Vec<_>>()
    );
    server.join().unwrap();
}

#[test]
fn a_transfer_past_2_pow_64_and_an_empty_one_send_nothing() {
    let (client, mut peer) = small();
    assert_eq!(
        client.region_read(0, u64::MAX, 2, None).unwrap_err().code(),
        "EINVAL"
    );
    assert!(client
        .region_read(0, 0, 0, None)
        .unwrap()
        .as_slice()
        .is_empty());
    client.region_write(0, 0, &[], None).unwrap();
    // The next message the peer sees is the one sent now.
    let t = client
        .send_nowait(vfio_user_client::Request::new(4, &get_info()))
        .unwrap();
    let m = peer.read_msg();
    assert_eq!(m.header.command, 4);
    peer.reply(&m.header, &get_info());
    t.wait().unwrap();
}
