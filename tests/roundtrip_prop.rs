//! Property tests of the connection state machine, both roles against each other: what
//! one end sends, the other end decodes unchanged, whatever the message sizes, the
//! fragmentation and the way the byte stream is cut into reads; and the closing
//! handshake carries its status code and reason and ends the connection. Also the
//! opening handshake's request head, however it is cut, and its size limit.

// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

use std::fmt;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use ringsocket::proto::handshake::write_accept;
use ringsocket::proto::{
    ClientRequest, CloseCode, CloseFrame, CloseState, Connection, Event, HandshakeError,
    HandshakeLimits, HeadReader, Limits, ProtocolError, Role, SendError,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// RFC 6455 §5.1–§5.4, §5.6, §5.3: any sequence of text (any Unicode, empty
    /// included), binary (empty up to 70 KiB: 7-, 16- and 64-bit lengths, §5.2), Ping
    /// and Pong messages sent by our client role, unfragmented or fragmented at any size
    /// (§5.4), decodes in our server role to the same messages however the stream is
    /// cut (Pings and Pongs ahead of the data queued before them: §5.4 lets control
    /// frames in between fragments); the server's automatic Pongs (§5.5.2) decode in
    /// the client in order.
    #[test]
    fn client_messages_decode_unchanged_in_server(
        messages in messages(),
        fragment_size in fragment_size(),
        chunks in chunks(),
        seed in any::<[u8; 32]>(),
    ) {
        round_trip(Role::Client, &messages, fragment_size, &chunks, seed)?;
    }

    /// The same property from our server role to our client role (§5.1: unmasked
    /// frames; large payloads are queued without a copy).
    #[test]
    fn server_messages_decode_unchanged_in_client(
        messages in messages(),
        fragment_size in fragment_size(),
        chunks in chunks(),
        seed in any::<[u8; 32]>(),
    ) {
        round_trip(Role::Server, &messages, fragment_size, &chunks, seed)?;
    }

    /// RFC 6455 §5.5.1, §7.1.2, §7.4: a Close with any sendable status code and any
    /// reason (cut to 123 bytes on a character boundary) arrives intact after the
    /// messages sent before it; the receiver's reply echoing the code is queued behind
    /// its Pongs and completes the sender's closing handshake; neither end sends
    /// anything more, and nothing that follows a Close on the wire is delivered.
    #[test]
    fn close_arrives_intact_is_answered_and_ends_the_stream(
        sender in role(),
        before in vec(small_message(), 0..4),
        code in sendable_code(),
        reason in vec(any::<char>(), 0..70).prop_map(String::from_iter),
        after in vec(small_message(), 0..4),
        chunks in chunks(),
        seed in any::<[u8; 32]>(),
    ) {
        close_round_trip(sender, &before, code, &reason, &after, &chunks, seed)?;
    }
}

proptest! {
    /// RFC 6455 §7.4.1, §7.4.2: codes that may not appear on the wire (1005, 1006, 1015,
    /// reserved and out-of-range codes) are refused, nothing is queued and the connection
    /// stays open.
    #[test]
    fn close_with_unsendable_code_is_refused(
        sender in role(),
        code in any::<u16>().prop_filter("unsendable", |c| !SENDABLE.contains(c) && !(3000..=4999).contains(c)),
    ) {
        let mut conn = endpoint(sender, Limits::default(), [1; 32]);
        prop_assert_eq!(
            conn.close(CloseCode::from(code), "no"),
            Err(SendError::UnsendableCloseCode(code))
        );
        prop_assert_eq!(conn.pending_output(), 0);
        prop_assert_eq!(conn.close_state(), CloseState::Open);
    }
}

