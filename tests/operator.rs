//! Operator safety: the metrics listener (`metrics_bind`), `/healthz` and `/metrics`
//! at `max_connections`, the bounded per-topic metric labels (`metrics_topics`), a port
//! already taken, and error answers that reach a client still sending (lingering
//! close).
//!
//! Real clients only: tokio-tungstenite, raw `TcpStream` writes and reads.
// Tests unwrap values they built themselves (as `src/lib.rs` allows for unit tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::{config, http_exchange, start, ws_connect};

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::runtime::{ServeError, Server};
use tokio_tungstenite::tungstenite::Message;

/// `GET path` with `Connection: close`: the whole response.
async fn get(addr: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    http_exchange(addr, request.as_bytes()).await
}

/// The status code of a raw response.
fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// The value of one series in a `/metrics` page.
fn series(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A control client's echo still works.
async fn echo_works(control: &mut common::Client, text: &str) {
    control.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(common::PATIENCE, control.next())
        .await
        .expect("the control client's echo timed out")
        .expect("the control connection is open")
        .unwrap();
    assert_eq!(reply, Message::text(text));
}

// ---- metrics_bind ---------------------------------------------------------------------

/// The metrics listener serves `GET /metrics` and `GET /healthz` in plain HTTP and 404
/// for anything else (an upgrade included); the main listener then answers
/// `GET /metrics` with 404 and keeps `/healthz` and the WebSockets.
#[tokio::test]
async fn metrics_bind_serves_only_the_metrics_and_the_main_listener_not_them() {
    let server = start(App::standard(), |c| c.metrics_bind = "127.0.0.1:0".into());
    let main = server.local_addr();
    let metrics = server.metrics_addr().expect("metrics_bind is set");
    assert_ne!(metrics, main);
    let mut control = ws_connect(main, "/echo").await;
    echo_works(&mut control, "before").await;

    let page = get(metrics, "/metrics").await;
    assert_eq!(status(&page), 200, "{page}");
    assert!(
        series(&page, "ringsocket_websocket_upgrades_total").is_some_and(|n| n >= 1.0),
        "{page}"
    );
    let health = get(metrics, "/healthz").await;
    assert_eq!(status(&health), 200, "{health}");
    assert!(health.ends_with("ok\n"), "{health}");
    for request in [
        "GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        "POST /publish/room HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ] {
        let refused = http_exchange(metrics, request.as_bytes()).await;
        assert_eq!(status(&refused), 404, "{request}: {refused}");
        assert!(
            refused.contains("the metrics listener serves only GET /metrics and GET /healthz"),
            "{refused}"
        );
    }

    let elsewhere = get(main, "/metrics").await;
    assert_eq!(status(&elsewhere), 404, "{elsewhere}");
    assert!(
        elsewhere.ends_with("metrics are served on the metrics listener\n"),
        "{elsewhere}"
    );
    assert_eq!(status(&get(main, "/healthz").await), 200);
    echo_works(&mut control, "after").await;
}

/// Without `metrics_bind` there is no metrics listener and `/metrics` stays on `bind`.
#[tokio::test]
async fn without_metrics_bind_the_metrics_stay_on_the_main_listener() {
    let server = start(App::standard(), |_| {});
    assert_eq!(server.metrics_addr(), None);
    assert_eq!(status(&get(server.local_addr(), "/metrics").await), 200);
}

/// A metrics port another process listens on is refused like `bind`'s.
#[test]
fn a_taken_metrics_port_is_refused_naming_it() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let mut taken = config();
    taken.bind = "127.0.0.1:0".parse().unwrap();
    taken.metrics_bind = addr.to_string();
    let err = Server::start(taken, Arc::new(App::echo())).unwrap_err();
    assert!(
        matches!(err, ServeError::AddrInUse(a) if a == addr),
        "{err:?}"
    );
}

/// A port another process listens on (here: a plain std listener) is refused with one
/// line naming the address, instead of being shared through `SO_REUSEPORT`.
#[test]
fn a_port_already_taken_is_refused_naming_it() {
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    let mut taken = config();
    taken.bind = addr;
    taken.workers = 2;
    let err = Server::start(taken, Arc::new(App::echo())).unwrap_err();
    assert!(
        matches!(err, ServeError::AddrInUse(a) if a == addr),
        "{err:?}"
    );
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "cannot listen on {addr}: another process is already listening on it \
             (stop it or choose another address)"
        )
    );
    // Once it is free, the server starts on it.
    drop(other);
    let server = start(App::echo(), |c| c.bind = addr);
    assert_eq!(server.local_addr(), addr);
}

// ---- max_connections ------------------------------------------------------------------

