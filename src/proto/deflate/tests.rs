//! permessage-deflate: negotiation per RFC 7692 rule, the codec, and the connection's
//! handling of RSV1, fragments, limits and corrupt data.

use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::proto::{ClientRequest, HandshakeLimits};
use crate::proto::{CloseCode, Connection, Event, Limits, ProtocolError};

fn offers(header: &str) -> Vec<ExtensionOffer> {
    header
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';').map(str::trim);
            let name = parts.next().filter(|n| !n.is_empty())?.to_owned();
            let params = parts
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.trim().to_owned(), Some(v.trim().to_owned())),
                    None => (p.to_owned(), None),
                })
                .collect();
            Some(ExtensionOffer { name, params })
        })
        .collect()
}

fn agree(header: &str) -> Option<Agreed> {
    negotiate(&offers(header), true)
}

// ---- negotiation (RFC 7692 §5, §7.1) -------------------------------------------------

/// What browsers send: accepted, with `server_no_context_takeover` added (§7.1.1.1: a
/// server may add it to any offer) and the client keeping its context.
#[test]
fn the_browser_offer_is_accepted_with_server_no_context_takeover() {
    let agreed = agree("permessage-deflate; client_max_window_bits").unwrap();
    assert_eq!(
        agreed.response,
        "permessage-deflate; server_no_context_takeover"
    );
    assert!(agreed.params.server_no_context_takeover);
    assert!(!agreed.params.client_no_context_takeover);
    assert_eq!(agreed.params.client_max_window_bits, 15);
    assert_eq!(agreed.window_bytes(), 32 * 1024);
}

