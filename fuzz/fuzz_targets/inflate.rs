//! permessage-deflate's inflate path (RFC 7692 §7.2.2): a server-role [`Connection`]
//! with deflate negotiated, fed masked client frames whose payloads come from the input,
//! beside [`PerMessageDeflate::inflate`] called directly on the same bytes.
//!
//! Input layout (raw bytes, no `arbitrary`; `fuzz/seeds.py` writes it):
//!
//! ```text
//!   [0]      config: bit 0 the client keeps its context (client takeover); bits 1-3
//!            client_max_window_bits - 8 (8..=15); bits 4-6 max_message_size, 4 KiB
//!            << (n % 5) (4..=64 KiB)
//!   [1]      seed of the fragment cuts, masking keys, read sizes and corruptions
//!   [2..4]   u16 LE: the limit of the direct inflate of the whole input
//!   then messages to the end, each:
//!   [0]      flags: bit 0 text (else binary); bit 1 plain (RSV1 clear); bit 2 the
//!            payload is plain text that a client compressor (with the client's window
//!            and context) deflates first; bit 3 a Ping between the first two
//!            fragments; bits 4-6 fragments - 1 (1..=8); bit 7 one byte of the
//!            compressed payload is changed (with bit 2)
//!   [1..3]   u16 LE payload length, cut to what is left
//!   ...      the payload
//! ```
//!
//! Bit 2 lets the fuzzer reach the inflater with valid streams (and with takeover,
//! messages that point back into earlier ones); without it the payload goes to the
//! inflater as it is, so it also sees arbitrary compressed data.
//!
//! Checks: nothing panics; every inflate returns at most its limit; the connection
//! agrees with a twin [`PerMessageDeflate`] fed the same joined payloads (same
//! inflated bytes, `Corrupt` → `BadCompressedData`, `TooLarge` → `MessageTooLarge`, a
//! compressed payload over the limit fails before inflating); events are at most
//! `max_message_size`; what the client compressor deflated comes back unchanged while
//! the server's kept window matches the client's context; after an error the
//! connection is closed, reads nothing more, and its last frame is a Close with the
//! error's code; `poll_event_ref` on a second connection sees the same events.
#![no_main]

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};
use libfuzzer_sys::fuzz_target;
use ringsocket::proto::conn::parse_close_payload;
use ringsocket::proto::deflate::InflateError;
use ringsocket::proto::{
    Connection, DeflateParams, Event, EventRef, FrameHeader, Limits, OpCode, PerMessageDeflate,
    ProtocolError, Role,
};

/// Flag bits of a message (see the module docs).
struct Flags;

impl Flags {
    const TEXT: u8 = 1;
    const PLAIN: u8 = 2;
    const DEFLATE: u8 = 4;
    const PING: u8 = 8;
    const CORRUPT: u8 = 0x80;

    fn fragments(flags: u8) -> usize {
        usize::from((flags >> 4) & 7) + 1
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[config, seed, lo, hi], mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let takeover = config & 1 != 0;
    let window_bits = 8 + ((config >> 1) & 7);
    let max_message_size = (4 << 10) << (((config >> 4) & 7) % 5);
    let params = DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: !takeover,
        server_max_window_bits: 15,
        client_max_window_bits: window_bits,
    };

    // The inflater on raw data, with a limit of its own.
    let direct_limit = usize::from(u16::from_le_bytes([lo, hi]));
    let mut fresh = PerMessageDeflate::new(&params, Role::Server, 6, 0);
    if let Ok(out) = fresh.inflate(rest, direct_limit) {
        assert!(out.len() <= direct_limit, "{} > {direct_limit}", out.len());
    }

    let limits = Limits::default().with_max_message_size(max_message_size);
    let mut server = Connection::server(limits);
    server.set_deflate(PerMessageDeflate::new(&params, Role::Server, 6, 0));
    let mut borrowed = Connection::server(limits);
    borrowed.set_deflate(PerMessageDeflate::new(&params, Role::Server, 6, 0));
    let mut twin = PerMessageDeflate::new(&params, Role::Server, 6, 0);
    let mut client = Client::new(takeover, window_bits, seed);
    let mut rng = Rng::new(seed);