/// At `max_connections`, `GET /healthz` and `GET /metrics` still get their answer
/// (then the connection closes), while anything else, a WebSocket included, gets 503.
#[tokio::test]
async fn healthz_and_metrics_answer_at_max_connections() {
    let server = start(App::standard(), |c| c.max_connections = 2);
    let addr = server.local_addr();
    let mut control = ws_connect(addr, "/echo").await;
    let _second = ws_connect(addr, "/echo").await;
    echo_works(&mut control, "full").await;

    let health = get(addr, "/healthz").await;
    assert_eq!(status(&health), 200, "{health}");
    assert!(
        health.to_ascii_lowercase().contains("connection: close"),
        "{health}"
    );
    // Asked without `Connection: close`: answered all the same, then closed (the
    // exchange reads to the end).
    let page = http_exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(status(&page), 200, "{page}");
    assert!(
        series(&page, "ringsocket_websocket_upgrades_total") == Some(2.0),
        "{page}"
    );

    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
        .await
        .expect_err("a third WebSocket is refused");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 503);
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    let other = get(addr, "/").await;
    assert_eq!(status(&other), 503, "{other}");
    echo_works(&mut control, "still").await;
    let page = get(addr, "/metrics").await;
    assert_eq!(
        series(
            &page,
            "ringsocket_limit_hits_total{limit=\"max_connections\"}"
        ),
        Some(2.0),
        "{page}"
    );
}

// ---- metrics_topics -------------------------------------------------------------------

/// 8,000 topics with a subscriber each: `/metrics` shows the `metrics_topics` topics
/// with the most subscribers and one `_other` sample with the rest, so the page stays
/// small; `metrics_topics = 0` leaves only `_other`.
#[tokio::test]
async fn per_topic_metrics_are_bounded_by_metrics_topics() {
    const CONNECTIONS: usize = 8;
    const TOPICS_EACH: usize = 1_000;
    let app = App::standard().websocket("/many/{n}", |ws| async move {
        ws.accept();
        let n = ws.param::<usize>("n").unwrap_or_default();
        for i in 0..TOPICS_EACH {
            if ws.subscribe(&format!("t{n:02}-{i:04}")).is_err() {
                ws.close(ringsocket::proto::CloseCode::Policy, "subscribe failed");
                return;
            }
        }
        let _ = ws.send_text("ready");
        while let Ok(message) = ws.recv().await {
            if ws.send(message).is_err() {
                break;
            }
        }
    });
    let hub = app.hub().clone();
    let server = start(app, |c| c.metrics_topics = 5);
    let addr = server.local_addr();
    let mut control = ws_connect(addr, "/echo").await;
    let mut many = Vec::new();
    for n in 0..CONNECTIONS {
        let mut client = ws_connect(addr, &format!("/many/{n}")).await;
        let ready = tokio::time::timeout(common::PATIENCE, client.next())
            .await
            .expect("subscribed in time")
            .expect("open")
            .unwrap();
        assert_eq!(ready, Message::text("ready"));
        many.push(client);
    }
    // Two topics with more subscribers than the rest: shown first.
    let _hot = [
        ws_connect(addr, "/ws/hot").await,
        ws_connect(addr, "/ws/hot").await,
        ws_connect(addr, "/ws/hot").await,
    ];
    let _warm = [
        ws_connect(addr, "/ws/warm").await,
        ws_connect(addr, "/ws/warm").await,
    ];
    let total = CONNECTIONS * TOPICS_EACH;
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while hub.topics() < total + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} topics",
            hub.topics()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    let page = get(addr, "/metrics").await;
    assert_eq!(status(&page), 200);
    let samples: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("ringsocket_pubsub_subscribers{"))
        .collect();
    assert_eq!(
        samples,
        [
            "ringsocket_pubsub_subscribers{topic=\"hot\"} 3",
            "ringsocket_pubsub_subscribers{topic=\"warm\"} 2",
            "ringsocket_pubsub_subscribers{topic=\"t00-0000\"} 1",
            "ringsocket_pubsub_subscribers{topic=\"t00-0001\"} 1",
            "ringsocket_pubsub_subscribers{topic=\"t00-0002\"} 1",
            &format!(
                "ringsocket_pubsub_subscribers{{topic=\"_other\"}} {}",
                total - 3
            ),
        ]
    );
    assert_eq!(
        series(&page, "ringsocket_pubsub_topics"),
        Some((total + 2) as f64)
    );
    let bounded = page.len();
    echo_works(&mut control, "scraped").await;

    // The same page with every topic shown, as before the bound.
    hub.set_metrics_topics(usize::MAX);
    let unbounded = get(addr, "/metrics").await.len();
    hub.set_metrics_topics(0);
    let none = get(addr, "/metrics").await;
    let samples: Vec<&str> = none
        .lines()
        .filter(|l| l.starts_with("ringsocket_pubsub_subscribers{"))
        .collect();
    assert_eq!(
        samples,
        [format!(
            "ringsocket_pubsub_subscribers{{topic=\"_other\"}} {}",
            total + 5
        )]
    );
    eprintln!(
        "/metrics with {} topics: {bounded} bytes with metrics_topics = 5, \
         {unbounded} bytes with every topic shown",
        total + 2
    );
    assert!(bounded < 64 * 1024, "{bounded} bytes");
    assert!(unbounded > 10 * bounded, "{unbounded} vs {bounded} bytes");
    echo_works(&mut control, "still").await;
}

