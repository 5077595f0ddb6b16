//! `ringsocket.v1` across two processes behind one real `redis-server` (started on a
//! free port): publications reach v1 subscribers on the other node, in order, with
//! offsets and an epoch of the receiving node, from a v1 client, a raw room and the
//! HTTP API alike.
#![allow(clippy::unwrap_used)]

mod common;
use common::v1::{next, publications, publish_http, request, subscribe, v1};

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use futures_util::SinkExt;
use ringsocket::app::App;
use ringsocket::broker::Broker;
use ringsocket::broker::redis::{RedisBroker, RedisConfig, StreamHistory};
use ringsocket::runtime::RunningServer;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const PATIENCE: Duration = Duration::from_secs(15);

/// One process of a cluster: the standard app with its own Redis broker.
fn node(redis: &RedisServer) -> (RunningServer, Arc<RedisBroker>) {
    node_with(redis, |_| {})
}

/// A node whose offsets, epochs and history are at Redis (what `serve --redis` runs).
fn history_node(redis: &RedisServer) -> (RunningServer, Arc<RedisBroker>) {
    node_with(redis, |c| {
        c.history = Some(StreamHistory {
            size: 100,
            ttl: Duration::from_secs(300),
        });
    })
}

fn node_with(
    redis: &RedisServer,
    tweak: impl FnOnce(&mut RedisConfig),
) -> (RunningServer, Arc<RedisBroker>) {
    let app = App::standard();
    let mut config = RedisConfig::new(redis.url());
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    tweak(&mut config);
    let broker = RedisBroker::start(config, app.publisher().broker_sink()).unwrap();
    app.hub().set_broker(broker.clone()).unwrap();
    (common::start(app, |_| {}), broker)
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

    let mut on_b = v1(b, "").await;
    let reply = request(
        &mut on_b,
        json!({"id": 1, "type": "subscribe", "topic": "lobby"}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let epoch_b = reply["epoch"].as_str().unwrap().to_owned();
    wait_for_listeners(&redis, "lobby", 1);

    // From a v1 client on A.
    let mut on_a = v1(a, "").await;
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

/// With the history at Redis, every node numbers a topic alike, and a client that
/// reconnects to another node recovers what it missed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_node_with_shared_offsets() {
    let redis = RedisServer::start();
    let (a, broker_a) = history_node(&redis);
    let (b, _broker_b) = history_node(&redis);
    assert!(broker_a.sequences());
    let (a, b) = (a.local_addr(), b.local_addr());

    let mut on_a = v1(a, "").await;
    let reply = subscribe(&mut on_a, 1, "news", None).await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    assert_eq!(epoch.len(), 16, "{reply}");
    let mut on_b = v1(b, "").await;
    let reply = subscribe(&mut on_b, 1, "news", None).await;
    assert_eq!(reply["epoch"], epoch.as_str(), "one epoch for every node");
    wait_for_listeners(&redis, "news", 2);

    let mut publisher = v1(a, "").await;
    for i in 1..=5u64 {
        let ack = request(
            &mut publisher,
            json!({"id": i, "type": "publish", "topic": "news", "data": i}),
        )
        .await;
        assert_eq!(ack["type"], "published", "{ack}");
        assert_eq!(
            (ack["offset"].as_u64(), ack["epoch"].as_str()),
            (Some(i), Some(epoch.as_str()))
        );
    }
    let expected: Vec<(u64, String, Value)> =
        (1..=5).map(|i| (i, epoch.clone(), json!(i))).collect();
    assert_eq!(
        publications(&mut on_a, 5).await,
        expected,
        "node A, its own"
    );
    assert_eq!(
        publications(&mut on_b, 5).await,
        expected,
        "node B, the same offsets"
    );

    // The client on A goes; five more are published on B; it comes back on B.
    drop(on_a);
    for i in 6..=10 {
        publish_http(b, "news", &i.to_string()).await;
    }
    assert_eq!(
        publications(&mut on_b, 5).await.last().map(|p| p.0),
        Some(10)
    );
    let mut back = v1(b, "").await;
    let reply = subscribe(&mut back, 2, "news", Some((5, &epoch))).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64()),
        (Some(true), Some(5)),
        "{reply}"
    );
    let got = publications(&mut back, 5).await;
    assert_eq!(
        got,
        (6..=10)
            .map(|i| (i, epoch.clone(), json!(i)))
            .collect::<Vec<_>>()
    );
    publish_http(a, "news", "11").await;
    assert_eq!(publications(&mut back, 1).await[0].0, 11);

    // A client that missed them on a node that never had the topic recovers too.
    let (c, _broker_c) = history_node(&redis);
    let mut on_c = v1(c.local_addr(), "").await;
    let reply = subscribe(&mut on_c, 3, "news", Some((8, &epoch))).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64()),
        (Some(true), Some(3)),
        "{reply}"
    );
    assert_eq!(
        publications(&mut on_c, 3)
            .await
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        [9, 10, 11]
    );
}

