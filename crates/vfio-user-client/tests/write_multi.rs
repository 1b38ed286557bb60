//! Small posted writes coalesced into REGION_WRITE_MULTI when the server offered
//! `write_multiple` and the writes would wait anyway (a cork, or a queue not yet written); the
//! peer here reads exactly what went on the wire.

mod common;

use common::*;
use vfio_user_client::proto::write_multi::decode_write_multi;
use vfio_user_client::Request;

const WITH: &str = r#"{"capabilities":{"max_msg_fds":8,"write_multiple":true}}"#;
const WITHOUT: &str = r#"{"capabilities":{"max_msg_fds":8}}"#;
const REGION_WRITE: u16 = 10;
const REGION_WRITE_MULTI: u16 = 15;

#[test]
fn corked_small_posted_writes_travel_as_write_multi_in_order() {
    let (client, mut peer) = negotiated_with_caps(WITH);
    let cork = client.cork();
    for i in 0..450u32 {
        client
            .region_write_posted(1, u64::from(i) * 4, &i.to_ne_bytes())
            .unwrap();
    }
    // A request between writes keeps its place; a 9-byte write is never an entry.
    client.post(Request::new(4, &get_info())).unwrap();
    client.region_write_posted(2, 0x40, &[7; 9]).unwrap();
    client.region_write_posted(2, 0x80, &[1, 2]).unwrap();
    drop(cork);
    let mut entries = Vec::new();
    for want in [200, 200, 50] {
        let m = peer.read_msg();
        assert_eq!(m.header.command, REGION_WRITE_MULTI);
        assert!(m.header.no_reply());
        let writes = decode_write_multi(&m.payload).unwrap();
        assert_eq!(writes.len(), want);
        entries.extend(writes.iter().map(|w| (w.offset, w.region, w.data.to_vec())));
    }
    let expected: Vec<_> = (0..450u32)
        .map(|i| (u64::from(i) * 4, 1, i.to_ne_bytes().to_vec()))
        .collect();
    assert_eq!(entries, expected);
    assert_eq!(peer.read_msg().header.command, 4);
    let big = peer.read_msg();
    assert_eq!(
        (big.header.command, big.payload.len()),
        (REGION_WRITE, 16 + 9)
    );
    let last = peer.read_msg();
    assert_eq!(last.header.command, REGION_WRITE_MULTI);
    assert_eq!(decode_write_multi(&last.payload).unwrap()[0].data, &[1, 2]);
    assert_eq!(client.stats().coalesced_writes, 451);
}

#[test]
fn nothing_coalesces_without_the_capability_or_a_reason_to_wait() {
    let (client, mut peer) = negotiated_with_caps(WITHOUT);
    {
        let _cork = client.cork();
        for i in 0..3u64 {
            client.region_write_posted(0, i, &[1]).unwrap();
        }
    }
    for _ in 0..3 {
        assert_eq!(peer.read_msg().header.command, REGION_WRITE);
    }
    let (client, mut peer) = negotiated_with_caps(WITH);
    // Uncorked, with the socket idle: each write goes at once, as it is.
    for i in 0..3u64 {
        client.region_write_posted(0, i, &[1]).unwrap();
        assert_eq!(peer.read_msg().header.command, REGION_WRITE);
    }
    assert_eq!(client.stats().coalesced_writes, 0);
}

#[test]
fn a_cork_writes_a_long_burst_as_it_grows() {
    let (client, mut peer) = negotiated_with_caps(WITHOUT);
    let before = client.stats();
    let cork = client.cork();
    // Each queued write costs a few hundred bytes: far past the cork's limit.
    for i in 0..20_000u32 {
        client.region_write_posted(0, 0, &i.to_ne_bytes()).unwrap();
    }
    let during = client.stats();
    assert!(
        during.queue_writes > before.queue_writes,
        "a cork held 20000 writes unwritten"
    );
    drop(cork);
    for i in 0..20_000u32 {
        let m = peer.read_msg();
        assert_eq!(m.payload[16..], i.to_ne_bytes());
    }
}