    while let Some((&[flags, lo, hi], after)) = rest.split_first_chunk::<3>() {
        let len = usize::from(u16::from_le_bytes([lo, hi])).min(after.len());
        let (payload, after) = after.split_at(len);
        rest = after;

        let text = flags & Flags::TEXT != 0;
        let plain = flags & Flags::PLAIN != 0;
        let (wire_payload, original) = if plain {
            (payload.to_vec(), None)
        } else if flags & Flags::DEFLATE != 0 {
            let mut compressed = client.compress(payload, rng.next());
            let corrupt = flags & Flags::CORRUPT != 0 && !compressed.is_empty();
            if corrupt {
                let at = rng.below(compressed.len());
                compressed[at] ^= rng.next().max(1);
                client.in_sync &= !takeover;
            }
            (compressed, (!corrupt).then_some(payload))
        } else {
            // Someone else's compressor: the server's window no longer matches ours.
            client.in_sync &= !takeover;
            (payload.to_vec(), None)
        };
        let frames = frames(&wire_payload, text, !plain, flags, &mut rng);

        let want = expect(&mut twin, &wire_payload, text, plain, max_message_size);
        // What our client compressed must come back, unless its window (9 bits at
        // least) is larger than the 8 bits the server keeps for it.
        let exact = client.in_sync && (window_bits >= 9 || !takeover);
        if let (Some(original), Ok(inflated)) = (original, &want)
            && exact
        {
            assert_eq!(&inflated[..], original, "a valid message changed");
        }
        if let (Some(original), Err(error)) = (original, &want)
            && exact
        {
            // Only the limits (or text that is not UTF-8) may refuse what a valid client
            // compressed.
            let over = original.len() > max_message_size || wire_payload.len() > max_message_size;
            let refused = match error {
                ProtocolError::MessageTooLarge { .. } => over,
                ProtocolError::InvalidUtf8 => text && std::str::from_utf8(original).is_err(),
                _ => false,
            };
            assert!(
                refused,
                "{error:?} for a valid message of {} bytes ({} compressed)",
                original.len(),
                wire_payload.len()
            );
        }

        let mut got = Vec::new();
        for piece in pieces(&frames, &mut rng) {
            server.handle_bytes(piece);
            borrowed.handle_bytes(piece);
            got.extend(poll_all(&mut server, &mut borrowed, max_message_size));
        }
        // A Ping between fragments comes first, answered; then the message or the error.
        got.retain(|e| !matches!(e, Ok(Event::Ping(_))));
        match (&want, got.as_slice()) {
            (Ok(bytes), [Ok(event)]) => {
                let payload: &[u8] = match event {
                    Event::Text(t) if text => t.as_bytes(),
                    Event::Binary(b) if !text => b,
                    other => panic!("{other:?} for a text={text} message"),
                };
                assert_eq!(
                    payload,
                    &bytes[..],
                    "the connection and the inflater disagree"
                );
            }
            (Err(want), [Err(got)]) => {
                assert!(
                    same_error(*want, *got, plain && text),
                    "want {want:?}, got {got:?}"
                );
                check_failed(&mut server, *got);
                return;
            }
            (want, got) => panic!("want {want:?}, got {got:?}"),
        }
    }
});

