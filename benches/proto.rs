//! Benchmarks of the sans-IO protocol core (`ringsocket::proto`), side by side with
//! tungstenite 0.27 and fastwebsockets 0.10 in the same criterion group, one function per
//! implementation, so one run compares them on the same machine state.
//!
//! Groups:
//! - `unmask/{64B,1KiB,64KiB}`: in-place payload unmasking (bytes/s). `memcpy` of the same
//!   size is the ceiling, `ringsocket_scalar` (the RFC definition) the floor. tungstenite's
//!   `apply_mask` is not public in 0.27 (`mod mask` is private), so it is not measured.
//! - `decode_small_frames`: 1000 client-masked binary frames of 16 and 64 bytes
//!   (frames/s): parse, check, unmask and hand out every payload.
//!
//! In both decode groups `ringsocket` is our fastest API, `Connection::poll_event_ref`
//! (payloads borrowed from the connection's buffers until the next call), and
//! `ringsocket_owned` is `Connection::poll_event` (payloads as owned `Bytes`); the
//! `_8KiB_reads` variants feed the same stream in 8 KiB reads.
//! - `decode_text_16KiB`: 16 masked text frames of 16 KiB, ASCII mixed with 2-, 3- and
//!   4-byte characters (payload bytes/s): the same, plus UTF-8 validation.
//! - `server_handshake`: a ~500-byte browser upgrade request parsed, validated and
//!   answered with a 101 into a reused buffer (ns/op).
//!
//! How the decode comparisons are kept fair:
//! - Every implementation starts each iteration from a fresh connection made in the
//!   untimed setup (`BatchSize::PerIteration`) and returns it from the timed routine, so
//!   neither construction (tungstenite allocates a 128 KiB read buffer) nor drop is timed.
//! - The input is one prebuilt byte stream, borrowed, never cloned. Each implementation
//!   copies it exactly once, inside the timed region, into its own buffer: tungstenite
//!   and fastwebsockets by reading from an in-memory stream ([`ReplayStream`], reads copy
//!   out of the borrowed slice then report `WouldBlock` / EOF, writes are discarded),
//!   ringsocket through `Connection::handle_bytes`. The `_8KiB_reads` variants feed the
//!   same bytes 8 KiB at a time, as a server with a fixed 8 KiB read buffer would, which
//!   also exercises frames split across reads. Buffers the competitors allocate when
//!   their socket is made (tungstenite's 128 KiB read buffer) are allocated in the
//!   untimed setup; ringsocket's input buffer is allocated by the first read, timed.
//! - Each implementation hands out every payload through its fastest public API, which
//!   is `black_box`ed (and dropped, when owned) inside the timed loop: tungstenite an
//!   owned `Bytes` / `Utf8Bytes` (the only way `read` returns one), fastwebsockets a
//!   `Frame` whose `Payload` borrows its read buffer, ringsocket a `&[u8]` / `&str`
//!   borrowed from its input (`ringsocket`) or an owned `Bytes` (`ringsocket_owned`).
//!   Every one of them has unmasked the payload in place before handing it out.
//! - All three validate text: ringsocket and fastwebsockets (its default `simd`
//!   feature, inside `read_frame`, for final text frames) with `simdutf8`, tungstenite
//!   with `std::str::from_utf8` (`Frame::into_text`). No extra validation is added.
//! - fastwebsockets is async: its loop runs in one `block_on` per iteration of a
//!   current-thread tokio runtime built once, outside the timed loop.
//! - Before timing, [`check_decoders_agree`] asserts that all implementations decode the
//!   stream into the same messages (kind and payload) as were encoded.

use std::hint::black_box;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ringsocket::proto::handshake::{parse_request, write_accept};
use ringsocket::proto::mask::{apply_mask, apply_mask_scalar};
use ringsocket::proto::{Connection, Event, EventRef, HandshakeLimits, Limits};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tungstenite::handshake::machine::TryParse;

