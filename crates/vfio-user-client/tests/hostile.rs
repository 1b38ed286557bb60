//! The hostile-server suite: every malformed-input case of protocol.md section 6 that the
//! transport alone can judge, against a scripted peer on a socketpair.
//!
//! Each test asserts what reaches the caller (the errno code), that a per-message error leaves
//! the stream in sync (a round trip afterwards), that a fatal one fails every waiter at once,
//! and, where fds are involved, that the process's fd count is unchanged afterwards. Nothing
//! sleeps to synchronise: the protocol does (a round trip, a server request answered). Short
//! deadlines appear only where the server never answers (groups 11 and 28). Every peer read and
//! write gives up after [`PATIENCE`], and every client wait has a deadline, so a hung client
//! fails a test instead of hanging CI.
//!
//! Where each group of section 6 is covered (`file::test`; "unit" = the proto crate's unit tests):
//!
//! | # | Case | Covered by |
//! |---|---|---|
//! | 1 | EOF mid-header / mid-body, all pending fail at once | proxy::eof_fails_every_pending_and_queued_request_at_once, proxy::eof_in_the_middle_of_a_reply, hostile::eof_mid_header_or_mid_body_fails_every_waiter_at_once, hostile::eof_inside_a_server_request_closes_its_fds |
//! | 2 | header split across reads | proxy::header_split_across_reads_is_reassembled, defects::a_server_request_right_behind_the_version_reply (several messages in one read), hostile::a_split_header_keeps_the_fd_of_its_first_byte; unit frame::tests::split_header_is_reassembled_and_attachments_follow_their_message |
//! | 3 | msg_size < 16, 0, 0xFFFFFFFF, above the maximum; per-command bounds | proxy::framing_violations_close_the_connection, hostile::msg_size_out_of_bounds_closes_the_connection_at_once, hostile::messages_before_a_framing_violation_are_still_delivered, hostile::replies_above_their_limit_or_to_nobody_are_drained, proxy::a_server_request_too_big_to_store_gets_e2big_and_is_drained; unit header::tests::validate_framing, limits::tests |
//! | 4 | type bits 2..15; reply with No_reply; command with the Error bit | proxy::framing_violations_close_the_connection, proxy::malformed_replies_fail_only_their_request (No_reply), hostile::every_invalid_type_closes_the_connection, hostile::a_command_with_the_error_bit_is_served_as_a_request (served like any request: an error reply, or none with No_reply; never taken for a reply) |
//! | 5 | reply matching nothing, late reply | proxy::unknown_and_duplicate_replies_are_dropped, proxy::timeout_then_late_reply_is_dropped_and_next_request_works, defects::a_late_reply_never_answers_a_newer_request_after_the_ids_wrap, defects::every_id_held_by_a_late_reply_refuses_new_requests, hostile::a_reply_to_a_request_not_yet_written_is_dropped, hostile::replies_above_their_limit_or_to_nobody_are_drained |
//! | 6 | id matches, command differs | proxy::malformed_replies_fail_only_their_request, proxy::version_error_reply_and_wrong_command, hostile::fds_on_replies_that_must_not_carry_them_are_closed |
//! | 7 | two replies with one id | proxy::unknown_and_duplicate_replies_are_dropped, hostile::the_first_of_two_replies_with_one_id_wins |
//! | 8 | error reply with payload; error 0; error > 4096 | proxy::malformed_replies_fail_only_their_request, hostile::error_replies_never_succeed_and_out_of_range_errnos_are_eio; unit error::tests::error_reply_errno |
//! | 9 | reply larger than argsz / shorter than the fixed struct | proxy::malformed_replies_fail_only_their_request, hostile::reply_size_limits_per_command (larger: EPROTO for that request only). Shorter: the typed decoders refuse it (proto device::tests, irq::tests, region::tests; fuzzed by command_replies) |
//! | 10 | partial writes (tiny SO_SNDBUF, 1 MiB) | proxy::big_message_goes_out_in_partial_writes_and_order_is_kept, proxy::queue_keeps_submission_order_under_would_block, proxy::early_error_reply_to_a_partly_written_request, hostile::a_server_request_during_a_partial_write_is_answered_after_it |
//! | 11 | VERSION: no reply, wrong command, 16 bytes, 20 bytes | hostile::version_without_a_reply_times_out, hostile::a_late_version_reply_does_not_fail_a_retried_negotiation, proxy::version_error_reply_and_wrong_command, proxy::anything_but_the_version_reply_fails_negotiation, hostile::version_replies_without_a_version, hostile::a_version_reply_of_20_bytes_takes_the_spec_defaults; unit version::tests::rejects, accepts_bare_20_byte_reply_with_defaults |
//! | 12 | JSON: no NUL, inner NUL, bad UTF-8, not an object, capabilities not an object | proxy::version_reply_is_validated, hostile::version_json_that_is_not_a_nul_terminated_object; unit version::tests::rejects, caps::tests::structure_errors |
//! | 13 | major != proposed, minor > proposed | proxy::version_reply_is_validated; unit version::tests::rejects, lower_minor_is_fine |
//! | 14 | wrong types | hostile::version_capabilities_of_the_wrong_type; unit caps::tests::type_errors |
//! | 15 | out-of-range values | hostile::version_capabilities_out_of_range; unit caps::tests::range_errors, clamps_with_warning |
//! | 16 | unknown capabilities, duplicate keys | hostile::version_unknown_capabilities_warn_and_duplicate_keys_fail; unit caps::tests::unknown_keys_are_warnings, structure_errors |
//! | 17 | twin_socket inconsistencies | hostile::version_twin_socket_we_did_not_offer_fails_and_its_fd_is_closed (we never offer twin_socket: `supported` true fails whatever fd_index says; a VERSION reply may carry no fd, so an fd, socket or not, fails and is closed); unit version::tests::rejects |
//! | 18 | DEVICE_GET_INFO contents | proto device::tests::decodes_and_bounds_the_counts (more than 100 regions / 50 irqs: EPROTO), __test__/typed.test.ts. Transport: proxy::malformed_replies_fail_only_their_request (reply > argsz), hostile::info_replies_carry_at_most_their_fds |
//! | 19 | REGION_INFO contents, fds | proto region::tests (loops, overlaps, alignment, outside the payload, sparse areas past the region), __test__/failures.test.ts 'liar', __test__/typed.test.ts (argsz retry, fd owned by the result). Transport: hostile::info_replies_carry_at_most_their_fds (2 fds: EPROTO, closed), fds::fds_pass_both_ways_and_none_leak (1 fd delivered) |
//! | 20 | REGION_IO_FDS contents, fds | proto region_io_fds::tests (both strides, inexact division, records past the region, fd indexes past the fds, shadow records only in libvfio-user's layout), __test__/failures.test.ts 'io-fds'. Transport: hostile::info_replies_carry_at_most_their_fds (16 fds delivered, 17: EPROTO, closed) |
//! | 21 | IRQ_INFO contents | proto irq::tests::the_index_must_be_echoed, __test__/failures.test.ts 'liar'. Transport: hostile::info_replies_carry_at_most_their_fds (an fd: EPROTO, closed) |
//! | 22 | REGION_READ reply checks | region::a_mismatched_echo_is_eproto, proto region::tests::access_echoes_are_checked, __test__/failures.test.ts 'liar'. Transport: hostile::reply_size_limits_per_command (count > requested: EPROTO for that request only; exact, short and header-only replies handed over) |
//! | 23 | REGION_WRITE reply checks | proto region::tests::access_echoes_are_checked (short echo, other region), __test__/failures.test.ts 'liar'. Transport: hostile::reply_size_limits_per_command (a reply carrying data: EPROTO) |
//! | 24 | DMA_UNMAP reply sizes | dma::bad_maps_are_refused_before_anything_is_sent (24-byte echo), dma::a_refused_map_is_forgotten_and_unmap_all_forgets_everything. Transport: hostile::reply_size_limits_per_command (header-only and 24-byte echo accepted, larger: EPROTO) |
//! | 25 | server DMA_READ/DMA_WRITE requests | served from mapped memory: dma::* (bounds, overflow, permissions, EFAULT when unmapped, E2BIG past our max, EINVAL with fds or a malformed payload, No_reply respected). Transport: proxy::server_requests_get_an_error_reply_and_the_stream_stays_in_sync (No_reply, own request outstanding), proxy::a_server_request_too_big_to_store_gets_e2big_and_is_drained, fds::fds_pass_both_ways_and_none_leak, hostile::malformed_dma_requests_are_answered_in_order, hostile::dma_requests_with_fds_are_answered_and_their_fds_closed, hostile::a_server_request_is_answered_while_a_caller_blocks_on_its_own_reply, hostile::a_reply_to_a_server_request_overtakes_requests_not_yet_started |
//! | 26 | unknown server command | proxy::server_requests_get_an_error_reply_and_the_stream_stays_in_sync, hostile::unknown_server_commands_get_enosys_unless_no_reply |
//! | 27 | fds: too many, where none belong, MSG_CTRUNC, on rejected messages | fds::fds_pass_both_ways_and_none_leak, hostile::fds_on_replies_that_must_not_carry_them_are_closed, hostile::fds_that_arrive_with_a_framing_violation_are_closed, hostile::fds_sent_with_two_replies_at_once_are_closed, hostile::the_most_fds_one_message_can_carry_are_all_closed (MSG_CTRUNC cannot be caused by a peer: one recvmsg returns at most one sendmsg's fds, at most SCM_MAX_FD = 253, and the client's control buffer holds 253), and the fd censuses of groups 1, 2, 17-21, 25, 28, 30, 31 |
//! | 28 | server never replies; late reply | proxy::timeout_then_late_reply_is_dropped_and_next_request_works, proxy::async_requests_time_out_on_the_io_thread, proxy::timeout_of_a_queued_request_removes_it_from_the_queue, defects::*, hostile::a_blocking_caller_times_out_and_the_late_reply_and_its_fd_are_dropped, hostile::a_deadline_passing_mid_body_drops_the_rest_of_the_reply, hostile::version_without_a_reply_times_out |
//! | 29 | server floods requests | flood::a_flood_of_requests_is_bounded_by_the_cap_then_cut_off (never reads our replies), proxy::a_full_outgoing_queue_refuses_new_requests, hostile::a_busy_server_that_reads_our_replies_does_not_starve_our_requests |
//! | 30 | disconnect with requests queued, not yet written | proxy::close_fails_in_flight_with_econnaborted, proxy::eof_fails_every_pending_and_queued_request_at_once, fds::fds_pass_both_ways_and_none_leak, hostile::close_with_requests_queued_fails_them_all_and_closes_their_fds |
//! | 31 | reconnect: re-establish DMA maps and IRQ fds | not yet: a new connection starts with no maps (the DMA table is per connection and cleared when it ends); re-establishing them is left to the caller for now. Transport: hostile::after_a_server_disconnect_a_new_client_works_and_the_old_ones_fds_are_released |

