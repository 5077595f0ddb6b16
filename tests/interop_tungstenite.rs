//! Interop with tungstenite, an independent RFC 6455 implementation, without sockets.
//!
//! Both ends run in one thread over [`Duplex`], an in-memory stream: two byte pipes,
//! where a read of an empty pipe returns `WouldBlock` (or end-of-stream once the
//! writer hung up), so tungstenite's non-blocking code paths drive the exchange. Our
//! side is sans-IO: it takes the bytes tungstenite wrote and hands back bytes to write.
//!
//! Covered: frames each way in both roles (RFC 6455 §5), fragmentation with
//! interleaved control frames (§5.4), masking (§5.3), the automatic Pong (§5.5.2) and
//! closing handshake (§5.5.1, §7), and the opening handshake each way (§4), with a
//! subprotocol (§4.2.2 item 5.4) and a refusal (§4.4).

// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use ringsocket::proto::handshake::write_accept;
use ringsocket::proto::{
    ClientRequest, CloseCode, CloseFrame, CloseState, Connection, Event, HandshakeLimits,
    HeadReader, Limits, Message,
};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request as TRequest, Response as TResponse};
use tungstenite::http::{HeaderValue, StatusCode};
use tungstenite::protocol::frame::coding::{CloseCode as TCloseCode, Data, OpCode as TOpCode};
use tungstenite::protocol::frame::{CloseFrame as TCloseFrame, Frame};
use tungstenite::protocol::{Role as TRole, WebSocket, WebSocketConfig};
use tungstenite::{Error as TError, HandshakeError as THandshakeError, Message as TMessage};

// ---- frames: tungstenite → ringsocket -------------------------------------------------

/// RFC 6455 §5.2–§5.7: every frame a tungstenite client sends decodes in our server
/// role to the message it sent, however the bytes are cut into reads (down to one
/// byte): text, binary, empty messages, 200 KiB messages (64-bit lengths), messages
/// fragmented by hand with Ping and Pong frames between the fragments (§5.4) and a UTF-8
/// character split across fragments (§8.1), a Ping, a Pong and a Close with a code and a
/// reason. Our automatic replies, a Pong per Ping (§5.5.2) and the Close echoing the
/// status code (§5.5.1), are then read by tungstenite, which completes its closing
/// handshake (§7.1.2). Both `poll_event` and `poll_event_ref` are checked.
#[test]
fn tungstenite_client_frames_decode_in_our_server_role() {
    tungstenite_frames_decode_in_our_role(TRole::Client);
}

/// The same as [`tungstenite_client_frames_decode_in_our_server_role`] with the roles
/// swapped: unmasked frames from a tungstenite server decode in our client role, and
/// our masked replies (§5.3) are read by tungstenite's server.
#[test]
fn tungstenite_server_frames_decode_in_our_client_role() {
    tungstenite_frames_decode_in_our_role(TRole::Server);
}