/// Without budget for the client's window, the answer makes the client drop its
/// context (§7.1.1.2: a server may add `client_no_context_takeover`).
#[test]
fn no_budget_means_client_no_context_takeover() {
    let agreed = negotiate(&offers("permessage-deflate"), false).unwrap();
    assert_eq!(
        agreed.response,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    assert!(!agreed.client_takeover());
    assert_eq!(agreed.window_bytes(), 0);
}

/// A client that offers `client_no_context_takeover` keeps no context: no window is
/// budgeted, and the answer says so.
#[test]
fn an_offered_client_no_context_takeover_is_confirmed() {
    let agreed = agree("permessage-deflate; client_no_context_takeover").unwrap();
    assert!(agreed.response.contains("; client_no_context_takeover"));
    assert_eq!(agreed.window_bytes(), 0);
}

/// §7.1.2.1: `server_max_window_bits=N` is accepted by answering with it; this end then
/// compresses with that window.
#[test]
fn server_max_window_bits_is_answered_and_used() {
    let agreed = agree("permessage-deflate; server_max_window_bits=10").unwrap();
    assert_eq!(
        agreed.response,
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
    );
    let codec = PerMessageDeflate::new(&agreed.params, Role::Server, 6, 0);
    assert!(!codec.takes_shared_frames());
    let text = "abcdefgh".repeat(200);
    let mut out = Vec::new();
    assert!(codec.compress(text.as_bytes(), &mut out));
}

/// An 8-bit window is honoured by never compressing (zlib cannot make 8-bit raw
/// deflate; RSV1 is per message, so plain messages are always allowed).
#[test]
fn an_eight_bit_window_sends_plain_messages() {
    let agreed = agree("permessage-deflate; server_max_window_bits=8").unwrap();
    let codec = PerMessageDeflate::new(&agreed.params, Role::Server, 6, 0);
    let mut out = Vec::new();
    assert!(!codec.compress("x".repeat(1000).as_bytes(), &mut out));
}

/// §7.1.2.2: `client_max_window_bits=N` bounds the window kept for the client.
#[test]
fn client_max_window_bits_bounds_the_window() {
    let agreed = agree("permessage-deflate; client_max_window_bits=12").unwrap();
    assert_eq!(agreed.params.client_max_window_bits, 12);
    assert_eq!(agreed.window_bytes(), 4096);
}

/// §5.1: an offer with an unknown, repeated or invalid parameter is declined, and the
/// next alternative is taken.
#[test]
fn invalid_offers_are_declined_and_the_next_one_taken() {
    for bad in [
        "permessage-deflate; foo",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover=true",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=08",
        "permessage-deflate; server_max_window_bits=+9",
        "permessage-deflate; client_max_window_bits=0",
        "permessage-deflate; client_max_window_bits=16",
    ] {
        assert_eq!(agree(bad), None, "{bad}");
        let agreed = agree(&format!(
            "{bad}, permessage-deflate; client_max_window_bits=9"
        ));
        assert_eq!(agreed.unwrap().params.client_max_window_bits, 9, "{bad}");
    }
}

/// Other extensions are not ours to answer; no deflate offer, no extension.
#[test]
fn other_extensions_are_ignored() {
    assert_eq!(agree("x-webkit-deflate-frame"), None);
    assert_eq!(agree(""), None);
    let agreed = agree("foo, PerMessage-Deflate").unwrap();
    assert!(agreed.response.starts_with("permessage-deflate"));
}

/// Autobahn 13.7's offers: the first valid alternative wins.
#[test]
fn of_several_alternatives_the_first_is_taken() {
    let agreed = agree(
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=9, \
         permessage-deflate; server_no_context_takeover, permessage-deflate",
    )
    .unwrap();
    assert_eq!(agreed.params.server_max_window_bits, 9);
}

/// The client checks the server's answer (§7.1): defaults, every parameter, and what a
/// response may not carry.
#[test]
fn the_client_checks_the_response() {
    let one = |s: &str| offers(s).remove(0);
    assert_eq!(
        accept_response(&one("permessage-deflate")).unwrap(),
        DeflateParams::default()
    );
    let p = accept_response(&one(
        "permessage-deflate; server_no_context_takeover; client_max_window_bits=10",
    ))
    .unwrap();
    assert!(p.server_no_context_takeover);
    assert_eq!(p.client_max_window_bits, 10);
    assert!(accept_response(&one("permessage-deflate; client_max_window_bits")).is_err());
    assert!(accept_response(&one("permessage-deflate; bogus")).is_err());
    assert!(
        accept_response(&one(
            "permessage-deflate; server_max_window_bits=9; server_max_window_bits=9"
        ))
        .is_err()
    );
}

/// Through the client handshake: an extension not offered fails it (RFC 6455 §4.1);
/// offered, the answer is parsed into `Accepted::deflate`; two answers fail it.
#[test]
fn the_client_handshake_accepts_deflate_only_when_offered() {
    let response = |hs: &crate::proto::ClientHandshake, ext: &str| {
        let mut head = BytesMut::new();
        let accept = hs_accept(hs);
        head.extend_from_slice(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Extensions: {ext}\r\n\r\n"
            )
            .as_bytes(),
        );
        hs.parse_response(&head, &HandshakeLimits::default())
    };
    let mut out = BytesMut::new();
    let plain = ClientRequest {
        host: "h",
        target: "/",
        protocols: &[],
        headers: &[],
    }
    .encode([7; 16], &mut out);
    assert!(response(&plain, "permessage-deflate").is_err());
    let offering = ClientRequest {
        host: "h",
        target: "/",
        protocols: &[],
        headers: &[("Sec-WebSocket-Extensions", client_offer())],
    }
    .encode([7; 16], &mut out);
    let (accepted, _) = response(&offering, "permessage-deflate; server_no_context_takeover")
        .unwrap()
        .unwrap();
    assert!(accepted.deflate.unwrap().server_no_context_takeover);
    assert!(response(&offering, "permessage-deflate, permessage-deflate").is_err());
    assert!(response(&offering, "permessage-deflate; nope").is_err());
}

fn hs_accept(_: &crate::proto::ClientHandshake) -> String {
    crate::proto::AcceptKey::from_key(b"BwcHBwcHBwcHBwcHBwcHBw==")
        .as_str()
        .to_owned()
}