proptest! {
    /// RFC 6455 §4.1, §4.2.1, §4.2.2: a request head written by our client, followed by
    /// whatever the client sends next (its first frames), is collected by [`HeadReader`]
    /// however it is cut; it reads back as written, passes `validate_upgrade`, the bytes
    /// after the head come back intact, and our 101 answer is accepted by the client
    /// with the subprotocol the server selected.
    #[test]
    fn request_head_is_collected_however_it_is_cut(
        host in "[a-z][a-z0-9.-]{0,20}(:[0-9]{1,5})?",
        path in "/[a-zA-Z0-9/_.~-]{0,30}",
        query in proptest::option::of("[a-z0-9=&%]{0,20}"),
        offered in vec(
            prop_oneof![
                prop::sample::select(vec!["chat.v1", "chat.v2", "b", "a.1"]).prop_map(String::from),
                "[a-z][a-z0-9.]{0,10}",
            ],
            0..4,
        ),
        key in any::<[u8; 16]>(),
        trailing in (0..20_000usize, any::<u8>()),
        chunks in chunks(),
    ) {
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let offered: Vec<&str> = offered.iter().map(String::as_str).collect();
        let mut wire = BytesMut::new();
        let client = ClientRequest { host: &host, target: &target, protocols: &offered, headers: &[] }
            .encode(key, &mut wire);
        let head_len = wire.len();
        let trailing = Msg::Binary { len: trailing.0, seed: trailing.1 }.bytes();
        wire.extend_from_slice(&trailing);

        let mut reader = HeadReader::new(HandshakeLimits::default());
        let mut rest: &[u8] = &wire;
        let mut cycle = chunks.iter().cycle();
        let (request, after_head) = loop {
            prop_assert!(!rest.is_empty(), "the head never completed");
            let (piece, tail) = rest.split_at(cycle.next().unwrap().len.clamp(1, rest.len()));
            rest = tail;
            if let Some((request, after)) = reader.handle_bytes(piece).unwrap() {
                break (request, [&after[..], rest].concat());
            }
            prop_assert!(reader.buffered() <= head_len, "no complete head yet");
        };
        prop_assert_eq!(&after_head[..], &trailing[..]);
        prop_assert_eq!(request.path(), path.as_str());
        prop_assert_eq!(request.query(), query.as_deref());
        prop_assert_eq!(request.host(), Some(host.as_str()));
        prop_assert_eq!(request.protocols().collect::<Vec<_>>(), offered.clone());
        let accept = request.validate_upgrade().unwrap();

        let supported = ["chat.v2", "b", "a.1"];
        let chosen = request.select_protocol(&supported);
        prop_assert_eq!(chosen, supported.into_iter().find(|p| offered.contains(p)));
        let mut response = BytesMut::new();
        write_accept(&mut response, &accept, chosen, &[]);
        let (response_head, len) = client
            .parse_response(&response, &HandshakeLimits::default())
            .unwrap()
            .unwrap();
        prop_assert_eq!(len, response.len());
        prop_assert_eq!(response_head.protocol.as_deref(), chosen);
    }

    /// STYLE.md rule 2 and `HeadReader`'s contract ("never hold more than the limit,
    /// plus one byte"): a head that does not end within `max_head_bytes` is refused with
    /// 431 however it is cut, and the reader never holds more than the limit plus one
    /// byte. Small pieces make the reader land exactly on the limit.
    #[test]
    fn endless_head_is_refused_at_the_limit_however_it_is_cut(
        max_head_bytes in 32..=600usize,
        request_line in any::<bool>(),
        chunks in vec(1..=3usize, 1..4),
    ) {
        endless_head_is_refused(max_head_bytes, request_line, &chunks)?;
    }
}

