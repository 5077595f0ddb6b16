//! The `ringsocket.v1` protocol (docs/protocol.md) over loopback with an independent
//! client (tokio-tungstenite): replies by id, errors with codes, offsets and epochs,
//! recovery within and beyond the history, raw rooms and the HTTP API on the same
//! topics, `GET /history`, and no gap or duplicate while two cores publish.
#![allow(clippy::unwrap_used)]

mod common;
use common::v1::{next, request, send, subscribe, v1};
use common::{Client, http_exchange, start};

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::runtime::RunningServer;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PATIENCE: Duration = Duration::from_secs(15);

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let response = http_exchange(
        addr,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn server(tweak: impl FnOnce(&mut ringsocket::config::Config)) -> (RunningServer, SocketAddr) {
    let server = start(App::standard(), tweak);
    let addr = server.local_addr();
    (server, addr)
}

/// The offsets of the next `n` publications of `topic`.
async fn offsets(client: &mut Client, topic: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let frame = next(client).await;
        assert_eq!(frame["type"], "pub", "{frame}");
        if frame["topic"] == topic {
            out.push(frame["offset"].as_u64().unwrap());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_needs_its_subprotocol() {
    let (_server, addr) = server(|_| {});
    let response = http_exchange(
        addr,
        b"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("ringsocket.v1"), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_publish_ack_and_publication_carry_offset_and_epoch() {
    let (_server, addr) = server(|_| {});
    let mut alice = v1(addr, "").await;
    let mut bob = v1(addr, "").await;
    let reply = subscribe(&mut alice, 1, "lobby", None).await;
    assert_eq!(reply["topic"], "lobby");
    assert_eq!(reply["offset"], 0);
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["missed"], 0);
    assert_eq!(reply["conflated"], false);
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 16);

    let ack = request(
        &mut bob,
        json!({"id": 7, "type": "publish", "topic": "lobby", "data": {"text": "hi", "n": [1, 2]}}),
    )
    .await;
    assert_eq!(
        ack,
        json!({"id": 7, "type": "published", "topic": "lobby", "offset": 1, "epoch": epoch})
    );
    let publication = next(&mut alice).await;
    assert_eq!(
        publication,
        json!({"type": "pub", "topic": "lobby", "offset": 1, "epoch": epoch, "data": {"text": "hi", "n": [1, 2]}})
    );

    // Two topics on one connection; unsubscribe stops one.
    subscribe(&mut alice, 2, "news", None).await;
    request(
        &mut bob,
        json!({"id": 8, "type": "publish", "topic": "news", "data": 1}),
    )
    .await;
    assert_eq!(offsets(&mut alice, "news", 1).await, [1]);
    let reply = request(
        &mut alice,
        json!({"id": 3, "type": "unsubscribe", "topic": "news"}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"id": 3, "type": "unsubscribed", "topic": "news"})
    );
    request(
        &mut bob,
        json!({"id": 9, "type": "publish", "topic": "news", "data": 2}),
    )
    .await;
    request(
        &mut bob,
        json!({"id": 10, "type": "publish", "topic": "lobby", "data": 3}),
    )
    .await;
    let frame = next(&mut alice).await;
    assert_eq!(
        (frame["topic"].as_str(), frame["offset"].as_u64()),
        (Some("lobby"), Some(2))
    );
    // `data` may be any JSON value, null included.
    let ack = request(
        &mut bob,
        json!({"id": 11, "type": "publish", "topic": "lobby", "data": null}),
    )
    .await;
    assert_eq!(ack["type"], "published", "{ack}");
    let frame = next(&mut alice).await;
    assert_eq!(
        (frame["offset"].as_u64(), &frame["data"]),
        (Some(3), &Value::Null)
    );
    let pong = request(&mut alice, json!({"id": 4, "type": "ping"})).await;
    assert_eq!(pong, json!({"id": 4, "type": "pong"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_codes_and_the_connection_stays() {
    let (_server, addr) = server(|_| {});
    let mut client = v1(addr, "").await;
    client.send(WsMessage::text("not json")).await.unwrap();
    let reply = next(&mut client).await;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "bad_request");
    assert!(reply.get("id").is_none());
    for (frame, code) in [
        (json!({"id": 1, "type": "dance"}), "bad_request"),
        (json!({"id": 2, "type": "subscribe"}), "bad_request"),
        (
            json!({"id": 3, "type": "subscribe", "topic": "bad topic!"}),
            "bad_topic",
        ),
        (
            json!({"id": 4, "type": "publish", "topic": "lobby"}),
            "bad_request",
        ),
        (
            json!({"id": 5, "type": "publish", "topic": "", "data": 1}),
            "bad_topic",
        ),
        (
            json!({"id": 6, "type": "unsubscribe", "topic": "lobby"}),
            "not_subscribed",
        ),
        (
            json!({"id": 7, "type": "subscribe", "topic": "a", "since": {"offset": "x"}}),
            "bad_request",
        ),
    ] {
        let reply = request(&mut client, frame.clone()).await;
        assert_eq!(reply["type"], "error", "{frame} → {reply}");
        assert_eq!(reply["code"], code, "{frame} → {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    client
        .send(WsMessage::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    let reply = next(&mut client).await;
    assert_eq!(reply["code"], "bad_request");
    let pong = request(&mut client, json!({"id": 9, "type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_bound_what_a_v1_client_may_subscribe_and_publish() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    const SECRET: &str = "test-secret-test-secret-test-secret!";
    let (_server, addr) = server(|c| c.jwt_secret = SECRET.into());
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "u1", "exp": 4_000_000_000u64, "topics": ["lobby", "room:*"], "publish": ["room:*"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut client = v1(addr, &format!("?token={token}")).await;
    subscribe(&mut client, 1, "lobby", None).await;
    subscribe(&mut client, 2, "room:1", None).await;
    let reply = request(
        &mut client,
        json!({"id": 3, "type": "subscribe", "topic": "secret"}),
    )
    .await;
    assert_eq!(reply["code"], "not_allowed", "{reply}");
    let reply = request(
        &mut client,
        json!({"id": 4, "type": "publish", "topic": "lobby", "data": 1}),
    )
    .await;
    assert_eq!(reply["code"], "not_allowed", "{reply}");
    let reply = request(
        &mut client,
        json!({"id": 5, "type": "publish", "topic": "room:1", "data": 1}),
    )
    .await;
    assert_eq!(reply["type"], "published", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_rooms_the_http_api_and_v1_share_topics() {
    let (_server, addr) = server(|_| {});
    let mut sub = v1(addr, "").await;
    subscribe(&mut sub, 1, "lobby", None).await;
    let mut raw = common::ws_connect(addr, "/ws/lobby").await;

    // HTTP: JSON stays JSON, other text becomes a string.
    assert_eq!(
        http(addr, "POST", "/publish/lobby", r#"{"a":1}"#).await.0,
        202
    );
    assert_eq!(
        http(addr, "POST", "/publish/lobby", "plain words").await.0,
        202
    );
    let (one, two) = (next(&mut sub).await, next(&mut sub).await);
    assert_eq!(
        (one["offset"].as_u64(), &one["data"]),
        (Some(1), &json!({"a": 1}))
    );
    assert_eq!(
        (two["offset"].as_u64(), &two["data"]),
        (Some(2), &json!("plain words"))
    );
    for expected in [r#"{"a":1}"#, "plain words"] {
        let message = tokio::time::timeout(PATIENCE, raw.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(message.into_text().unwrap().as_str(), expected);
    }

    // A raw client's message reaches v1 subscribers; a v1 publish reaches raw ones as
    // its data's JSON text.
    raw.send(WsMessage::text("from raw")).await.unwrap();
    let three = next(&mut sub).await;
    assert_eq!(
        (three["offset"].as_u64(), &three["data"]),
        (Some(3), &json!("from raw"))
    );
    raw.send(WsMessage::binary(vec![0u8, 255])).await.unwrap();
    let four = next(&mut sub).await;
    assert_eq!(four["encoding"], "base64");
    assert_eq!(four["data"], "AP8=");
    let mut publisher = v1(addr, "").await;
    request(
        &mut publisher,
        json!({"id": 1, "type": "publish", "topic": "lobby", "data": {"b": [true]}}),
    )
    .await;
    let message = tokio::time::timeout(PATIENCE, raw.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(message.into_text().unwrap().as_str(), r#"{"b":[true]}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_recovers_what_it_missed_in_order_then_live_ones() {
    let (_server, addr) = server(|_| {});
    let mut client = v1(addr, "").await;
    let reply = subscribe(&mut client, 1, "news", None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        http(addr, "POST", "/publish/news", &i.to_string()).await;
    }
    assert_eq!(offsets(&mut client, "news", 3).await, [1, 2, 3]);
    drop(client);
    for i in 4..=10 {
        assert_eq!(
            http(addr, "POST", "/publish/news", &i.to_string()).await.0,
            202
        );
    }
    let mut client = v1(addr, "").await;
    let reply = subscribe(&mut client, 2, "news", Some((3, &epoch))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["missed"], 7);
    assert_eq!(reply["offset"], 10);
    let mut got = Vec::new();
    for _ in 4..=10 {
        let frame = next(&mut client).await;
        got.push((
            frame["offset"].as_u64().unwrap(),
            frame["data"].as_u64().unwrap(),
        ));
    }
    assert_eq!(got, (4..=10).map(|i| (i, i)).collect::<Vec<_>>());
    http(addr, "POST", "/publish/news", "11").await;
    assert_eq!(offsets(&mut client, "news", 1).await, [11]);

    // Another epoch: nothing to recover.
    let mut other = v1(addr, "").await;
    let reply = subscribe(&mut other, 3, "news", Some((3, "0123456789abcdef"))).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64()),
        (Some(false), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_history_recovery_says_false_and_sends_what_is_kept() {
    let (server, addr) = server(|c| c.history_size = 3);
    let mut client = v1(addr, "").await;
    let epoch = subscribe(&mut client, 1, "t", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(client);
    for i in 1..=10 {
        http(addr, "POST", "/publish/t", &i.to_string()).await;
    }
    let mut client = v1(addr, "").await;
    let reply = subscribe(&mut client, 2, "t", Some((2, &epoch))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["missed"], 3);
    assert_eq!(offsets(&mut client, "t", 3).await, [8, 9, 10]);
    let metrics = http(addr, "GET", "/metrics", "").await.1;
    assert!(
        metrics.contains("ringsocket_v1_recoveries_total{result=\"not_recovered\"} 1"),
        "{metrics}"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_history_pages_through_a_topic() {
    let (_server, addr) = server(|_| {});
    for i in 1..=5 {
        http(addr, "POST", "/publish/h", &format!("{{\"i\":{i}}}")).await;
    }
    let (status, body) = http(addr, "GET", "/history/h?since=1&limit=2", "").await;
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["topic"], "h");
    assert_eq!(page["offset"], 5);
    assert_eq!(page["recovered"], true);
    let publications = page["publications"].as_array().unwrap();
    let got: Vec<(u64, Value)> = publications
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap(), p["data"].clone()))
        .collect();
    assert_eq!(got, [(2, json!({"i": 2})), (3, json!({"i": 3}))]);
    assert_eq!(http(addr, "GET", "/history/h?since=x", "").await.0, 400);
    assert_eq!(http(addr, "GET", "/history/bad%20topic", "").await.0, 400);
}

/// Two v1 publishers (on either core) and the HTTP API publish to one topic at once;
/// a subscriber sees every offset exactly once, in order, and one that subscribes
/// halfway with `since` sees the rest, contiguous.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_gap_and_no_duplicate_while_two_cores_publish() {
    const EACH: u64 = 400;
    let (_server, addr) = server(|c| c.history_size = 10_000);
    let mut watcher = v1(addr, "").await;
    let epoch = subscribe(&mut watcher, 1, "race", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut publishers = Vec::new();
    for p in 0..2u64 {
        let mut client = v1(addr, "").await;
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let id = p * EACH + i;
                send(
                    &mut client,
                    json!({"id": id, "type": "publish", "topic": "race", "data": id}),
                )
                .await;
            }
            let mut acks = 0;
            while acks < EACH {
                if next(&mut client).await["type"] == "published" {
                    acks += 1;
                }
            }
        }));
    }
    let http_publisher = tokio::spawn(async move {
        for i in 0..EACH / 4 {
            http(addr, "POST", "/publish/race", &format!("\"h{i}\"")).await;
        }
    });
    let total = EACH * 2 + EACH / 4;
    let seen = offsets(&mut watcher, "race", (total / 2) as usize).await;
    let last = *seen.last().unwrap();
    let mut late = v1(addr, "").await;
    let reply = subscribe(&mut late, 1, "race", Some((last, &epoch))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    let rest = offsets(&mut watcher, "race", (total - total / 2) as usize).await;
    let all: Vec<u64> = seen.into_iter().chain(rest).collect();
    assert_eq!(all, (1..=total).collect::<Vec<_>>(), "gap or duplicate");
    let late_seen = offsets(&mut late, "race", (total - last) as usize).await;
    assert_eq!(late_seen, (last + 1..=total).collect::<Vec<_>>());
    for p in publishers {
        p.await.unwrap();
    }
    http_publisher.await.unwrap();
}