/// What the connection must report for one message: what `twin` inflates it to (its
/// window kept as the connection's), or the error that fails the connection.
fn expect(
    twin: &mut PerMessageDeflate,
    payload: &[u8],
    text: bool,
    plain: bool,
    limit: usize,
) -> Result<Vec<u8>, ProtocolError> {
    if payload.len() > limit {
        // Refused from a frame header, before anything is inflated.
        return Err(ProtocolError::MessageTooLarge {
            len: payload.len() as u64,
            limit,
        });
    }
    let bytes = if plain {
        payload.to_vec()
    } else {
        match twin.inflate(payload, limit) {
            Ok(out) => {
                assert!(out.len() <= limit, "inflated {} > {limit}", out.len());
                out
            }
            Err(InflateError::TooLarge { .. }) => {
                return Err(ProtocolError::MessageTooLarge {
                    len: limit as u64 + 1,
                    limit,
                });
            }
            Err(InflateError::Corrupt) => return Err(ProtocolError::BadCompressedData),
        }
    };
    if text && std::str::from_utf8(&bytes).is_err() {
        return Err(ProtocolError::InvalidUtf8);
    }
    Ok(bytes)
}

/// Whether the connection failed as predicted. A payload over the limit fails on the
/// frame that crosses it: `FrameTooLarge` when that is one frame (the frame limit is
/// the message limit), `MessageTooLarge` otherwise, with the `len` so far; a plain text
/// message may fail on invalid UTF-8 in a fragment before that.
fn same_error(want: ProtocolError, got: ProtocolError, plain_text: bool) -> bool {
    use ProtocolError::{FrameTooLarge, InvalidUtf8, MessageTooLarge};
    match (want, got) {
        (MessageTooLarge { limit, .. }, MessageTooLarge { limit: l, .. })
        | (MessageTooLarge { limit, .. }, FrameTooLarge { limit: l, .. }) => limit == l,
        (MessageTooLarge { .. }, InvalidUtf8) => plain_text,
        _ => want == got,
    }
}

/// Polls both connections until they need more input or fail; they must agree, and
/// every message must be within the limit.
fn poll_all(
    server: &mut Connection,
    borrowed: &mut Connection,
    limit: usize,
) -> Vec<Result<Event, ProtocolError>> {
    let mut events = Vec::new();
    loop {
        let owned = server.poll_event();
        let by_ref = borrowed.poll_event_ref();
        if let Ok(Some(EventRef::Binary(b))) = &by_ref {
            assert!(b.len() <= limit);
        }
        let by_ref = by_ref.map(|e| e.map(|e| e.to_event()));
        assert_eq!(owned, by_ref, "poll_event_ref disagrees with poll_event");
        match owned {
            Ok(Some(event)) => {
                match &event {
                    Event::Text(t) => assert!(t.len() <= limit, "{} > {limit}", t.len()),
                    Event::Binary(b) => assert!(b.len() <= limit, "{} > {limit}", b.len()),
                    _ => {}
                }
                events.push(Ok(event));
            }
            Ok(None) => return events,
            Err(error) => {
                events.push(Err(error));
                return events;
            }
        }
    }
}

/// After `error`: closed, nothing more read, and the Close with its code written last.
fn check_failed(server: &mut Connection, error: ProtocolError) {
    assert!(server.is_closed());
    assert_eq!(server.error(), Some(error));
    assert_eq!(server.poll_event(), Ok(None));
    server.handle_bytes(&[0x89, 0x80, 0, 0, 0, 0]);
    assert_eq!(server.poll_event(), Ok(None), "read after the error");
    assert_eq!(server.pending_input(), 0);
    let wire: Vec<u8> = std::iter::from_fn(|| server.poll_transmit())
        .flat_map(|chunk| chunk.to_vec())
        .collect();
    let mut at = &wire[..];
    let mut last = None;
    while let Ok(Some((header, len))) = FrameHeader::parse(at) {
        let end = len + header.payload_len as usize;
        assert!(at.len() >= end, "partial frame written");
        assert_eq!(header.rsv, 0, "a control frame with RSV bits");
        last = Some((header.opcode, Bytes::copy_from_slice(&at[len..end])));
        at = &at[end..];
    }
    assert!(at.is_empty(), "undecodable output");
    let Some((OpCode::Close, payload)) = last else {
        panic!("no Close written last: {last:?}");
    };
    let close = parse_close_payload(&payload).ok().flatten();
    assert_eq!(close.map(|c| c.code), Some(error.close_code()));
}