/// The smallest case of [`endless_head_is_refused_at_the_limit_however_it_is_cut`]: a
/// head without a line end, one byte at a time, is never refused and its buffer grows
/// without bound (20 000 bytes held against a limit of 8 KiB).
#[test]
fn endless_head_fed_one_byte_at_a_time_is_refused() {
    let max = HandshakeLimits::DEFAULT_MAX_HEAD_BYTES;
    let mut reader = HeadReader::new(HandshakeLimits::default());
    let mut refused = None;
    for fed in 1..=20_000 {
        match reader.handle_bytes(b"a") {
            Ok(None) => assert!(
                reader.buffered() <= max + 1,
                "{} bytes held after {fed} one-byte pieces, limit {max}",
                reader.buffered()
            ),
            Ok(Some(_)) => panic!("no head was sent"),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(refused, Some(HandshakeError::HeadTooLarge { limit: max }));
}

/// The codes of RFC 6455 §7.4.1 and the IANA registry that an endpoint may send; with
/// 3000..=4999 (§7.4.2) they are the sendable set.
const SENDABLE: [u16; 11] = [
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
];

// ---- the properties -------------------------------------------------------------------

fn round_trip(
    sender_role: Role,
    messages: &[Msg],
    fragment_size: Option<usize>,
    chunks: &[Chunk],
    seed: [u8; 32],
) -> Result<(), TestCaseError> {
    let limits = Limits::default().with_fragment_size(fragment_size);
    let mut sender = endpoint(sender_role, limits, seed);
    let mut receiver = endpoint(opposite(sender_role), limits, seed);
    for message in messages {
        message.send(&mut sender);
    }
    let wire = poll_all(&mut sender);

    let events = feed(&mut receiver, &wire, chunks).map_err(fail)?;
    let expected = wire_order(messages);
    assert_same_events(&events, &expected)?;
    prop_assert_eq!(receiver.pending_input(), 0);
    prop_assert_eq!(receiver.close_state(), CloseState::Open);

    // The borrowed API alone decodes the same stream to the same events and replies.
    let mut twin = endpoint(opposite(sender_role), limits, seed);
    let borrowed = all_borrowed(chunks);
    let twin_events = feed(&mut twin, &wire, &borrowed).map_err(fail)?;
    assert_same_events(&twin_events, &expected)?;
    prop_assert_eq!(twin.pending_input(), 0);

    // The receiver answered every Ping with a Pong carrying its payload, in order.
    let replies = drain_all(&mut receiver);
    // Same seed, same frames queued in the same order: the same masking keys too.
    prop_assert!(
        poll_all(&mut twin) == replies,
        "the twin replied differently"
    );
    let pongs = feed(&mut sender, &replies, chunks).map_err(fail)?;
    let expected_pongs: Vec<Event> = messages
        .iter()
        .filter_map(|m| match m {
            Msg::Ping(p) => Some(Event::Pong(Bytes::copy_from_slice(p))),
            _ => None,
        })
        .collect();
    prop_assert_eq!(pongs, expected_pongs);
    Ok(())
}

fn close_round_trip(
    sender_role: Role,
    before: &[Msg],
    code: u16,
    reason: &str,
    after: &[Msg],
    chunks: &[Chunk],
    seed: [u8; 32],
) -> Result<(), TestCaseError> {
    let code = CloseCode::from(code);
    let mut sender = endpoint(sender_role, Limits::default(), seed);
    let mut receiver = endpoint(opposite(sender_role), Limits::default(), seed);
    for message in before {
        message.send(&mut sender);
    }
    prop_assert_eq!(sender.close(code, reason), Ok(()));
    prop_assert_eq!(sender.close_state(), CloseState::CloseSent);
    // RFC 6455 §5.5.1: no data frame, and no second Close, after a Close.
    prop_assert_eq!(sender.send_text("late"), Err(SendError::Closed));
    prop_assert_eq!(sender.ping(b"late"), Err(SendError::Closed));
    prop_assert_eq!(sender.close(CloseCode::Normal, ""), Err(SendError::Closed));
    let mut wire = poll_all(&mut sender);
    // What a misbehaving peer might send after its Close: well-formed frames in the
    // sender's role, which must not be delivered.
    let mut late = endpoint(sender_role, Limits::default(), seed);
    for message in after {
        message.send(&mut late);
    }
    late.close(CloseCode::Away, "again").unwrap();
    wire.extend_from_slice(&poll_all(&mut late));

    let events = feed(&mut receiver, &wire, chunks).map_err(fail)?;
    let sent_close = CloseFrame {
        code,
        reason: truncate(reason, 123).to_owned(),
    };
    let mut expected = wire_order(before);
    expected.push(Event::Close(Some(sent_close)));
    assert_same_events(&events, &expected)?;
    prop_assert!(receiver.is_closed());
    prop_assert_eq!(receiver.error(), None);
    prop_assert!(receiver.pending_output() > 0, "the Close reply is queued");
    prop_assert_eq!(receiver.send_text("after"), Err(SendError::Closed));
    // More input after the Close is ignored.
    receiver.handle_bytes(&wire);
    prop_assert_eq!(receiver.poll_event(), Ok(None));
    prop_assert_eq!(receiver.pending_input(), 0);

    // The receiver's Pongs, then its Close echoing the code, complete the handshake.
    let replies = drain_all(&mut receiver);
    let events = feed(&mut sender, &replies, chunks).map_err(fail)?;
    let mut expected: Vec<Event> = before
        .iter()
        .filter_map(|m| match m {
            Msg::Ping(p) => Some(Event::Pong(Bytes::copy_from_slice(p))),
            _ => None,
        })
        .collect();
    expected.push(Event::Close(Some(CloseFrame {
        code,
        reason: String::new(),
    })));
    prop_assert_eq!(events, expected);
    prop_assert!(sender.is_closed());
    prop_assert_eq!(sender.pending_output(), 0, "a Close reply is not answered");
    prop_assert_eq!(receiver.pending_output(), 0);
    Ok(())
}

/// Feeds the start of a head, a bare `GET /` or a request line and the start of a
/// header field, then `a`s without end, in pieces of `chunks` bytes, up to well past
/// `max_head_bytes`.
fn endless_head_is_refused(
    max_head_bytes: usize,
    request_line: bool,
    chunks: &[usize],
) -> Result<(), TestCaseError> {
    let mut limits = HandshakeLimits::default();
    limits.max_head_bytes = max_head_bytes;
    let start: &[u8] = if request_line {
        b"GET / HTTP/1.1\r\nX-Pad: "
    } else {
        b"GET /"
    };
    let mut wire = start.to_vec();
    wire.resize(max_head_bytes + 64, b'a');
    let mut reader = HeadReader::new(limits);
    let mut rest = &wire[..];
    for &len in chunks.iter().cycle() {
        prop_assert!(
            !rest.is_empty(),
            "never refused; {} bytes held",
            reader.buffered()
        );
        let (piece, tail) = rest.split_at(len.min(rest.len()));
        rest = tail;
        match reader.handle_bytes(piece) {
            Ok(None) => prop_assert!(
                reader.buffered() <= max_head_bytes + 1,
                "{} bytes held, limit {max_head_bytes}",
                reader.buffered()
            ),
            Ok(Some(_)) => return Err(TestCaseError::fail("a head completed")),
            Err(HandshakeError::HeadTooLarge { limit }) => {
                prop_assert_eq!(limit, max_head_bytes);
                return Ok(());
            }
            Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }
    unreachable!("the cycle ends by returning")
}

// ---- strategies -----------------------------------------------------------------------

/// A message to send. Long payloads are described by how they are generated, so that a
/// failing case prints short.
#[derive(Clone)]
enum Msg {
    /// Short text of any characters, empty included.
    Text(String),
    /// Text of at least `min_len` bytes: `alphabet` repeated.
    LongText { alphabet: Vec<char>, min_len: usize },
    /// `len` bytes of a pattern seeded by `seed`.
    Binary { len: usize, seed: u8 },
    /// A Ping with at most 125 bytes (RFC 6455 §5.5).
    Ping(Vec<u8>),
    /// An unsolicited Pong with at most 125 bytes (RFC 6455 §5.5.3).
    Pong(Vec<u8>),
}

fn messages() -> impl Strategy<Value = Vec<Msg>> {
    vec(
        prop_oneof![
            3 => small_message(),
            1 => (vec(any::<char>(), 1..8), length()).prop_map(|(alphabet, min_len)| {
                Msg::LongText { alphabet, min_len }
            }),
            2 => (length(), any::<u8>()).prop_map(|(len, seed)| Msg::Binary { len, seed }),
        ],
        0..8,
    )
}

/// Text, binary, Ping or Pong of at most 125 bytes.
fn small_message() -> impl Strategy<Value = Msg> {
    prop_oneof![
        vec(any::<char>(), 0..40).prop_map(|c| Msg::Text(String::from_iter(c))),
        (0..=125usize, any::<u8>()).prop_map(|(len, seed)| Msg::Binary { len, seed }),
        vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
        vec(any::<u8>(), 0..=125).prop_map(Msg::Pong),
    ]
}

/// A payload length in each of the three encodings of RFC 6455 §5.2, with their edges.
fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        0..=125usize,
        prop::sample::select(vec![125usize, 126, 127, 0xFFFF, 0x1_0000]),
        126..=0xFFFFusize,
        0x1_0000..=70 * 1024usize,
    ]
}

/// No fragmentation, or fragments of any size from one byte up.
fn fragment_size() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![
        Just(None),
        (1..=16usize).prop_map(Some),
        (17..=1024usize).prop_map(Some),
        (1025..=80 * 1024usize).prop_map(Some),
    ]
}

