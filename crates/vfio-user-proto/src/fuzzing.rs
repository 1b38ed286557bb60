//! Entry points shared by the fuzz targets and the corpus replay test.
//!
//! Each function takes raw fuzzer bytes, drives one decoder a peer can reach, and panics if
//! that decoder panics or breaks one of its invariants. `fuzz/fuzz_targets/<name>.rs` is a
//! one-line call into the function of the same name, and `tests/fuzz_corpus.rs` replays the
//! committed corpus (`fuzz/corpus/<name>/`) and every crash turned regression input
//! (`fuzz/regressions/<name>/`) through the same functions, so CI checks them without
//! libFuzzer or a nightly toolchain.
//!
//! Not part of the protocol API: the input layouts below exist only for the fuzzer.

use crate::version::VersionProposal;
use crate::{
    parse_capabilities, reply_fd_limit, reply_size_limit, validate_version_reply, Capabilities,
    Command, Frame, Framer, Header, MessageType, ProtoError, TwinSocket, DEFAULT_MAX_BITMAP_SIZE,
    FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_MASK, HEADER_SIZE, MAX_DATA_XFER_SIZE_LIMIT,
    MAX_INCOMING_MESSAGE, MAX_MSG_FDS_LIMIT,
};

/// Bytes of [`framing`]'s input that choose how the stream is fed, before the stream itself.
pub const FRAMING_PREFIX: usize = 4;

/// Small deterministic generator for split points, seeded from the input.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: never reaches 0 from a nonzero seed.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a straightforward sequential decode of the whole stream says the framer must produce.
struct Expected {
    /// Headers and [start, end) offsets of every whole, valid message, in order.
    frames: Vec<(Header, usize, usize)>,
    /// Offset of a complete header that fails validation, if the stream reaches one.
    bad_header_at: Option<usize>,
}

fn reference_decode(stream: &[u8], max_message: usize) -> Expected {
    let mut frames = Vec::new();
    let mut at = 0;
    while stream.len() - at >= HEADER_SIZE {
        let mut raw = [0u8; HEADER_SIZE];
        raw.copy_from_slice(&stream[at..at + HEADER_SIZE]);
        let header = Header::decode(&raw);
        let ok = matches!(header.flags & FLAG_TYPE_MASK, 0 | 1)
            && (HEADER_SIZE..=max_message).contains(&(header.size as usize));
        if !ok {
            return Expected {
                frames,
                bad_header_at: Some(at),
            };
        }
        let end = at + header.size as usize;
        if end > stream.len() {
            break;
        }
        frames.push((header, at, end));
        at = end;
    }
    Expected {
        frames,
        bad_header_at: None,
    }
}

