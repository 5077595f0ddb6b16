//! permessage-deflate against a running server: negotiation in the 101, compressed
//! echoes, the compress-once broadcast to deflate and plain subscribers side by side,
//! the window budget, and bad input (a bomb, corrupt data) closing only its own
//! connection. The client is the protocol core in the client role over a raw socket,
//! so every frame's RSV1 bit can be checked; Autobahn 12-13 (tests/conformance) is the
//! independent client.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use common::{PATIENCE, http_exchange, masked_frame, start};
use ringsocket::app::App;
use ringsocket::config::Compression;
use ringsocket::proto::deflate::{DeflateParams, PerMessageDeflate, client_offer};
use ringsocket::proto::{
    ClientRequest, CloseCode, Connection, Event, HandshakeLimits, Limits, Role,
};
use ringsocket::runtime::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// A client connection: the socket, the protocol state, the 101's head, and the first
/// byte of every frame received (RSV1 is 0x40 in it).
struct Client {
    stream: TcpStream,
    conn: Connection,
    head: String,
    deflate: Option<DeflateParams>,
    pending: Vec<u8>,
}

impl Client {
    async fn open(addr: SocketAddr, path: &str, offer: Option<&str>) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let headers: Vec<(&str, &str)> = offer
            .map(|o| ("Sec-WebSocket-Extensions", o))
            .into_iter()
            .collect();
        let mut request = BytesMut::new();
        let handshake = ClientRequest {
            host: "localhost",
            target: path,
            protocols: &[],
            headers: &headers,
        }
        .encode([9; 16], &mut request);
        stream.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        let (accepted, len) = loop {
            let mut chunk = [0u8; 4096];
            let n = timeout(PATIENCE, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed during the handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(done) = handshake
                .parse_response(&buf, &HandshakeLimits::default())
                .unwrap()
            {
                break done;
            }
        };
        let head = String::from_utf8_lossy(&buf[..len]).into_owned();
        let mut conn = Connection::client(Limits::default(), [4; 32]);
        if let Some(params) = &accepted.deflate {
            conn.set_deflate(PerMessageDeflate::new(params, Role::Client, 1, 0));
        }
        Self {
            stream,
            conn,
            head,
            deflate: accepted.deflate,
            pending: buf[len..].to_vec(),
        }
    }

    async fn flush(&mut self) {
        while let Some(chunk) = self.conn.poll_transmit() {
            self.stream.write_all(&chunk).await.unwrap();
        }
    }

    async fn send_text(&mut self, text: &str) {
        self.conn.send_text(text).unwrap();
        self.flush().await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next event and the first byte of the frame it began with (`None` at the
    /// end of the stream).
    async fn next(&mut self) -> Option<(u8, Event)> {
        loop {
            // One frame at a time, so each event's first byte is known.
            if let Some(len) = frame_len(&self.pending) {
                let frame: Vec<u8> = self.pending.drain(..len).collect();
                self.conn.handle_bytes(&frame);
                if let Some(event) = self.conn.poll_event().unwrap() {
                    self.flush().await;
                    return Some((frame[0], event));
                }
                continue;
            }
            let mut chunk = [0u8; 65536];
            let n = timeout(PATIENCE, self.stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.pending.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The length of the unmasked frame at the start of `buf`, if it is all there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let (&b1, rest) = buf.get(1..)?.split_first()?;
    let (len, header) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(*rest.first_chunk()?) as usize, 4),
        127 => (u64::from_be_bytes(*rest.first_chunk()?) as usize, 10),
        n => (n as usize, 2),
    };
    (buf.len() >= header + len).then_some(header + len)
}

fn json(n: usize) -> String {
    let rows: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":{i},"sym":"BTC-USD","px":{}.5,"side":"buy"}}"#,
                43_000 + i
            )
        })
        .collect();
    format!("[{}]", rows.join(","))
}

fn extension_header(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
}

