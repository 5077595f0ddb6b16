//! Unit tests of the connection state machine on literal bytes, one per rule of
//! RFC 6455 that it enforces.

use super::*;
use crate::proto::frame::frame_rest;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A raw frame: `b0` is the first byte as sent (FIN, RSV, opcode), masked with `KEY`
/// when `masked`.
fn raw(b0: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(b0);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&KEY);
    }
    let body = out.len();
    out.extend_from_slice(payload);
    if masked {
        apply_mask(&mut out[body..], KEY, 0);
    }
    out
}

/// A masked client frame with FIN set.
fn client(opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw(0x80 | opcode, true, payload)
}

fn server() -> Connection {
    Connection::server(Limits::default())
}

fn events(conn: &mut Connection) -> Vec<Result<Event, ProtocolError>> {
    let mut out = Vec::new();
    loop {
        match conn.poll_event() {
            Ok(Some(event)) => out.push(Ok(event)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

/// Like [`events`], through [`Connection::poll_event_ref`], each event copied.
fn events_ref(conn: &mut Connection) -> Vec<Result<Event, ProtocolError>> {
    let mut out = Vec::new();
    loop {
        match conn.poll_event_ref() {
            Ok(Some(event)) => out.push(Ok(event.to_event())),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

fn output(conn: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = conn.poll_transmit() {
        out.extend_from_slice(&chunk);
    }
    out
}

/// Decodes unmasked server frames from `bytes` as (opcode, fin, payload).
fn server_frames(mut bytes: &[u8]) -> Vec<(OpCode, bool, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (h, n) = FrameHeader::parse(bytes).unwrap().unwrap();
        assert_eq!(
            h.mask, None,
            "server frames are never masked (RFC 6455 §5.1)"
        );
        let end = n + h.payload_len as usize;
        frames.push((h.opcode, h.fin, bytes[n..end].to_vec()));
        bytes = &bytes[end..];
    }
    frames
}

/// Feeds `bytes` and expects the connection to fail with `error`, sending a Close with
/// `code` and ending closed.
/// The borrowed API gives the same events, the same error and the same output.
fn assert_fails(bytes: &[u8], error: ProtocolError, code: u16) {
    let mut conn = server();
    conn.handle_bytes(bytes);
    let got = events(&mut conn);
    assert_eq!(got.last(), Some(&Err(error)), "events: {got:?}");
    let mut twin = server();
    twin.handle_bytes(bytes);
    assert_eq!(events_ref(&mut twin), got, "poll_event_ref disagrees");
    assert_eq!(twin.error(), Some(error));
    assert_eq!(error.close_code(), CloseCode::from(code));
    assert!(conn.is_closed());
    assert_eq!(conn.error(), Some(error));
    let sent = output(&mut conn);
    assert_eq!(
        output(&mut twin),
        sent,
        "poll_event_ref queued other frames"
    );
    let frames = server_frames(&sent);
    let (op, _, payload) = frames.last().expect("a close frame is sent");
    assert_eq!(*op, OpCode::Close);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
    // RFC 6455 §7.1.7: after failing, nothing more is read.
    conn.handle_bytes(&client(0x1, b"late"));
    assert_eq!(conn.poll_event(), Ok(None));
    twin.handle_bytes(&client(0x1, b"late"));
    assert_eq!(twin.poll_event_ref(), Ok(None));
}

// ---- data frames ----------------------------------------------------------------------

/// RFC 6455 §5.6, §5.7: a masked single-frame text and binary message.
#[test]
fn single_frame_messages_decode() {
    let mut conn = server();
    conn.handle_bytes(&client(0x1, b"Hello"));
    conn.handle_bytes(&client(0x2, &[0, 1, 2]));
    conn.handle_bytes(&client(0x2, b""));
    assert_eq!(
        events(&mut conn),
        vec![
            Ok(Event::Text("Hello".into())),
            Ok(Event::Binary(Bytes::from_static(&[0, 1, 2]))),
            Ok(Event::Binary(Bytes::new())),
        ]
    );
}

/// RFC 6455 §5.2: 16-bit and 64-bit payload lengths.
#[test]
fn extended_lengths_decode() {
    let mut conn = server();
    let medium = vec![7u8; 300];
    let large = vec![9u8; 70_000];
    conn.handle_bytes(&client(0x2, &medium));
    conn.handle_bytes(&client(0x2, &large));
    assert_eq!(
        events(&mut conn),
        vec![
            Ok(Event::Binary(medium.into())),
            Ok(Event::Binary(large.into()))
        ]
    );
}

/// Input may arrive one byte at a time: every prefix is "need more", nothing is lost.
#[test]
fn byte_at_a_time_input_decodes() {
    let mut stream = client(0x1, "añb€".as_bytes());
    stream.extend(raw(0x01, true, b"frag"));
    stream.extend(client(0x9, b"p"));
    stream.extend(raw(0x80, true, b"ment"));
    let mut conn = server();
    let mut got = Vec::new();
    for byte in &stream {
        conn.handle_bytes(std::slice::from_ref(byte));
        got.extend(events(&mut conn));
        assert!(
            conn.pending_input() < 140,
            "input is not held beyond a control frame"
        );
    }
    assert_eq!(
        got,
        vec![
            Ok(Event::Text("añb€".into())),
            Ok(Event::Ping(Bytes::from_static(b"p"))),
            Ok(Event::Text("fragment".into())),
        ]
    );
}

/// RFC 6455 §5.4: fragments reassemble; control frames may be interleaved and are
/// reported as they arrive.
#[test]
fn fragmented_message_with_interleaved_control_frames() {
    let mut conn = server();
    conn.handle_bytes(&raw(0x02, true, b"ab"));
    conn.handle_bytes(&client(0x9, b"ping"));
    conn.handle_bytes(&raw(0x00, true, b"cd"));
    conn.handle_bytes(&client(0xA, b"pong"));
    conn.handle_bytes(&raw(0x80, true, b"ef"));
    assert_eq!(
        events(&mut conn),
        vec![
            Ok(Event::Ping(Bytes::from_static(b"ping"))),
            Ok(Event::Pong(Bytes::from_static(b"pong"))),
            Ok(Event::Binary(Bytes::from_static(b"abcdef"))),
        ]
    );
    // The Ping was answered with a Pong carrying the same payload (RFC 6455 §5.5.2).
    assert_eq!(
        server_frames(&output(&mut conn)),
        vec![(OpCode::Pong, true, b"ping".to_vec())]
    );
}

/// RFC 6455 §5.4: empty fragments, including an empty final one.
#[test]
fn empty_fragments_are_allowed() {
    let mut conn = server();
    conn.handle_bytes(&raw(0x01, true, b""));
    conn.handle_bytes(&raw(0x00, true, b"x"));
    conn.handle_bytes(&raw(0x80, true, b""));
    assert_eq!(events(&mut conn), vec![Ok(Event::Text("x".into()))]);
}

// ---- rules that fail with 1002 ---------------------------------------------------------

/// RFC 6455 §5.2: RSV bits without a negotiated extension.
#[test]
fn reserved_bits_fail_with_1002() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        assert_fails(
            &raw(0x80 | rsv | 0x1, true, b"x"),
            ProtocolError::ReservedBits(rsv >> 4),
            1002,
        );
    }
}

/// RFC 6455 §5.2: reserved opcodes, data (0x3-0x7) and control (0xB-0xF).
#[test]
fn reserved_opcodes_fail_with_1002() {
    for op in [0x3, 0x7, 0xB, 0xF] {
        assert_fails(&client(op, b""), ProtocolError::ReservedOpcode(op), 1002);
    }
}

/// RFC 6455 §5.5: control frame payloads are at most 125 bytes.
#[test]
fn long_control_frame_fails_with_1002() {
    assert_fails(
        &client(0x9, &[0; 126]),
        ProtocolError::ControlFrameTooLong(126),
        1002,
    );
}

/// RFC 6455 §5.5: control frames must not be fragmented.
#[test]
fn fragmented_control_frame_fails_with_1002() {
    assert_fails(
        &raw(0x09, true, b"x"),
        ProtocolError::FragmentedControlFrame,
        1002,
    );
}

/// RFC 6455 §5.1: a server must fail a connection on an unmasked client frame.
#[test]
fn unmasked_client_frame_fails_with_1002() {
    assert_fails(
        &raw(0x81, false, b"x"),
        ProtocolError::UnmaskedClientFrame,
        1002,
    );
}

/// RFC 6455 §5.1: a client must fail a connection on a masked server frame.
#[test]
fn masked_server_frame_fails_in_client_role() {
    let mut conn = Connection::client(Limits::default(), [7; 32]);
    conn.handle_bytes(&raw(0x81, true, b"x"));
    assert_eq!(conn.poll_event(), Err(ProtocolError::MaskedServerFrame));
    assert!(conn.is_closed());
    // The client's own Close is masked.
    let out = output(&mut conn);
    let (h, _) = FrameHeader::parse(&out).unwrap().unwrap();
    assert_eq!((h.opcode, h.mask.is_some()), (OpCode::Close, true));
}

/// RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0.
#[test]
fn length_top_bit_fails_with_1002() {
    let mut bytes = vec![0x82, 0xFF];
    bytes.extend_from_slice(&(1u64 << 63).to_be_bytes());
    bytes.extend_from_slice(&KEY);
    assert_fails(&bytes, ProtocolError::LengthTopBitSet, 1002);
}

/// RFC 6455 §5.4: a continuation frame needs a message to continue.
#[test]
fn continuation_without_start_fails_with_1002() {
    assert_fails(
        &client(0x0, b"x"),
        ProtocolError::ContinuationWithoutStart,
        1002,
    );
}

/// RFC 6455 §5.4: a new data frame may not start inside a fragmented message.
#[test]
fn data_frame_inside_fragmented_message_fails_with_1002() {
    let mut bytes = raw(0x01, true, b"a");
    bytes.extend(client(0x1, b"b"));
    assert_fails(
        &bytes,
        ProtocolError::DataFrameInsideFragmentedMessage,
        1002,
    );
}

// ---- UTF-8: 1007 -----------------------------------------------------------------------

/// RFC 6455 §8.1: a text message that is not UTF-8 fails with 1007.
#[test]
fn invalid_utf8_fails_with_1007() {
    assert_fails(
        &client(0x1, &[b'a', 0xff]),
        ProtocolError::InvalidUtf8,
        1007,
    );
}

/// RFC 6455 §8.1: a text message ending inside a character fails with 1007.
#[test]
fn truncated_utf8_fails_with_1007() {
    assert_fails(
        &client(0x1, &[0xe2, 0x82]),
        ProtocolError::InvalidUtf8,
        1007,
    );
    let mut bytes = raw(0x01, true, &[0xe2]);
    bytes.extend(raw(0x80, true, &[0x82]));
    assert_fails(&bytes, ProtocolError::InvalidUtf8, 1007);
}

/// RFC 6455 §8.1: a character split across fragments is valid.
#[test]
fn character_split_across_fragments_is_valid() {
    let euro = "€".as_bytes();
    let mut conn = server();
    conn.handle_bytes(&raw(0x01, true, &euro[..1]));
    conn.handle_bytes(&raw(0x00, true, &euro[1..2]));
    conn.handle_bytes(&raw(0x80, true, &euro[2..]));
    assert_eq!(events(&mut conn), vec![Ok(Event::Text("€".into()))]);
}

/// RFC 6455 §8.1 fail fast: the first invalid byte fails the connection while the
/// rest of the frame has not arrived yet.
#[test]
fn invalid_utf8_fails_fast_inside_a_partial_frame() {
    let mut payload = b"hello".to_vec();
    payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]); // above U+10FFFF
    payload.extend_from_slice(&[b'x'; 1000]);
    let frame = client(0x1, &payload);
    let mut conn = server();
    // Header (8 bytes: 2 + 2 length + 4 key) and the first 10 payload bytes only.
    conn.handle_bytes(&frame[..18]);
    assert_eq!(conn.poll_event(), Err(ProtocolError::InvalidUtf8));
}

/// RFC 6455 §8.1 fail fast: an invalid fragment fails before the message is complete.
#[test]
fn invalid_utf8_fails_fast_in_a_fragment() {
    let mut conn = server();
    conn.handle_bytes(&raw(0x01, true, "κόσμε".as_bytes()));
    assert_eq!(conn.poll_event(), Ok(None));
    conn.handle_bytes(&raw(0x00, true, &[0xce, 0xba, 0xff]));
    assert_eq!(conn.poll_event(), Err(ProtocolError::InvalidUtf8));
}

// ---- limits: 1009 ----------------------------------------------------------------------

/// A frame announcing more than `max_frame_size` fails with 1009 before any payload is
/// buffered: growth is bounded by the limit, not by what the peer claims.
#[test]
fn oversized_frame_fails_with_1009_before_buffering() {
    let limits = Limits::default().with_max_frame_size(1000);
    let mut conn = Connection::server(limits);
    let frame = client(0x2, &[0; 1001]);
    conn.handle_bytes(&frame[..8]); // header only
    assert_eq!(
        conn.poll_event(),
        Err(ProtocolError::FrameTooLarge {
            len: 1001,
            limit: 1000
        })
    );
    assert_eq!(
        ProtocolError::FrameTooLarge { len: 0, limit: 0 }.close_code(),
        CloseCode::Size
    );
}

/// Fragments that together pass `max_message_size` fail with 1009 at the fragment that
/// crosses it.
#[test]
fn oversized_message_fails_with_1009() {
    let limits = Limits::default().with_max_message_size(10);
    let mut conn = Connection::server(limits);
    conn.handle_bytes(&raw(0x02, true, &[1; 6]));
    conn.handle_bytes(&raw(0x80, true, &[2; 5]));
    assert_eq!(
        events(&mut conn),
        vec![Err(ProtocolError::MessageTooLarge { len: 11, limit: 10 })]
    );
    let frames = server_frames(&output(&mut conn));
    assert_eq!(&frames[0].2[..2], &1009u16.to_be_bytes());
}

/// RFC 6455 §10.4: limits under 126 bytes apply to a whole small frame too, which
/// takes the decoder's fast path when it is within them, through both APIs: the frame
/// limit, and a message limit set below the frame limit.
#[test]
fn small_frames_over_small_limits_fail_with_1009() {
    let message_limit = Limits {
        max_message_size: 10,
        ..Limits::default()
    };
    let cases = [
        (
            Limits::default().with_max_frame_size(10),
            ProtocolError::FrameTooLarge { len: 11, limit: 10 },
        ),
        (
            message_limit,
            ProtocolError::MessageTooLarge { len: 11, limit: 10 },
        ),
    ];
    for (limits, error) in cases {
        for borrowed in [false, true] {
            let mut conn = Connection::server(limits);
            conn.handle_bytes(&[client(0x2, &[1; 10]), client(0x1, b"0123456789a")].concat());
            let got = if borrowed {
                events_ref(&mut conn)
            } else {
                events(&mut conn)
            };
            assert_eq!(
                got,
                vec![Ok(Event::Binary(Bytes::from_static(&[1; 10]))), Err(error)],
                "borrowed {borrowed}"
            );
            let frames = server_frames(&output(&mut conn));
            assert_eq!(&frames[0].2[..2], &1009u16.to_be_bytes());
        }
    }
}

/// The default message limit of the server is 1 MiB.
#[test]
fn default_message_limit_is_one_mebibyte() {
    assert_eq!(Limits::default().max_message_size, 1 << 20);
    let mut conn = server();
    conn.handle_bytes(&client(0x2, &vec![0; (1 << 20) + 1])[..14]);
    assert!(matches!(
        conn.poll_event(),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}

// ---- close -----------------------------------------------------------------------------

/// RFC 6455 §5.5.1: a Close is answered with a Close echoing its code; the connection is
/// then closed and reads nothing more.
#[test]
fn peer_close_is_echoed_and_ends_the_connection() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    let mut conn = server();
    conn.handle_bytes(&client(0x8, &payload));
    conn.handle_bytes(&client(0x1, b"after close"));
    assert_eq!(
        events(&mut conn),
        vec![Ok(Event::Close(Some(CloseFrame::new(
            CloseCode::Normal,
            "bye"
        ))))]
    );
    assert!(conn.is_closed());
    assert_eq!(
        server_frames(&output(&mut conn)),
        vec![(OpCode::Close, true, vec![0x03, 0xE8])]
    );
    assert_eq!(conn.send_text("x"), Err(SendError::Closed));
}

/// RFC 6455 §5.5.1: an empty Close carries no code; it is reported as `None` (1005) and
/// answered with an empty Close.
#[test]
fn empty_close_is_answered_with_empty_close() {
    let mut conn = server();
    conn.handle_bytes(&client(0x8, b""));
    assert_eq!(events(&mut conn), vec![Ok(Event::Close(None))]);
    assert_eq!(
        server_frames(&output(&mut conn)),
        vec![(OpCode::Close, true, vec![])]
    );
}

/// RFC 6455 §5.5.1: a close payload of one byte is invalid.
#[test]
fn close_payload_of_one_byte_fails_with_1002() {
    assert_fails(&client(0x8, &[0x03]), ProtocolError::CloseLengthOne, 1002);
}

/// RFC 6455 §7.4: codes that may not be sent (1005, 1006, 1015, reserved, < 1000, ≥ 5000)
/// fail with 1002.
#[test]
fn invalid_close_codes_fail_with_1002() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
        assert_fails(
            &client(0x8, &code.to_be_bytes()),
            ProtocolError::InvalidCloseCode(code),
            1002,
        );
    }
    for code in [1000u16, 1003, 1011, 1012, 1013, 3000, 4999] {
        let mut conn = server();
        conn.handle_bytes(&client(0x8, &code.to_be_bytes()));
        assert!(
            matches!(conn.poll_event(), Ok(Some(Event::Close(Some(_))))),
            "{code}"
        );
    }
}

/// RFC 6455 §5.5.1: the close reason must be UTF-8.
#[test]
fn invalid_close_reason_fails_with_1007() {
    assert_fails(
        &client(0x8, &[0x03, 0xE8, 0xff]),
        ProtocolError::InvalidCloseReason,
        1007,
    );
}

/// RFC 6455 §7.1.2: the closing handshake started by us: CloseSent until the peer's
/// Close arrives, no data frames after ours, Pings still answered, data still read.
#[test]
fn our_close_waits_for_the_peer_close() {
    let mut conn = server();
    conn.close(CloseCode::Away, "shutting down").unwrap();
    assert_eq!(conn.close_state(), CloseState::CloseSent);
    assert_eq!(conn.send_binary(&b"x"[..]), Err(SendError::Closed));
    assert_eq!(conn.close(CloseCode::Normal, ""), Err(SendError::Closed));
    let sent = server_frames(&output(&mut conn));
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0].2[..2], &1001u16.to_be_bytes());
    assert_eq!(&sent[0].2[2..], b"shutting down");

    conn.handle_bytes(&client(0x1, b"in flight"));
    conn.handle_bytes(&client(0x9, b"p"));
    conn.handle_bytes(&client(0x8, &1001u16.to_be_bytes()));
    assert_eq!(
        events(&mut conn),
        vec![
            Ok(Event::Text("in flight".into())),
            Ok(Event::Ping(Bytes::from_static(b"p"))),
            Ok(Event::Close(Some(CloseFrame::new(CloseCode::Away, "")))),
        ]
    );
    assert!(conn.is_closed());
    // RFC 6455 §5.5.2: a Ping is answered until a Close is received; §5.5.1 forbids only
    // data frames after our Close.
    assert_eq!(
        server_frames(&output(&mut conn)),
        vec![(OpCode::Pong, true, b"p".to_vec())],
        "only the Pong follows our Close"
    );
}