fn tungstenite_frames_decode_in_our_role(their_role: TRole) {
    let (their_end, mut our_end) = duplex(usize::MAX);
    let config = WebSocketConfig::default().write_buffer_size(0);
    let mut ws = WebSocket::from_raw_socket(their_end, their_role, Some(config));

    let big_text = unicode_text(200 * 1024);
    let big_binary = pattern(200 * 1024, 1);
    let fragmented_text = "Grüße, κόσμε 𝄞!";
    let ft = fragmented_text.as_bytes();
    // Byte 3 is inside 'ü' (bytes 2..4): the character is split across two frames.
    let (ft_a, ft_b, ft_c) = (&ft[..3], &ft[3..11], &ft[11..]);
    let fragmented_binary = pattern(3 * 70 * 1024, 2);

    ws.send(TMessage::text("hello")).unwrap();
    ws.send(TMessage::binary(vec![0u8, 1, 2, 0xff])).unwrap();
    ws.send(TMessage::text("")).unwrap();
    ws.send(TMessage::binary(Vec::new())).unwrap();
    ws.send(TMessage::text(big_text.clone())).unwrap();
    ws.send(TMessage::binary(big_binary.clone())).unwrap();
    ws.send(TMessage::Ping(Bytes::from_static(b"are you there?")))
        .unwrap();
    // A fragmented text message, with control frames and an empty fragment inside.
    for frame in [
        data_frame(ft_a, Data::Text, false),
        Frame::ping(Bytes::from_static(b"mid-message")),
        data_frame(ft_b, Data::Continue, false),
        data_frame(b"", Data::Continue, false),
        Frame::pong(Bytes::from_static(b"unsolicited")),
        data_frame(ft_c, Data::Continue, true),
    ] {
        ws.write(TMessage::Frame(frame)).unwrap();
    }
    // A fragmented binary message of three 70 KiB fragments, a Ping between two.
    let (fb_a, rest) = fragmented_binary.split_at(70 * 1024);
    let (fb_b, fb_c) = rest.split_at(70 * 1024);
    for frame in [
        data_frame(fb_a, Data::Binary, false),
        data_frame(fb_b, Data::Continue, false),
        Frame::ping(Bytes::from(vec![7u8; 125])),
        data_frame(fb_c, Data::Continue, true),
    ] {
        ws.write(TMessage::Frame(frame)).unwrap();
    }
    ws.flush().unwrap();
    ws.send(TMessage::Pong(Bytes::from_static(b"heartbeat")))
        .unwrap();
    ws.close(Some(TCloseFrame {
        code: TCloseCode::Away,
        reason: "bye, ünïcode".into(),
    }))
    .unwrap();
    let wire = our_end.take_input();

    let expected = vec![
        Event::Text("hello".into()),
        Event::Binary(Bytes::from_static(&[0, 1, 2, 0xff])),
        Event::Text("".into()),
        Event::Binary(Bytes::new()),
        Event::Text(big_text.as_str().into()),
        Event::Binary(big_binary.into()),
        Event::Ping(Bytes::from_static(b"are you there?")),
        Event::Ping(Bytes::from_static(b"mid-message")),
        Event::Pong(Bytes::from_static(b"unsolicited")),
        Event::Text(fragmented_text.into()),
        Event::Ping(Bytes::from(vec![7u8; 125])),
        Event::Binary(fragmented_binary.into()),
        Event::Pong(Bytes::from_static(b"heartbeat")),
        Event::Close(Some(CloseFrame::new(CloseCode::Away, "bye, ünïcode"))),
    ];

    let mut replies: Option<Vec<u8>> = None;
    for chunk in [1, 2, 3, 7, 64, 1000, 4096, 65_536, wire.len()] {
        let mut ours = our_connection(their_role, Limits::default());
        let events = feed(&mut ours, &wire, chunk);
        assert_same_events(&events, &expected, &format!("chunks of {chunk} bytes"));
        assert!(ours.is_closed(), "the peer's Close ends the connection");
        let out = transmit(&mut ours);
        // The borrowed API decodes the same events and queues the same replies (same
        // masking seed in the client role, so even the keys match).
        let mut lent = our_connection(their_role, Limits::default());
        let context = format!("poll_event_ref, chunks of {chunk} bytes");
        assert_same_events(&feed_ref(&mut lent, &wire, chunk), &expected, &context);
        assert_eq!(transmit(&mut lent), out, "{context}");
        if their_role == TRole::Client {
            // Server frames are unmasked: the replies are the same bytes every time.
            if let Some(first) = &replies {
                assert_eq!(first, &out, "chunks of {chunk} bytes");
            }
        }
        replies.get_or_insert(out);
    }

    // Tungstenite reads the three Pongs and our Close reply; the server role (us, or
    // tungstenite) then closes the transport (RFC 6455 §7.1.1).
    our_end.write_all(&replies.unwrap()).unwrap();
    if their_role == TRole::Client {
        our_end.hang_up();
    }
    let (messages, end) = read_until_blocked(&mut ws);
    assert_eq!(
        messages,
        vec![
            TMessage::Pong(Bytes::from_static(b"are you there?")),
            TMessage::Pong(Bytes::from_static(b"mid-message")),
            TMessage::Pong(Bytes::from(vec![7u8; 125])),
            // We echo the status code without the reason (RFC 6455 §5.5.1).
            TMessage::Close(Some(TCloseFrame {
                code: TCloseCode::Away,
                reason: "".into(),
            })),
        ]
    );
    assert_eq!(
        end,
        End::ConnectionClosed,
        "tungstenite completed its close"
    );
}