// ---- the codec (§7.2) -----------------------------------------------------------------

fn server_codec() -> PerMessageDeflate {
    PerMessageDeflate::new(&DeflateParams::default(), Role::Server, 6, 0)
}

fn json(n: usize) -> String {
    let mut s = String::from("[");
    for i in 0..n {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"text\":\"hello there\",\"ts\":{}}},",
            i % 7,
            1_700_000_000 + i
        ));
    }
    s.push(']');
    s
}

/// §7.2.1: compressed with a sync flush, the `00 00 ff ff` removed; inflated back.
#[test]
fn a_message_round_trips_without_its_tail() {
    let text = json(50);
    let mut out = Vec::new();
    assert!(server_codec().compress(text.as_bytes(), &mut out));
    assert!(
        out.len() < text.len() / 3,
        "{} -> {}",
        text.len(),
        out.len()
    );
    assert!(!out.ends_with(&TAIL));
    let back = server_codec().inflate(&out, 1 << 20).unwrap();
    assert_eq!(back, text.as_bytes());
}

/// Small and incompressible messages go out plain.
#[test]
fn small_or_incompressible_messages_stay_plain() {
    let codec = PerMessageDeflate::new(&DeflateParams::default(), Role::Server, 6, 256);
    let mut out = Vec::new();
    assert!(!codec.compress(&json(3).as_bytes()[..100], &mut out));
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    assert!(!codec.compress(&noise, &mut out));
    // With `min_bytes` 0 every message is compressed, even when it grows.
    let always = PerMessageDeflate::new(&DeflateParams::default(), Role::Server, 6, 0);
    assert!(always.compress(&noise, &mut out));
    assert!(out.len() >= noise.len());
    assert!(always.compress(b"", &mut out));
    assert_eq!(always.clone().inflate(&out, 10).unwrap(), b"");
}

/// A peer that keeps its context (§7.2.3.2) points back into earlier messages: inflating
/// needs its window, which this end keeps between messages (and only then).
#[test]
fn context_takeover_uses_the_peers_window() {
    // A client that keeps its context: one compressor over both messages.
    let mut client = Compress::new_with_window_bits(Compression::new(6), false, 15);
    let mut message = |text: &[u8]| {
        let mut out = Vec::with_capacity(text.len() + 64);
        client
            .compress_vec(text, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&TAIL));
        out.truncate(out.len() - 4);
        out
    };
    let text = json(20);
    let first = message(text.as_bytes());
    let second = message(text.as_bytes());
    assert!(
        second.len() < first.len() / 4,
        "the second refers back to the first"
    );

    let mut keeps = server_codec();
    assert_eq!(keeps.inflate(&first, 1 << 20).unwrap(), text.as_bytes());
    assert_eq!(keeps.inflate(&second, 1 << 20).unwrap(), text.as_bytes());
    assert!(keeps.window_bytes() >= text.len());

    let no_takeover = DeflateParams {
        client_no_context_takeover: true,
        ..DeflateParams::default()
    };
    let mut forgets = PerMessageDeflate::new(&no_takeover, Role::Server, 6, 0);
    assert_eq!(forgets.inflate(&first, 1 << 20).unwrap(), text.as_bytes());
    assert_eq!(forgets.window_bytes(), 0, "no window without takeover");
    assert!(forgets.inflate(&second, 1 << 20).is_err());
}

/// The window kept is at most 2^client_max_window_bits bytes, however much arrives.
#[test]
fn the_kept_window_is_bounded() {
    let params = DeflateParams {
        client_max_window_bits: 10,
        ..DeflateParams::default()
    };
    let mut codec = PerMessageDeflate::new(&params, Role::Server, 6, 0);
    let mut out = Vec::new();
    for n in [10, 100, 3] {
        assert!(server_codec().compress(json(n).as_bytes(), &mut out));
        codec.inflate(&out, 1 << 20).unwrap();
        assert!(codec.window.len() <= 1024, "{}", codec.window.len());
    }
}