/// RFC 6455 §7.4.1: 1005, 1006 and 1015 are never sent.
#[test]
fn unsendable_close_codes_are_refused() {
    let mut conn = server();
    assert_eq!(
        conn.close(CloseCode::Status, ""),
        Err(SendError::UnsendableCloseCode(1005))
    );
    assert_eq!(
        conn.close(CloseCode::Abnormal, ""),
        Err(SendError::UnsendableCloseCode(1006))
    );
    assert_eq!(conn.close_state(), CloseState::Open);
}

/// RFC 6455 §5.5.1: a long close reason is cut to fit a control frame.
#[test]
fn long_close_reason_is_cut_to_fit() {
    let mut conn = server();
    conn.close(CloseCode::Normal, &"x".repeat(500)).unwrap();
    let sent = server_frames(&output(&mut conn));
    assert_eq!(sent[0].2.len(), 125);
}

// ---- output ----------------------------------------------------------------------------

/// RFC 6455 §5.1, §5.4: server frames are unmasked; a configured fragment size splits a
/// message into a first frame and continuations, the last with FIN.
#[test]
fn outgoing_messages_fragment_at_the_configured_size() {
    let mut conn = Connection::server(Limits::default().with_fragment_size(Some(4)));
    conn.send_text("hello world").unwrap();
    conn.send_binary(&b"abcd"[..]).unwrap();
    assert_eq!(
        server_frames(&output(&mut conn)),
        vec![
            (OpCode::Text, false, b"hell".to_vec()),
            (OpCode::Continuation, false, b"o wo".to_vec()),
            (OpCode::Continuation, true, b"rld".to_vec()),
            (OpCode::Binary, true, b"abcd".to_vec()),
        ]
    );
}