/// A Redis flush loses the history: the next publication starts a new epoch at
/// offset 1, and a client behind the old one is told `recovered: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_flush_starts_a_new_epoch() {
    let redis = RedisServer::start();
    let (a, _broker) = history_node(&redis);
    let a = a.local_addr();
    let mut client = v1(a, "").await;
    let old = subscribe(&mut client, 1, "t", None).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_listeners(&redis, "t", 1);
    for i in 1..=3 {
        publish_http(a, "t", &i.to_string()).await;
    }
    assert_eq!(
        publications(&mut client, 3).await.last().map(|p| p.0),
        Some(3)
    );
    let _: () = redis::cmd("FLUSHALL").query(&mut redis.client()).unwrap();
    publish_http(a, "t", "after").await;
    let (offset, epoch, data) = publications(&mut client, 1).await.remove(0);
    assert_eq!((offset, data), (1, json!("after")));
    assert_ne!(epoch, old, "a new epoch after the flush");
    let mut back = v1(a, "").await;
    let reply = subscribe(&mut back, 2, "t", Some((3, &old))).await;
    assert_eq!(
        (reply["recovered"].as_bool(), reply["missed"].as_u64()),
        (Some(false), Some(0)),
        "{reply}"
    );
    assert_eq!(reply["epoch"], epoch.as_str());
}

/// A node that missed publications (its Pub/Sub connection was down, say) notices the
/// gap by offset at the next one and fills it from the stream, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_on_one_node_is_filled_from_the_stream() {
    let redis = RedisServer::start();
    let (a, _broker_a) = history_node(&redis);
    let (b, broker_b) = node_with(&redis, |c| {
        c.history = Some(StreamHistory {
            size: 100,
            ttl: Duration::from_secs(300),
        });
    });
    let (a, b) = (a.local_addr(), b.local_addr());
    let mut on_b = v1(b, "").await;
    subscribe(&mut on_b, 1, "g", None).await;
    wait_for_listeners(&redis, "g", 1);
    publish_http(a, "g", "0").await;
    assert_eq!(publications(&mut on_b, 1).await[0].0, 1);

    // Three publications B's Pub/Sub connection never saw (as if it had been down):
    // numbered and kept at Redis as the publish script does, but not published.
    let mut con = redis.client();
    let (meta, stream) = ("ringsocket:g:meta", "ringsocket:g:stream");
    let epoch: String = redis::cmd("HGET")
        .arg(meta)
        .arg("epoch")
        .query(&mut con)
        .unwrap();
    for i in 1..=3u64 {
        let offset: u64 = redis::cmd("HINCRBY")
            .arg(meta)
            .arg("off")
            .arg(1)
            .query(&mut con)
            .unwrap();
        let payload = format!("missed {i}");
        let mut message = format!("rso {offset} {epoch} ").into_bytes();
        message.extend_from_slice(b"rsb\x02");
        message.extend_from_slice(&[7u8; 16]);
        message.extend_from_slice(&i.to_be_bytes());
        message.push(0);
        message.extend_from_slice(payload.as_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let _: String = redis::cmd("XADD")
            .arg(stream)
            .arg(format!("{offset}-0"))
            .arg("m")
            .arg(message)
            .arg("t")
            .arg(now)
            .query(&mut con)
            .unwrap();
    }
    // The next one reveals the gap.
    publish_http(a, "g", "live").await;
    let got = publications(&mut on_b, 4).await;
    assert_eq!(
        got.iter().map(|p| (p.0, p.2.clone())).collect::<Vec<_>>(),
        [
            (2, json!("missed 1")),
            (3, json!("missed 2")),
            (4, json!("missed 3")),
            (5, json!("live"))
        ],
        "filled in order, then the one that revealed the gap"
    );
    let fills = broker_b
        .metrics()
        .gap_fills
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(fills >= 1, "filled from the stream");
}