fn metric(server: &RunningServer, name: &str) -> u64 {
    let text = server.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The browser's offer is answered with server_no_context_takeover; a message over
/// compression_min_bytes comes back compressed (RSV1), a short one plain; both decode.
#[tokio::test]
async fn echo_negotiates_and_compresses_large_messages() {
    let server = start(App::echo(), |_| {});
    let mut client = Client::open(server.local_addr(), "/echo", Some(client_offer())).await;
    assert_eq!(
        extension_header(&client.head),
        Some("permessage-deflate; server_no_context_takeover"),
        "{}",
        client.head
    );
    let big = json(40);
    client.send_text(&big).await;
    let (first, event) = client.next().await.unwrap();
    assert_eq!(first, 0xC1, "compressed text frame");
    assert_eq!(event, Event::Text(big.as_str().into()));
    client.send_text("short").await;
    let (first, event) = client.next().await.unwrap();
    assert_eq!(first, 0x81, "under compression_min_bytes: plain");
    assert_eq!(event, Event::Text("short".into()));
    assert_eq!(
        metric(
            &server,
            "ringsocket_deflate_connections_total{client_context_takeover=\"true\"}"
        ),
        1
    );
}

/// `compression = off`, or a client that offers nothing: no extension, plain frames.
#[tokio::test]
async fn off_or_not_offered_means_plain_frames() {
    let server = start(App::echo(), |c| c.compression = Compression::Off);
    let mut off = Client::open(server.local_addr(), "/echo", Some(client_offer())).await;
    assert_eq!(extension_header(&off.head), None);
    assert!(off.deflate.is_none());
    let big = json(40);
    off.send_text(&big).await;
    assert_eq!(off.next().await.unwrap().0, 0x81);

    let server = start(App::echo(), |_| {});
    let mut plain = Client::open(server.local_addr(), "/echo", None).await;
    assert_eq!(extension_header(&plain.head), None);
    plain.send_text(&big).await;
    assert_eq!(plain.next().await.unwrap().0, 0x81);
}

/// One publish, three subscribers on one room: two negotiated deflate, one did not.
/// The deflate ones get the compressed frame, the other the plain one; all three the
/// same message. A second room member on several topics (direct copies) too.
#[tokio::test]
async fn broadcasts_go_compressed_to_deflate_subscribers_and_plain_to_others() {
    let app = App::standard();
    let hub = app.hub().clone();
    let server = start(app, |_| {});
    let addr = server.local_addr();
    let mut a = Client::open(addr, "/ws/market", Some(client_offer())).await;
    let mut b = Client::open(addr, "/ws/market", Some(client_offer())).await;
    let mut plain = Client::open(addr, "/ws/market", None).await;
    assert!(a.deflate.is_some() && b.deflate.is_some() && plain.deflate.is_none());
    eventually("three subscribers", || hub.subscribers("market") == 3).await;
    let body = json(30);
    let response = http_exchange(
        addr,
        format!(
            "POST /publish/market HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    for (client, first) in [(&mut a, 0xC1), (&mut b, 0xC1), (&mut plain, 0x81)] {
        let (got, event) = client.next().await.unwrap();
        assert_eq!(got, first);
        assert_eq!(event, Event::Text(body.as_str().into()));
    }
}

/// The window budget: with room for one 32 KiB window, the second client is told to
/// drop its context; the gauge shows the reservation and falls back when it closes.
#[tokio::test]
async fn past_the_window_budget_clients_negotiate_no_context_takeover() {
    let server = start(App::echo(), |c| c.compression_memory_limit = 32 * 1024);
    let addr = server.local_addr();
    let mut first = Client::open(addr, "/echo", Some(client_offer())).await;
    assert!(!first.deflate.unwrap().client_no_context_takeover);
    let second = Client::open(addr, "/echo", Some(client_offer())).await;
    assert!(
        second.deflate.unwrap().client_no_context_takeover,
        "{}",
        second.head
    );
    assert_eq!(
        metric(&server, "ringsocket_compression_memory_bytes"),
        32 * 1024
    );
    assert_eq!(
        metric(
            &server,
            "ringsocket_deflate_connections_total{client_context_takeover=\"false\"}"
        ),
        1
    );
    first.conn.close(CloseCode::Normal, "").unwrap();
    first.flush().await;
    while first.next().await.is_some() {}
    eventually("the window given back", || {
        metric(&server, "ringsocket_compression_memory_bytes") == 0
    })
    .await;
}

/// A masked client frame with RSV1 set (a compressed text message).
fn compressed_frame(payload: &[u8]) -> Vec<u8> {
    masked_frame(0xC1, payload)
}

/// A 16 MiB bomb in a few KiB: inflating stops at max_message_size and the connection
/// closes with 1009; corrupt data closes with 1007; another connection echoes on.
#[tokio::test]
async fn bombs_and_corrupt_data_close_only_their_connection() {
    let server = start(App::echo(), |_| {});
    let addr = server.local_addr();
    let mut bystander = Client::open(addr, "/echo", Some(client_offer())).await;

    let mut bomb = Vec::new();
    let codec = PerMessageDeflate::new(&DeflateParams::default(), Role::Client, 9, 0);
    assert!(codec.compress(&vec![b' '; 16 << 20], &mut bomb));
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let mut bomber = Client::open(addr, "/echo", Some(client_offer())).await;
    bomber.send_raw(&compressed_frame(&bomb)).await;
    match bomber.next().await {
        Some((_, Event::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected close 1009, got {other:?}"),
    }

    let mut corrupt = Client::open(addr, "/echo", Some(client_offer())).await;
    corrupt.send_raw(&compressed_frame(&[0xff; 64])).await;
    match corrupt.next().await {
        Some((_, Event::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Invalid),
        other => panic!("expected close 1007, got {other:?}"),
    }

    let big = json(40);
    bystander.send_text(&big).await;
    assert_eq!(
        bystander.next().await.unwrap().1,
        Event::Text(big.as_str().into())
    );
}