/// RFC 6455 §5.3: every client frame is masked, each with a fresh key.
#[test]
fn client_frames_are_masked_with_fresh_keys() {
    let mut conn = Connection::client(Limits::default(), [42; 32]);
    for _ in 0..8 {
        conn.send_text("same payload").unwrap();
    }
    let out = output(&mut conn);
    let mut keys = std::collections::HashSet::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        let (h, n) = FrameHeader::parse(rest).unwrap().unwrap();
        let key = h.mask.expect("client frames are masked");
        keys.insert(key);
        let mut payload = rest[n..n + h.payload_len as usize].to_vec();
        apply_mask(&mut payload, key, 0);
        assert_eq!(payload, b"same payload");
        rest = &rest[n + h.payload_len as usize..];
    }
    assert_eq!(keys.len(), 8);
}

/// Large server payloads are queued without a copy, small ones coalesce into one
/// buffer, and the order of frames is kept.
#[test]
fn output_keeps_order_and_coalesces_small_frames() {
    let mut conn = server();
    let big = Bytes::from(vec![5u8; 4096]);
    conn.send_text("a").unwrap();
    conn.send_text("b").unwrap();
    conn.send_binary(big.clone()).unwrap();
    conn.send_text("c").unwrap();
    assert_eq!(conn.pending_output(), 3 + 3 + 4 + 4096 + 3);
    let mut chunks = Vec::new();
    conn.drain_transmit(&mut chunks);
    assert_eq!(conn.pending_output(), 0);
    // "a" + "b" + the big frame's header, then the big payload itself, then "c".
    assert_eq!(chunks.len(), 3);
    assert_eq!(
        chunks[1].as_ptr(),
        big.as_ptr(),
        "the large payload is not copied"
    );
    let all: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let frames = server_frames(&all);
    assert_eq!(frames.len(), 4);
    assert_eq!(frames[2].2.len(), 4096);
    assert_eq!(frames[3].2, b"c");
}