/// A bomb: 16 MiB of zeros compress to a few KiB; inflating stops at the limit.
#[test]
fn inflating_stops_at_the_limit() {
    let zeros = vec![0u8; 16 << 20];
    let mut bomb = Vec::new();
    assert!(server_codec().compress(&zeros, &mut bomb));
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    assert_eq!(
        server_codec().inflate(&bomb, 1 << 20),
        Err(InflateError::TooLarge { limit: 1 << 20 })
    );
    let exact = vec![b'a'; 4096];
    let mut small = Vec::new();
    assert!(server_codec().compress(&exact, &mut small));
    assert_eq!(server_codec().inflate(&small, 4096).unwrap().len(), 4096);
    assert!(server_codec().inflate(&small, 4095).is_err());
}

/// Garbage is refused, not panicked on.
#[test]
fn corrupt_data_is_refused() {
    assert_eq!(
        server_codec().inflate(&[0xff, 0xff, 0xff, 0xff, 0x00], 1 << 20),
        Err(InflateError::Corrupt)
    );
}

/// The shared broadcast frame: RSV1, FIN, the compressed payload; decoded by a client
/// that negotiated deflate.
#[test]
fn the_shared_frame_decodes_in_a_client() {
    let text = json(30);
    let frame = encode_deflated_frame(OpCode::Text, text.as_bytes(), 6, 256).unwrap();
    assert_eq!(frame[0], 0xC1);
    assert!(encode_deflated_frame(OpCode::Text, b"short", 6, 256).is_none());
    let mut client = deflate_client();
    client.handle_bytes(&frame);
    assert_eq!(
        client.poll_event().unwrap(),
        Some(Event::Text(text.as_str().into()))
    );
}

// ---- the connection (RFC 7692 §6) -----------------------------------------------------

fn deflate_server(limits: Limits) -> Connection {
    let mut conn = Connection::server(limits);
    conn.set_deflate(PerMessageDeflate::new(
        &DeflateParams::default(),
        Role::Server,
        6,
        16,
    ));
    conn
}

fn deflate_client() -> Connection {
    let mut conn = Connection::client(Limits::default(), [3; 32]);
    conn.set_deflate(PerMessageDeflate::new(
        &DeflateParams::default(),
        Role::Client,
        6,
        16,
    ));
    conn
}

fn client_with_fragments(fragment: usize) -> Connection {
    let limits = Limits {
        fragment_size: Some(fragment),
        ..Limits::default()
    };
    let mut conn = Connection::client(limits, [5; 32]);
    conn.set_deflate(PerMessageDeflate::new(
        &DeflateParams::default(),
        Role::Client,
        6,
        16,
    ));
    conn
}

fn pipe(from: &mut Connection, to: &mut Connection) {
    while let Some(chunk) = from.poll_transmit() {
        to.handle_bytes(&chunk);
    }
}

fn events(conn: &mut Connection) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Some(event)) = conn.poll_event() {
        out.push(event);
    }
    out
}

/// Both directions: what one end compresses, the other inflates; RSV1 only on data.
#[test]
fn messages_round_trip_between_two_deflate_ends() {
    let mut server = deflate_server(Limits::default());
    let mut client = deflate_client();
    let text = json(40);
    client.send_text(text.as_str()).unwrap();
    client.send_binary(text.clone().into_bytes()).unwrap();
    client.send_text("tiny").unwrap();
    pipe(&mut client, &mut server);
    assert_eq!(
        events(&mut server),
        [
            Event::Text(text.as_str().into()),
            Event::Binary(text.clone().into_bytes().into()),
            Event::Text("tiny".into())
        ]
    );
    server.send_text(text.as_str()).unwrap();
    server.ping(b"p").unwrap();
    let mut wire = Vec::new();
    while let Some(chunk) = server.poll_transmit() {
        wire.extend_from_slice(&chunk);
    }
    // The Ping goes first, uncompressed (RSV1 clear); then the compressed text.
    assert_eq!(wire[0], 0x89);
    assert_eq!(wire[3], 0xC1);
    client.handle_bytes(&wire);
    assert_eq!(
        events(&mut client),
        [
            Event::Ping(b"p"[..].into()),
            Event::Text(text.as_str().into())
        ]
    );
}

