//! Rooms over loopback with an independent client (tokio-tungstenite): fan-out across
//! two workers exactly once and in order, publishing from another thread and over
//! HTTP, unsubscribe and abrupt disconnects leaving no registry entry, conflation, and
//! a slow subscriber closed without holding up the others.
#![allow(clippy::unwrap_used)]

mod common;
use common::{http_exchange, next_data, start, ws_connect};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::proto::Message;
use ringsocket::runtime::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PATIENCE: Duration = Duration::from_secs(10);

/// Polls `condition` until it holds or the deadline passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

fn addr(server: &RunningServer) -> SocketAddr {
    server.local_addr()
}

/// A raw socket that completes a WebSocket handshake on `path` and never reads again.
async fn never_reading(addr: SocketAddr, path: &str) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    socket.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    socket
}

/// Subscribers spread over both workers each get every message, exactly once and in
/// publish order, from a publishing connection and from a `Publisher` on another
/// thread; the sender does not get its own messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_on_every_worker_gets_each_message_once_in_order() {
    let app = App::standard();
    let hub = app.hub().clone();
    let publisher = app.publisher();
    let server = start(app, |_| {});
    let addr = addr(&server);
    let mut subscribers = Vec::new();
    for _ in 0..24 {
        subscribers.push(ws_connect(addr, "/ws/lobby").await);
    }
    let mut sender = ws_connect(addr, "/ws/lobby").await;
    eventually("25 subscribers are registered", || {
        hub.subscribers("lobby") == 25
    })
    .await;
    // Both workers hold some of them (SO_REUSEPORT spreads connections by hash).
    let per_core = hub.core_subscriptions();
    assert!(
        per_core.len() == 2 && per_core.iter().all(|n| *n > 0),
        "{per_core:?}"
    );
    let metrics = get(addr, "/metrics").await;
    assert!(
        metrics.contains("ringsocket_pubsub_subscribers{topic=\"lobby\"} 25"),
        "{metrics}"
    );

    const N: usize = 200;
    for i in 0..N {
        sender
            .send(WsMessage::text(format!("ws {i}")))
            .await
            .unwrap();
    }
    let from_thread = std::thread::spawn(move || {
        for i in 0..N {
            publisher
                .publish_text("lobby", format!("thread {i}"))
                .unwrap();
        }
    });
    for sub in &mut subscribers {
        let (mut ws, mut thread) = (0, 0);
        for _ in 0..2 * N {
            let message = next_data(sub).await;
            let text = message.to_text().unwrap();
            if let Some(i) = text.strip_prefix("ws ") {
                assert_eq!(
                    i.parse::<usize>().unwrap(),
                    ws,
                    "out of order or duplicated"
                );
                ws += 1;
            } else if let Some(i) = text.strip_prefix("thread ") {
                assert_eq!(
                    i.parse::<usize>().unwrap(),
                    thread,
                    "out of order or duplicated"
                );
                thread += 1;
            } else {
                panic!("unexpected message {text:?}");
            }
        }
        assert_eq!((ws, thread), (N, N));
    }
    from_thread.join().unwrap();
    // The sender got only the thread's messages, none of its own.
    for i in 0..N {
        let message = next_data(&mut sender).await;
        assert_eq!(message.to_text().unwrap(), format!("thread {i}"));
    }
    // Nothing more for anyone: no duplicates.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for sub in &mut subscribers {
        assert!(
            tokio::time::timeout(Duration::from_millis(1), sub.next())
                .await
                .is_err(),
            "a subscriber got an extra message"
        );
    }
    // Each core's passes over its subscribers were timed: at least one per core.
    let metrics = get(addr, "/metrics").await;
    let passes: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("ringsocket_broadcast_pass_seconds_count "))
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no pass count in {metrics}"));
    assert!(passes >= 2, "{passes} passes for 400 messages on 2 cores");
    assert!(
        metrics.contains(&format!(
            "ringsocket_broadcast_pass_seconds_bucket{{le=\"+Inf\"}} {passes}"
        )),
        "{metrics}"
    );
}