// ---- frames: ringsocket → tungstenite -------------------------------------------------

/// RFC 6455 §5: what our server role sends, unfragmented or fragmented into frames of
/// at most 7 or 1000 bytes (§5.4), decodes in a tungstenite client to the same
/// messages, however tungstenite's reads are cut; tungstenite's automatic Pong and
/// Close reply then decode in our connection and complete our closing handshake (§7).
#[test]
fn our_server_frames_decode_in_tungstenite_client() {
    for fragment_size in [None, Some(7), Some(1000)] {
        for max_read in [3, usize::MAX] {
            our_frames_decode_in_tungstenite(TRole::Client, fragment_size, max_read);
        }
    }
}

/// As [`our_server_frames_decode_in_tungstenite_client`] with the roles swapped: our
/// client role masks every frame with fresh keys (§5.3) and a tungstenite server
/// unmasks and decodes them.
#[test]
fn our_client_frames_decode_in_tungstenite_server() {
    for fragment_size in [None, Some(7), Some(1000)] {
        for max_read in [3, usize::MAX] {
            our_frames_decode_in_tungstenite(TRole::Server, fragment_size, max_read);
        }
    }
}

fn our_frames_decode_in_tungstenite(
    their_role: TRole,
    fragment_size: Option<usize>,
    max_read: usize,
) {
    let context =
        format!("tungstenite {their_role:?}, fragments {fragment_size:?}, reads of {max_read}");
    let (their_end, mut our_end) = duplex(max_read);
    let mut ws = WebSocket::from_raw_socket(their_end, their_role, None);
    let mut ours = our_connection(
        their_role,
        Limits::default().with_fragment_size(fragment_size),
    );

    let big_text = unicode_text(200 * 1024);
    let big_binary = pattern(200 * 1024, 3);
    ours.send_text("hello").unwrap();
    ours.send_binary(vec![0u8, 1, 2, 0xff]).unwrap();
    ours.send_text("").unwrap();
    ours.send_binary(Bytes::new()).unwrap();
    ours.send(Message::Text(big_text.as_str().into())).unwrap();
    ours.send(Message::Binary(big_binary.clone().into()))
        .unwrap();
    ours.send_text("κόσμε 𝄞 split at 7 bytes").unwrap();
    ours.ping(b"ping?").unwrap();
    ours.pong(b"unsolicited").unwrap();
    ours.close(CloseCode::Library(4321), "done: ünïcode")
        .unwrap();
    assert_eq!(ours.close_state(), CloseState::CloseSent);
    our_end.write_all(&transmit(&mut ours)).unwrap();

    let (messages, end) = read_until_blocked(&mut ws);
    let close = TCloseFrame {
        code: TCloseCode::from(4321),
        reason: "done: ünïcode".into(),
    };
    // The Ping and the Pong were queued before anything was written: they go ahead of
    // the data (a heartbeat is not stuck behind a backlog); the Close keeps its place.
    let expected = vec![
        TMessage::Ping(Bytes::from_static(b"ping?")),
        TMessage::Pong(Bytes::from_static(b"unsolicited")),
        TMessage::text("hello"),
        TMessage::binary(vec![0u8, 1, 2, 0xff]),
        TMessage::text(""),
        TMessage::binary(Vec::new()),
        TMessage::text(big_text),
        TMessage::binary(big_binary),
        TMessage::text("κόσμε 𝄞 split at 7 bytes"),
        TMessage::Close(Some(close.clone())),
    ];
    assert_eq!(messages.len(), expected.len(), "{context}");
    assert!(messages == expected, "{context}: a payload differs");
    // Tungstenite's server closes the transport once it has replied (RFC 6455 §7.1.1);
    // its client waits for us to.
    let expected_end = match their_role {
        TRole::Server => End::ConnectionClosed,
        TRole::Client => End::WouldBlock,
    };
    assert_eq!(end, expected_end, "{context}");

    // Tungstenite's Pong and its Close reply, which echoes code and reason.
    let replies = our_end.take_input();
    let events = feed(&mut ours, &replies, 5);
    assert_eq!(
        events,
        vec![
            Event::Pong(Bytes::from_static(b"ping?")),
            Event::Close(Some(CloseFrame::new(
                CloseCode::Library(4321),
                "done: ünïcode"
            ))),
        ],
        "{context}"
    );
    assert!(ours.is_closed(), "{context}: the closing handshake is over");
    assert_eq!(
        ours.poll_transmit(),
        None,
        "{context}: nothing follows a Close"
    );

    if their_role == TRole::Client {
        our_end.hang_up();
        let (messages, end) = read_until_blocked(&mut ws);
        assert_eq!(
            (messages, end),
            (vec![], End::ConnectionClosed),
            "{context}"
        );
    }
}

