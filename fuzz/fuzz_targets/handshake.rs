//! The opening handshake (RFC 6455 §4) on raw bytes, both roles.
//!
//! Input layout: byte 0 chooses how the rest is cut into pieces for [`HeadReader`];
//! the rest is the request (server role) and, as well, a response (client role).
//!
//! Checks: the head fed in pieces gives what one `parse_request` call gives; a parsed
//! request answers every accessor; an accepted upgrade's 101 is accepted by a client
//! that sent the same key, and a refusal's response reaches a client as that status.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringsocket::proto::handshake::{parse_request, write_accept};
use ringsocket::proto::{
    ClientHandshakeError, ClientRequest, HandshakeError, HandshakeLimits, HeadReader, Request,
};

/// The subprotocols the server supports and the clients here offer.
const PROTOCOLS: &[&str] = &["chat", "superchat"];

/// The `Sec-WebSocket-Key` bytes of the fixed client; its 101 response is a seed.
const CLIENT_KEY: [u8; 16] = *b"the sample nonce";

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    // The defaults, and limits small enough for the fuzzer's inputs to go past.
    let mut small = HandshakeLimits::default();
    small.max_head_bytes = 256;
    small.max_headers = 4;
    for limits in [HandshakeLimits::default(), small] {
        let one_shot = parse_request(body, &limits);
        check_pieces(cut, body, &limits, &one_shot);
        match one_shot {
            Ok(Some((request, head_len))) => {
                assert!(head_len <= body.len() && head_len <= limits.max_head_bytes);
                answer(&request, &limits);
            }
            Ok(None) => assert!(body.len() < limits.max_head_bytes),
            Err(error) => refuse(error),
        }
    }

    // The client role: the same bytes as a response to a fixed request.
    let limits = HandshakeLimits::default();
    let mut request = BytesMut::new();
    let client = client_request(PROTOCOLS).encode(CLIENT_KEY, &mut request);
    if let Ok(Some((response, head_len))) = client.parse_response(body, &limits) {
        assert!(head_len <= body.len() && head_len <= limits.max_head_bytes);
        if let Some(protocol) = &response.protocol {
            assert!(PROTOCOLS.contains(&protocol.as_str()));
        }
    }
});

/// Feeds `body` to a [`HeadReader`] in pieces chosen by `cut` and compares the outcome
/// with the one-shot parse. The reader only re-parses at a line end and holds at most
/// the limit, so a malformed head may still be "need more" when no line end followed
/// the bad byte, and a head past the limit may fail as too large instead.
fn check_pieces(
    cut: u8,
    body: &[u8],
    limits: &HandshakeLimits,
    one_shot: &Result<Option<(Request, usize)>, HandshakeError>,
) {
    let mut reader = HeadReader::new(*limits);
    let mut fed = 0;
    let mut sizes = PieceSizes::new(cut);
    let mut outcome = Ok(None);
    while fed < body.len() {
        let end = body.len().min(fed + sizes.next_size());
        outcome = reader.handle_bytes(&body[fed..end]);
        fed = end;
        // Every buffer has a hard cap (STYLE.md §2): the reader holds at most the limit.
        assert!(
            reader.buffered() <= limits.max_head_bytes,
            "HeadReader holds {} bytes, limit {}",
            reader.buffered(),
            limits.max_head_bytes
        );
        if !matches!(outcome, Ok(None)) {
            break;
        }
    }
    match (one_shot, outcome) {
        (Ok(Some((want, head_len))), Ok(Some((got, rest)))) => {
            assert_same_request(want, &got);
            assert_eq!(rest, &body[*head_len..fed]);
        }
        (Ok(None), Ok(None)) => assert_eq!(reader.buffered(), body.len()),
        (Err(want), Err(got)) => {
            if body.len() <= limits.max_head_bytes {
                assert_eq!(*want, got);
            } else {
                assert!(*want == got || matches!(got, HandshakeError::HeadTooLarge { .. }));
            }
        }
        (Err(want), Ok(None)) => {
            // Not re-parsed yet: everything is held, and a line end brings the error.
            assert!(body.len() <= limits.max_head_bytes, "{want:?} missed");
            assert_eq!(reader.buffered(), body.len());
            assert!(reader.handle_bytes(b"\n").is_err(), "{want:?} missed");
        }
        (want, got) => panic!(
            "one-shot {:?} but in pieces {:?}",
            want.as_ref().map(|r| r.as_ref().map(|(_, n)| *n)),
            got.map(|r| r.map(|(_, rest)| rest.len())),
        ),
    }
}