mod common;

use common::*;
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::stat::fstat;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread;
use std::time::{Duration, Instant};
use vfio_user_client::proto::{
    Capabilities, Header, TwinSocket, Version, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_MASK,
    MAX_DATA_XFER_SIZE_LIMIT, MAX_INCOMING_MESSAGE, MAX_MSG_FDS_LIMIT,
};
use vfio_user_client::{Client, Error, Options, Reply, Request, Ticket};

const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const GET_INFO: u16 = 4;
const REGION_INFO: u16 = 5;
const REGION_IO_FDS: u16 = 6;
const IRQ_INFO: u16 = 7;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;

/// How long a peer read or write, or a wait for the client, may take before the test fails.
/// Never reached when the client behaves: it only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(10);

/// Tests that count fds run alone (write lock); every other test holds it shared, so no test
/// opens or closes fds while a census is taken.
static CENSUS: RwLock<()> = RwLock::new(());

/// Sends a GET_INFO that must be refused before anything is sent; returns why.
fn refused_info(client: &Client) -> Error {
    client
        .send_nowait(Request::new(GET_INFO, &get_info()))
        .err()
        .expect("refused")
}

/// Sends a DMA_MAP carrying `fds`.
fn map_with_fds(client: &Client, fds: &[BorrowedFd<'_>]) -> Result<Ticket, Error> {
    client.send_nowait(Request {
        fds,
        ..Request::new(DMA_MAP, &dma_map())
    })
}

fn concurrent() -> RwLockReadGuard<'static, ()> {
    CENSUS.read().unwrap_or_else(|p| p.into_inner())
}

/// Runs `body` alone and checks that it closed every fd it opened.
fn census(body: impl FnOnce()) {
    let _alone = CENSUS.write().unwrap_or_else(|p| p.into_inner());
    let before = open_fds();
    body();
    assert_eq!(
        open_fds(),
        before,
        "an fd opened during the test is still open"
    );
}

/// Makes every peer read and write give up after [`PATIENCE`].
fn bounded(peer: Peer) -> Peer {
    peer.s.set_read_timeout(Some(PATIENCE)).unwrap();
    peer.s.set_write_timeout(Some(PATIENCE)).unwrap();
    peer
}

/// A negotiated client (the peer offered max_msg_fds 8) and its bounded peer.
fn connected() -> (Client, Peer) {
    let (client, peer) = negotiated(Options::default());
    (client, bounded(peer))
}

/// Negotiates `client` against `peer`, which answers with `json`.
fn negotiate(client: &Client, peer: Peer, json: &'static str) -> Peer {
    let server = thread::spawn(move || {
        let mut peer = bounded(peer);
        peer.accept_version(json);
        peer
    });
    client.negotiate().expect("negotiate");
    server.join().expect("peer thread")
}

/// A fresh client whose VERSION the peer answers with `answer`.
fn negotiate_against(
    options: Options,
    answer: impl FnOnce(&mut Peer, &Msg) + Send + 'static,
) -> (Client, Peer, Result<Version, Error>) {
    let (client, peer) = pair(options);
    let server = thread::spawn(move || {
        let mut peer = bounded(peer);
        let m = peer.read_msg();
        assert_eq!(m.header.command, VERSION);
        answer(&mut peer, &m);
        peer
    });
    let r = client.negotiate();
    (client, server.join().expect("peer thread"), r)
}

/// A GET_INFO payload (argsz 16) with `tag` in bytes 4..8, so a reply can be told apart.
fn tagged(tag: u32) -> [u8; 16] {
    let mut p = get_info();
    p[4..8].copy_from_slice(&tag.to_ne_bytes());
    p
}

fn send(client: &Client, command: u16, payload: &[u8]) -> Ticket {
    client
        .send_nowait(Request::new(command, payload))
        .expect("sent")
}

fn info(client: &Client) -> Ticket {
    send(client, GET_INFO, &get_info())
}

/// A request, its reply echoed back, checked: proves the stream is still in sync.
fn round_trip(client: &Client, peer: &mut Peer) {
    static NONCE: AtomicU32 = AtomicU32::new(1);
    let p = tagged(NONCE.fetch_add(1, Ordering::Relaxed));
    let t = send(client, GET_INFO, &p);
    let m = peer.read_msg();
    assert_eq!(
        (m.header.command, &m.payload[..]),
        (GET_INFO, &p[..]),
        "the next message is the round trip's request"
    );
    peer.reply(&m.header, &m.payload);
    assert_eq!(t.wait().expect("round trip").payload, p);
}

/// Sends `payload` as `command`, answers it with a `reply_len`-byte payload and `fds`.
fn answered(
    client: &Client,
    peer: &mut Peer,
    command: u16,
    payload: &[u8],
    reply_len: usize,
    fds: &[RawFd],
) -> Result<Reply, Error> {
    let t = send(client, command, payload);
    let m = peer.read_msg();
    assert_eq!(m.header.command, command);
    let bytes = message(
        Header::reply_to(&m.header, reply_len),
        &vec![0x5a; reply_len],
    );
    if fds.is_empty() {
        peer.write(&bytes);
    } else {
        peer.send_with_fds(&bytes, fds);
    }
    t.wait()
}

fn expect_proto(r: Result<Reply, Error>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), "EPROTO", "{what}: {e}");
}

/// A DMA_READ of 8 bytes at 0 from the server.
fn dma_read(id: u16, no_reply: bool) -> Vec<u8> {
    let mut p = [0u8; 16];
    p[8..16].copy_from_slice(&8u64.to_ne_bytes());
    message(Header::command(id, DMA_READ, 16, no_reply), &p)
}

/// What we answer a server request with when nothing serves it: DMA to an address nobody
/// mapped is EFAULT; any other command is ENOSYS.
fn unserved(command: u16) -> Errno {
    if command == DMA_READ || command == DMA_WRITE {
        Errno::EFAULT
    } else {
        Errno::ENOSYS
    }
}