/// How the byte stream is cut into reads: these sizes, in a cycle.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    len: usize,
    /// Handed in with `handle_buf` (taken over without a copy) instead of `handle_bytes`.
    owned: bool,
    /// Its events are taken with `poll_event_ref` (borrowed) instead of `poll_event`.
    borrowed: bool,
}

fn chunks() -> impl Strategy<Value = Vec<Chunk>> {
    let len = prop_oneof![1..=16usize, 1..=1500usize, 1..=100_000usize];
    vec(
        (len, any::<bool>(), any::<bool>()).prop_map(|(len, owned, borrowed)| Chunk {
            len,
            owned,
            borrowed,
        }),
        1..6,
    )
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Client), Just(Role::Server)]
}

/// A close code that may be sent (RFC 6455 §7.4.1, §7.4.2).
fn sendable_code() -> impl Strategy<Value = u16> {
    prop_oneof![prop::sample::select(SENDABLE.to_vec()), 3000..=4999u16]
}

// ---- helpers --------------------------------------------------------------------------

impl Msg {
    fn send(&self, conn: &mut Connection) {
        match self {
            Msg::Text(_) | Msg::LongText { .. } => conn.send_text(self.text()).unwrap(),
            Msg::Binary { .. } => conn.send_binary(self.bytes()).unwrap(),
            Msg::Ping(p) => conn.ping(p).unwrap(),
            Msg::Pong(p) => conn.pong(p).unwrap(),
        }
    }