/// Raw bytes queued first (the 101) go out ahead of frames queued before them, small
/// ones still in the coalescing tail included, and count as pending output.
#[test]
fn raw_bytes_queued_first_precede_earlier_frames() {
    let mut conn = server();
    conn.send_text("early").unwrap();
    conn.send_raw_first(Bytes::from_static(
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ));
    let head_len = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".len();
    assert_eq!(conn.pending_output(), head_len + 2 + 5);
    let out = output(&mut conn);
    assert!(out.starts_with(b"HTTP/1.1 101 "));
    let frames = server_frames(&out[head_len..]);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].2, b"early");
}

/// A caller that writes the queued output itself sees the same bytes as
/// `drain_transmit` gives, and after any partial write the rest is what is left, in
/// order, including a chunk cut in the middle and the small-frame tail.
#[test]
fn transmit_slices_and_partial_advance_keep_the_byte_stream() {
    let queue = || {
        let mut conn = server();
        conn.send_text("a").unwrap();
        conn.send_binary(Bytes::from(vec![5u8; 4096])).unwrap();
        conn.send_frame(Bytes::from_static(b"shared frame"))
            .unwrap();
        conn.send_text("tail").unwrap();
        conn
    };
    let mut drained = Vec::new();
    queue().drain_transmit(&mut drained);
    let expected: Vec<u8> = drained.iter().flat_map(|c| c.iter().copied()).collect();
    for step in [1, 3, 7, 100, 4096, 5000] {
        let mut conn = queue();
        let mut written = Vec::new();
        while conn.pending_output() > 0 {
            let mut slices = [IoSlice::new(&[]); 8];
            let n = conn.transmit_slices(&mut slices);
            let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert_eq!(flat.len(), conn.pending_output());
            let take = step.min(flat.len());
            written.extend_from_slice(&flat[..take]);
            conn.advance_transmit(take);
        }
        assert_eq!(written, expected, "writes of {step} bytes");
        let mut slices = [IoSlice::new(&[]); 2];
        assert_eq!(conn.transmit_slices(&mut slices), 0);
    }
}