/// Checks that `m` is our header-only error reply to server request `id`.
fn expect_error_reply(m: &Msg, id: u16, command: u16, errno: Errno) {
    assert_eq!(
        (m.header.id, m.header.command),
        (id, command),
        "{:?}",
        m.header
    );
    assert_eq!(m.header.flags & FLAG_TYPE_MASK, 1, "a reply");
    assert!(
        m.header.is_error() && !m.header.no_reply(),
        "{:?}",
        m.header
    );
    assert_eq!(m.header.error, errno as u32, "{:?}", m.header);
    assert!(m.payload.is_empty() && m.fds.is_empty());
}

fn eventfd() -> EventFd {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).expect("eventfd")
}

/// Yields until `cond` holds; for the few cases where the client cannot tell the peer
/// through the socket (its sends are blocked on purpose).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let give_up = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        thread::yield_now();
    }
}

/// DMA_MAP of one page at 256 MiB (argsz 32).
fn dma_map() -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0..4].copy_from_slice(&32u32.to_ne_bytes());
    p[4..8].copy_from_slice(&3u32.to_ne_bytes());
    p[16..24].copy_from_slice(&(256u64 << 20).to_ne_bytes());
    p[24..32].copy_from_slice(&4096u64.to_ne_bytes());
    p
}

/// REGION_INFO for region 0 (argsz 32).
fn region_info() -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0..4].copy_from_slice(&32u32.to_ne_bytes());
    p
}

/// The access header of REGION_READ / REGION_WRITE: offset 0, region 0, `count`.
fn access(count: u32) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[12..16].copy_from_slice(&count.to_ne_bytes());
    p
}

fn caps(inner: &str) -> String {
    format!(r#"{{"capabilities":{{{inner}}}}}"#)
}

/// A VERSION reply payload: 0.0 and raw JSON bytes (NUL included by the caller).
fn raw_version(json: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 0];
    p.extend_from_slice(json);
    p
}

fn version_reply(payload: Vec<u8>) -> (Client, Peer, Result<Version, Error>) {
    negotiate_against(Options::default(), move |peer, m| {
        peer.reply(&m.header, &payload)
    })
}

/// The VERSION reply `payload` fails negotiation with EPROTO saying `want`, and the client
/// stays un-negotiated.
fn refused(payload: Vec<u8>, want: &str) {
    let (client, _peer, r) = version_reply(payload);
    let e = r.expect_err(want);
    assert_eq!(e.code(), "EPROTO", "{want}: {e}");
    assert!(e.message.contains(want), "{want}: {e}");
    assert_eq!(e.command, Some(VERSION));
    assert!(client.version().is_none());
    let e = client
        .send_nowait(Request::new(GET_INFO, &get_info()))
        .err()
        .expect("refused before negotiation");
    assert_eq!(e.code(), "ENOTCONN");
}

/// The VERSION reply with `json` is accepted; the connection then works.
fn accepted(json: &str) -> Version {
    let (client, mut peer, r) = version_reply(version_payload(0, 0, json));
    let v = r.unwrap_or_else(|e| panic!("{json}: {e}"));
    round_trip(&client, &mut peer);
    v
}

// ---- 1: EOF ------------------------------------------------------------------------------

#[test]
fn eof_mid_header_or_mid_body_fails_every_waiter_at_once() {
    let _g = concurrent();
    // Inside the header, right after it, inside the body.
    for cut in [7usize, 16, 24] {
        // Default 5 s deadline: a waiter the EOF did not fail would report ETIMEDOUT.
        let (client, mut peer) = connected();
        let (hook_tx, hook_rx) = mpsc::channel();
        client.on_close(move |e| hook_tx.send(e.code()).unwrap());
        thread::scope(|s| {
            let a = info(&client);
            let b = info(&client);
            let (cb_tx, cb_rx) = mpsc::channel();
            client
                .send_callback(
                    Request::new(GET_INFO, &get_info()),
                    Box::new(move |r| cb_tx.send(r.map(|_| ())).unwrap()),
                )
                .unwrap();
            // A caller blocked in send_wait reads the socket itself.
            let blocked = s.spawn(|| {
                client
                    .send_wait(Request::new(GET_INFO, &get_info()))
                    .map(|_| ())
            });
            let msgs: Vec<Msg> = (0..4).map(|_| peer.read_msg()).collect();
            let reply = message(Header::reply_to(&msgs[0].header, 16), &[0; 16]);
            peer.write(&reply[..cut]);
            peer.s.shutdown(std::net::Shutdown::Both).unwrap();
            let results = [
                a.wait().map(|_| ()),
                b.wait().map(|_| ()),
                cb_rx.recv_timeout(PATIENCE).expect("callback called"),
                blocked.join().unwrap(),
            ];
            for r in results {
                let e = r.unwrap_err();
                assert_eq!(e.code(), "ECONNRESET", "cut at {cut}: {e}");
                assert!(e.message.contains("middle of a message"), "{e}");
            }
        });
        assert_eq!(hook_rx.recv_timeout(PATIENCE).unwrap(), "ECONNRESET");
        assert!(client.is_closed());
        let e = refused_info(&client);
        assert_eq!(e.code(), "ECONNRESET");
    }
}

#[test]
fn eof_inside_a_server_request_closes_its_fds() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let t = info(&client);
        let _mine = peer.read_msg();
        let mut dma = vec![0u8; 16 + 64];
        dma[8..16].copy_from_slice(&64u64.to_ne_bytes());
        let bytes = message(Header::command(9, DMA_WRITE, dma.len(), false), &dma);
        let raw = memory.as_raw_fd();
        peer.send_with_fds(&bytes[..40], &[raw, raw]);
        drop(peer);
        let e = t.wait().unwrap_err();
        assert_eq!(e.code(), "ECONNRESET");
        assert!(e.message.contains("middle of a message"), "{e}");
    });
}

// ---- 2: split header ---------------------------------------------------------------------

#[test]
fn a_split_header_keeps_the_fd_of_its_first_byte() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let p = region_info();
        let t = send(&client, REGION_INFO, &p);
        let m = peer.read_msg();
        let bytes = message(Header::reply_to(&m.header, 32), &p);
        peer.send_with_fds(&bytes[..1], &[memory.as_raw_fd()]);
        for chunk in [&bytes[1..7], &bytes[7..16], &bytes[16..30], &bytes[30..]] {
            peer.write(chunk);
        }
        let r = t.wait().unwrap();
        assert_eq!(r.payload, p);
        assert_eq!(r.fds.len(), 1);
        assert_eq!(
            fstat(&r.fds[0]).unwrap().st_ino,
            fstat(&memory).unwrap().st_ino
        );
        drop(r);
        round_trip(&client, &mut peer);
    });
}

// ---- 3: msg_size -------------------------------------------------------------------------

#[test]
fn msg_size_out_of_bounds_closes_the_connection_at_once() {
    let _g = concurrent();
    let over = (MAX_INCOMING_MESSAGE + 1) as u32;
    // (type, msg_size): replies to our pending request and commands from the server.
    for (kind, size) in [
        (1, over),
        (1, u32::MAX),
        (0, over),
        (0, u32::MAX),
        (0, 15),
        (0, 0),
    ] {
        let (client, mut peer) = connected();
        let t = info(&client);
        let m = peer.read_msg();
        let mut h = if kind == 1 {
            Header::reply_to(&m.header, 0)
        } else {
            Header::command(5, DMA_WRITE, 0, false)
        };
        h.size = size;
        // The header alone: the client must not wait for a body to judge it.
        peer.write(&h.encode());
        let e = t.wait().unwrap_err();
        assert_eq!(e.code(), "ECONNRESET", "type {kind} size {size}: {e}");
        assert!(
            e.message.contains("protocol violation") && e.message.contains("msg_size"),
            "{e}"
        );
        assert!(client.is_closed());
        // The client hung up: the peer reads the end of the stream.
        assert_eq!(peer.s.read(&mut [0u8; 1]).unwrap(), 0);
    }
}

