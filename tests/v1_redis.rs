//! `ringsocket.v1` across two processes behind one real `redis-server` (started on a
//! free port): publications reach v1 subscribers on the other node, in order, with
//! offsets and an epoch of the receiving node, from a v1 client, a raw room and the
//! HTTP API alike.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use futures_util::{SinkExt, StreamExt};
use ringsocket::app::App;
use ringsocket::broker::redis::{RedisBroker, RedisConfig};
use ringsocket::runtime::RunningServer;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const PATIENCE: Duration = Duration::from_secs(15);

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One process of a cluster: the standard app with its own Redis broker.
fn node(redis: &RedisServer) -> (RunningServer, Arc<RedisBroker>) {
    let app = App::standard();
    let mut config = RedisConfig::new(redis.url());
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    let broker = RedisBroker::start(config, app.publisher().broker_sink()).unwrap();
    app.hub().set_broker(broker.clone()).unwrap();
    (common::start(app, |_| {}), broker)
}

async fn v1(addr: SocketAddr) -> Client {
    let mut request = format!("ws://{addr}/v1").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "ringsocket.v1".parse().unwrap());
    tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request))
        .await
        .unwrap()
        .unwrap()
        .0
}

async fn next(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("timed out waiting for a frame")
            .unwrap()
            .unwrap();
        if let WsMessage::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn request(client: &mut Client, frame: Value) -> Value {
    let id = frame["id"].clone();
    client
        .send(WsMessage::text(frame.to_string()))
        .await
        .unwrap();
    loop {
        let reply = next(client).await;
        if reply["id"] == id {
            return reply;
        }
    }
}

/// Waits until `n` processes listen to `topic` at Redis.
fn wait_for_listeners(redis: &RedisServer, topic: &str, n: i64) {
    let mut con = redis.client();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("ringsocket:{topic}"))
            .query(&mut con)
            .unwrap();
        if counts.first().is_some_and(|(_, c)| *c >= n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no listener for {topic} at Redis"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_publications_cross_nodes_in_order_from_every_kind_of_publisher() {
    let redis = RedisServer::start();
    let (a, _broker_a) = node(&redis);
    let (b, _broker_b) = node(&redis);
    let (a, b) = (a.local_addr(), b.local_addr());

    let mut on_b = v1(b).await;
    let reply = request(
        &mut on_b,
        json!({"id": 1, "type": "subscribe", "topic": "lobby"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let epoch_b = reply["epoch"].as_str().unwrap().to_owned();
    wait_for_listeners(&redis, "lobby", 1);

    // From a v1 client on A.
    let mut on_a = v1(a).await;
    for i in 0..50 {
        let ack = request(
            &mut on_a,
            json!({"id": i, "type": "publish", "topic": "lobby", "data": {"i": i}}),
        )
        .await;
        assert_eq!(ack["type"], "published", "{ack}");
    }
    // From a raw room member and the HTTP API on A.
    let mut raw = tokio::time::timeout(
        PATIENCE,
        tokio_tungstenite::connect_async(format!("ws://{a}/ws/lobby")),
    )
    .await
    .unwrap()
    .unwrap()
    .0;
    raw.send(WsMessage::text(r#"{"i":50}"#)).await.unwrap();
    let response = common::http_exchange(
        a,
        b"POST /publish/lobby HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 8\r\n\r\n{\"i\":51}",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");

    let mut offsets = Vec::new();
    let mut data = Vec::new();
    for _ in 0..52u64 {
        let publication = next(&mut on_b).await;
        assert_eq!(publication["type"], "pub", "{publication}");
        assert_eq!(publication["epoch"], epoch_b.as_str(), "B's own epoch");
        offsets.push(publication["offset"].as_u64().unwrap());
        data.push(publication["data"]["i"].as_u64().unwrap());
    }
    assert_eq!(offsets, (1..=52).collect::<Vec<_>>());
    // One publisher's messages in its order; the raw member's and the API's are two
    // other publishers, in either order after them.
    assert_eq!(data[..50], (0..50).collect::<Vec<_>>()[..]);
    data[50..].sort_unstable();
    assert_eq!(data[50..], [50, 51]);
}