/// Control frames sent by the application are limited to 125 bytes (RFC 6455 §5.5).
#[test]
fn long_ping_is_refused() {
    let mut conn = server();
    assert_eq!(
        conn.ping(&[0; 126]),
        Err(SendError::ControlPayloadTooLong(126))
    );
    conn.ping(&[0; 125]).unwrap();
    conn.pong(b"unsolicited").unwrap();
    let frames = server_frames(&output(&mut conn));
    assert_eq!(frames[0].0, OpCode::Ping);
    assert_eq!(frames[1], (OpCode::Pong, true, b"unsolicited".to_vec()));
}

/// `encode_server_frame` produces the bytes a server connection would send.
#[test]
fn encoded_broadcast_frame_matches_connection_output() {
    let mut conn = server();
    conn.send_text("room message").unwrap();
    assert_eq!(
        output(&mut conn),
        encode_server_frame(OpCode::Text, b"room message").to_vec()
    );
}

/// An idle connection can drop its read buffer; received payloads stay valid.
#[test]
fn release_input_buffer_keeps_payloads() {
    let mut conn = server();
    conn.handle_buf(BytesMut::from(&client(0x2, &[3; 64])[..]));
    let Ok(Some(Event::Binary(payload))) = conn.poll_event() else {
        panic!("expected a binary message");
    };
    conn.release_input_buffer();
    assert_eq!(&payload[..], &[3; 64]);
    assert_eq!(conn.pending_input(), 0);
}

/// A slow consumer's backlog can be dropped; a Close queued after it goes out alone.
#[test]
fn discarded_output_leaves_only_later_frames() {
    let mut conn = server();
    conn.send_binary(Bytes::from(vec![1u8; 5000])).unwrap();
    conn.send_text("queued").unwrap();
    conn.discard_output();
    assert_eq!(conn.pending_output(), 0);
    conn.close(CloseCode::Again, "slow consumer").unwrap();
    let frames = server_frames(&output(&mut conn));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(&frames[0].2[..2], &1013u16.to_be_bytes());
}

// ---- control frames first -------------------------------------------------------------

/// Writes `take` bytes of what is queued, as a caller writing the slices would.
fn write_part(conn: &mut Connection, take: usize) -> Vec<u8> {
    let mut slices = [IoSlice::new(&[]); 16];
    let n = conn.transmit_slices(&mut slices);
    let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
    let take = take.min(flat.len());
    conn.advance_transmit(take);
    flat[..take].to_vec()
}

fn opcodes(bytes: &[u8]) -> Vec<OpCode> {
    server_frames(bytes).into_iter().map(|f| f.0).collect()
}

/// A Ping or Pong goes ahead of the data frames queued and not yet begun: a heartbeat
/// is not stuck behind a backlog (RFC 6455 §5.4 lets control frames in anywhere
/// between frames). Among themselves they keep their order.
#[test]
fn pings_and_pongs_go_ahead_of_data_not_yet_begun() {
    let mut conn = server();
    conn.send_text("a").unwrap();
    conn.send_binary(Bytes::from(vec![5u8; 4096])).unwrap();
    conn.send_text("b").unwrap();
    conn.ping(b"1").unwrap();
    conn.pong(b"2").unwrap();
    let frames = server_frames(&output(&mut conn));
    assert_eq!(frames[0], (OpCode::Ping, true, b"1".to_vec()));
    assert_eq!(frames[1], (OpCode::Pong, true, b"2".to_vec()));
    assert_eq!(
        frames[2..].iter().map(|f| f.0).collect::<Vec<_>>(),
        [OpCode::Text, OpCode::Binary, OpCode::Text]
    );
}

/// The Pong that answers a Ping (RFC 6455 §5.5.2) is queued ahead of the data too.
#[test]
fn the_pong_answering_a_ping_overtakes_queued_data() {
    let mut conn = server();
    conn.send_binary(Bytes::from(vec![1u8; 100_000])).unwrap();
    conn.handle_bytes(&client(0x9, b"hb"));
    assert!(matches!(events(&mut conn)[..], [Ok(Event::Ping(_))]));
    let frames = server_frames(&output(&mut conn));
    assert_eq!(frames[0], (OpCode::Pong, true, b"hb".to_vec()));
    assert_eq!(frames[1].0, OpCode::Binary);
}