/// A compressed message in fragments: RSV1 on the first only, inflated once complete;
/// a control frame between fragments is fine (§6.1, RFC 6455 §5.4).
#[test]
fn fragmented_compressed_messages_are_inflated_whole() {
    let mut client = client_with_fragments(17);
    let mut server = deflate_server(Limits::default());
    let text = json(60);
    client.send_text(text.as_str()).unwrap();
    let mut wire = Vec::new();
    while let Some(chunk) = client.poll_transmit() {
        wire.extend_from_slice(&chunk);
    }
    assert_eq!(wire[0], 0x41, "first fragment: RSV1, no FIN, text");
    // Fed one byte at a time, with a Ping after the first fragment.
    let mut ping = Connection::client(Limits::default(), [9; 32]);
    ping.ping(b"x").unwrap();
    let ping = ping.poll_transmit().unwrap();
    let first_frame = 2 + 4 + 17;
    for b in &wire[..first_frame] {
        server.handle_bytes(&[*b]);
        assert!(events(&mut server).is_empty());
    }
    server.handle_bytes(&ping);
    for b in &wire[first_frame..] {
        server.handle_bytes(&[*b]);
    }
    assert_eq!(
        events(&mut server),
        [
            Event::Ping(b"x"[..].into()),
            Event::Text(text.as_str().into())
        ]
    );
}

fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    let key = [1, 2, 3, 4];
    let mut f = vec![b0];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

fn fails_with(conn: &mut Connection, bytes: &[u8]) -> ProtocolError {
    conn.handle_bytes(bytes);
    loop {
        match conn.poll_event() {
            Err(e) => return e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no error"),
        }
    }
}

/// §6.1: RSV1 on a continuation or a control frame, or without the extension, fails
/// the connection (1002).
#[test]
fn rsv1_where_it_does_not_belong_fails_with_1002() {
    let mut compressed = Vec::new();
    assert!(server_codec().compress(json(5).as_bytes(), &mut compressed));
    let mut plain = Connection::server(Limits::default());
    let e = fails_with(&mut plain, &masked(0xC1, &compressed));
    assert_eq!(e, ProtocolError::ReservedBits(0b100));
    assert_eq!(e.close_code(), CloseCode::Protocol);

    let mut on_ping = deflate_server(Limits::default());
    assert!(matches!(
        fails_with(&mut on_ping, &masked(0xC9, b"")),
        ProtocolError::ReservedBits(_)
    ));
    let mut on_continuation = deflate_server(Limits::default());
    let mut bytes = masked(0x01, b"ab");
    bytes.extend(masked(0xC0, b"cd"));
    assert!(matches!(
        fails_with(&mut on_continuation, &bytes),
        ProtocolError::ReservedBits(_)
    ));
    let mut rsv2 = deflate_server(Limits::default());
    assert!(matches!(
        fails_with(&mut rsv2, &masked(0xA1, b"x")),
        ProtocolError::ReservedBits(_)
    ));
}