// ---- opening handshake ----------------------------------------------------------------

/// RFC 6455 §4.1, §4.2.2: our client's request is accepted by tungstenite's server
/// handshake, fed to it in pieces so that it returns `WouldBlock` and is resumed; its
/// callback sees our path, query, host, extra header and offered subprotocols and picks
/// one in its own order of preference, which our client accepts (§4.2.2 item 5.4). When
/// it picks none, there is no subprotocol. A message then goes each way.
#[test]
fn our_client_handshake_is_accepted_by_tungstenite_server() {
    let cases: [(&[&str], Option<&str>); 3] = [
        (&["chat.v1", "chat.v2"], Some("chat.v2")),
        (&["chat.v1"], Some("chat.v1")),
        (&["other"], None),
    ];
    for (offered, chosen) in cases {
        let (their_end, mut our_end) = duplex(usize::MAX);
        let mut request = BytesMut::new();
        let client_hs = ClientRequest {
            host: "example.com:8080",
            target: "/chat?room=1",
            protocols: offered,
            headers: &[("Origin", "http://example.com")],
        }
        .encode(*b"0123456789abcdef", &mut request);

        let seen: Rc<RefCell<Vec<String>>> = Rc::default();
        let record = Rc::clone(&seen);
        // The error type is tungstenite's `Callback` signature, not ours to shrink.
        #[allow(clippy::result_large_err)]
        let callback =
            move |req: &TRequest, mut resp: TResponse| -> Result<TResponse, ErrorResponse> {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default()
                };
                let offered = header("Sec-WebSocket-Protocol");
                record.borrow_mut().extend([
                    req.uri().path().to_owned(),
                    req.uri().query().unwrap_or("").to_owned(),
                    header("Host"),
                    header("Origin"),
                    offered.clone(),
                ]);
                let offered: Vec<&str> = offered.split(',').map(str::trim).collect();
                if let Some(pick) = ["chat.v2", "chat.v1"]
                    .into_iter()
                    .find(|p| offered.contains(p))
                {
                    resp.headers_mut()
                        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(pick));
                }
                Ok(resp)
            };

        // Feed the request 16 bytes at a time, resuming the handshake after each piece.
        let mut mid = match tungstenite::accept_hdr(their_end, callback) {
            Err(THandshakeError::Interrupted(mid)) => mid,
            other => panic!("tungstenite should wait for the request: {other:?}"),
        };
        let mut pieces = request.chunks(16);
        let mut ws = loop {
            let piece = pieces.next().expect("the handshake ends with the request");
            our_end.write_all(piece).unwrap();
            match mid.handshake() {
                Ok(ws) => break ws,
                Err(THandshakeError::Interrupted(next)) => mid = next,
                Err(THandshakeError::Failure(e)) => panic!("tungstenite refused: {e}"),
            }
        };
        assert!(pieces.next().is_none(), "it completes on the last piece");
        assert_eq!(
            *seen.borrow(),
            [
                "/chat",
                "room=1",
                "example.com:8080",
                "http://example.com",
                &offered.join(", ")
            ]
        );

        // Our client: every strict prefix of the response is incomplete.
        let response = our_end.take_input();
        let limits = HandshakeLimits::default();
        for cut in 0..response.len() {
            assert_eq!(
                client_hs.parse_response(&response[..cut], &limits),
                Ok(None),
                "prefix of {cut} bytes"
            );
        }
        let (accepted, head_len) = client_hs
            .parse_response(&response, &limits)
            .unwrap()
            .unwrap();
        assert_eq!(head_len, response.len());
        assert_eq!(accepted.protocol.as_deref(), chosen, "offered {offered:?}");

        exchange_one_message_each_way(&mut ws, &mut our_end, TRole::Server);
    }
}

