//! The Redis broker against a real `redis-server` (started per test on a free port): two
//! brokers (or two in-process servers, each with its broker) stand for two processes.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use ringsocket::broker::redis::{RedisBroker, RedisConfig};
use ringsocket::broker::{Broker, BrokerMetrics, BrokerSink, Inbound, Kind};

use common::redis::RedisServer;
use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::runtime::RunningServer;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Longest wait for something that should happen within milliseconds.
const PATIENCE: Duration = Duration::from_secs(5);

/// One "process": a broker and what its sink received.
struct Node {
    broker: Arc<RedisBroker>,
    inbox: Receiver<Inbound>,
}

impl Node {
    fn start(server: &RedisServer) -> Self {
        Self::with_prefix(server, "ringsocket:")
    }

    fn with_prefix(server: &RedisServer, prefix: &str) -> Self {
        let node = Self::unchecked(server, prefix);
        node.wait_for("connected", |m| &m.connected, 1);
        node
    }

    /// A broker that may not be connected yet.
    fn unchecked(server: &RedisServer, prefix: &str) -> Self {
        // The broker's log lines show with a failing test's output.
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let (tx, inbox) = crossbeam_channel::unbounded();
        let sink: BrokerSink = Arc::new(move |message| {
            let _ = tx.send(message);
            ringsocket::broker::Accepted::Delivered
        });
        let mut config = RedisConfig::new(server.url());
        config.prefix = prefix.to_owned();
        // Quick reconnects and loss detection, so the tests stay short.
        config.backoff_min = Duration::from_millis(20);
        config.backoff_max = Duration::from_millis(200);
        config.health_interval = Duration::from_millis(100);
        Self {
            broker: RedisBroker::start(config, sink).unwrap(),
            inbox,
        }
    }

    fn metric(&self, counter: fn(&BrokerMetrics) -> &AtomicU64) -> u64 {
        counter(self.broker.metrics()).load(Ordering::Relaxed)
    }

    fn wait_for(&self, what: &str, counter: fn(&BrokerMetrics) -> &AtomicU64, value: u64) {
        self.wait_until(what, counter, |v| v == value);
    }