// ---- lingering close ------------------------------------------------------------------

/// Writes all of `request` (the server refuses it part-way), then reads to the end:
/// the response the server sent, or the error the client got.
async fn send_then_read(addr: SocketAddr, request: Vec<u8>) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(common::PATIENCE, stream.write_all(&request))
        .await
        .expect("the write timed out")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the read timed out")
        .map_err(|e| format!("read: {e} after {} bytes", out.len()))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// What the client sends past the point where the server refuses: more than the
/// loopback socket buffers absorb (about 3 MiB here: a client that wrote 4 MiB got
/// `EPIPE` from a server closing with unread input, one that wrote 3 MiB did not), and
/// less than a lingering close discards (8 MiB) plus those buffers.
const HEADER_LINE: usize = 6 << 20;

/// A client that sends a 6 MiB header line (it keeps writing far past the 8 KiB
/// limit), then reads, gets the 431 and its reason: the server shut its side down
/// after the answer and read on, instead of closing with unread input (a reset: the
/// client's write fails with `EPIPE`, and some stacks drop the answer).
#[tokio::test]
async fn a_431_reaches_a_client_that_keeps_sending_its_head() {
    let server = start(App::standard(), |_| {});
    let addr = server.local_addr();
    let mut control = ws_connect(addr, "/echo").await;
    for round in 0..3 {
        let mut request = b"GET / HTTP/1.1\r\nHost: t\r\nX-Long: ".to_vec();
        request.resize(request.len() + HEADER_LINE, b'a');
        let response = send_then_read(addr, request).await.unwrap();
        assert_eq!(status(&response), 431, "round {round}: {response}");
        assert!(response.contains("\r\n\r\n"), "{response}");
        echo_works(&mut control, "still").await;
    }
    let page = get(addr, "/metrics").await;
    assert_eq!(
        series(
            &page,
            "ringsocket_limit_hits_total{limit=\"max_head_bytes\"}"
        ),
        Some(3.0),
        "{page}"
    );
}

/// A body over `max_body_bytes` (6 MiB against 1 MiB), sent in full behind its head,
/// still lets the client read the 413.
#[tokio::test]
async fn a_413_reaches_a_client_that_sends_its_whole_body() {
    let server = start(App::standard(), |_| {});
    let addr = server.local_addr();
    let mut control = ws_connect(addr, "/echo").await;
    let len = HEADER_LINE;
    for round in 0..3 {
        let mut request =
            format!("POST /publish/room HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n")
                .into_bytes();
        request.resize(request.len() + len, b'b');
        let response = send_then_read(addr, request).await.unwrap();
        assert_eq!(status(&response), 413, "round {round}: {response}");
        assert!(
            response.ends_with("request body over the 1048576-byte limit\n"),
            "{response}"
        );
        echo_works(&mut control, "still").await;
    }
    let page = get(addr, "/metrics").await;
    assert_eq!(
        series(
            &page,
            "ringsocket_limit_hits_total{limit=\"max_body_bytes\"}"
        ),
        Some(3.0),
        "{page}"
    );
}

/// The same over TLS: the answer is encrypted and on the socket before the write side
/// is shut down, and the discarded input is read through the TLS session.
#[tokio::test]
async fn a_431_reaches_a_tls_client_that_keeps_sending_its_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = common::tls::TestCa::new("linger");
    let cert = ca.server_cert("server", "linger");
    let server = start(App::standard(), |c| {
        c.tls_cert = cert.cert.display().to_string();
        c.tls_key = cert.key.display().to_string();
    });
    let addr = server.local_addr();
    let mut control = common::tls::wss_connect(addr, "/echo", ca.client_config()).await;
    let mut stream = common::tls::tls_connect(addr, ca.client_config())
        .await
        .unwrap();
    let mut request = b"GET / HTTP/1.1\r\nHost: t\r\nX-Long: ".to_vec();
    request.resize(request.len() + HEADER_LINE, b'a');
    tokio::time::timeout(common::PATIENCE, stream.write_all(&request))
        .await
        .expect("the write timed out")
        .expect("the whole request is written");
    let mut out = Vec::new();
    // No close_notify from the server: the read ends with an error after the answer.
    let _ = tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the read timed out");
    let response = String::from_utf8_lossy(&out);
    assert_eq!(status(&response), 431, "{response}");
    echo_works(&mut control, "still").await;
}

/// A refused client that neither reads nor closes is let go after the lingering time
/// (2 s), not held: its connection no longer counts as open.
#[tokio::test]
async fn a_lingering_close_ends_within_its_time_bound() {
    use tokio::io::AsyncWriteExt;
    let server = start(App::standard(), |_| {});
    let addr = server.local_addr();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n")
        .await
        .unwrap();
    let open = |server: &ringsocket::runtime::RunningServer| {
        server
            .metrics()
            .render()
            .lines()
            .find_map(|l| {
                l.strip_prefix("ringsocket_connections_open ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap()
    };
    let started = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(open(&server), 1, "still lingering half a second later");
    while open(&server) > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "still open after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(1_500));
    drop(stream);
}