/// RFC 6455 §4.1, §4.2.1, §4.2.2: tungstenite's client request for
/// "ws://localhost/chat" is collected by our [`HeadReader`] however it is cut, passes
/// [`Request::validate_upgrade`](ringsocket::proto::Request::validate_upgrade), and our
/// 101 response (with the subprotocol we select from its offer, if it made one)
/// completes tungstenite's handshake. A message then goes each way.
#[test]
fn tungstenite_client_handshake_is_accepted_by_our_server() {
    for offer in [None, Some("chat.v1, chat.v2")] {
        let (their_end, mut our_end) = duplex(usize::MAX);
        let mut request = "ws://localhost/chat".into_client_request().unwrap();
        if let Some(offer) = offer {
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(offer));
        }
        let mid = match tungstenite::client(request, their_end) {
            Err(THandshakeError::Interrupted(mid)) => mid,
            other => panic!("tungstenite should wait for the response: {other:?}"),
        };
        let head = our_end.take_input();

        let mut parsed = None;
        for chunk in [1, 5, 64, head.len()] {
            let mut reader = HeadReader::new(HandshakeLimits::default());
            let mut pieces = head.chunks(chunk).peekable();
            while let Some(piece) = pieces.next() {
                let got = reader.handle_bytes(piece).unwrap();
                if pieces.peek().is_some() {
                    assert!(got.is_none(), "incomplete head, chunks of {chunk}");
                } else {
                    let (request, rest) = got.expect("the head is complete");
                    assert!(rest.is_empty(), "nothing follows tungstenite's head");
                    parsed = Some(request);
                }
            }
        }
        let request = parsed.unwrap();
        assert_eq!(request.method(), "GET");
        assert_eq!(request.path(), "/chat");
        assert_eq!(request.query(), None);
        assert_eq!(request.host(), Some("localhost"));
        assert!(request.is_upgrade());
        let accept = request.validate_upgrade().unwrap();
        let protocol = request.select_protocol(&["chat.v2", "chat.v1"]);
        assert_eq!(protocol, offer.map(|_| "chat.v2"));

        let mut response = BytesMut::new();
        write_accept(
            &mut response,
            &accept,
            protocol,
            &[("X-Served-By", "ringsocket")],
        );
        our_end.write_all(&response).unwrap();
        let (mut ws, response) = mid.handshake().unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap());
        assert_eq!(header("Sec-WebSocket-Protocol"), protocol);
        assert_eq!(header("X-Served-By"), Some("ringsocket"));

        exchange_one_message_each_way(&mut ws, &mut our_end, TRole::Client);
    }
}