/// [`Framer`]: a byte stream split at arbitrary points, with attachments on arbitrary reads.
///
/// Input: `[chunk, limits, keep_mask, seed, stream...]`. `chunk` sizes the framer's buffer,
/// the low bits of `limits` pick `max_message`, bit `i % 8` of `keep_mask` says whether the
/// classifier keeps message `i`'s body, and `seed` (with the other three) drives the read
/// sizes and attachments.
///
/// Checked against a sequential decode of the same stream: the same messages in the same
/// order, bodies byte-exact when kept and empty when not, each attachment on the message that
/// holds the last byte of the read that brought it (and none lost or duplicated), an error
/// exactly when a whole invalid header arrives, and `mid_message` matching what is left over.
pub fn framing(data: &[u8]) {
    let Some((ctrl, stream)) = data.split_first_chunk::<FRAMING_PREFIX>() else {
        return;
    };
    let [chunk, limits, keep_mask, _seed] = *ctrl;
    let chunk = 1 + usize::from(chunk);
    let max_message = match limits & 3 {
        0 => 1 << 20,
        1 => HEADER_SIZE,
        2 => 256,
        _ => 4096,
    };
    let keep_of = |i: u32| keep_mask & (1 << (i % 8)) != 0;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(u32::from_le_bytes(*ctrl)));

    let expected = reference_decode(stream, max_message);
    let mut framer = Framer::<u32, u32>::new(chunk, max_message);
    assert!(!framer.mid_message());

    let mut fed = 0usize;
    let mut next_attachment = 0u32;
    // (attachment, stream offset of the last byte of the read that brought it)
    let mut given: Vec<(u32, usize)> = Vec::new();
    let mut classified = 0u32;
    let mut got: Vec<Frame<u32, u32>> = Vec::new();
    let mut error: Option<ProtoError> = None;

    'feed: loop {
        // Drain whatever is complete.
        loop {
            let mut calls = 0;
            let r = framer.next(|h: &Header, kind: MessageType| {
                calls += 1;
                let want = match h.flags & FLAG_TYPE_MASK {
                    0 => MessageType::Command,
                    _ => MessageType::Reply,
                };
                assert_eq!(kind, want, "classify got the wrong type for {h:?}");
                assert!(h.size as usize >= HEADER_SIZE && h.size as usize <= max_message);
                let tag = classified;
                classified += 1;
                (tag, keep_of(tag))
            });
            assert!(calls <= 1, "classify called {calls} times for one next()");
            match r {
                Ok(Some(frame)) => got.push(frame),
                Ok(None) => break,
                Err(e) => {
                    error = Some(e);
                    break 'feed;
                }
            }
        }
        if fed == stream.len() {
            break;
        }
        let roll = rng.next();
        // Sometimes the rest of a kept body goes straight into it, as the client reads
        // large bodies.
        if roll % 4 == 3 {
            if let Some((body, left)) = framer.direct_body(1) {
                let n = (1 + rng.below(left)).min(stream.len() - fed);
                body.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
                let id = next_attachment;
                next_attachment += 1;
                given.push((id, fed - 1));
                framer.filled_body(n, [id]);
                continue;
            }
        }
        let space = framer.space();
        assert!(!space.is_empty(), "space() returned no room");
        let attachments = match roll % 8 {
            0 => 2,
            1 | 2 => 1,
            _ => 0,
        };
        let ids: Vec<u32> = (next_attachment..next_attachment + attachments).collect();
        next_attachment += attachments;
        if roll % 16 == 15 {
            // A read of nothing: its attachments have no byte to belong to and are dropped.
            framer.filled(0, ids);
            continue;
        }
        let n = (1 + rng.below(space.len())).min(stream.len() - fed);
        space[..n].copy_from_slice(&stream[fed..fed + n]);
        fed += n;
        for &id in &ids {
            given.push((id, fed - 1));
        }
        framer.filled(n, ids);
    }

    // Same messages as the sequential decode (all of them unless an error stopped us early).
    let complete = if error.is_some() {
        expected.frames.len()
    } else {
        expected.frames.iter().take_while(|f| f.2 <= fed).count()
    };
    assert_eq!(got.len(), complete, "message count");
    for (i, (frame, &(header, start, end))) in got.iter().zip(&expected.frames).enumerate() {
        assert_eq!(frame.header, header, "header of message {i}");
        assert!(frame.header.size as usize >= HEADER_SIZE);
        assert_eq!(frame.tag, i as u32, "tag of message {i}");
        if keep_of(frame.tag) {
            assert_eq!(
                frame.payload.len(),
                frame.header.size as usize - HEADER_SIZE
            );
            assert_eq!(frame.payload, &stream[start + HEADER_SIZE..end], "body {i}");
        } else {
            assert!(frame.payload.is_empty(), "unkept body {i} was stored");
        }
        let want: Vec<u32> = given
            .iter()
            .filter(|&&(_, last)| (start..end).contains(&last))
            .map(|&(id, _)| id)
            .collect();
        assert_eq!(frame.attachments, want, "attachments of message {i}");
    }
    let returned: usize = got.iter().map(|f| f.attachments.len()).sum();
    assert!(returned <= next_attachment as usize);

    match expected.bad_header_at {
        Some(at) if at + HEADER_SIZE <= fed => {
            assert!(error.is_some(), "invalid header at {at} was accepted");
            // classify is never asked about a header that breaks framing.
            assert_eq!(classified as usize, expected.frames.len());
            framer.reset();
            assert!(!framer.mid_message());
        }
        _ => {
            if let Some(e) = error {
                panic!("framing error on a valid stream: {e}");
            }
            assert_eq!(fed, stream.len());
            let consumed = expected.frames.last().map_or(0, |f| f.2);
            assert_eq!(framer.mid_message(), consumed < stream.len(), "mid_message");
            // A partial message whose header is whole has been classified already.
            let pending_header = stream.len() - consumed >= HEADER_SIZE;
            assert_eq!(
                classified as usize,
                expected.frames.len() + usize::from(pending_header)
            );
        }
    }
}

