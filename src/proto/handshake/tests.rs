//! Unit tests of the opening handshake on literal requests and responses.

use super::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request(lines: &[&str]) -> String {
    let mut s = String::from("GET /chat?room=7&x=y HTTP/1.1\r\n");
    for line in lines {
        s.push_str(line);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

fn valid() -> String {
    request(&[
        "Host: server.example.com",
        "Upgrade: websocket",
        "Connection: Upgrade",
        &format!("Sec-WebSocket-Key: {KEY}"),
        "Origin: http://example.com",
        "Sec-WebSocket-Protocol: chat, superchat",
        "Sec-WebSocket-Protocol: v2.json",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits, x-foo; a=\"1\"",
        "Sec-WebSocket-Version: 13",
    ])
}

fn parse(s: &str) -> Request {
    let (req, n) = parse_request(s.as_bytes(), &HandshakeLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(n, s.len());
    req
}

fn rejection(s: &str) -> HandshakeError {
    match parse_request(s.as_bytes(), &HandshakeLimits::default()) {
        Ok(Some((req, _))) => req.validate_upgrade().expect_err("should be refused"),
        Ok(None) => panic!("incomplete"),
        Err(e) => e,
    }
}

/// RFC 6455 §1.3 / §4.2.2: the worked example of the accept key.
#[test]
fn accept_key_matches_the_rfc_example() {
    assert_eq!(
        AcceptKey::from_key(KEY.as_bytes()).as_str(),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

/// RFC 6455 §4.2.1: a valid request is accepted; its parts are exposed.
#[test]
fn valid_request_is_accepted_and_exposed() {
    let req = parse(&valid());
    assert_eq!(req.method(), "GET");
    assert_eq!(req.path(), "/chat");
    assert_eq!(req.query(), Some("room=7&x=y"));
    assert_eq!(req.minor_version(), 1);
    assert_eq!(req.host(), Some("server.example.com"));
    assert_eq!(req.origin(), Some("http://example.com"));
    assert_eq!(req.header_str("sec-websocket-version"), Some("13"));
    assert_eq!(
        req.protocols().collect::<Vec<_>>(),
        ["chat", "superchat", "v2.json"]
    );
    assert_eq!(req.headers().count(), 9);
    let accept = req.validate_upgrade().unwrap();
    assert_eq!(accept.as_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

/// RFC 6455 §4.2.2 item 5.4: the server picks by its own preference among the offers.
#[test]
fn subprotocol_follows_server_preference() {
    let req = parse(&valid());
    assert_eq!(req.select_protocol(&["v2.json", "chat"]), Some("v2.json"));
    assert_eq!(
        req.select_protocol(&["superchat", "chat"]),
        Some("superchat")
    );
    assert_eq!(req.select_protocol(&["mqtt"]), None);
}

/// RFC 6455 §9.1: extension offers with parameters.
#[test]
fn extension_offers_are_parsed() {
    let req = parse(&valid());
    assert_eq!(
        req.extensions(),
        vec![
            ExtensionOffer {
                name: "permessage-deflate".into(),
                params: vec![("client_max_window_bits".into(), None)],
            },
            ExtensionOffer {
                name: "x-foo".into(),
                params: vec![("a".into(), Some("1".into()))]
            },
        ]
    );
}

/// RFC 6455 §4.2.1 items 3-4: tokens are case-insensitive, in comma-separated lists.
#[test]
fn tokens_are_matched_in_lists_case_insensitively() {
    let req = parse(&request(&[
        "Host: h",
        "Upgrade: h2c, WebSocket",
        "Connection: keep-alive, UPGRADE",
        &format!("Sec-WebSocket-Key: {KEY}"),
        "Sec-WebSocket-Version: 13",
    ]));
    assert!(req.validate_upgrade().is_ok());
}

/// RFC 9110 §5.1: field names are case-insensitive, whatever case the client sends.
#[test]
fn header_names_are_matched_case_insensitively() {
    let req = parse(&request(&[
        "HOST: h",
        "upgrade: websocket",
        "CONNECTION: Upgrade",
        &format!("sec-websocket-KEY: {KEY}"),
        "SEC-WEBSOCKET-VERSION: 13",
        "OrIgIn: https://example.com",
    ]));
    assert!(req.validate_upgrade().is_ok());
    assert_eq!(req.origin(), Some("https://example.com"));
    assert_eq!(req.header("Sec-WebSocket-Key"), Some(KEY.as_bytes()));
    assert_eq!(req.header_all("host").count(), 1);
    assert_eq!(req.header("sec-websocket-keys"), None);
}

/// The head may arrive a byte at a time; what follows it (a first frame) is returned.
#[test]
fn head_reader_accepts_bytes_one_at_a_time_and_returns_the_rest() {
    let mut stream = valid().into_bytes();
    stream.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
    let mut reader = HeadReader::new(HandshakeLimits::default());
    let mut done = None;
    for (i, byte) in stream.iter().enumerate() {
        match reader.handle_bytes(std::slice::from_ref(byte)).unwrap() {
            Some(found) => {
                done = Some((i, found));
                break;
            }
            None => continue,
        }
    }
    let (i, (req, rest)) = done.expect("head completes");
    assert_eq!(i, valid().len() - 1);
    assert_eq!(req.path(), "/chat");
    assert!(rest.is_empty());
    // In one piece, the frame behind the head comes back.
    let mut reader = HeadReader::new(HandshakeLimits::default());
    let (_, rest) = reader.handle_bytes(&stream).unwrap().unwrap();
    assert_eq!(&rest[..], &[0x81, 0x80, 1, 2, 3, 4]);
}

/// RFC 6455 §4.1: the method must be GET.
#[test]
fn non_get_is_refused_with_405() {
    let s = valid().replacen("GET", "POST", 1);
    let e = rejection(&s);
    assert_eq!((e, e.status()), (HandshakeError::MethodNotGet, 405));
    let mut out = BytesMut::new();
    e.write_response(&mut out);
    assert!(out.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(out.windows(12).any(|w| w == b"Allow: GET\r\n"));
}

/// RFC 6455 §4.1: HTTP/1.1 or later.
#[test]
fn http_1_0_is_refused_with_400() {
    let e = rejection(&valid().replacen("HTTP/1.1", "HTTP/1.0", 1));
    assert_eq!((e, e.status()), (HandshakeError::HttpVersion, 400));
}

/// RFC 6455 §4.1 item 4: exactly one Host.
#[test]
fn missing_or_repeated_host_is_refused_with_400() {
    let e = rejection(&valid().replace("Host: server.example.com\r\n", ""));
    assert_eq!((e, e.status()), (HandshakeError::Host, 400));
    let e = rejection(&valid().replace("Host: server.example.com\r\n", "Host: a\r\nHost: b\r\n"));
    assert_eq!(e, HandshakeError::Host);
}

/// RFC 6455 §4.2.1 item 3: `Upgrade: websocket`.
#[test]
fn missing_upgrade_token_is_refused_with_400() {
    let e = rejection(&valid().replace("Upgrade: websocket", "Upgrade: h2c"));
    assert_eq!((e, e.status()), (HandshakeError::UpgradeToken, 400));
}

/// RFC 6455 §4.2.1 item 4: `Connection: Upgrade`.
#[test]
fn missing_connection_token_is_refused_with_400() {
    let e = rejection(&valid().replace("Connection: Upgrade", "Connection: keep-alive"));
    assert_eq!((e, e.status()), (HandshakeError::ConnectionToken, 400));
}

/// RFC 6455 §4.2.1 item 5: the key is base64 of exactly 16 bytes, sent once.
#[test]
fn bad_keys_are_refused_with_400() {
    for bad in [
        "not base64!",
        "AAAAAAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAAAAAAAAA==AA",
        "AAAAAAAAAAAAAAAAAAAAAAA=",
        "AAAAAAAAAAAAAAAAAAAAAA=!",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "",
    ] {
        let e = rejection(&valid().replace(KEY, bad));
        assert_eq!((e, e.status()), (HandshakeError::Key, 400), "key {bad:?}");
    }
    let twice = valid().replace(
        &format!("Sec-WebSocket-Key: {KEY}"),
        &format!("Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}"),
    );
    assert_eq!(rejection(&twice), HandshakeError::Key);
}

/// RFC 6455 §4.2.1 item 6 and §4.4: a version other than 13 gets 426 and the version
/// we speak.
#[test]
fn unsupported_version_is_refused_with_426() {
    let e = rejection(&valid().replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"));
    assert_eq!((e, e.status()), (HandshakeError::UnsupportedVersion, 426));
    let mut out = BytesMut::new();
    e.write_response(&mut out);
    let text = std::str::from_utf8(&out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
    let e = rejection(&valid().replace("Sec-WebSocket-Version: 13\r\n", ""));
    assert_eq!((e, e.status()), (HandshakeError::MissingVersion, 400));
}

/// A head over the byte limit is refused with 431, whether whole or in pieces.
#[test]
fn oversized_head_is_refused_with_431() {
    let limits = HandshakeLimits::default();
    let big = request(&["Host: h", &format!("X-Pad: {}", "a".repeat(9000))]);
    let e = parse_request(big.as_bytes(), &limits).unwrap_err();
    assert_eq!(
        (e, e.status()),
        (HandshakeError::HeadTooLarge { limit: 8192 }, 431)
    );
    // A partial head already at the limit, with no end in sight.
    let e = parse_request(&big.as_bytes()[..8192], &limits).unwrap_err();
    assert_eq!(e.status(), 431);
    // In pieces, the reader never holds more than the limit.
    let mut reader = HeadReader::new(limits);
    let mut result = Ok(None);
    for piece in big.as_bytes().chunks(100) {
        result = reader.handle_bytes(piece);
        assert!(reader.buffered() <= 8192);
        if !matches!(result, Ok(None)) {
            break;
        }
    }
    assert_eq!(result.map(|_| ()).unwrap_err().status(), 431);
}

/// More header fields than the limit are refused with 431.
#[test]
fn too_many_headers_are_refused_with_431() {
    let lines: Vec<String> = (0..65).map(|i| format!("X-H{i}: v")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let e = parse_request(request(&refs).as_bytes(), &HandshakeLimits::default()).unwrap_err();
    assert_eq!(
        (e, e.status()),
        (HandshakeError::TooManyHeaders { limit: 64 }, 431)
    );
}

/// Malformed HTTP gets 400 with a one-line reason in the body.
#[test]
fn malformed_head_is_refused_with_400_and_a_reason() {
    let e = parse_request(
        b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",
        &HandshakeLimits::default(),
    )
    .unwrap_err();
    assert_eq!(e.status(), 400);
    let mut out = BytesMut::new();
    e.write_response(&mut out);
    let text = std::str::from_utf8(&out).unwrap();
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("Connection: close\r\n"));
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(body, "invalid header name\n");
    assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
}

/// RFC 6455 §4.2.2: the 101 response carries the accept key and the chosen protocol.
#[test]
fn accept_response_is_well_formed() {
    let req = parse(&valid());
    let accept = req.validate_upgrade().unwrap();
    let mut out = BytesMut::new();
    write_accept(
        &mut out,
        &accept,
        req.select_protocol(&["chat"]),
        &[("X-Served-By", "rs")],
    );
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\
         X-Served-By: rs\r\n\r\n"
    );
}

// ---- client role ------------------------------------------------------------------------

fn client_handshake(protocols: &[&str]) -> (ClientHandshake, BytesMut) {
    let mut out = BytesMut::new();
    let hs = ClientRequest {
        host: "localhost:9001",
        target: "/ws/room?x=1",
        protocols,
        headers: &[("Origin", "http://localhost")],
    }
    .encode([0x11; 16], &mut out);
    (hs, out)
}

/// RFC 6455 §4.1: the client request is a valid upgrade that our server accepts.
#[test]
fn client_request_is_accepted_by_our_server() {
    let (_, out) = client_handshake(&["chat"]);
    let req = parse(std::str::from_utf8(&out).unwrap());
    assert_eq!((req.path(), req.query()), ("/ws/room", Some("x=1")));
    assert_eq!(req.origin(), Some("http://localhost"));
    assert!(req.validate_upgrade().is_ok());
}

fn server_answer(out: &BytesMut, protocol: Option<&str>) -> BytesMut {
    let req = parse(std::str::from_utf8(out).unwrap());
    let mut answer = BytesMut::new();
    write_accept(&mut answer, &req.validate_upgrade().unwrap(), protocol, &[]);
    answer
}

/// RFC 6455 §4.1: a correct 101 completes the client handshake; partial is "need more";
/// bytes after the head are left for the frame decoder.
#[test]
fn client_accepts_a_correct_response() {
    let (hs, out) = client_handshake(&["chat", "v2"]);
    let mut answer = server_answer(&out, Some("v2"));
    let limits = HandshakeLimits::default();
    assert_eq!(
        hs.parse_response(&answer[..answer.len() - 1], &limits),
        Ok(None)
    );
    let head_len = answer.len();
    answer.extend_from_slice(&[0x81, 0x00]);
    let (res, n) = hs.parse_response(&answer, &limits).unwrap().unwrap();
    assert_eq!(n, head_len);
    assert_eq!(res.protocol.as_deref(), Some("v2"));
}

/// RFC 6455 §4.1: anything but 101 is a refusal, reported with its status.
#[test]
fn client_reports_a_refusal_status() {
    let (hs, _) = client_handshake(&[]);
    let mut answer = BytesMut::new();
    HandshakeError::UnsupportedVersion.write_response(&mut answer);
    assert_eq!(
        hs.parse_response(&answer, &HandshakeLimits::default()),
        Err(ClientHandshakeError::Status(426, "Upgrade Required".into()))
    );
}

/// RFC 6455 §4.1 item 4: a wrong accept key fails the handshake.
#[test]
fn client_refuses_a_wrong_accept_key() {
    let (hs, out) = client_handshake(&[]);
    let answer = server_answer(&out, None);
    let text = std::str::from_utf8(&answer).unwrap();
    let accept = text.split("Sec-WebSocket-Accept: ").nth(1).unwrap()[..28].to_owned();
    let wrong = text.replace(&accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(
        hs.parse_response(wrong.as_bytes(), &HandshakeLimits::default()),
        Err(ClientHandshakeError::AcceptKey)
    );
}

/// RFC 6455 §4.1 items 6-7: a protocol or extension that was not offered fails.
#[test]
fn client_refuses_unoffered_protocol_and_extension() {
    let (hs, out) = client_handshake(&["chat"]);
    let answer = server_answer(&out, Some("mqtt"));
    assert_eq!(
        hs.parse_response(&answer, &HandshakeLimits::default()),
        Err(ClientHandshakeError::Protocol("mqtt".into()))
    );
    let answer = server_answer(&out, None);
    let with_ext = std::str::from_utf8(&answer).unwrap().replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    );
    assert_eq!(
        hs.parse_response(with_ext.as_bytes(), &HandshakeLimits::default()),
        Err(ClientHandshakeError::Extension("permessage-deflate".into()))
    );
}

/// RFC 6455 §4.1 items 2-3: Upgrade and Connection tokens in the response.
#[test]
fn client_refuses_missing_tokens() {
    let (hs, out) = client_handshake(&[]);
    let answer = String::from_utf8(server_answer(&out, None).to_vec()).unwrap();
    let no_upgrade = answer.replace("Upgrade: websocket\r\n", "");
    assert_eq!(
        hs.parse_response(no_upgrade.as_bytes(), &HandshakeLimits::default()),
        Err(ClientHandshakeError::UpgradeToken)
    );
    let no_conn = answer.replace("Connection: Upgrade\r\n", "");
    assert_eq!(
        hs.parse_response(no_conn.as_bytes(), &HandshakeLimits::default()),
        Err(ClientHandshakeError::ConnectionToken)
    );
}

/// A head fed a byte at a time without a line end is refused at the limit, and the
/// reader never holds more than the limit (found by the proptest in
/// tests/roundtrip_prop.rs).
#[test]
fn head_without_line_end_is_refused_at_the_limit() {
    let limits = HandshakeLimits {
        max_head_bytes: 64,
        ..HandshakeLimits::default()
    };
    let mut reader = HeadReader::new(limits);
    let mut refused = None;
    for i in 0..1000 {
        match reader.handle_bytes(b"a") {
            Ok(None) => assert!(reader.buffered() <= 64),
            Ok(Some(_)) => panic!("no head here"),
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, error) = refused.expect("refused");
    assert_eq!(at, 63);
    assert_eq!(error, HandshakeError::HeadTooLarge { limit: 64 });
}

/// Once upgraded, a connection keeps every field but the four the handshake consumed,
/// in order and with their raw values, in a smaller head.
#[test]
fn the_upgraded_request_drops_only_the_consumed_fields() {
    let req = parse(&valid());
    let before = req.head.len();
    let kept = req.clone().into_upgraded();
    assert_eq!(kept.method(), "GET");
    assert_eq!(kept.path(), "/chat");
    assert_eq!(kept.query(), Some("room=7&x=y"));
    assert_eq!(kept.minor_version(), 1);
    let names: Vec<&str> = kept.headers().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "Host",
            "Origin",
            "Sec-WebSocket-Protocol",
            "Sec-WebSocket-Protocol",
            "Sec-WebSocket-Extensions"
        ]
    );
    for (name, value) in req.headers() {
        let dropped = [
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
        ]
        .contains(&name);
        assert_eq!(kept.header(name).is_none(), dropped, "{name}");
        if !dropped {
            assert!(kept.header_all(name).any(|v| v == value), "{name}");
        }
    }
    assert_eq!(kept.origin(), Some("http://example.com"));
    assert_eq!(kept.select_protocol(&["v2.json"]), Some("v2.json"));
    assert_eq!(kept.extensions(), req.extensions());
    assert!(
        kept.head.len() + 80 < before,
        "{} of {before}",
        kept.head.len()
    );
}

/// Fields without the optional whitespace, or with no consumed field at all, come out
/// whole too.
#[test]
fn the_upgraded_request_keeps_tight_and_untouched_heads() {
    let tight = parse("GET / HTTP/1.1\r\nHost:h\r\nupgrade:websocket\r\nX-A:\r\n\r\n");
    let kept = tight.into_upgraded();
    assert_eq!(kept.path(), "/");
    assert_eq!(kept.query(), None);
    assert_eq!(kept.host(), Some("h"));
    assert_eq!(kept.header("x-a"), Some(&b""[..]));
    assert_eq!(kept.header("upgrade"), None);
    let plain = parse("GET /p?q HTTP/1.1\r\nHost: h\r\n\r\n");
    let same = plain.clone().into_upgraded();
    assert_eq!(same.head, plain.head);
}