    fn wait_until(
        &self,
        what: &str,
        counter: fn(&BrokerMetrics) -> &AtomicU64,
        done: impl Fn(u64) -> bool,
    ) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self.metric(counter)) {
            assert!(
                Instant::now() < deadline,
                "{what} stayed at {}",
                self.metric(counter)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn subscribe(&self, topic: &str, expected_subscriptions: u64) {
        self.broker.subscribe(topic);
        self.wait_for(
            "subscriptions",
            |m| &m.subscriptions,
            expected_subscriptions,
        );
    }

    fn unsubscribe(&self, topic: &str, expected_subscriptions: u64) {
        self.broker.unsubscribe(topic);
        self.wait_for(
            "subscriptions",
            |m| &m.subscriptions,
            expected_subscriptions,
        );
    }

    fn publish_text(&self, topic: &str, text: &str) {
        self.broker
            .publish(topic, Kind::Text, Bytes::copy_from_slice(text.as_bytes()))
            .unwrap();
    }

    fn next(&self) -> Inbound {
        self.inbox
            .recv_timeout(PATIENCE)
            .expect("a message within the patience window")
    }
}

fn text(topic: &str, text: &str) -> Inbound {
    Inbound::new(topic, Kind::Text, Bytes::copy_from_slice(text.as_bytes()))
}

/// Message `i` of the ordering test: text and binary in turn, the binary ones with
/// every byte value.
fn nth(i: usize) -> (Kind, Bytes) {
    if i % 2 == 0 {
        (Kind::Text, Bytes::from(format!("message {i} é")))
    } else {
        let mut payload: Vec<u8> = (0..=255).collect();
        payload.extend_from_slice(&i.to_be_bytes());
        (Kind::Binary, Bytes::from(payload))
    }
}

#[test]
fn messages_cross_once_in_order_and_never_come_back() {
    let server = RedisServer::start();
    let a = Node::start(&server);
    let b = Node::start(&server);
    a.subscribe("room", 1);
    b.subscribe("room", 1);
    // Repeated calls change nothing: the set of topics is what counts.
    b.broker.subscribe("room");
    b.wait_for("subscriptions", |m| &m.subscriptions, 1);

    const N: usize = 2000;
    for i in 0..N {
        let (kind, payload) = nth(i);
        a.broker.publish("room", kind, payload).unwrap();
    }
    for i in 0..N {
        let (kind, payload) = nth(i);
        assert_eq!(b.next(), Inbound::new("room", kind, payload), "message {i}");
    }
    // B answers only after it has all of A's: A's own N came back to A before this
    // (one Redis connection delivers in order) and were dropped, so this is A's first.
    b.publish_text("room", "from b");
    assert_eq!(a.next(), text("room", "from b"));
    // And B got nothing twice: A's next message is B's next.
    a.publish_text("room", "end");
    assert_eq!(b.next(), text("room", "end"));

    // Counted once Redis has answered, which may come after B got the message.
    a.wait_for("published", |m| &m.published, N as u64 + 1);
    assert_eq!(a.metric(|m| &m.received), 1);
    b.wait_for("published", |m| &m.published, 1);
    assert_eq!(b.metric(|m| &m.received), N as u64 + 1);
    for node in [&a, &b] {
        assert_eq!(node.metric(|m| &m.publish_failed), 0);
        assert_eq!(node.metric(|m| &m.malformed), 0);
        assert_eq!(node.metric(|m| &m.reconnects), 0);
    }

    let started = Instant::now();
    a.broker.shutdown();
    b.broker.shutdown();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert_eq!(a.metric(|m| &m.connected), 0);
}

#[test]
fn nothing_arrives_unsubscribed() {
    let server = RedisServer::start();
    let a = Node::start(&server);
    let b = Node::start(&server);
    let other_prefix = Node::with_prefix(&server, "elsewhere:");
    b.subscribe("wanted", 1);
    other_prefix.subscribe("wanted", 1);

    a.publish_text("not-wanted", "never");
    a.publish_text("wanted", "1");
    assert_eq!(b.next(), text("wanted", "1"));

    b.unsubscribe("wanted", 0);
    // Unsubscribing again is harmless.
    b.unsubscribe("wanted", 0);
    b.subscribe("marker", 1);
    a.publish_text("wanted", "2");
    a.publish_text("marker", "m");
    // Redis delivers in order: had "2" reached B, it would come before the marker.
    assert_eq!(b.next(), text("marker", "m"));
    assert!(b.inbox.is_empty());
    // Another prefix is another namespace.
    other_prefix.publish_text("marker", "other namespace");
    a.publish_text("marker", "m2");
    assert_eq!(b.next(), text("marker", "m2"));
    assert!(other_prefix.inbox.is_empty());
}

#[test]
fn reconnects_and_resubscribes_after_a_redis_restart_and_forwards_what_waited() {
    let mut server = RedisServer::start();
    let a = Node::start(&server);
    let b = Node::start(&server);
    b.subscribe("room", 1);
    a.publish_text("room", "before");
    assert_eq!(b.next(), text("room", "before"));
    a.wait_for("published", |m| &m.published, 1);

    server.stop();
    a.wait_for("connected", |m| &m.connected, 0);
    b.wait_for("connected", |m| &m.connected, 0);
    b.wait_for("subscriptions", |m| &m.subscriptions, 0);
    let started = Instant::now();
    for i in 0..10 {
        a.publish_text("room", &format!("held {i}"));
    }
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "publish blocked for {:?}",
        started.elapsed()
    );
    // Held, not dropped.
    assert_eq!(a.metric(|m| &m.backlog_messages), 10);
    assert_eq!(
        a.metric(|m| &m.backlog_bytes),
        (0..10)
            .map(|i| format!("held {i}").len() as u64)
            .sum::<u64>()
    );

    server.restart();
    for node in [&a, &b] {
        node.wait_for("connected", |m| &m.connected, 1);
        // Both connections of each broker came back on their own.
        node.wait_for("reconnects", |m| &m.reconnects, 2);
        assert!(node.metric(|m| &m.connection_errors) >= 2);
    }
    // What waited arrives, in order, then what follows.
    a.publish_text("room", "after");
    for i in 0..10 {
        assert_eq!(b.next(), text("room", &format!("held {i}")));
    }
    assert_eq!(b.next(), text("room", "after"));
    a.wait_for("published", |m| &m.published, 12);
    a.wait_for("backlog_messages", |m| &m.backlog_messages, 0);
    assert_eq!(a.metric(|m| &m.backlog_bytes), 0);
    assert_eq!(a.metric(|m| &m.publish_failed), 0);
    assert_eq!(b.metric(|m| &m.duplicates), 0);
}