/// Exercises every accessor of a parsed request and writes the server's answer.
fn answer(request: &Request, limits: &HandshakeLimits) {
    let _ = (request.method(), request.path(), request.query());
    let _ = (request.origin(), request.host(), request.is_upgrade());
    assert!(request.headers().count() <= limits.max_headers);
    for (name, value) in request.headers() {
        assert!(request.header_all(name).any(|v| v == value));
    }
    let offered: Vec<&str> = request.protocols().collect();
    let selected = request.select_protocol(PROTOCOLS);
    if let Some(protocol) = selected {
        assert!(offered.contains(&protocol));
    }
    for offer in request.extensions() {
        assert!(!offer.name.is_empty());
    }
    let mut out = BytesMut::new();
    match request.validate_upgrade() {
        Ok(accept) => {
            write_accept(&mut out, &accept, selected, &[]);
            // A client that sent this key and offered PROTOCOLS accepts the 101.
            let key = request.header("sec-websocket-key").unwrap_or_default();
            let key = BASE64.decode(key.trim_ascii()).expect("validated key");
            let key: [u8; 16] = key.try_into().expect("validated key length");
            let mut sent = BytesMut::new();
            let client = client_request(PROTOCOLS).encode(key, &mut sent);
            match client.parse_response(&out, &HandshakeLimits::default()) {
                Ok(Some((response, n))) => {
                    assert_eq!(n, out.len());
                    assert_eq!(response.protocol.as_deref(), selected);
                }
                other => panic!("client refused the server's 101: {other:?}"),
            }
        }
        Err(error) => refuse(error),
    }
}

/// Writes the refusal for `error` and checks that a client reads it as that status.
fn refuse(error: HandshakeError) {
    let mut out = BytesMut::new();
    error.write_response(&mut out);
    let mut sent = BytesMut::new();
    let client = client_request(&[]).encode(CLIENT_KEY, &mut sent);
    match client.parse_response(&out, &HandshakeLimits::default()) {
        Err(ClientHandshakeError::Status(status, _)) => assert_eq!(status, error.status()),
        other => panic!("refusal {error:?} read by the client as {other:?}"),
    }
}

fn client_request<'a>(protocols: &'a [&'a str]) -> ClientRequest<'a> {
    ClientRequest {
        host: "server.example.com",
        target: "/chat",
        protocols,
        headers: &[],
    }
}

fn assert_same_request(want: &Request, got: &Request) {
    assert_eq!(want.method(), got.method());
    assert_eq!(want.path(), got.path());
    assert_eq!(want.query(), got.query());
    assert_eq!(want.minor_version(), got.minor_version());
    assert!(want.headers().eq(got.headers()));
}

/// Piece sizes from one byte: the top two bits pick the largest piece (1, 7, 100 or
/// 4096 bytes), the rest seeds a xorshift that varies the sizes below it.
struct PieceSizes {
    max: usize,
    state: u32,
}

impl PieceSizes {
    fn new(cut: u8) -> Self {
        let max = [1, 7, 100, 4096][usize::from(cut >> 6)];
        Self {
            max,
            state: u32::from(cut & 0x3F).wrapping_mul(0x9E37_79B9) | 1,
        }
    }

    fn next_size(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + self.state as usize % self.max
    }
}