criterion_group!(
    benches,
    bench_unmask,
    bench_decode_small_frames,
    bench_decode_text,
    bench_server_handshake
);
criterion_main!(benches);

/// Number of frames in the small-frame stream.
const SMALL_FRAMES: usize = 1000;
/// Number of 16 KiB text messages in the text stream.
const TEXT_MESSAGES: usize = 16;
/// Payload size of each text message.
const TEXT_LEN: usize = 16 * 1024;
/// Read size of the `ringsocket_8KiB_reads` variant.
const READ_CHUNK: usize = 8 * 1024;

// ---- 1. unmask ----------------------------------------------------------------------

fn bench_unmask(c: &mut Criterion) {
    let key = [0x37, 0xfa, 0x21, 0x3d];
    for (label, len) in [("64B", 64), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let mut group = c.benchmark_group(format!("unmask/{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = pseudo_random_bytes(len, 1);
        group.bench_function("ringsocket", |b| {
            b.iter(|| apply_mask(black_box(&mut buf), black_box(key), 0));
        });
        group.bench_function("fastwebsockets", |b| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut buf), black_box(key)));
        });
        group.bench_function("ringsocket_scalar", |b| {
            b.iter(|| apply_mask_scalar(black_box(&mut buf), black_box(key), 0));
        });
        let src = pseudo_random_bytes(len, 2);
        let mut dst = vec![0u8; len];
        group.bench_function("memcpy", |b| {
            b.iter(|| black_box(&mut dst).copy_from_slice(black_box(&src)));
        });
        group.finish();
    }
}

// ---- 2. and 3. decoding -------------------------------------------------------------

fn bench_decode_small_frames(c: &mut Criterion) {
    let messages: Vec<Msg> = (0..SMALL_FRAMES)
        .map(|i| Msg {
            kind: Kind::Binary,
            payload: pseudo_random_bytes(if i % 2 == 0 { 16 } else { 64 }, i as u64),
        })
        .collect();
    bench_decode(
        c,
        "decode_small_frames",
        Throughput::Elements(SMALL_FRAMES as u64),
        &messages,
    );
}

fn bench_decode_text(c: &mut Criterion) {
    let messages: Vec<Msg> = (0..TEXT_MESSAGES)
        .map(|i| Msg {
            kind: Kind::Text,
            payload: mixed_utf8(TEXT_LEN, i).into_bytes(),
        })
        .collect();
    bench_decode(
        c,
        "decode_text_16KiB",
        Throughput::Bytes((TEXT_MESSAGES * TEXT_LEN) as u64),
        &messages,
    );
}