/// [`Header::decode`] and [`Header::validate`].
///
/// Input: 16 header bytes, then up to 8 bytes of `max_size` (native endian; absent bytes are
/// 0). Checks that decode/encode round-trips and that validation accepts exactly the type
/// bits 0 and 1 with `16 <= size <= max_size`.
pub fn header(data: &[u8]) {
    let Some((raw, rest)) = data.split_first_chunk::<HEADER_SIZE>() else {
        return;
    };
    let h = Header::decode(raw);
    assert_eq!(&h.encode(), raw, "decode/encode round trip");
    let mut max = [0u8; 8];
    let n = rest.len().min(8);
    max[..n].copy_from_slice(&rest[..n]);
    let max = u64::from_ne_bytes(max);
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    for max in [max, MAX_INCOMING_MESSAGE, HEADER_SIZE, usize::MAX] {
        let size = h.size as usize;
        let type_ok = matches!(h.flags & FLAG_TYPE_MASK, 0 | 1);
        match h.validate(max) {
            Ok(kind) => {
                assert!(
                    type_ok && (HEADER_SIZE..=max).contains(&size),
                    "{h:?} <= {max}"
                );
                let want = if h.flags & FLAG_TYPE_MASK == 0 {
                    MessageType::Command
                } else {
                    MessageType::Reply
                };
                assert_eq!(kind, want);
                assert_eq!(h.payload_len(), size - HEADER_SIZE);
            }
            Err(e) => {
                assert!(
                    !type_ok || !(HEADER_SIZE..=max).contains(&size),
                    "{h:?}: {e}"
                );
                assert!(!e.0.is_empty());
            }
        }
    }
    assert_eq!(h.is_error(), h.flags & FLAG_ERROR != 0);
    assert_eq!(h.no_reply(), h.flags & FLAG_NO_REPLY != 0);
    // The constructors build headers that pass validation whenever the size fits.
    let payload = h.payload_len().min(1 << 20);
    let reply = Header::reply_to(&h, payload);
    assert_eq!(reply.validate(usize::MAX), Ok(MessageType::Reply));
    assert_eq!(Header::decode(&reply.encode()), reply);
    let err = Header::error_reply_to(&h, h.error);
    assert_eq!(err.validate(HEADER_SIZE), Ok(MessageType::Reply));
    assert!(err.is_error());
    let cmd = Header::command(h.id, h.command, payload, h.no_reply());
    assert_eq!(cmd.validate(usize::MAX), Ok(MessageType::Command));
    assert_eq!(cmd.no_reply(), h.no_reply());
}

/// Checks what every successful capability parse must hold, whatever the JSON said.
fn check_capabilities(c: &Capabilities) {
    assert!(c.max_msg_fds <= MAX_MSG_FDS_LIMIT, "{c:?}");
    assert!(
        (1..=MAX_DATA_XFER_SIZE_LIMIT).contains(&c.max_data_xfer_size),
        "{c:?}"
    );
    assert!(c.max_dma_maps > 0, "{c:?}");
    assert!(c.pgsizes != 0 && c.pgsizes & 0xfff == 0, "{c:?}");
    if let Some(m) = c.migration {
        assert!(m.pgsize != 0 && m.pgsize % 4096 == 0, "{c:?}");
        assert!(
            (1..=DEFAULT_MAX_BITMAP_SIZE).contains(&m.max_bitmap_size),
            "{c:?}"
        );
    }
    // What we would propose from these values parses back to the same values.
    let again = parse_capabilities(&c.to_json()).expect("our own JSON parses");
    let core = |c: &Capabilities| {
        (
            c.max_msg_fds,
            c.max_data_xfer_size,
            c.max_dma_maps,
            c.pgsizes,
        )
    };
    assert_eq!(core(&again.capabilities), core(c));
}