/// RFC 6455 §4.4: a request for a version we do not speak is refused with
/// `426 Upgrade Required` and `Sec-WebSocket-Version: 13`; tungstenite's client reports
/// the HTTP response, body included, instead of opening a connection (§4.1).
#[test]
fn our_version_refusal_reaches_tungstenite_client_as_http_error() {
    let (their_end, mut our_end) = duplex(usize::MAX);
    let mut request = "ws://localhost/chat".into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Version", HeaderValue::from_static("8"));
    let mid = match tungstenite::client(request, their_end) {
        Err(THandshakeError::Interrupted(mid)) => mid,
        other => panic!("tungstenite should wait for the response: {other:?}"),
    };
    let head = our_end.take_input();
    let (request, _) = HeadReader::new(HandshakeLimits::default())
        .handle_bytes(&head)
        .unwrap()
        .unwrap();
    let error = request.validate_upgrade().unwrap_err();
    assert_eq!(error.status(), 426);
    let mut response = BytesMut::new();
    error.write_response(&mut response);
    our_end.write_all(&response).unwrap();

    match mid.handshake() {
        Err(THandshakeError::Failure(TError::Http(response))) => {
            assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
            assert_eq!(
                response.headers().get("Sec-WebSocket-Version").unwrap(),
                "13"
            );
            let body = response.body().as_deref().unwrap();
            assert_eq!(body, format!("{}\n", error.reason()).as_bytes());
        }
        other => panic!("expected an HTTP error: {other:?}"),
    }
}

// ---- helpers --------------------------------------------------------------------------

/// After a handshake: our connection (in the role opposite to `their_role`) sends a text
/// message that tungstenite reads, and tungstenite sends a binary message that we read.
fn exchange_one_message_each_way(
    ws: &mut WebSocket<Duplex>,
    our_end: &mut Duplex,
    their_role: TRole,
) {
    let mut ours = our_connection(their_role, Limits::default());
    ours.send_text("hello from ringsocket").unwrap();
    our_end.write_all(&transmit(&mut ours)).unwrap();
    assert_eq!(ws.read().unwrap(), TMessage::text("hello from ringsocket"));

    ws.send(TMessage::binary(&b"hello from tungstenite"[..]))
        .unwrap();
    let events = feed(&mut ours, &our_end.take_input(), usize::MAX);
    assert_eq!(
        events,
        vec![Event::Binary(Bytes::from_static(b"hello from tungstenite"))]
    );
}

/// Our connection in the role opposite to tungstenite's.
fn our_connection(their_role: TRole, limits: Limits) -> Connection {
    match their_role {
        TRole::Client => Connection::server(limits),
        TRole::Server => Connection::client(limits, [0x5a; 32]),
    }
}

/// Hands `wire` to `conn` in pieces of `chunk` bytes, polling after each, and returns
/// every event. A protocol error fails the test.
fn feed(conn: &mut Connection, wire: &[u8], chunk: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        conn.handle_bytes(piece);
        while let Some(event) = conn.poll_event().unwrap() {
            events.push(event);
        }
    }
    events
}

/// [`feed`] through `poll_event_ref`, each borrowed event copied out.
fn feed_ref(conn: &mut Connection, wire: &[u8], chunk: usize) -> Vec<Event> {
    let mut events = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        conn.handle_bytes(piece);
        while let Some(event) = conn.poll_event_ref().unwrap() {
            events.push(event.to_event());
        }
    }
    events
}

/// Everything `conn` has queued for the transport.
fn transmit(conn: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = conn.poll_transmit() {
        out.extend_from_slice(&chunk);
    }
    assert_eq!(conn.pending_output(), 0);
    out
}