/// The message's masked frames: RSV1 on the first when compressed, cut at random points
/// into the fragments the flags ask for, a Ping after the first if asked.
fn frames(payload: &[u8], text: bool, compressed: bool, flags: u8, rng: &mut Rng) -> Vec<u8> {
    let count = Flags::fragments(flags);
    let mut cuts: Vec<usize> = (1..count).map(|_| rng.below(payload.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(payload.len() + count * 14 + 8);
    let mut start = 0;
    for (i, end) in cuts.into_iter().chain([payload.len()]).enumerate() {
        let first = i == 0;
        let opcode: u8 = match (first, text) {
            (false, _) => 0x0,
            (true, true) => 0x1,
            (true, false) => 0x2,
        };
        let rsv1 = if first && compressed { 0x40 } else { 0 };
        let fin = if i + 1 == count { 0x80 } else { 0 };
        masked_frame(&mut out, fin | rsv1 | opcode, &payload[start..end], rng);
        if first && flags & Flags::PING != 0 && count > 1 {
            masked_frame(&mut out, 0x89, b"between", rng);
        }
        start = end;
    }
    out
}

fn masked_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], rng: &mut Rng) {
    let key = [rng.next(), rng.next(), rng.next(), rng.next()];
    out.push(b0);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
}

/// `wire` in reads of 1 to 4 KiB, or whole.
fn pieces<'a>(wire: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = wire;
    let max = match rng.next() % 4 {
        0 => wire.len().max(1),
        1 => 7,
        2 => 300,
        _ => 4096,
    };
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(rest.len().min(1 + rng.below(max)));
        out.push(piece);
        rest = after;
    }
    out
}

/// A browser-like client's compressor: raw deflate, sync flush, the `00 00 ff ff`
/// removed (RFC 7692 §7.2.1), one context for all messages when it keeps it.
struct Client {
    compress: Compress,
    takeover: bool,
    bits: u8,
    /// The server's kept window is this compressor's history: valid messages must
    /// come back unchanged.
    in_sync: bool,
}

impl Client {
    fn new(takeover: bool, bits: u8, seed: u8) -> Self {
        // zlib has no 8-bit raw deflate window: 9 is the least (such a client breaks
        // its window, so nothing is asserted about it).
        let bits = bits.max(9);
        let level = Compression::new(u32::from(seed % 10));
        Self {
            compress: Compress::new_with_window_bits(level, false, bits),
            takeover,
            bits,
            in_sync: true,
        }
    }

    fn compress(&mut self, payload: &[u8], level: u8) -> Vec<u8> {
        if !self.takeover {
            let level = Compression::new(u32::from(level % 10));
            self.compress = Compress::new_with_window_bits(level, false, self.bits);
        }
        let start_in = self.compress.total_in();
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 8 + 64);
        loop {
            let used = (self.compress.total_in() - start_in) as usize;
            if self
                .compress
                .compress_vec(&payload[used..], &mut out, FlushCompress::Sync)
                .is_err()
            {
                panic!("zlib refused to compress");
            }
            let done = (self.compress.total_in() - start_in) as usize == payload.len();
            if done && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.is_empty() {
            // zlib writes no second flush marker for no input: an empty message is the
            // one byte of an empty stored block's header (§7.2.3.6).
            return vec![0x00];
        }
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "no sync flush tail");
        out.truncate(out.len() - 4);
        out
    }
}

/// xorshift, seeded from the input: cuts, keys and reads vary with it.
struct Rng(u32);

impl Rng {
    fn new(seed: u8) -> Self {
        Self(0x9E37_79B9 ^ u32::from(seed).wrapping_mul(0x0101_0101) | 1)
    }

    fn next(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 >> 24) as u8
    }

    /// 0..n (0 when n is 0).
    fn below(&mut self, n: usize) -> usize {
        let x = u32::from(self.next()) << 16 | u32::from(self.next()) << 8 | u32::from(self.next());
        if n == 0 { 0 } else { x as usize % n }
    }
}