/// A frame the transport took in part is finished first: a Ping never lands inside
/// it, wherever the write stopped (in the header, in the payload, at the chunk
/// boundary between a large frame's header and payload, inside the coalesced tail).
#[test]
fn a_ping_waits_for_the_frame_written_in_part() {
    let queue = || {
        let mut conn = server();
        conn.send_text("a").unwrap();
        conn.send_binary(Bytes::from(vec![5u8; 4096])).unwrap();
        conn.send_frame(encode_server_frame(OpCode::Text, b"shared"))
            .unwrap();
        conn.send_text("tail one").unwrap();
        conn.send_text("tail two").unwrap();
        conn
    };
    let total = queue().pending_output();
    for cut in 1..total {
        let mut conn = queue();
        let mut wire = write_part(&mut conn, cut);
        conn.ping(b"p").unwrap();
        wire.extend(output(&mut conn));
        let ops = opcodes(&wire);
        assert_eq!(ops.len(), 6, "cut at {cut}");
        let ping = ops.iter().position(|&op| op == OpCode::Ping).unwrap();
        let data: Vec<_> = ops.iter().filter(|&&op| op != OpCode::Ping).collect();
        assert_eq!(data.len(), 5, "cut at {cut}");
        // Right after the frame the cut fell in (or at once, at a frame boundary).
        let begun = frame_rest(&wire, cut).unwrap();
        let frames_before = server_frames(&wire[..cut + begun]).len();
        assert_eq!(ping, frames_before, "cut at {cut}");
    }
}

/// A Close keeps its place behind the data queued before it (RFC 6455 §5.5.1: no data
/// after a Close), and a Ping queued before it still goes first.
#[test]
fn a_close_stays_behind_the_data_queued_before_it() {
    let mut conn = server();
    conn.send_text("last words").unwrap();
    conn.ping(b"").unwrap();
    conn.close(CloseCode::Normal, "bye").unwrap();
    assert_eq!(
        opcodes(&output(&mut conn)),
        [OpCode::Ping, OpCode::Text, OpCode::Close]
    );
}

/// Raw bytes queued first (the 101) stay first, ahead of a Ping queued before them.
#[test]
fn a_ping_never_goes_ahead_of_the_101() {
    let head: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
    let mut conn = server();
    conn.send_text("early").unwrap();
    conn.ping(b"x").unwrap();
    conn.send_raw_first(Bytes::from_static(head));
    conn.ping(b"y").unwrap();
    let out = output(&mut conn);
    assert!(out.starts_with(head));
    let frames = server_frames(&out[head.len()..]);
    assert_eq!(frames[0], (OpCode::Ping, true, b"x".to_vec()));
    assert_eq!(frames[1], (OpCode::Ping, true, b"y".to_vec()));
    assert_eq!(frames[2].0, OpCode::Text);
}

/// The rest of a shared frame the socket took in part goes first; a Pong queued after
/// it goes right behind that frame, ahead of the whole frames after it.
#[test]
fn the_rest_of_a_frame_goes_ahead_of_a_later_pong() {
    let mut frames = encode_server_frame(OpCode::Text, b"first frame").to_vec();
    frames.extend_from_slice(&encode_server_frame(OpCode::Text, b"second"));
    let skip = 5;
    let mut conn = server();
    conn.send_frame_rest(
        Bytes::copy_from_slice(&frames[skip..]),
        frame_rest(&frames, skip).unwrap(),
    );
    conn.pong(b"p").unwrap();
    let mut wire = frames[..skip].to_vec();
    wire.extend(output(&mut conn));
    let got = server_frames(&wire);
    assert_eq!(got[0].2, b"first frame");
    assert_eq!(got[1], (OpCode::Pong, true, b"p".to_vec()));
    assert_eq!(got[2].2, b"second");
}

/// Dropping a slow consumer's backlog keeps the rest of a frame written in part and
/// the Pings queued: the stream stays whole.
#[test]
fn discarding_the_backlog_keeps_the_frame_written_in_part() {
    let mut conn = server();
    conn.send_binary(Bytes::from(vec![1u8; 5000])).unwrap();
    conn.send_text("queued").unwrap();
    let mut wire = write_part(&mut conn, 1000);
    conn.ping(b"p").unwrap();
    conn.discard_output();
    conn.close(CloseCode::Again, "slow consumer").unwrap();
    wire.extend(output(&mut conn));
    assert_eq!(
        opcodes(&wire),
        [OpCode::Binary, OpCode::Ping, OpCode::Close]
    );
}

proptest::proptest! {
    /// Whatever mix of data, shared frames, Pings, partial writes and chunk-by-chunk
    /// takes: the bytes out are whole frames (a Ping never lands inside one), the data
    /// frames in the order queued and the Pings in theirs.
    #[test]
    fn any_mix_of_writes_and_pings_keeps_the_stream_whole(
        ops in proptest::collection::vec((0u8..6, 0usize..6000), 1..40)
    ) {
        let mut conn = server();
        let mut wire = Vec::new();
        let (mut data, mut pings) = (0u32, 0u32);
        for (op, n) in ops {
            match op {
                0 => { conn.send_text(data.to_string()).unwrap(); data += 1; }
                1 => {
                    let mut payload = data.to_string().into_bytes();
                    payload.resize(n.max(8), b' ');
                    conn.send_binary(Bytes::from(payload)).unwrap();
                    data += 1;
                }
                2 => {
                    conn.send_frame(encode_server_frame(OpCode::Text, data.to_string().as_bytes())).unwrap();
                    data += 1;
                }
                3 => { conn.ping(pings.to_string().as_bytes()).unwrap(); pings += 1; }
                4 => wire.extend(write_part(&mut conn, n)),
                _ => if let Some(chunk) = conn.poll_transmit() { wire.extend_from_slice(&chunk) },
            }
        }
        wire.extend(output(&mut conn));
        let frames = server_frames(&wire);
        let texts = |op: OpCode| -> Vec<u32> {
            frames.iter().filter(|f| (f.0 == op) || (op == OpCode::Text && f.0 == OpCode::Binary))
                .map(|f| String::from_utf8_lossy(&f.2).trim_end().parse().unwrap())
                .collect()
        };
        proptest::prop_assert_eq!(texts(OpCode::Text), (0..data).collect::<Vec<_>>());
        proptest::prop_assert_eq!(texts(OpCode::Ping), (0..pings).collect::<Vec<_>>());
        proptest::prop_assert_eq!(conn.pending_output(), 0);
    }
}

/// An idle server connection is small: the client role's generator is boxed.
#[test]
fn server_connection_is_small() {
    assert!(
        std::mem::size_of::<Connection>() <= 256,
        "{}",
        std::mem::size_of::<Connection>()
    );
    // What a server connection with permessage-deflate allocates besides: the codec's
    // few fields, not the client role's generator.
    assert!(
        std::mem::size_of::<super::Rare>() <= 64,
        "{}",
        std::mem::size_of::<super::Rare>()
    );
}

