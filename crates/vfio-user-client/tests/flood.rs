//! A server that floods requests and never reads our replies: the memory the client holds
//! for it stays within `max_queued_bytes`, then the client disconnects it. Its own test
//! binary, so no other test's allocations show in the process's peak RSS.

mod common;

use common::*;
use std::io::Write;
use vfio_user_client::proto::Header;
use vfio_user_client::Options;

/// Peak resident memory of this process, in bytes.
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmHWM value");
    kb * 1024
}

/// Restarts peak-RSS accounting from the current RSS.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
}

#[test]
fn a_flood_of_requests_is_bounded_by_the_cap_then_cut_off() {
    const CAP: usize = 64 << 20;
    let (client, peer) = negotiated(Options {
        max_queued_bytes: CAP,
        ..Options::default()
    });
    // 16-byte requests of an unknown command, each answered with a 16-byte error reply
    // that the peer never reads: the cheapest request for the server, the most entries for us.
    let one = Header::command(1, 99, 0, false).encode();
    let batch: Vec<u8> = one.iter().copied().cycle().take(16 * 4096).collect();
    // The baseline is taken before the flood starts: whatever it makes us hold is counted.
    reset_peak_rss();
    let base = peak_rss();
    let flood = std::thread::spawn(move || {
        let mut s = peer.s;
        let mut sent = 0usize;
        while s.write_all(&batch).is_ok() {
            sent += batch.len() / 16;
        }
        sent
    });
    let sent = flood.join().unwrap();
    let grown = peak_rss().saturating_sub(base);
    assert!(client.is_closed(), "the flooding server was disconnected");
    eprintln!(
        "{sent} requests flooded; peak RSS grew by {} KiB",
        grown >> 10
    );
    // The cap plus the fixed buffers of one connection (64 KiB reads, a socket's worth).
    assert!(
        grown < CAP + CAP / 4,
        "peak RSS grew by {} MiB for a {} MiB cap",
        grown >> 20,
        CAP >> 20
    );
}