#[test]
fn messages_before_a_framing_violation_are_still_delivered() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    let a = send(&client, GET_INFO, &tagged(1));
    let b = send(&client, GET_INFO, &tagged(2));
    let ma = peer.read_msg();
    let _mb = peer.read_msg();
    let mut bytes = message(Header::reply_to(&ma.header, 16), &ma.payload);
    let mut bad = Header::command(3, DMA_READ, 16, false);
    bad.flags = 7;
    bytes.extend(bad.encode());
    peer.write(&bytes);
    assert_eq!(a.wait().unwrap().payload, ma.payload);
    let e = b.wait().unwrap_err();
    assert_eq!(e.code(), "ECONNRESET");
    assert!(e.message.contains("invalid type bits 7"), "{e}");
}

#[test]
fn replies_above_their_limit_or_to_nobody_are_drained() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    let a = send(&client, GET_INFO, &tagged(1));
    let b = send(&client, GET_INFO, &tagged(2));
    let ma = peer.read_msg();
    let mb = peer.read_msg();
    // 2 MiB: far above a's 32-byte limit and the 64 KiB read buffer, within framing.
    let huge = vec![0xa5u8; 2 << 20];
    peer.reply(&ma.header, &huge);
    let mut stray = Header::reply_to(&mb.header, huge.len());
    stray.id = mb.header.id ^ 0x8000;
    peer.write(&message(stray, &huge));
    peer.reply(&mb.header, &mb.payload);
    let e = a.wait().unwrap_err();
    assert_eq!(e.code(), "EPROTO");
    assert!(e.message.contains("more than the 32"), "{e}");
    assert_eq!(b.wait().unwrap().payload, mb.payload);
    round_trip(&client, &mut peer);
    assert_eq!(client.stats().dropped_replies, 2);
}

// ---- 4: type bits, No_reply, Error bit ---------------------------------------------------

#[test]
fn every_invalid_type_closes_the_connection() {
    let _g = concurrent();
    for t in 2u32..=15 {
        for extra in [0, FLAG_ERROR | FLAG_NO_REPLY] {
            let (client, mut peer) = connected();
            let pending = info(&client);
            let m = peer.read_msg();
            let mut h = Header::reply_to(&m.header, 16);
            h.flags = t | extra;
            peer.write(&message(h, &[0; 16]));
            let e = pending.wait().unwrap_err();
            assert_eq!(e.code(), "ECONNRESET", "type {t}: {e}");
            assert!(e.message.contains(&format!("invalid type bits {t}")), "{e}");
            assert!(client.is_closed());
        }
    }
}

#[test]
fn a_command_with_the_error_bit_is_served_as_a_request() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    let t = send(&client, GET_INFO, &tagged(5));
    let mine = peer.read_msg();
    // A command (type 0) with the Error bit, our pending request's id and command: a request
    // from the server, not the reply to ours.
    let mut h = Header::command(mine.header.id, GET_INFO, 16, false);
    h.flags |= FLAG_ERROR;
    h.error = 5;
    peer.write(&message(h, &mine.payload));
    // The same with No_reply: not answered.
    let mut d = Header::command(78, DMA_READ, 16, true);
    d.flags |= FLAG_ERROR;
    d.error = 5;
    peer.write(&message(d, &[0; 16]));
    peer.write(&dma_read(79, false));
    expect_error_reply(
        &peer.read_msg(),
        mine.header.id,
        GET_INFO,
        unserved(GET_INFO),
    );
    expect_error_reply(&peer.read_msg(), 79, DMA_READ, unserved(DMA_READ));
    // Our request still waits for its own reply.
    peer.reply(&mine.header, &mine.payload);
    assert_eq!(t.wait().unwrap().payload, mine.payload);
    round_trip(&client, &mut peer);
    assert_eq!(client.stats().server_requests, 3);
}

// ---- 5, 7: unmatched and duplicate replies -----------------------------------------------

#[test]
fn a_reply_to_a_request_not_yet_written_is_dropped() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    let mut big = vec![0u8; 1 << 20];
    big[..16].copy_from_slice(&tagged(1));
    let a = send(&client, GET_INFO, &big);
    let b = send(&client, GET_INFO, &tagged(2));
    // Only a's header is read: a stays partly written and b entirely queued.
    let mut raw = [0u8; 16];
    peer.s.read_exact(&mut raw).unwrap();
    let ha = Header::decode(&raw);
    let before = client.stats().dropped_replies;
    // A reply for every id, a's and b's included, before either is fully written: none of
    // them can be theirs.
    let mut forged = Vec::with_capacity(65536 * 32);
    for id in 0..=u16::MAX {
        let mut h = Header::reply_to(&ha, 16);
        h.id = id;
        forged.extend(message(h, &tagged(0xbad)));
    }
    peer.write(&forged);
    // The client cannot tell us through the socket (its sends are blocked): watch its count.
    wait_for("the forged replies to be read", || {
        client.stats().dropped_replies >= before + 65536
    });
    let mut rest = vec![0u8; ha.payload_len()];
    peer.s.read_exact(&mut rest).unwrap();
    assert_eq!(rest, big);
    let mb = peer.read_msg();
    assert_eq!(mb.payload, tagged(2));
    peer.reply(&ha, &tagged(1));
    peer.reply(&mb.header, &mb.payload);
    assert_eq!(a.wait().unwrap().payload, tagged(1));
    assert_eq!(b.wait().unwrap().payload, tagged(2));
    round_trip(&client, &mut peer);
    assert_eq!(client.stats().dropped_replies, before + 65536);
}

#[test]
fn the_first_of_two_replies_with_one_id_wins() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    for error_first in [true, false] {
        let t = send(&client, GET_INFO, &tagged(3));
        let m = peer.read_msg();
        let before = client.stats().dropped_replies;
        if error_first {
            peer.error_reply(&m.header, Errno::EINVAL as u32);
            peer.reply(&m.header, &m.payload);
            assert_eq!(t.wait().unwrap_err().code(), "EINVAL");
        } else {
            peer.reply(&m.header, &m.payload);
            peer.error_reply(&m.header, Errno::EINVAL as u32);
            assert_eq!(t.wait().unwrap().payload, tagged(3));
        }
        round_trip(&client, &mut peer);
        assert_eq!(client.stats().dropped_replies, before + 1);
    }
}

// ---- 8: error replies --------------------------------------------------------------------

#[test]
fn error_replies_never_succeed_and_out_of_range_errnos_are_eio() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    for (raw, want) in [
        (0, "EIO"),
        (600, "EIO"),
        (4096, "EIO"),
        (4097, "EIO"),
        (0x8000_0000, "EIO"),
        (u32::MAX, "EIO"),
        (1, "EPERM"),
        (22, "EINVAL"),
        (95, "EOPNOTSUPP"),
    ] {
        let t = info(&client);
        let m = peer.read_msg();
        peer.error_reply(&m.header, raw);
        let e = t.wait().unwrap_err();
        assert_eq!(e.code(), want, "error {raw}: {e}");
        assert_eq!(e.command, Some(GET_INFO));
    }
    round_trip(&client, &mut peer);
    // An error reply carrying a payload far above the request's limit: still its errno.
    let t = info(&client);
    let m = peer.read_msg();
    let body = vec![1u8; 1 << 20];
    let mut h = Header::error_reply_to(&m.header, Errno::ENOENT as u32);
    h.size = (16 + body.len()) as u32;
    peer.write(&message(h, &body));
    assert_eq!(t.wait().unwrap_err().code(), "ENOENT");
    round_trip(&client, &mut peer);
    // Without the Error bit the error field means nothing: a success.
    let t = send(&client, GET_INFO, &tagged(9));
    let m = peer.read_msg();
    let mut h = Header::reply_to(&m.header, 16);
    h.error = 22;
    peer.write(&message(h, &m.payload));
    assert_eq!(t.wait().unwrap().payload, tagged(9));
    round_trip(&client, &mut peer);
}

// ---- 9, 22-24: reply sizes per command ---------------------------------------------------