/// A message that inflates past `max_message_size` fails with 1009, having cost at most
/// the limit; a corrupt one with 1007; invalid UTF-8 once inflated with 1007.
#[test]
fn bombs_corruption_and_bad_utf8_close_the_connection() {
    let limits = Limits {
        max_message_size: 64 * 1024,
        ..Limits::default()
    };
    let mut bomb = Vec::new();
    assert!(server_codec().compress(&vec![b'a'; 1 << 20], &mut bomb));
    let mut server = deflate_server(limits);
    let e = fails_with(&mut server, &masked(0xC1, &bomb));
    assert!(matches!(e, ProtocolError::MessageTooLarge { .. }), "{e:?}");
    assert_eq!(e.close_code(), CloseCode::Size);

    let mut server = deflate_server(Limits::default());
    let e = fails_with(&mut server, &masked(0xC1, &[0xff; 20]));
    assert_eq!(e, ProtocolError::BadCompressedData);
    assert_eq!(e.close_code(), CloseCode::Invalid);

    let mut bad_utf8 = Vec::new();
    assert!(server_codec().compress(&[0xff; 300], &mut bad_utf8));
    let mut server = deflate_server(Limits::default());
    assert_eq!(
        fails_with(&mut server, &masked(0xC1, &bad_utf8)),
        ProtocolError::InvalidUtf8
    );
    // The same bytes as binary are fine.
    let mut server = deflate_server(Limits::default());
    server.handle_bytes(&masked(0xC2, &bad_utf8));
    assert_eq!(
        server.poll_event().unwrap(),
        Some(Event::Binary(vec![0xff; 300].into()))
    );
}

/// Close frames are never compressed, whatever their size.
#[test]
fn close_frames_are_never_compressed() {
    let mut server = deflate_server(Limits::default());
    server.close(CloseCode::Normal, &"r".repeat(100)).unwrap();
    let wire = server.poll_transmit().unwrap();
    assert_eq!(wire[0], 0x88);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Compress → frame → parse → inflate: any messages (compressible or not, empty
    /// up to 40 KiB), any fragment size, the stream cut anywhere, with or without the
    /// client keeping its context, arrive unchanged in both directions.
    #[test]
    fn deflate_round_trips(
        messages in proptest::collection::vec(
            (0usize..40_000, any::<u64>(), any::<bool>()).prop_map(|(len, seed, text)| {
                // Generated from a seed: a 40 KiB vector of strategies is slow to draw.
                let mut x = seed | 1;
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if text { b"a{\"1"[(x % 4) as usize] } else { (x >> 24) as u8 }
                    })
                    .collect::<Vec<u8>>()
            }),
            1..6,
        ),
        fragment in prop_oneof![Just(None), (1usize..5_000).prop_map(Some)],
        cut in 1usize..3_000,
        level in 0u32..10,
        takeover in any::<bool>(),
    ) {
        let params = DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: !takeover,
            ..DeflateParams::default()
        };
        let limits = Limits {
            fragment_size: fragment,
            ..Limits::default()
        };
        let mut client = Connection::client(limits, [1; 32]);
        client.set_deflate(PerMessageDeflate::new(&params, Role::Client, level, 0));
        let mut server = Connection::server(limits);
        server.set_deflate(PerMessageDeflate::new(&params, Role::Server, level, 0));
        for (from, to) in [(&mut client, &mut server)] {
            for m in &messages {
                from.send_binary(m.clone()).unwrap();
            }
            let mut wire = Vec::new();
            while let Some(chunk) = from.poll_transmit() {
                wire.extend_from_slice(&chunk);
            }
            let mut got = Vec::new();
            for piece in wire.chunks(cut) {
                to.handle_bytes(piece);
                got.extend(events(to));
            }
            let want: Vec<Event> = messages.iter().map(|m| Event::Binary(m.clone().into())).collect();
            prop_assert_eq!(got, want);
        }
        for m in &messages {
            server.send_binary(m.clone()).unwrap();
        }
        let mut wire = Vec::new();
        while let Some(chunk) = server.poll_transmit() {
            wire.extend_from_slice(&chunk);
        }
        let mut got = Vec::new();
        for piece in wire.chunks(cut) {
            client.handle_bytes(piece);
            got.extend(events(&mut client));
        }
        let want: Vec<Event> = messages.iter().map(|m| Event::Binary(m.clone().into())).collect();
        prop_assert_eq!(got, want);
    }
}
