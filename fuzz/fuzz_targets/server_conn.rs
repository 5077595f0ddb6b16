//! A server-role [`Connection`] fed arbitrary client bytes in arbitrary pieces.
//!
//! Input layout (`arbitrary`'s): one byte whose low bit picks tight limits; then, per
//! piece, a byte with the low bit set, a little-endian `u16` length and an action byte;
//! then a byte with the low bit clear; then the client's bytes, to the end. Bytes the
//! pieces leave over are fed as one last piece. `cargo fuzz fmt server_conn FILE`
//! shows how a file decodes.
//!
//! Checks: nothing panics; events respect the limits; after `Ok(None)` at most a partial
//! header or control frame is held; after an error the connection is closed; output
//! grows no faster than input; and everything the server wrote decodes to whole, valid
//! server frames: exactly the replies the protocol requires (a Pong per Ping, the Close
//! echo or the failing Close), the application's frames, and no data after a Close.
//!
//! A twin server connection gets the same pieces and the same sends but is polled with
//! `poll_event_ref`, the borrowed API: it must yield the same events and errors, hold
//! the same input and write the same bytes as the one polled with `poll_event`.
#![no_main]

use std::collections::VecDeque;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use ringsocket::proto::conn::parse_close_payload;
use ringsocket::proto::frame::MAX_CONTROL_PAYLOAD;
use ringsocket::proto::{
    CloseCode, CloseFrame, CloseState, Connection, Event, EventRef, FrameHeader, Limits, OpCode,
};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Frames over 100 bytes and messages over 300 fail, instead of 64 and 128 KiB.
    tight: bool,
    /// Piece lengths, each with an action byte (see [`Action`]).
    pieces: Vec<(u16, u8)>,
    /// The client's bytes.
    data: Rest,
}

/// The rest of the input, byte for byte (`Vec<u8>` would spend two input bytes on each).
#[derive(Debug)]
struct Rest(Vec<u8>);

impl<'a> Arbitrary<'a> for Rest {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(<&[u8]>::arbitrary(u)?.to_vec()))
    }

    fn arbitrary_take_rest(u: Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(u.take_rest().to_vec()))
    }
}

/// Bits of a piece's action byte.
struct Action;

impl Action {
    /// Hand the piece in with `handle_buf` instead of `handle_bytes`.
    const BUF: u8 = 1;
    /// After polling, the application starts the close handshake.
    const CLOSE: u8 = 2;
    /// After polling, the application sends a Ping.
    const PING: u8 = 4;
    /// After polling, the application sends a binary message over the copy threshold.
    const BINARY: u8 = 8;
    /// Take the output with `drain_transmit` instead of `poll_transmit`.
    const DRAIN: u8 = 16;
}

/// How much more than it was fed the server may queue in one round: a failing Close
/// (at most 127 bytes) and the reply to a control frame begun the round before.
const OUTPUT_SLACK: usize = 512;

fuzz_target!(|input: Input| {
    let limits = if input.tight {
        Limits::default()
            .with_max_message_size(300)
            .with_max_frame_size(100)
    } else {
        Limits::default()
            .with_max_message_size(128 << 10)
            .with_max_frame_size(64 << 10)
    };
    let mut server = Connection::server(limits);
    let mut twin = Connection::server(limits);
    let mut client = Mirror::new();
    let mut data = &input.data.0[..];
    let pieces = input
        .pieces
        .iter()
        .map(|&(len, action)| (usize::from(len), action));
    // Whatever the pieces leave over comes last, in one piece.
    for (len, action) in pieces.chain([(usize::MAX, 0)]) {
        let (piece, after) = data.split_at(data.len().min(len));
        data = after;
        if action & Action::BUF != 0 {
            server.handle_buf(BytesMut::from(piece));
            twin.handle_buf(BytesMut::from(piece));
        } else {
            server.handle_bytes(piece);
            twin.handle_bytes(piece);
        }
        poll_all(&mut server, &mut twin, &mut client, &limits);
        assert!(
            server.pending_output() <= piece.len() + OUTPUT_SLACK,
            "{} bytes queued after {} fed",
            server.pending_output(),
            piece.len()
        );
        act(&mut server, &mut client, action);
        act(&mut twin, &mut Mirror::new(), action);
        let twin_wrote: Vec<u8> = std::iter::from_fn(|| twin.poll_transmit())
            .flat_map(|chunk| chunk.to_vec())
            .collect();
        let wrote = client.read_all_from(&mut server, action & Action::DRAIN != 0);
        assert!(
            twin_wrote == wrote,
            "poll_event_ref's twin wrote other bytes"
        );
        server.release_input_buffer();
        twin.release_input_buffer();
    }
    assert!(
        client.expected.is_empty(),
        "never written: {:?}",
        client.expected
    );
});