/// Benchmarks the three decoders on the client-masked encoding of `messages`.
fn bench_decode(c: &mut Criterion, name: &str, throughput: Throughput, messages: &[Msg]) {
    let wire = encode_client_frames(messages);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("current-thread runtime");
    check_decoders_agree(&rt, &wire, messages);
    let n = messages.len();

    let mut group = c.benchmark_group(name);
    group.throughput(throughput);
    for (label, chunk) in [("", wire.len()), ("_8KiB_reads", READ_CHUNK)] {
        group.bench_function(format!("ringsocket{label}"), |b| {
            b.iter_batched(
                || Connection::server(Limits::default()),
                |mut conn| {
                    let got = ringsocket_decode(&mut conn, &wire, chunk, Api::Borrowed, sink);
                    debug_assert_eq!(got, n);
                    conn
                },
                BatchSize::PerIteration,
            );
        });
        group.bench_function(format!("ringsocket_owned{label}"), |b| {
            b.iter_batched(
                || Connection::server(Limits::default()),
                |mut conn| {
                    let got = ringsocket_decode(&mut conn, &wire, chunk, Api::Owned, sink);
                    debug_assert_eq!(got, n);
                    conn
                },
                BatchSize::PerIteration,
            );
        });
    }
    group.bench_function("tungstenite", |b| {
        b.iter_batched(
            || tungstenite_socket(&wire),
            |mut ws| {
                let got = tungstenite_decode(&mut ws, sink);
                debug_assert_eq!(got, n);
                ws
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("fastwebsockets", |b| {
        b.iter_batched(
            || fastwebsockets_socket(&wire),
            |mut ws| {
                rt.block_on(fastwebsockets_decode(&mut ws, n, sink));
                ws
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

/// What the timed loops do with each payload: make it observable, nothing more.
#[inline]
fn sink(kind: Kind, payload: &[u8]) {
    black_box((kind, payload));
}

/// Which of ringsocket's two event APIs a decode loop uses.
#[derive(Debug, Clone, Copy)]
enum Api {
    /// `Connection::poll_event_ref`: payloads borrowed until the next call.
    Borrowed,
    /// `Connection::poll_event`: payloads as owned `Bytes`.
    Owned,
}

/// Feeds `wire` to `conn` in reads of `chunk` bytes, polling every event after each
/// through `api`.
fn ringsocket_decode(
    conn: &mut Connection,
    wire: &[u8],
    chunk: usize,
    api: Api,
    mut sink: impl FnMut(Kind, &[u8]),
) -> usize {
    let mut count = 0;
    for piece in wire.chunks(chunk) {
        conn.handle_bytes(piece);
        match api {
            Api::Borrowed => {
                while let Some(event) = conn.poll_event_ref().expect("valid stream") {
                    match event {
                        EventRef::Binary(payload) => sink(Kind::Binary, payload),
                        EventRef::Text(text) => sink(Kind::Text, text.as_bytes()),
                        other => panic!("unexpected event {other:?}"),
                    }
                    count += 1;
                }
            }
            Api::Owned => {
                while let Some(event) = conn.poll_event().expect("valid stream") {
                    match event {
                        Event::Binary(payload) => sink(Kind::Binary, &payload),
                        Event::Text(text) => sink(Kind::Text, text.as_bytes()),
                        other => panic!("unexpected event {other:?}"),
                    }
                    count += 1;
                }
            }
        }
    }
    count
}

fn tungstenite_socket(wire: &[u8]) -> tungstenite::WebSocket<ReplayStream<'_>> {
    tungstenite::WebSocket::from_raw_socket(
        ReplayStream::new(wire),
        tungstenite::protocol::Role::Server,
        None,
    )
}

/// Reads messages until the stream would block.
fn tungstenite_decode(
    ws: &mut tungstenite::WebSocket<ReplayStream<'_>>,
    mut sink: impl FnMut(Kind, &[u8]),
) -> usize {
    let mut count = 0;
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Binary(payload)) => sink(Kind::Binary, &payload),
            Ok(tungstenite::Message::Text(text)) => sink(Kind::Text, text.as_bytes()),
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("tungstenite: {e}"),
        }
        count += 1;
    }
    count
}

fn fastwebsockets_socket(wire: &[u8]) -> fastwebsockets::WebSocket<ReplayStream<'_>> {
    fastwebsockets::WebSocket::after_handshake(
        ReplayStream::new(wire),
        fastwebsockets::Role::Server,
    )
}

/// Reads exactly `frames` frames (reading past the end would be an EOF error).
async fn fastwebsockets_decode(
    ws: &mut fastwebsockets::WebSocket<ReplayStream<'_>>,
    frames: usize,
    mut sink: impl FnMut(Kind, &[u8]),
) -> usize {
    for _ in 0..frames {
        let frame = ws.read_frame().await.expect("valid stream");
        let kind = match frame.opcode {
            fastwebsockets::OpCode::Binary => Kind::Binary,
            fastwebsockets::OpCode::Text => Kind::Text,
            other => panic!("unexpected opcode {other:?}"),
        };
        assert!(frame.fin, "single-frame messages only");
        sink(kind, &frame.payload);
    }
    frames
}

/// Asserts once, before timing, that every decoder yields exactly `expected` from `wire`.
fn check_decoders_agree(rt: &tokio::runtime::Runtime, wire: &[u8], expected: &[Msg]) {
    for chunk in [wire.len(), READ_CHUNK] {
        for api in [Api::Borrowed, Api::Owned] {
            let mut got = Vec::new();
            let mut conn = Connection::server(Limits::default());
            ringsocket_decode(&mut conn, wire, chunk, api, collector(&mut got));
            assert!(
                got == expected,
                "ringsocket {api:?} (reads of {chunk}) disagrees"
            );
            assert_eq!(conn.pending_input(), 0);
        }
    }
    let mut got = Vec::new();
    tungstenite_decode(&mut tungstenite_socket(wire), collector(&mut got));
    assert!(got == expected, "tungstenite disagrees");
    let mut got = Vec::new();
    let mut ws = fastwebsockets_socket(wire);
    rt.block_on(fastwebsockets_decode(
        &mut ws,
        expected.len(),
        collector(&mut got),
    ));
    assert!(got == expected, "fastwebsockets disagrees");
    assert!(ws.into_inner().is_drained(), "fastwebsockets left input");
}

/// A sink that records every message, for [`check_decoders_agree`].
fn collector(out: &mut Vec<Msg>) -> impl FnMut(Kind, &[u8]) + '_ {
    |kind, payload| {
        out.push(Msg {
            kind,
            payload: payload.to_vec(),
        });
    }
}

// ---- 4. server handshake ------------------------------------------------------------

/// A Firefox-like upgrade request with the headers a browser really sends.
const BROWSER_REQUEST: &[u8] = b"GET /chat?room=lobby HTTP/1.1\r\n\
Host: example.com:8080\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Sec-WebSocket-Version: 13\r\n\
Origin: https://example.com\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Connection: keep-alive, Upgrade\r\n\
Cookie: session=3f9a1c2b7d6e4f5a8b9c0d1e2f3a4b5c; theme=dark\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
Upgrade: websocket\r\n\
\r\n";

/// RFC 6455 §1.3: the accept value for the key above.
const EXPECTED_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn bench_server_handshake(c: &mut Criterion) {
    let limits = HandshakeLimits::default();
    let mut ours = BytesMut::with_capacity(512);
    let mut theirs: Vec<u8> = Vec::with_capacity(512);
    ringsocket_handshake(BROWSER_REQUEST, &limits, &mut ours);
    tungstenite_handshake(BROWSER_REQUEST, &mut theirs);
    for (name, out) in [("ringsocket", &ours[..]), ("tungstenite", &theirs[..])] {
        let text = std::str::from_utf8(out).expect("ASCII response");
        assert!(text.starts_with("HTTP/1.1 101 "), "{name}: {text}");
        assert!(text.contains(EXPECTED_ACCEPT), "{name}: {text}");
        assert!(text.ends_with("\r\n\r\n"), "{name}: {text}");
    }

    let mut group = c.benchmark_group("server_handshake");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ringsocket", |b| {
        b.iter(|| ringsocket_handshake(black_box(BROWSER_REQUEST), &limits, &mut ours));
    });
    group.bench_function("tungstenite", |b| {
        b.iter(|| tungstenite_handshake(black_box(BROWSER_REQUEST), &mut theirs));
    });
    group.finish();
}

/// `parse_request` + `validate_upgrade` + `write_accept`, no subprotocol chosen.
fn ringsocket_handshake(request: &[u8], limits: &HandshakeLimits, out: &mut BytesMut) {
    out.clear();
    let (request, head_len) = parse_request(request, limits)
        .expect("valid request")
        .expect("complete head");
    let accept = request.validate_upgrade().expect("valid upgrade");
    write_accept(out, &accept, None, &[]);
    black_box((head_len, &out[..]));
}

/// tungstenite's sans-IO pieces: `TryParse for Request` (httparse into `http::Request`),
/// `create_response` (checks and accept key) and `write_response` into a `Vec`.
fn tungstenite_handshake(request: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let (head_len, request) =
        <tungstenite::handshake::server::Request as TryParse>::try_parse(request)
            .expect("valid request")
            .expect("complete head");
    let response =
        tungstenite::handshake::server::create_response(&request).expect("valid upgrade");
    tungstenite::handshake::server::write_response(&mut *out, &response).expect("Vec write");
    black_box((head_len, &out[..]));
}

// ---- helpers ------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Binary,
}