#[test]
fn reply_size_limits_per_command() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    // REGION_READ of 8 bytes: the access header and at most 8 bytes. A short read and a
    // header-only reply are handed over as they are; the typed call judges them.
    let read = access(8);
    for len in [24, 16, 0] {
        let r = answered(&client, &mut peer, REGION_READ, &read, len, &[]).unwrap();
        assert_eq!(r.payload.len(), len);
    }
    expect_proto(
        answered(&client, &mut peer, REGION_READ, &read, 25, &[]),
        "REGION_READ reply with more data than asked",
    );
    round_trip(&client, &mut peer);
    // REGION_WRITE: the access header echoed, no data.
    let mut write = access(8).to_vec();
    write.extend_from_slice(&[7; 8]);
    for len in [16, 0] {
        answered(&client, &mut peer, REGION_WRITE, &write, len, &[]).unwrap();
    }
    expect_proto(
        answered(&client, &mut peer, REGION_WRITE, &write, 24, &[]),
        "REGION_WRITE reply carrying data",
    );
    round_trip(&client, &mut peer);
    // DMA_UNMAP (argsz 24): header-only and a 24-byte echo are both fine.
    let mut unmap = [0u8; 24];
    unmap[0..4].copy_from_slice(&24u32.to_ne_bytes());
    for len in [0, 24] {
        answered(&client, &mut peer, DMA_UNMAP, &unmap, len, &[]).unwrap();
    }
    expect_proto(
        answered(&client, &mut peer, DMA_UNMAP, &unmap, 25, &[]),
        "DMA_UNMAP reply above argsz",
    );
    round_trip(&client, &mut peer);
    // GET_INFO shorter than its 16-byte struct: handed over as is (the typed call judges).
    let r = answered(&client, &mut peer, GET_INFO, &get_info(), 0, &[]).unwrap();
    assert!(r.payload.is_empty());
    // An oversized reply fails only its own request.
    let t = send(&client, REGION_READ, &read);
    let other = send(&client, GET_INFO, &tagged(4));
    let mr = peer.read_msg();
    let mo = peer.read_msg();
    peer.reply(&mr.header, &[0; 4096]);
    peer.reply(&mo.header, &mo.payload);
    expect_proto(t.wait(), "REGION_READ reply of 4096 bytes");
    assert_eq!(other.wait().unwrap().payload, tagged(4));
    round_trip(&client, &mut peer);
}

// ---- 10: partial writes ------------------------------------------------------------------