#[test]
fn starts_while_redis_is_down_and_connects_later() {
    let mut server = RedisServer::start();
    server.stop();
    let b = Node::unchecked(&server, "ringsocket:");
    b.broker.subscribe("room");
    b.broker
        .publish(
            "room",
            Kind::Text,
            Bytes::from_static(b"held until Redis is up"),
        )
        .unwrap();
    // Both connections tried and failed.
    b.wait_until("connection_errors", |m| &m.connection_errors, |n| n >= 2);
    assert_eq!(b.metric(|m| &m.connected), 0);
    assert_eq!(b.metric(|m| &m.backlog_messages), 1);

    server.restart();
    b.wait_for("connected", |m| &m.connected, 1);
    b.wait_for("subscriptions", |m| &m.subscriptions, 1);
    // A first connection is not a reconnection.
    assert_eq!(b.metric(|m| &m.reconnects), 0);
    // What waited went out (its echo back to B itself is dropped).
    b.wait_for("published", |m| &m.published, 1);
    assert_eq!(b.metric(|m| &m.backlog_messages), 0);
    assert_eq!(b.metric(|m| &m.publish_failed), 0);
    let a = Node::start(&server);
    a.publish_text("room", "hello");
    assert_eq!(b.next(), text("room", "hello"));
}

/// Redis drops the publisher's connection while batches are in flight, over and over:
/// a batch Redis had partly executed is sent again, and the receiver drops what it
/// already had by the sequence numbers. Every message arrives once, in order.
#[test]
fn a_connection_broken_mid_batch_loses_nothing_and_repeats_nothing() {
    let server = RedisServer::start();
    let a = Node::start(&server);
    let b = Node::start(&server);
    b.subscribe("room", 1);
    a.publish_text("room", "warm-up");
    assert_eq!(b.next(), text("room", "warm-up"));

    const N: usize = 20_000;
    let mut plain = server.client();
    let killer = std::thread::spawn(move || {
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(3));
            // The publishers' connections (subscribers are of type `pubsub`); not this one.
            let _ = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .exec(&mut plain);
        }
    });
    // Long enough that Redis is still executing a batch when it drops the connection.
    let nth = |i: usize| format!("m{i} {}", "x".repeat(1000));
    for i in 0..N {
        a.publish_text("room", &nth(i));
    }
    killer.join().unwrap();
    for i in 0..N {
        assert_eq!(b.next(), text("room", &nth(i)), "message {i}");
    }
    // Nothing twice: the next message is the one after.
    a.publish_text("room", "end");
    assert_eq!(b.next(), text("room", "end"));
    a.wait_for("backlog_messages", |m| &m.backlog_messages, 0);
    assert_eq!(a.metric(|m| &m.publish_failed), 0);
    assert!(a.metric(|m| &m.reconnects) >= 1, "no connection was broken");
    // How many a resent batch carried twice depends on timing; they never arrive.
    eprintln!(
        "{} reconnections, {} duplicates dropped",
        a.metric(|m| &m.reconnects),
        b.metric(|m| &m.duplicates)
    );
}