/// One message of a test stream, as the client meant it.
#[derive(Debug, PartialEq, Eq)]
struct Msg {
    kind: Kind,
    payload: Vec<u8>,
}

/// Encodes each message as one final, client-masked frame (RFC 6455 §5.2), with a
/// different masking key per frame. Written here, not with the crate's encoder, so the
/// input does not depend on the code under test.
fn encode_client_frames(messages: &[Msg]) -> Vec<u8> {
    let mut wire = Vec::new();
    for (i, msg) in messages.iter().enumerate() {
        let opcode = match msg.kind {
            Kind::Text => 0x1,
            Kind::Binary => 0x2,
        };
        wire.push(0x80 | opcode);
        let len = msg.payload.len();
        match len {
            0..=125 => wire.push(0x80 | len as u8),
            126..=0xFFFF => {
                wire.push(0x80 | 126);
                wire.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                wire.push(0x80 | 127);
                wire.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let key = [i as u8, 0x5a, (i as u8).wrapping_mul(7), 0xc3];
        wire.extend_from_slice(&key);
        let start = wire.len();
        wire.extend_from_slice(&msg.payload);
        apply_mask_scalar(&mut wire[start..], key, 0);
    }
    wire
}

/// `len` deterministic pseudo-random bytes (xorshift64*), different per `seed`.
fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Exactly `len` bytes of valid UTF-8: ASCII words mixed with 2-, 3- and 4-byte
/// characters (about a third of the bytes are non-ASCII), rotated by `seed`.
fn mixed_utf8(len: usize, seed: usize) -> String {
    const PIECES: [&str; 8] = [
        "The quick brown fox jumps over the lazy dog. ",
        "Grüße aus Köln, çà et là! ",
        "Καλημέρα κόσμε, ",
        "日本語のテキスト、",
        "ok 🦀🚀 ",
        "{\"id\": 42, \"name\": \"ringsocket\", \"tags\": [\"a\", \"b\"]} ",
        "Привет, мир! ",
        "ASCII only line with numbers 0123456789\n",
    ];
    let mut text = String::with_capacity(len);
    'fill: for i in seed.. {
        for ch in PIECES[i % PIECES.len()].chars() {
            if text.len() + ch.len_utf8() > len {
                break 'fill;
            }
            text.push(ch);
        }
    }
    while text.len() < len {
        text.push('.');
    }
    text
}

/// An in-memory transport for the stream-based decoders: reads copy out of a borrowed
/// byte slice (as a socket read copies out of the kernel), then report `WouldBlock`
/// (sync) or EOF (async); writes are accepted and discarded.
#[derive(Debug)]
struct ReplayStream<'a> {
    rest: &'a [u8],
}

impl<'a> ReplayStream<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_drained(&self) -> bool {
        self.rest.is_empty()
    }
}

impl Read for ReplayStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.rest.len());
        let (head, tail) = self.rest.split_at(n);
        buf[..n].copy_from_slice(head);
        self.rest = tail;
        Ok(n)
    }
}

impl Write for ReplayStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for ReplayStream<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = buf.remaining().min(this.rest.len());
        let (head, tail) = this.rest.split_at(n);
        buf.put_slice(head);
        this.rest = tail;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReplayStream<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