/// Polls the server until it needs more input or fails, checking every event and
/// recording the frames the protocol makes it write; polls the twin with the borrowed
/// API alongside and checks that it sees the same.
fn poll_all(server: &mut Connection, twin: &mut Connection, client: &mut Mirror, limits: &Limits) {
    loop {
        let was_open = server.close_state() == CloseState::Open;
        let result = server.poll_event();
        let borrowed = twin.poll_event_ref();
        if let Ok(Some(EventRef::Text(text))) = &borrowed {
            assert!(text.len() <= limits.max_message_size);
        }
        let borrowed = borrowed.map(|event| event.map(|e| e.to_event()));
        assert_eq!(borrowed, result, "poll_event_ref disagrees with poll_event");
        assert_eq!(twin.pending_input(), server.pending_input());
        assert_eq!(twin.close_state(), server.close_state());
        match result {
            Ok(Some(event)) => match event {
                Event::Text(text) => assert!(text.len() <= limits.max_message_size),
                Event::Binary(bytes) => assert!(bytes.len() <= limits.max_message_size),
                Event::Ping(payload) => {
                    assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
                    // RFC 6455 §5.5.2: a Pong answers it, even after our own Close
                    // (§5.5.1 forbids only data frames after it).
                    client.expect(Event::Pong(payload));
                }
                Event::Pong(payload) => assert!(payload.len() <= MAX_CONTROL_PAYLOAD),
                Event::Close(frame) => {
                    if let Some(frame) = &frame {
                        assert!(frame.code.is_sendable());
                        assert!(frame.reason.len() <= CloseFrame::MAX_REASON_BYTES);
                    }
                    assert!(server.is_closed());
                    if was_open {
                        let echo = frame.map(|f| CloseFrame::new(f.code, ""));
                        client.expect(Event::Close(echo));
                    }
                }
                other => panic!("unknown event {other:?}"),
            },
            Ok(None) => {
                // RFC 6455 is streamed: at most a partial header or control frame waits.
                assert!(server.pending_input() < 200, "{:?}", server);
                if server.is_closed() {
                    assert_eq!(server.pending_input(), 0);
                }
                return;
            }
            Err(error) => {
                assert!(server.is_closed());
                assert_eq!(server.error(), Some(error));
                assert_eq!(twin.error(), Some(error));
                assert_eq!(server.pending_input(), 0);
                assert_eq!(server.poll_event(), Ok(None));
                assert_eq!(twin.poll_event_ref(), Ok(None));
                if was_open {
                    let close = CloseFrame::new(error.close_code(), error.reason());
                    client.expect(Event::Close(Some(close)));
                }
                return;
            }
        }
    }
}

/// The application's sends for this piece; each succeeds exactly while open.
fn act(server: &mut Connection, client: &mut Mirror, action: u8) {
    let open = server.close_state() == CloseState::Open;
    if action & Action::PING != 0 {
        assert_eq!(server.ping(b"app").is_ok(), open);
        if open {
            client.expect(Event::Ping(Bytes::from_static(b"app")));
        }
    }
    if action & Action::BINARY != 0 {
        let payload = Bytes::from(vec![0xA5; 2000]);
        assert_eq!(server.send_binary(payload.clone()).is_ok(), open);
        if open {
            client.expect(Event::Binary(payload));
        }
    }
    if action & Action::CLOSE != 0 {
        assert_eq!(server.close(CloseCode::Normal, "bye").is_ok(), open);
        if open {
            assert_eq!(server.close_state(), CloseState::CloseSent);
            client.expect(Event::Close(Some(CloseFrame::new(
                CloseCode::Normal,
                "bye",
            ))));
        }
    }
}

/// The client's view of what the server wrote: each frame is decoded with
/// `FrameHeader::parse` and compared with the frames the server had to write.
struct Mirror {
    wire: BytesMut,
    closed: bool,
    expected: VecDeque<Event>,
}

impl Mirror {
    fn new() -> Self {
        Self {
            wire: BytesMut::new(),
            closed: false,
            expected: VecDeque::new(),
        }
    }

    fn expect(&mut self, event: Event) {
        self.expected.push_back(event);
    }

    /// Reads and checks everything the server queued; returns the bytes.
    fn read_all_from(&mut self, server: &mut Connection, drain: bool) -> Vec<u8> {
        let mut chunks = Vec::new();
        if drain {
            server.drain_transmit(&mut chunks);
        } else {
            chunks.extend(std::iter::from_fn(|| server.poll_transmit()));
        }
        assert_eq!(server.pending_output(), 0);
        let wrote: Vec<u8> = chunks.concat();
        self.wire.extend_from_slice(&wrote);
        while let Some((header, len)) = FrameHeader::parse(&self.wire).expect("valid header") {
            // A server frame is unmasked, unfragmented (no fragment size is set) and
            // uses no extension (RFC 6455 §5.1, §5.2).
            assert!(
                header.fin && header.rsv == 0 && header.mask.is_none(),
                "{header:?}"
            );
            let total = len + header.payload_len as usize;
            assert!(self.wire.len() >= total, "server wrote a partial frame");
            let payload = self.wire.split_to(total).freeze().slice(len..);
            // RFC 6455 §5.5.1: no data frame and no second Close after a Close.
            assert!(
                !self.closed || header.opcode == OpCode::Pong,
                "server wrote {:?} after its Close",
                header.opcode
            );
            let event = match header.opcode {
                OpCode::Binary => Event::Binary(payload),
                OpCode::Ping => Event::Ping(payload),
                OpCode::Pong => Event::Pong(payload),
                OpCode::Close => {
                    self.closed = true;
                    Event::Close(parse_close_payload(&payload).expect("valid close"))
                }
                other => panic!("server wrote a {other:?} frame"),
            };
            let want = self.expected.pop_front();
            assert_eq!(Some(&event), want.as_ref(), "the server wrote");
        }
        // Whole frames only: the client is not left waiting for the rest of one.
        assert!(self.wire.is_empty(), "server wrote a partial frame");
        wrote
    }
}