/// The same sequence number from the same process is taken once; another process's
/// numbers are its own; version-1 envelopes (no number) are never taken for duplicates.
#[test]
fn duplicates_are_recognised_by_origin_and_sequence_number() {
    let server = RedisServer::start();
    let b = Node::start(&server);
    b.subscribe("room", 1);
    let envelope = |origin: u8, seq: u64, text: &str| {
        let mut bytes = b"rsb\x02".to_vec();
        bytes.extend_from_slice(&[origin; 16]);
        bytes.extend_from_slice(&seq.to_be_bytes());
        bytes.push(0);
        bytes.extend_from_slice(text.as_bytes());
        bytes
    };
    let mut v1 = b"rsb\x01".to_vec();
    v1.extend_from_slice(&[5; 16]);
    v1.extend_from_slice(b"\x00v1");
    let mut plain = server.client();
    for payload in [
        envelope(5, 7, "seven"),
        envelope(5, 7, "seven again"),
        envelope(5, 6, "six, late"),
        envelope(6, 1, "another process"),
        v1.clone(),
        v1,
        envelope(5, 8, "eight"),
    ] {
        redis::cmd("PUBLISH")
            .arg("ringsocket:room")
            .arg(payload)
            .exec(&mut plain)
            .unwrap();
    }
    for expected in ["seven", "another process", "v1", "v1", "eight"] {
        assert_eq!(b.next(), text("room", expected));
    }
    assert_eq!(b.metric(|m| &m.duplicates), 2);
    assert_eq!(b.metric(|m| &m.received), 5);
}

#[test]
fn malformed_messages_are_counted_and_dropped() {
    let server = RedisServer::start();
    let a = Node::start(&server);
    let b = Node::start(&server);
    b.subscribe("room", 1);
    let mut plain = server.client();
    let mut bad_utf8 = b"rsb\x01".to_vec();
    bad_utf8.extend_from_slice(&[7; 16]);
    bad_utf8.extend_from_slice(b"\x00\xff\xfe");
    let garbage: [&[u8]; 4] = [b"hello", b"", b"rsb\x02", &bad_utf8];
    for payload in garbage {
        redis::cmd("PUBLISH")
            .arg("ringsocket:room")
            .arg(payload)
            .exec(&mut plain)
            .unwrap();
    }
    // Not our channel: not ours to judge.
    redis::cmd("PUBLISH")
        .arg("ringsocket:elsewhere")
        .arg("x")
        .exec(&mut plain)
        .unwrap();
    a.publish_text("room", "still fine");
    assert_eq!(b.next(), text("room", "still fine"));
    assert_eq!(b.metric(|m| &m.malformed), 4);
    assert_eq!(b.metric(|m| &m.received), 1);
    assert_eq!(b.metric(|m| &m.connected), 1);
}

#[test]
fn a_panicking_sink_loses_one_message_not_the_broker() {
    let server = RedisServer::start();
    let (tx, inbox) = crossbeam_channel::unbounded();
    let sink: BrokerSink = Arc::new(move |message: Inbound| {
        assert_ne!(&message.payload[..], b"boom", "the sink refuses this one");
        let _ = tx.send(message);
        ringsocket::broker::Accepted::Delivered
    });
    let b = Node {
        broker: RedisBroker::start(RedisConfig::new(server.url()), sink).unwrap(),
        inbox,
    };
    b.subscribe("room", 1);
    let a = Node::start(&server);
    a.publish_text("room", "boom");
    a.publish_text("room", "after");
    assert_eq!(b.next(), text("room", "after"));
    assert_eq!(b.metric(|m| &m.received), 2);
    assert_eq!(b.metric(|m| &m.connected), 1);
}

/// A `ringsocket serve`-like server (the standard app's rooms) whose hub forwards
/// through its own Redis broker: one "process" of a cluster.
fn rooms_server(redis: &RedisServer) -> (RunningServer, Arc<ringsocket::pubsub::Hub>, Node) {
    rooms_server_with(redis, |_| {})
}

/// [`rooms_server`] with the server settings `tweak` makes (the broker's among them).
fn rooms_server_with(
    redis: &RedisServer,
    tweak: impl Fn(&mut ringsocket::config::Config),
) -> (RunningServer, Arc<ringsocket::pubsub::Hub>, Node) {
    let app = App::standard();
    let hub = app.hub().clone();
    let mut settings = ringsocket::config::Config::default();
    settings.redis_url = redis.url();
    tweak(&mut settings);
    let mut config = RedisConfig::from_config(&settings).unwrap();
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.health_interval = Duration::from_millis(100);
    let broker = RedisBroker::start(config, app.publisher().broker_sink()).unwrap();
    hub.set_broker(broker.clone()).unwrap();
    let node = Node {
        broker,
        inbox: crossbeam_channel::never(),
    };
    (common::start(app, tweak), hub, node)
}

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn join(server: &RunningServer, room: &str) -> Client {
    let url = format!("ws://{}/ws/{room}", server.local_addr());
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .unwrap()
        .0
}

