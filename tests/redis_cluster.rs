//! Two `ringsocket serve` processes joined by a throwaway `redis-server`: clients on
//! both get every message exactly once and in order; when Redis stops, local delivery
//! goes on and what is published waits in the backlog; when it comes back, both
//! processes reconnect and resubscribe on their own, and the other process gets what
//! waited, in order, before what follows.
#![allow(clippy::unwrap_used)]

mod common;

use common::redis::RedisServer;
use common::serve::{Serve, assert_quiet, eventually, expect_sequence};
use common::{http_exchange, ws_connect};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_rooms_through_redis_and_survive_its_restart() {
    let mut redis = RedisServer::start();
    let a = Serve::start(&["--redis", &redis.url()]);
    let b = Serve::start(&["--redis", &redis.url()]);
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..3 {
        on_a.push(ws_connect(a.addr, "/ws/room").await);
        on_b.push(ws_connect(b.addr, "/ws/room").await);
    }
    let mut sender = ws_connect(a.addr, "/ws/room").await;
    for serve in [&a, &b] {
        eventually("both processes subscribed at Redis", async || {
            serve.metric("ringsocket_broker_subscriptions").await == Some(1)
        })
        .await;
    }

    // Before: everything from A's sender reaches everyone else, on both, once, in order.
    const N: usize = 100;
    for i in 0..N {
        sender
            .send(WsMessage::text(format!("before {i}")))
            .await
            .unwrap();
    }
    expect_sequence(&mut on_a, "before", N).await;
    expect_sequence(&mut on_b, "before", N).await;
    // An HTTP publish on B reaches A's clients too, the sender included.
    let response = http_exchange(
        b.addr,
        b"POST /publish/room HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhttp 0",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 202"), "{response}");
    expect_sequence(&mut on_a, "http", 1).await;
    expect_sequence(&mut on_b, "http", 1).await;
    expect_sequence(std::slice::from_mut(&mut sender), "http", 1).await;

    // Redis goes away: A's own clients still get every message.
    redis.stop();
    const M: usize = 20;
    for i in 0..M {
        sender
            .send(WsMessage::text(format!("during {i}")))
            .await
            .unwrap();
    }
    expect_sequence(&mut on_a, "during", M).await;
    eventually("A notices Redis is gone", async || {
        a.metric("ringsocket_broker_connected").await == Some(0)
    })
    .await;
    // Held in A's backlog, not dropped.
    assert_eq!(
        a.metric("ringsocket_broker_backlog_messages").await,
        Some(M as u64)
    );

    // Redis comes back: both reconnect and resubscribe by themselves.
    redis.restart();
    for serve in [&a, &b] {
        eventually("reconnected", async || {
            serve.metric("ringsocket_broker_connected").await == Some(1)
                && serve.metric("ringsocket_broker_reconnects_total").await >= Some(1)
        })
        .await;
    }
    let mut check = redis.client();
    eventually("both processes subscribed again", async || {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("ringsocket:room")
            .query::<Vec<(String, u64)>>(&mut check)
            .ok()
            .and_then(|v| v.into_iter().next())
            .unwrap_or_default();
        n == 2
    })
    .await;
    for i in 0..N {
        sender
            .send(WsMessage::text(format!("after {i}")))
            .await
            .unwrap();
    }
    expect_sequence(&mut on_a, "after", N).await;
    // B missed nothing: what waited came first, in order, then the rest.
    expect_sequence(&mut on_b, "during", M).await;
    expect_sequence(&mut on_b, "after", N).await;
    assert_eq!(
        a.metric("ringsocket_broker_publish_failed_total").await,
        Some(0)
    );
    assert_eq!(
        a.metric("ringsocket_broker_backlog_messages").await,
        Some(0)
    );
    for (i, client) in on_a.iter_mut().chain(on_b.iter_mut()).enumerate() {
        assert_quiet(client, &format!("client {i}")).await;
    }
    assert_quiet(&mut sender, "the sender").await;
}