    /// The event the peer should report.
    fn event(&self) -> Event {
        match self {
            Msg::Text(_) | Msg::LongText { .. } => Event::Text(self.text().into()),
            Msg::Binary { .. } => Event::Binary(self.bytes()),
            Msg::Ping(p) => Event::Ping(Bytes::copy_from_slice(p)),
            Msg::Pong(p) => Event::Pong(Bytes::copy_from_slice(p)),
        }
    }

    fn text(&self) -> String {
        match self {
            Msg::Text(t) => t.clone(),
            Msg::LongText { alphabet, min_len } => {
                let mut text = String::with_capacity(min_len + 4);
                for c in alphabet.iter().cycle() {
                    if text.len() >= *min_len {
                        break;
                    }
                    text.push(*c);
                }
                text
            }
            _ => unreachable!("not text"),
        }
    }

    fn bytes(&self) -> Bytes {
        let Msg::Binary { len, seed } = *self else {
            unreachable!("not binary")
        };
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
            .collect::<Vec<u8>>()
            .into()
    }
}

impl fmt::Debug for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Msg::Text(t) => f.debug_tuple("Text").field(t).finish(),
            Msg::LongText { alphabet, min_len } => f
                .debug_struct("LongText")
                .field("alphabet", &String::from_iter(alphabet))
                .field("min_len", min_len)
                .finish(),
            Msg::Binary { len, seed } => f
                .debug_struct("Binary")
                .field("len", len)
                .field("seed", seed)
                .finish(),
            Msg::Ping(p) => f.debug_tuple("Ping").field(p).finish(),
            Msg::Pong(p) => f.debug_tuple("Pong").field(p).finish(),
        }
    }
}