/// How a run of tungstenite reads ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The stream had nothing more to read.
    WouldBlock,
    /// Tungstenite considers the connection over.
    ConnectionClosed,
}

/// Reads messages from tungstenite until its stream would block or it closes.
fn read_until_blocked(ws: &mut WebSocket<Duplex>) -> (Vec<TMessage>, End) {
    let mut messages = Vec::new();
    loop {
        match ws.read() {
            Ok(message) => messages.push(message),
            Err(TError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return (messages, End::WouldBlock);
            }
            Err(TError::ConnectionClosed) => return (messages, End::ConnectionClosed),
            Err(e) => panic!("tungstenite failed after {} messages: {e}", messages.len()),
        }
    }
}

/// A raw data frame for tungstenite to send (its client role masks it on the way out).
fn data_frame(payload: &[u8], data: Data, fin: bool) -> Frame {
    Frame::message(Bytes::copy_from_slice(payload), TOpCode::Data(data), fin)
}

/// Compares events, printing a short summary of each when they differ (the payloads
/// are too large to print).
fn assert_same_events(actual: &[Event], expected: &[Event], context: &str) {
    fn summary(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|event| match event {
                Event::Text(t) => format!(
                    "Text({} bytes: {:?}…)",
                    t.len(),
                    t.chars().take(8).collect::<String>()
                ),
                Event::Binary(b) => format!("Binary({} bytes)", b.len()),
                other => format!("{other:?}"),
            })
            .collect()
    }
    assert_eq!(summary(actual), summary(expected), "{context}");
    assert!(actual == expected, "{context}: a payload differs");
}

/// At least `len` bytes of text mixing 1-, 2-, 3- and 4-byte characters.
fn unicode_text(len: usize) -> String {
    let mut text = String::with_capacity(len + 64);
    let mut i = 0u32;
    while text.len() < len {
        text.push_str("ascii ü € 𝄞 κόσμε ");
        text.push_str(&i.to_string());
        i += 1;
    }
    text
}

/// `len` bytes of a pattern that differs per `seed` and has no period of 4 (so a wrong
/// masking key phase shows).
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 ^ seed)
        .collect()
}

/// One direction of the in-memory stream.
#[derive(Clone, Default)]
struct Pipe {
    bytes: Rc<RefCell<VecDeque<u8>>>,
    /// The writer hung up: reads of an empty pipe return end-of-stream.
    closed: Rc<Cell<bool>>,
}

/// One end of an in-memory, non-blocking duplex stream.
struct Duplex {
    rx: Pipe,
    tx: Pipe,
    /// The most bytes one `read` returns, to cut the peer's writes into pieces.
    max_read: usize,
}

/// Two connected ends: tungstenite's (reads of at most `max_read` bytes) and ours.
fn duplex(max_read: usize) -> (Duplex, Duplex) {
    let (a, b) = (Pipe::default(), Pipe::default());
    let theirs = Duplex {
        rx: a.clone(),
        tx: b.clone(),
        max_read,
    };
    let ours = Duplex {
        rx: b,
        tx: a,
        max_read: usize::MAX,
    };
    (theirs, ours)
}

impl Duplex {
    /// Takes everything the other end has written.
    fn take_input(&mut self) -> Vec<u8> {
        self.rx.bytes.borrow_mut().drain(..).collect()
    }

    /// Closes our direction: once drained, the other end reads end-of-stream.
    fn hang_up(&self) {
        self.tx.closed.set(true);
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut bytes = self.rx.bytes.borrow_mut();
        if bytes.is_empty() {
            if self.rx.closed.get() {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(bytes.len()).min(self.max_read);
        for (dst, src) in buf.iter_mut().zip(bytes.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.bytes.borrow_mut().extend(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for Duplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Duplex")
            .field("unread", &self.rx.bytes.borrow().len())
            .field("max_read", &self.max_read)
            .finish()
    }
}