/// A frame encoded once for many connections is queued as is, in order with the
/// frames around it (RFC 6455 §5.2: server frames are unmasked).
#[test]
fn shared_frame_is_queued_in_order_without_copy() {
    let mut conn = server();
    conn.send_text("a").unwrap();
    let shared = encode_server_frame(OpCode::Binary, b"shared");
    conn.send_frame(shared.clone()).unwrap();
    conn.send_text("b").unwrap();
    let mut chunks = Vec::new();
    conn.drain_transmit(&mut chunks);
    assert!(chunks.iter().any(|c| c.as_ptr() == shared.as_ptr()));
    let bytes: Vec<u8> = chunks.concat();
    assert_eq!(
        server_frames(&bytes),
        vec![
            (OpCode::Text, true, b"a".to_vec()),
            (OpCode::Binary, true, b"shared".to_vec()),
            (OpCode::Text, true, b"b".to_vec()),
        ]
    );
    conn.close(CloseCode::Normal, "").unwrap();
    assert_eq!(conn.send_frame(shared), Err(SendError::Closed));
}

// ---- the borrowed API ------------------------------------------------------------------

/// A stream with every kind of event: single-frame text and binary (7-, 16- and 64-bit
/// lengths), a fragmented message with a Ping and a Pong inside, an empty message and a
/// Close, followed by a frame that must be ignored.
fn mixed_stream() -> Vec<u8> {
    let mut stream = client(0x1, "añb€".as_bytes());
    stream.extend(client(0x2, &[5; 300]));
    stream.extend(client(0x2, &vec![6; 70_000]));
    stream.extend(raw(0x01, true, "frag κό".as_bytes()));
    stream.extend(client(0x9, b"ping"));
    stream.extend(raw(0x00, true, "σμε".as_bytes()));
    stream.extend(client(0xA, b"pong"));
    stream.extend(raw(0x80, true, b"ment"));
    stream.extend(client(0x2, b""));
    let mut close = 1001u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"away");
    stream.extend(client(0x8, &close));
    stream.extend(client(0x1, b"after close"));
    stream
}

/// Feeds `stream` in pieces of `chunk` bytes; returns every event and the output.
fn decode_in_chunks(
    stream: &[u8],
    chunk: usize,
    borrowed: bool,
) -> (Vec<Result<Event, ProtocolError>>, Vec<u8>) {
    let mut conn = server();
    let mut got = Vec::new();
    for piece in stream.chunks(chunk) {
        conn.handle_bytes(piece);
        got.extend(if borrowed {
            events_ref(&mut conn)
        } else {
            events(&mut conn)
        });
    }
    (got, output(&mut conn))
}

/// Both APIs share one decoder: the same events and the same replies for any split of
/// the input (RFC 6455 §5.4: fragments; §5.5.2: Pongs; §5.5.1: the Close reply).
#[test]
fn borrowed_events_match_owned_events_for_any_split() {
    let stream = mixed_stream();
    let (expected, sent) = decode_in_chunks(&stream, stream.len(), false);
    assert_eq!(expected.len(), 8, "{expected:?}");
    assert_eq!(expected[0], Ok(Event::Text("añb€".into())));
    assert_eq!(expected[5], Ok(Event::Text("frag κόσμεment".into())));
    for chunk in [1, 2, 3, 7, 64, 1000, 8192, stream.len()] {
        for borrowed in [false, true] {
            let (got, out) = decode_in_chunks(&stream, chunk, borrowed);
            assert!(
                got == expected,
                "chunk {chunk}, borrowed {borrowed}: {got:?}"
            );
            assert_eq!(out, sent, "chunk {chunk}, borrowed {borrowed}");
        }
    }
}