/// [`parse_capabilities`] on arbitrary text (invalid UTF-8 is replaced, as it cannot reach
/// the parser otherwise).
pub fn capabilities(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match parse_capabilities(&text) {
        Ok(p) => check_capabilities(&p.capabilities),
        Err(e) => assert!(!e.0.is_empty()),
    }
}

/// [`validate_version_reply`].
///
/// Input: `[major lo, major hi, minor lo, minor hi, offer, payload...]`: our proposal's
/// version (native endian), whether it offers `twin_socket` (bit 0 of `offer`), then the
/// reply payload as the server sent it (major, minor, JSON, NUL).
pub fn version_reply(data: &[u8]) {
    let Some((ctrl, payload)) = data.split_first_chunk::<5>() else {
        return;
    };
    let proposal = VersionProposal {
        major: u16::from_ne_bytes([ctrl[0], ctrl[1]]),
        minor: u16::from_ne_bytes([ctrl[2], ctrl[3]]),
        capabilities: Capabilities {
            max_msg_fds: 16,
            twin_socket: (ctrl[4] & 1 != 0).then_some(TwinSocket {
                supported: true,
                fd_index: None,
            }),
            ..Capabilities::default()
        },
    };
    let Ok(v) = validate_version_reply(&proposal, payload) else {
        return;
    };
    assert!(payload.len() >= 4);
    assert_eq!(v.major, proposal.major);
    assert_eq!(v.minor, u16::from_ne_bytes([payload[2], payload[3]]));
    assert!(v.minor <= proposal.minor);
    check_capabilities(&v.capabilities);
    if v.capabilities.twin_socket.is_some_and(|t| t.supported) {
        assert!(proposal.capabilities.twin_socket.is_some());
    }
    // The JSON was NUL-terminated UTF-8 with no other NUL, and parses the same on its own.
    let json = &payload[4..];
    let text = match json.split_last() {
        None => "{}",
        Some((&last, text)) => {
            assert_eq!(last, 0, "accepted JSON without its NUL");
            assert!(!text.contains(&0), "accepted JSON with an inner NUL");
            std::str::from_utf8(text).expect("accepted JSON that is not UTF-8")
        }
    };
    let alone = parse_capabilities(text).expect("accepted JSON parses on its own");
    assert_eq!(alone.capabilities, v.capabilities);
    assert_eq!(alone.warnings, v.warnings);
}

/// [`reply_size_limit`] and [`reply_fd_limit`]: must never panic, and stay bounded.
///
/// Input: `[command lo, command hi, fds (4 bytes), request payload...]`. The payload is also
/// tried against every known command.
pub fn limits(data: &[u8]) {
    let Some((ctrl, payload)) = data.split_first_chunk::<6>() else {
        return;
    };
    let command = u16::from_ne_bytes([ctrl[0], ctrl[1]]);
    let fds = u32::from_ne_bytes([ctrl[2], ctrl[3], ctrl[4], ctrl[5]]);
    let commands = Command::ALL.iter().map(|&c| c as u16);
    for c in std::iter::once(command)
        .chain(commands)
        .chain([0, 19, u16::MAX])
    {
        let limit = reply_size_limit(c, payload);
        assert!(
            (HEADER_SIZE..=MAX_INCOMING_MESSAGE).contains(&limit),
            "reply_size_limit({c}) = {limit}"
        );
        let n = reply_fd_limit(c, fds);
        assert!(
            n <= (fds as usize).max(1),
            "reply_fd_limit({c}, {fds}) = {n}"
        );
    }
}