async fn next_text(client: &mut Client) -> String {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a message within the patience window")
            .unwrap()
            .unwrap();
        if let WsMessage::Text(text) = message {
            return text.as_str().to_owned();
        }
    }
}

/// Two servers, each with its own broker: a message sent in a room reaches its members
/// on both servers exactly once and in order; while Redis is down, local delivery goes
/// on; after it is back, what was sent meanwhile reaches the other server, then the
/// rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_span_two_servers_and_survive_a_redis_restart() {
    let mut redis = RedisServer::start();
    let (one, hub_one, broker_one) = rooms_server(&redis);
    let (two, hub_two, broker_two) = rooms_server(&redis);
    let mut sender = join(&one, "lobby").await;
    let mut near = join(&one, "lobby").await;
    let mut far = join(&two, "lobby").await;
    let deadline = Instant::now() + PATIENCE;
    while hub_one.subscribers("lobby") != 2 || hub_two.subscribers("lobby") != 1 {
        assert!(Instant::now() < deadline, "clients did not join");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    broker_one.wait_for("subscriptions", |m| &m.subscriptions, 1);
    broker_two.wait_for("subscriptions", |m| &m.subscriptions, 1);

    const N: usize = 100;
    for i in 0..N {
        sender.send(WsMessage::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..N {
        assert_eq!(next_text(&mut near).await, format!("m{i}"));
        assert_eq!(next_text(&mut far).await, format!("m{i}"));
    }
    // The far side answers: it reaches both near clients once, and nothing of the
    // sender's own came back to it before.
    far.send(WsMessage::text("reply")).await.unwrap();
    assert_eq!(next_text(&mut sender).await, "reply");
    assert_eq!(next_text(&mut near).await, "reply");

    redis.stop();
    broker_one.wait_for("connected", |m| &m.connected, 0);
    sender.send(WsMessage::text("local only")).await.unwrap();
    assert_eq!(next_text(&mut near).await, "local only");

    redis.restart();
    for broker in [&broker_one, &broker_two] {
        broker.wait_for("connected", |m| &m.connected, 1);
        broker.wait_for("subscriptions", |m| &m.subscriptions, 1);
    }
    sender.send(WsMessage::text("back")).await.unwrap();
    assert_eq!(next_text(&mut near).await, "back");
    // "local only" waited in server one's backlog: the far side gets it, then "back".
    assert_eq!(next_text(&mut far).await, "local only");
    assert_eq!(next_text(&mut far).await, "back");
    assert_eq!(broker_one.metric(|m| &m.publish_failed), 0);
}

/// `POST /publish/{topic}` over HTTP.
async fn post(server: &RunningServer, topic: &str, body: &str) -> String {
    let request = format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    common::http_exchange(server.local_addr(), request.as_bytes()).await
}

async fn metrics_of(server: &RunningServer) -> String {
    common::http_exchange(
        server.local_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
}

async fn wait_for_members(hubs: &[(&ringsocket::pubsub::Hub, usize)], room: &str) {
    let deadline = Instant::now() + PATIENCE;
    while hubs.iter().any(|(hub, n)| hub.subscribers(room) != *n) {
        assert!(Instant::now() < deadline, "clients did not join");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The outage: Redis is away for a few seconds while a backend keeps
/// publishing on server one. Every publish is answered 202, server one's own clients
/// get each at once, and once Redis is back server two's clients get all of them, in
/// order, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_while_redis_is_away_all_arrive_in_order_once_it_is_back() {
    let mut redis = RedisServer::start();
    let (one, hub_one, broker_one) = rooms_server(&redis);
    let (two, hub_two, broker_two) = rooms_server(&redis);
    let mut near = join(&one, "lobby").await;
    let mut far = join(&two, "lobby").await;
    wait_for_members(&[(&hub_one, 1), (&hub_two, 1)], "lobby").await;
    broker_one.wait_for("subscriptions", |m| &m.subscriptions, 1);
    broker_two.wait_for("subscriptions", |m| &m.subscriptions, 1);
    let response = post(&one, "lobby", "warm-up").await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert_eq!(next_text(&mut near).await, "warm-up");
    assert_eq!(next_text(&mut far).await, "warm-up");
    broker_one.wait_for("published", |m| &m.published, 1);

    redis.stop();
    // About 3 s of publishing while Redis is away.
    const N: usize = 300;
    for i in 0..N {
        let response = post(&one, "lobby", &format!("m{i}")).await;
        assert!(response.starts_with("HTTP/1.1 202"), "m{i}: {response}");
        assert_eq!(next_text(&mut near).await, format!("m{i}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker_one.metric(|m| &m.connected), 0);
    // Nothing could be acknowledged by a Redis that is gone: all of it waits.
    assert_eq!(broker_one.metric(|m| &m.backlog_messages), N as u64);
    let page = metrics_of(&one).await;
    assert!(
        page.contains(&format!("ringsocket_broker_backlog_messages {N}")),
        "{page}"
    );

    redis.restart();
    for i in 0..N {
        assert_eq!(next_text(&mut far).await, format!("m{i}"));
    }
    // Exactly once: the next message is the one published after.
    let response = post(&one, "lobby", "end").await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    assert_eq!(next_text(&mut far).await, "end");
    assert_eq!(next_text(&mut near).await, "end");
    broker_one.wait_for("backlog_messages", |m| &m.backlog_messages, 0);
    assert_eq!(broker_one.metric(|m| &m.publish_failed), 0);
    assert_eq!(broker_one.metric(|m| &m.backlog_full), 0);
    assert_eq!(broker_one.metric(|m| &m.published), N as u64 + 2);
    let page = metrics_of(&one).await;
    for line in [
        "ringsocket_broker_backlog_messages 0",
        "ringsocket_broker_backlog_bytes 0",
        "ringsocket_broker_backlog_full_total 0",
        "ringsocket_broker_publish_failed_total 0",
    ] {
        assert!(page.contains(line), "{line} in {page}");
    }
}

/// With a backlog of 10 messages and Redis away, the 11th publish is refused before
/// anyone gets it: `POST /publish` answers 503 with `Retry-After: 1`, a WebSocket's
/// own publish is dropped while its connection stays open, both are counted; once
/// Redis is back the 10 reach the other server and publishing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_publishes_with_503_and_delivers_them_nowhere() {
    let mut redis = RedisServer::start();
    let (one, hub_one, broker_one) = rooms_server_with(&redis, |c| c.redis_backlog_messages = 10);
    let (two, hub_two, broker_two) = rooms_server(&redis);
    let mut sender = join(&one, "lobby").await;
    let mut near = join(&one, "lobby").await;
    let mut far = join(&two, "lobby").await;
    wait_for_members(&[(&hub_one, 2), (&hub_two, 1)], "lobby").await;
    broker_one.wait_for("subscriptions", |m| &m.subscriptions, 1);
    broker_two.wait_for("subscriptions", |m| &m.subscriptions, 1);
    sender.send(WsMessage::text("warm-up")).await.unwrap();
    assert_eq!(next_text(&mut near).await, "warm-up");
    assert_eq!(next_text(&mut far).await, "warm-up");
    broker_one.wait_for("published", |m| &m.published, 1);

    redis.stop();
    for i in 0..10 {
        let response = post(&one, "lobby", &format!("held {i}")).await;
        assert!(response.starts_with("HTTP/1.1 202"), "held {i}: {response}");
        assert_eq!(next_text(&mut near).await, format!("held {i}"));
        assert_eq!(next_text(&mut sender).await, format!("held {i}"));
    }
    assert_eq!(broker_one.metric(|m| &m.backlog_messages), 10);
    let response = post(&one, "lobby", "refused").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
    assert!(response.contains("backlog is full"), "{response}");
    // A WebSocket's own publish is refused the same way; its connection stays.
    sender.send(WsMessage::text("ws refused")).await.unwrap();
    broker_one.wait_for("backlog_full", |m| &m.backlog_full, 2);
    assert_eq!(broker_one.metric(|m| &m.publish_failed), 2);
    assert_eq!(broker_one.metric(|m| &m.backlog_messages), 10);
    // The history is at Redis: asking for it while Redis is away says so.
    let history = common::http_exchange(
        one.local_addr(),
        b"GET /history/lobby HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(history.starts_with("HTTP/1.1 503"), "{history}");
    let page = metrics_of(&one).await;
    for line in [
        "ringsocket_broker_backlog_full_total 2",
        "ringsocket_broker_publish_failed_total 2",
        "ringsocket_broker_backlog_messages 10",
    ] {
        assert!(page.contains(line), "{line} in {page}");
    }

    redis.restart();
    for i in 0..10 {
        assert_eq!(next_text(&mut far).await, format!("held {i}"));
    }
    broker_one.wait_for("backlog_messages", |m| &m.backlog_messages, 0);
    // Neither refused one is kept for recovery: the history ends at the 10 held (a
    // new epoch: the restarted Redis kept nothing, the warm-up's included).
    let history = common::http_exchange(
        two.local_addr(),
        b"GET /history/lobby HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        history.contains("held 9") && !history.contains("refused"),
        "{history}"
    );
    assert!(history.contains("\"offset\":10,"), "{history}");
    let response = post(&one, "lobby", "after").await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    // Neither refused message reached anyone, here or there: the next is "after".
    assert_eq!(next_text(&mut near).await, "after");
    assert_eq!(next_text(&mut far).await, "after");
    assert_eq!(next_text(&mut sender).await, "after");
    // And the refused sender's connection still publishes.
    sender.send(WsMessage::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut near).await, "still here");
    assert_eq!(next_text(&mut far).await, "still here");
    assert_eq!(broker_one.metric(|m| &m.backlog_full), 2);
}

/// A message from another process larger than the server's `max_message_size` (which
/// no client could have sent) is dropped and counted, the server carries on, and the
/// next message arrives. Our own large publishes, echoed back by Redis, are not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_max_message_size_from_redis_are_dropped_and_counted() {
    let redis = RedisServer::start();
    let app = App::standard();
    let hub = app.hub().clone();
    let publisher = app.publisher();
    let mut config = ringsocket::config::Config::default();
    config.redis_url = redis.url();
    config.max_message_size = 1024;
    let broker = RedisBroker::start(
        RedisConfig::from_config(&config).unwrap(),
        app.publisher().broker_sink(),
    )
    .unwrap();
    hub.set_broker(broker.clone()).unwrap();
    let node = Node {
        broker,
        inbox: crossbeam_channel::never(),
    };
    let server = common::start(app, |c| c.max_message_size = 1024);
    let mut client = join(&server, "lobby").await;
    node.wait_for("subscriptions", |m| &m.subscriptions, 1);

    // Ours, over the limit: delivered here, and its echo from Redis dropped silently.
    let own = "o".repeat(2048);
    publisher.publish_text("lobby", own.clone()).unwrap();
    assert_eq!(next_text(&mut client).await, own);
    node.wait_for("published", |m| &m.published, 1);

    // Version 1 (no sequence number), still read.
    let envelope = |payload: &[u8]| {
        let mut bytes = b"rsb\x01".to_vec();
        bytes.extend_from_slice(&[9; 16]);
        bytes.push(0);
        bytes.extend_from_slice(payload);
        bytes
    };
    let mut plain = redis.client();
    for payload in ["x".repeat(1025), "y".repeat(1024)] {
        redis::cmd("PUBLISH")
            .arg("ringsocket:lobby")
            .arg(envelope(payload.as_bytes()))
            .exec(&mut plain)
            .unwrap();
    }
    // Redis delivers in order: the one at the limit comes after the one over it.
    assert_eq!(next_text(&mut client).await, "y".repeat(1024));
    assert_eq!(node.metric(|m| &m.oversized), 1);
    assert_eq!(node.metric(|m| &m.received), 1);
    assert_eq!(node.metric(|m| &m.malformed), 0);
    assert_eq!(node.metric(|m| &m.connected), 1);
    let metrics = common::http_exchange(
        server.local_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        metrics.contains("ringsocket_broker_oversized_total 1"),
        "{metrics}"
    );
}