#[test]
fn a_server_request_during_a_partial_write_is_answered_after_it() {
    let _g = concurrent();
    let (client, peer) = pair_with_sndbuf(Options::default(), Some(4096));
    let mut peer = negotiate(&client, peer, RUST_VMM_CAPS);
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    let mut write = vec![0u8; 16 + (1 << 20)];
    write[..16].copy_from_slice(&access(1 << 20));
    for (i, b) in write[16..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let t = send(&client, REGION_WRITE, &write);
    peer.write(&dma_read(77, false));
    // Our answer is ready while the write is still in progress.
    wait_for("the server request to be taken", || {
        client.stats().server_requests == 1
    });
    let m = peer.read_msg();
    assert_eq!(m.header.command, REGION_WRITE);
    assert_eq!(
        m.payload, write,
        "not a byte of the answer inside the request"
    );
    expect_error_reply(&peer.read_msg(), 77, DMA_READ, unserved(DMA_READ));
    peer.reply(&m.header, &write[..16]);
    t.wait().unwrap();
    assert!(client.stats().partial_writes > 0);
    round_trip(&client, &mut peer);
}

// ---- 11-17: VERSION ----------------------------------------------------------------------

#[test]
fn version_without_a_reply_times_out() {
    let _g = concurrent();
    let (client, peer) = pair(Options {
        timeout: Duration::from_millis(100),
        ..Options::default()
    });
    let mut peer = bounded(peer);
    let e = client.negotiate().unwrap_err();
    assert_eq!(e.code(), "ETIMEDOUT");
    assert_eq!(e.command, Some(VERSION));
    assert_eq!(peer.read_msg().header.command, VERSION);
    assert!(client.version().is_none());
    let e = refused_info(&client);
    assert_eq!(e.code(), "ENOTCONN");
}

/// VERSION #1 times out (a slow server), negotiate() is called again, and the server's late
/// reply to #1 arrives while #2 is in flight, followed by the reply to #2.
#[test]
fn a_late_version_reply_does_not_fail_a_retried_negotiation() {
    let _g = concurrent();
    // The first VERSION is never answered in time; the retry is answered at once.
    let (client, peer) = pair(Options {
        timeout: Duration::from_secs(1),
        ..Options::default()
    });
    let mut peer = bounded(peer);
    assert_eq!(client.negotiate().unwrap_err().code(), "ETIMEDOUT");
    let first = peer.read_msg();
    let server = thread::spawn(move || {
        let second = peer.read_msg();
        assert_eq!(second.header.command, VERSION);
        assert_ne!(
            second.header.id, first.header.id,
            "the timed-out id is held"
        );
        let p = version_payload(0, 0, RUST_VMM_CAPS);
        peer.reply(&first.header, &p);
        peer.reply(&second.header, &p);
        peer
    });
    let r = client.negotiate();
    let mut peer = server.join().unwrap();
    let v = r.expect("the retry is answered by its own reply");
    assert_eq!(v.capabilities.max_msg_fds, 8);
    round_trip(&client, &mut peer);
}

#[test]
fn version_replies_without_a_version() {
    let _g = concurrent();
    // 16 bytes, no Error bit.
    refused(Vec::new(), "shorter than the 20");
    // Error bit with errno 0: a failure, never success.
    let (client, _peer, r) =
        negotiate_against(Options::default(), |peer, m| peer.error_reply(&m.header, 0));
    assert_eq!(r.unwrap_err().code(), "EIO");
    assert!(client.version().is_none());
}

#[test]
fn a_version_reply_of_20_bytes_takes_the_spec_defaults() {
    let _g = concurrent();
    let (client, mut peer, r) = version_reply(vec![0, 0, 0, 0]);
    let v = r.unwrap();
    assert_eq!(v.capabilities, Capabilities::default());
    assert!(v.warnings.is_empty());
    // The spec's max_msg_fds default of 1 is enforced.
    let (e1, e2) = (eventfd(), eventfd());
    let fds = [e1.as_fd(), e2.as_fd()];
    let e = map_with_fds(&client, &fds).err().expect("refused");
    assert_eq!(e.code(), "EINVAL");
    assert!(e.message.contains("at most 1"), "{e}");
    round_trip(&client, &mut peer);
}

#[test]
fn version_json_that_is_not_a_nul_terminated_object() {
    let _g = concurrent();
    for (json, want) in [
        (&b"{}\0{}\0"[..], "contains a NUL"),
        (b"{\"capabilities\":{}}\0\0", "contains a NUL"),
        (b"{\"capabilities\":{\"x\":\"\xff\"}}\0", "not UTF-8"),
        (b"{\"capabilities\":{}}\xc3\0", "not UTF-8"),
        (b"\0", "invalid"),
        (b"   \0", "invalid"),
        (b"{\"capabilities\":{}\0", "invalid"),
        (b"null\0", "must be an object"),
        (b"\"capabilities\"\0", "must be an object"),
        (
            b"{\"capabilities\":\"all\"}\0",
            "'capabilities' must be an object",
        ),
        (
            b"{\"capabilities\":[]}\0",
            "'capabilities' must be an object",
        ),
    ] {
        refused(raw_version(json), want);
    }
}

#[test]
fn version_capabilities_of_the_wrong_type() {
    let _g = concurrent();
    for (inner, want) in [
        (r#""max_msg_fds":"8""#, "max_msg_fds"),
        (r#""max_msg_fds":-1"#, "max_msg_fds"),
        (r#""max_msg_fds":1.5"#, "max_msg_fds"),
        (r#""max_msg_fds":18446744073709551616"#, "max_msg_fds"),
        (r#""max_msg_fds":1e30"#, "max_msg_fds"),
        (r#""max_data_xfer_size":"1048576""#, "max_data_xfer_size"),
        (r#""pgsizes":4096.0"#, "pgsizes"),
        (r#""max_dma_maps":null"#, "max_dma_maps"),
        (r#""write_multiple":1"#, "write_multiple"),
        (r#""write_multiple":"true""#, "write_multiple"),
        (r#""twin_socket":true"#, "twin_socket"),
        (r#""twin_socket":[]"#, "twin_socket"),
        (
            r#""twin_socket":{"supported":"yes"}"#,
            "twin_socket.supported",
        ),
        (r#""migration":1"#, "migration"),
    ] {
        refused(version_payload(0, 0, &caps(inner)), want);
    }
}

#[test]
fn version_capabilities_out_of_range() {
    let _g = concurrent();
    for (inner, want) in [
        (r#""max_data_xfer_size":0"#, "max_data_xfer_size"),
        (r#""pgsizes":0"#, "pgsizes"),
        (r#""pgsizes":1"#, "below 4 KiB"),
        (r#""pgsizes":6144"#, "below 4 KiB"),
        (r#""max_dma_maps":0"#, "max_dma_maps"),
        (r#""migration":{"pgsize":100}"#, "migration.pgsize"),
    ] {
        refused(version_payload(0, 0, &caps(inner)), want);
    }
    // Enormous values are clamped, with a warning.
    for inner in [
        r#""max_msg_fds":100000"#,
        r#""max_msg_fds":9007199254740993"#,
    ] {
        let v = accepted(&caps(inner));
        assert_eq!(v.capabilities.max_msg_fds, MAX_MSG_FDS_LIMIT);
        assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
    }
    let v = accepted(&caps(r#""max_data_xfer_size":1099511627776"#));
    assert_eq!(v.capabilities.max_data_xfer_size, MAX_DATA_XFER_SIZE_LIMIT);
    assert_eq!(v.warnings.len(), 1);
    // Page sizes without 4 KiB are legal but said.
    let v = accepted(&caps(r#""pgsizes":2097152"#));
    assert_eq!(v.capabilities.pgsizes, 2 << 20);
    assert_eq!(v.warnings.len(), 1);
    // max_msg_fds 0: accepted, and then no request may carry an fd.
    let (client, mut peer, r) = version_reply(version_payload(0, 0, &caps(r#""max_msg_fds":0"#)));
    assert_eq!(r.unwrap().capabilities.max_msg_fds, 0);
    let memory = eventfd();
    let fds = [memory.as_fd()];
    let e = map_with_fds(&client, &fds).err().expect("refused");
    assert_eq!(e.code(), "EINVAL");
    assert!(e.message.contains("at most 0"), "{e}");
    round_trip(&client, &mut peer);
}

#[test]
fn version_unknown_capabilities_warn_and_duplicate_keys_fail() {
    let _g = concurrent();
    let v = accepted(
        r#"{"capabilities":{"frobnicate":{"a":[1,2]},"max_msg_fds":4,"twin_socket":{"supported":false,"colour":1}},"vendor":"x"}"#,
    );
    assert_eq!(v.capabilities.max_msg_fds, 4);
    assert_eq!(v.warnings.len(), 3, "{:?}", v.warnings);
    for name in ["frobnicate", "vendor", "twin_socket.colour"] {
        assert!(v.warnings.iter().any(|w| w.contains(name)), "{name}");
    }
    // migration was not offered; a server may still send it (libvfio-user does).
    let v = accepted(&caps(r#""migration":{"pgsize":4096}"#));
    assert_eq!(v.capabilities.migration.map(|m| m.pgsize), Some(4096));
    for json in [
        r#"{"capabilities":{"max_msg_fds":1,"max_msg_fds":8}}"#,
        r#"{"capabilities":{},"capabilities":{"max_msg_fds":8}}"#,
        r#"{"capabilities":{"twin_socket":{"supported":false,"supported":true}}}"#,
    ] {
        refused(version_payload(0, 0, json), "duplicate");
    }
}

#[test]
fn version_twin_socket_we_did_not_offer_fails_and_its_fd_is_closed() {
    census(|| {
        let memory = eventfd();
        let raw = memory.as_raw_fd();
        for (inner, fds, want) in [
            (r#""twin_socket":{"supported":true}"#, 0, "did not offer"),
            (
                r#""twin_socket":{"supported":true,"fd_index":0}"#,
                0,
                "did not offer",
            ),
            // An fd, but an eventfd rather than a socket.
            (
                r#""twin_socket":{"supported":true,"fd_index":0}"#,
                1,
                "carried 1 fds",
            ),
            (
                r#""twin_socket":{"supported":true,"fd_index":3}"#,
                1,
                "carried 1 fds",
            ),
            (r#""twin_socket":{"supported":false}"#, 2, "carried 2 fds"),
        ] {
            let p = version_payload(0, 0, &caps(inner));
            let (client, _peer, r) = negotiate_against(Options::default(), move |peer, m| {
                let bytes = message(Header::reply_to(&m.header, p.len()), &p);
                if fds == 0 {
                    peer.write(&bytes);
                } else {
                    peer.send_with_fds(&bytes, &vec![raw; fds]);
                }
            });
            let e = r.expect_err(inner);
            assert_eq!(e.code(), "EPROTO", "{inner}: {e}");
            assert!(e.message.contains(want), "{inner}: {e}");
            assert!(client.version().is_none());
        }
        let v = accepted(&caps(r#""twin_socket":{"supported":false}"#));
        assert_eq!(
            v.capabilities.twin_socket,
            Some(TwinSocket {
                supported: false,
                fd_index: None
            })
        );
    });
}

// ---- 18-21: fds on info replies ----------------------------------------------------------

#[test]
fn info_replies_carry_at_most_their_fds() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let raw = memory.as_raw_fd();
        // REGION_INFO: the one mmap fd, never two.
        let r = answered(&client, &mut peer, REGION_INFO, &region_info(), 32, &[raw]).unwrap();
        assert_eq!(r.fds.len(), 1);
        drop(r);
        let e = answered(
            &client,
            &mut peer,
            REGION_INFO,
            &region_info(),
            32,
            &[raw; 2],
        )
        .unwrap_err();
        assert_eq!(e.code(), "EPROTO");
        assert!(e.message.contains("carried 2 fds, at most 1"), "{e}");
        round_trip(&client, &mut peer);
        // REGION_IO_FDS: up to the 16 we advertised.
        let mut io_fds = [0u8; 16];
        io_fds[0..4].copy_from_slice(&64u32.to_ne_bytes());
        let r = answered(&client, &mut peer, REGION_IO_FDS, &io_fds, 16, &[raw; 16]).unwrap();
        assert_eq!(r.fds.len(), 16);
        drop(r);
        let e = answered(&client, &mut peer, REGION_IO_FDS, &io_fds, 16, &[raw; 17]).unwrap_err();
        assert_eq!(e.code(), "EPROTO");
        assert!(e.message.contains("carried 17 fds, at most 16"), "{e}");
        round_trip(&client, &mut peer);
        // IRQ_INFO and GET_INFO: none.
        for command in [IRQ_INFO, GET_INFO] {
            let e = answered(&client, &mut peer, command, &get_info(), 16, &[raw]).unwrap_err();
            assert_eq!(e.code(), "EPROTO");
            assert!(e.message.contains("at most 0"), "{e}");
            round_trip(&client, &mut peer);
        }
    });
}

// ---- 25, 26: requests from the server ----------------------------------------------------

#[test]
fn malformed_dma_requests_are_answered_in_order() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    let read = |addr: u64, count: u64| {
        let mut p = [0u8; 16];
        p[0..8].copy_from_slice(&addr.to_ne_bytes());
        p[8..16].copy_from_slice(&count.to_ne_bytes());
        p.to_vec()
    };
    let mut short_write = read(0, 8);
    short_write.extend_from_slice(&[1; 4]);
    let mut count32 = 0u64.to_ne_bytes().to_vec();
    count32.extend_from_slice(&8u32.to_ne_bytes());
    let cases: Vec<(u16, u16, bool, Vec<u8>, Errno)> = vec![
        // count above our max_data_xfer_size
        (1, DMA_READ, false, read(0, 2 << 20), Errno::E2BIG),
        // count != data length
        (2, DMA_WRITE, false, short_write, Errno::EINVAL),
        // address + count overflows
        (3, DMA_READ, false, read(u64::MAX - 3, 8), Errno::EINVAL),
        // a 32-bit count (pre-2021 servers)
        (4, DMA_READ, false, count32, Errno::EINVAL),
        // no payload at all
        (5, DMA_WRITE, false, Vec::new(), Errno::EINVAL),
        // No_reply: nothing comes back
        (6, DMA_WRITE, true, read(0, 0), Errno::EFAULT),
        // well formed, but nothing is mapped there
        (7, DMA_READ, false, read(0, 8), Errno::EFAULT),
    ];
    // A request of ours is outstanding throughout.
    let t = send(&client, GET_INFO, &tagged(6));
    let mine = peer.read_msg();
    for (id, command, no_reply, payload, _) in &cases {
        peer.write(&message(
            Header::command(*id, *command, payload.len(), *no_reply),
            payload,
        ));
    }
    for (id, command, _, _, errno) in cases.iter().filter(|c| !c.2) {
        expect_error_reply(&peer.read_msg(), *id, *command, *errno);
    }
    peer.reply(&mine.header, &mine.payload);
    assert_eq!(t.wait().unwrap().payload, tagged(6));
    round_trip(&client, &mut peer);
    assert_eq!(client.stats().server_requests, cases.len() as u64);
}

#[test]
fn dma_requests_with_fds_are_answered_and_their_fds_closed() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let raw = memory.as_raw_fd();
        let mut write = vec![0u8; 16 + 8];
        write[8..16].copy_from_slice(&8u64.to_ne_bytes());
        peer.send_with_fds(&dma_read(5, false), &[raw, raw]);
        peer.send_with_fds(
            &message(Header::command(6, DMA_WRITE, write.len(), false), &write),
            &[raw],
        );
        peer.send_with_fds(&dma_read(7, true), &[raw; 3]);
        // Too big to store (E2BIG), with an fd.
        let mut huge = vec![0u8; 16 + (1 << 20) + 1];
        huge[8..16].copy_from_slice(&(((1u64 << 20) + 1).to_ne_bytes()));
        peer.send_with_fds(
            &message(Header::command(8, DMA_WRITE, huge.len(), false), &huge),
            &[raw],
        );
        peer.write(&dma_read(9, false));
        // No server request may carry fds.
        expect_error_reply(&peer.read_msg(), 5, DMA_READ, Errno::EINVAL);
        expect_error_reply(&peer.read_msg(), 6, DMA_WRITE, Errno::EINVAL);
        expect_error_reply(&peer.read_msg(), 8, DMA_WRITE, Errno::E2BIG);
        expect_error_reply(&peer.read_msg(), 9, DMA_READ, unserved(DMA_READ));
        round_trip(&client, &mut peer);
    });
}

#[test]
fn a_server_request_is_answered_while_a_caller_blocks_on_its_own_reply() {
    let _g = concurrent();
    let (client, peer) = connected();
    let server = thread::spawn(move || {
        let mut peer = peer;
        let mine = peer.read_msg();
        peer.write(&dma_read(77, false));
        // Answered while the caller is blocked in send_wait, reading the socket itself.
        expect_error_reply(&peer.read_msg(), 77, DMA_READ, unserved(DMA_READ));
        peer.reply(&mine.header, &mine.payload);
        peer
    });
    let r = client
        .send_wait(Request::new(GET_INFO, &tagged(8)))
        .expect("answered");
    assert_eq!(r.payload, tagged(8));
    let mut peer = server.join().unwrap();
    round_trip(&client, &mut peer);
}

/// protocol.md section 6 and 7: a server that performs DMA through messages may read the next
/// message on the socket as the answer to its own request, so the client must never hold that
/// answer behind its own queued requests. Only a request already partly written may go first.
#[test]
fn a_reply_to_a_server_request_overtakes_requests_not_yet_started() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
    let mut big = vec![0u8; 1 << 20];
    big[..16].copy_from_slice(&tagged(1));
    let a = send(&client, GET_INFO, &big);
    // Not a byte of b can be written before a is.
    let b = send(&client, GET_INFO, &tagged(2));
    peer.write(&dma_read(77, false));
    wait_for("the server request to be taken", || {
        client.stats().server_requests == 1
    });
    let ma = peer.read_msg();
    assert_eq!(ma.payload, big);
    let next = peer.read_msg();
    let mb = if next.header.command == DMA_READ {
        expect_error_reply(&next, 77, DMA_READ, unserved(DMA_READ));
        peer.read_msg()
    } else {
        // Drain and answer everything first so the failure below is the only symptom.
        let answer = peer.read_msg();
        expect_error_reply(&answer, 77, DMA_READ, unserved(DMA_READ));
        peer.reply(&ma.header, &tagged(1));
        peer.reply(&next.header, &next.payload);
        a.wait().unwrap();
        b.wait().unwrap();
        panic!("the answer to DMA_READ 77 came after a request that had not started");
    };
    assert_eq!(mb.payload, tagged(2));
    peer.reply(&ma.header, &tagged(1));
    peer.reply(&mb.header, &mb.payload);
    assert_eq!(a.wait().unwrap().payload, tagged(1));
    assert_eq!(b.wait().unwrap().payload, tagged(2));
    round_trip(&client, &mut peer);
}

#[test]
fn unknown_server_commands_get_enosys_unless_no_reply() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    // Nothing, VERSION again, commands only a client sends, the obsolete 14, past the end.
    let commands = [0u16, VERSION, GET_INFO, 13, 14, 19, 200, u16::MAX];
    for (i, &command) in commands.iter().enumerate() {
        let payload = vec![i as u8; i];
        // No_reply (ids 200..): never answered; the others (ids 100..) answered in order.
        peer.write(&message(
            Header::command(200 + i as u16, command, i, true),
            &payload,
        ));
        peer.write(&message(
            Header::command(100 + i as u16, command, i, false),
            &payload,
        ));
    }
    for (i, &command) in commands.iter().enumerate() {
        expect_error_reply(&peer.read_msg(), 100 + i as u16, command, unserved(command));
    }
    round_trip(&client, &mut peer);
    assert_eq!(client.stats().server_requests, 2 * commands.len() as u64);
}

// ---- 27: fds where none belong -----------------------------------------------------------

#[test]
fn fds_on_replies_that_must_not_carry_them_are_closed() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let raw = memory.as_raw_fd();
        let exchange = |peer: &mut Peer, reply: &dyn Fn(&Header) -> Vec<u8>| {
            let t = info(&client);
            let m = peer.read_msg();
            peer.send_with_fds(&reply(&m.header), &[raw, raw]);
            t.wait()
        };
        // An error reply with fds: its errno.
        let r = exchange(&mut peer, &|h| {
            Header::error_reply_to(h, 22).encode().to_vec()
        });
        assert_eq!(r.unwrap_err().code(), "EINVAL");
        round_trip(&client, &mut peer);
        // The wrong command.
        let r = exchange(&mut peer, &|h| {
            let mut r = Header::reply_to(h, 16);
            r.command = REGION_INFO;
            message(r, &[0; 16])
        });
        expect_proto(r, "wrong command");
        round_trip(&client, &mut peer);
        // Above the request's limit.
        let r = exchange(&mut peer, &|h| message(Header::reply_to(h, 64), &[0; 64]));
        expect_proto(r, "too big");
        round_trip(&client, &mut peer);
        // A well-formed reply where no fd belongs.
        let r = exchange(&mut peer, &|h| message(Header::reply_to(h, 16), &[0; 16]));
        expect_proto(r, "fds on GET_INFO");
        round_trip(&client, &mut peer);
        // DMA_MAP's reply carries none either.
        let r = answered(&client, &mut peer, DMA_MAP, &dma_map(), 0, &[raw]);
        expect_proto(r, "fds on DMA_MAP reply");
        round_trip(&client, &mut peer);
        // To nobody, and a duplicate: dropped, fds closed.
        let t = info(&client);
        let m = peer.read_msg();
        let mut stray = Header::reply_to(&m.header, 16);
        stray.id ^= 0x8000;
        peer.send_with_fds(&message(stray, &[0; 16]), &[raw]);
        peer.reply(&m.header, &[0; 16]);
        peer.send_with_fds(&message(Header::reply_to(&m.header, 16), &[0; 16]), &[raw]);
        t.wait().unwrap();
        round_trip(&client, &mut peer);
    });
}

#[test]
fn fds_that_arrive_with_a_framing_violation_are_closed() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let t = info(&client);
        let m = peer.read_msg();
        let mut h = Header::reply_to(&m.header, 16);
        h.size = 3;
        peer.send_with_fds(&message(h, &[0; 16]), &[memory.as_raw_fd(); 3]);
        assert_eq!(t.wait().unwrap_err().code(), "ECONNRESET");
        assert!(client.is_closed());
    });
}

#[test]
fn fds_sent_with_two_replies_at_once_are_closed() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let a = info(&client);
        let b = info(&client);
        let ma = peer.read_msg();
        let mb = peer.read_msg();
        let mut bytes = message(Header::reply_to(&ma.header, 16), &[0; 16]);
        bytes.extend(message(Header::reply_to(&mb.header, 16), &[0; 16]));
        // One sendmsg: the fds cannot be told to belong to either reply, and neither may
        // carry any. Whichever takes them fails; the other is unaffected.
        peer.send_with_fds(&bytes, &[memory.as_raw_fd(); 3]);
        let (ra, rb) = (a.wait(), b.wait());
        assert!(
            ra.is_err() || rb.is_err(),
            "the fds were attached somewhere"
        );
        for r in [ra, rb] {
            if let Err(e) = r {
                assert_eq!(e.code(), "EPROTO", "{e}");
            }
        }
        round_trip(&client, &mut peer);
    });
}

#[test]
fn the_most_fds_one_message_can_carry_are_all_closed() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        // SCM_MAX_FD: the most one sendmsg can pass, and what the client's buffer holds.
        let fds = vec![memory.as_raw_fd(); 253];
        let e = answered(&client, &mut peer, GET_INFO, &get_info(), 16, &fds).unwrap_err();
        assert_eq!(e.code(), "EPROTO");
        assert!(e.message.contains("carried 253 fds"), "{e}");
        round_trip(&client, &mut peer);
    });
}

// ---- 28: no reply, late reply ------------------------------------------------------------

#[test]
fn a_blocking_caller_times_out_and_the_late_reply_and_its_fd_are_dropped() {
    census(|| {
        let (client, mut peer) = connected();
        let memory = eventfd();
        let p = region_info();
        let e = client
            .send_wait(Request {
                timeout: Some(Duration::from_millis(50)),
                ..Request::new(REGION_INFO, &p)
            })
            .unwrap_err();
        assert_eq!(e.code(), "ETIMEDOUT");
        let m = peer.read_msg();
        assert_eq!(client.stats().tombstones, 1);
        let before = client.stats().dropped_replies;
        peer.send_with_fds(
            &message(Header::reply_to(&m.header, 32), &p),
            &[memory.as_raw_fd()],
        );
        round_trip(&client, &mut peer);
        let s = client.stats();
        assert_eq!(s.dropped_replies, before + 1);
        assert_eq!(s.tombstones, 0, "the late reply released its id");
    });
}

#[test]
fn a_deadline_passing_mid_body_drops_the_rest_of_the_reply() {
    let _g = concurrent();
    let (client, mut peer) = connected();
    let p = tagged(7);
    let t = client
        .send_nowait(Request {
            timeout: Some(Duration::from_millis(100)),
            ..Request::new(GET_INFO, &p)
        })
        .unwrap();
    let m = peer.read_msg();
    let reply = message(Header::reply_to(&m.header, 16), &p);
    // The header and part of the body, then the server stalls.
    peer.write(&reply[..20]);
    assert_eq!(t.wait().unwrap_err().code(), "ETIMEDOUT");
    peer.write(&reply[20..]);
    round_trip(&client, &mut peer);
    let s = client.stats();
    assert_eq!(s.dropped_replies, 1);
    assert_eq!(s.tombstones, 0);
}

// ---- 29: a busy server -------------------------------------------------------------------

#[test]
fn a_busy_server_that_reads_our_replies_does_not_starve_our_requests() {
    let _g = concurrent();
    const FLOOD: u16 = 20_000;
    const MINE: u32 = 200;
    let (client, peer) = connected();
    // The peer's write side, shared so that whole messages never interleave.
    let out = Arc::new(Mutex::new(peer.s.try_clone().unwrap()));
    let flooder = {
        let out = out.clone();
        thread::spawn(move || {
            for batch in 0..FLOOD / 100 {
                let bytes: Vec<u8> = (0..100)
                    .flat_map(|i| dma_read(batch * 100 + i, false))
                    .collect();
                out.lock().unwrap().write_all(&bytes).unwrap();
            }
        })
    };
    let reader = thread::spawn(move || {
        let mut peer = peer;
        let (mut answered, mut served) = (0u16, 0u32);
        while answered < FLOOD || served < MINE {
            let m = peer.read_msg();
            if m.header.command == DMA_READ {
                // Every server request answered, in order.
                expect_error_reply(&m, answered, DMA_READ, unserved(DMA_READ));
                answered += 1;
            } else {
                assert_eq!(m.header.command, GET_INFO);
                let reply = message(Header::reply_to(&m.header, 16), &m.payload);
                out.lock().unwrap().write_all(&reply).unwrap();
                served += 1;
            }
        }
        peer
    });
    for i in 0..MINE {
        let r = client
            .send_wait(Request::new(GET_INFO, &tagged(i)))
            .expect("our request is answered during the flood");
        assert_eq!(r.payload, tagged(i));
    }
    flooder.join().unwrap();
    let mut peer = reader.join().unwrap();
    assert!(!client.is_closed());
    assert_eq!(client.stats().server_requests, u64::from(FLOOD));
    round_trip(&client, &mut peer);
}

// ---- 30: close with requests queued ------------------------------------------------------

#[test]
fn close_with_requests_queued_fails_them_all_and_closes_their_fds() {
    census(|| {
        let (client, mut peer) = connected();
        setsockopt(&peer.s, sockopt::RcvBuf, &4096).unwrap();
        let memory = eventfd();
        let (hook_tx, hook_rx) = mpsc::channel();
        client.on_close(move |e| hook_tx.send(e.code()).unwrap());
        let mut big = vec![0u8; 1 << 20];
        big[..16].copy_from_slice(&get_info());
        // Partly written: the server does not read.
        let first = send(&client, GET_INFO, &big);
        let held = open_fds();
        let fds = [memory.as_fd()];
        let queued: Vec<Ticket> = (0..4)
            .map(|_| map_with_fds(&client, &fds).unwrap())
            .collect();
        let mut posted = access(8).to_vec();
        posted.extend_from_slice(&[1; 8]);
        client.post(Request::new(REGION_WRITE, &posted)).unwrap();
        let (cb_tx, cb_rx) = mpsc::channel();
        client
            .send_callback(
                Request::new(GET_INFO, &get_info()),
                Box::new(move |r| cb_tx.send(r.map(|_| ())).unwrap()),
            )
            .unwrap();
        assert_eq!(open_fds(), held + 4, "the queue holds a duplicate per fd");
        client.close();
        assert_eq!(first.wait().unwrap_err().code(), "ECONNABORTED");
        for t in queued {
            assert_eq!(t.wait().unwrap_err().code(), "ECONNABORTED");
        }
        let cb = cb_rx.recv_timeout(PATIENCE).expect("callback called");
        assert_eq!(cb.unwrap_err().code(), "ECONNABORTED");
        assert_eq!(hook_rx.recv_timeout(PATIENCE).unwrap(), "ECONNABORTED");
        assert_eq!(open_fds(), held, "the queued duplicates were closed");
        let e = client
            .post(Request::new(GET_INFO, &get_info()))
            .unwrap_err();
        assert_eq!(e.code(), "ECONNABORTED");
        // The server got part of the first request, then the end of the stream: nothing
        // queued behind it was written.
        let (mut got, mut buf) = (0, vec![0u8; 64 * 1024]);
        loop {
            match peer.s.read(&mut buf).expect("read to the end") {
                0 => break,
                n => got += n,
            }
        }
        assert!(got > 0 && got < 16 + big.len(), "{got} bytes");
    });
}

// ---- 31: reconnect -----------------------------------------------------------------------

#[test]
fn after_a_server_disconnect_a_new_client_works_and_the_old_ones_fds_are_released() {
    census(|| {
        let memory = eventfd();
        let fds = [memory.as_fd()];
        let map = |client: &Client, peer: &mut Peer| {
            let t = map_with_fds(client, &fds).unwrap();
            let m = peer.read_msg();
            assert_eq!(m.fds.len(), 1);
            assert_eq!(
                fstat(&m.fds[0]).unwrap().st_ino,
                fstat(&memory).unwrap().st_ino
            );
            peer.reply(&m.header, &[]);
            t.wait().unwrap();
        };
        let base = open_fds();
        let (old, mut peer) = connected();
        map(&old, &mut peer);
        let pending = send(&old, REGION_INFO, &region_info());
        let _ = peer.read_msg();
        drop(peer);
        assert_eq!(pending.wait().unwrap_err().code(), "ECONNRESET");
        assert!(old.is_closed());
        assert_eq!(
            old.send_nowait(Request::new(GET_INFO, &get_info()))
                .err()
                .expect("refused")
                .code(),
            "ECONNRESET"
        );
        drop(old);
        assert_eq!(open_fds(), base, "the old connection released every fd");
        // A new connection; re-establishing the maps is the typed layer's (issue 8).
        let (new, mut peer) = connected();
        map(&new, &mut peer);
        round_trip(&new, &mut peer);
    });
}
