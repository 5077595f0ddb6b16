//! The limits on what a WebSocket peer sends, over loopback: the message rate
//! (`max_messages_per_sec`, `max_messages_burst`, `rate_limit_policy` close and drop),
//! the control frame rate (`max_control_frames_per_sec`) and the process's budget for
//! partly received messages (`max_inbound_memory`).
//!
//! Each test starts its own server on port 0 and checks the close code, the counter in
//! `/metrics` and that a control client on the same server keeps its echo while the
//! rule fires. Clients are tokio-tungstenite, or raw TCP writing frames by hand where a
//! test floods pings or stalls half way through a frame; the server's frames are then
//! decoded with our client-role codec.
// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::start;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::config::RateLimitPolicy;
use ringsocket::proto::{Connection, Event, Limits};
use ringsocket::runtime::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The longest any single await on the server may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---- max_messages_per_sec ---------------------------------------------------------------

/// A client that sends its burst and more at once gets the burst echoed, then 1008
/// "rate limit", counted once; a client within the limit keeps its echo.
#[tokio::test]
async fn messages_over_the_rate_limit_close_with_1008() {
    let server = start(App::echo(), |c| {
        c.max_messages_per_sec = 5;
        c.max_messages_burst = 5;
    });
    let mut control = connect(&server).await;
    echo_round_trip(&mut control, "before").await;
    let mut flooder = connect(&server).await;
    send_batch(&mut flooder, 20).await;
    let mut echoed = Vec::new();
    let close = loop {
        match within(PATIENCE, flooder.next()).await {
            Some(Ok(WsMessage::Text(text))) => echoed.push(text.to_string()),
            Some(Ok(WsMessage::Close(frame))) => break frame.expect("a close code"),
            other => panic!("expected echoes then a Close, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "rate limit");
    // The burst, and at most a token or two earned while the batch was written.
    assert!((5..=7).contains(&echoed.len()), "echoed {echoed:?}");
    let expected: Vec<String> = (0..echoed.len()).map(|i| format!("m{i}")).collect();
    assert_eq!(echoed, expected);
    // The close handshake completes (tungstenite answers the Close).
    within(PATIENCE, async { while flooder.next().await.is_some() {} }).await;
    assert_eq!(rejections(&server, "rate_limit"), 1);
    wait_until(&server, "the connection to end as rejected", |s| {
        closed_as(s, "rejected") == 1
    })
    .await;
    echo_round_trip(&mut control, "after").await;
}

/// `rate_limit_policy = drop`: the messages past the burst are not delivered (no
/// echo), each is counted, and the connection stays open: once a token is earned, the
/// next message is echoed.
#[tokio::test]
async fn drop_policy_drops_messages_past_the_burst_and_keeps_the_connection() {
    let server = start(App::echo(), |c| {
        c.max_messages_per_sec = 1;
        c.max_messages_burst = 3;
        c.rate_limit_policy = RateLimitPolicy::Drop;
    });
    let mut control = connect(&server).await;
    echo_round_trip(&mut control, "before").await;
    let mut client = connect(&server).await;
    let started = Instant::now();
    send_batch(&mut client, 10).await;
    for i in 0..3 {
        assert_eq!(next(&mut client).await, WsMessage::text(format!("m{i}")));
    }
    wait_until(&server, "7 dropped messages counted", |s| {
        rejections(s, "rate_limit") == 7
    })
    .await;
    // The batch went out well within the second a token takes.
    assert!(started.elapsed() < Duration::from_millis(900));
    echo_round_trip(&mut control, "while limited").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A token was earned: the next message is delivered, nothing dropped came back.
    echo_round_trip(&mut client, "after a second").await;
    assert_eq!(rejections(&server, "rate_limit"), 7);
    echo_round_trip(&mut control, "after").await;
    assert_eq!(server.metrics().open_connections(), 2);
}

/// A flood over the message rate is logged once per connection, at info, naming the
/// peer and the limit: not once per message.
#[tokio::test]
async fn a_rate_limited_flood_is_logged_once_per_connection() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let server = start(App::echo(), |c| {
        c.max_messages_per_sec = 1;
        c.max_messages_burst = 1;
        c.rate_limit_policy = RateLimitPolicy::Drop;
    });
    let mut client = connect(&server).await;
    let port = match client.get_ref() {
        MaybeTlsStream::Plain(stream) => stream.local_addr().unwrap().port(),
        _ => unreachable!("a plain connection"),
    };
    send_batch(&mut client, 20).await;
    assert_eq!(next(&mut client).await, WsMessage::text("m0"));
    wait_until(&server, "19 dropped messages counted", |s| {
        rejections(s, "rate_limit") == 19
    })
    .await;
    // The subscriber is global to this test binary and the other tests run beside this
    // one, so only the lines naming this client's own address count.
    let text = logs.text();
    let peer = format!("peer=127.0.0.1:{port}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&peer)).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("over max_messages_per_sec"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(" INFO "), "{}", lines[0]);
    assert!(lines[0].contains("limit=1"), "{}", lines[0]);
}

// ---- max_control_frames_per_sec ---------------------------------------------------------

/// 200 pings in one write, past the default 50 a second: the pings within the limit are
/// answered, then 1008 "too many control frames", counted; the control client's echo
/// keeps working.
#[tokio::test]
async fn control_frame_flood_closes_with_1008() {
    let server = start(App::echo(), |_| {});
    let mut control = connect(&server).await;
    echo_round_trip(&mut control, "before").await;
    let mut flooder = open_websocket(server.local_addr()).await;
    let pings: Vec<u8> = (0..200u8).flat_map(|i| masked_frame(0x89, &[i])).collect();
    flooder.write_all(&pings).await.unwrap();
    let (events, _) = read_to_end(flooder).await;
    let pongs = events
        .iter()
        .filter(|e| matches!(e, Event::Pong(_)))
        .count();
    assert!((50..=52).contains(&pongs), "{pongs} pongs");
    let close = events.iter().find_map(|e| match e {
        Event::Close(frame) => frame.clone(),
        _ => None,
    });
    let close = close.expect("a Close with a code");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "too many control frames");
    assert_eq!(rejections(&server, "control_frames"), 1);
    wait_until(&server, "the connection to end as rejected", |s| {
        closed_as(s, "rejected") == 1
    })
    .await;
    echo_round_trip(&mut control, "after").await;
}

/// Ten pings back to back (what Autobahn's cases send) are all answered under the
/// default limit, and the connection stays open.
#[tokio::test]
async fn ten_pings_in_a_row_are_within_the_default_limit() {
    let server = start(App::echo(), |_| {});
    let mut client = connect(&server).await;
    for i in 0..10u8 {
        client.feed(WsMessage::Ping(vec![i].into())).await.unwrap();
    }
    within(PATIENCE, client.flush()).await.unwrap();
    for i in 0..10u8 {
        assert_eq!(next(&mut client).await, WsMessage::Pong(vec![i].into()));
    }
    echo_round_trip(&mut client, "still open").await;
    assert_eq!(rejections(&server, "control_frames"), 0);
}

// ---- max_inbound_memory -----------------------------------------------------------------

/// With a 1 MiB budget, raw clients each announce a 512 KiB frame, send 300 KiB of it
/// and stall. Three fit; each one past that is closed with 1013 "server busy: inbound
/// memory", counted as a rejection and a limit hit, while a control client's small
/// messages keep flowing. Once the stalled clients are gone the gauge is back to 0.
#[tokio::test]
async fn inbound_memory_budget_closes_large_partial_messages_with_1013() {
    const SENT: u64 = 300 * 1024;
    let server = start(App::echo(), |c| c.max_inbound_memory = 1 << 20);
    let mut control = connect(&server).await;
    echo_round_trip(&mut control, "before").await;
    let mut stalled = Vec::new();
    for i in 0..5u64 {
        let mut client = open_websocket(server.local_addr()).await;
        let frame = masked_frame_header(0x82, 512 * 1024);
        let body = vec![0x5a; SENT as usize];
        // The server may close it (and reset the connection) while it writes.
        let _ = client.write_all(&frame).await;
        let _ = client.write_all(&body).await;
        if i < 3 {
            wait_until(&server, "the partial message to be charged", |s| {
                gauge(s) == (i + 1) * SENT
            })
            .await;
            stalled.push(client);
        } else {
            let (events, _) = read_to_end(client).await;
            let close = events.iter().find_map(|e| match e {
                Event::Close(frame) => frame.clone(),
                _ => None,
            });
            let close = close.expect("a Close with a code");
            assert_eq!(u16::from(close.code), 1013);
            assert_eq!(close.reason.as_str(), "server busy: inbound memory");
            wait_until(
                &server,
                "the closed client's charge to be given back",
                |s| gauge(s) == 3 * SENT,
            )
            .await;
            echo_round_trip(&mut control, &format!("while over budget {i}")).await;
        }
    }
    assert_eq!(rejections(&server, "inbound_memory"), 2);
    assert_eq!(
        metric(
            &server,
            "ringsocket_limit_hits_total{limit=\"max_inbound_memory\"}"
        ),
        2
    );
    drop(stalled);
    wait_until(&server, "the budget to be free", |s| {
        gauge(s) == 0 && s.metrics().open_connections() == 1
    })
    .await;
    echo_round_trip(&mut control, "after").await;
}

/// Small fragmented messages are charged while they arrive and given back when they
/// complete: the gauge ends at 0 on a connection that stays open.
#[tokio::test]
async fn fragmented_messages_give_their_charge_back_when_complete() {
    let server = start(App::echo(), |c| c.max_inbound_memory = 1 << 20);
    let mut client = open_websocket(server.local_addr()).await;
    client
        .write_all(&masked_frame(0x01, &[b'a'; 1000]))
        .await
        .unwrap();
    wait_until(&server, "the first fragment to be charged", |s| {
        gauge(s) == 1000
    })
    .await;
    client
        .write_all(&masked_frame(0x80, &[b'b'; 1000]))
        .await
        .unwrap();
    let mut conn = Connection::client(Limits::default(), [3; 32]);
    let event = within(PATIENCE, next_event(&mut client, &mut conn)).await;
    assert!(matches!(event, Some(Event::Text(ref t)) if t.len() == 2000));
    assert_eq!(gauge(&server), 0);
}

// ---- helpers ----------------------------------------------------------------------------

/// Log lines, shared with the subscriber's writer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("no result within {limit:?}"))
}

async fn connect(server: &RunningServer) -> Client {
    let url = format!("ws://{}/echo", server.local_addr());
    within(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .0
}

/// The next message, which must come within [`PATIENCE`].
async fn next(client: &mut Client) -> WsMessage {
    within(PATIENCE, client.next())
        .await
        .expect("the connection ended")
        .unwrap()
}

/// Sends `m0`, `m1`... `m{n-1}` as one batch (one flush).
async fn send_batch(client: &mut Client, n: usize) {
    for i in 0..n {
        client.feed(WsMessage::text(format!("m{i}"))).await.unwrap();
    }
    within(PATIENCE, client.flush()).await.unwrap();
}

/// Sends a text and expects it back.
async fn echo_round_trip(client: &mut Client, text: &str) {
    client.send(WsMessage::text(text)).await.unwrap();
    assert_eq!(next(client).await, WsMessage::text(text));
}

/// Polls `done` every 10 ms until it holds, failing after [`PATIENCE`].
async fn wait_until(
    server: &RunningServer,
    what: &str,
    mut done: impl FnMut(&RunningServer) -> bool,
) {
    let deadline = Instant::now() + PATIENCE;
    while !done(server) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            server.metrics().render()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of one series in the server's Prometheus text.
fn metric(server: &RunningServer, series: &str) -> u64 {
    let text = server.metrics().render();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn closed_as(server: &RunningServer, reason: &str) -> u64 {
    metric(
        server,
        &format!("ringsocket_connections_closed_total{{reason=\"{reason}\"}}"),
    )
}

fn rejections(server: &RunningServer, reason: &str) -> u64 {
    metric(
        server,
        &format!("ringsocket_rejections_total{{reason=\"{reason}\"}}"),
    )
}

fn gauge(server: &RunningServer) -> u64 {
    metric(server, "ringsocket_inbound_buffered_bytes")
}

const KEY: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// The header of a masked client frame announcing `len` payload bytes (the payload is
/// then masked with [`KEY`]; a payload of one repeated byte `b` masks to
/// `b ^ KEY[i % 4]`, which the server does not look at for a binary frame).
fn masked_frame_header(first_byte: u8, len: u64) -> Vec<u8> {
    let mut out = vec![first_byte];
    match len {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    out.extend_from_slice(&KEY);
    out
}

/// A masked client frame: `first_byte` (FIN, RSV, opcode) and the masked payload.
fn masked_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = masked_frame_header(first_byte, payload.len() as u64);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    out
}

/// The cheapest WebSocket client: one write of a handshake, one read of the 101.
async fn open_websocket(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = within(PATIENCE, stream.read(&mut byte)).await.unwrap();
        assert!(n > 0, "closed during the handshake");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// The next event the server sent on a raw stream; `None` once the connection ended.
async fn next_event(stream: &mut TcpStream, conn: &mut Connection) -> Option<Event> {
    loop {
        match conn.poll_event() {
            Ok(Some(event)) => return Some(event),
            Ok(None) => {}
            Err(e) => panic!("the server broke the protocol: {e}"),
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => conn.handle_bytes(&chunk[..n]),
        }
    }
}

/// Every event the server sends on a raw stream until it ends the connection (which
/// it must do within [`PATIENCE`]), and how long that took.
async fn read_to_end(mut stream: TcpStream) -> (Vec<Event>, Duration) {
    let started = Instant::now();
    let mut conn = Connection::client(Limits::default(), [5; 32]);
    let mut events = Vec::new();
    within(PATIENCE, async {
        while let Some(event) = next_event(&mut stream, &mut conn).await {
            events.push(event);
        }
    })
    .await;
    (events, started.elapsed())
}