/// The two APIs can be mixed on one connection: a loan ends at the next call of either.
#[test]
fn borrowed_and_owned_calls_mix() {
    let stream = mixed_stream();
    let (expected, _) = decode_in_chunks(&stream, stream.len(), false);
    let mut conn = server();
    conn.handle_bytes(&stream);
    let mut got = Vec::new();
    for i in 0.. {
        let next = if i % 2 == 0 {
            conn.poll_event_ref().map(|e| e.map(|e| e.to_event()))
        } else {
            conn.poll_event()
        };
        match next {
            Ok(Some(event)) => got.push(Ok(event)),
            Ok(None) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got == expected, "{got:?}");
}

/// A borrowed payload lies in the input buffer, unmasked in place; the next read reuses
/// that buffer instead of allocating, and the lent bytes are not counted as pending.
#[test]
fn borrowed_payloads_reuse_the_input_buffer() {
    let mut conn = server();
    let frames = [client(0x2, &[1; 40]), client(0x2, &[2; 40])].concat();
    conn.handle_bytes(&frames);
    let buffer = conn.input.as_ptr() as usize..conn.input.as_ptr() as usize + frames.len();
    let Ok(Some(EventRef::Binary(first))) = conn.poll_event_ref() else {
        panic!("expected a binary message");
    };
    assert_eq!(first, &[1; 40]);
    assert!(buffer.contains(&(first.as_ptr() as usize)));
    assert_eq!(conn.pending_input(), frames.len() / 2);
    assert!(matches!(conn.poll_event_ref(), Ok(Some(EventRef::Binary(p))) if p == [2; 40]));
    assert_eq!(conn.poll_event_ref(), Ok(None));
    assert_eq!(conn.pending_input(), 0);
    conn.handle_bytes(&frames);
    assert_eq!(
        conn.input.as_ptr() as usize,
        buffer.start,
        "input buffer reused"
    );
    assert_eq!(events_ref(&mut conn).len(), 2);
}

/// A message that arrived in pieces is lent from the reassembly buffer and dropped at
/// the next call, so the next message starts afresh (RFC 6455 §5.4).
#[test]
fn borrowed_reassembled_message_is_dropped_at_the_next_call() {
    let mut conn = server();
    conn.handle_bytes(&raw(0x01, true, b"ab"));
    conn.handle_bytes(&raw(0x80, true, b"cd"));
    conn.handle_bytes(&raw(0x02, true, b"x"));
    assert_eq!(conn.poll_event_ref(), Ok(Some(EventRef::Text("abcd"))));
    assert!(conn.lent_message.is_some());
    assert_eq!(conn.poll_event_ref(), Ok(None));
    assert!(conn.lent_message.is_none());
    // The fragment started above is a new message, not a continuation of the old one.
    conn.handle_bytes(&raw(0x80, true, b"y"));
    assert_eq!(conn.poll_event_ref(), Ok(Some(EventRef::Binary(b"xy"))));
}

/// The event copied out of the loan equals what `poll_event` returns.
#[test]
fn event_ref_copies_to_the_owned_event() {
    let close = CloseFrame::new(CloseCode::Normal, "ok");
    let cases = [
        (EventRef::Text("t"), Event::Text("t".into())),
        (
            EventRef::Binary(b"b"),
            Event::Binary(Bytes::from_static(b"b")),
        ),
        (EventRef::Ping(b"i"), Event::Ping(Bytes::from_static(b"i"))),
        (EventRef::Pong(b"o"), Event::Pong(Bytes::from_static(b"o"))),
        (
            EventRef::Close(Some(close.clone())),
            Event::Close(Some(close)),
        ),
        (EventRef::Close(None), Event::Close(None)),
    ];
    for (borrowed, owned) in cases {
        assert_eq!(borrowed.to_event(), owned);
    }
}

// ---- reassembly buffer -----------------------------------------------------------------

/// A frame that arrives in pieces is reserved to its announced length once, so the
/// pieces land in one allocation.
#[test]
fn frame_in_pieces_reserves_its_length() {
    let mut conn = server();
    let frame = client(0x2, &[4; 20_000]);
    conn.handle_bytes(&frame[..1000]);
    assert_eq!(conn.poll_event(), Ok(None));
    let message = conn.message.as_ref().expect("a message in progress");
    assert!(message.payload.capacity() >= 20_000);
    let buffer = message.payload.as_ptr();
    conn.handle_bytes(&frame[1000..]);
    let Ok(Some(Event::Binary(payload))) = conn.poll_event() else {
        panic!("expected the message");
    };
    assert_eq!(payload.as_ptr(), buffer, "no reallocation");
    assert_eq!(payload, vec![4; 20_000]);
}

/// A peer announcing a large frame and sending little makes the buffer grow by at most
/// `RESERVE_AHEAD` past what it sent, not to what it announced.
#[test]
fn announced_length_reserves_a_bounded_step() {
    let mut conn = server();
    let frame = client(0x2, &vec![0; 1 << 20]);
    conn.handle_bytes(&frame[..114]); // 14-byte header, 100 payload bytes
    assert_eq!(conn.poll_event(), Ok(None));
    let message = conn.message.as_ref().expect("a message in progress");
    assert_eq!(message.payload.len(), 100);
    assert!(
        message.payload.capacity() <= 2 * (100 + RESERVE_AHEAD),
        "{}",
        message.payload.capacity()
    );
}

#[test]
fn buffered_message_bytes_counts_a_message_in_pieces_until_it_is_handed_out() {
    let mut conn = server();
    // A whole frame is handed out where it lies: nothing buffered.
    conn.handle_bytes(&client(0x2, b"whole"));
    assert_eq!(events(&mut conn).len(), 1);
    assert_eq!(conn.buffered_message_bytes(), 0);
    // A first fragment, then half of the second.
    conn.handle_bytes(&raw(0x02, true, &[7; 300]));
    assert!(events(&mut conn).is_empty());
    assert_eq!(conn.buffered_message_bytes(), 300);
    let last = raw(0x80, true, &[9; 200]);
    conn.handle_bytes(&last[..100]);
    assert!(events(&mut conn).is_empty());
    // 100 bytes of the second frame: its 8-byte header and 92 of payload.
    assert_eq!(conn.buffered_message_bytes(), 392);
    conn.handle_bytes(&last[100..]);
    assert!(matches!(events(&mut conn)[..], [Ok(Event::Binary(ref b))] if b.len() == 500));
    assert_eq!(conn.buffered_message_bytes(), 0);
}

#[test]
fn buffered_message_bytes_drops_to_zero_when_the_connection_fails() {
    let mut conn = server();
    conn.handle_bytes(&raw(0x02, true, &[7; 300]));
    assert!(events(&mut conn).is_empty());
    assert_eq!(conn.buffered_message_bytes(), 300);
    // A new data frame inside the fragmented message: 1002.
    conn.handle_bytes(&client(0x2, b"x"));
    assert!(matches!(events(&mut conn)[..], [Err(_)]));
    assert_eq!(conn.buffered_message_bytes(), 0);
}

#[test]
fn abort_queues_the_close_drops_the_message_and_reads_nothing_more() {
    let mut conn = server();
    conn.handle_bytes(&raw(0x01, true, b"partial"));
    assert!(events(&mut conn).is_empty());
    assert_eq!(conn.buffered_message_bytes(), 7);
    conn.abort(CloseCode::Again, "busy").unwrap();
    assert!(conn.is_closed());
    assert_eq!(conn.error(), None);
    assert_eq!(conn.buffered_message_bytes(), 0);
    let frames = server_frames(&output(&mut conn));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, OpCode::Close);
    assert_eq!(frames[0].2, b"\x03\xf5busy");
    conn.handle_bytes(&client(0x9, b"ping"));
    assert!(events(&mut conn).is_empty());
    assert!(output(&mut conn).is_empty());
}

#[test]
fn abort_after_our_close_sends_no_second_close() {
    let mut conn = server();
    conn.close(CloseCode::Policy, "rate limit").unwrap();
    conn.abort(CloseCode::Again, "busy").unwrap();
    assert!(conn.is_closed());
    let frames = server_frames(&output(&mut conn));
    assert_eq!(frames.len(), 1);
    assert_eq!(&frames[0].2[..2], &1008u16.to_be_bytes());
    assert!(conn.abort(CloseCode::Status, "").is_err());
}