/// The per-command reply decoders (device, irq and region info, region access echoes).
/// Input: 4 bytes of request index, 8 of offset, 4 of count, then the reply payload. Checks
/// that nothing panics and that what is accepted keeps its promises.
pub fn command_replies(data: &[u8]) {
    use crate::{device, irq, region};
    let Some((head, payload)) = data.split_at_checked(16) else {
        return;
    };
    let index = u32::from_ne_bytes([head[0], head[1], head[2], head[3]]);
    let mut o = [0u8; 8];
    o.copy_from_slice(&head[4..12]);
    let offset = u64::from_ne_bytes(o);
    let count = u32::from_ne_bytes([head[12], head[13], head[14], head[15]]);

    if let Ok(d) = device::decode_device_info(payload) {
        assert!(d.num_regions <= device::MAX_REGIONS && d.num_irqs <= device::MAX_IRQS);
    }
    if let Ok(i) = irq::decode_irq_info(payload, index) {
        assert_eq!(i.index, index);
        assert!(i.count <= irq::MAX_IRQ_VECTORS);
    }
    if let Ok(r) = region::decode_region_info(payload, index) {
        assert_eq!(r.index, index);
        for a in r.sparse.iter().flatten() {
            assert!(a
                .offset
                .checked_add(a.size)
                .is_some_and(|end| end <= r.size));
        }
    }
    if let Ok(bytes) = region::region_read_data(payload, index, offset, count) {
        assert_eq!(bytes.len(), count as usize);
    }
    // A reply whose data partly went straight into the caller's memory.
    let elsewhere = (offset as usize) % (count as usize + 1);
    if let Ok(bytes) = region::region_read_head(payload, elsewhere, index, offset, count) {
        assert_eq!(bytes.len() + elsewhere, count as usize);
    }
    if let Ok(r) =
        crate::region_io_fds::decode_region_io_fds(payload, index, offset, count as usize)
    {
        assert!(r.records.len() <= r.count as usize);
        for rec in &r.records {
            assert!((rec.fd_index as usize) < count as usize);
            assert!(
                rec.offset < offset
                    && rec
                        .offset
                        .checked_add(rec.size)
                        .is_some_and(|e| e <= offset)
            );
        }
    }
    if let Ok(ranges) = crate::feature::decode_dirty_bitmap(payload, offset, u64::from(count), 4096)
    {
        for (start, len) in ranges {
            assert!(start >= offset && start - offset + len <= u64::from(count));
        }
    }
    if let Ok(data) = crate::migration::mig_data_read_data(payload, count) {
        assert!(data.len() <= count as usize);
    }
    if let Ok(data) = crate::feature::feature_reply_data(payload, index) {
        let _ = crate::feature::decode_migration_flags(data);
        let _ = crate::feature::decode_device_state(data);
    }
    for write in [false, true] {
        if let Ok(a) = crate::dma::decode_dma_request(payload, write) {
            assert!(a.address.checked_add(a.count).is_some());
            assert!(!write || a.data.len() as u64 == a.count);
        }
    }
    if region::check_region_write_reply(payload, index, offset, count).is_ok() {
        assert!(payload.is_empty() || payload.len() == region::ACCESS_HEADER_SIZE);
    }
    if let Ok(p) = crate::pci::decode_pci_config(payload) {
        assert!(p.capabilities.len() <= 64);
        assert!(p
            .capabilities
            .iter()
            .all(|c| (c.offset as usize) < payload.len()));
    }
    if let Ok(writes) = crate::write_multi::decode_write_multi(payload) {
        assert!((1..=200).contains(&writes.len()));
        assert!(writes.iter().all(|w| w.data.len() <= 8));
    }
    if let Some(w) = crate::write_multi::small_write(payload) {
        let mut msg = crate::write_multi::write_multi_message(1, w);
        assert!(crate::write_multi::append_write(&mut msg, w));
        let decoded = crate::write_multi::decode_write_multi(&msg[crate::HEADER_SIZE..]);
        assert_eq!(decoded.ok(), Some(vec![w, w]));
    }
}