/// A room name over `MAX_TOPIC_LEN` is refused: the connection is closed with 1008
/// naming the limit, and nothing is registered. Over HTTP such a topic is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_names_over_the_limit_are_refused() {
    let app = App::standard();
    let hub = app.hub().clone();
    let server = start(app, |_| {});
    let addr = addr(&server);
    let long = "r".repeat(ringsocket::pubsub::MAX_TOPIC_LEN + 1);
    // Refused before the upgrade (`max_topic_length`, default 255), with the reason.
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/{long}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("1 to 255 bytes"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
    assert_eq!(hub.subscriptions(), 0);

    let response = http_exchange(
        addr,
        format!(
            "POST /publish/{long} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
        )
        .as_bytes(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
}

/// Unsubscribing, closing and vanishing without a close frame all leave the
/// registry: the subscription count returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_close_and_abrupt_disconnects_leave_no_entry() {
    let app = App::standard().websocket("/toggle", |ws| async move {
        ws.accept();
        ws.subscribe("a").unwrap();
        ws.subscribe("b").unwrap();
        assert!(!ws.subscribe("a").unwrap(), "a second subscribe is a no-op");
        while let Ok(message) = ws.recv().await {
            if let Message::Text(t) = message {
                assert!(ws.unsubscribe(t.as_str()));
                let _ = ws.send_text(ws.topics().join(","));
            }
        }
    });
    let hub = app.hub().clone();
    let server = start(app, |_| {});
    let addr = addr(&server);

    let mut toggler = ws_connect(addr, "/toggle").await;
    eventually("a and b have a subscriber", || hub.subscriptions() == 2).await;
    toggler.send(WsMessage::text("a")).await.unwrap();
    assert_eq!(next_data(&mut toggler).await.to_text().unwrap(), "b");
    assert_eq!(hub.subscribers("a"), 0);
    assert_eq!(hub.subscribers("b"), 1);

    // 200 room members: half close cleanly, half drop TCP without a close frame.
    let mut members = Vec::new();
    for i in 0..200 {
        members.push(ws_connect(addr, &format!("/ws/room{}", i % 7)).await);
    }
    eventually("201 subscriptions", || hub.subscriptions() == 201).await;
    for (i, mut member) in members.into_iter().enumerate() {
        if i % 2 == 0 {
            member.close(None).await.unwrap();
        } else {
            drop(member);
        }
    }
    drop(toggler);
    eventually("every subscription is gone", || hub.subscriptions() == 0).await;
    assert_eq!(hub.topics(), 0);
}

/// `POST /publish/{topic}` reaches the topic's subscribers (text, or binary with
/// `application/octet-stream`); a body that is not UTF-8 as text is refused with 400,
/// one over `max_body_bytes` with 413, and neither reaches anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_reaches_subscribers() {
    let app = App::standard();
    let hub = app.hub().clone();
    let server = start(app, |c| c.max_body_bytes = 64);
    let addr = addr(&server);
    let mut sub = ws_connect(addr, "/ws/news").await;
    eventually("a subscriber", || hub.subscribers("news") == 1).await;

    let response = http_exchange(
        addr,
        b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert_eq!(next_data(&mut sub).await, WsMessage::text("hello"));

    let response = http_exchange(
        addr,
        b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\nConnection: close\r\n\r\n\xff\x00",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert_eq!(
        next_data(&mut sub).await,
        WsMessage::binary(vec![0xff, 0x00])
    );

    let response = http_exchange(
        addr,
        b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n\xff\x00",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("UTF-8"), "{response}");

    for (len, status) in [(65, "413"), (64, "202")] {
        let mut request = format!(
            "POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        request.resize(request.len() + len, b'b');
        let response = http_exchange(addr, &request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{response}"
        );
    }
    // Neither the 400 nor the 413 reached the subscriber: the next message is the 202.
    assert_eq!(next_data(&mut sub).await, WsMessage::text("b".repeat(64)));
    let metrics = get(addr, "/metrics").await;
    assert!(
        metrics.contains("ringsocket_limit_hits_total{limit=\"max_body_bytes\"} 1"),
        "{metrics}"
    );
}

/// Conflation: a publisher sending 400 positions in about 0.4 s reaches a viewer at
/// about one message per 25 ms window, and the final position always arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflated_topic_delivers_latest_value_at_window_rate() {
    let window = Duration::from_millis(25);
    let app = App::standard().conflate("cursor", window);
    let hub = app.hub().clone();
    let server = start(app, |_| {});
    let addr = addr(&server);
    let mut viewer = ws_connect(addr, "/ws/cursor").await;
    let mut mover = ws_connect(addr, "/ws/cursor").await;
    eventually("two subscribers", || hub.subscribers("cursor") == 2).await;

    let started = Instant::now();
    const MOVES: usize = 400;
    for i in 0..MOVES {
        mover.send(WsMessage::text(format!("{i}"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut received = Vec::new();
    loop {
        let message = next_data(&mut viewer).await;
        let value: usize = message.to_text().unwrap().parse().unwrap();
        received.push(value);
        if value == MOVES - 1 {
            break;
        }
    }
    let elapsed = started.elapsed();
    // The last value arrives; values only move forward; no more than one per window
    // (+2 for the leading edge and the boundary).
    assert_eq!(received.last(), Some(&(MOVES - 1)));
    assert!(received.windows(2).all(|w| w[0] < w[1]), "{received:?}");
    let max = (elapsed.as_secs_f64() / window.as_secs_f64()).ceil() as usize + 2;
    assert!(
        received.len() <= max && received.len() >= 3,
        "{} messages in {elapsed:?} (window {window:?}, at most {max})",
        received.len()
    );
    let metrics = get(addr, "/metrics").await;
    let conflated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ringsocket_pubsub_conflated_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(conflated as usize >= MOVES - max, "{conflated} superseded");
}

/// A subscriber that stops reading is closed with 1013 once its queue passes the
/// limit, while another subscriber keeps receiving every message promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_closed_and_others_keep_up() {
    let app = App::standard();
    let hub = app.hub().clone();
    let publisher = app.publisher();
    // The slow one cannot answer our Close either: it is dropped after the close
    // timeout (the pong timeout), 1 s here.
    let server = start(app, |c| {
        c.max_outbound_bytes = 256 * 1024;
        c.pong_timeout_secs = 1.0;
    });
    let addr = addr(&server);

    // The slow one completes the handshake and never reads again.
    let slow = never_reading(addr, "/ws/feed").await;
    let mut fast = ws_connect(addr, "/ws/feed").await;
    eventually("two subscribers", || hub.subscribers("feed") == 2).await;

    let payload = "x".repeat(16 * 1024);
    let mut worst = Duration::ZERO;
    for i in 0..400 {
        let sent = Instant::now();
        publisher
            .publish_text("feed", format!("{i:06}{payload}"))
            .unwrap();
        let message = next_data(&mut fast).await;
        worst = worst.max(sent.elapsed());
        assert!(message.to_text().unwrap().starts_with(&format!("{i:06}")));
    }
    // 400 × 16 KiB = 6.4 MiB is far past 256 KiB plus the socket buffers: the slow one
    // was closed as a slow consumer and left the room.
    eventually("the slow subscriber is gone", || {
        hub.subscribers("feed") == 1
    })
    .await;
    // Its close completes at the close timeout, as it cannot read our Close.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = get(addr, "/metrics").await;
        if metrics.contains("ringsocket_connections_closed_total{reason=\"slow_consumer\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worst < Duration::from_secs(1),
        "the fast subscriber waited {worst:?}"
    );
    drop(slow);
}

/// A slow subscriber leaves its room as soon as it is being closed, not when its close
/// completes (here it never reads, so that would take the 30 s close timeout): later
/// publishes no longer visit it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_leaves_the_room_while_its_close_is_pending() {
    let app = App::standard();
    let hub = app.hub().clone();
    let publisher = app.publisher();
    let server = start(app, |c| {
        c.max_outbound_bytes = 256 * 1024;
        c.pong_timeout_secs = 30.0;
    });
    let addr = addr(&server);
    let slow = never_reading(addr, "/ws/feed").await;
    let mut fast = ws_connect(addr, "/ws/feed").await;
    eventually("two subscribers", || hub.subscribers("feed") == 2).await;

    let payload = "x".repeat(16 * 1024);
    let started = Instant::now();
    let mut i = 0;
    // Past the limit the slow one is closed; the next publish finds it closing.
    while hub.subscribers("feed") == 2 {
        assert!(started.elapsed() < PATIENCE, "the slow subscriber stayed");
        publisher
            .publish_text("feed", format!("{i:06}{payload}"))
            .unwrap();
        next_data(&mut fast).await;
        i += 1;
    }
    let metrics = get(addr, "/metrics").await;
    assert!(
        metrics.contains("ringsocket_limit_hits_total{limit=\"max_outbound_bytes\"} 1"),
        "{metrics}"
    );
    // Its close has not completed: it left the room before its teardown.
    assert!(
        metrics.contains("ringsocket_connections_closed_total{reason=\"slow_consumer\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringsocket_pubsub_subscribers{topic=\"feed\"} 1"),
        "{metrics}"
    );
    drop(slow);
}

/// A subscriber that stops reading for a while (its socket fills, so writes to it
/// end part-way through a frame and the rest waits in its queue) and then reads again
/// gets every message, whole, once and in order, as does one that kept reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_subscriber_gets_every_message_whole_when_it_reads_again() {
    let app = App::standard();
    let hub = app.hub().clone();
    let publisher = app.publisher();
    let server = start(app, |c| {
        c.workers = 1;
        c.max_outbound_bytes = 64 << 20;
    });
    let addr = addr(&server);
    let mut paused = ws_connect(addr, "/ws/feed").await;
    let mut reading = ws_connect(addr, "/ws/feed").await;
    eventually("two subscribers", || hub.subscribers("feed") == 2).await;

    // Sizes that do not divide the socket's buffers: writes end inside frames.
    let message = |i: usize| {
        let fill = char::from(b'a' + (i % 26) as u8);
        format!("{i:06}{}", fill.to_string().repeat(i * 37 % 20_000))
    };
    const COUNT: usize = 600;
    for i in 0..COUNT {
        publisher.publish_text("feed", message(i)).unwrap();
        assert_eq!(next_data(&mut reading).await.to_text().unwrap(), message(i));
    }
    for i in 0..COUNT {
        let got = next_data(&mut paused).await;
        assert_eq!(got.to_text().unwrap(), message(i), "message {i}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), paused.next())
            .await
            .is_err(),
        "a message arrived twice"
    );
}