fn endpoint(role: Role, limits: Limits, seed: [u8; 32]) -> Connection {
    match role {
        Role::Server => Connection::server(limits),
        Role::Client => Connection::client(limits, seed),
    }
}

fn opposite(role: Role) -> Role {
    match role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    }
}

/// Hands `wire` to `conn` cut as `chunks` says (cycling through it), polling every
/// event after each piece with the API the chunk names.
fn feed(conn: &mut Connection, wire: &[u8], chunks: &[Chunk]) -> Result<Vec<Event>, ProtocolError> {
    let mut events = Vec::new();
    let mut rest = wire;
    for chunk in chunks.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at(chunk.len.clamp(1, rest.len()));
        rest = tail;
        if chunk.owned {
            conn.handle_buf(BytesMut::from(piece));
        } else {
            conn.handle_bytes(piece);
        }
        if chunk.borrowed {
            while let Some(event) = conn.poll_event_ref()? {
                events.push(event.to_event());
            }
        } else {
            while let Some(event) = conn.poll_event()? {
                events.push(event);
            }
        }
        conn.release_input_buffer();
    }
    Ok(events)
}

/// `chunks`, with every piece's events taken through `poll_event_ref`.
fn all_borrowed(chunks: &[Chunk]) -> Vec<Chunk> {
    chunks
        .iter()
        .map(|c| Chunk {
            borrowed: true,
            ..*c
        })
        .collect()
}

/// The events `messages` arrive as when all were queued before anything was written:
/// Pings and Pongs go ahead of the data frames not yet begun, each kind in its order.
fn wire_order(messages: &[Msg]) -> Vec<Event> {
    let is_control = |m: &&Msg| matches!(m, Msg::Ping(_) | Msg::Pong(_));
    let controls = messages.iter().filter(is_control);
    let data = messages.iter().filter(|m| !is_control(m));
    controls.chain(data).map(Msg::event).collect()
}

/// Everything queued for the transport, through `poll_transmit`.
fn poll_all(conn: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = conn.poll_transmit() {
        out.extend_from_slice(&chunk);
    }
    out
}

/// Everything queued for the transport, through `drain_transmit`.
fn drain_all(conn: &mut Connection) -> Vec<u8> {
    let mut chunks = Vec::new();
    conn.drain_transmit(&mut chunks);
    chunks.concat()
}

/// Compares events, showing a summary of each when they differ (payloads may be large).
fn assert_same_events(actual: &[Event], expected: &[Event]) -> Result<(), TestCaseError> {
    fn summary(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|event| match event {
                Event::Text(t) if t.len() > 64 => format!("Text({} bytes)", t.len()),
                Event::Binary(b) if b.len() > 64 => format!("Binary({} bytes)", b.len()),
                other => format!("{other:?}"),
            })
            .collect()
    }
    prop_assert_eq!(summary(actual), summary(expected));
    prop_assert!(actual == expected, "a large payload differs");
    Ok(())
}

fn fail(error: ProtocolError) -> TestCaseError {
    TestCaseError::fail(format!("the receiver failed the connection: {error:?}"))
}

/// `s` cut to at most `max` bytes without splitting a character.
fn truncate(s: &str, max: usize) -> &str {
    let end = s
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|&end| end <= max)
        .last()
        .unwrap_or(0);
    &s[..end]
}
