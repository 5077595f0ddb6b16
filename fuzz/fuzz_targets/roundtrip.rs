//! Messages sent by one role and read by the other, both ways, in arbitrary pieces.
//!
//! Input layout (`arbitrary`'s): an optional fragment size, a masking seed byte, the
//! piece lengths the reader is fed in, then operations to the end of the input.
//!
//! Checks: the reader's events are exactly what was sent, Pings and Pongs ahead of the
//! data queued before them (a Close with its reason cut
//! to 123 bytes on a character boundary, nothing after it); the writer reads back a
//! Pong per Ping and the Close echo; sends after the Close, control payloads over 125
//! bytes and unsendable close codes are refused with their errors.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ringsocket::proto::frame::MAX_CONTROL_PAYLOAD;
use ringsocket::proto::{
    CloseCode, CloseFrame, CloseState, Connection, Event, Limits, SendError, Utf8Bytes,
};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Outgoing messages are split into frames of this many payload bytes.
    fragment: Option<u16>,
    /// Seeds the client's masking keys.
    seed: u8,
    /// The lengths of the pieces the reader is fed; the rest comes as one piece.
    pieces: Vec<u16>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Text(String),
    Binary(Payload),
    Ping(Payload),
    Pong(Payload),
    Close(u16, String),
}

/// Bytes with their length up front (`Vec<u8>` would spend two input bytes on each).
#[derive(Debug)]
struct Payload(Vec<u8>);

impl<'a> Arbitrary<'a> for Payload {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Self(<&[u8]>::arbitrary(u)?.to_vec()))
    }
}

fuzz_target!(|input: Input| {
    let limits = Limits::default().with_fragment_size(input.fragment.map(usize::from));
    let seed = [input.seed; 32];
    check(
        Connection::client(limits, seed),
        Connection::server(limits),
        &input,
    );
    check(
        Connection::server(limits),
        Connection::client(limits, seed),
        &input,
    );
});

/// Sends `input.ops` from `writer` to `reader` and the replies back.
fn check(mut writer: Connection, mut reader: Connection, input: &Input) {
    let mut sent = Vec::new();
    let mut replies = Vec::new();
    for op in &input.ops {
        let open = writer.close_state() == CloseState::Open;
        let (result, event) = match op {
            Op::Text(text) => (
                writer.send_text(text.as_str()),
                Event::Text(Utf8Bytes::from(text.as_str())),
            ),
            Op::Binary(Payload(bytes)) => (
                writer.send_binary(bytes.clone()),
                Event::Binary(Bytes::copy_from_slice(bytes)),
            ),
            Op::Ping(Payload(bytes)) | Op::Pong(Payload(bytes)) => {
                let ping = matches!(op, Op::Ping(_));
                let mut send = |payload: &[u8]| match ping {
                    true => writer.ping(payload),
                    false => writer.pong(payload),
                };
                if bytes.len() > MAX_CONTROL_PAYLOAD {
                    let too_long = SendError::ControlPayloadTooLong(bytes.len());
                    assert_eq!(send(bytes), Err(too_long));
                }
                let payload = &bytes[..bytes.len().min(MAX_CONTROL_PAYLOAD)];
                let result = send(payload);
                let payload = Bytes::copy_from_slice(payload);
                if ping && open {
                    replies.push(Event::Pong(payload.clone()));
                }
                match ping {
                    true => (result, Event::Ping(payload)),
                    false => (result, Event::Pong(payload)),
                }
            }
            Op::Close(code, reason) => {
                let code = CloseCode::from(*code);
                let result = writer.close(code, reason);
                if !code.is_sendable() {
                    assert_eq!(result, Err(SendError::UnsendableCloseCode(code.into())));
                    continue;
                }
                if open {
                    assert_eq!(writer.close_state(), CloseState::CloseSent);
                    replies.push(Event::Close(Some(CloseFrame::new(code, ""))));
                }
                // RFC 6455 §5.5: 125 bytes of payload, 2 of them the code.
                let mut end = reason.len().min(123);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                let reason = reason[..end].to_owned();
                (result, Event::Close(Some(CloseFrame { code, reason })))
            }
        };
        if open {
            assert_eq!(result, Ok(()));
            sent.push(event);
        } else {
            assert_eq!(result, Err(SendError::Closed));
        }
    }

    let wire: Vec<u8> = std::iter::from_fn(|| writer.poll_transmit())
        .flat_map(|chunk| chunk.to_vec())
        .collect();
    assert_eq!(writer.pending_output(), 0);
    // Everything was queued before the one write: Pings and Pongs go ahead of the data
    // (and of the Close, which keeps its place behind the data queued before it).
    let is_control = |e: &Event| matches!(e, Event::Ping(_) | Event::Pong(_));
    let (mut sent, data): (Vec<Event>, Vec<Event>) = sent.into_iter().partition(is_control);
    sent.extend(data);
    assert_eq!(read(&mut reader, &wire, &input.pieces), sent);
    if matches!(sent.last(), Some(Event::Close(_))) {
        assert!(reader.is_closed());
    }

    let mut back = Vec::new();
    reader.drain_transmit(&mut back);
    let back: Vec<u8> = back.iter().flat_map(|chunk| chunk.to_vec()).collect();
    assert_eq!(read(&mut writer, &back, &input.pieces), replies);
    if matches!(replies.last(), Some(Event::Close(_))) {
        assert!(writer.is_closed());
    }
    assert_eq!(writer.poll_transmit(), None, "the writer answered a reply");
}

/// Feeds `wire` to `conn` in `pieces` and returns every event; no error is allowed.
fn read(conn: &mut Connection, wire: &[u8], pieces: &[u16]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut rest = wire;
    let lengths = pieces.iter().map(|&len| usize::from(len).max(1));
    for len in lengths.chain([usize::MAX]) {
        let (piece, after) = rest.split_at(rest.len().min(len));
        rest = after;
        conn.handle_bytes(piece);
        loop {
            match conn.poll_event() {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(error) => panic!("{:?} failed on what the peer sent: {error}", conn.role()),
            }
        }
        assert!(conn.pending_input() < 200, "{conn:?}");
        if rest.is_empty() {
            break;
        }
    }
    events
}
