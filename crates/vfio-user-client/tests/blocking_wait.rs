//! A caller of `send_wait` sleeps inside recvmsg, bounded by the socket's SO_RCVTIMEO: its
//! timeout must follow each request's own, and a close from another thread must wake it.
//! Each blocking call runs on a helper thread watched through a channel, so a wait that
//! ignored its deadline fails the test instead of hanging it.

mod common;

use common::*;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use vfio_user_client::{Client, Error, Options, Reply, Request};

const GET_INFO: u16 = 4;
/// How long a watched call may take before the test calls it stuck.
const WATCHDOG: Duration = Duration::from_secs(20);
/// How long a call whose own deadline is 50 ms may take before the test says it waited on
/// another deadline.
const SHORT_WATCHDOG: Duration = Duration::from_secs(2);

fn watched(client: &Arc<Client>, timeout: Duration) -> mpsc::Receiver<Result<Reply, Error>> {
    let (tx, rx) = mpsc::channel();
    let client = client.clone();
    std::thread::spawn(move || {
        let r = client.send_wait(Request {
            timeout: Some(timeout),
            ..Request::new(GET_INFO, &get_info())
        });
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn each_blocking_wait_keeps_its_own_timeout() {
    let (client, mut peer) = negotiated(Options::default());
    let client = Arc::new(client);
    // A long timeout, answered: the socket's receive timeout is now long.
    let long = watched(&client, Duration::from_secs(600));
    let m = peer.read_msg();
    peer.reply(&m.header, &get_info());
    assert!(long.recv_timeout(WATCHDOG).expect("answered").is_ok());
    // A short one, never answered, must still end at its own deadline: 50 ms, watched for
    // 2 s (40 times as long, for a slow machine). A wait that followed the previous request's
    // deadline (600 s), or any fallback of seconds, fails here instead of passing late.
    let short = watched(&client, Duration::from_millis(50));
    let _ignored = peer.read_msg();
    let e = short
        .recv_timeout(SHORT_WATCHDOG)
        .expect("a short timeout waited as long as the previous request's")
        .unwrap_err();
    assert_eq!(e.code(), "ETIMEDOUT");
    // And a long one again, answered after the late reply of the short one.
    let again = watched(&client, Duration::from_secs(600));
    let m = peer.read_msg();
    peer.reply(&_ignored.header, &get_info());
    peer.reply(&m.header, &get_info());
    assert_eq!(
        again
            .recv_timeout(WATCHDOG)
            .expect("answered")
            .unwrap()
            .header
            .id,
        m.header.id
    );
}

#[test]
fn close_wakes_a_caller_asleep_in_recvmsg() {
    let (client, mut peer) = negotiated(Options::default());
    let client = Arc::new(client);
    let waiting = watched(&client, Duration::from_secs(600));
    // Once the request is on the wire its caller is reading (or about to).
    let _m = peer.read_msg();
    client.close();
    let e = waiting
        .recv_timeout(WATCHDOG)
        .expect("close did not wake the waiting caller")
        .unwrap_err();
    assert_eq!(e.code(), "ECONNABORTED");
}

#[test]
fn a_server_eof_wakes_a_caller_asleep_in_recvmsg() {
    let (client, mut peer) = negotiated(Options::default());
    let client = Arc::new(client);
    let waiting = watched(&client, Duration::from_secs(600));
    let _m = peer.read_msg();
    drop(peer);
    let e = waiting
        .recv_timeout(WATCHDOG)
        .expect("EOF did not wake the waiting caller")
        .unwrap_err();
    assert_eq!(e.code(), "ECONNRESET");
}

/// Runs `n` answered blocking calls: a burst, after which the I/O thread is off the read side
/// for a moment, expecting the next call.
fn burst(client: &Arc<Client>, peer: &mut Peer, n: usize) {
    for _ in 0..n {
        let r = watched(client, Duration::from_secs(600));
        let m = peer.read_msg();
        peer.reply(&m.header, &get_info());
        assert!(r.recv_timeout(WATCHDOG).expect("answered").is_ok());
    }
}

#[test]
fn after_a_burst_of_blocking_calls_a_server_request_is_still_answered() {
    let (client, mut peer) = negotiated(Options::default());
    let client = Arc::new(client);
    burst(&client, &mut peer, 100);
    // Nobody calls again: the I/O thread must come back to the read side by itself.
    peer.s.set_read_timeout(Some(WATCHDOG)).unwrap();
    let dma = vfio_user_client::proto::Header::command(7, 11, 16, false);
    peer.write(&message(dma, &[0u8; 16]));
    let answer = peer
        .try_read_msg()
        .expect("the server's request was never answered");
    assert_eq!((answer.header.id, answer.header.command), (7, 11));
}

#[test]
fn after_a_burst_of_blocking_calls_a_callback_request_gets_its_reply() {
    let (client, mut peer) = negotiated(Options::default());
    let client = Arc::new(client);
    burst(&client, &mut peer, 100);
    let before = client.stats().backup_reads;
    let (tx, rx) = mpsc::channel();
    client
        .send_callback(
            Request::new(GET_INFO, &get_info()),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
    let m = peer.read_msg();
    peer.reply(&m.header, &get_info());
    assert!(rx
        .recv_timeout(WATCHDOG)
        .expect("the reply was never read")
        .is_ok());
    // Read as it arrived, not picked up later by a backup check of a thread left unarmed.
    assert_eq!(client.stats().backup_reads, before);
}
